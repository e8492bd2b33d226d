"""DLPack input: an object with __dlpack__ on the backend's device goes into model.forward and
check_array without a copy; another device or dtype is a TypeError naming it."""
import numpy as np
import pytest

import dnnpar as dp
from dnnpar.nn import models
from dnnpar.ops._common import check_array


class OnlyDLPack:
    """A NumPy array seen only through the DLPack protocol (as a torch CPU tensor would be)."""

    def __init__(self, a, device=(1, 0)):
        self.a, self.device = a, device

    def __dlpack__(self, *args, **kwargs):
        return self.a.__dlpack__(*args, **kwargs)

    def __dlpack_device__(self):
        return self.device


@pytest.mark.parametrize("backend", ["numpy", "emu"])
def test_check_array_zero_copy(rng, backend):
    with dp.use_backend(backend):
        a = rng.standard_normal((3, 4)).astype(np.float32)
        got = check_array("op", "x", OnlyDLPack(a), ndim=2)
        assert isinstance(got, np.ndarray) and np.shares_memory(got, a)


def test_forward_zero_copy(rng):
    m = models.lenet300().eval()
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    assert np.shares_memory(m.check_input(OnlyDLPack(x)), x)
    np.testing.assert_array_equal(m.forward(OnlyDLPack(x)), m.forward(x))


def test_wrong_device_and_dtype(rng):
    m = models.lenet300()
    x = rng.standard_normal((2, 1, 28, 28)).astype(np.float32)
    with pytest.raises(TypeError, match="CUDA device; the 'numpy' backend needs it on CPU"):
        m.forward(OnlyDLPack(x, device=(2, 0)))
    with pytest.raises(TypeError, match="must be float32, got float64|input batch must be float32, got float64"):
        m.forward(OnlyDLPack(x.astype(np.float64)))
    with pytest.raises(TypeError, match="float32"):
        check_array("op", "x", OnlyDLPack(x.astype(np.int32)))


def test_torch_tensor(rng):
    torch = pytest.importorskip("torch")
    m = models.lenet300().eval()
    t = torch.from_numpy(rng.standard_normal((2, 1, 28, 28)).astype(np.float32))
    assert np.shares_memory(m.check_input(t), t.numpy())
    np.testing.assert_array_equal(m.forward(t), m.forward(t.numpy()))
