"""16-bit gradient encodings for communication (``--grad-compression fp16 | bf16``): a float32
vector as IEEE binary16 or bfloat16 bit patterns (uint16), and the sum of two such vectors
with the result rounded back to 16 bits -- what NCCL's half / bfloat16 sum computes, here as
the reduction of an MPI allreduce (:meth:`dnnpar.parallel.comm.MPICommunicator.start_allreduce_sum16`).

Error of a sum over N ranks (each value encoded, then N - 1 additions, each rounded to the
nearest 16-bit value): |sum~ - sum| <= gamma_N(u) * sum_r |g_r| + N * tiny / 2 per element, with
u the format's unit roundoff (fp16 2^-11, bf16 2^-8) plus 2^-23 for the float32 rounding of each
addition before its 16-bit one, gamma_N(u) = N u / (1 - N u), and tiny
the spacing of the format's subnormals (fp16 2^-24; bf16 keeps float32's range: 2^-149).
fp16 overflows past 65504: gradients are scaled by each rank's share of the batch before the
encoding (the buckets hold share-weighted sums), so the vector summed is the mean gradient.

The conversions and the rounded sum run natively (``dnnpar/cpu/half.cpp``: F16C / AVX-512 FP16
instructions under ``-march=native``) on 1-D float32 / uint16 vectors, with the same bits as the
NumPy code below, which stays the fallback: NumPy's float16 cast is software, slowest on the
subnormal results that scaled gradients give (2.7 ms per LeNet-300-100 step, 1.5x the step).
``NATIVE["use"] = False`` keeps NumPy.
"""
from __future__ import annotations

import numpy as np

from ..backend import cpu_native
from ..ops.gemm import round_bf16

#: the native kernels' switch (tests, benchmarks)
NATIVE = {"use": True}


def _native(*arrays):
    """The native half library when it takes these operands (1-D C-contiguous NumPy vectors of
    float32 / uint16; the switch on; the library built here), else None."""
    if not NATIVE["use"] or not all(isinstance(a, np.ndarray) and a.ndim == 1 and a.flags.c_contiguous
                                    and a.dtype in (np.float32, np.uint16) for a in arrays):
        return None
    return cpu_native.library("half")

#: kind -> (unit roundoff of an encoding or a rounded addition, subnormal spacing, largest finite value)
FORMATS = {"fp16": (2.0**-11 + 2.0**-23, 2.0**-24, 65504.0),
           "bf16": (2.0**-8 + 2.0**-23, 2.0**-149, float(np.finfo(np.float32).max))}


def encode(x: np.ndarray, kind: str, out: np.ndarray | None = None) -> np.ndarray:
    """float32 -> uint16 bit patterns of the nearest ``kind`` value (ties to even; NaN stays NaN)."""
    x = np.asarray(x, dtype=np.float32)
    out = np.empty(x.shape, np.uint16) if out is None else out
    if kind in FORMATS and out.shape == x.shape and _native(x, out) is not None:
        return cpu_native.half_encode(x, out, kind)
    if kind == "fp16":
        out.view(np.float16)[...] = x  # IEEE round to nearest even; past 65504 -> inf
    elif kind == "bf16":
        out[...] = (round_bf16(x).view(np.uint32) >> np.uint32(16)).astype(np.uint16)
    else:
        raise ValueError(f"unknown 16-bit format {kind!r}: one of {', '.join(FORMATS)}")
    return out


def decode(bits: np.ndarray, kind: str, out: np.ndarray | None = None) -> np.ndarray:
    """uint16 bit patterns of ``kind`` -> float32 (exact)."""
    out = np.empty(bits.shape, np.float32) if out is None else out
    if kind in FORMATS and out.shape == bits.shape and _native(bits, out) is not None:
        return cpu_native.half_decode(bits, out, kind)
    if kind == "fp16":
        out[...] = bits.view(np.float16)
    elif kind == "bf16":
        out.view(np.uint32)[...] = bits.astype(np.uint32) << np.uint32(16)
    else:
        raise ValueError(f"unknown 16-bit format {kind!r}: one of {', '.join(FORMATS)}")
    return out


def add_into(a: np.ndarray, b: np.ndarray, kind: str) -> None:
    """b = round16(decode(a) + decode(b)), in place on the uint16 vector b (an MPI reduction)."""
    if kind in FORMATS and a.shape == b.shape and _native(a, b) is not None:
        cpu_native.half_add_into(a, b, kind)
        return
    if kind == "fp16":  # added in float32 (one rounding), then rounded to fp16
        fb = b.view(np.float16)
        fb[...] = a.view(np.float16).astype(np.float32) + fb.astype(np.float32)
    else:
        encode(decode(a, kind) + decode(b, kind), kind, out=b)


def sum_bound(abs_sum: np.ndarray, ranks: int, kind: str) -> np.ndarray:
    """The module's error bound for a sum over ``ranks`` values whose magnitudes sum to ``abs_sum``."""
    u, tiny, _ = FORMATS[kind]
    nu = ranks * u
    return nu / (1 - nu) * abs_sum + ranks * tiny / 2
