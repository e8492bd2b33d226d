"""BatchNorm2d over (N, C, H, W), forward (training: batch statistics; eval: given ones) and
backward, with an optional fused ReLU / ReLU6 (:mod:`dnnpar.ops.activation`).

On the numpy backend float32 runs on the native kernel ``dnnpar/cpu/norm.cpp`` (statistics in
float64 accumulators, one pass writing y, a two-pass backward; see its header for the error
bound); the array code below is the fallback without a compiler, the float64 path
(``dp.precision("float64")``), what ``NATIVE["use"] = False`` (or ``DNNPAR_NATIVE=0``) selects,
and what the kernel backends (emu, cuda) run.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..backend import cpu_native, get_backend
from ..nvtx import ranged
from .activation import activate_, activation_grad, check_activation

#: the native CPU kernel on the numpy backend (tests and benchmarks turn it off to reach the array code)
NATIVE = {"use": True}


@dataclass
class BatchStats:
    """What :func:`batch_norm` used and backward needs: per-channel mean, (biased) variance and
    1 / sqrt(var + eps) -- float64 from the native kernel, else the input's dtype."""
    mean: object
    var: object
    inv: object


def _check(op, x, weight, bias):
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"{op}: x must be (N, C, H, W), got shape {tuple(getattr(x, 'shape', ()))}")
    c = x.shape[1]
    for name, a in (("weight", weight), ("bias", bias)):
        if a is not None and tuple(a.shape) != (c,):
            raise ValueError(f"{op}: {name} must have shape ({c},) for {c} channels, got {tuple(a.shape)}")
    if x.dtype.kind != "f" or any(a is not None and a.dtype != x.dtype for a in (weight, bias)):
        raise TypeError(f"{op}: x, weight and bias must share one float dtype, got x {x.dtype}, weight "
                        f"{weight.dtype}" + ("" if bias is None else f", bias {bias.dtype}"))


@ranged("dnnpar.batch_norm")
def batch_norm(x, weight, bias, mean=None, var=None, eps: float = 1e-5, training: bool = True, activation=None):
    """y = act(weight (x - mean) / sqrt(var + eps) + bias) per channel of x (N, C, H, W).
    ``training``: mean and var are the batch's (biased variance; ``mean`` / ``var`` not given);
    else the given (C,) ones (the running averages). Returns (y, :class:`BatchStats`)."""
    op = "batch_norm"
    _check(op, x, weight, bias)
    check_activation(op, activation)
    if training != (mean is None and var is None) or (mean is None) != (var is None):
        raise ValueError(f"{op}: pass mean and var exactly when not training (training={training})")
    c = x.shape[1]
    if mean is not None and (tuple(mean.shape) != (c,) or tuple(var.shape) != (c,)):
        raise ValueError(f"{op}: mean and var must have shape ({c},), got {tuple(mean.shape)}, {tuple(var.shape)}")
    be = get_backend()
    xp = be.xp
    x = xp.ascontiguousarray(x)
    if not be.runs_kernels and cpu_native.takes("norm", NATIVE["use"], x, weight, bias) is not None:
        st = BatchStats(np.empty(c), np.empty(c), np.empty(c))
        if not training:
            st.mean[:], st.var[:] = be.to_numpy(mean), be.to_numpy(var)
        y = cpu_native.batch_norm_forward(x, np.ascontiguousarray(weight), np.ascontiguousarray(bias), st.mean,
                                          st.var, st.inv, be.empty(x.shape), eps, training, activation)
        return y, st
    axes = (0, 2, 3)
    if training:
        mean, var = x.mean(axis=axes), x.var(axis=axes)
    else:
        mean, var = mean.astype(x.dtype), var.astype(x.dtype)
    inv = 1.0 / (var + x.dtype.type(eps)) ** 0.5
    y = (x - mean[None, :, None, None]) * inv[None, :, None, None]
    y *= weight[None, :, None, None]
    y += bias[None, :, None, None]
    return activate_(xp, y, activation), BatchStats(mean, var, inv)


@ranged("dnnpar.batch_norm_backward")
def batch_norm_backward(x, y, dy, weight, stats: BatchStats, training: bool = True, activation=None,
                        need_dx: bool = True):
    """Gradients of :func:`batch_norm` for dy: (dx or None, dweight, dbias). ``y``: its output
    (read for the activation's mask; may be None without one); ``stats``: its statistics. In
    training dx includes the gradient through the batch statistics; in eval they are constants."""
    op = "batch_norm_backward"
    _check(op, x, weight, None)
    check_activation(op, activation)
    if tuple(dy.shape) != tuple(x.shape) or (activation is not None and (y is None or tuple(y.shape) != tuple(x.shape))):
        raise ValueError(f"{op}: dy (and y, with an activation) must have x's shape {tuple(x.shape)}")
    be = get_backend()
    xp = be.xp
    x, dy = xp.ascontiguousarray(x), xp.ascontiguousarray(dy)
    c = x.shape[1]
    if (not be.runs_kernels and isinstance(stats.inv, np.ndarray) and stats.inv.dtype == np.float64
            and cpu_native.takes("norm", NATIVE["use"], x, dy, weight, y if activation else None) is not None):
        dx = be.empty(x.shape) if need_dx else None
        return cpu_native.batch_norm_backward(x, y, dy, np.ascontiguousarray(weight), stats.mean, stats.inv, dx,
                                              be.empty((c,)), be.empty((c,)), training, activation)
    t = x.dtype.type
    mean, inv = stats.mean.astype(x.dtype), stats.inv.astype(x.dtype)
    g = activation_grad(xp, dy, y, activation)
    xhat = (x - mean[None, :, None, None]) * inv[None, :, None, None]
    axes = (0, 2, 3)
    dweight, dbias = (g * xhat).sum(axis=axes), g.sum(axis=axes)
    if not need_dx:
        return None, dweight, dbias
    k = (weight * inv)[None, :, None, None]
    if not training:  # statistics are constants in eval mode
        return g * k, dweight, dbias
    m = t(x.size // c)
    dx = g - (dbias / m)[None, :, None, None]
    dx -= xhat * (dweight / m)[None, :, None, None]
    dx *= k
    return dx, dweight, dbias
