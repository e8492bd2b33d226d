"""Graph models: named layers wired by named inputs (residual adds, concatenations), run forward
and backward over the DAG in topological order.

    g = Graph([("conv1", Conv2d(3, 8, 3, padding=1), ["input"]),
               ("relu1", ReLU(), ["conv1"]),
               ("conv2", Conv2d(8, 8, 3, padding=1), ["relu1"]),
               ("add", Add(), ["conv2", "relu1"]),     # a residual connection: relu1 fans out
               ...], input_shape=(3, 32, 32), output="fc")

Each node names a layer and the tensors it reads: the graph input (``"input"`` unless
``input_name`` says otherwise) or earlier nodes' outputs. A layer with one input has
``forward(x)`` / ``backward(dy) -> dx``; a layer with several (``Add``, ``Concat``) has
``forward(*xs)`` / ``backward(dy) -> tuple of dx``. Backward sums the gradients of a tensor read by
several nodes. :class:`~dnnpar.nn.base.Sequential` is the chain-shaped special case.
"""
from __future__ import annotations

from ..backend import get_backend
from .base import Layer, Sequential


class Add(Layer):
    """y = x1 + x2 + ... (same shapes): ResNet's residual join. Backward hands dy to every input."""
    arity = None  # any number >= 2

    def forward(self, *xs):
        if len(xs) < 2 or any(tuple(x.shape) != tuple(xs[0].shape) for x in xs):
            raise ValueError(f"Add needs >= 2 inputs of one shape, got {[tuple(x.shape) for x in xs]}")
        self.n = len(xs)
        y = xs[0] + xs[1]
        for x in xs[2:]:
            y += x
        return y

    def backward(self, dy):
        return (dy,) * self.n

    def output_shape(self, *in_shapes):
        if len(in_shapes) < 2 or any(tuple(s) != tuple(in_shapes[0]) for s in in_shapes):
            raise ValueError(f"Add needs >= 2 inputs of one shape, got {list(in_shapes)}")
        return tuple(in_shapes[0])


class Concat(Layer):
    """Concatenation along the channel axis (axis 1 of (N, C, ...)): Inception / DenseNet joins."""
    arity = None

    def __init__(self, axis: int = 1):
        super().__init__()
        if axis != 1:
            raise ValueError(f"Concat joins channels (axis 1), got axis={axis}")
        self.axis = axis

    def forward(self, *xs):
        if len(xs) < 2 or any(x.ndim != xs[0].ndim or x.shape[:1] + x.shape[2:] != xs[0].shape[:1] + xs[0].shape[2:]
                              for x in xs):
            raise ValueError(f"Concat needs >= 2 inputs equal but for axis 1, got {[tuple(x.shape) for x in xs]}")
        self.sizes = [int(x.shape[1]) for x in xs]
        return get_backend().xp.concatenate(xs, axis=1)

    def backward(self, dy):
        out, start = [], 0
        for c in self.sizes:
            out.append(get_backend().xp.ascontiguousarray(dy[:, start:start + c]))
            start += c
        return tuple(out)

    def output_shape(self, *in_shapes):
        if len(in_shapes) < 2 or any(tuple(s[1:]) != tuple(in_shapes[0][1:]) for s in in_shapes):
            raise ValueError(f"Concat needs >= 2 inputs equal but for channels, got {list(in_shapes)}")
        return (sum(int(s[0]) for s in in_shapes),) + tuple(in_shapes[0][1:])


class Graph(Sequential):
    """A DAG of named layers. ``nodes``: ``(name, layer, [input names])`` in any order that is
    topological (every input is the graph input or an earlier node); ``output``: the node whose
    result ``forward`` returns (default: the last). Parameters, buffers, checkpoints, training
    and compression work as for :class:`Sequential` (``model.layers`` lists the nodes in order)."""

    def __init__(self, nodes, input_shape: tuple | None = None, name: str = "graph", output: str | None = None,
                 input_name: str = "input"):
        nodes = list(nodes)
        if not nodes:
            raise ValueError("Graph: needs at least one node")
        inputs_of = {}
        for item in nodes:
            if not (isinstance(item, (tuple, list)) and len(item) == 3):
                raise TypeError(f"Graph: a node is (name, layer, [inputs]), got {item!r}")
            lname, layer, ins = item
            if not isinstance(lname, str) or not lname or lname == input_name:
                raise ValueError(f"Graph: node name {lname!r} must be a non-empty str other than {input_name!r}")
            if isinstance(ins, str) or not all(isinstance(i, str) for i in ins) or not ins:
                raise TypeError(f"Graph: node {lname!r}: inputs must be a non-empty list of names, got {ins!r}")
            for i in ins:
                if i != input_name and i not in inputs_of:
                    raise ValueError(f"Graph: node {lname!r} reads {i!r}, which is neither the input {input_name!r} "
                                     "nor an earlier node (list the nodes in topological order)")
            if lname in inputs_of:
                raise ValueError(f"Graph: duplicate node name {lname!r}")
            arity = getattr(layer, "arity", 1)
            if arity is not None and len(ins) != arity:
                raise ValueError(f"Graph: node {lname!r} ({type(layer).__name__}) takes {arity} input(s), "
                                 f"got {len(ins)}: {list(ins)}")
            inputs_of[lname] = list(ins)
        super().__init__(*[(n, layer) for n, layer, _ in nodes], input_shape=input_shape, name=name)
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
        for lname, _ in self.layers:
            for i in self.inputs_of[lname]:
                self._last_use[i] = lname

    def forward(self, x):
        self.check_input(x)
        env = {self.input_name: x}
        for lname, layer in self.layers:
            ins = self.inputs_of[lname]
            env[lname] = layer.forward(*[env[i] for i in ins])
            for i in ins:
                if self._last_use.get(i) == lname and i != self.output:
                    del env[i]
        return env[self.output]

    def backward(self, dy):
        """Back-propagate dL/d(output): fills every layer's grads, summing the gradient of each
        tensor over the nodes that read it. Returns None (the input gets no gradient)."""
        grads = {self.output: dy}
        for lname, layer in reversed(self.layers):
            g = grads.pop(lname, None)
            if g is None or not self._on_grad_path[lname]:
                continue
            dxs = layer.backward(g)
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

    def extra_repr(self):
        return "\n  " + "\n  ".join(f"({n}): {layer!r} <- {', '.join(self.inputs_of[n])}"
                                     for n, layer in self.layers) + "\n"


__all__ = ["Graph", "Add", "Concat"]
