"""Convolution layers: Conv2d (grouped too: AlexNet's two towers, and depthwise with any channel
multiplier), DepthwiseConv2d, and the 1x1 pointwise convolution as a GEMM."""
from __future__ import annotations

import numpy as np

from .. import ops
from ..backend import get_backend
from ..ops._common import conv_out_size
from ..ops.activation import activation_grad
from .base import Layer, he_normal
from .layers import _check_bool, check_sizes, window_args

# A layer keeps its forward im2col matrix for the backward pass up to this size (LeNet-5's are
# 1-8 MB at batch 64); larger ones are rebuilt rather than held through the whole forward pass.
KEEP_COLS_BYTES = 32 << 20


def _conv_shape(layer, in_shape, in_channels: int, out_channels: int, dilation) -> tuple:
    """(C, H, W) -> (O, OH, OW) for a convolution layer with kernel_size / stride / padding."""
    name = type(layer).__name__
    c, h, w = in_shape
    if c != in_channels:
        raise ValueError(f"{name} expects {in_channels} input channels, the previous layer gives {c}")
    (kh, kw), (sh, sw), (ph, pw) = layer.kernel_size, layer.stride, layer.padding
    return (out_channels, conv_out_size(name, h, kh, sh, ph, dilation[0], "height"),
            conv_out_size(name, w, kw, sw, pw, dilation[1], "width"))


class Conv2d(Layer):
    """x (N, C, H, W) -> (N, O, OH, OW). ``groups`` splits channels into independent towers
    (input and output channels must divide by it). ``groups == in_channels`` is a depthwise
    convolution with O / C filters per channel (output channel o reads input channel
    o // (O / C)); without dilation it runs on the depthwise kernel, other groupings as one
    convolution per group. ``algo``: "im2col" or "direct" (forward; the backward pass is GEMM +
    col2im) or "implicit_gemm" (forward and backward as implicit GEMMs, all groups in one launch).
    A following ReLU / ReLU6 is absorbed when a Graph fuses it (``absorbs``): on the numpy backend
    it runs in the native epilogue with the bias, and its backward mask in the pass that lays dy out
    for the GEMMs (:func:`dnnpar.ops.conv2d`, :func:`dnnpar.ops.conv2d_backward`); implicit_gemm
    applies it in its kernel epilogue."""

    absorbs = ("relu", "relu6")

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, algo: str = "im2col", seed: int = 0):
        super().__init__()
        check_sizes("Conv2d", in_channels=in_channels, out_channels=out_channels, groups=groups)
        if in_channels % groups or out_channels % groups:
            raise ValueError(f"Conv2d: {in_channels} in / {out_channels} out channels do not split into {groups} groups")
        if algo not in ops.conv.ALGOS:
            raise ValueError(f"Conv2d: unknown algo {algo!r}: one of {', '.join(ops.conv.ALGOS)}")
        self.in_channels, self.out_channels, self.groups, self.algo = in_channels, out_channels, groups, algo
        self.bias = _check_bool("Conv2d", "bias", bias)
        self.kernel_size, self.stride, self.padding, self.dilation = window_args("Conv2d", kernel_size, stride, padding,
                                                                                 dilation)
        kh, kw = self.kernel_size
        fan_in = in_channels // groups * kh * kw
        rng = np.random.default_rng(seed)
        be = get_backend()
        self.params["weight"] = be.asarray(he_normal(rng, (out_channels, in_channels // groups, kh, kw), fan_in))
        if bias:
            self.params["bias"] = be.xp.zeros(out_channels, dtype=np.float32)

    @property
    def _depthwise(self) -> bool:
        """Runs on the depthwise kernel: one group per input channel, no dilation."""
        return self.groups > 1 and self.groups == self.in_channels and self.dilation == (1, 1)

    def _spread(self, x):
        """x with each input channel repeated for its O / C filters: (N, O, H, W)."""
        m = self.out_channels // self.in_channels
        return x if m == 1 else get_backend().xp.repeat(x, m, axis=1)

    def forward(self, x):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"Conv2d expects (N, {self.in_channels}, H, W) input, got {tuple(x.shape)}")
        self.x, self.cols = x, None
        y = self._forward(x)
        self.y = y if self.activation else None  # the backward's mask is read from it
        return y

    def _forward(self, x):
        w, b = self.params["weight"], self.params.get("bias")
        if self._depthwise:
            return ops.depthwise_conv2d(self._spread(x), w, b, self.stride, self.padding, activation=self.activation)
        y, cols = ops.conv2d(x, w, b, self.stride, self.padding, self.dilation, self.algo, return_cols=True,
                             groups=self.groups, activation=self.activation)
        if cols is not None and cols.nbytes <= KEEP_COLS_BYTES and self.training:
            self.cols = cols  # the backward pass's dW GEMM reuses it instead of a second im2col
        return y

    def backward(self, dy):
        x, w = self.x, self.params["weight"]
        kw = dict(stride=self.stride, padding=self.padding, dilation=self.dilation)
        act, y = self.activation, self.y
        self.y = None
        if act and self.groups > 1:  # groups == 1: conv2d_backward masks dy
            dy, act = activation_grad(get_backend().xp, dy, y, act), None
        if self._depthwise:
            dx, dw, db = ops.depthwise_conv2d_backward(self._spread(x), w, dy, self.stride, self.padding,
                                                       need_dx=self.need_dx)
            m = self.out_channels // self.in_channels
            if dx is not None and m > 1:  # each input channel fed m filters: sum their gradients
                n, _, h, wd = x.shape
                dx = dx.reshape(n, self.in_channels, m, h, wd).sum(axis=2)
        else:  # ops loop over groups (im2col / direct) or take them in one launch (implicit_gemm)
            dx, dw, db = ops.conv2d_backward(x, w, dy, need_dx=self.need_dx, cols=self.cols, groups=self.groups,
                                             algo=self.algo, activation=act, y=y, **kw)
        self._set_grads(dw, db)
        self.x = self.cols = None
        return dx

    def output_shape(self, in_shape):
        return _conv_shape(self, in_shape, self.in_channels, self.out_channels, self.dilation)

    def macs(self, in_shape):
        _, oh, ow = self.output_shape(in_shape)
        kh, kw = self.kernel_size
        return self.out_channels * oh * ow * (self.in_channels // self.groups) * kh * kw

    def extra_repr(self):
        s = f"{self.in_channels}, {self.out_channels}, kernel={self.kernel_size}, stride={self.stride}, padding={self.padding}"
        return s + (f", groups={self.groups}" if self.groups > 1 else "") + ("" if "bias" in self.params else ", bias=False")


class PointwiseConv2d(Conv2d):
    """1x1 convolution (MobileNet's pointwise layers): a Conv2d with a 1x1 kernel, computed by the
    same op (:func:`dnnpar.ops.conv2d`: on the numpy backend the tiled direct kernel, one GEMM-like
    pass with no im2col copy), so an imported 1x1 Conv2d gives the same bits."""

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, seed: int = 0):
        super().__init__(in_channels, out_channels, 1, bias=bias, seed=seed)


class DepthwiseConv2d(Layer):
    """Each channel convolved with its own KH x KW filter (MobileNet)."""

    def __init__(self, channels: int, kernel_size, stride=1, padding=0, bias: bool = True, seed: int = 0):
        super().__init__()
        check_sizes("DepthwiseConv2d", channels=channels)
        self.channels, self.bias = channels, _check_bool("DepthwiseConv2d", "bias", bias)
        self.kernel_size, self.stride, self.padding, _ = window_args("DepthwiseConv2d", kernel_size, stride, padding)
        kh, kw = self.kernel_size
        be = get_backend()
        self.params["weight"] = be.asarray(he_normal(np.random.default_rng(seed), (channels, 1, kh, kw), kh * kw))
        if bias:
            self.params["bias"] = be.xp.zeros(channels, dtype=np.float32)

    def forward(self, x):
        self.x = x
        return ops.depthwise_conv2d(x, self.params["weight"], self.params.get("bias"), self.stride, self.padding)

    def backward(self, dy):
        dx, dw, db = ops.depthwise_conv2d_backward(self.x, self.params["weight"], dy, self.stride, self.padding,
                                                   need_dx=self.need_dx)
        self._set_grads(dw, db)
        self.x = None
        return dx

    def output_shape(self, in_shape):
        return _conv_shape(self, in_shape, self.channels, self.channels, (1, 1))

    def macs(self, in_shape):
        c, oh, ow = self.output_shape(in_shape)
        return c * oh * ow * self.kernel_size[0] * self.kernel_size[1]

    def extra_repr(self):
        return f"{self.channels}, kernel={self.kernel_size}, stride={self.stride}, padding={self.padding}"
