// Depthwise convolution (MobileNet): each channel convolved with its own KH x KW filter.
//
// x (N, C, H, W), w (C, 1, KH, KW), out (N, C, OH, OW); any stride and padding.
//   depthwise_conv2d        forward. One thread per output element, consecutive threads on
//                           consecutive ow. The filter of a channel is tiny (9 floats for 3x3) and
//                           read by every thread of that channel, so it comes through the read-only
//                           cache (__ldg); with KH*KW FMAs per output the kernel is memory bound and
//                           the goal is coalesced traffic, not shared-memory reuse.
//                           bias may be null (has_bias = 0). block 256, grid-stride.
//   depthwise_backward_input  dx = the adjoint: one thread per x element gathers every output
//                           (and tap) that read it, like col2im: no atomics. block 256, grid-stride.
//   depthwise_backward_weight dw[c][kh][kw] = sum over n, oh, ow of dy * x. One block per weight
//                           (grid C*KH*KW): threads stride over the N*OH*OW products, then a
//                           warp-shuffle reduction and a shared-memory pass over the warps' sums.
//                           The reduction order is fixed, so the result is deterministic.
//                           block 256 (a multiple of 32, at most 1024).

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

extern "C" __global__ void depthwise_backward_input(const float* __restrict__ dy, const float* __restrict__ w,
                                                    float* __restrict__ dx, int N, int C, int H, int W, int KH,
                                                    int KW, int OH, int OW, int sh, int sw, int ph, int pw) {
    const long long total = (long long)N * C * H * W;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int iw = (int)(i % W);
        int ih = (int)(i / W % H);
        int c = (int)(i / ((long long)W * H) % C);
        int n = (int)(i / ((long long)W * H * C));
        const float* dyc = dy + ((long long)n * C + c) * OH * OW;
        const float* wc = w + (long long)c * KH * KW;
        float acc = 0.f;
        for (int kh = 0; kh < KH; ++kh) {
            int th = ih + ph - kh;  // = oh * sh when output row oh reads x row ih through tap kh
            if (th < 0 || th % sh != 0 || th / sh >= OH) continue;
            for (int kw = 0; kw < KW; ++kw) {
                int tw = iw + pw - kw;
                if (tw < 0 || tw % sw != 0 || tw / sw >= OW) continue;
                acc += dyc[(long long)(th / sh) * OW + tw / sw] * __ldg(wc + kh * KW + kw);
            }
        }
        dx[i] = acc;
    }
}

extern "C" __global__ void depthwise_backward_weight(const float* __restrict__ x, const float* __restrict__ dy,
                                                     float* __restrict__ dw, int N, int C, int H, int W, int KH,
                                                     int KW, int OH, int OW, int sh, int sw, int ph, int pw) {
    __shared__ float warp_sums[32];
    const int kw = blockIdx.x % KW;
    const int kh = blockIdx.x / KW % KH;
    const int c = blockIdx.x / (KW * KH);
    const long long per_image = (long long)OH * OW;
    const long long total = (long long)N * per_image;
    float acc = 0.f;
    for (long long i = threadIdx.x; i < total; i += blockDim.x) {
        int n = (int)(i / per_image);
        int r = (int)(i % per_image);
        int oh = r / OW, ow = r % OW;
        int ih = oh * sh - ph + kh, iw = ow * sw - pw + kw;
        if (ih < 0 || ih >= H || iw < 0 || iw >= W) continue;
        long long plane = (long long)n * C + c;
        acc += dy[plane * per_image + r] * x[(plane * H + ih) * W + iw];
    }
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        int nwarps = (blockDim.x + 31) >> 5;
        acc = lane < nwarps ? warp_sums[lane] : 0.f;
        for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
        if (lane == 0) dw[blockIdx.x] = acc;
    }
}
