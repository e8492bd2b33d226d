"""Deep Gradient Compression (dnnpar/parallel/dgc.py): the warm-up schedule, the sampled top-k,
momentum correction and masking, the conservation of what is not sent, the byte count, and
exactness at density 1.0 against dense momentum SGD (one rank; the MPI runs are in
tests/test_parallel.py)."""
import math

import numpy as np
import pytest

from dnnpar.data import fashion_mnist
from dnnpar.nn import SoftmaxCrossEntropy
from dnnpar.nn.models import build
from dnnpar.nn.optim import SGD
from dnnpar.parallel.data_parallel import parse_grad_compression
from dnnpar.parallel.dgc import DGC, DGCConfig
from dnnpar.parallel.flat import ParamLayout


def test_warmup_schedule_is_the_papers():
    cfg = DGCConfig(density=0.001)
    got = [cfg.density_at(e) for e in range(1, 8)]
    # 25%, 25% x (0.004)^(1/4), ... : the paper's 75%, 93.75%, 98.4375%, 99.6%, then 99.9% sparsity
    want = [0.25 * (0.001 / 0.25) ** ((e - 1) / 4) for e in range(1, 5)] + [0.001] * 3
    assert got == pytest.approx(want, rel=1e-12)
    assert got[1] == pytest.approx(0.0629, rel=1e-2) and got[3] == pytest.approx(0.00397, rel=1e-2)
    assert all(a >= b for a, b in zip(got, got[1:]))
    assert DGCConfig(density=0.01, warmup_epochs=0).density_at(1) == 0.01
    assert DGCConfig(density=0.5).density_at(1) == 0.5     # the warm-up never raises the density


@pytest.mark.parametrize("spec,want", [("none", ("none", None)), ("NONE", ("none", None)),
                                       ("dgc:0.001", ("dgc", 0.001)), ("dgc:1", ("dgc", 1.0)),
                                       ("fp16", ("fp16", None)), ("BF16", ("bf16", None))])
def test_parse_grad_compression(spec, want):
    assert parse_grad_compression(spec) == want


@pytest.mark.parametrize("spec", ["dgc", "dgc:", "dgc:0", "dgc:-1", "dgc:1.5", "dgc:nan", "dgc:x", "topk:0.1", "",
                                  "fp8", "fp16:0.1"])
def test_parse_grad_compression_refuses(spec):
    with pytest.raises(ValueError, match="grad-compression"):
        parse_grad_compression(spec)


@pytest.mark.parametrize("kw", [dict(density=0), dict(density=1.5), dict(density=float("nan")), dict(momentum=-0.1),
                                dict(clip_norm=0.0), dict(warmup_epochs=-1), dict(min_sample=0),
                                dict(sample_fraction=0), dict(density=True), dict(min_sparse=1.5)])
def test_config_refuses(kw):
    with pytest.raises(ValueError, match="DGC: "):
        DGCConfig(**kw)


def one_slot_dgc(n, **kw):
    from dnnpar.nn.layers import Linear
    from dnnpar.nn.base import Sequential
    model = Sequential(Linear(n, 1, bias=False), input_shape=(n,))
    return DGC(ParamLayout(model), DGCConfig(min_sparse=1, **kw), world=1)


def test_sampled_selection_takes_only_top_entries(rng):
    """n = 10^6 normal entries, k = 1,000, a 1% sample (10,000 entries): the threshold is the
    10th largest of the sample. Every selected entry lies in the top 3k unless fewer than 10
    sample entries fall in the top 3k: X ~ Binomial(10^4, 0.003), mean 30, P(X < 10) < 1e-5."""
    n, k = 1_000_000, 1000
    dgc = one_slot_dgc(n)
    a = rng.standard_normal(n).astype(np.float32)
    sel = dgc.select(a, k)
    mag = np.abs(a)
    assert sel.dtype == np.int64 and np.all(np.diff(sel) > 0), "sorted, unique"
    assert k // 3 <= sel.size <= k
    top3k = np.partition(mag, n - 3 * k)[n - 3 * k]
    assert mag[sel].min() >= top3k
    # small arrays: the exact top k
    b = rng.standard_normal(777).astype(np.float32)
    exact = dgc.select(b, 50)
    np.testing.assert_array_equal(exact, np.sort(np.argsort(-np.abs(b), kind="stable")[:50]))
    np.testing.assert_array_equal(dgc.select(b, 777), np.arange(777))


def test_nothing_is_lost_only_delayed(rng):
    """Without momentum, what a rank has sent plus what it still holds is the sum of its
    gradients (float32 sums of T terms per entry: gamma_T bound on the sum of magnitudes)."""
    n, T = 5000, 12
    dgc = one_slot_dgc(n, density=0.01, momentum=0.0, warmup_epochs=0)
    sent = np.zeros(n, np.float64)
    gsum, gabs = np.zeros(n), np.zeros(n)
    params = np.zeros(n, np.float32)
    for _ in range(T):
        g = rng.standard_normal(n).astype(np.float32)
        out = dgc.step(g, params, 1.0, None, epoch=1)
        assert np.count_nonzero(out) <= math.ceil(0.01 * n)
        sent += out
        gsum += g
        gabs += np.abs(g)
    u = 2.0**-24
    gamma = 2 * T * u / (1 - 2 * T * u)
    assert np.all(np.abs(sent + dgc.v - gsum) <= gamma * gabs + 1e-30)
    assert dgc.stats.steps == T and dgc.stats.bytes_sent == T * 8 * math.ceil(0.01 * n)


def test_momentum_factor_masking(rng):
    n = 3000
    dgc = one_slot_dgc(n, density=0.01, momentum=0.9, warmup_epochs=0)
    out = dgc.step(rng.standard_normal(n).astype(np.float32), np.zeros(n, np.float32), 1.0, None, 1)
    sent = np.flatnonzero(out)
    assert sent.size == 30
    assert np.all(dgc.v[sent] == 0) and np.all(dgc.u[sent] == 0)
    rest = np.setdiff1d(np.arange(n), sent)
    assert np.all(dgc.u[rest] != 0) and np.all(dgc.v[rest] == dgc.u[rest])
    nomask = one_slot_dgc(n, density=0.01, momentum=0.9, warmup_epochs=0, mask_momentum=False)
    out = nomask.step(rng.standard_normal(n).astype(np.float32), np.zeros(n, np.float32), 1.0, None, 1)
    assert np.all(nomask.v[np.flatnonzero(out)] == 0) and np.all(nomask.u != 0)


def test_local_clipping_scales_by_inverse_sqrt_world(rng):
    n = 2000
    dgc = one_slot_dgc(n, clip_norm=1.0)
    dgc.world = 4   # the limit is clip_norm / sqrt(4) = 0.5 for this rank's own gradient
    share = 0.25
    g = rng.standard_normal(n).astype(np.float32) * np.float32(share)
    clipped = dgc.clip(g, share)
    assert np.linalg.norm(clipped.astype(np.float64)) / share == pytest.approx(0.5, rel=1e-5)
    small = g * np.float32(0.1 / np.linalg.norm(g / share))
    assert dgc.clip(small, share) is small
    with pytest.raises(ValueError, match="needs a communicator"):
        dgc.step(g, np.zeros(n, np.float32), share, None, 1)


def lenet_steps(model, opt, data, steps, dgc=None, layout=None):
    loss_fn = SoftmaxCrossEntropy()
    model.train()
    for i in range(steps):
        xb, yb = data.x_train[i * 32:(i + 1) * 32], data.y_train[i * 32:(i + 1) * 32]
        loss_fn(model.forward(xb), yb)
        model.backward(loss_fn.backward())
        if dgc is not None:
            g = layout.gather_grads(model)
            p = layout.gather_params(model)
            upd = dgc.step(g, p, 1.0, None, epoch=1)
            opt.plain = dgc.sparse_names(1)
            for (lname, layer) in model.layers:
                for pname in layer.grads:
                    s = layout[f"{lname}.{pname}"]
                    layer.grads[pname] = upd[s.offset:s.stop].reshape(s.shape)
        opt.step()
    return layout.gather_params(model) if layout else None


@pytest.fixture(scope="module")
def data():
    return fashion_mnist.load(subset="embedded")


@pytest.mark.parametrize("dense_above", [0.5, 2.0], ids=["dense-path", "sparse-path"])
def test_density_one_is_dense_momentum_sgd_bit_for_bit(data, dense_above):
    """Density 1.0: every entry is sent each step. Through the dense path (the default) and
    through the sparse path (forced, no momentum masking: with masking momentum would restart
    every step, which is what the paper's rule does), one rank's DGC is momentum SGD with weight
    decay exactly: u = m u + (g + wd p) is the optimizer's own recursion, in the same order."""
    ref = build("lenet300", seed=3)
    layout = ParamLayout(ref)
    lenet_steps(ref, SGD(ref, 0.05, 0.9, weight_decay=5e-4), data, 6)
    want = layout.gather_params(ref)
    m = build("lenet300", seed=3)
    cfg = DGCConfig(density=1.0, momentum=0.9, weight_decay=5e-4, dense_above=dense_above, mask_momentum=False)
    dgc = DGC(layout, cfg, world=1)
    opt = SGD(m, 0.05, 0.9, weight_decay=5e-4)
    got = lenet_steps(m, opt, data, 6, dgc, layout)
    assert dgc.sends_dense(1) == (dense_above <= 1)
    assert (opt.plain == set()) == (dense_above <= 1)
    np.testing.assert_array_equal(got, want)


def test_lenet300_bytes_per_step_at_one_in_a_thousand(data):
    """Every array of at least 128 entries goes sparse -- fc1 (235,200), fc2 (30,000), fc3 (1,000)
    weights and fc1's 300 biases: 236 + 30 + 1 + 1 pairs of 8 bytes; fc2's and fc3's biases (110
    floats) dense: 2,584 bytes against 1,066,440 -- 412x fewer."""
    m = build("lenet300", seed=0)
    layout = ParamLayout(m)
    dgc = DGC(layout, DGCConfig(density=0.001, warmup_epochs=0), world=1)
    lenet_steps(m, SGD(m, 0.05, 0.9), data, 2, dgc, layout)
    assert dgc.stats.bytes_per_step == 8 * (236 + 30 + 1 + 1) + 4 * (100 + 10)
    assert dgc.stats.dense_bytes_per_step == 4 * layout.size == 4 * 266_610
    assert dgc.stats.ratio > 100


@pytest.mark.parametrize("wd", [0.0, 5e-4], ids=["no-decay", "decay"])
def test_native_accumulation_is_numpys_bit_for_bit(rng, wd):
    """dnnpar/cpu/optim.cpp's one-pass momentum correction gives NumPy's bits for u, v and |v|
    (sizes 1, a prime, several threads); it declines arrays it cannot take."""
    from dnnpar.backend import cpu_native
    if cpu_native.library("optim") is None:
        pytest.skip(f"native kernels unavailable: {cpu_native.unavailable_reason('optim')}")
    m, w = np.float32(0.9), np.float32(wd)
    for n in (1, 4099, 100_003):
        u0, v0, g, p = (rng.standard_normal(n).astype(np.float32) for _ in range(4))
        u, v, mag = u0.copy(), v0.copy(), np.full(n, np.nan, np.float32)
        assert cpu_native.dgc_accumulate(u, v, g, p if wd else None, m, w, mag)
        U, V = u0.copy(), v0.copy()
        G = g + w * p if wd else g
        U *= m
        U += G
        V += U
        for got, want in ((u, U), (v, V), (mag, np.abs(V))):
            np.testing.assert_array_equal(got, want)
            assert np.array_equal(np.signbit(got), np.signbit(want))   # -0 vs +0 too
    assert not cpu_native.dgc_accumulate(u, v, g, None, m, np.float32(1e-3))       # decay needs p
    assert not cpu_native.dgc_accumulate(u.astype(np.float64), v, g, p, m, w)


def test_scatter_sum_equals_the_full_length_bincount(rng):
    """The sum over distinct indices is the full-length float64 bincount's, bit for bit: pairs
    repeated across ranks, -1 padding, a sub-range [lo, hi)."""
    dgc = one_slot_dgc(1000, density=0.05)
    lo, hi, ranks, k = 200, 900, 3, 40
    idx = rng.integers(lo, hi, (ranks, k)).astype(np.int32)
    idx[1, :10] = idx[0, :10]                  # the same entries sent by two ranks
    idx[2, -5:] = -1                           # a rank that found fewer
    val = rng.standard_normal((ranks, k)).astype(np.float32)
    keep = idx.reshape(-1) >= 0
    want = np.bincount(idx.reshape(-1)[keep] - lo, weights=val.reshape(-1)[keep].astype(np.float64),
                       minlength=hi - lo).astype(np.float32)
    np.testing.assert_array_equal(dgc.scatter_sum(idx, val, lo, hi), want)
    for bad in (lo - 1, hi):
        idx[0, 0] = bad
        with pytest.raises(ValueError, match="outside the entries"):
            dgc.scatter_sum(idx, val, lo, hi)
