"""MaxPool2d / AvgPool2d on the native kernel dnnpar/cpu/pool.cpp and the NumPy fallback
(dnnpar.ops.pool) against float64 oracles (tests/oracles.py), through the layers."""
import numpy as np
import pytest

import dnnpar as dp
import dnnpar.ops.pool as P
import oracles
from oracles import assert_sum_close
from dnnpar import nn
from dnnpar.backend import cpu_native

# (N, C, H, W), kernel, stride, padding: size 1, primes, overlapping / disjoint / gapped windows,
# padding up to window - 1, MobileNet's and LeNet's shapes; the last ones run on several threads
CASES = [((1, 1, 1, 1), 1, 1, 0), ((1, 1, 2, 2), 2, 2, 1), ((2, 3, 7, 5), 3, 2, 1), ((1, 5, 13, 11), 2, 2, 0),
         ((3, 2, 9, 9), 3, 1, 2), ((2, 7, 8, 12), (2, 3), (3, 1), (1, 2)), ((1, 3, 11, 7), 5, 4, 0),
         ((2, 3, 10, 11), 2, 3, 0), ((2, 2, 9, 8), (3, 2), (3, 2), 0),  # disjoint windows: gapped, tiling
         ((16, 6, 28, 28), 2, 2, 0), ((4, 17, 31, 29), 3, 2, 1)]
IDS = [f"{'x'.join(map(str, s))}-k{k}s{st}p{p}" for s, k, st, p in CASES]


def pr(v):
    return (v, v) if isinstance(v, int) else v


@pytest.fixture(params=["native", "fallback"])
def path(request, monkeypatch):
    if request.param == "native":
        if cpu_native.library("pool") is None:
            pytest.skip(f"native pool kernel unavailable: {cpu_native.unavailable_reason('pool')}")
    else:
        monkeypatch.setitem(P.NATIVE, "use", False)
        for f in ("max_pool_forward", "max_pool_backward", "avg_pool_forward", "avg_pool_backward"):
            monkeypatch.setattr(cpu_native, f, lambda *a, **k: pytest.fail("native kernel ran with NATIVE off"))
    with dp.use_backend("numpy"):
        yield request.param


def data(rng, shape, ties):
    x = rng.standard_normal(shape).astype(np.float32)
    if ties:  # few distinct values: windows with several maxima (the first one gets the gradient)
        x = np.round(x).astype(np.float32)
    return x


@pytest.mark.parametrize("ties", [False, True], ids=["distinct", "ties"])
@pytest.mark.parametrize("shape, k, s, p", CASES, ids=IDS)
def test_max_pool(path, shape, k, s, p, ties, rng):
    k, s, p = pr(k), pr(s), pr(p)
    x = data(rng, shape, ties)
    layer = nn.MaxPool2d(k, s, p)
    y = layer.forward(x)
    win = oracles.pool_windows(x, k, s, p, -np.inf)
    assert np.array_equal(y, win.max(axis=-1)), "the max is exact"
    dy = rng.standard_normal(y.shape).astype(np.float32)
    first = np.argmax(win == win.max(axis=-1, keepdims=True), axis=-1)
    hit = np.arange(win.shape[-1]) == first[..., None]
    want = oracles.pool_scatter(shape, k, s, p, dy[..., None] * hit)
    mag = oracles.pool_scatter(shape, k, s, p, np.abs(dy)[..., None] * hit)
    assert_sum_close(layer.backward(dy), want, mag, k[0] * k[1], "dx")  # <= KH*KW windows meet at an input


@pytest.mark.parametrize("include_pad", [True, False], ids=["incl", "excl"])
@pytest.mark.parametrize("shape, k, s, p", CASES, ids=IDS)
def test_avg_pool(path, shape, k, s, p, include_pad, rng):
    k, s, p = pr(k), pr(s), pr(p)
    x = data(rng, shape, False)
    layer = nn.AvgPool2d(k, s, p, count_include_pad=include_pad)
    y = layer.forward(x)
    win = oracles.pool_windows(x, k, s, p, 0.0)
    div = oracles.pool_divisor(shape, k, s, p, include_pad)
    taps = k[0] * k[1]  # a sum of <= KH*KW terms, then the float32 scale (two roundings in the bound)
    assert_sum_close(y, win.sum(axis=-1) / div, np.abs(win).sum(axis=-1) / div, taps, "y")
    dy = rng.standard_normal(y.shape).astype(np.float32)
    share = np.broadcast_to((dy / div)[..., None], win.shape)
    inside = oracles.pool_windows(np.ones(shape), k, s, p, 0.0)  # padding taps write nothing
    want = oracles.pool_scatter(shape, k, s, p, share * inside)
    mag = oracles.pool_scatter(shape, k, s, p, np.abs(share) * inside)
    assert_sum_close(layer.backward(dy), want, mag, taps, "dx")


def test_max_pool_nan(path):
    """A NaN in a window gives NaN (np.maximum); its window sends no gradient to the others
    (none equals NaN), and a NaN dy spreads over its window as dy * mask does."""
    x = np.arange(16, dtype=np.float32).reshape(1, 1, 4, 4)
    x[0, 0, 0, 1] = np.nan
    layer = nn.MaxPool2d(2)
    y = layer.forward(x)
    assert np.isnan(y[0, 0, 0, 0]) and y[0, 0, 1, 1] == 15
    dy = np.ones_like(y)
    dy[0, 0, 1, 1] = np.nan
    dx = layer.backward(dy)
    assert np.all(dx[0, 0, :2, :2] == 0) and np.all(np.isnan(dx[0, 0, 2:, 2:]))
    assert dx[0, 0, 1, 3] == 1 and dx[0, 0, 3, 1] == 1 and dx.sum(where=~np.isnan(dx)) == 2


def test_native_does_not_depend_on_threads(rng):
    if cpu_native.library("pool") is None:
        pytest.skip("native pool kernel unavailable")
    x = rng.standard_normal((8, 16, 33, 31)).astype(np.float32)
    geo = (8, 16, 33, 31, 3, 3, 16, 15, 2, 2, 0, 0)
    runs = []
    for t in (1, 2, 3):
        y = cpu_native.max_pool_forward(x, np.full((8, 16, 16, 15), np.nan, np.float32), geo, threads=t)
        dy = np.ones_like(y)
        dx = cpu_native.max_pool_backward(x, y, dy, np.full_like(x, np.nan), geo, threads=t)
        a = cpu_native.avg_pool_forward(x, np.full_like(y, np.nan), geo, False, threads=t)
        da = cpu_native.avg_pool_backward(dy, np.full_like(x, np.nan), geo, False, threads=t)
        runs.append((y, dx, a, da))
    assert all(np.array_equal(u, v) for r in runs[1:] for u, v in zip(runs[0], r))


def test_native_guards():
    if cpu_native.library("pool") is None:
        pytest.skip("native pool kernel unavailable")
    x = np.zeros((1, 1, 4, 4), np.float32)
    with pytest.raises(ValueError, match="native max_pool2d: y must be a writeable C-contiguous float32"):
        cpu_native.max_pool_forward(x, np.zeros((1, 1, 3, 3), np.float32), (1, 1, 4, 4, 2, 2, 2, 2, 2, 2, 0, 0))
    with pytest.raises(ValueError, match="avg_pool2d: expected an array of shape"):
        g = nn.AvgPool2d(2).geometry((1, 1, 4, 4))
        with dp.use_backend("numpy"):
            P.avg_pool2d(np.zeros((1, 2, 4, 4), np.float32), g)


@pytest.mark.parametrize("k, s, p", [(3, 1, 1), (3, 2, 1), (2, 1, 1), ((2, 3), (1, 2), (1, 1))])
def test_max_pool_of_minus_infinity_matches_the_fallback(k, s, p, rng):
    """Windows whose real taps are all -inf: the maximum is -inf and the gradient goes to the first
    tap equal to it in row-major order, a padding tap (the gradient is dropped) where one comes
    first. The native row-at-a-time kernel and the NumPy code agree bit for bit (small-integer
    gradients, whose sums where windows overlap are exact in any order), ties and a NaN included."""
    if cpu_native.library("pool") is None:
        pytest.skip("native pool kernel unavailable")
    k, s, p = pr(k), pr(s), pr(p)
    x = np.round(rng.standard_normal((2, 3, 9, 10))).astype(np.float32)
    x[:, :, :4, :5] = -np.inf
    x[0, 1, 5:, 6:] = -np.inf
    got = {}
    for use in (True, False):
        with dp.use_backend("numpy"):
            P.NATIVE["use"] = use
            try:
                layer = nn.MaxPool2d(k, s, p)
                y = layer.forward(x)
                dy = rng.integers(-4, 5, y.shape).astype(np.float32) if use else got[True][2]  # sums exact in any order
                dy[0, 0, 0, 0] = np.nan
                got[use] = (y, layer.backward(dy), dy)
            finally:
                P.NATIVE["use"] = True
    assert np.isneginf(got[True][0]).any()
    for a, b in zip(got[True][:2], got[False][:2]):
        np.testing.assert_array_equal(a, b)


# "same" geometries (stride 1, output the input's size) with rows under 32: the native kernel's
# flat form (each tap one loop over the whole plane); one 32 wide runs the row form
SAME = [((3, 4, 8, 8), 3, 1), ((2, 3, 7, 5), 5, 2), ((1, 2, 9, 6), (3, 1), (1, 0)), ((2, 2, 1, 1), 3, 1),
        ((1, 2, 31, 31), 3, 1), ((1, 2, 5, 32), 3, 1), ((2, 3, 6, 7), (1, 3), (0, 1))]


def _avg_scale(shape, k, p, include_pad):
    """The native kernel's float32 scale of each output: 1 / (KH*KW) rounded once, or 1 / the taps
    inside the image in float32."""
    if include_pad or tuple(p) == (0, 0):
        return np.float32(1.0 / (k[0] * k[1]))
    return np.float32(1) / oracles.pool_divisor(shape, k, (1, 1), p, False).astype(np.float32)


def avg_forward_in_row_order(x, k, p, include_pad):
    """AvgPool of a "same" stride-1 geometry in float32, each output's in-image taps added in
    row-major order, then scaled (the native kernel's order and rounding)."""
    (kh, kw), (ph, pw) = k, p
    h, w = x.shape[2:]
    y = np.zeros(x.shape, np.float32)
    for i in range(kh):
        for j in range(kw):
            r0, r1, c0, c1 = max(0, ph - i), min(h, h + ph - i), max(0, pw - j), min(w, w + pw - j)
            if r0 < r1 and c0 < c1:
                y[:, :, r0:r1, c0:c1] += x[:, :, r0 - ph + i:r1 - ph + i, c0 - pw + j:c1 - pw + j]
    return (y * _avg_scale(x.shape, k, p, include_pad)).astype(np.float32)


def avg_backward_in_row_order(dy, k, p, include_pad):
    """AvgPool's dx for a "same" stride-1 geometry in float32, summed in the native row form's
    order (outputs by row, then taps in row-major order, each a whole row of columns)."""
    (kh, kw), (ph, pw) = k, p
    n, c, h, w = dy.shape
    share = (dy * _avg_scale(dy.shape, k, p, include_pad)).astype(np.float32)
    dx = np.zeros(dy.shape, np.float32)
    for oh in range(h):
        for i in range(kh):
            ih = oh - ph + i
            if not 0 <= ih < h:
                continue
            for j in range(kw):
                lo, hi = max(0, pw - j), min(w, w + pw - j)
                if lo < hi:
                    dx[:, :, ih, lo - pw + j:hi - pw + j] += share[:, :, oh, lo:hi]
    return dx


@pytest.mark.parametrize("shape, k, p", SAME, ids=[f"{'x'.join(map(str, s))}-k{k}p{p}" for s, k, p in SAME])
def test_same_size_pooling_bit_for_bit(shape, k, p, rng):
    """Stride-1 pooling whose output has the input's size: the native kernel (the flat form for
    rows under 32 columns, the row form at 32) gives MaxPool's bits as the NumPy code does, and
    AvgPool's forward and dx (padding counted or not) bit for bit as float32 sums in the row
    form's order (the NumPy code adds and scales in another order), NaN, +-inf and -0.0 in x and
    dy included."""
    if cpu_native.library("pool") is None:
        pytest.skip("native pool kernel unavailable")
    k, p = pr(k), pr(p)
    x = rng.standard_normal(shape).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    for a in (x, dy):
        flat = a.reshape(-1)
        flat[rng.integers(0, flat.size, 4)] = [np.nan, np.inf, -np.inf, -0.0]
    got = {}
    for use in (True, False):
        with dp.use_backend("numpy"):
            P.NATIVE["use"] = use
            try:
                mx = nn.MaxPool2d(k, 1, p).forward(x)
                avg = []
                for include_pad in (True, False):
                    layer = nn.AvgPool2d(k, 1, p, count_include_pad=include_pad)
                    avg += [layer.forward(x), layer.backward(dy)]
                got[use] = [mx, *avg]
            finally:
                P.NATIVE["use"] = True
    assert got[True][0].shape == x.shape
    np.testing.assert_array_equal(got[True][0], got[False][0], err_msg="max")
    for n, include_pad in ((1, True), (3, False)):
        np.testing.assert_array_equal(got[True][n], avg_forward_in_row_order(x, k, p, include_pad),
                                      err_msg=f"avg, padding counted: {include_pad}")
        np.testing.assert_array_equal(got[True][n + 1], avg_backward_in_row_order(dy, k, p, include_pad),
                                      err_msg=f"davg, padding counted: {include_pad}")
