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
//   y = A x  : dnnpar_csr_cb_spmv, one dot product per row (x, K floats, stays in cache): with
//              AVX-512, sixteen entries per step (columns by an in-register prefix sum, x by
//              gather, weights by a register permute for codebooks of up to 32 codes); without,
//              a scalar loop over two rows at a time
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

#include <unistd.h>

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

#if defined(__AVX512F__) && defined(__AVX512BW__)
// AVX-512: sixteen entries per step. Their columns are an inclusive prefix sum of (gap + 1) over
// the sixteen lanes (four shift-and-add steps) plus the previous step's last column; x is read
// with one gather, the weights with one two-register permute when every code is below 32 (fc
// layers' 5-bit codebooks; else a gather from the 256-entry codebook, which stays in L1). The
// only serial dependency between steps is one vector add (the running column). Lanes past the
// row's end are masked off in every load, so nothing beyond the row's streams is read.
// Two accumulators per row, summed at the end: the row's sum is in a fixed order, the same
// on every thread count (per lane: entries 16t + l in turn; then a fixed lane tree).
// The gap and code streams prefetched this many bytes ahead: a cold matrix comes from DRAM,
// and a thread's rows are chunks of a few tens of KB that the hardware prefetcher (which stops
// at 4 KB pages) would start on afresh. Prefetching past the row is harmless (no fault).
constexpr int kStreamAhead = 1024;

// Of sixteen entries (lanes `live`; the rest read as gap 0): the inclusive prefix sum of
// gap + 1, lane by lane -- add the previous entry's column to get each entry's column.
inline __m512i gap_offsets16(const uint8_t* g, __mmask16 live) {
    const __m512i zero = _mm512_setzero_si512();
    __m512i s = _mm512_add_epi32(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live, g)), _mm512_set1_epi32(1));
    s = _mm512_add_epi32(s, _mm512_alignr_epi32(s, zero, 15));
    s = _mm512_add_epi32(s, _mm512_alignr_epi32(s, zero, 14));
    s = _mm512_add_epi32(s, _mm512_alignr_epi32(s, zero, 12));
    return _mm512_add_epi32(s, _mm512_alignr_epi32(s, zero, 8));
}

template <bool Mask, bool Small>
inline float row_dot16(const uint8_t* __restrict g, const uint8_t* __restrict c, int64_t n,
                       const float* __restrict cb, const float* __restrict x, int f) {
    const __m512i last = _mm512_set1_epi32(15);
    const __m512i filler = _mm512_set1_epi32(f);
    const __m512 cblo = _mm512_loadu_ps(cb), cbhi = _mm512_loadu_ps(cb + 16);
    __m512i base = _mm512_set1_epi32(-1);  // the previous entry's column, in every lane
    __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
    auto step = [&](__mmask16 live_lanes, int64_t i, __m512& acc) {
        const __m512i s = gap_offsets16(g + i, live_lanes);
        const __m512i col = _mm512_add_epi32(base, s);
        base = _mm512_add_epi32(base, _mm512_permutexvar_epi32(last, s));
        const __m512i code = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(live_lanes, c + i));
        __mmask16 use = live_lanes;
        if (Mask) use &= _mm512_cmpneq_epi32_mask(code, filler);
        const __m512 xv = _mm512_mask_i32gather_ps(_mm512_setzero_ps(), use, col, x, 4);
        const __m512 w = Small ? _mm512_permutex2var_ps(cblo, code, cbhi)
                               : _mm512_i32gather_ps(code, cb, 4);
        acc = _mm512_mask3_fmadd_ps(w, xv, acc, use);  // lanes past the row (w: codebook[0]) add nothing
    };
    int64_t i = 0;
    for (; i + 32 <= n; i += 32) {
        _mm_prefetch(reinterpret_cast<const char*>(g + i) + kStreamAhead, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(c + i) + kStreamAhead, _MM_HINT_T0);
        step(0xFFFF, i, acc0);
        step(0xFFFF, i + 16, acc1);
    }
    if (i + 16 <= n) {
        step(0xFFFF, i, acc0);
        i += 16;
    }
    if (i < n) step(__mmask16((1u << (n - i)) - 1), i, acc1);
    return _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1));
}
#endif

// Eight floats in one vector register (GCC / Clang vector extension: ymm with AVX, two xmm
// with SSE, NEON pairs on ARM). X rows are read with memcpy, so no alignment is assumed.
typedef float f8 __attribute__((vector_size(32)));

// Stored entries decoded at a time by the SpMM (columns and codebook values on the stack).
constexpr int kDecode = 256;
// SpMM blocking: a group of output rows (their Y rows, the accumulators between blocks) and a
// block of X's columns (the X rows their entries read) of about a quarter of this core's L2 each,
// both L2-resident while a group's rows run over one block; every X row a group touches comes
// from L3 once per group instead of once per entry (X is 6.4 MB at fc6 batch 64, its rows
// random). Measured at fc6 batch 64: on a 512 KB L2 (Zen 4) 128 KB was among the fastest of
// 64 KB .. 1 MB; on a 2 MB L2 (Xeon, AVX-512), 2 threads, 512 KB ran 8.5-9.2 ms against
// 9.3 ms at 128 KB in three alternating builds (and 256 KB as 512 KB, 1 MB 6% slower, in one
// sweep). Unknown L2 (sysconf says 0): 512 KB assumed.
inline int64_t block_bytes() {
    static const int64_t bytes = [] {
        const long l2 = sysconf(_SC_LEVEL2_CACHE_SIZE);
        return std::min<int64_t>(1 << 20, std::max<int64_t>(64 << 10, (l2 > 0 ? l2 : 512 << 10) / 4));
    }();
    return bytes;
}
// X rows prefetched this many stored entries ahead (no hardware prefetcher can guess them).
constexpr int kPrefetchAhead = 8;

// 8 * NV columns of one output row, accumulated into y (read and written back: the row's
// partial sums between column blocks): one axpy per stored entry, in the entries' order.
template <int NV>
inline void axpy_rows(const int32_t* __restrict cols, const float* __restrict vals, int cnt,
                      const float* __restrict X, int64_t ldx, float* __restrict y) {
    f8 acc[NV];
    std::memcpy(acc, y, sizeof acc);
    for (int i = 0; i < cnt; ++i) {
        if (i + kPrefetchAhead < cnt) {
            const char* ahead = reinterpret_cast<const char*>(X + int64_t(cols[i + kPrefetchAhead]) * ldx);
            for (int o = 0; o < NV * 32; o += 64) __builtin_prefetch(ahead + o);
        }
        const float* xr = X + int64_t(cols[i]) * ldx;
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
inline void axpy_tail(const int32_t* __restrict cols, const float* __restrict vals, int cnt,
                      const float* __restrict X, int64_t ldx, float* __restrict y, int w) {
    float acc[8];
    for (int j = 0; j < w; ++j) acc[j] = y[j];
    for (int i = 0; i < cnt; ++i) {
        const float* xr = X + int64_t(cols[i]) * ldx;
        for (int j = 0; j < w; ++j) acc[j] += vals[i] * xr[j];
    }
    for (int j = 0; j < w; ++j) y[j] = acc[j];
}

// Every B column of one output row y += the chunk's entries (64 / 32 / 16 / 8 at a time, then the tail).
inline void axpy_all(const int32_t* cols, const float* vals, int cnt, const float* X, int64_t b, float* y) {
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

// One row's entries from its cursor on, while their column is below k1 and the buffers have
// room: columns (relative to the block's first, k0: small ints whatever K is) into cols, weights
// into vals, fillers dropped. Returns how many were kept; `crossed`: the row stopped at k1 (its
// rest belongs to later blocks) rather than at its end or a full buffer.
inline int decode_scalar(Cursor& c, int64_t end, int64_t k0, int64_t k1, const uint8_t* gaps, const uint8_t* codes,
                         const float* cb, int f, int32_t* cols, float* vals, bool& crossed) {
    int cnt = 0;
    crossed = false;
    for (; c.pos < end && cnt < kDecode; ++c.pos) {
        const int64_t next = c.col + int64_t(gaps[c.pos]) + 1;
        if (next >= k1) {
            crossed = true;
            break;
        }
        c.col = next;
        cols[cnt] = int32_t(next - k0);  // written always, kept only for a stored entry: no branch
        vals[cnt] = cb[codes[c.pos]];
        cnt += int(codes[c.pos]) != f;
    }
    return cnt;
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// The same, sixteen entries per step as in row_dot16 (columns by prefix sum; weights by permute
// when every code is below 32, else by gather), the kept lanes compressed into the buffers. A
// step's lanes at or past k1 end the row's turn in this block; the cursor stops at the first.
template <bool Small>
inline int decode16(Cursor& c, int64_t end, int64_t k0, int64_t k1, const uint8_t* gaps, const uint8_t* codes,
                    const float* cb, int f, int32_t* cols, float* vals, bool& crossed) {
    const __m512i filler = _mm512_set1_epi32(f);
    const __m512i lim = _mm512_set1_epi32(int32_t(k1 - k0));
    const __m512 cblo = _mm512_loadu_ps(cb), cbhi = _mm512_loadu_ps(cb + 16);
    __m512i base = _mm512_set1_epi32(int32_t(c.col - k0));  // >= -256: the next entry is at k0 or later
    int cnt = 0;
    crossed = false;
    while (c.pos < end && cnt <= kDecode - 16) {
        const int64_t rem = end - c.pos;
        const __mmask16 lv = rem >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << rem) - 1);
        const __m512i col = _mm512_add_epi32(base, gap_offsets16(gaps + c.pos, lv));
        const __mmask16 in = lv & _mm512_cmplt_epi32_mask(col, lim);  // a prefix of lv: columns only grow
        const __m512i code = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(in, codes + c.pos));
        const __mmask16 keep = in & _mm512_cmpneq_epi32_mask(code, filler);
        const __m512 w = Small ? _mm512_permutex2var_ps(cblo, code, cbhi)
                               : _mm512_mask_i32gather_ps(_mm512_setzero_ps(), keep, code, cb, 4);
        _mm512_storeu_si512(cols + cnt, _mm512_maskz_compress_epi32(keep, col));
        _mm512_storeu_ps(vals + cnt, _mm512_maskz_compress_ps(keep, w));
        cnt += __builtin_popcount(keep);
        const int taken = __builtin_popcount(in);
        c.pos += taken;
        if (taken) base = _mm512_permutexvar_epi32(_mm512_set1_epi32(taken - 1), col);
        if (in != lv) {
            crossed = true;
            break;
        }
    }
    c.col = k0 + _mm512_cvtsi512_si32(base);
    return cnt;
}
#endif

// Rows [r0, r1) of Y = A X, column block by column block: each row's entries below column
// k1 are decoded (up to kDecode at a time; fillers dropped) and added into its Y row.
template <class Decode>
inline void spmm_group(int64_t r0, int64_t r1, int64_t b, int64_t kb, const int64_t* rowptr, const uint8_t* gaps,
                       const uint8_t* codes, const float* cb, int f, const float* X, float* Y, Decode decode) {
    std::vector<Cursor> cur(size_t(r1 - r0));
    int64_t left = 0;  // rows with entries still to run
    for (int64_t r = r0; r < r1; ++r) {
        const bool some = rowptr[r + 1] > rowptr[r];
        cur[size_t(r - r0)] = Cursor{rowptr[r], -1};
        left += some;
        std::memset(Y + r * b, 0, size_t(b) * sizeof(float));
    }
    alignas(64) int32_t cols[kDecode];
    alignas(64) float vals[kDecode];
    for (int64_t k0 = 0; left > 0; k0 += kb) {
        const int64_t k1 = k0 + kb;
        const float* Xb = X + k0 * b;  // the block's first X row: cols are relative to it
        for (int64_t r = r0; r < r1; ++r) {
            Cursor& c = cur[size_t(r - r0)];
            const int64_t end = rowptr[r + 1];
            if (c.pos == end) continue;
            bool crossed = false;
            while (c.pos < end && !crossed) {
                const int cnt = decode(c, end, k0, k1, gaps, codes, cb, f, cols, vals, crossed);
                if (cnt) axpy_all(cols, vals, cnt, Xb, b, Y + r * b);
            }
            left -= c.pos == end;  // counted once: a finished row is skipped from now on
        }
    }
}

inline int team_size(int threads, int64_t work) {
    return work < kParallelMinWork ? 1 : dnnpar::team_size(threads, dnnpar::kParallelMinWork);
}

template <bool Mask>
void spmv_rows(int64_t m, const int64_t* rowptr, const uint8_t* gaps, const uint8_t* codes,
               const float* codebook, int ncodes, int filler, const float* x, float* y, int threads) {
    const int64_t work = rowptr[m];
    const int team = team_size(threads, work);
#if defined(__AVX512F__) && defined(__AVX512BW__)
    auto rows16 = [&](auto small) {
        dnnpar::parallel_for_dynamic(team, m, kRowChunk, [&](int64_t r) {
            const int64_t lo = rowptr[r];
            y[r] = row_dot16<Mask, decltype(small)::value>(gaps + lo, codes + lo, rowptr[r + 1] - lo, codebook, x,
                                                           filler);
        });
    };
    if (ncodes <= 32)
        rows16(std::true_type{});
    else
        rows16(std::false_type{});
#else
    (void)ncodes;
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
#endif
}

}  // namespace

DNNPAR_CPU_COMMON_EXPORTS(6)

extern "C" {


// y[M] = A x[K], on `threads` threads (0: the pool's default); `ncodes`: one past the largest
// code of any entry (CompactCSR.code_span: up to 32, the AVX-512 loop holds the codebook in two
// registers); `filler`: the code whose entries are skipped (-1: none; the caller may pass -1
// when x is all finite)
void dnnpar_csr_cb_spmv(int64_t m, const int64_t* rowptr, const uint8_t* gaps, const uint8_t* codes,
                        const float* codebook, int ncodes, int filler, const float* x, float* y, int threads) {
    if (filler >= 0)
        spmv_rows<true>(m, rowptr, gaps, codes, codebook, ncodes, filler, x, y, threads);
    else
        spmv_rows<false>(m, rowptr, gaps, codes, codebook, ncodes, filler, x, y, threads);
}

// Y[M, B] = A X[K, B], both row-major, on `threads` threads (0: the pool's default); `ncodes`
// as for the SpMV; entries of code `filler` are skipped (-1: none)
void dnnpar_csr_cb_spmm(int64_t m, int64_t b, const int64_t* rowptr, const uint8_t* gaps,
                        const uint8_t* codes, const float* codebook, int ncodes, int filler, const float* X, float* Y,
                        int threads) {
    const int64_t work = rowptr[m] * b;
    const int team = team_size(threads, work);
    const int64_t row_bytes = b * int64_t(sizeof(float));
    const int64_t block = block_bytes();
    const int64_t kb = std::max<int64_t>(8, block / row_bytes);  // X columns per block
    // rows per group: L2's share, but at least 4 groups per thread where the matrix allows
    const int64_t rg = std::max<int64_t>(1, std::min(block / row_bytes, (m + 4 * team - 1) / (4 * team)));
    auto groups = [&](auto decode) {
        dnnpar::parallel_for_dynamic(team, (m + rg - 1) / rg, 1, [&](int64_t g) {
            spmm_group(g * rg, std::min(m, (g + 1) * rg), b, kb, rowptr, gaps, codes, codebook, filler, X, Y, decode);
        });
    };
#if defined(__AVX512F__) && defined(__AVX512BW__)
    if (ncodes <= 32)
        groups(decode16<true>);
    else
        groups(decode16<false>);
#else
    (void)ncodes;
    groups(decode_scalar);
#endif
}

}  // extern "C"
