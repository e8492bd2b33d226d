// The common entry points of dnnpar's native CPU kernels (dnnpar/cpu/*.cpp, built by
// dnnpar/backend/cpu_native.py with -fopenmp-simd -pthread): parallel loops on the one thread
// pool of runtime.cpp, which every kernel library shares (why one pool, and why not OpenMP's
// runtime: see runtime.cpp). `#pragma omp simd` still vectorises (-fopenmp-simd needs no runtime).
//
// Usage: dnnpar::parallel(team, [&](int tid, int nt) { auto r = dnnpar::split(n, tid, nt); ... });
// runs the body on `team` threads (the caller is thread 0) and returns when all are done. A
// second caller while the pool is busy (two Python threads; ctypes drops the GIL) runs its body
// for every tid in turn on its own thread: the same partition, the same result, no sharing.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <thread>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define DNNPAR_CPU_RELAX() _mm_pause()
#else
#define DNNPAR_CPU_RELAX() std::this_thread::yield()
#endif

namespace dnnpar {

// Below this many multiply-adds (or element visits) a call runs on one thread: waking the
// team costs more (a sleeping worker takes ~10-50 us to wake).
constexpr int64_t kParallelMinWork = 1 << 16;
// The pool's entry points in runtime.cpp, attached to this library by dnnpar_cpu_attach() before
// any kernel runs (cpu_native.py does it at load). Unattached (a caller that skipped it), a
// parallel call runs its team's bodies in turn on the calling thread: the same result, slower.
struct PoolApi {
    int (*threads)(void) = nullptr;
    void (*run)(int, void (*)(void*, int, int), void*) = nullptr;
};
static inline PoolApi& pool_api() {
    static PoolApi api;  // internal linkage: one per library, set once at load
    return api;
}
static inline int pool_threads() { return pool_api().threads ? pool_api().threads() : 1; }

// Threads for `work` units of work: one below kParallelMinWork, else `threads` (0: the default).
inline int team_size(int threads, int64_t work) {
    if (work < kParallelMinWork) return 1;
    return threads > 0 ? threads : pool_threads();
}

// This thread's contiguous share [lo, hi) of n items: static schedule, sizes differ by at most one.
struct Range {
    int64_t lo, hi;
};
inline Range split(int64_t n, int tid, int nt) {
    const int64_t q = n / nt, r = n % nt;
    const int64_t lo = tid * q + std::min<int64_t>(tid, r);
    return Range{lo, lo + q + (tid < r ? 1 : 0)};
}

// Run body(tid, nt) on `team` threads.
template <class F>
inline void parallel(int team, F&& body) {
    using B = std::remove_reference_t<F>;
    if (team <= 1 || !pool_api().run) {
        for (int t = 0; t < std::max(team, 1); ++t) body(t, std::max(team, 1));
        return;
    }
    pool_api().run(team, [](void* ctx, int tid, int nt) { (*static_cast<B*>(ctx))(tid, nt); },
                   const_cast<void*>(static_cast<const void*>(&body)));
}

// f(lo, hi) on each thread's contiguous share of n items, on `team` threads but never more than n.
template <class F>
inline void parallel_ranges(int team, int64_t n, F&& f) {
    parallel(int(std::max<int64_t>(1, std::min<int64_t>(team, n))), [&](int tid, int nt) {
        const Range r = split(n, tid, nt);
        f(r.lo, r.hi);
    });
}

// for (i in [0, n)) body(i), statically split over `team` threads.
template <class F>
inline void parallel_for(int team, int64_t n, F&& body) {
    parallel_ranges(team, n, [&](int64_t lo, int64_t hi) {
        for (int64_t i = lo; i < hi; ++i) body(i);
    });
}

// f(lo, hi) on each thread's contiguous share of n elements (one thread below
// kParallelMinWork; `threads` <= 0: the pool's default): elementwise, order-free kernels.
template <class F>
inline void elementwise(int64_t n, int threads, F&& f) {
    parallel_ranges(team_size(threads, n), n, f);
}

// for (i in [0, n)) body(i), in chunks of `chunk` taken in turn by `team` threads (rows of
// uneven cost: sparse rows).
template <class F>
inline void parallel_for_dynamic(int team, int64_t n, int64_t chunk, F&& body) {
    chunk = std::max<int64_t>(1, chunk);
    const int64_t chunks = (n + chunk - 1) / chunk;
    team = int(std::max<int64_t>(1, std::min<int64_t>(team, chunks)));
    std::atomic<int64_t> next{0};
    parallel(team, [&](int, int) {
        for (int64_t k; (k = next.fetch_add(1, std::memory_order_relaxed)) < chunks;) {
            const int64_t hi = std::min(n, (k + 1) * chunk);
            for (int64_t i = k * chunk; i < hi; ++i) body(i);
        }
    });
}

}  // namespace dnnpar

// Every kernel source's common exports: its ABI (bumped whenever one of its exported signatures
// changes; cpu_native.py refuses a library reporting another) and the hook that attaches the
// one pool (runtime.cpp's dnnpar_pool_threads and dnnpar_pool_run).
#define DNNPAR_CPU_COMMON_EXPORTS(abi)                                                       \
    extern "C" int dnnpar_cpu_abi(void) { return abi; }                                      \
    extern "C" void dnnpar_cpu_attach(void* threads, void* run) {                            \
        dnnpar::pool_api().threads = reinterpret_cast<int (*)(void)>(threads);               \
        dnnpar::pool_api().run = reinterpret_cast<void (*)(int, void (*)(void*, int, int), void*)>(run); \
    }
