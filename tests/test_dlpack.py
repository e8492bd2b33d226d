"""DLPack input: an object with __dlpack__ on the backend's device goes into model.forward, every
op and check_array without a copy; another device or dtype is a TypeError naming it. The
producer here is a NumPy array seen only through the protocol; torch tensors are tested in
test_torch_peer.py (marked peer)."""
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


# ---------------------------------------------------------------- every op, every array argument
def _op_cases(rng):
    """(name, call(**arrays), arrays): each op with its array arguments by keyword, small shapes."""
    f = lambda *s: rng.standard_normal(s).astype(np.float32)  # noqa: E731
    x, w, dw = f(2, 3, 6, 5), f(4, 3, 3, 3), f(3, 1, 3, 3)
    csr = dp.sparse.CSR.from_dense(np.where(rng.random((5, 7)) < 0.4, f(5, 7), 0).astype(np.float32))
    return [
        ("conv2d", lambda x, w, bias: dp.ops.conv2d(x, w, bias, padding=1), dict(x=x, w=w, bias=f(4))),
        ("conv2d_backward", lambda x, w, dy: dp.ops.conv2d_backward(x, w, dy, padding=1),
         dict(x=x, w=w, dy=f(2, 4, 6, 5))),
        ("conv2d_backward", lambda x, w, dy, cols: dp.ops.conv2d_backward(x, w, dy, cols=cols),
         dict(x=x, w=w, dy=f(2, 4, 4, 3), cols=dp.ops.im2col(x, 3, 3))),
        ("im2col", lambda x: dp.ops.im2col(x, 3, 3, padding=1), dict(x=x)),
        ("col2im", lambda cols: dp.ops.col2im(cols, (2, 3, 6, 5), 3, 3), dict(cols=f(27, 24))),
        ("depthwise_conv2d", lambda x, w, bias: dp.ops.depthwise_conv2d(x, w, bias, padding=1),
         dict(x=x, w=dw, bias=f(3))),
        ("depthwise_conv2d_backward", lambda x, w, dy: dp.ops.depthwise_conv2d_backward(x, w, dy, stride=2),
         dict(x=x, w=dw, dy=f(2, 3, 2, 2))),
        ("gemm", lambda a, b: dp.ops.gemm(a, b, trans_b=True), dict(a=f(4, 6), b=f(5, 6))),
        ("spmv", lambda x: dp.ops.spmv(csr, x), dict(x=f(7))),
        ("spmm", lambda X: dp.ops.spmm(csr, X), dict(X=f(7, 3))),
    ]


def _results(r):
    return [np.asarray(v) for v in (r if isinstance(r, tuple) else (r,)) if v is not None]


@pytest.mark.parametrize("backend", ["numpy", "emu"])
def test_every_op_takes_dlpack_arrays(rng, backend):
    """Each array argument of each op, seen only through DLPack, gives the numpy-array result
    (bitwise: the op computes on a view of the same memory)."""
    with dp.use_backend(backend):
        for name, call, arrays in _op_cases(rng):
            want = _results(call(**arrays))
            for arg in arrays:
                got = _results(call(**{**arrays, arg: OnlyDLPack(arrays[arg])}))
                assert len(got) == len(want), (name, arg)
                for g, w in zip(got, want):
                    np.testing.assert_array_equal(g, w, err_msg=f"{name}: {arg} through DLPack")
            got = _results(call(**{k: OnlyDLPack(v) for k, v in arrays.items()}))
            for g, w in zip(got, want):
                np.testing.assert_array_equal(g, w, err_msg=f"{name}: every array through DLPack")


def test_gemm_updates_a_dlpack_c_in_place(rng):
    """c with beta != 0 is written in place: through DLPack the caller's own memory is updated,
    which only holds if the op computed on a view, not on a copy."""
    a, b = rng.standard_normal((3, 4)).astype(np.float32), rng.standard_normal((4, 5)).astype(np.float32)
    c = rng.standard_normal((3, 5)).astype(np.float32)
    want = a.astype(np.float64) @ b + 0.5 * c
    out = dp.ops.gemm(OnlyDLPack(a), OnlyDLPack(b), c=OnlyDLPack(c), beta=0.5)
    assert np.shares_memory(out, c)
    np.testing.assert_allclose(c, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


class BrokenDevice(OnlyDLPack):
    def __dlpack_device__(self):
        raise RuntimeError("no device")


@pytest.mark.parametrize("backend", ["numpy", "emu"])
def test_every_op_names_a_bad_dlpack_argument(rng, backend):
    """Another device, a dtype other than float32, or a broken producer, at any array argument of
    any op: a TypeError naming the op and the argument, before anything runs."""
    with dp.use_backend(backend):
        for name, call, arrays in _op_cases(rng):
            for arg, a in arrays.items():
                bad = [(OnlyDLPack(a, device=(2, 0)), "lives on a CUDA device"),
                       (OnlyDLPack(a.astype(np.float64)), "must be float32, got float64"),
                       (BrokenDevice(a), "has __dlpack__ but no usable __dlpack_device__")]
                for obj, msg in bad:
                    with pytest.raises(TypeError, match=msg) as e:
                        call(**{**arrays, arg: obj})
                    assert f"{name}: {arg}" in str(e.value) or arg in str(e.value), (name, arg, str(e.value))
