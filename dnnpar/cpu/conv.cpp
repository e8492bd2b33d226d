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
#include <new>
#include <type_traits>
#include <vector>

#include "activation.h"
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
    // clamped to [0, out]: a tap that only ever reads padding (padding wider than the input) has
    // an empty range, and its zero fill covers the output row exactly, never past it
    lo = t >= 0 ? 0 : std::min(out, (-t + s - 1) / s);
    hi = t >= size ? 0 : std::min(out, (size - 1 - t) / s + 1);
    if (hi < lo) hi = lo;
}

using dnnpar::act_backward;
using dnnpar::act_forward;
using dnnpar::kNone;

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


// ------------------------------------------------------------------------------------------
// Register-tiled direct convolution (float32 NCHW, one group): no im2col matrix, no BLAS.
//
// Layout. Each input plane is zero-padded and split into SH*SW phase planes (row r, column q of
// the padded plane go to phase (r % SH, q % SW) at (r / SH, q / SW)), each Hq rows of Wq
// columns (Hq = ceil(Hp / SH), Wq = ceil(Wp / SW)), stored
// xq[c][phase][n][plane]: within a channel and phase the images follow each other, PLANE floats
// apart. Output (n, oh, ow) is grid position m = n * PLANE + oh * Wq + ow, and its tap (i, j)
// reads phase ((i*DH) % SH, (j*DW) % SW) at m + ((i*DH) / SH) * Wq + (j*DW) / SW: for a run of
// consecutive m (across images too), every tap is one contiguous vector load, whatever the stride
// or dilation. Positions with ow >= OW or oh >= OH are computed and dropped. Valid positions
// read inside their own image's phase plane ((oh + (i*DH)/SH) <= Hq - 1 and
// ow + (j*DW)/SW <= Wq - 1, from OH's and OW's definitions); dropped ones may read anything in
// the buffer (another image's plane, or the zero slack at its end).
//
// Forward tile: FMR output channels (weights broadcast) x FNV vectors of VL grid positions
// (inputs loaded), FMR * FNV accumulators in registers, summed over (c, i, j) in that order,
// then bias + activation on the way out to y. Only output rows oh < OH are computed where an
// image's OH * Wq positions fill several tiles; small planes run tiles across images, dropped
// rows included. Items (row chunk, channel block), split statically
// over the team: each output is written by one thread, in one order (the bits do not depend on
// the thread count).
// dW tile: WMR output channels x WNT (c, i, j) columns, each accumulator a vector of VL lanes
// over grid positions (dy laid on the same grid, zero on dropped positions), positions in order
// in chunks that stay in cache; the lanes are summed at the end in a fixed tree order. Each thread
// owns whole tiles (deterministic). Where x holds inf or NaN, a dropped position's 0 * inf would
// poison a sum: that call masks the loaded x lanes of dropped positions to 0 (found while
// packing x, so finite inputs pay nothing).
// dx (stride 1) is the forward kernel on dy with the flipped, transposed kernel (ops/conv.py).

namespace {

// CVMAX, CACC: the channel-vectorised kernels' widest tile (vectors of output channels) and
// their accumulators (32 registers: accumulators + CV weights + a broadcast; 16 elsewhere)
#if defined(__AVX512F__)
constexpr int VL = 16, FMR = 8, FNV = 3, WMR = 4, WNT = 6, CVMAX = 4, CACC = 24;
#elif defined(__AVX__)
constexpr int VL = 8, FMR = 4, FNV = 3, WMR = 3, WNT = 4, CVMAX = 2, CACC = 12;
#else
constexpr int VL = 4, FMR = 4, FNV = 2, WMR = 2, WNT = 4, CVMAX = 2, CACC = 12;
#endif
constexpr int TILE = FNV * VL;
#ifndef DWCHUNK
#define DWCHUNK 256
#endif
constexpr int64_t kChunkPositions = 1536;   // forward: grid positions per item (about)
constexpr int64_t kSmallForwardMacs = 2 << 20;  // forward: one thread below this, if the packing had one
constexpr int64_t kDwChunkBytes = DWCHUNK << 10;  // dW: x + dy of one position chunk, for L2

typedef float vf __attribute__((vector_size(VL * sizeof(float))));
typedef int32_t vi __attribute__((vector_size(VL * sizeof(int32_t))));

inline vf loadu(const float* p) {
    vf v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
inline void storeu(float* p, vf v) { std::memcpy(p, &v, sizeof v); }
// a broadcast the FMA can take from memory (vf{} + s would add 0.0f first: it is not an identity
// for -0.0f, so the compiler keeps the add)
inline vf bcast(const float* p) {
#if defined(__AVX512F__)
    return (vf)_mm512_set1_ps(*p);
#elif defined(__AVX__)
    return (vf)_mm256_set1_ps(*p);
#else
    vf v;
    for (int l = 0; l < VL; ++l) v[l] = *p;
    return v;
#endif
}

// v, held in a register: GCC otherwise folds a vector used by several FMAs into each of them as
// a memory operand (the channels' forward tile then made 20 loads per 16 FMAs: load-bound)
inline vf in_register(vf v) {
#if defined(__x86_64__) || defined(__i386__)
    __asm__("" : "+v"(v));
#endif
    return v;
}

struct Phased {
    int64_t n, sh, sw, hq, wq, plane, phase, cstride, total, slack;
    explicit Phased(const Geo& g)
        : n(g.n), sh(g.sh), sw(g.sw), hq((g.h + 2 * g.ph + g.sh - 1) / g.sh), wq((g.w + 2 * g.pw + g.sw - 1) / g.sw) {
        plane = hq * wq;
        phase = n * plane;                // one phase of one channel, every image
        cstride = sh * sw * phase;        // one channel
        total = n * plane;                // grid positions
        slack = plane + 2 * TILE;
    }
    int64_t tap(const Geo& g, int64_t i, int64_t j) const {
        const int64_t a = i * g.dh, b = j * g.dw;
        return ((a % sh) * sw + b % sw) * phase + (a / sh) * wq + b / sw;
    }
    int64_t floats(const Geo& g) const { return g.c * cstride + slack; }
    bool valid(const Geo& g, int64_t m) const {
        const int64_t r = m % plane;
        return m < total && r / wq < g.oh && r % wq < g.ow;
    }
};

// Rows [rr0, rr1) of every phase plane of channel c of image n (s: that channel's input plane).
void pack_plane_rows(const float* s, float* xq, const Geo& g, const Phased& q, int64_t n, int64_t c, int64_t rr0,
                     int64_t rr1) {
    for (int64_t pr = 0; pr < q.sh; ++pr) {
        for (int64_t pc = 0; pc < q.sw; ++pc) {
            float* d = xq + c * q.cstride + (pr * q.sw + pc) * q.phase + n * q.plane;
            // phase column k holds padded column k*SW + pc, input column k*SW + pc - PW
            const int64_t off = pc - g.pw;
            const int64_t klo = off >= 0 ? 0 : (-off + q.sw - 1) / q.sw;
            const int64_t khi = std::max(klo, std::min(q.wq, (g.w - 1 - off) / q.sw + 1));
            for (int64_t rr = rr0; rr < rr1; ++rr) {
                float* row = d + rr * q.wq;
                const int64_t ih = rr * q.sh + pr - g.ph;
                if (ih < 0 || ih >= g.h || g.w - 1 - off < 0) {
                    for (int64_t k = 0; k < q.wq; ++k) row[k] = 0.0f;
                    continue;
                }
                const float* sr = s + ih * g.w + off;
                for (int64_t k = 0; k < klo; ++k) row[k] = 0.0f;
                if (q.sw == 1) {
#pragma omp simd
                    for (int64_t k = klo; k < khi; ++k) row[k] = sr[k];
                } else {
                    for (int64_t k = klo; k < khi; ++k) row[k] = sr[k * q.sw];
                }
                for (int64_t k = khi; k < q.wq; ++k) row[k] = 0.0f;
            }
        }
    }
}

// The threads that pack the phase planes of x.
int pack_team(const Geo& g, const Phased& q, int threads) { return dnnpar::team_size(threads, g.c * q.cstride); }

// x (N, C, H, W) -> the phase planes (zero padding); returns whether any value is inf or NaN.
bool pack_phases(const float* x, float* xq, const Geo& g, const Phased& q, int threads) {
    const int team = pack_team(g, q, threads);
    const int64_t items = g.n * g.c;
    std::vector<char> bad(size_t(std::max(team, 1)), 0);
    dnnpar::parallel(int(std::max<int64_t>(1, std::min<int64_t>(team, items))), [&](int tid, int nt) {
        const dnnpar::Range r = dnnpar::split(items, tid, nt);
        bool any = false;
        for (int64_t item = r.lo; item < r.hi; ++item) {
            const int64_t n = item / g.c, c = item % g.c;
            const float* s = x + item * g.h * g.w;
            pack_plane_rows(s, xq, g, q, n, c, 0, q.hq);
            float probe = 0.0f;
#pragma omp simd reduction(+ : probe)
            for (int64_t k = 0; k < g.h * g.w; ++k) probe += s[k] * 0.0f;  // NaN iff an inf or NaN
            any |= probe != probe;
        }
        bad[size_t(tid)] = any;
    });
    float* tail = xq + g.c * q.cstride;
    for (int64_t k = 0; k < q.slack; ++k) tail[k] = 0.0f;
    return std::any_of(bad.begin(), bad.end(), [](char b) { return b != 0; });
}

template <int MR, int NV>
inline void forward_tile(const float* x0, int64_t cstride, const int64_t* off, int64_t kk, const float* wb, int64_t c_n,
                         float* out, int64_t ldo) {
    vf acc[MR][NV];
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) acc[r][v] = vf{};
    for (int64_t c = 0; c < c_n; ++c) {
        const float* xc = x0 + c * cstride;
        const float* wc = wb + c * kk * MR;
        for (int64_t t = 0; t < kk; ++t) {
            const float* xt = xc + off[t];
            vf xv[NV];
#pragma GCC unroll 8
            for (int v = 0; v < NV; ++v) xv[v] = loadu(xt + v * VL);
#pragma GCC unroll 32
            for (int r = 0; r < MR; ++r) {
                const vf wv = bcast(wc + t * MR + r);
#pragma GCC unroll 8
                for (int v = 0; v < NV; ++v) acc[r][v] += wv * xv[v];
            }
        }
    }
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
        for (int v = 0; v < NV; ++v) storeu(out + r * ldo + v * VL, acc[r][v]);
}

template <int MR, int NT, bool SAFE>
inline void dw_tile(const float* dy0, int64_t dy_stride, const float* x0, const int64_t* koff, const vi* valid,
                    int64_t vectors, vf* acc_io) {
    vf acc[MR][NT];
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
        for (int k = 0; k < NT; ++k) acc[r][k] = acc_io[r * NT + k];
    for (int64_t mv = 0; mv < vectors; ++mv) {
        vf xv[NT];
#pragma GCC unroll 8
        for (int k = 0; k < NT; ++k) {
            xv[k] = loadu(x0 + koff[k] + mv * VL);
            if (SAFE) xv[k] = valid[mv] ? xv[k] : vf{};
        }
        // one dy vector live at a time: MR * NT accumulators + NT inputs + 1 fit the registers
#pragma GCC unroll 32
        for (int r = 0; r < MR; ++r) {
            const vf dv = loadu(dy0 + r * dy_stride + mv * VL);
#pragma GCC unroll 8
            for (int k = 0; k < NT; ++k) acc[r][k] += dv * xv[k];
        }
    }
#pragma GCC unroll 32
    for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
        for (int k = 0; k < NT; ++k) acc_io[r * NT + k] = acc[r][k];
}

inline float lane_sum(vf v) {  // a fixed pairwise tree over the lanes
    float l[VL];
    std::memcpy(l, &v, sizeof l);
    for (int width = VL / 2; width >= 1; width /= 2)
        for (int k = 0; k < width; ++k) l[k] += l[k + width];
    return l[0];
}

// The calling thread's scratch buffers (packed x, dy on the grid, packed weights), kept between calls and only
// grown: a fresh allocation of a few MB is mapped anew by the kernel each call, and its page
// faults cost more than the packing itself (370 us for a 16-channel 32x32 batch of 16).
// 64-byte aligned: dy's grid rows (whole vectors long) are then whole cache lines, and its loads
// never split across two.
float* scratch(int slot, int64_t floats) {
    thread_local std::vector<float> buffers[4];
    std::vector<float>& b = buffers[slot];
    const int64_t want = floats + 16;
    if (int64_t(b.size()) < want) {
        b.clear();
        b.shrink_to_fit();
        b.resize(size_t(want));
    }
    const uintptr_t p = reinterpret_cast<uintptr_t>(b.data());
    return reinterpret_cast<float*>((p + 63) & ~uintptr_t(63));
}

// w (O, C, KH*KW = kk) -> wp as [block][c][tap][width] (output channels in blocks of `width`,
// zero past O), written in order into a buffer kept between calls (a fresh one each call cost
// more than the convolution of a small plane: page faults and scattered stores, ~1.2 ns per
// weight). Returns wp.
float* pack_weights(const float* w, float* wp, int64_t o_n, int64_t c_n, int64_t kk, int64_t width) {
    float* d = wp;
    for (int64_t ob = 0; ob < (o_n + width - 1) / width; ++ob)
        for (int64_t c = 0; c < c_n; ++c)
            for (int64_t t = 0; t < kk; ++t)
                for (int64_t r = 0; r < width; ++r, ++d) {
                    const int64_t o = ob * width + r;
                    *d = o < o_n ? w[(o * c_n + c) * kk + t] : 0.0f;
                }
    return wp;
}

std::vector<int64_t> tap_offsets(const Geo& g, const Phased& q) {
    std::vector<int64_t> off(static_cast<size_t>(g.kh * g.kw));
    for (int64_t i = 0; i < g.kh; ++i)
        for (int64_t j = 0; j < g.kw; ++j) off[size_t(i * g.kw + j)] = q.tap(g, i, j);
    return off;
}

}  // namespace

// The tile sizes this build uses: (VL, FMR, FNV, WMR, WNT, CVMAX) -- ops/conv.py's rules read them.
extern "C" void dnnpar_conv_tiled_shape(int* out) {
    out[0] = VL;
    out[1] = FMR;
    out[2] = FNV;
    out[3] = WMR;
    out[4] = WNT;
    out[5] = CVMAX;
}

// y (N, O, OH, OW) = act(conv(x, w) + bias); w (O, C, KH, KW); bias (O) or null. Returns 0, or 1
// when its buffers could not be allocated (nothing written then). Every allocation is made on the
// calling thread, before the team starts: no exception can leave a worker.
extern "C" int dnnpar_conv_tiled_forward(const float* x, const float* w, const float* bias, float* y,
                                         const int64_t* geo, int64_t o_n, int act, int threads) try {
    const Geo g = read_geo(geo);
    const Phased q(g);
    const int64_t kk = g.kh * g.kw, nob = (o_n + FMR - 1) / FMR;
    float* const xq = scratch(0, q.floats(g));
    float* const wp = pack_weights(w, scratch(3, nob * g.c * kk * FMR), o_n, g.c, kk, FMR);
    const std::vector<int64_t> off = tap_offsets(g, q);
    // A small input (under 256 KB packed: pack_team 1) sits in one core's cache once packed, and
    // a second core pulling it across costs more than it saves below ~2M multiply-adds (2
    // AVX-512 cores, batch 1: 16 -> 64 channels 1x1 at 32x32 ran 34 us on one thread, 45 on
    // two): one thread there. Above, rows of whole images (per_image) are packed by the thread
    // that computes them (below); small planes run across images and pull little.
    const int64_t macs = g.n * o_n * g.oh * g.ow * g.c * kk;
    const bool small_input = pack_team(g, q, threads) == 1;
    const int team = small_input && macs < kSmallForwardMacs ? 1 : dnnpar::team_size(threads, macs);
    // items: chunks of whole grid rows by channel blocks, enough for every thread to have several.
    // Per image (only its OH valid rows) when those fill several tiles, else across images
    // (rows never straddle images: PLANE is a multiple of Wq)
    const bool per_image = g.oh * q.wq >= 4 * TILE;
    const int64_t span = per_image ? g.oh : g.n * q.hq;  // rows of one run
    const int64_t runs = per_image ? g.n : 1;
    int64_t rows = std::max<int64_t>(1, std::min(span, kChunkPositions / q.wq));
    const int64_t want = 4 * int64_t(team);
    if (runs * ((span + rows - 1) / rows) * nob < want)
        rows = std::max<int64_t>(1, std::min(rows, span * runs * nob / want));
    const int64_t per_run = (span + rows - 1) / rows, chunks = runs * per_run, items = chunks * nob;
    rows = (span + per_run - 1) / per_run;  // chunks of equal size: a short last one unbalances the split
    const int64_t ld = (rows * q.wq + TILE - 1) / TILE * TILE;
    const int members = int(std::max<int64_t>(1, std::min<int64_t>(team, items)));
    if (members > 1 && small_input && per_image) {
        // Each share packs the rows of the chunks whose first item is its own (a run's last
        // chunk also its image's rows past OH), every channel, in a pass of its own; the tiles
        // then read a neighbour's few halo rows only (batch 1, 16 -> 16 channels 3x3 at 32x32:
        // 46 -> 38 us; batch 2 81 -> 59).
        dnnpar::parallel(members, [&](int tid, int nt) {
            const dnnpar::Range rg = dnnpar::split(items, tid, nt);
            for (int64_t ch = (rg.lo + nob - 1) / nob; ch < (rg.hi + nob - 1) / nob; ++ch) {
                const int64_t n = ch / per_run, r0 = ch % per_run * rows;
                const int64_t r1 = ch % per_run == per_run - 1 ? q.hq : std::min(span, r0 + rows);
                for (int64_t c = 0; c < g.c; ++c) pack_plane_rows(x + (n * g.c + c) * g.h * g.w, xq, g, q, n, c, r0, r1);
            }
        });
        float* tail = xq + g.c * q.cstride;
        for (int64_t k = 0; k < q.slack; ++k) tail[k] = 0.0f;
    } else {
        pack_phases(x, xq, g, q, threads);
    }
    float* const locals = scratch(2, members * FMR * ld);
    dnnpar::parallel(members, [&](int tid, int nt) {
        const dnnpar::Range rg = dnnpar::split(items, tid, nt);
        float* const local = locals + tid * FMR * ld;
        for (int64_t item = rg.lo; item < rg.hi; ++item) {
            const int64_t ch = item / nob, ob = item % nob, run = ch / per_run;
            const int64_t r0 = ch % per_run * rows, r1 = std::min(span, r0 + rows);
            const int64_t m0 = run * q.plane + r0 * q.wq, mlen = (r1 - r0) * q.wq;
            const float* xm = xq + m0;
            const float* wb = wp + ob * g.c * kk * FMR;
            for (int64_t m = 0; m < mlen; m += TILE)
                forward_tile<FMR, FNV>(xm + m, q.cstride, off.data(), kk, wb, g.c, local + m, ld);
            for (int64_t gr = r0; gr < r1; ++gr) {
                const int64_t n = per_image ? run : gr / q.hq, oh = per_image ? gr : gr % q.hq;
                if (oh >= g.oh) continue;
                for (int r = 0; r < FMR; ++r) {
                    const int64_t o = ob * FMR + r;
                    if (o >= o_n) break;
                    const float add = bias ? bias[o] : 0.0f;
                    const float* s = local + r * ld + (gr - r0) * q.wq;
                    float* d = y + ((n * o_n + o) * g.oh + oh) * g.ow;
#pragma omp simd
                    for (int64_t ow = 0; ow < g.ow; ++ow) d[ow] = act_forward(s[ow] + add, act);
                }
            }
        }
    });
    return 0;
} catch (const std::bad_alloc&) {
    return 1;
}

// dw (O, C, KH, KW) and db (O) of the convolution for dy (N, O, OH, OW), masked by the activation's
// gradient at the activated output yact (null with act 0); dym (N, O, OH, OW) or null: the masked dy
// written out (for dx). Returns 0, or 1 when its buffers could not be allocated.
extern "C" int dnnpar_conv_tiled_dw(const float* x, const float* dy, const float* yact, float* dw, float* db,
                                    float* dym, const int64_t* geo, int64_t o_n, int act, int threads) try {
    const Geo g = read_geo(geo);
    const Phased q(g);
    const int64_t kk = g.kh * g.kw, k_n = g.c * kk, mr = (q.total + VL - 1) / VL * VL, vectors = mr / VL;
    const int64_t nob = (o_n + WMR - 1) / WMR, nkb = (k_n + WNT - 1) / WNT, o_pad = nob * WMR;
    float* const xq = scratch(0, q.floats(g) + mr);
    const bool nonfinite = pack_phases(x, xq, g, q, threads);
    // dy on the grid [o][n][plane], zero on dropped positions and on the rows past O; db per
    // channel, images in order
    float* const dyg = scratch(1, o_pad * mr);
    const int64_t plane = g.oh * g.ow;
    dnnpar::parallel_for(dnnpar::team_size(threads, g.n * o_n * plane), o_pad, [&](int64_t o) {
        float* d = dyg + o * mr;
        for (int64_t m = 0; m < mr; ++m) d[m] = 0.0f;
        if (o >= o_n) return;
        double sum = 0.0;
        for (int64_t n = 0; n < g.n; ++n) {
            float* dn = d + n * q.plane;
            const float* s = dy + (n * o_n + o) * plane;
            const float* yy = yact ? yact + (n * o_n + o) * plane : nullptr;
            float* wm = dym ? dym + (n * o_n + o) * plane : nullptr;
            for (int64_t oh = 0; oh < g.oh; ++oh) {
                float* dr = dn + oh * q.wq;
                const float* sr = s + oh * g.ow;
                if (act == kNone) {
#pragma omp simd
                    for (int64_t ow = 0; ow < g.ow; ++ow) dr[ow] = sr[ow];
                } else {
                    const float* yr = yy + oh * g.ow;
#pragma omp simd
                    for (int64_t ow = 0; ow < g.ow; ++ow) dr[ow] = act_backward(sr[ow], yr[ow], act);
                }
                if (wm) {
#pragma omp simd
                    for (int64_t ow = 0; ow < g.ow; ++ow) wm[oh * g.ow + ow] = dr[ow];
                }
            }
            // dropped positions hold exact zeros: one float sum per (n, o) plane, added in double
            float part = 0.0f;
#pragma omp simd reduction(+ : part)
            for (int64_t m = 0; m < q.plane; ++m) part += dn[m];
            sum += part;
        }
        db[o] = float(sum);
    });
    std::vector<int64_t> koff(size_t(nkb * WNT));
    const std::vector<int64_t> off = tap_offsets(g, q);
    for (int64_t k = 0; k < nkb * WNT; ++k) {
        const int64_t kc = std::min(k, k_n - 1);
        koff[size_t(k)] = kc / kk * q.cstride + off[size_t(kc % kk)];
    }
    std::vector<vi> valid;
    if (nonfinite) {
        valid.resize(size_t(vectors));
        for (int64_t mv = 0; mv < vectors; ++mv)
            for (int l = 0; l < VL; ++l) valid[size_t(mv)][l] = q.valid(g, mv * VL + l) ? -1 : 0;
    }
    // position chunks whose x and dy stay in cache while every tile of a thread passes over them
    const int64_t chunk = std::max<int64_t>(
        std::min<int64_t>(vectors, 32), std::min(vectors, kDwChunkBytes / int64_t(sizeof(float) * VL * (o_pad + g.c * q.sh * q.sw))));
    const int64_t tiles = nob * nkb;
    const int team = int(std::max<int64_t>(1, std::min<int64_t>(dnnpar::team_size(threads, g.n * o_n * plane * k_n),
                                                                 tiles)));
    // every tile's lane sums, zeroed (tile tl's at tl * WMR * WNT vectors)
    vf* const accs = reinterpret_cast<vf*>(scratch(2, tiles * WMR * WNT * VL));
    for (int64_t k = 0; k < tiles * WMR * WNT; ++k) accs[k] = vf{};
    dnnpar::parallel(team, [&](int tid, int nt) {
        const dnnpar::Range rg = dnnpar::split(tiles, tid, nt);
        vf* const acc = accs + rg.lo * WMR * WNT;
        for (int64_t v0 = 0; v0 < vectors; v0 += chunk) {
            const int64_t nv = std::min(chunk, vectors - v0);
            for (int64_t tl = rg.lo; tl < rg.hi; ++tl) {
                const int64_t ob = tl / nkb, kb = tl % nkb;
                const float* d0 = dyg + ob * WMR * mr + v0 * VL;
                vf* a = acc + (tl - rg.lo) * WMR * WNT;
                if (nonfinite)
                    dw_tile<WMR, WNT, true>(d0, mr, xq + v0 * VL, koff.data() + kb * WNT, valid.data() + v0, nv,
                                            a);
                else
                    dw_tile<WMR, WNT, false>(d0, mr, xq + v0 * VL, koff.data() + kb * WNT, nullptr, nv, a);
            }
        }
        for (int64_t tl = rg.lo; tl < rg.hi; ++tl) {
            const int64_t ob = tl / nkb, kb = tl % nkb;
            const vf* a = acc + (tl - rg.lo) * WMR * WNT;
            for (int r = 0; r < WMR; ++r) {
                const int64_t o = ob * WMR + r;
                if (o >= o_n) break;
                for (int k = 0; k < WNT; ++k) {
                    const int64_t kc = kb * WNT + k;
                    if (kc >= k_n) break;
                    dw[o * k_n + kc] = lane_sum(a[r * WNT + k]);
                }
            }
        }
    });
    return 0;
} catch (const std::bad_alloc&) {
    return 1;
}

// ------------------------------------------------------------------------------------------
// Channel-vectorised direct convolution: the same phase planes, vectors over output channels.
//
// The tiled kernels above vectorise over grid positions, and on a small plane much of each
// grid row is padding (8x8 outputs with padding 1 keep 64 of 100 positions). These compute the
// N*OH*OW outputs and nothing else: output (n, oh, ow) reads tap (i, j) of channel c at
// xq + c*CSTRIDE + tap(i, j) + base, base = n*PLANE + oh*Wq + ow; consecutive ow are
// consecutive floats there (any stride or dilation), so a tile of one output row needs one
// pointer and immediate offsets.
// Forward tile: TC positions of one output row x CV vectors of VL output channels, TC*CV
// accumulators; each tap's input a broadcast float, its CV weight vectors loads from
// [block][c][tap][CV*VL] (zero past O). Input channels in blocks whose weights stay in L1
// (the tile's partial sums kept in the item's local [position][channel] buffer between blocks,
// blocks in order); the buffer goes out to NCHW with bias + activation. Items (image, chunk of
// output rows, channel block), split statically.
// dW tile: KT columns (c, i, j) x CV channel vectors, summed over the positions in order from
// dy laid out [position][channel] (masked, zero past O), x broadcast. Tiles split statically.
// Every output and every dW entry is summed by one thread in one order: the bits do not depend
// on the thread count. No position outside the output is computed, so an inf or NaN in x
// reaches exactly the sums that read it.

namespace {

constexpr int tc_max(int cv) { return CACC / cv < 12 ? CACC / cv : 12; }
constexpr int kt_of(int cv) { return CACC / cv < 6 ? CACC / cv : 6; }  // dW: its offsets live in registers too
constexpr int64_t kChannelBlockFloats = 4096;  // forward: one input-channel block's weights, 16 KB
constexpr int64_t kChanItemPositions = 64;     // forward: outputs per item (its local buffer: 16 KB at CV 4)
constexpr int64_t kChanDwChunk = 256;          // dW: positions per pass of every tile (dy: 64 KB at CV 4)

// The channels family's register tile, acc[p][v]: TC outputs x CV vectors of VL channels.
// Loaded from (or, without `resume`, zero) and stored to `out`, output p at out + p * step.
template <int CV, int TC>
inline void chan_acc_load(vf (&acc)[TC][CV], const float* out, int64_t step, bool resume) {
#pragma GCC unroll 16
    for (int p = 0; p < TC; ++p)
#pragma GCC unroll 4
        for (int v = 0; v < CV; ++v) acc[p][v] = resume ? loadu(out + p * step + v * VL) : vf{};
}

template <int CV, int TC>
inline void chan_acc_store(const vf (&acc)[TC][CV], float* out, int64_t step) {
#pragma GCC unroll 16
    for (int p = 0; p < TC; ++p)
#pragma GCC unroll 4
        for (int v = 0; v < CV; ++v) storeu(out + p * step + v * VL, acc[p][v]);
}

// acc[p][v] += w[v] * x[p]: CV weight vectors at w (kept in registers), TC broadcast floats at x.
template <int CV, int TC>
inline void chan_fma(vf (&acc)[TC][CV], const float* w, const float* x) {
    vf wv[CV];
#pragma GCC unroll 4
    for (int v = 0; v < CV; ++v) wv[v] = in_register(loadu(w + v * VL));
#pragma GCC unroll 16
    for (int p = 0; p < TC; ++p) {
        const vf xb = bcast(x + p);
#pragma GCC unroll 4
        for (int v = 0; v < CV; ++v) acc[p][v] += wv[v] * xb;
    }
}

template <int CV, int TC>
inline void chan_tile(const float* xr, int64_t cstride, const int64_t* off, int64_t kk, const float* wb,
                      int64_t c_n, float* out, bool resume) {
    vf acc[TC][CV];
    chan_acc_load<CV, TC>(acc, out, CV * VL, resume);
    for (int64_t c = 0; c < c_n; ++c) {
        const float* wc = wb + c * kk * CV * VL;
        const float* xc = xr + c * cstride;
        for (int64_t t = 0; t < kk; ++t) chan_fma<CV, TC>(acc, wc + t * CV * VL, xc + off[t]);
    }
    chan_acc_store<CV, TC>(acc, out, CV * VL);
}

// f(std::integral_constant<int, tc>) for a run of tc <= TC outputs (a row's tile width, or its
// shorter last tile): the register tiles exist for every width up to TC.
template <int TC, class F>
inline void with_width(int tc, F&& f) {
    if constexpr (TC > 1) {
        if (tc < TC) return with_width<TC - 1>(tc, f);
    }
    f(std::integral_constant<int, TC>{});
}

template <int CV>
void chan_forward(const float* xq, const Geo& g, const Phased& q, const int64_t* off, const float* wp, int64_t o_n,
                  const float* bias, float* y, int act, int team) {
    constexpr int W = CV * VL;
    const int64_t kk = g.kh * g.kw, nob = (o_n + W - 1) / W, plane = g.oh * g.ow;
    const int64_t cb = std::max<int64_t>(1, kChannelBlockFloats / (kk * W));
    // tiles of one row: as few as TC allows, their widths within one of each other (a row of 8
    // at TC 6: two of 4; of 32: 6, 6, 5, 5, 5, 5)
    const int64_t ntile = (g.ow + tc_max(CV) - 1) / tc_max(CV), narrow = g.ow / ntile, wide = g.ow % ntile;
    const int64_t rows = std::max<int64_t>(1, std::min(g.oh, kChanItemPositions / g.ow));
    const int64_t per_image = (g.oh + rows - 1) / rows, items = g.n * per_image * nob;
    const int members = int(std::max<int64_t>(1, std::min<int64_t>(team, items)));
    float* const locals = scratch(2, members * rows * g.ow * W);
    dnnpar::parallel(members, [&](int tid, int nt) {
        const dnnpar::Range rg = dnnpar::split(items, tid, nt);
        float* const local = locals + tid * rows * g.ow * W;
        for (int64_t item = rg.lo; item < rg.hi; ++item) {
            const int64_t ob = item % nob, chunk = item / nob, n = chunk / per_image;
            const int64_t oh0 = chunk % per_image * rows, oh1 = std::min(g.oh, oh0 + rows);
            const float* wb = wp + ob * g.c * kk * W;
            for (int64_t c0 = 0; c0 < g.c; c0 += cb) {
                const int64_t c_n = std::min(cb, g.c - c0);
                for (int64_t oh = oh0; oh < oh1; ++oh) {
                    const float* xr = xq + c0 * q.cstride + n * q.plane + oh * q.wq;
                    for (int64_t tile = 0, ow = 0; tile < ntile; ++tile) {
                        const int tc = int(narrow + (tile < wide));
                        with_width<tc_max(CV)>(tc, [&](auto w) {
                            chan_tile<CV, decltype(w)::value>(xr + ow, q.cstride, off, kk, wb + c0 * kk * W, c_n,
                                                              local + ((oh - oh0) * g.ow + ow) * W, c0 > 0);
                        });
                        ow += tc;
                    }
                }
            }
            const int64_t olo = ob * W, ohi = std::min(o_n, olo + W), len = (oh1 - oh0) * g.ow;
            for (int64_t o = olo; o < ohi; ++o) {
                const float add = bias ? bias[o] : 0.0f;
                const float* s = local + (o - olo);
                float* d = y + (n * o_n + o) * plane + oh0 * g.ow;
                for (int64_t k = 0; k < len; ++k) d[k] = act_forward(s[k * W] + add, act);
            }
        }
    });
}

template <int CV, int KT>
inline void chan_dw_tile(const float* dyt, int64_t ldd, const float* xq, const int64_t* base, const int64_t* koff,
                         int64_t len, vf* acc_io) {
    vf acc[KT][CV];
    int64_t ko[KT];
#pragma GCC unroll 8
    for (int k = 0; k < KT; ++k) {
        ko[k] = koff[k];
#pragma GCC unroll 4
        for (int v = 0; v < CV; ++v) acc[k][v] = acc_io[k * CV + v];
    }
    for (int64_t m = 0; m < len; ++m) {
        const float* xm = xq + base[m];
        vf dv[CV];
#pragma GCC unroll 4
        for (int v = 0; v < CV; ++v) dv[v] = loadu(dyt + m * ldd + v * VL);
#pragma GCC unroll 8
        for (int k = 0; k < KT; ++k) {
            const vf xb = bcast(xm + ko[k]);
#pragma GCC unroll 4
            for (int v = 0; v < CV; ++v) acc[k][v] += dv[v] * xb;
        }
    }
#pragma GCC unroll 8
    for (int k = 0; k < KT; ++k)
#pragma GCC unroll 4
        for (int v = 0; v < CV; ++v) acc_io[k * CV + v] = acc[k][v];
}

template <int CV>
void chan_dw(const float* xq, const Geo& g, const Phased& q, const int64_t* off, const int64_t* base, const float* dyt,
             int64_t o_n, float* dw, int threads) {
    constexpr int W = CV * VL, KT = kt_of(CV);
    const int64_t kk = g.kh * g.kw, k_n = g.c * kk, nob = (o_n + W - 1) / W, nkb = (k_n + KT - 1) / KT;
    const int64_t positions = g.n * g.oh * g.ow, ldd = nob * W, tiles = nob * nkb;
    std::vector<int64_t> koff(size_t(nkb * KT));
    for (int64_t k = 0; k < nkb * KT; ++k) {
        const int64_t kc = std::min(k, k_n - 1);  // past K: a real column again, never stored
        koff[size_t(k)] = kc / kk * q.cstride + off[kc % kk];
    }
    const int team = int(std::max<int64_t>(1, std::min<int64_t>(dnnpar::team_size(threads, positions * o_n * k_n),
                                                                 tiles)));
    vf* const accs = reinterpret_cast<vf*>(scratch(3, tiles * KT * CV * VL));
    for (int64_t k = 0; k < tiles * KT * CV; ++k) accs[k] = vf{};
    dnnpar::parallel(team, [&](int tid, int nt) {
        const dnnpar::Range rg = dnnpar::split(tiles, tid, nt);
        for (int64_t m0 = 0; m0 < positions; m0 += kChanDwChunk) {
            const int64_t len = std::min(kChanDwChunk, positions - m0);
            for (int64_t tl = rg.lo; tl < rg.hi; ++tl) {
                const int64_t ob = tl / nkb, kb = tl % nkb;
                chan_dw_tile<CV, KT>(dyt + m0 * ldd + ob * W, ldd, xq, base + m0, koff.data() + kb * KT, len,
                                     accs + tl * KT * CV);
            }
        }
        for (int64_t tl = rg.lo; tl < rg.hi; ++tl) {
            const int64_t ob = tl / nkb, kb = tl % nkb;
            const float* a = reinterpret_cast<const float*>(accs + tl * KT * CV);
            for (int k = 0; k < KT && kb * KT + k < k_n; ++k)
                for (int64_t o = ob * W; o < std::min(o_n, ob * W + W); ++o)
                    dw[o * k_n + kb * KT + k] = a[k * W + (o - ob * W)];
        }
    });
}

// dx tile: TC consecutive outputs of one dy row, one tap: dx (padded NHWC, `out` at the first
// target, targets `step` floats apart) += W[:, :, tap]^T dy over the O channels, CV vectors of
// input channels; dy broadcast straight from NCHW (`dyp` at the first position, channels
// `plane` floats apart), the tap's weights [o][CV*VL] as vectors.
template <int CV, int TC>
inline void chan_dx_tile(const float* dyp, int64_t plane, int64_t o_n, const float* wt, float* out, int64_t step) {
    vf acc[TC][CV];
    chan_acc_load<CV, TC>(acc, out, step, true);
    for (int64_t o = 0; o < o_n; ++o) chan_fma<CV, TC>(acc, wt + o * CV * VL, dyp + o * plane);
    chan_acc_store<CV, TC>(acc, out, step);
}

// dx (N, C, H, W) of the convolution g for dy (N, O, OH, OW): every dy position scatters each
// tap's W^T dy into a zero-padded NHWC image (Hp x Wp x cpad floats, one per thread), images
// split over the threads, then the interior goes out to NCHW. The sum of each dx element runs
// over (channel block, dy row, tap row, tap column, dy column tile, o) in that order.
template <int CV>
void chan_dx(const float* dy, const float* wt, float* dx, const Geo& g, int64_t o_n, int threads) {
    constexpr int W = CV * VL;
    const int64_t kk = g.kh * g.kw, ncb = (g.c + W - 1) / W, cpad = ncb * W;
    const int64_t hp = g.h + 2 * g.ph, wpd = g.w + 2 * g.pw, img = hp * wpd * cpad, plane = g.oh * g.ow;
    const int64_t ntile = (g.ow + tc_max(CV) - 1) / tc_max(CV), narrow = g.ow / ntile, wide = g.ow % ntile;
    const int team = int(std::max<int64_t>(1, std::min<int64_t>(
        dnnpar::team_size(threads, g.n * plane * o_n * g.c * kk), g.n)));
    float* const bufs = scratch(2, team * img);
    dnnpar::parallel(team, [&](int tid, int nt) {
        const dnnpar::Range rg = dnnpar::split(g.n, tid, nt);
        float* const buf = bufs + tid * img;
        for (int64_t n = rg.lo; n < rg.hi; ++n) {
            for (int64_t k = 0; k < img; ++k) buf[k] = 0.0f;
            for (int64_t cb = 0; cb < ncb; ++cb) {
                for (int64_t oh = 0; oh < g.oh; ++oh) {
                    const float* dyr = dy + n * o_n * plane + oh * g.ow;
                    for (int64_t i = 0; i < g.kh; ++i) {
                        const int64_t ihp = oh * g.sh + i * g.dh;  // padded row: always inside
                        for (int64_t j = 0; j < g.kw; ++j) {
                            const float* wtap = wt + ((cb * kk + i * g.kw + j) * o_n) * W;
                            for (int64_t tile = 0, ow = 0; tile < ntile; ++tile) {
                                const int tc = int(narrow + (tile < wide));
                                float* out = buf + (ihp * wpd + ow * g.sw + j * g.dw) * cpad + cb * W;
                                with_width<tc_max(CV)>(tc, [&](auto w) {
                                    chan_dx_tile<CV, decltype(w)::value>(dyr + ow, plane, o_n, wtap, out, g.sw * cpad);
                                });
                                ow += tc;
                            }
                        }
                    }
                }
            }
            for (int64_t c = 0; c < g.c; ++c) {
                float* d = dx + (n * g.c + c) * g.h * g.w;
                for (int64_t ih = 0; ih < g.h; ++ih) {
                    const float* s = buf + ((ih + g.ph) * wpd + g.pw) * cpad + c;
                    for (int64_t iw = 0; iw < g.w; ++iw) d[ih * g.w + iw] = s[iw * cpad];
                }
            }
        }
    });
}

// channel vectors per tile for o_n output channels
int chan_cv(int64_t o_n) { return int(std::min<int64_t>(CVMAX, (o_n + VL - 1) / VL)); }

// f(std::integral_constant<int, cv>) for a cv of chan_cv (only the widths this build has)
template <class F>
void with_cv(int cv, F&& f) {
    if constexpr (CVMAX >= 4) {
        if (cv == 4) return f(std::integral_constant<int, 4>{});
        if (cv == 3) return f(std::integral_constant<int, 3>{});
    }
    if (cv == 2) return f(std::integral_constant<int, 2>{});
    f(std::integral_constant<int, 1>{});
}

}  // namespace

// y (N, O, OH, OW) = act(conv(x, w) + bias) by the channel-vectorised kernel (arguments and
// returns as dnnpar_conv_tiled_forward's).
extern "C" int dnnpar_conv_chan_forward(const float* x, const float* w, const float* bias, float* y,
                                        const int64_t* geo, int64_t o_n, int act, int threads) try {
    const Geo g = read_geo(geo);
    const Phased q(g);
    const int cv = chan_cv(o_n);
    const int64_t kk = g.kh * g.kw, wdt = cv * VL, nob = (o_n + wdt - 1) / wdt;
    float* const xq = scratch(0, q.floats(g));
    float* const wp = pack_weights(w, scratch(1, nob * g.c * kk * wdt), o_n, g.c, kk, wdt);
    const std::vector<int64_t> off = tap_offsets(g, q);
    pack_phases(x, xq, g, q, threads);
    const int64_t macs = g.n * o_n * g.oh * g.ow * g.c * kk;
    const int team = pack_team(g, q, threads) == 1 && macs < kSmallForwardMacs ? 1 : dnnpar::team_size(threads, macs);
    with_cv(cv, [&](auto k) { chan_forward<decltype(k)::value>(xq, g, q, off.data(), wp, o_n, bias, y, act, team); });
    return 0;
} catch (const std::bad_alloc&) {
    return 1;
}

// dx (N, C, H, W) of the convolution of geometry `geo` (any stride, padding, dilation) for dy
// (N, O, OH, OW) and w (O, C, KH, KW), by the channel-vectorised scatter kernel (chan_dx).
// Returns 0, or 1 when its buffers could not be allocated (nothing written then).
extern "C" int dnnpar_conv_chan_dx(const float* dy, const float* w, float* dx, const int64_t* geo, int64_t o_n,
                                   int threads) try {
    const Geo g = read_geo(geo);
    const int cv = chan_cv(g.c);
    const int64_t kk = g.kh * g.kw, wdt = cv * VL, ncb = (g.c + wdt - 1) / wdt;
    float* const wt = scratch(1, ncb * kk * o_n * wdt);
    {
        float* d = wt;  // [channel block][tap][o][cv * VL], in write order
        for (int64_t cb = 0; cb < ncb; ++cb)
            for (int64_t t = 0; t < kk; ++t)
                for (int64_t o = 0; o < o_n; ++o)
                    for (int64_t l = 0; l < wdt; ++l, ++d) {
                        const int64_t c = cb * wdt + l;
                        *d = c < g.c ? w[(o * g.c + c) * kk + t] : 0.0f;
                    }
    }
    with_cv(cv, [&](auto k) { chan_dx<decltype(k)::value>(dy, wt, dx, g, o_n, threads); });
    return 0;
} catch (const std::bad_alloc&) {
    return 1;
}

// dw, db (and dym) by the channel-vectorised kernel (arguments and returns as dnnpar_conv_tiled_dw's).
extern "C" int dnnpar_conv_chan_dw(const float* x, const float* dy, const float* yact, float* dw, float* db,
                                   float* dym, const int64_t* geo, int64_t o_n, int act, int threads) try {
    const Geo g = read_geo(geo);
    const Phased q(g);
    const int cv = chan_cv(o_n);
    const int64_t wdt = cv * VL, ldd = (o_n + wdt - 1) / wdt * wdt, plane = g.oh * g.ow, positions = g.n * plane;
    float* const xq = scratch(0, q.floats(g));
    pack_phases(x, xq, g, q, threads);
    // dy masked, laid out [position][channel] (zero past O); db's per-(n, o) float sums, added
    // over the images in order afterwards (in double)
    float* const dyt = scratch(1, positions * ldd);
    std::vector<float> parts(size_t(g.n * o_n));
    const int members = int(std::max<int64_t>(1, std::min<int64_t>(dnnpar::team_size(threads, positions * o_n), g.n)));
    float* const tmps = dym ? nullptr : scratch(2, members * plane);  // the masked plane, where dym is not wanted
    dnnpar::parallel(members, [&](int tid, int nt) {
        const dnnpar::Range rg = dnnpar::split(g.n, tid, nt);
        for (int64_t n = rg.lo; n < rg.hi; ++n) {
            float* dt = dyt + n * plane * ldd;
            for (int64_t p = 0; p < plane; ++p)
                for (int64_t o = o_n; o < ldd; ++o) dt[p * ldd + o] = 0.0f;
            for (int64_t o = 0; o < o_n; ++o) {
                const float* s = dy + (n * o_n + o) * plane;
                float* d = dym ? dym + (n * o_n + o) * plane : tmps + tid * plane;
                if (act == kNone) {
#pragma omp simd
                    for (int64_t p = 0; p < plane; ++p) d[p] = s[p];
                } else {
                    const float* yy = yact + (n * o_n + o) * plane;
#pragma omp simd
                    for (int64_t p = 0; p < plane; ++p) d[p] = act_backward(s[p], yy[p], act);
                }
                float part = 0.0f;
#pragma omp simd reduction(+ : part)
                for (int64_t p = 0; p < plane; ++p) part += d[p];
                parts[size_t(n * o_n + o)] = part;
                for (int64_t p = 0; p < plane; ++p) dt[p * ldd + o] = d[p];
            }
        }
    });
    for (int64_t o = 0; o < o_n; ++o) {
        double sum = 0.0;
        for (int64_t n = 0; n < g.n; ++n) sum += parts[size_t(n * o_n + o)];
        db[o] = float(sum);
    }
    std::vector<int64_t> base(static_cast<size_t>(positions));
    for (int64_t m = 0; m < positions; ++m) {
        const int64_t n = m / plane, r = m % plane;
        base[size_t(m)] = n * q.plane + r / g.ow * q.wq + r % g.ow;
    }
    const std::vector<int64_t> off = tap_offsets(g, q);
    with_cv(cv, [&](auto k) { chan_dw<decltype(k)::value>(xq, g, q, off.data(), base.data(), dyt, o_n, dw, threads); });
    return 0;
} catch (const std::bad_alloc&) {
    return 1;
}

DNNPAR_CPU_COMMON_EXPORTS(5)
