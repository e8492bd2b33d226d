"""Float64 oracles written independently of dnnpar's own NumPy references (gather by index)."""
import numpy as np


def out_size(size, k, s, p, d):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def patch_index(x_shape, kh, kw, stride, pad, dil):
    n_, c_, h_, w_ = x_shape
    (sh, sw), (ph, pw), (dh, dw) = stride, pad, dil
    oh_, ow_ = out_size(h_, kh, sh, ph, dh), out_size(w_, kw, sw, pw, dw)
    c, i, j, n, oh, ow = np.meshgrid(np.arange(c_), np.arange(kh), np.arange(kw), np.arange(n_), np.arange(oh_),
                                     np.arange(ow_), indexing="ij")
    h = oh * sh - ph + i * dh
    w = ow * sw - pw + j * dw
    valid = (h >= 0) & (h < h_) & (w >= 0) & (w < w_)
    return (n, c, np.clip(h, 0, h_ - 1), np.clip(w, 0, w_ - 1)), valid, oh_, ow_


def im2col(x, kh, kw, stride, pad, dil):
    idx, valid, oh, ow = patch_index(x.shape, kh, kw, stride, pad, dil)
    cols = np.where(valid, x.astype(np.float64)[idx], 0.0)
    n, c = x.shape[:2]
    return cols.reshape(c * kh * kw, n * oh * ow)


def col2im(cols, x_shape, kh, kw, stride, pad, dil):
    idx, valid, oh, ow = patch_index(x_shape, kh, kw, stride, pad, dil)
    dx = np.zeros(x_shape)
    vals = cols.astype(np.float64).reshape(valid.shape)
    np.add.at(dx, tuple(a[valid] for a in idx), vals[valid])
    return dx


def conv2d(x, w, b, stride, pad, dil):
    o, c, kh, kw = w.shape
    cols = im2col(x, kh, kw, stride, pad, dil)
    n = x.shape[0]
    y = w.astype(np.float64).reshape(o, -1) @ cols
    oh, ow = out_size(x.shape[2], kh, stride[0], pad[0], dil[0]), out_size(x.shape[3], kw, stride[1], pad[1], dil[1])
    y = y.reshape(o, n, oh, ow).transpose(1, 0, 2, 3)
    return y + (0 if b is None else b.astype(np.float64)[None, :, None, None])


def depthwise(x, w, b, stride, pad):
    c, _, kh, kw = w.shape
    n = x.shape[0]
    cols = im2col(x, kh, kw, stride, pad, (1, 1)).reshape(c, kh * kw, -1)
    y = np.einsum("ck,ckp->cp", w.astype(np.float64).reshape(c, -1), cols)
    oh, ow = out_size(x.shape[2], kh, stride[0], pad[0], 1), out_size(x.shape[3], kw, stride[1], pad[1], 1)
    y = y.reshape(c, n, oh, ow).transpose(1, 0, 2, 3)
    return y + (0 if b is None else b.astype(np.float64)[None, :, None, None])


def random_csr(rng, m, k, density, long_row=None):
    """A dense float64 matrix with the given density (some rows empty), optionally one long row."""
    dense = rng.standard_normal((m, k)).astype(np.float32) * (rng.random((m, k)) < density)
    if m > 2:
        dense[1] = 0.0  # an empty row
    if long_row is not None and m > long_row:
        dense[long_row] = rng.standard_normal(k).astype(np.float32)
    return dense
