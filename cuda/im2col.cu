// im2col / col2im for NCHW batches, any stride, padding and dilation.
//
// cols has shape (C*KH*KW, N*OH*OW): row (c, kh, kw), column (n, oh, ow), so that a whole
// convolution is one GEMM  out(O, N*OH*OW) = W(O, C*KH*KW) @ cols.
//
//   im2col   one thread per column (n, oh, ow), which it decodes once, then writes its KH*KW taps
//            for each channel c of a grid-stride loop over blockIdx.y. Consecutive threads take
//            consecutive columns, so every store is a coalesced row segment of cols and the loads
//            of x walk an image row with the conv stride; out-of-image taps write 0. Column
//            indices are 32-bit (the host requires N*OH*OW < 2^31), offsets into cols 64-bit.
//            Launch: block 256, grid (ceil(N*OH*OW / 256), min(C, 65535)).
//   col2im   gather, no atomics: one thread per element of x sums every (kh, kw, oh, ow) that
//            read it, so each output is written exactly once. Used for the input gradient.
//            Planes (n, c) on blockIdx.y (grid-stride), the pixels of a plane on x, 32-bit.
//            Launch: block 256, grid (ceil(H*W / 256), min(N*C, 65535)).

extern "C" __global__ void im2col(const float* __restrict__ x, float* __restrict__ cols, int N, int C, int H,
                                  int W, int KH, int KW, int OH, int OW, int sh, int sw, int ph, int pw, int dh,
                                  int dw) {
    const int ncols = N * OH * OW;
    const int col = blockIdx.x * blockDim.x + threadIdx.x;
    if (col >= ncols) return;
    const int ow = col % OW, q = col / OW;
    const int oh = q % OH, n = q / OH;
    const int h0 = oh * sh - ph, w0 = ow * sw - pw;
    const long long plane = (long long)H * W, taps = (long long)KH * KW;
    for (int c = blockIdx.y; c < C; c += gridDim.y) {
        const float* xc = x + ((long long)n * C + c) * plane;
        float* out = cols + (long long)c * taps * ncols + col;
        for (int kh = 0; kh < KH; ++kh) {
            const int h = h0 + kh * dh;
            const bool hin = h >= 0 && h < H;
            for (int kw = 0; kw < KW; ++kw) {
                const int w = w0 + kw * dw;
                *out = (hin && w >= 0 && w < W) ? __ldg(xc + (long long)h * W + w) : 0.f;
                out += ncols;
            }
        }
    }
}

extern "C" __global__ void col2im(const float* __restrict__ cols, float* __restrict__ x, int N, int C, int H,
                                  int W, int KH, int KW, int OH, int OW, int sh, int sw, int ph, int pw, int dh,
                                  int dw) {
    const int pix = blockIdx.x * blockDim.x + threadIdx.x;
    if (pix >= H * W) return;
    const int w = pix % W, h = pix / W;
    const long long ncols = (long long)N * OH * OW;
    for (int plane = blockIdx.y; plane < N * C; plane += gridDim.y) {
        const int n = plane / C, c = plane % C;
        const float* col0 = cols + (long long)c * KH * KW * ncols + (long long)n * OH * OW;
        float acc = 0.f;
        for (int kh = 0; kh < KH; ++kh) {
            const int th = h + ph - kh * dh;  // = oh * sh when this tap of row oh reads x[h]
            if (th < 0 || th % sh != 0) continue;
            const int oh = th / sh;
            if (oh >= OH) continue;
            for (int kw = 0; kw < KW; ++kw) {
                const int tw = w + pw - kw * dw;
                if (tw < 0 || tw % sw != 0) continue;
                const int ow = tw / sw;
                if (ow >= OW) continue;
                acc += __ldg(col0 + (long long)(kh * KW + kw) * ncols + oh * OW + ow);
            }
        }
        x[(long long)plane * H * W + pix] = acc;
    }
}
