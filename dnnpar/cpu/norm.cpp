// BatchNorm2d for the numpy backend: float32 NCHW, with the following ReLU / ReLU6 fused in.
//
// Forward (training): per channel c over its M = N*H*W values, in float64 accumulators,
//   mean = sum x / M                     (pass 1)
//   var  = sum (x - mean)^2 / M          (pass 2: two-pass, no cancellation; biased, as PyTorch)
//   inv  = 1 / sqrt(var + eps)
//   y    = act((x - mean) * s + beta),  s = gamma * inv             (pass 3: a subtract and an FMA;
//          centred, so a constant channel gives beta exactly)
// Forward (eval): mean and var given (the running averages), pass 3 only.
// Backward: g = dy where the activation passes (y > 0, and y < 6 for ReLU6; NaN y gives 0, as
// dnnpar.ops.activation.activation_grad), then
//   dbeta = sum g,  dgamma = inv * sum g (x - mean)                   (pass 1, float64)
//   dx = k1 g + k2 (x - mean) + k3                                    (pass 2, two FMAs)
//   with k1 = gamma inv, and in training k2 = -gamma inv^2 dgamma / M, k3 = -k1 dbeta / M
//   (the batch statistics' gradient); in eval k2 = k3 = 0.
//
// Error bound (the one tests/test_norm.py checks, u = 2^-24): the float64 stages (sums of at most
// M < 2^29 terms) add relative errors of at most (M + 4) 2^-53 <= u to mean, inv, s, t, k1..k3;
// the float32 stages then round mean and s (one u each), the subtract and the FMA once, so
//   |y - y_exact| <= 4u (|x| |s| + mean|x| |s| + |beta|)   (mean|x|: the channel's mean magnitude),
//   |dx - dx_exact| <= 4u (|k1 g| + |k2 (x - mean)| + |k3|) + u |k1| (mean|g| + inv^2 mean(|g| d)) (1 + d),
//       d = |x - mean| + mean|x| (the float64 sums' errors, relative to their magnitudes, carried
//       through k2 and k3),
//   |dgamma - exact| <= 2u |dgamma| + u inv sum |g| d,  |dbeta - exact| <= 2u |dbeta| + u sum |g|,
// per element (first order; ReLU / ReLU6 are 1-Lipschitz and add nothing).
//
// Threads (dnnpar/cpu/parallel.h's pool): whole channels per thread, each channel's sums in one
// fixed order, so the bits do not depend on the thread count.
//
// Nothing here checks its input: dnnpar/ops/norm.py validates shapes and passes C-contiguous
// float32 arrays (float64 statistics).
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "activation.h"
#include "parallel.h"

namespace {

using dnnpar::activate;
using dnnpar::kNone;
using dnnpar::kRelu;
using dnnpar::kRelu6;
using dnnpar::passes;

template <int A>
void normalize_channel(const float* x, float* y, int64_t n, int64_t c, int64_t hw, float mu, float s, float beta) {
    for (int64_t b = 0; b < n; ++b) {
        const float* __restrict xp = x + (b * c) * hw;
        float* __restrict yp = y + (b * c) * hw;
#pragma omp simd
        for (int64_t i = 0; i < hw; ++i) yp[i] = activate<A>(std::fma(xp[i] - mu, s, beta));
    }
}

template <int A>
void forward(const float* x, const float* gamma, const float* beta, double* mean, double* var, double* inv,
             float* y, int64_t n, int64_t c, int64_t hw, double eps, bool training, int team) {
    const double m = double(n * hw);
    dnnpar::parallel(team, [&](int tid, int nt) {
        const dnnpar::Range r = dnnpar::split(c, tid, nt);
        for (int64_t ch = r.lo; ch < r.hi; ++ch) {
            const float* xc = x + ch * hw;
            if (training) {
                double s1 = 0.0;
                for (int64_t b = 0; b < n; ++b) {
                    const float* __restrict xp = xc + b * c * hw;
#pragma omp simd reduction(+ : s1)
                    for (int64_t i = 0; i < hw; ++i) s1 += double(xp[i]);
                }
                const double mu = s1 / m;
                double s2 = 0.0;
                for (int64_t b = 0; b < n; ++b) {
                    const float* __restrict xp = xc + b * c * hw;
#pragma omp simd reduction(+ : s2)
                    for (int64_t i = 0; i < hw; ++i) {
                        const double d = double(xp[i]) - mu;
                        s2 += d * d;
                    }
                }
                mean[ch] = mu;
                var[ch] = s2 / m;
            }
            inv[ch] = 1.0 / std::sqrt(var[ch] + eps);
            const double s = double(gamma[ch]) * inv[ch];
            normalize_channel<A>(xc, y + ch * hw, n, c, hw, float(mean[ch]), float(s), beta[ch]);
        }
    });
}

constexpr int64_t kMaskChunk = 512;

// sg += sum g, sgx += sum g (x - mu), in double
inline void reduce_g(const float* __restrict g, const float* __restrict x, int64_t n, double mu, double& sg,
                     double& sgx) {
    double a = sg, b = sgx;
#pragma omp simd reduction(+ : a, b)
    for (int64_t i = 0; i < n; ++i) {
        const double gi = double(g[i]);
        a += gi;
        b += gi * (double(x[i]) - mu);
    }
    sg = a;
    sgx = b;
}

template <int A>
void backward(const float* x, const float* y, const float* dy, const float* gamma, const double* mean,
              const double* inv, float* dx, float* dgamma, float* dbeta, int64_t n, int64_t c, int64_t hw,
              bool training, int team) {
    const double m = double(n * hw);
    dnnpar::parallel(team, [&](int tid, int nt) {
        const dnnpar::Range r = dnnpar::split(c, tid, nt);
        for (int64_t ch = r.lo; ch < r.hi; ++ch) {
            const double mu = mean[ch];
            double sg = 0.0, sgx = 0.0;
            for (int64_t b = 0; b < n; ++b) {
                const int64_t off = (b * c + ch) * hw;
                const float* __restrict xp = x + off;
                const float* __restrict dp = dy + off;
                const float* __restrict yp = A != kNone ? y + off : nullptr;
                // the masked gradient through a small float buffer: GCC does not vectorise a
                // select inside a double reduction (scalar code, 10x slower than without the
                // activation), but does each loop alone. Chunked alike with and without an
                // activation: a fused ReLU gives the bits of a separate one.
                float gbuf[kMaskChunk];
                for (int64_t i0 = 0; i0 < hw; i0 += kMaskChunk) {
                    const int64_t len = std::min<int64_t>(kMaskChunk, hw - i0);
                    const float* g = dp + i0;
                    if (A != kNone) {
#pragma omp simd
                        for (int64_t i = 0; i < len; ++i) gbuf[i] = passes<A>(yp[i0 + i]) ? dp[i0 + i] : 0.f;
                        g = gbuf;
                    }
                    reduce_g(g, xp + i0, len, mu, sg, sgx);
                }
            }
            const double dg = sgx * inv[ch];
            dbeta[ch] = float(sg);
            dgamma[ch] = float(dg);
            if (!dx) continue;
            const double k1 = double(gamma[ch]) * inv[ch];
            const double k2 = training ? -k1 * inv[ch] * dg / m : 0.0;
            const double k3 = training ? -k1 * sg / m : 0.0;
            const float f1 = float(k1), f2 = float(k2), f3 = float(k3), fm = float(mu);
            for (int64_t b = 0; b < n; ++b) {
                const int64_t off = (b * c + ch) * hw;
                const float* __restrict xp = x + off;
                const float* __restrict dp = dy + off;
                const float* __restrict yp = A != kNone ? y + off : nullptr;
                float* __restrict out = dx + off;
                if (training) {
#pragma omp simd
                    for (int64_t i = 0; i < hw; ++i) {
                        const float g = (A == kNone || passes<A>(yp[i])) ? dp[i] : 0.f;
                        out[i] = std::fma(f1, g, std::fma(f2, xp[i] - fm, f3));
                    }
                } else {  // x is not read: a NaN input masked off by the activation gets 0
#pragma omp simd
                    for (int64_t i = 0; i < hw; ++i) out[i] = f1 * ((A == kNone || passes<A>(yp[i])) ? dp[i] : 0.f);
                }
            }
        }
    });
}

int team_for(int threads, int64_t work, int64_t c) {
    return int(std::min<int64_t>(dnnpar::team_size(threads, work), c));
}

}  // namespace

DNNPAR_CPU_COMMON_EXPORTS(2)

extern "C" {

// y (N, C, H*W) = act(batchnorm(x)); geo: N, C, H*W. training != 0: mean, var (C, float64) are
// written (batch statistics); else read (running averages). inv (C, float64) is written.
// act: 0 none, 1 ReLU, 2 ReLU6.
void dnnpar_bn_forward(const float* x, const float* gamma, const float* beta, double* mean, double* var,
                       double* inv, float* y, const int64_t* geo, double eps, int training, int act, int threads) {
    const int64_t n = geo[0], c = geo[1], hw = geo[2];
    const int team = team_for(threads, n * c * hw * (training ? 3 : 1), c);
    if (act == kRelu) return forward<kRelu>(x, gamma, beta, mean, var, inv, y, n, c, hw, eps, training, team);
    if (act == kRelu6) return forward<kRelu6>(x, gamma, beta, mean, var, inv, y, n, c, hw, eps, training, team);
    forward<kNone>(x, gamma, beta, mean, var, inv, y, n, c, hw, eps, training, team);
}

// dgamma, dbeta (C) and, unless dx is null, dx (N, C, H*W) for dy; y (the activated output) is
// read only when act != 0. training != 0: dx includes the batch statistics' gradient.
void dnnpar_bn_backward(const float* x, const float* y, const float* dy, const float* gamma, const double* mean,
                        const double* inv, float* dx, float* dgamma, float* dbeta, const int64_t* geo, int training,
                        int act, int threads) {
    const int64_t n = geo[0], c = geo[1], hw = geo[2];
    const int team = team_for(threads, n * c * hw * 2, c);
    if (act == kRelu) return backward<kRelu>(x, y, dy, gamma, mean, inv, dx, dgamma, dbeta, n, c, hw, training, team);
    if (act == kRelu6) return backward<kRelu6>(x, y, dy, gamma, mean, inv, dx, dgamma, dbeta, n, c, hw, training, team);
    backward<kNone>(x, y, dy, gamma, mean, inv, dx, dgamma, dbeta, n, c, hw, training, team);
}

}  // extern "C"
