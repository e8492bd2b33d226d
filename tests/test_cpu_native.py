"""The numpy backend's native CSR x codebook kernel (dnnpar/cpu/csr_codebook.cpp) against float64
oracles, the compact format it reads (uint8 gaps with fillers, uint8 codes), and the fallback to
SciPy / NumPy when no C++ compiler can build it."""
import textwrap

import numpy as np
import pytest

import dnnpar as dp
import dnnpar.ops.sparse as S
from conftest import native_backend, run_in_threads, run_json_script
from oracles import assert_sum_close
from dnnpar.backend import cpu_native, poison_outputs
from dnnpar.compress import relative_csr


# (M, K, density): size 1, primes, empty rows, dense rows, and rows whose gaps exceed 255 (fillers)
SHAPES = [(1, 1, 1.0), (7, 13, 0.4), (131, 257, 0.05), (64, 300, 0.5), (33, 1000, 0.01), (5, 2003, 0.002),
          (1, 4099, 0.001), (211, 1409, 0.03), (300, 5000, 0.05)]  # the last two run on several threads
SHAPE_IDS = [f"{m}x{k}d{d}" for m, k, d in SHAPES]

# codebooks: Deep Compression's (entry 0 is 0.0, 32 entries), one without a 0.0 (fillers point at
# the zero padding), and a full 256-entry one whose 0.0 sits in the middle
CODEBOOKS = {
    "dc32": np.concatenate([[0.0], np.linspace(-1.5, 2.0, 31)]).astype(np.float32),
    "nozero37": np.linspace(-1.5, 2.0, 37).astype(np.float32),
    "full256": np.where(np.arange(256) == 100, 0.0, np.linspace(-3.0, 3.0, 256) + 0.01).astype(np.float32),
}


@pytest.fixture
def native():
    """The kernel library; skipped (with the reason) where it cannot be built."""
    lib = cpu_native.library()
    if lib is None:
        pytest.skip(f"native CPU kernel unavailable: {cpu_native.unavailable_reason()}")
    with dp.use_backend("numpy") as be:
        yield be


def make(rng, m, k, density, codebook, long_row=True):
    """A codebook CSR with an empty row (and one full row), and its float64 dense oracle. Codes
    never point at a 0.0 entry, so every stored entry is a nonzero of the oracle."""
    mask = rng.random((m, k)) < density
    if m > 2:
        mask[1] = False
    if long_row and m > 4:
        mask[m // 2] = True
    live = np.flatnonzero(codebook != 0.0)
    codes = np.where(mask, live[rng.integers(0, live.size, (m, k))], 0).astype(np.uint8)
    rows, cols = np.nonzero(mask)
    indptr = np.zeros(m + 1, np.int64)
    np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
    csr = dp.sparse.CSR(codes[rows, cols], cols.astype(np.int32), indptr.astype(np.int32), (m, k), codebook=codebook)
    return csr, np.where(mask, codebook[codes], 0.0).astype(np.float64)


def assert_row_sums(got, dense, x, what):
    """Against the float64 product, within the classic bound of a float32 sum in any fixed order
    (oracles.worst_sum_bound), row by row: a row that cancels to near zero cannot fail it by rounding
    alone; a wrong column, code or row fails it by far."""
    x64 = np.asarray(x, np.float64)
    n = max(1, int(np.count_nonzero(dense, axis=1).max()))
    assert_sum_close(np.asarray(got), dense @ x64, np.abs(dense) @ np.abs(x64), n, what)


def randn(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)


def max_gap(csr):
    ind, ptr = csr.indices.astype(np.int64), csr.indptr.astype(np.int64)
    gaps = [np.diff(np.concatenate([[-1], ind[a:b]])) - 1 for a, b in zip(ptr[:-1], ptr[1:]) if b > a]
    return max((int(g.max()) for g in gaps), default=0)


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("cb", list(CODEBOOKS), ids=list(CODEBOOKS))
def test_spmv(native, shape, cb, rng):
    m, k, density = shape
    csr, dense = make(rng, m, k, density, CODEBOOKS[cb])
    assert S.native_form(csr, np.zeros(k, np.float32)) is not None, "the native kernel was not used"
    if max_gap(csr) > 255:
        assert csr.compact().fillers > 0
    x = randn(rng, k)
    assert_row_sums(dp.ops.spmv(csr, x), dense, x, "native spmv")


@pytest.mark.parametrize("shape", SHAPES, ids=SHAPE_IDS)
@pytest.mark.parametrize("batch", [1, 33, 70])
@pytest.mark.parametrize("cb", list(CODEBOOKS), ids=list(CODEBOOKS))
def test_spmm(native, shape, batch, cb, rng):
    m, k, density = shape
    csr, dense = make(rng, m, k, density, CODEBOOKS[cb])
    X = randn(rng, (k, batch))
    assert S.native_form(csr, X) is not None
    assert_row_sums(dp.ops.spmm(csr, X), dense, X, "native spmm")


@pytest.mark.parametrize("batch", [2, 7, 8, 9, 16, 24, 31, 64, 65, 128, 130, 1031])
def test_spmm_every_batch_chunk(native, batch, rng):
    """Batch widths that hit each vector chunk (64 / 32 / 16 / 8 columns) and the scalar tail;
    the widest makes X's column blocks 31 columns wide (rows resume in 20 blocks); at the narrow
    ones the full row's 611 entries overflow the 256-entry decode buffer within one block."""
    csr, dense = make(rng, 37, 611, 0.1, CODEBOOKS["dc32"])
    X = randn(rng, (611, batch))
    assert_row_sums(dp.ops.spmm(csr, X), dense, X, f"native spmm batch {batch}")


@pytest.mark.parametrize("ncodes,k", [(2, 256), (16, 256), (32, 256), (33, 256), (31, 2003), (32, 2003), (255, 2003)])
def test_spmv_every_row_length_and_codebook_width(native, ncodes, k, rng):
    """Rows of every length 0..99 (the AVX-512 loop takes 32 entries per turn, 16 per step, the
    last step masked) and codebooks that fit two vector registers (up to 32 codes: a permute) or
    not (33 and more: a gather), every code in use; with K = 256 no gap needs a filler, with
    K = 2003 the short rows' do (a filler takes one more code: 31 + 1 still fits the registers).
    A code read through the wrong path, a lane of the column prefix sum or the tail mask off by
    one fails; so does a filler that lets a NaN of x through, in the SpMV or the SpMM."""
    m = 100
    cb = np.linspace(-2.0, 3.0, ncodes).astype(np.float32)
    cb[cb == 0.0] = 0.5
    ptr = np.zeros(m + 1, np.int64)
    ptr[1:] = np.cumsum(np.arange(m))
    cols = np.concatenate([np.sort(rng.choice(k, size=r, replace=False)) for r in range(m)]).astype(np.int32)
    codes = (np.arange(cols.size) % ncodes).astype(np.uint8)
    csr = dp.sparse.CSR(codes, cols, ptr.astype(np.int32), (m, k), codebook=cb)
    c = csr.compact()
    assert (c.fillers > 0) == (k > 256) and c.code_span == ncodes + (c.fillers > 0)
    dense = np.zeros((m, k))
    dense[np.repeat(np.arange(m), np.arange(m)), cols] = cb[codes]
    x = randn(rng, k)
    assert_row_sums(dp.ops.spmv(csr, x), dense, x, f"spmv, {ncodes} codes")
    x[::7] = np.nan
    if c.fillers:  # some filler sits on a NaN of x: it must still add nothing
        at = relative_csr.columns(c.rowptr, c.gaps, k)[c.codes == c.filler_code]
        assert np.isnan(x[at]).any()
    y = dp.ops.spmv(csr, x)
    reads_nan = (dense != 0) @ np.isnan(x) > 0
    assert np.array_equal(np.isnan(y), reads_nan)
    clean = np.where(np.isnan(x), 0.0, x)
    assert_row_sums(y[~reads_nan], dense[~reads_nan], clean, "rows that read no NaN")
    # the SpMM decodes the same streams (the same two paths) block by block: NaN rows of X too
    X = randn(rng, (k, 9))
    X[::7] = np.nan
    Y = dp.ops.spmm(csr, X)
    assert np.array_equal(np.isnan(Y).any(axis=1), reads_nan) and np.array_equal(np.isnan(Y).all(axis=1), reads_nan)
    assert_row_sums(Y[~reads_nan], dense[~reads_nan], np.where(np.isnan(X), 0.0, X), "spmm, rows that read no NaN")


@pytest.mark.parametrize("ncodes", [3, 40])
def test_an_unused_infinite_code_never_reaches_the_sum(native, ncodes, rng):
    """Code 0 of the codebook is inf and no entry uses it: the vector loops' lanes past a row's
    end (which read code 0) must add nothing, by the permute (3 codes) or the gather (40)."""
    m, k = 37, 200
    cb = np.linspace(1.0, 2.0, ncodes).astype(np.float32)
    cb[0] = 0.0  # make() draws codes among the nonzero entries: never code 0
    plain, dense = make(rng, m, k, 0.3, cb)
    cb[0] = np.inf
    csr = dp.sparse.CSR(plain.data, plain.indices, plain.indptr, (m, k), codebook=cb)
    assert csr.compact().fillers == 0 and not (csr.compact().codes == 0).any()
    x, X = randn(rng, k), randn(rng, (k, 5))
    assert_row_sums(dp.ops.spmv(csr, x), dense, x, "spmv")
    assert_row_sums(dp.ops.spmm(csr, X), dense, X, "spmm")


def test_result_does_not_depend_on_threads(native, rng):
    """Each row is summed by one thread in a fixed order: 1, 2 or 3 threads give the same bits."""
    csr, _ = make(rng, 400, 3001, 0.05, CODEBOOKS["dc32"])
    c = csr.compact()
    x, X = randn(rng, 3001), randn(rng, (3001, 19))
    ys = [cpu_native.spmv(c, x, np.empty(400, np.float32), threads=t) for t in (1, 2, 3)]
    Ys = [cpu_native.spmm(c, X, np.empty((400, 19), np.float32), threads=t) for t in (1, 2, 3)]
    for y in ys[1:]:
        np.testing.assert_array_equal(y, ys[0])
    for Y in Ys[1:]:
        np.testing.assert_array_equal(Y, Ys[0])
    with pytest.raises(ValueError, match="threads"):
        cpu_native.spmv(c, x, np.empty(400, np.float32), threads=0)


def decode(c):
    """The dense matrix of a CompactCSR, from its streams alone (fillers add 0.0)."""
    m, k = c.shape
    out = np.zeros((m, k), np.float64)
    for r in range(m):
        lo, hi = c.rowptr[r], c.rowptr[r + 1]
        cols = np.cumsum(c.gaps[lo:hi].astype(np.int64) + 1) - 1
        assert cols.size == 0 or cols[-1] < k
        np.add.at(out[r], cols, c.codebook[c.codes[lo:hi]].astype(np.float64))
    return out


@pytest.mark.parametrize("cb", list(CODEBOOKS), ids=list(CODEBOOKS))
def test_compact_format(cb, rng):
    """Two bytes per entry, gaps of at most 255 bridged by fillers that point at a 0.0, and the
    streams decode to the same matrix."""
    codebook = CODEBOOKS[cb]
    with dp.use_backend("numpy"):
        csr, dense = make(rng, 23, 3000, 0.01, codebook)
        c = csr.compact()
    assert c is csr.compact(), "the compact form is built once and cached"
    assert c.rowptr.dtype == np.int64 and c.gaps.dtype == np.uint8 and c.codes.dtype == np.uint8
    assert c.codebook.shape == (256,) and c.codebook.dtype == np.float32
    assert c.entries == csr.nnz + c.fillers and c.rowptr[-1] == c.entries
    assert c.fillers > 0 and c.codebook[c.filler_code] == 0.0
    if cb == "dc32":
        assert c.filler_code == 0, "Deep Compression's convention: code 0 is the zero"
    assert np.all(c.gaps[c.codes == c.filler_code] == 255)
    assert c.bytes_per_nonzero() == (2 * c.entries + 8 * (c.shape[0] + 1) + 4 * 256) / csr.nnz
    np.testing.assert_array_equal(decode(c), dense)


def test_compact_sorts_columns_and_refuses_duplicates(native, rng):
    """CSR does not require sorted columns: the compact form sorts each row. A column repeated
    within a row has no gap encoding: no compact form, and SciPy sums the duplicates."""
    cb = CODEBOOKS["dc32"]
    indptr = np.array([0, 3, 3, 6], np.int32)
    indices = np.array([700, 2, 300, 5, 1, 999], np.int32)
    codes = np.array([3, 4, 5, 6, 7, 8], np.uint8)
    dense = np.zeros((3, 1000))
    dense[[0, 0, 0, 2, 2, 2], indices] = cb[codes]
    csr = dp.sparse.CSR(codes, indices, indptr, (3, 1000), codebook=cb)
    c = csr.compact()
    # row 0 sorted: 2, 300, 700 (gaps 2, 297, 399: a filler each); row 2: 1, 5, 999 (gap 993: 3 fillers)
    assert c is not None and c.fillers == 5
    np.testing.assert_array_equal(c.gaps, [2, 255, 41, 255, 143, 1, 3, 255, 255, 255, 225])
    x = randn(rng, 1000)
    assert_row_sums(dp.ops.spmv(csr, x), dense, x, "unsorted rows")

    dup = dp.sparse.CSR(codes[:3], np.array([4, 9, 4], np.int32), np.array([0, 3], np.int32), (1, 10), codebook=cb)
    assert dup.compact() is None and S.native_form(dup, np.zeros(10, np.float32)) is None
    x = randn(rng, 10)
    want = (cb[3] + cb[5]) * x[4].astype(np.float64) + cb[4] * x[9]
    if dup.scipy() is not None:
        mag = (abs(cb[3]) + abs(cb[5])) * abs(x[4].astype(np.float64)) + abs(cb[4] * x[9].astype(np.float64))
        assert_sum_close(dp.ops.spmv(dup, x), np.array([want]), np.array([mag]), 3, "duplicates summed")


def test_fillers_take_a_code_no_stored_entry_uses(native, rng):
    """A filler's code is one no stored entry uses (its entry in the compact form's private
    codebook set to 0.0), so the kernel tells fillers from stored entries and skips them: an inf
    or NaN in x where only a filler lands leaves the row finite, as in SciPy. When every one of
    the 256 codes is stored and a gap needs fillers, there is no such code: no compact form, and
    the product runs in SciPy / NumPy; a matrix that needs no fillers still runs natively."""
    cb = np.linspace(0.5, 3.0, 256).astype(np.float32)  # no 0.0 at all
    m, k = 2, 1000
    cols = np.concatenate([np.arange(256), [0, 700]]).astype(np.int32)  # row 1: a gap of 699 zeros
    codes = np.concatenate([np.arange(256), [7, 9]]).astype(np.uint8)
    ptr = np.array([0, 256, 258], np.int32)
    dense = np.zeros((m, k))
    dense[np.repeat([0, 1], [256, 2]), cols] = cb[codes]
    every_code = dp.sparse.CSR(codes, cols, ptr, (m, k), codebook=cb)
    assert every_code.compact() is None and S.native_form(every_code, np.zeros(k, np.float32)) is None
    x = randn(rng, k)
    assert_row_sums(dp.ops.spmv(every_code, x), dense, x, "fallback")

    codes[100] = 101  # code 100 is now free: the fillers take it
    dense[0, 100] = cb[101]
    csr = dp.sparse.CSR(codes, cols, ptr, (m, k), codebook=cb)
    c = csr.compact()
    assert c is not None and c.fillers == 2 and c.filler_code == 100 and c.codebook[100] == 0.0
    assert S.native_form(csr, x) is c
    x[[256, 512]] = [np.inf, np.nan]  # where row 1's fillers land; no stored entry is there
    y = dp.ops.spmv(csr, x)
    assert np.all(np.isfinite(y))
    assert_row_sums(y, dense, np.where(np.isfinite(x), x, 0), "fillers skipped")
    Y = dp.ops.spmm(csr, np.repeat(x[:, None], 9, axis=1))
    for j in (3, 8):  # a vector lane and the scalar tail
        assert_row_sums(Y[:, j], dense, np.where(np.isfinite(x), x, 0), f"spmm column {j}")
    x[0] = np.inf  # a stored column: that row is inf in every path, as in a dense product
    assert np.isinf(dp.ops.spmv(csr, x)).all()

    few, dense_b = make(rng, 9, 200, 0.5, cb)
    assert few.compact() is not None and few.compact().fillers == 0 and few.compact().filler_code == -1
    x = randn(rng, 200)
    assert_row_sums(dp.ops.spmv(few, x), dense_b, x, "native, no fillers")


def file_streams(rng, m, k, density, bits=5):
    """A .dnnz layer's entry streams as the reader hands them over (relative indices of ``bits``
    bits, fillers of code 0 every 2^bits - 1 zeros, as uint8), its codebook and dense oracle;
    row 1 empty, and every third column never stored (fillers may land there)."""
    cb = np.concatenate([[0.0], np.linspace(-1.5, 2.0, (1 << bits) - 1)]).astype(np.float32)
    mask = rng.random((m, k)) < density
    mask[1] = False
    mask[:, ::3] = False
    codes = np.where(mask, rng.integers(1, cb.size, (m, k)), 0).astype(np.uint16)
    r = relative_csr.encode(codes, bits)
    return r, cb, cb[codes].astype(np.float64)


def test_file_streams_run_in_the_kernel_as_they_are(native, monkeypatch, rng):
    """CSR.from_compact takes a .dnnz layer's streams (gaps of at most 31, fillers of code 0) as
    the kernel's form: the products run on those very buffers, never decode an absolute column
    or call the encoder, skip the fillers where x is NaN, and match the float64 oracle; the plain
    CSR arrays decoded on demand are the matrix's."""
    m, k = 37, 997
    r, cb, dense = file_streams(rng, m, k, 0.01)
    gaps, codes = r.rel.astype(np.uint8), r.codes.astype(np.uint8)
    c = dp.sparse.CompactCSR((m, k), r.indptr, gaps, codes, dp.sparse.padded_codebook(cb), r.fillers, 0)
    assert c.fillers > m, "the matrix must need fillers"
    csr = dp.sparse.CSR.from_compact(c, cb.size)
    for name in ("relative_stream", "relative_columns", "_compact"):
        monkeypatch.setattr(dp.sparse, name, lambda *a, **kw: pytest.fail("decoded or re-encoded"))
    assert S.native_form(csr, np.zeros(k, np.float32)) is c
    assert c.gaps is gaps and c.codes is codes and c.rowptr is r.indptr
    fill_cols = np.unique(relative_csr.columns(r.indptr, r.rel, k)[r.codes == 0])
    nan_at = fill_cols[fill_cols % 3 == 0]  # where fillers land and nothing is stored
    assert nan_at.size, "some filler must land on a never-stored column"
    x = randn(rng, k)
    x[nan_at] = np.nan
    y = dp.ops.spmv(csr, x)
    assert np.isfinite(y).all()
    clean = np.where(np.isnan(x), 0.0, x)
    assert_row_sums(y, dense, clean, "file streams, spmv")
    X = np.repeat(x[:, None], 67, axis=1) * np.linspace(0.5, 1.5, 67, dtype=np.float32)
    Y = dp.ops.spmm(csr, X)
    assert np.isfinite(Y).all()
    assert_row_sums(Y, dense, np.where(np.isnan(X), 0.0, X), "file streams, spmm")
    assert csr._indptr is None, "the products decoded absolute columns"
    monkeypatch.undo()
    plain = dp.sparse.CSR.from_dense(relative_csr.decode(r).astype(np.uint8), codebook=cb)
    for name in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(csr, name), getattr(plain, name), err_msg=name)
    assert csr.nnz == plain.nnz and csr.codebook.shape == (cb.size,)
    np.testing.assert_array_equal(csr.to_dense(), dense.astype(np.float32))
    monkeypatch.setitem(dp.sparse.NATIVE, "use", False)  # SciPy / NumPy on the decoded arrays
    assert S.native_form(csr, clean.astype(np.float32)) is None
    assert_row_sums(dp.ops.spmv(csr, clean.astype(np.float32)), dense, clean, "file streams, fallback")


def test_one_encoder_for_the_file_and_the_kernel(rng):
    """The kernel's compact form (gaps up to 255) and the .dnnz writer's stream at 8 index bits
    are the same stream: one encoder (relative_csr.relative_stream) writes both."""
    m, k = 29, 2003
    r, cb, dense = file_streams(rng, m, k, 0.004, bits=5)
    codes = relative_csr.decode(r)
    r8 = relative_csr.encode(codes, 8)
    assert r8.fillers > 0
    c = dp.sparse.CSR.from_dense(codes.astype(np.uint8), codebook=cb).compact()
    assert c.filler_code == 0 and c.fillers == r8.fillers
    np.testing.assert_array_equal(c.rowptr, r8.indptr)
    np.testing.assert_array_equal(c.gaps, r8.rel)
    np.testing.assert_array_equal(c.codes, r8.codes)


def test_other_operands_and_switch_stay_off_the_native_kernel(native, monkeypatch, rng):
    """float32 matrices, operands of another dtype and NATIVE["use"] = False take SciPy / NumPy;
    with SciPy off too, codebook products still run in NumPy."""
    csr, dense = make(rng, 31, 400, 0.1, CODEBOOKS["dc32"])
    assert S.native_form(csr, np.zeros(400)) is None
    f32 = dp.sparse.CSR.from_dense(dense.astype(np.float32))
    assert S.native_form(f32, np.zeros(400, np.float32)) is None
    with pytest.raises(TypeError, match="codebook"):
        f32.compact()
    monkeypatch.setitem(dp.sparse.NATIVE, "use", False)
    monkeypatch.setitem(dp.sparse.SCIPY, "use", False)
    assert S.native_form(csr, np.zeros(400, np.float32)) is None
    x, X = randn(rng, 400), randn(rng, (400, 5))
    assert_row_sums(dp.ops.spmv(csr, x), dense, x, "numpy spmv")
    assert_row_sums(dp.ops.spmm(csr, X), dense, X, "numpy spmm")


FALLBACK_SCRIPT = textwrap.dedent("""
    import json, os, warnings
    import numpy as np
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import dnnpar as dp
        from dnnpar.backend import cpu_native
        import dnnpar.ops.sparse as S
        dp.set_backend("numpy")
        cb = np.concatenate([[0.0], np.linspace(-1, 1, 31)]).astype(np.float32)
        rng = np.random.default_rng(0)
        codes = np.where(rng.random((40, 700)) < 0.02, rng.integers(1, 32, (40, 700)), 0).astype(np.uint8)
        csr = dp.sparse.CSR.from_dense(codes, codebook=cb)
        x = rng.standard_normal(700).astype(np.float32)
        X = rng.standard_normal((700, 3)).astype(np.float32)
        want, Want = cb[codes].astype(np.float64) @ x, cb[codes].astype(np.float64) @ X
        nu = (int(np.count_nonzero(codes, axis=1).max()) + 2) * 2.0**-24
        bound = lambda mag: nu / (1 - nu) * mag.astype(np.float64) + 1e-37
        y, Y = dp.ops.spmv(csr, x), dp.ops.spmm(csr, X)
        # depthwise 3x3, padding 1, against a float64 sum of shifted slices
        xd = rng.standard_normal((2, 3, 9, 8)).astype(np.float32)
        wd = rng.standard_normal((3, 1, 3, 3)).astype(np.float32)
        yd = dp.ops.depthwise_conv2d(xd, wd, padding=1)
        xp = np.pad(xd.astype(np.float64), ((0, 0), (0, 0), (1, 1), (1, 1)))
        taps = [(xp[:, :, i:i + 9, j:j + 8], wd[:, 0, i, j].astype(np.float64)[None, :, None, None])
                for i in range(3) for j in range(3)]
        want_d, mag_d = sum(a * b for a, b in taps), sum(np.abs(a * b) for a, b in taps)
        nu9 = 11 * 2.0**-24
    print(json.dumps({
        "library": cpu_native.library() is not None,
        "reason": cpu_native.unavailable_reason(),
        "native_form": S.native_form(csr, x) is not None,
        # the error in units of the float32 summation bound (tests/oracles.py: worst_sum_bound)
        "err": max(float(np.max(np.abs(y - want) / bound(np.abs(cb[codes]) @ np.abs(x)))),
                   float(np.max(np.abs(Y - Want) / bound(np.abs(cb[codes]) @ np.abs(X))))),
        "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
        "openmp_mapped": any(n in open("/proc/self/maps").read() for n in ("libgomp", "libomp", "libiomp")),
        "dw_library": cpu_native.library("depthwise") is not None,
        "dw_reason": cpu_native.unavailable_reason("depthwise"),
        "dw_err": float(np.max(np.abs(yd - want_d) / (nu9 / (1 - nu9) * mag_d + 1e-37))),
        "threads": cpu_native.threads("depthwise"),
        "blas": cpu_native.blas_threads(),
        "threads_rule": cpu_native.threads_rule(),
    }))
""")


def run_fallback(tmp_path, **env):
    return run_json_script(tmp_path, FALLBACK_SCRIPT, **env)


def test_fallback_without_compiler(tmp_path):
    """CXX names a compiler that does not exist: a warning says why, and the products run in
    SciPy / NumPy with the same results."""
    out = run_fallback(tmp_path, CXX=str(tmp_path / "no-such-c++"))
    assert not out["library"] and not out["native_form"]
    assert "not on PATH" in out["reason"] and "no-such-c++" in out["reason"]
    assert any("native CPU kernel" in w and "no-such-c++" in w for w in out["warnings"]), out["warnings"]
    assert out["err"] <= 1
    # the depthwise source takes the same path: its own warning, the NumPy loops, the same result
    assert not out["dw_library"] and "not on PATH" in out["dw_reason"] and out["dw_err"] <= 1
    assert any("depthwise convolution" in w and "uses NumPy" in w for w in out["warnings"]), out["warnings"]


def test_fallback_when_the_compiler_fails(tmp_path):
    """A compiler that exists but fails (every flag set): same fallback, nothing cached."""
    bad = tmp_path / "bad-c++"
    bad.write_text("#!/bin/sh\necho 'bad-c++: internal error' >&2\nexit 1\n")
    bad.chmod(0o755)
    out = run_fallback(tmp_path, CXX=str(bad))
    assert not out["library"] and "NativeBuildError" in out["reason"] and "internal error" in out["reason"]
    assert out["warnings"] and out["err"] <= 1
    assert not out["dw_library"] and "NativeBuildError" in out["dw_reason"] and out["dw_err"] <= 1
    assert not list((tmp_path / "cache" / "cpu").glob("*.so"))
    assert not list((tmp_path / "cache" / "cpu").glob("*.cpp")), "temporary sources are cleaned up"


def test_disabled_by_environment(tmp_path):
    out = run_fallback(tmp_path, DNNPAR_NATIVE="0")
    assert not out["library"] and out["reason"] == "DNNPAR_NATIVE=0 is set"
    assert out["dw_reason"] == "DNNPAR_NATIVE=0 is set" and not out["dw_library"]
    assert out["warnings"] == [] and out["err"] <= 1 and out["dw_err"] <= 1


@pytest.mark.skipif(cpu_native.library() is None, reason="no C++ compiler here")
def test_builds_into_a_fresh_cache(tmp_path):
    """A fresh cache directory: each source's library is compiled there, atomically (no stray
    files), no OpenMP runtime comes into the process (the threads are dnnpar/cpu/runtime.cpp's own
    pool), and the thread count is BLAS's (the thread rule of cpu_native)."""
    out = run_fallback(tmp_path)
    assert out["library"] and out["native_form"] and out["reason"] is None and out["err"] <= 1
    assert out["dw_library"] and out["dw_reason"] is None and out["dw_err"] <= 1
    assert not out["openmp_mapped"], "the native kernels must not load an OpenMP runtime"
    files = sorted(p.name for p in (tmp_path / "cache" / "cpu").iterdir())
    # the two kernel libraries and the runtime they share (its one thread pool)
    assert [f.split("-")[0] for f in files] == ["csr_codebook", "depthwise", "runtime"], files
    assert all(f.endswith(".so") for f in files), files
    if out["blas"] is not None:
        assert out["threads"] == out["blas"] and "BLAS" in out["threads_rule"], out


@pytest.mark.skipif(cpu_native.library() is None, reason="no C++ compiler here")
def test_blas_thread_setting_sets_the_kernels_too(tmp_path):
    """OPENBLAS_NUM_THREADS=1 is one knob for both pools."""
    out = run_fallback(tmp_path, OPENBLAS_NUM_THREADS="1")
    assert out["threads"] == 1 and out["blas"] == 1 and "BLAS" in out["threads_rule"], out


@pytest.mark.skipif(cpu_native.library("depthwise") is None, reason="no C++ compiler here")
def test_threadpool_limits_limits_the_kernels_at_each_call():
    from threadpoolctl import threadpool_limits

    before = cpu_native.threads("depthwise")
    with threadpool_limits(1):
        assert cpu_native.threads("depthwise") == 1
    assert cpu_native.threads("depthwise") == before
    one = np.ones((1, 1, 1, 1), np.float32)
    with pytest.raises(ValueError, match="threads must be a positive int"):
        cpu_native.depthwise_forward(one, one, None, one.copy(), (1,) * 10 + (0, 0), threads=0)


@pytest.mark.skipif(cpu_native.library("depthwise") is None, reason="no C++ compiler here")
def test_the_pool_under_team_changes_and_concurrent_callers(rng):
    """runtime.cpp's pool: teams of 1..5 threads in every order (more than this machine's cores,
    workers that slept through calls they had no part in), and four Python threads calling at
    once (ctypes drops the GIL; a caller that finds the pool busy runs the same partition on its
    own thread) -- every result bit-identical to a one-thread run, no call lost or run twice
    (the output is poisoned before each call)."""
    geo = (3, 37, 29, 31, 3, 3, 29, 31, 1, 1, 1, 1)
    x = rng.standard_normal(geo[:4], dtype=np.float32)
    w = rng.standard_normal((37, 1, 3, 3), dtype=np.float32)
    dy = rng.standard_normal((3, 37, 29, 31), dtype=np.float32)

    def fwd(t):
        y = np.full((3, 37, 29, 31), np.nan, np.float32)
        return cpu_native.depthwise_forward(x, w, None, y, geo, threads=t)

    def bwd(t):
        dx, dw = np.full_like(x, np.nan), np.full_like(w, np.nan)
        return cpu_native.depthwise_backward(x, w, dy, dx, dw, geo, threads=t)

    want_y, (want_dx, want_dw) = fwd(1), bwd(1)
    for t in (2, 5, 1, 3, 4, 2, 5, 2, 1, 4, 3, 5):
        np.testing.assert_array_equal(fwd(t), want_y)
        dx, dw = bwd(t)
        np.testing.assert_array_equal(dx, want_dx)
        np.testing.assert_array_equal(dw, want_dw)
    bad = []

    def hammer(i):
        for k in range(20):
            t = 1 + (i + k) % 4
            if not np.array_equal(fwd(t), want_y) or not np.array_equal(bwd(t)[1], want_dw):
                bad.append((i, k, t))
    run_in_threads(hammer, what="a native call")
    assert not bad, bad


# ---------------------------------------------------------------- depthwise convolution (dnnpar/cpu/depthwise.cpp)
import oracles  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import dnnpar.ops.depthwise as D  # noqa: E402


@pytest.fixture
def native_dw():
    """The depthwise kernel library on the numpy backend; skipped (with the reason) where it cannot be built."""
    with native_backend("depthwise") as be:
        yield be


def pair(v):
    return v if isinstance(v, tuple) else (v, v)


def geo_of(x_shape, kh, kw, s, p):
    g = dp.ops._common.ConvGeometry.make("test", x_shape, kh, kw, s, p, 1)
    return g, (g.n, g.c, g.h, g.w, g.kh, g.kw, g.oh, g.ow, *g.stride, *g.padding)


def check_forward(y, x, w, b, s, p, what):
    bb = None if b is None else np.abs(b)
    terms = w.shape[2] * w.shape[3] + (b is not None)
    assert_sum_close(y, oracles.depthwise(x, w, b, s, p), oracles.depthwise(np.abs(x), np.abs(w), bb, s, p),
                     terms, what)


def check_backward(dx, dw, x, w, dy, s, p, what):
    """dw and dx against the float64 oracles of tests/test_ops_backward.py (im2col / col2im by index)."""
    c, _, kh, kw = w.shape
    cols = oracles.im2col(x, kh, kw, s, p, (1, 1)).reshape(c, kh * kw, -1)
    dy2 = dy.astype(np.float64).transpose(1, 0, 2, 3).reshape(c, -1)
    assert_sum_close(dw, np.einsum("cp,ckp->ck", dy2, cols).reshape(w.shape),
                     np.einsum("cp,ckp->ck", np.abs(dy2), np.abs(cols)).reshape(w.shape), dy2.shape[1], f"{what} dw")
    if dx is None:
        return
    dcols = w.astype(np.float64).reshape(c, kh * kw, 1) * dy2[:, None, :]
    want = oracles.col2im(dcols.reshape(c * kh * kw, -1), x.shape, kh, kw, s, p, (1, 1))
    mag = oracles.col2im(np.abs(dcols).reshape(c * kh * kw, -1), x.shape, kh, kw, s, p, (1, 1))
    assert_sum_close(dx, want, mag, kh * kw, f"{what} dx")


def nan_like(shape):
    return np.full(shape, np.nan, np.float32)


# (N, C, H, W, (KH, KW), stride, padding): size 1, primes, non-multiples of the vector width,
# strides 1-3, paddings 0-3, kernels 1 / 3 / 5, non-square filters / strides / paddings, MobileNet's
DW_GEOMETRIES = [
    (1, 1, 1, 1, (1, 1), 1, 0), (1, 1, 1, 1, (3, 3), 1, 1), (2, 3, 7, 6, (3, 3), 1, 1), (2, 3, 7, 6, (3, 3), 2, 1),
    (1, 5, 11, 13, (5, 5), 2, 2), (3, 2, 9, 9, (3, 3), 3, 0), (2, 4, 8, 9, (5, 5), 1, 4), (1, 2, 5, 5, (3, 3), 2, 2),
    (2, 7, 13, 17, (3, 3), 1, 0), (1, 3, 31, 29, (5, 5), 1, 2), (2, 2, 23, 19, (5, 5), 2, 3), (1, 2, 6, 10, (1, 1), 2, 0),
    (1, 3, 10, 8, (3, 5), (1, 2), (1, 2)), (2, 2, 9, 12, (5, 3), (2, 1), (0, 3)), (1, 2, 4, 4, (3, 3), 1, 3),
    (1, 2, 37, 41, (3, 3), 2, 0), (2, 3, 3, 3, (3, 3), 1, 1), (2, 5, 6, 6, (3, 3), 2, 1), (1, 17, 7, 7, (3, 3), 1, 1),
    (16, 16, 12, 12, (3, 3), 1, 1), (4, 64, 24, 24, (3, 3), 2, 1),  # several threads
]
DW_IDS = [f"{n}x{c}x{h}x{w}k{k[0]}{k[1]}s{s}p{p}".replace(" ", "") for n, c, h, w, k, s, p in DW_GEOMETRIES]


@pytest.mark.parametrize("geo", DW_GEOMETRIES[::3], ids=DW_IDS[::3])
@pytest.mark.parametrize("body", ["auto", "generic"])
@pytest.mark.parametrize("act", ["relu", "relu6"])
def test_depthwise_fused_activation_gives_the_separate_ones_bits(native_dw, geo, body, act, rng):
    """The kernel's fused ReLU / ReLU6 equals dnnpar.ops.activation.activate_ on its unfused
    output (both bodies): NaN passes, and channels with zero weights give outputs of exactly
    -0.0 / +0.0 (bias -0.0) and 6.0 (bias 6). Equal as values: the sign of max(-0.0, 0.0) is
    NumPy's to choose (+0.0 from its AVX-512 loop, -0.0 from its scalar one); the kernels keep -0.0."""
    n, c, h, w, (kh, kw), s, p = geo
    g, tail = geo_of((n, c, h, w), kh, kw, s, p)
    x, wt, b = randn(rng, (n, c, h, w)) * 4, randn(rng, (c, 1, kh, kw)), randn(rng, c)
    x.reshape(-1)[rng.integers(0, x.size, 3)] = np.nan
    for ch, bias in zip(range(c), (-0.0, 6.0)):
        wt[ch], b[ch] = 0.0, bias
    generic = body == "generic"
    plain = cpu_native.depthwise_forward(x, wt, b, nan_like((n, c, g.oh, g.ow)), tail, generic=generic)
    fused = cpu_native.depthwise_forward(x, wt, b, nan_like(plain.shape), tail, generic=generic, activation=act)
    want = dp.ops.activation.activate_(np, plain, act)
    np.testing.assert_array_equal(fused, want)  # NaN where NaN, every other value equal


@pytest.mark.parametrize("geo", DW_GEOMETRIES, ids=DW_IDS)
@pytest.mark.parametrize("body", ["auto", "generic"])
def test_depthwise_kernel(native_dw, geo, body, rng):
    """Both bodies of the kernel (the fast one where the geometry allows it), forward with and
    without bias, backward with and without dx, into NaN-filled outputs, from read-only inputs."""
    n, c, h, w, (kh, kw), s, p = geo
    g, tail = geo_of((n, c, h, w), kh, kw, s, p)
    x, wt, b = randn(rng, (n, c, h, w)), randn(rng, (c, 1, kh, kw)), randn(rng, c)
    dy = randn(rng, (n, c, g.oh, g.ow))
    for a in (x, wt, b, dy):
        a.setflags(write=False)
    generic = body == "generic"
    for bias in (b, None):
        y = cpu_native.depthwise_forward(x, wt, bias, nan_like(dy.shape), tail, generic=generic)
        check_forward(y, x, wt, bias, g.stride, g.padding, f"{body} forward")
    dx, dw = cpu_native.depthwise_backward(x, wt, dy, nan_like(x.shape), nan_like(wt.shape), tail, generic=generic)
    check_backward(dx, dw, x, wt, dy, g.stride, g.padding, body)
    none, dw2 = cpu_native.depthwise_backward(x, wt, dy, None, nan_like(wt.shape), tail, generic=generic)
    assert none is None
    np.testing.assert_array_equal(dw2, dw)


def test_depthwise_takes_the_fast_body_at_mobilenet_shapes(native_dw):
    for h, s in ((112, 1), (112, 2), (7, 1), (3, 1), (14, 2)):
        oh = (h + 2 - 3) // s + 1
        assert cpu_native.depthwise_fast((16, 32, h, h, 3, 3, oh, oh, s, s, 1, 1)), (h, s)
    assert not cpu_native.depthwise_fast((1, 1, 9, 9, 3, 3, 3, 3, 3, 3, 0, 0))   # stride 3
    assert not cpu_native.depthwise_fast((1, 1, 9, 9, 3, 3, 11, 11, 1, 1, 3, 3))  # padding = K
    assert not cpu_native.depthwise_fast((1, 1, 9, 9, 3, 5, 7, 5, 1, 1, 0, 0))   # not square


def test_depthwise_op_runs_native_and_the_fallback_agrees(native_dw, monkeypatch, rng):
    """dp.ops on the numpy backend: float32 takes the kernel (the NumPy loops are not called);
    NATIVE["use"] = False takes the NumPy loops; both meet the float64 oracle."""
    x, wt, b = randn(rng, (3, 6, 15, 14)), randn(rng, (6, 1, 3, 3)), randn(rng, 6)
    s, p = (2, 2), (1, 1)
    dy = randn(rng, (3, 6, 8, 7))

    def refuse(*a, **k):
        raise AssertionError("the NumPy fallback ran although the native kernel is available")

    with monkeypatch.context() as m:
        m.setattr(D, "depthwise_conv2d_numpy", refuse)
        m.setattr(D, "depthwise_backward_numpy", refuse)
        y = dp.ops.depthwise_conv2d(x, wt, b, stride=2, padding=1)
        dx, dw, db = dp.ops.depthwise_conv2d_backward(x, wt, dy, stride=2, padding=1)
        none, dw_only, _ = dp.ops.depthwise_conv2d_backward(x, wt, dy, stride=2, padding=1, need_dx=False)
    check_forward(y, x, wt, b, s, p, "native op")
    check_backward(dx, dw, x, wt, dy, s, p, "native op")
    assert none is None
    np.testing.assert_array_equal(dw_only, dw)

    monkeypatch.setitem(D.NATIVE, "use", False)
    assert D.native_library(x, wt) is None
    calls = []
    real = D.depthwise_conv2d_numpy
    monkeypatch.setattr(D, "depthwise_conv2d_numpy", lambda *a: calls.append(1) or real(*a))
    y2 = dp.ops.depthwise_conv2d(x, wt, b, stride=2, padding=1)
    dx2, dw2, db2 = dp.ops.depthwise_conv2d_backward(x, wt, dy, stride=2, padding=1)
    assert calls, "NATIVE['use'] = False did not reach the NumPy code"
    check_forward(y2, x, wt, b, s, p, "fallback op")
    check_backward(dx2, dw2, x, wt, dy, s, p, "fallback op")
    np.testing.assert_array_equal(db2, db)


def test_depthwise_float64_stays_on_numpy(native_dw, rng):
    """Inside dp.precision("float64") the op runs the NumPy loops in float64 (the kernel is float32)."""
    x, wt = rng.standard_normal((2, 3, 9, 8)), rng.standard_normal((3, 1, 3, 3))
    assert D.native_library(x, wt) is None and D.native_library(x.astype(np.float32)) is not None
    with dp.precision("float64"):
        y = dp.ops.depthwise_conv2d(x, wt, stride=1, padding=1)
    assert y.dtype == np.float64
    np.testing.assert_allclose(y, oracles.depthwise(x, wt, None, (1, 1), (1, 1)), rtol=1e-12, atol=1e-12)


def test_depthwise_result_does_not_depend_on_threads(native_dw, rng):
    """Planes (forward, dx) and channels (dw) are each computed by one thread in a fixed order."""
    for s in (1, 2):
        x, wt = randn(rng, (8, 24, 20, 20)), randn(rng, (24, 1, 3, 3))
        g, tail = geo_of(x.shape, 3, 3, s, 1)
        dy = randn(rng, (8, 24, g.oh, g.ow))
        for generic in (False, True):
            outs = []
            for t in (1, 2, 3):
                y = cpu_native.depthwise_forward(x, wt, None, nan_like(dy.shape), tail, generic=generic, threads=t)
                dx, dw = cpu_native.depthwise_backward(x, wt, dy, nan_like(x.shape), nan_like(wt.shape), tail,
                                                       generic=generic, threads=t)
                outs.append((y, dx, dw))
            for o in outs[1:]:
                for a, b in zip(o, outs[0]):
                    np.testing.assert_array_equal(a, b)


def test_depthwise_native_guards(native_dw):
    """The wrappers refuse what the kernel cannot read (the op layer never passes it)."""
    g, tail = geo_of((1, 2, 5, 5), 3, 3, 1, 1)
    x, w, y = np.zeros((1, 2, 5, 5), np.float32), np.zeros((2, 1, 3, 3), np.float32), np.zeros((1, 2, 5, 5), np.float32)
    with pytest.raises(ValueError, match="x must be a C-contiguous float32 array of shape"):
        cpu_native.depthwise_forward(x.astype(np.float64), w, None, y, tail)
    with pytest.raises(ValueError, match="out must be a writeable"):
        ro = y.copy()
        ro.setflags(write=False)
        cpu_native.depthwise_forward(x, w, None, ro, tail)
    with pytest.raises(ValueError, match="dw must be"):
        cpu_native.depthwise_backward(x, w, y, None, np.zeros((2, 1, 3, 4), np.float32), tail)
    with pytest.raises(ValueError, match="geometry must be 12 sizes"):
        cpu_native.depthwise_forward(x, w, None, y, tail[:-1])
    with pytest.raises(ValueError, match="unknown native CPU source"):
        cpu_native.library("nope")


@settings(max_examples=700, deadline=None, suppress_health_check=list(HealthCheck))
@given(n=st.integers(1, 3), c=st.integers(1, 5), h=st.integers(1, 12), w=st.integers(1, 12),
       kh=st.integers(1, 5), kw=st.integers(1, 5), sh=st.integers(1, 3), sw=st.integers(1, 3),
       ph=st.integers(0, 3), pw=st.integers(0, 3), bias=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_depthwise_property(n, c, h, w, kh, kw, sh, sw, ph, pw, bias, seed):
    """Any small geometry through dp.ops on the numpy backend (the native kernel where it builds):
    either the documented ValueError (the window does not fit the padded input) before anything
    runs, or forward and backward within the float32 summation bound of the float64 oracle."""
    rng = np.random.default_rng(seed)
    x, wt = randn(rng, (n, c, h, w)), randn(rng, (c, 1, kh, kw))
    b = randn(rng, c) if bias else None
    s, p = (sh, sw), (ph, pw)
    with dp.use_backend("numpy"), poison_outputs(True):
        if h + 2 * ph < kh or w + 2 * pw < kw:
            with pytest.raises(ValueError, match="depthwise_conv2d"):
                dp.ops.depthwise_conv2d(x, wt, b, stride=s, padding=p)
            return
        y = dp.ops.depthwise_conv2d(x, wt, b, stride=s, padding=p)
        dy = randn(rng, y.shape)
        dx, dw, _ = dp.ops.depthwise_conv2d_backward(x, wt, dy, stride=s, padding=p)
    check_forward(y, x, wt, b, s, p, "property forward")
    check_backward(dx, dw, x, wt, dy, s, p, "property")


GENERIC_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from dnnpar.backend import cpu_native as cn
    # a build for any x86-64 / ARM CPU: the scalar SpMV and SpMM decode instead of the AVX-512 loops
    cn.CXXFLAGS = tuple(f for f in cn.CXXFLAGS if f != "-march=native")
    sys.path.insert(0, sys.argv[1])
    import dnnpar as dp
    from test_cpu_native import CODEBOOKS, make
    rng = np.random.default_rng(7)
    worst, fillers, nan_cols = 0.0, 0, 0
    with dp.use_backend("numpy"):
        for cb in CODEBOOKS.values():
            for density in (0.3, 0.005):  # long rows (vector-width tails), and gaps bridged by fillers
                csr, dense = make(rng, 61, 2003, density, cb, long_row=False)
                fillers += csr.compact().fillers
                unread = ~(dense != 0).any(axis=0)  # columns no stored entry reads
                for rhs in (rng.standard_normal(2003), rng.standard_normal((2003, 37))):
                    rhs = rhs.astype(np.float32)
                    rhs[unread] = np.nan  # a filler there must add nothing
                    nan_cols += int(unread.sum())
                    got = (dp.ops.spmv(csr, rhs) if rhs.ndim == 1 else dp.ops.spmm(csr, rhs)).reshape(61, -1)
                    clean = np.where(np.isnan(rhs), 0.0, rhs.astype(np.float64)).reshape(2003, -1)
                    assert np.isfinite(got).all(), "a filler let a NaN of the right-hand side through"
                    err = np.abs(got - dense @ clean) / np.maximum(np.abs(dense) @ np.abs(clean), 1e-30)
                    worst = max(worst, float(err.max()))
    print(json.dumps({"worst": worst, "fillers": fillers, "nan_cols": nan_cols}))
""")


def test_the_generic_build_runs_the_scalar_loops(native, tmp_path):
    """Built without -march=native (no AVX-512: the scalar SpMV and SpMM decode every CPU without
    it runs), the products still match float64 within a float32 sum's bound, and NaN in columns
    that only fillers read adds nothing. Controls: a filler kept in the SpMM decode, a tail entry
    one column off in the SpMV, each fails it."""
    from pathlib import Path
    out = run_json_script(tmp_path, GENERIC_SCRIPT.replace("sys.argv[1]", repr(str(Path(__file__).parent))))
    assert out["fillers"] > 0 and out["nan_cols"] > 0, out
    # rows of at most 2003 entries, each term rounded once more by its product: (n + 1) u
    assert out["worst"] <= (2003 + 1) * 2.0 ** -24, out
