"""gemm: C = alpha * op(A) @ op(B) + beta * C in float32 on every backend (kernels in
``cuda/gemm.cu``; float64 only inside ``dp.precision("float64")`` on the numpy backend)."""
from __future__ import annotations

import numpy as np

from ..backend import cpu_native, get_backend
from ..nvtx import ranged
from ._common import check_array, check_count, check_same_dtype, check_writable, i32

#: kernel variants, slowest first (see the ladder in cuda/gemm.cu); value: block tile (rows, cols)
ALGOS = {"naive": (16, 16), "tiled": (32, 32), "regblock": (128, 128), "regblock_db": (128, 128), "tf32": (64, 64),
         "bf16": (64, 64)}
DEFAULT_ALGO = "regblock_db"
#: threads per block of the one-dimensional launches (the 2-D ones use the block tile)
_THREADS = {"regblock": 256, "regblock_db": 256, "tf32": 128, "bf16": 128}


def round_tf32(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest TF32 value (10 mantissa bits, ties away from zero), as float32:
    what ``cvt.rna.tf32.f32`` gives on the GPU and the emu backend. NaN stays NaN; a value past
    the largest TF32 (about 3.4e38) becomes inf, as there."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = ((bits + np.uint32(0x1000)) & np.uint32(0xFFFFE000)).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), r)


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> the nearest BF16 value (7 mantissa bits, ties to even), as float32: what
    ``cvt.rn.bf16x2.f32`` gives on the GPU and the emu backend. NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    lsb = (bits >> np.uint32(16)) & np.uint32(1)
    r = ((bits + np.uint32(0x7FFF) + lsb) & np.uint32(0xFFFF0000)).view(np.float32)
    return np.where(np.isnan(x), np.float32(np.nan), r)


#: a layer's ``precision`` -> the gemm algo its products run with (None: the default FP32 kernel)
PRECISIONS = {"fp32": None, "tf32": "tf32", "bf16": "bf16"}


def precision_algo(op: str, precision) -> str:
    """The :func:`gemm` algo of a layer ``precision`` ("fp32" | "tf32" | "bf16"); ValueError otherwise.
    Error bounds: FP32 the float32 summation bound; TF32 / BF16 each operand rounded with unit
    roundoff 2^-11 / 2^-8, products accumulated in float32 (``tests/oracles.py``
    tensor_core_gemm_bound)."""
    if precision not in PRECISIONS:
        raise ValueError(f"{op}: precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    return PRECISIONS[precision] or DEFAULT_ALGO


#: tensor-core algos: how each rounds both operands (on every backend, the numpy one before BLAS)
#: and that rounding's unit roundoff u (error bound: tests/oracles.py tensor_core_gemm_bound)
TENSOR_CORE_ALGOS = {"tf32": (round_tf32, 2.0**-11), "bf16": (round_bf16, 2.0**-8)}


#: ``NATIVE["use"] = False`` keeps the numpy backend's float32 products on NumPy's matmul (and
#: OpenBLAS's own threads) instead of dnnpar's pool (dnnpar/cpu/blas.cpp)
NATIVE = {"use": True}
#: below this many multiply-adds a product stays on NumPy: one thread either way (OpenBLAS's own
#: threading threshold), and NumPy's call costs less
POOL_MIN_WORK = 1 << 18


def gemm_numpy(a, b, trans_a=False, trans_b=False, alpha=1.0, beta=0.0, c=None, out=None):
    """``alpha op(a) op(b) + beta c`` through BLAS; dtype follows the inputs (float64 gives an
    oracle). ``out``: a C-contiguous array the result is written into and returned (it may be
    ``c`` itself: C updated in place; it must not overlap a or b). The numpy backend's one entry
    to BLAS: large float32 products run on dnnpar's thread pool
    (:func:`dnnpar.backend.cpu_native.sgemm`), each thread's block by OpenBLAS single-threaded, so
    GEMMs and native kernels share one pool and OpenBLAS's own threads stay asleep."""
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    n = b.shape[0] if trans_b else b.shape[1]
    if (NATIVE["use"] and a.dtype == np.float32 and b.dtype == np.float32 and m * n * k >= POOL_MIN_WORK
            and (beta == 0.0 or c.dtype == np.float32)
            and (out is None or (out.dtype == np.float32 and out.flags.c_contiguous))
            and cpu_native.blas_library() is not None):
        dst = np.empty((m, n), np.float32) if out is None else out
        if beta != 0.0 and dst is not c:
            dst[...] = c  # (c itself is left as it was: a declined call below still reads it)
        if cpu_native.sgemm(a, b, dst, trans_a, trans_b, alpha, beta) is not None:
            return dst
    if out is not None and alpha == 1.0 and beta == 0.0:
        return np.matmul(a.T if trans_a else a, b.T if trans_b else b, out=out)
    r = np.matmul(a.T if trans_a else a, b.T if trans_b else b)
    if alpha != 1.0:
        r *= r.dtype.type(alpha)
    if beta != 0.0:
        r += r.dtype.type(beta) * c
    if out is not None:
        out[...] = r
        return out
    return r


def _launch_shape(algo: str, m: int, n: int):
    tm, tn = ALGOS[algo]
    grid = ((n + tn - 1) // tn, (m + tm - 1) // tm)
    if grid[1] > 65535:
        raise ValueError(f"gemm: M={m} needs {grid[1]} block rows; CUDA allows 65535 (use a larger tile)")
    block = (_THREADS[algo],) if algo in _THREADS else (tn, tm)
    return grid, block


@ranged("dnnpar.gemm")
def gemm(a, b, trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0, beta: float = 0.0, c=None,
         algo: str = DEFAULT_ALGO, out=None):
    """Matrix product of float32 matrices (on every backend; float64 only inside
    ``dp.precision("float64")`` on the numpy backend).

    a: (M, K), or (K, M) with ``trans_a``; b: (K, N), or (N, K) with ``trans_b``.
    Returns C (M, N) = alpha * op(a) @ op(b) + beta * c. With ``beta != 0`` pass ``c`` (M, N): it is
    updated in place and returned, so it must be writeable (a read-only array is a ValueError on
    every backend) and must not overlap a or b. With ``beta == 0``, ``out`` (optional): a writeable
    C-contiguous (M, N) array of the operands' dtype, not overlapping a or b, that receives C and is
    returned (no new array). a and b are never written (read-only arrays,
    ``np.load(..., mmap_mode="r")`` among them, are fine). ``algo`` picks the kernel ("naive" |
    "tiled" | "regblock" | "regblock_db", the default | "tf32" | "bf16"); the numpy backend always uses BLAS.

    ``algo="tf32"`` and ``algo="bf16"`` (float32 operands only) multiply on tensor cores (mma.sync,
    sm_80 or newer on the cuda backend) with both operands rounded to TF32 (:func:`round_tf32`) or
    BF16 (:func:`round_bf16`) and float32 accumulation; the numpy backend rounds the operands the
    same way before BLAS, so every backend has one error model: per element,
    |C - exact| <= ((2u + u^2) + gamma_{K+2}(2^-23) (1+u)^2) (|op(a)| @ |op(b)|) with u = 2^-11 (tf32)
    or 2^-8 (bf16) (tests/oracles.py ``tensor_core_gemm_bound``; the accumulation unit is taken as
    2^-23 because tensor cores need not round their additions to nearest).
    """
    be = get_backend()
    if algo not in ALGOS:
        raise ValueError(f"gemm: unknown algo {algo!r}: one of {', '.join(ALGOS)}")
    for name, v in (("alpha", alpha), ("beta", beta)):
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise TypeError(f"gemm: {name} must be a real number, got {v!r}")
        if not np.isfinite(v) or abs(float(v)) > float(np.finfo(np.float32).max):
            raise ValueError(f"gemm: {name} must be a finite float32 value, got {v!r}")
    a = check_array("gemm", "a", a, ndim=2, backend=be)
    b = check_array("gemm", "b", b, ndim=2, backend=be)
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    kb, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != kb:
        raise ValueError(f"gemm: op(a) is {m}x{k} but op(b) is {kb}x{n}: inner dimensions {k} and {kb} differ")
    if min(m, n, k) < 1:
        raise ValueError(f"gemm: empty operand (M={m}, N={n}, K={k})")

    def written(name: str, arr, role: str = ""):
        """c or out: checked, of C's shape, writeable, sharing no memory with a or b."""
        arr = check_array("gemm", name, arr, ndim=2, backend=be)
        if tuple(arr.shape) != (m, n):
            raise ValueError(f"gemm: {name} must have shape {(m, n)}, got {tuple(arr.shape)}")
        check_writable("gemm", f"{name}{role}", arr)
        for operand, v in (("a", a), ("b", b)):
            if be.xp.may_share_memory(arr, v):
                raise ValueError(f"gemm: {name}{' is updated in place and' if role else ''} must not overlap {operand}")
        return arr

    if beta != 0.0:
        if c is None:
            raise ValueError("gemm: beta != 0 needs c, the (M, N) matrix to accumulate into")
        if out is not None:
            raise ValueError("gemm: out is for beta = 0 (with beta != 0 the result is written into c)")
        c = written("c", c, " (updated in place with beta != 0)")
    else:
        check_count("gemm", "result (M, N)", (m, n))
        if out is not None:
            out = written("out", out)
    check_same_dtype("gemm", a=a, b=b, c=c if beta != 0.0 else None, out=out)
    if algo in TENSOR_CORE_ALGOS:
        if a.dtype != np.float32:
            raise TypeError(f"gemm: algo={algo!r} takes float32 operands, got {a.dtype}")
        _check_tensor_cores(be, algo)
    if not be.runs_kernels:
        if algo in TENSOR_CORE_ALGOS:
            rounding = TENSOR_CORE_ALGOS[algo][0]
            a, b = rounding(a), rounding(b)
        r = gemm_numpy(a, b, trans_a, trans_b, alpha, beta, c, out=out).astype(a.dtype, copy=False)
        if c is not None and beta != 0.0:
            c[...] = r
            return c
        return r
    grid, block = _launch_shape(algo, m, n)
    out = c if (c is not None and beta != 0.0) else (out if out is not None else be.empty((m, n)))
    be.launch("gemm.cu", f"sgemm_{algo}", grid, block,
              (i32(m), i32(n), i32(k), np.float32(alpha), a, i32(a.shape[1]), i32(trans_a), b, i32(b.shape[1]),
               i32(trans_b), np.float32(beta), out, i32(n)))
    return out


def _check_tensor_cores(be, algo: str) -> None:
    """The cuda backend's device must have TF32 / BF16 tensor cores (compute capability 8.0 or
    newer): on older ones the kernel is compiled to a trap."""
    if be.name != "cuda":
        return
    cc = int(be.cupy.cuda.Device().compute_capability)
    if cc < 80:
        raise ValueError(f"gemm: algo={algo!r} needs tensor cores (compute capability 8.0 or newer); "
                         f"this device is {cc // 10}.{cc % 10}")
