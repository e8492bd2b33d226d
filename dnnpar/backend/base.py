"""The small interface every backend provides."""
from __future__ import annotations

import os

import numpy as np


#: When true, every output an op allocates is filled with NaN (floats) or the dtype's maximum
#: (integers) before a kernel writes it, so an element a kernel forgets to write is caught.
#: Set with :func:`dnnpar.backend.poison_outputs` or DNNPAR_POISON=1.
POISON = {"on": os.environ.get("DNNPAR_POISON", "") not in ("", "0")}


class BackendUnavailable(RuntimeError):
    """The requested backend cannot run here; the message says why and what to install."""


class Backend:
    name: str = "?"
    #: the array module (numpy or cupy)
    xp = np
    #: the array type that ops accept and return
    array_type: type = np.ndarray

    def launch(self, source: str, kernel: str, grid, block, args, shared_mem: int = 0) -> None:
        """Launch ``kernel`` from ``cuda/<source>`` with CUDA's (grid, block, args) shape."""
        raise NotImplementedError

    @property
    def runs_kernels(self) -> bool:
        return True

    def empty(self, shape, dtype=np.float32):
        """An output buffer for a kernel (poisoned when :data:`POISON` is on)."""
        a = self.xp.empty(shape, dtype=dtype)
        if POISON["on"]:
            a.fill(np.nan if np.dtype(dtype).kind == "f" else np.iinfo(dtype).max)
        return a

    def asarray(self, a, dtype=None):
        """Bring ``a`` (NumPy or the backend's own array) onto this backend."""
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def synchronize(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<dnnpar backend {self.name}>"
