"""The small interface every backend provides."""
from __future__ import annotations

import numpy as np


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

    def asarray(self, a, dtype=None):
        """Bring ``a`` (NumPy or the backend's own array) onto this backend."""
        return self.xp.asarray(a, dtype=dtype)

    def to_numpy(self, a) -> np.ndarray:
        return np.asarray(a)

    def synchronize(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<dnnpar backend {self.name}>"
