"""BatchNorm2d (+ fused ReLU / ReLU6): the native kernel dnnpar/cpu/norm.cpp and its NumPy
fallback (dnnpar.ops.norm) against float64 oracles, with the error bounds derived in norm.cpp's
header; the layer's fusion in Graph; the fallback when no compiler can build the kernel."""

import numpy as np
import pytest

import dnnpar as dp
import dnnpar.nn.base as base
import dnnpar.ops.norm as N
import oracles
from conftest import native_backend, run_json_script
from oracles import U32, assert_reordered_close, assert_sum_close
from dnnpar import nn, ops
from dnnpar.backend import cpu_native

C_ = (None, slice(None), None, None)

# N = 1, H*W = 1, prime channels, sizes off any vector width; the last two run on several threads
SHAPES = [(1, 1, 1, 1), (1, 5, 1, 1), (4, 3, 1, 1), (1, 7, 5, 3), (3, 1, 11, 13), (5, 13, 7, 7), (16, 17, 12, 12),
          (8, 31, 19, 17), (2, 3, 29, 37)]  # the last: planes of 1,073 values, past the kernel's 512-value chunks
ACTS = [None, "relu", "relu6"]


@pytest.fixture
def native():
    with native_backend("norm") as be:
        yield be


@pytest.fixture
def fallback(monkeypatch):
    monkeypatch.setitem(N.NATIVE, "use", False)

    def refuse(*a, **k):
        raise AssertionError("the native kernel ran with NATIVE['use'] = False")
    monkeypatch.setattr(cpu_native, "batch_norm_forward", refuse)
    monkeypatch.setattr(cpu_native, "batch_norm_backward", refuse)
    with dp.use_backend("numpy") as be:
        yield be


def inputs(rng, shape):
    c = shape[1]
    # an offset mean per channel (what two-pass statistics are for) and gammas of both signs
    x = (rng.standard_normal(shape) * 2.0 + rng.uniform(-3, 3, (1, c, 1, 1))).astype(np.float32)
    gamma = rng.uniform(-2, 2, c).astype(np.float32)
    beta = rng.uniform(-1, 3, c).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    return x, gamma, beta, dy


def eval_stats(rng, c):
    return rng.uniform(-1, 1, c).astype(np.float32), rng.uniform(0.2, 3, c).astype(np.float32)


def native_bounds(x, g, gamma, beta, mean, inv, training):
    """norm.cpp's bounds (its header): y within 4u (|x||s| + mean|x| |s| + |beta|); dx within
    4u (|k1 g| + |k2 (x - mean)| + |k3|) plus the float64 sums' share; dgamma, dbeta within 2u
    of their value plus u times their sums of magnitudes."""
    x64, g = x.astype(np.float64), np.asarray(g, np.float64)
    m = x.size // x.shape[1]
    ax = np.abs(x64).mean(axis=(0, 2, 3))
    s = np.abs(gamma.astype(np.float64) * inv)
    y_bound = 4 * U32 * (np.abs(x64) * s[C_] + (ax * s)[C_] + np.abs(beta.astype(np.float64))[C_])
    dev = np.abs(x64 - mean[C_]) + ax[C_]
    sg, sgx = np.abs(g).sum(axis=(0, 2, 3)), (np.abs(g) * dev).sum(axis=(0, 2, 3))
    k1 = gamma.astype(np.float64) * inv
    if training:
        _, dgamma, dbeta = oracles.batch_norm_backward(x, g, gamma, mean, inv, True)
        k2 = -k1 * inv * dgamma / m
        k3 = -k1 * dbeta / m
        dx_bound = (4 * U32 * (np.abs(k1[C_] * g) + np.abs(k2[C_] * (x64 - mean[C_])) + np.abs(k3)[C_])
                    + U32 * np.abs(k1)[C_] * (sg / m + inv ** 2 * sgx / m)[C_] * (1 + dev))
    else:
        dx_bound = 4 * U32 * np.abs(k1[C_] * g)
    return y_bound, dx_bound, U32 * inv * sgx, U32 * sg


def check_native(x, gamma, beta, dy, y, st, dx, dgamma, dbeta, act, training, mean=None, var=None):
    want, mean64, var64, inv64 = oracles.batch_norm(x, gamma, beta, 1e-5, mean, var)
    yb, dxb, dgb, dbb = native_bounds(x, dy * oracles.activation_mask(y, act), gamma, beta, mean64, inv64, training)
    ax = np.abs(x.astype(np.float64)).mean(axis=(0, 2, 3))
    if training:  # float64 statistics: (M + 4) 2^-53 <= u of mean|x|; var exact up to that and dmean^2
        assert np.all(np.abs(st.mean - mean64) <= U32 * ax), "batch mean"
        assert np.all(np.abs(st.var - var64) <= U32 * var64 + (U32 * ax) ** 2), "batch variance"
    assert_sum_close(y, oracles.activation(want, act), 1, 1, "y", bound=lambda *_: yb, bound_name="norm.cpp bound")
    g = dy * oracles.activation_mask(y, act)
    dx_w, dg_w, db_w = oracles.batch_norm_backward(x, g, gamma, mean64, inv64, training)
    if dx is not None:
        assert_sum_close(dx, dx_w, 1, 1, "dx", bound=lambda *_: dxb, bound_name="norm.cpp bound")
    assert_sum_close(dgamma, dg_w, 1, 1, "dgamma", bound=lambda *_: dgb + 2 * U32 * np.abs(dg_w))
    assert_sum_close(dbeta, db_w, 1, 1, "dbeta", bound=lambda *_: dbb + 2 * U32 * np.abs(db_w))


@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_native_batch_norm(native, shape, training, act, rng):
    x, gamma, beta, dy = inputs(rng, shape)
    mean, var = (None, None) if training else eval_stats(rng, shape[1])
    y, st = ops.batch_norm(x, gamma, beta, mean, var, eps=1e-5, training=training, activation=act)
    assert st.inv.dtype == np.float64, "the native kernel did not run"
    dx, dgamma, dbeta = ops.batch_norm_backward(x, y, dy, gamma, st, training, act)
    check_native(x, gamma, beta, dy, y, st, dx, dgamma, dbeta, act, training, mean, var)
    _, dg2, db2 = ops.batch_norm_backward(x, y, dy, gamma, st, training, act, need_dx=False)
    assert np.array_equal(dg2, dgamma) and np.array_equal(db2, dbeta)


def test_native_nan_and_constant_channels(native):
    """A constant channel (var 0) normalises to beta; a NaN input stays NaN through ReLU / ReLU6
    (as the unfused layers) and gets no gradient through the mask."""
    x = np.full((3, 2, 2, 2), 1.5, np.float32)
    x[:, 1] = np.arange(12, dtype=np.float32).reshape(3, 2, 2)
    gamma, beta = np.array([2.0, 1.0], np.float32), np.array([0.25, 0.5], np.float32)
    y, st = ops.batch_norm(x, gamma, beta, activation="relu6")
    assert np.all(y[:, 0] == 0.25) and st.var[0] == 0.0
    mean, var = np.zeros(2, np.float32), np.ones(2, np.float32)
    x[0, 0, 0, 0] = np.nan
    for act in ("relu", "relu6"):
        y, st = ops.batch_norm(x, gamma, beta, mean, var, training=False, activation=act)
        assert np.isnan(y[0, 0, 0, 0]) and np.isfinite(np.delete(y.ravel(), 0)).all()
        dx, _, _ = ops.batch_norm_backward(x, y, np.ones_like(x), gamma, st, False, act)
        assert dx[0, 0, 0, 0] == 0.0


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("act", ACTS, ids=str)
def test_native_does_not_depend_on_threads(native, act, training, rng):
    x, gamma, beta, dy = inputs(rng, (8, 7, 40, 40))  # 89,600 values: past the pool's one-thread size
    mean, var = eval_stats(rng, 7)
    runs = []
    for t in (1, 2, 3):
        st = N.BatchStats(np.empty(7), np.empty(7), np.empty(7))
        if not training:
            st.mean[:], st.var[:] = mean, var
        y = cpu_native.batch_norm_forward(x, gamma, beta, st.mean, st.var, st.inv, np.full_like(x, np.nan), 1e-5,
                                          training, act, threads=t)
        dx, dg, db = cpu_native.batch_norm_backward(x, y, dy, gamma, st.mean, st.inv, np.full_like(x, np.nan),
                                                    np.full(7, np.nan, np.float32), np.full(7, np.nan, np.float32),
                                                    training, act, threads=t)
        runs.append((y, st.mean.copy(), st.var.copy(), dx, dg, db))
    for r in runs[1:]:
        assert all(np.array_equal(a, b) for a, b in zip(runs[0], r))
    check_native(x, gamma, beta, dy, *runs[0][:1], N.BatchStats(runs[0][1], runs[0][2], None), *runs[0][3:], act,
                 training, None if training else mean, None if training else var)


@pytest.mark.parametrize("act", ["relu", "relu6"])
def test_native_fused_mask_equals_masking_first(native, act, rng):
    """The backward with a fused activation gives the bits of the backward without one on dy
    masked beforehand (what a separate ReLU layer hands it), on planes of several chunks."""
    x, gamma, beta, dy = inputs(rng, (3, 4, 33, 47))
    st = N.BatchStats(np.empty(4), np.empty(4), np.empty(4))
    y = cpu_native.batch_norm_forward(x, gamma, beta, st.mean, st.var, st.inv, np.empty_like(x), 1e-5, True, act)
    out = []
    for a, g in ((act, dy), (None, np.ascontiguousarray(dy * oracles.activation_mask(y, act), np.float32))):
        out.append(cpu_native.batch_norm_backward(x, y, g, gamma, st.mean, st.inv, np.full_like(x, np.nan),
                                                  np.full(4, np.nan, np.float32), np.full(4, np.nan, np.float32),
                                                  True, a))
    for fused, unfused in zip(*out):
        np.testing.assert_array_equal(fused, unfused)


@pytest.mark.parametrize("act", ACTS, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (1, 7, 5, 3), (16, 17, 12, 12)], ids=lambda s: "x".join(map(str, s)))
def test_fallback_batch_norm(fallback, shape, training, act, rng):
    """NATIVE["use"] = False: the NumPy code (float32 statistics), within the float32 reordering
    bound of the oracle (sums of M = N*H*W terms: mean and var, 2 deep forward, 3 backward)."""
    x, gamma, beta, dy = inputs(rng, shape)
    mean, var = (None, None) if training else eval_stats(rng, shape[1])
    y, st = ops.batch_norm(x, gamma, beta, mean, var, eps=1e-5, training=training, activation=act)
    assert st.inv.dtype == np.float32
    dx, dgamma, dbeta = ops.batch_norm_backward(x, y, dy, gamma, st, training, act)
    want, mean64, _, inv64 = oracles.batch_norm(x, gamma, beta, 1e-5, mean, var)
    m = x.size // x.shape[1]
    c = (None, slice(None), None, None)
    # y = (x - mean) s + beta cancels where beta meets the other term: measured against the terms
    terms = np.abs(x - mean64[c]) * np.abs(gamma * inv64)[c] + np.abs(beta.astype(np.float64))[c]
    assert_reordered_close(y, oracles.activation(want, act), m, 2, "y", scale=float(terms.max()))
    g = dy * oracles.activation_mask(y, act)
    for got, w, what in zip((dx, dgamma, dbeta), oracles.batch_norm_backward(x, g, gamma, mean64, inv64, training),
                            ("dx", "dgamma", "dbeta")):
        assert_reordered_close(got, w, m, 3, what)


def test_float64_precision_stays_on_numpy(native, rng):
    x, gamma, beta, dy = inputs(rng, (3, 5, 4, 4))
    with dp.precision("float64"):
        bn = nn.BatchNorm2d(5)
        bn.params["weight"][:] = gamma
        y = bn.forward(x.astype(np.float64))
        assert y.dtype == np.float64 and bn.saved[2].inv.dtype == np.float64
        want = oracles.batch_norm(x, gamma, np.zeros(5), 1e-5)[0]
        assert np.max(np.abs(y - want)) <= 1e-12 * np.max(np.abs(want))
        bn.backward(dy.astype(np.float64))
        assert bn.grads["weight"].dtype == np.float32


def _graph(c, act_layer):
    return nn.Graph([("bn", nn.BatchNorm2d(c), ["input"]), ("act", act_layer, ["bn"]),
                     ("flat", nn.Flatten(), ["act"]), ("fc", nn.Linear(c * 6 * 5, 4, seed=3), ["flat"])],
                    input_shape=(c, 6, 5))


@pytest.fixture
def fusion():
    saved = base.FUSION
    yield
    base.FUSION = saved


@pytest.mark.parametrize("path", ["native", "fallback"])
@pytest.mark.parametrize("act_layer", [nn.ReLU, nn.ReLU6], ids=["relu", "relu6"])
def test_fused_graph_equals_unfused(fusion, path, act_layer, monkeypatch, rng):
    """Graph fuses BatchNorm2d + ReLU / ReLU6; the fused step gives the unfused step's output,
    gradients and running averages bit for bit, in training and in eval."""
    if path == "native" and cpu_native.library("norm") is None:
        pytest.skip("native norm kernel unavailable")
    monkeypatch.setitem(N.NATIVE, "use", path == "native")
    c = 7
    x = (rng.standard_normal((5, c, 6, 5)) * 3).astype(np.float32)
    labels = rng.integers(0, 4, 5)
    results = []
    with dp.use_backend("numpy"):
        for fuse in (True, False):
            base.FUSION = fuse
            g = _graph(c, act_layer())
            g.layers[0][1].params["weight"][:] = rng.uniform(-2, 2, c).astype(np.float32) if fuse else results[0][3]
            assert g.fused_pairs() == ([("bn", "act")] if fuse else [])
            out = []
            for training in (True, False):
                g.train(training)
                loss = nn.layers.SoftmaxCrossEntropy()
                y = g.forward(x)
                loss.forward(y, labels)
                g.backward(loss.backward())
                out += [y.copy()] + [gr.copy() for _, _, gr in g.named_parameters()]
            bn = g.layers[0][1]
            results.append((out, bn.buffers["running_mean"].copy(), bn.buffers["running_var"].copy(),
                            bn.params["weight"].copy()))
    (a, rm_a, rv_a, _), (b, rm_b, rv_b, _) = results
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert np.array_equal(rm_a, rm_b) and np.array_equal(rv_a, rv_b)


BAD = [
    (lambda x, g: ops.batch_norm(x[0], g, g), ValueError, "x must be \\(N, C, H, W\\)"),
    (lambda x, g: ops.batch_norm(x, g[:2], g), ValueError, "weight must have shape \\(3,\\)"),
    (lambda x, g: ops.batch_norm(x, g.astype(np.float64), g), TypeError, "share one float dtype"),
    (lambda x, g: ops.batch_norm(x, g, g, activation="tanh"), ValueError, "activation must be None or one of"),
    (lambda x, g: ops.batch_norm(x, g, g, mean=g), ValueError, "pass mean and var exactly when not training"),
    (lambda x, g: ops.batch_norm(x, g, g, g[:1], g[:1], training=False), ValueError, "mean and var must have shape"),
    (lambda x, g: ops.batch_norm_backward(x, None, x[:1], g, None), ValueError, "must have x's shape"),
    (lambda x, g: ops.batch_norm_backward(x, None, x, g, None, activation="relu"), ValueError, "must have x's shape"),
]


@pytest.mark.parametrize("call, exc, msg", BAD)
def test_bad_input(call, exc, msg):
    with dp.use_backend("numpy"):
        x, g = np.ones((2, 3, 2, 2), np.float32), np.ones(3, np.float32)
        with pytest.raises(exc, match=msg):
            call(x, g)


FALLBACK_SCRIPT = """
import json, warnings
import numpy as np
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import dnnpar as dp
    from dnnpar import nn
    from dnnpar.backend import cpu_native
    with dp.use_backend("numpy"):
        bn = nn.BatchNorm2d(3)
        x = np.random.default_rng(0).standard_normal((4, 3, 5, 5)).astype(np.float32)
        y = bn.forward(x)
        bn.backward(np.ones_like(y))
print(json.dumps({"library": cpu_native.library("norm") is not None, "reason": cpu_native.unavailable_reason("norm"),
                  "inv_dtype": str(bn.saved[2].inv.dtype) if bn.saved else "float32",
                  "std": float(np.abs(y.std(axis=(0, 2, 3)) - 1).max()),
                  "warnings": [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]}))
"""


def test_fallback_without_compiler(tmp_path):
    """No compiler: a warning names the BatchNorm kernel, and the layer runs on NumPy."""
    out = run_json_script(tmp_path, FALLBACK_SCRIPT, CXX=str(tmp_path / "no-such-c++"))
    assert not out["library"] and "not on PATH" in out["reason"]
    assert any("BatchNorm2d" in w and "uses NumPy" in w for w in out["warnings"]), out["warnings"]
    assert out["std"] < 1e-3  # normalised: unit standard deviation per channel (eps = 1e-5 of variance ~1)
