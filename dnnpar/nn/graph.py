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
from ..ops.activation import activate_, activation_grad, add_activate
from .base import Graph, Layer  # noqa: F401  (Graph lives with Layer; the joins live here)


class Add(Layer):
    """y = x1 + x2 + ... (same shapes): ResNet's residual join. Backward hands dy to every input.
    A following ReLU / ReLU6 is applied in the same pass when a Graph fuses it (``absorbs``:
    two inputs, one native pass on the numpy backend)."""
    arity = None  # any number >= 2
    absorbs = ("relu", "relu6")

    def forward(self, *xs):
        if len(xs) < 2 or any(tuple(x.shape) != tuple(xs[0].shape) for x in xs):
            raise ValueError(f"Add needs >= 2 inputs of one shape, got {[tuple(x.shape) for x in xs]}")
        self.n = len(xs)
        xp = get_backend().xp
        if len(xs) == 2:
            y = add_activate(xp, xs[0], xs[1], self.activation)
        else:
            y = xs[0] + xs[1]
            for x in xs[2:]:
                y += x
            activate_(xp, y, self.activation)
        self.y = y if self.activation else None
        return y

    def backward(self, dy):
        if self.activation:
            dy = activation_grad(get_backend().xp, dy, self.y, self.activation)
            self.y = None
        return (dy,) * self.n

    def macs(self, *in_shapes):
        return 0  # additions, no multiply-accumulates

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

    def macs(self, *in_shapes):
        return 0

    def output_shape(self, *in_shapes):
        if len(in_shapes) < 2 or any(tuple(s[1:]) != tuple(in_shapes[0][1:]) for s in in_shapes):
            raise ValueError(f"Concat needs >= 2 inputs equal but for channels, got {list(in_shapes)}")
        return (sum(int(s[0]) for s in in_shapes),) + tuple(in_shapes[0][1:])


def _mul_shape(a: tuple, b: tuple) -> tuple:
    """The product's shape: equal ranks, each axis equal or 1 on one side (the gate of a
    squeeze-and-excitation block, (C, 1, 1) against (C, H, W)); ValueError otherwise."""
    a, b = tuple(a), tuple(b)
    if len(a) != len(b) or any(p != q and 1 not in (p, q) for p, q in zip(a, b)):
        raise ValueError(f"Mul needs 2 inputs of one shape, or of one rank with size-1 axes to broadcast "
                         f"((N, C, 1, 1) x (N, C, H, W)), got {a} and {b}")
    return tuple(max(p, q) for p, q in zip(a, b))


class Mul(Layer):
    """y = x1 * x2, elementwise: equal shapes, or axes of size 1 on one side broadcast against
    the other (squeeze-and-excitation: (N, C, 1, 1) x (N, C, H, W)). Backward sums each input's
    gradient over the axes it was broadcast along."""
    arity = 2

    def forward(self, a, b):
        if a.shape[:1] != b.shape[:1]:
            raise ValueError(f"Mul needs inputs of one batch size, got {tuple(a.shape)} and {tuple(b.shape)}")
        _mul_shape(a.shape[1:], b.shape[1:])
        self.a, self.b = a, b
        return a * b

    def backward(self, dy):
        a, b = self.a, self.b
        self.a = self.b = None
        return self._reduce(dy * b, a.shape), self._reduce(dy * a, b.shape)

    @staticmethod
    def _reduce(g, shape):
        axes = tuple(i for i, (s, t) in enumerate(zip(shape, g.shape)) if s == 1 and t != 1)
        return g.sum(axis=axes, keepdims=True) if axes else g

    def macs(self, *in_shapes):
        return 0  # one multiply per element, nothing accumulated

    def output_shape(self, *in_shapes):
        if len(in_shapes) != 2:
            raise ValueError(f"Mul takes 2 inputs, got {len(in_shapes)}")
        return _mul_shape(*in_shapes)


__all__ = ["Graph", "Add", "Concat", "Mul"]
