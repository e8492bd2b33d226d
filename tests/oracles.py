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


# --------------------------------------------------------------------------------------------
# Tolerances for float32 results computed twice in different summation orders (blocked GEMMs,
# reductions across ranks, reduce-scatter): derived from the float32 summation error bound.

U32 = 2.0**-24  #: unit roundoff of float32 (round to nearest)
LAMBDA = 8.0    #: probabilistic-bound parameter: each sum fails it with probability <= 2n exp(-32)


def sum_bound(n: int, lam: float = LAMBDA) -> float:
    """Relative error of a float32 sum of ``n`` terms, relative to the sum of their magnitudes.

    Higham & Mary's probabilistic bound (SIAM J. Sci. Comput. 41(5), 2019, Thm 2.4): with
    independent rounding errors, |s_hat - s| <= g(n) * sum|x_i| with g(n) = exp(lam sqrt(n) u +
    n u^2 / (1 - u)) - 1 and probability at least 1 - 2n exp(-lam^2 (1-u)^2 / 2); lam = 8 makes a
    failure of any one sum less likely than 1e-9 for the sizes used here. The worst-case bound
    (n u / (1 - n u)) is sqrt(n)/lam times larger and is never approached by round-to-nearest."""
    return float(np.expm1(lam * np.sqrt(n) * U32 + n * U32 * U32 / (1 - U32)))


def reorder_tolerance(n: int, depth: int) -> float:
    """Normwise relative difference allowed between two float32 evaluations of the same
    computation, ``depth`` chained sums of at most ``n`` terms each, summed in different orders:
    each is within (1 + g(n))^depth - 1 of the exact result, so they are within twice that of
    each other. Relative to the result's largest magnitude (sums of magnitudes, as the bound
    wants, are at least that large, so cancellation only makes this stricter than the bound:
    the headroom of the probabilistic bound over observed errors covers it)."""
    return 2.0 * float(np.expm1(depth * np.log1p(sum_bound(n))))


def longest_sum(model, batch: int) -> tuple[int, int]:
    """(n, depth) of a model's forward + backward pass at ``batch``: n the longest float32 sum any
    layer computes (fan-in of an output, fan-out of an input gradient, or the batch x positions
    a weight gradient sums over), depth the number of chained sums (forward and backward through
    every layer with weights, plus the loss)."""
    from dnnpar.nn.summary import summary

    n, depth, shapes = 1, 1, model.output_shapes()
    for r in summary(model, batch).rows:
        if r.params:
            out = int(np.prod(r.out_shape))
            inn = int(np.prod(shapes[model.inputs_of[r.name][0]]))
            n = max(n, r.macs // out, -(-r.macs // inn), batch * out // r.out_shape[0])
            depth += 2
    return n, depth


def assert_reordered_close(got, want, n: int, depth: int, what: str = "", scale: float | None = None) -> None:
    """``got`` equals ``want`` up to :func:`reorder_tolerance` (n, depth), normwise: relative to
    ``scale``, by default the largest |want|. Where a result may cancel (a sum of terms of both
    signs, such as BatchNorm's (x - mean) s + beta on one element), pass the largest sum of the
    terms' magnitudes instead: the roundings scale with the terms, not with what is left of them."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    if scale is None:
        scale = float(np.max(np.abs(want))) if want.size else 0.0
    err = float(np.max(np.abs(got - want))) if want.size else 0.0
    tol = reorder_tolerance(n, depth)
    assert err <= tol * scale, (f"{what}: max difference {err:.3e} = {err / max(scale, 1e-300):.2e} of the largest "
                                f"magnitude {scale:.3e}, beyond the float32 reordering bound {tol:.2e} "
                                f"(sums of <= {n} terms, {depth} deep)")


def worst_sum_bound(magnitude, terms):
    """Largest error of a float32 sum of ``terms`` products, in any order, blocked or not: the
    worst-case gamma_n = n u / (1 - n u) times the sum of the products' magnitudes (Higham,
    Accuracy and Stability, eq. 3.5), with two more roundings for an alpha scale and a beta * C
    add. Element by element and certain (no probability), for a result against its float64
    oracle; :func:`sum_bound` is the sharper probabilistic one, normwise."""
    nu = (np.asarray(terms, np.float64) + 2) * U32
    return nu / (1 - nu) * np.asarray(magnitude, np.float64)


def assert_sum_close(got, want, magnitude, terms, what="", bound=None, bound_name="float32 summation bound"):
    """``got`` (computed in float32) within :func:`worst_sum_bound` of the float64 ``want``,
    element by element. ``magnitude``: the same sum over |terms| (e.g. |A| @ |B|); ``terms``: the number of
    products each element sums (a scalar or per element). An element that cancels to near zero
    cannot fail by rounding alone; a wrong index, a missing term or an unwritten element does.
    ``bound(magnitude, terms)``: another error bound in place of :func:`worst_sum_bound`."""
    got = np.asarray(got)
    assert got.shape == np.shape(want), f"{what}: shape {got.shape} != {np.shape(want)}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite output (an element left unwritten?)"
    err = np.abs(got.astype(np.float64) - want)
    # + 1e-37: products in float32's subnormal range round absolutely, not relatively
    limit = np.broadcast_to((bound or worst_sum_bound)(magnitude, terms) + 1e-37, err.shape)
    if err.size and not np.all(err <= limit):
        i = np.unravel_index(int(np.argmax(err - limit)), err.shape)
        raise AssertionError(f"{what}: error {err[i]:.3e} at {i} beyond the {bound_name} {limit[i]:.3e}")


# --------------------------------------------------------------------------------------------
# TF32 (tensor-core GEMM, algo="tf32"): operands rounded to 10 mantissa bits, float32 sums.

U_TF32 = 2.0**-11  #: unit roundoff of TF32 rounding to nearest (10 stored mantissa bits)
U_BF16 = 2.0**-8   #: unit roundoff of BF16 rounding to nearest (7 stored mantissa bits)
U_ACC = 2.0**-23   #: float32 accumulation unit, doubled: tensor cores need not round to nearest


def tf32(x):
    """Nearest TF32 value of each float32 (ties away from zero), in float64, computed from the
    significand by frexp, independently of the bit trick dnnpar uses: 11 significant bits.
    Exact for normal float32 values (float32 subnormals keep their absolute grid in the bit trick,
    so they are not compared against this)."""
    m, e = np.frexp(np.asarray(x, np.float64))    # x = m 2^e, 0.5 <= |m| < 1
    s = m * 2.0**11                                # 11 significant bits before the point
    r = np.sign(s) * np.floor(np.abs(s) + 0.5)     # nearest, ties away from zero
    return np.ldexp(r, e - 11)


def tensor_core_gemm_bound(magnitude, terms, u):
    """Largest error of a tensor-core product whose operands are rounded with unit roundoff ``u``
    (TF32: 2^-11, BF16: 2^-8), per element, against the float64 product of the unrounded float32
    operands. Each operand is rounded with relative error <= u, so |ab - fl(a) fl(b)| <=
    (2u + u^2) |a||b|; the rounded products are exact in float32 (11 x 11 or 8 x 8 significant
    bits) and are summed (with C, alpha and beta: K + 2 roundings) with gamma_{K+2} at unit U_ACC,
    relative to sum |fl(a)||fl(b)| <= (1 + u)^2 sum |a||b|. ``magnitude`` = |op(A)| @ |op(B)|
    (plus |beta C|), ``terms`` = K."""
    nu = (np.asarray(terms, np.float64) + 2) * U_ACC
    gamma = nu / (1 - nu)
    return ((2 * u + u**2) + gamma * (1 + u) ** 2) * np.asarray(magnitude, np.float64)


def tf32_gemm_bound(magnitude, terms):
    """:func:`tensor_core_gemm_bound` for TF32 operands."""
    return tensor_core_gemm_bound(magnitude, terms, U_TF32)


def bf16_gemm_bound(magnitude, terms):
    """:func:`tensor_core_gemm_bound` for BF16 operands."""
    return tensor_core_gemm_bound(magnitude, terms, U_BF16)


def assert_tf32_close(got, want, magnitude, terms, what=""):
    """``got`` (a TF32 GEMM) within :func:`tf32_gemm_bound` of the float64 ``want``, per element."""
    assert_sum_close(got, want, magnitude, terms, what, bound=tf32_gemm_bound, bound_name="TF32 GEMM bound")


def assert_bf16_close(got, want, magnitude, terms, what=""):
    """``got`` (a BF16 GEMM) within :func:`bf16_gemm_bound` of the float64 ``want``, per element."""
    assert_sum_close(got, want, magnitude, terms, what, bound=bf16_gemm_bound, bound_name="BF16 GEMM bound")


def bf16(x):
    """Nearest BF16 value of each float32 (ties to even), in float64, from the significand by
    frexp (8 significant bits), independently of dnnpar's bit trick; exact for normal values."""
    m, e = np.frexp(np.asarray(x, np.float64))
    s = np.abs(m) * 2.0**8
    f = np.floor(s)
    r = np.where(s - f > 0.5, f + 1, np.where(s - f < 0.5, f, f + (f % 2)))  # ties to the even one
    return np.sign(m) * np.ldexp(r, e - 8)


# --------------------------------------------------------------------------------------------
# BatchNorm2d (training: batch statistics, biased variance; eval: given statistics), float64.

def batch_norm(x, gamma, beta, eps, mean=None, var=None):
    """(pre-activation y, mean, var, inv) per channel of x (N, C, H, W), all float64; mean / var
    given: eval, else the batch's."""
    x = np.asarray(x, np.float64)
    if mean is None:
        mean, var = x.mean(axis=(0, 2, 3)), x.var(axis=(0, 2, 3))
    mean, var = np.asarray(mean, np.float64), np.asarray(var, np.float64)
    inv = 1.0 / np.sqrt(var + eps)
    c = (None, slice(None), None, None)
    y = (x - mean[c]) * (np.asarray(gamma, np.float64) * inv)[c] + np.asarray(beta, np.float64)[c]
    return y, mean, var, inv


def batch_norm_backward(x, g, gamma, mean, inv, training):
    """(dx, dgamma, dbeta) in float64 for g = dL/d(pre-activation y) of :func:`batch_norm`."""
    x, g = np.asarray(x, np.float64), np.asarray(g, np.float64)
    c = (None, slice(None), None, None)
    xhat = (x - mean[c]) * inv[c]
    dgamma, dbeta = (g * xhat).sum(axis=(0, 2, 3)), g.sum(axis=(0, 2, 3))
    k1 = np.asarray(gamma, np.float64) * inv
    if not training:
        return g * k1[c], dgamma, dbeta
    m = x.size // x.shape[1]
    return k1[c] * (g - dbeta[c] / m - xhat * dgamma[c] / m), dgamma, dbeta


def activation(y, kind):
    """ReLU / ReLU6 (None: identity) of a float64 array; NaN stays NaN."""
    if kind is None:
        return y
    y = np.where(y < 0, 0.0, y)
    return np.where(y > 6, 6.0, y) if kind == "relu6" else y


def activation_mask(y, kind):
    """Where the gradient passes, read from the activated output y (dnnpar.ops.activation)."""
    if kind is None:
        return np.ones(np.shape(y), bool)
    return (y > 0) & (y < 6) if kind == "relu6" else y > 0


# --------------------------------------------------------------------------------------------
# MaxPool2d / AvgPool2d (floor output size; padding: -inf for max, 0 for mean), float64.

def pool_windows(x, k, s, p, pad_value):
    """(N, C, OH, OW, KH*KW) float64 windows of x, taps in row-major order."""
    x = np.asarray(x, np.float64)
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)), constant_values=pad_value)
    oh, ow = out_size(x.shape[2], kh, sh, ph, 1), out_size(x.shape[3], kw, sw, pw, 1)
    taps = [xp[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] for i in range(kh) for j in range(kw)]
    return np.stack(taps, axis=-1)


def pool_divisor(x_shape, k, s, p, count_include_pad):
    """AvgPool2d's divisor per output pixel (1, 1, OH, OW)."""
    if count_include_pad:
        return np.float64(k[0] * k[1])
    return pool_windows(np.ones((1, 1) + tuple(x_shape[2:])), k, s, p, 0.0).sum(axis=-1)


def pool_scatter(x_shape, k, s, p, contrib):
    """dx (float64) from per-window tap contributions (N, C, OH, OW, KH*KW): the adjoint of pool_windows."""
    (kh, kw), (sh, sw), (ph, pw) = k, s, p
    n, c, h, w = x_shape
    oh, ow = contrib.shape[2:4]
    dx = np.zeros((n, c, h + 2 * ph, w + 2 * pw))
    for t in range(kh * kw):
        i, j = divmod(t, kw)
        dx[:, :, i:i + sh * oh:sh, j:j + sw * ow:sw] += contrib[..., t]
    return dx[:, :, ph:ph + h, pw:pw + w]
