"""``dnnpar demo``: the convolution tour on the active backend."""
from __future__ import annotations

import time

import numpy as np

from . import backend as _backend
from .ops.conv import ConvGeometry, conv2d_direct_numpy


def _median_ms(fn, repeat: int, sync) -> float:
    fn()
    sync()  # warm-up: compile / cache
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t) * 1e3)
    return float(np.median(times))


def convolution_tour(backend: str | None = None, batch: int = 8, repeat: int = 5, seed: int = 0) -> int:
    """Direct loop vs im2col + GEMM on one conv layer: result check and timing table."""
    import dnnpar as dp

    be = dp.set_backend(backend) if backend else _backend.get_backend()
    rng = np.random.default_rng(seed)
    n, c, h, w, o, k, pad = batch, 16, 32, 32, 32, 3, 1
    if be.name == "emu":  # every CUDA thread is a fiber: keep the layer small
        n, c, h, w, o = min(batch, 2), 8, 16, 16, 16
    x64 = rng.standard_normal((n, c, h, w))
    w64 = rng.standard_normal((o, c, k, k)) / np.sqrt(c * k * k)
    b64 = rng.standard_normal(o)
    g = ConvGeometry.make("demo", x64.shape, k, k, 1, pad, 1)
    oracle = conv2d_direct_numpy(x64, w64, b64, g)
    x, wt, b = (be.asarray(a.astype(np.float32)) for a in (x64, w64, b64))
    flops = 2.0 * n * o * g.oh * g.ow * c * k * k

    print(f"dnnpar convolution tour on the '{be.name}' backend")
    print(f"layer: x {n}x{c}x{h}x{w}, w {o}x{c}x{k}x{k}, padding {pad} -> out {n}x{o}x{g.oh}x{g.ow} "
          f"({flops / 1e6:.1f} MFLOP)\n")
    print(f"{'algorithm':<16} {'median ms':>10} {'GFLOP/s':>9} {'max rel err vs float64':>24}")
    ok = True
    for algo in ("direct", "im2col"):
        out = dp.ops.conv2d(x, wt, b, padding=pad, algo=algo)
        err = float(np.max(np.abs(be.to_numpy(out) - oracle)) / np.max(np.abs(oracle)))
        ok &= err < 1e-4
        ms = _median_ms(lambda: dp.ops.conv2d(x, wt, b, padding=pad, algo=algo), repeat, be.synchronize)
        print(f"{algo:<16} {ms:>10.2f} {flops / ms / 1e6:>9.2f} {err:>24.2e}")
    print("\nim2col turns the layer into one GEMM of "
          f"{o} x {c * k * k} by {c * k * k} x {n * g.oh * g.ow}: the work runs in the tuned matrix multiply.")
    print("results agree with the float64 oracle" if ok else "MISMATCH against the float64 oracle")
    return 0 if ok else 1


def training_demo(backend: str | None = None, epochs: int = 4, seed: int = 0) -> int:
    """Train LeNet-5 on the Fashion-MNIST sample embedded in the package: the model summary,
    the per-epoch table and the final accuracy."""
    from .nn.models import lenet5
    from .nn.summary import summary
    from .train import TrainConfig, train

    cfg = TrainConfig(model="lenet5", epochs=epochs, batch_size=64, lr=0.01, subset="embedded", seed=seed,
                      backend=backend)
    print(summary(lenet5(), cfg.batch_size).table())
    print()
    result = train(cfg)
    model, history = result.model, result.history
    last = history.records[-1]
    print(f"\nLeNet-5 after {epochs} epochs on the embedded sample (6,000 training images): "
          f"test accuracy {100 * last.test_acc:.2f}% on its 1,000 test images")
    print("full data set: dnnpar train --model lenet5 --epochs 15 (see the README for the budgets and results)")
    return 0 if last.test_acc > 0.5 else 1
