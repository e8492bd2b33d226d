"""Accounting: per layer output shape, parameters, multiply-accumulates and memory; totals for
inference and for training at a batch size."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .base import Graph
from .conv import Conv2d, DepthwiseConv2d
from .graph import Mul
from .layers import (BatchNorm2d, Clip, Dropout, HardSigmoid, HardSwish, Linear, MaxPool2d, ReLU, Sigmoid,
                     Softmax)

F32 = 4


@dataclass
class LayerRow:
    name: str
    kind: str
    out_shape: tuple
    params: int
    macs: int
    out_bytes: int       # one sample's output
    saved_bytes: int     # one sample's state kept for backward


def _saved_bytes(layer, in_shapes, out_shape) -> int:
    """What this layer's forward keeps for its backward pass, per sample (see each layer)."""
    n_in, n_out = int(np.prod(in_shapes[0])), int(np.prod(out_shape))
    if isinstance(layer, (Conv2d, DepthwiseConv2d, Linear, BatchNorm2d, Dropout, HardSwish)):
        return n_in * F32           # input (BN: the normalised input; dropout: the mask)
    if isinstance(layer, (ReLU, Clip, HardSigmoid)):
        return n_in                 # a boolean mask
    if isinstance(layer, (Sigmoid, Softmax)):
        return n_out * F32          # the output, whose derivative is a function of it
    if isinstance(layer, Mul):
        return sum(int(np.prod(s)) for s in in_shapes) * F32  # both factors
    if isinstance(layer, MaxPool2d):
        return n_out * 4            # int32 argmax per output
    return 0


@dataclass
class Summary:
    model: str
    batch: int
    rows: list
    input_shape: tuple

    @property
    def params(self):
        return sum(r.params for r in self.rows)

    @property
    def macs(self):
        return sum(r.macs for r in self.rows)

    def _peak_pair_bytes(self) -> int:
        """The largest input + output activation pair of one layer, for one sample."""
        sizes = [int(np.prod(self.input_shape)) * F32] + [r.out_bytes for r in self.rows]
        return max(a + b for a, b in zip(sizes, sizes[1:]))

    def inference_bytes(self):
        """Weights + the largest input/output activation pair alive at once, at ``batch``."""
        return self.params * F32 + self._peak_pair_bytes() * self.batch

    def training_bytes(self, momentum: bool = True):
        """Weights + gradients + optimizer state (one momentum buffer) + what every layer keeps
        for backward + the largest gradient pair in flight, at ``batch``."""
        p = self.params * F32
        saved = sum(r.saved_bytes for r in self.rows) * self.batch
        peak = self._peak_pair_bytes() * self.batch
        return p * (3 if momentum else 2) + saved + peak

    def table(self) -> str:
        lines = [f"{self.model}: input (N, {', '.join(map(str, self.input_shape))}), batch {self.batch}",
                 f"{'layer':<12} {'type':<16} {'output':<16} {'params':>12} {'MACs':>15} {'act/sample':>11}",
                 "-" * 87]
        for r in self.rows:
            lines.append(f"{r.name:<12} {r.kind:<16} {'x'.join(map(str, r.out_shape)):<16} {r.params:>12,} "
                         f"{r.macs:>15,} {_mb(r.out_bytes):>11}")
        lines.append("-" * 87)
        lines.append(f"{'total':<46} {self.params:>12,} {self.macs:>15,}")
        lines.append(f"GMACs per image: {self.macs / 1e9:.3f}   parameters: {self.params / 1e6:.3f} M "
                     f"({_mb(self.params * F32)} float32)")
        lines.append(f"inference at batch {self.batch}: {_mb(self.inference_bytes())} "
                     f"(weights + largest activation pair)")
        lines.append(f"training at batch {self.batch}: {_mb(self.training_bytes())} (weights, gradients, momentum, "
                     f"{_mb(sum(r.saved_bytes for r in self.rows) * self.batch)} kept for backward)")
        return "\n".join(lines)


def _mb(b: int) -> str:
    if b < 2**10:
        return f"{b} B"
    return f"{b / 2**20:,.2f} MiB" if b >= 2**20 else f"{b / 2**10:,.1f} KiB"


def summary(model: Graph, batch_size: int = 1) -> Summary:
    if model.input_shape is None:
        raise ValueError(f"{model.name} has no input_shape: cannot account for its layers")
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    rows, shapes = [], {model.input_name: model.input_shape}
    for name, layer in model.layers:
        ins = [shapes[i] for i in model.inputs_of[name]]
        out = shapes[name] = tuple(layer.output_shape(*ins))
        params = int(sum(p.size for p in layer.params.values()))
        rows.append(LayerRow(name, type(layer).__name__, out, params, int(layer.macs(*ins)),
                             int(np.prod(out)) * F32, _saved_bytes(layer, ins, out)))
    return Summary(model.name, batch_size, rows, model.input_shape)
