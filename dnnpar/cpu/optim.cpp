// SGD's parameter update for the numpy backend (dnnpar/nn/optim.py: SGD.step) in one pass over
// each parameter: NumPy's expression takes five to seven passes (a temporary for g + wd p, the
// velocity scaled and added, lr times the direction, the subtraction, the mask), and on VGG-16's
// 33.6M parameters the update took 97 ms of a 420 ms training step.
//
// Per element, in float32, in this order (the NumPy fallback's order):
//   g' = g + wd p                                  (wd = 0: g' = g, not g + 0 p)
//   v  = first ? g' : momentum v + g'              (momentum = 0: no velocity, d = g')
//   d  = nesterov ? g' + momentum v : v
//   p  = p - lr d;   p = p * mask                  (mask: pruned weights stay 0)
// Each operation rounds to float32 once, as NumPy's does, with no multiply-add fused into an FMA
// (cpu_native.py builds this file with -ffp-contract=off): the result is NumPy's expression bit
// for bit, so a run does not change when the library is missing, and Deep Gradient
// Compression's own momentum recursion at density 1 still equals this optimizer exactly.
// Elementwise: the result does not depend on the thread count.
#include <cmath>
#include <cstdint>

#include "parallel.h"

extern "C" {

// p, g (n floats), v (n floats or null when momentum == 0), mask (n floats or null).
// flags: 1 nesterov, 2 first step (v = g'), 4 plain (p -= lr g, nothing else but the mask),
// 8 weight decay (g' = g + wd p; without it g' = g, as NumPy's `if weight_decay:`).
void dnnpar_sgd_step(float* p, const float* g, float* v, const float* mask, int64_t n, float lr, float momentum,
                     float wd, int flags, int threads) {
    const bool nesterov = flags & 1, first = flags & 2, plain = flags & 4, decay_flag = flags & 8;
    dnnpar::elementwise(n, threads, [&](int64_t lo, int64_t hi) {
        if (plain || v == nullptr) {
            const bool decay = !plain && decay_flag;
#pragma omp simd
            for (int64_t i = lo; i < hi; ++i) {
                const float d = decay ? g[i] + wd * p[i] : g[i];
                float q = p[i] - lr * d;
                if (mask) q *= mask[i];
                p[i] = q;
            }
            return;
        }
        const bool decay = decay_flag;
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) {
            const float gd = decay ? g[i] + wd * p[i] : g[i];
            const float vi = first ? gd : momentum * v[i] + gd;
            v[i] = vi;
            const float d = nesterov ? gd + momentum * vi : vi;
            float q = p[i] - lr * d;
            if (mask) q *= mask[i];
            p[i] = q;
        }
    });
}

// Deep Gradient Compression's momentum correction and accumulation (dnnpar/parallel/dgc.py,
// DGC.encode), one pass in NumPy's order, bit for bit:
//   g' = g + wd p (wd = 0: g);  u = m u + g';  v = v + u;  mag = |v| (when mag is given)
// p may be null when wd == 0; mag feeds the top-k selection (no |v| temporary there).
void dnnpar_dgc_accumulate(float* u, float* v, float* mag, const float* g, const float* p, int64_t n, float m,
                           float wd, int threads) {
    const bool decay = wd != 0.0f && p != nullptr;
    dnnpar::elementwise(n, threads, [&](int64_t lo, int64_t hi) {
#pragma omp simd
        for (int64_t i = lo; i < hi; ++i) {
            const float gd = decay ? g[i] + wd * p[i] : g[i];
            const float ui = m * u[i] + gd;
            const float vi = v[i] + ui;
            u[i] = ui;
            v[i] = vi;
            if (mag) mag[i] = std::fabs(vi);  // np.abs: -0 gives +0
        }
    });
}

}  // extern "C"

DNNPAR_CPU_COMMON_EXPORTS(1)
