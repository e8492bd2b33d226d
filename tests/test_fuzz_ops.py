"""Property tests (hypothesis) for the op layer's input handling, issue 11 classes 2 and 3: every
generated case ends in the documented exception or in a correct result, never a crash, an
OverflowError, a huge allocation or a silently wrong number.

* geometry: random sizes, strides, paddings and dilations (huge ints, negatives, bools, floats,
  NumPy ints) for im2col, col2im, conv2d (both algorithms) and depthwise, against a model of the
  documented rule and the float64 oracles;
* CSR: random construction inputs, one corruption at a time, and changes to the caller's arrays
  after construction;
* codebook fillers: inf and NaN in x where fillers land, on every SpMV / SpMM path;
* dtypes and read-only arrays: every op, every argument's dtype and writeability, both host
  backends, inside and outside ``dp.precision("float64")``.

Runs are deterministic under conftest's hypothesis profile; CI's seeded pass (DNNPAR_TEST_SEED,
--hypothesis-seed) explores new cases each run.
"""
import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import dnnpar as dp
import dnnpar.ops.sparse as S
import oracles
from dnnpar.backend import cpu_native, poison_outputs

f32 = np.float32
INT32_MAX = 2**31 - 1


def fuzz(max_examples: int):
    """hypothesis settings for these tests; determinism, seeds and the example database come
    from the "dnnpar" profile in conftest.py (fixed unless DNNPAR_TEST_SEED / --hypothesis-seed)."""
    return settings(max_examples=max_examples, suppress_health_check=list(HealthCheck))


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """(conftest's fixture is function-scoped; hypothesis runs many examples inside one call)"""
    with poison_outputs(True):
        yield


# ---------------------------------------------------------------- geometry
HUGE = [2**29, 2**30 - 3, 2**30, 2**31 - 1, 2**31, 2**32 + 1, 2**63, 2**64]


def scalar(small):
    """An int-like argument: mostly small, sometimes huge, negative, a bool, a float or a NumPy int."""
    return st.one_of(
        small, small, small,
        st.sampled_from(HUGE), st.integers(-3, 0),
        st.booleans(), st.sampled_from([np.True_, 1.0, 2.5, float("nan"), "1", None]),
        small.map(np.int64), small.map(np.int32), small.map(np.uint8),
        st.sampled_from([np.int64(2**40), np.uint64(2**63)]))


def geometry_param(small, wild):
    """An int or (h, w) pair of plain or NumPy ints; ``wild``: anything :func:`scalar` draws, in
    ints, pairs and sequences of the wrong length."""
    if not wild:
        s = st.one_of(small, small, small.map(np.int64))
        return st.one_of(s, st.tuples(s, s))
    s = scalar(small)
    return st.one_of(s, s, st.tuples(s, s), st.lists(s, min_size=1, max_size=3))


def _int(v):
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _pair(v):
    if _int(v):
        return int(v), int(v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(_int(i) for i in v):
        return int(v[0]), int(v[1])
    return None


def expected_geometry(x_shape, kh, kw, stride, padding, dilation):
    """The documented rule, stated independently: (TypeError | ValueError | (OH, OW))."""
    if not all(_int(v) for v in x_shape):
        return TypeError
    if min(int(v) for v in x_shape) < 1 or np.prod([int(v) for v in x_shape], dtype=object) > INT32_MAX:
        return ValueError
    pairs = [_pair(v) for v in (stride, padding, dilation)]
    if not (_int(kh) and _int(kw)) or None in pairs:
        return TypeError
    out = []
    for size, k, s, p, d in zip(x_shape[2:], (int(kh), int(kw)), *pairs):
        size = int(size)
        if k < 1 or s < 1 or p < 0 or d < 1 or max(k, s, p, d) > INT32_MAX or size + 2 * p > INT32_MAX:
            return ValueError
        if size + 2 * p < d * (k - 1) + 1:
            return ValueError
        out.append((size + 2 * p - d * (k - 1) - 1) // s + 1)
    return tuple(out)


small_size = st.integers(1, 6)


@st.composite
def conv_case(draw, op):
    wild = draw(st.booleans())  # half the cases stay near valid, so many reach the oracles
    n, c, h, w = draw(small_size), draw(small_size), draw(st.integers(1, 9)), draw(st.integers(1, 9))
    if op in ("im2col", "col2im") and wild:
        kh, kw = draw(scalar(st.integers(1, 4))), draw(scalar(st.integers(1, 4)))
    else:
        kh, kw = draw(st.integers(1, 4)), draw(st.integers(1, 4))  # from w's shape: always ints
    stride = draw(geometry_param(st.integers(1, 3), wild))
    padding = draw(geometry_param(st.integers(0, 3), wild))
    dilation = 1 if op == "depthwise" else draw(geometry_param(st.integers(1, 3), wild))
    x_shape = (n, c, h, w)
    if op == "col2im" and wild and draw(st.integers(0, 4)) == 0:
        x_shape = draw(st.tuples(*[scalar(st.integers(1, 5))] * 4))
    return op, x_shape, kh, kw, stride, padding, dilation, draw(st.integers(0, 2**32 - 1))


OPS = ["im2col", "col2im", "conv2d", "conv2d_direct", "depthwise"]


def run_conv_case(be, case, budget):
    op, x_shape, kh, kw, stride, padding, dilation, s = case
    rng = np.random.default_rng(s)
    want = expected_geometry(x_shape, kh, kw, stride, padding, dilation)
    o = 2
    if isinstance(want, tuple):
        oh, ow = want
        n, c, h, w = (int(v) for v in x_shape)
        taps = int(kh) * int(kw)
        counts = {"im2col": [c * taps * n * oh * ow], "col2im": [c * taps * n * oh * ow, n * c * h * w],
                  "conv2d": [c * taps * n * oh * ow, n * o * oh * ow], "conv2d_direct": [n * o * oh * ow],
                  "depthwise": [n * c * oh * ow]}[op]
        if max(counts) > INT32_MAX:
            want = ValueError
        elif max(counts) > budget:
            # valid but too large to run here: the geometry itself must be accepted as the model says
            g = dp.ops.conv.ConvGeometry.make(op, x_shape, kh, kw, stride, padding, dilation)
            assert (g.oh, g.ow) == (oh, ow)
            event("valid, geometry only")
            return
    x_ok = all(_int(v) and int(v) >= 1 for v in x_shape) and np.prod([int(v) for v in x_shape], dtype=object) < 10**6
    x = rng.standard_normal(tuple(int(v) for v in x_shape)).astype(f32) if x_ok else np.ones((1, 1, 1, 1), f32)
    wshape = (x.shape[1], 1, kh, kw) if op == "depthwise" else (o, x.shape[1], kh, kw)
    wt = (rng.standard_normal(wshape).astype(f32) if op not in ("im2col", "col2im") else None)
    if isinstance(want, tuple):
        ncols = (x.shape[1] * int(kh) * int(kw), x.shape[0] * want[0] * want[1])
    else:
        ncols = (1, 1)
    cols = rng.standard_normal(ncols).astype(f32)

    def call():
        if op == "im2col":
            return dp.ops.im2col(be.asarray(x), kh, kw, stride, padding, dilation)
        if op == "col2im":
            return dp.ops.col2im(be.asarray(cols), x_shape, kh, kw, stride, padding, dilation)
        if op == "depthwise":
            return dp.ops.depthwise_conv2d(be.asarray(x), be.asarray(wt), stride=stride, padding=padding)
        return dp.ops.conv2d(be.asarray(x), be.asarray(wt), stride=stride, padding=padding, dilation=dilation,
                             algo="direct" if op == "conv2d_direct" else "im2col")

    if not isinstance(want, tuple):
        event(f"{want.__name__}")
        with pytest.raises(want):
            call()
        return
    event("valid, computed")
    got = be.to_numpy(call())
    sp, pp, dd = _pair(stride), _pair(padding), _pair(dilation)
    if op == "im2col":
        np.testing.assert_array_equal(got, oracles.im2col(x, int(kh), int(kw), sp, pp, dd))
    elif op == "col2im":
        want_x = oracles.col2im(cols, x.shape, int(kh), int(kw), sp, pp, dd)
        mag = oracles.col2im(np.abs(cols), x.shape, int(kh), int(kw), sp, pp, dd)
        oracles.assert_sum_close(got, want_x, mag, int(kh) * int(kw), "col2im")
    elif op == "depthwise":
        oracles.assert_sum_close(got, oracles.depthwise(x, wt, None, sp, pp),
                                 oracles.depthwise(np.abs(x), np.abs(wt), None, sp, pp), kh * kw, "depthwise")
    else:
        oracles.assert_sum_close(got, oracles.conv2d(x, wt, None, sp, pp, dd),
                                 oracles.conv2d(np.abs(x), np.abs(wt), None, sp, pp, dd), x.shape[1] * kh * kw, op)


@fuzz(2000)
@given(case=st.sampled_from(OPS).flatmap(conv_case))
def test_geometry_fuzz_numpy(case):
    with dp.use_backend("numpy") as be:
        run_conv_case(be, case, budget=200_000)


@fuzz(400)
@given(case=st.sampled_from(OPS).flatmap(conv_case))
def test_geometry_fuzz_emu(case):
    with dp.use_backend("emu") as be:
        run_conv_case(be, case, budget=20_000)


# ---------------------------------------------------------------- CSR construction
CORRUPTIONS = ["none", "indptr_order", "indptr_length", "indptr_start", "indptr_end", "index_negative",
               "index_k", "index_huge", "index_wraps", "data_length", "data_dtype", "indices_float", "two_d",
               "codebook_long", "codebook_dtype", "code_range", "shape_bool", "shape_zero", "shape_huge",
               "not_an_array"]
ERROR = {"indptr_order": ValueError, "indptr_length": ValueError, "indptr_start": ValueError,
         "indptr_end": ValueError, "index_negative": ValueError, "index_k": ValueError, "index_huge": ValueError,
         "index_wraps": ValueError, "data_length": ValueError, "data_dtype": TypeError, "indices_float": TypeError,
         "two_d": ValueError, "codebook_long": TypeError, "codebook_dtype": TypeError, "code_range": ValueError,
         "shape_bool": ValueError, "shape_zero": ValueError, "shape_huge": ValueError, "not_an_array": TypeError}


@st.composite
def csr_case(draw):
    m, k = draw(st.integers(1, 6)), draw(st.integers(1, 700))
    codebook = draw(st.booleans())
    corruption = draw(st.one_of(st.just("none"), st.sampled_from(CORRUPTIONS)))  # half the cases valid
    return m, k, codebook, corruption, draw(st.sampled_from([np.int32, np.int64, np.uint32])), draw(
        st.integers(0, 2**32 - 1))


def build_csr_args(m, k, codebook, corruption, itype, s):
    rng = np.random.default_rng(s)
    per_row = rng.integers(0, min(k, 6) + 1, m)
    cols = np.concatenate([np.sort(rng.choice(k, size=r, replace=False)) for r in per_row]).astype(itype)
    ptr = np.zeros(m + 1, itype)
    np.cumsum(per_row, out=ptr[1:])
    nnz = cols.size
    ncodes = int(rng.integers(1, 257))
    cb = (rng.standard_normal(ncodes) * (rng.random(ncodes) < 0.8)).astype(f32) if codebook else None
    data = (rng.integers(0, ncodes, nnz).astype(np.uint8) if codebook else rng.standard_normal(nnz).astype(f32))
    shape = (m, k)
    kind = corruption
    # corruptions that need something to corrupt fall back to one that always applies
    if kind in ("indptr_order",) and m < 2 or kind in ("index_negative", "index_k", "index_huge", "index_wraps",
                                                       "data_length", "code_range") and nnz == 0:
        kind = "indptr_start"
    if kind in ("codebook_long", "codebook_dtype", "code_range") and not codebook:
        kind = "data_dtype"
    if kind == "indptr_order":
        ptr = ptr.astype(np.int64)
        ptr[1], ptr[2] = ptr[2] + 1, ptr[1]  # ptr[1] > ptr[2]
        if ptr[1] <= ptr[2]:
            ptr[1] = ptr[2] + 1
    elif kind == "indptr_length":
        ptr = np.append(ptr, ptr[-1])
    elif kind == "indptr_start":
        ptr = ptr.astype(np.int64)
        ptr[0] = 1
    elif kind == "indptr_end":
        ptr = ptr.astype(np.int64)
        ptr[-1] += 1 + int(rng.integers(0, 2**33))
    elif kind == "index_negative":
        cols = cols.astype(np.int64)
        cols[rng.integers(nnz)] = -1 - int(rng.integers(0, 2**31))
    elif kind == "index_k":
        cols = cols.copy()
        cols[rng.integers(nnz)] = k
    elif kind == "index_huge":
        cols = cols.astype(np.int64)
        cols[rng.integers(nnz)] = 2**30
    elif kind == "index_wraps":  # in int64, a column that would wrap to a valid int32 one
        cols = cols.astype(np.int64)
        cols[rng.integers(nnz)] = 2**32 + int(rng.integers(0, k))
    elif kind == "data_length":
        data = data[:-1]
    elif kind == "data_dtype":
        data = data.astype(np.float64) if not codebook else data.astype(np.int32)
    elif kind == "indices_float":
        cols = cols.astype(f32)
    elif kind == "two_d":
        cols = cols[None, :]
    elif kind == "codebook_long":
        cb = np.zeros(257, f32)
    elif kind == "codebook_dtype":
        cb = cb.astype(np.float64)
    elif kind == "code_range":
        data = data.copy()
        data[rng.integers(nnz)] = ncodes if ncodes < 256 else 0
        if ncodes == 256:
            kind = "none"
    elif kind == "shape_bool":
        shape = (True, k) if m == 1 else (m, True)
    elif kind == "shape_zero":
        shape = (m, 0)
    elif kind == "shape_huge":
        shape = (m, 2**31 + int(rng.integers(0, 2**40)))
    elif kind == "not_an_array":
        data = object()
    return data, cols, ptr, shape, cb, kind


def _products(csr, be, x, X):
    """spmv and spmm on every path the backend has: on numpy the NumPy fallback, the native
    codebook kernel and SciPy (cached objects are built in this order on purpose)."""
    if be.name != "numpy":
        return [(be.to_numpy(dp.ops.spmv(csr, be.asarray(x), algo=a)), be.to_numpy(dp.ops.spmm(csr, be.asarray(X))))
                for a in ("vector", "scalar")]
    out = []
    saved = dict(dp.sparse.SCIPY), dict(dp.sparse.NATIVE)
    try:
        for scipy_on, native_on in ((False, False), (False, True), (True, False)):
            dp.sparse.SCIPY["use"], dp.sparse.NATIVE["use"] = scipy_on, native_on
            out.append((dp.ops.spmv(csr, x), dp.ops.spmm(csr, X)))
    finally:
        dp.sparse.SCIPY.update(saved[0])
        dp.sparse.NATIVE.update(saved[1])
    return out


def check_csr_case(be, case):
    m, k, codebook, corruption, itype, s = case
    data, cols, ptr, shape, cb, kind = build_csr_args(m, k, codebook, corruption, itype, s)
    if kind != "none":
        event(kind)
        with pytest.raises(ERROR[kind]):
            dp.sparse.CSR(data, cols, ptr, shape, codebook=cb)
        return
    event("valid")
    csr = dp.sparse.CSR(data, cols, ptr, shape, codebook=cb)
    rows = np.repeat(np.arange(m), np.diff(ptr.astype(np.int64)))
    vals = (cb[data] if codebook else data).astype(np.float64)
    dense = np.zeros((m, k))
    dense[rows, cols.astype(np.int64)] = vals
    rng = np.random.default_rng(s + 1)
    x, X = rng.standard_normal(k).astype(f32), rng.standard_normal((k, 3)).astype(f32)
    n = max(1, int(np.diff(ptr.astype(np.int64)).max()))
    for y, Y in _products(csr, be, x, X):
        oracles.assert_sum_close(y, dense @ x, np.abs(dense) @ np.abs(x), n, "spmv")
        oracles.assert_sum_close(Y, dense @ X, np.abs(dense) @ np.abs(X), n, "spmm")
    # the caller's arrays change after construction: the matrix must not see it
    cols[...] = 2**30 if cols.dtype.itemsize >= 4 else 0
    ptr[...] = ptr[::-1]
    data[...] = 255 if codebook else np.nan
    if cb is not None:
        cb[...] = np.nan
    for y1, Y1 in _products(csr, be, x, X):
        oracles.assert_sum_close(y1, dense @ x, np.abs(dense) @ np.abs(x), n, "spmv after the change")
        oracles.assert_sum_close(Y1, dense @ X, np.abs(dense) @ np.abs(X), n, "spmm after the change")


@fuzz(1500)
@given(case=csr_case())
def test_csr_fuzz_numpy(case):
    with dp.use_backend("numpy") as be:
        check_csr_case(be, case)


@fuzz(300)
@given(case=csr_case())
def test_csr_fuzz_emu(case):
    with dp.use_backend("emu") as be:
        check_csr_case(be, case)


# ---------------------------------------------------------------- codebook fillers with inf / NaN in x
@st.composite
def filler_case(draw):
    m, k = draw(st.integers(1, 5)), draw(st.integers(257, 1800))
    ncodes = draw(st.sampled_from([2, 16, 32, 37, 255, 256]))
    zero_first = draw(st.booleans())
    return m, k, ncodes, zero_first, draw(st.integers(0, 2**32 - 1))


def filler_matrix(m, k, ncodes, zero_first, s):
    rng = np.random.default_rng(s)
    cb = rng.uniform(-2, 2, ncodes).astype(f32)
    if zero_first:
        cb[0] = 0.0  # Deep Compression's convention; entries never point at it
    lo = 1 if zero_first else 0
    per_row = rng.integers(0, 5, m)
    cols = np.concatenate([np.sort(rng.choice(k, size=r, replace=False)) for r in per_row]).astype(np.int32)
    ptr = np.zeros(m + 1, np.int32)
    np.cumsum(per_row, out=ptr[1:])
    codes = rng.integers(lo, ncodes, cols.size).astype(np.uint8)
    return dp.sparse.CSR(codes, cols, ptr, (m, k), codebook=cb), rng


def filler_columns(c):
    """Columns where the compact form's fillers land, from its streams."""
    out = []
    for r in range(c.shape[0]):
        lo, hi = c.rowptr[r], c.rowptr[r + 1]
        col = np.cumsum(c.gaps[lo:hi].astype(np.int64) + 1) - 1
        out.extend(col[c.codes[lo:hi] == c.filler_code].tolist())
    return np.unique(np.array(out, np.int64))


def row_sums_float64(csr, x, absolute=False):
    """Per row, the sum over the STORED entries only of v * x[col] in float64 (inf and NaN
    follow IEEE); with ``absolute``, of |v| |x[col]| over the finite x (the bound's magnitude)."""
    ptr, cols = np.asarray(csr.indptr), np.asarray(csr.indices)
    v = np.asarray(csr.values(), np.float64)
    x2 = x.reshape(x.shape[0], -1).astype(np.float64)
    if absolute:
        v, x2 = np.abs(v), np.nan_to_num(np.abs(x2), nan=0.0, posinf=0.0)
    with np.errstate(invalid="ignore"):
        rows = [np.sum(v[a:b, None] * x2[cols[a:b]], axis=0) for a, b in zip(ptr[:-1], ptr[1:])]
    return np.array(rows).reshape((csr.shape[0],) + x.shape[1:])


def assert_same_ieee(got, want, mag, n, what):
    got = np.asarray(got)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want), err_msg=f"{what}: NaN pattern")
    np.testing.assert_array_equal(np.where(np.isinf(got), np.sign(got), 0), np.where(np.isinf(want), np.sign(want), 0),
                                  err_msg=f"{what}: inf pattern")
    fin = np.isfinite(want)
    oracles.assert_sum_close(got[fin], want[fin], mag[fin], n, what)


def check_filler_case(be, case):
    csr, rng = filler_matrix(*case)
    m, k = csr.shape
    x = rng.standard_normal(k).astype(f32)
    X = rng.standard_normal((k, 3)).astype(f32)
    specials = np.array([np.inf, -np.inf, np.nan], f32)
    targets = [rng.integers(0, k, 3)]
    if csr.compact() is not None and csr.compact().fillers:  # where fillers land (emu never sees them)
        fc = filler_columns(csr.compact())
        stored = np.asarray(csr.indices)
        only_fill = np.setdiff1d(fc, stored)
        if only_fill.size:
            targets.append(rng.choice(only_fill, size=min(only_fill.size, 4), replace=False))
            event("non-finite x where only fillers land")
        if stored.size and rng.random() < 0.3:
            targets.append(rng.choice(stored, size=1))
            event("non-finite x at a stored column too")
    where = np.concatenate(targets)
    x[where] = rng.choice(specials, where.size)
    X[where, rng.integers(0, 3, where.size)] = rng.choice(specials, where.size)
    n = max(1, int(np.diff(np.asarray(csr.indptr)).max()))
    want_y, want_Y = row_sums_float64(csr, x), row_sums_float64(csr, X)
    mag_y, mag_Y = row_sums_float64(csr, x, absolute=True), row_sums_float64(csr, X, absolute=True)
    for y, Y in _products(csr, be, x, X):
        assert_same_ieee(y, want_y, mag_y, n, "spmv")
        assert_same_ieee(Y, want_Y, mag_Y, n, "spmm")


@fuzz(1000)
@given(case=filler_case())
def test_fillers_contribute_nothing_numpy(case):
    if cpu_native.library() is None:
        pytest.skip(f"native CPU kernel unavailable: {cpu_native.unavailable_reason()}")
    with dp.use_backend("numpy") as be:
        check_filler_case(be, case)


@fuzz(150)
@given(case=filler_case())
def test_fillers_contribute_nothing_emu(case):
    with dp.use_backend("emu") as be:
        check_filler_case(be, case)


# ---------------------------------------------------------------- dtypes and read-only arrays
DTYPES = [np.float32, np.float32, np.float32, np.float64, np.float64, np.float16, np.int32, np.uint8, np.complex64,
          np.bool_]
ARGS = {  # op -> the array arguments (name, shape); the call below
    "gemm": [("a", (4, 5)), ("b", (5, 3))],
    "gemm_acc": [("a", (4, 5)), ("b", (5, 3)), ("c", (4, 3))],
    "conv2d": [("x", (2, 3, 5, 5)), ("w", (2, 3, 3, 3)), ("bias", (2,))],
    "conv2d_direct": [("x", (2, 3, 5, 5)), ("w", (2, 3, 3, 3))],
    "conv2d_backward": [("x", (2, 3, 5, 5)), ("w", (2, 3, 3, 3)), ("dy", (2, 2, 5, 5))],
    "depthwise": [("x", (1, 3, 5, 4)), ("w", (3, 1, 3, 3)), ("bias", (3,))],
    "depthwise_backward": [("x", (1, 3, 5, 4)), ("w", (3, 1, 3, 3)), ("dy", (1, 3, 5, 4))],
    "im2col": [("x", (2, 3, 5, 4))],
    "col2im": [("cols", (27, 40))],
    "spmv": [("x", (9,))],
    "spmm": [("X", (9, 2))],
}


def call_op(op, a, csr):
    if op == "gemm":
        return dp.ops.gemm(a["a"], a["b"])
    if op == "gemm_acc":
        return dp.ops.gemm(a["a"], a["b"], alpha=0.5, beta=2.0, c=a["c"])
    if op == "conv2d":
        return dp.ops.conv2d(a["x"], a["w"], a["bias"], padding=1)
    if op == "conv2d_direct":
        return dp.ops.conv2d(a["x"], a["w"], padding=1, algo="direct")
    if op == "conv2d_backward":
        return dp.ops.conv2d_backward(a["x"], a["w"], a["dy"], padding=1)
    if op == "depthwise":
        return dp.ops.depthwise_conv2d(a["x"], a["w"], a["bias"], padding=1)
    if op == "depthwise_backward":
        return dp.ops.depthwise_conv2d_backward(a["x"], a["w"], a["dy"], padding=1)
    if op == "im2col":
        return dp.ops.im2col(a["x"], 3, 3, padding=1)
    if op == "col2im":
        return dp.ops.col2im(a["cols"], (2, 3, 5, 4), 3, 3, padding=1)
    if op == "spmv":
        return dp.ops.spmv(csr, a["x"])
    return dp.ops.spmm(csr, a["X"])


@st.composite
def dtype_case(draw):
    op = draw(st.sampled_from(sorted(ARGS)))
    mode = draw(st.sampled_from([None, None, "float64"]))
    clean = draw(st.booleans())  # every array of the compute dtype: half the cases get computed
    dtypes = st.just(np.float64 if mode else np.float32) if clean else st.sampled_from(DTYPES)
    spec = [(name, shape, draw(dtypes), draw(st.booleans())) for name, shape in ARGS[op]]
    return op, spec, mode, draw(st.integers(0, 2**32 - 1))


def check_dtype_case(be, case):
    op, spec, mode, s = case
    rng = np.random.default_rng(s)
    if mode is not None and be.runs_kernels:
        event("float64 mode on a kernel backend")
        with pytest.raises(ValueError, match="computes in float32"):
            with dp.precision(mode):
                pass
        return
    want_dtype = np.dtype(mode or "float32")
    arrays, read_only, originals = {}, set(), {}
    for name, shape, dtype, ro in spec:
        a = (rng.standard_normal(shape) * 3).astype(dtype)
        if ro:
            a.flags.writeable = False
            read_only.add(name)
        arrays[name] = a
        originals[name] = a.copy()
    dense = np.where(rng.random((7, 9)) < 0.4, rng.standard_normal((7, 9)), 0).astype(f32)
    csr = dp.sparse.CSR.from_dense(dense)
    bad_dtype = [n for n, _, dt, _ in spec if np.dtype(dt) != want_dtype]
    with dp.precision(mode or "float32"):
        if bad_dtype:
            event("refused dtype")
            with pytest.raises(TypeError, match=f"must be {want_dtype.name}, got "):
                call_op(op, arrays, csr)
        elif "c" in read_only:
            event("refused read-only accumulator")
            with pytest.raises(ValueError, match="read-only"):
                call_op(op, arrays, csr)
        else:
            event("computed" + (" from read-only inputs" if read_only else ""))
            got = call_op(op, arrays, csr)
            copies = {n: np.array(a) for n, a in originals.items()}
            ref = call_op(op, copies, csr)
            got, ref = (got, ref) if isinstance(got, tuple) else ((got,), (ref,))
            for g, r in zip(got, ref):
                assert g.dtype == want_dtype
                np.testing.assert_array_equal(g, r)
    for name in read_only | ({n for n, *_ in spec} - {"c"}):
        np.testing.assert_array_equal(arrays[name], originals[name], err_msg=f"input {name} was written")


@fuzz(1000)
@given(case=dtype_case())
def test_dtype_and_read_only_fuzz_numpy(case):
    with dp.use_backend("numpy") as be:
        check_dtype_case(be, case)


@fuzz(300)
@given(case=dtype_case())
def test_dtype_and_read_only_fuzz_emu(case):
    with dp.use_backend("emu") as be:
        check_dtype_case(be, case)


def test_remembered_geometries_are_the_validated_ones():
    """ConvGeometry.make remembers what passed (plain-int arguments): the same geometry as a
    fresh check, and a bad geometry still raises on every call (failures are never remembered;
    bools and NumPy ints are checked afresh each time)."""
    from dnnpar.ops._common import ConvGeometry
    args = ("conv2d", (2, 3, 17, 11), 3, 5, (2, 1), (1, 2), (1, 3))
    g = ConvGeometry.make(*args)
    assert ConvGeometry.make(*args) is g and g == ConvGeometry._make(*args)
    for _ in range(2):
        with pytest.raises(ValueError, match="smaller than the dilated kernel"):
            ConvGeometry.make("conv2d", (1, 1, 2, 2), 3, 3, 1, 0, 1)
        with pytest.raises(TypeError):
            ConvGeometry.make("conv2d", (1, 1, 8, 8), True, 3, 1, 0, 1)
    h = ConvGeometry.make("conv2d", (np.int64(2), 3, 17, 11), 3, 5, (2, 1), (1, 2), (1, 3))
    assert h == g and h is not g
