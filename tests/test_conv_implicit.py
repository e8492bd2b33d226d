"""conv2d(algo="implicit_gemm") and its backward (cuda/conv_implicit.cu) against float64 oracles,
groups for every algo, the fused epilogue, determinism of the split weight gradient, a planted
missing barrier, and bad input. Emu sizes are small (emu runs every thread of a block)."""
import numpy as np
import pytest

import dnnpar as dp
import oracles
from conftest import BACKENDS, KERNEL_BACKENDS
from dnnpar.backend import cpu_native
from dnnpar.backend.sources import read_source
from dnnpar.ops import conv as conv_ops
from oracles import assert_sum_close
from test_emu import SCHEDULES, remove_nth, run_schedules

# (N, C, H, W, O, KH, KW, stride, padding, dilation, groups); primes, non-tile sizes, size 1, C = 1,
# groups 2, depthwise (groups = C) and depthwise with a channel multiplier, and one geometry
# spanning several 64 x 64 tiles with a K of many 8-deep slices.
GEOMETRIES = [
    (2, 3, 7, 9, 5, 3, 3, (1, 1), (1, 1), (1, 1), 1),
    (1, 1, 1, 1, 1, 1, 1, (1, 1), (0, 0), (1, 1), 1),
    (1, 1, 5, 7, 3, 3, 2, (1, 1), (0, 1), (1, 1), 1),
    (2, 5, 13, 11, 7, 3, 3, (2, 2), (1, 1), (1, 1), 1),
    (1, 4, 11, 13, 6, 3, 3, (1, 2), (2, 1), (2, 2), 2),
    (2, 6, 9, 7, 6, 3, 3, (1, 1), (1, 1), (1, 1), 6),
    (1, 3, 8, 8, 6, 3, 2, (2, 1), (1, 0), (1, 2), 3),
    (2, 5, 10, 9, 70, 3, 3, (1, 1), (1, 1), (1, 1), 1),
]
IDS = [f"n{g[0]}c{g[1]}-{g[2]}x{g[3]}-o{g[4]}-k{g[5]}x{g[6]}-s{g[7][0]}{g[7][1]}-p{g[8][0]}{g[8][1]}-"
       f"d{g[9][0]}{g[9][1]}-g{g[10]}" for g in GEOMETRIES]
ACT = {None: lambda v: v, "relu": lambda v: np.maximum(v, 0), "relu6": lambda v: np.clip(v, 0, 6)}


def case(rng, geo, scale=1.0):
    n, c, h, w, o, kh, kw, s, p, d, groups = geo
    x = (rng.standard_normal((n, c, h, w)) * scale).astype(np.float32)
    wt = rng.standard_normal((o, c // groups, kh, kw)).astype(np.float32)
    b = rng.standard_normal(o).astype(np.float32)
    return x, wt, b, s, p, d, groups


def split_groups(x, wt, groups):
    cg, og = x.shape[1] // groups, wt.shape[0] // groups
    return [(x[:, k * cg:(k + 1) * cg], wt[k * og:(k + 1) * og], slice(k * og, (k + 1) * og)) for k in range(groups)]


def oracle_forward(x, wt, b, s, p, d, groups):
    """(y, |.| magnitudes) in float64: the oracle convolution of each group, concatenated."""
    ys, mags = [], []
    for xg, wg, osl in split_groups(x, wt, groups):
        ys.append(oracles.conv2d(xg, wg, b[osl], s, p, d))
        mags.append(oracles.conv2d(np.abs(xg), np.abs(wg), np.abs(b[osl]), s, p, d))
    return np.concatenate(ys, 1), np.concatenate(mags, 1)


def check_forward(y, x, wt, b, s, p, d, groups, activation, what):
    """The float32 sum of C/G*KH*KW products and the bias within its worst-case bound; ReLU and
    ReLU6 are 1-Lipschitz and exact in float32, so the same bound holds after them."""
    want, mag = oracle_forward(x, wt, b, s, p, d, groups)
    terms = wt.shape[1] * wt.shape[2] * wt.shape[3] + 1
    assert_sum_close(y, ACT[activation](want), mag, terms, what)


def check_backward(dx, dw, db, x, wt, dy, s, p, d, groups, what):
    """Against the adjoint of the oracle im2col per group: dw and db sum N*OH*OW products (in
    splits or not: still that many terms), dx sums O/G*KH*KW products (+ KH*KW for any nesting)."""
    og, _, kh, kw = wt.shape[0] // groups, *wt.shape[1:]
    for k, (xg, wg, osl) in enumerate(split_groups(x, wt, groups)):
        dyg = dy[:, osl].astype(np.float64).transpose(1, 0, 2, 3).reshape(og, -1)
        cols, acols = oracles.im2col(xg, kh, kw, s, p, d), oracles.im2col(np.abs(xg), kh, kw, s, p, d)
        n = dyg.shape[1]
        assert_sum_close(dw[osl], (dyg @ cols.T).reshape(wg.shape), (np.abs(dyg) @ acols.T).reshape(wg.shape), n,
                         f"dw group {k}{what}")
        assert_sum_close(db[osl], dyg.sum(1), np.abs(dyg).sum(1), n, f"db group {k}{what}")
        if dx is not None:
            w2 = wg.astype(np.float64).reshape(og, -1)
            want = oracles.col2im(w2.T @ dyg, xg.shape, kh, kw, s, p, d)
            mag = oracles.col2im(np.abs(w2).T @ np.abs(dyg), xg.shape, kh, kw, s, p, d)
            cg = xg.shape[1]
            assert_sum_close(dx[:, k * cg:(k + 1) * cg], want, mag, og * kh * kw + kh * kw, f"dx group {k}{what}")


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("geo", GEOMETRIES, ids=IDS)
def test_implicit_gemm_forward_and_backward(backend, geo, rng):
    """Every backend accepts algo='implicit_gemm' (numpy computes it by its im2col / blocked path);
    the outputs start poisoned (conftest), so an unwritten element fails."""
    x, wt, b, s, p, d, groups = case(rng, geo)
    activation = [None, "relu", "relu6"][GEOMETRIES.index(geo) % 3]
    y = dp.ops.conv2d(backend.asarray(x), backend.asarray(wt), backend.asarray(b), s, p, d, algo="implicit_gemm",
                      groups=groups, activation=activation)
    check_forward(backend.to_numpy(y), x, wt, b, s, p, d, groups, activation, f"y ({activation})")
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw, db = dp.ops.conv2d_backward(backend.asarray(x), backend.asarray(wt), backend.asarray(dy), s, p, d,
                                        groups=groups, algo="implicit_gemm")
    check_backward(backend.to_numpy(dx), backend.to_numpy(dw), backend.to_numpy(db), x, wt, dy, s, p, d, groups, "")
    none, dw2, _ = dp.ops.conv2d_backward(backend.asarray(x), backend.asarray(wt), backend.asarray(dy), s, p, d,
                                          need_dx=False, groups=groups, algo="implicit_gemm")
    assert none is None
    np.testing.assert_array_equal(backend.to_numpy(dw2), backend.to_numpy(dw))


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
@pytest.mark.parametrize("algo", ["im2col", "direct"])
@pytest.mark.parametrize("geo", [GEOMETRIES[4], GEOMETRIES[6]], ids=[IDS[4], IDS[6]])
def test_groups_on_the_other_algos(backend, algo, geo, rng):
    x, wt, b, s, p, d, groups = case(rng, geo)
    y = dp.ops.conv2d(backend.asarray(x), backend.asarray(wt), backend.asarray(b), s, p, d, algo=algo,
                      groups=groups, activation="relu")
    check_forward(backend.to_numpy(y), x, wt, b, s, p, d, groups, "relu", f"y {algo}")
    dy = rng.standard_normal(y.shape).astype(np.float32)
    dx, dw, db = dp.ops.conv2d_backward(backend.asarray(x), backend.asarray(wt), backend.asarray(dy), s, p, d,
                                        groups=groups, algo=algo)
    check_backward(*(backend.to_numpy(a) for a in (dx, dw, db)), x, wt, dy, s, p, d, groups, f" {algo}")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
@pytest.mark.parametrize("activation", [None, "relu", "relu6"])
def test_fused_epilogue(backend, activation, rng):
    """Inputs scaled so that outputs span well below 0 and above 6: both clamps engage."""
    x, wt, b, s, p, d, groups = case(rng, GEOMETRIES[3], scale=3.0)
    want, _ = oracle_forward(x, wt, b, s, p, d, groups)
    assert (want < 0).mean() > 0.2 and (want > 6).mean() > 0.1
    y = backend.to_numpy(dp.ops.conv2d(backend.asarray(x), backend.asarray(wt), backend.asarray(b), s, p, d,
                                       algo="implicit_gemm", activation=activation))
    check_forward(y, x, wt, b, s, p, d, groups, activation, f"epilogue {activation}")
    y0 = backend.to_numpy(dp.ops.conv2d(backend.asarray(x), backend.asarray(wt), None, s, p, d, algo="implicit_gemm",
                                        activation=activation))
    check_forward(y0, x, wt, np.zeros_like(b), s, p, d, groups, activation, f"no bias {activation}")


def test_split_weight_gradient_is_deterministic(monkeypatch, rng):
    """Forcing 8-deep chunks splits dw's N*OH*OW = 162 reduction over 21 blocks; the fixed-order
    reduce gives the same bits under every thread schedule and matches the unsplit result's bound."""
    monkeypatch.setattr(conv_ops, "IGEMM_MIN_CHUNK", 8)
    monkeypatch.setattr(conv_ops, "IGEMM_TARGET_BLOCKS", 10**6)
    x, wt, _, s, p, d, groups = case(rng, GEOMETRIES[0])
    dy = rng.standard_normal((2, 5, 7, 9)).astype(np.float32)
    with dp.use_backend("emu") as emu:
        runs = run_schedules(emu, lambda: dp.ops.conv2d_backward(x, wt, dy, s, p, d, need_dx=False,
                                                                  algo="implicit_gemm")[1])
    for r in runs:
        np.testing.assert_array_equal(r, runs[0])
    check_backward(None, runs[0], dy.sum(axis=(0, 2, 3)), x, wt, dy, s, p, d, groups, " (split)")


@pytest.mark.parametrize("which", [0, 1])
def test_missing_syncthreads_is_caught(rng, which):
    """Delete either barrier of the shared GEMM loop: the emulator's schedules expose the race
    (threads read a stage before it is written, or after it is overwritten), deterministically."""
    x, wt, b, s, p, d, groups = case(rng, GEOMETRIES[7])
    want, _ = oracle_forward(x, wt, b, s, p, d, groups)
    scale = np.abs(want).max()
    call = lambda: dp.ops.conv2d(x, wt, b, s, p, d, algo="implicit_gemm")  # noqa: E731
    with dp.use_backend("emu") as emu:
        good = run_schedules(emu, call)
        broken = remove_nth(read_source("conv_implicit.cu"), "__syncthreads();", which, "ig_mainloop")
        with emu.source_override("conv_implicit.cu", broken):
            bad = run_schedules(emu, call)
            again = run_schedules(emu, call)
    for r in good:
        np.testing.assert_array_equal(r, good[0])
    check_forward(good[0], x, wt, b, s, p, d, groups, None, "intact kernel")
    errors = [np.nan_to_num(np.abs(r - want), nan=np.inf).max() / scale for r in bad]
    assert max(errors) > 1e-2, f"removing barrier {which} of ig_mainloop went unnoticed: {errors}"
    for r1, r2 in zip(bad, again):
        np.testing.assert_array_equal(r1, r2)
    assert len(bad) == len(SCHEDULES)


def test_tile_sizes_come_from_the_kernel_source():
    assert conv_ops.igemm_tile() == (64, 64, 8, 256)


def test_every_activation_has_a_kernel_code():
    from dnnpar.ops.activation import ACTIVATIONS

    assert set(cpu_native.ACTIVATION_CODES) == {None, *ACTIVATIONS}


@pytest.mark.parametrize("backend", KERNEL_BACKENDS, indirect=True)
def test_fused_epilogue_keeps_nan_like_the_unfused_activation(backend):
    """A NaN input reaches every output it feeds as NaN through ReLU and ReLU6 (as activate_ does)."""
    x = np.ones((1, 1, 3, 3), np.float32)
    x[0, 0, 1, 1] = np.nan
    w = np.ones((2, 1, 1, 1), np.float32)
    for activation in ("relu", "relu6"):
        y = backend.to_numpy(dp.ops.conv2d(backend.asarray(x), backend.asarray(w), algo="implicit_gemm",
                                           activation=activation))
        assert np.isnan(y[0, :, 1, 1]).all() and np.isfinite(np.delete(y.reshape(2, 9), 4, axis=1)).all()


@pytest.mark.parametrize("backend", BACKENDS, indirect=True)
def test_bad_groups_and_activation(backend):
    x = backend.asarray(np.ones((1, 4, 5, 5), np.float32))
    w = backend.asarray(np.ones((6, 2, 3, 3), np.float32))
    with pytest.raises(ValueError, match="groups=3 must be >= 1 and divide"):
        dp.ops.conv2d(x, w, groups=3, algo="implicit_gemm")
    with pytest.raises(ValueError, match="groups=0"):
        dp.ops.conv2d(x, w, groups=0)
    with pytest.raises(ValueError, match=r"C/groups = 1 input channels"):
        dp.ops.conv2d(x, backend.asarray(np.ones((8, 2, 3, 3), np.float32)), groups=4, algo="implicit_gemm")
    with pytest.raises(ValueError, match=r"x has 4 channels but w expects 2"):
        dp.ops.conv2d(x, w, groups=1, algo="implicit_gemm")
    with pytest.raises(TypeError, match="groups must be an int"):
        dp.ops.conv2d(x, w, groups=2.0)
    with pytest.raises(ValueError, match="activation must be None or one of 'relu', 'relu6', got 'gelu'"):
        dp.ops.conv2d(x, w, groups=2, activation="gelu")
    with pytest.raises(ValueError, match="unknown algo"):
        dp.ops.conv2d_backward(x, w, backend.asarray(np.ones((1, 6, 3, 3), np.float32)), groups=2, algo="fft")
    with pytest.raises(ValueError, match="cols can be reused only"):
        dp.ops.conv2d_backward(x, w, backend.asarray(np.ones((1, 6, 3, 3), np.float32)), groups=2,
                               cols=backend.asarray(np.ones((18, 9), np.float32)))


@pytest.mark.gpu
@pytest.mark.parametrize("geo", GEOMETRIES, ids=IDS)
def test_implicit_gemm_matches_cudnn(geo, rng):
    """On a GPU: the forward against cuDNN (through CuPy's cudnn module), same bound both ways."""
    cupy = pytest.importorskip("cupy")
    cudnn = pytest.importorskip("cupy.cudnn")
    x, wt, b, s, p, d, groups = case(rng, geo)
    with dp.use_backend("cuda"):
        y = cupy.asnumpy(dp.ops.conv2d(cupy.asarray(x), cupy.asarray(wt), cupy.asarray(b), s, p, d,
                                       algo="implicit_gemm", groups=groups))
    ref = cupy.empty(y.shape, np.float32)
    cudnn.convolution_forward(cupy.asarray(x), cupy.asarray(wt), cupy.asarray(b), ref, p, s, d, groups,
                              auto_tune=False, tensor_core="never")
    want, mag = oracle_forward(x, wt, b, s, p, d, groups)
    terms = wt.shape[1] * wt.shape[2] * wt.shape[3] + 1
    assert_sum_close(y, want, mag, terms, "dnnpar implicit_gemm")
    assert_sum_close(cupy.asnumpy(ref), want, mag, terms, "cuDNN")
