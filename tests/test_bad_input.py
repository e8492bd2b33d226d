"""Bad input becomes a ValueError/TypeError naming the problem, before any kernel runs."""
import numpy as np
import pytest

import dnnpar as dp
from conftest import BACKENDS

f32 = np.float32


@pytest.fixture
def arrays(backend):
    def make(*shape, dtype=f32):
        return backend.asarray(np.ones(shape, dtype=dtype))
    return make


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_gemm_rejects(backend, arrays):
    a, b = arrays(4, 5), arrays(5, 3)
    with pytest.raises(TypeError, match="a must be float32.*, got float16"):
        dp.ops.gemm(arrays(4, 5, dtype=np.float16), b)
    if backend.runs_kernels:
        with pytest.raises(TypeError, match="a must be float32, got float64"):
            dp.ops.gemm(arrays(4, 5, dtype=np.float64), b)
    else:
        with pytest.raises(TypeError, match="inputs must share one dtype, got a float64, b float32"):
            dp.ops.gemm(arrays(4, 5, dtype=np.float64), b)
    with pytest.raises(ValueError, match="a must have 2 dimensions, got shape \\(4, 5, 1\\)"):
        dp.ops.gemm(arrays(4, 5, 1), b)
    with pytest.raises(ValueError, match="inner dimensions 5 and 4 differ"):
        dp.ops.gemm(a, arrays(4, 3))
    with pytest.raises(ValueError, match="C-contiguous"):
        dp.ops.gemm(arrays(5, 4).T, b)
    with pytest.raises(ValueError, match="beta != 0 needs c"):
        dp.ops.gemm(a, b, beta=1.0)
    with pytest.raises(ValueError, match="c must have shape \\(4, 3\\)"):
        dp.ops.gemm(a, b, beta=1.0, c=arrays(3, 4))
    with pytest.raises(ValueError, match="unknown algo 'fast'"):
        dp.ops.gemm(a, b, algo="fast")
    with pytest.raises(ValueError, match="empty operand"):
        dp.ops.gemm(arrays(0, 5), b)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_conv_rejects(backend, arrays):
    x, w = arrays(2, 3, 8, 8), arrays(4, 3, 3, 3)
    with pytest.raises(ValueError, match="x has 3 channels but w expects 2"):
        dp.ops.conv2d(x, arrays(4, 2, 3, 3))
    with pytest.raises(ValueError, match="x must have 4 dimensions"):
        dp.ops.conv2d(arrays(3, 8, 8), w)
    with pytest.raises(TypeError, match="w must be float32.*, got int32"):
        dp.ops.conv2d(x, arrays(4, 3, 3, 3, dtype=np.int32))
    with pytest.raises(ValueError, match="smaller than the dilated kernel"):
        dp.ops.conv2d(arrays(1, 3, 2, 2), w)
    with pytest.raises(ValueError, match="stride >= 1"):
        dp.ops.conv2d(x, w, stride=0)
    with pytest.raises(TypeError, match="padding must be an int or a pair"):
        dp.ops.conv2d(x, w, padding=(1, 2, 3))
    with pytest.raises(ValueError, match="bias must have shape \\(4,\\)"):
        dp.ops.conv2d(x, w, bias=arrays(3))
    with pytest.raises(ValueError, match="unknown algo"):
        dp.ops.conv2d(x, w, algo="winograd")
    with pytest.raises(ValueError, match="C-contiguous"):
        dp.ops.conv2d(arrays(2, 3, 8, 16)[:, :, :, ::2], w)
    with pytest.raises(ValueError, match=r"w must have shape \(3, 1, KH, KW\)"):
        dp.ops.depthwise_conv2d(x, arrays(3, 2, 3, 3))
    with pytest.raises(ValueError, match="cols must have shape \\(27, 128\\)"):
        dp.ops.col2im(arrays(27, 71), (2, 3, 8, 8), 3, 3, padding=1)


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_wrong_backend_array_is_refused(backend):
    other = np.ones((4, 4), f32) if backend.name == "cuda" else [[1.0]]
    with pytest.raises(TypeError, match=f"on the '{backend.name}' backend"):
        dp.ops.gemm(other, backend.asarray(np.ones((4, 4), f32)))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_csr_validation(backend):
    data, ind, ptr = np.ones(3, f32), np.array([0, 2, 1], np.int32), np.array([0, 2, 3], np.int32)
    dp.sparse.CSR(data, ind, ptr, (2, 3))  # valid
    with pytest.raises(ValueError, match="indptr is not monotone"):
        dp.sparse.CSR(data, ind, np.array([0, 3, 2, 3]), (3, 3))
    with pytest.raises(ValueError, match="indices\\[1\\] = 7 is outside \\[0, 3\\)"):
        dp.sparse.CSR(data, np.array([0, 7, 1]), ptr, (2, 3))
    with pytest.raises(ValueError, match="must start at 0 and end at nnz = 3"):
        dp.sparse.CSR(data, ind, np.array([0, 2, 4]), (2, 3))
    with pytest.raises(ValueError, match="M \\+ 1 = 4 entries"):
        dp.sparse.CSR(data, ind, ptr, (3, 3))
    with pytest.raises(TypeError, match="data must be float32"):
        dp.sparse.CSR(data.astype(np.float64), ind, ptr, (2, 3))
    with pytest.raises(TypeError, match="indices must be an integer array"):
        dp.sparse.CSR(data, ind.astype(f32), ptr, (2, 3))
    with pytest.raises(TypeError, match="codebook must be a 1-D float32 array of 1..256"):
        dp.sparse.CSR(np.zeros(3, np.uint8), ind, ptr, (2, 3), codebook=np.zeros(300, f32))
    with pytest.raises(ValueError, match="code 9 is outside the codebook of 4"):
        dp.sparse.CSR(np.array([0, 9, 1], np.uint8), ind, ptr, (2, 3), codebook=np.zeros(4, f32))
    csr = dp.sparse.CSR(data, ind, ptr, (2, 3))
    with pytest.raises(ValueError, match="the matrix is 2x3 but x has 4 entries"):
        dp.ops.spmv(csr, backend.asarray(np.ones(4, f32)))
    with pytest.raises(ValueError, match="X has shape \\(2, 5\\) \\(need 3 rows\\)"):
        dp.ops.spmm(csr, backend.asarray(np.ones((2, 5), f32)))
    with pytest.raises(TypeError, match="expected a dnnpar.sparse.CSR"):
        dp.ops.spmv("csr", backend.asarray(np.ones(3, f32)))


def test_csr_from_another_backend_is_refused():
    with dp.use_backend("numpy"):
        csr = dp.sparse.CSR.from_dense(np.eye(3, dtype=f32))
    with dp.use_backend("emu"):
        with pytest.raises(TypeError, match="lives on the 'numpy' backend but 'emu' is active"):
            dp.ops.spmv(csr, np.ones(3, f32))
