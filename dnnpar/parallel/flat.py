"""One flat float32 vector for a model's parameters (or gradients): the unit every parallel
strategy moves. Allreduce buckets, Hogwild's shared-memory array and the parameter server's
shards are all slices of it.

    layout = ParamLayout(model)
    vec = layout.gather_params(model)        # a copy, layer order
    layout.scatter_params(model, vec)        # copy back
    layout.bind(model, shared)               # the model's parameters become views of `shared`
    g = layout.gather_grads(model)           # zeros where a layer has no gradient yet
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import get_backend
from ..nn.base import Sequential


@dataclass(frozen=True)
class Slot:
    name: str        # "conv1.weight"
    shape: tuple
    offset: int      # first element in the flat vector
    size: int

    @property
    def stop(self) -> int:
        return self.offset + self.size


class ParamLayout:
    """Where each named parameter lives in the flat vector (layer order, as ``named_parameters``)."""

    def __init__(self, model: Sequential):
        slots, off = [], 0
        for name, p, _ in model.named_parameters():
            slots.append(Slot(name, tuple(p.shape), off, int(p.size)))
            off += int(p.size)
        self.slots: tuple[Slot, ...] = tuple(slots)
        self.size = off
        self._by_name = {s.name: s for s in slots}

    def __getitem__(self, name: str) -> Slot:
        return self._by_name[name]

    def __len__(self) -> int:
        return len(self.slots)

    def __repr__(self) -> str:
        return f"ParamLayout({len(self.slots)} arrays, {self.size:,} floats)"

    def check(self, model: Sequential) -> None:
        got = [(n, tuple(p.shape)) for n, p, _ in model.named_parameters()]
        want = [(s.name, s.shape) for s in self.slots]
        if got != want:
            raise ValueError(f"ParamLayout: the model's parameters {got[:3]}... do not match the layout {want[:3]}...")

    def _check_vec(self, vec) -> None:
        if vec.ndim != 1 or vec.size != self.size or vec.dtype != np.float32:
            raise ValueError(f"ParamLayout: need a float32 vector of {self.size} elements, "
                             f"got {vec.dtype} with shape {tuple(vec.shape)}")

    def empty(self, xp=None):
        return (xp or get_backend().xp).empty(self.size, dtype=np.float32)

    def gather_params(self, model: Sequential, out=None):
        out = self.empty() if out is None else out
        self._check_vec(out)
        for s, (_, p, _) in zip(self.slots, model.named_parameters()):
            out[s.offset:s.stop] = p.reshape(-1)
        return out

    def gather_grads(self, model: Sequential, out=None):
        out = self.empty() if out is None else out
        self._check_vec(out)
        for s, (_, _, g) in zip(self.slots, model.named_parameters()):
            if g is None:
                out[s.offset:s.stop] = 0
            else:
                out[s.offset:s.stop] = g.reshape(-1)
        return out

    def scatter_params(self, model: Sequential, vec) -> None:
        self._check_vec(vec)
        for s, (_, p, _) in zip(self.slots, model.named_parameters()):
            p[...] = vec[s.offset:s.stop].reshape(s.shape)

    def bind(self, model: Sequential, vec, copy_in: bool = True) -> None:
        """Make every parameter of ``model`` a view into ``vec``, so that an update of the vector is
        an update of the model and vice versa (Hogwild). ``copy_in``: first copy the model's
        values into ``vec`` (False: ``vec`` already holds the parameters, e.g. shared memory)."""
        self._check_vec(vec)
        self.check(model)
        for (lname, layer) in model.layers:
            for pname, p in list(layer.params.items()):
                s = self._by_name[f"{lname}.{pname}"]
                view = vec[s.offset:s.stop].reshape(s.shape)
                if copy_in:
                    view[...] = p
                layer.params[pname] = view
