"""MaxPool2d / AvgPool2d over (N, C, H, W) windows (dnnpar.nn.layers' _Pool layers), forward and
backward, for a validated :class:`ConvGeometry` (the layer's window, stride and padding).

On the numpy backend float32 runs on the native kernel ``dnnpar/cpu/pool.cpp``; the array code
below is the fallback without a compiler, the float64 path, what ``NATIVE["use"] = False`` (or
``DNNPAR_NATIVE=0``) selects, and what the kernel backends (emu, cuda) run. Both compute the same
thing (see pool.cpp's header): max with -inf padding, NaN propagating, the gradient to each
window's first maximum; mean with AvgPool2d's divisor rule.
"""
from __future__ import annotations

import numpy as np

from ..backend import cpu_native, get_backend
from ..nvtx import ranged
from ._common import ConvGeometry

#: the native CPU kernel on the numpy backend (tests and benchmarks turn it off to reach the array code)
NATIVE = {"use": True}


def _native(*arrays):
    return (not get_backend().runs_kernels) and cpu_native.takes("pool", NATIVE["use"], *arrays) is not None


def _geo(g: ConvGeometry):
    return (g.n, g.c, g.h, g.w, g.kh, g.kw, g.oh, g.ow, *g.stride, *g.padding)


def _check(op, x, g: ConvGeometry, shape):
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{op}: expected an array of shape {tuple(shape)} for the geometry, got {tuple(x.shape)}")


def _padded(x, g, value):
    ph, pw = g.padding
    if not (ph or pw):
        return x
    return get_backend().xp.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=value)


@ranged("dnnpar.max_pool2d")
def max_pool2d(x, g: ConvGeometry):
    """(y, saved): the max over each window; ``saved`` is what :func:`max_pool2d_backward` reads."""
    _check("max_pool2d", x, g, (g.n, g.c, g.h, g.w))
    be = get_backend()
    x = be.xp.ascontiguousarray(x)
    if _native(x):
        return cpu_native.max_pool_forward(x, be.empty((g.n, g.c, g.oh, g.ow)), _geo(g)), x
    xp = be.xp
    xpad = _padded(x, g, -np.inf)
    out = None
    for i in range(g.kh):
        for j in range(g.kw):
            v = xpad[g.tap_slices(i, j)]
            out = v.copy() if out is None else xp.maximum(out, v, out=out)
    return out, xpad


@ranged("dnnpar.max_pool2d_backward")
def max_pool2d_backward(saved, y, dy, g: ConvGeometry):
    """dL/dx for dy: each window's gradient to its first maximum (taps in row-major order).
    Forward keeps the (padded) input and the argmax is recovered here, one comparison per tap."""
    _check("max_pool2d_backward", dy, g, (g.n, g.c, g.oh, g.ow))
    be = get_backend()
    xp = be.xp
    dy = xp.ascontiguousarray(dy)
    if saved.shape == (g.n, g.c, g.h, g.w) and _native(saved, y, dy):
        return cpu_native.max_pool_backward(saved, y, dy, be.empty(saved.shape), _geo(g))
    xpad = saved
    (ph, pw), (sh, sw) = g.padding, g.stride
    disjoint = sh >= g.kh and sw >= g.kw  # each input in at most one window: store, don't add
    tiled = disjoint and (g.kh, g.kw) == (sh, sw) and (g.h + 2 * ph, g.w + 2 * pw) == (g.oh * sh, g.ow * sw)
    dx = (xp.empty if tiled else xp.zeros)((g.n, g.c, g.h + 2 * ph, g.w + 2 * pw), dtype=dy.dtype)
    hit, free = xp.empty(y.shape, dtype=bool), xp.empty(y.shape, dtype=bool)
    taken = None
    last = (g.kh - 1, g.kw - 1)
    for i in range(g.kh):
        for j in range(g.kw):
            sl = g.tap_slices(i, j)
            xp.equal(xpad[sl], y, out=hit)
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
    return xp.ascontiguousarray(dx[:, :, ph:ph + g.h, pw:pw + g.w])


def avg_scale(g: ConvGeometry, count_include_pad: bool, dtype):
    """1 / divisor: a scalar, or per output pixel (1, 1, OH, OW) when padding is left out."""
    dtype = np.dtype(dtype)
    if count_include_pad or not any(g.padding):
        return dtype.type(1.0 / (g.kh * g.kw))
    xp = get_backend().xp
    ph, pw = g.padding
    inside = xp.zeros((1, 1, g.h + 2 * ph, g.w + 2 * pw), dtype=dtype)
    inside[:, :, ph:ph + g.h, pw:pw + g.w] = 1
    count = sum(inside[g.tap_slices(i, j)] for i in range(g.kh) for j in range(g.kw))
    return (1.0 / count).astype(dtype)  # every window overlaps the image: count >= 1


@ranged("dnnpar.avg_pool2d")
def avg_pool2d(x, g: ConvGeometry, count_include_pad: bool = True):
    """The mean over each window (``count_include_pad``: zero padding counts toward the divisor)."""
    _check("avg_pool2d", x, g, (g.n, g.c, g.h, g.w))
    be = get_backend()
    x = be.xp.ascontiguousarray(x)
    if _native(x):
        return cpu_native.avg_pool_forward(x, be.empty((g.n, g.c, g.oh, g.ow)), _geo(g), count_include_pad)
    xpad = _padded(x, g, 0.0)
    out = None
    for i in range(g.kh):
        for j in range(g.kw):
            v = xpad[g.tap_slices(i, j)]
            out = v.copy() if out is None else out + v
    return out * avg_scale(g, count_include_pad, x.dtype)


@ranged("dnnpar.avg_pool2d_backward")
def avg_pool2d_backward(dy, g: ConvGeometry, count_include_pad: bool = True):
    """dL/dx of :func:`avg_pool2d` for dy."""
    _check("avg_pool2d_backward", dy, g, (g.n, g.c, g.oh, g.ow))
    be = get_backend()
    xp = be.xp
    dy = xp.ascontiguousarray(dy)
    if _native(dy):
        return cpu_native.avg_pool_backward(dy, be.empty((g.n, g.c, g.h, g.w)), _geo(g), count_include_pad)
    ph, pw = g.padding
    dx = xp.zeros((g.n, g.c, g.h + 2 * ph, g.w + 2 * pw), dtype=dy.dtype)
    share = dy * avg_scale(g, count_include_pad, dy.dtype)
    for i in range(g.kh):
        for j in range(g.kw):
            dx[g.tap_slices(i, j)] += share
    return xp.ascontiguousarray(dx[:, :, ph:ph + g.h, pw:pw + g.w])
