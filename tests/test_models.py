"""The model zoo reproduces the published parameter and multiply-accumulate counts."""
import numpy as np
import pytest

import dnnpar as dp
from dnnpar.nn import models
from dnnpar.nn.summary import summary


@pytest.mark.parametrize("name,kwargs,params", [
    ("lenet300", {}, 266_610),
    ("lenet5", {}, 431_080),
    ("vgg16", {}, 138_357_544),
    ("alexnet", {"groups": 2}, 60_965_224),   # Caffe's bvlc_alexnet (two towers)
    ("alexnet", {"groups": 1}, 62_378_344),   # the same net on one device
])
def test_parameter_counts(name, kwargs, params):
    assert models.build(name, **kwargs).num_parameters() == params


def test_alexnet_is_about_61m():
    for g in (1, 2):
        assert abs(models.alexnet(groups=g).num_parameters() - 61e6) / 61e6 < 0.025


def test_vgg16_macs_at_224():
    s = summary(models.vgg16())
    assert abs(s.macs - 15.47e9) / 15.47e9 < 0.005
    assert s.params == 138_357_544


def test_mobilenet_v1_1_0_224():
    s = summary(models.mobilenet_v1(1.0, 224))
    assert abs(s.params - 4.2e6) / 4.2e6 < 0.01
    assert abs(s.macs - 569e6) / 569e6 < 0.01


def test_mobilenet_width_and_resolution_scale_the_cost():
    full, half = summary(models.mobilenet_v1(1.0, 224)), summary(models.mobilenet_v1(0.5, 160))
    # the paper's 0.50 MobileNet-160: 76 M mult-adds, 1.32 M parameters
    assert abs(half.macs - 76e6) / 76e6 < 0.05 and abs(half.params - 1.32e6) / 1.32e6 < 0.05
    assert half.macs < full.macs / 5


def test_summary_table_and_training_memory():
    s = summary(models.lenet5(), batch_size=64)
    text = s.table()
    assert "conv1" in text and "431,080" in text and "2,293,000" in text
    # training memory: weights + grads + momentum + saved activations
    assert s.training_bytes() > 3 * 431_080 * 4 + 64 * 1 * 28 * 28 * 4
    assert s.inference_bytes() < s.training_bytes()


@pytest.mark.parametrize("backend", ["numpy", "emu"])
@pytest.mark.parametrize("build,shape", [
    (lambda: models.lenet5(), (2, 1, 28, 28)),
    (lambda: models.lenet300(), (3, 1, 28, 28)),
    (lambda: models.mobilenet_v1(0.25, 32, num_classes=10), (2, 3, 32, 32)),
], ids=["lenet5", "lenet300", "mobilenet_0.25_32"])
def test_small_models_run_forward_and_backward(backend, build, shape, rng):
    with dp.use_backend(backend):
        m = build()
        x = rng.standard_normal(shape).astype(np.float32)
        y = m.forward(x)
        assert y.shape == (shape[0], 10)
        assert m.backward(np.ones_like(y)) is None
        assert all(g is not None and g.shape == p.shape for _, p, g in m.named_parameters())


def test_model_errors():
    with pytest.raises(ValueError, match="unknown model 'resnet'"):
        models.build("resnet")
    m = models.lenet5()
    with pytest.raises(ValueError, match=r"lenet5 expects input batches of shape \(N, 1, 28, 28\), got \(2, 3, 28, 28\)"):
        m.forward(np.zeros((2, 3, 28, 28), np.float32))
    with pytest.raises(TypeError, match="input batch must be float32, got uint8"):
        with dp.use_backend("emu"):
            m.forward(np.zeros((2, 1, 28, 28), np.uint8))
    with pytest.raises(KeyError, match="no layer 'conv9'"):
        m["conv9"]


def test_a_model_too_large_for_the_kernels_is_refused_before_allocating():
    from dnnpar.nn.models import build
    with dp.use_backend("numpy"):
        with pytest.raises(ValueError, match=r"the weight would have shape \(1000000000000, 100\) = .* 32 bits"):
            build("lenet300", num_classes=10**12)
        with pytest.raises(ValueError, match="= 4096000000000 elements"):
            build("vgg16", num_classes=10**9)
