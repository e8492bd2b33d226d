// SGEMM for the numpy backend on dnnpar's own thread pool: NumPy's BLAS (OpenBLAS) computes each
// thread's block single-threaded, the team comes from parallel.h.
//
// Why: OpenBLAS keeps its own pthreads pool, whose idle threads yield-spin for about 0.1 s after
// every multi-threaded call. In a training step, GEMMs and native kernels alternate every few
// tens of microseconds, so OpenBLAS's spinning workers and this library's pool fight over the same
// cores all the time: on a 2-core machine the ResNet-style step ran faster with every thread
// count at 1 than with 2 (36.6 against 38.3 ms at batch 16; 120 against 138 ms at batch 64). With
// every GEMM of a step on this pool, there is one pool, and OpenBLAS's threads stay asleep.
//
// dnnpar_blas_bind() takes the addresses of OpenBLAS's cblas_sgemm and openblas_get/set_num_threads
// (found by dnnpar/backend/cpu_native.py through threadpoolctl) and the width of its integers
// (an ILP64 build such as NumPy's scipy-openblas64 takes int64). dnnpar_blas_sgemm() sets OpenBLAS
// to one thread for the call, splits C into `team` contiguous blocks -- rows when M >= N (each
// thread packs all of op(B), so the duplicated packing is the smaller operand's) or when M gives
// every thread 64 rows or more (LeNet-300-100's 300 x 64 x 784 weight gradient: 134 against
// 206 us split by columns), columns otherwise, block edges on multiples of 16 -- runs one cblas_sgemm per block on the pool, and
// restores OpenBLAS's thread count. The bits may depend on the team size (OpenBLAS picks its
// edge and small-matrix kernels by the block's shape), as np.matmul's depend on OpenBLAS's.
//
// OpenBLAS's thread count is a process-wide setting: while a pool GEMM runs, a BLAS call from
// another Python thread runs single-threaded too, and a second caller that finds the pool busy
// computes its blocks on its own thread at whatever count is set then (correct, maybe slower).
//
// Three product shapes run on dnnpar's own loops instead, a fully connected layer's at a small
// batch. A few rows of A (M <= 8) against B transposed or B, the forward x W^T and the input
// gradient dy W: OpenBLAS packs the whole of B for them (the weights: hundreds of MB read and
// written again) and ran at a third of the memory bandwidth; small_m_nt and small_m_nn stream B
// once against the M rows of A, which stay in cache (x W^T with 9 .. 16 rows: two passes, 8.1
// against OpenBLAS's 11.2 ms at 16 x 4096 by 4096 x 4096; torch.matmul 11.7). And the weight
// gradient dy^T x, A^T B with K <= 16 (small_k; at K = 16, 4096 x 25088: 19.7 against 35.4 ms,
// torch.matmul 187; these on 2 AMD EPYC cores, 2026-12-03). AlexNet's fc6 at batch 8 (4096 x 9216), 2 cores, 2026-12-03, ms for OpenBLAS /
// torch.matmul / these: forward 12.5 / 9.75 / 5.46, input gradient 11.6 / 7.05 / 6.27, weight
// gradient 14.8 / 3.98 / 4.12 (`benchmarks/kernels.py --only gemm`).
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "parallel.h"

namespace {

enum { kRowMajor = 101, kNoTrans = 111, kTrans = 112 };

using sgemm32_t = void (*)(int, int, int, int32_t, int32_t, int32_t, float, const float*, int32_t, const float*,
                           int32_t, float, float*, int32_t);
using sgemm64_t = void (*)(int, int, int, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*,
                           int64_t, float, float*, int64_t);
using get_threads_t = int (*)(void);
using set_threads_t = void (*)(int);

void* g_sgemm = nullptr;
get_threads_t g_get = nullptr;
set_threads_t g_set = nullptr;
int g_ilp64 = 0;

// Below this many multiply-adds a GEMM runs on one thread (OpenBLAS's own threshold for threading).
constexpr int64_t kGemmParallelMin = int64_t(1) << 18;
constexpr int64_t kAlign = 16;

inline void sgemm(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                  const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
    const int oa = ta ? kTrans : kNoTrans, ob = tb ? kTrans : kNoTrans;
    if (g_ilp64)
        reinterpret_cast<sgemm64_t>(g_sgemm)(kRowMajor, oa, ob, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    else
        reinterpret_cast<sgemm32_t>(g_sgemm)(kRowMajor, oa, ob, int32_t(m), int32_t(n), int32_t(k), alpha, a,
                                             int32_t(lda), b, int32_t(ldb), beta, c, int32_t(ldc));
}

// Sixteen floats (GCC / Clang vector extension: one zmm with AVX-512, two ymm with AVX2, ...).
typedef float v16 __attribute__((vector_size(64)));

constexpr int64_t kSmallM = 8;     // the most rows of A small_m_nt and small_m_nn take
constexpr int64_t kSmallMinK = 16;  // and the shortest rows (one vector)
// and the smallest B: below it B stays in cache and OpenBLAS's packing pays (8 x 64 by 64 x 4096:
// 52 against 440 us on 2 threads, whose C rows then share cache lines at every pass)
constexpr int64_t kSmallMinBytes = int64_t(4) << 20;

// The sixteen lanes summed in a fixed tree (the same bits on every thread count).
inline float lane_sum(v16 v) {
    float l[16];
    std::memcpy(l, &v, sizeof l);
    for (int w = 8; w > 0; w /= 2)
        for (int i = 0; i < w; ++i) l[i] += l[i + w];
    return l[0];
}

// Rows j .. j + NB - 1 of B against the M rows of A: out[r][i] = A[i, :] . B[j + r, :], each a
// vector sum over k in steps of sixteen (lane l: entries 16t + l), its lanes summed, then the tail.
template <int M, int NB>
inline void dot_rows(int64_t j, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                     float (&out)[NB][M]) {
    v16 acc[NB][M];
    for (int r = 0; r < NB; ++r)
        for (int i = 0; i < M; ++i) acc[r][i] = v16{};
    int64_t p = 0;
    for (; p + 16 <= k; p += 16) {
        v16 w[NB];
        for (int r = 0; r < NB; ++r) {
            const float* br = b + (j + r) * ldb + p;
            __builtin_prefetch(br + 256);  // 1 KB ahead in B's row: the hardware prefetcher stops at pages
            std::memcpy(&w[r], br, sizeof(v16));
        }
        for (int i = 0; i < M; ++i) {
            v16 x;
            std::memcpy(&x, a + i * lda + p, sizeof x);
            for (int r = 0; r < NB; ++r) acc[r][i] += x * w[r];
        }
    }
    for (int r = 0; r < NB; ++r)
        for (int i = 0; i < M; ++i) {
            float sum = lane_sum(acc[r][i]);
            const float* ar = a + i * lda;
            const float* br = b + (j + r) * ldb;
            for (int64_t q = p; q < k; ++q) sum += ar[q] * br[q];
            out[r][i] = sum;
        }
}

// Columns [j0, j1) of C = alpha A B^T + beta C (A: M rows of k, row stride lda; B: rows of k, row
// stride ldb), two rows of B at a time. beta == 0: C is written without being read.
template <int M>
void small_m_nt_cols(int64_t j0, int64_t j1, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                     int64_t ldb, float beta, float* c, int64_t ldc) {
    auto put = [&](int64_t j, int i, float v) {
        float& dst = c[i * ldc + j];
        dst = beta == 0.0f ? alpha * v : alpha * v + beta * dst;
    };
    int64_t j = j0;
    for (; j + 2 <= j1; j += 2) {
        float out[2][M];
        dot_rows<M, 2>(j, k, a, lda, b, ldb, out);
        for (int i = 0; i < M; ++i) {
            put(j, i, out[0][i]);
            put(j + 1, i, out[1][i]);
        }
    }
    if (j < j1) {
        float out[1][M];
        dot_rows<M, 1>(j, k, a, lda, b, ldb, out);
        for (int i = 0; i < M; ++i) put(j, i, out[0][i]);
    }
}

template <int M>
void small_m_nt(int team, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b,
                int64_t ldb, float beta, float* c, int64_t ldc) {
    dnnpar::parallel_ranges(team, (n + 1) / 2, [&](int64_t lo, int64_t hi) {  // pairs of B rows
        small_m_nt_cols<M>(2 * lo, std::min(n, 2 * hi), k, alpha, a, lda, b, ldb, beta, c, ldc);
    });
}

// B's rows per pass of small_m_nn, and the most of C's columns a thread updates per pass: its M
// rows of them within 16 KB (L1). Measured at 8 x 4096 by 4096 x 9216 (AlexNet's fc6 input
// gradient at batch 8) on 2 cores, 2026-12-03: 6.9-7.2 ms (torch.matmul 7.1-7.3, OpenBLAS
// 12-17); with 32 KB 9.0-9.7 ms in the same hour, and 4 rows per pass 10-14 ms.
constexpr int kNNRows = 8;
constexpr int64_t kNNTileBytes = 16 << 10;

// Columns [j0, j1) of C = A B (A: M rows of k, row stride lda; B: k rows, row stride ldb): each
// pass streams kNNRows rows of B across the columns and adds their M outer products into C's rows
// (cached), sixteen columns at a time; C[i, j] is summed over B's rows in order.
template <int M>
void small_m_nn_cols(int64_t j0, int64_t j1, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb,
                     float* c, int64_t ldc) {
    for (int i = 0; i < M; ++i) std::memset(c + i * ldc + j0, 0, size_t(j1 - j0) * sizeof(float));
    const int64_t vec_end = j0 + (j1 - j0) / 16 * 16;
    int64_t p = 0;
    for (; p + kNNRows <= k; p += kNNRows) {
        const float* bp = b + p * ldb;
        for (int64_t j = j0; j < vec_end; j += 16) {
            v16 w[kNNRows];
            for (int q = 0; q < kNNRows; ++q) {
                std::memcpy(&w[q], bp + q * ldb + j, sizeof(v16));
                __builtin_prefetch(bp + (q + kNNRows) * ldb + j);  // the next pass's row, this column
            }
            for (int i = 0; i < M; ++i) {
                const float* ar = a + i * lda + p;
                float* cr = c + i * ldc + j;
                v16 acc;
                std::memcpy(&acc, cr, sizeof acc);
                for (int q = 0; q < kNNRows; ++q) acc += w[q] * ar[q];
                std::memcpy(cr, &acc, sizeof acc);
            }
        }
        for (int64_t j = vec_end; j < j1; ++j)
            for (int i = 0; i < M; ++i) {
                float acc = c[i * ldc + j];
                for (int q = 0; q < kNNRows; ++q) acc += a[i * lda + p + q] * bp[q * ldb + j];
                c[i * ldc + j] = acc;
            }
    }
    for (; p < k; ++p)
        for (int i = 0; i < M; ++i) {
            const float v = a[i * lda + p];
            for (int64_t j = j0; j < j1; ++j) c[i * ldc + j] += v * b[p * ldb + j];
        }
}

template <int M>
void small_m_nn(int team, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
                int64_t ldc) {
    const int64_t tile = std::max<int64_t>(16, kNNTileBytes / int64_t(M * sizeof(float)) / 16 * 16);
    dnnpar::parallel_ranges(team, (n + 15) / 16, [&](int64_t lo, int64_t hi) {  // sixteen columns of C
        for (int64_t j = 16 * lo, end = std::min(n, 16 * hi); j < end; j += tile)
            small_m_nn_cols<M>(j, std::min(end, j + tile), k, a, lda, b, ldb, c, ldc);
    });
}

#if defined(__AVX512F__)
// A weight gradient at a small batch, C = A^T B with K <= 8 (dy^T x): C is hundreds of MB written
// once, nothing read back, so it is written with non-temporal stores (no read for ownership, no
// cache filled with it). OpenBLAS's first pass scales C by beta = 0, a second adds the product:
// AlexNet's fc6 gradient (4096 x 9216, batch 8) 15-18 ms there, 4.1 ms here (37 GB/s; 6.8 ms one
// row at a time, each vector of B then read from L2 for one row only); VGG-16's (4096 x 25088,
// batch 2) 48 against 9.4 ms. Below kStreamMinBytes, which caches could hold, OpenBLAS stays
// (16 MB: 1.3 against 2.0 ms streamed).
constexpr int64_t kSmallK = 16;
constexpr int64_t kStreamMinBytes = int64_t(32) << 20;

// Rows i .. i + R - 1 of C: C[i, j] = sum over p of A[p, i] B[p, j], p in order; each vector of B
// (from L2) serves R rows, vectors stored streaming from row i's first 64-byte boundary on, the head
// and the tail by scalar stores. R > 1 only where every row starts as row i does (ldc a multiple
// of 16 floats): _mm512_stream_ps faults on an unaligned address.
template <int R>
inline void small_k_tn_rows(int64_t i, int64_t n, int64_t k, const float* a, int64_t lda, const float* b,
                            int64_t ldb, float* c, int64_t ldc) {
    float av[R][kSmallK];
    for (int r = 0; r < R; ++r)
        for (int64_t p = 0; p < k; ++p) av[r][p] = a[p * lda + i + r];
    float* cr = c + i * ldc;
    auto scalar = [&](int64_t j) {
        for (int r = 0; r < R; ++r) {
            float sum = 0.0f;
            for (int64_t p = 0; p < k; ++p) sum = std::fma(av[r][p], b[p * ldb + j], sum);
            cr[r * ldc + j] = sum;
        }
    };
    int64_t j = 0;
    for (; j < n && (reinterpret_cast<uintptr_t>(cr + j) & 63) != 0; ++j) scalar(j);
    for (; j + 16 <= n; j += 16) {
        __m512 acc[R];
        for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
        for (int64_t p = 0; p < k; ++p) {
            const __m512 bv = _mm512_loadu_ps(b + p * ldb + j);
            for (int r = 0; r < R; ++r) acc[r] = _mm512_fmadd_ps(_mm512_set1_ps(av[r][p]), bv, acc[r]);
        }
        for (int r = 0; r < R; ++r) _mm512_stream_ps(cr + r * ldc + j, acc[r]);
    }
    for (; j < n; ++j) scalar(j);
}

bool small_k(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc, int team) {
    if (!ta || tb || k > kSmallK || alpha != 1.0f || beta != 0.0f || m * n * int64_t(sizeof(float)) < kStreamMinBytes)
        return false;
    dnnpar::parallel_ranges(team, m, [&](int64_t i, int64_t hi) {
        if (ldc % 16 == 0)
            for (; i + 4 <= hi; i += 4) small_k_tn_rows<4>(i, n, k, a, lda, b, ldb, c, ldc);
        for (; i < hi; ++i) small_k_tn_rows<1>(i, n, k, a, lda, b, ldb, c, ldc);
        _mm_sfence();  // the streamed stores are ordered before the pool reports this share done
    });
    return true;
}
#else
bool small_k(int, int, int64_t, int64_t, int64_t, float, const float*, int64_t, const float*, int64_t, float, float*,
             int64_t, int) {
    return false;
}
#endif

// A few rows of A: C = alpha A B^T + beta C (small_m_nt), or C = A B (small_m_nn; alpha 1, beta 0).
// Returns false (nothing done) for every other product.
template <int M>
bool small_m_of(int tb, int64_t n, int64_t k, float alpha, const float* a, int64_t lda, const float* b, int64_t ldb,
                float beta, float* c, int64_t ldc, int team) {
    if (tb) {
        small_m_nt<M>(team, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
        return true;
    }
    if (alpha != 1.0f || beta != 0.0f) return false;
    small_m_nn<M>(team, n, k, a, lda, b, ldb, c, ldc);
    return true;
}

bool small_m(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
             const float* b, int64_t ldb, float beta, float* c, int64_t ldc, int team) {
    if (ta || m > 2 * kSmallM || k < kSmallMinK || n * k * int64_t(sizeof(float)) < kSmallMinBytes) return false;
    if (m > kSmallM) {
        // x W^T for 9 .. 16 rows: two passes over B, rows 0 .. 7 then the rest (B W at these rows
        // stays with OpenBLAS: two streaming passes ran slower than its one)
        if (!tb) return false;
        small_m_of<8>(tb, n, k, alpha, a, lda, b, ldb, beta, c, ldc, team);
        return small_m(ta, tb, m - kSmallM, n, k, alpha, a + kSmallM * lda, lda, b, ldb, beta, c + kSmallM * ldc, ldc,
                       team);
    }
    switch (m) {
        case 1: return small_m_of<1>(tb, n, k, alpha, a, lda, b, ldb, beta, c, ldc, team);
        case 2: return small_m_of<2>(tb, n, k, alpha, a, lda, b, ldb, beta, c, ldc, team);
        case 3: return small_m_of<3>(tb, n, k, alpha, a, lda, b, ldb, beta, c, ldc, team);
        case 4: return small_m_of<4>(tb, n, k, alpha, a, lda, b, ldb, beta, c, ldc, team);
        case 5: return small_m_of<5>(tb, n, k, alpha, a, lda, b, ldb, beta, c, ldc, team);
        case 6: return small_m_of<6>(tb, n, k, alpha, a, lda, b, ldb, beta, c, ldc, team);
        case 7: return small_m_of<7>(tb, n, k, alpha, a, lda, b, ldb, beta, c, ldc, team);
        case 8: return small_m_of<8>(tb, n, k, alpha, a, lda, b, ldb, beta, c, ldc, team);
        default: return false;
    }
}

}  // namespace

extern "C" {

DNNPAR_CPU_COMMON_EXPORTS(1)

// Bind OpenBLAS's entry points (addresses); ilp64: its integers are int64. Returns 0.
int dnnpar_blas_bind(void* sgemm_fn, void* get_threads_fn, void* set_threads_fn, int ilp64) {
    g_sgemm = sgemm_fn;
    g_get = reinterpret_cast<get_threads_t>(get_threads_fn);
    g_set = reinterpret_cast<set_threads_t>(set_threads_fn);
    g_ilp64 = ilp64;
    return 0;
}

// C (m x n, row stride ldc) = alpha op(A) op(B) + beta C, row-major, op = transpose when ta / tb
// (A is m x k, or k x m with ta, row stride lda; B is k x n, or n x k with tb). team <= 0: the
// pool's default. Returns 0, or -1 when nothing is bound (nothing is written).
int dnnpar_blas_sgemm(int ta, int tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                      const float* b, int64_t ldb, float beta, float* c, int64_t ldc, int team) {
    if (!g_sgemm || !g_get || !g_set) return -1;
    if (m <= 0 || n <= 0) return 0;
    int nt = m * n * k < kGemmParallelMin ? 1 : (team > 0 ? team : dnnpar::pool_threads());
    if (small_m(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, nt) ||
        small_k(ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc, nt))
        return 0;
    const int blas = g_get();
    if (blas != 1) g_set(1);
    const bool rows = m >= int64_t(nt) * kAlign * 4 || m >= n;
    const int64_t extent = rows ? m : n;
    dnnpar::parallel_ranges(nt, (extent + kAlign - 1) / kAlign, [&](int64_t ulo, int64_t uhi) {
        const int64_t lo = ulo * kAlign, hi = std::min(extent, uhi * kAlign);
        if (hi <= lo) return;
        if (rows) {  // rows lo..hi of C: rows of op(A)
            const float* ap = ta ? a + lo : a + lo * lda;
            sgemm(ta, tb, hi - lo, n, k, alpha, ap, lda, b, ldb, beta, c + lo * ldc, ldc);
        } else {     // columns lo..hi of C: columns of op(B)
            const float* bp = tb ? b + lo * ldb : b + lo;
            sgemm(ta, tb, m, hi - lo, k, alpha, a, lda, bp, ldb, beta, c + lo, ldc);
        }
    });
    if (blas != 1) g_set(blas);
    return 0;
}

}  // extern "C"
