"""Compressed sparse row matrices on the active backend, checked once at construction."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .backend import get_backend


#: set "use" to False to run the NumPy fallback even where SciPy is installed (tests)
SCIPY = {"use": True}
#: set "use" to False to keep codebook matrices on SciPy / NumPy on the numpy backend even where
#: the native CPU kernel builds (tests, benchmarks; DNNPAR_NATIVE=0 does it for a whole process)
NATIVE = {"use": True}

#: a run of more zeros than this is bridged by filler entries in the compact form
MAX_GAP = 255


@dataclass(frozen=True, eq=False)
class CompactCSR:
    """A codebook CSR matrix in Deep Compression's storage format (the paper's Figure 3), as the
    numpy backend's native kernel (``dnnpar/cpu/csr_codebook.cpp``) reads it: two bytes per entry.

    rowptr: (M + 1,) int64, where each row's entries start (fillers included).
    gaps: (E,) uint8, zeros skipped since the previous entry of the row: an entry's column is the
    previous entry's column + gap + 1, counting from -1 at the row start.
    codes: (E,) uint8, indices into ``codebook``.
    codebook: (256,) float32, the matrix's codebook padded with zeros, so no code reads past it.
    fillers: how many of the E entries are fillers: a gap of more than 255 zeros is bridged by
    entries of gap 255 whose code is ``filler_code`` (a codebook entry equal to 0.0; index 0 in
    Deep Compression's convention when the codebook starts with 0.0). A filler multiplies 0.0
    by an entry of x, so a non-finite x there gives NaN, as a dense product would.
    """
    shape: tuple
    rowptr: np.ndarray
    gaps: np.ndarray
    codes: np.ndarray
    codebook: np.ndarray
    fillers: int
    filler_code: int

    @property
    def entries(self) -> int:
        return int(self.gaps.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes of the streams: entries (gap + code), row offsets and the 256-entry codebook."""
        return int(self.gaps.nbytes + self.codes.nbytes + self.rowptr.nbytes + self.codebook.nbytes)

    def bytes_per_nonzero(self) -> float:
        """All bytes of the compact form (fillers, row offsets and codebook included) per nonzero."""
        nnz = self.entries - self.fillers
        return self.nbytes / nnz if nnz else float("nan")


def _compact(indptr, indices, codes, codebook, shape) -> CompactCSR | None:
    """The compact form of a validated codebook CSR (host arrays), or None when it has none: a
    column repeated within a row, or fillers needed but no codebook entry equal to 0.0."""
    m, _ = shape
    ptr = indptr.astype(np.int64)
    cols = indices.astype(np.int64)
    nnz = cols.shape[0]
    lengths = np.diff(ptr)
    starts = ptr[:-1][lengths > 0]

    def gaps_of(cols):
        prev = np.empty(nnz, np.int64)
        prev[1:] = cols[:-1]
        prev[starts] = -1
        return cols - prev - 1

    gap = gaps_of(cols)
    if nnz and gap.min() < 0:  # columns out of order within a row: sort each row
        rows = np.repeat(np.arange(m, dtype=np.int64), lengths)
        order = np.lexsort((cols, rows))
        cols, codes = cols[order], codes[order]
        gap = gaps_of(cols)
        if gap.min() < 0:
            return None  # a repeated column: a gap cannot say "the same column again"
    n_fill = gap // (MAX_GAP + 1)
    cum = np.zeros(nnz + 1, np.int64)
    np.cumsum(n_fill, out=cum[1:])
    fillers = int(cum[-1])
    cb = np.zeros(256, np.float32)
    cb[:codebook.shape[0]] = codebook
    filler_code = 0
    if fillers:
        zero = np.flatnonzero(cb == 0.0)
        if zero.size == 0:
            return None  # 256 codes, none of them 0.0: nothing a filler could point at
        filler_code = int(zero[0])
    pos = np.arange(nnz, dtype=np.int64) + cum[1:]
    gaps = np.full(nnz + fillers, MAX_GAP, np.uint8)
    out_codes = np.full(nnz + fillers, filler_code, np.uint8)
    gaps[pos] = gap - n_fill * (MAX_GAP + 1)
    out_codes[pos] = codes
    return CompactCSR((int(shape[0]), int(shape[1])), ptr + cum[ptr], gaps, out_codes, cb, fillers, filler_code)


class CSR:
    """An M x K matrix in CSR form.

    data: (nnz,) float32 values, or uint8 indices into ``codebook`` ((ncodes,) float32, ncodes <= 256)
    indices: (nnz,) column indices; indptr: (M + 1,) row starts. Integer arrays are stored as int32.
    The arrays are moved to the active backend; the whole structure is validated on the host
    (monotone indptr, in-range columns and codes) so that no kernel ever reads out of bounds.
    """

    def __init__(self, data, indices, indptr, shape, codebook=None):
        be = get_backend()
        if not (isinstance(shape, (tuple, list)) and len(shape) == 2
                and all(isinstance(s, (int, np.integer)) and s >= 1 for s in shape)):
            raise ValueError(f"CSR: shape must be two positive ints (M, K), got {shape!r}")
        m, k = int(shape[0]), int(shape[1])
        h_data, h_ind, h_ptr = (be.to_numpy(a) if not isinstance(a, np.ndarray) else a for a in (data, indices, indptr))
        h_data, h_ind, h_ptr = np.asarray(h_data), np.asarray(h_ind), np.asarray(h_ptr)
        for name, a in (("data", h_data), ("indices", h_ind), ("indptr", h_ptr)):
            if a.ndim != 1:
                raise ValueError(f"CSR: {name} must be 1-D, got shape {a.shape}")
        for name, a in (("indices", h_ind), ("indptr", h_ptr)):
            if not np.issubdtype(a.dtype, np.integer):
                raise TypeError(f"CSR: {name} must be an integer array, got {a.dtype}")
        if h_ptr.shape[0] != m + 1:
            raise ValueError(f"CSR: indptr must have M + 1 = {m + 1} entries, got {h_ptr.shape[0]}")
        nnz = h_ind.shape[0]
        if h_ptr[0] != 0 or h_ptr[-1] != nnz:
            raise ValueError(f"CSR: indptr must start at 0 and end at nnz = {nnz}, got {h_ptr[0]} .. {h_ptr[-1]}")
        if np.any(np.diff(h_ptr) < 0):
            bad = int(np.argmax(np.diff(h_ptr) < 0))
            raise ValueError(f"CSR: indptr is not monotone (indptr[{bad}] = {h_ptr[bad]} > indptr[{bad + 1}] = {h_ptr[bad + 1]})")
        if h_data.shape[0] != nnz:
            raise ValueError(f"CSR: data has {h_data.shape[0]} entries but indices has {nnz}")
        if nnz and (h_ind.min() < 0 or h_ind.max() >= k):
            bad = int(np.argmax((h_ind < 0) | (h_ind >= k)))
            raise ValueError(f"CSR: column index indices[{bad}] = {h_ind[bad]} is outside [0, {k})")
        if nnz >= 2**31:
            raise ValueError(f"CSR: {nnz} nonzeros; dnnpar kernels index them with 32 bits")
        if codebook is None:
            if h_data.dtype != np.float32:
                raise TypeError(f"CSR: data must be float32 (or uint8 with a codebook), got {h_data.dtype}")
        else:
            h_cb = np.asarray(be.to_numpy(codebook) if not isinstance(codebook, np.ndarray) else codebook)
            if h_cb.dtype != np.float32 or h_cb.ndim != 1 or not 1 <= h_cb.shape[0] <= 256:
                raise TypeError(f"CSR: codebook must be a 1-D float32 array of 1..256 entries, "
                                f"got {h_cb.dtype} of shape {h_cb.shape}")
            if h_data.dtype != np.uint8:
                raise TypeError(f"CSR: with a codebook, data must hold uint8 codes, got {h_data.dtype}")
            if nnz and h_data.max() >= h_cb.shape[0]:
                raise ValueError(f"CSR: code {int(h_data.max())} is outside the codebook of {h_cb.shape[0]} entries")
            self.codebook = be.asarray(np.ascontiguousarray(h_cb))
        if codebook is None:
            self.codebook = None
        self.shape = (m, k)
        self.nnz = nnz
        self.backend = be.name
        self.data = be.asarray(np.ascontiguousarray(h_data))
        self.indices = be.asarray(np.ascontiguousarray(h_ind, dtype=np.int32))
        self.indptr = be.asarray(np.ascontiguousarray(h_ptr, dtype=np.int32))
        self._values = None
        self._scipy = None
        self._compact = None

    @classmethod
    def from_dense(cls, a, codebook=None):
        """CSR of the nonzeros of a 2-D array (with ``codebook``: ``a`` holds codes, 0 means absent)."""
        h = np.asarray(get_backend().to_numpy(a) if not isinstance(a, np.ndarray) else a)
        if h.ndim != 2:
            raise ValueError(f"CSR.from_dense: need a 2-D array, got shape {h.shape}")
        rows, cols = np.nonzero(h)
        indptr = np.zeros(h.shape[0] + 1, dtype=np.int32)
        np.cumsum(np.bincount(rows, minlength=h.shape[0]), out=indptr[1:])
        return cls(h[rows, cols], cols.astype(np.int32), indptr, h.shape, codebook=codebook)

    def values(self):
        """The float32 values (codebook entries looked up once and cached), on the matrix's backend."""
        if self.codebook is None:
            return self.data
        if self._values is None:
            self._values = self.codebook[self.data]
        return self._values

    def scipy(self):
        """The matrix as a ``scipy.sparse.csr_array`` sharing this CSR's arrays, or None when
        SciPy is not installed (numpy backend only)."""
        if self.backend == "cuda":
            raise TypeError("CSR.scipy(): this matrix lives on the GPU; use cupyx.scipy.sparse")
        if self._scipy is None:
            if not SCIPY["use"]:
                return None
            try:
                import scipy.sparse
            except ImportError:
                return None
            self._scipy = scipy.sparse.csr_array((self.values(), self.indices, self.indptr), shape=self.shape)
        return self._scipy

    def compact(self) -> CompactCSR | None:
        """The matrix in Deep Compression's storage format (:class:`CompactCSR`: uint8 gaps with
        fillers, uint8 codes, int64 row offsets), built on first use and cached; None when the
        matrix has none (a column repeated within a row, or fillers needed and no codebook entry
        equal to 0.0). Codebook matrices on a host backend only."""
        if self.codebook is None:
            raise TypeError("CSR.compact(): only a matrix of uint8 codes with a codebook has the compact form")
        if self.backend == "cuda":
            raise TypeError("CSR.compact(): this matrix lives on the GPU; the compact form is for the CPU kernels")
        if self._compact is None:
            self._compact = _compact(self.indptr, self.indices, self.data, self.codebook, self.shape) or False
        return self._compact or None

    def to_dense(self):
        """The dense matrix, on the backend the CSR lives on."""
        from .backend import _make

        be = _make(self.backend)
        out = np.zeros(self.shape, dtype=np.float32)
        vals = be.to_numpy(self.values())
        ptr = be.to_numpy(self.indptr)
        rows = np.repeat(np.arange(self.shape[0]), np.diff(ptr))
        out[rows, be.to_numpy(self.indices)] = vals
        return be.asarray(out)

    def __repr__(self):
        kind = f"uint8 codes, codebook of {self.codebook.shape[0]}" if self.codebook is not None else "float32"
        return f"<CSR {self.shape[0]}x{self.shape[1]}, nnz={self.nnz} ({kind}) on {self.backend}>"
