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
//   sgemm_tf32      tensor cores (sm_80+): operands rounded to TF32 (cvt.rna), mma.sync m16n8k8
//                   with float32 accumulation; 64x64x16 block tile, 4 warps of 32x32 (2 x 4 mma
//                   tiles each); a 3-stage cp.async pipeline stages op(A) and op(B) in shared
//                   memory in their global memory order (16-byte copies where aligned, 4-byte
//                   otherwise, zero-filled past the edges by src-size); fragments are read with
//                   plain 32-bit shared loads (ldmatrix moves 16-bit elements: not used here).
//                   block (128), grid (ceil(N/64), ceil(M/64)). On sm_75 it compiles to a trap.
//   sgemm_bf16      the same pipeline with operands rounded to BF16 (cvt.rn.bf16x2, two per register)
//                   and one mma.sync m16n8k16 .bf16 per 16-deep slice; float32 accumulation. Each
//                   landed float32 stage is converted once into BF16 tiles (A: 64 rows x 16 k, B:
//                   16 k x 64 columns, each row padded by 8 elements = 16 bytes, so the 8 row
//                   addresses of one ldmatrix phase hit 8 disjoint 4-bank groups: conflict-free),
//                   then fragments are loaded with ldmatrix.x4 (A) and ldmatrix.x4.trans (B); one
//                   more __syncthreads per k-tile (between the conversion and the ldmatrix loads).
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

// ------------------------------------------------------------------ tensor cores (sm_80+)
// Instruction wrappers. The emu backend's runtime (dnnpar/backend/emu_runtime.h) defines the
// same functions as exact models of these instructions, so this kernel runs there unchanged.
#if !defined(DNNPAR_EMU) && (!defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800)
#define TC_HAVE_MMA 1
__device__ __forceinline__ unsigned cvt_rna_tf32(float x) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(x));
    return r;
}

// D = A B + C on one tile per warp: four a, two b, four c / d registers per lane for both shapes.
#define TC_MMA_PTX(shape_and_types, d, a, b, c)                                                               \
    asm volatile("mma.sync.aligned." shape_and_types " {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "        \
                 "{%10, %11, %12, %13};"                                                                       \
                 : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])                                              \
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]),                           \
                   "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]))

// 16x8x8, TF32 operands; fragment layout in emu_runtime.h and the PTX ISA.
__device__ __forceinline__ void mma_m16n8k8_tf32(float d[4], const unsigned a[4], const unsigned b[2],
                                                 const float c[4]) {
    TC_MMA_PTX("m16n8k8.row.col.f32.tf32.tf32.f32", d, a, b, c);
}

// Two floats rounded to BF16 (nearest, ties to even) in one register: lo in the low half.
__device__ __forceinline__ unsigned pack_bf16x2(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));  // the first source goes high
    return r;
}

// 16x8x16, BF16 operands (two per register), float32 C and D.
__device__ __forceinline__ void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2],
                                                  const float c[4]) {
    TC_MMA_PTX("m16n8k16.row.col.f32.bf16.bf16.f32", d, a, b, c);
}

// src_bytes < cp-size zero-fills the rest of the destination (0: nothing is read).
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, int src_bytes) {
    unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" ::"r"(s), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
    unsigned s = (unsigned)__cvta_generic_to_shared(dst);
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;" ::"n"(N) : "memory");
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16: four 8x8 b16 matrices; lane t gives the
// (16-byte aligned) address of row t % 8 of matrix t / 8; lane i gets in r[j] the elements
// (i / 4, 2 (i % 4)) and (i / 4, 2 (i % 4) + 1) of matrix j (.trans: of its transpose), the first
// in the low half. Exact model in emu_runtime.h.
#define TC_LDMATRIX_PTX(variant, r, p)                                                                        \
    asm volatile("ldmatrix.sync.aligned.m8n8.x4" variant ".shared.b16 {%0, %1, %2, %3}, [%4];"               \
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])                                              \
                 : "r"((unsigned)__cvta_generic_to_shared(p))                                                  \
                 : "memory")
__device__ __forceinline__ void ldmatrix_x4(unsigned r[4], const void* p) { TC_LDMATRIX_PTX("", r, p); }
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned r[4], const void* p) { TC_LDMATRIX_PTX(".trans", r, p); }
#elif defined(DNNPAR_EMU)
#define TC_HAVE_MMA 1
#endif

#define TC_BM 64
#define TC_BN 64
#define TC_BK 16
#define TC_STAGES 3
#define TC_THREADS 128
#define TC_LDK (TC_BK + 4)  // k-contiguous tile row: 20 floats, rows g*20 + t hit 32 distinct banks
#define TC_LDR (TC_BM + 8)  // row-contiguous tile row: 72 floats, t*72 + g hit 32 distinct banks
#define TC_STAGE_FLOATS (TC_BM * TC_LDK > TC_BK * TC_LDR ? TC_BM * TC_LDK : TC_BK * TC_LDR)
// BF16 tiles for ldmatrix, in 32-bit words (two BF16 each). A: 64 rows x (16 + 8) k; row r at
// word 12 r, so ldmatrix rows r..r+7 start in banks 12 r mod 32 = 0, 12, 24, 4, 16, 28, 8, 20.
// B: 16 k rows x (64 + 8) columns; row k at word 36 k: banks 4 k mod 32 = 0, 4, ..., 28.
#define TC_LDHA (TC_BK + 8)
#define TC_LDHB (TC_BN + 8)
#define TC_AH_WORDS (TC_BM * TC_LDHA / 2)
#define TC_BH_WORDS (TC_BK * TC_LDHB / 2)

#ifdef TC_HAVE_MMA
// Element (r, k) of a 64 x BK operand tile as staged by tc_load_tile.
__device__ __forceinline__ float tc_at(const float* S, bool along_k, int r, int k) {
    return along_k ? S[r * TC_LDK + k] : S[k * TC_LDR + r];
}

// Queue the copy of the 64 x BK tile of op(X) at (base, k0) into S: X's rows run along r and
// its contiguous index along k (along_k), or the other way round; the tile keeps X's order, so
// every copy moves 4 consecutive floats (one 16-byte cp.async when `vec`, else four 4-byte ones).
// Past M / N / K the src-size is cut, so the copy zero-fills.
__device__ __forceinline__ void tc_load_tile(float* S, const float* __restrict__ X, int ld, bool along_k, bool vec,
                                             int extent, int K, int base, int k0, int t) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
        const int c = t + h * TC_THREADS;  // 256 quads of 4 floats
        int r, k, valid;
        float* dst;
        const float* src;
        if (along_k) {
            r = c >> 2, k = (c & 3) * 4;
            const int gr = base + r, gk = k0 + k;
            valid = gr < extent ? min(max(K - gk, 0), 4) : 0;
            src = X + (long long)gr * ld + gk;
            dst = S + r * TC_LDK + k;
        } else {
            k = c >> 4, r = (c & 15) * 4;
            const int gk = k0 + k, gr = base + r;
            valid = gk < K ? min(max(extent - gr, 0), 4) : 0;
            src = X + (long long)gk * ld + gr;
            dst = S + k * TC_LDR + r;
        }
        if (vec) {
            cp_async_16(dst, valid ? src : X, valid * 4);
        } else {
#pragma unroll
            for (int j = 0; j < 4; ++j) cp_async_4(dst + j, j < valid ? src + j : X, j < valid ? 4 : 0);
        }
    }
}

// One BK = 16 deep slice of the block tile into this warp's 2 x 4 accumulator tiles.
// TC_TF32: two m16n8k8 steps, each fragment register one TF32 value:
//   a0 (g, q)  a1 (g+8, q)  a2 (g, q+4)  a3 (g+8, q+4);  b0 (q, g)  b1 (q+4, g)   [(row, k), (k, col)]
// TC_BF16: one m16n8k16 step, each fragment register a pair of BF16 values (low half first):
//   a0 (g, 2q..2q+1)  a1 (g+8, 2q..)  a2 (g, 2q+8..)  a3 (g+8, 2q+8..);  b0 (2q..2q+1, g)  b1 (2q+8.., g)
#define TC_TF32 0
#define TC_BF16 1
template <int P>
__device__ __forceinline__ void tc_multiply(float (&acc)[2][4][4], const float* sa, const float* sb, bool a_k, bool b_k,
                                            int wm, int wn, int g, int q) {
    if constexpr (P == TC_TF32) {
#pragma unroll
        for (int k8 = 0; k8 < TC_BK; k8 += 8) {
            unsigned af[2][4], bf[4][2];
#pragma unroll
            for (int i = 0; i < 2; ++i) {
                const int r = wm + i * 16 + g;
                af[i][0] = cvt_rna_tf32(tc_at(sa, a_k, r, k8 + q));
                af[i][1] = cvt_rna_tf32(tc_at(sa, a_k, r + 8, k8 + q));
                af[i][2] = cvt_rna_tf32(tc_at(sa, a_k, r, k8 + q + 4));
                af[i][3] = cvt_rna_tf32(tc_at(sa, a_k, r + 8, k8 + q + 4));
            }
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int c = wn + j * 8 + g;
                bf[j][0] = cvt_rna_tf32(tc_at(sb, b_k, c, k8 + q));
                bf[j][1] = cvt_rna_tf32(tc_at(sb, b_k, c, k8 + q + 4));
            }
#pragma unroll
            for (int i = 0; i < 2; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) mma_m16n8k8_tf32(acc[i][j], af[i], bf[j], acc[i][j]);
        }
    } else {
        // ah / bh: the BF16 tiles tc_to_bf16 wrote (sa / sb unused). A: matrices (rows 0-7 | 8-15) x
        // (k 0-7 | 8-15) give a0..a3; lane l points at row l % 8 of matrix l / 8. B (k-major, .trans):
        // matrices (k 0-7 | 8-15) x (columns j*8 | (j+1)*8) give b0, b1 of tiles j and j + 1.
        const unsigned short* ah = reinterpret_cast<const unsigned short*>(sa);
        const unsigned short* bh = reinterpret_cast<const unsigned short*>(sb);
        const int lane = g * 4 + q, mi = lane >> 3, row = lane & 7;
        unsigned af[2][4], bf[4][2];
#pragma unroll
        for (int i = 0; i < 2; ++i)
            ldmatrix_x4(af[i], ah + (wm + i * 16 + (mi & 1) * 8 + row) * TC_LDHA + (mi >> 1) * 8);
#pragma unroll
        for (int j = 0; j < 4; j += 2) {
            unsigned r[4];
            ldmatrix_x4_trans(r, bh + ((mi & 1) * 8 + row) * TC_LDHB + wn + (j + (mi >> 1)) * 8);
            bf[j][0] = r[0], bf[j][1] = r[1], bf[j + 1][0] = r[2], bf[j + 1][1] = r[3];
        }
#pragma unroll
        for (int i = 0; i < 2; ++i)
#pragma unroll
            for (int j = 0; j < 4; ++j) mma_m16n8k16_bf16(acc[i][j], af[i], bf[j], acc[i][j]);
    }
}

// The landed float32 stage (sa, sb) rounded once to BF16 into ah (64 rows x 16 k, k contiguous)
// and bh (16 k x 64 columns, columns contiguous), each 32-bit word a pair along the contiguous
// index (lower index in the low half). 512 pairs per operand, 4 per thread.
__device__ __forceinline__ void tc_to_bf16(unsigned* ah, unsigned* bh, const float* sa, const float* sb, bool a_k,
                                           bool b_k, int t) {
#pragma unroll
    for (int h = 0; h < 4; ++h) {
        const int p = t + h * TC_THREADS;
        const int r = p >> 3, k = (p & 7) * 2;    // A: row r, k pair
        ah[r * (TC_LDHA / 2) + (p & 7)] = pack_bf16x2(tc_at(sa, a_k, r, k), tc_at(sa, a_k, r, k + 1));
        const int kb = p >> 5, c = (p & 31) * 2;  // B: k row kb, column pair
        bh[kb * (TC_LDHB / 2) + (p & 31)] = pack_bf16x2(tc_at(sb, b_k, c, kb), tc_at(sb, b_k, c + 1, kb));
    }
}

template <int P>
__device__ __forceinline__ void tc_gemm(int M, int N, int K, float alpha, const float* __restrict__ A, int lda, int ta,
                                        const float* __restrict__ B, int ldb, int tb, float beta,
                                        float* __restrict__ C, int ldc, float (*As)[TC_STAGE_FLOATS],
                                        float (*Bs)[TC_STAGE_FLOATS], unsigned* Ah, unsigned* Bh) {
    const int t = threadIdx.x, lane = t & 31, warp = t >> 5;
    const int g = lane >> 2, q = lane & 3;               // the mma fragment's groupID, threadID_in_group
    const int wm = (warp >> 1) * 32, wn = (warp & 1) * 32;  // this warp's 32 x 32 of the block tile
    const int m0 = blockIdx.y * TC_BM, n0 = blockIdx.x * TC_BN;
    const bool a_k = !ta, b_k = tb;                      // is k the contiguous index of A / B?
    const bool vec_a = rb_float4_rows(A, lda), vec_b = rb_float4_rows(B, ldb);
    const int ktiles = (K + TC_BK - 1) / TC_BK;

    float acc[2][4][4] = {};

    // Prologue: the first STAGES - 1 tiles in flight, one commit group each (empty past K).
#pragma unroll
    for (int s = 0; s < TC_STAGES - 1; ++s) {
        if (s < ktiles) {
            tc_load_tile(As[s], A, lda, a_k, vec_a, M, K, m0, s * TC_BK, t);
            tc_load_tile(Bs[s], B, ldb, b_k, vec_b, N, K, n0, s * TC_BK, t);
        }
        cp_async_commit();
    }
    for (int kt = 0; kt < ktiles; ++kt) {
        cp_async_wait<TC_STAGES - 2>();  // this thread's copies of tile kt have landed ...
        __syncthreads();                 // ... and everyone's; and stage (kt - 1) % S is no longer read
        const int next = kt + TC_STAGES - 1;
        if (next < ktiles) {
            tc_load_tile(As[next % TC_STAGES], A, lda, a_k, vec_a, M, K, m0, next * TC_BK, t);
            tc_load_tile(Bs[next % TC_STAGES], B, ldb, b_k, vec_b, N, K, n0, next * TC_BK, t);
        }
        cp_async_commit();
        if constexpr (P == TC_BF16) {  // Ah / Bh: no warp still reads them (the barrier above)
            tc_to_bf16(Ah, Bh, As[kt % TC_STAGES], Bs[kt % TC_STAGES], a_k, b_k, t);
            __syncthreads();  // the BF16 tiles are complete before any warp ldmatrix-loads them
            tc_multiply<P>(acc, reinterpret_cast<const float*>(Ah), reinterpret_cast<const float*>(Bh), a_k, b_k, wm,
                           wn, g, q);
        } else {
            tc_multiply<P>(acc, As[kt % TC_STAGES], Bs[kt % TC_STAGES], a_k, b_k, wm, wn, g, q);
        }
    }
    cp_async_wait<0>();  // no copy may still be in flight into shared memory when the block exits

    // Epilogue: d0 (g, 2q), d1 (g, 2q+1), d2 (g+8, 2q), d3 (g+8, 2q+1) of each 16 x 8 tile.
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int row = m0 + wm + i * 16 + g + (e >> 1) * 8, col = n0 + wn + j * 8 + 2 * q + (e & 1);
                if (row < M && col < N) {
                    float* c = C + (long long)row * ldc + col;
                    const float v = alpha * acc[i][j][e];
                    *c = beta == 0.f ? v : v + beta * *c;
                }
            }
}
#endif  // TC_HAVE_MMA

extern "C" __global__ void __launch_bounds__(TC_THREADS)
sgemm_tf32(int M, int N, int K, float alpha, const float* __restrict__ A, int lda, int ta,
           const float* __restrict__ B, int ldb, int tb, float beta, float* __restrict__ C, int ldc) {
#ifdef TC_HAVE_MMA
    // in the kernel, not in the template: the emu backend poisons the kernels' __shared__ storage
    __shared__ __align__(16) float As[TC_STAGES][TC_STAGE_FLOATS];
    __shared__ __align__(16) float Bs[TC_STAGES][TC_STAGE_FLOATS];
    tc_gemm<TC_TF32>(M, N, K, alpha, A, lda, ta, B, ldb, tb, beta, C, ldc, As, Bs, nullptr, nullptr);
#else
    __trap();  // mma.sync with .tf32 needs sm_80; the op refuses older devices before launching
#endif
}

extern "C" __global__ void __launch_bounds__(TC_THREADS)
sgemm_bf16(int M, int N, int K, float alpha, const float* __restrict__ A, int lda, int ta,
           const float* __restrict__ B, int ldb, int tb, float beta, float* __restrict__ C, int ldc) {
#ifdef TC_HAVE_MMA
    // in the kernel, not in the template: the emu backend poisons the kernels' __shared__ storage
    __shared__ __align__(16) float As[TC_STAGES][TC_STAGE_FLOATS];
    __shared__ __align__(16) float Bs[TC_STAGES][TC_STAGE_FLOATS];
    __shared__ __align__(16) unsigned Ah[TC_AH_WORDS];
    __shared__ __align__(16) unsigned Bh[TC_BH_WORDS];
    tc_gemm<TC_BF16>(M, N, K, alpha, A, lda, ta, B, ldb, tb, beta, C, ldc, As, Bs, Ah, Bh);
#else
    __trap();  // mma.sync with .bf16 needs sm_80
#endif
}
