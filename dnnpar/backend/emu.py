"""The emu backend: the unmodified ``cuda/*.cu`` kernels, compiled for the CPU and launched
with CUDA's (grid, block, args) shape.

Each kernel file is compiled once by the host C++ compiler (``$CXX``, default ``g++``) with
``emu_runtime.h`` in front of it, and cached under ``~/.cache/dnnpar/emu`` by content hash. Every
CUDA thread becomes a fiber; the fibers of a block run between barriers in an order chosen by
:meth:`EmuBackend.schedule`, so a missing ``__syncthreads()`` shows up as a result that depends
on the order. Array arguments are copied into buffers that end at a guard page, so an
out-of-bounds access becomes an :class:`EmuMemoryError` naming the argument, not a crash. Only
the buffers the kernel may write (``T*``, not ``const T*`` in its C++ signature) are copied back
after the launch: inputs are never written, so read-only arrays (``np.load(..., mmap_mode="r")``)
are fine as inputs, and a read-only array passed where the kernel writes is a ValueError.

The launcher also checks every argument against the kernel's C++ parameter types (a Python
``int`` where the kernel takes ``int`` is refused: CuPy would pass 64 bits), which is a check a
real GPU launch cannot make.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import threading
from pathlib import Path

import numpy as np

from .base import Backend, BackendUnavailable
from .sources import build_shared_library, cache_dir, digest, kernel_names, kernel_params, read_source

RUNTIME_HEADER = Path(__file__).with_name("emu_runtime.h")
CXXFLAGS = ("-O2", "-std=c++17", "-fPIC", "-shared", "-U_FORTIFY_SOURCE", "-Wall", "-Wno-unknown-pragmas",
            "-Wno-unused-function", "-Wno-unused-variable")
ORDERS = {"forward": 0, "reverse": 1, "random": 2}

# scalar code (from emu_runtime.h) -> NumPy dtype
_CODE_DTYPE = {"f": np.float32, "d": np.float64, "i": np.int32, "I": np.uint32, "q": np.int64,
               "B": np.uint8, "b": np.int8}
_CODE_CTYPE = {"f": ctypes.c_float, "d": ctypes.c_double, "i": ctypes.c_int32, "I": ctypes.c_uint32,
               "q": ctypes.c_int64, "B": ctypes.c_uint8, "b": ctypes.c_int8}


class EmuCompileError(RuntimeError):
    """The host compiler rejected a kernel file."""


class EmuMemoryError(RuntimeError):
    """An emulated kernel touched memory outside its arguments."""


class EmuSchedulingError(RuntimeError):
    """An emulated block could not make progress (barrier in divergent code, exited lane in a shuffle)."""


class EmuModule:
    """One kernel file compiled for the CPU."""

    def __init__(self, code: str, label: str, cxx: str):
        self.code = code
        self.label = label
        self.kernels = kernel_names(code)
        if not self.kernels:
            raise EmuCompileError(f"{label}: no extern \"C\" __global__ kernel found")
        header = RUNTIME_HEADER.read_text()
        key = digest(code, header, cxx, " ".join(CXXFLAGS))
        so = cache_dir("emu") / f"{Path(label).stem}-{key}.so"
        if not so.exists():
            self._build(so, cxx)
        self.lib = ctypes.CDLL(str(so), mode=ctypes.RTLD_LOCAL)
        self.lib.dnnpar_emu_launch.restype = ctypes.c_int
        self.lib.dnnpar_emu_launch.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                               ctypes.c_int, ctypes.c_uint]
        self.lib.dnnpar_emu_alloc.restype = ctypes.c_void_p
        self.lib.dnnpar_emu_alloc.argtypes = [ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p),
                                              ctypes.POINTER(ctypes.c_size_t)]
        self.lib.dnnpar_emu_free.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.lib.dnnpar_emu_error.restype = ctypes.c_char_p
        self.lib.dnnpar_emu_fault_addr.restype = ctypes.c_ulonglong
        self._sigs: dict[str, list[str]] = {}
        self._lock = threading.Lock()

    def _build(self, so: Path, cxx: str) -> None:
        wrappers = "".join(
            f'extern "C" void __emu_entry_{k}(void** a) {{ ::dnnpar_emu::invoke(&{k}, a); }}\n'
            f'extern "C" const char* __emu_sig_{k}() {{ return ::dnnpar_emu::signature(&{k}); }}\n'
            for k in self.kernels)
        tu = f'#line 1 "{self.label}"\n{self.code}\n#line 1 "<emu wrappers>"\n{wrappers}'
        build_shared_library(
            tu, so, lambda src, out: [cxx, *CXXFLAGS, "-include", str(RUNTIME_HEADER), "-x", "c++", str(src),
                                      "-o", str(out)],
            error=EmuCompileError, what=f"{cxx} could not compile {self.label} for the emu backend")

    def signature(self, kernel: str) -> list[str]:
        if kernel not in self._sigs:
            if kernel not in self.kernels:
                raise ValueError(f"{self.label} has no kernel {kernel!r} (it has {', '.join(self.kernels)})")
            fn = getattr(self.lib, f"__emu_sig_{kernel}")
            fn.restype = ctypes.c_char_p
            self._sigs[kernel] = fn().decode().split()
        return self._sigs[kernel]

    def launch(self, kernel: str, grid, block, args, order: str = "forward", seed: int = 0) -> None:
        sig = self.signature(kernel)
        names = kernel_params(self.code, kernel)
        if len(args) != len(sig):
            raise TypeError(f"kernel {kernel} takes {len(sig)} arguments ({', '.join(names)}), got {len(args)}")
        grid3, block3 = _dim3(grid, "grid"), _dim3(block, "block")
        keep = []            # ctypes objects that must outlive the call
        buffers = []         # (array, data pointer, base, total, index)
        argv = (ctypes.c_void_p * len(args))()
        try:
            for i, (code, a) in enumerate(zip(sig, args)):
                name = names[i] if i < len(names) else f"#{i}"
                if code.startswith("*"):
                    if a is None:
                        cell = ctypes.c_void_p(0)
                    else:
                        _check_pointer_arg(kernel, name, code[1], a)
                        written = not code.endswith("c")  # the kernel's C++ type says: T* (not const T*)
                        if written and not a.flags.writeable:
                            raise ValueError(f"kernel {kernel}: argument {name} is written by the kernel but "
                                             "the array is read-only")
                        nbytes = a.nbytes
                        base, total = ctypes.c_void_p(), ctypes.c_size_t()
                        ptr = self.lib.dnnpar_emu_alloc(nbytes, ctypes.byref(base), ctypes.byref(total))
                        if not ptr:
                            raise MemoryError(f"emu: cannot map a guarded buffer of {nbytes} bytes")
                        buffers.append((a, ptr, base.value, total.value, i, name, written))
                        ctypes.memmove(ptr, a.ctypes.data, nbytes)
                        cell = ctypes.c_void_p(ptr)
                else:
                    want = _CODE_DTYPE.get(code)
                    if want is None:
                        raise TypeError(f"kernel {kernel}: parameter {name} has a type the emu launcher cannot pass")
                    if not isinstance(a, np.generic) or a.dtype != want:
                        raise TypeError(f"kernel {kernel}: argument {name} must be numpy.{np.dtype(want).name}, "
                                        f"got {type(a).__name__}" + (f" ({a.dtype})" if hasattr(a, 'dtype') else "")
                                        + " — a Python scalar would reach the GPU with the wrong width")
                    cell = _CODE_CTYPE[code](a.item())
                keep.append(cell)
                argv[i] = ctypes.cast(ctypes.byref(cell), ctypes.c_void_p)
            entry = ctypes.cast(getattr(self.lib, f"__emu_entry_{kernel}"), ctypes.c_void_p)
            g = (ctypes.c_uint * 3)(*grid3)
            b = (ctypes.c_uint * 3)(*block3)
            with self._lock:
                rc = self.lib.dnnpar_emu_launch(entry, argv, g, b, ORDERS[order], seed & 0xFFFFFFFF)
                message = self.lib.dnnpar_emu_error().decode()
                fault = self.lib.dnnpar_emu_fault_addr()
            if rc == 2:
                raise EmuMemoryError(_describe_fault(kernel, fault, buffers, message))
            if rc == 1:
                raise EmuSchedulingError(f"kernel {kernel}, grid {grid3}, block {block3}: {message}")
            if rc == 3:
                raise ValueError(f"kernel {kernel}: {message}")
            for a, ptr, *_, written in buffers:
                if written:  # inputs (const T*) are never copied back: they may be read-only
                    ctypes.memmove(a.ctypes.data, ptr, a.nbytes)
        finally:
            for _, _, base, total, *_ in buffers:
                self.lib.dnnpar_emu_free(base, total)


def _dim3(v, what: str) -> tuple[int, int, int]:
    t = (v,) if isinstance(v, (int, np.integer)) else tuple(v)
    if not 1 <= len(t) <= 3 or any(int(d) < 1 for d in t):
        raise ValueError(f"{what} must be 1 to 3 positive integers, got {v!r}")
    return tuple(int(d) for d in t) + (1,) * (3 - len(t))


def _check_pointer_arg(kernel: str, name: str, code: str, a) -> None:
    if not isinstance(a, np.ndarray):
        raise TypeError(f"kernel {kernel}: argument {name} must be a numpy.ndarray on the emu backend, "
                        f"got {type(a).__module__}.{type(a).__name__}")
    want = _CODE_DTYPE.get(code)
    if want is not None and a.dtype != want:
        raise TypeError(f"kernel {kernel}: argument {name} must be {np.dtype(want).name}, got {a.dtype}")
    if not a.flags.c_contiguous:
        raise ValueError(f"kernel {kernel}: argument {name} must be C-contiguous")


def _describe_fault(kernel: str, addr: int, buffers, message: str) -> str:
    for a, ptr, base, total, i, name, _ in buffers:
        if base <= addr < base + total:
            off = addr - ptr
            where = (f"{off - a.nbytes} bytes past the end" if off >= a.nbytes else f"{-off} bytes before the start")
            return (f"kernel {kernel} accessed memory out of bounds: address 0x{addr:x} is {where} of argument "
                    f"{i} ({name}: {a.dtype} array of {a.size} elements, {a.nbytes} bytes)")
    return f"kernel {kernel} accessed memory outside every argument: {message}"


class EmuBackend(Backend):
    name = "emu"

    def __init__(self):
        self.cxx = os.environ.get("CXX", "g++")
        if shutil.which(self.cxx) is None:
            raise BackendUnavailable(f"the emu backend compiles kernels with a C++ compiler, and {self.cxx!r} "
                                     "is not on PATH (install g++ or set CXX)")
        self.order = "forward"
        self.seed = 0
        self._modules: dict[str, EmuModule] = {}
        self._overrides: dict[str, str] = {}

    def module(self, source: str) -> EmuModule:
        code = self._overrides.get(source) or read_source(source)
        key = digest(code)
        if key not in self._modules:
            self._modules[key] = EmuModule(code, source, self.cxx)
        return self._modules[key]

    def launch(self, source, kernel, grid, block, args, shared_mem=0):
        if shared_mem:
            raise NotImplementedError("emu: dynamic shared memory is not used by any dnnpar kernel yet")
        self.module(source).launch(kernel, grid, block, args, self.order, self.seed)

    @contextlib.contextmanager
    def schedule(self, order: str = "forward", seed: int = 0):
        """Run the threads of each block in ``order`` ("forward" | "reverse" | "random", the
        latter a fresh permutation per barrier phase drawn from ``seed``) inside the block."""
        if order not in ORDERS:
            raise ValueError(f"unknown schedule {order!r}: one of {', '.join(ORDERS)}")
        saved = self.order, self.seed
        self.order, self.seed = order, seed
        try:
            yield self
        finally:
            self.order, self.seed = saved

    @contextlib.contextmanager
    def source_override(self, source: str, code: str):
        """Launch kernels of ``source`` from ``code`` instead (for fault-injection tests)."""
        self._overrides[source] = code
        try:
            yield self
        finally:
            del self._overrides[source]
