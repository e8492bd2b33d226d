// Depthwise convolution for the numpy backend: float32, NCHW, one KH x KW filter per channel.
//
//   y[n, c, oh, ow] = b[c] + sum_{i, j} w[c, i, j] * x[n, c, oh*SH - PH + i, ow*SW - PW + j]
//
// (taps outside the image read zero). Backward gives dx (the adjoint of the above in x) and
// dw[c, i, j] = sum over n, oh, ow of dy * x at the tap; db (a plain sum of dy) stays in NumPy.
//
// Thread mapping: the forward gives each OpenMP thread whole (n, c) planes; the backward gives
// each thread whole channels and walks the batch inside, so every dw[c] is summed by one thread
// in one fixed order (the result does not depend on the thread count) and no atomics are needed.
//
// Two bodies per direction:
//   *_fast<K, S>: square K x K filters (K = 3, 5), square strides S = 1, 2, padding below K. The
//       plane of x is first copied into a zero-bordered, phase-split buffer: padded column
//       q*S + r is stored at phase r, position q, so tap j of output column ow reads phase
//       j % S at q = ow + j / S -- contiguous in ow for every stride. Rows of the image outside
//       it point at one zero row. Every output element is then one pass of K*K FMAs over
//       contiguous loads that the compiler vectorises over ow. dx is the same gather in the
//       other direction: padded input column q*S + r sums w[i, m*S + r] * dy[oh, q - m], read
//       from a zero-bordered copy of dy's plane, one phase at a time.
//   *_generic: any filter, stride and padding (padding up to 2^30: nothing padded is ever
//       allocated). One pass per tap over the output columns whose tap lands in the image
//       (exact ranges, contiguous for stride 1).
// Zero padding is read as zeros, as an im2col convolution does: a non-finite weight or dy times
// padding gives NaN in the fast bodies where the window-based NumPy reference skips the term.
//
// Nothing here checks its input: dnnpar/ops/depthwise.py validates the geometry (int32-safe,
// positive output) and passes C-contiguous float32 arrays of the right sizes.
//
// Plain C++17; built at run time with $CXX -O3 -march=native -fopenmp (dnnpar/backend/cpu_native.py).
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// Below this many multiply-adds a call runs on one thread: waking the team costs more.
constexpr int64_t kParallelMinWork = 1 << 16;
// The fast bodies' phase-split plane buffer, per thread, in floats; a larger plane (or a padding
// that would make it so) takes the generic body, which needs no buffer.
constexpr int64_t kMaxPlaneBuffer = int64_t(1) << 22;

struct Geo {
    int64_t n, c, h, w, kh, kw, oh, ow, sh, sw, ph, pw;
};

Geo read_geo(const int64_t* g) {
    return Geo{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11]};
}

int team_size(int threads, int64_t work) {
#ifdef _OPENMP
    if (work < kParallelMinWork) return 1;
    return threads > 0 ? threads : omp_get_max_threads();
#else
    (void)threads;
    (void)work;
    return 1;
#endif
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

// The phase-split, zero-bordered copy of one plane of x (see the header): for S phases and Q
// positions per phase, row ih at buf + ih*S*Q, padded column q*S + r at [r*Q + q]; then one
// zero row. Q covers every column an output reads: ow + (K-1)/S for ow < OW.
template <int K, int S>
struct PhasedPlane {
    int64_t q, row;
    std::vector<float> buf;

    explicit PhasedPlane(const Geo& g) : q(g.ow + (K - 1) / S), row(S * q), buf((g.h + 1) * row, 0.f) {}

    static bool fits(const Geo& g) { return (g.h + 1) * S * (g.ow + (K - 1) / S) <= kMaxPlaneBuffer; }

    void fill(const float* __restrict x, const Geo& g) {
        for (int64_t ih = 0; ih < g.h; ++ih) {
            const float* __restrict xr = x + ih * g.w;
            float* __restrict dst = buf.data() + ih * row;
            for (int r = 0; r < S; ++r) {
                float* __restrict d = dst + r * q;
                for (int64_t p = 0; p < q; ++p) {
                    const int64_t col = p * S + r - g.pw;
                    d[p] = (col >= 0 && col < g.w) ? xr[col] : 0.f;
                }
            }
        }
    }

    const float* row_at(int64_t ih, const Geo& g) const {
        return buf.data() + ((ih >= 0 && ih < g.h) ? ih : g.h) * row;
    }
};

template <int K, int S>
void forward_plane_fast(const float* __restrict x, const float* __restrict wt, float bias, float* __restrict y,
                        const Geo& g, PhasedPlane<K, S>& ph) {
    ph.fill(x, g);
    float wk[K * K];
    for (int t = 0; t < K * K; ++t) wk[t] = wt[t];
    const int64_t q = ph.q;
    for (int64_t oh = 0; oh < g.oh; ++oh) {
        const float* rows[K];
        for (int i = 0; i < K; ++i) rows[i] = ph.row_at(oh * S - g.ph + i, g);
        float* __restrict yr = y + oh * g.ow;
#pragma omp simd
        for (int64_t ow = 0; ow < g.ow; ++ow) {
            float a = bias;
#pragma GCC unroll 8
            for (int i = 0; i < K; ++i) {
#pragma GCC unroll 8
                for (int j = 0; j < K; ++j) a += wk[i * K + j] * rows[i][(j % S) * q + j / S + ow];
            }
            yr[ow] = a;
        }
    }
}

// The zero-bordered copy of one plane of dy for the dx gather: row oh at buf + oh*width, dy's
// column u at [L + u] with L = ceil(K/S) - 1 zeros in front; then one zero row.
template <int K, int S>
struct PaddedDy {
    static constexpr int M = (K + S - 1) / S;  // taps per phase at most
    static constexpr int L = M - 1;
    int64_t width;
    std::vector<float> buf;

    explicit PaddedDy(const Geo& g)
        : width(L + std::max(g.ow, (g.w - 1 + g.pw) / S + 1) + 1), buf((g.oh + 1) * width, 0.f) {}

    void fill(const float* __restrict dy, const Geo& g) {
        for (int64_t oh = 0; oh < g.oh; ++oh) std::memcpy(buf.data() + oh * width + L, dy + oh * g.ow, g.ow * 4);
    }

    const float* row_at(int64_t oh, const Geo& g) const {
        return buf.data() + ((oh >= 0 && oh < g.oh) ? oh : g.oh) * width;
    }
};

// dx at the padded columns q*S + R of input row ih: taps j = m*S + R (m < ceil((K-R)/S)) of the
// filter rows i listed in wrow (zero filter rows for taps that do not exist), over dy rows dyr.
template <int K, int S, int R>
inline void dx_phase(float* __restrict dxr, const float* const* dyr, const float* const* wrow, const Geo& g) {
    constexpr int T = (K + S - 1) / S;       // filter rows landing on one input row at most
    constexpr int MR = (K - R + S - 1) / S;  // taps of this phase
    constexpr int L = (K + S - 1) / S - 1;
    // padded column c = iw + PW = q*S + R: the q whose iw lies in [0, W)
    const int64_t qlo = (g.pw - R + S - 1) / S > 0 ? (g.pw - R + S - 1) / S : 0;
    const int64_t qhi = (g.w - 1 + g.pw - R) / S + 1;
#pragma omp simd
    for (int64_t qq = qlo; qq < qhi; ++qq) {
        float a = 0.f;
#pragma GCC unroll 8
        for (int t = 0; t < T; ++t) {
#pragma GCC unroll 8
            for (int m = 0; m < MR; ++m) a += wrow[t][m * S + R] * dyr[t][L + qq - m];
        }
        dxr[qq * S + R - g.pw] = a;
    }
}

template <int K, int S>
void backward_plane_fast(const float* __restrict x, const float* __restrict wt, const float* __restrict dy,
                         float* __restrict dx, double* __restrict acc, const Geo& g, PhasedPlane<K, S>& ph,
                         PaddedDy<K, S>& pd) {
    ph.fill(x, g);
    const int64_t q = ph.q;
    // dw: one dot product per tap and output row, over contiguous phase rows
    for (int64_t oh = 0; oh < g.oh; ++oh) {
        const float* __restrict dyr = dy + oh * g.ow;
        for (int i = 0; i < K; ++i) {
            const int64_t ih = oh * S - g.ph + i;
            if (ih < 0 || ih >= g.h) continue;
            const float* xr = ph.row_at(ih, g);
#pragma GCC unroll 8
            for (int j = 0; j < K; ++j) {
                const float* __restrict xs = xr + (j % S) * q + j / S;
                float s = 0.f;
#pragma omp simd reduction(+ : s)
                for (int64_t ow = 0; ow < g.ow; ++ow) s += dyr[ow] * xs[ow];
                acc[i * K + j] += s;
            }
        }
    }
    if (!dx) return;
    pd.fill(dy, g);
    constexpr int T = (K + S - 1) / S;
    static const float zeros[K * S] = {};
    for (int64_t ih = 0; ih < g.h; ++ih) {
        // filter rows i = i0 + t*S reach input row ih from output row (ih + PH - i) / S
        const int64_t y = ih + g.ph;
        const int i0 = int(y % S);
        const float* dyr[T];
        const float* wrow[T];
        for (int t = 0; t < T; ++t) {
            const int i = i0 + t * S;
            if (i < K) {
                dyr[t] = pd.row_at((y - i) / S, g);
                wrow[t] = wt + i * K;
            } else {
                dyr[t] = pd.row_at(-1, g);
                wrow[t] = zeros;
            }
        }
        float* dxr = dx + ih * g.w;
        dx_phase<K, S, 0>(dxr, dyr, wrow, g);
        if constexpr (S > 1) dx_phase<K, S, 1>(dxr, dyr, wrow, g);
    }
}

// ---------------------------------------------------------------- drivers

template <int K, int S>
bool fast_ok(const Geo& g) {
    return g.kh == K && g.kw == K && g.sh == S && g.sw == S && g.ph < K && g.pw < K && PhasedPlane<K, S>::fits(g);
}

template <int K, int S>
void forward_fast(const float* x, const float* w, const float* b, float* y, const Geo& g, int team) {
    const int64_t planes = g.n * g.c;
#pragma omp parallel num_threads(team) if (team > 1)
    {
        PhasedPlane<K, S> ph(g);
#pragma omp for schedule(static)
        for (int64_t p = 0; p < planes; ++p) {
            const int64_t c = p % g.c;
            forward_plane_fast<K, S>(x + p * g.h * g.w, w + c * K * K, b ? b[c] : 0.f, y + p * g.oh * g.ow, g, ph);
        }
    }
}

void forward_generic(const float* x, const float* w, const float* b, float* y, const Geo& g, int team) {
    const int64_t planes = g.n * g.c;
#pragma omp parallel for num_threads(team) schedule(static) if (team > 1)
    for (int64_t p = 0; p < planes; ++p) {
        const int64_t c = p % g.c;
        forward_plane_generic(x + p * g.h * g.w, w + c * g.kh * g.kw, b ? b[c] : 0.f, y + p * g.oh * g.ow, g);
    }
}

template <int K, int S>
void backward_fast(const float* x, const float* w, const float* dy, float* dx, float* dw, const Geo& g, int team) {
#pragma omp parallel num_threads(team) if (team > 1)
    {
        PhasedPlane<K, S> ph(g);
        PaddedDy<K, S> pd(g);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < g.c; ++c) {
            double acc[K * K] = {};
            for (int64_t n = 0; n < g.n; ++n) {
                const int64_t p = n * g.c + c;
                backward_plane_fast<K, S>(x + p * g.h * g.w, w + c * K * K, dy + p * g.oh * g.ow,
                                          dx ? dx + p * g.h * g.w : nullptr, acc, g, ph, pd);
            }
            for (int t = 0; t < K * K; ++t) dw[c * K * K + t] = float(acc[t]);
        }
    }
}

void backward_generic(const float* x, const float* w, const float* dy, float* dx, float* dw, const Geo& g, int team) {
    const int64_t taps = g.kh * g.kw;
#pragma omp parallel num_threads(team) if (team > 1)
    {
        std::vector<double> acc(taps);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < g.c; ++c) {
            std::fill(acc.begin(), acc.end(), 0.0);
            for (int64_t n = 0; n < g.n; ++n) {
                const int64_t p = n * g.c + c;
                backward_plane_generic(x + p * g.h * g.w, w + c * taps, dy + p * g.oh * g.ow,
                                       dx ? dx + p * g.h * g.w : nullptr, acc.data(), g);
            }
            for (int64_t t = 0; t < taps; ++t) dw[c * taps + t] = float(acc[t]);
        }
    }
}

}  // namespace

extern "C" {

// Bumped whenever an exported signature changes (dnnpar/backend/cpu_native.py checks it).
int dnnpar_cpu_abi(void) { return 1; }

int dnnpar_cpu_threads(void) {
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 1;
#endif
}

// Which body a geometry takes: 1 = fast, 0 = generic (for tests and benchmarks).
int dnnpar_depthwise_fast(const int64_t* geo) {
    const Geo g = read_geo(geo);
    return fast_ok<3, 1>(g) || fast_ok<3, 2>(g) || fast_ok<5, 1>(g) || fast_ok<5, 2>(g);
}

// y (N, C, OH, OW) = depthwise(x (N, C, H, W), w (C, KH, KW)) + b (C, or null for none).
// geo: N, C, H, W, KH, KW, OH, OW, SH, SW, PH, PW. generic != 0 forces the generic body.
void dnnpar_depthwise_forward(const float* x, const float* w, const float* b, float* y, const int64_t* geo,
                              int generic, int threads) {
    const Geo g = read_geo(geo);
    const int team = team_size(threads, g.n * g.c * g.oh * g.ow * g.kh * g.kw);
    if (!generic && fast_ok<3, 1>(g)) return forward_fast<3, 1>(x, w, b, y, g, team);
    if (!generic && fast_ok<3, 2>(g)) return forward_fast<3, 2>(x, w, b, y, g, team);
    if (!generic && fast_ok<5, 1>(g)) return forward_fast<5, 1>(x, w, b, y, g, team);
    if (!generic && fast_ok<5, 2>(g)) return forward_fast<5, 2>(x, w, b, y, g, team);
    forward_generic(x, w, b, y, g, team);
}

// dw (C, KH, KW) and, unless dx is null, dx (N, C, H, W) for dy (N, C, OH, OW).
void dnnpar_depthwise_backward(const float* x, const float* w, const float* dy, float* dx, float* dw,
                               const int64_t* geo, int generic, int threads) {
    const Geo g = read_geo(geo);
    const int team = std::min<int64_t>(team_size(threads, g.n * g.c * g.oh * g.ow * g.kh * g.kw * 2), g.c);
    if (!generic && fast_ok<3, 1>(g)) return backward_fast<3, 1>(x, w, dy, dx, dw, g, team);
    if (!generic && fast_ok<3, 2>(g)) return backward_fast<3, 2>(x, w, dy, dx, dw, g, team);
    if (!generic && fast_ok<5, 1>(g)) return backward_fast<5, 1>(x, w, dy, dx, dw, g, team);
    if (!generic && fast_ok<5, 2>(g)) return backward_fast<5, 2>(x, w, dy, dx, dw, g, team);
    backward_generic(x, w, dy, dx, dw, g, team);
}

}  // extern "C"
