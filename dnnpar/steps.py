"""What every training strategy shares below the epoch loop: the run's configuration
(:class:`TrainConfig`), the model it names, one mini-batch's forward/backward with the
finite-loss check, and evaluation. The loop itself is :mod:`dnnpar.engine`; its public entry is
:func:`dnnpar.train.train`. Hogwild and parameter-server workers import this module alone.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import backend as _backend
from .nn.base import Graph
from .nn.fusion import fold_batchnorm
from .nn.models import build

@dataclass
class TrainConfig:
    model: str = "lenet5"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    subset: str = "full"
    data_dir: str | None = None
    backend: str | None = None
    data_file: str | None = None   # a --data set trained on (then subset and data_dir are unused)

    def validate(self):
        """ValueError / TypeError naming the first field out of range (before any data is read)."""
        for name in ("epochs", "batch_size", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {v!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name, lo, hi, what in (("lr", 0.0, None, "> 0"), ("momentum", 0.0, 1.0, "in [0, 1)"),
                                   ("weight_decay", 0.0, None, ">= 0")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                raise TypeError(f"{name} must be a number, got {v!r}")
            try:
                v = float(v)
            except OverflowError:  # an int beyond float range
                v = float("inf")
            ok = np.isfinite(v) and v >= lo and (hi is None or v < hi) and (name != "lr" or v > 0)
            if not ok:
                raise ValueError(f"{name} must be a finite number {what}, got {v}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule {self.schedule!r}: 'cosine', 'step' or 'constant'")
        if self.subset not in ("full", "embedded"):
            raise ValueError(f"subset {self.subset!r}: 'full' or 'embedded'")



def build_model(cfg: TrainConfig):
    """``cfg.model`` built with ``cfg.seed`` for Fashion-MNIST (10 classes; the LeNets have 10 already)."""
    if cfg.model in ("lenet300", "lenet5"):
        return build(cfg.model, seed=cfg.seed)
    return build(cfg.model, seed=cfg.seed, num_classes=10)


def forward_backward(model, loss_fn, xb, yb, where: str = ""):
    """One mini-batch of backend arrays: forward, loss, backward (the layers' grads are filled).
    Returns (loss as a float, logits). A loss that is not finite is a FloatingPointError naming
    ``where`` (e.g. "at epoch 2, batch 17"), before the backward pass spreads it."""
    logits = model.forward(xb)
    loss = float(loss_fn(logits, yb))
    if not np.isfinite(loss):
        raise FloatingPointError(f"the loss became {loss} {where}: training diverged; lower the learning rate")
    model.backward(loss_fn.backward())
    return loss, logits


def predict(model, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Class predictions (NumPy int64) in eval mode, Conv2d -> BatchNorm2d pairs folded into one
    convolution (:func:`dnnpar.nn.fusion.fold_batchnorm`, an inference copy); the model's mode is
    restored afterwards."""
    be = _backend.get_backend()
    was_training = model.training
    model.eval()
    try:
        fwd = fold_batchnorm(model) if isinstance(model, Graph) else model
        return np.concatenate([be.to_numpy(fwd.forward(be.asarray(x[s:s + batch_size]))).argmax(axis=1)
                               for s in range(0, len(x), batch_size)]) if len(x) else np.zeros(0, np.int64)
    finally:
        model.train(was_training)


def evaluate(model, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy in eval mode."""
    return float((predict(model, x, batch_size) == y).mean()) if len(y) else 0.0
