"""Inference-time folding of eval-mode BatchNorm2d into the convolution before it.

In eval mode BatchNorm2d is an affine map per channel, y = (z - mean) * s + beta with
s = gamma / sqrt(var + eps), so Conv2d -> BatchNorm2d is one convolution with weight w * s (per
output channel) and bias (b - mean) * s + beta: one pass over the output less, and the ReLU that
follows is then fused into the conv's epilogue (:data:`dnnpar.nn.base.FUSION`).

:func:`fold_batchnorm` returns a derived inference copy (a new :class:`Graph`); the model itself,
its parameters and buffers are untouched. The copy shares every layer that is not folded with
the model (the same objects, no copies of their parameters); each folded convolution is a
snapshot of the model's weights and statistics at the call, so fold again after more training.
The copy is for forward passes only (predict / evaluate / inference benchmarks).
"""
from __future__ import annotations

import copy

import numpy as np

from ..backend import get_backend
from .base import Graph
from .conv import Conv2d
from .layers import BatchNorm2d


def foldable_pairs(model: Graph) -> list[tuple[str, str]]:
    """(conv node, BatchNorm2d node) pairs :func:`fold_batchnorm` folds: a BatchNorm2d reading a
    Conv2d (any grouping) whose only reader it is, the conv not being the model's output, and
    their channel counts agreeing."""
    readers: dict[str, int] = {}
    for lname, _ in model.layers:
        for i in model.inputs_of[lname]:
            readers[i] = readers.get(i, 0) + 1
    by_name = dict(model.layers)
    pairs = []
    for lname, layer in model.layers:
        ins = model.inputs_of[lname]
        if not isinstance(layer, BatchNorm2d) or len(ins) != 1 or ins[0] == model.input_name:
            continue
        conv = by_name[ins[0]]
        if (isinstance(conv, Conv2d) and readers[ins[0]] == 1 and ins[0] != model.output
                and conv.out_channels == layer.channels):
            pairs.append((ins[0], lname))
    return pairs


def _folded_conv(conv: Conv2d, bn: BatchNorm2d) -> Conv2d:
    """A copy of ``conv`` computing bn(conv(x)) with the BN's running statistics (float64 algebra,
    float32 result)."""
    xp = get_backend().xp
    f64 = np.float64
    scale = bn.params["weight"].astype(f64) / xp.sqrt(bn.buffers["running_var"].astype(f64) + bn.eps)
    b = conv.params.get("bias")
    b = xp.zeros(conv.out_channels, f64) if b is None else b.astype(f64)
    w = conv.params["weight"]
    folded = copy.copy(conv)
    folded.params = {"weight": (w.astype(f64) * scale[:, None, None, None]).astype(w.dtype),
                     "bias": ((b - bn.buffers["running_mean"].astype(f64)) * scale
                              + bn.params["bias"].astype(f64)).astype(w.dtype)}
    folded.grads, folded.bias = {}, True
    folded.x = folded.cols = folded.y = None
    return folded


def fold_batchnorm(model: Graph) -> Graph:
    """An inference copy of ``model`` (in eval mode) with every :func:`foldable_pairs` pair as one
    convolution; the BatchNorm node is dropped and its readers read the conv. A model with no
    such pair comes back as itself. ValueError for a model in training mode (batch statistics
    cannot be folded), TypeError for anything but a Graph / Sequential."""
    if not isinstance(model, Graph):
        raise TypeError(f"fold_batchnorm: expects a dnnpar Graph or Sequential, got {type(model).__name__}")
    if model.training:
        raise ValueError("fold_batchnorm: the model is in training mode (BatchNorm uses batch statistics); "
                         "call model.eval() first")
    pairs = foldable_pairs(model)
    if not pairs:
        return model
    by_name = dict(model.layers)
    folded = {c: _folded_conv(by_name[c], by_name[b]) for c, b in pairs}
    rename = {b: c for c, b in pairs}
    nodes = [(lname, folded.get(lname, layer), [rename.get(i, i) for i in model.inputs_of[lname]])
             for lname, layer in model.layers if lname not in rename]
    out = Graph(nodes, input_shape=model.input_shape, name=model.name, output=rename.get(model.output, model.output),
                input_name=model.input_name)
    return out.train(False)
