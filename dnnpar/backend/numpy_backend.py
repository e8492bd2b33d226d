"""The NumPy backend: ops run their NumPy reference; no kernel is launched."""
from .base import Backend


class NumpyBackend(Backend):
    name = "numpy"

    @property
    def runs_kernels(self) -> bool:
        return False
