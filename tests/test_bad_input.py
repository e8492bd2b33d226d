"""Bad input becomes a ValueError/TypeError naming the problem, before any kernel runs."""
import numpy as np
import pytest

import dnnpar as dp
from conftest import BACKENDS
from oracles import assert_sum_close

f32 = np.float32


@pytest.fixture
def arrays(backend):
    def make(*shape, dtype=f32):
        return backend.asarray(np.ones(shape, dtype=dtype))
    return make


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_gemm_rejects(backend, arrays):
    a, b = arrays(4, 5), arrays(5, 3)
    with pytest.raises(TypeError, match="a must be float32, got float16"):
        dp.ops.gemm(arrays(4, 5, dtype=np.float16), b)
    # one rule on every backend: ops compute in float32
    with pytest.raises(TypeError, match=r"a must be float32, got float64 \(float64 is computed only inside "
                                        r"dp.precision\('float64'\), on the numpy backend\)"):
        dp.ops.gemm(arrays(4, 5, dtype=np.float64), b)
    with pytest.raises(TypeError, match="alpha must be a real number, got 'x'"):
        dp.ops.gemm(a, b, alpha="x")
    for bad in (float("nan"), float("inf"), -float("inf"), 1e39):
        with pytest.raises(ValueError, match="alpha must be a finite float32 value"):
            dp.ops.gemm(a, b, alpha=bad)
        with pytest.raises(ValueError, match="beta must be a finite float32 value"):
            dp.ops.gemm(a, b, beta=bad, c=arrays(4, 3))
    with pytest.raises(ValueError, match="a must have 2 dimensions, got shape \\(4, 5, 1\\)"):
        dp.ops.gemm(arrays(4, 5, 1), b)
    with pytest.raises(ValueError, match="inner dimensions 5 and 4 differ"):
        dp.ops.gemm(a, arrays(4, 3))
    with pytest.raises(ValueError, match="C-contiguous"):
        dp.ops.gemm(arrays(5, 4).T, b)
    with pytest.raises(ValueError, match="beta != 0 needs c"):
        dp.ops.gemm(a, b, beta=1.0)
    with pytest.raises(ValueError, match="c must have shape \\(4, 3\\)"):
        dp.ops.gemm(a, b, beta=1.0, c=arrays(3, 4))
    with pytest.raises(ValueError, match="unknown algo 'fast'"):
        dp.ops.gemm(a, b, algo="fast")
    with pytest.raises(ValueError, match="empty operand"):
        dp.ops.gemm(arrays(0, 5), b)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_conv_rejects(backend, arrays):
    x, w = arrays(2, 3, 8, 8), arrays(4, 3, 3, 3)
    with pytest.raises(ValueError, match="x has 3 channels but w expects 2"):
        dp.ops.conv2d(x, arrays(4, 2, 3, 3))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        dp.ops.conv2d(arrays(3, 8, 8), w)
    with pytest.raises(TypeError, match="w must be float32, got int32"):
        dp.ops.conv2d(x, arrays(4, 3, 3, 3, dtype=np.int32))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        dp.ops.conv2d(arrays(1, 3, 2, 2), w)
    with pytest.raises(ValueError, match="stride >= 1"):
        dp.ops.conv2d(x, w, stride=0)
    with pytest.raises(TypeError, match="padding must be an int or a pair"):
        dp.ops.conv2d(x, w, padding=(1, 2, 3))
    with pytest.raises(ValueError, match="bias must have shape \\(4,\\)"):
        dp.ops.conv2d(x, w, bias=arrays(3))
    with pytest.raises(ValueError, match="unknown algo"):
        dp.ops.conv2d(x, w, algo="winograd")
    with pytest.raises(ValueError, match="C-contiguous"):
        dp.ops.conv2d(arrays(2, 3, 8, 16)[:, :, :, ::2], w)
    with pytest.raises(ValueError, match=r"w must have shape \(3, 1, KH, KW\)"):
        dp.ops.depthwise_conv2d(x, arrays(3, 2, 3, 3))
    with pytest.raises(ValueError, match="cols must have shape \\(27, 128\\)"):
        dp.ops.col2im(arrays(27, 71), (2, 3, 8, 8), 3, 3, padding=1)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_wrong_backend_array_is_refused(backend):
    other = np.ones((4, 4), f32) if backend.name == "cuda" else [[1.0]]
    with pytest.raises(TypeError, match=f"on the '{backend.name}' backend"):
        dp.ops.gemm(other, backend.asarray(np.ones((4, 4), f32)))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_csr_validation(backend):
    data, ind, ptr = np.ones(3, f32), np.array([0, 2, 1], np.int32), np.array([0, 2, 3], np.int32)
    dp.sparse.CSR(data, ind, ptr, (2, 3))  # valid
    with pytest.raises(ValueError, match="indptr is not monotone"):
        dp.sparse.CSR(data, ind, np.array([0, 3, 2, 3]), (3, 3))
    with pytest.raises(ValueError, match="indices\\[1\\] = 7 is outside \\[0, 3\\)"):
        dp.sparse.CSR(data, np.array([0, 7, 1]), ptr, (2, 3))
    with pytest.raises(ValueError, match="must start at 0 and end at nnz = 3"):
        dp.sparse.CSR(data, ind, np.array([0, 2, 4]), (2, 3))
    with pytest.raises(ValueError, match="M \\+ 1 = 4 entries"):
        dp.sparse.CSR(data, ind, ptr, (3, 3))
    with pytest.raises(TypeError, match="data must be float32"):
        dp.sparse.CSR(data.astype(np.float64), ind, ptr, (2, 3))
    with pytest.raises(TypeError, match="indices must be an integer array"):
        dp.sparse.CSR(data, ind.astype(f32), ptr, (2, 3))
    with pytest.raises(TypeError, match="codebook must be a 1-D float32 array of 1..256"):
        dp.sparse.CSR(np.zeros(3, np.uint8), ind, ptr, (2, 3), codebook=np.zeros(300, f32))
    with pytest.raises(ValueError, match="code 9 is outside the codebook of 4"):
        dp.sparse.CSR(np.array([0, 9, 1], np.uint8), ind, ptr, (2, 3), codebook=np.zeros(4, f32))
    csr = dp.sparse.CSR(data, ind, ptr, (2, 3))
    with pytest.raises(ValueError, match="the matrix is 2x3 but x has 4 entries"):
        dp.ops.spmv(csr, backend.asarray(np.ones(4, f32)))
    with pytest.raises(ValueError, match="X has shape \\(2, 5\\) \\(need 3 rows\\)"):
        dp.ops.spmm(csr, backend.asarray(np.ones((2, 5), f32)))
    with pytest.raises(TypeError, match="expected a dnnpar.sparse.CSR"):
        dp.ops.spmv("csr", backend.asarray(np.ones(3, f32)))


def test_csr_from_another_backend_is_refused():
    with dp.use_backend("numpy"):
        csr = dp.sparse.CSR.from_dense(np.eye(3, dtype=f32))
    with dp.use_backend("emu"):
        with pytest.raises(TypeError, match="lives on the 'numpy' backend but 'emu' is active"):
            dp.ops.spmv(csr, np.ones(3, f32))


# ---------------------------------------------------------------- the float64 oracle mode
def test_float64_is_an_oracle_mode_of_the_numpy_backend():
    a, b = np.ones((4, 5)), np.ones((5, 3))
    with dp.use_backend("numpy"):
        with dp.precision("float64") as dt:
            assert dt == np.float64
            r = dp.ops.gemm(a, b)
            assert r.dtype == np.float64 and np.all(r == 5.0)
            with pytest.raises(TypeError, match=r"b must be float64, got float32 \(inside dp.precision"):
                dp.ops.gemm(a, b.astype(f32))
        with pytest.raises(TypeError, match="a must be float32, got float64"):
            dp.ops.gemm(a, b)  # the mode ends with the block
    with pytest.raises(ValueError, match="unknown precision 'float16'"):
        with dp.precision("float16"):
            pass


def test_float64_mode_is_refused_on_the_kernel_backends():
    with dp.use_backend("emu"):
        with pytest.raises(ValueError, match="the 'emu' backend computes in float32"):
            with dp.precision("float64"):
                pass
        dp.ops.gemm(np.ones((2, 2), f32), np.ones((2, 2), f32))  # the refused block left no trace
    with dp.use_backend("numpy"), dp.precision("float64"):
        with dp.use_backend("emu"):  # entered on numpy, an op on emu inside it
            with pytest.raises(ValueError, match="the 'emu' backend computes in float32"):
                dp.ops.gemm(np.ones((2, 2)), np.ones((2, 2)))
            with pytest.raises(ValueError, match="the 'emu' backend computes in float32"):
                dp.nn.Sequential(("fc", dp.nn.Linear(2, 2))).forward(np.ones((1, 2), f32))


# ---------------------------------------------------------------- inputs are never written
HOST_BACKENDS = ["numpy", "emu"]


def _read_only_inputs(tmp_path, rng, **arrays):
    """Each array saved and loaded back with np.load(mmap_mode="r"): read-only file mappings."""
    out = {}
    for name, a in arrays.items():
        np.save(tmp_path / f"{name}.npy", a)
        out[name] = np.load(tmp_path / f"{name}.npy", mmap_mode="r")
        assert not out[name].flags.writeable
    return out


@pytest.mark.parametrize("backend", HOST_BACKENDS, indirect=True)
def test_read_only_inputs_work_and_stay_unchanged(backend, tmp_path, rng):
    """np.load(..., mmap_mode="r") arrays as inputs of every op (the emu backend used to copy
    every buffer back after a launch and crashed writing into them)."""
    r = lambda *s: rng.standard_normal(s).astype(f32)  # noqa: E731
    src = dict(a=r(6, 5), b=r(5, 4), x=r(2, 3, 6, 6), w=r(4, 3, 3, 3), dw=r(3, 1, 3, 3), bias=r(4), dy=r(2, 4, 6, 6),
               v=r(9), X=r(9, 3))
    ro = _read_only_inputs(tmp_path, rng, **src)
    dense = np.where(rng.random((7, 9)) < 0.4, r(7, 9), 0).astype(f32)
    csr = dp.sparse.CSR.from_dense(dense)
    pairs = [
        (lambda d: dp.ops.gemm(d["a"], d["b"])),
        (lambda d: dp.ops.gemm(d["b"], d["a"], trans_a=True, trans_b=True)),
        (lambda d: dp.ops.conv2d(d["x"], d["w"], d["bias"], padding=1)),
        (lambda d: dp.ops.conv2d(d["x"], d["w"], d["bias"], padding=1, algo="direct")),
        (lambda d: dp.ops.conv2d_backward(d["x"], d["w"], d["dy"], padding=1)),
        (lambda d: dp.ops.depthwise_conv2d(d["x"], d["dw"], padding=1)),
        (lambda d: dp.ops.depthwise_conv2d_backward(d["x"], d["dw"], d["x"], padding=1)),
        (lambda d: dp.ops.im2col(d["x"], 3, 3, padding=1)),
        (lambda d: dp.ops.col2im(dp.ops.im2col(d["x"], 3, 3), d["x"].shape, 3, 3)),
        (lambda d: dp.ops.spmv(csr, d["v"])),
        (lambda d: dp.ops.spmm(csr, d["X"])),
    ]
    for fn in pairs:
        want = fn(src)
        got = fn(ro)
        for g, w in zip(got if isinstance(got, tuple) else (got,), want if isinstance(want, tuple) else (want,)):
            np.testing.assert_array_equal(g, w)
    for name, a in src.items():
        np.testing.assert_array_equal(ro[name], a, err_msg=f"{name} was written")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_a_read_only_or_overlapping_accumulator_is_refused(backend):
    a, b = backend.asarray(np.ones((4, 5), f32)), backend.asarray(np.ones((5, 3), f32))
    c = np.full((4, 3), 2.0, f32)
    if backend.name != "cuda":
        c.flags.writeable = False
        with pytest.raises(ValueError, match=r"c \(updated in place with beta != 0\) is written in place but the "
                                             r"array is read-only"):
            dp.ops.gemm(a, b, beta=1.0, c=c)
        assert np.all(c == 2.0)
        assert dp.ops.gemm(a, b, beta=0.0, c=c).shape == (4, 3)  # beta = 0: c is not used
    sq = backend.asarray(np.ones((4, 4), f32))
    with pytest.raises(ValueError, match="c is updated in place and must not overlap a"):
        dp.ops.gemm(sq, sq, beta=1.0, c=sq)


def test_emu_refuses_a_read_only_array_where_a_kernel_writes():
    from dnnpar.backend import get_backend

    with dp.use_backend("emu"):
        x, cols = np.ones((1, 1, 2, 2), f32), np.zeros((1, 4), f32)
        cols.flags.writeable = False
        with pytest.raises(ValueError, match="kernel im2col: argument cols is written by the kernel but the array "
                                             "is read-only"):
            get_backend().launch("im2col.cu", "im2col", (1, 1), (256,),
                                 (x, cols, *(np.int32(v) for v in (1, 1, 2, 2, 1, 1, 2, 2, 1, 1, 0, 0, 1, 1))))


# ---------------------------------------------------------------- geometry
@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_geometry_is_checked_before_anything_runs(backend, arrays):
    x, w = arrays(1, 1, 1, 1), arrays(1, 1, 1, 1)
    with pytest.raises(ValueError, match=r"stride=2147483648 along height does not fit the kernels' 32-bit"):
        dp.ops.conv2d(x, w, stride=(2**31, 1))
    with pytest.raises(ValueError, match=r"padding=18446744073709551616 along width"):
        dp.ops.im2col(x, 1, 1, padding=(0, 2**64))
    with pytest.raises(ValueError, match=r"the padded height 1 \+ 2\*2147483647 = 4294967295 exceeds 2147483647"):
        dp.ops.col2im(arrays(1, 3), (1, 1, 1, 1), 1, 1, stride=2**30, padding=(2**31 - 1, 0))
    with pytest.raises(ValueError, match=r"the output \(N, O, OH, OW\) would have shape \(1, 1, 65537, 65537\) "
                                         r"= 4295098369 elements; dnnpar kernels index arrays with 32 bits"):
        dp.ops.conv2d(x, w, padding=2**15, algo="direct")
    with pytest.raises(ValueError, match=r"the im2col matrix .* would have shape \(1, 4611686014132420609\)"):
        dp.ops.im2col(x, 1, 1, padding=2**30 - 1)
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints, got True"):
        dp.ops.conv2d(x, w, stride=True)
    with pytest.raises(TypeError, match=r"padding must be an int or a pair of ints, got \(1, False\)"):
        dp.ops.depthwise_conv2d(x, w, padding=(1, False))
    with pytest.raises(TypeError, match=r"im2col: kh must be an int, got 1.0 \(float\)"):
        dp.ops.im2col(x, 1.0, 1)
    with pytest.raises(TypeError, match=r"col2im: input shape \(1, 1, 1.5, 1\).*must be an int"):
        dp.ops.col2im(arrays(1, 1), (1, 1, 1.5, 1), 1, 1)
    with pytest.raises(ValueError, match=r"must be positive sizes, got \(1, 1, 0, 1\)"):
        dp.ops.col2im(arrays(1, 1), (1, 1, 0, 1), 1, 1)
    with pytest.raises(ValueError, match="dilation >= 1"):
        dp.ops.im2col(x, 1, 1, dilation=np.int64(0))


def test_huge_padding_allocates_only_what_the_output_needs():
    """A 3x3 output from a 1x1 image padded by 2**29 on each side: the padded input would have
    2**60 elements; the numpy path reads each tap's window of the image instead."""
    import tracemalloc

    x = np.full((1, 1, 1, 1), 3.0, f32)
    s, p = 2**29, 2**29
    with dp.use_backend("numpy"):
        tracemalloc.start()
        cols = dp.ops.im2col(x, 1, 1, stride=s, padding=p)
        y = dp.ops.conv2d(x, np.ones((1, 1, 1, 1), f32), stride=s, padding=p)
        dx = dp.ops.col2im(np.ones((1, 9), f32), x.shape, 1, 1, stride=s, padding=p)
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    assert peak < 1 << 20
    assert cols.shape == (1, 9) and np.array_equal(cols[0], [0, 0, 0, 0, 3, 0, 0, 0, 0])
    assert y.shape == (1, 1, 3, 3) and y[0, 0, 1, 1] == 3 and y.sum() == 3
    assert dx.shape == (1, 1, 1, 1) and dx[0, 0, 0, 0] == 1


# ---------------------------------------------------------------- CSR owns what it validated
@pytest.mark.parametrize("backend", HOST_BACKENDS, indirect=True)
@pytest.mark.parametrize("codebook", [False, True], ids=["f32", "codebook"])
def test_csr_is_immune_to_changes_of_the_callers_arrays(backend, codebook, rng):
    m, k = 5, 600
    cols = np.array([0, 3, 599, 1, 2, 300, 598], np.int32)
    ptr = np.array([0, 3, 3, 4, 6, 7], np.int64)
    cb = np.concatenate([[0.0], np.linspace(-1, 1, 15)]).astype(f32)
    data = (rng.integers(1, 16, cols.size).astype(np.uint8) if codebook else rng.standard_normal(cols.size).astype(f32))
    csr = dp.sparse.CSR(data, cols, ptr, (m, k), codebook=cb if codebook else None)
    dense = csr.to_dense().astype(np.float64)
    x = rng.standard_normal(k).astype(f32)
    want = dp.ops.spmv(csr, x)
    cols[:] = 2**30
    ptr[:] = [0, 7, 0, 7, 0, 7]
    data[:] = 255 if codebook else np.nan
    cb[:] = np.nan
    np.testing.assert_array_equal(dp.ops.spmv(csr, x), want)
    assert_sum_close(dp.ops.spmm(csr, x[:, None])[:, 0], dense @ x, np.abs(dense) @ np.abs(x), 7, "spmm after the caller's arrays changed")
    for name in ("data", "indices", "indptr") + (("codebook",) if codebook else ()):
        arr = getattr(csr, name)
        assert not arr.flags.writeable, name
        with pytest.raises(ValueError, match="read-only"):
            arr[0] = 1
        with pytest.raises(AttributeError):
            setattr(csr, name, arr)
    if backend.name == "numpy" and csr.scipy() is not None:
        assert not csr.scipy().indices.flags.writeable


def test_csr_refuses_indices_that_would_wrap_in_int32():
    ptr = np.array([0, 1], np.int64)
    with pytest.raises(ValueError, match=r"indices\[0\] = 4294967297 is outside \[0, 3\)"):
        dp.sparse.CSR(np.ones(1, f32), np.array([2**32 + 1], np.int64), ptr, (1, 3))
    with pytest.raises(ValueError, match="must start at 0 and end at nnz = 1"):
        dp.sparse.CSR(np.ones(1, f32), np.array([0]), np.array([0, 2**32 + 1], np.int64), (1, 3))
    with pytest.raises(ValueError, match="does not fit the kernels' 32-bit row and column indices"):
        dp.sparse.CSR(np.ones(1, f32), np.array([0]), ptr, (1, 2**31))
    with pytest.raises(ValueError, match="shape must be two positive ints"):
        dp.sparse.CSR(np.ones(1, f32), np.array([0]), ptr, (True, 3))
