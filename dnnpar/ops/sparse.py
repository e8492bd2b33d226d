"""Sparse x dense products with a :class:`dnnpar.sparse.CSR` matrix (``cuda/spmv.cu``).

On the numpy backend, a codebook matrix (uint8 codes) with float32 operands runs in the native
kernel ``dnnpar/cpu/csr_codebook.cpp`` (built at first use, see :mod:`dnnpar.backend.cpu_native`)
from its 2-byte-per-entry compact form (:meth:`CSR.compact`). Everything else — and codebook
matrices where no C++ compiler is available — runs in SciPy's compiled CSR routines when SciPy
is installed (the `cpu` extra; dnnpar's core needs NumPy only): NumPy's gather-and-reduce
fallback is 2x (SpMV) to 25x (SpMM) slower on VGG's fc6 shape."""
from __future__ import annotations

import numpy as np

from .. import sparse as _sparse
from ..backend import cpu_native, get_backend
from ..nvtx import ranged
from ..sparse import CSR
from ._common import INT32_MAX, check_array, check_count, i32

SPMV_ALGOS = ("vector", "scalar")


def _row_sums(prod, indptr, m: int):
    """Sum the per-nonzero rows of ``prod`` within each CSR row (empty rows stay 0)."""
    out = np.zeros((m,) + prod.shape[1:], dtype=prod.dtype)
    rows = np.flatnonzero(np.diff(indptr))
    if rows.size:
        out[rows] = np.add.reduceat(prod, indptr[rows], axis=0)
    return out


SPMM_CHUNK = 1 << 22  # products held at once by the NumPy fallback (16 MB of float32)


def native_form(csr: CSR, operand):
    """The compact form of ``csr`` when the numpy backend's native kernel takes this product
    (a codebook matrix, a float32 operand, the kernel built here, NATIVE["use"] on), else None."""
    if csr.codebook is None or operand.dtype != np.float32 or not _sparse.NATIVE["use"]:
        return None
    if cpu_native.library() is None:
        return None
    return csr.compact()


def spmv_numpy(csr: CSR, x):
    """The numpy backend: the native codebook kernel for codebook matrices (see
    :func:`native_form`), else SciPy's compiled CSR product when SciPy is installed, else a NumPy
    gather-and-reduce (same result, about 2x slower)."""
    compact = native_form(csr, x)
    if compact is not None:
        return cpu_native.spmv(compact, x, get_backend().empty(csr.shape[0]))
    sp = csr.scipy()
    if sp is not None:
        return sp @ x
    return _row_sums(csr.values() * x[csr.indices], csr.indptr, csr.shape[0])


def spmm_numpy(csr: CSR, X):
    compact = native_form(csr, X)
    if compact is not None:
        return cpu_native.spmm(compact, X, get_backend().empty((csr.shape[0], X.shape[1])))
    sp = csr.scipy()
    if sp is not None:
        return sp @ X
    m, b = csr.shape[0], X.shape[1]
    ptr, vals, ind = csr.indptr, csr.values(), csr.indices
    out = np.zeros((m, b), dtype=np.result_type(vals, X))
    start = 0
    while start < m:  # rows in chunks, so the gathered (nonzeros x batch) product stays small
        limit = ptr[start] + max(SPMM_CHUNK // max(b, 1), 1)
        stop = min(max(start + 1, int(np.searchsorted(ptr, limit, side="right")) - 1), m)
        lo, hi = ptr[start], ptr[stop]
        if hi > lo:
            out[start:stop] = _row_sums(vals[lo:hi, None] * X[ind[lo:hi]], ptr[start:stop + 1] - lo, stop - start)
        start = stop
    return out


def _check_csr(op, csr, be):
    if not isinstance(csr, CSR):
        raise TypeError(f"{op}: expected a dnnpar.sparse.CSR, got {type(csr).__name__}")
    if csr.backend != be.name:
        raise TypeError(f"{op}: the CSR matrix lives on the '{csr.backend}' backend but '{be.name}' is active")


def threads_per_row(csr: CSR) -> int:
    """Lanes per row for csr_spmv_vector: the power of two nearest the mean row length, 2..32,
    capped so that M * tpr, the kernel's 32-bit thread index, fits."""
    m = csr.shape[0]
    mean = csr.nnz / max(m, 1)
    tpr = 2
    while tpr < 32 and tpr < mean and m * tpr * 2 <= INT32_MAX:
        tpr *= 2
    return tpr


@ranged("dnnpar.spmv")
def spmv(csr: CSR, x, algo: str = "vector"):
    """y = A x for A (M, K) in CSR and x (K,) float32 -> y (M,) float32, on every backend (float64
    x and y only inside ``dp.precision("float64")`` on the numpy backend). x is never written."""
    be = get_backend()
    _check_csr("spmv", csr, be)
    if algo not in SPMV_ALGOS:
        raise ValueError(f"spmv: unknown algo {algo!r}: one of {', '.join(SPMV_ALGOS)}")
    x = check_array("spmv", "x", x, ndim=1, backend=be)
    m, k = csr.shape
    if x.shape[0] != k:
        raise ValueError(f"spmv: the matrix is {m}x{k} but x has {x.shape[0]} entries")
    if not be.runs_kernels:
        return spmv_numpy(csr, x)
    cb = csr.codebook is not None
    head = (i32(m), csr.indptr, csr.indices) + ((csr.data, csr.codebook, i32(csr.codebook.shape[0])) if cb else (csr.data,))
    if algo == "scalar":
        y = be.empty(m)
        be.launch("spmv.cu", "csr_spmv_scalar" + "_cb" * cb, ((m + 255) // 256,), (256,), head + (x, y))
    else:
        tpr = threads_per_row(csr)
        if m * tpr > INT32_MAX:
            raise ValueError(f"spmv: {m} rows x {tpr} lanes exceed the kernel's 32-bit thread index "
                             "(use algo='scalar')")
        y = be.empty(m)
        be.launch("spmv.cu", "csr_spmv_vector" + "_cb" * cb, ((m * tpr + 255) // 256,), (256,),
                  head + (x, y, i32(tpr)))
    return y


@ranged("dnnpar.spmm")
def spmm(csr: CSR, X):
    """Y = A X for A (M, K) in CSR and X (K, B) float32 -> Y (M, B) float32, on every backend (float64
    only inside ``dp.precision("float64")`` on the numpy backend). X is never written."""
    be = get_backend()
    _check_csr("spmm", csr, be)
    X = check_array("spmm", "X", X, ndim=2, backend=be)
    m, k = csr.shape
    if X.shape[0] != k:
        raise ValueError(f"spmm: the matrix is {m}x{k} but X has shape {tuple(X.shape)} (need {k} rows)")
    b = X.shape[1]
    check_count("spmm", "result (M, B)", (m, b))
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
