"""Backward ops against float64 oracles: the adjoint of the forward (im2col-based, gathered by index)."""
import numpy as np
import pytest

import dnnpar as dp
import oracles
from conftest import BACKENDS
from oracles import assert_sum_close
from test_ops import GEO_IDS, GEOMETRIES, DEPTHWISE, put, randn


# The numpy backend's dx may take one GEMM per tap from 8 input channels on (where dcols would be
# large, or without the native col2im): the same geometries with 8+ channels (prime counts among
# them) cover that path with strides, padding and dilation (test_conv2d_dx_by_taps forces it).
WIDE = [(n, c + 8, h, w, kh, kw, s, p, d) for n, c, h, w, kh, kw, s, p, d in GEOMETRIES]


def conv_gradient_checker(x, wt, dy, s, p, d):
    """Checks of (dw, db, dx) against float64 oracles within float32 summation bounds: dw and db
    sum N*OH*OW products; dx sums O products per tap and KH*KW taps, in whatever nesting an
    implementation picks (O*KH*KW + KH*KW bounds them all)."""
    o, c, kh, kw = wt.shape
    cols, acols = oracles.im2col(x, kh, kw, s, p, d), oracles.im2col(np.abs(x), kh, kw, s, p, d)
    dy2 = dy.astype(np.float64).transpose(1, 0, 2, 3).reshape(o, -1)
    w2 = wt.astype(np.float64).reshape(o, -1)
    n = dy2.shape[1]

    def check(dw, db, dx, what):
        mag = (np.abs(dy2) @ acols.T).reshape(wt.shape)
        assert_sum_close(dw, (dy2 @ cols.T).reshape(wt.shape), mag, n, "dw" + what)
        if db is not None:
            assert_sum_close(db, dy2.sum(1), np.abs(dy2).sum(1), n, "db" + what)
        if dx is not None:
            want = oracles.col2im(w2.T @ dy2, x.shape, kh, kw, s, p, d)
            mag = oracles.col2im(np.abs(w2).T @ np.abs(dy2), x.shape, kh, kw, s, p, d)
            assert_sum_close(dx, want, mag, o * kh * kw + kh * kw, "dx" + what)
    return check


@pytest.mark.parametrize("geo", WIDE, ids=[f"wide-{i}" for i in GEO_IDS])
def test_conv2d_dx_by_taps(monkeypatch, geo, rng):
    """The numpy backend's dx by one GEMM per kernel tap (conv2d_dx_numpy), forced (dcols limit
    0) on every wide geometry: the path large layers take, against the float64 oracle."""
    from dnnpar.ops import conv as C
    calls = []
    taps = C.conv2d_dx_numpy
    monkeypatch.setattr(C, "DX_DCOLS_MAX_BYTES", 0)
    monkeypatch.setattr(C, "conv2d_dx_numpy", lambda *a: calls.append(1) or taps(*a))
    monkeypatch.setitem(C.TILED, "use", False)  # the tiled dx kernels would take some layers
    n, c, h, w, kh, kw, s, p, d = geo
    x, wt = randn(rng, (n, c, h, w)), randn(rng, (5, c, kh, kw))
    oh, ow = oracles.out_size(h, kh, s[0], p[0], d[0]), oracles.out_size(w, kw, s[1], p[1], d[1])
    dy = randn(rng, (n, 5, oh, ow))
    with dp.use_backend("numpy"):
        dx, dw, db = dp.ops.conv2d_backward(x, wt, dy, stride=s, padding=p, dilation=d)
    assert calls, "the per-tap path did not run"
    conv_gradient_checker(x, wt, dy, s, p, d)(dw, db, dx, " (taps)")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("geo", GEOMETRIES + WIDE, ids=GEO_IDS + [f"wide-{i}" for i in GEO_IDS])
def test_conv2d_backward(backend, geo, rng):
    n, c, h, w, kh, kw, s, p, d = geo
    o = 4
    x, wt = randn(rng, (n, c, h, w)), randn(rng, (o, c, kh, kw))
    oh, ow = oracles.out_size(h, kh, s[0], p[0], d[0]), oracles.out_size(w, kw, s[1], p[1], d[1])
    dy = randn(rng, (n, o, oh, ow))
    xd, wd, dyd = put(backend, x, wt, dy)
    dx, dw, db = dp.ops.conv2d_backward(xd, wd, dyd, stride=s, padding=p, dilation=d)
    check = conv_gradient_checker(x, wt, dy, s, p, d)
    check(backend.to_numpy(dw), backend.to_numpy(db), backend.to_numpy(dx), "")
    none_dx, dw2, _ = dp.ops.conv2d_backward(xd, wd, dyd, stride=s, padding=p, dilation=d, need_dx=False)
    assert none_dx is None
    check(backend.to_numpy(dw2), None, None, " without dx")
    # the forward's im2col matrix, handed back, gives the same gradients
    y, kept = dp.ops.conv2d(xd, wd, stride=s, padding=p, dilation=d, return_cols=True)
    assert_sum_close(backend.to_numpy(y), oracles.conv2d(x, wt, None, s, p, d),
                     oracles.conv2d(np.abs(x), np.abs(wt), None, s, p, d), c * kh * kw, "y with return_cols")
    assert kept is not None or not backend.runs_kernels  # the kernel backends always build cols
    if kept is not None:
        dx3, dw3, _ = dp.ops.conv2d_backward(xd, wd, dyd, stride=s, padding=p, dilation=d, cols=kept)
        check(backend.to_numpy(dw3), None, backend.to_numpy(dx3), " from kept cols")
        with pytest.raises(ValueError, match="cols must have shape"):
            dp.ops.conv2d_backward(xd, wd, dyd, stride=s, padding=p, dilation=d, cols=kept[:-1])


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("geo", DEPTHWISE, ids=lambda g: "x".join(str(v) for v in g[:5]) + f"s{g[5]}p{g[6]}")
def test_depthwise_conv2d_backward(backend, geo, rng):
    n, c, h, w, k, s, p = geo
    x, wt = randn(rng, (n, c, h, w)), randn(rng, (c, 1, k, k))
    oh, ow = oracles.out_size(h, k, s[0], p[0], 1), oracles.out_size(w, k, s[1], p[1], 1)
    dy = randn(rng, (n, c, oh, ow))
    xd, wd, dyd = put(backend, x, wt, dy)
    dx, dw, db = dp.ops.depthwise_conv2d_backward(xd, wd, dyd, stride=s, padding=p)
    cols = oracles.im2col(x, k, k, s, p, (1, 1)).reshape(c, k * k, -1)
    dy2 = dy.astype(np.float64).transpose(1, 0, 2, 3).reshape(c, -1)
    n = dy2.shape[1]
    assert_sum_close(backend.to_numpy(dw), np.einsum("cp,ckp->ck", dy2, cols).reshape(wt.shape),
                     np.einsum("cp,ckp->ck", np.abs(dy2), np.abs(cols)).reshape(wt.shape), n, "dw")
    assert_sum_close(backend.to_numpy(db), dy2.sum(1), np.abs(dy2).sum(1), n, "db")
    dcols = wt.astype(np.float64).reshape(c, k * k, 1) * dy2[:, None, :]
    want_dx = oracles.col2im(dcols.reshape(c * k * k, -1), x.shape, k, k, s, p, (1, 1))
    mag_dx = oracles.col2im(np.abs(dcols).reshape(c * k * k, -1), x.shape, k, k, s, p, (1, 1))
    assert_sum_close(backend.to_numpy(dx), want_dx, mag_dx, k * k, "dx")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_backward_rejects_a_dy_of_the_wrong_shape(backend):
    x, w = backend.asarray(np.ones((2, 3, 8, 8), np.float32)), backend.asarray(np.ones((4, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"dy must have the output's shape \(2, 4, 6, 6\)"):
        dp.ops.conv2d_backward(x, w, backend.asarray(np.ones((2, 4, 8, 8), np.float32)))
    wd = backend.asarray(np.ones((3, 1, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"dy must have the output's shape \(2, 3, 8, 8\)"):
        dp.ops.depthwise_conv2d_backward(x, wd, backend.asarray(np.ones((2, 3, 6, 6), np.float32)), padding=1)


@pytest.mark.parametrize("geo", GEOMETRIES, ids=GEO_IDS)
@pytest.mark.parametrize("block_rows", [7, 4096])
def test_numpy_blocked_conv_path(monkeypatch, geo, block_rows, rng):
    """The numpy backend's blocked NHWC path (used for large stride-1 layers) forced on small
    shapes, with a prime block size so that blocks end mid-row and mid-image."""
    from dnnpar.ops import conv as C

    monkeypatch.setattr(C, "FAST_FORWARD_BYTES", 0)
    monkeypatch.setattr(C, "FAST_BACKWARD_BYTES", 0)
    monkeypatch.setattr(C, "FAST_DX_MIN_CHANNELS", 1)
    monkeypatch.setattr(C, "FAST_ROWS", block_rows)
    n, c, h, w, kh, kw, s, p, d = geo
    o = 3
    x, wt, b = randn(rng, (n, c, h, w)), randn(rng, (o, c, kh, kw)), randn(rng, o)
    oh, ow = oracles.out_size(h, kh, s[0], p[0], d[0]), oracles.out_size(w, kw, s[1], p[1], d[1])
    dy = randn(rng, (n, o, oh, ow))
    with dp.use_backend("numpy"):
        y = dp.ops.conv2d(x, wt, b, stride=s, padding=p, dilation=d)
        dx, dw, db = dp.ops.conv2d_backward(x, wt, dy, stride=s, padding=p, dilation=d)
    assert_sum_close(y, oracles.conv2d(x, wt, b, s, p, d), oracles.conv2d(np.abs(x), np.abs(wt), np.abs(b), s, p, d),
                     c * kh * kw + 1, "y")
    conv_gradient_checker(x, wt, dy, s, p, d)(dw, db, dx, " (blocked)")
    assert C._fast_path_ok(C.ConvGeometry.make("t", x.shape, kh, kw, s, p, d)) == (s == (1, 1))
