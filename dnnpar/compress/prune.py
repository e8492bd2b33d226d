"""Magnitude pruning (Han et al. 2015): per layer, drop weights below quality x std(weights);
masks keep them at zero through retraining. Also Zhu & Gupta's gradual cubic schedule and a
per-layer sensitivity analysis."""
from __future__ import annotations

import numpy as np

from ..backend import get_backend
from ..nn import Sequential
from ..nn.conv import Conv2d, DepthwiseConv2d
from ..nn.layers import Linear

PRUNABLE = (Conv2d, DepthwiseConv2d, Linear)


def prunable_layers(model: Sequential) -> list[str]:
    """Names of the layers whose weights are pruned and shared (conv and fc)."""
    return [n for n, layer in model.layers if isinstance(layer, PRUNABLE)]


def per_layer(model: Sequential, spec) -> dict:
    """A number for every prunable layer, or a {layer: number} dict naming some of them."""
    names = prunable_layers(model)
    if isinstance(spec, dict):
        unknown = sorted(set(spec) - set(names))
        if unknown:
            raise ValueError(f"{model.name} has no prunable layer {unknown[0]!r} (it has {', '.join(names)})")
        return dict(spec)
    return {n: spec for n in names}


def magnitude_masks(model: Sequential, quality, stds: dict | None = None) -> dict[str, np.ndarray]:
    """0/1 float32 masks, per layer: keep |w| >= quality * std. ``stds`` (layer -> float) fixes
    the std (Han et al. use the layer's std before pruning, so iterative cycles tighten)."""
    be = get_backend()
    masks = {}
    for name, q in per_layer(model, quality).items():
        if not q > 0:
            raise ValueError(f"pruning quality must be > 0, got {q} for layer {name}")
        w = be.to_numpy(model[name].params["weight"])
        std = stds[name] if stds and name in stds else float(w[w != 0].std()) if np.any(w) else 0.0
        masks[f"{name}.weight"] = (np.abs(w) >= q * std).astype(np.float32) * (w != 0)
    return masks


def percentile_masks(model: Sequential, sparsity) -> dict[str, np.ndarray]:
    """0/1 masks removing the given fraction (per layer) of the smallest-magnitude weights."""
    be = get_backend()
    masks = {}
    for name, s in per_layer(model, sparsity).items():
        if not 0.0 <= s < 1.0:
            raise ValueError(f"sparsity must be in [0, 1), got {s} for layer {name}")
        w = np.abs(be.to_numpy(model[name].params["weight"]))
        k = int(round(s * w.size))
        mask = np.ones(w.shape, np.float32)
        if k:
            mask.reshape(-1)[np.argpartition(w.reshape(-1), k - 1)[:k]] = 0.0
        masks[f"{name}.weight"] = mask
    return masks


def apply_masks(model: Sequential, masks: dict) -> None:
    be = get_backend()
    for key, mask in masks.items():
        lname, pname = key.rsplit(".", 1)
        model[lname].params[pname] *= be.asarray(mask)


def kept_fraction(model: Sequential) -> dict[str, float]:
    """Fraction of nonzero weights per prunable layer."""
    be = get_backend()
    return {n: float(np.count_nonzero(be.to_numpy(model[n].params["weight"])) / model[n].params["weight"].size)
            for n in prunable_layers(model)}


def cubic_sparsity(step: int, final: float, initial: float = 0.0, start: int = 0, steps: int = 100) -> float:
    """Zhu & Gupta (2017): s_t = s_f + (s_i - s_f) (1 - (t - t0) / n)^3 for t in [t0, t0 + n]."""
    if step <= start:
        return initial
    frac = min(1.0, (step - start) / max(steps, 1))
    return final + (initial - final) * (1.0 - frac) ** 3


def sensitivity(model: Sequential, evaluate, sparsities=(0.5, 0.7, 0.8, 0.9, 0.95), layers=None) -> dict:
    """Accuracy when one layer at a time is pruned to each sparsity, the others intact.
    ``evaluate(model) -> accuracy``. Returns {layer: [(sparsity, accuracy), ...]}; weights restored."""
    be = get_backend()
    result = {}
    for name in layers or prunable_layers(model):
        w = model[name].params["weight"]
        saved = be.to_numpy(w).copy()
        rows = []
        for s in sparsities:
            apply_masks(model, percentile_masks(model, {name: s}))
            rows.append((s, float(evaluate(model))))
            w[...] = be.asarray(saved)
        result[name] = rows
    return result


def sensitivity_table(result: dict) -> str:
    sparsities = [s for s, _ in next(iter(result.values()))]
    head = f"{'layer':<10}" + "".join(f"{f'{100 * s:.0f}% pruned':>13}" for s in sparsities)
    lines = [head, "-" * len(head)]
    for name, rows in result.items():
        lines.append(f"{name:<10}" + "".join(f"{100 * a:>12.2f}%" for _, a in rows))
    return "\n".join(lines)


def plot_sensitivity(result: dict, baseline: float | None = None, sizes: dict | None = None, title: str = "",
                     path=None):
    """Accuracy against the sparsity of the one pruned layer, a line per layer; written to
    ``path`` as PNG when given. ``baseline``: the dense accuracy (a dashed line); ``sizes``:
    layer -> weight count, for the legend. Returns the matplotlib Figure (object API)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    ax = fig.subplots()
    for name, rows in result.items():
        s, acc = zip(*rows)
        label = f"{name} ({sizes[name]:,} weights)" if sizes and name in sizes else name
        ax.plot([100 * v for v in s], [100 * a for a in acc], marker="o", label=label)
    if baseline is not None:
        ax.axhline(100 * baseline, color="0.5", ls="--", lw=1, label="dense")
    ax.set(xlabel="sparsity of the one pruned layer (%)", ylabel="test accuracy (%)",
           title=title or "pruning one layer at a time, no retraining")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig
