"""The IDX format of (Fashion-)MNIST: a big-endian header, then raw bytes. Read with full
validation: a wrong magic number, dimension count or file size is a ValueError naming the file."""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

_TYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"), 0x0D: np.dtype(">f4"),
          0x0E: np.dtype(">f8")}


def read_idx(path, expect_ndim: int | None = None) -> np.ndarray:
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"{path}: cannot decompress ({e}); the file is corrupt or truncated") from e
    if len(raw) < 4:
        raise ValueError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or dtype_code not in _TYPES or ndim == 0:
        raise ValueError(f"{path}: bad IDX magic number 0x{raw[:4].hex()} (expected 0x0000080{expect_ndim or 'N'})")
    if expect_ndim is not None and ndim != expect_ndim:
        raise ValueError(f"{path}: IDX file has {ndim} dimensions, expected {expect_ndim}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_TYPES[dtype_code])
    want = header + int(np.prod(dims)) * dtype.itemsize
    if len(raw) != want:
        raise ValueError(f"{path}: IDX header announces {dims} ({want} bytes) but the file holds {len(raw)} bytes")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)


def write_idx(path, a: np.ndarray) -> None:
    """Write a uint8 array as a (gzipped, when the name ends in .gz) IDX file, reproducibly."""
    a = np.ascontiguousarray(a, dtype=np.uint8)
    payload = struct.pack(">HBB", 0, 0x08, a.ndim) + struct.pack(f">{a.ndim}I", *a.shape) + a.tobytes()
    path = Path(path)
    if path.suffix == ".gz":
        payload = gzip.compress(payload, compresslevel=9, mtime=0)
    path.write_bytes(payload)
