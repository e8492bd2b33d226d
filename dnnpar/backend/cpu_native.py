"""Native CPU kernels for the numpy backend (``dnnpar/cpu/*.cpp``), each built at first use.

One shared library per source, listed in :data:`NATIVE_SOURCES`:

- ``runtime.cpp``: the one thread pool every other library runs on (loaded first; each kernel
  library gets its entry points through ``dnnpar_cpu_attach``);
- ``csr_codebook.cpp``: the CSR x codebook products (SpMV and SpMM) straight from Deep
  Compression's storage format, 2 bytes per stored entry (see :meth:`dnnpar.sparse.CSR.compact`);
- ``depthwise.cpp``: depthwise convolution forward and backward (dx, dw), float32 NCHW;
- ``norm.cpp``: BatchNorm2d training / eval forward and backward with a fused ReLU / ReLU6;
- ``pool.cpp``: MaxPool2d and AvgPool2d forward and backward.
- ``conv.cpp``: the register-tiled direct convolution (forward, dW / db, dx as a forward), and
  the im2col + GEMM path's glue: im2col, col2im, and the epilogues (GEMM output -> NCHW with
  bias + ReLU / ReLU6; dy -> GEMM layout with the activation's mask and db);
- ``half.cpp``: float32 <-> fp16 / bf16 bit patterns and their rounded sum (gradient compression);
- ``optim.cpp``: SGD's parameter update (weight decay, momentum, Nesterov, mask) and DGC's
  momentum correction, each in one pass;
- ``blas.cpp``: SGEMM on the pool, each thread's block of C computed by NumPy's OpenBLAS
  single-threaded (:func:`sgemm`; bound to OpenBLAS's entry points by :func:`blas_library`).

Every source goes through the same path: ``$CXX`` (default ``g++``) with ``-O3 -march=native
-fopenmp-simd -pthread`` and ``dnnpar/cpu`` on the include path, cached under
``~/.cache/dnnpar/cpu`` (``$DNNPAR_CACHE``) by a digest of the source, the headers it may include,
the compiler, the flags and this CPU (``-march=native`` binaries must not travel to another
machine through a shared cache), renamed into place atomically, loaded with ctypes, and its
``dnnpar_cpu_abi()`` checked against the table.

Nothing here is required: without a compiler, or when it fails, :func:`library` returns None
(a RuntimeWarning says why, once per source and process) and the numpy backend stays on its
SciPy / NumPy code. ``DNNPAR_NATIVE=0`` in the environment turns every native kernel off;
``dnnpar.sparse.NATIVE["use"] = False``, ``dnnpar.ops.depthwise.NATIVE["use"] = False`` and
``dnnpar.ops.gemm.NATIVE["use"] = False`` (the GEMMs) and ``dnnpar.nn.optim.NATIVE["use"] =
False`` (SGD's update) turn one family off.

Threads -- the one rule: one pool for the whole numpy backend. Every native kernel and every
large float32 GEMM (:func:`dnnpar.ops.gemm.gemm_numpy`) runs on ``dnnpar/cpu/runtime.cpp``'s
pool; OpenBLAS is set to one thread for the blocks it computes there, so its own threads stay
asleep (a process-wide setting: a BLAS call from another Python thread during a pool GEMM runs
single-threaded as well). Two pools on the same cores fight: OpenBLAS's idle threads yield-spin for about 0.1 s
after every multi-threaded call, and a step alternates GEMMs and kernels every few tens of
microseconds; on a 2-core machine the ResNet-style training step ran faster with one thread
(36.6 ms) than with both pools on two (38.3 ms), and 21-24 ms with the one pool. Not an OpenMP
runtime either (a process holds one libgomp, and PyTorch's, loaded first, spins its idle threads
for milliseconds after every call). By default a call runs on as many threads as BLAS has at
that moment (threadpoolctl reads it, so ``threadpoolctl.threadpool_limits(n)`` limits both, and
``OPENBLAS_NUM_THREADS`` as well); ``threads=`` overrides it per call. Idle pool workers spin
about 200 us (the Python between two kernels of a step), then sleep.
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
#: -O3 for this machine's vector units, `#pragma omp simd` without an OpenMP runtime, threads
#: from parallel.h (std::thread); the language level is pinned, and FMA contraction asked for
#: explicitly (g++ turns it off in ISO modes such as -std=c++17)
CXXFLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-pthread", "-fPIC", "-shared", "-std=c++17",
            "-ffp-contract=fast")
#: flags dropped, in turn, when a compiler rejects the full set (one that does not know
#: -march=native or -fopenmp-simd): a generic build beats none
FALLBACK_DROPS = (("-march=native",), ("-march=native", "-fopenmp-simd"))

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
    #: flags appended to CXXFLAGS for this source alone (the later flag wins)
    flags: tuple = ()

    @property
    def path(self) -> Path:
        return CPU_DIR / f"{self.stem}.cpp"


NATIVE_SOURCES = {s.stem: s for s in (
    NativeSource("runtime", 1, "the thread pool every native kernel runs on", "NumPy", {},
                 {"dnnpar_pool_threads": ([], ctypes.c_int)}),
    NativeSource("csr_codebook", 6, "CSR x codebook products", "SciPy / NumPy", {
        "dnnpar_csr_cb_spmv": [_I64, _P, _P, _P, _P, _I32, _I32, _P, _P, _I32],
        "dnnpar_csr_cb_spmm": [_I64, _I64, _P, _P, _P, _P, _I32, _I32, _P, _P, _I32],
    }),
    NativeSource("depthwise", 4, "depthwise convolution", "NumPy", {
        "dnnpar_depthwise_forward": [_P, _P, _P, _P, _P, _I32, _I32, _I32],
        "dnnpar_depthwise_backward": [_P, _P, _P, _P, _P, _P, _I32, _I32],
    }, {"dnnpar_depthwise_fast": ([_P], ctypes.c_int)}),
    NativeSource("norm", 2, "BatchNorm2d (+ ReLU / ReLU6)", "NumPy", {
        "dnnpar_bn_forward": [_P, _P, _P, _P, _P, _P, _P, _P, ctypes.c_double, _I32, _I32, _I32],
        "dnnpar_bn_backward": [_P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I32, _I32, _I32],
    }),
    NativeSource("pool", 2, "MaxPool2d / AvgPool2d", "NumPy", {
        "dnnpar_maxpool_forward": [_P, _P, _P, _I32],
        "dnnpar_maxpool_backward": [_P, _P, _P, _P, _P, _I32],
        "dnnpar_avgpool_forward": [_P, _P, _P, _I32, _I32],
        "dnnpar_avgpool_backward": [_P, _P, _P, _I32, _I32],
    }),
    NativeSource("half", 2, "16-bit gradient encodings", "NumPy", {
        "dnnpar_half_encode": [_P, _P, _I64, _I32, _I32],
        "dnnpar_half_decode": [_P, _P, _I64, _I32, _I32],
        "dnnpar_half_add_into": [_P, _P, _I64, _I32, _I32],
    }),
    NativeSource("blas", 1, "SGEMM on dnnpar's thread pool", "NumPy's matmul", {}, {
        "dnnpar_blas_bind": ([_P, _P, _P, _I32], ctypes.c_int),
        "dnnpar_blas_sgemm": ([_I32, _I32, _I64, _I64, _I64, ctypes.c_float, _P, _I64, _P, _I64, ctypes.c_float,
                               _P, _I64, _I32], ctypes.c_int),
    }),
    NativeSource("eltwise", 1, "residual add + activation, activation gradients", "NumPy", {
        "dnnpar_add_act": [_P, _P, _P, _I64, _I32, _I32],
        "dnnpar_act_grad": [_P, _P, _P, _I64, _I32, _I32],
    }),
    NativeSource("optim", 1, "SGD's and DGC's one-pass updates", "NumPy", {
        "dnnpar_sgd_step": [_P, _P, _P, _P, _I64, ctypes.c_float, ctypes.c_float, ctypes.c_float, _I32, _I32],
        "dnnpar_dgc_accumulate": [_P, _P, _P, _P, _P, _I64, ctypes.c_float, ctypes.c_float, _I32],
    }, flags=("-ffp-contract=off",)),  # NumPy's roundings, bit for bit: no FMA (clang ignores the pragma)
    NativeSource("conv", 5, "convolution (tiled direct kernels, im2col / col2im, epilogues)", "NumPy", {
        "dnnpar_conv_im2col": [_P, _P, _P, _I32],
        "dnnpar_conv_col2im": [_P, _P, _P, _I32],
        "dnnpar_conv_epilogue": [_P, _P, _P, _I64, _I64, _I64, _I32, _I32],
        "dnnpar_conv_epilogue_backward": [_P, _P, _P, _P, _I64, _I64, _I64, _I32, _I32],
        "dnnpar_conv_tiled_shape": [_P],
    }, {"dnnpar_conv_tiled_forward": ([_P, _P, _P, _P, _P, _I64, _I32, _I32], ctypes.c_int),
        "dnnpar_conv_tiled_dw": ([_P, _P, _P, _P, _P, _P, _P, _I64, _I32, _I32], ctypes.c_int),
        "dnnpar_conv_chan_forward": ([_P, _P, _P, _P, _P, _I64, _I32, _I32], ctypes.c_int),
        "dnnpar_conv_chan_dw": ([_P, _P, _P, _P, _P, _P, _P, _I64, _I32, _I32], ctypes.c_int),
        "dnnpar_conv_chan_dx": ([_P, _P, _P, _P, _I64, _I32], ctypes.c_int)}),
)}

_lock = threading.RLock()  # reentrant: loading a kernel library loads the runtime first
_states: dict = {stem: {"tried": False, "lib": None, "reason": None, "warned": False} for stem in NATIVE_SOURCES}
#: the BLAS thread count's reader (threadpoolctl's controller of NumPy's BLAS), found once
_blas: dict = {"found": False, "controller": None}


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
    headers = "".join(f"{h.name}\n{h.read_text()}" for h in sorted(CPU_DIR.glob("*.h")))
    first_error = None
    for drop in ((),) + FALLBACK_DROPS:
        flags = [f for f in CXXFLAGS if f not in drop] + list(src.flags)
        key = digest(code, headers, cxx, " ".join(flags), _cpu_signature())
        so = cache_dir("cpu") / f"{src.stem}-{key}.so"
        try:
            return build_shared_library(code, so, lambda s, out: [cxx, *flags, "-I", str(CPU_DIR), "-x", "c++", str(s),
                                                                  "-o", str(out)],
                                        error=NativeBuildError,
                                        what=f"{cxx} could not compile {src.path.name} with {' '.join(flags)}")
        except NativeBuildError as e:
            first_error = first_error or e
    raise first_error


def _blas_controller():
    """threadpoolctl's controller of NumPy's BLAS (None when threadpoolctl finds none)."""
    if not _blas["found"]:
        try:
            from threadpoolctl import ThreadpoolController
            ctl = ThreadpoolController().select(user_api="blas").lib_controllers
            # NumPy's own BLAS when several are loaded (SciPy's or torch's may come first)
            ours = [c for c in ctl if "numpy" in str(getattr(c, "filepath", "")).lower()]
            _blas["controller"] = (ours or ctl or [None])[0]
        except ImportError:
            _blas["controller"] = None
        _blas["found"] = True
    return _blas["controller"]


def blas_threads() -> int | None:
    """The thread count of the BLAS NumPy uses right now, as threadpoolctl reads it (None when
    it cannot say: threadpoolctl missing, or no BLAS found)."""
    ctl = _blas_controller()
    if ctl is None:
        return None
    n = ctl.get_num_threads()
    return int(n) if n else None


def threads_rule() -> str:
    """How a native kernel's default thread count is chosen here, in words."""
    return ("BLAS's thread count at each call (threadpoolctl)" if _blas_controller() is not None
            else "the cores this machine has (threadpoolctl found no BLAS to follow)")


def _load(so: Path) -> ctypes.CDLL:
    return ctypes.CDLL(str(so), mode=ctypes.RTLD_LOCAL)


def _compile(src: NativeSource, cxx: str) -> ctypes.CDLL:
    so = _build(src, cxx)
    lib = _load(so)
    lib.dnnpar_cpu_abi.restype = ctypes.c_int
    if lib.dnnpar_cpu_abi() != src.abi:
        raise NativeBuildError(f"{so} reports ABI {lib.dnnpar_cpu_abi()}, expected {src.abi}")
    for name, argtypes in src.functions.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = None, argtypes
    for name, (argtypes, restype) in (src.returning or {}).items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    if src.stem != "runtime":  # every kernel library runs on the runtime's one pool
        runtime = library("runtime")
        if runtime is None:
            raise NativeBuildError(f"the thread pool's library is unavailable: {unavailable_reason('runtime')}")
        lib.dnnpar_cpu_attach.restype, lib.dnnpar_cpu_attach.argtypes = None, [_P, _P]
        lib.dnnpar_cpu_attach(ctypes.cast(runtime.dnnpar_pool_threads, _P).value,
                              ctypes.cast(runtime.dnnpar_pool_run, _P).value)
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
    """Threads a native kernel of ``name`` uses by default now (BLAS's count), or 0 without the library."""
    lib = library(name)
    return _threads_arg(None, lib) if lib is not None else 0


def _loaded(name: str = "csr_codebook"):
    lib = library(name)
    if lib is None:
        raise RuntimeError(f"dnnpar's native CPU kernels ({name}) are unavailable: {unavailable_reason(name)}")
    return lib


def takes(name: str, use: bool, *arrays):
    """The library of ``name`` when it takes a numpy-backend call on these operands (``use`` on --
    the op family's NATIVE["use"] switch --, every operand None or a NumPy float32 array, the
    library built here), else None."""
    if not use or not all(a is None or (isinstance(a, np.ndarray) and a.dtype == np.float32) for a in arrays):
        return None
    return library(name)


def _ptr(a: np.ndarray) -> int:
    return a.ctypes.data


def _threads_arg(threads, lib=None) -> int:
    """The team size a call passes: ``threads``, or by default BLAS's thread count now (the
    pool's own default, this machine's cores, when no BLAS is found)."""
    if threads is None:
        n = blas_threads()
        if n is not None:
            return n
        runtime = library("runtime") if lib is not None else None
        return int(runtime.dnnpar_pool_threads()) if runtime is not None else 0
    if not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a positive int or None (BLAS's thread count), got {threads!r}")
    return int(threads)


def spmv(compact, x: np.ndarray, out: np.ndarray, threads: int | None = None) -> np.ndarray:
    """``out[:] = A x`` for a :class:`dnnpar.sparse.CompactCSR` ``compact`` (x float32, K entries,
    C-contiguous; out float32, M entries), on ``threads`` threads (None: BLAS's thread count).
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
                                     _ptr(compact.codebook), compact.code_span, int(filler), _ptr(x), _ptr(out),
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
                                         _ptr(compact.codebook), compact.code_span, int(compact.filler_code),
                                         _ptr(X), _ptr(out),
                                         _threads_arg(threads))
    return out


def _check_f32(what: str, a, shape, out: bool = False, op: str = "depthwise", dtype=np.float32) -> None:
    """The native kernels' own guard: a C-contiguous ``dtype`` array of ``shape`` (writeable for an output)."""
    if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.shape == tuple(shape) and a.flags.c_contiguous
            and (a.flags.writeable or not out)):
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"native {op}: {what} must be a {'writeable ' if out else ''}C-contiguous "
                         f"{np.dtype(dtype).name} array of shape {tuple(shape)}, got {got}")


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


def depthwise_forward(x, w, bias, out, geo, generic: bool = False, threads: int | None = None,
                      activation=None) -> np.ndarray:
    """``out[:] = activation(`` depthwise convolution of x (N, C, H, W) with w (C, 1, KH, KW) plus
    bias (C,) or None ``)``, the activation (None, "relu", "relu6") applied to each plane as it is
    done; ``geo`` = (N, C, H, W, KH, KW, OH, OW, SH, SW, PH, PW), already validated (the op
    layer's ConvGeometry). ``generic``: skip the fast body (tests). Returns out."""
    g = _depthwise_geo(geo)
    n, c, h, wd, kh, kw, oh, ow = (int(v) for v in g[:8])
    _check_f32("x", x, (n, c, h, wd))
    _check_f32("w", w, (c, 1, kh, kw))
    if bias is not None:
        _check_f32("bias", bias, (c,))
    _check_f32("out", out, (n, c, oh, ow), out=True)
    _loaded("depthwise").dnnpar_depthwise_forward(_ptr(x), _ptr(w), None if bias is None else _ptr(bias), _ptr(out),
                                                  _ptr(g), _conv_act(activation), int(bool(generic)),
                                                  _threads_arg(threads))
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


#: activation (ops/activation.py's kinds) -> the code norm.cpp, conv.cpp and cuda/conv_implicit.cu read
ACTIVATION_CODES = {None: 0, "relu": 1, "relu6": 2}


def _bn_shape(x):
    if not (isinstance(x, np.ndarray) and x.ndim == 4):
        raise ValueError(f"native batch_norm: x must be an (N, C, H, W) array, got {getattr(x, 'shape', type(x))}")
    n, c, h, w = x.shape
    return n, c, h * w


def batch_norm_forward(x, gamma, beta, mean, var, inv, y, eps: float, training: bool, activation=None,
                       threads: int | None = None) -> np.ndarray:
    """``y[:] = act(gamma (x - mean) inv + beta)`` for x, y (N, C, H, W) float32, gamma, beta (C,)
    float32; mean, var, inv (C,) float64: training writes the batch statistics into mean and var,
    eval reads them; inv = 1 / sqrt(var + eps) is written. ``activation``: None, "relu", "relu6".
    Returns y."""
    n, c, hw = _bn_shape(x)
    op = "batch_norm"
    _check_f32("x", x, x.shape, op=op)
    _check_f32("y", y, x.shape, out=True, op=op)
    for what, a in (("gamma", gamma), ("beta", beta)):
        _check_f32(what, a, (c,), op=op)
    for what, a in (("mean", mean), ("var", var), ("inv", inv)):
        _check_f32(what, a, (c,), out=True, op=op, dtype=np.float64)
    geo = np.array([n, c, hw], np.int64)
    _loaded("norm").dnnpar_bn_forward(_ptr(x), _ptr(gamma), _ptr(beta), _ptr(mean), _ptr(var), _ptr(inv), _ptr(y),
                                      _ptr(geo), float(eps), int(bool(training)), ACTIVATION_CODES[activation],
                                      _threads_arg(threads))
    return y


def batch_norm_backward(x, y, dy, gamma, mean, inv, dx, dgamma, dbeta, training: bool, activation=None,
                        threads: int | None = None):
    """The gradients of :func:`batch_norm_forward` for dy: ``dgamma[:]``, ``dbeta[:]`` (C,) and,
    unless dx is None, ``dx[:]`` (N, C, H, W); y (the forward's output) is read only with an
    activation (its mask). Each channel is summed by one thread in a fixed order (the bits do not
    depend on ``threads``). Returns (dx, dgamma, dbeta)."""
    n, c, hw = _bn_shape(x)
    op = "batch_norm_backward"
    _check_f32("x", x, x.shape, op=op)
    _check_f32("dy", dy, x.shape, op=op)
    if activation is not None:
        _check_f32("y", y, x.shape, op=op)
    if dx is not None:
        _check_f32("dx", dx, x.shape, out=True, op=op)
    _check_f32("gamma", gamma, (c,), op=op)
    _check_f32("dgamma", dgamma, (c,), out=True, op=op)
    _check_f32("dbeta", dbeta, (c,), out=True, op=op)
    for what, a in (("mean", mean), ("inv", inv)):
        _check_f32(what, a, (c,), op=op, dtype=np.float64)
    geo = np.array([n, c, hw], np.int64)
    _loaded("norm").dnnpar_bn_backward(_ptr(x), None if activation is None else _ptr(y), _ptr(dy), _ptr(gamma),
                                       _ptr(mean), _ptr(inv), None if dx is None else _ptr(dx), _ptr(dgamma),
                                       _ptr(dbeta), _ptr(geo), int(bool(training)), ACTIVATION_CODES[activation],
                                       _threads_arg(threads))
    return dx, dgamma, dbeta


def _pool_arrays(op, geo, *named):
    g = _depthwise_geo(geo)
    n, c, h, wd, _, _, oh, ow = (int(v) for v in g[:8])
    shapes = {"x": (n, c, h, wd), "dx": (n, c, h, wd), "y": (n, c, oh, ow), "dy": (n, c, oh, ow)}
    for what, a, out in named:
        _check_f32(what, a, shapes[what], out=out, op=op)
    return g


def max_pool_forward(x, y, geo, threads: int | None = None):
    """``y[:] =`` the max over each window of x (padding reads -inf; NaN propagates); ``geo`` as
    :func:`depthwise_forward`'s (KH, KW the window). Returns y."""
    g = _pool_arrays("max_pool2d", geo, ("x", x, False), ("y", y, True))
    _loaded("pool").dnnpar_maxpool_forward(_ptr(x), _ptr(y), _ptr(g), _threads_arg(threads))
    return y


def max_pool_backward(x, y, dy, dx, geo, threads: int | None = None):
    """``dx[:] =`` the gradient of :func:`max_pool_forward` (to each window's first maximum). Returns dx."""
    g = _pool_arrays("max_pool2d_backward", geo, ("x", x, False), ("y", y, False), ("dy", dy, False),
                     ("dx", dx, True))
    _loaded("pool").dnnpar_maxpool_backward(_ptr(x), _ptr(y), _ptr(dy), _ptr(dx), _ptr(g), _threads_arg(threads))
    return dx


def avg_pool_forward(x, y, geo, count_include_pad: bool, threads: int | None = None):
    """``y[:] =`` the mean over each window of x (AvgPool2d's divisor rule). Returns y."""
    g = _pool_arrays("avg_pool2d", geo, ("x", x, False), ("y", y, True))
    _loaded("pool").dnnpar_avgpool_forward(_ptr(x), _ptr(y), _ptr(g), int(bool(count_include_pad)),
                                           _threads_arg(threads))
    return y


def avg_pool_backward(dy, dx, geo, count_include_pad: bool, threads: int | None = None):
    """``dx[:] =`` the gradient of :func:`avg_pool_forward` for dy. Returns dx."""
    g = _pool_arrays("avg_pool2d_backward", geo, ("dy", dy, False), ("dx", dx, True))
    _loaded("pool").dnnpar_avgpool_backward(_ptr(dy), _ptr(dx), _ptr(g), int(bool(count_include_pad)),
                                            _threads_arg(threads))
    return dx




def _conv_geo(geo) -> np.ndarray:
    """(N, C, H, W, KH, KW, OH, OW, SH, SW, PH, PW, DH, DW) as the kernel reads it."""
    g = np.asarray(geo, np.int64)
    if g.shape != (14,) or g[:10].min() < 1 or g[10:12].min() < 0 or g[12:].min() < 1:
        raise ValueError(f"native conv: geometry must be 14 sizes (N, C, H, W, KH, KW, OH, OW, SH, SW, PH, PW, DH, DW), "
                         f"got {tuple(geo)!r}")
    return g


def conv_im2col(x, cols, geo, threads: int | None = None) -> np.ndarray:
    """``cols[:] =`` im2col of x (N, C, H, W): (C*KH*KW, N*OH*OW), zero where a tap reads padding;
    ``geo`` as :func:`_conv_geo`, already validated (the op layer's ConvGeometry). Returns cols."""
    g = _conv_geo(geo)
    n, c, h, wd, kh, kw, oh, ow = (int(v) for v in g[:8])
    _check_f32("x", x, (n, c, h, wd), op="conv")
    _check_f32("cols", cols, (c * kh * kw, n * oh * ow), out=True, op="conv")
    _loaded("conv").dnnpar_conv_im2col(_ptr(x), _ptr(cols), _ptr(g), _threads_arg(threads))
    return cols


def conv_col2im(cols, dx, geo, threads: int | None = None) -> np.ndarray:
    """``dx[:] =`` col2im of cols (the adjoint of :func:`conv_im2col`); each dx plane is summed by
    one thread in the fixed tap order (the bits do not depend on ``threads``). Returns dx."""
    g = _conv_geo(geo)
    n, c, h, wd, kh, kw, oh, ow = (int(v) for v in g[:8])
    _check_f32("cols", cols, (c * kh * kw, n * oh * ow), op="conv")
    _check_f32("dx", dx, (n, c, h, wd), out=True, op="conv")
    _loaded("conv").dnnpar_conv_col2im(_ptr(cols), _ptr(dx), _ptr(g), _threads_arg(threads))
    return dx


def _conv_act(activation) -> int:
    try:
        return ACTIVATION_CODES[activation]
    except KeyError:
        raise ValueError(f"native conv: activation must be one of {list(ACTIVATION_CODES)}, got {activation!r}") from None


def conv_epilogue(ym, bias, y, activation=None, threads: int | None = None) -> np.ndarray:
    """``y[:] = activation(ym + bias)`` laid out NCHW: ym (O, N*P) the GEMM's output, bias (O,)
    or None, y (N, O, OH, OW) with P = OH*OW. Returns y."""
    if not isinstance(y, np.ndarray) or y.ndim != 4:
        raise ValueError(f"native conv: y must be an (N, O, OH, OW) array, got {getattr(y, 'shape', type(y))}")
    n, o, oh, ow = y.shape
    _check_f32("ym", ym, (o, n * oh * ow), op="conv")
    if bias is not None:
        _check_f32("bias", bias, (o,), op="conv")
    _check_f32("y", y, (n, o, oh, ow), out=True, op="conv")
    _loaded("conv").dnnpar_conv_epilogue(_ptr(ym), None if bias is None else _ptr(bias), _ptr(y), n, o, oh * ow,
                                         _conv_act(activation), _threads_arg(threads))
    return y


def conv_epilogue_backward(dy, y, dym, db, activation=None, threads: int | None = None):
    """``dym[:]`` (O, N*P) = dy (N, O, OH, OW) masked by the activation's gradient at the activated
    output y (same shape; None for no activation), and ``db[:]`` (O,) its sum over n and p, one
    thread per channel in a fixed order. Returns (dym, db)."""
    if not isinstance(dy, np.ndarray) or dy.ndim != 4:
        raise ValueError(f"native conv: dy must be an (N, O, OH, OW) array, got {getattr(dy, 'shape', type(dy))}")
    n, o, oh, ow = dy.shape
    act = _conv_act(activation)
    _check_f32("dy", dy, dy.shape, op="conv")
    if act:
        _check_f32("y", y, dy.shape, op="conv")
    _check_f32("dym", dym, (o, n * oh * ow), out=True, op="conv")
    _check_f32("db", db, (o,), out=True, op="conv")
    _loaded("conv").dnnpar_conv_epilogue_backward(_ptr(dy), _ptr(y) if act else None, _ptr(dym), _ptr(db), n, o,
                                                  oh * ow, act, _threads_arg(threads))
    return dym, db


_tiled_shapes: dict = {}  # the conv library loaded -> its tile sizes (constants of its build)


def conv_tiled_shape() -> dict:
    """The tiled kernels' tile sizes in this build: VL (floats per vector), FMR x FNV (forward:
    output channels x vectors of grid positions), WMR x WNT (dW: output channels x (c, i, j)),
    CVMAX (the channel-vectorised kernels' widest tile, in vectors of output channels).
    Asked of the library once (every tiled path's choice reads them)."""
    lib = _loaded("conv")
    if lib not in _tiled_shapes:
        out = np.zeros(6, np.int32)
        lib.dnnpar_conv_tiled_shape(_ptr(out))
        _tiled_shapes[lib] = dict(zip(("vl", "fmr", "fnv", "wmr", "wnt", "cvmax"), (int(v) for v in out)))
    return dict(_tiled_shapes[lib])


#: the register-tiled kernels' two families: vectors over output positions or over output channels
TILED_VECTORS = ("positions", "channels")


def _tiled_entry(kind: str, vectors: str):
    if vectors not in TILED_VECTORS:
        raise ValueError(f"native conv: vectors must be one of {', '.join(TILED_VECTORS)}, got {vectors!r}")
    lib = _loaded("conv")
    return getattr(lib, f"dnnpar_conv_{'tiled' if vectors == 'positions' else 'chan'}_{kind}")


def conv_tiled_forward(x, w, bias, y, geo, activation=None, threads: int | None = None,
                       vectors: str = "positions") -> np.ndarray:
    """``y[:] = activation(conv(x, w) + bias)`` by a register-tiled direct kernel: x (N, C, H, W),
    w (O, C, KH, KW), bias (O,) or None, y (N, O, OH, OW), one group; ``geo`` as :func:`_conv_geo`,
    already validated. ``vectors``: the kernel's vector lanes run over output "positions" (grid
    rows, padding computed and dropped) or output "channels" (the outputs alone). Each output is
    summed by one thread in the fixed (c, i, j) order. Returns y."""
    g = _conv_geo(geo)
    n, c, h, wd, kh, kw, oh, ow = (int(v) for v in g[:8])
    _check_f32("x", x, (n, c, h, wd), op="conv")
    if not isinstance(w, np.ndarray) or w.ndim != 4:
        raise ValueError(f"native conv: w must be an (O, C, KH, KW) array, got {getattr(w, 'shape', type(w))}")
    o = w.shape[0]
    _check_f32("w", w, (o, c, kh, kw), op="conv")
    if bias is not None:
        _check_f32("bias", bias, (o,), op="conv")
    _check_f32("y", y, (n, o, oh, ow), out=True, op="conv")
    entry = _tiled_entry("forward", vectors)
    if entry(_ptr(x), _ptr(w), None if bias is None else _ptr(bias), _ptr(y), _ptr(g), o, _conv_act(activation),
             _threads_arg(threads)):
        raise MemoryError(f"native conv: no memory for the packed input of an {tuple(x.shape)} convolution")
    return y


def conv_tiled_dw(x, dy, y, dw, db, dym=None, activation=None, threads: int | None = None, geo=None,
                  vectors: str = "positions"):
    """``dw[:]`` (O, C, KH, KW) and ``db[:]`` (O,) for dy (N, O, OH, OW) masked by the activation's
    gradient at the activated output y (None without an activation); ``dym`` (dy's shape) or None:
    receives the masked dy. ``vectors`` as :func:`conv_tiled_forward`'s. Each tile of dw is summed
    by one thread in a fixed order, db per channel in order: the bits do not depend on
    ``threads``. Returns (dw, db, dym)."""
    g = _conv_geo(geo)
    n, c, h, wd, kh, kw, oh, ow = (int(v) for v in g[:8])
    act = _conv_act(activation)
    _check_f32("x", x, (n, c, h, wd), op="conv")
    if not isinstance(dy, np.ndarray) or dy.ndim != 4:
        raise ValueError(f"native conv: dy must be an (N, O, OH, OW) array, got {getattr(dy, 'shape', type(dy))}")
    o = dy.shape[1]
    _check_f32("dy", dy, (n, o, oh, ow), op="conv")
    if act:
        _check_f32("y", y, dy.shape, op="conv")
    _check_f32("dw", dw, (o, c, kh, kw), out=True, op="conv")
    _check_f32("db", db, (o,), out=True, op="conv")
    if dym is not None:
        _check_f32("dym", dym, dy.shape, out=True, op="conv")
    entry = _tiled_entry("dw", vectors)
    if entry(_ptr(x), _ptr(dy), _ptr(y) if act else None, _ptr(dw), _ptr(db), None if dym is None else _ptr(dym),
             _ptr(g), o, act, _threads_arg(threads)):
        raise MemoryError(f"native conv: no memory for the packed operands of an {tuple(x.shape)} weight gradient")
    return dw, db, dym


def conv_chan_dx(dy, w, dx, geo, threads: int | None = None) -> np.ndarray:
    """``dx[:]`` (N, C, H, W): the input gradient of the convolution of ``geo`` (any stride,
    padding, dilation; one group) for dy (N, O, OH, OW) and w (O, C, KH, KW), by the
    channel-vectorised scatter kernel (vectors over C). Each dx element is summed by one thread
    in a fixed order: the bits do not depend on ``threads``. Returns dx."""
    g = _conv_geo(geo)
    n, c, h, wd, kh, kw, oh, ow = (int(v) for v in g[:8])
    if not isinstance(w, np.ndarray) or w.ndim != 4:
        raise ValueError(f"native conv: w must be an (O, C, KH, KW) array, got {getattr(w, 'shape', type(w))}")
    o = w.shape[0]
    _check_f32("w", w, (o, c, kh, kw), op="conv")
    _check_f32("dy", dy, (n, o, oh, ow), op="conv")
    _check_f32("dx", dx, (n, c, h, wd), out=True, op="conv")
    if _loaded("conv").dnnpar_conv_chan_dx(_ptr(dy), _ptr(w), _ptr(dx), _ptr(g), o, _threads_arg(threads)):
        raise MemoryError(f"native conv: no memory for the padded input gradient of an {tuple(dx.shape)} convolution")
    return dx


#: 16-bit format -> the code half.cpp reads
HALF_CODES = {"fp16": 0, "bf16": 1}


def _half_check(what, a, dtype, n=None, out=False):
    if not (isinstance(a, np.ndarray) and a.dtype == dtype and a.ndim == 1 and a.flags.c_contiguous
            and (a.flags.writeable or not out) and (n is None or a.size == n)):
        got = f"{a.dtype} {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
        raise ValueError(f"native half: {what} must be a {'writeable ' if out else ''}C-contiguous {np.dtype(dtype).name} "
                         f"vector{'' if n is None else f' of {n}'}, got {got}")


def half_encode(x, out, kind: str, threads: int | None = None):
    """``out[:]`` = the uint16 bit patterns of float32 ``x`` rounded to ``kind`` (dnnpar/cpu/half.cpp)."""
    _half_check("x", x, np.float32)
    _half_check("out", out, np.uint16, x.size, out=True)
    _loaded("half").dnnpar_half_encode(_ptr(x), _ptr(out), x.size, HALF_CODES[kind], _threads_arg(threads))
    return out


def half_decode(bits, out, kind: str, threads: int | None = None):
    """``out[:]`` = float32 values of ``kind`` bit patterns ``bits`` (exact)."""
    _half_check("bits", bits, np.uint16)
    _half_check("out", out, np.float32, bits.size, out=True)
    _loaded("half").dnnpar_half_decode(_ptr(bits), _ptr(out), bits.size, HALF_CODES[kind], _threads_arg(threads))
    return out


def half_add_into(a, b, kind: str, threads: int | None = None):
    """``b[:]`` = round16(decode(a) + decode(b)) on uint16 vectors of ``kind``."""
    _half_check("a", a, np.uint16)
    _half_check("b", b, np.uint16, a.size, out=True)
    _loaded("half").dnnpar_half_add_into(_ptr(a), _ptr(b), a.size, HALF_CODES[kind], _threads_arg(threads))
    return b


# ---------------------------------------------------------------------------- SGEMM on the pool
_openblas: dict = {"tried": False, "lib": None, "reason": None, "ilp64": False}


def _openblas_entry_points(ctl):
    """(cblas_sgemm, openblas_get_num_threads, openblas_set_num_threads, ilp64) of threadpoolctl's
    BLAS controller ``ctl`` as addresses, or a str saying why not."""
    if ctl is None:
        return "threadpoolctl found no BLAS"
    if getattr(ctl, "internal_api", None) != "openblas":
        return f"NumPy's BLAS is {getattr(ctl, 'internal_api', '?')}, not OpenBLAS"
    if getattr(ctl, "threading_layer", None) != "pthreads":
        return f"OpenBLAS uses the {getattr(ctl, 'threading_layer', '?')} threading layer, not pthreads"
    dll = ctypes.CDLL(ctl.filepath)  # already loaded by NumPy: the same handle
    for prefix in ("", "scipy_"):
        for suffix in ("", "64_", "_64"):
            names = (f"{prefix}cblas_sgemm{suffix}", f"{prefix}openblas_get_num_threads{suffix}",
                     f"{prefix}openblas_set_num_threads{suffix}")
            if all(hasattr(dll, n) for n in names):
                ilp64 = bool(suffix)
                if not suffix and hasattr(dll, f"{prefix}openblas_get_config"):
                    cfg = getattr(dll, f"{prefix}openblas_get_config")
                    cfg.restype = ctypes.c_char_p
                    ilp64 = b"USE64BITINT" in (cfg() or b"")
                return tuple(ctypes.cast(getattr(dll, n), ctypes.c_void_p).value for n in names) + (ilp64,)
    return f"{ctl.filepath} exports no cblas_sgemm / openblas_set_num_threads this code knows"


def blas_library():
    """The ``blas`` library bound to NumPy's OpenBLAS, or None (see :func:`blas_unavailable_reason`)."""
    if not _openblas["tried"]:
        built = library("blas")  # takes _lock itself
        with _lock:
            if not _openblas["tried"]:
                lib, reason = built, None
                if lib is None:
                    reason = unavailable_reason("blas")
                else:
                    found = _openblas_entry_points(_blas_controller())
                    if isinstance(found, str):
                        lib, reason = None, found
                    else:
                        lib.dnnpar_blas_bind(*found[:3], int(found[3]))
                        _openblas["ilp64"] = bool(found[3])
                _openblas.update(tried=True, lib=lib, reason=reason)
    return _openblas["lib"]


def blas_unavailable_reason() -> str | None:
    """None when :func:`sgemm` runs on the pool here, else why NumPy's matmul stays."""
    blas_library()
    return _openblas["reason"]


def _blas_operand(x):
    """(transposed, leading dimension) of a 2-D float32 array as BLAS reads it, or None when
    neither its rows nor its columns are unit-stride."""
    if not (isinstance(x, np.ndarray) and x.ndim == 2 and x.dtype == np.float32):
        return None
    r, c = x.shape
    s0, s1 = x.strides
    if (s1 == 4 or c == 1) and s0 % 4 == 0 and s0 >= 4 * c:
        return False, max(1, s0 // 4, c)
    if (s0 == 4 or r == 1) and s1 % 4 == 0 and s1 >= 4 * r:
        return True, max(1, s1 // 4, r)
    return None


def sgemm(a, b, out, trans_a: bool = False, trans_b: bool = False, alpha: float = 1.0, beta: float = 0.0,
          threads: int | None = None):
    """``out[:] = alpha op(a) op(b) + beta out`` for float32 2-D arrays on dnnpar's pool, NumPy's
    OpenBLAS computing each thread's block single-threaded (dnnpar/cpu/blas.cpp). ``out`` must
    be C-contiguous and share no memory with a or b; a and b may be any unit-stride 2-D views.
    Returns out, or None (nothing written) when the pool path is unavailable or an operand is not
    a unit-stride view: the caller then uses NumPy."""
    lib = blas_library()
    if lib is None:
        return None
    pa, pb = _blas_operand(a), _blas_operand(b)
    if pa is None or pb is None or not (isinstance(out, np.ndarray) and out.dtype == np.float32 and out.ndim == 2
                                        and out.flags.c_contiguous and out.flags.writeable):
        return None
    m, k = (a.shape[1], a.shape[0]) if trans_a else a.shape
    kb, n = (b.shape[1], b.shape[0]) if trans_b else b.shape
    if k != kb or out.shape != (m, n):
        raise ValueError(f"native sgemm: op(a) {m}x{k}, op(b) {kb}x{n}, out {out.shape} do not match")
    if k == 0:
        return None
    ta, lda = pa[0] != trans_a, pa[1]
    tb, ldb = pb[0] != trans_b, pb[1]
    if not _openblas["ilp64"] and max(m, n, k, lda, ldb) > np.iinfo(np.int32).max:
        return None  # an LP64 OpenBLAS takes 32-bit sizes and strides
    rc = lib.dnnpar_blas_sgemm(int(ta), int(tb), m, n, k, float(alpha), _ptr(a), lda, _ptr(b), ldb, float(beta),
                               _ptr(out), max(1, n), _threads_arg(threads))
    return out if rc == 0 else None


# ---------------------------------------------------------------------------- SGD's update
def _vectors_ok(shape, inputs, outputs) -> bool:
    """Every array given (None: absent) a C-contiguous float32 NumPy array of ``shape``, the
    outputs writeable: what the elementwise kernels of optim.cpp take (else NumPy runs)."""
    def ok(a, out):
        return a is None or (isinstance(a, np.ndarray) and a.dtype == np.float32 and a.shape == tuple(shape)
                             and a.flags.c_contiguous and (a.flags.writeable or not out))
    return all(ok(a, False) for a in inputs) and all(ok(a, True) for a in outputs)


def add_act(a, b, y, activation=None, threads: int | None = None) -> bool:
    """``y[:] = activation(a + b)`` in one pass (dnnpar/cpu/eltwise.cpp); y may be a or b. All
    float32 C-contiguous NumPy arrays of a's shape. Returns False (nothing written) when the
    library is unavailable or an array does not qualify: the caller runs NumPy."""
    lib = library("eltwise")
    if lib is None or not _vectors_ok(a.shape, (a, b), (y,)):
        return False
    lib.dnnpar_add_act(_ptr(a), _ptr(b), _ptr(y), a.size, ACTIVATION_CODES[activation], _threads_arg(threads))
    return True


def act_grad(dy, y, dx, activation: str, threads: int | None = None) -> bool:
    """``dx[:]`` = dy where ``activation``'s output y passes its gradient, +0.0 elsewhere
    (dnnpar/cpu/eltwise.cpp; :func:`dnnpar.ops.activation.activation_grad` bit for bit). All
    float32 C-contiguous NumPy arrays of dy's shape. Returns False (nothing written) when the
    library is unavailable or an array does not qualify."""
    lib = library("eltwise")
    if lib is None or activation not in ("relu", "relu6") or not _vectors_ok(dy.shape, (dy, y), (dx,)):
        return False
    lib.dnnpar_act_grad(_ptr(dy), _ptr(y), _ptr(dx), dy.size, ACTIVATION_CODES[activation], _threads_arg(threads))
    return True


def sgd_step(p, g, v, mask, lr: float, momentum: float, weight_decay: float, nesterov: bool = False,
             first: bool = False, plain: bool = False, threads: int | None = None) -> bool:
    """One SGD update of parameter ``p`` in place (dnnpar/cpu/optim.cpp; the order of operations
    of :meth:`dnnpar.nn.optim.SGD.step`): gradient ``g``, velocity ``v`` (None without momentum;
    written, and with ``first`` set to the gradient), ``mask`` (None, or multiplied in after the
    update), ``plain``: ``p -= lr g`` only. All float32 C-contiguous NumPy arrays of p's shape.
    Returns False (nothing written) when the library is unavailable or an array does not qualify:
    the caller runs NumPy."""
    lib = library("optim")
    if lib is None or not _vectors_ok(p.shape, (g, mask), (p, v)):
        return False
    # decay as NumPy decides it (a weight decay that rounds to 0 in float32 still adds 0 * p)
    flags = (1 if nesterov else 0) | (2 if first else 0) | (4 if plain else 0) | (8 if weight_decay else 0)
    lib.dnnpar_sgd_step(_ptr(p), _ptr(g), None if v is None else _ptr(v), None if mask is None else _ptr(mask),
                        p.size, float(lr), float(momentum), float(weight_decay), flags, _threads_arg(threads))
    return True


def dgc_accumulate(u, v, g, p, momentum: float, weight_decay: float, mag=None, threads: int | None = None) -> bool:
    """Deep Gradient Compression's ``u = m u + (g + wd p); v += u`` in place, and ``mag[:] = |v|``
    when ``mag`` is given (dnnpar/cpu/optim.cpp, NumPy's order bit for bit; ``p`` may be None when
    ``weight_decay`` is 0). All float32 C-contiguous 1-D NumPy arrays of one size. Returns False
    (nothing written) when the library is unavailable or an array does not qualify."""
    lib = library("optim")
    if lib is None or (p is None and weight_decay) or not (u.ndim == 1 and _vectors_ok(u.shape, (g, p), (u, v, mag))):
        return False
    lib.dnnpar_dgc_accumulate(_ptr(u), _ptr(v), None if mag is None else _ptr(mag), _ptr(g),
                              None if p is None else _ptr(p), u.size, float(momentum), float(weight_decay),
                              _threads_arg(threads))
    return True
