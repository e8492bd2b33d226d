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

#include "parallel.h"

namespace {

struct Geo {
    int64_t n, c, h, w, kh, kw, oh, ow, sh, sw, ph, pw;
};

Geo read_geo(const int64_t* g) {
    return Geo{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11]};
}

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

template <class F>
void planes(const Geo& g, int threads, int64_t per_plane, F&& body) {
    const int64_t p = g.n * g.c;
    const int team = int(std::min<int64_t>(dnnpar::team_size(threads, p * per_plane), p));
    dnnpar::parallel_for(team, p, body);
}

// The window of output (oh, ow): tap (i, j) reads x[ih0 + i, iw0 + j].
inline float tap(const float* x, const Geo& g, int64_t ih, int64_t iw, float pad) {
    return (ih < 0 || ih >= g.h || iw < 0 || iw >= g.w) ? pad : x[ih * g.w + iw];
}

inline float max_step(float m, float v) {  // np.maximum: NaN wins
    return (m != m) ? m : ((v != v || v > m) ? v : m);
}

void max_forward_plane(const float* x, float* y, const Geo& g) {
    for (int64_t oh = 0; oh < g.oh; ++oh) {
        const int64_t ih0 = oh * g.sh - g.ph;
        for (int64_t ow = 0; ow < g.ow; ++ow) {
            const int64_t iw0 = ow * g.sw - g.pw;
            float m = tap(x, g, ih0, iw0, kNegInf);
            for (int64_t i = 0; i < g.kh; ++i)
                for (int64_t j = (i == 0); j < g.kw; ++j) m = max_step(m, tap(x, g, ih0 + i, iw0 + j, kNegInf));
            y[oh * g.ow + ow] = m;
        }
    }
}

void max_backward_plane(const float* x, const float* y, const float* dy, float* dx, const Geo& g) {
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

inline float avg_scale(const Geo& g, bool include_pad, int64_t ih0, int64_t iw0) {
    if (include_pad || (g.ph == 0 && g.pw == 0)) return float(1.0 / double(g.kh * g.kw));
    const int64_t rows = std::min(ih0 + g.kh, g.h) - std::max<int64_t>(ih0, 0);
    const int64_t cols = std::min(iw0 + g.kw, g.w) - std::max<int64_t>(iw0, 0);
    return 1.f / float(rows * cols);  // >= 1 tap: the window overlaps the image
}

void avg_forward_plane(const float* x, float* y, const Geo& g, bool include_pad) {
    for (int64_t oh = 0; oh < g.oh; ++oh) {
        const int64_t ih0 = oh * g.sh - g.ph;
        const int64_t i_lo = std::max<int64_t>(0, -ih0), i_hi = std::min(g.kh, g.h - ih0);
        for (int64_t ow = 0; ow < g.ow; ++ow) {
            const int64_t iw0 = ow * g.sw - g.pw;
            const int64_t j_lo = std::max<int64_t>(0, -iw0), j_hi = std::min(g.kw, g.w - iw0);
            float s = 0.f;
            for (int64_t i = i_lo; i < i_hi; ++i) {
                const float* xr = x + (ih0 + i) * g.w + iw0;
                for (int64_t j = j_lo; j < j_hi; ++j) s += xr[j];
            }
            y[oh * g.ow + ow] = s * avg_scale(g, include_pad, ih0, iw0);
        }
    }
}

void avg_backward_plane(const float* dy, float* dx, const Geo& g, bool include_pad) {
    std::fill(dx, dx + g.h * g.w, 0.f);
    for (int64_t oh = 0; oh < g.oh; ++oh) {
        const int64_t ih0 = oh * g.sh - g.ph;
        const int64_t i_lo = std::max<int64_t>(0, -ih0), i_hi = std::min(g.kh, g.h - ih0);
        for (int64_t ow = 0; ow < g.ow; ++ow) {
            const int64_t iw0 = ow * g.sw - g.pw;
            const int64_t j_lo = std::max<int64_t>(0, -iw0), j_hi = std::min(g.kw, g.w - iw0);
            const float share = dy[oh * g.ow + ow] * avg_scale(g, include_pad, ih0, iw0);
            for (int64_t i = i_lo; i < i_hi; ++i) {
                float* dr = dx + (ih0 + i) * g.w + iw0;
                for (int64_t j = j_lo; j < j_hi; ++j) dr[j] += share;
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
    planes(g, threads, g.oh * g.ow * g.kh * g.kw, [&](int64_t p) {
        max_forward_plane(x + p * g.h * g.w, y + p * g.oh * g.ow, g);
    });
}

void dnnpar_maxpool_backward(const float* x, const float* y, const float* dy, float* dx, const int64_t* geo,
                             int threads) {
    const Geo g = read_geo(geo);
    planes(g, threads, g.oh * g.ow * g.kh * g.kw, [&](int64_t p) {
        max_backward_plane(x + p * g.h * g.w, y + p * g.oh * g.ow, dy + p * g.oh * g.ow, dx + p * g.h * g.w, g);
    });
}

void dnnpar_avgpool_forward(const float* x, float* y, const int64_t* geo, int include_pad, int threads) {
    const Geo g = read_geo(geo);
    planes(g, threads, g.oh * g.ow * g.kh * g.kw, [&](int64_t p) {
        avg_forward_plane(x + p * g.h * g.w, y + p * g.oh * g.ow, g, include_pad != 0);
    });
}

void dnnpar_avgpool_backward(const float* dy, float* dx, const int64_t* geo, int include_pad, int threads) {
    const Geo g = read_geo(geo);
    planes(g, threads, g.oh * g.ow * g.kh * g.kw, [&](int64_t p) {
        avg_backward_plane(dy + p * g.oh * g.ow, dx + p * g.h * g.w, g, include_pad != 0);
    });
}

}  // extern "C"
