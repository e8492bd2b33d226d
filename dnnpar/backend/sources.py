"""Where the kernel sources live, and what each file exports."""
from __future__ import annotations

import functools
import hashlib
import os
import re
import subprocess
import threading
from pathlib import Path
from typing import Callable, Sequence

#: kernel families, one .cu file each
SOURCES = ("im2col.cu", "gemm.cu", "spmv.cu", "depthwise.cu", "conv_direct.cu", "conv_implicit.cu", "softmax_ce.cu")

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
    root = Path(os.environ.get("DNNPAR_CACHE", Path.home() / ".cache" / "dnnpar"))
    path = root / kind
    path.mkdir(parents=True, exist_ok=True)
    return path


def build_shared_library(code: str, so: Path, command: Callable[[Path, Path], Sequence[str]],
                         error: type[Exception] = RuntimeError, what: str = "the compiler failed") -> Path:
    """Compile ``code`` into the shared library ``so`` unless ``so`` is already there (the cache:
    callers put a :func:`digest` of everything that shapes the binary into its name).

    ``command(source, output)`` gives the compiler's argv. The source and the library are written
    next to ``so`` under names unique to this process and thread, and the library is renamed
    into place atomically: a concurrent process sees the old state or the whole file. A compiler
    that exits non-zero raises ``error("<what>:\\n<the end of its stderr>")``; one that cannot be
    started raises ``OSError``.
    """
    if so.exists():
        return so
    tag = f".{os.getpid()}-{threading.get_ident()}"
    src = so.with_suffix(f"{tag}.cpp")
    tmp = so.with_suffix(f"{tag}.tmp")
    src.write_text(code)
    try:
        proc = subprocess.run([str(a) for a in command(src, tmp)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise error(f"{what}:\n{proc.stderr[-6000:]}")
        os.replace(tmp, so)  # atomic: a concurrent process sees the old state or the whole file
    finally:
        src.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return so
