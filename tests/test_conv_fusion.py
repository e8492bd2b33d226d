"""The numpy backend's native convolution glue (dnnpar/cpu/conv.cpp: im2col, col2im, the forward
epilogue with bias + ReLU / ReLU6 and the backward repacking with the activation's mask and db)
against the float64 oracles of tests/oracles.py, Conv2d's fused activation in a Graph, and the
NumPy fallback."""

import textwrap

import numpy as np
import pytest

import dnnpar as dp
import dnnpar.nn.base as base
import oracles
from dnnpar.backend import cpu_native, poison_outputs
from dnnpar.nn import Sequential
from dnnpar.nn.conv import Conv2d
from dnnpar.nn.layers import Flatten, Linear, ReLU, ReLU6, SoftmaxCrossEntropy
from dnnpar.ops import conv as C
from conftest import run_json_script
from oracles import assert_sum_close


# (x shape, O, kernel, stride, padding, dilation): odd sizes, primes, N = 1, stride 2, dilation,
# padding wider than the kernel's reach, rows narrower and wider than NATIVE_MIN_OW
GEOMETRIES = [
    ((1, 1, 5, 7), 1, (3, 3), 1, 0, 1),
    ((3, 5, 17, 19), 7, (3, 3), 1, 1, 1),
    ((2, 3, 23, 29), 4, (5, 3), 2, (2, 1), 1),
    ((2, 4, 19, 31), 3, (3, 3), (1, 2), 3, 2),
    ((1, 9, 13, 37), 11, (2, 4), 3, (4, 0), (2, 1)),
    ((5, 2, 31, 17), 6, (1, 1), 2, 0, 1),
]


def _native_conv(monkeypatch, vectors: str | None):
    """The native conv paths at every geometry: the glue around BLAS (``vectors`` None) or the
    tiled kernels of one family ("positions" / "channels")."""
    if cpu_native.library("conv") is None:
        pytest.skip(f"native conv kernel unavailable: {cpu_native.unavailable_reason('conv')}")
    monkeypatch.setitem(C.NATIVE_MIN_OW, "im2col", 1)
    monkeypatch.setitem(C.NATIVE_MIN_OW, "col2im", 1)
    monkeypatch.setitem(C.NATIVE_MIN_EPILOGUE, "size", 1)
    monkeypatch.setitem(C.TILED, "use", vectors is not None)
    monkeypatch.setitem(C.TILED, "vectors", vectors)
    for key, every in (("min_efficiency", 0.0), ("max_k", 1 << 30), ("min_plane_1x1", 0), ("min_positions_backward", 0)):
        monkeypatch.setitem(C.TILED, key, every)
    return dp.use_backend("numpy")


@pytest.fixture
def native_conv(monkeypatch):
    """The conv glue library on the numpy backend (im2col / col2im / epilogues around BLAS; skipped,
    with the reason, where it cannot be built); NATIVE_MIN_OW lowered so every geometry runs
    natively, the tiled kernels off."""
    with _native_conv(monkeypatch, None) as be, poison_outputs():
        yield be


@pytest.fixture(params=["glue", "positions", "channels"])
def either_conv(request, monkeypatch):
    """Every native path in turn: the glue around BLAS and the two families of register-tiled
    direct kernels (each taken at every geometry)."""
    with _native_conv(monkeypatch, None if request.param == "glue" else request.param), poison_outputs():
        yield request.param


@pytest.fixture(params=cpu_native.TILED_VECTORS)
def vectors(request):
    """Each family of tiled kernels: vectors over output positions, or over output channels."""
    return request.param


@pytest.fixture
def fusion():
    saved = base.FUSION
    yield
    base.FUSION = saved


def _geo(xs, o, k, s, p, d):
    g = dp.ops._common.ConvGeometry.make("test", xs, k[0], k[1], s, p, d)
    return g, (g.n, g.c, g.h, g.w, g.kh, g.kw, g.oh, g.ow, *g.stride, *g.padding, *g.dilation)


def _pairs(g):
    return g.stride, g.padding, g.dilation


@pytest.mark.parametrize("geom", GEOMETRIES)
def test_im2col_col2im_exact(native_conv, rng, geom):
    """im2col copies (equal to the oracle bit for bit, zeros on the padding); col2im sums at most
    KH*KW taps per pixel (within their float32 summation bound)."""
    xs, o, k, s, p, d = geom
    g, _ = _geo(xs, o, k, s, p, d)
    x = rng.standard_normal(xs).astype(np.float32)
    cols = dp.ops.im2col(x, *k, s, p, d)
    np.testing.assert_array_equal(cols, oracles.im2col(x, *k, *_pairs(g)).astype(np.float32))
    dc = rng.standard_normal(g.cols_shape).astype(np.float32)
    dx = dp.ops.col2im(dc, xs, *k, s, p, d)
    assert_sum_close(dx, oracles.col2im(dc.astype(np.float64), xs, *k, *_pairs(g)),
                     oracles.col2im(np.abs(dc).astype(np.float64), xs, *k, *_pairs(g)), k[0] * k[1], "col2im")


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("act", [None, "relu", "relu6"])
@pytest.mark.parametrize("bias", [True, False])
def test_conv2d_forward_backward_against_float64(either_conv, rng, geom, act, bias):
    xs, o, k, s, p, d = geom
    g, _ = _geo(xs, o, k, s, p, d)
    x = (rng.standard_normal(xs) * 3).astype(np.float32)
    w = rng.standard_normal((o, xs[1], *k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32) if bias else None
    y = dp.ops.conv2d(x, w, b, s, p, d, activation=act)
    pre = oracles.conv2d(x.astype(np.float64), w.astype(np.float64), None if b is None else b.astype(np.float64),
                         *_pairs(g))
    mag = oracles.conv2d(np.abs(x).astype(np.float64), np.abs(w).astype(np.float64),
                         None if b is None else np.abs(b).astype(np.float64), *_pairs(g))
    terms = xs[1] * k[0] * k[1] + bias
    want = pre if act is None else np.clip(pre, 0, 6 if act == "relu6" else None)
    assert_sum_close(y, want, mag, terms, f"conv2d {act}")  # clipping only shrinks the error
    # backward at the activated output: the mask is the activation's, dy is poisoned-free random
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw, db = dp.ops.conv2d_backward(x, w, dy, s, p, d, activation=act, y=y)
    mask = np.ones(y.shape, bool) if act is None else (y > 0) & ((y < 6) if act == "relu6" else True)
    dyo = np.where(mask, dy, 0).astype(np.float64)
    n_pos = g.n * g.oh * g.ow
    cols64 = oracles.im2col(x.astype(np.float64), *k, *_pairs(g))
    dym = dyo.transpose(1, 0, 2, 3).reshape(o, -1)
    assert_sum_close(dw, (dym @ cols64.T).reshape(w.shape), (np.abs(dym) @ np.abs(cols64).T).reshape(w.shape),
                     n_pos, "dw")
    assert_sum_close(db, dym.sum(axis=1), np.abs(dym).sum(axis=1), n_pos, "db")
    wm = w.reshape(o, -1).astype(np.float64)
    assert_sum_close(dx, oracles.col2im(wm.T @ dym, xs, *k, *_pairs(g)),
                     oracles.col2im(np.abs(wm).T @ np.abs(dym), xs, *k, *_pairs(g)), o * k[0] * k[1], "dx")


def test_native_kernels_bit_identical_over_threads(native_conv, rng):
    xs, o, k, s, p, d = GEOMETRIES[3]
    g, geo = _geo(xs, o, k, s, p, d)
    x = rng.standard_normal(xs).astype(np.float32)
    cols = rng.standard_normal(g.cols_shape).astype(np.float32)
    ym = rng.standard_normal((o, g.n * g.oh * g.ow)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    dy = rng.standard_normal((g.n, o, g.oh, g.ow)).astype(np.float32)
    runs = []
    for t in (1, 2, 3):
        y = cpu_native.conv_epilogue(ym, b, np.full(dy.shape, np.nan, np.float32), "relu6", threads=t)
        runs.append([cpu_native.conv_im2col(x, np.full(g.cols_shape, np.nan, np.float32), geo, threads=t),
                     cpu_native.conv_col2im(cols, np.full(xs, np.nan, np.float32), geo, threads=t), y,
                     *cpu_native.conv_epilogue_backward(dy, y, np.full(ym.shape, np.nan, np.float32),
                                                        np.full(o, np.nan, np.float32), "relu6", threads=t)])
    for r in runs[1:]:
        for a, b_ in zip(runs[0], r):
            np.testing.assert_array_equal(a, b_)


def test_epilogue_activation_semantics(native_conv):
    """NaN passes forward, is masked to 0 backward (even a NaN dy), the ReLU6 mask is 0 < y < 6."""
    ym = np.array([[-np.inf, -1.0, 0.0, 0.5, 6.0, 7.0, np.nan]], np.float32)
    y = cpu_native.conv_epilogue(ym, None, np.empty((1, 1, 1, 7), np.float32), "relu6")
    np.testing.assert_array_equal(y.ravel(), [0, 0, 0, 0.5, 6, 6, np.nan])
    dy = np.array([1, 1, 1, 1, 1, 1, np.nan], np.float32).reshape(1, 1, 1, 7)
    dym, db = cpu_native.conv_epilogue_backward(dy, y, np.empty((1, 7), np.float32), np.empty(1, np.float32), "relu6")
    np.testing.assert_array_equal(dym.ravel(), [0, 0, 0, 1, 0, 0, 0])
    assert db[0] == 1
    with pytest.raises(ValueError, match="activation"):
        cpu_native.conv_epilogue(ym, None, np.empty((1, 1, 1, 7), np.float32), "gelu")
    with pytest.raises(ValueError, match="float32"):
        cpu_native.conv_im2col(ym.astype(np.float64).reshape(1, 1, 1, 7), np.empty((1, 7), np.float32),
                               (1, 1, 1, 7, 1, 1, 1, 7, 1, 1, 0, 0, 1, 1))


def test_backward_needs_y_with_activation(native_conv, rng):
    x = rng.standard_normal((1, 2, 5, 5)).astype(np.float32)
    w = rng.standard_normal((3, 2, 3, 3)).astype(np.float32)
    dy = np.ones((1, 3, 3, 3), np.float32)
    with pytest.raises(ValueError, match="activated output y"):
        dp.ops.conv2d_backward(x, w, dy, activation="relu")
    with pytest.raises(ValueError, match="shape"):
        dp.ops.conv2d_backward(x, w, dy, activation="relu", y=np.ones((1, 3, 3, 2), np.float32))


@pytest.mark.parametrize("geom", GEOMETRIES[1:4])
@pytest.mark.parametrize("act", ["relu", "relu6"])
def test_native_equals_fallback(native_conv, monkeypatch, rng, geom, act):
    """The NumPy fallback (NATIVE["use"] = False) gives the same forward bits and gradients within
    the reordering of db's and col2im's sums."""
    xs, o, k, s, p, d = geom
    x = (rng.standard_normal(xs) * 3).astype(np.float32)
    w = rng.standard_normal((o, xs[1], *k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    outs = []
    for use in (True, False):
        monkeypatch.setitem(C.NATIVE, "use", use)
        y = dp.ops.conv2d(x, w, b, s, p, d, activation=act)
        dy = np.ones_like(y) if not outs else outs[0][1]
        outs.append((y, dy, dp.ops.conv2d_backward(x, w, dy, s, p, d, activation=act, y=y)))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    g, _ = _geo(xs, o, k, s, p, d)
    for a, c, name, terms in zip(outs[0][2], outs[1][2], "dx dw db".split(),
                                 (o * k[0] * k[1], g.n * g.oh * g.ow, g.n * g.oh * g.ow)):
        # both float32 sums of the same products: each within the bound of the exact value
        bound = 2 * oracles.worst_sum_bound(np.abs(a).max() * terms, terms)
        assert np.max(np.abs(a - c)) <= bound, name


def _lenet_like(act):
    return Sequential(("c1", Conv2d(1, 4, 5, padding=2, seed=1)), ("a1", act()),
                      ("c2", Conv2d(4, 6, 3, stride=2, seed=2)), ("a2", act()),
                      ("c3", Conv2d(6, 6, 3, padding=2, dilation=2, groups=2, seed=3)), ("a3", act()),
                      ("flat", Flatten()), ("fc", Linear(6 * 6 * 6, 5, seed=4)), input_shape=(1, 13, 13))


@pytest.mark.parametrize("act", [ReLU, ReLU6])
def test_fused_graph_equals_unfused(fusion, rng, act):
    """Conv2d absorbs ReLU / ReLU6 (grouped too): the forward is the same bits, the gradients the
    same bits too (the mask and db come from the same values in the same order)."""
    model = _lenet_like(act)
    assert [a for _, a in model.fused_pairs()] == ["a1", "a2", "a3"]
    x = (rng.standard_normal((3, 1, 13, 13)) * 4).astype(np.float32)
    labels = rng.integers(0, 5, 3)
    res = []
    for f in (True, False):
        base.FUSION = f
        loss = SoftmaxCrossEntropy()
        out = model.forward(x)
        loss.forward(out, labels)
        model.backward(loss.backward())
        res.append((out.copy(), {n: g.copy() for n, _, g in model.named_parameters()}))
    np.testing.assert_array_equal(res[0][0], res[1][0])
    for k in res[1][1]:
        np.testing.assert_array_equal(res[0][1][k], res[1][1][k], err_msg=k)


FALLBACK = """
import json, warnings, numpy as np
warnings.simplefilter("always")
with warnings.catch_warnings(record=True) as caught:
    import dnnpar as dp
    from dnnpar.backend import cpu_native
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 20, 21)).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    y = dp.ops.conv2d(x, w, padding=1, activation="relu")
    dx, dw, db = dp.ops.conv2d_backward(x, w, np.ones_like(y), padding=1, activation="relu", y=y)
print(json.dumps({"lib": cpu_native.library("conv") is not None, "reason": cpu_native.unavailable_reason("conv"),
                  "y": y.tolist(), "db": db.tolist(),
                  "warnings": [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]}))
"""


def test_fallback_without_compiler(tmp_path):
    out = run_json_script(tmp_path, FALLBACK, CXX=str(tmp_path / "no-such-c++"))
    assert not out["lib"] and "not on PATH" in out["reason"]
    assert any("convolution" in w and "uses NumPy" in w for w in out["warnings"]), out["warnings"]
    rng = np.random.default_rng(3)
    x = rng.standard_normal((2, 3, 20, 21))
    w = rng.standard_normal((4, 3, 3, 3))
    want = oracles.conv2d(x.astype(np.float32).astype(np.float64), w.astype(np.float32).astype(np.float64), None,
                          (1, 1), (1, 1), (1, 1))
    mag = oracles.conv2d(np.abs(x.astype(np.float32)).astype(np.float64),
                         np.abs(w.astype(np.float32)).astype(np.float64), None, (1, 1), (1, 1), (1, 1))
    assert_sum_close(np.array(out["y"], np.float32), np.maximum(want, 0), mag, 27, "fallback conv2d")
    on = (np.array(out["y"]) > 0).sum(axis=(0, 2, 3))  # dy = 1 where the activated output passes
    np.testing.assert_array_equal(out["db"], on)


# ---------------------------------------------------------------- eval-mode BatchNorm folding (nn/fusion.py)
from dnnpar.nn.base import Graph  # noqa: E402
from dnnpar.nn.fusion import fold_batchnorm, foldable_pairs  # noqa: E402
from dnnpar.nn.layers import BatchNorm2d  # noqa: E402

U = 2.0**-24


def _random_bn(bn, rng):
    c = bn.channels
    bn.params["weight"][:] = rng.uniform(-2, 2, c)
    bn.params["bias"][:] = rng.standard_normal(c)
    bn.buffers["running_mean"][:] = rng.standard_normal(c)
    bn.buffers["running_var"][:] = rng.uniform(0.05, 3, c)
    return bn


@pytest.mark.parametrize("conv_kw", [dict(padding=1), dict(stride=2, padding=(2, 0), dilation=(1, 2), bias=False),
                                     dict(groups=3, padding=1)])
def test_fold_single_block_within_bound(rng, conv_kw):
    """Conv2d -> BN -> ReLU folded: both the folded and the unfolded float32 outputs lie within
    their derived bounds of the float64 value, so they differ by at most the sum. Folded: the
    conv's float32 sum (n + 1 terms) plus one rounding of each folded weight (one more term's u).
    Unfolded: the same sum scaled by |s|, then BN's float32 subtract, inverse square root (<= 3 u),
    two products and an add (<= 8 u of the magnitude in all)."""
    c, o = 3, 6
    conv = Conv2d(c, o, 3, seed=5, **conv_kw)
    if "bias" in conv.params:
        conv.params["bias"][:] = rng.standard_normal(o)
    bn = _random_bn(BatchNorm2d(o), rng)
    model = Sequential(("conv", conv), ("bn", bn), ("relu", ReLU()), input_shape=(c, 11, 9)).eval()
    before = {k: v.copy() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    assert foldable_pairs(model) == [("conv", "bn")] and [n for n, _ in folded.layers] == ["conv", "relu"]
    assert folded.fused_pairs() == [("conv", "relu")]  # the ReLU now fuses into the folded conv
    x = rng.standard_normal((2, c, 11, 9)).astype(np.float32)
    yf, yu = folded.forward(x), model.forward(x)
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(v, before[k], err_msg=f"{k} changed")
    g = dp.ops._common.ConvGeometry.make("t", x.shape, 3, 3, conv.stride, conv.padding, conv.dilation)
    w64 = conv.params["weight"].astype(np.float64)
    b64 = conv.params["bias"].astype(np.float64) if "bias" in conv.params else np.zeros(o)
    gi = conv.groups
    ci, co = c // gi, o // gi

    def conv64(xx, ww, bb):
        return np.concatenate([oracles.conv2d(xx[:, k * ci:(k + 1) * ci], ww[k * co:(k + 1) * co],
                                              bb[k * co:(k + 1) * co], *_pairs(g)) for k in range(gi)], axis=1)

    s = bn.params["weight"].astype(np.float64) / np.sqrt(bn.buffers["running_var"].astype(np.float64) + bn.eps)
    mean, beta = bn.buffers["running_mean"].astype(np.float64), bn.params["bias"].astype(np.float64)
    per = (slice(None), slice(None), None, None)
    exact = np.maximum((conv64(x.astype(np.float64), w64, b64) - mean[per[1:]]) * s[per[1:]] + beta[per[1:]], 0)
    mag = (conv64(np.abs(x).astype(np.float64), np.abs(w64), np.abs(b64)) + np.abs(mean)[per[1:]]) \
        * np.abs(s)[per[1:]] + np.abs(beta)[per[1:]]
    n = ci * 9 + 1
    bound_f = oracles.worst_sum_bound(mag, n + 1)
    bound_u = oracles.worst_sum_bound(mag, n) + 8 * U * mag
    assert np.all(np.abs(yf - exact) <= bound_f + 1e-37), "folded"
    assert np.all(np.abs(yu - exact) <= bound_u + 1e-37), "unfolded"
    assert np.all(np.abs(yf.astype(np.float64) - yu) <= bound_f + bound_u + 1e-37)


def test_fold_rules_and_errors(rng):
    conv, bn = Conv2d(2, 4, 3, padding=1), _random_bn(BatchNorm2d(4), rng)
    conv2, bn2 = Conv2d(4, 4, 1), _random_bn(BatchNorm2d(4), rng)
    g = Graph([("c1", conv, ["input"]), ("b1", bn, ["c1"]), ("r1", ReLU(), ["b1"]),
               ("c2", conv2, ["r1"]), ("b2", bn2, ["c2"]), ("side", ReLU(), ["c2"]),  # c2 read twice: kept
               ("flat", Flatten(), ["b2"])], input_shape=(2, 5, 5))
    with pytest.raises(ValueError, match="training mode"):
        fold_batchnorm(g)
    g.eval()
    assert foldable_pairs(g) == [("c1", "b1")]
    f = fold_batchnorm(g)
    assert [n for n, _ in f.layers] == ["c1", "r1", "c2", "b2", "side", "flat"] and f.inputs_of["r1"] == ["c1"]
    assert f["c2"] is conv2 and f["c1"] is not conv and g["c1"] is conv  # unfolded layers shared, folded copied
    lone = Sequential(("c", Conv2d(2, 2, 1)), input_shape=(2, 3, 3)).eval()
    assert fold_batchnorm(lone) is lone
    with pytest.raises(TypeError, match="Graph"):
        fold_batchnorm(conv)
    # predict folds: same classes as the unfolded model on well-separated logits
    x = rng.standard_normal((4, 2, 5, 5)).astype(np.float32)
    from dnnpar.train import predict
    seq = Sequential(("c", Conv2d(2, 3, 3, seed=2)), ("b", _random_bn(BatchNorm2d(3), rng)), ("flat", Flatten()),
                     ("fc", Linear(27, 4, seed=3)), input_shape=(2, 5, 5))
    logits = seq.eval().forward(x)
    seq.train()
    top2 = np.sort(logits, axis=1)[:, -2:]
    keep = top2[:, 1] - top2[:, 0] > 1e-3 * np.abs(logits).max()
    np.testing.assert_array_equal(predict(seq, x)[keep], logits.argmax(axis=1)[keep])
    assert seq.training  # mode restored


# ---------------------------------------------------------------- the register-tiled direct kernels
# channel counts that are not multiples of any tile (FMR, WMR, WNT, VL), N = 1, primes, a plane
# wide enough for the per-image rows and one small enough to run tiles across images, stride 2
# both ways; for the channels family, O of one to five vectors (one to two tiles), rows of 1 to
# 47 outputs (split into tiles of unequal widths) and the 5x5 kernels' channel blocks
TILED_GEOMETRIES = [
    ((1, 13, 11, 7), 19, (3, 3), 2, 1, 1),
    ((2, 17, 9, 23), 9, (3, 1), 1, (1, 0), 1),
    ((3, 2, 41, 37), 5, (5, 5), 1, 2, 1),
    ((5, 7, 3, 3), 11, (3, 3), 1, 1, 1),
    # small inputs (under 256 KB packed) with >= 2M multiply-adds on wide rows: each thread packs
    # the rows it computes (stride 2's phases, 5x5, O not a multiple of the tile's 8 among them)
    ((2, 12, 29, 31), 20, (3, 3), 1, 1, 1),
    ((3, 8, 40, 38), 32, (3, 3), 2, 1, 1),
    ((1, 6, 47, 45), 17, (5, 5), 1, 2, 1),
    # a reduction of 2425 (AlexNet's conv2 is 2400): the rules take such layers on large planes
    ((2, 97, 11, 13), 9, (5, 5), 1, 2, 1),
    # the channels family's shapes: 64 and 80 outputs (CV 4: one block, two), 8x8 and 1x1 planes
    ((3, 21, 8, 8), 64, (3, 3), 1, 1, 1),
    ((2, 11, 7, 9), 80, (3, 3), 2, 1, 1),
    ((4, 9, 3, 3), 33, (3, 3), 1, 0, 1),
]


def _tiled_case(rng, geom):
    xs, o, k, s, p, d = geom
    g, geo = _geo(xs, o, k, s, p, d)
    x = (rng.standard_normal(xs) * 3).astype(np.float32)
    w = rng.standard_normal((o, xs[1], *k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    dy = rng.standard_normal((g.n, o, g.oh, g.ow)).astype(np.float32)
    return g, geo, x, w, b, dy


@pytest.mark.parametrize("geom", TILED_GEOMETRIES)
def test_tiled_kernels_against_float64(native_conv, rng, geom, vectors):
    """The tiled forward (bias, ReLU6) and dW / db straight from the kernels of each family, on
    NaN-filled outputs, each within its float32 summation bound of the float64 oracle."""
    g, geo, x, w, b, dy = _tiled_case(rng, geom)
    y = cpu_native.conv_tiled_forward(x, w, b, np.full(dy.shape, np.nan, np.float32), geo, "relu6", vectors=vectors)
    pre = oracles.conv2d(x.astype(np.float64), w.astype(np.float64), b.astype(np.float64), *_pairs(g))
    mag = oracles.conv2d(np.abs(x).astype(np.float64), np.abs(w).astype(np.float64), np.abs(b).astype(np.float64),
                         *_pairs(g))
    assert_sum_close(y, np.clip(pre, 0, 6), mag, w[0].size + 1, "tiled forward")
    dw, db, dym = cpu_native.conv_tiled_dw(x, dy, y, np.full(w.shape, np.nan, np.float32),
                                           np.full(w.shape[0], np.nan, np.float32),
                                           np.full(dy.shape, np.nan, np.float32), "relu6", geo=geo, vectors=vectors)
    masked = np.where((y > 0) & (y < 6), dy, 0)
    np.testing.assert_array_equal(dym, masked)
    dm = masked.astype(np.float64).transpose(1, 0, 2, 3).reshape(w.shape[0], -1)
    cols = oracles.im2col(x.astype(np.float64), *w.shape[2:], *_pairs(g))
    n_pos = g.n * g.oh * g.ow
    assert_sum_close(dw, (dm @ cols.T).reshape(w.shape), (np.abs(dm) @ np.abs(cols).T).reshape(w.shape), n_pos, "dw")
    assert_sum_close(db, dm.sum(axis=1), np.abs(dm).sum(axis=1), n_pos, "db")


@pytest.mark.parametrize("geom", [TILED_GEOMETRIES[0]] + TILED_GEOMETRIES[4:])
def test_tiled_kernels_bit_identical_over_threads(native_conv, rng, geom, vectors):
    g, geo, x, w, b, dy = _tiled_case(rng, geom)
    runs = []
    for t in (1, 2, 3):
        y = cpu_native.conv_tiled_forward(x, w, b, np.full(dy.shape, np.nan, np.float32), geo, "relu", threads=t,
                                          vectors=vectors)
        dw, db, _ = cpu_native.conv_tiled_dw(x, dy, y, np.full(w.shape, np.nan, np.float32),
                                             np.full(w.shape[0], np.nan, np.float32), None, "relu", threads=t,
                                             geo=geo, vectors=vectors)
        runs.append((y, dw, db))
    for r in runs[1:]:
        for a, c in zip(runs[0], r):
            np.testing.assert_array_equal(a, c)


@pytest.mark.parametrize("geom", GEOMETRIES + TILED_GEOMETRIES)
def test_channels_dx_scatter_against_float64(native_conv, rng, geom):
    """The channels family's dx (every dy position scatters W^T dy into a padded NHWC image):
    any stride, padding and dilation, C of one to five vectors, NaN-filled output, within each
    element's float32 summation bound of col2im(W^T dY) in float64; the same bits on 1-3 threads."""
    g, geo, x, w, b, dy = _tiled_case(rng, geom)
    runs = [cpu_native.conv_chan_dx(dy, w, np.full(x.shape, np.nan, np.float32), geo, threads=t) for t in (1, 2, 3)]
    o = w.shape[0]
    wm = w.reshape(o, -1).astype(np.float64)
    dym = dy.astype(np.float64).transpose(1, 0, 2, 3).reshape(o, -1)
    taps = oracles.col2im(np.ones((wm.shape[1], dym.shape[1])), x.shape, *w.shape[2:], *_pairs(g))  # terms per element
    assert_sum_close(runs[0], oracles.col2im(wm.T @ dym, x.shape, *w.shape[2:], *_pairs(g)),
                     oracles.col2im(np.abs(wm).T @ np.abs(dym), x.shape, *w.shape[2:], *_pairs(g)),
                     np.maximum(taps * o, 1), "channels dx")
    for r in runs[1:]:
        np.testing.assert_array_equal(r, runs[0])


def test_channels_dx_rule(monkeypatch):
    """The scatter dx takes strided layers whose input channels fill its vectors, never stride 1
    (the flipped forward), a huge padding (its padded image) or a forced positions family."""
    if cpu_native.library("conv") is None:
        pytest.skip(f"native conv kernel unavailable: {cpu_native.unavailable_reason('conv')}")

    def ok(xs, o, k, s, p, d=1):
        g = dp.ops._common.ConvGeometry.make("test", xs, k, k, s, p, d)
        return C.chan_dx_ok(g, o, np.zeros((g.n, o, g.oh, g.ow), np.float32), np.zeros((o, xs[1], k, k), np.float32))
    assert ok((4, 32, 16, 16), 64, 3, 2, 1)
    assert not ok((4, 32, 16, 16), 64, 3, 1, 1)          # stride 1
    assert not ok((1, 32, 1, 1), 4, 3, 2, 1 << 20, 1 << 20)  # a padded image of 2**42 floats
    if cpu_native.conv_tiled_shape()["vl"] == 16:
        assert not ok((4, 3, 16, 16), 64, 3, 2, 1)       # 3 of 16 lanes
    monkeypatch.setitem(C.TILED, "vectors", "positions")
    assert not ok((4, 32, 16, 16), 64, 3, 2, 1)


GENERIC_TILED_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from dnnpar.backend import cpu_native as cn
    # a build for any x86-64 / ARM CPU: 4-float vectors, the 16-register tiles of both families
    cn.CXXFLAGS = tuple(f for f in cn.CXXFLAGS if f != "-march=native")
    sys.path.insert(0, sys.argv[1])
    import oracles
    from test_conv_fusion import TILED_GEOMETRIES, _tiled_case, _pairs
    rng = np.random.default_rng(11)
    checked = 0
    for geom in TILED_GEOMETRIES:
        for vectors in cn.TILED_VECTORS:
            g, geo, x, w, b, dy = _tiled_case(rng, geom)
            y = cn.conv_tiled_forward(x, w, b, np.full(dy.shape, np.nan, np.float32), geo, vectors=vectors)
            pairs = _pairs(g)
            oracles.assert_sum_close(y, oracles.conv2d(x.astype(np.float64), w.astype(np.float64),
                                                       b.astype(np.float64), *pairs),
                                     oracles.conv2d(np.abs(x).astype(np.float64), np.abs(w).astype(np.float64),
                                                    np.abs(b).astype(np.float64), *pairs),
                                     w[0].size + 1, vectors + " forward")
            dw, _, _ = cn.conv_tiled_dw(x, dy, None, np.full(w.shape, np.nan, np.float32),
                                        np.full(w.shape[0], np.nan, np.float32), geo=geo, vectors=vectors)
            dm = dy.astype(np.float64).transpose(1, 0, 2, 3).reshape(w.shape[0], -1)
            cols = oracles.im2col(x.astype(np.float64), *w.shape[2:], *pairs)
            oracles.assert_sum_close(dw, (dm @ cols.T).reshape(w.shape), (np.abs(dm) @ np.abs(cols).T).reshape(w.shape),
                                     g.n * g.oh * g.ow, vectors + " dw")
            if vectors == "channels":  # the scatter dx
                dx = cn.conv_chan_dx(dy, w, np.full(x.shape, np.nan, np.float32), geo)
                wm = w.reshape(w.shape[0], -1).astype(np.float64)
                oracles.assert_sum_close(dx, oracles.col2im(wm.T @ dm, x.shape, *w.shape[2:], *pairs),
                                         oracles.col2im(np.abs(wm).T @ np.abs(dm), x.shape, *w.shape[2:], *pairs),
                                         w[:, 0].size, "channels dx")
            checked += 1
    print(json.dumps({"checked": checked, "shape": cn.conv_tiled_shape()}))
""")


def test_the_generic_build_runs_both_tiled_families(tmp_path):
    """Built without -march=native (4-float vectors, 16 registers: the tiles every x86-64 and ARM
    CPU runs), both families of tiled kernels (and the channels' scatter dx) match float64 within
    a float32 sum's bound."""
    if cpu_native.library("conv") is None:
        pytest.skip(f"native conv kernel unavailable: {cpu_native.unavailable_reason('conv')}")
    from pathlib import Path
    out = run_json_script(tmp_path, GENERIC_TILED_SCRIPT.replace("sys.argv[1]", repr(str(Path(__file__).parent))))
    assert out["checked"] == 2 * len(TILED_GEOMETRIES)
    assert out["shape"]["vl"] == 4 and out["shape"]["cvmax"] == 2, out


@pytest.mark.parametrize("bad", [np.inf, np.nan])
def test_tiled_nonfinite_input_poisons_only_its_taps(native_conv, rng, bad, vectors):
    """A dropped grid position (the positions family's padded row's extra columns) reads real
    inputs; with an inf or NaN there, 0 * inf would poison dW entries that never touch it. They
    must stay finite and right, in both families: the non-finite entries are exactly the float64
    oracle's."""
    xs, o, k, s, p, d = (2, 3, 9, 10), 4, (3, 3), 1, 1, 1
    g, geo = _geo(xs, o, k, s, p, d)
    x = rng.standard_normal(xs).astype(np.float32)
    x[1, 2, 4, 9] = bad  # the last column: dropped positions of the row above read it
    w = rng.standard_normal((o, xs[1], *k)).astype(np.float32)
    dy = rng.standard_normal((g.n, o, g.oh, g.ow)).astype(np.float32)
    y = cpu_native.conv_tiled_forward(x, w, None, np.full(dy.shape, np.nan, np.float32), geo, vectors=vectors)
    want = oracles.conv2d(x.astype(np.float64), w.astype(np.float64), None, *_pairs(g))
    np.testing.assert_array_equal(np.isfinite(y), np.isfinite(want))
    dw, _, _ = cpu_native.conv_tiled_dw(x, dy, None, np.full(w.shape, np.nan, np.float32),
                                        np.full(o, np.nan, np.float32), geo=geo, vectors=vectors)
    dm = dy.astype(np.float64).transpose(1, 0, 2, 3).reshape(o, -1)
    cols = oracles.im2col(x.astype(np.float64), *k, *_pairs(g))
    with np.errstate(invalid="ignore"):
        ref = (dm @ cols.T).reshape(w.shape)
        mag = (np.abs(dm) @ np.abs(cols).T).reshape(w.shape)
    np.testing.assert_array_equal(np.isfinite(dw), np.isfinite(ref))
    fin = np.isfinite(ref)
    assert fin[:, 2, :, 0].all()  # input column 9 is read by no j = 0 tap (only by dropped positions)
    assert fin.sum() >= w.size - 9 * o
    assert_sum_close(dw[fin], ref[fin], mag[fin], g.n * g.oh * g.ow, "dw beside a non-finite input")


def test_huge_padding_stays_off_the_packed_planes(either_conv, rng):
    """Padding 2**20 with dilation 2**20 around one pixel is a valid 1x1-output convolution (the
    fuzz tests draw such cases): the tiled kernels would pack 4e12 padded floats, so the rules
    send it to the path that reads only the taps' windows -- a result, not an abort."""
    x = rng.standard_normal((1, 1, 1, 1)).astype(np.float32)
    w = rng.standard_normal((2, 1, 3, 3)).astype(np.float32)
    big = 1 << 20
    g = dp.ops._common.ConvGeometry.make("test", x.shape, 3, 3, 1, big, big)
    assert C.tiled_kernel(g, 2, x, w) is None
    y = dp.ops.conv2d(x, w, None, 1, big, big)
    np.testing.assert_array_equal(y, (w[:, 0, 1, 1] * x[0, 0, 0, 0]).reshape(1, 2, 1, 1))
    dx, dw, db = dp.ops.conv2d_backward(x, w, np.ones_like(y), 1, big, big)
    np.testing.assert_array_equal(dx, w[:, 0, 1, 1].sum(dtype=np.float32).reshape(1, 1, 1, 1))


def test_large_reductions_go_tiled_only_on_many_positions(monkeypatch, rng):
    """Beyond TILED["max_k"] the tiled kernels take a layer from TILED["min_positions_large_k"]
    output positions N*OH*OW on, forward and backward, and BLAS below (the boundary, both sides)."""
    if cpu_native.library("conv") is None:
        pytest.skip(f"native conv kernel unavailable: {cpu_native.unavailable_reason('conv')}")
    x = rng.standard_normal((2, 16, 9, 9)).astype(np.float32)
    w = rng.standard_normal((4, 16, 3, 3)).astype(np.float32)
    g = dp.ops._common.ConvGeometry.make("test", x.shape, 3, 3, 1, 1, 1)
    monkeypatch.setitem(C.TILED, "min_positions_backward", 0)
    assert C.tiled_kernel(g, 4, x, w) is not None  # K = 144 <= max_k
    monkeypatch.setitem(C.TILED, "max_k", 143)
    for positions, tiled in ((2 * 81, True), (2 * 81 + 1, False)):
        monkeypatch.setitem(C.TILED, "min_positions_large_k", positions)
        for backward in (False, True):
            assert (C.tiled_kernel(g, 4, x, w, backward=backward) is not None) == tiled


# (x shape, O, backward, forced family, the family tiled_kernel picks): 3x3, padding 1. The
# efficiencies (16-float vectors, TILED's default costs) are written beside each case
FAMILY_CASES = [
    ((4, 64, 8, 8), 64, False, None, "channels"),      # positions keep 64 of 100 lanes; channels 576/608
    ((2, 16, 32, 32), 32, False, None, "positions"),   # 0.93 against 144/176: the transpose costs more ...
    ((2, 16, 32, 32), 32, True, None, "channels"),     # ... than in dW (144/152)
    ((2, 3, 32, 32), 16, True, None, "positions"),     # a 27-long reduction: 27/35 against 0.93
    ((2, 16, 32, 32), 20, False, None, "positions"),   # 20 of 32 channels
    ((16, 16, 4, 4), 32, False, None, "channels"),     # 16 of 36 positions
    ((16, 16, 4, 4), 4, False, None, None),            # 0.44 / 0.25 x 0.82: BLAS
    ((1, 64, 8, 8), 64, True, "positions", None),      # 64 positions: too few for the positions' dW
    ((1, 64, 8, 8), 64, True, None, "channels"),       # ... the channels' dW has no such limit
    ((16, 16, 4, 4), 32, False, "positions", None),    # a forced family still needs its efficiency
    ((2, 16, 32, 32), 40, False, "channels", "channels"),  # 40 of 48 channels x 0.82
]


@pytest.mark.parametrize("xs, o, backward, forced, want", FAMILY_CASES)
def test_tiled_family_rule(monkeypatch, xs, o, backward, forced, want):
    """A layer takes the tiled family that wastes fewer of its vector lanes (or TILED["vectors"]
    where set), only where that family keeps TILED["min_efficiency"] of them, and dW by positions
    only over TILED["min_positions_backward"] positions."""
    if cpu_native.library("conv") is None:
        pytest.skip(f"native conv kernel unavailable: {cpu_native.unavailable_reason('conv')}")
    if cpu_native.conv_tiled_shape()["vl"] != 16:
        pytest.skip("the cases count lanes of 16-float vectors (AVX-512)")
    monkeypatch.setitem(C.TILED, "vectors", forced)
    x = np.zeros(xs, np.float32)
    w = np.zeros((o, xs[1], 3, 3), np.float32)
    g = dp.ops._common.ConvGeometry.make("test", xs, 3, 3, 1, 1, 1)
    assert C.tiled_kernel(g, o, x, w, backward=backward) == want


def test_native_im2col_tap_reading_only_padding(rng):
    """A kernel row that reads nothing but padding (padding 2**20, dilation 2**20; a row of 17
    outputs, so the default native im2col takes it): its zero fill stops at the output row. It
    wrote 2**20 rows past the buffer before (a segfault)."""
    if cpu_native.library("conv") is None:
        pytest.skip(f"native conv kernel unavailable: {cpu_native.unavailable_reason('conv')}")
    x = rng.standard_normal((2, 3, 1, 17)).astype(np.float32)
    big = 1 << 20
    with dp.use_backend("numpy"), poison_outputs():
        cols = dp.ops.im2col(x, 3, 1, 1, (big, 0), (big, 1))
        dx = dp.ops.col2im(np.ones_like(cols), x.shape, 3, 1, 1, (big, 0), (big, 1))
    np.testing.assert_array_equal(cols, oracles.im2col(x, 3, 1, (1, 1), (big, 0), (big, 1)).astype(np.float32))
    np.testing.assert_array_equal(dx, np.ones_like(x))  # only the middle tap reads x, once per pixel


# (x shape, O, kernel, stride, padding, algo, switches) -> the path the forward plan takes
PLAN_CASES = [
    ("tiled", (1, 16, 13, 17), 16, 3, 1, 1, "im2col", {}),
    ("im2col", (3, 16, 31, 29), 32, 1, 2, 0, "im2col", {}),                       # 1x1 stride 2: glue + epilogue
    ("im2col", (1, 5, 7, 3), 3, 3, 1, 1, "im2col", {"TILED": False}),            # too small for the epilogue
    ("im2col", (2, 3, 9, 11), 4, 3, 1, 1, "im2col", {"TILED": False, "min_ow": 1000}),  # NumPy's im2col
    ("fast", (2, 3, 11, 13), 5, 3, 1, 1, "im2col", {"TILED": False, "fast": True}),
    ("direct", (2, 3, 7, 5), 4, 3, 2, 1, "direct", {}),
]


@pytest.mark.parametrize("path, xs, o, k, s, p, algo, switches", PLAN_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(PLAN_CASES)])
@pytest.mark.parametrize("act", [None, "relu"])
def test_forward_plans_give_the_unplanned_bits(monkeypatch, rng, path, xs, o, k, s, p, algo, switches, act):
    """A layer's second call with the same shapes runs the plan its first call made (no checks, no
    choice): the same path and the same bits as checking and choosing again, for every path of
    the numpy backend; weights changed in place are read anew."""
    if cpu_native.library("conv") is None:
        pytest.skip(f"native conv kernel unavailable: {cpu_native.unavailable_reason('conv')}")
    if "TILED" in switches:
        monkeypatch.setitem(C.TILED, "use", switches["TILED"])
    if "min_ow" in switches:
        monkeypatch.setitem(C.NATIVE_MIN_OW, "im2col", switches["min_ow"])
    if switches.get("fast"):
        monkeypatch.setattr(C, "FAST_FORWARD_BYTES", 0)
    monkeypatch.setattr(C, "_PLANS", {})
    x = rng.standard_normal(xs).astype(np.float32)
    w = rng.standard_normal((o, xs[1], k, k)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    with dp.use_backend("numpy"), poison_outputs():
        first = dp.ops.conv2d(x, w, b, s, p, algo=algo, activation=act)
        (plan,) = C._PLANS.values()
        assert plan.path == path
        planned = dp.ops.conv2d(x, w, b, s, p, algo=algo, activation=act)
        assert len(C._PLANS) == 1
        monkeypatch.setitem(C.PLAN, "use", False)
        unplanned = dp.ops.conv2d(x, w, b, s, p, algo=algo, activation=act)
        monkeypatch.setitem(C.PLAN, "use", True)
        np.testing.assert_array_equal(planned, unplanned)
        np.testing.assert_array_equal(first, unplanned)
        w *= 2
        b *= 2   # exact: every product and sum doubles
        np.testing.assert_array_equal(dp.ops.conv2d(x, w, b, s, p, algo=algo, activation=act), 2 * unplanned)


def test_a_plan_never_skips_a_check_its_key_does_not_cover(monkeypatch, rng):
    """After a plan exists for a shape: the same shape non-contiguous, in float64, or with a
    bias of another length still fails its check; a switch that changes the path makes a new
    plan; the cache stays within its capacity."""
    if cpu_native.library("conv") is None:
        pytest.skip(f"native conv kernel unavailable: {cpu_native.unavailable_reason('conv')}")
    monkeypatch.setattr(C, "_PLANS", {})
    x = rng.standard_normal((2, 16, 12, 12)).astype(np.float32)
    w = rng.standard_normal((8, 16, 3, 3)).astype(np.float32)
    with dp.use_backend("numpy"):
        dp.ops.conv2d(x, w, None, 1, 1)
        assert [p.path for p in C._PLANS.values()] == ["tiled"]
        wide = np.zeros((2, 16, 12, 24), np.float32)
        wide[..., ::2] = x
        dp.ops.conv2d(x, w, None, 1, 1, algo="direct")  # NumPy's loop would take a strided x
        with pytest.raises(ValueError, match="C-contiguous"):
            dp.ops.conv2d(wide[..., ::2], w, None, 1, 1, algo="direct")
        with pytest.raises(ValueError, match="C-contiguous"):
            dp.ops.conv2d(wide[..., ::2], w, None, 1, 1)
        with pytest.raises(TypeError, match="float32"):
            dp.ops.conv2d(x.astype(np.float64), w, None, 1, 1)
        with pytest.raises(ValueError, match="bias"):
            dp.ops.conv2d(x, w, np.zeros(7, np.float32), 1, 1)
        for stride in (True, 1.0):  # equal to 1 as dict keys, refused by the check
            with pytest.raises(TypeError, match="stride"):
                dp.ops.conv2d(x, w, None, stride, 1)
        monkeypatch.setitem(C.TILED, "use", False)
        blas = dp.ops.conv2d(x, w, None, 1, 1)
        assert sorted(p.path for p in C._PLANS.values()) == ["direct", "im2col", "tiled"]
        monkeypatch.setitem(C.PLAN, "use", False)
        np.testing.assert_array_equal(dp.ops.conv2d(x, w, None, 1, 1), blas)
        monkeypatch.setitem(C.PLAN, "use", True)
        monkeypatch.setattr(C, "PLAN_CAPACITY", 3)
        dp.ops.conv2d(x[:1], w, None, 1, 1)
        assert len(C._PLANS) <= 3
