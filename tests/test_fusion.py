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
