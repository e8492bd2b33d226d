"""CSR with relative column indices (Deep Compression, section 2).

Each row stores its nonzeros as (relative index, value) pairs: the relative index is the number
of zeros skipped since the previous stored entry (or the row start), held in ``index_bits`` bits.
A gap longer than 2^index_bits - 1 zeros is bridged by a filler entry whose value is zero (code 0
of the codebook), exactly as in the paper's Figure 3. Row starts (``indptr``) count entries,
fillers included. Everything here is exact integer bookkeeping; bits on disk are the container's
business.

:func:`relative_stream` is the one encoder of this stream in dnnpar: :func:`encode` (the .dnnz
writer's, from dense codes) and :meth:`dnnpar.sparse.CSR.compact` (the native CPU kernel's form,
gaps of at most 255) both call it; :func:`columns` is its one decoder.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def row_gaps(indptr: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Zeros skipped before each stored entry of a CSR (int64 ``indptr`` (rows + 1,), int64
    ``cols`` (nnz,)): the entry's column less the previous entry's of its row (or -1) less one.
    Negative where a row's columns do not increase (unsorted, or a column repeated)."""
    nnz = cols.shape[0]
    lengths = np.diff(indptr)
    prev = np.empty(nnz, np.int64)
    prev[1:] = cols[:-1]
    prev[indptr[:-1][lengths > 0]] = -1
    return cols - prev - 1


def relative_stream(indptr: np.ndarray, gap: np.ndarray, max_gap: int, dtype=np.uint16):
    """The relative-index stream of stored entries with ``gap`` zeros before each (from
    :func:`row_gaps`, all >= 0) under row starts ``indptr`` (int64, rows + 1): a gap g > max_gap
    is bridged by g // (max_gap + 1) filler entries of relative index max_gap, each standing for
    max_gap zeros and itself. Returns (rel (entries,) ``dtype``, pos (nnz,) int64: where each
    stored entry sits in the stream (every other position is a filler), entry row starts
    (rows + 1,) int64, fillers included)."""
    nnz = gap.shape[0]
    n_fill = gap // (max_gap + 1)
    cum = np.zeros(nnz + 1, np.int64)  # fillers before each stored entry, its own included
    np.cumsum(n_fill, out=cum[1:])
    pos = np.arange(nnz, dtype=np.int64) + cum[1:]
    rel = np.full(nnz + int(cum[-1]), max_gap, dtype)
    rel[pos] = gap - n_fill * (max_gap + 1)
    return rel, pos, indptr + cum[indptr]


def columns(indptr: np.ndarray, rel: np.ndarray, n_cols: int) -> np.ndarray:
    """Absolute column (int64) of every entry of a relative-index stream (fillers included);
    ValueError when a row's entries run past column ``n_cols - 1``."""
    check_spans(indptr, rel, n_cols)
    row_of = np.repeat(np.arange(indptr.shape[0] - 1), np.diff(indptr))
    cum = np.concatenate([[0], np.cumsum(rel.astype(np.int64) + 1)])  # positions consumed so far
    return cum[1:] - cum[indptr[:-1]][row_of] - 1


def check_spans(indptr: np.ndarray, rel: np.ndarray, n_cols: int) -> None:
    """ValueError when some row's entries run past column ``n_cols - 1``: each row's relative
    indices + 1 must add up to at most ``n_cols`` (checked without decoding a column)."""
    counts = np.diff(indptr)
    starts = indptr[:-1][counts > 0]
    if starts.size:
        spans = np.add.reduceat(rel.astype(np.int64) + 1, starts)  # columns each non-empty row covers
        if spans.max() > n_cols:
            raise ValueError(f"relative indices run past column {n_cols - 1}: corrupt data")


@dataclass
class RelativeCSR:
    shape: tuple            # (rows, cols) of the weight matrix
    index_bits: int
    indptr: np.ndarray      # (rows + 1,) int64, entries (fillers included) per row, cumulated
    rel: np.ndarray         # (entries,) uint16 (uint8 as read from a file of index_bits <= 8): zeros skipped before each entry
    codes: np.ndarray       # (entries,) uint16 (uint8 as read for weight_bits <= 8): codebook index; 0 = zero (fillers)

    @property
    def entries(self) -> int:
        return int(self.rel.size)

    @property
    def fillers(self) -> int:
        return int(np.count_nonzero(self.codes == 0))

    def columns(self) -> np.ndarray:
        """Absolute column index of every entry (int32), for the CSR kernels."""
        return columns(self.indptr, self.rel, self.shape[1]).astype(np.int32)


def encode(codes_dense: np.ndarray, index_bits: int) -> RelativeCSR:
    """Encode a (rows, cols) array of codebook indices (0 = pruned) row by row."""
    if not 1 <= index_bits <= 16:
        raise ValueError(f"index bits must be in 1..16, got {index_bits}")
    if codes_dense.ndim != 2:
        raise ValueError(f"need a 2-D array of codes, got shape {codes_dense.shape}")
    rows, _ = codes_dense.shape
    r_idx, c_idx = np.nonzero(codes_dense)
    indptr = np.zeros(rows + 1, np.int64)
    np.cumsum(np.bincount(r_idx, minlength=rows), out=indptr[1:])
    cols = c_idx.astype(np.int64)
    rel, pos, entry_ptr = relative_stream(indptr, row_gaps(indptr, cols), (1 << index_bits) - 1)
    codes = np.zeros(rel.size, np.uint16)  # fillers keep code 0
    codes[pos] = codes_dense[r_idx, c_idx]
    return RelativeCSR(tuple(codes_dense.shape), index_bits, entry_ptr, rel, codes)


def decode(m: RelativeCSR) -> np.ndarray:
    """The dense (rows, cols) array of codes (0 where nothing is stored)."""
    out = np.zeros(m.shape, dtype=m.codes.dtype)
    if m.entries:
        rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
        keep = m.codes != 0
        out[rows[keep], m.columns()[keep]] = m.codes[keep]
    return out
