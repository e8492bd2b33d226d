"""Linear, activation, pooling, normalisation, shape and constant-operand layers."""
from __future__ import annotations

import numpy as np

from .. import ops
from ..backend import get_backend
from ..ops._common import as_int, conv_out_size, pair
from ..ops.activation import activate_, activation_grad, pass_where
from ..ops.conv import ConvGeometry
from .base import Layer, he_normal


def check_sizes(layer: str, **sizes) -> None:
    """Each of ``sizes`` (channels, features) is an int >= 1: TypeError / ValueError naming it."""
    for name, v in sizes.items():
        if as_int(v, name, layer) < 1:
            raise ValueError(f"{layer}: {name} must be >= 1, got {v}")


def window_args(layer: str, kernel_size, stride, padding, dilation=1) -> tuple:
    """(kernel_size, stride, padding, dilation) as (h, w) pairs: kernel, stride and dilation >= 1,
    padding >= 0 (TypeError for what is not an int or a pair of ints)."""
    k, s, p, d = (pair(v, n) for v, n in ((kernel_size, "kernel_size"), (stride, "stride"), (padding, "padding"),
                                            (dilation, "dilation")))
    if min(k + s + d) < 1 or min(p) < 0:
        raise ValueError(f"{layer}: need kernel_size, stride, dilation >= 1 and padding >= 0; got kernel_size={k}, "
                         f"stride={s}, padding={p}, dilation={d}")
    return k, s, p, d


def sample_shape(layer, in_shape, ndim: int, what: str) -> tuple:
    """``in_shape`` (one sample's shape) as a tuple of ``ndim`` ints, or ValueError naming the layer."""
    shape = tuple(in_shape)
    if len(shape) != ndim:
        raise ValueError(f"{type(layer).__name__} expects samples of shape {what}, the previous layer gives {shape}")
    return shape


class Linear(Layer):
    """y = x W^T + b, x (N, in), W (out, in) — one GEMM (NT) forward, two backward. A following
    ReLU / ReLU6 is applied in place on y when a Graph fuses it (``absorbs``).

    ``precision``: "fp32" (default), or "tf32" / "bf16": all three GEMMs (forward and both
    gradients) on tensor cores with operands rounded to TF32 / BF16 and float32 accumulation
    (:func:`dnnpar.ops.gemm.precision_algo`; on the numpy backend the operands are rounded the
    same way before BLAS, so CPU runs show the GPU's rounding)."""

    absorbs = ("relu", "relu6")

    def __init__(self, in_features: int, out_features: int, bias: bool = True, seed: int = 0,
                 precision: str = "fp32"):
        super().__init__()
        check_sizes("Linear", in_features=in_features, out_features=out_features)
        self._algo = ops.gemm_precision_algo("Linear", precision)
        self.precision = precision
        self.in_features, self.out_features, self.bias = in_features, out_features, _check_bool("Linear", "bias", bias)
        be = get_backend()
        self.params["weight"] = be.asarray(he_normal(np.random.default_rng(seed), (out_features, in_features), in_features))
        if bias:
            self.params["bias"] = be.xp.zeros(out_features, dtype=np.float32)

    def forward(self, x):
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear expects (N, {self.in_features}) input, got {tuple(x.shape)}")
        self.x = x
        y = ops.gemm(x, self.params["weight"], trans_b=True, algo=self._algo)
        if "bias" in self.params:
            y += self.params["bias"]
        self.y = activate_(get_backend().xp, y, self.activation) if self.activation else None
        return y

    def backward(self, dy):
        if self.activation:
            dy = activation_grad(get_backend().xp, dy, self.y, self.activation)
            self.y = None
        self._set_grads(ops.gemm(dy, self.x, trans_a=True, algo=self._algo, out=self._spare_grad("weight")),
                        dy.sum(axis=0))
        self.x = None
        return ops.gemm(dy, self.params["weight"], algo=self._algo) if self.need_dx else None

    def output_shape(self, in_shape):
        if tuple(in_shape) != (self.in_features,):
            raise ValueError(f"Linear expects {self.in_features} features, the previous layer gives {in_shape}")
        return (self.out_features,)

    def macs(self, in_shape):
        return self.in_features * self.out_features

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}" + ("" if "bias" in self.params else ", bias=False")
                + ("" if self.precision == "fp32" else f", precision={self.precision!r}"))


class ReLU(Layer):
    """max(x, 0); NaN stays NaN and -inf gives 0 (x * mask would make it NaN), as in ONNX and PyTorch.
    The gradient passes where y > 0 (where x > 0: the same entries, NaN included); forward keeps
    y, the array it returns, rather than a mask it would have to build (one pass instead of two,
    and nothing new held for backward)."""

    activation_kind = "relu"

    def forward(self, x):
        self.y = get_backend().xp.maximum(x, x.dtype.type(0))
        return self.y

    def backward(self, dy):
        y, self.y = self.y, None
        return activation_grad(get_backend().xp, dy, y, "relu")


class Flatten(Layer):
    """(N, C, H, W) -> (N, C*H*W)."""

    def forward(self, x):
        self.shape = x.shape
        return x.reshape(x.shape[0], -1)

    def backward(self, dy):
        return dy.reshape(self.shape)

    def output_shape(self, in_shape):
        return (int(np.prod(in_shape)),)


class Dropout(Layer):
    """Inverted dropout: in training, zero each activation with probability p and scale the
    rest by 1/(1-p); identity in eval mode. Masks come from a seeded generator."""

    def __init__(self, p: float = 0.5, seed: int = 0):
        super().__init__()
        if not 0.0 <= _real("Dropout", "p", p) < 1.0:
            raise ValueError(f"Dropout: p must be in [0, 1), got {p}")
        self.p = p
        self.rng = np.random.default_rng(seed)

    def forward(self, x):
        if not self.training or self.p == 0.0:
            self.mask = None
            return x
        keep = self.rng.random(x.shape) >= self.p
        self.mask = get_backend().asarray((keep / (1.0 - self.p)).astype(x.dtype))
        return x * self.mask

    def backward(self, dy):
        return dy if self.mask is None else dy * self.mask

    def extra_repr(self):
        return f"p={self.p}"


class _Pool(Layer):
    """Windows over (N, C, H, W). Padding must be smaller than the window (as ONNX Runtime
    requires; PyTorch's half-the-window limit is stricter than correctness needs): then every
    window, the last included, overlaps the image, so a max is finite and a mean that leaves the
    padding out never divides by zero."""

    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        name = type(self).__name__
        self.kernel_size, self.stride, self.padding, _ = window_args(
            name, kernel_size, stride if stride is not None else kernel_size, padding)
        kh, kw = self.kernel_size
        if self.padding[0] >= kh or self.padding[1] >= kw:
            raise ValueError(f"{name}: padding {self.padding} must be smaller than the window {self.kernel_size}")

    def geometry(self, shape):
        return ConvGeometry.make(type(self).__name__, shape, *self.kernel_size, self.stride, self.padding, 1)

    def output_shape(self, in_shape):
        c, h, w = sample_shape(self, in_shape, 3, "(C, H, W)")
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        name = type(self).__name__
        return (c, conv_out_size(name, h, kh, sh, ph, 1, "height"), conv_out_size(name, w, kw, sw, pw, 1, "width"))

    def macs(self, in_shape):
        return 0  # comparisons / additions, no multiply-accumulates

    def extra_repr(self):
        return f"kernel={self.kernel_size}, stride={self.stride}" + (f", padding={self.padding}" if any(self.padding) else "")


class MaxPool2d(_Pool):
    """Max over each window; the gradient goes to the first maximum of its window (taps in
    row-major order). Forward keeps the input and recovers the argmax in backward, which costs
    one comparison per tap instead of carrying an index array through forward (:mod:`dnnpar.ops.pool`:
    the native kernel on the numpy backend)."""

    def forward(self, x):
        self.g = self.geometry(x.shape)
        self.out, self.saved = ops.max_pool2d(x, self.g)
        return self.out

    def backward(self, dy):
        dx = ops.max_pool2d_backward(self.saved, self.out, dy, self.g)
        self.saved = self.out = None
        return dx


class AvgPool2d(_Pool):
    """Mean over each window. ``count_include_pad``: zero padding counts toward the divisor
    (Caffe's and PyTorch's default); False divides by the pixels of the image the window covers
    (ONNX's default)."""

    def __init__(self, kernel_size, stride=None, padding=0, count_include_pad: bool = True):
        super().__init__(kernel_size, stride, padding)
        self.count_include_pad = _check_bool("AvgPool2d", "count_include_pad", count_include_pad)

    def forward(self, x):
        self.g = self.geometry(x.shape)
        return ops.avg_pool2d(x, self.g, self.count_include_pad)

    def backward(self, dy):
        return ops.avg_pool2d_backward(dy, self.g, self.count_include_pad)

    def extra_repr(self):
        return super().extra_repr() + ("" if self.count_include_pad else ", count_include_pad=False")


class GlobalAvgPool2d(Layer):
    """(N, C, H, W) -> (N, C), or (N, C, 1, 1) with ``keepdims``: the mean over each feature map."""

    def __init__(self, keepdims: bool = False):
        super().__init__()
        self.keepdims = _check_bool("GlobalAvgPool2d", "keepdims", keepdims)

    def forward(self, x):
        if x.ndim != 4:
            raise ValueError(f"GlobalAvgPool2d expects (N, C, H, W) input, got {tuple(x.shape)}")
        self.shape = x.shape
        return x.mean(axis=(2, 3), keepdims=self.keepdims)

    def backward(self, dy):
        n, c, h, w = self.shape
        xp = get_backend().xp
        return xp.broadcast_to((dy / dy.dtype.type(h * w)).reshape(n, c, 1, 1), self.shape).copy()

    def output_shape(self, in_shape):
        c, _, _ = sample_shape(self, in_shape, 3, "(C, H, W)")
        return (c, 1, 1) if self.keepdims else (c,)

    def extra_repr(self):
        return "keepdims=True" if self.keepdims else ""


#: smallest BatchNorm2d eps: 1 / sqrt(eps) of a constant channel stays far inside float32
MIN_BN_EPS = 1e-12


class BatchNorm2d(Layer):
    """Per-channel normalisation. Training: batch statistics (biased variance), running averages
    updated with ``momentum`` (unbiased variance, as PyTorch). Eval: the running averages. A
    following ReLU / ReLU6 is applied inside the op (``absorbs``: the native kernel's epilogue on
    the numpy backend), its gradient mask inside the backward (:func:`dnnpar.ops.batch_norm`)."""

    absorbs = ("relu", "relu6")

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        xp = get_backend().xp
        check_sizes("BatchNorm2d", channels=channels)
        eps, momentum = _real("BatchNorm2d", "eps", eps), _real("BatchNorm2d", "momentum", momentum)
        if not (MIN_BN_EPS <= eps <= 1.0 and 0.0 <= momentum <= 1.0):
            # an eps that float32 rounds to zero would divide a constant channel by zero
            raise ValueError(f"BatchNorm2d: need eps in [{MIN_BN_EPS}, 1] and momentum in [0, 1], got {eps}, {momentum}")
        self.channels, self.eps, self.momentum = channels, eps, momentum
        self.params["weight"] = xp.ones(channels, dtype=np.float32)
        self.params["bias"] = xp.zeros(channels, dtype=np.float32)
        self.buffers["running_mean"] = xp.zeros(channels, dtype=np.float32)
        self.buffers["running_var"] = xp.ones(channels, dtype=np.float32)

    def output_shape(self, in_shape):
        c, _, _ = sample_shape(self, in_shape, 3, "(C, H, W)")
        if c != self.channels:
            raise ValueError(f"BatchNorm2d expects {self.channels} channels, the previous layer gives {c}")
        return tuple(in_shape)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"BatchNorm2d expects (N, {self.channels}, H, W) input, got {tuple(x.shape)}")
        gamma, beta = self.params["weight"].astype(x.dtype), self.params["bias"].astype(x.dtype)
        if self.training:
            y, st = ops.batch_norm(x, gamma, beta, eps=self.eps, training=True, activation=self.activation)
            m = x.size // self.channels
            rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
            rm *= 1 - self.momentum
            rm += (self.momentum * st.mean).astype(rm.dtype)
            rv *= 1 - self.momentum
            rv += (self.momentum * st.var * m / max(m - 1, 1)).astype(rv.dtype)
        else:
            y, st = ops.batch_norm(x, gamma, beta, self.buffers["running_mean"], self.buffers["running_var"],
                                   eps=self.eps, training=False, activation=self.activation)
        self.saved = (x, y if self.activation else None, st, self.training, self.activation)
        return y

    def backward(self, dy):
        x, y, st, training, activation = self.saved
        self.saved = None
        dx, dw, db = ops.batch_norm_backward(x, y, dy, self.params["weight"].astype(dy.dtype), st, training,
                                             activation, need_dx=self.need_dx)
        self._set_grads(dw.astype(self.params["weight"].dtype), db.astype(self.params["bias"].dtype))
        return dx

    def extra_repr(self):
        return f"{self.channels}, eps={self.eps}, momentum={self.momentum}"


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels; ``backward`` gives dL/dlogits.
    Forward and backward are one op (:func:`dnnpar.ops.softmax_cross_entropy`: the gradient is
    written in the loss's pass; one fused kernel on the cuda / emu backends). The loss is a 0-d
    backend array: ``float(loss)`` reads it (a device synchronisation on the GPU)."""

    def forward(self, logits, labels):
        loss, self.d = ops.softmax_cross_entropy(logits, labels)
        return loss

    __call__ = forward

    def backward(self):
        return self.d


# ---------------------------------------------------------------- activations and shape layers
def _real(layer: str, name: str, v, optional: bool = False):
    """``v`` as a finite float (None allowed when ``optional``), else TypeError / ValueError."""
    if v is None and optional:
        return None
    if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
        raise TypeError(f"{layer}: {name} must be a real number{' or None' if optional else ''}, got {v!r}"[:200])
    v = float(v)
    if not np.isfinite(v):
        raise ValueError(f"{layer}: {name} must be finite, got {v}")
    return v


def _check_bool(layer: str, name: str, v) -> bool:
    if not isinstance(v, (bool, np.bool_)):
        raise TypeError(f"{layer}: {name} must be a bool, got {v!r}"[:200])
    return bool(v)


class Identity(Layer):
    """y = x (ONNX Identity; a placeholder where a layer was folded away)."""

    def forward(self, x):
        return x

    def backward(self, dy):
        return dy


class Clip(Layer):
    """y = min(max(x, min_value), max_value); a bound of None is absent (ONNX Clip). The gradient
    passes where x lies strictly inside the bounds (PyTorch's hardtanh)."""

    def __init__(self, min_value: float | None = None, max_value: float | None = None):
        super().__init__()
        self.min_value = _real(type(self).__name__, "min_value", min_value, optional=True)
        self.max_value = _real(type(self).__name__, "max_value", max_value, optional=True)
        if self.min_value is not None and self.max_value is not None and self.min_value > self.max_value:
            raise ValueError(f"{type(self).__name__}: min_value {self.min_value} exceeds max_value {self.max_value}")

    @property
    def activation_kind(self):
        """"relu6" for Clip(0, 6) and "relu" for Clip(0, None) (fusable), else None."""
        return {(0.0, 6.0): "relu6", (0.0, None): "relu"}.get((self.min_value, self.max_value))

    def forward(self, x):
        xp, t = get_backend().xp, x.dtype.type
        lo, hi = self.min_value, self.max_value
        if lo is not None:
            x = xp.maximum(x, t(lo))
        if hi is not None:
            x = xp.minimum(x, t(hi))
        self.y = x  # lo < x < hi exactly where lo < y < hi (NaN in neither): backward's mask
        return x if lo is not None or hi is not None else x.copy()

    def backward(self, dy):
        # where, not dy * mask: a NaN gradient outside the bounds gives 0, as PyTorch's hardtanh
        xp, (y, self.y) = get_backend().xp, (self.y, None)
        lo, hi = self.min_value, self.max_value
        if lo is None and hi is None:
            return dy
        t = y.dtype.type
        mask = None if lo is None else y > t(lo)
        if hi is not None:
            mask = y < t(hi) if mask is None else xp.logical_and(mask, y < t(hi), out=mask)
        return pass_where(xp, mask, dy)

    def extra_repr(self):
        return f"min_value={self.min_value}, max_value={self.max_value}"


class ReLU6(Clip):
    """y = min(max(x, 0), 6) (MobileNet v2)."""

    def __init__(self):
        super().__init__(0.0, 6.0)

    def extra_repr(self):
        return ""


class Sigmoid(Layer):
    """y = 1 / (1 + exp(-x)), computed from exp(-|x|) so that no exponential overflows."""

    def forward(self, x):
        xp = get_backend().xp
        e = xp.exp(-xp.abs(x))
        r = 1 / (1 + e)
        self.y = xp.where(x >= 0, r, e * r)
        return self.y

    def backward(self, dy):
        y, self.y = self.y, None
        return dy * y * (1 - y)


class HardSigmoid(Layer):
    """y = max(0, min(1, alpha * x + beta)) (ONNX HardSigmoid; PyTorch's is alpha=1/6)."""

    def __init__(self, alpha: float = 0.2, beta: float = 0.5):
        super().__init__()
        self.alpha, self.beta = _real("HardSigmoid", "alpha", alpha), _real("HardSigmoid", "beta", beta)

    def forward(self, x):
        xp, t = get_backend().xp, x.dtype.type
        z = x * t(self.alpha) + t(self.beta)
        self.mask = (z > 0) & (z < 1)
        return xp.minimum(xp.maximum(z, t(0)), t(1))

    def backward(self, dy):
        dx = dy * self.mask * dy.dtype.type(self.alpha)
        self.mask = None
        return dx

    def extra_repr(self):
        return f"alpha={self.alpha}, beta={self.beta}"


class HardSwish(Layer):
    """y = x * max(0, min(1, x / 6 + 1/2)) (ONNX HardSwish, PyTorch Hardswish, MobileNet v3)."""

    def forward(self, x):
        xp, t = get_backend().xp, x.dtype.type
        self.x = x
        z = x / t(6) + t(0.5)
        return x * xp.minimum(xp.maximum(z, t(0)), t(1))

    def backward(self, dy):
        xp, t = get_backend().xp, dy.dtype.type
        x, self.x = self.x, None
        z = x / t(6) + t(0.5)
        # inside (-3, 3): d(x z)/dx = z + x/6; above: 1; below: 0
        slope = xp.where(z >= 1, t(1), xp.where(z > 0, z + x / t(6), t(0)))
        return dy * slope


class Softmax(Layer):
    """Softmax along ``axis`` of the batched tensor (axis 1: the features or channels; ONNX's
    opset-13 definition). Backward is the Jacobian-vector product y * (dy - sum(dy * y))."""

    def __init__(self, axis: int = 1):
        super().__init__()
        if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)):
            raise TypeError(f"Softmax: axis must be an int, got {axis!r}"[:200])
        if axis < 1:
            raise ValueError(f"Softmax: axis must be >= 1 (axis 0 is the batch), got {axis}")
        self.axis = int(axis)

    def forward(self, x):
        if x.ndim <= self.axis:
            raise ValueError(f"Softmax(axis={self.axis}) needs input of more than {self.axis} dimensions, "
                             f"got {tuple(x.shape)}")
        xp = get_backend().xp
        e = xp.exp(x - x.max(axis=self.axis, keepdims=True))
        self.y = e / e.sum(axis=self.axis, keepdims=True)
        return self.y

    def backward(self, dy):
        y, self.y = self.y, None
        return y * (dy - (dy * y).sum(axis=self.axis, keepdims=True))

    def output_shape(self, in_shape):
        if len(in_shape) < self.axis:
            raise ValueError(f"Softmax(axis={self.axis}) needs samples of at least {self.axis} dimensions, the "
                             f"previous layer gives {tuple(in_shape)}")
        return tuple(in_shape)

    def extra_repr(self):
        return f"axis={self.axis}"


class Reshape(Layer):
    """(N, *in) -> (N, *shape): ``shape`` is one sample's target shape (the batch axis is kept);
    one entry may be -1 (inferred from the others), none may be 0."""

    def __init__(self, shape: tuple):
        super().__init__()
        if isinstance(shape, (int, np.integer)) and not isinstance(shape, (bool, np.bool_)):
            shape = (shape,)
        if not isinstance(shape, (tuple, list)) or not shape or not all(
                isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_)) for s in shape):
            raise TypeError(f"Reshape: shape must be a non-empty tuple of ints, got {shape!r}"[:200])
        shape = tuple(int(s) for s in shape)
        if any(s < 1 and s != -1 for s in shape) or shape.count(-1) > 1:
            raise ValueError(f"Reshape: shape entries must be >= 1, with at most one -1, got {shape}")
        self.shape = shape

    def output_shape(self, in_shape):
        total = int(np.prod(in_shape, dtype=object))
        known = int(np.prod([s for s in self.shape if s != -1], dtype=object))
        if -1 in self.shape:
            if total % known:
                raise ValueError(f"Reshape: cannot reshape a sample of shape {tuple(in_shape)} ({total} elements) "
                                 f"to {self.shape}")
            return tuple(total // known if s == -1 else s for s in self.shape)
        if known != total:
            raise ValueError(f"Reshape: cannot reshape a sample of shape {tuple(in_shape)} ({total} elements) to "
                             f"{self.shape} ({known})")
        return self.shape

    def forward(self, x):
        self.in_shape = x.shape
        return x.reshape((x.shape[0],) + self.output_shape(x.shape[1:]))

    def backward(self, dy):
        return dy.reshape(self.in_shape)

    def extra_repr(self):
        return f"shape={self.shape}"


#: what ConstantOp computes from x and its constant c
CONSTANT_OPS = ("add", "sub", "rsub", "mul", "div")


class ConstantOp(Layer):
    """y = x (op) value with a constant operand broadcast against each sample (NumPy rules; it
    may not grow the sample): ``op`` one of add (x + c), sub (x - c), rsub (c - x), mul (x * c),
    div (x / c). ``value`` (float32) is the buffer "value": saved with the model, not trained.
    ``value`` may also be {"shape": [...], "dtype": "float32"} (what :meth:`config` gives): a
    zero placeholder that ``load_state_dict`` fills. Backward gives dL/dx only."""

    def __init__(self, op: str, value):
        super().__init__()
        if op not in CONSTANT_OPS:
            raise ValueError(f"ConstantOp: op must be one of {', '.join(CONSTANT_OPS)}, got {op!r}"[:200])
        self.op = op
        be = get_backend()
        if isinstance(value, dict):
            if set(value) != {"shape", "dtype"} or value["dtype"] != "float32":
                raise ValueError(f"ConstantOp: a value placeholder is {{'shape': [...], 'dtype': 'float32'}}, "
                                 f"got {value!r}"[:200])
            shape = value["shape"]
            if not isinstance(shape, (list, tuple)) or not all(
                    isinstance(s, (int, np.integer)) and not isinstance(s, (bool, np.bool_)) and s >= 1 for s in shape):
                raise ValueError(f"ConstantOp: the value's shape must be a list of sizes >= 1, got {shape!r}"[:200])
            v = np.zeros(tuple(int(s) for s in shape), np.float32)
        else:
            if isinstance(value, be.array_type) and not isinstance(value, np.ndarray):
                value = be.to_numpy(value)
            v = np.asarray(value)
            if v.dtype.kind not in "biuf":
                raise TypeError(f"ConstantOp: value must hold real numbers, got dtype {v.dtype}")
            with np.errstate(over="ignore"):  # past float32's range becomes inf, refused just below
                v = v.astype(np.float32)
            if not np.isfinite(v).all():
                raise ValueError("ConstantOp: value holds NaN or infinity (or numbers past float32's range)")
            if op == "div" and not v.all():
                raise ValueError("ConstantOp: op 'div' by a value that holds zeros")
        self.buffers["value"] = be.asarray(v)

    def output_shape(self, in_shape):
        vshape, in_shape = tuple(self.buffers["value"].shape), tuple(in_shape)
        try:
            ok = len(vshape) <= len(in_shape) and np.broadcast_shapes(vshape, in_shape) == in_shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(f"ConstantOp: a value of shape {vshape} does not broadcast against samples of shape "
                             f"{in_shape} (without growing them)")
        return in_shape

    def forward(self, x):
        self.output_shape(x.shape[1:])
        c = self.buffers["value"].astype(x.dtype, copy=False)
        if self.op == "add":
            return x + c
        if self.op == "sub":
            return x - c
        if self.op == "rsub":
            return c - x
        return x * c if self.op == "mul" else x / c

    def backward(self, dy):
        if self.op in ("add", "sub"):
            return dy
        if self.op == "rsub":
            return -dy
        c = self.buffers["value"].astype(dy.dtype, copy=False)
        return dy * c if self.op == "mul" else dy / c

    def config(self):
        return {"op": self.op, "value": {"shape": list(self.buffers["value"].shape), "dtype": "float32"}}

    def extra_repr(self):
        return f"{self.op!r}, value shape={tuple(self.buffers['value'].shape)}"
