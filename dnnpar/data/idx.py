"""The IDX format of (Fashion-)MNIST: a big-endian header, then raw bytes.

Header: two zero bytes, a data type byte, a dimension count ``ndim``, then ``ndim`` big-endian
u32 dimensions. Only type 0x08 (unsigned byte) is supported: it is what Fashion-MNIST's images
and labels use and what :func:`write_idx` writes; the other IDX types (int8, int16, int32,
float32, float64) are refused rather than silently turned into labels or pixels.

Reading is streamed: the header comes first (decompressed from the gzip stream when the name
ends in ``.gz``), the exact payload size follows from it in Python integers (no wrap-around),
and exactly that many bytes are decompressed, never more than ``MAX_IDX_BYTES``; a stream that
holds more or fewer bytes than its header says is refused. A small gzip that inflates to
gigabytes therefore costs nothing. Every problem is an :class:`~dnnpar.errors.IDXError`.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from ..errors import IDXError

UBYTE = 0x08
#: IDX data types by code; only UBYTE can be read
TYPE_NAMES = {0x08: "uint8", 0x09: "int8", 0x0B: "int16", 0x0C: "int32", 0x0D: "float32", 0x0E: "float64"}
#: largest payload read_idx decompresses (Fashion-MNIST's training images are 47 MB)
MAX_IDX_BYTES = 1 << 30


def _read_exact(f, n: int, path, what: str) -> bytes:
    buf = f.read(n)
    if len(buf) != n:
        raise IDXError(f"truncated in the {what}: {len(buf)} of {n} bytes", path, what)
    return buf


def read_idx(path, expect_ndim: int | None = None) -> np.ndarray:
    """The uint8 array of an IDX file (gzipped when the name ends in ``.gz``); IDXError naming
    the file and what is wrong (magic, type, dimensions, size, corrupt compression)."""
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            return _read_stream(f, path, expect_ndim)
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise IDXError(f"cannot decompress ({e}); the file is corrupt or truncated", path) from e


def _read_stream(f, path, expect_ndim):
    magic = f.read(4)
    if len(magic) < 4:
        raise IDXError(f"{len(magic)} bytes is too short for an IDX header", path, "magic")
    zero, code, ndim = struct.unpack(">HBB", magic)
    if zero != 0 or code not in TYPE_NAMES or ndim == 0:
        raise IDXError(f"bad IDX magic number 0x{magic.hex()} (expected 0x000008{f'{expect_ndim:02x}' if expect_ndim else 'NN'})", path, "magic")
    if code != UBYTE:
        raise IDXError(f"data type 0x{code:02x} ({TYPE_NAMES[code]}) is not supported: only 0x08 (uint8), as in "
                       "Fashion-MNIST", path, "dtype")
    if expect_ndim is not None and ndim != expect_ndim:
        raise IDXError(f"IDX file has {ndim} dimensions, expected {expect_ndim}", path, "ndim")
    dims = struct.unpack(f">{ndim}I", _read_exact(f, 4 * ndim, path, "dimensions"))
    size, nonzero = 1, 1
    for d in dims:  # Python ints: the products cannot wrap
        size *= d
        nonzero *= max(d, 1)
    header = 4 + 4 * ndim
    if nonzero > 2**62:  # even an empty array cannot carry dims NumPy's index type cannot hold
        raise IDXError(f"dimensions {dims} are too large for an array", path, "dimensions")
    if size > MAX_IDX_BYTES:
        raise IDXError(f"header announces {dims} ({size} bytes), over the {MAX_IDX_BYTES}-byte limit", path,
                       "dimensions")
    data = f.read(size)
    if len(data) != size or f.read(1):
        holds = f"{header + len(data)} bytes" if len(data) != size else f"more than {header + size} bytes"
        raise IDXError(f"IDX header announces {dims} ({header + size} bytes) but the file holds {holds}", path, "size")
    return np.frombuffer(data, np.uint8).reshape(dims)


def write_idx(path, a: np.ndarray) -> None:
    """Write a uint8 array as a (gzipped, when the name ends in .gz) IDX file, reproducibly.
    ValueError for values outside 0..255 or arrays :func:`read_idx` could not read back."""
    a = np.asarray(a)
    if a.dtype != np.uint8:
        if a.dtype.kind not in "iub" or (a.size and (int(a.min()) < 0 or int(a.max()) > 255)):
            raise ValueError(f"write_idx stores uint8: got {a.dtype} values"
                             + (f" in [{a.min()}, {a.max()}]" if a.size and a.dtype.kind in "iuf" else ""))
    ndim = a.ndim
    a = np.ascontiguousarray(a, dtype=np.uint8)  # (a 0-d array comes back 1-d: ndim is checked first)
    if not 1 <= ndim <= 255 or max(a.shape) >= 2**32 or a.size > MAX_IDX_BYTES:
        raise ValueError(f"an IDX file holds 1..255 dimensions below 2**32 and at most {MAX_IDX_BYTES} bytes, "
                         f"got shape {a.shape}")
    payload = struct.pack(">HBB", 0, UBYTE, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        payload = gzip.compress(payload, compresslevel=9, mtime=0)
    path.write_bytes(payload)
