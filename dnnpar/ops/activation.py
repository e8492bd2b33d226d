"""Activations a producing op applies to its own output (a fused epilogue): conv + bias + ReLU,
Linear + ReLU, BatchNorm + ReLU6. One definition of each kind, used by every op and layer that
fuses one, so a fused chain computes exactly what the separate ReLU / ReLU6 layer would.

Both are piecewise-linear in x with the gradient passing where the output lies strictly inside
the activation's range, so the backward mask is read from the output y: y > 0 (ReLU), 0 < y < 6
(ReLU6) -- the same as PyTorch's masks on x. NaN stays NaN forward and gets a zero gradient,
as in the unfused layers.
"""
from __future__ import annotations

import numpy as np

#: kind -> (low, high) clip bounds; None: unbounded
ACTIVATIONS = {"relu": (0.0, None), "relu6": (0.0, 6.0)}


def check_activation(op: str, activation):
    """None or one of :data:`ACTIVATIONS`; anything else is a ValueError naming the choices."""
    if activation is not None and activation not in ACTIVATIONS:
        raise ValueError(f"{op}: activation must be None or one of {', '.join(map(repr, ACTIVATIONS))}, "
                         f"got {activation!r}")
    return activation


def activate_(xp, y, activation):
    """Apply ``activation`` to y in place (y is returned); None leaves y as it is."""
    if activation is None:
        return y
    lo, hi = ACTIVATIONS[activation]
    t = y.dtype.type
    xp.maximum(y, t(lo), out=y)
    if hi is not None:
        xp.minimum(y, t(hi), out=y)
    return y


#: smallest array (elements) the native elementwise passes take: below it a ctypes call and the
#: thread team cost more than NumPy's passes
NATIVE_MIN_ELEMENTS = {"size": 1 << 15}


def _native_eltwise(xp, *arrays) -> bool:
    return xp is np and arrays[0].size >= NATIVE_MIN_ELEMENTS["size"] and all(
        a.dtype == np.float32 for a in arrays)


def activation_grad(xp, dy, y, activation):
    """dL/d(pre-activation) from dL/dy and the activated output y (dy itself for None). Large
    float32 NumPy arrays take one native pass (dnnpar/cpu/eltwise.cpp), the same bits."""
    if activation is None:
        return dy
    if _native_eltwise(xp, dy, y):
        from ..backend import cpu_native

        dx = np.empty_like(dy)
        if cpu_native.act_grad(dy, y, dx, activation):
            return dx
    lo, hi = ACTIVATIONS[activation]
    t = y.dtype.type
    mask = y > t(lo)
    if hi is not None:
        mask &= y < t(hi)
    return pass_where(xp, mask, dy)


def pass_where(xp, mask, dy):
    """dy where ``mask`` (a bool array of dy's shape), +0.0 elsewhere: ``where(mask, dy, 0)`` bit
    for bit, so a NaN or inf of dy outside the mask gives 0 (dy * mask would give NaN, and -0.0).
    On NumPy, float32 / float64 dy: a bitwise AND of dy's bits with the mask widened to all-ones
    words. NumPy's where takes a branch per element: 920 us against 150 us for a ReLU mask of
    16x16x32x32 (half the entries set, at random)."""
    if xp is np and dy.dtype in (np.float32, np.float64) and mask.dtype == np.bool_ and mask.shape == dy.shape:
        word = np.int32 if dy.dtype == np.float32 else np.int64
        bits = np.negative(mask.view(np.int8), dtype=word)  # True -> -1: every bit set
        np.bitwise_and(dy.view(word), bits, out=bits)
        return bits.view(dy.dtype)
    return xp.where(mask, dy, dy.dtype.type(0))


def add_activate(xp, a, b, activation=None):
    """activation(a + b) as a new array (a and b of one shape): with an activation, one native
    pass for large float32 NumPy arrays (dnnpar/cpu/eltwise.cpp; at 64 x 16 x 32 x 32, 2 cores,
    2026-12-03: 0.20 against NumPy's sum and clip 3.1 ms, the second temporary's pages mapped
    afresh), else NumPy's sum and :func:`activate_` on it (the same bits: one float32 rounding of
    each sum, then the clip). A plain sum stays NumPy's (0.16 against the native 0.19 ms there)."""
    if activation is not None and _native_eltwise(xp, a, b) and a.shape == b.shape:
        from ..backend import cpu_native

        y = np.empty_like(a)
        if cpu_native.add_act(a, b, y, activation):
            return y
    return activate_(xp, a + b, activation)
