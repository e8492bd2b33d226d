"""Model parallelism (AlexNet's two columns, Krizhevsky et al. 2012) and the hybrid of
Krizhevsky 2014 ("One weird trick for parallelizing convolutional neural networks"), over MPI
ranks (each rank one device: a CPU process, or one GPU with the cuda backend).

**Column split** (:func:`split_model` with ``mode="model"``). Walk the single-device model and
give each of the R ranks 1/R of every trainable layer's output units (rows of the weight):

- a layer with ``groups == R`` (AlexNet's conv2, conv4, conv5) keeps only its own group: its
  input is exactly the rank's own maps, so it needs no communication at all;
- any other conv or linear layer (conv1 on the replicated image, conv3 and the fc layers, which
  "see both halves") needs the whole input: an :class:`AllGather` over the channel axis first
  (whose backward sums the ranks' partial input gradients and keeps the rank's own slice: a
  reduce-scatter), then its own slice of output units;
- ReLU, pooling, Flatten and Dropout act per channel and stay local;
- at the end the logits are gathered, and every rank computes the same loss.

Forward and backward then equal the grouped single-device model (``alexnet(groups=2)``): each
rank's parameter gradients are the matching slices of the single-device gradients
(``tests/test_model_parallel.py``, rtol 1e-5).

**Hybrid** (``mode="hybrid"``). The layers before the first Linear are data parallel: every
rank holds all their parameters and runs its own shard of the batch; an :class:`AllGather` over
the batch axis hands every rank the whole batch's features, and the fully-connected layers are
column-split as above. After the backward pass the conv gradients are summed over the ranks
(:meth:`ParallelModel.sync_grads`); the fc gradients are already complete on their owner.
Convolutions have few parameters and much compute (data parallel suits them); fc layers the
opposite (model parallel suits them): that is the trick.

``ParallelModel.bytes_sent`` counts what this rank sent through each collective (gathers,
reduce-scatters and the gradient allreduce), per step.
"""
from __future__ import annotations

import numpy as np

from ..backend import get_backend
from ..nn.base import Layer, Sequential
from ..nn.conv import Conv2d
from ..nn.layers import AvgPool2d, Dropout, Flatten, GlobalAvgPool2d, Linear, MaxPool2d, ReLU
from .comm import Communicator

LOCAL_LAYERS = (ReLU, MaxPool2d, AvgPool2d, GlobalAvgPool2d, Flatten, Dropout)
MODES = ("model", "hybrid")


class AllGather(Layer):
    """Concatenate the ranks' tensors along ``axis`` (rank order). Backward: with ``reduce_grad``
    the incoming gradient is this rank's partial contribution (it feeds a split layer), so it is
    summed over the ranks before the rank keeps its own slice (a reduce-scatter); without, the
    gradient is already complete and identical on every rank (a replicated loss), and the rank
    just keeps its slice."""

    def __init__(self, comm: Communicator, axis: int, reduce_grad: bool, stats: dict):
        super().__init__()
        self.comm, self.axis, self.reduce_grad, self.stats = comm, axis, reduce_grad, stats

    def forward(self, x):
        be = get_backend()
        R = self.comm.size
        local = np.ascontiguousarray(be.to_numpy(x).astype(np.float32, copy=False))
        shapes = np.empty((R, local.ndim), np.int64)
        self.comm.allgather(np.array(local.shape, np.int64), shapes)
        if (shapes != shapes[0]).any():  # MPI's allgather would silently mix unequal blocks
            raise ValueError(f"AllGather along axis {self.axis}: the ranks hold different shapes "
                             f"{[tuple(int(v) for v in s) for s in shapes]}; in the hybrid every rank needs the "
                             "same batch (a batch divisible by the rank count)")
        parts = np.empty((R,) + local.shape, np.float32)
        self.comm.allgather(local, parts)
        self.stats["gather"] += local.nbytes * (R - 1)  # ring allgather: R - 1 blocks out of each rank
        self.local = local.shape[self.axis]
        return be.asarray(np.concatenate(list(parts), axis=self.axis))

    def backward(self, dy):
        be = get_backend()
        R, a = self.comm.size, self.axis
        g = be.to_numpy(dy).astype(np.float32, copy=False)
        if not self.reduce_grad:  # complete on every rank: keep this rank's block
            index = [slice(None)] * g.ndim
            index[a] = slice(self.comm.rank * self.local, (self.comm.rank + 1) * self.local)
            return be.asarray(np.ascontiguousarray(g[tuple(index)]))
        # reduce-scatter: block r of the summed gradient lands on rank r
        blocks = g.reshape(g.shape[:a] + (R, self.local) + g.shape[a + 1:])
        send = np.ascontiguousarray(np.moveaxis(blocks, a, 0))
        recv = np.empty(send.shape[1:], np.float32)
        self.comm.reduce_scatter(send, recv)
        self.stats["reduce"] += send.nbytes * (R - 1) // R  # ring reduce-scatter
        return be.asarray(recv)

    def output_shape(self, in_shape):
        if self.axis == 0:
            return in_shape
        return (in_shape[0] * self.comm.size,) + tuple(in_shape[1:])

    def extra_repr(self):
        return f"axis={self.axis}, ranks={self.comm.size}, reduce_grad={self.reduce_grad}"


def _row_slice(layer: Layer, rank: int, parts: int, own_group: bool) -> Layer:
    """This rank's 1/parts of ``layer``'s output units, as a fresh layer holding copies of the
    weights. ``own_group``: a grouped conv reduced to the rank's own group (its input is already
    the rank's own maps)."""
    be = get_backend()
    if isinstance(layer, Linear):
        out = layer.out_features // parts
        new = Linear(layer.in_features, out, bias="bias" in layer.params)
    else:
        out = layer.out_channels // parts
        cin = layer.in_channels // parts if own_group else layer.in_channels
        new = Conv2d(cin, out, layer.kernel_size, stride=layer.stride, padding=layer.padding,
                     dilation=layer.dilation, groups=1, bias="bias" in layer.params, algo=layer.algo)
    rows = slice(rank * out, (rank + 1) * out)
    for k, p in layer.params.items():
        new.params[k] = be.asarray(be.to_numpy(p)[rows].copy())
    return new


class ParallelModel:
    """This rank's part of a model split by :func:`split_model`: ``forward`` / ``backward`` as a
    Sequential, ``sync_grads`` after backward (hybrid: sums the data-parallel gradients), the
    ``owned`` map from this rank's parameter names to (single-device name, row slice)."""

    def __init__(self, net: Sequential, comm: Communicator, mode: str, replicated: list[str], owned: dict,
                 stats: dict):
        self.net, self.comm, self.mode, self.replicated, self.owned, self.stats = \
            net, comm, mode, replicated, owned, stats

    def forward(self, x):
        return self.net.forward(x)

    def backward(self, dy):
        return self.net.backward(dy)

    def sync_grads(self) -> None:
        """Hybrid: sum the replicated (data-parallel) layers' gradients over the ranks."""
        if not self.replicated:
            return
        be = get_backend()
        grads = [(lname, k, layer) for lname, layer in self.net.layers if lname in self.replicated
                 for k in layer.params]
        bufs = [np.ascontiguousarray(be.to_numpy(layer.grads[k]), dtype=np.float32) for _, k, layer in grads]
        self.comm.allreduce_sum(bufs)
        self.stats["allreduce"] += sum(b.nbytes for b in bufs) * 2 * (self.comm.size - 1) // self.comm.size
        for (_, k, layer), b in zip(grads, bufs):
            layer.grads[k] = be.asarray(b)

    def named_parameters(self):
        return self.net.named_parameters()

    def reset_stats(self) -> None:
        for k in self.stats:
            self.stats[k] = 0

    @property
    def bytes_sent(self) -> int:
        return int(sum(self.stats.values()))

    def __repr__(self):
        return f"ParallelModel({self.mode}, rank {self.comm.rank}/{self.comm.size}):\n{self.net!r}"


def split_model(model: Sequential, comm: Communicator, mode: str = "model") -> ParallelModel:
    """This rank's part of ``model`` (see the module docstring). The model's input for
    ``forward`` is the whole batch (``mode="model"``) or this rank's shard of it (``"hybrid"``)."""
    if mode not in MODES:
        raise ValueError(f"unknown parallel mode {mode!r}; choose one of {', '.join(MODES)}")
    R, r = comm.size, comm.rank
    if R < 2:
        raise ValueError(f"{mode} parallelism needs at least 2 ranks, got {R}")
    stats = {"gather": 0, "reduce": 0, "allreduce": 0}
    layers: list[tuple[str, Layer]] = []
    owned, replicated = {}, []
    first_fc = next((i for i, (_, layer) in enumerate(model.layers) if isinstance(layer, Linear)), None)
    if mode == "hybrid" and first_fc is None:
        raise ValueError("hybrid parallelism splits the fully-connected layers: the model has no Linear layer")
    split = False  # does this rank hold only its slice of the channels / features?
    for i, (name, layer) in enumerate(model.layers):
        if mode == "hybrid" and i < first_fc:  # data-parallel part: a full copy, own batch shard
            if layer.params:
                replicated.append(name)
            layers.append((name, layer))
            continue
        if mode == "hybrid" and i == first_fc:
            layers.append((f"gather_batch_{name}", AllGather(comm, 0, True, stats)))
        if isinstance(layer, LOCAL_LAYERS):
            layers.append((name, layer))
            continue
        if not isinstance(layer, (Conv2d, Linear)):
            raise NotImplementedError(f"split_model: no {mode}-parallel rule for {type(layer).__name__} ({name})")
        own_group = isinstance(layer, Conv2d) and layer.groups == R and split
        if isinstance(layer, Conv2d) and layer.groups not in (1, R):
            raise ValueError(f"split_model: {name} has {layer.groups} groups; {R} ranks split only groups 1 or {R}")
        if isinstance(layer, Conv2d) and layer.groups == R and not split:
            raise ValueError(f"split_model: {name} is grouped but its input is not split over the ranks")
        n_out = layer.out_features if isinstance(layer, Linear) else layer.out_channels
        if n_out % R:
            raise ValueError(f"split_model: {name} has {n_out} outputs, not divisible by {R} ranks")
        if split and not own_group:
            layers.append((f"gather_{name}", AllGather(comm, 1, True, stats)))
        part = _row_slice(layer, r, R, own_group)
        layers.append((name, part))
        rows = n_out // R
        owned[name] = slice(r * rows, (r + 1) * rows)
        split = True
    if split:
        layers.append(("gather_logits", AllGather(comm, 1, False, stats)))
    in_shape = model.input_shape
    net = Sequential(*layers, input_shape=in_shape, name=f"{model.name}-{mode}-rank{r}of{R}")
    # Sequential skips the input gradient of its first trainable layer; that layer here is a
    # slice of the first layer of the model, which needs none either (its input is the data).
    return ParallelModel(net, comm, mode, replicated, owned, stats)
