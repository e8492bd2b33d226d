"""Input checks and launch-shape helpers shared by every op: one validation layer per input kind.

* arrays: :func:`check_array` (type, compute dtype, rank, layout, element count) and
  :func:`check_writable` (an array an op writes into);
* convolution geometry: :func:`conv_out_size` per axis and :class:`ConvGeometry` for a whole
  layer (every size an int, in range, and every index the kernels compute within int32);
* element counts of the arrays an op allocates: :func:`check_count`.

Everything here runs before any allocation or kernel launch, so bad input becomes a
ValueError/TypeError that names the problem instead of a crash, an OverflowError, a MemoryError
or silent garbage on the device.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import compute_dtype, get_backend

INT32_MAX = 2**31 - 1
GRID_STRIDE_BLOCKS = 65535 * 8  # 1-D grid-stride kernels never need more blocks than this
MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y; the plane-wise kernels stride over the rest


def is_int(v) -> bool:
    """A Python or NumPy integer, and not a bool (True is an int to Python, never a size here)."""
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def as_int(v, name: str, op: str = "") -> int:
    """``v`` as a Python int; a TypeError naming ``name`` for floats, bools and everything else."""
    if not is_int(v):
        raise TypeError(f"{op + ': ' if op else ''}{name} must be an int, got {v!r} ({type(v).__name__})")
    return int(v)


def pair(v, name: str) -> tuple[int, int]:
    """An int or a 2-sequence of ints, as (h, w)."""
    if is_int(v):
        return int(v), int(v)
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(is_int(i) for i in v):
        return int(v[0]), int(v[1])
    raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")


#: DLPack device types (dlpack.h's DLDeviceType) each backend's arrays live on
_DLPACK_DEVICES = {"numpy": (1,), "emu": (1,), "cuda": (2, 13)}  # kDLCPU; kDLCUDA, kDLCUDAManaged
_DLPACK_NAMES = {1: "CPU", 2: "CUDA", 3: "CUDA host", 4: "OpenCL", 7: "Vulkan", 8: "Metal", 10: "ROCm",
                 13: "CUDA managed"}


def from_dlpack(where: str, name: str, a, be):
    """``a`` as the backend's array: itself when it is one; an object speaking DLPack
    (``__dlpack__``: a torch tensor, a CuPy / JAX array) on the backend's device viewed through
    ``xp.from_dlpack`` without a copy; anything else unchanged (the caller's type check names it).
    A DLPack object on another device is a TypeError naming both devices."""
    if isinstance(a, be.array_type) or not hasattr(a, "__dlpack__"):
        return a
    kind = f"{type(a).__module__}.{type(a).__name__}"
    try:
        dev = int(a.__dlpack_device__()[0])
    except Exception as e:  # no or a broken __dlpack_device__: not a usable DLPack producer
        raise TypeError(f"{where}: {name} ({kind}) has __dlpack__ but no usable __dlpack_device__ ({e})") from None
    if dev not in _DLPACK_DEVICES.get(be.name, (1,)):
        raise TypeError(f"{where}: {name} ({kind}) lives on a {_DLPACK_NAMES.get(dev, f'type-{dev}')} device; the "
                        f"'{be.name}' backend needs it on {_DLPACK_NAMES[_DLPACK_DEVICES.get(be.name, (1,))[0]]} "
                        "memory (move it there first)")
    try:
        return be.xp.from_dlpack(a)
    except (TypeError, ValueError, BufferError, RuntimeError) as e:  # e.g. a dtype NumPy has no type for
        raise TypeError(f"{where}: {name} ({kind}) cannot be viewed as a {be.name} array through DLPack: {e}") from None


def check_array(op: str, name: str, a, ndim: int | None = None, dtype="compute", backend=None):
    """``a`` must be the active backend's array, of ``dtype``, ``ndim`` dimensions, C-contiguous,
    with fewer than 2**31 elements. ``dtype="compute"`` (the default) means the compute dtype:
    float32, or float64 inside ``dp.precision("float64")`` (numpy backend only). An object with
    ``__dlpack__`` on the backend's device is accepted (see :func:`from_dlpack`); the returned
    array is the one to compute on."""
    be = backend or get_backend()
    a = from_dlpack(op, name, a, be)
    if not isinstance(a, be.array_type):
        kind = f"{type(a).__module__}.{type(a).__name__}"
        raise TypeError(f"{op}: {name} must be a {be.array_type.__module__}.{be.array_type.__name__} on the "
                        f"'{be.name}' backend, got {kind} (convert it with dp.asarray)")
    if dtype == "compute":
        want = compute_dtype(be)  # a ValueError under float64 on a kernel backend
        if a.dtype != want:
            hint = (" (float64 is computed only inside dp.precision('float64'), on the numpy backend)"
                    if want == np.float32 else " (inside dp.precision('float64') every float array is float64)")
            raise TypeError(f"{op}: {name} must be {want.name}, got {a.dtype}{hint}")
    elif dtype is not None and a.dtype != dtype:
        raise TypeError(f"{op}: {name} must be {np.dtype(dtype).name}, got {a.dtype}")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dimensions, got shape {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{op}: {name} must be C-contiguous (call xp.ascontiguousarray on it first); "
                         f"got strides {a.strides} for shape {tuple(a.shape)}")
    if a.size > INT32_MAX:
        raise ValueError(f"{op}: {name} has {a.size} elements; dnnpar kernels index arrays with 32 bits "
                         f"(at most {INT32_MAX})")
    return a


def check_writable(op: str, name: str, a):
    """``a`` is written by the op (an output or an in-out argument): a read-only NumPy array
    (``np.load(..., mmap_mode="r")``, ``a.flags.writeable = False``) is refused on every backend."""
    flags = getattr(a, "flags", None)
    if flags is not None and not getattr(flags, "writeable", True):
        raise ValueError(f"{op}: {name} is written in place but the array is read-only "
                         "(pass a writeable copy, e.g. np.array(a))")
    return a


def check_count(op: str, what: str, shape) -> tuple:
    """An array of ``shape`` that ``op`` is about to allocate fits the kernels' 32-bit indices."""
    count = 1
    for s in shape:
        count *= int(s)
    if count > INT32_MAX:
        raise ValueError(f"{op}: the {what} would have shape {tuple(int(s) for s in shape)} = {count} elements; "
                         f"dnnpar kernels index arrays with 32 bits (at most {INT32_MAX})")
    return tuple(shape)


# ---------------------------------------------------------------- convolution geometry
def conv_out_size(op: str, size, k, s, p, d, axis: str) -> int:
    """Output extent along one axis, after checking that every value is an int in range and that
    the kernels' int32 index arithmetic (padded extent ``size + 2p``, ``(out - 1) * s``,
    ``(k - 1) * d``, all bounded by it) cannot overflow."""
    vals = {"size": size, "kernel": k, "stride": s, "padding": p, "dilation": d}
    size, k, s, p, d = (as_int(v, f"{n} along {axis}", op) for n, v in vals.items())
    if size < 1 or k < 1 or s < 1 or p < 0 or d < 1:
        raise ValueError(f"{op}: need size >= 1, kernel >= 1, stride >= 1, padding >= 0, dilation >= 1 along "
                         f"{axis}; got size={size}, kernel={k}, stride={s}, padding={p}, dilation={d}")
    big = {n: v for n, v in zip(vals, (size, k, s, p, d)) if v > INT32_MAX}
    if big:
        raise ValueError(f"{op}: {', '.join(f'{n}={v}' for n, v in big.items())} along {axis} does not fit the "
                         f"kernels' 32-bit integers (at most {INT32_MAX})")
    if size + 2 * p > INT32_MAX:
        raise ValueError(f"{op}: the padded {axis} {size} + 2*{p} = {size + 2 * p} exceeds {INT32_MAX}, the "
                         "kernels' 32-bit index range")
    span = d * (k - 1) + 1
    if size + 2 * p < span:
        raise ValueError(f"{op}: the {axis} extent {size} + 2*padding {p} is smaller than the dilated kernel ({span})")
    return (size + 2 * p - span) // s + 1


def _axis_window(size: int, out: int, s: int, p: int, t: int):
    """Outputs o (a slice) whose input index o*s - p + t lies in [0, size), and those inputs
    (a strided slice); None when no output of this tap offset reads the image."""
    lo = max(0, -((t - p) // s))                  # ceil((p - t) / s)
    hi = min(out, (size - 1 + p - t) // s + 1)
    if hi <= lo:
        return None
    start = lo * s - p + t
    return slice(lo, hi), slice(start, start + (hi - lo - 1) * s + 1, s)


def _plain_ints(values) -> bool:
    """Every value an int (not a bool) or a tuple of them: hashable, and equal only to itself."""
    return all(type(v) is int or (type(v) is tuple and all(type(e) is int for e in v)) for v in values)


#: validated geometries by their make() arguments (plain ints only), at most 4096
_GEOMETRIES: dict = {}


@dataclass(frozen=True)
class ConvGeometry:
    """A validated convolution (or pooling) geometry: NCHW input, a KH x KW window."""
    n: int
    c: int
    h: int
    w: int
    kh: int
    kw: int
    oh: int
    ow: int
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]

    @classmethod
    def make(cls, op, x_shape, kh, kw, stride, padding, dilation) -> "ConvGeometry":
        """The one geometry check of every convolution-like op (forward and backward, every
        backend): ints only (bools refused: TypeError), in range, int32-safe (ValueError with
        the sizes), the input under 2**31 elements. A geometry that passed is remembered by its
        arguments when they are plain ints (a batch-1 ResNet forward spent ~20% of its time
        re-validating the same dozen geometries); anything else is checked afresh."""
        key = (op, x_shape, kh, kw, stride, padding, dilation)
        if _plain_ints(key[1:]):
            g = _GEOMETRIES.get(key)
            if g is None:
                if len(_GEOMETRIES) >= 4096:
                    _GEOMETRIES.clear()
                g = _GEOMETRIES[key] = cls._make(op, x_shape, kh, kw, stride, padding, dilation)
            return g
        return cls._make(op, x_shape, kh, kw, stride, padding, dilation)

    @classmethod
    def _make(cls, op, x_shape, kh, kw, stride, padding, dilation) -> "ConvGeometry":
        if not (isinstance(x_shape, (tuple, list)) and len(x_shape) == 4):
            raise ValueError(f"{op}: the input shape must be 4 sizes (N, C, H, W), got {x_shape!r}")
        n, c, h, w = (as_int(v, f"input shape {tuple(x_shape)!r}: each size", op) for v in x_shape)
        if min(n, c, h, w) < 1:
            raise ValueError(f"{op}: the input shape (N, C, H, W) must be positive sizes, got {(n, c, h, w)}")
        check_count(op, "input", (n, c, h, w))
        kh, kw = as_int(kh, "kh", op), as_int(kw, "kw", op)
        stride, padding, dilation = pair(stride, "stride"), pair(padding, "padding"), pair(dilation, "dilation")
        oh = conv_out_size(op, h, kh, stride[0], padding[0], dilation[0], "height")
        ow = conv_out_size(op, w, kw, stride[1], padding[1], dilation[1], "width")
        return cls(n, c, h, w, kh, kw, oh, ow, stride, padding, dilation)

    @property
    def cols_shape(self) -> tuple[int, int]:
        return self.c * self.kh * self.kw, self.n * self.oh * self.ow

    def check_cols(self, op: str) -> None:
        """The im2col matrix (C*KH*KW, N*OH*OW) fits 32-bit indices."""
        check_count(op, "im2col matrix (C*KH*KW, N*OH*OW)", self.cols_shape)

    def kernel_args(self):
        """The geometry tail shared by the im2col / col2im kernels."""
        return tuple(i32(v) for v in (self.n, self.c, self.h, self.w, self.kh, self.kw, self.oh, self.ow,
                                      *self.stride, *self.padding, *self.dilation))

    def tap_window(self, i: int, j: int):
        """For kernel tap (i, j): ((out rows, out cols), (in rows, in cols)) as slices, the outputs
        whose tap lands inside the image and the pixels they read; None when none does. The
        NumPy references work on these windows, so no padded copy of the input is ever made (a
        padding of 2**30 costs nothing)."""
        (sh, sw), (ph, pw), (dh, dw) = self.stride, self.padding, self.dilation
        rows = _axis_window(self.h, self.oh, sh, ph, i * dh)
        cols = _axis_window(self.w, self.ow, sw, pw, j * dw)
        if rows is None or cols is None:
            return None
        return (rows[0], cols[0]), (rows[1], cols[1])

    def taps(self):
        """(i, j, out window, in window) of every kernel tap that reads the image at all."""
        for i in range(self.kh):
            for j in range(self.kw):
                win = self.tap_window(i, j)
                if win is not None:
                    yield i, j, win[0], win[1]

    def tap_slices(self, i: int, j: int):
        """Slices of the padded input (see :meth:`pad`) that kernel tap (i, j) reads for all outputs."""
        (sh, sw), (dh, dw) = self.stride, self.dilation
        h0, w0 = i * dh, j * dw
        return (slice(None), slice(None), slice(h0, h0 + sh * (self.oh - 1) + 1, sh),
                slice(w0, w0 + sw * (self.ow - 1) + 1, sw))

    def pad(self, x):
        """x zero-padded (pooling layers, whose padding is at most half the window)."""
        ph, pw = self.padding
        return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw))) if ph or pw else x


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
    """A kernel's ``int`` argument; values are validated to fit before any launch."""
    return np.int32(v)


def check_same_dtype(op: str, **arrays) -> None:
    """All given (non-None) arrays share one dtype."""
    named = {k: v for k, v in arrays.items() if v is not None}
    if len({v.dtype for v in named.values()}) > 1:
        desc = ", ".join(f"{k} {v.dtype}" for k, v in named.items())
        raise TypeError(f"{op}: inputs must share one dtype, got {desc}")
