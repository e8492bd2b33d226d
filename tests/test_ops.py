"""Every op on numpy, emu (the .cu kernels on the CPU) and cuda against float64 oracles."""
import numpy as np
import pytest

import dnnpar as dp
from conftest import BACKENDS, KERNEL_BACKENDS, assert_close
import oracles
from oracles import assert_sum_close

# (N, C, H, W, KH, KW, stride, padding, dilation): size 1, primes, non-multiples of every tile,
# stride > 1, padding > kernel/2, dilation > 1, asymmetric everything
GEOMETRIES = [
    (1, 1, 1, 1, 1, 1, (1, 1), (0, 0), (1, 1)),
    (2, 3, 7, 5, 3, 3, (1, 1), (1, 1), (1, 1)),
    (3, 2, 11, 13, 3, 5, (2, 2), (2, 2), (1, 1)),
    (1, 4, 9, 9, 3, 3, (3, 3), (4, 4), (1, 1)),
    (2, 3, 13, 11, 3, 3, (1, 1), (2, 2), (2, 2)),
    (1, 5, 17, 19, 2, 4, (2, 3), (1, 2), (3, 1)),
    (2, 1, 31, 7, 7, 1, (1, 2), (3, 0), (1, 1)),
]
GEO_IDS = [f"n{g[0]}c{g[1]}h{g[2]}w{g[3]}k{g[4]}x{g[5]}s{g[6][0]}{g[6][1]}p{g[7][0]}{g[7][1]}d{g[8][0]}{g[8][1]}"
           for g in GEOMETRIES]


def randn(rng, shape):
    """float32 inputs; the oracles then compute in float64 from exactly these values."""
    return rng.standard_normal(shape).astype(np.float32)


def put(be, *arrays):
    return [be.asarray(a.astype(np.float32)) for a in arrays]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("geo", GEOMETRIES, ids=GEO_IDS)
def test_im2col_col2im(backend, geo, rng):
    n, c, h, w, kh, kw, s, p, d = geo
    x = randn(rng, (n, c, h, w))
    (xd,) = put(backend, x)
    cols = dp.ops.im2col(xd, kh, kw, stride=s, padding=p, dilation=d)
    assert_close(backend.to_numpy(cols), oracles.im2col(x, kh, kw, s, p, d), 0, "im2col")  # a copy: exact
    g = randn(rng, cols.shape)
    (gd,) = put(backend, g)
    dx = dp.ops.col2im(gd, x.shape, kh, kw, stride=s, padding=p, dilation=d)
    assert_sum_close(backend.to_numpy(dx), oracles.col2im(g, x.shape, kh, kw, s, p, d),
                     oracles.col2im(np.abs(g), x.shape, kh, kw, s, p, d), kh * kw, "col2im")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("algo", ["im2col", "direct"])
@pytest.mark.parametrize("geo", GEOMETRIES, ids=GEO_IDS)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_conv2d(backend, algo, geo, with_bias, rng):
    n, c, h, w, kh, kw, s, p, d = geo
    o = 5 if c % 2 else 3
    x, wt, b = randn(rng, (n, c, h, w)), randn(rng, (o, c, kh, kw)), randn(rng, o)
    xd, wd, bd = put(backend, x, wt, b)
    out = dp.ops.conv2d(xd, wd, bd if with_bias else None, stride=s, padding=p, dilation=d, algo=algo)
    bb = b if with_bias else None
    assert_sum_close(backend.to_numpy(out), oracles.conv2d(x, wt, bb, s, p, d),
                     oracles.conv2d(np.abs(x), np.abs(wt), None if bb is None else np.abs(bb), s, p, d),
                     c * kh * kw + 1, "conv2d")


DEPTHWISE = [(1, 1, 1, 1, 1, (1, 1), (0, 0)), (2, 3, 7, 9, 3, (1, 1), (1, 1)), (1, 5, 13, 11, 3, (2, 2), (1, 1)),
             (2, 4, 10, 10, 5, (2, 1), (3, 2)), (1, 7, 17, 5, 3, (3, 3), (2, 2))]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("geo", DEPTHWISE, ids=lambda g: "x".join(str(v) for v in g[:5]) + f"s{g[5]}p{g[6]}")
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_depthwise_conv2d(backend, geo, with_bias, rng):
    n, c, h, w, k, s, p = geo
    x, wt, b = randn(rng, (n, c, h, w)), randn(rng, (c, 1, k, k)), randn(rng, c)
    xd, wd, bd = put(backend, x, wt, b)
    out = dp.ops.depthwise_conv2d(xd, wd, bd if with_bias else None, stride=s, padding=p)
    bb = b if with_bias else None
    assert_sum_close(backend.to_numpy(out), oracles.depthwise(x, wt, bb, s, p),
                     oracles.depthwise(np.abs(x), np.abs(wt), None if bb is None else np.abs(bb), s, p), k * k + 1,
                     "depthwise")


# (M, N, K): 1, primes, non-multiples of 16/32/128, multiples of 4 (float4 path) and a block-tile multiple
GEMM_SIZES = [(1, 1, 1), (1, 7, 3), (13, 1, 5), (31, 37, 41), (128, 128, 64), (131, 257, 67), (256, 132, 36),
              (3, 300, 129)]


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("algo", ["naive", "tiled", "regblock", "regblock_db"])
@pytest.mark.parametrize("mnk", GEMM_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("trans", ["NN", "NT", "TN", "TT"])
def test_gemm(backend, algo, mnk, trans, rng):
    m, n, k = mnk
    ta, tb = trans[0] == "T", trans[1] == "T"
    a = randn(rng, (k, m) if ta else (m, k))
    b = randn(rng, (n, k) if tb else (k, n))
    ad, bd = put(backend, a, b)
    c = dp.ops.gemm(ad, bd, trans_a=ta, trans_b=tb, algo=algo)
    a64, b64 = (a.T if ta else a).astype(np.float64), (b.T if tb else b).astype(np.float64)
    assert_sum_close(backend.to_numpy(c), a64 @ b64, np.abs(a64) @ np.abs(b64), k, f"gemm {algo} {trans}")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("algo", ["naive", "tiled", "regblock", "regblock_db", "tf32", "bf16"])
def test_gemm_alpha_beta_accumulates_in_place(backend, algo, rng):
    m, n, k = 67, 45, 29
    a, b, c0 = randn(rng, (m, k)), randn(rng, (k, n)), randn(rng, (m, n))
    ad, bd, cd = put(backend, a, b, c0)
    out = dp.ops.gemm(ad, bd, alpha=0.5, beta=-2.0, c=cd, algo=algo)
    assert out is cd
    a64, b64, c64 = a.astype(np.float64), b.astype(np.float64), c0.astype(np.float64)
    mag = 0.5 * np.abs(a64) @ np.abs(b64) + 2 * np.abs(c64)
    check = TENSOR_CORE[algo][0] if algo in TENSOR_CORE else assert_sum_close
    check(backend.to_numpy(cd), 0.5 * a64 @ b64 - 2.0 * c64, mag, k, f"gemm {algo} alpha/beta")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("algo", ["regblock_db", "tf32"])
@pytest.mark.parametrize("mnk", [(1, 1, 1), (67, 45, 29), (8, 600, 130)], ids=lambda s: "x".join(map(str, s)))
def test_gemm_writes_into_out(backend, algo, mnk, rng):
    """``out``: the product lands in the given (poisoned) array, which is returned; the same
    values as without it. Each wrong out is refused before anything is written."""
    m, n, k = mnk
    a, b = randn(rng, (k, m)), randn(rng, (k, n))
    ad, bd = put(backend, a, b)
    want = backend.to_numpy(dp.ops.gemm(ad, bd, trans_a=True, algo=algo))
    (out,) = put(backend, np.full((m, n), np.nan, np.float32))
    assert dp.ops.gemm(ad, bd, trans_a=True, algo=algo, out=out) is out
    np.testing.assert_array_equal(backend.to_numpy(out), want)
    a64, b64 = a.T.astype(np.float64), b.astype(np.float64)
    check = TENSOR_CORE[algo][0] if algo in TENSOR_CORE else assert_sum_close
    check(backend.to_numpy(out), a64 @ b64, np.abs(a64) @ np.abs(b64), k, f"gemm {algo} out")
    (wide,) = put(backend, np.zeros((m, 2 * n), np.float32))
    (cd,) = put(backend, np.zeros((m, n), np.float32))
    bad = [(put(backend, np.zeros((m, n + 1), np.float32))[0], ValueError, "shape"),
           (backend.asarray(np.zeros((m, n), np.float64)), TypeError, "float32")]
    if n > 1:
        bad.append((wide[:, ::2], ValueError, "C-contiguous"))
    if backend.name == "numpy":
        ro = np.zeros((m, n), np.float32)
        ro.flags.writeable = False
        shared = np.zeros(k * m + m * n, np.float32)  # out's first entry is a's last
        bad += [(ro, ValueError, "read-only"), (shared[k * m - 1:k * m - 1 + m * n].reshape(m, n), ValueError,
                                                "overlap a")]
        ad = shared[:k * m].reshape(k, m)
        ad[...] = a
    for o, exc, what in bad:
        with pytest.raises(exc, match=what):
            dp.ops.gemm(ad, bd, trans_a=True, algo=algo, out=o)
    with pytest.raises(ValueError, match="beta = 0"):
        dp.ops.gemm(ad, bd, trans_a=True, beta=1.0, c=cd, out=out, algo=algo)
    np.testing.assert_array_equal(backend.to_numpy(out), want)  # untouched by the refused calls


# TF32 tensor-core GEMM (64 x 64 x 16 block tile): size 1, primes and non-multiples, one tile exactly,
# K over several pipeline stages with a ragged last one; lda/ldb multiples of 4 (16-byte cp.async) or not
GEMM_TF32_SIZES = [(1, 1, 1), (17, 33, 45), (128, 128, 32), (129, 67, 100)]


#: tensor-core algo -> (its error-bound assertion, the independent rounding of its operands)
TENSOR_CORE = {"tf32": (oracles.assert_tf32_close, oracles.tf32), "bf16": (oracles.assert_bf16_close, oracles.bf16)}


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("algo", list(TENSOR_CORE))
@pytest.mark.parametrize("mnk", GEMM_TF32_SIZES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("trans", ["NN", "NT", "TN", "TT"])
def test_gemm_tensor_cores(backend, algo, mnk, trans, rng):
    """Within the algo's bound of the float64 product of the float32 operands, and within the
    plain float32 summation bound of the product of their independently rounded values (so each
    backend rounds the operands exactly as cvt.rna.tf32 / cvt.rn.bf16x2 do)."""
    m, n, k = mnk
    ta, tb = trans[0] == "T", trans[1] == "T"
    a = randn(rng, (k, m) if ta else (m, k))
    b = randn(rng, (n, k) if tb else (k, n))
    ad, bd = put(backend, a, b)
    c = backend.to_numpy(dp.ops.gemm(ad, bd, trans_a=ta, trans_b=tb, algo=algo))
    a64, b64 = (a.T if ta else a).astype(np.float64), (b.T if tb else b).astype(np.float64)
    assert_bound, rounding = TENSOR_CORE[algo]
    assert_bound(c, a64 @ b64, np.abs(a64) @ np.abs(b64), k, f"gemm {algo} {trans}")
    ra, rb = rounding(a64), rounding(b64)
    assert_sum_close(c, ra @ rb, np.abs(ra) @ np.abs(rb), k, f"gemm {algo} {trans} against rounded operands")


@pytest.mark.parametrize("algo", list(TENSOR_CORE))
def test_gemm_tensor_cores_take_float32_only(rng, algo):
    a = rng.standard_normal((3, 4))
    with dp.use_backend("numpy"), dp.precision("float64"):
        with pytest.raises(TypeError, match=f"{algo}.*float32 operands, got float64"):
            dp.ops.gemm(a, a, trans_b=True, algo=algo)


def test_round_tf32_matches_an_independent_rounding(rng):
    """dnnpar's bit trick against frexp arithmetic: random normal values, exact ties (13 low bits
    1000000000000, both signs: away from zero), values that round up to the next binade, and the
    non-finite ones."""
    from dnnpar.ops.gemm import round_tf32

    x = (rng.standard_normal(20000) * np.exp2(rng.integers(-100, 100, 20000))).astype(np.float32)
    exponent = rng.integers(1, 254, 2000, dtype=np.uint32) << np.uint32(23)  # normal, up to 2^126
    bits = rng.integers(0, 2**23, 2000, dtype=np.uint32) | exponent | (rng.integers(0, 2, 2000, dtype=np.uint32) << np.uint32(31))
    ties = ((bits & np.uint32(0xFFFFE000)) | np.uint32(0x1000)).view(np.float32)
    up = ((bits & np.uint32(0xFFFFE000)) | np.uint32(0x007FF000)).view(np.float32)  # mantissa carries out
    x = np.concatenate([x, ties, -ties, up, -up])
    np.testing.assert_array_equal(round_tf32(x).astype(np.float64), oracles.tf32(x))
    fmax = np.finfo(np.float32).max  # past the largest TF32, (2 - 2^-10) 2^127, by more than half an ulp
    special = np.array([np.inf, -np.inf, np.nan, 0.0, -0.0, fmax, -fmax], np.float32)
    r = round_tf32(special)
    assert r[0] == np.inf and r[1] == -np.inf and np.isnan(r[2]) and r[3] == 0 and np.signbit(r[4])
    assert r[5] == np.inf and r[6] == -np.inf


def test_round_bf16_matches_an_independent_rounding(rng):
    """As for TF32, with BF16's ties to even: 16 low bits 0x8000 go to the even neighbour."""
    from dnnpar.ops.gemm import round_bf16

    x = (rng.standard_normal(20000) * np.exp2(rng.integers(-100, 100, 20000))).astype(np.float32)
    exponent = rng.integers(1, 254, 2000, dtype=np.uint32) << np.uint32(23)
    bits = rng.integers(0, 2**23, 2000, dtype=np.uint32) | exponent | (rng.integers(0, 2, 2000, dtype=np.uint32) << np.uint32(31))
    ties = ((bits & np.uint32(0xFFFF0000)) | np.uint32(0x8000)).view(np.float32)
    up = ((bits & np.uint32(0xFFFF0000)) | np.uint32(0x007FC000)).view(np.float32)
    x = np.concatenate([x, ties, up])
    np.testing.assert_array_equal(round_bf16(x).astype(np.float64), oracles.bf16(x))
    r = round_bf16(np.array([np.inf, -np.inf, np.nan, -0.0], np.float32))
    assert r[0] == np.inf and r[1] == -np.inf and np.isnan(r[2]) and np.signbit(r[3])


def assert_sparse(got, dense, x, what):
    """A sparse product against float64, within the float32 bound of its longest row's sum."""
    x64 = x.astype(np.float64)
    terms = max(1, int(np.count_nonzero(dense, axis=1).max()))
    assert_sum_close(got, dense @ x64, np.abs(dense) @ np.abs(x64), terms, what)


SPARSE = [(1, 1, 1.0), (7, 13, 0.4), (131, 257, 0.05), (64, 300, 0.5), (33, 1000, 0.01)]


def make_csr(backend, dense, codebook):
    if codebook:
        cb = np.linspace(-1.5, 2.0, 37).astype(np.float32)
        codes = np.where(dense != 0, 1 + (np.abs(dense * 1000).astype(np.int64) % 36), 0).astype(np.uint8)
        return dp.sparse.CSR.from_dense(codes, codebook=cb), np.where(codes > 0, cb[codes], 0.0).astype(np.float64)
    return dp.sparse.CSR.from_dense(dense.astype(np.float32)), dense.astype(np.float32).astype(np.float64)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("shape", SPARSE, ids=lambda s: f"{s[0]}x{s[1]}d{s[2]}")
@pytest.mark.parametrize("algo", ["scalar", "vector"])
@pytest.mark.parametrize("codebook", [False, True], ids=["f32", "codebook"])
def test_spmv(backend, shape, algo, codebook, rng):
    m, k, density = shape
    csr, dense = make_csr(backend, oracles.random_csr(rng, m, k, density, long_row=m // 2), codebook)
    x = randn(rng, k)
    (xd,) = put(backend, x)
    y = dp.ops.spmv(csr, xd, algo=algo)
    assert_sparse(backend.to_numpy(y), dense, x, "spmv")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("shape", SPARSE, ids=lambda s: f"{s[0]}x{s[1]}d{s[2]}")
@pytest.mark.parametrize("batch", [1, 33, 70])
@pytest.mark.parametrize("codebook", [False, True], ids=["f32", "codebook"])
def test_spmm(backend, shape, batch, codebook, rng):
    m, k, density = shape
    csr, dense = make_csr(backend, oracles.random_csr(rng, m, k, density), codebook)
    X = randn(rng, (k, batch))
    (Xd,) = put(backend, X)
    Y = dp.ops.spmm(csr, Xd)
    assert_sparse(backend.to_numpy(Y), dense, X, "spmm")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
def test_vector_spmv_picks_every_group_width(backend, rng):
    """Mean row lengths from 1 to 64 exercise tpr = 2, 4, 8, 16 and 32."""
    from dnnpar.ops.sparse import threads_per_row

    seen = set()
    for nnz_per_row in (1, 3, 7, 12, 30, 64):
        m, k = 41, 97
        dense = np.zeros((m, k))
        for r in range(m):
            dense[r, rng.choice(k, size=min(k, nnz_per_row), replace=False)] = randn(rng, min(k, nnz_per_row))
        csr = dp.sparse.CSR.from_dense(dense.astype(np.float32))
        seen.add(threads_per_row(csr))
        x = randn(rng, k)
        y = dp.ops.spmv(csr, backend.asarray(x.astype(np.float32)), algo="vector")
        assert_sparse(backend.to_numpy(y), dense.astype(np.float32).astype(np.float64), x, f"spmv, {nnz_per_row}/row")
    assert seen == {2, 4, 8, 16, 32}


@pytest.mark.parametrize("scipy", [True, False], ids=["scipy", "numpy-only"])
@pytest.mark.parametrize("codebook", [False, True], ids=["f32", "codebook"])
def test_numpy_backend_sparse_with_and_without_scipy(monkeypatch, scipy, codebook, rng):
    """dnnpar's core needs NumPy only: without SciPy the numpy backend's sparse products fall
    back to NumPy (small SpMM chunks force the chunked path)."""
    import dnnpar.ops.sparse as S

    monkeypatch.setitem(dp.sparse.SCIPY, "use", scipy)
    monkeypatch.setattr(S, "SPMM_CHUNK", 64)
    with dp.use_backend("numpy") as be:
        csr, dense = make_csr(be, oracles.random_csr(rng, 67, 131, 0.1, long_row=5), codebook)
        assert (csr.scipy() is not None) == scipy
        x, X = randn(rng, 131), randn(rng, (131, 9))
        assert_sparse(dp.ops.spmv(csr, x), dense, x, "spmv")
        assert_sparse(dp.ops.spmm(csr, X), dense, X, "spmm")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
def test_plane_kernels_stride_over_more_planes_than_grid_rows(backend, monkeypatch, rng):
    """im2col, col2im and depthwise put planes on gridDim.y (CUDA allows 65535) and stride over
    the rest: with the cap forced to 2 rows, 7 planes still all get computed."""
    import dnnpar.ops._common as common

    monkeypatch.setattr(common, "MAX_GRID_Y", 2)
    n, c, h, w = 1, 7, 6, 5
    x, wd = randn(rng, (n, c, h, w)), randn(rng, (c, 1, 3, 3))
    xd, wdd = put(backend, x, wd)
    cols = dp.ops.im2col(xd, 3, 3, padding=1)
    assert_close(backend.to_numpy(cols), oracles.im2col(x, 3, 3, (1, 1), (1, 1), (1, 1)), 0, "im2col")
    dx = dp.ops.col2im(cols, x.shape, 3, 3, padding=1)
    c64 = backend.to_numpy(cols)
    assert_sum_close(backend.to_numpy(dx), oracles.col2im(c64, x.shape, 3, 3, (1, 1), (1, 1), (1, 1)),
                     oracles.col2im(np.abs(c64), x.shape, 3, 3, (1, 1), (1, 1), (1, 1)), 9, "col2im")
    out = dp.ops.depthwise_conv2d(xd, wdd, padding=1)
    assert_sum_close(backend.to_numpy(out), oracles.depthwise(x, wd, None, (1, 1), (1, 1)),
                     oracles.depthwise(np.abs(x), np.abs(wd), None, (1, 1), (1, 1)), 9, "depthwise")
    dy = randn(rng, out.shape)
    gx, _, _ = dp.ops.depthwise_conv2d_backward(xd, wdd, backend.asarray(dy), padding=1)
    dcols = wd.astype(np.float64).reshape(c, 9, 1) * dy.astype(np.float64).transpose(1, 0, 2, 3).reshape(c, 1, -1)
    want = oracles.col2im(dcols.reshape(c * 9, -1), x.shape, 3, 3, (1, 1), (1, 1), (1, 1))
    mag = oracles.col2im(np.abs(dcols).reshape(c * 9, -1), x.shape, 3, 3, (1, 1), (1, 1), (1, 1))
    assert_sum_close(backend.to_numpy(gx), want, mag, 9, "depthwise dx")
