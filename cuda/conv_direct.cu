// Direct convolution, the textbook loop: out[n][o][oh][ow] = bias[o] + sum_{c,kh,kw} x * w.
//
// NCHW input, OIHW weights, any stride / padding / dilation. One thread per output element,
// consecutive threads on consecutive ow (coalesced writes); every thread re-reads its whole
// receptive field from global memory, which is exactly why im2col + GEMM beats it. It stays as
// the baseline the faster algorithm is measured and checked against.
// bias may be null (has_bias = 0). Launch: block 256, grid min(ceil(total / 256), 65535 * 8).

extern "C" __global__ void conv2d_direct(const float* __restrict__ x, const float* __restrict__ w,
                                         const float* __restrict__ bias, int has_bias, float* __restrict__ out,
                                         int N, int C, int H, int W, int O, int KH, int KW, int OH, int OW, int sh,
                                         int sw, int ph, int pw, int dh, int dw) {
    const long long total = (long long)N * O * OH * OW;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int ow = (int)(i % OW);
        int oh = (int)(i / OW % OH);
        int o = (int)(i / ((long long)OW * OH) % O);
        int n = (int)(i / ((long long)OW * OH * O));
        float acc = has_bias ? bias[o] : 0.f;
        for (int c = 0; c < C; ++c) {
            const float* xc = x + ((long long)n * C + c) * H * W;
            const float* wc = w + ((long long)o * C + c) * KH * KW;
            for (int kh = 0; kh < KH; ++kh) {
                int h = oh * sh - ph + kh * dh;
                if (h < 0 || h >= H) continue;
                for (int kw = 0; kw < KW; ++kw) {
                    int ww = ow * sw - pw + kw * dw;
                    if (ww < 0 || ww >= W) continue;
                    acc += xc[(long long)h * W + ww] * wc[kh * KW + kw];
                }
            }
        }
        out[i] = acc;
    }
}
