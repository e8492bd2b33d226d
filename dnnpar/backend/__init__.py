"""Backends: which array module holds the data and how a kernel from ``cuda/*.cu`` is launched.

* ``numpy`` — NumPy arrays; ops run their NumPy reference (the CPU path and the test oracle).
* ``cuda``  — CuPy arrays; kernels compiled by NVRTC through ``cupy.RawModule``.
* ``emu``   — NumPy arrays; the same ``.cu`` source compiled by the host C++ compiler with an
  emulation header and launched with the same (grid, block, args) the cuda backend gets.

Ops ask the active backend for ``launch(source, kernel, grid, block, args)`` (``None`` on numpy)
and never test for a particular device themselves.

Every op computes in float32 on every backend. :func:`precision` ("float64") is an oracle mode
for gradient checks and reference results: honoured by the numpy backend only.
"""
from __future__ import annotations

import contextlib
import threading

import numpy as np

from .base import POISON, Backend, BackendUnavailable  # noqa: F401

_NAMES = ("numpy", "cuda", "emu")
_state = threading.local()
_instances: dict[str, Backend] = {}
_default: str | None = None


def _make(name: str) -> Backend:
    if name not in _NAMES:
        raise ValueError(f"unknown backend {name!r}: choose one of {', '.join(_NAMES)}")
    if name not in _instances:
        if name == "numpy":
            from .numpy_backend import NumpyBackend as cls
        elif name == "cuda":
            from .cuda import CudaBackend as cls
        else:
            from .emu import EmuBackend as cls
        _instances[name] = cls()  # raises BackendUnavailable with the reason
    return _instances[name]


def default_backend_name() -> str:
    """``cuda`` when CuPy sees a usable device, else ``numpy``."""
    global _default
    if _default is None:
        from .cuda import cuda_unavailable_reason

        _default = "numpy" if cuda_unavailable_reason() else "cuda"
    return _default


def get_backend() -> Backend:
    """The backend active in this thread."""
    name = getattr(_state, "name", None) or default_backend_name()
    return _make(name)


def set_backend(name: str) -> Backend:
    """Make ``name`` ("numpy" | "cuda" | "emu") the active backend of this thread."""
    backend = _make(name)
    _state.name = name
    return backend


@contextlib.contextmanager
def use_backend(name: str):
    """``with dp.use_backend("emu"): ...`` — activate a backend for a block, then restore."""
    previous = getattr(_state, "name", None)
    backend = set_backend(name)
    try:
        yield backend
    finally:
        _state.name = previous


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
    """Fill every op output with NaN before the kernel runs (debugging and tests)."""
    saved = POISON["on"]
    POISON["on"] = enabled
    try:
        yield
    finally:
        POISON["on"] = saved


PRECISIONS = ("float32", "float64")


def compute_dtype(backend: Backend | None = None) -> np.dtype:
    """The dtype ops compute in here: float32, or float64 inside ``precision("float64")``, which
    only the numpy backend honours (a ValueError on a kernel backend)."""
    name = getattr(_state, "precision", None) or "float32"
    if name == "float64":
        be = backend or get_backend()
        if be.runs_kernels:
            raise ValueError(f"dp.precision('float64') is an oracle mode of the numpy backend; the "
                             f"'{be.name}' backend computes in float32 (leave the precision block first)")
    return np.dtype(name)


@contextlib.contextmanager
def precision(name: str):
    """``with dp.precision("float64"): ...`` — ops on the numpy backend take and return float64
    arrays in the block (finite-difference gradient checks, float64 references); outside it,
    and on every other backend, every op computes in float32. Entering float64 on the emu or
    cuda backend, or calling an op there inside the block, is a ValueError."""
    if name not in PRECISIONS:
        raise ValueError(f"unknown precision {name!r}: one of {', '.join(PRECISIONS)}")
    previous = getattr(_state, "precision", None)
    _state.precision = name
    try:
        compute_dtype()  # refuse float64 on a kernel backend now, not at the first op
        yield np.dtype(name)
    finally:
        _state.precision = previous
