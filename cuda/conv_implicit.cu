// Implicit-GEMM convolution: forward, input gradient and weight gradient as tiled GEMMs whose
// im2col operand is gathered straight from the image into shared memory, tile by tile (no
// im2col matrix in global memory). NCHW x, OIHW w with w.shape[1] == C / G; any stride,
// padding, dilation and group count G (C % G == 0, O % G == 0; the host checks).
//
// Every kernel is one 64 x 64 x 8 block tile over the GEMM of one group (blockIdx.z), 256
// threads, each owning a 4 x 4 register micro-tile (rows tr + 16 i, columns tc + 16 j, so the
// 16 consecutive tc of a half-warp read 16 consecutive shared words and store 16 consecutive
// output columns). Two shared-memory stages: the next BK slice is gathered into registers while
// the current one is multiplied, one barrier per slice (as sgemm_regblock_db in gemm.cu). Each
// thread gathers 2 A and 2 B elements per slice; its B column is fixed for the whole loop, so
// the column's (n, oh, ow) decode is done once. Out-of-image taps and partial tiles read 0.
// 32-bit GEMM coordinates (the host requires every extent < 2^31), 64-bit memory offsets.
//
//   conv2d_igemm     y[n, o, oh, ow] = act(bias[o] + sum_k W[o, k] X[k, (n, oh, ow)]),
//                    M = O/G, N = N*OH*OW, K = C/G*KH*KW; act 0 none, 1 ReLU, 2 ReLU6 (fused; NaN kept).
//   conv2d_igemm_dx  dx[n, c, h, w] = sum_(o, i, j) w[o, c, i, j] dy[n, o, (h+ph-i*dh)/sh, ...]
//                    over the taps that divide evenly and land in dy (gather: every dx element
//                    written once, no atomics). M = C/G, N = N*H*W, K = O/G*KH*KW. With stride s
//                    all but 1/s^2 of the gathered taps are zeros: the price of the gather form.
//   conv2d_igemm_dw  dw[o, (c, i, j)] = sum_(n, oh, ow) dy[n, o, oh, ow] X[(c, i, j), (n, oh, ow)],
//                    M = O/G, N = C/G*KH*KW, K = N*OH*OW split into `chunk`-long ranges over
//                    blockIdx.z = split * G + g; each split writes its own slice of `partial`
//                    (splits x O x C/G*KH*KW), which conv_sum_splits adds in split order: the
//                    result is deterministic (same bits every run, whatever the schedule).
//   conv_sum_splits  out[i] = sum_s partial[s * total + i], grid-stride over i.
// Launch: block 256; grid (ceil(N/64), ceil(M/64), G) (dw: G * splits); conv_sum_splits block
// 256, grid min(ceil(total / 256), 65535 * 8).

#define IG_BM 64
#define IG_BN 64
#define IG_BK 8
#define IG_PAD 4   // A's tile is stored k-major by a transposing store: the pad spreads its banks
#define IG_THREADS 256

// ------------------------------------------------------------------ operand gathers
// A operands: at(m, k) for block-local row m (bounds-checked against `rows`, the rows left in
// this group from the block's first row) and GEMM depth k < K.
struct IgWeightRows {  // forward: A[m][k] = w[o0 + m][k], one contiguous row of K per channel
    const float* w;
    int rows, K;
    __device__ float at(int m, int k) const { return m < rows ? __ldg(w + (long long)m * K + k) : 0.f; }
};

struct IgWeightCols {  // dx: A[c][(o, r)] = w[o][c0 + c][r], r = (i, j)
    const float* w;    // w of the group's first output channel, column c0
    int rows, cg, khw;
    __device__ float at(int m, int k) const {
        if (m >= rows) return 0.f;
        const int o = k / khw, r = k - o * khw;
        return __ldg(w + ((long long)o * cg + m) * khw + r);
    }
};

struct IgGradRows {  // dw: A[o][(n, q)] = dy[n][o0 + o][q], q = oh * OW + ow
    const float* dy;     // dy of the block's first channel, n = 0
    int rows, ohw;
    long long nstride;   // O * OH * OW
    __device__ float at(int m, int k) const {
        if (m >= rows) return 0.f;
        const int n = k / ohw, q = k - n * ohw;
        return __ldg(dy + n * nstride + (long long)m * ohw + q);
    }
};

// B operands: one thread's fixed column, decoded once; at(k) for GEMM depth k.
struct IgImageCols {  // forward: B[(c, i, j)][(n, oh, ow)] = x[n][c0 + c][oh*sh - ph + i*dh][...]
    const float* xn;  // x[n][c0], or null when the column is past the end
    int h0, w0, H, W, KH, KW, dh, dw;
    __device__ float at(int k) const {
        if (!xn) return 0.f;
        const int khw = KH * KW, c = k / khw, r = k - c * khw, i = r / KW, j = r - i * KW;
        const int h = h0 + i * dh, w = w0 + j * dw;
        return (h >= 0 && h < H && w >= 0 && w < W) ? __ldg(xn + ((long long)c * H + h) * W + w) : 0.f;
    }
};

struct IgGradTaps {  // dx: B[(o, i, j)][(n, h, w)] = dy[n][o0 + o][(h + ph - i*dh) / sh][...] or 0
    const float* dyn;  // dy[n][o0], or null when the column is past the end
    int hp, wp, OH, OW, KH, KW, sh, sw, dh, dw;  // hp = h + ph, wp = w + pw
    __device__ float at(int k) const {
        if (!dyn) return 0.f;
        const int khw = KH * KW, o = k / khw, r = k - o * khw, i = r / KW, j = r - i * KW;
        const int th = hp - i * dh, tw = wp - j * dw;
        if (th < 0 || tw < 0 || th % sh || tw % sw) return 0.f;
        const int oh = th / sh, ow = tw / sw;
        if (oh >= OH || ow >= OW) return 0.f;
        return __ldg(dyn + ((long long)o * OH + oh) * OW + ow);
    }
};

struct IgImageRows {  // dw: B[(n, oh, ow)][(c, i, j)] = x[n][c0 + c][oh*sh + i*dh - ph][...]
    const float* xc;    // x[0][c0 + c], or null when the column is past the end
    long long nstride;  // C * H * W
    int hoff, woff, H, W, OH, OW, sh, sw;
    __device__ float at(int k) const {
        if (!xc) return 0.f;
        const int ohw = OH * OW, n = k / ohw, q = k - n * ohw, oh = q / OW, ow = q - oh * OW;
        const int h = oh * sh + hoff, w = ow * sw + woff;
        return (h >= 0 && h < H && w >= 0 && w < W) ? __ldg(xc + n * nstride + (long long)h * W + w) : 0.f;
    }
};

// ------------------------------------------------------------------ the shared GEMM loop
template <class LA, class LB>
__device__ __forceinline__ void ig_gather(const LA& la, const LB& lb, int k0, int k_end, int t, float (&ra)[2],
                                          float (&rb)[2]) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int e = t + r * IG_THREADS;
        const int ka = k0 + (e & (IG_BK - 1)), kb = k0 + (e >> 6);  // A: 64 rows x 8 k; B: 8 k x 64 cols
        ra[r] = ka < k_end ? la.at(e >> 3, ka) : 0.f;
        rb[r] = kb < k_end ? lb.at(kb) : 0.f;
    }
}

__device__ __forceinline__ void ig_stage(float (*As)[IG_BM + IG_PAD], float (*Bs)[IG_BN], const float (&ra)[2],
                                         const float (&rb)[2], int t) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int e = t + r * IG_THREADS;
        As[e & (IG_BK - 1)][e >> 3] = ra[r];
        Bs[e >> 6][e & (IG_BN - 1)] = rb[r];
    }
}

__device__ __forceinline__ void ig_multiply(float (&acc)[4][4], const float (*As)[IG_BM + IG_PAD],
                                            const float (*Bs)[IG_BN], int tr, int tc) {
#pragma unroll
    for (int k = 0; k < IG_BK; ++k) {
        float a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = As[k][tr + 16 * i];
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = Bs[k][tc + 16 * j];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
    }
}

// acc += A[:, k_begin:k_end] B[k_begin:k_end, :] for this block's tile. As / Bs: two stages,
// declared by the kernel (a __shared__ array inside an inline function is not allowed on emu).
template <class LA, class LB>
__device__ __forceinline__ void ig_mainloop(const LA& la, const LB& lb, int k_begin, int k_end,
                                            float (*As)[IG_BK][IG_BM + IG_PAD], float (*Bs)[IG_BK][IG_BN],
                                            float (&acc)[4][4], int t, int tr, int tc) {
    float ra[2], rb[2];
    ig_gather(la, lb, k_begin, k_end, t, ra, rb);
    ig_stage(As[0], Bs[0], ra, rb, t);
    __syncthreads();
    int cur = 0;
    for (int k0 = k_begin; k0 < k_end; k0 += IG_BK) {
        const bool more = k0 + IG_BK < k_end;
        if (more) ig_gather(la, lb, k0 + IG_BK, k_end, t, ra, rb);
        ig_multiply(acc, As[cur], Bs[cur], tr, tc);
        // the other stage was last read in the previous slice, which the barrier below closed
        if (more) ig_stage(As[cur ^ 1], Bs[cur ^ 1], ra, rb, t);
        __syncthreads();
        cur ^= 1;
    }
}

// ------------------------------------------------------------------ kernels
extern "C" __global__ void __launch_bounds__(IG_THREADS)
conv2d_igemm(const float* __restrict__ x, const float* __restrict__ w, const float* __restrict__ bias, int has_bias,
             int act, float* __restrict__ y, int N, int C, int H, int W, int O, int KH, int KW, int OH, int OW, int sh,
             int sw, int ph, int pw, int dh, int dw, int G) {
    __shared__ __align__(16) float As[2][IG_BK][IG_BM + IG_PAD];
    __shared__ __align__(16) float Bs[2][IG_BK][IG_BN];
    const int t = threadIdx.x, tr = t >> 4, tc = t & 15;
    const int g = blockIdx.z, cg = C / G, og = O / G;
    const int m0 = blockIdx.y * IG_BM, n0 = blockIdx.x * IG_BN;
    const int K = cg * KH * KW, ohw = OH * OW, ncols = N * ohw;

    const IgWeightRows la{w + (long long)(g * og + m0) * K, og - m0, K};
    IgImageCols lb{nullptr, 0, 0, H, W, KH, KW, dh, dw};
    const int col = n0 + (t & (IG_BN - 1));
    if (col < ncols) {
        const int n = col / ohw, q = col - n * ohw, oh = q / OW, ow = q - oh * OW;
        lb.xn = x + ((long long)n * C + g * cg) * H * W;
        lb.h0 = oh * sh - ph;
        lb.w0 = ow * sw - pw;
    }
    float acc[4][4] = {};
    ig_mainloop(la, lb, 0, K, As, Bs, acc, t, tr, tc);

    long long out_col[4];  // offset of column j in y, less the channel term
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int c = n0 + tc + 16 * j;
        const int n = c / ohw;
        out_col[j] = c < ncols ? (long long)n * O * ohw + (c - n * ohw) : -1;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + tr + 16 * i;
        if (m >= og) continue;
        const int o = g * og + m;
        const float b = has_bias ? __ldg(bias + o) : 0.f;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            if (out_col[j] < 0) continue;
            float v = acc[i][j] + b;
            // comparisons, not fmaxf / fminf: a NaN stays NaN, as in ops.activation.activate_
            if (act >= 1 && v < 0.f) v = 0.f;
            if (act == 2 && v > 6.f) v = 6.f;
            y[out_col[j] + (long long)o * ohw] = v;
        }
    }
}

extern "C" __global__ void __launch_bounds__(IG_THREADS)
conv2d_igemm_dx(const float* __restrict__ w, const float* __restrict__ dy, float* __restrict__ dx, int N, int C,
                int H, int W, int O, int KH, int KW, int OH, int OW, int sh, int sw, int ph, int pw, int dh, int dw,
                int G) {
    __shared__ __align__(16) float As[2][IG_BK][IG_BM + IG_PAD];
    __shared__ __align__(16) float Bs[2][IG_BK][IG_BN];
    const int t = threadIdx.x, tr = t >> 4, tc = t & 15;
    const int g = blockIdx.z, cg = C / G, og = O / G, khw = KH * KW;
    const int m0 = blockIdx.y * IG_BM, n0 = blockIdx.x * IG_BN;
    const int K = og * khw, hw = H * W, ncols = N * hw;

    const IgWeightCols la{w + ((long long)g * og * cg + m0) * khw, cg - m0, cg, khw};
    IgGradTaps lb{nullptr, 0, 0, OH, OW, KH, KW, sh, sw, dh, dw};
    const int col = n0 + (t & (IG_BN - 1));
    if (col < ncols) {
        const int n = col / hw, q = col - n * hw, h = q / W;
        lb.dyn = dy + ((long long)n * O + g * og) * OH * OW;
        lb.hp = h + ph;
        lb.wp = q - h * W + pw;
    }
    float acc[4][4] = {};
    ig_mainloop(la, lb, 0, K, As, Bs, acc, t, tr, tc);

#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + tr + 16 * i;
        if (m >= cg) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = n0 + tc + 16 * j;
            if (c >= ncols) continue;
            const int n = c / hw;
            dx[((long long)n * C + g * cg + m) * hw + (c - n * hw)] = acc[i][j];
        }
    }
}

extern "C" __global__ void __launch_bounds__(IG_THREADS)
conv2d_igemm_dw(const float* __restrict__ x, const float* __restrict__ dy, float* __restrict__ partial, int chunk,
                int N, int C, int H, int W, int O, int KH, int KW, int OH, int OW, int sh, int sw, int ph, int pw,
                int dh, int dw, int G) {
    __shared__ __align__(16) float As[2][IG_BK][IG_BM + IG_PAD];
    __shared__ __align__(16) float Bs[2][IG_BK][IG_BN];
    const int t = threadIdx.x, tr = t >> 4, tc = t & 15;
    const int g = blockIdx.z % G, split = blockIdx.z / G, cg = C / G, og = O / G, khw = KH * KW;
    const int m0 = blockIdx.y * IG_BM, n0 = blockIdx.x * IG_BN;
    const int ncols = cg * khw, ohw = OH * OW, K = N * ohw;
    const int k_begin = split * chunk;
    const int k_end = (int)min((long long)K, (long long)k_begin + chunk);  // no int overflow near 2^31

    const IgGradRows la{dy + (long long)(g * og + m0) * ohw, og - m0, ohw, (long long)O * ohw};
    IgImageRows lb{nullptr, (long long)C * H * W, 0, 0, H, W, OH, OW, sh, sw};
    const int col = n0 + (t & (IG_BN - 1));
    if (col < ncols) {
        const int c = col / khw, r = col - c * khw, i = r / KW;
        lb.xc = x + (long long)(g * cg + c) * H * W;
        lb.hoff = i * dh - ph;
        lb.woff = (r - i * KW) * dw - pw;
    }
    float acc[4][4] = {};
    ig_mainloop(la, lb, k_begin, k_end, As, Bs, acc, t, tr, tc);

    float* out = partial + (long long)split * O * ncols;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int m = m0 + tr + 16 * i;
        if (m >= og) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int c = n0 + tc + 16 * j;
            if (c < ncols) out[(long long)(g * og + m) * ncols + c] = acc[i][j];
        }
    }
}

extern "C" __global__ void conv_sum_splits(const float* __restrict__ partial, float* __restrict__ out, int splits,
                                           long long total) {
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        float s = 0.f;
        for (int p = 0; p < splits; ++p) s += __ldg(partial + p * total + i);
        out[i] = s;
    }
}
