"""Linear, activation, pooling, normalisation and shape layers."""
from __future__ import annotations

import numpy as np

from .. import ops
from ..backend import get_backend
from ..ops._common import conv_out_size, pair
from ..ops.conv import ConvGeometry
from .base import Layer, he_normal


class Linear(Layer):
    """y = x W^T + b, x (N, in), W (out, in) — one GEMM (NT) forward, two backward."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, seed: int = 0):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        be = get_backend()
        self.params["weight"] = be.asarray(he_normal(np.random.default_rng(seed), (out_features, in_features), in_features))
        if bias:
            self.params["bias"] = be.xp.zeros(out_features, dtype=np.float32)

    def forward(self, x):
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise ValueError(f"Linear expects (N, {self.in_features}) input, got {tuple(x.shape)}")
        self.x = x
        y = ops.gemm(x, self.params["weight"], trans_b=True)
        if "bias" in self.params:
            y += self.params["bias"]
        return y

    def backward(self, dy):
        self._set_grads(ops.gemm(dy, self.x, trans_a=True), dy.sum(axis=0))
        self.x = None
        return ops.gemm(dy, self.params["weight"]) if self.need_dx else None

    def output_shape(self, in_shape):
        if tuple(in_shape) != (self.in_features,):
            raise ValueError(f"Linear expects {self.in_features} features, the previous layer gives {in_shape}")
        return (self.out_features,)

    def macs(self, in_shape):
        return self.in_features * self.out_features

    def extra_repr(self):
        return f"{self.in_features}, {self.out_features}" + ("" if "bias" in self.params else ", bias=False")


class ReLU(Layer):
    def forward(self, x):
        self.mask = x > 0
        return x * self.mask

    def backward(self, dy):
        dx = dy * self.mask
        self.mask = None
        return dx


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
        if not 0.0 <= p < 1.0:
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
    def __init__(self, kernel_size, stride=None, padding=0):
        super().__init__()
        self.kernel_size = pair(kernel_size, "kernel_size")
        self.stride = pair(stride if stride is not None else kernel_size, "stride")
        self.padding = pair(padding, "padding")
        kh, kw = self.kernel_size
        if self.padding[0] > kh // 2 or self.padding[1] > kw // 2:
            raise ValueError(f"{type(self).__name__}: padding {self.padding} exceeds half the window {self.kernel_size}")

    def geometry(self, shape):
        return ConvGeometry.make(type(self).__name__, shape, *self.kernel_size, self.stride, self.padding, 1)

    def output_shape(self, in_shape):
        c, h, w = in_shape
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        name = type(self).__name__
        return (c, conv_out_size(name, h, kh, sh, ph, 1, "height"), conv_out_size(name, w, kw, sw, pw, 1, "width"))

    def macs(self, in_shape):
        c, oh, ow = self.output_shape(in_shape)
        return 0  # comparisons / additions, no multiply-accumulates

    def _padded(self, x, g, value):
        ph, pw = g.padding
        if not (ph or pw):
            return x
        xp = get_backend().xp
        return xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)

    def extra_repr(self):
        return f"kernel={self.kernel_size}, stride={self.stride}" + (f", padding={self.padding}" if any(self.padding) else "")


class MaxPool2d(_Pool):
    """Max over each window; the gradient goes to the first maximum of its window (taps in
    row-major order). Forward keeps the padded input and recovers the argmax in backward, which
    costs one comparison per tap instead of carrying an index array through forward."""

    def forward(self, x):
        g = self.geometry(x.shape)
        xp = get_backend().xp
        xpad = self._padded(x, g, -np.inf)
        out = None
        for i in range(g.kh):
            for j in range(g.kw):
                v = xpad[g.tap_slices(i, j)]
                out = v.copy() if out is None else xp.maximum(out, v, out=out)
        self.g, self.xpad, self.out = g, xpad, out
        return out

    def backward(self, dy):
        g, xp = self.g, get_backend().xp
        (ph, pw), (sh, sw) = g.padding, g.stride
        disjoint = sh >= g.kh and sw >= g.kw  # each input in at most one window: store, don't add
        tiled = disjoint and (g.kh, g.kw) == (sh, sw) and (g.h + 2 * ph, g.w + 2 * pw) == (g.oh * sh, g.ow * sw)
        dx = (xp.empty if tiled else xp.zeros)((g.n, g.c, g.h + 2 * ph, g.w + 2 * pw), dtype=dy.dtype)
        hit, free = xp.empty(self.out.shape, dtype=bool), xp.empty(self.out.shape, dtype=bool)
        taken = None
        last = (g.kh - 1, g.kw - 1)
        for i in range(g.kh):
            for j in range(g.kw):
                sl = g.tap_slices(i, j)
                xp.equal(self.xpad[sl], self.out, out=hit)
                if taken is None:
                    taken = hit.copy()
                else:  # only the first maximum of a window (taps in row-major order) gets the gradient
                    xp.logical_not(taken, out=free)
                    hit &= free
                    if (i, j) != last:
                        taken |= hit
                if disjoint:
                    xp.multiply(dy, hit, out=dx[sl])
                else:
                    dx[sl] += dy * hit
        self.xpad = self.out = None
        return xp.ascontiguousarray(dx[:, :, ph:ph + g.h, pw:pw + g.w])


class AvgPool2d(_Pool):
    """Mean over each window (zero padding counts toward the window, as in Caffe/PyTorch default)."""

    def forward(self, x):
        g = self.geometry(x.shape)
        xpad = self._padded(x, g, 0.0)
        out = None
        for i in range(g.kh):
            for j in range(g.kw):
                v = xpad[g.tap_slices(i, j)]
                out = v.copy() if out is None else out + v
        self.g = g
        return out * x.dtype.type(1.0 / (g.kh * g.kw))

    def backward(self, dy):
        g, xp = self.g, get_backend().xp
        ph, pw = g.padding
        dx = xp.zeros((g.n, g.c, g.h + 2 * ph, g.w + 2 * pw), dtype=dy.dtype)
        share = dy * dy.dtype.type(1.0 / (g.kh * g.kw))
        for i in range(g.kh):
            for j in range(g.kw):
                dx[g.tap_slices(i, j)] += share
        return xp.ascontiguousarray(dx[:, :, ph:ph + g.h, pw:pw + g.w])


class GlobalAvgPool2d(Layer):
    """(N, C, H, W) -> (N, C): the mean over each feature map."""

    def forward(self, x):
        self.shape = x.shape
        return x.mean(axis=(2, 3))

    def backward(self, dy):
        n, c, h, w = self.shape
        xp = get_backend().xp
        return xp.broadcast_to((dy / dy.dtype.type(h * w))[:, :, None, None], self.shape).copy()

    def output_shape(self, in_shape):
        return (in_shape[0],)


class BatchNorm2d(Layer):
    """Per-channel normalisation. Training: batch statistics (biased variance), running averages
    updated with ``momentum`` (unbiased variance, as PyTorch). Eval: the running averages."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        xp = get_backend().xp
        self.channels, self.eps, self.momentum = channels, eps, momentum
        self.params["weight"] = xp.ones(channels, dtype=np.float32)
        self.params["bias"] = xp.zeros(channels, dtype=np.float32)
        self.buffers["running_mean"] = xp.zeros(channels, dtype=np.float32)
        self.buffers["running_var"] = xp.ones(channels, dtype=np.float32)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.channels:
            raise ValueError(f"BatchNorm2d expects (N, {self.channels}, H, W) input, got {tuple(x.shape)}")
        gamma, beta = self.params["weight"].astype(x.dtype), self.params["bias"].astype(x.dtype)
        if self.training:
            mean = x.mean(axis=(0, 2, 3))
            var = x.var(axis=(0, 2, 3))
            m = x.size // self.channels
            rm, rv = self.buffers["running_mean"], self.buffers["running_var"]
            rm *= 1 - self.momentum
            rm += (self.momentum * mean).astype(rm.dtype)
            rv *= 1 - self.momentum
            rv += (self.momentum * var * m / max(m - 1, 1)).astype(rv.dtype)
        else:
            mean = self.buffers["running_mean"].astype(x.dtype)
            var = self.buffers["running_var"].astype(x.dtype)
        inv = 1.0 / (var + self.eps) ** 0.5
        xhat = (x - mean[None, :, None, None]) * inv[None, :, None, None]
        self.xhat, self.inv = xhat, inv
        return xhat * gamma[None, :, None, None] + beta[None, :, None, None]

    def backward(self, dy):
        xhat, inv = self.xhat, self.inv
        gamma = self.params["weight"].astype(dy.dtype)
        self.grads["weight"] = (dy * xhat).sum(axis=(0, 2, 3)).astype(self.params["weight"].dtype)
        self.grads["bias"] = dy.sum(axis=(0, 2, 3)).astype(self.params["bias"].dtype)
        dxhat = dy * gamma[None, :, None, None]
        if not self.training:  # statistics are constants in eval mode
            return dxhat * inv[None, :, None, None]
        m = dy.size // self.channels
        s1 = dxhat.sum(axis=(0, 2, 3))[None, :, None, None]
        s2 = (dxhat * xhat).sum(axis=(0, 2, 3))[None, :, None, None]
        dx = (dxhat - s1 / m - xhat * s2 / m) * inv[None, :, None, None]
        self.xhat = None
        return dx

    def extra_repr(self):
        return f"{self.channels}, eps={self.eps}, momentum={self.momentum}"


class SoftmaxCrossEntropy:
    """Mean cross-entropy of softmax(logits) against integer labels; ``backward`` gives dL/dlogits."""

    def forward(self, logits, labels):
        xp = get_backend().xp
        if logits.ndim != 2:
            raise ValueError(f"SoftmaxCrossEntropy expects (N, classes) logits, got {tuple(logits.shape)}")
        if labels.shape != (logits.shape[0],) or labels.dtype.kind not in "iu":
            raise ValueError(f"labels must be ({logits.shape[0]},) integers, got {labels.dtype} {tuple(labels.shape)}")
        if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= logits.shape[1]):
            raise ValueError(f"labels must lie in [0, {logits.shape[1]})")
        z = logits - logits.max(axis=1, keepdims=True)
        logp = z - xp.log(xp.exp(z).sum(axis=1, keepdims=True))
        self.p, self.labels = xp.exp(logp), labels
        return -logp[xp.arange(labels.shape[0]), labels].mean()

    __call__ = forward

    def backward(self):
        xp = get_backend().xp
        d = self.p.copy()
        d[xp.arange(self.labels.shape[0]), self.labels] -= 1
        return d / d.dtype.type(self.labels.shape[0])
