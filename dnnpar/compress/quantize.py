"""Weight sharing (Deep Compression, section 3): per layer, k-means over the surviving weights;
each weight becomes an index into a small codebook. Code 0 is reserved for 0.0 (pruned weights
and the relative-index fillers), so a b-bit layer has 2^b - 1 shared values.

Centroid fine-tuning: while retraining, the gradient of a shared value is the sum of the
gradients of the weights that use it (the paper's Figure 3); the weights are then rewritten from
the updated codebook, so the model never leaves its quantised form.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import get_backend
from ..nn import Sequential

INITS = ("linear", "random", "density")


def kmeans_1d(values: np.ndarray, k: int, init: str = "linear", iters: int = 50, seed: int = 0):
    """Lloyd's algorithm on scalars. Returns (centroids (k,) float64 sorted, labels (n,) int).

    init: "linear" (evenly spaced between min and max: the paper's choice, keeps the rare large
    weights represented), "random" (k distinct sampled values), "density" (evenly spaced in the
    CDF, i.e. quantiles)."""
    if init not in INITS:
        raise ValueError(f"unknown k-means initialisation {init!r}: one of {', '.join(INITS)}")
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        return np.zeros(0), np.zeros(0, np.int64)
    k = max(1, min(k, np.unique(v).size))
    if init == "linear":
        c = np.linspace(v.min(), v.max(), k)
    elif init == "density":
        c = np.quantile(v, (np.arange(k) + 0.5) / k)
    else:
        c = np.sort(np.random.default_rng(seed).choice(np.unique(v), size=k, replace=False))
    order = np.argsort(v)
    vs = v[order]
    for _ in range(iters):
        c = np.unique(c)  # merged centroids collapse: keep them distinct for the midpoint search
        bounds = (c[1:] + c[:-1]) / 2
        lab = np.searchsorted(bounds, vs)
        sums = np.bincount(lab, weights=vs, minlength=c.size)
        counts = np.bincount(lab, minlength=c.size)
        new = np.where(counts > 0, sums / np.maximum(counts, 1), c)
        if np.allclose(new, c, rtol=0, atol=1e-12):
            c = new
            break
        c = new
    labels = np.empty(v.size, np.int64)
    labels[order] = np.searchsorted((c[1:] + c[:-1]) / 2, vs)
    return c, labels


@dataclass
class SharedLayer:
    """A layer's weights as codes into a codebook: weight = codebook[codes]."""
    codebook: np.ndarray   # (2^bits,) float32, codebook[0] = 0.0
    codes: np.ndarray      # weight-shaped uint8/uint16
    bits: int

    def weights(self) -> np.ndarray:
        return self.codebook[self.codes]


def share_layer(w: np.ndarray, bits: int, init: str = "linear", seed: int = 0) -> SharedLayer:
    if not 1 <= bits <= 16:
        raise ValueError(f"weight bits must be in 1..16, got {bits}")
    nz = w != 0
    centroids, labels = kmeans_1d(w[nz], (1 << bits) - 1, init, seed=seed)
    codebook = np.zeros(1 << bits, np.float32)
    codebook[1:1 + centroids.size] = centroids
    codes = np.zeros(w.shape, np.uint8 if bits <= 8 else np.uint16)
    codes[nz] = labels + 1
    return SharedLayer(codebook, codes, bits)


def share_weights(model: Sequential, bits: dict[str, int], init: str = "linear", seed: int = 0) -> dict[str, SharedLayer]:
    """Quantise the named layers in place (their weights become codebook values)."""
    be = get_backend()
    shared = {}
    for name, b in bits.items():
        w = model[name].params["weight"]
        s = share_layer(be.to_numpy(w), b, init, seed)
        w[...] = be.asarray(s.weights())
        shared[name] = s
    return shared


class CentroidSGD:
    """Retrains a quantised model: shared layers update their centroids from the summed member
    gradients (with momentum); every other parameter takes a plain SGD step."""

    def __init__(self, model: Sequential, shared: dict[str, SharedLayer], lr: float, momentum: float = 0.9):
        self.model, self.shared, self.lr, self.momentum = model, shared, lr, momentum
        self.velocity: dict[str, np.ndarray] = {}
        self.masks: dict = {}

    def step(self):
        be = get_backend()
        for name, p, g in self.model.named_parameters():
            if g is None:
                continue
            lname, pname = name.rsplit(".", 1)
            if pname == "weight" and lname in self.shared:
                s = self.shared[lname]
                grad = np.bincount(s.codes.ravel(), weights=be.to_numpy(g).ravel().astype(np.float64),
                                   minlength=s.codebook.size)
                grad[0] = 0.0  # code 0 is the pruned zero: it stays zero
                v = self.velocity.get(name)
                v = grad if v is None else self.momentum * v + grad
                self.velocity[name] = v
                s.codebook -= (self.lr * v).astype(np.float32)
                s.codebook[0] = 0.0
                p[...] = be.asarray(s.weights())
            else:
                v = self.velocity.get(name)
                v = g.copy() if v is None else self.momentum * v + g
                self.velocity[name] = v
                p -= p.dtype.type(self.lr) * v

    def state(self) -> dict:
        return {}
