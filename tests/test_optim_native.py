"""SGD's one-pass native update (dnnpar/cpu/optim.cpp, through dnnpar.nn.optim.SGD) against a
float64 evaluation of the same formula, and bit for bit against the NumPy fallback."""
import sys

import numpy as np
import pytest

import dnnpar as dp
import dnnpar.nn.optim  # noqa: F401  (the module, for its NATIVE switch)
from oracles import U32
from dnnpar.backend import cpu_native

pytestmark = pytest.mark.skipif(cpu_native.library("optim") is None,
                                reason=f"native SGD unavailable: {cpu_native.unavailable_reason('optim')}")
OPTIM = sys.modules["dnnpar.nn.optim"]

SIZES = [1, 2, 7, 61, 4099, 70001]  # 70001: several threads


def gamma(k):
    return k * U32 / (1 - k * U32)


def f32(c):
    """A Python float as the float32 both implementations use."""
    return float(np.float32(c))


def oracle(p, g, v, mask, lr, mu, wd, nesterov, first, plain):
    """(p', v', bound on p', bound on v') in float64 from the float32 inputs. Bounds: each of the
    at most 4 operations of v' (wd p, + g, mu v, +) rounds once relative to the partial sum it
    makes, each of which is at most M_v = mu |v| + |g| + wd |p| in size: gamma_4 M_v. p' adds
    Nesterov's product and sum, lr d and the subtraction: gamma_8 (|p| + lr M_d). FMA contraction
    A mask of 0 / 1 multiplies exactly."""
    P, G = p.astype(np.float64), g.astype(np.float64)
    lr, mu, wd = f32(lr), f32(mu), f32(wd)
    if plain:
        d, md, V, bv = G, np.abs(G), None, None
    else:
        gd, mgd = G + wd * P, np.abs(G) + wd * np.abs(P)
        if mu:
            V = gd if first else mu * v.astype(np.float64) + gd
            mv = mgd if first else mu * np.abs(v.astype(np.float64)) + mgd
            d, md = (gd + mu * V, mgd + mu * mv) if nesterov else (V, mv)
            bv = gamma(4) * mv
        else:
            d, md, V, bv = gd, mgd, None, None
    new = P - lr * d
    bp = gamma(8) * (np.abs(P) + lr * md)
    if mask is not None:
        new, bp = new * mask, bp * mask
    return new, V, bp, bv


CASES = [dict(mu=0.9, wd=5e-4, nesterov=False, first=False, plain=False),
         dict(mu=0.9, wd=5e-4, nesterov=True, first=False, plain=False),
         dict(mu=0.9, wd=0.0, nesterov=False, first=True, plain=False),
         dict(mu=0.0, wd=1e-3, nesterov=False, first=False, plain=False),
         dict(mu=0.9, wd=5e-4, nesterov=False, first=False, plain=True)]
CASE_IDS = ["momentum+wd", "nesterov", "first-step", "no-momentum", "plain"]


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@pytest.mark.parametrize("masked", [False, True], ids=["", "masked"])
def test_sgd_step_matches_float64(rng, n, case, masked):
    """p and v within their derived bounds of the float64 update, on 1, 2 and 3 threads (the
    same bits: elementwise); a first step writes v whatever it held (poisoned with NaN)."""
    p0 = rng.standard_normal(n, dtype=np.float32)
    g = rng.standard_normal(n, dtype=np.float32)
    v0 = rng.standard_normal(n, dtype=np.float32)
    mask = (rng.random(n) < 0.7).astype(np.float32) if masked else None
    has_v = case["mu"] and not case["plain"]
    if case["first"]:
        v0[:] = np.nan
    want_p, want_v, bp, bv = oracle(p0, g, v0, mask, 0.05, case["mu"], case["wd"], case["nesterov"],
                                    case["first"], case["plain"])
    results = []
    for t in (1, 2, 3):
        p, v = p0.copy(), v0.copy() if has_v else None
        assert cpu_native.sgd_step(p, g, v, mask, 0.05, case["mu"], case["wd"], case["nesterov"], case["first"],
                                   case["plain"], threads=t)
        assert np.all(np.abs(p - want_p) <= bp + 1e-38), f"p off by {np.max(np.abs(p - want_p) - bp):.3e}"
        if has_v:
            assert np.all(np.abs(v - want_v) <= bv + 1e-38), f"v off by {np.max(np.abs(v - want_v) - bv):.3e}"
        if masked:
            assert np.all(p[mask == 0] == 0)
        results.append((p, v))
    for p, v in results[1:]:
        np.testing.assert_array_equal(p, results[0][0])
        if has_v:
            np.testing.assert_array_equal(v, results[0][1])


def test_no_weight_decay_reads_no_parameter_into_the_gradient():
    """wd = 0 is g, not g + 0 * p: an inf parameter stays inf instead of becoming NaN, as in the
    NumPy expression."""
    p = np.array([np.inf, 1.0], np.float32)
    g = np.array([1.0, 2.0], np.float32)
    v = np.zeros(2, np.float32)
    assert cpu_native.sgd_step(p, g, v, None, 0.1, 0.9, 0.0)
    assert p[0] == np.inf and np.isfinite(v).all()


def test_declines_what_it_cannot_take():
    """float64, non-contiguous or read-only arrays, or a shape mismatch: False, nothing written."""
    p = np.ones(10, np.float32)
    g = np.ones(10, np.float32)
    assert not cpu_native.sgd_step(p.astype(np.float64), g, None, None, 0.1, 0.0, 0.0)
    assert not cpu_native.sgd_step(np.ones(20, np.float32)[::2], g, None, None, 0.1, 0.0, 0.0)
    assert not cpu_native.sgd_step(p, np.ones(11, np.float32), None, None, 0.1, 0.0, 0.0)
    ro = np.ones(10, np.float32)
    ro.flags.writeable = False
    assert not cpu_native.sgd_step(ro, g, None, None, 0.1, 0.0, 0.0)
    assert (p == 1).all()


@pytest.mark.parametrize("native", [True, False], ids=["native", "numpy"])
def test_sgd_class_updates_every_parameter(rng, monkeypatch, native):
    """Three SGD steps of a model with momentum, Nesterov, weight decay, a pruning mask and a
    plain (DGC-style) parameter, on the native update and on NumPy's: every parameter and
    velocity after each step within the derived bound of the float64 update of what it held
    before (the first step starts the velocity)."""
    from dnnpar.nn import SoftmaxCrossEntropy
    from dnnpar.nn.models import build
    from dnnpar.nn.optim import SGD

    monkeypatch.setitem(OPTIM.NATIVE, "use", native)
    taken = []
    real = cpu_native.sgd_step
    monkeypatch.setattr(cpu_native, "sgd_step", lambda *a, **k: taken.append(real(*a, **k)) or taken[-1])
    model = build("lenet300", seed=3)
    lr, mu, wd = 0.05, 0.9, 1e-3
    opt = SGD(model, lr, momentum=mu, nesterov=True, weight_decay=wd)
    w = model["fc1"].params["weight"]
    opt.masks["fc1.weight"] = mask = (np.abs(w) > 0.02).astype(np.float32)
    w *= mask
    opt.plain.add("fc3.bias")
    lf = SoftmaxCrossEntropy()
    with dp.use_backend("numpy"):
        for step in range(3):
            x = rng.standard_normal((8, 1, 28, 28), dtype=np.float32)
            lf(model.forward(x), rng.integers(0, 10, 8))
            model.backward(lf.backward())
            before = {k: (p.copy(), g.copy(), opt.velocity.get(k)) for k, p, g in model.named_parameters()}
            before = {k: (p, g, None if v is None else v.copy()) for k, (p, g, v) in before.items()}
            opt.step()
            for k, p, _ in model.named_parameters():
                p0, g, v0 = before[k]
                plain = k in opt.plain
                want_p, want_v, bp, bv = oracle(p0, g, v0, opt.masks.get(k), lr, mu, wd, True, v0 is None, plain)
                assert np.all(np.abs(p - want_p) <= bp + 1e-38), (step, k)
                if not plain:
                    assert np.all(np.abs(opt.velocity[k] - want_v) <= bv + 1e-38), (step, k)
                else:
                    assert k not in opt.velocity
    assert np.all(model["fc1"].params["weight"][mask == 0] == 0)
    # the native path took every parameter of every step (NumPy's: none)
    assert taken == ([True] * 18 if native else []), taken


def test_native_is_the_numpy_expression_bit_for_bit(rng, monkeypatch):
    """No FMA contraction in optim.cpp: the native update and NumPy's give the same bits, step
    after step (a run does not change with the library's presence; DGC's own momentum recursion
    relies on it)."""
    from dnnpar.nn import SoftmaxCrossEntropy
    from dnnpar.nn.models import build
    from dnnpar.nn.optim import SGD

    def run(native, nesterov, wd):
        monkeypatch.setitem(OPTIM.NATIVE, "use", native)
        model = build("lenet300", seed=5)
        opt = SGD(model, 0.05, momentum=0.9, nesterov=nesterov, weight_decay=wd)
        w = model["fc2"].params["weight"]
        opt.masks["fc2.weight"] = (np.abs(w) > 0.03).astype(np.float32)
        opt.plain.add("fc1.bias")
        data, lf = np.random.default_rng(11), SoftmaxCrossEntropy()
        with dp.use_backend("numpy"):
            for _ in range(3):
                lf(model.forward(data.standard_normal((8, 1, 28, 28), dtype=np.float32)), data.integers(0, 10, 8))
                model.backward(lf.backward())
                opt.step()
        return {k: p for k, p, _ in model.named_parameters()} | {f"v/{k}": v for k, v in opt.velocity.items()}

    for nesterov, wd in ((False, 5e-4), (True, 5e-4), (False, 0.0), (False, 1e-46)):  # 1e-46: 0 in float32
        a, b = run(True, nesterov, wd), run(False, nesterov, wd)
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_array_equal(a[k], b[k], err_msg=f"{k} nesterov={nesterov} wd={wd}")
            assert np.array_equal(np.signbit(a[k]), np.signbit(b[k])), k
