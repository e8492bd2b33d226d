"""The ``.dnnz`` container: the only module that knows how compressed models sit on disk.

Layout (little-endian throughout)::

    b"DNNZ"  u16 version (1)  u16 flags (0)  u32 header_len  header (UTF-8 JSON object)
    u32 section_count
    section_count x [ u16 name_len  name (UTF-8)  u8 dtype_code  u8 ndim  ndim x u64 dim
                      u64 payload_len  payload  u32 crc32(payload) ]
    32-byte SHA-256 of every byte before it

A section is a C-contiguous NumPy array of one of the dtypes in ``DTYPE_CODES``, or raw bytes
(stored as a 1-D uint8 payload with code 0). Readers trust nothing: every size from the file is
checked against the bytes that remain before anything is sliced, so a hostile length field
fails fast instead of allocating.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
import zlib

import numpy as np

from ..errors import DnnzError
from ..schema import loads_json

MAGIC = b"DNNZ"
VERSION = 1
MAX_HEADER_BYTES = 16 * 1024 * 1024
MAX_NAME_BYTES = 256
MAX_NDIM = 8
RAW = 0  # dtype code of raw-bytes sections
DTYPE_CODES = {
    np.dtype("<u1"): 1,
    np.dtype("<i1"): 2,
    np.dtype("<u2"): 3,
    np.dtype("<i4"): 4,
    np.dtype("<i8"): 5,
    np.dtype("<f4"): 6,
    np.dtype("<f8"): 7,
}
_CODE_DTYPES = {code: dt for dt, code in DTYPE_CODES.items()}
_PREAMBLE = struct.Struct("<4sHHI")  # magic, version, flags, header_len
_SHA_BYTES = 32


def _section_payload(name, value) -> tuple[int, tuple[int, ...], np.ndarray]:
    """(dtype code, shape, flat uint8 view) for one section value; TypeError if unsupported."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        raw = np.frombuffer(value, np.uint8)
        return RAW, (raw.size,), raw
    if not isinstance(value, np.ndarray):
        raise TypeError(f"section {name!r}: expected a numpy array or bytes, got {type(value).__name__}")
    if not value.flags.c_contiguous:
        raise TypeError(f"section {name!r}: array of shape {value.shape} is not C-contiguous")
    dt = value.dtype.newbyteorder("<")  # the file is little-endian whatever the host is
    if dt not in DTYPE_CODES:
        raise TypeError(f"section {name!r}: unsupported dtype {value.dtype} "
                        f"(supported: {', '.join(str(d) for d in DTYPE_CODES)}, or bytes)")
    if value.ndim > MAX_NDIM:
        raise ValueError(f"section {name!r}: ndim {value.ndim} exceeds {MAX_NDIM}")
    # astype is a no-op view for native little-endian data; it only copies big-endian input
    flat = np.ascontiguousarray(value.astype(dt, copy=False)).reshape(-1).view(np.uint8)
    return DTYPE_CODES[dt], value.shape, flat


def _encode_name(name) -> bytes:
    if not isinstance(name, str):
        raise TypeError(f"section names must be str, got {type(name).__name__}")
    raw = name.encode("utf-8")
    if not 0 < len(raw) <= MAX_NAME_BYTES:
        raise ValueError(f"section name {name!r} must be 1..{MAX_NAME_BYTES} UTF-8 bytes, got {len(raw)}")
    return raw


def write(path, header: dict, sections: dict) -> None:
    """Write ``header`` (a JSON-serialisable dict) and ``sections`` (name -> ndarray | bytes).

    Atomic: the bytes go to a temporary file in the destination folder, are fsynced and then
    renamed over ``path``; on any error the temporary file is removed and ``path`` is untouched.
    TypeError for non-contiguous arrays, unsupported dtypes or bad value types; ValueError for
    bad names, ndim > 8 or a header over 16 MiB. Section order is kept.
    """
    if not isinstance(header, dict):
        raise TypeError(f"header must be a dict, got {type(header).__name__}")
    header_bytes = json.dumps(header, ensure_ascii=False, allow_nan=False).encode("utf-8")
    if len(header_bytes) > MAX_HEADER_BYTES:
        raise ValueError(f"header is {len(header_bytes)} bytes of JSON, over the {MAX_HEADER_BYTES}-byte limit")
    if not isinstance(sections, dict):
        raise TypeError(f"sections must be a dict, got {type(sections).__name__}")
    # Validate everything before touching the disk, so most errors create nothing at all.
    prepared = [(_encode_name(name),) + _section_payload(name, value) for name, value in sections.items()]

    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix="." + os.path.basename(path) + ".", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            # mkstemp creates mode 0600; give the file the mode open() would have given it
            umask = os.umask(0)
            os.umask(umask)
            os.fchmod(f.fileno(), 0o666 & ~umask)
            sha = hashlib.sha256()

            def put(chunk):
                sha.update(chunk)
                f.write(chunk)

            put(_PREAMBLE.pack(MAGIC, VERSION, 0, len(header_bytes)))
            put(header_bytes)
            put(struct.pack("<I", len(prepared)))
            for name, code, shape, payload in prepared:
                put(struct.pack("<H", len(name)) + name + struct.pack("<BB", code, len(shape)))
                put(struct.pack(f"<{len(shape)}QQ", *shape, payload.size))
                put(payload)
                put(struct.pack("<I", zlib.crc32(payload)))
            f.write(sha.digest())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename itself durable; not every platform can open a directory
        dir_fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dir_fd)
    except OSError:
        pass
    finally:
        os.close(dir_fd)


def read(path) -> tuple[dict, dict]:
    """Read a .dnnz file: (header dict, {name: read-only ndarray | bytes}) in file order.

    Every problem with the file's content raises DnnzError naming the file (OSError still
    propagates for a file that cannot be opened).
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return _parse(data)
    except DnnzError as e:
        raise DnnzError(str(e), path, e.field) from None


def _parse(data: bytes) -> tuple[dict, dict]:
    if len(data) < len(MAGIC) or data[:4] != MAGIC:
        raise DnnzError("not a .dnnz file (bad magic)" if data else "not a .dnnz file (empty)")
    end = len(data) - _SHA_BYTES  # content ends where the trailing SHA-256 starts
    pos = 0
    where = "preamble"

    def take(n: int) -> memoryview:
        nonlocal pos
        if n > end - pos:  # covers negative `end` too: a file shorter than its checksum
            raise DnnzError(f"truncated in {where}: needs {n} more bytes, {max(end - pos, 0)} remain")
        chunk = view[pos:pos + n]
        pos += n
        return chunk

    view = memoryview(data)
    _, version, flags, header_len = _PREAMBLE.unpack(take(_PREAMBLE.size))
    if version != VERSION:
        raise DnnzError(f"unsupported format version {version} (this reader knows {VERSION})")
    if flags != 0:
        raise DnnzError(f"unknown flags 0x{flags:04x}")
    if header_len > MAX_HEADER_BYTES:
        raise DnnzError(f"header length {header_len} exceeds the {MAX_HEADER_BYTES}-byte limit")
    where = "header"
    header_raw = take(header_len)
    where = "section count"
    (count,) = struct.unpack("<I", take(4))

    sections = {}
    # A hostile count costs nothing: every section read is bounds-checked, so the loop ends at
    # the end of the file with "truncated in section #i".
    for index in range(count):
        where = f"section #{index}"
        (name_len,) = struct.unpack("<H", take(2))
        if not 0 < name_len <= MAX_NAME_BYTES:
            raise DnnzError(f"section #{index}: name length {name_len} not in 1..{MAX_NAME_BYTES}")
        try:
            name = str(take(name_len), "utf-8")
        except UnicodeDecodeError:
            raise DnnzError(f"section #{index}: name is not valid UTF-8") from None
        if name in sections:
            raise DnnzError(f"duplicate section {name!r}")
        where = f"section {name!r}"
        code, ndim = struct.unpack("<BB", take(2))
        if code != RAW and code not in _CODE_DTYPES:
            raise DnnzError(f"section {name!r}: unknown dtype code {code}")
        if ndim > MAX_NDIM:
            raise DnnzError(f"section {name!r}: ndim {ndim} exceeds {MAX_NDIM}")
        dims = struct.unpack(f"<{ndim}Q", take(8 * ndim))
        (payload_len,) = struct.unpack("<Q", take(8))
        itemsize = 1 if code == RAW else _CODE_DTYPES[code].itemsize
        if code == RAW and ndim != 1:
            raise DnnzError(f"section {name!r}: raw bytes must have ndim 1, got {ndim}")
        # Python ints: no overflow however large the dims. An empty array can still carry huge
        # non-zero dims that NumPy cannot represent, so bound their product as well.
        expected, nonzero = itemsize, itemsize
        for d in dims:
            expected *= d
            nonzero *= max(d, 1)
        if nonzero > 2**62:
            raise DnnzError(f"section {name!r}: shape {dims} is too large for an array")
        if expected != payload_len:
            raise DnnzError(f"section {name!r}: shape {dims} x {itemsize} bytes = {expected} "
                            f"!= payload length {payload_len}")
        payload = take(payload_len)  # bounds-checked before any slicing or allocation
        (crc,) = struct.unpack("<I", take(4))
        if zlib.crc32(payload) != crc:
            raise DnnzError(f"checksum mismatch in section {name!r} (CRC32)")
        if code == RAW:
            sections[name] = bytes(payload)
        else:
            arr = np.frombuffer(payload, _CODE_DTYPES[code]).reshape(dims)
            if not arr.flags.aligned:  # keep kernels off unaligned loads; copy once
                arr = arr.copy()
            arr.setflags(write=False)
            sections[name] = arr
    if pos != end:
        raise DnnzError(f"{end - pos} trailing bytes after the last section")
    if hashlib.sha256(view[:end]).digest() != data[end:]:
        raise DnnzError("checksum mismatch (SHA-256 of the file)")
    # Decode the JSON only once the checksum vouches for it; NaN, Infinity and 1e999 are refused
    header = loads_json(header_raw, DnnzError, field="header")
    if not isinstance(header, dict):
        raise DnnzError(f"header must be a JSON object, got {type(header).__name__}")
    return header, sections
