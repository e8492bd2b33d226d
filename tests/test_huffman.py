import heapq
import itertools

import numpy as np
import pytest

from dnnpar.compress import huffman as hf
from dnnpar.compress.huffman import HuffmanTable


def huffman_cost(counts):
    """Total bits of an optimal unrestricted prefix code (classic heap Huffman): the oracle."""
    heap = [int(c) for c in counts if c > 0]
    if len(heap) == 1:
        return heap[0]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return total


def kraft(lengths):
    return sum(2.0 ** -int(n) for n in lengths if n)


def streams(rng):
    geometric = (rng.geometric(0.08, 50_000) - 1) % 256
    return {
        "uniform-256": (rng.integers(0, 256, 40_000), 256),
        "geometric-256": (geometric, 256),
        "single-symbol": (np.full(1000, 17), 256),
        "one-element": (np.array([3]), 4),
        "empty": (np.zeros(0, np.int64), 256),
        "two-symbols": (rng.integers(0, 2, 10_001), 2),
        "uniform-65536": (rng.integers(0, 65536, 100_000), 65536),
        "skewed-65536": (np.minimum(rng.zipf(1.3, 100_000) - 1, 65535), 65536),
    }


@pytest.mark.parametrize("kind", ["uniform-256", "geometric-256", "single-symbol", "one-element", "empty",
                                  "two-symbols", "uniform-65536", "skewed-65536"])
def test_round_trip(rng, kind):
    symbols, alphabet = streams(rng)[kind]
    table = HuffmanTable.from_symbols(symbols, alphabet)
    data, nbits = table.encode(symbols)
    assert len(data) == (nbits + 7) // 8
    assert nbits == table.bits_for(np.bincount(symbols, minlength=alphabet))
    out = table.decode(data, nbits, symbols.size)
    np.testing.assert_array_equal(out, symbols)
    assert out.dtype == np.int64 and out.shape == (symbols.size,)
    # the table survives serialisation and decodes the same stream
    again = HuffmanTable.from_bytes(table.to_bytes())
    np.testing.assert_array_equal(again.lengths, table.lengths)
    np.testing.assert_array_equal(again.decode(data, nbits, symbols.size), symbols)


def test_single_used_symbol_gets_one_bit_and_nothing_used_gets_zeros():
    np.testing.assert_array_equal(hf.code_lengths(np.array([0, 0, 5, 0])), [0, 0, 1, 0])
    np.testing.assert_array_equal(hf.code_lengths(np.zeros(7, np.int64)), np.zeros(7))
    assert hf.code_lengths(np.zeros(0, np.int64)).shape == (0,)
    assert hf.encode(np.zeros(0, np.int64), np.zeros(3, np.uint8)) == (b"", 0)


def test_canonical_codes_match_deflate_example():
    # RFC 1951 section 3.2.2: lengths (3,3,3,3,3,2,4,4) -> 010 011 100 101 110 00 1110 1111
    codes = hf.canonical_codes([3, 3, 3, 3, 3, 2, 4, 4])
    assert codes.dtype == np.uint32
    np.testing.assert_array_equal(codes, [0b010, 0b011, 0b100, 0b101, 0b110, 0b00, 0b1110, 0b1111])
    data, nbits = hf.encode(np.array([5, 7, 0]), [3, 3, 3, 3, 3, 2, 4, 4])
    assert (nbits, data) == (9, bytes([0b00111101, 0b00000000]))


def test_codes_are_prefix_free(rng):
    counts = rng.integers(0, 50, 300)
    lengths = hf.code_lengths(counts, 12)
    codes = hf.canonical_codes(lengths)
    words = sorted(format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths) if n)
    assert all(not b.startswith(a) for a, b in zip(words, words[1:]))


def test_lengths_are_optimal_when_the_limit_does_not_bind(rng):
    for _ in range(200):
        n = int(rng.integers(2, 400))
        counts = rng.geometric(rng.uniform(0.01, 0.9), n) * (rng.random(n) < 0.8)
        lengths = hf.code_lengths(counts, 20)
        assert np.array_equal(lengths > 0, counts > 0)
        if np.count_nonzero(counts) >= 2:
            assert hf.bits_for(counts, lengths) == huffman_cost(counts)
            assert kraft(lengths) == 1.0  # optimal codes are complete


def test_average_length_is_within_one_bit_of_the_entropy(rng):
    for alphabet, p in [(256, 0.02), (256, 0.3), (16, 0.6), (65536, 0.0005)]:
        symbols = (rng.geometric(p, 200_000) - 1) % alphabet
        counts = np.bincount(symbols, minlength=alphabet)
        lengths = hf.code_lengths(counts, 20)
        assert int(lengths.max()) < 20  # the limit does not bind
        prob = counts[counts > 0] / symbols.size
        entropy = float(-(prob * np.log2(prob)).sum())
        average = hf.bits_for(counts, lengths) / symbols.size
        assert entropy <= average < entropy + 1


def test_length_limit_is_respected_and_optimal():
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib, np.int64)  # Fibonacci counts make the deepest possible Huffman tree
    assert int(hf.code_lengths(counts, 20).max()) == 20
    for limit in (5, 8, 12, 16):
        lengths = hf.code_lengths(counts, limit)
        assert int(lengths.max()) <= limit and kraft(lengths) <= 1.0
    # brute force over every length vector for a small alphabet
    for counts in ([1, 1, 2, 3, 5, 8], [1, 2, 4, 8, 16, 32], [7, 1, 1, 1, 1, 1]):
        for limit in (3, 4):
            best = min(sum(c * n for c, n in zip(counts, ls))
                       for ls in itertools.product(range(1, limit + 1), repeat=len(counts)) if kraft(ls) <= 1)
            lengths = hf.code_lengths(np.array(counts), limit)
            assert int(lengths.max()) <= limit and kraft(lengths) <= 1.0
            assert hf.bits_for(np.array(counts), lengths) == best


def test_every_symbol_of_a_full_alphabet_fits_the_limit(rng):
    counts = rng.integers(1, 1000, 65536)
    lengths = hf.code_lengths(counts, 16)
    np.testing.assert_array_equal(lengths, 16)  # 65536 symbols in 16 bits: all the same length
    with pytest.raises(ValueError, match="cannot be coded in at most 15 bits"):
        hf.code_lengths(counts, 15)


def test_bad_arguments():
    with pytest.raises(TypeError, match="integers"):
        hf.code_lengths(np.array([1.5, 2.0]))
    with pytest.raises(ValueError, match="non-negative"):
        hf.code_lengths(np.array([3, -1]))
    with pytest.raises(ValueError, match="max_length"):
        hf.code_lengths(np.array([3, 1]), 0)
    with pytest.raises(ValueError, match="has no code"):
        hf.encode(np.array([0, 2]), [1, 1, 0])
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        hf.encode(np.array([0, 3]), [1, 2, 2])
    with pytest.raises(TypeError, match="integers"):
        hf.encode(np.array([0.0]), [1, 1])
    with pytest.raises(ValueError, match="Kraft"):
        hf.canonical_codes([1, 1, 1])
    with pytest.raises(ValueError, match="has no code"):
        hf.bits_for(np.array([1, 1]), [1, 0])


def test_decode_rejects_inconsistent_streams():
    lengths = np.array([1, 2, 2], np.uint8)  # codes 0, 10, 11 (complete)
    data, nbits = hf.encode(np.array([0, 1, 2, 0]), lengths)  # 0 10 11 0 -> 6 bits
    assert nbits == 6
    np.testing.assert_array_equal(hf.decode(data, nbits, lengths, 4), [0, 1, 2, 0])
    cases = [
        ((data, nbits, [1, 1, 1], 4), "Kraft"),
        ((data, nbits, [1, 21, 0], 4), r"lie in \[0, 20\]"),
        ((data, 9, lengths, 4), "exceeds the 8 bits"),
        ((data, nbits, lengths, 3), "left over after 3 symbols"),
        ((data, nbits, lengths, 5), "stream ends after 4 of 5 symbols"),
        ((hf.encode(np.array([0, 1]), lengths)[0], 2, lengths, 2), "runs past the end"),
        ((data + b"\0", nbits, lengths, 4), "trailing byte"),
        ((bytes([data[0] | 1]), nbits, lengths, 4), "padding bits"),
        ((data, nbits, lengths, 7), "cannot fit in 6 bits"),
        ((data, nbits, [0, 0, 0], 4), "no symbol has a code"),
        ((data, -1, lengths, 4), "nbits must be"),
        ((data, nbits, lengths, -1), "count must be"),
        ((b"", 0, lengths, 0), None),
    ]
    for args, message in cases:
        if message is None:
            assert hf.decode(*args).shape == (0,)
            continue
        with pytest.raises(ValueError, match=message):
            hf.decode(*args)
    # an incomplete code (one symbol: code "0") meets the pattern "1"
    with pytest.raises(ValueError, match="bit pattern at bit 2 is no code"):
        hf.decode(bytes([0b00100000]), 3, [0, 1], 3)


def test_decode_survives_hostile_input(rng):
    """Random corruption must give ValueError or a well-formed result, never another exception."""
    symbols = (rng.geometric(0.2, 3000) - 1) % 40
    table = HuffmanTable.from_symbols(symbols, 40, max_length=9)
    data, nbits = table.encode(symbols)
    for trial in range(400):
        buf = bytearray(data)
        n, count, lengths = nbits, symbols.size, table.lengths.copy()
        kind = trial % 5
        if kind == 0:
            for _ in range(int(rng.integers(1, 4))):
                buf[int(rng.integers(len(buf)))] ^= int(rng.integers(1, 256))
        elif kind == 1:
            cut = int(rng.integers(0, len(buf)))
            buf = buf[:cut]
            n = min(n, 8 * cut) if rng.random() < 0.5 else n
        elif kind == 2:
            n = int(rng.integers(0, 2 * nbits))
            count = int(rng.integers(0, 2 * symbols.size))
        elif kind == 3:
            lengths[int(rng.integers(lengths.size))] = int(rng.integers(0, 12))
        else:
            buf = bytearray(rng.integers(0, 256, len(buf), dtype=np.uint8).tobytes())
        try:
            out = hf.decode(bytes(buf), n, lengths, count)
        except ValueError:
            continue
        assert out.shape == (count,) and (out.size == 0 or 0 <= out.min() <= out.max() < lengths.size)


def test_huffman_table_serialisation():
    lengths = np.zeros(200_000, np.uint8)  # a long run of unused symbols needs several u16 runs
    lengths[[0, 1, 2, 150_000]] = [1, 2, 3, 3]
    table = HuffmanTable(lengths)
    blob = table.to_bytes()
    assert len(blob) < 40
    np.testing.assert_array_equal(HuffmanTable.from_bytes(blob).lengths, lengths)
    assert HuffmanTable.from_bytes(HuffmanTable(np.zeros(0, np.uint8)).to_bytes()).lengths.size == 0
    assert not table.lengths.flags.writeable
    bad = {
        "at least 8 bytes": blob[:5],
        "needs": blob[:-1],
        "runs cover": (3).to_bytes(4, "little") + blob[4:],
        "exceeds the limit": (1 << 30).to_bytes(4, "little") + blob[4:],
        "Kraft": (3).to_bytes(4, "little") + (1).to_bytes(4, "little") + bytes([1, 2, 0]),  # 3 x length 1
        r"lie in \[0, 20\]": (1).to_bytes(4, "little") + (1).to_bytes(4, "little") + bytes([30, 0, 0]),
    }
    for message, data in bad.items():
        with pytest.raises(ValueError, match=message):
            HuffmanTable.from_bytes(data)


def test_two_million_symbols_round_trip(rng):
    symbols = ((rng.geometric(0.03, 2_000_000) - 1) % 256).astype(np.uint8)
    table = HuffmanTable.from_symbols(symbols, 256)
    data, nbits = table.encode(symbols)
    assert nbits < 8 * symbols.size  # skewed stream: Huffman beats 8 bits per symbol
    np.testing.assert_array_equal(table.decode(data, nbits, symbols.size), symbols)


@pytest.mark.parametrize("chunk, doublings", [(37, 2), (64, 0), (1000, 3)])
def test_chunk_boundaries_do_not_matter(rng, monkeypatch, chunk, doublings):
    """Tiny encode/decode chunks put code boundaries everywhere a chunk can end."""
    monkeypatch.setattr(hf, "_DECODE_CHUNK", chunk)
    monkeypatch.setattr(hf, "_DOUBLINGS", doublings)
    monkeypatch.setattr(hf, "_ENCODE_CHUNK", 7)
    for alphabet, limit in [(300, 20), (300, 9), (3, 2)]:
        symbols = (rng.geometric(0.1, 5000) - 1) % alphabet
        lengths = hf.code_lengths(np.bincount(symbols, minlength=alphabet), limit)
        data, nbits = hf.encode(symbols, lengths)
        monkeypatch.setattr(hf, "_ENCODE_CHUNK", 1 << 20)
        assert hf.encode(symbols, lengths) == (data, nbits)
        monkeypatch.setattr(hf, "_ENCODE_CHUNK", 7)
        np.testing.assert_array_equal(hf.decode(data, nbits, lengths, symbols.size), symbols)
        with pytest.raises(ValueError, match="left over"):
            hf.decode(data, nbits, lengths, symbols.size - 1)
