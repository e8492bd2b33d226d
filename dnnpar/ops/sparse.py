"""Sparse x dense products with a :class:`dnnpar.sparse.CSR` matrix (``cuda/spmv.cu``).

On the numpy backend the products run in SciPy's compiled CSR routines: a gather-and-reduce in
NumPy is 3x (SpMV) to 20x (SpMM) slower on VGG's fc6 shape."""
from __future__ import annotations

import numpy as np

from ..backend import get_backend
from ..nvtx import ranged
from ..sparse import CSR
from ._common import check_array, i32

SPMV_ALGOS = ("vector", "scalar")


def spmv_numpy(csr: CSR, x):
    """The numpy backend: SciPy's CSR product (float32 in, float32 out)."""
    return csr.scipy() @ x


def spmm_numpy(csr: CSR, X):
    return csr.scipy() @ X


def _check_csr(op, csr, be):
    if not isinstance(csr, CSR):
        raise TypeError(f"{op}: expected a dnnpar.sparse.CSR, got {type(csr).__name__}")
    if csr.backend != be.name:
        raise TypeError(f"{op}: the CSR matrix lives on the '{csr.backend}' backend but '{be.name}' is active")


def threads_per_row(csr: CSR) -> int:
    """Lanes per row for csr_spmv_vector: the power of two nearest the mean row length, 2..32."""
    mean = csr.nnz / max(csr.shape[0], 1)
    tpr = 2
    while tpr < 32 and tpr < mean:
        tpr *= 2
    return tpr


@ranged("dnnpar.spmv")
def spmv(csr: CSR, x, algo: str = "vector"):
    """y = A x for A (M, K) in CSR and x (K,) float32 -> y (M,)."""
    be = get_backend()
    _check_csr("spmv", csr, be)
    if algo not in SPMV_ALGOS:
        raise ValueError(f"spmv: unknown algo {algo!r}: one of {', '.join(SPMV_ALGOS)}")
    check_array("spmv", "x", x, ndim=1, dtype=np.float32, backend=be)
    m, k = csr.shape
    if x.shape[0] != k:
        raise ValueError(f"spmv: the matrix is {m}x{k} but x has {x.shape[0]} entries")
    if not be.runs_kernels:
        return spmv_numpy(csr, x)
    y = be.empty(m)
    cb = csr.codebook is not None
    head = (i32(m), csr.indptr, csr.indices) + ((csr.data, csr.codebook, i32(csr.codebook.shape[0])) if cb else (csr.data,))
    if algo == "scalar":
        be.launch("spmv.cu", "csr_spmv_scalar" + "_cb" * cb, ((m + 255) // 256,), (256,), head + (x, y))
    else:
        tpr = threads_per_row(csr)
        be.launch("spmv.cu", "csr_spmv_vector" + "_cb" * cb, ((m * tpr + 255) // 256,), (256,),
                  head + (x, y, i32(tpr)))
    return y


@ranged("dnnpar.spmm")
def spmm(csr: CSR, X):
    """Y = A X for A (M, K) in CSR and X (K, B) float32 -> Y (M, B)."""
    be = get_backend()
    _check_csr("spmm", csr, be)
    check_array("spmm", "X", X, ndim=2, dtype=np.float32, backend=be)
    m, k = csr.shape
    if X.shape[0] != k:
        raise ValueError(f"spmm: the matrix is {m}x{k} but X has shape {tuple(X.shape)} (need {k} rows)")
    b = X.shape[1]
    if not be.runs_kernels:
        return spmm_numpy(csr, X)
    if (b + 31) // 32 > 65535:
        raise ValueError(f"spmm: X has {b} columns; at most {65535 * 32} are supported")
    Y = be.empty((m, b))
    cb = csr.codebook is not None
    args = (i32(m), i32(b), csr.indptr, csr.indices) + ((csr.data, csr.codebook, i32(csr.codebook.shape[0]))
                                                       if cb else (csr.data,)) + (X, Y)
    be.launch("spmv.cu", "csr_spmm" + "_cb" * cb, ((m + 7) // 8, (b + 31) // 32), (32, 8), args)
    return Y
