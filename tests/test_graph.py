"""Graph models: forward and backward over a DAG (residual adds, concatenations), checked by
float64 central differences; a chain Graph equals Sequential; emu equals numpy; bad wiring is
refused when the graph is built."""
import numpy as np
import pytest

import dnnpar as dp
from dnnpar import nn
from dnnpar.nn.graph import Add, Concat, Graph, Mul
from dnnpar.nn.models import lenet5
from conftest import KERNEL_BACKENDS
from oracles import assert_reordered_close, longest_sum


def residual_net(seed=0):
    """conv -> relu -> [conv -> relu -> conv] + skip -> relu -> concat(with a 1x1 branch) -> pool -> fc."""
    return Graph([
        ("conv1", nn.Conv2d(3, 4, 3, padding=1, seed=seed), ["input"]),
        ("relu1", nn.ReLU(), ["conv1"]),
        ("conv2", nn.Conv2d(4, 4, 3, padding=1, seed=seed + 1), ["relu1"]),
        ("relu2", nn.ReLU(), ["conv2"]),
        ("conv3", nn.Conv2d(4, 4, 3, padding=1, seed=seed + 2), ["relu2"]),
        ("add", Add(), ["conv3", "relu1"]),               # relu1 fans out: its gradient is a sum
        ("relu3", nn.ReLU(), ["add"]),
        ("branch", nn.PointwiseConv2d(4, 2, seed=seed + 3), ["relu1"]),
        ("cat", Concat(), ["relu3", "branch"]),
        ("pool", nn.GlobalAvgPool2d(), ["cat"]),
        ("fc", nn.Linear(6, 5, seed=seed + 4), ["pool"]),
    ], input_shape=(3, 7, 6), name="resnet_tiny")


def _loss(model, x, g):
    return float(np.sum(model.forward(x) * g))


def test_gradients_match_central_differences_float64(rng):
    with dp.use_backend("numpy"), dp.precision("float64"):
        model = residual_net()
        for lname, layer in model.layers:
            for k in layer.params:
                layer.params[k] = layer.params[k].astype(np.float64) + 0.1 * rng.standard_normal(layer.params[k].shape)
        x = rng.standard_normal((2, 3, 7, 6))
        g = rng.standard_normal((2, 5))
        model.forward(x)
        model.backward(g)
        analytic = {n: gr.copy() for n, _, gr in model.named_parameters()}
        eps = 1e-6
        checked = 0
        for name, p, _ in list(model.named_parameters()):
            flat = p.reshape(-1)
            for i in rng.choice(flat.size, size=min(flat.size, 8), replace=False):
                old = flat[i]
                flat[i] = old + eps
                fp = _loss(model, x, g)
                flat[i] = old - eps
                fm = _loss(model, x, g)
                flat[i] = old
                num = (fp - fm) / (2 * eps)
                ana = analytic[name].reshape(-1)[i]
                # central differences in float64: truncation O(eps^2), rounding O(u |f| / eps)
                assert abs(num - ana) <= 1e-6 * max(1.0, abs(num)), f"{name}[{i}]: numeric {num} vs analytic {ana}"
                checked += 1
        assert checked > 50


def test_a_chain_graph_equals_sequential(rng):
    x = rng.standard_normal((3, 1, 28, 28)).astype(np.float32)
    dy = rng.standard_normal((3, 10)).astype(np.float32)
    with dp.use_backend("numpy"):
        seq = lenet5(seed=2)
        graph = Graph([(n, layer, [prev]) for (n, layer), prev in
                       zip(lenet5(seed=2).layers, ["input"] + [n for n, _ in seq.layers[:-1]])],
                      input_shape=(1, 28, 28))
        np.testing.assert_array_equal(graph.forward(x), seq.forward(x))
        seq.backward(dy)
        graph.backward(dy)
        for (n, _, a), (m, _, b) in zip(seq.named_parameters(), graph.named_parameters()):
            assert n == m
            np.testing.assert_array_equal(a, b, err_msg=n)


def test_shapes_parameters_and_summary():
    with dp.use_backend("numpy"):
        model = residual_net()
        shapes = model.output_shapes()
        assert shapes["add"] == (4, 7, 6) and shapes["cat"] == (6, 7, 6) and shapes["fc"] == (5,)
        assert model.output_shape((3, 7, 6)) == (5,)
        want = 4 * 3 * 9 + 4 + 2 * (4 * 4 * 9 + 4) + 4 * 2 + 2 + 6 * 5 + 5
        assert model.num_parameters() == want
        from dnnpar.nn.summary import summary
        from oracles import longest_sum
        table = summary(model, batch_size=2)
        assert table.params == want and [r.name for r in table.rows] == [n for n, _ in model.layers]
        assert table.rows[8].out_shape == (6, 7, 6) and table.rows[8].macs == 0   # the concat
        assert table.macs == sum(layer.macs(*[shapes[i] for i in model.inputs_of[n]]) for n, layer in model.layers)
        assert longest_sum(model, 2) == (2 * 7 * 6, 2 * 5 + 1)  # 5 layers with weights
        with pytest.raises(ValueError, match="expects input batches of shape"):
            model.forward(np.zeros((1, 3, 6, 6), np.float32))


def test_bad_wiring_is_refused():
    relu = nn.ReLU
    with pytest.raises(ValueError, match="reads 'b', which is neither the input"):
        Graph([("a", relu(), ["input"]), ("c", relu(), ["b"]), ("b", relu(), ["a"])])
    with pytest.raises(ValueError, match="Graph: duplicate layer name 'a'"):
        Graph([("a", relu(), ["input"]), ("a", relu(), ["a"])])
    with pytest.raises(ValueError, match="takes 1 input"):
        Graph([("a", relu(), ["input", "input"])])
    with pytest.raises(TypeError, match="inputs must be a non-empty list"):
        Graph([("a", relu(), "input")])
    with pytest.raises(ValueError, match="output 'z' is not a node"):
        Graph([("a", relu(), ["input"])], output="z")
    with pytest.raises(ValueError, match="needs at least one layer"):
        Graph([])
    with pytest.raises(ValueError, match="Add needs >= 2 inputs of one shape"):
        Add().forward(np.zeros((1, 2)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="Concat needs >= 2 inputs"):
        Concat().forward(np.zeros((1, 2, 3, 3)), np.zeros((1, 2, 4, 3)))


def test_a_graph_trains(rng):
    from dnnpar.data import fashion_mnist
    from dnnpar.train import TrainConfig, train

    d = fashion_mnist.load(subset="embedded")
    d = fashion_mnist.Dataset(d.x_train[:512], d.y_train[:512], d.x_test[:200], d.y_test[:200], d.source)
    with dp.use_backend("numpy"):
        model = Graph([
            ("conv1", nn.Conv2d(1, 8, 3, padding=1, seed=1), ["input"]), ("relu1", nn.ReLU(), ["conv1"]),
            ("conv2", nn.Conv2d(8, 8, 3, padding=1, seed=2), ["relu1"]), ("add", Add(), ["conv2", "relu1"]),
            ("relu2", nn.ReLU(), ["add"]), ("pool", nn.MaxPool2d(4), ["relu2"]), ("flat", nn.Flatten(), ["pool"]),
            ("fc", nn.Linear(8 * 7 * 7, 10, seed=3), ["flat"])], input_shape=(1, 28, 28), name="res")
        cfg = TrainConfig(model="lenet5", epochs=2, batch_size=32, lr=0.02, schedule="constant", seed=1)
        result = train(cfg, data=d, model=model, progress=False, out=lambda *a: None)
        hist = result.history
    assert hist.records[-1].loss < hist.records[0].loss
    assert hist.records[-1].test_acc > 0.5


def mobile_net(seed=0, c=4):
    """A MobileNet v2 inverted-residual block (1x1 expand, ReLU6, depthwise 3x3 via groups, ReLU6,
    1x1 project, Add with the skip; no bias before BatchNorm, whose batch mean removes it) followed by a squeeze-and-excitation gate (global pool,
    1x1 reduce, ReLU, 1x1 expand, HardSigmoid, Mul against the maps), HardSwish, pool, fc."""
    e = 3 * c  # expansion factor 3
    return Graph([
        ("stem", nn.Conv2d(3, c, 3, padding=1, seed=seed), ["input"]),
        ("expand", nn.Conv2d(c, e, 1, bias=False, seed=seed + 1), ["stem"]), ("expand_bn", nn.BatchNorm2d(e), ["expand"]),
        ("relu6a", nn.ReLU6(), ["expand_bn"]),
        ("dw", nn.Conv2d(e, e, 3, padding=1, groups=e, bias=False, seed=seed + 2), ["relu6a"]),
        ("relu6b", nn.ReLU6(), ["dw"]),
        ("project", nn.Conv2d(e, c, 1, seed=seed + 3), ["relu6b"]),
        ("res", Add(), ["project", "stem"]),
        ("squeeze", nn.GlobalAvgPool2d(keepdims=True), ["res"]),
        ("reduce", nn.Conv2d(c, 2, 1, seed=seed + 4), ["squeeze"]), ("se_relu", nn.ReLU(), ["reduce"]),
        ("excite", nn.Conv2d(2, c, 1, seed=seed + 5), ["se_relu"]), ("gate", nn.HardSigmoid(), ["excite"]),
        ("scale", Mul(), ["res", "gate"]),
        ("act", nn.HardSwish(), ["scale"]),
        ("pool", nn.GlobalAvgPool2d(), ["act"]),
        ("fc", nn.Linear(c, 5, seed=seed + 6), ["pool"]),
    ], input_shape=(3, 6, 5), name="mobile_tiny")


def test_inverted_residual_and_squeeze_excite_gradients_match_central_differences_float64(rng):
    with dp.use_backend("numpy"), dp.precision("float64"):
        model = mobile_net()
        for _, layer in model.layers:
            for k in layer.params:
                layer.params[k] = layer.params[k].astype(np.float64) + 0.1 * rng.standard_normal(layer.params[k].shape)
        x = rng.standard_normal((2, 3, 6, 5))
        g = rng.standard_normal((2, 5))
        model.forward(x)
        model.backward(g)
        analytic = {n: gr.copy() for n, _, gr in model.named_parameters()}
        eps, checked = 1e-6, 0
        for name, p, _ in list(model.named_parameters()):
            flat = p.reshape(-1)
            for i in rng.choice(flat.size, size=min(flat.size, 6), replace=False):
                old = flat[i]
                flat[i] = old + eps
                fp = _loss(model, x, g)
                flat[i] = old - eps
                fm = _loss(model, x, g)
                flat[i] = old
                num = (fp - fm) / (2 * eps)
                ana = analytic[name].reshape(-1)[i]
                assert abs(num - ana) <= 1e-6 * max(1.0, abs(num)), f"{name}[{i}]: numeric {num} vs analytic {ana}"
                checked += 1
        assert checked > 60


@pytest.mark.parametrize("first", [True, False])
def test_mul_broadcasts_a_channel_gate_and_sums_its_gradient(first, rng):
    with dp.use_backend("numpy"), dp.precision("float64"):
        maps, gate = rng.standard_normal((2, 3, 4, 5)), rng.standard_normal((2, 3, 1, 1))
        dy = rng.standard_normal((2, 3, 4, 5))
        mul = Mul()
        args = (gate, maps) if first else (maps, gate)
        np.testing.assert_allclose(mul.forward(*args), maps * gate, rtol=1e-15)
        assert mul.output_shape(*[a.shape[1:] for a in args]) == (3, 4, 5)
        d = mul.backward(dy)
        dgate, dmaps = (d[0], d[1]) if first else (d[1], d[0])
        np.testing.assert_allclose(dmaps, dy * gate, rtol=1e-15)
        np.testing.assert_allclose(dgate, (dy * maps).sum(axis=(2, 3), keepdims=True), rtol=1e-12)
        same = rng.standard_normal((2, 3, 4, 5))
        mul.forward(maps, same)
        da, db = mul.backward(dy)
        np.testing.assert_allclose(da, dy * same, rtol=1e-15)
        np.testing.assert_allclose(db, dy * maps, rtol=1e-15)
    with pytest.raises(ValueError, match="Mul needs 2 inputs of one shape"):
        Mul().output_shape((3, 4, 5), (2, 1, 1))
    with pytest.raises(ValueError, match="Mul needs 2 inputs of one shape"):
        Mul().forward(np.zeros((2, 3, 4, 5)), np.zeros((2, 3, 1)))
    with pytest.raises(ValueError, match="one batch size"):
        Mul().forward(np.zeros((2, 3)), np.zeros((1, 3)))
    with pytest.raises(ValueError, match="takes 2 input"):
        Graph([("m", Mul(), ["input", "input", "input"])])


@pytest.mark.parametrize("other", KERNEL_BACKENDS)
@pytest.mark.parametrize("make,shape,seed", [(residual_net, (3, 7, 6), 3), (mobile_net, (3, 6, 5), 4)],
                         ids=["residual", "mobile"])
def test_kernel_backends_equal_numpy(other, make, shape, seed, rng):
    """emu (and cuda) give numpy's logits and parameter gradients: float32 sums of the same terms
    in another order, through the layers with weights forward and back, plus the loss."""
    x = rng.standard_normal((2,) + shape).astype(np.float32)
    g = rng.standard_normal((2, 5)).astype(np.float32)
    got = {}
    for backend in ("numpy", other):
        with dp.use_backend(backend) as be:
            model = make(seed=seed)
            y = be.to_numpy(model.forward(be.asarray(x)))
            model.backward(be.asarray(g))
            got[backend] = y, {n: be.to_numpy(gr) for n, _, gr in model.named_parameters()}
    (y0, g0), (y1, g1) = got["numpy"], got[other]
    sums, depth = longest_sum(make(), 2)
    assert_reordered_close(y1, y0, sums, depth // 2, "logits")
    for n in g0:
        assert_reordered_close(g1[n], g0[n], sums, depth, n)


@pytest.mark.parametrize("backend", ["numpy", "emu"])
@pytest.mark.parametrize("make", [mobile_net, residual_net], ids=["inverted_residual_se", "residual"])
def test_blocks_train_a_few_steps(backend, make, rng):
    """Plain SGD on a fixed batch lowers the loss of the inverted-residual + SE net and the
    residual net on numpy and on emu (whose forward and backward run the kernels)."""
    from dnnpar.nn.optim import SGD

    shape = make().input_shape
    x = rng.standard_normal((8,) + shape).astype(np.float32)
    labels = rng.integers(0, 5, 8)
    with dp.use_backend(backend) as be:
        model = make(seed=1)
        loss = nn.SoftmaxCrossEntropy()
        opt = SGD(model, lr=0.1, momentum=0.9)
        xb, yb = be.asarray(x), be.asarray(labels)
        losses = []
        for _ in range(20):
            losses.append(float(loss(model.forward(xb), yb)))
            model.backward(loss.backward())
            opt.step()
    # gradient steps on one fixed batch: the loss goes down (how fast depends on the draw)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0] and max(losses[-5:]) < min(losses[:5]), losses


def test_summary_accounts_for_the_new_layers():
    from dnnpar.nn.summary import summary

    with dp.use_backend("numpy"):
        model = mobile_net()
        s = summary(model, batch_size=3)
        rows = {r.name: r for r in s.rows}
    e = 12
    assert s.params == model.num_parameters()
    assert rows["dw"].macs == e * 6 * 5 * 9 and rows["dw"].params == e * 9   # depthwise via groups
    assert rows["squeeze"].out_shape == (4, 1, 1) and rows["scale"].out_shape == (4, 6, 5)
    assert rows["scale"].saved_bytes == (4 * 6 * 5 + 4) * 4                 # Mul keeps both factors
    assert rows["relu6a"].saved_bytes == e * 6 * 5                          # a boolean mask
    assert rows["act"].saved_bytes == 4 * 6 * 5 * 4                         # HardSwish keeps its input
    assert "HardSigmoid" in s.table() and s.training_bytes() > s.inference_bytes()
