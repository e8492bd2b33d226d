// The one thread pool and the common entry points of dnnpar's native CPU kernels
// (dnnpar/cpu/*.cpp, built by dnnpar/backend/cpu_native.py with -fopenmp-simd -pthread).
//
// Why not OpenMP's runtime: a process holds one libgomp, and whoever loads it first fixes its
// wait policy for good. With PyTorch imported first (its wheel brings libgomp.so.1 with the
// default spin policy), an OpenMP kernel's idle threads spin for milliseconds after every call
// and take the cores the next BLAS call needs: a MobileNet training step ran 1.5x slower beside
// `import torch` than without it. This pool belongs to dnnpar alone: its workers spin for a few
// microseconds (so back-to-back kernels hand over at once), then sleep on a condition variable,
// whoever else is in the process. `#pragma omp simd` still vectorises (-fopenmp-simd needs no
// runtime).
//
// Usage: dnnpar::parallel(team, [&](int tid, int nt) { auto r = dnnpar::split(n, tid, nt); ... });
// runs the body on `team` threads (the caller is thread 0) and returns when all are done. A
// second caller while the pool is busy (two Python threads; ctypes drops the GIL) runs its body
// for every tid in turn on its own thread: the same partition, the same result, no sharing.
#pragma once

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

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
// Spin iterations of an idle worker (each one pause, ~10-40 ns) before it sleeps.
constexpr int kSpin = 1 << 12;

class Pool {
public:
    static Pool& get() {
        // one per shared library, never destroyed: its workers (started on the first parallel
        // call) sleep until the process ends, and no exit-time join can hang
        static Pool* pool = new Pool;
        return *pool;
    }

    int threads() const { return threads_.load(std::memory_order_relaxed); }

    // The default team size (from Python: BLAS's thread count, or OMP_NUM_THREADS).
    void set_threads(int n) { threads_.store(std::max(1, std::min(n, kMaxThreads)), std::memory_order_relaxed); }

    template <class F>
    void run(int team, F&& body) {
        team = std::max(1, std::min(team, kMaxThreads));
        std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
        if (team == 1 || !busy.owns_lock()) {
            for (int t = 0; t < team; ++t) body(t, team);
            return;
        }
        grow(team - 1);
        std::function<void(int, int)> job(std::ref(body));
        job_ = &job;
        pending_.store(team - 1, std::memory_order_relaxed);
        {
            std::lock_guard<std::mutex> lk(sleep_);
            const uint64_t gen = (state_.load(std::memory_order_relaxed) >> 16) + 1;
            state_.store(gen << 16 | uint64_t(team), std::memory_order_release);
        }
        wake_.notify_all();
        body(0, team);
        for (int i = 0; pending_.load(std::memory_order_acquire) != 0; ++i) {
            if (i < kSpin) DNNPAR_CPU_RELAX(); else std::this_thread::yield();
        }
        job_ = nullptr;
    }

private:
    static constexpr int kMaxThreads = 256;

    Pool() {
        unsigned hw = std::thread::hardware_concurrency();
        threads_.store(hw ? int(std::min<unsigned>(hw, kMaxThreads)) : 1);
    }

    void grow(int n) {  // under busy_: at least n workers
        while (int(workers_.size()) < n) {
            // the generation before this call is published: a worker that starts late still
            // takes this call's job
            const int id = int(workers_.size()) + 1;
            const uint64_t seen = state_.load(std::memory_order_relaxed) >> 16;
            workers_.emplace_back([this, id, seen] { loop(id, seen); });
        }
    }

    // A worker reads the generation and the team size of a call in one load: one that slept
    // through a call it had no part in (id >= that call's team) never mistakes the next call's
    // team for it, and the next call's job is only published once every member of this one is done.
    void loop(int id, uint64_t seen) {
        for (;;) {
            uint64_t s;
            int i = 0;
            while ((s = state_.load(std::memory_order_acquire)) >> 16 == seen && i < kSpin) {
                DNNPAR_CPU_RELAX();
                ++i;
            }
            if (s >> 16 == seen) {
                std::unique_lock<std::mutex> lk(sleep_);
                wake_.wait(lk, [&] { return state_.load(std::memory_order_acquire) >> 16 != seen; });
                s = state_.load(std::memory_order_acquire);
            }
            seen = s >> 16;
            const int team = int(s & 0xffff);
            if (id < team) {
                (*job_)(id, team);
                pending_.fetch_sub(1, std::memory_order_acq_rel);
            }
        }
    }

    std::atomic<int> threads_{1};
    std::mutex busy_;    // one parallel call at a time
    std::mutex sleep_;   // guards the sleepers' wait
    std::condition_variable wake_;
    std::atomic<uint64_t> state_{0};  // call generation << 16 | its team size
    std::atomic<int> pending_{0};
    std::function<void(int, int)>* job_ = nullptr;
    std::vector<std::thread> workers_;
};

// Threads for `work` units of work: one below kParallelMinWork, else `threads` (0: the default).
inline int team_size(int threads, int64_t work) {
    if (work < kParallelMinWork) return 1;
    return threads > 0 ? threads : Pool::get().threads();
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
    Pool::get().run(team, std::forward<F>(body));
}

// for (i in [0, n)) body(i), statically split over `team` threads.
template <class F>
inline void parallel_for(int team, int64_t n, F&& body) {
    team = int(std::max<int64_t>(1, std::min<int64_t>(team, n)));
    parallel(team, [&](int tid, int nt) {
        const Range r = split(n, tid, nt);
        for (int64_t i = r.lo; i < r.hi; ++i) body(i);
    });
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

// Every source's common exports: its ABI (bumped whenever one of its exported signatures
// changes; cpu_native.py refuses a library reporting another) and the pool's default team size.
#define DNNPAR_CPU_COMMON_EXPORTS(abi)                                                       \
    extern "C" int dnnpar_cpu_abi(void) { return abi; }                                      \
    extern "C" int dnnpar_cpu_threads(void) { return dnnpar::Pool::get().threads(); }        \
    extern "C" void dnnpar_cpu_set_threads(int n) { dnnpar::Pool::get().set_threads(n); }
