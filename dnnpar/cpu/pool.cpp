// MaxPool2d and AvgPool2d for the numpy backend: float32 NCHW, the semantics of
// dnnpar/nn/layers.py's _Pool layers (floor output size, padding smaller than the window, so
// every window overlaps the image):
//   max: padding reads -inf; a NaN in a window gives NaN (as np.maximum). Backward: each window's
//        gradient goes to its first maximum (taps in row-major order, padding taps included, as
//        the NumPy code); every other in-image tap of the window gets dy * 0 (so a NaN dy spreads
//        over its window exactly as the NumPy code's dy * mask does). The argmax is recomputed
//        from x and y (one comparison per tap), not stored.
//   avg: the in-image taps summed in row-major order (padding reads 0), times 1 / (KH*KW)
//        (count_include_pad, or no padding) or 1 / (the taps inside the image), each rounded to
//        float32 as the NumPy code does; backward adds dy * that scale to every in-image tap.
// Threads (dnnpar/cpu/parallel.h's pool): whole (n, c) planes per thread; no sum crosses a
// plane, so the bits do not depend on the thread count.
// Nothing here checks its input: dnnpar/ops/pool.py validates the geometry and the arrays.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "parallel.h"

namespace {

struct Span {
    int64_t lo, hi;
};

struct Geo {
    int64_t n, c, h, w, kh, kw, oh, ow, sh, sw, ph, pw;
    std::vector<Span> cols;  // per tap column j: see inside()
};

// Output columns ow whose tap column ow * sw - pw + j lies inside the image: [lo, hi).
Span tap_columns(const Geo& g, int64_t j) {
    const int64_t a = g.pw - j, b = g.w - 1 + g.pw - j;
    const int64_t lo = a <= 0 ? 0 : (a + g.sw - 1) / g.sw;
    const int64_t hi = b < 0 ? 0 : std::min(g.ow, b / g.sw + 1);
    return Span{lo, std::max(lo, hi)};
}

// The tap columns' spans are computed once per call: two 64-bit divisions per tap and row cost
// more than a small plane's sums (a 3x3 / 1 average over 64 x 64 planes of 8 x 8 took 0.84 ms).
Geo read_geo(const int64_t* g) {
    Geo geo{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], {}};
    geo.cols.resize(size_t(geo.kw));
    for (int64_t j = 0; j < geo.kw; ++j) geo.cols[size_t(j)] = tap_columns(geo, j);
    return geo;
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <class F>
void planes(const Geo& g, int threads, int64_t per_plane, F&& body) {
    const int64_t p = g.n * g.c;
    const int team = int(std::min<int64_t>(dnnpar::team_size(threads, p * per_plane), p));
    dnnpar::parallel_for(team, p, body);
}

inline const Span& inside(const Geo& g, int64_t j) { return g.cols[size_t(j)]; }

inline float max_step(float m, float v) {  // np.maximum: NaN wins
    return (m != m) ? m : ((v != v || v > m) ? v : m);
}

// Every kernel below runs a whole output row at a time, tap by tap (row-major), over the output
// columns whose tap is inside the image: a stride-1 row is one contiguous vector loop per tap.
// Per output, the taps still meet in row-major order, so each result is what a window-at-a-time
// loop gives (padding taps add 0 or compare with -inf: neither changes a sum that starts at
// +0.0 or a maximum that starts at -inf).

// One output row (ih0: its windows' first input row): yr[ow] = step(... step(init, tap 0) ..., last
// tap) over each window's in-image taps, in row-major order.
template <class Step>
inline void reduce_row(const float* x, float* yr, const Geo& g, int64_t ih0, float init, Step step) {
    std::fill(yr, yr + g.ow, init);
    for (int64_t i = std::max<int64_t>(0, -ih0); i < std::min(g.kh, g.h - ih0); ++i) {
        const float* xr = x + (ih0 + i) * g.w;
        for (int64_t j = 0; j < g.kw; ++j) {
            const Span s = inside(g, j);
            const int64_t off = j - g.pw;  // tap column of output ow: ow * sw + off
            if (g.sw == 1) {
#pragma omp simd
                for (int64_t ow = s.lo; ow < s.hi; ++ow) yr[ow] = step(yr[ow], xr[ow + off]);
            } else {
                for (int64_t ow = s.lo; ow < s.hi; ++ow) yr[ow] = step(yr[ow], xr[ow * g.sw + off]);
            }
        }
    }
}

// Stride 1 with the output the input's size ("same" padding) and rows shorter than kFlatRow: a
// loop per tap and row is mostly loop overhead there (a 3x3 / 1 average over 64 x 64 planes of
// 8 x 8 took 0.92 ms). Each tap is then one loop over the whole plane, flat: output q reads
// x[q + (i - PH) W + (j - PW)], over the rows whose tap row is inside the image, and the q whose
// tap column is outside (col[q] = q % W outside the tap's span) keep their value. Every read
// stays inside the plane, and the taps meet each output in the same row-major order as
// reduce_row's: the same bits.
constexpr int64_t kFlatRow = 32;

bool flat_same(const Geo& g) { return g.sh == 1 && g.sw == 1 && g.oh == g.h && g.ow == g.w && g.w < kFlatRow; }

std::vector<int32_t> plane_columns(const Geo& g) {
    std::vector<int32_t> col(size_t(g.h * g.w));
    for (int64_t q = 0; q < g.h * g.w; ++q) col[size_t(q)] = int32_t(q % g.w);
    return col;
}

// The outputs q in [q0, q1) of tap (i, j) (rows whose tap row is inside; its span's columns
// bounding the ends) and the flat offset of the input they read; false when none is inside.
inline bool flat_tap(const Geo& g, int64_t i, int64_t j, int64_t& q0, int64_t& q1, int64_t& off) {
    const int64_t di = i - g.ph;
    const int64_t r0 = std::max<int64_t>(0, -di), r1 = std::min(g.h, g.h - di);
    const Span s = inside(g, j);
    if (r0 >= r1 || s.lo >= s.hi) return false;
    q0 = r0 * g.w + s.lo;
    q1 = (r1 - 1) * g.w + s.hi;
    off = di * g.w + (j - g.pw);
    return true;
}

template <class Step>
void reduce_plane_flat(const float* x, float* y, const Geo& g, const int32_t* col, float init, Step step) {
    std::fill(y, y + g.h * g.w, init);
    for (int64_t i = 0; i < g.kh; ++i) {
        for (int64_t j = 0; j < g.kw; ++j) {
            int64_t q0, q1, off;
            if (!flat_tap(g, i, j, q0, q1, off)) continue;
            const int32_t lo = int32_t(inside(g, j).lo), hi = int32_t(inside(g, j).hi);
#pragma omp simd
            for (int64_t q = q0; q < q1; ++q) y[q] = (col[q] >= lo && col[q] < hi) ? step(y[q], x[q + off]) : y[q];
        }
    }
}

void max_forward_plane(const float* x, float* y, const Geo& g, const int32_t* col) {
    if (col) {
        reduce_plane_flat(x, y, g, col, kNegInf, max_step);
        return;
    }
    for (int64_t oh = 0; oh < g.oh; ++oh) reduce_row(x, y + oh * g.ow, g, oh * g.sh - g.ph, kNegInf, max_step);
}

// The window of output (oh, ow): tap (i, j) reads x[ih0 + i, iw0 + j].
inline float tap(const float* x, const Geo& g, int64_t ih, int64_t iw, float pad) {
    return (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) ? pad : x[ih * g.w + iw];
}

// Strided windows (sw > 1): one window at a time, its taps in row-major order (a strided row loop
// does not vectorise, and LeNet's 2x2 / 2 pools ran 1.5x slower that way).
// Disjoint windows inside the image (no padding, window <= stride: LeNet's and VGG's 2x2 / 2):
// each input is in at most one window, so its gradient is stored, not added, and no tap needs
// a bounds check. KH, KW > 0: the window's size known at compile time (0: g's).
template <int KH, int KW>
void max_backward_disjoint(const float* x, const float* y, const float* dy, float* dx, const Geo& g) {
    const int64_t kh = KH ? KH : g.kh, kw = KW ? KW : g.kw;
    if (kh < g.sh || kw < g.sw || g.oh * g.sh < g.h || g.ow * g.sw < g.w) std::fill(dx, dx + g.h * g.w, 0.f);
    for (int64_t oh = 0; oh < g.oh; ++oh) {
        for (int64_t ow = 0; ow < g.ow; ++ow) {
            const int64_t at = oh * g.sh * g.w + ow * g.sw;
            const float m = y[oh * g.ow + ow], d = dy[oh * g.ow + ow];
            bool taken = false;
            for (int64_t i = 0; i < kh; ++i) {
                for (int64_t j = 0; j < kw; ++j) {
                    const bool hit = !taken && x[at + i * g.w + j] == m;
                    taken = taken || hit;
                    dx[at + i * g.w + j] = d * (hit ? 1.f : 0.f);
                }
            }
        }
    }
}

void max_backward_windows(const float* x, const float* y, const float* dy, float* dx, const Geo& g) {
    if (g.ph == 0 && g.pw == 0 && g.kh <= g.sh && g.kw <= g.sw) {
        if (g.kh == 2 && g.kw == 2)
            max_backward_disjoint<2, 2>(x, y, dy, dx, g);
        else
            max_backward_disjoint<0, 0>(x, y, dy, dx, g);
        return;
    }
    std::fill(dx, dx + g.h * g.w, 0.f);
    for (int64_t oh = 0; oh < g.oh; ++oh) {
        const int64_t ih0 = oh * g.sh - g.ph;
        for (int64_t ow = 0; ow < g.ow; ++ow) {
            const int64_t iw0 = ow * g.sw - g.pw;
            const float m = y[oh * g.ow + ow], d = dy[oh * g.ow + ow];
            bool taken = false;
            for (int64_t i = 0; i < g.kh; ++i) {
                const int64_t ih = ih0 + i;
                for (int64_t j = 0; j < g.kw; ++j) {
                    const int64_t iw = iw0 + j;
                    const bool hit = !taken && tap(x, g, ih, iw, kNegInf) == m;
                    taken = taken || hit;
                    if (ih >= 0 && ih < g.h && iw >= 0 && iw < g.w) dx[ih * g.w + iw] += d * (hit ? 1.f : 0.f);
                }
            }
        }
    }
}

// Each window's gradient goes to its first tap equal to the maximum, padding taps included
// (they read -inf, as in the NumPy code); every other in-image tap gets dy * 0. `taken` and the
// row's maxima / gradients are per output column of the row. Stride-1 rows only (sw > 1:
// max_backward_windows).
void max_backward_plane(const float* x, const float* y, const float* dy, float* dx, const Geo& g,
                        uint8_t* taken) {
    std::fill(dx, dx + g.h * g.w, 0.f);
    for (int64_t oh = 0; oh < g.oh; ++oh) {
        const float* m = y + oh * g.ow;
        const float* d = dy + oh * g.ow;
        std::fill(taken, taken + g.ow, uint8_t(0));
        const int64_t ih0 = oh * g.sh - g.ph;
        for (int64_t i = 0; i < g.kh; ++i) {
            const int64_t ih = ih0 + i;
            const bool row_in = ih >= 0 && ih < g.h;
            for (int64_t j = 0; j < g.kw; ++j) {
                const Span s = row_in ? inside(g, j) : Span{0, 0};
                // padding taps (-inf) before and after the in-image stretch
                for (int64_t ow = 0; ow < s.lo; ++ow) taken[ow] |= m[ow] == kNegInf;
                for (int64_t ow = s.hi; ow < g.ow; ++ow) taken[ow] |= m[ow] == kNegInf;
                if (s.lo >= s.hi) continue;
                const float* xr = x + ih * g.w;
                float* dr = dx + ih * g.w;
                const int64_t off = j - g.pw;
#pragma omp simd
                for (int64_t ow = s.lo; ow < s.hi; ++ow) {
                    const bool hit = !taken[ow] && xr[ow + off] == m[ow];
                    taken[ow] |= hit;
                    dr[ow + off] += d[ow] * (hit ? 1.f : 0.f);
                }
            }
        }
    }
}

// 1 / divisor of output (oh, ow): 1 / (KH*KW) with count_include_pad or no padding, else 1 / the
// window's taps inside the image (>= 1: every window overlaps the image), rounded to float32.
inline float avg_scale(const Geo& g, bool include_pad, int64_t ih0, int64_t iw0) {
    if (include_pad || (g.ph == 0 && g.pw == 0)) return float(1.0 / double(g.kh * g.kw));
    const int64_t rows = std::min(ih0 + g.kh, g.h) - std::max<int64_t>(ih0, 0);
    const int64_t cols = std::min(iw0 + g.kw, g.w) - std::max<int64_t>(iw0, 0);
    return 1.f / float(rows * cols);
}

// Every output's scale, (OH, OW): the same for every plane, so computed once per call.
std::vector<float> avg_scales(const Geo& g, bool include_pad) {
    std::vector<float> scale(size_t(g.oh * g.ow));
    for (int64_t oh = 0; oh < g.oh; ++oh)
        for (int64_t ow = 0; ow < g.ow; ++ow)
            scale[size_t(oh * g.ow + ow)] = avg_scale(g, include_pad, oh * g.sh - g.ph, ow * g.sw - g.pw);
    return scale;
}

void avg_forward_plane(const float* x, float* y, const Geo& g, const float* scale, const int32_t* col) {
    if (col) {
        reduce_plane_flat(x, y, g, col, 0.f, [](float a, float v) { return a + v; });
#pragma omp simd
        for (int64_t q = 0; q < g.h * g.w; ++q) y[q] *= scale[q];
        return;
    }
    for (int64_t oh = 0; oh < g.oh; ++oh) {
        float* yr = y + oh * g.ow;
        const float* sr = scale + oh * g.ow;
        reduce_row(x, yr, g, oh * g.sh - g.ph, 0.f, [](float a, float v) { return a + v; });
#pragma omp simd
        for (int64_t ow = 0; ow < g.ow; ++ow) yr[ow] *= sr[ow];
    }
}

// dx: every in-image tap of each window gets dy * the window's scale (`share`: one output row's;
// the whole plane's with `col`, the flat form, whose taps run in the order that gives each dx
// the row form's sums: outputs by row, i.e. taps by descending row, then by column).
void avg_backward_plane(const float* dy, float* dx, const Geo& g, const float* scale, float* share,
                        const int32_t* col) {
    std::fill(dx, dx + g.h * g.w, 0.f);
    if (col) {
#pragma omp simd
        for (int64_t q = 0; q < g.h * g.w; ++q) share[q] = dy[q] * scale[q];
        for (int64_t i = g.kh - 1; i >= 0; --i) {
            for (int64_t j = 0; j < g.kw; ++j) {
                int64_t q0, q1, off;
                if (!flat_tap(g, i, j, q0, q1, off)) continue;
                const int32_t lo = int32_t(inside(g, j).lo), hi = int32_t(inside(g, j).hi);
#pragma omp simd
                for (int64_t q = q0; q < q1; ++q)
                    dx[q + off] = (col[q] >= lo && col[q] < hi) ? dx[q + off] + share[q] : dx[q + off];
            }
        }
        return;
    }
    for (int64_t oh = 0; oh < g.oh; ++oh) {
        const int64_t ih0 = oh * g.sh - g.ph;
#pragma omp simd
        for (int64_t ow = 0; ow < g.ow; ++ow) share[ow] = dy[oh * g.ow + ow] * scale[oh * g.ow + ow];
        for (int64_t i = std::max<int64_t>(0, -ih0); i < std::min(g.kh, g.h - ih0); ++i) {
            float* dr = dx + (ih0 + i) * g.w;
            for (int64_t j = 0; j < g.kw; ++j) {
                const Span s = inside(g, j);
                const int64_t off = j - g.pw;
                if (g.sw == 1) {
#pragma omp simd
                    for (int64_t ow = s.lo; ow < s.hi; ++ow) dr[ow + off] += share[ow];
                } else {
                    for (int64_t ow = s.lo; ow < s.hi; ++ow) dr[ow * g.sw + off] += share[ow];
                }
            }
        }
    }
}

}  // namespace

DNNPAR_CPU_COMMON_EXPORTS(2)

extern "C" {

// geo: N, C, H, W, KH, KW, OH, OW, SH, SW, PH, PW; y, dy (N, C, OH, OW); x, dx (N, C, H, W).
void dnnpar_maxpool_forward(const float* x, float* y, const int64_t* geo, int threads) {
    const Geo g = read_geo(geo);
    const std::vector<int32_t> col = flat_same(g) ? plane_columns(g) : std::vector<int32_t>();
    planes(g, threads, g.oh * g.ow * g.kh * g.kw, [&](int64_t p) {
        max_forward_plane(x + p * g.h * g.w, y + p * g.oh * g.ow, g, col.empty() ? nullptr : col.data());
    });
}

void dnnpar_maxpool_backward(const float* x, const float* y, const float* dy, float* dx, const int64_t* geo,
                             int threads) {
    const Geo g = read_geo(geo);
    planes(g, threads, g.oh * g.ow * g.kh * g.kw, [&](int64_t p) {
        if (g.sw != 1) {
            max_backward_windows(x + p * g.h * g.w, y + p * g.oh * g.ow, dy + p * g.oh * g.ow, dx + p * g.h * g.w, g);
            return;
        }
        std::vector<uint8_t> taken(size_t(g.ow));
        max_backward_plane(x + p * g.h * g.w, y + p * g.oh * g.ow, dy + p * g.oh * g.ow, dx + p * g.h * g.w, g,
                           taken.data());
    });
}

void dnnpar_avgpool_forward(const float* x, float* y, const int64_t* geo, int include_pad, int threads) {
    const Geo g = read_geo(geo);
    const std::vector<float> scale = avg_scales(g, include_pad != 0);
    const std::vector<int32_t> col = flat_same(g) ? plane_columns(g) : std::vector<int32_t>();
    planes(g, threads, g.oh * g.ow * g.kh * g.kw, [&](int64_t p) {
        avg_forward_plane(x + p * g.h * g.w, y + p * g.oh * g.ow, g, scale.data(), col.empty() ? nullptr : col.data());
    });
}

void dnnpar_avgpool_backward(const float* dy, float* dx, const int64_t* geo, int include_pad, int threads) {
    const Geo g = read_geo(geo);
    const std::vector<float> scale = avg_scales(g, include_pad != 0);
    const std::vector<int32_t> col = flat_same(g) ? plane_columns(g) : std::vector<int32_t>();
    planes(g, threads, g.oh * g.ow * g.kh * g.kw, [&](int64_t p) {
        std::vector<float> share(size_t(col.empty() ? g.ow : g.h * g.w));
        avg_backward_plane(dy + p * g.oh * g.ow, dx + p * g.h * g.w, g, scale.data(), share.data(),
                           col.empty() ? nullptr : col.data());
    });
}

}  // extern "C"
