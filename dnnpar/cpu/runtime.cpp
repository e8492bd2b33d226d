// The one thread pool of dnnpar's native CPU kernels, shared by every library built from
// dnnpar/cpu/*.cpp: dnnpar/backend/cpu_native.py loads this library first and hands the
// addresses of dnnpar_pool_threads / dnnpar_pool_run to each kernel library it loads
// (dnnpar_cpu_attach, see parallel.h).
//
// Why one pool for all: an idle worker spins a little before it sleeps, so that back-to-back
// kernels hand over at once. With one pool per library (conv, BatchNorm, pooling, the GEMMs, ...),
// the workers of the library that ran last were still spinning when the next library's workers
// were woken, and on a 2-core machine they took turns on the same cores; and every hand-over
// from one library to another paid a sleeping worker's wake-up (10-50 us).
//
// Why not OpenMP's runtime: a process holds one libgomp, and whoever loads it first fixes its
// wait policy for good. With PyTorch imported first (its wheel brings libgomp.so.1 with the
// default spin policy), an OpenMP kernel's idle threads spin for milliseconds after every call
// and take the cores the next BLAS call needs: a MobileNet training step ran 1.5x slower beside
// `import torch` than without it. This pool belongs to dnnpar alone: its workers spin for a few
// microseconds, then sleep on a condition variable, whoever else is in the process.
//
// Shares are claimed, not assigned: the caller, done with share 0, runs every share no worker
// has claimed yet. A worker that is slow to wake (a halted vCPU), or that the scheduler put on
// the caller's own core, therefore costs the call nothing: measured on a 2-core KVM guest, with
// both threads left on one vCPU, a 57 us product took 260 us on "two" threads (the caller waited
// while the worker could not run, then the worker spun out its 200 us on the caller's core).
// An idle worker does not yield its core while it spins: yielding made it lose the race for
// its share to the caller whenever another thread yielded on the same vCPU (OpenBLAS's idle
// threads do), and two-thread GEMMs of ~1 ms ran as slowly as on one thread.
//
// A second caller while the pool is busy (two Python threads; ctypes drops the GIL) runs its body
// for every tid in turn on its own thread: the same partition, the same result, no sharing.
//
// fork(): the child has only the thread that forked, so the pool forgets the parent's workers
// (their std::thread objects are leaked, never joined) and every lock they may have held, and
// starts new workers on its first parallel call (without this, the child's first parallel call
// waited forever for workers that do not exist -- multiprocessing's default start method on
// Linux is fork).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <mutex>
#include <new>
#include <thread>
#include <vector>

#include <pthread.h>

#include "parallel.h"

namespace {

// How long an idle worker spins before it sleeps, and the pauses between two looks at the clock.
// A training step leaves 50-300 us of Python between two kernels; a worker that sleeps through
// such a gap costs the next call a wake-up (a futex and, on a virtual machine, an interrupt to an
// idle vCPU): on a 2-core KVM guest, a 20 us BatchNorm behind a 40 us gap took 70 us on two threads
// against 23 us on one with a 45 us spin, 18 us with a longer one. Measured in time, not
// iterations: one pause lasts 10 ns on some CPUs, 40 on others.
constexpr auto kSpinTime = std::chrono::microseconds(200);
constexpr int kPausesPerLook = 64;
// The caller's wait for its team: pauses before it yields its core.
constexpr int kSpin = 1 << 12;
constexpr int kMaxThreads = 256;

using Body = void (*)(void*, int, int);

class Pool {
public:
    Pool() {
        unsigned hw = std::thread::hardware_concurrency();
        threads_.store(hw ? int(std::min<unsigned>(hw, kMaxThreads)) : 1);
    }

    // In a forked child (pthread_atfork): the only thread is the one that forked.
    void forget_workers() {
        workers_ = new std::vector<std::thread>;  // the parent's are leaked: no thread to join
        new (&busy_) std::mutex;                  // a lock a vanished thread held stays held
        new (&sleep_) std::mutex;
        new (&wake_) std::condition_variable;
        pending_.store(0, std::memory_order_relaxed);
        claim_.store(0, std::memory_order_relaxed);
        body_ = nullptr;
        ctx_ = nullptr;
    }

    int threads() const { return threads_.load(std::memory_order_relaxed); }

    void run(int team, Body body, void* ctx) {
        team = std::max(1, std::min(team, kMaxThreads));
        std::unique_lock<std::mutex> busy(busy_, std::try_to_lock);
        if (team == 1 || !busy.owns_lock()) {
            for (int t = 0; t < team; ++t) body(ctx, t, team);
            return;
        }
        grow(team - 1);
        body_ = body;
        ctx_ = ctx;
        pending_.store(team - 1, std::memory_order_relaxed);
        uint64_t gen;
        {
            std::lock_guard<std::mutex> lk(sleep_);
            gen = (state_.load(std::memory_order_relaxed) >> 16) + 1;
            claim_.store(gen << 16 | 1, std::memory_order_release);
            state_.store(gen << 16 | uint64_t(team), std::memory_order_release);
        }
        wake_.notify_all();
        body(ctx, 0, team);
        // every share no worker has claimed yet, the caller runs itself: a worker that is slow
        // to wake (or shares this core) never holds the call up
        for (int t; claim(gen, team, t);) {
            body(ctx, t, team);
            pending_.fetch_sub(1, std::memory_order_acq_rel);
        }
        for (int i = 0; pending_.load(std::memory_order_acquire) != 0; ++i) {
            if (i < kSpin) DNNPAR_CPU_RELAX(); else std::this_thread::yield();
        }
        body_ = nullptr;
        ctx_ = nullptr;
    }

private:
    // Claim the next unrun share (tid) of call `gen`: false once every share is claimed or the
    // call is over. A successful claim keeps the call (and its body and context) alive until
    // its share is done (pending_ counts it).
    bool claim(uint64_t gen, int team, int& tid) {
        uint64_t c = claim_.load(std::memory_order_acquire);
        for (;;) {
            if (c >> 16 != gen || int(c & 0xffff) >= team) return false;
            if (claim_.compare_exchange_weak(c, c + 1, std::memory_order_acq_rel, std::memory_order_acquire)) {
                tid = int(c & 0xffff);
                return true;
            }
        }
    }

    void grow(int n) {  // under busy_: at least n workers
        while (int(workers_->size()) < n) {
            // the generation before this call is published: a worker that starts late still
            // takes this call's job
            const uint64_t seen = state_.load(std::memory_order_relaxed) >> 16;
            workers_->emplace_back([this, seen] { loop(seen); });
        }
    }

    // A worker reads the generation and the team size of a call in one load, then claims shares
    // of that generation only (claim() compares it): one that wakes after its call is over claims
    // nothing, never a share of the next call, whose team may differ. Which thread runs a share
    // does not matter: the share's tid alone says what it computes.
    void loop(uint64_t seen) {
        for (;;) {
            uint64_t s;
            const auto until = std::chrono::steady_clock::now() + kSpinTime;
            for (int i = 1; (s = state_.load(std::memory_order_acquire)) >> 16 == seen; ++i) {
                DNNPAR_CPU_RELAX();
                if (i % kPausesPerLook == 0 && std::chrono::steady_clock::now() >= until) break;
            }
            if (s >> 16 == seen) {
                std::unique_lock<std::mutex> lk(sleep_);
                wake_.wait(lk, [&] { return state_.load(std::memory_order_acquire) >> 16 != seen; });
                s = state_.load(std::memory_order_acquire);
            }
            seen = s >> 16;
            const int team = int(s & 0xffff);
            for (int t; claim(seen, team, t);) {
                body_(ctx_, t, team);
                pending_.fetch_sub(1, std::memory_order_acq_rel);
            }
        }
    }

    std::atomic<int> threads_{1};
    std::mutex busy_;    // one parallel call at a time
    std::mutex sleep_;   // guards the sleepers' wait
    std::condition_variable wake_;
    std::atomic<uint64_t> state_{0};  // call generation << 16 | its team size
    std::atomic<uint64_t> claim_{0};  // call generation << 16 | its next unclaimed share
    std::atomic<int> pending_{0};     // shares of the call not yet done
    Body body_ = nullptr;
    void* ctx_ = nullptr;
    std::vector<std::thread>* workers_ = new std::vector<std::thread>;  // never destroyed, as the pool
};

// never destroyed: its workers (started on the first parallel call) sleep until the process
// ends, and no exit-time join can hang
Pool& pool() {
    static Pool* p = [] {
        Pool* created = new Pool;
        pthread_atfork(nullptr, nullptr, [] { pool().forget_workers(); });
        return created;
    }();
    return *p;
}

}  // namespace

extern "C" {

int dnnpar_cpu_abi(void) { return 1; }
int dnnpar_pool_threads(void) { return pool().threads(); }
// body(ctx, tid, team) for tid in [0, team), the caller being tid 0; returns when all are done.
void dnnpar_pool_run(int team, Body body, void* ctx) { pool().run(team, body, ctx); }

}  // extern "C"
