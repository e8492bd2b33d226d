"""CSR with relative column indices (Deep Compression, section 2).

Each row stores its nonzeros as (relative index, value) pairs: the relative index is the number
of zeros skipped since the previous stored entry (or the row start), held in ``index_bits`` bits.
A gap longer than 2^index_bits - 1 zeros is bridged by a filler entry whose value is zero (code 0
of the codebook), exactly as in the paper's Figure 3. Row starts (``indptr``) count entries,
fillers included. Everything here is exact integer bookkeeping; bits on disk are the container's
business.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class RelativeCSR:
    shape: tuple            # (rows, cols) of the weight matrix
    index_bits: int
    indptr: np.ndarray      # (rows + 1,) int64, entries (fillers included) per row, cumulated
    rel: np.ndarray         # (entries,) uint16: zeros skipped before each entry
    codes: np.ndarray       # (entries,) uint16/uint8: codebook index; 0 = zero (fillers)

    @property
    def entries(self) -> int:
        return int(self.rel.size)

    @property
    def fillers(self) -> int:
        return int(np.count_nonzero(self.codes == 0))

    def columns(self) -> np.ndarray:
        """Absolute column index of every entry (int32), for the CSR kernels."""
        row_of = np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))
        cum = np.concatenate([[0], np.cumsum(self.rel.astype(np.int64) + 1)])  # positions consumed so far
        cols = cum[1:] - cum[self.indptr[:-1]][row_of] - 1
        if self.entries and (cols.max() >= self.shape[1]):
            raise ValueError(f"relative indices run past column {self.shape[1] - 1}: corrupt data")
        return cols.astype(np.int32)


def encode(codes_dense: np.ndarray, index_bits: int) -> RelativeCSR:
    """Encode a (rows, cols) array of codebook indices (0 = pruned) row by row."""
    if not 1 <= index_bits <= 16:
        raise ValueError(f"index bits must be in 1..16, got {index_bits}")
    if codes_dense.ndim != 2:
        raise ValueError(f"need a 2-D array of codes, got shape {codes_dense.shape}")
    rows, cols = codes_dense.shape
    max_gap = (1 << index_bits) - 1
    r_idx, c_idx = np.nonzero(codes_dense)
    vals = codes_dense[r_idx, c_idx]
    # zeros skipped before each nonzero, counting from its row start
    prev = np.full(r_idx.size, -1, np.int64)
    same_row = np.zeros(r_idx.size, bool)
    same_row[1:] = r_idx[1:] == r_idx[:-1]
    prev[1:][same_row[1:]] = c_idx[:-1][same_row[1:]]
    gap = c_idx - prev - 1
    # a gap g needs g // (max_gap + 1) fillers, each standing for max_gap zeros + itself
    n_fill = gap // (max_gap + 1)
    total = r_idx.size + int(n_fill.sum())
    rel = np.empty(total, np.uint16)
    codes = np.zeros(total, np.uint16)
    # position of each nonzero in the output stream: its index + all fillers before and with it
    pos = np.arange(r_idx.size) + np.cumsum(n_fill)
    rel[pos] = gap - n_fill * (max_gap + 1)
    codes[pos] = vals
    filler = np.ones(total, bool)
    filler[pos] = False
    rel[filler] = max_gap
    per_row = np.bincount(r_idx, weights=1 + n_fill, minlength=rows).astype(np.int64)
    indptr = np.zeros(rows + 1, np.int64)
    np.cumsum(per_row, out=indptr[1:])
    return RelativeCSR((rows, cols), index_bits, indptr, rel, codes)


def decode(m: RelativeCSR) -> np.ndarray:
    """The dense (rows, cols) array of codes (0 where nothing is stored)."""
    out = np.zeros(m.shape, dtype=m.codes.dtype)
    if m.entries:
        rows = np.repeat(np.arange(m.shape[0]), np.diff(m.indptr))
        keep = m.codes != 0
        out[rows[keep], m.columns()[keep]] = m.codes[keep]
    return out
