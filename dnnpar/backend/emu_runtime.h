// dnnpar emu runtime: runs an unmodified cuda/*.cu kernel file on the CPU.
//
// Included (with -include) in front of a kernel source when the emu backend builds it with
// the host C++ compiler. Every CUDA thread of a block is a fiber (ucontext) with its own
// stack; the fibers of a block run one after another until each reaches a barrier
// (__syncthreads, a warp shuffle, __syncwarp) or exits, then the barrier is released and the
// next phase begins. The order in which the fibers run inside a phase is a launch option
// (forward, reverse, or a seeded random permutation drawn anew for every phase), so a kernel
// with a missing barrier computes different results under different orders: that is how a
// race shows up deterministically. Blocks run one after another, so `__shared__` storage
// can simply be function-static.
//
// Memory faults: the Python launcher copies every array argument into a buffer whose end
// touches a PROT_NONE guard page (dnnpar_emu_alloc). A read or write past the end raises
// SIGSEGV; the handler, running on its own stack, jumps back to the launch and reports the
// faulting address, which Python turns into an exception naming the argument and offset.
// Shared memory is poisoned (0xFF) at the start of every block.
//
// Tensor-core and asynchronous-copy instructions (used by sgemm_tf32) have exact models here,
// under the same names as the inline-PTX wrappers in cuda/gemm.cu:
//   mma_m16n8k8_tf32  warp-collective: every lane deposits its fragment registers, a warp barrier,
//                     then each lane computes ITS four d registers from the gathered 16x8 A, 8x8 B
//                     and 16x8 C laid out as the PTX ISA's mma.m16n8k8 .tf32 fragment tables say
//                     (so a wrong fragment index in a kernel gives a wrong product here too).
//                     A .tf32 operand register is read as the hardware reads it: its low 13 bits
//                     are ignored; products of TF32 values are exact in float32 and are added to c
//                     in k order with float32 rounding.
//   cvt_rna_tf32      cvt.rna.tf32.f32: round to nearest, ties away from zero, 10 mantissa bits.
//   mma_m16n8k16_bf16 the same for mma.m16n8k16 .bf16 (two BF16 values per register, low half first);
//   pack_bf16x2       cvt.rn.bf16x2.f32: two floats to BF16, nearest even, 7 mantissa bits.
//   ldmatrix_x4       ldmatrix.sync.aligned.m8n8.x4.shared.b16 (and ldmatrix_x4_trans, .trans):
//                     warp-collective: every lane deposits its row address (checked: in shared
//                     memory, 16-byte aligned), a warp barrier, then each lane reads the 32 rows
//                     (8 b16 each) and takes, in register j, the elements (i/4, 2(i%4)) and
//                     (i/4, 2(i%4)+1) of matrix j (rows from lanes 8j..8j+7; .trans: of the
//                     transposed matrix), low half first; a second barrier keeps any lane from
//                     writing shared memory before every lane has read (the load is one warp-wide
//                     instruction on the GPU).
//   cp_async_4 / _16  cp.async.{ca,cg}.shared.global with src-size: queued, NOT copied; the copy
//                     (src-size bytes, the rest zero-filled) happens at the cp_async_wait<N> that
//                     completes its group (wait_group N completes all but the newest N committed
//                     groups of this thread; copies not yet committed are never completed). A
//                     kernel that reads shared memory before the matching wait reads poison.
#pragma once
#ifndef DNNPAR_EMU
#define DNNPAR_EMU 1
#endif

#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

// ---------------------------------------------------------------- CUDA vocabulary
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __noinline__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __restrict__ __restrict
// One block runs at a time, so block-shared storage can be a function-static variable. All of it
// lives in one section, which the runtime fills with 0xFF (a float NaN) before every block:
// shared memory starts undefined on a GPU, and a kernel that reads it before writing it must not
// get last block's values by luck.
// (A __shared__ variable inside a template or inline function is a COMDAT object that the
// linker may keep out of the section: declare shared arrays in the kernel itself. The cp.async
// model refuses a destination outside the section, so that mistake does not go unseen.)
#define __shared__ static __attribute__((section("dnnpar_shared"), aligned(16)))
extern "C" char __start_dnnpar_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_dnnpar_shared[] __attribute__((weak, visibility("hidden")));

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct uint3 { unsigned x, y, z; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
struct alignas(16) int4 { int x, y, z, w; };
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline float min(float a, float b) { return std::fmin(a, b); }
inline float max(float a, float b) { return std::fmax(a, b); }
template <class T> inline T __ldg(const T* p) { return *p; }
inline float __fdividef(float a, float b) { return a / b; }

namespace dnnpar_emu {

enum State { RUNNABLE, AT_BLOCK_BARRIER, AT_WARP_BARRIER, DONE };

struct Fiber {
    ucontext_t ctx;
    uint3 tid;
    int linear;     // linear thread index inside the block
    int state;
    unsigned mask;  // lanes a warp barrier waits for
    unsigned long long shfl;  // value published for a warp shuffle
    unsigned frag[2][10];     // registers published to the warp by a collective (mma: a[4], b[2], c[4]), two sets
    unsigned collectives;     // warp collectives (mma, ldmatrix) this thread has issued in this block (picks the set)
};

// One cp.async copy waiting for its group's wait_group.
struct AsyncCopy {
    void* dst;
    const void* src;
    int bytes, src_bytes, group;
};
struct AsyncQueue {
    std::vector<AsyncCopy> pending;
    int committed = 0;  // groups committed so far; copies issued now belong to group `committed`
};

constexpr size_t kStackBytes = 128 * 1024;
constexpr int kMaxThreads = 1024;

// Everything below is per loaded .so (one kernel file) and used by one launch at a time.
static Fiber* g_cur = nullptr;
static uint3 g_block_idx{0, 0, 0};
static dim3 g_block_dim, g_grid_dim;
static ucontext_t g_sched_ctx;
static std::vector<Fiber> g_fibers;
static std::vector<AsyncQueue> g_async;  // per thread of the running block
static std::vector<char*> g_stacks;   // each: guard page + kStackBytes
static void (*g_entry)(void**) = nullptr;
static void** g_args = nullptr;
static sigjmp_buf g_fault_jmp;
static volatile sig_atomic_t g_in_launch = 0;
static volatile uintptr_t g_fault_addr = 0;
static volatile int g_fault_sig = 0;
static char g_err[512];
static volatile int g_abort = 0;  // set by kernel_error before jumping back to the launch

// A kernel misused an emulated instruction: stop the launch and report `msg` (a ValueError in Python).
[[noreturn]] inline void kernel_error(const char* msg) {
    std::snprintf(g_err, sizeof g_err, "%s", msg);
    g_abort = 1;
    siglongjmp(g_fault_jmp, 1);
}

inline size_t page_size() { return (size_t)sysconf(_SC_PAGESIZE); }

static void fiber_main() {
    g_entry(g_args);
    g_cur->state = DONE;
    swapcontext(&g_cur->ctx, &g_sched_ctx);
}

inline void yield_to_scheduler() {
    Fiber* self = g_cur;
    asm volatile("" ::: "memory");
    swapcontext(&self->ctx, &g_sched_ctx);
    asm volatile("" ::: "memory");
}

inline void block_barrier() {
    g_cur->state = AT_BLOCK_BARRIER;
    yield_to_scheduler();
}

inline void warp_barrier(unsigned mask) {
    g_cur->state = AT_WARP_BARRIER;
    g_cur->mask = mask;
    yield_to_scheduler();
}

inline int lane_id() { return g_cur->linear & 31; }

template <class T> inline unsigned long long to_bits(T v) {
    static_assert(sizeof(T) <= 8, "shuffle of a type wider than 8 bytes");
    unsigned long long b = 0;
    std::memcpy(&b, &v, sizeof(T));
    return b;
}
template <class T> inline T from_bits(unsigned long long b) {
    T v;
    std::memcpy(&v, &b, sizeof(T));
    return v;
}

// A shuffle: publish, wait for the named lanes, read the source lane, wait again so that
// nobody overwrites its slot before every lane has read.
template <class T> inline T shuffle(unsigned mask, T v, int src_lane) {
    Fiber* self = g_cur;
    self->shfl = to_bits(v);
    warp_barrier(mask);
    int warp_base = self->linear & ~31;
    int src = warp_base + src_lane;
    T out = v;
    if (src_lane >= 0 && src_lane < 32 && src < (int)g_fibers.size()) out = from_bits<T>(g_fibers[src].shfl);
    warp_barrier(mask);
    return out;
}

// ---------------------------------------------------------------- the scheduler
enum Order { FORWARD = 0, REVERSE = 1, RANDOM = 2 };

// Returns 0 when every fiber of the block finished, else writes g_err and returns 1.
static int run_block(int nthreads, int order, std::mt19937& rng) {
    std::vector<int> perm(nthreads);
    for (int i = 0; i < nthreads; ++i) perm[i] = i;
    for (;;) {
        if (order == REVERSE) std::reverse(perm.begin(), perm.end());
        if (order == RANDOM) std::shuffle(perm.begin(), perm.end(), rng);
        for (int k = 0; k < nthreads; ++k) {
            Fiber& f = g_fibers[perm[k]];
            if (f.state != RUNNABLE) continue;
            g_cur = &f;
            swapcontext(&g_sched_ctx, &f.ctx);
        }
        if (order == REVERSE) std::reverse(perm.begin(), perm.end());
        // Every fiber now waits at a barrier or is done. Release whatever can be released.
        bool released = false, all_done = true;
        for (int w = 0; w < nthreads; w += 32) {
            int end = std::min(w + 32, nthreads);
            for (int i = w; i < end; ++i) {
                Fiber& f = g_fibers[i];
                if (f.state != AT_WARP_BARRIER) continue;
                bool ready = true;
                for (int l = 0; l < end - w && ready; ++l) {
                    if (!(f.mask >> l & 1u)) continue;
                    const Fiber& o = g_fibers[w + l];
                    if (o.state == DONE) {
                        std::snprintf(g_err, sizeof g_err,
                                      "warp shuffle/sync in thread %d names lane %d, which has exited", i, l);
                        return 1;
                    }
                    ready = o.state == AT_WARP_BARRIER;
                }
                if (ready) {
                    for (int l = 0; l < end - w; ++l)
                        if ((f.mask >> l & 1u) && g_fibers[w + l].state == AT_WARP_BARRIER) g_fibers[w + l].state = RUNNABLE;
                    released = true;
                }
            }
        }
        if (released) continue;
        int at_block = 0, at_warp = 0;
        for (int i = 0; i < nthreads; ++i) {
            int s = g_fibers[i].state;
            if (s != DONE) all_done = false;
            at_block += s == AT_BLOCK_BARRIER;
            at_warp += s == AT_WARP_BARRIER;
        }
        if (all_done) return 0;
        if (at_warp == 0) {  // all live threads wait at __syncthreads (exited ones count as arrived)
            for (int i = 0; i < nthreads; ++i)
                if (g_fibers[i].state == AT_BLOCK_BARRIER) g_fibers[i].state = RUNNABLE;
            continue;
        }
        std::snprintf(g_err, sizeof g_err,
                      "deadlock: %d threads wait at __syncthreads while %d wait at a warp barrier "
                      "(barrier in divergent code)", at_block, at_warp);
        return 1;
    }
}

static void on_fault(int sig, siginfo_t* info, void*) {
    if (!g_in_launch) {  // not ours: fall back to the default action
        signal(sig, SIG_DFL);
        raise(sig);
        return;
    }
    g_fault_sig = sig;
    g_fault_addr = (uintptr_t)info->si_addr;
    siglongjmp(g_fault_jmp, 1);
}

static bool ensure_stacks(int n) {
    size_t pg = page_size();
    while ((int)g_stacks.size() < n) {
        void* p = mmap(nullptr, kStackBytes + pg, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED) return false;
        mprotect(p, pg, PROT_NONE);  // stack overflow faults instead of corrupting a neighbour
        g_stacks.push_back((char*)p);
    }
    return true;
}

}  // namespace dnnpar_emu

#define threadIdx (::dnnpar_emu::g_cur->tid)
#define blockIdx (::dnnpar_emu::g_block_idx)
#define blockDim (::dnnpar_emu::g_block_dim)
#define gridDim (::dnnpar_emu::g_grid_dim)
#define warpSize 32

inline void __syncthreads() { ::dnnpar_emu::block_barrier(); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { ::dnnpar_emu::warp_barrier(mask); }
template <class T> inline T __shfl_sync(unsigned mask, T v, int src, int width = 32) {
    int lane = ::dnnpar_emu::lane_id();
    return ::dnnpar_emu::shuffle(mask, v, (lane & ~(width - 1)) + (src & (width - 1)));
}
template <class T> inline T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
    int lane = ::dnnpar_emu::lane_id();
    int src = lane + (int)delta;
    if ((lane & (width - 1)) + (int)delta >= width) src = lane;
    return ::dnnpar_emu::shuffle(mask, v, src);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T v, int lanemask, int width = 32) {
    int lane = ::dnnpar_emu::lane_id();
    int src = lane ^ lanemask;
    if ((src & ~(width - 1)) != (lane & ~(width - 1))) src = lane;
    return ::dnnpar_emu::shuffle(mask, v, src);
}
// Fibers never run at the same time, so a read-modify-write is atomic here.
template <class T> inline T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }
template <class T> inline T atomicMax(T* p, T v) { T old = *p; *p = old > v ? old : v; return old; }

// ---------------------------------------------------------------- tensor cores and cp.async
namespace dnnpar_emu {

inline unsigned f32_bits(float v) { unsigned b; std::memcpy(&b, &v, 4); return b; }
inline float bits_f32(unsigned b) { float v; std::memcpy(&v, &b, 4); return v; }

// Every lane of the warp must be there: mma.sync.aligned and the like are warp-wide.
inline void require_full_warp(const char* what) {
    int base = g_cur->linear & ~31;
    if (base + 32 > (int)g_fibers.size()) {
        char msg[200];
        std::snprintf(msg, sizeof msg, "%s needs all 32 lanes of a warp, but the block (%d threads) "
                      "ends inside this thread's warp", what, (int)g_fibers.size());
        kernel_error(msg);
    }
}

// cvt.rna.tf32.f32: keep 10 mantissa bits, rounding to nearest with ties away from zero (on the
// magnitude bits, so for both signs); a NaN stays a NaN, overflow past the largest TF32 gives inf.
inline unsigned tf32_round(float x) {
    unsigned b = f32_bits(x);
    if ((b & 0x7F800000u) == 0x7F800000u && (b & 0x007FFFFFu)) return 0x7FFFFFFFu;  // canonical NaN
    return (b + 0x1000u) & 0xFFFFE000u;
}

// The gather every warp-collective model shares. warp_publish: this lane deposits n (<= 10)
// registers and waits for the warp; returns where the model reads the 32 lanes' registers: lane
// l's are out[l * stride .. + n). Consecutive collectives (mma, ldmatrix) alternate between two
// register sets, so one barrier per collective suffices: a lane can republish into the other set
// only after every lane has reached this collective's barrier, i.e. has finished gathering the
// previous one's set (.sync.aligned: all lanes issue the same collectives in the same order).
struct MmaRegs {
    const unsigned* base;
    size_t stride;
    const unsigned* operator[](int lane) const { return base + lane * stride; }
};
static_assert(sizeof(Fiber) % sizeof(unsigned) == 0, "MmaRegs strides over Fibers in units of registers");
inline MmaRegs warp_publish(const unsigned* regs, int n, const char* what) {
    require_full_warp(what);
    Fiber* self = g_cur;
    const unsigned set = self->collectives++ & 1u;
    unsigned* f = self->frag[set];
    for (int i = 0; i < n; ++i) f[i] = regs[i];
    warp_barrier(0xffffffffu);
    const Fiber* w = &g_fibers[self->linear & ~31];
    return MmaRegs{w->frag[set], sizeof(Fiber) / sizeof(unsigned)};
}
// The mma half: this lane's a, b, c registers.
inline MmaRegs mma_publish(const unsigned a[4], const unsigned b[2], const float c[4]) {
    unsigned f[10];
    for (int i = 0; i < 4; ++i) f[i] = a[i];
    for (int i = 0; i < 2; ++i) f[4 + i] = b[i];
    for (int i = 0; i < 4; ++i) f[6 + i] = f32_bits(c[i]);
    return warp_publish(f, 10, "mma.sync");
}

// mma_finish: C gathered in the c/d layout (c0 (g, 2t), c1 (g, 2t+1), c2 (g+8, 2t), c3 (g+8, 2t+1)),
// then this lane's four d registers: c + the K products (exact in float32 for TF32 and BF16
// operands) added in k order.
template <int K> inline void mma_finish(float d[4], const MmaRegs& w, const float (&A)[16][K], const float (&B)[K][8]) {
    float C[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const unsigned* f = w[lane];
        int g = lane >> 2, t = lane & 3;
        C[g][2 * t] = bits_f32(f[6]);
        C[g][2 * t + 1] = bits_f32(f[7]);
        C[g + 8][2 * t] = bits_f32(f[8]);
        C[g + 8][2 * t + 1] = bits_f32(f[9]);
    }
    int lane = g_cur->linear & 31, g = lane >> 2, t = lane & 3;
    const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
    for (int i = 0; i < 4; ++i) {
        float acc = C[rows[i]][cols[i]];
        for (int k = 0; k < K; ++k) {
            volatile float p = A[rows[i]][k] * B[k][cols[i]];  // volatile: no fused multiply-add
            acc = acc + p;
        }
        d[i] = acc;
    }
}

// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32: D (16x8) = A (16x8) B (8x8) + C.
// Fragment layout (PTX ISA, "Matrix fragments for mma.m16n8k8" .tf32; the same as CUTLASS's
// SM80_16x8x8_F32TF32TF32F32_TN traits): g = lane >> 2, t = lane % 4;
//   A: a0 (g, t)  a1 (g+8, t)  a2 (g, t+4)  a3 (g+8, t+4)        (row, k)
//   B: b0 (t, g)  b1 (t+4, g)                                     (k, col)
//   C, D: c0 (g, 2t)  c1 (g, 2t+1)  c2 (g+8, 2t)  c3 (g+8, 2t+1)  (row, col)
inline void mma_m16n8k8_tf32(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    const MmaRegs w = mma_publish(a, b, c);
    float A[16][8], B[8][8];
    for (int lane = 0; lane < 32; ++lane) {
        const unsigned* f = w[lane];
        int g = lane >> 2, t = lane & 3;
        // the tensor core reads only the TF32 bits of a .tf32 register
        A[g][t] = bits_f32(f[0] & 0xFFFFE000u);
        A[g + 8][t] = bits_f32(f[1] & 0xFFFFE000u);
        A[g][t + 4] = bits_f32(f[2] & 0xFFFFE000u);
        A[g + 8][t + 4] = bits_f32(f[3] & 0xFFFFE000u);
        B[t][g] = bits_f32(f[4] & 0xFFFFE000u);
        B[t + 4][g] = bits_f32(f[5] & 0xFFFFE000u);
    }
    mma_finish(d, w, A, B);
}

// cvt.rn.bf16.f32: keep 7 mantissa bits, round to nearest, ties to even; NaN stays NaN.
inline unsigned short bf16_round(float x) {
    unsigned b = f32_bits(x);
    if ((b & 0x7F800000u) == 0x7F800000u && (b & 0x007FFFFFu)) return 0x7FC0;
    return (unsigned short)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
}
inline float bf16_value(unsigned h) { return bits_f32((h & 0xFFFFu) << 16); }

// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32: D (16x8) = A (16x16) B (16x8) + C, every
// a / b register two BF16 values, the lower-indexed one in the low half. Layout (PTX ISA,
// "Matrix fragments for mma.m16n8k16" floating point; CUTLASS's SM80_16x8x16_F32BF16BF16F32_TN),
// g = lane >> 2, t = lane % 4:
//   A: a0 (g, 2t..2t+1)  a1 (g+8, 2t..2t+1)  a2 (g, 2t+8..2t+9)  a3 (g+8, 2t+8..2t+9)   (row, k)
//   B: b0 (2t..2t+1, g)  b1 (2t+8..2t+9, g)                                            (k, col)
//   C, D: as for m16n8k8.
inline void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    const MmaRegs w = mma_publish(a, b, c);
    float A[16][16], B[16][8];
    for (int lane = 0; lane < 32; ++lane) {
        const unsigned* f = w[lane];
        int g = lane >> 2, t = lane & 3;
        for (int h = 0; h < 2; ++h) {  // h: which half of the register, k offset 0 or 1
            A[g][2 * t + h] = bf16_value(f[0] >> (16 * h));
            A[g + 8][2 * t + h] = bf16_value(f[1] >> (16 * h));
            A[g][2 * t + 8 + h] = bf16_value(f[2] >> (16 * h));
            A[g + 8][2 * t + 8 + h] = bf16_value(f[3] >> (16 * h));
            B[2 * t + h][g] = bf16_value(f[4] >> (16 * h));
            B[2 * t + 8 + h][g] = bf16_value(f[5] >> (16 * h));
        }
    }
    mma_finish(d, w, A, B);
}

inline bool in_shared(const void* p, int bytes) {
    const char* c = static_cast<const char*>(p);
    return c >= __start_dnnpar_shared && c + bytes <= __stop_dnnpar_shared;
}

// ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16 (PTX ISA, "Warp-level matrix load instruction:
// ldmatrix"): lane t supplies the address of row t % 8 of matrix t / 8 (16 bytes: 8 b16 elements);
// lane i receives in r[j] the elements (i / 4, 2 (i % 4)) and (i / 4, 2 (i % 4) + 1) of matrix j, or
// with .trans those of its transpose, i.e. (2 (i % 4), i / 4) and (2 (i % 4) + 1, i / 4); the first
// element of each pair in the low half.
template <bool Trans> inline void ldmatrix_x4(unsigned r[4], const void* p) {
    const uintptr_t a = (uintptr_t)p;
    const unsigned addr[2] = {(unsigned)a, (unsigned)((unsigned long long)a >> 32)};
    const MmaRegs w = warp_publish(addr, 2, "ldmatrix");
    if (!in_shared(p, 16)) kernel_error("ldmatrix: a row address is not in shared memory");
    if (a & 15) kernel_error("ldmatrix: a row address is not 16-byte aligned");
    unsigned short rows[32][8];  // rows[8 j + k]: row k of matrix j
    for (int lane = 0; lane < 32; ++lane) {
        const unsigned* f = w[lane];
        const uintptr_t src = (uintptr_t)((unsigned long long)f[0] | (unsigned long long)f[1] << 32);
        std::memcpy(rows[lane], (const void*)src, 16);  // every lane's address was checked by its own lane
    }
    warp_barrier(0xffffffffu);  // everyone has read before anyone goes on (and may write shared memory)
    const int i = g_cur->linear & 31, g = i >> 2, c = 2 * (i & 3);
    for (int j = 0; j < 4; ++j) {
        const unsigned lo = Trans ? rows[8 * j + c][g] : rows[8 * j + g][c];
        const unsigned hi = Trans ? rows[8 * j + c + 1][g] : rows[8 * j + g][c + 1];
        r[j] = lo | hi << 16;
    }
}

// cp.async with src-size: queued until the wait_group that completes its group.
inline void cp_async(void* dst, const void* src, int bytes, int src_bytes) {
    if (!in_shared(dst, bytes)) kernel_error("cp.async: the destination is not in shared memory");
    if (((uintptr_t)dst | (uintptr_t)(src_bytes ? src : nullptr)) & (uintptr_t)(bytes - 1))
        kernel_error("cp.async: source or destination not aligned to the copy size");
    if (src_bytes < 0 || src_bytes > bytes) kernel_error("cp.async: src-size outside 0..cp-size");
    AsyncQueue& q = g_async[g_cur->linear];
    q.pending.push_back(AsyncCopy{dst, src, bytes, src_bytes, q.committed});
}

inline void cp_async_commit() { ++g_async[g_cur->linear].committed; }

// cp.async.wait_group n: every group but the newest n committed ones is complete.
inline void cp_async_wait_group(int n) {
    AsyncQueue& q = g_async[g_cur->linear];
    size_t keep = 0;
    for (size_t i = 0; i < q.pending.size(); ++i) {
        AsyncCopy& c = q.pending[i];
        if (c.group < q.committed - n) {
            if (c.src_bytes) std::memcpy(c.dst, c.src, (size_t)c.src_bytes);
            std::memset(static_cast<char*>(c.dst) + c.src_bytes, 0, (size_t)(c.bytes - c.src_bytes));
        } else {
            q.pending[keep++] = c;
        }
    }
    q.pending.resize(keep);
}

}  // namespace dnnpar_emu

// The names cuda/gemm.cu gives its inline-PTX wrappers (compiled there under #ifndef DNNPAR_EMU).
inline void mma_m16n8k8_tf32(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    ::dnnpar_emu::mma_m16n8k8_tf32(d, a, b, c);
}
inline unsigned cvt_rna_tf32(float x) { return ::dnnpar_emu::tf32_round(x); }
inline void mma_m16n8k16_bf16(float d[4], const unsigned a[4], const unsigned b[2], const float c[4]) {
    ::dnnpar_emu::mma_m16n8k16_bf16(d, a, b, c);
}
inline unsigned pack_bf16x2(float lo, float hi) {  // cvt.rn.bf16x2.f32 d, hi, lo
    return (unsigned)::dnnpar_emu::bf16_round(lo) | (unsigned)::dnnpar_emu::bf16_round(hi) << 16;
}
inline void ldmatrix_x4(unsigned r[4], const void* p) { ::dnnpar_emu::ldmatrix_x4<false>(r, p); }
inline void ldmatrix_x4_trans(unsigned r[4], const void* p) { ::dnnpar_emu::ldmatrix_x4<true>(r, p); }
inline void cp_async_4(void* dst, const void* src, int src_bytes) { ::dnnpar_emu::cp_async(dst, src, 4, src_bytes); }
inline void cp_async_16(void* dst, const void* src, int src_bytes) { ::dnnpar_emu::cp_async(dst, src, 16, src_bytes); }
inline void cp_async_commit() { ::dnnpar_emu::cp_async_commit(); }
template <int N> inline void cp_async_wait() { ::dnnpar_emu::cp_async_wait_group(N); }

// ---------------------------------------------------------------- the C ABI used by Python
namespace dnnpar_emu {

template <class T> constexpr char scalar_code() {
    using U = std::remove_cv_t<T>;
    if constexpr (std::is_same_v<U, float>) return 'f';
    else if constexpr (std::is_same_v<U, double>) return 'd';
    else if constexpr (std::is_same_v<U, int>) return 'i';
    else if constexpr (std::is_same_v<U, unsigned>) return 'I';
    else if constexpr (std::is_same_v<U, long long> || std::is_same_v<U, long>) return 'q';
    else if constexpr (std::is_same_v<U, unsigned char>) return 'B';
    else if constexpr (std::is_same_v<U, signed char> || std::is_same_v<U, char>) return 'b';
    else if constexpr (std::is_same_v<U, float4>) return 'f';
    else return '?';
}

// One token per parameter: a scalar code, or '*' and the pointee's code for a pointer, followed
// by 'c' for a pointer to const: the launcher copies only non-const buffers back (a kernel's
// inputs are never written, so a read-only NumPy array can be one).
template <class T> void append_code(std::string& s) {
    if constexpr (std::is_pointer_v<T>) {
        s += '*';
        s += scalar_code<std::remove_pointer_t<T>>();
        if constexpr (std::is_const_v<std::remove_pointer_t<T>>) s += 'c';
    } else {
        s += scalar_code<T>();
    }
    s += ' ';
}

template <class... A> const char* signature(void (*)(A...)) {
    static std::string s = [] { std::string r; (append_code<A>(r), ...); return r; }();
    return s.c_str();
}

template <class... A, size_t... I> void invoke_impl(void (*f)(A...), void** a, std::index_sequence<I...>) {
    f(*static_cast<std::remove_cv_t<A>*>(a[I])...);
}
template <class... A> void invoke(void (*f)(A...), void** a) { invoke_impl(f, a, std::index_sequence_for<A...>{}); }

}  // namespace dnnpar_emu

extern "C" {

// Buffer of `nbytes` whose last byte touches a PROT_NONE page; a guard page sits before it too.
// Returns the data pointer; *base and *total describe the whole mapping for dnnpar_emu_free.
void* dnnpar_emu_alloc(size_t nbytes, void** base, size_t* total) {
    size_t pg = dnnpar_emu::page_size();
    size_t body = (nbytes + pg - 1) / pg * pg;
    if (body == 0) body = pg;
    size_t len = body + 2 * pg;
    void* p = mmap(nullptr, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return nullptr;
    mprotect(p, pg, PROT_NONE);
    mprotect((char*)p + pg + body, pg, PROT_NONE);
    *base = p;
    *total = len;
    return (char*)p + pg + body - nbytes;
}

void dnnpar_emu_free(void* base, size_t total) { munmap(base, total); }

const char* dnnpar_emu_error() { return dnnpar_emu::g_err; }
unsigned long long dnnpar_emu_fault_addr() { return dnnpar_emu::g_fault_addr; }

// Runs the whole grid. Returns 0 on success, 1 on a scheduling error (message in
// dnnpar_emu_error), 2 on a memory fault (address in dnnpar_emu_fault_addr), 3 on a bad launch.
int dnnpar_emu_launch(void (*entry)(void**), void** args, const unsigned* grid, const unsigned* block,
                      int order, unsigned seed) {
    using namespace dnnpar_emu;
    g_err[0] = 0;
    g_fault_addr = 0;
    int nthreads = (int)(block[0] * block[1] * block[2]);
    if (nthreads < 1 || nthreads > kMaxThreads || block[2] > 64) {
        std::snprintf(g_err, sizeof g_err, "block of %d threads: CUDA allows 1..1024 (z <= 64)", nthreads);
        return 3;
    }
    if (grid[0] < 1 || grid[1] < 1 || grid[2] < 1 || grid[1] > 65535 || grid[2] > 65535) {
        std::snprintf(g_err, sizeof g_err, "grid (%u, %u, %u) outside CUDA's limits", grid[0], grid[1], grid[2]);
        return 3;
    }
    if (!ensure_stacks(nthreads)) {
        std::snprintf(g_err, sizeof g_err, "cannot map fiber stacks");
        return 3;
    }
    g_fibers.assign(nthreads, Fiber{});
    g_async.assign(nthreads, AsyncQueue{});
    g_abort = 0;
    g_entry = entry;
    g_args = args;
    g_block_dim = dim3(block[0], block[1], block[2]);
    g_grid_dim = dim3(grid[0], grid[1], grid[2]);
    std::mt19937 rng(seed);

    static char altstack[64 * 1024];
    stack_t ss{}, old_ss{};
    ss.ss_sp = altstack;
    ss.ss_size = sizeof altstack;
    sigaltstack(&ss, &old_ss);
    struct sigaction sa{}, old_segv{}, old_bus{};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &old_segv);
    sigaction(SIGBUS, &sa, &old_bus);

    int rc = 0;
    if (sigsetjmp(g_fault_jmp, 1) == 0) {
        g_in_launch = 1;
        for (unsigned bz = 0; bz < grid[2] && rc == 0; ++bz)
            for (unsigned by = 0; by < grid[1] && rc == 0; ++by)
                for (unsigned bx = 0; bx < grid[0] && rc == 0; ++bx) {
                    g_block_idx = uint3{bx, by, bz};
                    if (__start_dnnpar_shared != __stop_dnnpar_shared)
                        std::memset(__start_dnnpar_shared, 0xFF, __stop_dnnpar_shared - __start_dnnpar_shared);
                    for (AsyncQueue& q : g_async) q = AsyncQueue{};  // copies never waited for are dropped
                    size_t pg = page_size();
                    for (int i = 0; i < nthreads; ++i) {
                        Fiber& f = g_fibers[i];
                        f.linear = i;
                        f.tid = uint3{(unsigned)(i % block[0]), (unsigned)(i / block[0] % block[1]),
                                      (unsigned)(i / (block[0] * block[1]))};
                        f.state = RUNNABLE;
                        f.collectives = 0;
                        getcontext(&f.ctx);
                        f.ctx.uc_stack.ss_sp = g_stacks[i] + pg;
                        f.ctx.uc_stack.ss_size = kStackBytes;
                        f.ctx.uc_link = nullptr;
                        makecontext(&f.ctx, fiber_main, 0);
                    }
                    rc = run_block(nthreads, order, rng);
                }
    } else if (g_abort) {
        rc = 3;  // kernel_error wrote the message
    } else {
        rc = 2;
        std::snprintf(g_err, sizeof g_err, "%s at address 0x%llx", g_fault_sig == SIGBUS ? "SIGBUS" : "SIGSEGV",
                      (unsigned long long)g_fault_addr);
    }
    g_in_launch = 0;
    sigaction(SIGSEGV, &old_segv, nullptr);
    sigaction(SIGBUS, &old_bus, nullptr);
    sigaltstack(&old_ss, nullptr);
    return rc;
}

}  // extern "C"
