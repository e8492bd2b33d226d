"""Activation fusion in Graph (dnnpar.nn.base.FUSION): which pairs fuse, and that a fused model
computes what the unfused one does (forward output and every gradient)."""
import numpy as np
import pytest

import dnnpar.nn.base as base
from dnnpar import ops
from dnnpar.nn import Graph, Sequential
from dnnpar.nn.layers import Clip, Linear, ReLU, ReLU6, SoftmaxCrossEntropy
from dnnpar.ops.activation import activate_, activation_grad, check_activation


@pytest.fixture
def fusion():
    saved = base.FUSION
    yield
    base.FUSION = saved


def _step(model, x, labels):
    loss = SoftmaxCrossEntropy()
    out = model.forward(x)
    loss.forward(out, labels)
    model.backward(loss.backward())
    return out.copy(), {n: g.copy() for n, _, g in model.named_parameters()}


def test_pairs_follow_the_rules():
    g = Graph([("fc1", Linear(6, 5), ["input"]), ("r1", ReLU(), ["fc1"]),        # fuses
               ("fc2", Linear(5, 5), ["r1"]), ("r2", ReLU6(), ["fc2"]),           # fuses (relu6)
               ("fc3", Linear(5, 5), ["r2"]), ("c3", Clip(0.0, 3.0), ["fc3"]),    # Clip(0, 3): no kind
               ("fc4", Linear(5, 5), ["c3"]), ("r4", ReLU(), ["fc4"]),            # fc4 read twice: no
               ("fc5", Linear(5, 5), ["fc4"]), ("r5", ReLU(), ["input"]),         # reads the input: no
               ("fc6", Linear(6, 4), ["r5"])], input_shape=(6,), output="fc5")
    assert g.fused_pairs() == [("fc1", "r1"), ("fc2", "r2")]
    assert Clip(0.0, None).activation_kind == "relu" and Clip(0.0, 6.0).activation_kind == "relu6"
    # a producer that is the graph's output keeps its own value: never fused
    s = Sequential(("fc", Linear(3, 3)), ("relu", ReLU()), ("out", Linear(3, 2)), ("last", ReLU()), input_shape=(3,))
    assert s.fused_pairs() == [("fc", "relu"), ("out", "last")]
    s2 = Graph([("fc", Linear(3, 3), ["input"]), ("relu", ReLU(), ["fc"])], input_shape=(3,), output="fc")
    assert s2.fused_pairs() == []


@pytest.mark.parametrize("act", [ReLU, ReLU6])
def test_fused_equals_unfused(fusion, rng, act):
    n, d = 7, 13
    model = Sequential(("fc1", Linear(d, 11, seed=1)), ("a1", act()), ("fc2", Linear(11, 5, seed=2)), ("a2", act()),
                       ("fc3", Linear(5, 3, seed=3)), input_shape=(d,))
    x = (rng.standard_normal((n, d)) * 4).astype(np.float32)  # wide enough that ReLU6 clips at 6 too
    x[0, :3] = np.nan                                        # NaN passes forward, gets no gradient
    labels = rng.integers(0, 3, n)
    assert len(model.fused_pairs()) == 2
    base.FUSION = True
    y1, g1 = _step(model, x, labels)
    base.FUSION = False
    assert model.fused_pairs() == []
    y0, g0 = _step(model, x, labels)
    # the same float32 operations in the same order: equal bit for bit (NaN where NaN)
    np.testing.assert_array_equal(y1, y0)
    for k in g0:
        np.testing.assert_array_equal(g1[k], g0[k], err_msg=k)


def test_activation_helpers(rng):
    y = np.array([-np.inf, -1.0, 0.0, 0.5, 6.0, 7.0, np.nan], dtype=np.float32)
    np.testing.assert_array_equal(activate_(np, y.copy(), "relu"), [0, 0, 0, 0.5, 6, 7, np.nan])
    r6 = activate_(np, y.copy(), "relu6")
    np.testing.assert_array_equal(r6, [0, 0, 0, 0.5, 6, 6, np.nan])
    dy = np.ones_like(y)
    np.testing.assert_array_equal(activation_grad(np, dy, r6, "relu6"), [0, 0, 0, 1, 0, 0, 0])
    assert activate_(np, y, None) is y and activation_grad(np, dy, y, None) is dy
    with pytest.raises(ValueError, match="activation"):
        check_activation("op", "gelu")


@pytest.mark.parametrize("act", ["relu", "relu6"])
def test_conv2d_activation(rng, act):
    x = (rng.standard_normal((2, 3, 7, 5)) * 5).astype(np.float32)
    w = rng.standard_normal((4, 3, 3, 3)).astype(np.float32)
    b = rng.standard_normal(4).astype(np.float32)
    plain = ops.conv2d(x, w, b, padding=1)
    fused = ops.conv2d(x, w, b, padding=1, activation=act)
    np.testing.assert_array_equal(fused, activate_(np, plain.copy(), act))
    with pytest.raises(ValueError, match="activation"):
        ops.conv2d(x, w, b, activation="tanh")


def test_a_swapped_layer_is_planned_again(fusion, rng):
    """Compression swaps layers in place (CompressedLinear for Linear): the fusion plan follows."""
    model = Sequential(("fc1", Linear(5, 4, seed=1)), ("relu", ReLU()), ("fc2", Linear(4, 3, seed=2)), input_shape=(5,))
    x = rng.standard_normal((6, 5)).astype(np.float32)
    want = model.forward(x).copy()
    assert model.fused_pairs() == [("fc1", "relu")]

    class Plain(Linear):  # the same maths, but it cannot apply the ReLU itself
        absorbs = ()
    swapped = Plain(5, 4, seed=1)
    model.layers[0] = ("fc1", swapped)
    assert model.fused_pairs() == []
    np.testing.assert_array_equal(model.forward(x), want)


@pytest.mark.parametrize("act", [ReLU, ReLU6])
@pytest.mark.parametrize("native", [True, False])
def test_residual_join_fuses_its_activation(fusion, monkeypatch, rng, act, native):
    """Add absorbs the ReLU / ReLU6 after it (ResNet's join): the fused graph computes the
    unfused one's output and gradients bit for bit, with the native one-pass kernels
    (dnnpar/cpu/eltwise.cpp, every array above their threshold here) and with NumPy's passes."""
    from dnnpar.backend import cpu_native
    from dnnpar.nn.conv import Conv2d
    from dnnpar.nn.graph import Add
    from dnnpar.nn.layers import Flatten
    from dnnpar.ops import activation as A

    if native and cpu_native.library("eltwise") is None:
        pytest.skip(f"native eltwise kernels unavailable: {cpu_native.unavailable_reason('eltwise')}")
    monkeypatch.setitem(A.NATIVE_MIN_ELEMENTS, "size", 1 if native else 1 << 62)
    model = Graph([("c1", Conv2d(3, 4, 3, padding=1, seed=1), ["input"]),
                   ("c2", Conv2d(4, 4, 3, padding=1, seed=2), ["c1"]),
                   ("add", Add(), ["c2", "c1"]), ("act", act(), ["add"]),   # c1 read twice: its gradients summed
                   ("c3", Conv2d(4, 4, 3, padding=1, seed=3), ["act"]),
                   ("add3", Add(), ["c3", "act", "c1"]), ("act3", act(), ["add3"]),  # three inputs: NumPy's sums
                   ("flat", Flatten(), ["act3"]), ("fc", Linear(4 * 5 * 6, 3, seed=4), ["flat"])],
                  input_shape=(3, 5, 6))
    assert ("add", "act") in model.fused_pairs() and ("add3", "act3") in model.fused_pairs()
    x = (rng.standard_normal((2, 3, 5, 6)) * 8).astype(np.float32)  # ReLU6 clips at 6 too
    x[0, 0, 2, 3] = np.nan
    labels = rng.integers(0, 3, 2)
    calls = []
    real = cpu_native.add_act
    monkeypatch.setattr(cpu_native, "add_act", lambda *a, **k: calls.append(1) or real(*a, **k))
    base.FUSION = True
    y1, g1 = _step(model, x, labels)
    assert bool(calls) == native
    base.FUSION = False
    y0, g0 = _step(model, x, labels)
    np.testing.assert_array_equal(y1, y0)
    for k in g0:
        np.testing.assert_array_equal(g1[k], g0[k], err_msg=k)


@pytest.mark.parametrize("n", [1, 17, 1 << 16, (1 << 17) + 5])
@pytest.mark.parametrize("act", [None, "relu", "relu6"])
def test_native_elementwise_passes_are_numpys(rng, n, act):
    """cpu_native.add_act and act_grad against NumPy's expressions bit for bit (NaN, inf, signed
    zeros, values at 0 and 6; sizes of one element, vector tails, several threads' shares),
    the same on 1-3 threads, in place too."""
    from dnnpar.backend import cpu_native

    if cpu_native.library("eltwise") is None:
        pytest.skip(f"native eltwise kernels unavailable: {cpu_native.unavailable_reason('eltwise')}")
    special = np.array([np.nan, np.inf, -np.inf, -0.0, 0.0, 6.0, -6.0, 3.0], np.float32)
    a = (rng.standard_normal(n) * 5).astype(np.float32)
    b = (rng.standard_normal(n) * 5).astype(np.float32)
    a[: min(n, 8)] = special[: min(n, 8)]
    b[: min(n, 8)] = special[::-1][: min(n, 8)]
    want = activate_(np, a + b, act)
    for t in (1, 2, 3):
        y = np.full(n, np.nan, np.float32)
        assert cpu_native.add_act(a, b, y, act, threads=t)
        np.testing.assert_array_equal(y, want)
    inplace = a.copy()
    assert cpu_native.add_act(inplace, b, inplace, act)
    np.testing.assert_array_equal(inplace, want)
    if act is None:
        return
    dy = rng.standard_normal(n).astype(np.float32)
    dy[: min(n, 3)] = np.array([np.nan, np.inf, -0.0], np.float32)[: min(n, 3)]
    mask = want > 0
    if act == "relu6":
        mask &= want < 6
    ref = np.where(mask, dy, np.float32(0))
    for t in (1, 2, 3):
        dx = np.full(n, np.nan, np.float32)
        assert cpu_native.act_grad(dy, want, dx, act, threads=t)
        np.testing.assert_array_equal(dx, ref)
        np.testing.assert_array_equal(np.signbit(dx), np.signbit(ref))  # +0.0 where masked
    assert not cpu_native.act_grad(dy, want, np.empty(n, np.float64), act)  # declines, writes nothing
    assert not cpu_native.add_act(a, b[: n - 1] if n > 1 else b.astype(np.float64), y, act)
