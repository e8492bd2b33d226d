"""Input checks and launch-shape helpers shared by every op.

Everything here runs before a kernel launch, so bad input becomes a ValueError/TypeError that
names the problem instead of a crash, a hang or silent garbage on the device.
"""
from __future__ import annotations

import numpy as np

from ..backend import get_backend

INT32_MAX = 2**31 - 1
GRID_STRIDE_BLOCKS = 65535 * 8  # 1-D grid-stride kernels never need more blocks than this
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y; the plane-wise kernels stride over the rest


def pair(v, name: str) -> tuple[int, int]:
    """An int or a 2-sequence of ints, as (h, w)."""
    if isinstance(v, (int, np.integer)) and not isinstance(v, bool):
        t = (int(v), int(v))
    elif isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, (int, np.integer)) for i in v):
        t = (int(v[0]), int(v[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    return t


#: dtype spec for float ops: float32 everywhere, and float64 too on the numpy backend (whose
#: references are dtype-generic: that is what float64 gradient checks run on)
FLOAT = "float"


def check_array(op: str, name: str, a, ndim: int | None = None, dtype=FLOAT, backend=None):
    """``a`` must be the active backend's array, of ``dtype``, ``ndim`` dimensions, C-contiguous."""
    be = backend or get_backend()
    if not isinstance(a, be.array_type):
        kind = f"{type(a).__module__}.{type(a).__name__}"
        raise TypeError(f"{op}: {name} must be a {be.array_type.__module__}.{be.array_type.__name__} on the "
                        f"'{be.name}' backend, got {kind} (convert it with dp.asarray)")
    if dtype == FLOAT:
        if a.dtype != np.float32 and (be.runs_kernels or a.dtype != np.float64):
            also = "" if be.runs_kernels else " (or float64 on the numpy backend)"
            raise TypeError(f"{op}: {name} must be float32{also}, got {a.dtype}")
    elif dtype is not None and a.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{op}: {name} must be C-contiguous (call xp.ascontiguousarray on it first); "
                         f"got strides {a.strides} for shape {tuple(a.shape)}")
    if a.size > INT32_MAX:
        raise ValueError(f"{op}: {name} has {a.size} elements; dnnpar kernels index dimensions with 32 bits")
    return a


def conv_out_size(op: str, size: int, k: int, s: int, p: int, d: int, axis: str) -> int:
    if k < 1 or s < 1 or p < 0 or d < 1:
        raise ValueError(f"{op}: need kernel >= 1, stride >= 1, padding >= 0, dilation >= 1 along {axis}; "
                         f"got kernel={k}, stride={s}, padding={p}, dilation={d}")
    span = d * (k - 1) + 1
    if size + 2 * p < span:
        raise ValueError(f"{op}: the {axis} extent {size} + 2*padding {p} is smaller than the dilated kernel ({span})")
    return (size + 2 * p - span) // s + 1


def grid_stride_blocks(total: int, threads: int = 256) -> int:
    """1-D grid for a grid-stride loop over `total` elements (cuda/conv_direct.cu)."""
    return max(1, min((total + threads - 1) // threads, GRID_STRIDE_BLOCKS))


def plane_grid(op: str, pixels: int, planes: int, threads: int = 256) -> tuple:
    """Grid for the plane-wise kernels (cuda/im2col.cu, depthwise.cu): x covers one
    plane's pixels with 32-bit indices, y strides over the planes (at most 65535 blocks)."""
    if pixels >= 2**31 or planes >= 2**31:
        raise ValueError(f"{op}: {planes} planes of {pixels} pixels; the kernels count both with 32 bits "
                         "(split the batch)")
    return (max(1, -(-pixels // threads)), max(1, min(planes, MAX_GRID_Y)))


def i32(v) -> np.int32:
    return np.int32(v)


def check_same_dtype(op: str, **arrays) -> None:
    """All given (non-None) arrays share one dtype."""
    named = {k: v for k, v in arrays.items() if v is not None}
    if len({v.dtype for v in named.values()}) > 1:
        desc = ", ".join(f"{k} {v.dtype}" for k, v in named.items())
        raise TypeError(f"{op}: inputs must share one dtype, got {desc}")
