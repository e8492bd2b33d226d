"""NVTX ranges around every op launch, visible in Nsight Systems; a no-op without ``nvtx``."""
from __future__ import annotations

import contextlib
import functools

try:  # the `nvtx` package (extra `gpu`); absent on CPU-only installs
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - depends on the install
    _nvtx = None

DOMAIN = "dnnpar"


def annotate_range(name: str):
    """Context manager: an NVTX range named ``name`` in the dnnpar domain."""
    if _nvtx is None:
        return contextlib.nullcontext()
    return _nvtx.annotate(name, domain=DOMAIN)


def ranged(name: str):
    """Decorator: run the function inside ``annotate_range(name)``."""
    def wrap(fn):
        @functools.wraps(fn)
        def inner(*args, **kwargs):
            with annotate_range(name):
                return fn(*args, **kwargs)
        return inner
    return wrap
