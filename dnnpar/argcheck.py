"""Command-line argument checks: argparse ``type=`` functions and the pre-flight checks on files.

Every function here either returns the parsed value or raises ``argparse.ArgumentTypeError``
(for ``type=``) / ``ValueError`` / ``OSError`` (pre-flight) with a one-line message, so that a
bad argument is reported before any training, compression or large allocation starts.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path

# optional extras, by the top-level module that is missing: the pip command that brings it
EXTRAS = {"matplotlib": "plot", "ray": "dist", "mpi4py": "dist", "cupy": "cuda13", "PIL": "image"}


def _number(text, kind=float):
    try:
        value = kind(text)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'}") from None
    if kind is float and not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def finite_float(text) -> float:
    """A finite float (no nan, inf, or value that overflows to inf)."""
    return _number(text)


def positive_float(text) -> float:
    value = _number(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def nonneg_float(text) -> float:
    value = _number(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be >= 0")
    return value


def momentum(text) -> float:
    """A fraction in [0, 1): SGD momentum (1 or more never forgets and diverges)."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be in [0, 1)")
    return value


def sparsity(text) -> float:
    """A fraction of weights pruned, in [0, 1)."""
    value = _number(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be a fraction in [0, 1)")
    return value


def int_range(lo: int, hi: int | None = None):
    """An integer type in [lo, hi] (hi None: no upper bound)."""
    def parse(text) -> int:
        value = _number(text, int)
        if value < lo or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"{text!r} must be an integer in {lo}..{hi}" if hi is not None
                                             else f"{text!r} must be an integer >= {lo}")
        return value
    parse.__name__ = f"int >= {lo}" if hi is None else f"int in {lo}..{hi}"
    return parse


positive_int = int_range(1)
nonneg_int = int_range(0)


def quality(text):
    """Pruning quality: a finite number > 0, or a JSON object {layer: number > 0}. Layer names are
    checked against the model later (:func:`quality_for`), once the model is known."""
    text = str(text).strip()
    if not text.startswith("{"):
        value = _number(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
        return value
    try:
        spec = json.loads(text, parse_constant=lambda c: c)  # NaN / Infinity come back as strings: refused below
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(spec, dict):
        raise argparse.ArgumentTypeError("must be a number or a JSON object like '{\"fc1\": 1.8}'")
    for name, q in spec.items():
        try:
            ok = not isinstance(q, bool) and isinstance(q, (int, float)) and math.isfinite(q) and q > 0
        except OverflowError:  # an integer beyond float range
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"layer {name!r}: quality must be a finite number > 0, got "
                                             f"{json.dumps(q)}")
    return {k: float(v) for k, v in spec.items()}


def quality_for(spec, layers: list[str], default: float, model: str) -> dict:
    """Per-layer qualities for ``layers``: a number applies to all; a dict names some of them and
    the others take ``default``. An unknown layer name is a ValueError listing the known ones."""
    if not isinstance(spec, dict):
        return {n: spec for n in layers}
    check_layers(spec, layers, model, "--quality")
    return {n: spec.get(n, default) for n in layers}


def check_layers(names, layers: list[str], model: str, flag: str) -> None:
    unknown = [n for n in names if n not in layers]
    if unknown:
        raise ValueError(f"{flag}: {model} has no prunable layer {unknown[0]!r} (its conv and fc layers: "
                         f"{', '.join(layers)})")


def existing_file(text) -> str:
    """A path to a readable regular file (not a folder, device or FIFO)."""
    path = Path(text)
    if not path.exists():
        raise argparse.ArgumentTypeError(f"{text}: no such file")
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: is a folder, not a file")
    if not path.is_file():
        raise argparse.ArgumentTypeError(f"{text}: not a regular file")
    try:
        with open(path, "rb") as f:
            f.read(1)
    except OSError as e:
        raise argparse.ArgumentTypeError(f"{text}: cannot be read ({e.strerror})") from None
    return str(text)


def existing_dir(text) -> str:
    path = Path(text)
    if not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text}: {'not a folder' if path.exists() else 'no such folder'}")
    return str(text)


def data_dir(text) -> str:
    """``type=`` for --data-dir: an existing folder (whether it holds the files is checked before
    the work starts, and a folder without them is never replaced by another)."""
    try:
        return existing_dir(text)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"Fashion-MNIST not found: {e}") from None


def check_writable(path, create_parent: bool = False) -> None:
    """OSError (FileNotFoundError, IsADirectoryError, PermissionError) unless a file can be
    written at ``path``: its folder exists (made when ``create_parent``), the path is not a
    folder or a device, and a file can be created beside it. Nothing the user had is removed."""
    p = Path(path)
    if str(path) == "" or p.is_dir():
        raise IsADirectoryError(f"{path}: is a folder; give a file name")
    if p.exists() and not p.is_file():
        raise OSError(f"{path}: not a regular file")
    parent = p.parent
    if create_parent and not parent.exists():
        parent.mkdir(parents=True, exist_ok=True)
    if not parent.exists():
        raise FileNotFoundError(f"{path}: folder {parent} does not exist")
    if not parent.is_dir():
        raise NotADirectoryError(f"{path}: {parent} is not a folder")
    if p.exists() and not os.access(p, os.W_OK):
        raise PermissionError(f"{path}: not writable")
    try:  # the real test: writes are atomic (a temp file beside it, renamed), so one must be creatable
        with tempfile.NamedTemporaryFile(dir=parent, prefix=".dnnpar-check-"):
            pass
    except OSError as e:
        raise PermissionError(f"{path}: cannot create a file in {parent} ({e.strerror})") from None


def writable_file(text) -> str:
    """``type=`` for an output file: see :func:`check_writable`."""
    try:
        check_writable(text)
    except OSError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return str(text)


def require_extra(module: str) -> None:
    """ImportError naming the pip extra unless ``module`` imports."""
    try:
        __import__(module)
    except ImportError:
        raise ImportError(f"{module} is not installed: pip install 'dnnpar[{EXTRAS.get(module, module)}]'",
                          name=module) from None


def plot_file(text) -> str:
    """``type=`` for --plot: a writable PNG path, and matplotlib importable (the [plot] extra)."""
    path = writable_file(text)
    try:
        require_extra("matplotlib")
    except ImportError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return path


def one_line(message: str) -> str:
    """A multi-line message joined into one line (the CLI prints one line per error)."""
    out = ""
    for line in (s.strip() for s in str(message).splitlines()):
        if line:
            out += ("" if not out else " " if out.endswith(":") else "; ") + line
    return out
