"""A small declarative schema layer for file headers (.dnnz header, checkpoint meta).

A file's header is parsed with :func:`loads_json` (which refuses what JSON should not hold:
``NaN``, ``Infinity``, ``1e999``, duplicate keys) and then read field by field through a
:class:`Fields` view, whose accessors check the type and range of every value they hand out
and raise the format's one error class (a :class:`~dnnpar.errors.FileFormatError`) naming the
file and the dotted field (``layers[2].entries``). Nothing here allocates more than the parsed
header itself, so a header can be refused before anything is built from it.
"""
from __future__ import annotations

import json
import math

from .errors import FileFormatError

_REQUIRED = object()


def loads_json(text, error: type[FileFormatError], path=None, field: str | None = None):
    """``json.loads`` that raises ``error`` for invalid JSON, non-finite numbers (``NaN``,
    ``Infinity``, ``1e999``), integers of more than 100 digits and duplicate object keys."""
    def no_constant(name):
        raise ValueError(f"non-finite number {name} is not allowed")

    def finite_float(s):
        v = float(s)
        if not math.isfinite(v):
            raise ValueError(f"number {s} overflows a float")
        return v

    def bounded_int(s):
        if len(s) > 100:  # far past any legitimate count; int() of huge strings is quadratic
            raise ValueError(f"integer of {len(s)} digits")
        return int(s)

    def unique_keys(pairs):
        out = {}
        for k, v in pairs:
            if k in out:
                raise ValueError(f"duplicate key {k!r}")
            out[k] = v
        return out

    if isinstance(text, (bytes, bytearray, memoryview)):
        try:
            text = str(text, "utf-8")
        except UnicodeDecodeError as e:
            raise error(f"not valid UTF-8 ({e})", path, field) from None
    try:
        return json.loads(text, parse_constant=no_constant, parse_float=finite_float, parse_int=bounded_int,
                          object_pairs_hook=unique_keys)
    except (ValueError, RecursionError) as e:
        raise error(f"not valid JSON ({e})", path, field) from None


def _type_name(v) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
            dict: "an object", type(None): "null"}.get(type(v), type(v).__name__)


class Fields:
    """A checked view of one JSON object: ``Fields(obj, DnnzError, path, "layers[0]")``.

    Each accessor returns the value of a key after checking it, or raises ``error`` naming the
    file and ``prefix.key``. ``default`` makes a key optional. Booleans are never integers."""

    def __init__(self, obj, error: type[FileFormatError], path=None, prefix: str = ""):
        self.error, self.path, self.prefix = error, path, prefix
        if not isinstance(obj, dict):
            raise self.fail(f"must be an object, got {_type_name(obj)}")
        self.obj = obj

    def name(self, key=None) -> str | None:
        if key is None:
            return self.prefix or None
        return f"{self.prefix}.{key}" if self.prefix else str(key)

    def fail(self, message: str, key=None) -> FileFormatError:
        return self.error(message, self.path, self.name(key))

    def _get(self, key, default):
        if key in self.obj:
            return self.obj[key]
        if default is _REQUIRED:
            raise self.fail("missing", key)
        return default

    def only(self, allowed) -> None:
        """Refuse keys outside ``allowed``."""
        extra = sorted(set(self.obj) - set(allowed))
        if extra:
            raise self.fail(f"unknown key(s) {', '.join(map(repr, extra))} (allowed: {', '.join(sorted(allowed))})")

    def int(self, key, lo: int | None = None, hi: int | None = None, default=_REQUIRED) -> int:
        v = self._get(key, default)
        if v is default and default is not _REQUIRED:
            return v
        return check_int(v, lo, hi, self, key)

    def float(self, key, lo: float | None = None, hi: float | None = None, default=_REQUIRED,
              open_lo: bool = False) -> float:
        """A finite number (integers accepted) in [lo, hi] (``open_lo``: (lo, hi])."""
        v = self._get(key, default)
        if v is default and default is not _REQUIRED:
            return v
        return check_float(v, lo, hi, self, key, open_lo)

    def str(self, key, choices=None, default=_REQUIRED, optional: bool = False):
        """A string (one of ``choices`` if given); ``optional``: null is allowed too."""
        v = self._get(key, default)
        if v is default and default is not _REQUIRED:
            return v
        if v is None and optional:
            return None
        if not isinstance(v, str):
            raise self.fail(f"must be a string{' or null' if optional else ''}, got {_type_name(v)}", key)
        if choices is not None and v not in choices:
            raise self.fail(f"{v!r} is not one of {', '.join(map(repr, choices))}", key)
        return v

    def bool(self, key, default=_REQUIRED) -> bool:
        v = self._get(key, default)
        if not isinstance(v, bool):
            raise self.fail(f"must be true or false, got {_type_name(v)}", key)
        return v

    def list(self, key, max_len: int | None = None, default=_REQUIRED) -> list:
        v = self._get(key, default)
        if not isinstance(v, list):
            raise self.fail(f"must be a list, got {_type_name(v)}", key)
        if max_len is not None and len(v) > max_len:
            raise self.fail(f"has {len(v)} items, at most {max_len} allowed", key)
        return v

    def ints(self, key, length: int | set | None = None, lo: int | None = None, hi: int | None = None,
             default=_REQUIRED) -> tuple:
        """A list of integers in [lo, hi], of ``length`` items (an int or a set of allowed ints)."""
        v = self._get(key, default)
        if v is default and default is not _REQUIRED:
            return v
        items = self.list(key) if key in self.obj else v
        allowed = {length} if isinstance(length, int) else length
        if allowed is not None and len(items) not in allowed:
            raise self.fail(f"must have {' or '.join(map(str, sorted(allowed)))} items, got {len(items)}", key)
        return tuple(check_int(x, lo, hi, self, f"{key}[{i}]") for i, x in enumerate(items))

    def sub(self, key, default=_REQUIRED) -> "Fields":
        """The object under ``key`` as a Fields view."""
        v = self._get(key, default)
        return Fields(v, self.error, self.path, self.name(key))

    def item(self, value, index) -> "Fields":
        """A list item (``prefix[index]``) as a Fields view."""
        return Fields(value, self.error, self.path, f"{self.prefix}[{index}]")


def check_int(v, lo, hi, fields: Fields, key) -> int:
    """``v`` as an int in [lo, hi]; floats are refused even when integral (1.0 is not a count)."""
    if isinstance(v, bool) or not isinstance(v, int):
        raise fields.fail(f"must be an integer, got {_type_name(v)} {v!r}"[:200], key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        raise fields.fail(f"{v} is not in [{'-inf' if lo is None else lo}, {'inf' if hi is None else hi}]"[:200], key)
    return v


def check_float(v, lo, hi, fields: Fields, key, open_lo: bool = False) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise fields.fail(f"must be a number, got {_type_name(v)}", key)
    try:
        v = float(v)
    except OverflowError:  # an integer past the float range
        v = math.inf
    if not math.isfinite(v):
        raise fields.fail(f"must be finite, got {v}", key)
    if (lo is not None and (v < lo or (open_lo and v == lo))) or (hi is not None and v > hi):
        raise fields.fail(f"{v!r} is not in {'(' if open_lo else '['}{lo}, {hi}]", key)
    return v


__all__ = ["loads_json", "Fields", "check_int", "check_float"]
