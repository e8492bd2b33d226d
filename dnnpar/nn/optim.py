"""SGD with momentum, Nesterov and weight decay; step and cosine learning-rate schedules."""
from __future__ import annotations

import math

import numpy as np

from ..backend import cpu_native
from .base import Sequential

#: ``NATIVE["use"] = False`` keeps the numpy backend's update on NumPy expressions instead of the
#: one-pass native kernel (dnnpar/cpu/optim.cpp; the same order of operations)
NATIVE = {"use": True}


class SGD:
    """PyTorch's SGD: g = grad + wd * p;  v = mu * v + g;  p -= lr * (g + mu * v if nesterov else v).

    ``masks`` (name -> 0/1 array) keep pruned weights at zero through training (Deep Compression).
    ``plain``: names whose gradient already is the whole update (Deep Gradient Compression folds
    weight decay and momentum in on each rank, :mod:`dnnpar.parallel.dgc`): ``p -= lr * g``."""

    def __init__(self, model: Sequential, lr: float, momentum: float = 0.0, nesterov: bool = False,
                 weight_decay: float = 0.0):
        if lr <= 0 or momentum < 0 or weight_decay < 0:
            raise ValueError(f"SGD: need lr > 0, momentum >= 0, weight_decay >= 0; got {lr}, {momentum}, {weight_decay}")
        if nesterov and momentum == 0:
            raise ValueError("SGD: Nesterov needs momentum > 0")
        self.model, self.lr, self.momentum, self.nesterov, self.weight_decay = model, lr, momentum, nesterov, weight_decay
        self.velocity: dict[str, object] = {}
        self.masks: dict[str, object] = {}
        self.plain: set[str] = set()

    def step(self):
        for name, p, g in self.model.named_parameters():
            if g is None:
                continue
            if NATIVE["use"] and isinstance(p, np.ndarray) and self._native(name, p, g):
                continue
            if name in self.plain:
                p -= p.dtype.type(self.lr) * g
                if name in self.masks:
                    p *= self.masks[name]
                continue
            if self.weight_decay:
                g = g + self.weight_decay * p
            if self.momentum:
                v = self.velocity.get(name)
                if v is None:
                    v = self.velocity[name] = g.copy()
                else:
                    v *= self.momentum
                    v += g
                g = g + self.momentum * v if self.nesterov else v
            p -= p.dtype.type(self.lr) * g
            if name in self.masks:
                p *= self.masks[name]

    def _native(self, name, p, g) -> bool:
        """The update of one parameter by the native kernel; False when it cannot take it."""
        plain, v, first = name in self.plain, None, False
        if self.momentum and not plain:
            v = self.velocity.get(name)
            if v is None:
                v, first = np.empty_like(p), True
        if not cpu_native.sgd_step(p, g, v, self.masks.get(name), self.lr, self.momentum, self.weight_decay,
                                   self.nesterov, first, plain):
            return False
        if first:
            self.velocity[name] = v
        return True

    def state(self) -> dict:
        return {f"velocity/{k}": v for k, v in self.velocity.items()}


class StepLR:
    """lr = base * gamma ** (epoch // step_size)."""

    def __init__(self, base_lr: float, step_size: int, gamma: float = 0.1):
        self.base_lr, self.step_size, self.gamma = base_lr, step_size, gamma

    def __call__(self, epoch: int) -> float:
        return self.base_lr * self.gamma ** (epoch // self.step_size)


class CosineLR:
    """lr = eta_min + (base - eta_min) * (1 + cos(pi * epoch / t_max)) / 2."""

    def __init__(self, base_lr: float, t_max: int, eta_min: float = 0.0):
        self.base_lr, self.t_max, self.eta_min = base_lr, max(1, t_max), eta_min

    def __call__(self, epoch: int) -> float:
        return self.eta_min + (self.base_lr - self.eta_min) * (1 + math.cos(math.pi * min(epoch, self.t_max) / self.t_max)) / 2


class ConstantLR:
    def __init__(self, base_lr: float):
        self.base_lr = base_lr

    def __call__(self, epoch: int) -> float:
        return self.base_lr


def make_schedule(kind: str, base_lr: float, epochs: int, step_size: int | None = None, gamma: float = 0.1):
    if kind == "cosine":
        return CosineLR(base_lr, epochs)
    if kind == "step":
        return StepLR(base_lr, step_size or max(1, epochs // 3), gamma)
    if kind == "constant":
        return ConstantLR(base_lr)
    raise ValueError(f"unknown schedule {kind!r}: one of cosine, step, constant")
