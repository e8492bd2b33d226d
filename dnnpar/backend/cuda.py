"""The cuda backend: CuPy arrays, kernels compiled by NVRTC through ``cupy.RawModule``."""
from __future__ import annotations

import functools

from .base import Backend, BackendUnavailable
from .sources import read_source

#: NVRTC options; `dnnpar kernels` compiles with the same ones through nvcc.
NVRTC_OPTIONS = ("-std=c++17",)


@functools.lru_cache(maxsize=1)
def cuda_unavailable_reason() -> str | None:
    """``None`` when CuPy can use a GPU here, else a sentence saying why not."""
    try:
        import cupy
    except ImportError as e:
        return f"CuPy is not installed ({e}); install dnnpar[cuda12] or dnnpar[cuda13] to match your driver"
    except Exception as e:  # a broken CuPy install (missing CUDA libraries) raises others
        return f"CuPy failed to import: {e}"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:
        return f"CuPy found no usable CUDA driver or device: {e}"
    if count < 1:
        return "CuPy sees no CUDA device"
    return None


class CudaBackend(Backend):
    name = "cuda"

    def __init__(self):
        reason = cuda_unavailable_reason()
        if reason:
            raise BackendUnavailable(f"the cuda backend needs a usable NVIDIA GPU: {reason}")
        import cupy

        self.cupy = cupy
        self.xp = cupy
        self.array_type = cupy.ndarray
        self._modules: dict[str, object] = {}

    def module(self, source: str):
        if source not in self._modules:
            self._modules[source] = self.cupy.RawModule(code=read_source(source), options=NVRTC_OPTIONS)
        return self._modules[source]

    def launch(self, source, kernel, grid, block, args, shared_mem=0):
        fn = self.module(source).get_function(kernel)
        fn(tuple(grid) if not isinstance(grid, int) else (grid,), tuple(block) if not isinstance(block, int) else (block,),
           tuple(args), shared_mem=shared_mem)

    def asarray(self, a, dtype=None):
        return self.cupy.asarray(a, dtype=dtype)

    def to_numpy(self, a):
        return self.cupy.asnumpy(a)

    def synchronize(self):
        self.cupy.cuda.get_current_stream().synchronize()
