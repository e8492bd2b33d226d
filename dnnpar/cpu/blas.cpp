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
#include <cstdint>

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
    const int blas = g_get();
    if (blas != 1) g_set(1);
    int nt = m * n * k < kGemmParallelMin ? 1 : (team > 0 ? team : dnnpar::pool_threads());
    const bool rows = m >= int64_t(nt) * kAlign * 4 || m >= n;
    const int64_t extent = rows ? m : n;
    const int64_t units = (extent + kAlign - 1) / kAlign;
    nt = int(std::max<int64_t>(1, std::min<int64_t>(nt, units)));
    dnnpar::parallel(nt, [&](int tid, int t) {
        const dnnpar::Range r = dnnpar::split(units, tid, t);
        const int64_t lo = r.lo * kAlign, hi = std::min(extent, r.hi * kAlign);
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
