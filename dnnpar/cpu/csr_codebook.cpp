// CSR x dense products for the numpy backend, straight from Deep Compression's storage format.
//
// A is M x K, stored per row as a stream of entries. Entry i of a row holds two bytes:
//   gaps[i]  : zeros skipped since the previous entry of the row (or since the row start), so the
//              entry's column is  col = previous col + gaps[i] + 1,  starting from col = -1;
//   codes[i] : index into a 256-entry float32 codebook (the matrix's codebook, zero-padded).
// A run of more than 255 zeros is bridged by filler entries (gap 255, code `filler`, a code no
// stored entry uses), as in the paper's Figure 3; a .dnnz layer's streams, read as they are,
// bridge at their own longest gap (2^index_bits - 1, code 0): nothing here depends on where. rowptr (int64, M + 1) says where each row's
// entries start. Two bytes per entry instead of SciPy's eight (float32 value + int32 column).
// A filler contributes exactly nothing: its x value is replaced by 0 before the multiply, so an
// inf or NaN in x at a filler's column does not turn the row into NaN (0 * inf is NaN); stored
// entries multiply x as it is, as SciPy's and the GPU kernels' products do. filler = -1: none.
//
//   y = A x  : dnnpar_csr_cb_spmv, one dot product per row, two rows at a time (x, K floats,
//              stays in cache)
//   Y = A X  : dnnpar_csr_cb_spmm, X row-major K x B; every entry adds v * X[col, :] into the
//              row's B accumulators (batch in the inner dimension, in chunks of 64/32/16/8),
//              blocked: groups of rows run over blocks of X's columns (each ~128 KB, so both
//              stay in L2), each row resuming where it stopped (a cursor: position, column);
//              a row's entries are summed in the same order however it is blocked
//
// Rows are spread over the threads of dnnpar/cpu/parallel.h's pool. Nothing here checks its input: the Python side
// (dnnpar.sparse.CSR.compact, dnnpar.backend.cpu_native) builds the streams from a validated
// CSR, or takes a .dnnz layer's after the reader checked them (CSR.from_compact), so every
// column stays below K and every code below 256.
//
// Plain C++17; built at run time with $CXX -O3 -march=native -fopenmp-simd -pthread (dnnpar/backend/cpu_native.py).
#include <cstddef>
#include <cstdint>
#include <algorithm>
#include <cstring>
#include <vector>

#include "parallel.h"

namespace {

// Below this many entries (x batch) a product runs on one thread: waking the team costs more.
constexpr int64_t kParallelMinWork = 1 << 15;
// Rows handed to a thread at a time (dynamic: a busy core on a shared machine gets fewer).
constexpr int kRowChunk = 16;

// x's value for an entry of code `code`: 0 for a filler (a select, no branch), else xv itself.
// Without Mask (the caller knows x is finite, so 0 * x is 0 anyway) the select is compiled out:
// on the gather-bound SpMV loop it is a measurable cost.
template <bool Mask> inline float live(uint8_t code, int f, float xv) {
    return Mask && int(code) == f ? 0.f : xv;
}

// The dot product of entries [0, n) of one row with x, starting at p: one past the previous
// entry's column (x itself at the row start). Four entries per step: their columns are
// p + s0..s3, offsets computed without touching p, so the only serial dependency is one
// pointer add per four entries, and four accumulators hide the FMA latency.
template <bool Mask>
inline float row_dot(const uint8_t* __restrict g, const uint8_t* __restrict c, int64_t n,
                     const float* __restrict cb, const float* __restrict p, int f) {
    float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
    int64_t i = 0;
    for (; i + 4 <= n; i += 4) {
        const int64_t s0 = int64_t(g[i]);
        const int64_t s1 = s0 + int64_t(g[i + 1]) + 1;
        const int64_t s2 = s1 + int64_t(g[i + 2]) + 1;
        const int64_t s3 = s2 + int64_t(g[i + 3]) + 1;
        a0 += cb[c[i]] * live<Mask>(c[i], f, p[s0]);
        a1 += cb[c[i + 1]] * live<Mask>(c[i + 1], f, p[s1]);
        a2 += cb[c[i + 2]] * live<Mask>(c[i + 2], f, p[s2]);
        a3 += cb[c[i + 3]] * live<Mask>(c[i + 3], f, p[s3]);
        p += s3 + 1;
    }
    for (; i < n; ++i) {
        p += int64_t(g[i]);
        a0 += cb[c[i]] * live<Mask>(c[i], f, *p++);
    }
    return (a0 + a1) + (a2 + a3);
}

// Two rows at once, two entries of each per step, then the longer row's tail. Each x load
// waits for the gap bytes that give its address; two independent rows give the core twice as
// many such chains to overlap (about 20% faster than one row at a time on fc6, Zen 4).
template <bool Mask>
inline void row_pair_dot(const uint8_t* __restrict g0, const uint8_t* __restrict c0, int64_t n0,
                         const uint8_t* __restrict g1, const uint8_t* __restrict c1, int64_t n1,
                         const float* __restrict cb, const float* __restrict x, float* __restrict y, int f) {
    float a0 = 0.f, a1 = 0.f, b0 = 0.f, b1 = 0.f;
    const float* p = x;  // one past the previous entry's column, per row
    const float* q = x;
    const int64_t n = n0 < n1 ? n0 : n1;
    int64_t i = 0;
    for (; i + 2 <= n; i += 2) {
        const int64_t s0 = int64_t(g0[i]);
        const int64_t s1 = s0 + int64_t(g0[i + 1]) + 1;
        a0 += cb[c0[i]] * live<Mask>(c0[i], f, p[s0]);
        a1 += cb[c0[i + 1]] * live<Mask>(c0[i + 1], f, p[s1]);
        p += s1 + 1;
        const int64_t t0 = int64_t(g1[i]);
        const int64_t t1 = t0 + int64_t(g1[i + 1]) + 1;
        b0 += cb[c1[i]] * live<Mask>(c1[i], f, q[t0]);
        b1 += cb[c1[i + 1]] * live<Mask>(c1[i + 1], f, q[t1]);
        q += t1 + 1;
    }
    y[0] = (a0 + a1) + row_dot<Mask>(g0 + i, c0 + i, n0 - i, cb, p, f);
    y[1] = (b0 + b1) + row_dot<Mask>(g1 + i, c1 + i, n1 - i, cb, q, f);
}

// Eight floats in one vector register (GCC / Clang vector extension: ymm with AVX, two xmm
// with SSE, NEON pairs on ARM). X rows are read with memcpy, so no alignment is assumed.
typedef float f8 __attribute__((vector_size(32)));

// Stored entries decoded at a time by the SpMM (columns and codebook values on the stack).
constexpr int kDecode = 256;
// SpMM blocking: a group of output rows (their Y rows, the accumulators between blocks) and a
// block of X's columns (the X rows their entries read) of about this many bytes each, both
// L2-resident while a group's rows run over one block; at fc6 batch 64 that is 512 rows x 512
// columns, and every X row a group touches comes from L3 once per group instead of once per
// entry (X is 6.4 MB there, its rows random). Of the sizes tried on a 512 KB L2 (256 .. 1024
// rows, 256 .. 2048 columns) this one was among the fastest (figures: the commit and README).
constexpr int64_t kBlockBytes = 128 << 10;
// X rows prefetched this many stored entries ahead (no hardware prefetcher can guess them).
constexpr int kPrefetchAhead = 8;

// 8 * NV columns of one output row, accumulated into y (read and written back: the row's
// partial sums between column blocks): one axpy per stored entry, in the entries' order.
template <int NV>
inline void axpy_rows(const int64_t* __restrict cols, const float* __restrict vals, int cnt,
                      const float* __restrict X, int64_t ldx, float* __restrict y) {
    f8 acc[NV];
    std::memcpy(acc, y, sizeof acc);
    for (int i = 0; i < cnt; ++i) {
        if (i + kPrefetchAhead < cnt) {
            const char* ahead = reinterpret_cast<const char*>(X + cols[i + kPrefetchAhead] * ldx);
            for (int o = 0; o < NV * 32; o += 64) __builtin_prefetch(ahead + o);
        }
        const float* xr = X + cols[i] * ldx;
        const float v = vals[i];
        for (int k = 0; k < NV; ++k) {
            f8 xv;
            std::memcpy(&xv, xr + 8 * k, sizeof xv);
            acc[k] += v * xv;
        }
    }
    std::memcpy(y, acc, sizeof acc);
}

// The last w < 8 columns.
inline void axpy_tail(const int64_t* __restrict cols, const float* __restrict vals, int cnt,
                      const float* __restrict X, int64_t ldx, float* __restrict y, int w) {
    float acc[8];
    for (int j = 0; j < w; ++j) acc[j] = y[j];
    for (int i = 0; i < cnt; ++i) {
        const float* xr = X + cols[i] * ldx;
        for (int j = 0; j < w; ++j) acc[j] += vals[i] * xr[j];
    }
    for (int j = 0; j < w; ++j) y[j] = acc[j];
}

// Every B column of one output row y += the chunk's entries (64 / 32 / 16 / 8 at a time, then the tail).
inline void axpy_all(const int64_t* cols, const float* vals, int cnt, const float* X, int64_t b, float* y) {
    int64_t j = 0;
    for (; j + 64 <= b; j += 64) axpy_rows<8>(cols, vals, cnt, X + j, b, y + j);
    if (j + 32 <= b) { axpy_rows<4>(cols, vals, cnt, X + j, b, y + j); j += 32; }
    if (j + 16 <= b) { axpy_rows<2>(cols, vals, cnt, X + j, b, y + j); j += 16; }
    if (j + 8 <= b) { axpy_rows<1>(cols, vals, cnt, X + j, b, y + j); j += 8; }
    if (j < b) axpy_tail(cols, vals, cnt, X + j, b, y + j, int(b - j));
}

// A row's cursor between column blocks: its next entry and the previous entry's column.
struct Cursor {
    int64_t pos, col;
};

// Rows [r0, r1) of Y = A X, column block by column block: each row's entries below column
// k1 are decoded (up to kDecode at a time; fillers dropped) and added into its Y row.
inline void spmm_group(int64_t r0, int64_t r1, int64_t b, int64_t kb, const int64_t* rowptr, const uint8_t* gaps,
                       const uint8_t* codes, const float* cb, int f, const float* X, float* Y) {
    std::vector<Cursor> cur(size_t(r1 - r0));
    int64_t left = 0;  // rows with entries still to run
    for (int64_t r = r0; r < r1; ++r) {
        const bool some = rowptr[r + 1] > rowptr[r];
        cur[size_t(r - r0)] = Cursor{rowptr[r], some ? -1 : -2};  // col -2: a row done
        left += some;
        std::memset(Y + r * b, 0, size_t(b) * sizeof(float));
    }
    int64_t cols[kDecode];
    float vals[kDecode];
    for (int64_t k1 = kb; left > 0; k1 += kb) {
        for (int64_t r = r0; r < r1; ++r) {
            Cursor& c = cur[size_t(r - r0)];
            const int64_t end = rowptr[r + 1];
            while (c.pos < end) {
                int cnt = 0;
                for (; c.pos < end && cnt < kDecode; ++c.pos) {
                    const int64_t next = c.col + int64_t(gaps[c.pos]) + 1;
                    if (next >= k1) break;
                    c.col = next;
                    cols[cnt] = next;  // written always, kept only for a stored entry: no branch
                    vals[cnt] = cb[codes[c.pos]];
                    cnt += int(codes[c.pos]) != f;
                }
                if (cnt) axpy_all(cols, vals, cnt, X, b, Y + r * b);
                if (c.pos < end && c.col + int64_t(gaps[c.pos]) + 1 >= k1) break;  // the rest: later blocks
            }
            if (c.pos == end && c.col != -2) {
                c.col = -2;  // counted once
                --left;
            }
        }
    }
}

inline int team_size(int threads, int64_t work) {
    return work < kParallelMinWork ? 1 : dnnpar::team_size(threads, dnnpar::kParallelMinWork);
}

template <bool Mask>
void spmv_rows(int64_t m, const int64_t* rowptr, const uint8_t* gaps, const uint8_t* codes,
               const float* codebook, int filler, const float* x, float* y, int threads) {
    const int64_t work = rowptr[m];
    const int team = team_size(threads, work);
    const int64_t pairs = m / 2;
    dnnpar::parallel_for_dynamic(team, pairs, kRowChunk / 2, [&](int64_t pr) {
        const int64_t r = 2 * pr, lo = rowptr[r], mid = rowptr[r + 1], hi = rowptr[r + 2];
        row_pair_dot<Mask>(gaps + lo, codes + lo, mid - lo, gaps + mid, codes + mid, hi - mid, codebook, x, y + r,
                           filler);
    });
    if (m % 2) {
        const int64_t lo = rowptr[m - 1];
        y[m - 1] = row_dot<Mask>(gaps + lo, codes + lo, rowptr[m] - lo, codebook, x, filler);
    }
}

}  // namespace

DNNPAR_CPU_COMMON_EXPORTS(5)

extern "C" {


// y[M] = A x[K], on `threads` threads (0: the pool's default); rows in pairs; `filler`: the
// code whose entries are skipped (-1: none; the caller may pass -1 when x is all finite)
void dnnpar_csr_cb_spmv(int64_t m, const int64_t* rowptr, const uint8_t* gaps, const uint8_t* codes,
                        const float* codebook, int filler, const float* x, float* y, int threads) {
    if (filler >= 0)
        spmv_rows<true>(m, rowptr, gaps, codes, codebook, filler, x, y, threads);
    else
        spmv_rows<false>(m, rowptr, gaps, codes, codebook, filler, x, y, threads);
}

// Y[M, B] = A X[K, B], both row-major, on `threads` threads (0: the pool's default); entries of
// code `filler` are skipped (-1: none)
void dnnpar_csr_cb_spmm(int64_t m, int64_t b, const int64_t* rowptr, const uint8_t* gaps,
                        const uint8_t* codes, const float* codebook, int filler, const float* X, float* Y,
                        int threads) {
    const int64_t work = rowptr[m] * b;
    const int team = team_size(threads, work);
    const int64_t row_bytes = b * int64_t(sizeof(float));
    const int64_t kb = std::max<int64_t>(8, kBlockBytes / row_bytes);  // X columns per block
    // rows per group: L2's share, but at least 4 groups per thread where the matrix allows
    const int64_t rg = std::max<int64_t>(1, std::min(kBlockBytes / row_bytes, (m + 4 * team - 1) / (4 * team)));
    dnnpar::parallel_for_dynamic(team, (m + rg - 1) / rg, 1, [&](int64_t g) {
        spmm_group(g * rg, std::min(m, (g + 1) * rg), b, kb, rowptr, gaps, codes, codebook, filler, X, Y);
    });
}

}  // extern "C"
