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
    ]


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
