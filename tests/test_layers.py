"""Every layer: central finite differences in float64 (the numpy backend's dp.precision("float64")
oracle mode), and emu == numpy in float32."""
import numpy as np
import pytest

import dnnpar as dp
from dnnpar import nn
from conftest import KERNEL_BACKENDS


def make_layers():
    """(name, factory, input shape) — small, odd sizes; stride, padding and groups included."""
    return [
        ("conv", lambda: nn.Conv2d(3, 4, 3, stride=1, padding=1, seed=1), (2, 3, 6, 5)),
        ("conv_s2_dil", lambda: nn.Conv2d(2, 3, (3, 2), stride=2, padding=(2, 1), dilation=(2, 1), seed=2), (2, 2, 9, 7)),
        ("conv_direct", lambda: nn.Conv2d(2, 3, 3, padding=1, algo="direct", seed=3), (1, 2, 5, 5)),
        ("conv_groups", lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2, seed=4), (2, 4, 5, 6)),
        ("conv_igemm_groups", lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, algo="implicit_gemm", seed=9),
         (2, 4, 7, 6)),
        ("pointwise", lambda: nn.PointwiseConv2d(5, 3, seed=5), (2, 5, 4, 3)),
        ("depthwise", lambda: nn.DepthwiseConv2d(3, 3, stride=2, padding=1, seed=6), (2, 3, 7, 6)),
        ("linear", lambda: nn.Linear(7, 5, seed=7), (3, 7)),
        ("relu", lambda: nn.ReLU(), (2, 3, 4, 5)),
        ("maxpool", lambda: nn.MaxPool2d(2), (2, 3, 6, 6)),
        ("maxpool_overlap", lambda: nn.MaxPool2d(3, stride=2, padding=1), (2, 2, 7, 7)),
        ("maxpool_ragged", lambda: nn.MaxPool2d(2), (2, 3, 7, 5)),          # disjoint, an uncovered edge
        ("maxpool_gaps", lambda: nn.MaxPool2d(2, stride=3), (1, 2, 8, 8)),   # disjoint, gaps between windows
        ("avgpool", lambda: nn.AvgPool2d(3, stride=2, padding=1), (2, 2, 7, 6)),
        ("gap", lambda: nn.GlobalAvgPool2d(), (2, 3, 4, 5)),
        ("batchnorm_train", lambda: nn.BatchNorm2d(3), (4, 3, 3, 2)),
        ("batchnorm_eval", lambda: _bn_eval(), (4, 3, 3, 2)),
        ("dropout", lambda: nn.Dropout(0.3, seed=8), (3, 10)),
        ("flatten", lambda: nn.Flatten(), (2, 3, 2, 2)),
        ("conv_depthwise", lambda: nn.Conv2d(3, 3, 3, stride=2, padding=1, groups=3, seed=9), (2, 3, 7, 6)),
        ("conv_depthwise_x2", lambda: nn.Conv2d(3, 6, 3, padding=1, groups=3, seed=10), (2, 3, 5, 6)),
        ("conv_depthwise_dil", lambda: nn.Conv2d(2, 4, 3, padding=2, dilation=2, groups=2, bias=False, seed=11),
         (1, 2, 6, 6)),
        ("conv_groups3", lambda: nn.Conv2d(6, 3, (1, 3), padding=(0, 1), groups=3, seed=12), (2, 6, 4, 5)),
        ("identity", lambda: nn.Identity(), (2, 3, 4)),
        ("clip", lambda: nn.Clip(-0.5, 0.8), (2, 3, 4, 5)),
        ("clip_min_only", lambda: nn.Clip(min_value=0.2), (3, 7)),
        ("relu6", lambda: _Scaled(nn.ReLU6(), 4.0), (2, 3, 4, 5)),
        ("sigmoid", lambda: nn.Sigmoid(), (2, 3, 4, 5)),
        ("hardsigmoid", lambda: _Scaled(nn.HardSigmoid(), 3.0), (2, 3, 4, 5)),
        ("hardsigmoid_torch", lambda: _Scaled(nn.HardSigmoid(1 / 6, 0.5), 3.0), (3, 9)),
        ("hardswish", lambda: _Scaled(nn.HardSwish(), 3.0), (2, 3, 4, 5)),
        ("softmax", lambda: nn.Softmax(), (3, 7)),
        ("softmax_channels", lambda: nn.Softmax(axis=1), (2, 4, 3, 2)),
        ("softmax_last", lambda: nn.Softmax(axis=3), (2, 4, 3, 2)),
        ("reshape", lambda: nn.Reshape((4, -1)), (2, 3, 4, 2)),
        ("avgpool_nopad", lambda: nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), (2, 2, 7, 6)),
        ("avgpool_bigpad", lambda: nn.AvgPool2d(3, stride=1, padding=2, count_include_pad=False), (1, 2, 4, 5)),
        ("maxpool_bigpad", lambda: nn.MaxPool2d(3, stride=2, padding=2), (1, 2, 5, 6)),  # padding past k/2, as ONNX
        ("gap_keepdims", lambda: nn.GlobalAvgPool2d(keepdims=True), (2, 3, 4, 5)),
    ] + [(f"const_{op}", (lambda op=op: _constant(op)), (2, 3, 4, 5)) for op in nn.layers.CONSTANT_OPS]


class _Scaled(nn.Layer):
    """``layer`` applied to k * x, so random normal inputs reach every piece of a piecewise
    activation (ReLU6's 6, HardSigmoid's 0 and 1, HardSwish's -3 and 3)."""

    def __init__(self, layer, k):
        super().__init__()
        self.layer, self.k = layer, k

    def forward(self, x):
        return self.layer.forward(x * x.dtype.type(self.k))

    def backward(self, dy):
        return self.layer.backward(dy) * dy.dtype.type(self.k)


def _constant(op):
    """A ConstantOp whose value broadcasts as (C, 1, W) against (C, H, W) samples, away from 0."""
    c = np.linspace(0.5, 1.5, 15, dtype=np.float32).reshape(3, 1, 5) * np.array([1, -1, 1], np.float32)[:, None, None]
    return nn.ConstantOp(op, c)


def _bn_eval():
    be = dp.get_backend()  # the arrays live where the layer does (CuPy refuses a NumPy source)
    bn = nn.BatchNorm2d(3)
    bn.buffers["running_mean"][...] = be.asarray(np.array([0.1, -0.2, 0.3], np.float32))
    bn.buffers["running_var"][...] = be.asarray(np.array([1.5, 0.5, 2.0], np.float32))
    bn.params["weight"][...] = be.asarray(np.array([1.2, 0.7, -0.4], np.float32))
    bn.params["bias"][...] = be.asarray(np.array([0.1, 0.0, -0.3], np.float32))
    bn.training = False
    return bn


LAYERS = make_layers()


def run(layer, x, g):
    if isinstance(layer, nn.Dropout):
        layer.rng = np.random.default_rng(42)  # the same mask for every evaluation
    y = layer.forward(x)
    return float(np.sum(y * g)), y


@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_gradients_match_central_differences_float64(name, factory, shape, rng):
    with dp.use_backend("numpy"), dp.precision("float64"):
        layer = factory()
        for k in layer.params:
            layer.params[k] = layer.params[k].astype(np.float64) + 0.1 * rng.standard_normal(layer.params[k].shape)
        x = rng.standard_normal(shape)
        _, y = run(layer, x, 0)
        g = rng.standard_normal(y.shape)
        run(layer, x, g)
        dx = layer.backward(g)
        eps = 1e-6

        def check(arr, analytic, what):
            flat = arr.reshape(-1)
            picks = rng.choice(flat.size, size=min(flat.size, 25), replace=False)
            for i in picks:
                old = flat[i]
                flat[i] = old + eps
                fp, _ = run(layer, x, g)
                flat[i] = old - eps
                fm, _ = run(layer, x, g)
                flat[i] = old
                num = (fp - fm) / (2 * eps)
                ana = analytic.reshape(-1)[i]
                assert abs(num - ana) <= 1e-6 * max(1.0, abs(num)), f"{name} {what}[{i}]: numeric {num} vs analytic {ana}"

        check(x, dx, "dx")
        for k in layer.params:
            check(layer.params[k], layer.grads[k], k)


@pytest.mark.parametrize("other", KERNEL_BACKENDS)
@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_kernel_backends_equal_numpy(other, name, factory, shape, rng):
    """emu (and cuda, on a GPU) give the numpy backend's forward, input gradient, parameter
    gradients and running statistics for every layer."""
    x = rng.standard_normal(shape).astype(np.float32)
    results = {}
    for backend in ("numpy", other):
        with dp.use_backend(backend) as be:
            layer = factory()
            y = layer.forward(be.asarray(x))
            g = be.asarray(np.linspace(-1, 1, y.size, dtype=np.float32).reshape(y.shape))
            dx = layer.backward(g)
            results[backend] = (be.to_numpy(y), be.to_numpy(dx), {k: be.to_numpy(v) for k, v in layer.grads.items()},
                                {k: be.to_numpy(v) for k, v in layer.buffers.items()})
    (y0, dx0, g0, b0), (y1, dx1, g1, b1) = results["numpy"], results[other]
    np.testing.assert_allclose(y1, y0, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(dx1, dx0, rtol=1e-5, atol=1e-5)
    assert g0.keys() == g1.keys()
    for k in g0:
        np.testing.assert_allclose(g1[k], g0[k], rtol=1e-5, atol=1e-5)
    for k in b0:
        np.testing.assert_allclose(b1[k], b0[k], rtol=1e-5, atol=1e-6)


def test_softmax_cross_entropy_gradient(rng):
    with dp.use_backend("numpy"), dp.precision("float64"):
        loss = nn.SoftmaxCrossEntropy()
        logits = rng.standard_normal((5, 7))
        labels = rng.integers(0, 7, 5)
        loss(logits, labels)
        d = loss.backward()
        eps = 1e-6
        for i in range(5):
            for j in range(7):
                lp, lm = logits.copy(), logits.copy()
                lp[i, j] += eps
                lm[i, j] -= eps
                num = (loss(lp, labels) - loss(lm, labels)) / (2 * eps)
                assert abs(num - d[i, j]) < 1e-7
        with pytest.raises(ValueError, match="labels must lie in \\[0, 7\\)"):
            loss(logits, np.array([0, 1, 2, 3, 9]))


@pytest.mark.parametrize("backend", ["numpy", "emu"])
@pytest.mark.parametrize("kernel,stride", [(2, 2), (3, 2), (2, 3)])
def test_maxpool_gives_a_tied_window_gradient_to_its_first_maximum(backend, kernel, stride, rng):
    """Windows whose maxima tie (ReLU zeros, quantised inputs) send the whole gradient to the first
    maximum in row-major tap order, once: no doubling, on the disjoint and the overlapping paths."""
    with dp.use_backend(backend) as be:
        x = rng.integers(0, 3, (2, 2, 7, 7)).astype(np.float32)  # many ties
        pool = nn.MaxPool2d(kernel, stride=stride)
        y = pool.forward(be.asarray(x))
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dx = be.to_numpy(pool.backward(be.asarray(dy)))
    want = np.zeros_like(x)
    for n in range(2):
        for c in range(2):
            for a in range(y.shape[2]):
                for b in range(y.shape[3]):
                    win = x[n, c, a * stride:a * stride + kernel, b * stride:b * stride + kernel]
                    i, j = np.unravel_index(np.argmax(win), win.shape)  # argmax: the first maximum
                    want[n, c, a * stride + i, b * stride + j] += dy[n, c, a, b]
    np.testing.assert_allclose(dx, want, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["numpy", "emu"])
@pytest.mark.parametrize("cin,cout,groups,dil", [(3, 3, 3, 1), (3, 6, 3, 1), (4, 12, 4, 1), (2, 4, 2, 2),
                                                 (6, 3, 3, 1), (4, 6, 2, 1)])
def test_grouped_conv_equals_its_block_diagonal_dense_conv(backend, cin, cout, groups, dil, rng):
    """Conv2d with groups (depthwise with any multiplier included) equals the groups=1 convolution
    whose weight is block-diagonal: output channel o sees only the inputs of its group, computed
    here in float64 on numpy as the oracle."""
    x = rng.standard_normal((2, cin, 7, 6)).astype(np.float32)
    with dp.use_backend(backend) as be:
        conv = nn.Conv2d(cin, cout, 3, stride=2, padding=1, dilation=dil, groups=groups, seed=3)
        conv.params["bias"][...] = be.asarray(rng.standard_normal(cout).astype(np.float32))
        y = be.to_numpy(conv.forward(be.asarray(x)))
        w, b = be.to_numpy(conv.params["weight"]), be.to_numpy(conv.params["bias"])
    ci, co = cin // groups, cout // groups
    dense = np.zeros((cout, cin, 3, 3))
    for o in range(cout):
        g = o // co
        dense[o, g * ci:(g + 1) * ci] = w[o]
    with dp.use_backend("numpy"), dp.precision("float64"):
        want = dp.ops.conv2d(x.astype(np.float64), dense, b.astype(np.float64), stride=2, padding=1, dilation=dil)
    # each output is a float32 sum of ci * 9 products and a bias
    np.testing.assert_allclose(y, want, rtol=0, atol=(ci * 9 + 1) * 2 * np.finfo(np.float32).eps *
                               np.abs(x).max() * (np.abs(w).max() + np.abs(b).max()))


def test_avgpool_without_padding_in_the_count_divides_by_the_covered_pixels(rng):
    x = rng.standard_normal((2, 3, 6, 7))
    with dp.use_backend("numpy"), dp.precision("float64"):
        for k, s, p in [(3, 2, 1), (3, 1, 2), (2, 2, 1), ((3, 2), (1, 2), (2, 1))]:
            y = nn.AvgPool2d(k, stride=s, padding=p, count_include_pad=False).forward(x)
            yi = nn.AvgPool2d(k, stride=s, padding=p).forward(x)
            (kh, kw), (sh, sw), (ph, pw) = (nn.layers.pair(v, "") for v in (k, s, p))
            want, want_in = np.empty(y.shape), np.empty(y.shape)
            for a in range(y.shape[2]):
                for b in range(y.shape[3]):
                    r0, c0 = a * sh - ph, b * sw - pw
                    win = x[:, :, max(r0, 0):r0 + kh, max(c0, 0):c0 + kw]
                    want[:, :, a, b] = win.mean(axis=(2, 3))
                    want_in[:, :, a, b] = win.sum(axis=(2, 3)) / (kh * kw)
            np.testing.assert_allclose(y, want, rtol=1e-13)
            np.testing.assert_allclose(yi, want_in, rtol=1e-13)
    with pytest.raises(ValueError, match="padding \\(3, 3\\) must be smaller than the window"):
        nn.AvgPool2d(3, padding=3)
    with pytest.raises(TypeError, match="count_include_pad must be a bool"):
        nn.AvgPool2d(3, count_include_pad=1)


def test_activations_follow_their_onnx_definitions(rng):
    x = rng.standard_normal((3, 4, 5)) * 5
    with dp.use_backend("numpy"), dp.precision("float64"):
        cases = [(nn.Identity(), x), (nn.Clip(-1.0, 2.0), np.minimum(np.maximum(x, -1), 2)),
                 (nn.Clip(max_value=0.5), np.minimum(x, 0.5)), (nn.Clip(), x),
                 (nn.ReLU6(), np.minimum(np.maximum(x, 0), 6)), (nn.Sigmoid(), 1 / (1 + np.exp(-x))),
                 (nn.HardSigmoid(), np.maximum(0, np.minimum(1, 0.2 * x + 0.5))),
                 (nn.HardSigmoid(0.3, 0.1), np.maximum(0, np.minimum(1, 0.3 * x + 0.1))),
                 (nn.HardSwish(), x * np.maximum(0, np.minimum(1, x / 6 + 0.5))),
                 (nn.Softmax(2), np.exp(x) / np.exp(x).sum(axis=2, keepdims=True)),
                 (nn.Reshape((-1,)), x.reshape(3, 20)), (nn.Reshape((5, 2, 2)), x.reshape(3, 5, 2, 2))]
        for layer, want in cases:
            np.testing.assert_allclose(layer.forward(x), want, rtol=1e-13, atol=1e-300, err_msg=repr(layer))
            assert layer.output_shape(x.shape[1:]) == want.shape[1:]
        big = np.array([[-800.0, 0.0, 800.0]])
        np.testing.assert_array_equal(nn.Sigmoid().forward(big), [[0.0, 0.5, 1.0]])  # no overflow, no NaN
        c = (rng.standard_normal((4, 1)) + 3).astype(np.float32).astype(np.float64)  # the value is kept as float32
        for op, want in [("add", x + c), ("sub", x - c), ("rsub", c - x), ("mul", x * c), ("div", x / c)]:
            layer = nn.ConstantOp(op, c)
            np.testing.assert_allclose(layer.forward(x), want, rtol=1e-15)
            assert layer.config() == {"op": op, "value": {"shape": [4, 1], "dtype": "float32"}}


@pytest.mark.parametrize("make,error,match", [
    (lambda: nn.Clip(2.0, 1.0), ValueError, "min_value 2.0 exceeds max_value 1.0"),
    (lambda: nn.Clip(float("nan")), ValueError, "min_value must be finite"),
    (lambda: nn.Clip("0"), TypeError, "min_value must be a real number"),
    (lambda: nn.HardSigmoid(alpha=None), TypeError, "alpha must be a real number"),
    (lambda: nn.Softmax(0), ValueError, "axis must be >= 1"),
    (lambda: nn.Softmax(1.0), TypeError, "axis must be an int"),
    (lambda: nn.Reshape((2, 0)), ValueError, "entries must be >= 1, with at most one -1"),
    (lambda: nn.Reshape((-1, -1)), ValueError, "at most one -1"),
    (lambda: nn.Reshape("ab"), TypeError, "shape must be a non-empty tuple of ints"),
    (lambda: nn.ConstantOp("pow", 1.0), ValueError, "op must be one of"),
    (lambda: nn.ConstantOp("div", [1.0, 0.0]), ValueError, "'div' by a value that holds zeros"),
    (lambda: nn.ConstantOp("mul", [1.0, np.inf]), ValueError, "NaN or infinity"),
    (lambda: nn.ConstantOp("mul", 1e39), ValueError, "NaN or infinity"),
    (lambda: nn.ConstantOp("mul", ["a"]), TypeError, "must hold real numbers"),
    (lambda: nn.ConstantOp("mul", {"shape": [2, -1], "dtype": "float32"}), ValueError, "list of sizes >= 1"),
    (lambda: nn.GlobalAvgPool2d(keepdims="yes"), TypeError, "keepdims must be a bool"),
    (lambda: nn.MaxPool2d(2, padding=2), ValueError, "must be smaller than the window"),
    (lambda: nn.Reshape((4, -1)).output_shape((3, 5)), ValueError, "cannot reshape a sample of shape \\(3, 5\\)"),
    (lambda: nn.Reshape((4, 4)).output_shape((3, 5)), ValueError, "cannot reshape"),
    (lambda: nn.ConstantOp("add", np.ones((2, 3))).output_shape((3, 3)), ValueError, "does not broadcast"),
    (lambda: nn.ConstantOp("add", np.ones((3, 1))).output_shape((3,)), ValueError, "does not broadcast"),
    (lambda: nn.ConstantOp("add", np.ones((1, 3, 1))).forward(np.ones((2, 3, 1), np.float32)), ValueError,
     "without growing them"),
    (lambda: nn.Softmax(3).output_shape((4, 2)), ValueError, "at least 3 dimensions"),
    (lambda: nn.BatchNorm2d(3).output_shape((4, 2, 2)), ValueError, "expects 3 channels"),
    (lambda: nn.GlobalAvgPool2d().output_shape((4,)), ValueError, "expects samples of shape \\(C, H, W\\)"),
    (lambda: nn.Conv2d("3", 4, 3), TypeError, "Conv2d: in_channels must be an int"),
    (lambda: nn.Conv2d(3, 4, 0), ValueError, "need kernel_size, stride, dilation >= 1 and padding >= 0"),
    (lambda: nn.Conv2d(3, 4, 3, padding=-1), ValueError, "padding >= 0"),
    (lambda: nn.Conv2d(3, 4, 3, groups=0), ValueError, "groups must be >= 1"),
    (lambda: nn.Conv2d(3, 4, 3, bias=1), TypeError, "bias must be a bool"),
    (lambda: nn.DepthwiseConv2d(3, (3, 3.5)), TypeError, "kernel_size must be an int or a pair of ints"),
    (lambda: nn.Linear(0, 3), ValueError, "in_features must be >= 1"),
    (lambda: nn.BatchNorm2d(2.0), TypeError, "channels must be an int"),
    (lambda: nn.BatchNorm2d(2, eps=0.0), ValueError, "need eps in \\[1e-12, 1\\]"),
    (lambda: nn.Dropout(None), TypeError, "p must be a real number"),
])
def test_bad_layer_arguments_are_refused(make, error, match):
    with dp.use_backend("numpy"):
        with pytest.raises(error, match=match):
            make()


@pytest.mark.parametrize("name,factory,shape", LAYERS, ids=[n for n, _, _ in LAYERS])
def test_config_rebuilds_the_same_structure(name, factory, shape):
    """type(layer)(**layer.config()) has the same config, parameter and buffer shapes and output
    shape; the config is JSON and names every constructor argument but the seed."""
    import json

    from dnnpar.nn.base import constructor_args
    layer = factory()
    if isinstance(layer, _Scaled):
        layer = layer.layer
    cfg = layer.config()
    assert json.loads(json.dumps(cfg)) == cfg and sorted(cfg) == sorted(constructor_args(type(layer)))
    twin = type(layer)(**json.loads(json.dumps(cfg)))
    assert twin.config() == cfg and type(twin) is type(layer)
    for a, b in ((layer.params, twin.params), (layer.buffers, twin.buffers)):
        assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert twin.output_shape(shape[1:]) == layer.output_shape(shape[1:])
    assert nn.LAYER_TYPES[type(layer).__name__] is type(layer)


@pytest.mark.parametrize("backend", ["numpy", "emu"])
def test_relu_of_infinities_and_nan(backend):
    """ReLU(-inf) = 0 and ReLU(inf) = inf (ONNX, PyTorch); NaN stays NaN; an infinite gradient
    where the unit is off does not leak through as NaN."""
    with dp.use_backend(backend) as be:
        relu = nn.ReLU()
        x = be.asarray(np.array([[-np.inf, -1.0, 0.0, 2.0, np.inf, np.nan]], np.float32))
        y = be.to_numpy(relu.forward(x))
        np.testing.assert_array_equal(y, [[0.0, 0.0, 0.0, 2.0, np.inf, np.nan]])
        dx = be.to_numpy(relu.backward(be.asarray(np.full((1, 6), np.inf, np.float32))))
        np.testing.assert_array_equal(dx, [[0.0, 0.0, 0.0, np.inf, np.inf, 0.0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pass_where_is_where_bit_for_bit(dtype, rng):
    """The backward masks of ReLU / Clip / the fused activations (ops.activation.pass_where, a
    bitwise AND on NumPy) give np.where's bits: dy where the mask is set, +0.0 elsewhere, also for
    NaN, +-inf and -0.0 in dy and for a non-contiguous dy."""
    from dnnpar.ops.activation import pass_where
    dy = rng.standard_normal((5, 7, 9)).astype(dtype)
    dy.flat[::11] = np.nan
    dy.flat[1::13] = np.inf
    dy.flat[2::17] = -np.inf
    dy.flat[3::5] = -0.0
    mask = rng.random(dy.shape) < 0.5
    for d, m in ((dy, mask), (dy[:, ::2, 1:], mask[:, ::2, 1:]), (dy.transpose(2, 0, 1), mask.transpose(2, 0, 1))):
        got, want = pass_where(np, m, d), np.where(m, d, d.dtype.type(0))
        assert got.dtype == want.dtype and got.shape == want.shape
        np.testing.assert_array_equal(got.view(f"u{d.itemsize}"), want.view(f"u{d.itemsize}"))


def test_linear_overwrites_only_a_gradient_nobody_holds(rng):
    """Linear's backward writes dW into the previous step's array when nothing else holds it (a
    fresh array of hundreds of MB costs more than the product on a VM), and never into one a
    caller kept, a view of one, or a bucket view put in ``grads`` (data parallel's): each keeps
    its values, and every step's gradient is its own product."""
    lin = nn.Linear(13, 6, seed=3)
    w = lin.params["weight"]

    def step():
        x = rng.standard_normal((4, 13)).astype(np.float32)
        dy = rng.standard_normal((4, 6)).astype(np.float32)
        lin.forward(x)
        lin.backward(dy)
        want = dy.T.astype(np.float64) @ x.astype(np.float64)
        np.testing.assert_allclose(lin.grads["weight"], want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
        return lin.grads["weight"]

    first_id = id(step())
    assert id(step()) == first_id  # reused: nothing held it
    held = lin.grads["weight"]
    kept = held.copy()
    assert step() is not held
    np.testing.assert_array_equal(held, kept)
    del held
    row = lin.grads["weight"][2]
    kept = row.copy()
    step()
    np.testing.assert_array_equal(row, kept)
    del row
    bucket = np.zeros(w.size + 5, np.float32)
    lin.grads["weight"] = bucket[5:].reshape(w.shape)  # held by nothing else: its base tells
    step()
    assert not bucket.any()
