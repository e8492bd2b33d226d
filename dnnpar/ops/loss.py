"""Softmax + cross-entropy, forward and backward in one op (``cuda/softmax_ce.cu`` on the
cuda / emu backends; the same maths in NumPy on the numpy backend).

``softmax_cross_entropy(logits, labels)`` returns (mean loss as a 0-d backend array, dlogits):
the gradient is written in the same pass as the loss, so the probabilities are never kept and
the caller's backward is free. The mean stays on the device (no host synchronisation per step;
reading it, e.g. ``float(loss)``, is the caller's choice)."""
from __future__ import annotations

import numpy as np

from ..backend import get_backend
from ..nvtx import ranged
from ._common import check_array, i32

THREADS = 128          # a multiple of 32, at most 1024 (the kernel's warp reduction)
MAX_BLOCKS = 65535     # rows stride over gridDim.x


def check_labels(op: str, labels, n: int, classes: int, be):
    """``labels``: (n,) integers of the backend in [0, classes); returned as the backend's int32
    array (one host check of the range: a label out of range would index outside the row)."""
    if not isinstance(labels, be.array_type) or labels.dtype.kind not in "iu":
        raise ValueError(f"{op}: labels must be a ({n},) integer array of the {be.name!r} backend, got "
                         f"{type(labels).__name__} {getattr(labels, 'dtype', '')}")
    if labels.shape != (n,):
        raise ValueError(f"labels must be ({n},) integers, got {labels.dtype} {tuple(labels.shape)}")
    if labels.size and (int(labels.min()) < 0 or int(labels.max()) >= classes):
        raise ValueError(f"labels must lie in [0, {classes})")
    return be.xp.ascontiguousarray(labels, dtype=np.int32)


def softmax_cross_entropy_numpy(logits, labels):
    """The reference (any float dtype; float64 in gives float64 out)."""
    z = logits - logits.max(axis=1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    n = labels.shape[0]
    d = np.exp(logp)
    d[np.arange(n), labels] -= 1
    d /= d.dtype.type(n)
    return -logp[np.arange(n), labels].mean(), d


@ranged("dnnpar.softmax_cross_entropy")
def softmax_cross_entropy(logits, labels):
    """logits (N, C) of the compute dtype, labels (N,) integers in [0, C), N >= 1 ->
    (mean cross-entropy of softmax(logits), dL/dlogits (N, C))."""
    be = get_backend()
    logits = check_array("softmax_cross_entropy", "logits", logits, backend=be)
    if logits.ndim != 2:
        raise ValueError(f"SoftmaxCrossEntropy expects (N, classes) logits, got {tuple(logits.shape)}")
    n, c = logits.shape
    if n == 0 or c == 0:
        raise ValueError(f"SoftmaxCrossEntropy: empty logits {tuple(logits.shape)}")
    labels = check_labels("softmax_cross_entropy", labels, n, c, be)
    if not be.runs_kernels:
        return softmax_cross_entropy_numpy(logits, labels)
    loss = be.empty((n,), np.float32)
    d = be.empty((n, c), np.float32)
    be.launch("softmax_ce.cu", "softmax_ce", (min(n, MAX_BLOCKS),), (THREADS,),
              (logits, labels, loss, d, i32(n), i32(c), np.float32(1.0 / n)))
    return loss.mean(), d
