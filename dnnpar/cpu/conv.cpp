// Convolution glue for the numpy backend's im2col + GEMM path: float32, x NCHW, w OIHW.
//
//   im2col:   cols[(c, i, j), (n, oh, ow)] = x[n, c, oh*SH - PH + i*DH, ow*SW - PW + j*DW]  (0 outside)
//   col2im:   its adjoint, dx[n, c, ih, iw] = sum of the cols entries that read (ih, iw)
//   epilogue: the GEMM's (O, N*P) output -> y (N, O, P) (P = OH*OW) with bias and an optional
//             ReLU / ReLU6, one pass (NumPy needs a bias pass, a transpose copy and an activation pass)
//   epilogue_backward: dy (N, O, P) -> (O, N*P) for the dW / dcols GEMMs, the activation's mask
//             (read from the activated output y) applied and db summed in the same pass
//
// Thread mapping (dnnpar/cpu/parallel.h's pool), each a static split:
//   im2col: items are rows (c, i, j) of cols, each written whole (every image in turn);
//   col2im: items (n, c), one item owns one dx plane and sums its taps in the fixed (i, j) order;
//   epilogue: items (n, o), one contiguous P-stretch in and out;
//   epilogue_backward: items o, one thread per output channel walks the batch in order, so db
//       (float partial sums per (n, o) stretch, added in double) is the same for any thread count.
// Activation semantics are ops/activation.py's: NaN passes forward, the mask is y > 0
// (ReLU) or 0 < y < 6 (ReLU6), and a masked gradient is 0 even where dy is NaN.
//
// Nothing here checks its input: dnnpar/ops/conv.py validates the geometry (int32-safe, positive
// output) and dnnpar/backend/cpu_native.py passes C-contiguous float32 arrays of the right sizes.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel.h"

namespace {

struct Geo {
    int64_t n, c, h, w, kh, kw, oh, ow, sh, sw, ph, pw, dh, dw;
};

Geo read_geo(const int64_t* g) {
    return Geo{g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7], g[8], g[9], g[10], g[11], g[12], g[13]};
}

// Output positions [lo, hi) along one axis whose tap at offset t (= i*D - P) reads inside [0, size).
inline void tap_range(int64_t t, int64_t s, int64_t size, int64_t out, int64_t& lo, int64_t& hi) {
    lo = t >= 0 ? 0 : (-t + s - 1) / s;
    hi = t >= size ? 0 : std::min(out, (size - 1 - t) / s + 1);
    if (hi < lo) hi = lo;
}

enum Act { kNone = 0, kRelu = 1, kRelu6 = 2 };

// NaN-preserving clips (a comparison with NaN is false: the value passes)
inline float act_forward(float v, int act) {
    if (act == kNone) return v;
    if (v < 0.0f) return 0.0f;
    if (act == kRelu6 && v > 6.0f) return 6.0f;
    return v;
}

inline float act_backward(float g, float y, int act) {
    if (act == kNone) return g;
    const bool pass = act == kRelu ? (y > 0.0f) : (y > 0.0f && y < 6.0f);
    return pass ? g : 0.0f;
}

}  // namespace

extern "C" void dnnpar_conv_im2col(const float* x, float* cols, const int64_t* geo, int threads) {
    const Geo g = read_geo(geo);
    const int64_t rows = g.c * g.kh * g.kw, plane = g.oh * g.ow, ncols = g.n * plane;
    const int team = dnnpar::team_size(threads, rows * ncols);
    // plain loops, no memcpy / fill calls: at VGG's 2x2 and 4x4 planes a row of one image is a
    // few floats, and a library call per row cost 7x NumPy's strided copy
    dnnpar::parallel_for(team, rows, [&](int64_t r) {
        const int64_t c = r / (g.kh * g.kw), i = r / g.kw % g.kh, j = r % g.kw;
        int64_t olo, ohi, wlo, whi;
        tap_range(i * g.dh - g.ph, g.sh, g.h, g.oh, olo, ohi);
        tap_range(j * g.dw - g.pw, g.sw, g.w, g.ow, wlo, whi);
        const int64_t x0 = j * g.dw - g.pw, ow_ = g.ow, sw = g.sw;
        for (int64_t n = 0; n < g.n; ++n) {
            const float* xc = x + (n * g.c + c) * g.h * g.w;
            float* out = cols + r * ncols + n * plane;
            for (int64_t q = 0; q < olo * ow_; ++q) out[q] = 0.0f;
            for (int64_t oh = olo; oh < ohi; ++oh) {
                float* o = out + oh * ow_;
                const float* xr = xc + (oh * g.sh - g.ph + i * g.dh) * g.w + x0;
                for (int64_t ow = 0; ow < wlo; ++ow) o[ow] = 0.0f;
                if (sw == 1) {
#pragma omp simd
                    for (int64_t ow = wlo; ow < whi; ++ow) o[ow] = xr[ow];
                } else {
                    for (int64_t ow = wlo; ow < whi; ++ow) o[ow] = xr[ow * sw];
                }
                for (int64_t ow = whi; ow < ow_; ++ow) o[ow] = 0.0f;
            }
            for (int64_t q = ohi * ow_; q < plane; ++q) out[q] = 0.0f;
        }
    });
}

extern "C" void dnnpar_conv_col2im(const float* cols, float* dx, const int64_t* geo, int threads) {
    const Geo g = read_geo(geo);
    const int64_t plane = g.oh * g.ow, ncols = g.n * plane;
    const int team = dnnpar::team_size(threads, g.c * g.kh * g.kw * ncols);
    dnnpar::parallel_for(team, g.n * g.c, [&](int64_t item) {
        const int64_t n = item / g.c, c = item % g.c;
        float* d = dx + item * g.h * g.w;
        for (int64_t q = 0; q < g.h * g.w; ++q) d[q] = 0.0f;
        for (int64_t i = 0; i < g.kh; ++i) {
            for (int64_t j = 0; j < g.kw; ++j) {
                const float* src = cols + ((c * g.kh + i) * g.kw + j) * ncols + n * plane;
                int64_t olo, ohi, wlo, whi;
                tap_range(i * g.dh - g.ph, g.sh, g.h, g.oh, olo, ohi);
                tap_range(j * g.dw - g.pw, g.sw, g.w, g.ow, wlo, whi);
                for (int64_t oh = olo; oh < ohi; ++oh) {
                    const float* s = src + oh * g.ow;
                    float* dr = d + (oh * g.sh - g.ph + i * g.dh) * g.w + (j * g.dw - g.pw);
                    if (g.sw == 1) {
#pragma omp simd
                        for (int64_t ow = wlo; ow < whi; ++ow) dr[ow] += s[ow];
                    } else {
                        for (int64_t ow = wlo; ow < whi; ++ow) dr[ow * g.sw] += s[ow];
                    }
                }
            }
        }
    });
}

// ym (O, N*P) + bias (O or null) -> act -> y (N, O, P)
extern "C" void dnnpar_conv_epilogue(const float* ym, const float* bias, float* y, int64_t n, int64_t o, int64_t p,
                                     int act, int threads) {
    const int team = dnnpar::team_size(threads, n * o * p);
    dnnpar::parallel_for(team, n * o, [&](int64_t item) {
        const int64_t b = item / o, k = item % o;
        const float* s = ym + k * n * p + b * p;
        float* d = y + item * p;
        const float add = bias ? bias[k] : 0.0f;
        if (bias) {
#pragma omp simd
            for (int64_t q = 0; q < p; ++q) d[q] = act_forward(s[q] + add, act);
        } else {
#pragma omp simd
            for (int64_t q = 0; q < p; ++q) d[q] = act_forward(s[q], act);
        }
    });
}

// dy (N, O, P), masked by the activated output y (N, O, P; null with act 0) -> dym (O, N*P), db (O)
extern "C" void dnnpar_conv_epilogue_backward(const float* dy, const float* y, float* dym, float* db, int64_t n,
                                              int64_t o, int64_t p, int act, int threads) {
    const int team = dnnpar::team_size(threads, n * o * p);
    dnnpar::parallel_for(team, o, [&](int64_t k) {
        double sum = 0.0;
        for (int64_t b = 0; b < n; ++b) {
            const float* s = dy + (b * o + k) * p;
            const float* yy = y ? y + (b * o + k) * p : nullptr;
            float* d = dym + k * n * p + b * p;
            if (act == kNone) {
#pragma omp simd
                for (int64_t q = 0; q < p; ++q) d[q] = s[q];
            } else {
#pragma omp simd
                for (int64_t q = 0; q < p; ++q) d[q] = act_backward(s[q], yy[q], act);
            }
            // one reduction loop for every activation: db has the same bits whether the mask was
            // applied here or by a separate ReLU layer before (fused == unfused exactly)
            float part = 0.0f;
#pragma omp simd reduction(+ : part)
            for (int64_t q = 0; q < p; ++q) part += d[q];
            sum += part;
        }
        db[k] = float(sum);
    });
}

DNNPAR_CPU_COMMON_EXPORTS(1)
