"""Fused softmax + cross-entropy (cuda/softmax_ce.cu, ops.softmax_cross_entropy): the kernel on
the emu backend and the numpy path against a float64 oracle within a bound derived from the
float32 operations; determinism across thread schedules; a planted missing barrier caught."""
import numpy as np
import pytest

import dnnpar as dp
from dnnpar import ops
from dnnpar.backend import poison_outputs
from dnnpar.backend.sources import read_source
from dnnpar.nn.layers import SoftmaxCrossEntropy
from conftest import BACKENDS
from test_emu import remove_nth, run_schedules

U = 2.0**-24        # float32 unit roundoff
U_EXP = 2 * U       # expf / logf: within 2 ulp (CUDA's documented bound; glibc's is 1)

# (N, C): size 1, primes, C above the block (128) and above a warp, N above nothing special
SHAPES = [(1, 1), (1, 2), (5, 3), (7, 10), (3, 131), (2, 1000), (37, 17)]


def oracle(z, y):
    z = z.astype(np.float64)
    m = z.max(axis=1, keepdims=True)
    lse = m + np.log(np.exp(z - m).sum(axis=1, keepdims=True))
    p = np.exp(z - lse)
    loss_rows = lse[:, 0] - z[np.arange(len(y)), y]
    d = p.copy()
    d[np.arange(len(y)), y] -= 1
    return loss_rows, d / len(y), lse[:, 0], p


def bounds(z, y):
    """Per-row loss bound and per-element gradient bound of the float32 computation:
    each term exp(z_j - m) carries relative error u|z_j - m| (the rounded difference) + U_EXP;
    their sum adds gamma_C; log adds U_EXP + u|log s|; lse = m + log s and loss = lse - z_y one
    rounding each. The gradient p_j = exp(z_j - lse) inherits lse's error plus u|z_j - lse| + U_EXP,
    then (p - onehot) / N rounds twice more."""
    loss_rows, d, lse, p = oracle(z, y)
    z64 = z.astype(np.float64)
    n, c = z.shape
    gamma = c * U / (1 - c * U)
    spread = np.abs(z64 - z64.max(axis=1, keepdims=True)).max(axis=1)
    log_s = lse - z64.max(axis=1)
    rel_s = gamma + U_EXP + U * spread
    lse_err = rel_s + U_EXP + U * np.abs(log_s) + U * np.abs(lse)
    loss_err = lse_err + U * np.abs(loss_rows)
    rel_p = lse_err[:, None] + U * np.abs(z64 - lse[:, None]) + U_EXP
    d_err = (p * rel_p + 2 * U * np.abs(d * n)) / n
    return loss_err, d_err


def case(rng, n, c, offset=0.0):
    z = (rng.standard_normal((n, c)) * 6 + offset).astype(np.float32)
    return z, rng.integers(0, c, n)


def check(loss, d, z, y, what):
    loss_rows, d64, _, _ = oracle(z, y)
    loss_err, d_err = bounds(z, y)
    d = np.asarray(d)
    assert np.all(np.isfinite(d)), f"{what}: unwritten gradient"
    err = abs(float(loss) - loss_rows.mean())
    # the mean of N float32 row losses: each within loss_err, summed with gamma_N
    lim = loss_err.mean() + len(y) * U / (1 - len(y) * U) * np.abs(loss_rows).mean() + 1e-37
    assert err <= lim, f"{what}: loss error {err:.3e} > {lim:.3e}"
    bad = np.abs(d.astype(np.float64) - d64) > d_err + 1e-37
    assert not bad.any(), f"{what}: gradient beyond its bound at {np.argwhere(bad)[:3].tolist()}"


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("n,c", SHAPES)
def test_matches_the_oracle(backend, rng, n, c):
    z, y = case(rng, n, c)
    with poison_outputs():
        loss, d = ops.softmax_cross_entropy(backend.asarray(z), backend.asarray(y))
    check(backend.to_numpy(loss), backend.to_numpy(d), z, y, f"{backend.name} {n}x{c}")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_large_logits_stay_finite(backend, rng):
    """Logits near 1e3 (exp would overflow without the max shift) and a row of equal values."""
    z, y = case(rng, 6, 29, offset=1000.0)
    z[0] = 1000.0
    loss, d = ops.softmax_cross_entropy(backend.asarray(z), backend.asarray(y))
    check(backend.to_numpy(loss), backend.to_numpy(d), z, y, "offset 1e3")


def test_kernel_is_deterministic_and_the_layer_uses_it(rng):
    z, y = case(rng, 9, 300)
    with dp.use_backend("emu") as emu:
        runs = run_schedules(emu, lambda: ops.softmax_cross_entropy(z, y)[1])
        for r in runs[1:]:
            np.testing.assert_array_equal(r, runs[0])
        layer = SoftmaxCrossEntropy()
        loss = layer(z, y)
        np.testing.assert_array_equal(layer.backward(), runs[0])
    check(loss, runs[0], z, y, "layer")


def test_nan_logit_gives_nan_row(rng):
    z, y = case(rng, 3, 40)
    z[1, 7] = np.nan
    with dp.use_backend("emu"):
        loss, d = ops.softmax_cross_entropy(z, y)
    d = np.asarray(d)
    assert np.isnan(float(loss)) and np.isnan(d[1]).all() and np.isfinite(d[[0, 2]]).all()


@pytest.mark.parametrize("which", [0, 1])
def test_missing_barrier_is_caught(rng, which):
    """Delete either of block_reduce's two barriers: some thread schedule reads a warp's partial,
    or the block's total, before it is written, and the result leaves the bound."""
    z, y = case(rng, 4, 257)
    broken = remove_nth(read_source("softmax_ce.cu"), "__syncthreads();", which, "block_reduce")
    with dp.use_backend("emu") as emu, emu.source_override("softmax_ce.cu", broken):
        flat = run_schedules(emu, lambda: np.concatenate([np.asarray(a).ravel() for a in ops.softmax_cross_entropy(z, y)]))
    failures = 0
    for f in flat:
        try:
            check(f[0], f[1:].reshape(z.shape), z, y, "planted")
        except AssertionError:
            failures += 1
    assert failures > 0, f"no schedule exposed the missing barrier #{which}"


@pytest.mark.parametrize("labels,match", [(np.array([0, 5]), r"\[0, 5\)"), (np.array([0, -1]), r"\[0, 5\)"),
                                          (np.array([0.0, 1.0]), "integer"), (np.array([0, 1, 2]), r"\(2,\)")])
def test_bad_labels(labels, match):
    z = np.zeros((2, 5), np.float32)
    for name in ("numpy", "emu"):
        with dp.use_backend(name), pytest.raises(ValueError, match=match):
            ops.softmax_cross_entropy(z, labels)
    with pytest.raises(ValueError, match="empty"):
        ops.softmax_cross_entropy(np.zeros((0, 5), np.float32), np.zeros(0, np.int64))
