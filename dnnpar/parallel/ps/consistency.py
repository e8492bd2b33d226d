"""Consistency modes (BSP / SSP / ASP), shard bounds and the staleness histogram: the
parameter server's small pure pieces (no Ray).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

@dataclass(frozen=True)
class Consistency:
    """A parsed consistency mode; ``bound`` is the staleness bound s (None: ASP, unbounded)."""
    name: str
    bound: int | None

    def __str__(self) -> str:
        return f"ssp:{self.bound}" if self.name == "ssp" else self.name


def parse_consistency(mode: str) -> Consistency:
    """``"bsp"`` | ``"asp"`` | ``"ssp:S"`` (S an integer >= 0; ssp:0 is BSP)."""
    text = str(mode).strip().lower()
    if text == "bsp":
        return Consistency("bsp", 0)
    if text == "asp":
        return Consistency("asp", None)
    m = re.fullmatch(r"ssp:(.*)", text)
    if m:
        try:
            s = int(m.group(1))
        except ValueError:
            s = -1
        if s < 0 or not re.fullmatch(r"\s*\+?\d+\s*", m.group(1)):
            raise ValueError(f"consistency {mode!r}: the staleness bound after 'ssp:' must be an integer >= 0, "
                             f"e.g. 'ssp:2'")
        return Consistency("ssp", s)
    raise ValueError(f"unknown consistency mode {mode!r}: use 'bsp', 'asp' or 'ssp:S' (S >= 0, e.g. 'ssp:2')")


def shard_bounds(size: int, servers: int) -> list[tuple[int, int]]:
    """``servers`` contiguous (lo, hi) slices of ``range(size)``, sizes differing by at most 1."""
    if servers < 1:
        raise ValueError(f"need at least 1 server, got {servers}")
    if servers > size:
        raise ValueError(f"{servers} servers for {size} parameters: every shard needs at least one float")
    base, extra = divmod(size, servers)
    bounds, lo = [], 0
    for k in range(servers):
        hi = lo + base + (1 if k < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def render_histogram(hist: dict, label: str = "staleness", width: int = 40) -> str:
    """Counts per value as text bars, one line per value from 0 to the largest seen."""
    if not hist:
        return f"{label}: (no updates)"
    total = sum(hist.values())
    top = max(hist.values())
    lines = [f"{label:>10} {'count':>8} {'share':>7}"]
    for v in range(0, max(hist) + 1):
        n = hist.get(v, 0)
        bar = "#" * (round(width * n / top) if n else 0)
        lines.append(f"{v:>10} {n:>8} {100 * n / total:>6.1f}% {bar}")
    return "\n".join(lines)
