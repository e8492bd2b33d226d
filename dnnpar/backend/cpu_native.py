"""Native CPU kernels for the numpy backend (``dnnpar/cpu/*.cpp``), each built at first use.

One shared library per source, listed in :data:`NATIVE_SOURCES`:

- ``csr_codebook.cpp``: the CSR x codebook products (SpMV and SpMM) straight from Deep
  Compression's storage format, 2 bytes per stored entry (see :meth:`dnnpar.sparse.CSR.compact`);
- ``depthwise.cpp``: depthwise convolution forward and backward (dx, dw), float32 NCHW.

Every source goes through the same path: ``$CXX`` (default ``g++``) with ``-O3 -march=native
-fopenmp``, cached under ``~/.cache/dnnpar/cpu`` (``$DNNPAR_CACHE``) by a digest of the source,
the compiler, the flags and this CPU (``-march=native`` binaries must not travel to another
machine through a shared cache), renamed into place atomically, loaded with ctypes, and its
``dnnpar_cpu_abi()`` checked against the table.

Nothing here is required: without a compiler, or when it fails, :func:`library` returns None
(a RuntimeWarning says why, once per source and process) and the numpy backend stays on its
SciPy / NumPy code. ``DNNPAR_NATIVE=0`` in the environment turns every native kernel off;
``dnnpar.sparse.NATIVE["use"] = False`` and ``dnnpar.ops.depthwise.NATIVE["use"] = False`` turn
one family off.

Threads -- the one rule, applied in :func:`_load`: native kernels and BLAS share the cores, never
stacking one pool on top of the other. When the first native library loads, OpenMP's thread
count is set to BLAS's (as threadpoolctl reports it), unless ``OMP_NUM_THREADS`` chooses it; the
two then never run at once (an op calls one or the other), so the process never has more busy
threads than BLAS alone would. ``threadpoolctl.threadpool_limits(n)`` later limits both pools
(it sees dnnpar's OpenMP runtime too), and ``threads=`` overrides it per call. Unless the
environment chooses a wait policy, OpenMP is started with passive waiting: on a shared machine
spinning threads cost more than they save.
"""
from __future__ import annotations

import ctypes
import os
import platform
import shutil
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .sources import build_shared_library, cache_dir, digest

CPU_DIR = Path(__file__).resolve().parent.parent / "cpu"
#: -O3 for this machine's vector units, OpenMP over rows; the language level is pinned, and FMA
#: contraction asked for explicitly (g++ turns it off in ISO modes such as -std=c++17)
CXXFLAGS = ("-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=c++17", "-ffp-contract=fast")
#: flags dropped, in turn, when a compiler rejects the full set (a clang without libomp, a
#: compiler that does not know -march=native): a single-threaded or generic build beats none
FALLBACK_DROPS = (("-fopenmp",), ("-fopenmp", "-march=native"))

_P, _I64, _I32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int


@dataclass(frozen=True)
class NativeSource:
    """One ``dnnpar/cpu/<stem>.cpp``: the ABI its ``dnnpar_cpu_abi()`` must report (a library
    built from another revision is rebuilt anyway, the digest covers the source; this guards
    against a hand-placed file), what it computes and what runs without it (for the warning),
    the argtypes of each exported function that returns nothing, and (argtypes, restype) of
    those that return a value."""
    stem: str
    abi: int
    what: str
    fallback: str
    functions: dict
    returning: dict = None

    @property
    def path(self) -> Path:
        return CPU_DIR / f"{self.stem}.cpp"


NATIVE_SOURCES = {s.stem: s for s in (
    NativeSource("csr_codebook", 3, "CSR x codebook products", "SciPy / NumPy", {
        "dnnpar_csr_cb_spmv": [_I64, _P, _P, _P, _P, _I32, _P, _P, _I32],
        "dnnpar_csr_cb_spmm": [_I64, _I64, _P, _P, _P, _P, _I32, _P, _P, _I32],
    }),
    NativeSource("depthwise", 1, "depthwise convolution", "NumPy", {
        "dnnpar_depthwise_forward": [_P, _P, _P, _P, _P, _I32, _I32],
        "dnnpar_depthwise_backward": [_P, _P, _P, _P, _P, _P, _I32, _I32],
    }, {"dnnpar_depthwise_fast": ([_P], ctypes.c_int)}),
)}

_lock = threading.Lock()
_states: dict = {stem: {"tried": False, "lib": None, "reason": None, "warned": False} for stem in NATIVE_SOURCES}
#: process-wide facts about the OpenMP runtime the libraries share (set by the first load)
_omp: dict = {"wait_policy": None, "threads_rule": None}


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


def _build(src: NativeSource, cxx: str) -> Path:
    """The compiled library of ``src`` (cached), with the full flags or, failing that, fewer."""
    code = src.path.read_text()
    first_error = None
    for drop in ((),) + FALLBACK_DROPS:
        flags = [f for f in CXXFLAGS if f not in drop]
        key = digest(code, cxx, " ".join(flags), _cpu_signature())
        so = cache_dir("cpu") / f"{src.stem}-{key}.so"
        try:
            return build_shared_library(code, so, lambda s, out: [cxx, *flags, "-x", "c++", str(s), "-o", str(out)],
                                        error=NativeBuildError,
                                        what=f"{cxx} could not compile {src.path.name} with {' '.join(flags)}")
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


def blas_threads() -> int | None:
    """The thread count of the BLAS NumPy uses, as threadpoolctl reports it (None when it
    cannot say: threadpoolctl missing, or no BLAS found)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return None
    counts = [int(i["num_threads"]) for i in threadpool_info() if i.get("user_api") == "blas"]
    return max(counts) if counts else None


def _load(so: Path) -> ctypes.CDLL:
    """Load a library. Unless the user chose a wait policy (OMP_WAIT_POLICY, GOMP_SPINCOUNT),
    OpenMP is loaded with OMP_WAIT_POLICY=passive, set only for the load (the runtime reads it
    once, when it starts): threads that run out of work sleep instead of spinning. On a machine
    shared with other work a spinning thread takes the core its partner needs (the fc6 SpMV
    became several times slower beside one other busy process with the default spin). The
    first load that brings OpenMP also applies the thread rule of the module docstring."""
    chose = any(k in os.environ for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT"))
    already = _openmp_loaded()
    if _omp["wait_policy"] is None:
        if chose:
            _omp["wait_policy"] = "as set in the environment"
        elif already:
            _omp["wait_policy"] = "the default (an OpenMP runtime was already loaded)"
        else:
            _omp["wait_policy"] = "passive (set by dnnpar while loading OpenMP)"
    if chose or already:
        lib = ctypes.CDLL(str(so), mode=ctypes.RTLD_LOCAL)
    else:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
        try:
            lib = ctypes.CDLL(str(so), mode=ctypes.RTLD_LOCAL)
        finally:
            os.environ.pop("OMP_WAIT_POLICY", None)
    if _omp["threads_rule"] is None:
        _omp["threads_rule"] = _match_blas_threads(lib)
    return lib


def _match_blas_threads(lib: ctypes.CDLL) -> str:
    """Set OpenMP's thread count to BLAS's (the thread rule); says what was done."""
    if "OMP_NUM_THREADS" in os.environ:
        return f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']} (as set in the environment)"
    try:
        set_threads = lib.omp_set_num_threads  # found through the library's own dependencies
    except AttributeError:
        return "one thread (built without OpenMP)"
    n = blas_threads()
    if n is None:
        return "OpenMP's default (threadpoolctl found no BLAS to match)"
    set_threads.argtypes, set_threads.restype = [_I32], None
    set_threads(n)
    return f"{n}, BLAS's thread count"


def wait_policy() -> str | None:
    """How the kernels' OpenMP threads wait for work, in words (None before a library loads)."""
    return _omp["wait_policy"]


def threads_rule() -> str | None:
    """How the kernels' default thread count was chosen, in words (None before a library loads)."""
    return _omp["threads_rule"]


def _compile(src: NativeSource, cxx: str) -> ctypes.CDLL:
    so = _build(src, cxx)
    lib = _load(so)
    lib.dnnpar_cpu_abi.restype = ctypes.c_int
    if lib.dnnpar_cpu_abi() != src.abi:
        raise NativeBuildError(f"{so} reports ABI {lib.dnnpar_cpu_abi()}, expected {src.abi}")
    lib.dnnpar_cpu_threads.restype = ctypes.c_int
    for name, argtypes in src.functions.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = None, argtypes
    for name, (argtypes, restype) in (src.returning or {}).items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    return lib


def _source(name: str) -> NativeSource:
    try:
        return NATIVE_SOURCES[name]
    except KeyError:
        raise ValueError(f"unknown native CPU source {name!r}: one of {', '.join(NATIVE_SOURCES)}") from None


def library(name: str = "csr_codebook"):
    """The loaded kernel library of ``dnnpar/cpu/<name>.cpp`` (ctypes.CDLL), or None when it
    cannot be had here (the reason is in :func:`unavailable_reason`). Compiles at most once per
    process and source."""
    state = _states[_source(name).stem]
    if state["tried"]:
        return state["lib"]
    with _lock:
        if not state["tried"]:
            src = NATIVE_SOURCES[name]
            lib, reason = None, None
            cxx = os.environ.get("CXX", "g++")
            if os.environ.get("DNNPAR_NATIVE", "") == "0":
                reason = "DNNPAR_NATIVE=0 is set"
            elif not src.path.is_file():
                reason = f"its source {src.path} is not installed"
            elif shutil.which(cxx) is None:
                reason = f"the C++ compiler {cxx!r} is not on PATH (install g++ or set CXX)"
            else:
                try:
                    lib = _compile(src, cxx)
                except (NativeBuildError, OSError, AttributeError) as e:
                    reason = f"{type(e).__name__}: {e}"
            state.update(tried=True, lib=lib, reason=reason)
            if lib is None and not state["warned"] and not reason.startswith("DNNPAR_NATIVE"):
                state["warned"] = True
                warnings.warn(f"dnnpar: the native CPU kernel for {src.what} is unavailable "
                              f"({reason.splitlines()[0]}); the numpy backend uses {src.fallback} instead",
                              RuntimeWarning, stacklevel=2)
    return state["lib"]


def unavailable_reason(name: str = "csr_codebook") -> str | None:
    """None when :func:`library` loaded the kernels of ``name``, else why not (tries to load them first)."""
    library(name)
    return _states[name]["reason"]


def threads(name: str = "csr_codebook") -> int:
    """Threads a native kernel uses by default (OpenMP's maximum here), or 0 without the library."""
    lib = library(name)
    return int(lib.dnnpar_cpu_threads()) if lib is not None else 0


def _loaded(name: str = "csr_codebook"):
    lib = library(name)
    if lib is None:
        raise RuntimeError(f"dnnpar's native CPU kernels ({name}) are unavailable: {unavailable_reason(name)}")
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


def _check_f32(what: str, a, shape, out: bool = False) -> None:
    """The native kernels' own guard: a C-contiguous float32 array of ``shape`` (writeable for an output)."""
    if not (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == tuple(shape) and a.flags.c_contiguous
            and (a.flags.writeable or not out)):
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"native depthwise: {what} must be a {'writeable ' if out else ''}C-contiguous float32 "
                         f"array of shape {tuple(shape)}, got {got}")


def _depthwise_geo(geo) -> np.ndarray:
    """(N, C, H, W, KH, KW, OH, OW, SH, SW, PH, PW) as the kernel reads it."""
    g = np.asarray(geo, np.int64)
    if g.shape != (12,) or g[:10].min() < 1 or g[10:].min() < 0:
        raise ValueError(f"native depthwise: geometry must be 12 sizes (N, C, H, W, KH, KW, OH, OW, SH, SW, PH, PW), "
                         f"got {tuple(geo)!r}")
    return g


def depthwise_fast(geo) -> bool:
    """Whether the geometry takes the kernel's fast body (K x K filter, K = 3 or 5, stride 1 or
    2 both ways, padding below K, a plane that fits the per-thread buffer) rather than the
    generic one."""
    return bool(_loaded("depthwise").dnnpar_depthwise_fast(_ptr(_depthwise_geo(geo))))


def depthwise_forward(x, w, bias, out, geo, generic: bool = False, threads: int | None = None) -> np.ndarray:
    """``out[:] =`` depthwise convolution of x (N, C, H, W) with w (C, 1, KH, KW) plus bias (C,)
    or None; ``geo`` = (N, C, H, W, KH, KW, OH, OW, SH, SW, PH, PW), already validated (the op
    layer's ConvGeometry). ``generic``: skip the fast body (tests). Returns out."""
    g = _depthwise_geo(geo)
    n, c, h, wd, kh, kw, oh, ow = (int(v) for v in g[:8])
    _check_f32("x", x, (n, c, h, wd))
    _check_f32("w", w, (c, 1, kh, kw))
    if bias is not None:
        _check_f32("bias", bias, (c,))
    _check_f32("out", out, (n, c, oh, ow), out=True)
    _loaded("depthwise").dnnpar_depthwise_forward(_ptr(x), _ptr(w), None if bias is None else _ptr(bias), _ptr(out),
                                                  _ptr(g), int(bool(generic)), _threads_arg(threads))
    return out


def depthwise_backward(x, w, dy, dx, dw, geo, generic: bool = False, threads: int | None = None):
    """``dw[:]`` (C, 1, KH, KW) and, unless dx is None, ``dx[:]`` (N, C, H, W): the gradients of
    :func:`depthwise_forward` for dy (N, C, OH, OW). Each dw[c] is summed by one thread in a fixed
    order (the bits do not depend on ``threads``). Returns (dx, dw)."""
    g = _depthwise_geo(geo)
    n, c, h, wd, kh, kw, oh, ow = (int(v) for v in g[:8])
    _check_f32("x", x, (n, c, h, wd))
    _check_f32("w", w, (c, 1, kh, kw))
    _check_f32("dy", dy, (n, c, oh, ow))
    if dx is not None:
        _check_f32("dx", dx, (n, c, h, wd), out=True)
    _check_f32("dw", dw, (c, 1, kh, kw), out=True)
    _loaded("depthwise").dnnpar_depthwise_backward(_ptr(x), _ptr(w), _ptr(dy), None if dx is None else _ptr(dx),
                                                   _ptr(dw), _ptr(g), int(bool(generic)), _threads_arg(threads))
    return dx, dw
