"""Layers and the Sequential container.

A layer is explicit about its two passes (Caffe-style, no autograd tape):
``forward(x)`` computes the output and keeps what the backward pass needs; ``backward(dy)``
returns dL/dx and writes dL/dparam into ``layer.grads``. Parameters and gradients are arrays of
the active backend, named ("conv1.weight") through :meth:`Sequential.named_parameters`.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ..backend import compute_dtype, get_backend


class Layer:
    """Base class. Subclasses fill ``params`` (name -> array) in ``__init__``."""

    def __init__(self):
        self.params: dict[str, object] = {}
        self.grads: dict[str, object] = {}
        self.buffers: dict[str, object] = {}  # state saved with the model but not trained (BN statistics)
        self.training = True
        self.need_dx = True  # False: backward may skip the input gradient (and return None)

    def forward(self, x):
        raise NotImplementedError

    def backward(self, dy):
        raise NotImplementedError

    def __call__(self, x):
        return self.forward(x)

    def _set_grads(self, weight, bias=None):
        """Store dL/dweight and, if the layer has a bias, dL/dbias."""
        self.grads["weight"] = weight
        if "bias" in self.params:
            self.grads["bias"] = bias

    def output_shape(self, in_shape: tuple) -> tuple:
        """Shape of one sample's output for one sample's input shape (no batch axis)."""
        return in_shape

    def macs(self, in_shape: tuple) -> int:
        """Multiply-accumulates of one forward pass on one sample."""
        return 0

    def extra_repr(self) -> str:
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


def he_normal(rng: np.random.Generator, shape, fan_in: int, dtype=np.float32):
    """Kaiming/He initialisation for layers followed by ReLU: N(0, 2 / fan_in)."""
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)


class Sequential(Layer):
    """Layers applied in order. ``Sequential(("conv1", Conv2d(...)), ("relu1", ReLU()), ...)``;
    bare layers get their index as name. ``input_shape`` (C, H, W) or (features,) lets the model
    check its input and lets :func:`dnnpar.nn.summary` account for every layer."""

    def __init__(self, *layers, input_shape: tuple | None = None, name: str = "model"):
        super().__init__()
        self.layers: list[tuple[str, Layer]] = []
        for i, item in enumerate(layers):
            lname, layer = item if isinstance(item, tuple) else (str(i), item)
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {lname!r} is a {type(layer).__name__}, not a dnnpar layer")
            if any(lname == n for n, _ in self.layers):
                raise ValueError(f"Sequential: duplicate layer name {lname!r}")
            self.layers.append((lname, layer))
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.name = name
        # Nothing upstream of the first trainable layer needs a gradient: backward stops there
        # and that layer skips its input gradient (for a first conv, a whole col2im).
        self.first_trainable = next((i for i, (_, layer) in enumerate(self.layers) if layer.params), None)
        if self.first_trainable is not None:
            self.layers[self.first_trainable][1].need_dx = False

    def __getitem__(self, name: str) -> Layer:
        for n, layer in self.layers:
            if n == name:
                return layer
        raise KeyError(f"{self.name} has no layer {name!r} (it has {', '.join(n for n, _ in self.layers)})")

    def check_input(self, x):
        be = get_backend()
        if not isinstance(x, be.array_type):
            raise TypeError(f"{self.name}: input must be a {be.array_type.__name__} on the '{be.name}' backend, "
                            f"got {type(x).__module__}.{type(x).__name__}")
        want = compute_dtype(be)  # float32; float64 only inside dp.precision("float64") on numpy
        if x.dtype != want:
            raise TypeError(f"{self.name}: input batch must be {want.name}, got {x.dtype}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.name} expects input batches of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")

    def forward(self, x):
        self.check_input(x)
        for _, layer in self.layers:
            x = layer.forward(x)
        return x

    def backward(self, dy):
        """Back-propagate dL/dy; fills every layer's grads. Returns None (no layer before the first
        trainable one needs a gradient), so the model's input gets no gradient."""
        stop = self.first_trainable or 0
        for _, layer in reversed(self.layers[stop:]):
            dy = layer.backward(dy)
        return None

    def train(self, mode: bool = True):
        for _, layer in self.layers:
            layer.training = mode
        self.training = mode
        return self

    def eval(self):
        return self.train(False)

    def named_parameters(self):
        """(name, param, grad) for every trainable array, in layer order."""
        for lname, layer in self.layers:
            for pname, p in layer.params.items():
                yield f"{lname}.{pname}", p, layer.grads.get(pname)

    def named_buffers(self):
        for lname, layer in self.layers:
            for bname, b in layer.buffers.items():
                yield f"{lname}.{bname}", b

    def num_parameters(self) -> int:
        return int(sum(p.size for _, p, _ in self.named_parameters()))

    def output_shape(self, in_shape):
        for _, layer in self.layers:
            in_shape = layer.output_shape(in_shape)
        return in_shape

    # -------------------------------------------------------------- persistence (.npz, never pickle)
    def state_dict(self) -> dict[str, np.ndarray]:
        be = get_backend()
        state = {n: be.to_numpy(p).copy() for n, p, _ in self.named_parameters()}
        state.update({n: be.to_numpy(b).copy() for n, b in self.named_buffers()})
        return state

    def load_state_dict(self, state: dict) -> None:
        """Copy arrays into the model in place; every name must match, with its shape."""
        be = get_backend()
        own = {n: (lname, key, kind) for lname, layer in self.layers
               for kind, d in (("params", layer.params), ("buffers", layer.buffers)) for key in d
               for n in [f"{lname}.{key}"]}
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        if missing or unexpected:
            raise ValueError(f"{self.name}: state does not match the model (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        for n, (lname, key, kind) in own.items():
            d = getattr(self[lname], kind)
            v = np.asarray(state[n])
            if v.shape != tuple(d[key].shape):
                raise ValueError(f"{self.name}: {n} has shape {tuple(d[key].shape)}, the state holds {v.shape}")
            d[key][...] = be.asarray(v.astype(d[key].dtype, copy=False))

    def save(self, path, **extra_arrays) -> None:
        save_npz_atomic(path, {**{f"param/{k}": v for k, v in self.state_dict().items()}, **extra_arrays})

    def load(self, path) -> None:
        arrays = load_npz(path)
        self.load_state_dict({k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")})

    def extra_repr(self):
        return "\n  " + "\n  ".join(f"({n}): {layer!r}" for n, layer in self.layers) + "\n"


def save_npz_atomic(path, arrays: dict) -> None:
    """Write an .npz through a temporary file and a rename: a reader never sees half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_npz(path) -> dict[str, np.ndarray]:
    """Read an .npz written by :func:`save_npz_atomic` (pickle disabled); a corrupt or truncated
    file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    try:
        with np.load(path, allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError) as e:
        raise ValueError(f"{path} is not a readable dnnpar .npz file (corrupt or truncated?): {e}") from e
