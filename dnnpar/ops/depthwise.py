"""Depthwise convolution (MobileNet), forward and backward (``cuda/depthwise.cu``).

x (N, C, H, W), w (C, 1, KH, KW): channel c is convolved with its own filter w[c, 0].

On the numpy backend float32 runs on the native kernel ``dnnpar/cpu/depthwise.cpp`` (built at
first use, see :mod:`dnnpar.backend.cpu_native`); the NumPy loops below are the fallback without
a compiler, the float64 path (``dp.precision("float64")``), and what ``NATIVE["use"] = False``
(or ``DNNPAR_NATIVE=0``) selects.
"""
from __future__ import annotations

import numpy as np

from ..backend import cpu_native, get_backend
from ..nvtx import ranged
from ._common import ConvGeometry, check_array, check_count, check_same_dtype, i32, plane_grid
from .activation import activate_, check_activation
from .conv import check_bias, geometry_for_x

#: the native CPU kernel on the numpy backend (tests and benchmarks turn it off to reach the NumPy code)
NATIVE = {"use": True}


def native_library(*arrays):
    """The native kernel library when it takes a numpy-backend call on these operands (NumPy
    float32 arrays, NATIVE["use"] on, the library built here), else None."""
    return cpu_native.takes("depthwise", NATIVE["use"], *arrays)


def depthwise_conv2d_numpy(x, w, bias, g: ConvGeometry):
    out = np.zeros((g.n, g.c, g.oh, g.ow), dtype=np.result_type(x, w))
    for i, j, (oh, ow), (ih, iw) in g.taps():
        out[:, :, oh, ow] += x[:, :, ih, iw] * w[:, 0, i, j][None, :, None, None]
    if bias is not None:
        out += bias[None, :, None, None]
    return out


def depthwise_backward_numpy(x, w, dy, g: ConvGeometry):
    dx = np.zeros(x.shape, dtype=np.result_type(dy, w))
    dw = np.zeros(w.shape, dtype=np.result_type(x, dy))
    for i, j, (oh, ow), (ih, iw) in g.taps():
        d = dy[:, :, oh, ow]
        dx[:, :, ih, iw] += d * w[:, 0, i, j][None, :, None, None]
        dw[:, 0, i, j] = np.einsum("nchw,nchw->c", d, x[:, :, ih, iw])
    return dx, dw


def _geometry(op, x, w, stride, padding, be):
    """(x, w, geometry): x and w as the backend's arrays (DLPack views accepted), checked."""
    w = check_array(op, "w", w, ndim=4, backend=be)
    x, g = geometry_for_x(op, x, w.shape[2], w.shape[3], stride, padding, 1, be)
    if w.shape[0] != g.c or w.shape[1] != 1:
        raise ValueError(f"{op}: w must have shape ({g.c}, 1, KH, KW) for {g.c} input channels, "
                         f"got {tuple(w.shape)}")
    return x, w, g


def _native_geo(g: ConvGeometry):
    return (g.n, g.c, g.h, g.w, g.kh, g.kw, g.oh, g.ow, *g.stride, *g.padding)


def _tail(g: ConvGeometry):
    return tuple(i32(v) for v in (g.n, g.c, g.h, g.w, g.kh, g.kw, g.oh, g.ow, *g.stride, *g.padding))


@ranged("dnnpar.depthwise_conv2d")
def depthwise_conv2d(x, w, bias=None, stride=1, padding=0, activation=None):
    """Depthwise convolution: x (N, C, H, W), w (C, 1, KH, KW), bias (C,) or None -> (N, C, OH, OW),
    float32 on every backend (float64 only inside ``dp.precision("float64")`` on numpy).
    activation: None, "relu" or "relu6" on the biased output (:func:`activation.activate_`; the
    native kernel applies it to each plane as it finishes it, with the same NaN behaviour)."""
    be = get_backend()
    check_activation("depthwise_conv2d", activation)
    x, w, g = _geometry("depthwise_conv2d", x, w, stride, padding, be)
    bias = check_bias("depthwise_conv2d", bias, g.c, be)
    check_same_dtype("depthwise_conv2d", x=x, w=w, bias=bias)
    check_count("depthwise_conv2d", "output (N, C, OH, OW)", (g.n, g.c, g.oh, g.ow))
    if not be.runs_kernels:
        if native_library(x, w, bias) is None:
            return activate_(be.xp, depthwise_conv2d_numpy(x, w, bias, g), activation)
        return cpu_native.depthwise_forward(x, w, bias, be.empty((g.n, g.c, g.oh, g.ow)), _native_geo(g),
                                            activation=activation)
    out = be.empty((g.n, g.c, g.oh, g.ow))
    b = bias if bias is not None else be.xp.zeros(1, np.float32)  # not read: has_bias = 0
    be.launch("depthwise.cu", "depthwise_conv2d", plane_grid("depthwise_conv2d", g.oh * g.ow, g.n * g.c), (256,),
              (x, w, b, i32(bias is not None), out, *_tail(g)))
    return activate_(be.xp, out, activation)


@ranged("dnnpar.depthwise_conv2d_backward")
def depthwise_conv2d_backward(x, w, dy, stride=1, padding=0, need_dx: bool = True):
    """Gradients of :func:`depthwise_conv2d`: (dx or None, dw, db) for dy (N, C, OH, OW)."""
    be = get_backend()
    x, w, g = _geometry("depthwise_conv2d_backward", x, w, stride, padding, be)
    dy = check_array("depthwise_conv2d_backward", "dy", dy, ndim=4, backend=be)
    if tuple(dy.shape) != (g.n, g.c, g.oh, g.ow):
        raise ValueError(f"depthwise_conv2d_backward: dy must have the output's shape {(g.n, g.c, g.oh, g.ow)}, "
                         f"got {tuple(dy.shape)}")
    check_same_dtype("depthwise_conv2d_backward", x=x, w=w, dy=dy)
    db = dy.sum(axis=(0, 2, 3))
    if not be.runs_kernels:
        if native_library(x, w, dy) is None:
            dx, dw = depthwise_backward_numpy(x, w, dy, g)
            return (dx if need_dx else None), dw, db
        dx = be.empty(x.shape) if need_dx else None
        dx, dw = cpu_native.depthwise_backward(x, w, dy, dx, be.empty(w.shape), _native_geo(g))
        return dx, dw, db
    dw = be.empty(w.shape)
    # one block per weight reduces N*OH*OW products: no more warps than there are products
    threads = min(256, max(32, -(-(g.n * g.oh * g.ow) // 32) * 32))
    be.launch("depthwise.cu", "depthwise_backward_weight", (g.c * g.kh * g.kw,), (threads,), (x, dy, dw, *_tail(g)))
    dx = None
    if need_dx:
        dx = be.empty(x.shape)
        be.launch("depthwise.cu", "depthwise_backward_input",
                  plane_grid("depthwise_conv2d_backward", g.h * g.w, g.n * g.c), (256,),
                  (dy, w, dx, *_tail(g)))
    return dx, dw, db
