// Depthwise convolution for the numpy backend: float32, NCHW, one KH x KW filter per channel.
//
//   y[n, c, oh, ow] = b[c] + sum_{i, j} w[c, i, j] * x[n, c, oh*SH - PH + i, ow*SW - PW + j]
//
// (taps outside the image read zero). Backward gives dx (the adjoint of the above in x) and
// dw[c, i, j] = sum over n, oh, ow of dy * x at the tap; db (a plain sum of dy) stays in NumPy.
//
// Thread mapping (dnnpar/cpu/parallel.h's pool): the forward gives each thread whole (n, c) planes; the backward gives
// each thread whole channels and walks the batch inside, so every dw[c] is summed by one thread
// in one fixed order (the result does not depend on the thread count) and no atomics are needed.
//
// Two bodies per direction:
//   *_fast<K, S>: square K x K filters (K = 3, 5), square strides S = 1, 2, padding below K.
//       Each plane of x is copied into S x S zero-bordered phase planes (see FlatPlanes), in
//       which every tap of every output is one array read at a constant offset from the
//       output's flat index: the forward is one contiguous loop of K*K FMAs per output over the
//       whole plane, dw one pass of K*K vector dot products over it, and dx the same gather as
//       the forward, read from a zero-bordered copy of dy, one phase at a time. Long loops
//       whatever the plane's width: MobileNet's 7x7 and 3x3 planes vectorise as well as 112x112.
//   *_generic: any filter, stride and padding (padding up to 2^30: nothing padded is ever
//       allocated). One pass per tap over the output columns whose tap lands in the image
//       (exact ranges, contiguous for stride 1).
// Zero padding is read as zeros, as an im2col convolution does: in the fast bodies a non-finite
// weight, dy or x times a padding zero gives NaN where the window-based NumPy reference skips
// the term.
//
// Nothing here checks its input: dnnpar/ops/depthwise.py validates the geometry (int32-safe,
// positive output) and passes C-contiguous float32 arrays of the right sizes.
//
// Plain C++17; built at run time with $CXX -O3 -march=native -fopenmp-simd -pthread (dnnpar/backend/cpu_native.py).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "activation.h"
#include "parallel.h"

namespace {

// The fast bodies' phase-split plane buffer, per thread, in floats; a larger plane (or a padding
// that would make it so) takes the generic body, which needs no buffer.
constexpr int64_t kMaxPlaneBuffer = int64_t(1) << 22;

struct Geo {
    int64_t n, c, h, w, kh, kw, oh, ow, sh, sw, ph, pw;
};

Geo read_geo(const int64_t* g) {
    return Geo{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11]};
}


// Output columns [lo, hi) whose tap at column offset t (= j - PW) reads inside [0, W):
// 0 <= ow*s + t < W.
inline void tap_columns(int64_t t, int64_t s, int64_t w, int64_t ow, int64_t& lo, int64_t& hi) {
    lo = t >= 0 ? 0 : (-t + s - 1) / s;
    hi = t >= w ? 0 : std::min(ow, (w - 1 - t) / s + 1);
    if (hi < lo) hi = lo;
}

// ---------------------------------------------------------------- generic bodies (any geometry)

void forward_plane_generic(const float* __restrict x, const float* __restrict wt, float bias,
                           float* __restrict y, const Geo& g) {
    for (int64_t oh = 0; oh < g.oh; ++oh) {
        float* __restrict yr = y + oh * g.ow;
        std::fill(yr, yr + g.ow, bias);
        for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t ih = oh * g.sh - g.ph + i;
            if (ih < 0 || ih >= g.h) continue;
            const float* __restrict xr = x + ih * g.w;
            for (int64_t j = 0; j < g.kw; ++j) {
                const int64_t t = j - g.pw;
                int64_t lo, hi;
                tap_columns(t, g.sw, g.w, g.ow, lo, hi);
                const float wv = wt[i * g.kw + j];
                if (g.sw == 1) {
                    for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += wv * xr[ow + t];
                } else {
                    for (int64_t ow = lo; ow < hi; ++ow) yr[ow] += wv * xr[ow * g.sw + t];
                }
            }
        }
    }
}

// One (n, c) plane's dx (when dx is not null) and its share of dw, added into acc[KH*KW].
void backward_plane_generic(const float* __restrict x, const float* __restrict wt, const float* __restrict dy,
                            float* __restrict dx, double* __restrict acc, const Geo& g) {
    if (dx) std::fill(dx, dx + g.h * g.w, 0.f);
    for (int64_t oh = 0; oh < g.oh; ++oh) {
        const float* __restrict dyr = dy + oh * g.ow;
        for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t ih = oh * g.sh - g.ph + i;
            if (ih < 0 || ih >= g.h) continue;
            const float* __restrict xr = x + ih * g.w;
            float* __restrict dxr = dx ? dx + ih * g.w : nullptr;
            for (int64_t j = 0; j < g.kw; ++j) {
                const int64_t t = j - g.pw;
                int64_t lo, hi;
                tap_columns(t, g.sw, g.w, g.ow, lo, hi);
                const float wv = wt[i * g.kw + j];
                float s = 0.f;
                if (g.sw == 1) {
#pragma omp simd reduction(+ : s)
                    for (int64_t ow = lo; ow < hi; ++ow) s += dyr[ow] * xr[ow + t];
                    if (dxr)
                        for (int64_t ow = lo; ow < hi; ++ow) dxr[ow + t] += wv * dyr[ow];
                } else {
                    for (int64_t ow = lo; ow < hi; ++ow) s += dyr[ow] * xr[ow * g.sw + t];
                    if (dxr)
                        for (int64_t ow = lo; ow < hi; ++ow) dxr[ow * g.sw + t] += wv * dyr[ow];
                }
                acc[i * g.kw + j] += s;
            }
        }
    }
}

// ---------------------------------------------------------------- fast bodies (K x K, stride S)

// Eight floats in one vector register (GCC / Clang vector extension); loads go through memcpy,
// so no alignment is assumed.
typedef float f8 __attribute__((vector_size(32)));

inline f8 load8(const float* p) {
    f8 v;
    std::memcpy(&v, p, sizeof v);
    return v;
}

inline float hsum(f8 s) { return ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7])); }

// One thread's buffers for planes of one geometry, all zero-bordered (see the header):
//   xb: x split into S x S phase planes of P x Q: padded row p*S + A, column q*S + R at
//       xb[(A*S + R)*PQ + p*Q + q]. Output (oh, ow) tap (i, j) reads phase (i % S, j % S) at
//       (oh + i/S)*Q + ow + j/S, so with the flat index u = oh*Q + ow every tap is the same
//       array at a constant offset: one contiguous loop over u covers the whole plane (the
//       Q - OW columns past the output's are computed and dropped).
//   d:  dy at flat index F + oh*Q + ow, zeros around it (F = E*Q + E in front, the columns
//       past OW, PQ - OH*Q behind): dx's phase (A, R) at flat u is the sum of w[i, j] * d[F + u
//       - (i/S)*Q - j/S] over the taps with i % S == A, j % S == R, a row that runs off the
//       left reads the zero columns of the row above.
//   dxb: dx's S x S phase planes, as xb; out: the forward's flat output (OH x Q).
template <int K, int S>
struct FlatPlanes {
    static constexpr int E = (K - 1) / S;  // rows (columns) a phase reads past the output's
    static constexpr int kSlack = 8;       // zeros past the end: dw's loop reads whole vectors
    int64_t P, Q, PQ, F;
    std::vector<float> xb, d, dxb, out;

    FlatPlanes(const Geo& g, bool backward)
        : P(g.oh + E + 1), Q(g.ow + E + 1), PQ(P * Q), F(E * Q + E), xb(S * S * PQ + kSlack, 0.f),
          d(backward ? F + PQ + kSlack : 0, 0.f), dxb(backward ? S * S * PQ : 0), out(backward ? 0 : g.oh * Q) {}

    static bool fits(const Geo& g) { return S * S * (g.oh + E + 1) * (g.ow + E + 1) <= kMaxPlaneBuffer; }

    // Only the parts inside the image are written: the borders stay as the constructor zeroed them.
    void fill_x(const float* __restrict x, const Geo& g) {
        for (int a = 0; a < S; ++a) {
            for (int r = 0; r < S; ++r) {
                float* __restrict plane = xb.data() + (a * S + r) * PQ;
                // positions p (q) whose padded row p*S + a - PH (column q*S + r - PW) is inside
                const int64_t plo = std::max<int64_t>(0, (g.ph - a + S - 1) / S);
                const int64_t phi = std::min<int64_t>(P, (g.h - 1 + g.ph - a) / S + 1);
                const int64_t qlo = std::max<int64_t>(0, (g.pw - r + S - 1) / S);
                const int64_t qhi = std::min<int64_t>(Q, (g.w - 1 + g.pw - r) / S + 1);
                for (int64_t p = plo; p < phi; ++p) {
                    const float* __restrict xr = x + (p * S + a - g.ph) * g.w + r - g.pw;
                    float* __restrict dst = plane + p * Q;
                    if (S == 1) {
                        std::memcpy(dst + qlo, xr + qlo, (qhi - qlo) * sizeof(float));
                    } else {
                        for (int64_t q = qlo; q < qhi; ++q) dst[q] = xr[q * S];
                    }
                }
            }
        }
    }

    const float* tap(int i, int j) const { return xb.data() + ((i % S) * S + (j % S)) * PQ + (i / S) * Q + j / S; }
};

// a + sum_t w[t] * src[t][u] as straight-line code (a fold, not a loop), so that the loop over
// u around it is the one the compiler vectorises.
template <std::size_t... T>
inline float tap_sum(float a, const float* w, const float* const* src, int64_t u, std::index_sequence<T...>) {
    ((a += w[T] * src[T][u]), ...);
    return a;
}

template <int K, int S>
void forward_plane_fast(const float* __restrict x, const float* __restrict wt, float bias, float* __restrict y,
                        const Geo& g, FlatPlanes<K, S>& fp) {
    fp.fill_x(x, g);
    float wk[K * K];
    const float* src[K * K];
    for (int i = 0; i < K; ++i)
        for (int j = 0; j < K; ++j) {
            wk[i * K + j] = wt[i * K + j];
            src[i * K + j] = fp.tap(i, j);
        }
    float* __restrict o = fp.out.data();
    const int64_t n = g.oh * fp.Q;
#pragma omp simd
    for (int64_t u = 0; u < n; ++u) o[u] = tap_sum(bias, wk, src, u, std::make_index_sequence<K * K>{});
    for (int64_t oh = 0; oh < g.oh; ++oh) std::memcpy(y + oh * g.ow, o + oh * fp.Q, g.ow * sizeof(float));
}

// dx's phase (A, R): the taps i = A + m*S, j = R + l*S, as offsets into the flat dy copy.
template <int K, int S, int A, int R>
inline void dx_phase(const float* __restrict wt, FlatPlanes<K, S>& fp) {
    constexpr int MI = (K - A + S - 1) / S, MJ = (K - R + S - 1) / S;
    float wk[MI * MJ];
    const float* src[MI * MJ];
    for (int m = 0; m < MI; ++m)
        for (int l = 0; l < MJ; ++l) {
            wk[m * MJ + l] = wt[(A + m * S) * K + R + l * S];
            src[m * MJ + l] = fp.d.data() + fp.F - m * fp.Q - l;
        }
    float* __restrict o = fp.dxb.data() + (A * S + R) * fp.PQ;
    const int64_t n = fp.PQ;
#pragma omp simd
    for (int64_t u = 0; u < n; ++u) o[u] = tap_sum(0.f, wk, src, u, std::make_index_sequence<MI * MJ>{});
}

template <int K, int S>
void backward_plane_fast(const float* __restrict x, const float* __restrict wt, const float* __restrict dy,
                         float* __restrict dx, double* __restrict acc, const Geo& g, FlatPlanes<K, S>& fp) {
    fp.fill_x(x, g);
    float* __restrict d = fp.d.data() + fp.F;
    for (int64_t oh = 0; oh < g.oh; ++oh) std::memcpy(d + oh * fp.Q, dy + oh * g.ow, g.ow * sizeof(float));
    // dw: every tap's dot product with the flat dy in one pass, eight lanes at a time, one
    // vector accumulator per tap. The flat length is rounded up to whole vectors: d is zero
    // there, and both buffers have the slack to be read that far.
    const int64_t n8 = (g.oh * fp.Q + 7) / 8 * 8;
    const float* src[K * K];
    for (int t = 0; t < K * K; ++t) src[t] = fp.tap(t / K, t % K);
    f8 s[K * K] = {};
    for (int64_t u = 0; u < n8; u += 8) {
        const f8 dv = load8(d + u);
#pragma GCC unroll 25
        for (int t = 0; t < K * K; ++t) s[t] += dv * load8(src[t] + u);
    }
    for (int t = 0; t < K * K; ++t) acc[t] += hsum(s[t]);
    if (!dx) return;
    dx_phase<K, S, 0, 0>(wt, fp);
    if constexpr (S == 2) {
        dx_phase<K, S, 0, 1>(wt, fp);
        dx_phase<K, S, 1, 0>(wt, fp);
        dx_phase<K, S, 1, 1>(wt, fp);
    }
    static_assert(S == 1 || S == 2, "dx phases are listed for strides 1 and 2");
    // back from phases: dx[ih, iw] is dx's padded (ih + PH, iw + PW); every such position lies
    // inside the phase planes (P, Q exceed the last row and column any output reaches)
    for (int64_t ih = 0; ih < g.h; ++ih) {
        const int64_t py = ih + g.ph;
        const float* __restrict row = fp.dxb.data() + (py % S) * S * fp.PQ + (py / S) * fp.Q;
        float* __restrict dxr = dx + ih * g.w;
        if (S == 1) {
            std::memcpy(dxr, row + g.pw, g.w * sizeof(float));
        } else {
            for (int64_t iw = 0; iw < g.w; ++iw) {
                const int64_t px = iw + g.pw;
                dxr[iw] = row[(px % S) * fp.PQ + px / S];
            }
        }
    }
}

// ---------------------------------------------------------------- drivers

template <int K, int S>
bool fast_ok(const Geo& g) {
    return g.kh == K && g.kw == K && g.sh == S && g.sw == S && g.ph < K && g.pw < K && FlatPlanes<K, S>::fits(g);
}

// A plane's fused activation, while the plane is in this core's cache.
void activate_plane(float* y, int64_t n, int act) {
    if (act == dnnpar::kRelu) {
#pragma omp simd
        for (int64_t q = 0; q < n; ++q) y[q] = dnnpar::activate<dnnpar::kRelu>(y[q]);
    } else if (act == dnnpar::kRelu6) {
#pragma omp simd
        for (int64_t q = 0; q < n; ++q) y[q] = dnnpar::activate<dnnpar::kRelu6>(y[q]);
    }
}

template <int K, int S>
void forward_fast(const float* x, const float* w, const float* b, float* y, const Geo& g, int act, int team) {
    const int64_t planes = g.n * g.c;
    dnnpar::parallel(team, [&](int tid, int nt) {
        FlatPlanes<K, S> fp(g, false);
        const dnnpar::Range r = dnnpar::split(planes, tid, nt);
        for (int64_t p = r.lo; p < r.hi; ++p) {
            const int64_t c = p % g.c;
            forward_plane_fast<K, S>(x + p * g.h * g.w, w + c * K * K, b ? b[c] : 0.f, y + p * g.oh * g.ow, g, fp);
            activate_plane(y + p * g.oh * g.ow, g.oh * g.ow, act);
        }
    });
}

void forward_generic(const float* x, const float* w, const float* b, float* y, const Geo& g, int act, int team) {
    const int64_t planes = g.n * g.c;
    dnnpar::parallel_for(team, planes, [&](int64_t p) {
        const int64_t c = p % g.c;
        forward_plane_generic(x + p * g.h * g.w, w + c * g.kh * g.kw, b ? b[c] : 0.f, y + p * g.oh * g.ow, g);
        activate_plane(y + p * g.oh * g.ow, g.oh * g.ow, act);
    });
}

template <int K, int S>
void backward_fast(const float* x, const float* w, const float* dy, float* dx, float* dw, const Geo& g, int team) {
    dnnpar::parallel(team, [&](int tid, int nt) {
        FlatPlanes<K, S> fp(g, true);
        const dnnpar::Range r = dnnpar::split(g.c, tid, nt);
        for (int64_t c = r.lo; c < r.hi; ++c) {
            double acc[K * K] = {};
            for (int64_t n = 0; n < g.n; ++n) {
                const int64_t p = n * g.c + c;
                backward_plane_fast<K, S>(x + p * g.h * g.w, w + c * K * K, dy + p * g.oh * g.ow,
                                          dx ? dx + p * g.h * g.w : nullptr, acc, g, fp);
            }
            for (int t = 0; t < K * K; ++t) dw[c * K * K + t] = float(acc[t]);
        }
    });
}

void backward_generic(const float* x, const float* w, const float* dy, float* dx, float* dw, const Geo& g, int team) {
    const int64_t taps = g.kh * g.kw;
    dnnpar::parallel(team, [&](int tid, int nt) {
        std::vector<double> acc(taps);
        const dnnpar::Range r = dnnpar::split(g.c, tid, nt);
        for (int64_t c = r.lo; c < r.hi; ++c) {
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t n = 0; n < g.n; ++n) {
                const int64_t p = n * g.c + c;
                backward_plane_generic(x + p * g.h * g.w, w + c * taps, dy + p * g.oh * g.ow,
                                       dx ? dx + p * g.h * g.w : nullptr, acc.data(), g);
            }
            for (int64_t t = 0; t < taps; ++t) dw[c * taps + t] = float(acc[t]);
        }
    });
}

}  // namespace

DNNPAR_CPU_COMMON_EXPORTS(4)

extern "C" {


// Which body a geometry takes: 1 = fast, 0 = generic (for tests and benchmarks).
int dnnpar_depthwise_fast(const int64_t* geo) {
    const Geo g = read_geo(geo);
    return fast_ok<3, 1>(g) || fast_ok<3, 2>(g) || fast_ok<5, 1>(g) || fast_ok<5, 2>(g);
}

// y (N, C, OH, OW) = act(depthwise(x (N, C, H, W), w (C, KH, KW)) + b (C, or null for none)),
// act as activation.h (0: none). geo: N, C, H, W, KH, KW, OH, OW, SH, SW, PH, PW. generic != 0
// forces the generic body.
void dnnpar_depthwise_forward(const float* x, const float* w, const float* b, float* y, const int64_t* geo,
                              int act, int generic, int threads) {
    const Geo g = read_geo(geo);
    const int team = dnnpar::team_size(threads, g.n * g.c * g.oh * g.ow * g.kh * g.kw);
    if (!generic && fast_ok<3, 1>(g)) return forward_fast<3, 1>(x, w, b, y, g, act, team);
    if (!generic && fast_ok<3, 2>(g)) return forward_fast<3, 2>(x, w, b, y, g, act, team);
    if (!generic && fast_ok<5, 1>(g)) return forward_fast<5, 1>(x, w, b, y, g, act, team);
    if (!generic && fast_ok<5, 2>(g)) return forward_fast<5, 2>(x, w, b, y, g, act, team);
    forward_generic(x, w, b, y, g, act, team);
}

// dw (C, KH, KW) and, unless dx is null, dx (N, C, H, W) for dy (N, C, OH, OW).
void dnnpar_depthwise_backward(const float* x, const float* w, const float* dy, float* dx, float* dw,
                               const int64_t* geo, int generic, int threads) {
    const Geo g = read_geo(geo);
    const int team = std::min<int64_t>(dnnpar::team_size(threads, g.n * g.c * g.oh * g.ow * g.kh * g.kw * 2), g.c);
    if (!generic && fast_ok<3, 1>(g)) return backward_fast<3, 1>(x, w, dy, dx, dw, g, team);
    if (!generic && fast_ok<3, 2>(g)) return backward_fast<3, 2>(x, w, dy, dx, dw, g, team);
    if (!generic && fast_ok<5, 1>(g)) return backward_fast<5, 1>(x, w, dy, dx, dw, g, team);
    if (!generic && fast_ok<5, 2>(g)) return backward_fast<5, 2>(x, w, dy, dx, dw, g, team);
    backward_generic(x, w, dy, dx, dw, g, team);
}

}  // extern "C"
