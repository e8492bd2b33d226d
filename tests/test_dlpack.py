"""DLPack input: an object with __dlpack__ on the backend's device goes into model.forward, every
op and check_array without a copy; another device or dtype is a TypeError naming it. The
producer here is a NumPy array seen only through the protocol; torch tensors are tested in
test_torch_peer.py (marked peer)."""
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

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


class RefusingProducer(OnlyDLPack):
    """A producer whose __dlpack__ refuses, as torch does for a tensor that requires grad."""

    def __dlpack__(self, *args, **kwargs):
        raise BufferError("cannot export this one")


_DEVICES = [1, 1, 1, 2, 3, 4, 7, 8, 10, 13, 99]
_DTYPES = [np.float32, np.float32, np.float64, np.float16, np.int32, np.int64, np.uint8, np.bool_, np.complex64]


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=st.integers(0, 9), arg=st.integers(0, 3), device=st.sampled_from(_DEVICES),
       dtype=st.sampled_from(_DTYPES), strided=st.booleans(), refuses=st.booleans(), seed=st.integers(0, 2**16))
def test_fuzz_dlpack_arguments(case, arg, device, dtype, strided, refuses, seed):
    """Any op, any array argument replaced by a DLPack producer of a drawn device, dtype and
    layout: the numpy-array result when it is a CPU float32 C-contiguous view, else one TypeError
    / ValueError naming the op, before anything runs."""
    rng = np.random.default_rng(seed)
    name, call, arrays = _op_cases(rng)[case]
    key = list(arrays)[arg % len(arrays)]
    a = arrays[key]
    src = a.astype(dtype)
    if strided:  # the same values as a non-contiguous view: DLPack hands over the strides
        wide = np.zeros(a.shape[:-1] + (2 * a.shape[-1],), dtype)
        wide[..., ::2] = src
        src = wide[..., ::2]
    producer = (RefusingProducer if refuses else OnlyDLPack)(src, device=(device, 0))
    ok = device == 1 and dtype == np.float32 and not strided and not refuses
    if ok:
        want, got = _results(call(**arrays)), _results(call(**{**arrays, key: producer}))
        for g, w in zip(got, want):
            np.testing.assert_array_equal(g, w)
        return
    with pytest.raises((TypeError, ValueError)) as e:
        call(**{**arrays, key: producer})
    assert str(e.value).startswith(name) and key in str(e.value), str(e.value)
