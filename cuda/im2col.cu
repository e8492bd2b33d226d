// im2col / col2im for NCHW batches, any stride, padding and dilation.
//
// cols has shape (C*KH*KW, N*OH*OW): row (c, kh, kw), column (n, oh, ow), so that a whole
// convolution is one GEMM  out(O, N*OH*OW) = W(O, C*KH*KW) @ cols.
//
//   im2col   one thread per element of cols, grid-stride loop over all of them; consecutive
//            threads take consecutive (n, oh, ow), so the writes are coalesced and the reads
//            of x walk a row with the conv stride. Out-of-image taps write 0.
//   col2im   gather, no atomics: one thread per element of x sums every (kh, kw, oh, ow)
//            that read it, so each output is written exactly once. Used for the input gradient.
// Indices are 64-bit: a VGG-sized batch exceeds 2^31 elements of cols.
// Launch: block 256, grid min(ceil(total / 256), 65535 * 8) (grid-stride covers the rest).

extern "C" __global__ void im2col(const float* __restrict__ x, float* __restrict__ cols, int N, int C, int H,
                                  int W, int KH, int KW, int OH, int OW, int sh, int sw, int ph, int pw, int dh,
                                  int dw) {
    const long long ncols = (long long)N * OH * OW;
    const long long total = ncols * C * KH * KW;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long col = i % ncols;
        long long row = i / ncols;
        int ow = (int)(col % OW);
        int oh = (int)(col / OW % OH);
        int n = (int)(col / ((long long)OW * OH));
        int kw = (int)(row % KW);
        int kh = (int)(row / KW % KH);
        int c = (int)(row / ((long long)KW * KH));
        int h = oh * sh - ph + kh * dh;
        int w = ow * sw - pw + kw * dw;
        cols[i] = (h >= 0 && h < H && w >= 0 && w < W) ? x[(((long long)n * C + c) * H + h) * W + w] : 0.f;
    }
}

extern "C" __global__ void col2im(const float* __restrict__ cols, float* __restrict__ x, int N, int C, int H,
                                  int W, int KH, int KW, int OH, int OW, int sh, int sw, int ph, int pw, int dh,
                                  int dw) {
    const long long ncols = (long long)N * OH * OW;
    const long long total = (long long)N * C * H * W;
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        int w = (int)(i % W);
        int h = (int)(i / W % H);
        int c = (int)(i / ((long long)W * H) % C);
        int n = (int)(i / ((long long)W * H * C));
        float acc = 0.f;
        for (int kh = 0; kh < KH; ++kh) {
            int th = h + ph - kh * dh;  // = oh * sh when this tap of row oh reads x[h]
            if (th < 0 || th % sh != 0) continue;
            int oh = th / sh;
            if (oh >= OH) continue;
            for (int kw = 0; kw < KW; ++kw) {
                int tw = w + pw - kw * dw;
                if (tw < 0 || tw % sw != 0) continue;
                int ow = tw / sw;
                if (ow >= OW) continue;
                long long row = ((long long)c * KH + kh) * KW + kw;
                acc += cols[row * ncols + ((long long)n * OH + oh) * OW + ow];
            }
        }
        x[i] = acc;
    }
}
