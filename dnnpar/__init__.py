"""dnnpar: fast and parallel deep neural networks on NVIDIA GPUs, from hand-written CUDA kernels.

    import dnnpar as dp
    dp.set_backend("numpy" | "cuda" | "emu")
    with dp.use_backend("emu"): ...
    dp.ops.conv2d(x, w, stride=1, padding=1)
"""
from . import data, nn, ops, sparse  # noqa: F401
from .backend import BackendUnavailable, get_backend, precision, set_backend, use_backend  # noqa: F401

__version__ = "0.1.0"


def asarray(a, dtype=None):
    """``a`` as an array of the active backend (NumPy for numpy/emu, CuPy for cuda)."""
    return get_backend().asarray(a, dtype=dtype)


def to_numpy(a):
    """A NumPy copy (or view) of a backend array."""
    return get_backend().to_numpy(a)


__all__ = ["data", "nn", "ops", "sparse", "set_backend", "use_backend", "get_backend", "asarray", "to_numpy",
           "precision", "BackendUnavailable"]
