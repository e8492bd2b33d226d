"""Native CPU kernels for the numpy backend (``dnnpar/cpu/*.cpp``), built at first use.

Today one file: ``csr_codebook.cpp``, the CSR x codebook products (SpMV and SpMM) straight
from Deep Compression's storage format, 2 bytes per stored entry (see
:meth:`dnnpar.sparse.CSR.compact`). It is compiled the way the emu backend compiles kernels:
``$CXX`` (default ``g++``) with ``-O3 -march=native -fopenmp``, cached under
``~/.cache/dnnpar/cpu`` (``$DNNPAR_CACHE``) by a digest of the source, the compiler, the flags
and this CPU (``-march=native`` binaries must not travel to another machine through a shared
cache), renamed into place atomically, and loaded with ctypes.

Nothing here is required: without a compiler, or when it fails, :func:`library` returns None
(a RuntimeWarning says why, once per process) and the numpy backend stays on SciPy / NumPy.
``DNNPAR_NATIVE=0`` in the environment, or ``dnnpar.sparse.NATIVE["use"] = False``, turns the
kernels off.

Threads: OpenMP's default (``OMP_NUM_THREADS``, else every core this process may use), or
``threads=`` per call. Unless the environment chooses a wait policy, OpenMP is started with
passive waiting (see :func:`_load`): on a shared machine spinning threads cost more than they save.
"""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import threading
import warnings
from pathlib import Path

import numpy as np

from .sources import build_shared_library, cache_dir, digest

SOURCE = Path(__file__).resolve().parent.parent / "cpu" / "csr_codebook.cpp"
#: -O3 for this machine's vector units, OpenMP over rows; the language level is pinned, and FMA
#: contraction asked for explicitly (g++ turns it off in ISO modes such as -std=c++17)
CXXFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-ffp-contract=fast")
#: flags dropped, in turn, when a compiler rejects the full set (a clang without libomp, a
#: compiler that does not know -march=native): a single-threaded or generic build beats none
FALLBACK_DROPS = (("-fopenmp",), ("-fopenmp", "-march=native"))
#: what the library says for dnnpar_cpu_abi(); a library built from another revision is rebuilt
#: anyway (the digest covers the source), this guards against a hand-placed file
ABI = 3

_lock = threading.Lock()
_state: dict = {"tried": False, "lib": None, "reason": None, "warned": False}


class NativeBuildError(RuntimeError):
    """The C++ compiler rejected a native CPU kernel."""


def _cpu_signature() -> str:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        keep = [ln for ln in lines if ln.split(":")[0].strip() in ("vendor_id", "model name", "flags", "Features",
                                                                     "CPU implementer", "CPU part")]
        if keep:
            return "\n".join(dict.fromkeys(keep))  # one copy of each line (every core repeats them)
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()} {platform.platform()}"


def _build(cxx: str) -> Path:
    """The compiled library (cached), with the full flags or, failing that, fewer."""
    code = SOURCE.read_text()
    first_error = None
    for drop in ((),) + FALLBACK_DROPS:
        flags = [f for f in CXXFLAGS if f not in drop]
        key = digest(code, cxx, " ".join(flags), _cpu_signature())
        so = cache_dir("cpu") / f"{SOURCE.stem}-{key}.so"
        try:
            return build_shared_library(code, so, lambda src, out: [cxx, *flags, "-x", "c++", str(src), "-o", str(out)],
                                        error=NativeBuildError,
                                        what=f"{cxx} could not compile {SOURCE.name} with {' '.join(flags)}")
        except NativeBuildError as e:
            first_error = first_error or e
    raise first_error


def _openmp_loaded() -> bool:
    """Whether an OpenMP runtime is already mapped into this process (Linux; False elsewhere)."""
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        return False
    return any(name in maps for name in ("libgomp", "libomp", "libiomp"))


def _load(so: Path) -> ctypes.CDLL:
    """Load the library. Unless the user chose a wait policy (OMP_WAIT_POLICY, GOMP_SPINCOUNT),
    OpenMP is loaded with OMP_WAIT_POLICY=passive, set only for the load (the runtime reads it
    once, when it starts): threads that run out of rows sleep instead of spinning. On a machine
    shared with other work a spinning thread takes the core its partner needs; measured on 2
    cores with one other busy process, fc6 SpMV went from 1.2 ms to a steady 8 ms with the default
    spin, and stayed near the single-thread time with passive waiting."""
    chose = any(k in os.environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
    already = _openmp_loaded()
    if chose:
        _state["wait_policy"] = "as set in the environment"
    elif already:
        _state["wait_policy"] = "the default (an OpenMP runtime was already loaded)"
    else:
        _state["wait_policy"] = "passive (set by dnnpar while loading OpenMP)"
    if chose or already:
        return ctypes.CDLL(str(so), mode=ctypes.RTLD_LOCAL)
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        return ctypes.CDLL(str(so), mode=ctypes.RTLD_LOCAL)
    finally:
        os.environ.pop("OMP_WAIT_POLICY", None)


def wait_policy() -> str | None:
    """How the kernels' OpenMP threads wait for work, in words (None before the library loads)."""
    return _state.get("wait_policy")


def _compile(cxx: str) -> ctypes.CDLL:
    so = _build(cxx)
    lib = _load(so)
    lib.dnnpar_cpu_abi.restype = ctypes.c_int
    if lib.dnnpar_cpu_abi() != ABI:
        raise NativeBuildError(f"{so} reports ABI {lib.dnnpar_cpu_abi()}, expected {ABI}")
    lib.dnnpar_cpu_threads.restype = ctypes.c_int
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.dnnpar_csr_cb_spmv.restype = None
    lib.dnnpar_csr_cb_spmv.argtypes = [i64, p, p, p, p, i32, p, p, i32]
    lib.dnnpar_csr_cb_spmm.restype = None
    lib.dnnpar_csr_cb_spmm.argtypes = [i64, i64, p, p, p, p, i32, p, p, i32]
    return lib


def library():
    """The loaded kernel library (ctypes.CDLL), or None when it cannot be had here (the reason
    is in :func:`unavailable_reason`). Compiles at most once per process."""
    if _state["tried"]:
        return _state["lib"]
    with _lock:
        if not _state["tried"]:
            lib, reason = None, None
            cxx = os.environ.get("CXX", "g++")
            if os.environ.get("DNNPAR_NATIVE", "") == "0":
                reason = "DNNPAR_NATIVE=0 is set"
            elif not SOURCE.is_file():
                reason = f"its source {SOURCE} is not installed"
            elif shutil.which(cxx) is None:
                reason = f"the C++ compiler {cxx!r} is not on PATH (install g++ or set CXX)"
            else:
                try:
                    lib = _compile(cxx)
                except (NativeBuildError, OSError) as e:
                    reason = f"{type(e).__name__}: {e}"
            _state.update(tried=True, lib=lib, reason=reason)
            if lib is None and not _state["warned"] and not reason.startswith("DNNPAR_NATIVE"):
                _state["warned"] = True
                warnings.warn(f"dnnpar: the native CPU kernel for CSR x codebook products is unavailable "
                              f"({reason.splitlines()[0]}); the numpy backend uses SciPy / NumPy instead",
                              RuntimeWarning, stacklevel=2)
    return _state["lib"]


def unavailable_reason() -> str | None:
    """None when :func:`library` loaded the kernels, else why not (tries to load them first)."""
    library()
    return _state["reason"]


def threads() -> int:
    """Threads a native product uses (OpenMP's maximum here), or 0 without the library."""
    lib = library()
    return int(lib.dnnpar_cpu_threads()) if lib is not None else 0


def _loaded():
    lib = library()
    if lib is None:
        raise RuntimeError(f"dnnpar's native CPU kernels are unavailable: {unavailable_reason()}")
    return lib


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _threads_arg(threads) -> int:
    if threads is None:
        return 0
    if not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive int or None (OpenMP's default), got {threads!r}")
    return int(threads)


def spmv(compact, x: np.ndarray, out: np.ndarray, threads: int | None = None) -> np.ndarray:
    """``out[:] = A x`` for a :class:`dnnpar.sparse.CompactCSR` ``compact`` (x float32, K entries,
    C-contiguous; out float32, M entries), on ``threads`` threads (None: OpenMP's default).
    Fillers contribute nothing, even where x is inf or NaN."""
    m, k = compact.shape
    if x.dtype != np.float32 or x.shape != (k,) or not x.flags.c_contiguous:
        raise ValueError(f"native spmv: x must be a C-contiguous float32 vector of {k}, got {x.dtype} {x.shape}")
    if out.dtype != np.float32 or out.shape != (m,) or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"native spmv: out must be a writeable C-contiguous float32 vector of {m}")
    # fillers are skipped; with x all finite, 0 * x adds nothing anyway, and the kernel without
    # the per-entry select is faster (one pass over x is cheap beside the product)
    filler = compact.filler_code if compact.fillers and not np.isfinite(x).all() else -1
    _loaded().dnnpar_csr_cb_spmv(m, _ptr(compact.rowptr), _ptr(compact.gaps), _ptr(compact.codes),
                                     _ptr(compact.codebook), int(filler), _ptr(x), _ptr(out),
                                     _threads_arg(threads))
    return out


def spmm(compact, X: np.ndarray, out: np.ndarray, threads: int | None = None) -> np.ndarray:
    """``out[:] = A X`` (X float32 (K, B) row-major; out float32 (M, B) row-major)."""
    m, k = compact.shape
    if X.dtype != np.float32 or X.ndim != 2 or X.shape[0] != k or not X.flags.c_contiguous:
        raise ValueError(f"native spmm: X must be a C-contiguous float32 ({k}, B) array, got {X.dtype} {X.shape}")
    b = X.shape[1]
    if out.dtype != np.float32 or out.shape != (m, b) or not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"native spmm: out must be a writeable C-contiguous float32 ({m}, {b}) array")
    if b:
        _loaded().dnnpar_csr_cb_spmm(m, b, _ptr(compact.rowptr), _ptr(compact.gaps), _ptr(compact.codes),
                                         _ptr(compact.codebook), int(compact.filler_code), _ptr(X), _ptr(out),
                                         _threads_arg(threads))
    return out
