import hashlib
import os
import struct
import time
import tracemalloc
import zlib

import numpy as np
import pytest

from dnnpar.compress import container
from dnnpar.compress.container import DnnzError
from dnnpar.compress.huffman import HuffmanTable


def sample(rng):
    codes = ((rng.geometric(0.1, 5000) - 1) % 16).astype(np.uint8)
    table = HuffmanTable.from_symbols(codes, 16)
    stream, nbits = table.encode(codes)
    header = {
        "format": "deep-compression",
        "model": {"name": "LeNet-300-100", "layers": [{"name": "fc1", "shape": [300, 784], "bits": 4}]},
        "nbits": {"fc1.codes": nbits},
        "note": "ünïcödé ✓",
    }
    sections = {
        "fc1.codebook": rng.standard_normal(16).astype(np.float32),
        "fc1.codes": stream,
        "fc1.huffman": table.to_bytes(),
        "fc1.indptr": np.cumsum(rng.integers(0, 9, 301)).astype(np.int32),
        "fc1.rel_index": rng.integers(0, 256, 700, dtype=np.uint8).reshape(7, 100),
        "int8": rng.integers(-128, 128, (2, 3, 4), dtype=np.int8),
        "uint16": rng.integers(0, 65536, 33, dtype=np.uint16),
        "scalar": np.array(2**40 + 3, np.int64),
        "specials": np.array([np.nan, -0.0, np.inf, -np.inf, 5e-324], np.float64),
        "empty": np.zeros((0, 5), np.float32),
        "nothing": b"",
    }
    return header, sections


def assert_same(got, want):
    header, sections = got
    assert header == want[0]
    assert list(sections) == list(want[1])  # order kept
    for name, value in want[1].items():
        out = sections[name]
        if isinstance(value, (bytes, bytearray)):
            assert type(out) is bytes and out == bytes(value)
        else:
            assert out.dtype == value.dtype.newbyteorder("<") and out.shape == value.shape
            assert out.astype(value.dtype).tobytes() == value.tobytes()  # bit for bit (NaN, -0.0)
            assert not out.flags.writeable


def leftovers(folder):
    return sorted(p for p in os.listdir(folder) if p.endswith(".tmp"))


def test_round_trip(tmp_path, rng):
    header, sections = sample(rng)
    path = tmp_path / "lenet.dnnz"
    container.write(path, header, sections)
    assert_same(container.read(path), (header, sections))
    assert_same(container.read(str(path)), (header, sections))
    assert leftovers(tmp_path) == []
    # big-endian input is stored little-endian and reads back equal
    be = np.arange(6, dtype=">i4").reshape(2, 3)
    container.write(path, {}, {"be": be})
    out = container.read(path)[1]["be"]
    assert out.dtype == np.dtype("<i4")
    np.testing.assert_array_equal(out, be)


def test_layout_is_the_documented_one(tmp_path):
    path = tmp_path / "tiny.dnnz"
    container.write(path, {"a": 1}, {"w": np.array([1.5], np.float32), "r": b"xy"})
    raw = path.read_bytes()
    hdr = b'{"a": 1}'
    body = (b"DNNZ" + struct.pack("<HHI", 1, 0, len(hdr)) + hdr + struct.pack("<I", 2)
            + struct.pack("<H", 1) + b"w" + struct.pack("<BBQQ", 6, 1, 1, 4) + struct.pack("<f", 1.5)
            + struct.pack("<I", zlib.crc32(struct.pack("<f", 1.5)))
            + struct.pack("<H", 1) + b"r" + struct.pack("<BBQQ", 0, 1, 2, 2) + b"xy"
            + struct.pack("<I", zlib.crc32(b"xy")))
    assert raw == body + hashlib.sha256(body).digest()


@pytest.mark.parametrize("sections, error, message", [
    ({"w": np.zeros((4, 4), np.float32)[:, ::2]}, TypeError, "not C-contiguous"),
    ({"w": np.zeros(3, np.float16)}, TypeError, "unsupported dtype float16"),
    ({"w": np.zeros(3, bool)}, TypeError, "unsupported dtype bool"),
    ({"w": [1, 2, 3]}, TypeError, "expected a numpy array or bytes"),
    ({"": np.zeros(3, np.uint8)}, ValueError, "must be 1..256 UTF-8 bytes"),
    ({"é" * 129: np.zeros(3, np.uint8)}, ValueError, "got 258"),
    ({"w": np.zeros((1,) * 9, np.uint8)}, ValueError, "ndim 9 exceeds 8"),
    ({1: np.zeros(3, np.uint8)}, TypeError, "names must be str"),
])
def test_write_refuses_what_it_cannot_store(tmp_path, sections, error, message):
    with pytest.raises(error, match=message):
        container.write(tmp_path / "x.dnnz", {}, sections)
    assert os.listdir(tmp_path) == []


def test_write_refuses_bad_headers(tmp_path):
    with pytest.raises(TypeError, match="header must be a dict"):
        container.write(tmp_path / "x.dnnz", [1], {})
    with pytest.raises(ValueError, match="over the 16777216-byte limit"):
        container.write(tmp_path / "x.dnnz", {"x": "a" * (16 * 1024 * 1024)}, {})
    assert os.listdir(tmp_path) == []


def test_failed_write_leaves_the_old_file_and_no_temp_file(tmp_path, rng, monkeypatch):
    header, sections = sample(rng)
    path = tmp_path / "model.dnnz"
    # a bad last section: nothing is created at all
    with pytest.raises(TypeError):
        container.write(path, header, {**sections, "last": np.zeros(4, np.complex64)})
    assert os.listdir(tmp_path) == []
    container.write(path, header, sections)
    before = path.read_bytes()
    with pytest.raises(TypeError):
        container.write(path, {"new": 1}, {**sections, "last": np.zeros(4, np.complex64)})
    # a failure halfway through the payloads (after bytes hit the temp file) and at fsync
    crc32 = container.zlib.crc32
    calls = []

    def failing_crc(buf):
        calls.append(1)
        if len(calls) == 3:
            raise OSError("disk full")
        return crc32(buf)

    monkeypatch.setattr(container.zlib, "crc32", failing_crc)
    with pytest.raises(OSError, match="disk full"):
        container.write(path, {"new": 1}, sections)
    monkeypatch.undo()

    def failing_fsync(fd):
        raise OSError("I/O error")

    monkeypatch.setattr(container.os, "fsync", failing_fsync)
    with pytest.raises(OSError, match="I/O error"):
        container.write(path, {"new": 1}, sections)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == [] and os.listdir(tmp_path) == ["model.dnnz"]


def test_errors_name_the_file_and_the_problem(tmp_path, rng):
    header, sections = sample(rng)
    path = tmp_path / "m.dnnz"
    container.write(path, header, sections)
    good = path.read_bytes()
    hdr_len = struct.unpack_from("<I", good, 8)[0]
    codes_at = good.index(struct.pack("<H", 9) + b"fc1.codes") + 2  # the section, not the header

    def check(data, message):
        path.write_bytes(data)
        with pytest.raises(DnnzError, match=message) as info:
            container.read(path)
        assert str(path) in str(info.value)

    check(b"", r"not a \.dnnz file \(empty\)")
    check(b"PK\x03\x04" + good[4:], r"not a \.dnnz file \(bad magic\)")
    check(good[:4] + struct.pack("<H", 7) + good[6:], "unsupported format version 7")
    check(good[:6] + struct.pack("<H", 1) + good[8:], "unknown flags 0x0001")
    check(good[:codes_at + 200], "truncated in section 'fc1.codes'")  # mid-payload
    check(good[:10], "truncated in preamble")
    payload = codes_at + len("fc1.codes") + 2 + 8 + 8
    check(good[:payload] + bytes([good[payload] ^ 1]) + good[payload + 1:],
          r"checksum mismatch in section 'fc1.codes' \(CRC32\)")
    check(good[:12] + good[12:12 + hdr_len].replace(b"LeNet", b"LeNot") + good[12 + hdr_len:],
          r"checksum mismatch \(SHA-256")
    check(good[:-32] + b"\0" * 5 + good[-32:], "5 trailing bytes")
    check(good[:-1] + bytes([good[-1] ^ 0x80]), r"checksum mismatch \(SHA-256")
    with pytest.raises(FileNotFoundError):
        container.read(tmp_path / "missing.dnnz")


def _patched(good, offset, fmt, value):
    """Set one length field and re-seal the file, so only the bounds checks can catch it."""
    body = bytearray(good[:-32])
    struct.pack_into(fmt, body, offset, value)
    return bytes(body) + hashlib.sha256(body).digest()


def test_huge_length_fields_fail_fast_without_allocating(tmp_path, rng):
    header, sections = sample(rng)
    path = tmp_path / "m.dnnz"
    container.write(path, header, sections)
    good = path.read_bytes()
    hdr_len = struct.unpack_from("<I", good, 8)[0]
    count_at = 12 + hdr_len
    name_at = good.index(struct.pack("<H", 12) + b"fc1.codebook") + 2
    dims_at = name_at + len("fc1.codebook") + 2  # after dtype code and ndim
    empty_at = good.index(struct.pack("<H", 5) + b"empty") + 2 + 5 + 2
    cases = {
        "header length 4294967295 exceeds": _patched(good, 8, "<I", 2**32 - 1),
        "truncated in header": _patched(good, 8, "<I", 16 * 1024 * 1024),
        "truncated in section #11": _patched(good, count_at, "<I", 2**32 - 1),
        "!= payload length 64": _patched(good, dims_at, "<Q", 2**40),  # dims no longer match payload
        "truncated in section 'fc1.codebook'": _patched(
            _patched(good, dims_at, "<Q", 2**58), dims_at + 8, "<Q", 2**60),  # consistent, 1 EiB
        "ndim 200 exceeds 8": _patched(good, dims_at - 1, "<B", 200),
        # an empty (0, 5) array whose non-zero dim says 2**62: the product still matches (0)
        "too large for an array": _patched(good, empty_at + 8, "<Q", 2**62),
        "name length 65535": _patched(good, name_at - 2, "<H", 65535),
    }
    for message, data in cases.items():
        path.write_bytes(data)
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            with pytest.raises(DnnzError, match=message):
                container.read(path)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert peak < 4 * len(good) + (1 << 20), (message, peak)
        assert time.perf_counter() - t0 < 5


def mutate(good: bytes, rng) -> bytes:
    kind = int(rng.integers(0, 8))
    n = len(good)
    if kind == 0:  # one byte flip
        buf = bytearray(good)
        buf[int(rng.integers(n))] ^= int(rng.integers(1, 256))
        return bytes(buf)
    if kind == 1:  # several byte flips
        buf = bytearray(good)
        for _ in range(int(rng.integers(2, 20))):
            buf[int(rng.integers(n))] ^= int(rng.integers(1, 256))
        return bytes(buf)
    if kind == 2:  # truncation at a random length
        return good[:int(rng.integers(0, n))]
    if kind == 3:  # random insertion
        at = int(rng.integers(0, n + 1))
        return good[:at] + rng.integers(0, 256, int(rng.integers(1, 64)), dtype=np.uint8).tobytes() + good[at:]
    if kind == 4:  # overwrite a run with random bytes (may leave it unchanged)
        at, size = int(rng.integers(0, n)), int(rng.integers(1, 4))
        return good[:at] + rng.integers(0, 256, size, dtype=np.uint8).tobytes()[:n - at] + good[at + size:]
    if kind == 5:  # a length-sized field (2, 4 or 8 bytes) set to a huge or random value
        width = int(rng.choice([2, 4, 8]))
        at = int(rng.integers(0, n - width))
        value = int(rng.choice([0xFF, 0x7F, 0x00, int(rng.integers(0, 256))]))
        return good[:at] + bytes([value]) * width + good[at + width:]
    if kind == 6:  # entirely random bytes, sometimes with the right magic
        junk = rng.integers(0, 256, int(rng.integers(0, 200)), dtype=np.uint8).tobytes()
        return (b"DNNZ\x01\x00\x00\x00" + junk) if rng.random() < 0.5 else junk
    return b""  # zero-length file


def test_fuzz_every_mutation_is_rejected_cleanly(tmp_path, rng):
    header, sections = sample(rng)
    path = tmp_path / "m.dnnz"
    container.write(path, header, sections)
    good = path.read_bytes()
    fuzz_rng = np.random.default_rng(20160217)  # fixed: the same 1,000 mutations every run
    unchanged = 0
    for case in range(1000):
        data = mutate(good, fuzz_rng)
        path.write_bytes(data)
        try:
            got = container.read(path)
        except DnnzError:
            assert data != good, f"case {case}: the untouched file was rejected"
            continue
        except Exception as e:  # noqa: BLE001 - the point of the test
            pytest.fail(f"case {case}: {type(e).__name__}: {e}")
        assert data == good, f"case {case}: a changed file was accepted"
        assert_same(got, (header, sections))
        unchanged += 1
    assert unchanged < 50  # the mutations really mutate
