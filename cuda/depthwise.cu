// Depthwise convolution forward (MobileNet): each channel convolved with its own KH x KW filter.
//
// x (N, C, H, W), w (C, 1, KH, KW), out (N, C, OH, OW); any stride and padding. One thread per
// output element, consecutive threads on consecutive ow. The filter of a channel is tiny (9
// floats for 3x3) and read by every thread of that channel, so it comes through the read-only
// cache (__ldg); the arithmetic intensity is low (KH*KW FMAs per output), so the kernel is
// memory bound and the goal is coalesced traffic, not shared-memory reuse.
// bias may be null (has_bias = 0). Launch: block 256, grid min(ceil(total / 256), 65535 * 8).

extern "C" __global__ void depthwise_conv2d(const float* __restrict__ x, const float* __restrict__ w,
                                            const float* __restrict__ bias, int has_bias, float* __restrict__ out,
                                            int N, int C, int H, int W, int KH, int KW, int OH, int OW, int sh,
                                            int sw, int ph, int pw) {
    const long long total = (long long)N * C * OH * OW;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int ow = (int)(i % OW);
        int oh = (int)(i / OW % OH);
        int c = (int)(i / ((long long)OW * OH) % C);
        int n = (int)(i / ((long long)OW * OH * C));
        const float* xc = x + ((long long)n * C + c) * H * W;
        const float* wc = w + (long long)c * KH * KW;
        float acc = has_bias ? __ldg(bias + c) : 0.f;
        for (int kh = 0; kh < KH; ++kh) {
            int h = oh * sh - ph + kh;
            if (h < 0 || h >= H) continue;
            for (int kw = 0; kw < KW; ++kw) {
                int ww = ow * sw - pw + kw;
                if (ww < 0 || ww >= W) continue;
                acc += xc[(long long)h * W + ww] * __ldg(wc + kh * KW + kw);
            }
        }
        out[i] = acc;
    }
}
