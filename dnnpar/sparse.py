"""Compressed sparse row matrices on the active backend, checked once at construction."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from .backend import get_backend
from .compress.relative_csr import columns as relative_columns, relative_stream, row_gaps


#: set "use" to False to run the NumPy fallback even where SciPy is installed (tests)
SCIPY = {"use": True}
#: set "use" to False to keep codebook matrices on SciPy / NumPy on the numpy backend even where
#: the native CPU kernel builds (tests, benchmarks; DNNPAR_NATIVE=0 does it for a whole process)
NATIVE = {"use": True}

#: a run of more zeros than this is bridged by filler entries in the compact form (uint8 gaps;
#: a .dnnz layer of index_bits <= 8 bridges at 2^index_bits - 1, which the kernel reads as well)
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
    entries of gap 255 (in a .dnnz layer's streams, which the kernel reads as they are: gap
    2^index_bits - 1, code 0) whose code is ``filler_code``, a code no stored entry uses (Deep
    Compression's 0 when the codebook starts with 0.0 and no entry points at it; -1 when there are
    no fillers), whose codebook entry is 0.0. The kernel skips fillers: they contribute exactly
    nothing, even where x is inf or NaN, as in SciPy's and the GPU kernels' products, which
    never see them. All arrays are read-only.
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

    @functools.cached_property
    def code_span(self) -> int:
        """One past the largest code of any entry (fillers included; 0 with no entries): a kernel
        may hold codebook[:code_span] in registers (fc layers' 5-bit codebooks: 32 entries)."""
        return int(self.codes.max()) + 1 if self.codes.shape[0] else 0

    @property
    def nbytes(self) -> int:
        """Bytes of the streams: entries (gap + code), row offsets and the 256-entry codebook."""
        return int(self.gaps.nbytes + self.codes.nbytes + self.rowptr.nbytes + self.codebook.nbytes)

    def bytes_per_nonzero(self) -> float:
        """All bytes of the compact form (fillers, row offsets and codebook included) per nonzero."""
        nnz = self.entries - self.fillers
        return self.nbytes / nnz if nnz else float("nan")

    def stored(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The stored entries decoded to plain CSR (fillers dropped): (codes uint8 (nnz,), absolute
        columns int32 (nnz,), row starts int32 (M + 1,)). What SciPy and the GPU kernels need."""
        m, k = self.shape
        cols = relative_columns(self.rowptr, self.gaps, k)
        keep = self.codes != self.filler_code if self.fillers else slice(None)
        counts = np.diff(self.rowptr)
        if self.fillers:
            counts = np.bincount(np.repeat(np.arange(m), counts)[keep], minlength=m)
        indptr = np.zeros(m + 1, np.int64)
        np.cumsum(counts, out=indptr[1:])
        return self.codes[keep], cols[keep].astype(np.int32), indptr.astype(np.int32)


def padded_codebook(codebook: np.ndarray) -> np.ndarray:
    """``codebook`` zero-padded to the 256 entries a uint8 code may index (a private copy)."""
    cb = np.zeros(256, np.float32)
    cb[:codebook.shape[0]] = codebook
    return cb


def _compact(indptr, indices, codes, codebook, shape) -> CompactCSR | None:
    """The compact form of a validated codebook CSR (host arrays), or None when it has none: a
    column repeated within a row, or fillers needed while every one of the 256 codes is used by
    a stored entry. The stream comes from the format's one encoder
    (:func:`dnnpar.compress.relative_csr.relative_stream`)."""
    m, _ = shape
    ptr = indptr.astype(np.int64)
    cols = indices.astype(np.int64)
    gap = row_gaps(ptr, cols)
    if cols.shape[0] and gap.min() < 0:  # columns out of order within a row: sort each row
        rows = np.repeat(np.arange(m, dtype=np.int64), np.diff(ptr))
        order = np.lexsort((cols, rows))
        cols, codes = cols[order], codes[order]
        gap = row_gaps(ptr, cols)
        if gap.min() < 0:
            return None  # a repeated column: a gap cannot say "the same column again"
    gaps, pos, rowptr = relative_stream(ptr, gap, MAX_GAP, np.uint8)
    fillers = int(gaps.shape[0] - cols.shape[0])
    cb = padded_codebook(codebook)
    filler_code = -1
    if fillers:
        # a code no stored entry uses, so the kernel can tell a filler from a stored zero
        free = np.flatnonzero(np.bincount(codes, minlength=256) == 0)
        if free.size == 0:
            return None  # all 256 codes are stored entries: a filler would be mistaken for one
        zero = free[cb[free] == 0.0]
        filler_code = int(zero[0] if zero.size else free[0])
        cb[filler_code] = 0.0  # this private copy's entry is read by fillers only
    out_codes = np.full(gaps.shape[0], max(filler_code, 0), np.uint8)  # every slot not a filler is overwritten
    out_codes[pos] = codes
    return CompactCSR((int(shape[0]), int(shape[1])), _frozen(rowptr), _frozen(gaps), _frozen(out_codes),
                      _frozen(cb), fillers, filler_code)


def _frozen(a: np.ndarray) -> np.ndarray:
    """``a`` made read-only (a private array of the matrix: nothing may change what was checked)."""
    a.flags.writeable = False
    return a


def _host_copy(be, a, name: str) -> np.ndarray:
    """A private, C-contiguous host copy of a CSR argument (a NumPy array, a backend array or a
    sequence): what is validated and kept, so later changes to the caller's array cannot reach
    the kernels."""
    if not isinstance(a, np.ndarray) and hasattr(a, "__cuda_array_interface__"):
        a = be.to_numpy(a)
    try:
        h = np.array(a, copy=True, order="C")
    except (TypeError, ValueError) as e:
        raise TypeError(f"CSR: {name} must be an array, got {type(a).__name__} ({e})") from None
    if h.dtype.kind not in "biuf":
        raise TypeError(f"CSR: {name} must be a numeric array, got {h.dtype}")
    if h.ndim != 1:
        raise ValueError(f"CSR: {name} must be 1-D, got shape {h.shape}")
    return h


class CSR:
    """An M x K matrix in CSR form.

    data: (nnz,) float32 values, or uint8 indices into ``codebook`` ((ncodes,) float32, ncodes <= 256)
    indices: (nnz,) column indices; indptr: (M + 1,) row starts. Integer arrays are stored as int32.
    The arrays are copied, validated once on the host (monotone indptr, in-range columns and
    codes, sizes within the kernels' 32-bit indices) and kept private and read-only (on the
    numpy and emu backends; on cuda, device copies only this matrix holds), so changing the
    arrays the caller passed cannot reach a kernel. ``data``, ``indices``, ``indptr`` and
    ``codebook`` are read-only properties.
    """

    def __init__(self, data, indices, indptr, shape, codebook=None):
        be = get_backend()
        if not (isinstance(shape, (tuple, list)) and len(shape) == 2
                and all(isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_)) and s >= 1
                        for s in shape)):
            raise ValueError(f"CSR: shape must be two positive ints (M, K), got {shape!r}")
        m, k = int(shape[0]), int(shape[1])
        if max(m, k) >= 2**31:
            raise ValueError(f"CSR: shape ({m}, {k}) does not fit the kernels' 32-bit row and column indices")
        h_data, h_ind, h_ptr = (_host_copy(be, a, n) for a, n in ((data, "data"), (indices, "indices"),
                                                                  (indptr, "indptr")))
        for name, a in (("indices", h_ind), ("indptr", h_ptr)):
            if not np.issubdtype(a.dtype, np.integer):
                raise TypeError(f"CSR: {name} must be an integer array, got {a.dtype}")
        if h_ptr.shape[0] != m + 1:
            raise ValueError(f"CSR: indptr must have M + 1 = {m + 1} entries, got {h_ptr.shape[0]}")
        nnz = h_ind.shape[0]
        if nnz >= 2**31:
            raise ValueError(f"CSR: {nnz} nonzeros; dnnpar kernels index them with 32 bits")
        if h_ptr[0] != 0 or h_ptr[-1] != nnz:
            raise ValueError(f"CSR: indptr must start at 0 and end at nnz = {nnz}, got {h_ptr[0]} .. {h_ptr[-1]}")
        steps = np.diff(h_ptr.astype(np.int64))
        if np.any(steps < 0):
            bad = int(np.argmax(steps < 0))
            raise ValueError(f"CSR: indptr is not monotone (indptr[{bad}] = {h_ptr[bad]} > indptr[{bad + 1}] = {h_ptr[bad + 1]})")
        if h_data.shape[0] != nnz:
            raise ValueError(f"CSR: data has {h_data.shape[0]} entries but indices has {nnz}")
        if nnz and (h_ind.min() < 0 or h_ind.max() >= k):
            bad = int(np.argmax((h_ind < 0) | (h_ind >= k)))
            raise ValueError(f"CSR: column index indices[{bad}] = {h_ind[bad]} is outside [0, {k})")
        h_cb = None
        if codebook is None:
            if h_data.dtype != np.float32:
                raise TypeError(f"CSR: data must be float32 (or uint8 with a codebook), got {h_data.dtype}")
        else:
            h_cb = _host_copy(be, codebook, "codebook")
            if h_cb.dtype != np.float32 or not 1 <= h_cb.shape[0] <= 256:
                raise TypeError(f"CSR: codebook must be a 1-D float32 array of 1..256 entries, "
                                f"got {h_cb.dtype} of shape {h_cb.shape}")
            if h_data.dtype != np.uint8:
                raise TypeError(f"CSR: with a codebook, data must hold uint8 codes, got {h_data.dtype}")
            if nnz and h_data.max() >= h_cb.shape[0]:
                raise ValueError(f"CSR: code {int(h_data.max())} is outside the codebook of {h_cb.shape[0]} entries")
        self.shape = (m, k)
        self.nnz = nnz
        self.backend = be.name
        # the validated copies, in the kernels' dtypes (the range checks above make the casts exact)
        self._data = be.asarray(_frozen(h_data))
        self._indices = be.asarray(_frozen(h_ind.astype(np.int32, copy=False)))
        self._indptr = be.asarray(_frozen(h_ptr.astype(np.int32, copy=False)))
        self._codebook = None if h_cb is None else be.asarray(_frozen(h_cb))
        self._values = None
        self._scipy = None
        self._compact = None

    @classmethod
    def from_compact(cls, compact: CompactCSR, ncodes: int) -> "CSR":
        """The codebook matrix whose compact form is ``compact``, its streams taken as they are
        (not copied, not re-encoded): a .dnnz layer's decoded entry streams go to the native
        kernel this way (:func:`dnnpar.compress.pipeline.load`). ``ncodes``: the codebook's own
        length (``compact.codebook[:ncodes]`` is :attr:`codebook`). The streams must already
        be checked (the .dnnz reader does: every row ends before column K, fillers only where
        the encoder puts them, codes below ``ncodes``). On the numpy backend the absolute
        columns (``indices``, ``indptr``, ``data``: what SciPy and to_dense use) are decoded
        from the streams on first use only; on other backends at once."""
        if not 1 <= ncodes <= 256:
            raise ValueError(f"CSR.from_compact: ncodes must be in 1..256, got {ncodes}")
        if max(compact.shape) >= 2**31 or compact.entries >= 2**31:
            raise ValueError(f"CSR.from_compact: {compact.shape} with {compact.entries} entries does not fit the "
                             "kernels' 32-bit indices")
        be = get_backend()
        cb = np.array(compact.codebook[:ncodes], np.float32)
        if be.name == "cuda":
            codes, cols, indptr = compact.stored()
            return cls(codes, cols, indptr, compact.shape, codebook=cb)
        self = cls.__new__(cls)
        self.shape, self.backend = tuple(compact.shape), be.name
        self.nnz = compact.entries - compact.fillers
        self._data = self._indices = self._indptr = None
        self._codebook = _frozen(cb)
        self._values = self._scipy = None
        self._compact = compact
        return self

    def _get(self, name: str):
        """A plain CSR array, decoded from the compact streams on first use (from_compact)."""
        if self._indptr is None:
            codes, cols, indptr = self._compact.stored()
            self._data, self._indices, self._indptr = _frozen(codes), _frozen(cols), _frozen(indptr)  # indptr last
        return getattr(self, name)

    data = property(lambda self: self._get("_data"), doc="(nnz,) float32 values or uint8 codes (read-only)")
    indices = property(lambda self: self._get("_indices"), doc="(nnz,) int32 column indices (read-only)")
    indptr = property(lambda self: self._get("_indptr"), doc="(M + 1,) int32 row starts (read-only)")
    codebook = property(lambda self: self._codebook, doc="(ncodes,) float32 codebook or None (read-only)")

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
            v = self.codebook[self.data]
            self._values = _frozen(v) if isinstance(v, np.ndarray) else v
        return self._values

    def scipy(self):
        """The matrix as a ``scipy.sparse.csr_array`` sharing this CSR's (read-only) arrays, or None
        when SciPy is not installed (numpy backend only). The products run on this object, so its
        arrays are read-only too."""
        if self.backend == "cuda":
            raise TypeError("CSR.scipy(): this matrix lives on the GPU; use cupyx.scipy.sparse")
        if self._scipy is None:
            if not SCIPY["use"]:
                return None
            try:
                import scipy.sparse
            except ImportError:
                return None
            sp = scipy.sparse.csr_array((self.values(), self.indices, self.indptr), shape=self.shape)
            for a in (sp.data, sp.indices, sp.indptr):  # copies SciPy made are frozen like ours
                if a.flags.writeable:
                    _frozen(a)
            self._scipy = sp
        return self._scipy

    def compact(self) -> CompactCSR | None:
        """The matrix in Deep Compression's storage format (:class:`CompactCSR`: uint8 gaps with
        fillers, uint8 codes, int64 row offsets), built on first use and cached; None when the
        matrix has none (a column repeated within a row, or fillers needed while all 256 codes
        are used by stored entries). Codebook matrices on a host backend only."""
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
