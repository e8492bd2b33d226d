"""Layers and the Sequential container.

A layer is explicit about its two passes (Caffe-style, no autograd tape):
``forward(x)`` computes the output and keeps what the backward pass needs; ``backward(dy)``
returns dL/dx and writes dL/dparam into ``layer.grads``. Parameters and gradients are arrays of
the active backend, named ("conv1.weight") through :meth:`Sequential.named_parameters`.
"""
from __future__ import annotations

import inspect
import os
import sys
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..backend import compute_dtype, get_backend
from ..errors import CheckpointError


#: Graph fuses an activation node (a layer with an ``activation_kind``: ReLU, ReLU6) into the
#: node before it when that node is its only reader's producer and its layer can apply the
#: activation itself (``kind in layer.absorbs``: Linear, Conv2d, BatchNorm2d ...); the activation
#: node then passes its input through, forward and backward. False: every layer runs alone
#: (A/B benchmarks, debugging). Read at every forward (the backward after it follows that forward).
FUSION = True


def _refs_of_unshared() -> int:
    """sys.getrefcount of an array held by one dict entry and one local name, as
    :meth:`Layer._spare_grad` sees it (measured, not assumed: the count differs between versions)."""
    grads = {"weight": np.empty(1)}
    g = grads.get("weight")
    return sys.getrefcount(g)


_UNSHARED_REFS = _refs_of_unshared()


class Layer:
    """Base class. Subclasses fill ``params`` (name -> array) in ``__init__``.

    ``absorbs``: the activation kinds (:data:`dnnpar.ops.activation.ACTIVATIONS`) this layer can
    apply to its own output; a :class:`Graph` then sets ``layer.activation`` before each forward
    (None when it runs alone) and the layer's backward takes the activation's gradient itself.
    ``activation_kind``: on an activation layer, the kind it computes (else None)."""

    absorbs: tuple = ()
    activation = None
    activation_kind = None

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

    def _spare_grad(self, pname: str):
        """The previous backward's dL/d``pname`` to overwrite, when nothing but ``grads`` holds it
        (no caller kept it, no view of it exists, it is a NumPy array that owns its memory, of the
        parameter's shape and dtype); else None and the caller allocates. A new array of hundreds
        of MB is mapped page by page anew each step, and on a VM that hands freed memory back to
        its host that costs more than the product writing it: VGG-16's fc6 gradient (411 MB) took
        300 ms of a 1.4 s step at batch 2 (2026-12-03, the 2-core KVM guest). Values a caller keeps
        are never overwritten: holding the array (or a view) makes the next backward allocate."""
        g, p = self.grads.get(pname), self.params.get(pname)
        if (type(g) is not np.ndarray or g.base is not None or not g.flags.c_contiguous or not g.flags.writeable
                or p is None or g.shape != p.shape or g.dtype != p.dtype):
            return None
        return g if sys.getrefcount(g) <= _UNSHARED_REFS else None

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

    def config(self) -> dict:
        """The JSON-able constructor keyword arguments (all of them but ``seed``) that rebuild a
        layer of this structure: ``type(layer)(**layer.config())``. By default each argument is
        read from the attribute of its name (tuples become lists); layers whose attributes differ
        override this. Parameters and buffers are not part of it (see ``state_dict``)."""
        out = {}
        for name in constructor_args(type(self)):
            out[name] = _jsonable(getattr(self, name))
        return out

    def __repr__(self):
        return f"{type(self).__name__}({self.extra_repr()})"


def constructor_args(cls) -> list[str]:
    """The keyword arguments of ``cls.__init__`` that a layer's config holds (all but ``seed``)."""
    params = inspect.signature(cls.__init__).parameters
    return [n for n, p in params.items() if n not in ("self", "seed")
            and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def _jsonable(v):
    if isinstance(v, (tuple, list)):
        return [_jsonable(i) for i in v]
    if isinstance(v, np.integer):
        return int(v)
    if isinstance(v, np.floating):
        return float(v)
    return v


def he_normal(rng: np.random.Generator, shape, fan_in: int, dtype=np.float32):
    """Kaiming/He initialisation for layers followed by ReLU: N(0, 2 / fan_in). Every layer's
    weight is drawn here, so a shape beyond the kernels' 32-bit range is refused here, before
    anything is allocated."""
    from ..ops._common import check_count
    check_count("he_normal", "weight", shape)
    return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(dtype)


class Graph(Layer):
    """A model: a DAG of named layers wired by named inputs (residual adds, concatenations), run
    forward and backward in topological order; :class:`Sequential` is its chain-shaped case.

    ``nodes``: ``(name, layer, [input names])`` in an order that is topological (every input is
    the graph input, ``input_name``, or an earlier node); ``output``: the node whose result
    ``forward`` returns (default: the last). A layer with one input has ``forward(x)`` /
    ``backward(dy) -> dx``; one with several (``Add``, ``Concat``: ``arity`` None or > 1) has
    ``forward(*xs)`` / ``backward(dy) -> tuple``. Backward sums the gradients of a tensor read by
    several nodes. ``input_shape`` (C, H, W) or (features,) lets the model check its input and
    lets :func:`dnnpar.nn.summary` account for every layer. ``model.layers`` lists ``(name,
    layer)`` in order: parameters, buffers, checkpoints and compression work on it.

    ``grad_hook``: None, or ``fn(name, layer)`` called by ``backward`` as soon as a layer with
    parameters has written its ``grads`` (data parallel starts a bucket's allreduce there).

    Activation nodes whose producer can apply them are fused into it (:data:`FUSION`,
    :meth:`fused_pairs`); the model's layers, parameters and results stay those of the graph."""

    grad_hook = None

    def __init__(self, nodes, input_shape: tuple | None = None, name: str = "graph", output: str | None = None,
                 input_name: str = "input"):
        nodes = list(nodes)
        if not nodes:
            raise ValueError(f"{type(self).__name__}: needs at least one layer")
        inputs_of = {}
        for item in nodes:
            if not (isinstance(item, (tuple, list)) and len(item) == 3):
                raise TypeError(f"Graph: a node is (name, layer, [inputs]), got {item!r}")
            lname, layer, ins = item
            if not isinstance(layer, Layer):
                raise TypeError(f"{type(self).__name__}: item {lname!r} is a {type(layer).__name__}, not a dnnpar layer")
            if not isinstance(lname, str) or not lname or lname == input_name:
                raise ValueError(f"Graph: node name {lname!r} must be a non-empty str other than {input_name!r}")
            if isinstance(ins, str) or not all(isinstance(i, str) for i in ins) or not ins:
                raise TypeError(f"Graph: node {lname!r}: inputs must be a non-empty list of names, got {ins!r}")
            for i in ins:
                if i != input_name and i not in inputs_of:
                    raise ValueError(f"Graph: node {lname!r} reads {i!r}, which is neither the input {input_name!r} "
                                     "nor an earlier node (list the nodes in topological order)")
            if lname in inputs_of:
                raise ValueError(f"{type(self).__name__}: duplicate layer name {lname!r}")
            arity = getattr(layer, "arity", 1)
            if arity is not None and len(ins) != arity:
                raise ValueError(f"Graph: node {lname!r} ({type(layer).__name__}) takes {arity} input(s), "
                                 f"got {len(ins)}: {list(ins)}")
            inputs_of[lname] = list(ins)
        super().__init__()
        self.layers: list[tuple[str, Layer]] = [(lname, layer) for lname, layer, _ in nodes]
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.name = name
        self.input_name = input_name
        self.inputs_of = inputs_of
        self.output = output if output is not None else nodes[-1][0]
        if self.output not in inputs_of:
            raise ValueError(f"Graph: output {self.output!r} is not a node")
        self._plan()

    def _plan(self):
        """Which nodes backward visits (those with a trainable layer at or upstream of them) and
        which layers may skip their input gradient (nothing trainable upstream of them)."""
        trainable_at = {}  # node -> a trainable layer is at or upstream of it
        for lname, layer in self.layers:
            upstream = any(trainable_at.get(i, False) for i in self.inputs_of[lname])
            layer.need_dx = upstream
            trainable_at[lname] = upstream or bool(layer.params)
        self._on_grad_path = trainable_at
        # the last node that reads each tensor: forward frees it afterwards
        self._last_use = {}
        readers = {}
        for lname, _ in self.layers:
            for i in self.inputs_of[lname]:
                self._last_use[i] = lname
                readers[i] = readers.get(i, 0) + 1
        # activation fusion (see FUSION): activation node -> kind, and each absorbing layer's setting
        by_name = dict(self.layers)
        self._fused = {}
        for lname, layer in self.layers:
            kind, ins = layer.activation_kind, self.inputs_of[lname]
            if kind is None or len(ins) != 1 or ins[0] == self.input_name:
                continue
            p = ins[0]
            if p != self.output and readers[p] == 1 and kind in by_name[p].absorbs:
                self._fused[lname] = (by_name[p], kind)
        absorbed = {id(prod): kind for prod, kind in self._fused.values()}
        self._absorbers = [(layer, absorbed.get(id(layer))) for _, layer in self.layers if layer.absorbs]
        self._planned = [layer for _, layer in self.layers]

    def _replan_if_changed(self):
        """Plan again when a layer was swapped in ``layers`` (compression puts CompressedLinear in
        a Linear's place): the fusion and gradient plan belong to the layers they were made for."""
        if len(self._planned) != len(self.layers) or any(a is not b for a, (_, b) in zip(self._planned, self.layers)):
            self._plan()

    def fused_pairs(self) -> list[tuple[str, str]]:
        """(producer node, activation node) pairs that :data:`FUSION` runs as one layer."""
        self._replan_if_changed()
        return [(self.inputs_of[a][0], a) for a in self._fused] if FUSION else []

    def forward(self, x):
        x = self.check_input(x)
        self._replan_if_changed()
        env = {self.input_name: x}
        fused = self._step_fused = self._fused if FUSION else {}  # backward follows this forward
        for layer, kind in self._absorbers:
            layer.activation = kind if FUSION else None
        for lname, layer in self.layers:
            ins = self.inputs_of[lname]
            env[lname] = env[ins[0]] if lname in fused else layer.forward(*[env[i] for i in ins])
            for i in set(ins):  # a node may read one tensor twice (Add(x, x))
                if self._last_use.get(i) == lname and i != self.output:
                    del env[i]
        return env[self.output]

    def backward(self, dy):
        """Back-propagate dL/d(output): fills every layer's grads, summing the gradient of each
        tensor over the nodes that read it. Returns None (the input gets no gradient)."""
        grads = {self.output: dy}
        fused = getattr(self, "_step_fused", {})
        for lname, layer in reversed(self.layers):
            g = grads.pop(lname, None)
            if g is None or not self._on_grad_path[lname]:
                continue
            dxs = g if lname in fused else layer.backward(g)  # a fused activation's producer masks g
            if self.grad_hook is not None and layer.params:
                self.grad_hook(lname, layer)
            ins = self.inputs_of[lname]
            if len(ins) == 1 or getattr(layer, "arity", 1) == 1:
                dxs = (dxs,)
            for i, dx in zip(ins, dxs):
                if dx is None or i == self.input_name or not self._on_grad_path[i]:
                    continue
                grads[i] = dx if i not in grads else grads[i] + dx
        return None

    def output_shapes(self) -> dict:
        """Each node's output shape (one sample) from ``input_shape``."""
        if self.input_shape is None:
            raise ValueError(f"{self.name} has no input_shape")
        shapes = {self.input_name: self.input_shape}
        for lname, layer in self.layers:
            ins = [shapes[i] for i in self.inputs_of[lname]]
            shapes[lname] = layer.output_shape(*ins)
        return shapes

    def output_shape(self, in_shape):
        saved, self.input_shape = self.input_shape, tuple(in_shape)
        try:
            return self.output_shapes()[self.output]
        finally:
            self.input_shape = saved

    def __getitem__(self, name: str) -> Layer:
        for n, layer in self.layers:
            if n == name:
                return layer
        raise KeyError(f"{self.name} has no layer {name!r} (it has {', '.join(n for n, _ in self.layers)})")

    def check_input(self, x):
        """``x`` checked as a batch for this model and returned as the backend's array: an object
        speaking DLPack (a torch tensor, a CuPy array) on the backend's device is viewed without a
        copy; another type, device or dtype is a TypeError, a wrong sample shape a ValueError."""
        from ..ops._common import from_dlpack  # ops import the nn-free backend only; no cycle at call time
        be = get_backend()
        x = from_dlpack(self.name, "input", x, be)
        if not isinstance(x, be.array_type):
            raise TypeError(f"{self.name}: input must be a {be.array_type.__name__} on the '{be.name}' backend, "
                            f"got {type(x).__module__}.{type(x).__name__}")
        want = compute_dtype(be)  # float32; float64 only inside dp.precision("float64") on numpy
        if x.dtype != want:
            raise TypeError(f"{self.name}: input batch must be {want.name}, got {x.dtype}")
        if self.input_shape is not None and tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.name} expects input batches of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        return x

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
        """Load the parameters and buffers of a .npz written by :meth:`save` (or a training
        checkpoint; its other members are ignored). CheckpointError if any is missing,
        unexpected or of another shape or dtype, checked before any array is read."""
        arrays = load_npz(path, lambda members, p: check_model_members(self, members, p))
        self.load_state_dict({k[len("param/"):]: v for k, v in arrays.items()})

    def spec(self) -> dict:
        """The graph's structure as JSON-able data: {"name", "input_shape", "input_name",
        "output", "nodes": [{"name", "type", "config", "inputs"}]}; rebuild it with
        :func:`dnnpar.nn.graph_from_spec` (weights travel separately, in ``state_dict``)."""
        from .spec import graph_to_spec  # spec knows every layer type, which import this module
        return graph_to_spec(self)

    def config(self):
        raise TypeError(f"{type(self).__name__} is a container: describe it with spec(), not config()")

    def extra_repr(self):
        return "\n  " + "\n  ".join(f"({n}): {layer!r} <- {', '.join(self.inputs_of[n])}"
                                     for n, layer in self.layers) + "\n"


class Sequential(Graph):
    """Layers applied in order: ``Sequential(("conv1", Conv2d(...)), ("relu1", ReLU()), ...)``;
    bare layers get their index as name. A :class:`Graph` whose every node reads the previous one."""

    def __init__(self, *layers, input_shape: tuple | None = None, name: str = "model"):
        named = [item if isinstance(item, tuple) else (str(i), item) for i, item in enumerate(layers)]
        for item in named:
            if len(item) != 2:
                raise TypeError(f"Sequential: an item is a layer or (name, layer), got {item!r}")
        prev = ["input"] + [str(n) for n, _ in named[:-1]]
        super().__init__([(n, layer, [p]) for (n, layer), p in zip(named, prev)], input_shape=input_shape,
                         name=name)

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


#: most elements one .npz member may hold (4 GiB of float32, beyond any zoo model's layer)
MAX_NPZ_ELEMENTS = 2**30
# deflate cannot expand data by more than about 1032:1, so a member claiming more is a lie
_MAX_DEFLATE_RATIO = 1100


@dataclass(frozen=True)
class NpzMember:
    """One member of an .npz, from its zip entry and .npy header (no data read yet)."""
    shape: tuple
    dtype: np.dtype
    fortran_order: bool
    info: zipfile.ZipInfo
    data_offset: int  # bytes of .npy header before the data


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo, path, name: str) -> NpzMember:
    field = f"member {name!r}"
    with zf.open(info) as f:
        try:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise ValueError(f".npy format version {version} is not 1.0 or 2.0")
        except (ValueError, SyntaxError, TypeError, OverflowError, EOFError) as e:
            raise CheckpointError(f"bad .npy header ({e})", path, field) from None
        offset = f.tell()
    if dtype.hasobject:
        raise CheckpointError(f"holds Python objects ({dtype}); dnnpar never writes pickles", path, field)
    count, nonzero = 1, 1
    for d in shape:
        count *= d
        nonzero *= max(d, 1)
    if count > MAX_NPZ_ELEMENTS or nonzero > 2**62:  # an empty shape may still be too large for NumPy
        raise CheckpointError(f"claims shape {shape} ({count} elements, over the {MAX_NPZ_ELEMENTS} limit)", path,
                              field)
    if offset + count * dtype.itemsize != info.file_size:
        raise CheckpointError(f"claims shape {shape} of {dtype} ({count * dtype.itemsize} bytes), the zip member "
                              f"holds {info.file_size - offset}", path, field)
    if info.compress_type != zipfile.ZIP_STORED and info.file_size > _MAX_DEFLATE_RATIO * info.compress_size + 4096:
        raise CheckpointError(f"claims {info.file_size} bytes from {info.compress_size} compressed: not a real "
                              "archive member", path, field)
    return NpzMember(tuple(shape), dtype, fortran, info, offset)


def load_npz(path, check=None) -> dict[str, np.ndarray]:
    """Read an .npz written by :func:`save_npz_atomic` without trusting it: pickles are refused,
    every member's .npy header is read and its claimed shape checked against the bytes the
    member really holds before any array is allocated.

    ``check(members, path)``, if given, sees {name: :class:`NpzMember`} before any data is read
    and returns the names to read (it raises CheckpointError for members that do not fit).
    A missing file is FileNotFoundError; everything else wrong is a CheckpointError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such checkpoint: {path}")
    with open(path, "rb") as f:
        magic = f.read(6)
    if magic == b"\x93NUMPY":
        raise CheckpointError("is a single .npy array, not an .npz checkpoint (save with Model.save / "
                              "dnnpar.checkpoint.save_checkpoint)", path)
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
            names = [i.filename for i in infos]
            if len(set(names)) != len(names):
                raise CheckpointError("the archive holds a member twice", path)
            members = {}
            for info in infos:
                if not info.filename.endswith(".npy"):
                    raise CheckpointError("is not an .npy array", path, f"member {info.filename!r}")
                name = info.filename[:-4]
                members[name] = _member_header(zf, info, path, name)
            wanted = list(members) if check is None else check(members, path)
            out = {}
            for name in wanted:
                m = members[name]
                with zf.open(m.info) as f:
                    f.seek(m.data_offset)
                    nbytes = m.info.file_size - m.data_offset
                    buf = f.read(nbytes)
                if len(buf) != nbytes:
                    raise CheckpointError(f"truncated ({len(buf)} of {nbytes} bytes)", path, f"member {name!r}")
                arr = np.frombuffer(buf, m.dtype).reshape(m.shape, order="F" if m.fortran_order else "C")
                out[name] = arr.copy()  # writable, and not tied to the file's bytes
            return out
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, ValueError, OSError, EOFError, KeyError, RuntimeError,
            NotImplementedError, zlib.error) as e:
        raise CheckpointError(f"not a readable dnnpar .npz file (corrupt or truncated?): {e}", path) from e


def check_model_members(model: "Sequential", members: dict, path) -> list[str]:
    """The ``param/`` members of an .npz index against ``model``: every parameter and buffer once,
    float32, of the model's shape (CheckpointError naming the first that is missing, unexpected
    or wrong). Returns the member names to read."""
    own = {f"param/{n}": tuple(p.shape) for n, p, _ in model.named_parameters()}
    own.update({f"param/{n}": tuple(b.shape) for n, b in model.named_buffers()})
    have = {k for k in members if k.startswith("param/")}
    missing, unexpected = sorted(set(own) - have), sorted(have - set(own))
    if missing:
        raise CheckpointError(f"{model.name} has {missing[0][6:]}, the checkpoint does not (missing {len(missing)}: "
                              f"{', '.join(m[6:] for m in missing[:5])})", path, f"member {missing[0]!r}")
    if unexpected:
        raise CheckpointError(f"{model.name} has no parameter {unexpected[0][6:]} (a checkpoint of another model?)",
                              path, f"member {unexpected[0]!r}")
    for k, shape in own.items():
        m = members[k]
        if m.shape != shape or m.dtype != np.float32:
            raise CheckpointError(f"{m.dtype} of shape {m.shape}, {model.name} needs float32 of shape {shape}", path,
                                  f"member {k!r}")
    return list(own)
