"""Where the kernel sources live, and what each file exports."""
from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

#: kernel families, one .cu file each
SOURCES = ("im2col.cu", "gemm.cu", "spmv.cu", "depthwise.cu", "conv_direct.cu")

_LB = r"(?:__launch_bounds__\s*\([^)]*\)\s*)?"
_KERNEL_RE = re.compile(r'extern\s+"C"\s+__global__\s+' + _LB + r"void\s+" + _LB + r"(\w+)\s*\(")


@functools.lru_cache(maxsize=None)
def cuda_dir() -> Path:
    """The folder holding the ``.cu`` files: ``cuda/`` of a source checkout, or the copy
    installed inside the package."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "cuda", here / "cuda"):
        if (candidate / "gemm.cu").is_file():
            return candidate
    raise FileNotFoundError(f"dnnpar's kernel sources are missing (looked in {here.parent / 'cuda'} and {here / 'cuda'})")


def source_path(name: str) -> Path:
    if name not in SOURCES:
        raise ValueError(f"unknown kernel source {name!r}: one of {', '.join(SOURCES)}")
    return cuda_dir() / name


@functools.lru_cache(maxsize=None)
def read_source(name: str) -> str:
    return source_path(name).read_text()


def kernel_names(code: str) -> list[str]:
    """The ``extern "C" __global__`` kernels a source defines, in order."""
    return _KERNEL_RE.findall(code)


def kernel_params(code: str, kernel: str) -> list[str]:
    """Parameter names of ``kernel`` as written in its definition (for error messages)."""
    for m in _KERNEL_RE.finditer(code):
        if m.group(1) != kernel:
            continue
        depth, i = 1, m.end()
        while depth and i < len(code):
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            i += 1
        return [(re.findall(r"\w+", p) or ["?"])[-1] for p in code[m.end():i - 1].split(",")]
    return []


def digest(*parts: str | bytes) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode() if isinstance(p, str) else p)
        h.update(b"\0")
    return h.hexdigest()[:20]


def cache_dir(kind: str) -> Path:
    """``$DNNPAR_CACHE`` (default ``~/.cache/dnnpar``) / kind, created on demand."""
    import os

    root = Path(os.environ.get("DNNPAR_CACHE", Path.home() / ".cache" / "dnnpar"))
    path = root / kind
    path.mkdir(parents=True, exist_ok=True)
    return path
