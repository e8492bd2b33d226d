// Depthwise convolution (MobileNet): each channel convolved with its own KH x KW filter.
//
// x (N, C, H, W), w (C, 1, KH, KW), out (N, C, OH, OW); any stride and padding.
//   depthwise_conv2d        forward. One thread per output element, consecutive threads on
//                           consecutive ow; a block works inside one plane (n, c) at a time, so
//                           the filter (9 floats for 3x3) is the same for the whole block and comes
//                           through the read-only cache (__ldg); with KH*KW FMAs per output the
//                           kernel is memory bound and the goal is coalesced traffic, not
//                           shared-memory reuse. bias may be null (has_bias = 0).
//                           block 256, grid (ceil(OH*OW / 256), min(N*C, 65535)), planes on y.
//   depthwise_backward_input  dx = the adjoint: one thread per x element gathers every output
//                           (and tap) that read it, like col2im: no atomics.
//                           block 256, grid (ceil(H*W / 256), min(N*C, 65535)), planes on y.
// Pixel indices inside a plane are 32-bit, plane offsets 64-bit; no 64-bit division per element.
//   depthwise_backward_weight dw[c][kh][kw] = sum over n, oh, ow of dy * x. One block per weight
//                           (grid C*KH*KW): threads stride over the N*OH*OW products, then a
//                           warp-shuffle reduction and a shared-memory pass over the warps' sums.
//                           The reduction order is fixed, so the result is deterministic.
//                           block 256 (a multiple of 32, at most 1024).

extern "C" __global__ void depthwise_conv2d(const float* __restrict__ x, const float* __restrict__ w,
                                            const float* __restrict__ bias, int has_bias, float* __restrict__ out,
                                            int N, int C, int H, int W, int KH, int KW, int OH, int OW, int sh,
                                            int sw, int ph, int pw) {
    const int pix = blockIdx.x * blockDim.x + threadIdx.x;
    if (pix >= OH * OW) return;
    const int ow = pix % OW, oh = pix / OW;
    const int h0 = oh * sh - ph, w0 = ow * sw - pw;
    for (int plane = blockIdx.y; plane < N * C; plane += gridDim.y) {
        const int c = plane % C;
        const float* xc = x + (long long)plane * H * W;
        const float* wc = w + c * KH * KW;
        float acc = has_bias ? __ldg(bias + c) : 0.f;
        for (int kh = 0; kh < KH; ++kh) {
            const int h = h0 + kh;
            if (h < 0 || h >= H) continue;
            for (int kw = 0; kw < KW; ++kw) {
                const int ww = w0 + kw;
                if (ww < 0 || ww >= W) continue;
                acc += __ldg(xc + h * W + ww) * __ldg(wc + kh * KW + kw);
            }
        }
        out[(long long)plane * OH * OW + pix] = acc;
    }
}

extern "C" __global__ void depthwise_backward_input(const float* __restrict__ dy, const float* __restrict__ w,
                                                    float* __restrict__ dx, int N, int C, int H, int W, int KH,
                                                    int KW, int OH, int OW, int sh, int sw, int ph, int pw) {
    const int pix = blockIdx.x * blockDim.x + threadIdx.x;
    if (pix >= H * W) return;
    const int iw = pix % W, ih = pix / W;
    for (int plane = blockIdx.y; plane < N * C; plane += gridDim.y) {
        const float* dyc = dy + (long long)plane * OH * OW;
        const float* wc = w + (plane % C) * KH * KW;
        float acc = 0.f;
        for (int kh = 0; kh < KH; ++kh) {
            const int th = ih + ph - kh;  // = oh * sh when output row oh reads x row ih through tap kh
            if (th < 0 || th % sh != 0 || th / sh >= OH) continue;
            for (int kw = 0; kw < KW; ++kw) {
                const int tw = iw + pw - kw;
                if (tw < 0 || tw % sw != 0 || tw / sw >= OW) continue;
                acc += __ldg(dyc + (th / sh) * OW + tw / sw) * __ldg(wc + kh * KW + kw);
            }
        }
        dx[(long long)plane * H * W + pix] = acc;
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
