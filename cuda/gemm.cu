// SGEMM: C = alpha * op(A) * op(B) + beta * C, row-major float32, op(X) = X or X^T.
//
// op(A) is M x K, op(B) is K x N, C is M x N. ta / tb say whether A / B are stored transposed
// (A stored K x M with leading dimension lda, and so on); the flag is uniform over the grid, so
// the branch on it costs nothing per element. beta == 0 means C is write-only (never read),
// so an uninitialised C cannot leak NaN into the result.
//
// The variants form a ladder, each adding one idea to the previous one:
//   sgemm_naive     one thread per C element, operands straight from global memory.
//                   block (16, 16), grid (ceil(N/16), ceil(M/16)).
//   sgemm_tiled     + 32x32 tiles of A and B staged in shared memory (each global element read
//                   once per tile instead of once per product). block (32, 32).
//   sgemm_regblock  + 128x128 block tile, 256 threads, each thread owns an 8x8 micro-tile held in
//                   registers (64 FMAs per 16 shared-memory loads); float4 global loads and stores
//                   where the operand is 16-byte aligned; A's tile stored k-major with a 4-float
//                   pad so the transposing store is bank-conflict-free; each thread's 8 rows and 8
//                   columns are two groups of 4 strided by 64, so every quarter-warp float4 read of
//                   shared memory touches 32 distinct banks. block (256), grid (ceil(N/128), ceil(M/128)).
//   sgemm_regblock_db + two shared-memory stages: the next k-slice is loaded into registers while
//                   the current one is multiplied, one barrier per slice (the default).
// All variants take any M, N, K >= 1 (partial tiles are zero-filled in shared memory).

#define GEMM_AT(X, ld, t, r, c) ((t) ? (X)[(long long)(c) * (ld) + (r)] : (X)[(long long)(r) * (ld) + (c)])

extern "C" __global__ void sgemm_naive(int M, int N, int K, float alpha, const float* __restrict__ A, int lda,
                                       int ta, const float* __restrict__ B, int ldb, int tb, float beta,
                                       float* __restrict__ C, int ldc) {
    int col = blockIdx.x * blockDim.x + threadIdx.x;
    int row = blockIdx.y * blockDim.y + threadIdx.y;
    if (row >= M || col >= N) return;
    float acc = 0.f;
    for (int k = 0; k < K; ++k) acc += GEMM_AT(A, lda, ta, row, k) * GEMM_AT(B, ldb, tb, k, col);
    float* c = C + (long long)row * ldc + col;
    *c = beta == 0.f ? alpha * acc : alpha * acc + beta * *c;
}

#define TILE 32

extern "C" __global__ void __launch_bounds__(TILE * TILE)
sgemm_tiled(int M, int N, int K, float alpha, const float* __restrict__ A, int lda, int ta,
            const float* __restrict__ B, int ldb, int tb, float beta, float* __restrict__ C, int ldc) {
    // +1 pad: a transposed operand is written down a column of its tile, which would otherwise
    // put all 32 threads of a warp in one bank.
    __shared__ float As[TILE][TILE + 1];
    __shared__ float Bs[TILE][TILE + 1];
    int tx = threadIdx.x, ty = threadIdx.y;
    int row = blockIdx.y * TILE + ty;
    int col = blockIdx.x * TILE + tx;
    float acc = 0.f;
    for (int k0 = 0; k0 < K; k0 += TILE) {
        // A tile: thread (ty, tx) loads op(A)[row][k0 + tx]; when A is stored transposed the
        // consecutive-address direction is the row, so swap roles to keep the loads coalesced.
        if (!ta) {
            As[ty][tx] = (row < M && k0 + tx < K) ? A[(long long)row * lda + k0 + tx] : 0.f;
        } else {
            int r = blockIdx.y * TILE + tx, k = k0 + ty;
            As[tx][ty] = (r < M && k < K) ? A[(long long)k * lda + r] : 0.f;
        }
        if (!tb) {
            Bs[ty][tx] = (k0 + ty < K && col < N) ? B[(long long)(k0 + ty) * ldb + col] : 0.f;
        } else {
            int c = blockIdx.x * TILE + ty, k = k0 + tx;
            Bs[tx][ty] = (k < K && c < N) ? B[(long long)c * ldb + k] : 0.f;
        }
        __syncthreads();
#pragma unroll 8
        for (int k = 0; k < TILE; ++k) acc += As[ty][k] * Bs[k][tx];
        __syncthreads();  // nobody may overwrite the tiles while a neighbour still reads them
    }
    if (row < M && col < N) {
        float* c = C + (long long)row * ldc + col;
        *c = beta == 0.f ? alpha * acc : alpha * acc + beta * *c;
    }
}

#define RB_BM 128
#define RB_BN 128
#define RB_BK 8
#define RB_PAD 4
#define RB_THREADS 256

// Stage a BK x 128 slice of op(X) into S[BK][128 + PAD] (k-major), in two halves so that the
// global loads of the next slice are in flight while the current one is multiplied: rb_load reads
// this thread's 4 floats into registers, rb_store writes them to shared memory. `base` is the
// first row (of op(X) when the slice runs along M, i.e. X = A) or column (X = B) of the block tile.
// along_k: op(X) rows are the 128 direction and k the contiguous one (A not transposed, or B
// transposed); then each thread reads 4 consecutive k and writes them down a column of S.
// Otherwise the 128 direction is contiguous and each thread copies 4 floats straight across.
// Every row of a row-major matrix starts 16-byte aligned: float4 accesses are legal.
__device__ __forceinline__ bool rb_float4_rows(const float* p, int ld) {
    return ((unsigned long long)p & 15) == 0 && (ld & 3) == 0;
}

__device__ __forceinline__ float4 rb_load(const float* __restrict__ X, int ld, bool along_k, bool vec, int extent,
                                          int K, int base, int k0, int t) {
    float4 v;
    if (along_k) {
        int gr = base + (t >> 1), gk = k0 + (t & 1) * 4;  // 128 rows x 2 quads of k
        const float* p = X + (long long)gr * ld + gk;
        if (gr < extent && vec && gk + 3 < K) return __ldg(reinterpret_cast<const float4*>(p));
        bool in = gr < extent;
        v.x = (in && gk + 0 < K) ? p[0] : 0.f;
        v.y = (in && gk + 1 < K) ? p[1] : 0.f;
        v.z = (in && gk + 2 < K) ? p[2] : 0.f;
        v.w = (in && gk + 3 < K) ? p[3] : 0.f;
    } else {
        int gk = k0 + (t >> 5), gc = base + (t & 31) * 4;  // 8 k-rows x 32 quads
        const float* p = X + (long long)gk * ld + gc;
        if (gk < K && vec && gc + 3 < extent) return __ldg(reinterpret_cast<const float4*>(p));
        bool in = gk < K;
        v.x = (in && gc + 0 < extent) ? p[0] : 0.f;
        v.y = (in && gc + 1 < extent) ? p[1] : 0.f;
        v.z = (in && gc + 2 < extent) ? p[2] : 0.f;
        v.w = (in && gc + 3 < extent) ? p[3] : 0.f;
    }
    return v;
}

__device__ __forceinline__ void rb_store(float (*S)[RB_BM + RB_PAD], float4 v, bool along_k, int t) {
    if (along_k) {
        int r = t >> 1, kk = (t & 1) * 4;
        S[kk + 0][r] = v.x; S[kk + 1][r] = v.y; S[kk + 2][r] = v.z; S[kk + 3][r] = v.w;
    } else {
        *reinterpret_cast<float4*>(&S[t >> 5][(t & 31) * 4]) = v;
    }
}

// One BK-deep slice of the block tile into this thread's 8x8 accumulators: 4 float4 shared
// loads and 64 FMAs per k.
__device__ __forceinline__ void rb_multiply(float (&acc)[8][8], const float (*As)[RB_BM + RB_PAD],
                                            const float (*Bs)[RB_BN + RB_PAD], int tr, int tc) {
#pragma unroll
    for (int k = 0; k < RB_BK; ++k) {
        float a[8], b[8];
        float4 a0 = *reinterpret_cast<const float4*>(&As[k][tr * 4]);
        float4 a1 = *reinterpret_cast<const float4*>(&As[k][64 + tr * 4]);
        float4 b0 = *reinterpret_cast<const float4*>(&Bs[k][tc * 4]);
        float4 b1 = *reinterpret_cast<const float4*>(&Bs[k][64 + tc * 4]);
        a[0] = a0.x; a[1] = a0.y; a[2] = a0.z; a[3] = a0.w; a[4] = a1.x; a[5] = a1.y; a[6] = a1.z; a[7] = a1.w;
        b[0] = b0.x; b[1] = b0.y; b[2] = b0.z; b[3] = b0.w; b[4] = b1.x; b[5] = b1.y; b[6] = b1.z; b[7] = b1.w;
#pragma unroll
        for (int i = 0; i < 8; ++i)
#pragma unroll
            for (int j = 0; j < 8; ++j) acc[i][j] += a[i] * b[j];
    }
}

// C = alpha * acc + beta * C for this thread's 8x8 outputs (rows tr*4.. and 64+tr*4.., columns
// likewise); float4 stores where C allows, a bounds-checked scalar tail otherwise.
__device__ __forceinline__ void rb_epilogue(const float (&acc)[8][8], int M, int N, float alpha, float beta,
                                            float* __restrict__ C, int ldc, int m0, int n0, int tr, int tc) {
    const bool vec_c = rb_float4_rows(C, ldc);
#pragma unroll
    for (int i = 0; i < 8; ++i) {
        int row = m0 + (i < 4 ? tr * 4 + i : 64 + tr * 4 + i - 4);
        if (row >= M) continue;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            int col = n0 + h * 64 + tc * 4;
            float* c = C + (long long)row * ldc + col;
            float v[4];
#pragma unroll
            for (int j = 0; j < 4; ++j) v[j] = alpha * acc[i][h * 4 + j];
            if (vec_c && col + 3 < N) {
                if (beta != 0.f) {
                    float4 old = *reinterpret_cast<const float4*>(c);
                    v[0] += beta * old.x; v[1] += beta * old.y; v[2] += beta * old.z; v[3] += beta * old.w;
                }
                *reinterpret_cast<float4*>(c) = make_float4(v[0], v[1], v[2], v[3]);
            } else {
#pragma unroll
                for (int j = 0; j < 4; ++j)
                    if (col + j < N) c[j] = beta == 0.f ? v[j] : v[j] + beta * c[j];
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(RB_THREADS)
sgemm_regblock(int M, int N, int K, float alpha, const float* __restrict__ A, int lda, int ta,
               const float* __restrict__ B, int ldb, int tb, float beta, float* __restrict__ C, int ldc) {
    __shared__ __align__(16) float As[RB_BK][RB_BM + RB_PAD];
    __shared__ __align__(16) float Bs[RB_BK][RB_BN + RB_PAD];
    const int t = threadIdx.x;
    const int tr = t >> 4, tc = t & 15;  // 16 x 16 threads, each 8 x 8 outputs
    const int m0 = blockIdx.y * RB_BM, n0 = blockIdx.x * RB_BN;
    const bool vec_a = rb_float4_rows(A, lda), vec_b = rb_float4_rows(B, ldb);

    float acc[8][8] = {};

    for (int k0 = 0; k0 < K; k0 += RB_BK) {
        rb_store(As, rb_load(A, lda, !ta, vec_a, M, K, m0, k0, t), !ta, t);
        rb_store(Bs, rb_load(B, ldb, tb, vec_b, N, K, n0, k0, t), tb, t);
        __syncthreads();
        rb_multiply(acc, As, Bs, tr, tc);
        __syncthreads();  // nobody may overwrite the tiles while a neighbour still reads them
    }
    rb_epilogue(acc, M, N, alpha, beta, C, ldc, m0, n0, tr, tc);
}

extern "C" __global__ void __launch_bounds__(RB_THREADS)
sgemm_regblock_db(int M, int N, int K, float alpha, const float* __restrict__ A, int lda, int ta,
                  const float* __restrict__ B, int ldb, int tb, float beta, float* __restrict__ C, int ldc) {
    // Two shared-memory stages: slice k0 is multiplied out of one while slice k0 + BK, already
    // loaded into registers, is written to the other; one barrier per slice.
    __shared__ __align__(16) float As[2][RB_BK][RB_BM + RB_PAD];
    __shared__ __align__(16) float Bs[2][RB_BK][RB_BN + RB_PAD];
    const int t = threadIdx.x;
    const int tr = t >> 4, tc = t & 15;  // 16 x 16 threads, each 8 x 8 outputs
    const int m0 = blockIdx.y * RB_BM, n0 = blockIdx.x * RB_BN;
    const bool vec_a = rb_float4_rows(A, lda), vec_b = rb_float4_rows(B, ldb);

    float acc[8][8] = {};

    rb_store(As[0], rb_load(A, lda, !ta, vec_a, M, K, m0, 0, t), !ta, t);
    rb_store(Bs[0], rb_load(B, ldb, tb, vec_b, N, K, n0, 0, t), tb, t);
    __syncthreads();
    int cur = 0;
    for (int k0 = 0; k0 < K; k0 += RB_BK) {
        const bool more = k0 + RB_BK < K;
        float4 na = make_float4(0.f, 0.f, 0.f, 0.f), nb = na;
        if (more) {
            na = rb_load(A, lda, !ta, vec_a, M, K, m0, k0 + RB_BK, t);
            nb = rb_load(B, ldb, tb, vec_b, N, K, n0, k0 + RB_BK, t);
        }
        rb_multiply(acc, As[cur], Bs[cur], tr, tc);
        if (more) {
            // The other stage was last read in the previous slice, which the barrier below it closed.
            rb_store(As[cur ^ 1], na, !ta, t);
            rb_store(Bs[cur ^ 1], nb, tb, t);
        }
        __syncthreads();
        cur ^= 1;
    }

    rb_epilogue(acc, M, N, alpha, beta, C, ldc, m0, n0, tr, tc);
}
