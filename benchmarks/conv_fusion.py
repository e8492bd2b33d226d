"""Fused vs unfused convolution on the numpy backend, in ONE process, PyTorch CPU beside.

Configurations, toggled between rounds so a noisy neighbour hits them alike (each row's median
is over interleaved runs):
  unfused: nn.base.FUSION = False and ops.conv.NATIVE["use"] = False (main's NumPy glue, separate
           ReLU layers, BatchNorm run as its own layer at inference);
  fused:   FUSION = True with the native glue (dnnpar/cpu/conv.cpp: im2col / col2im, bias + ReLU
           epilogue, masked dy repacking), and BatchNorm folded into the conv at inference
           (dnnpar.nn.fusion.fold_batchnorm).
Rows: LeNet-5 (batch 64) and VGG-16 at 32x32 (batch 16) training steps; ResNet-style inference
(batch 1 and 64). The hardware bound beside each row: the GFLOP/s the step reaches against
NumPy's SGEMM measured in the same run. The other load on the machine during the run is printed.

    python benchmarks/conv_fusion.py [--rounds 7] [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from _common import (OtherLoad, dnnpar_train_step, median, optional_torch, sgemm_peak_gflops, torch_train_step,
                     training_flops)

import dnnpar.nn.base as base  # noqa: E402  (_common put the checkout on sys.path)
from dnnpar.backend import cpu_native
from dnnpar.nn.fusion import fold_batchnorm
from dnnpar.nn.models import build
from dnnpar.nn.summary import summary
from dnnpar.ops import conv as conv_ops
from models import LR, MOMENTUM, RESNET, WEIGHT_DECAY, batch_of, dnnpar_nets, torch_nets, torch_twin

CONFIGS = ("unfused", "fused")


def set_config(name: str) -> None:
    base.FUSION = name == "fused"
    conv_ops.NATIVE["use"] = name == "fused"


def time_one(fn) -> float:
    t = time.perf_counter()
    fn()
    return (time.perf_counter() - t) * 1e3


def interleaved(fns: dict, rounds: int) -> dict:
    """{config: median ms}: each round runs every config once (after one warm-up call each)."""
    for name, fn in fns.items():
        set_config(name if name in CONFIGS else "fused")
        fn()
    runs = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            set_config(name if name in CONFIGS else "fused")
            runs[name].append(time_one(fn))
    return {name: median(r) for name, r in runs.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--quick", action="store_true", help="LeNet-5 only, 3 rounds")
    ap.add_argument("--threads", type=int, default=None,
                    help="BLAS, native-kernel and torch threads (threadpoolctl; default: BLAS's own count)")
    args = ap.parse_args(argv)
    if args.threads is not None:
        from threadpoolctl import threadpool_limits
        with threadpool_limits(args.threads):
            return run(args)
    return run(args)


def run(args) -> int:
    rounds = 3 if args.quick else args.rounds
    torch = optional_torch()
    if torch is not None:
        torch.set_num_threads(cpu_native.blas_threads() or 2)
    rng = np.random.default_rng(0)
    peak = sgemm_peak_gflops(budget_s=1.0)
    rows = []
    with OtherLoad() as load:
        zoo = [("LeNet-5", "lenet5", {}, 64)]
        if not args.quick:
            zoo.append(("VGG-16 32x32", "vgg16", dict(in_shape=(3, 32, 32), num_classes=10), 16))
        for label, name, kw, batch in zoo:
            model = build(name, **kw)
            xb, yb = batch_of(rng, model.input_shape, batch)
            step = dnnpar_train_step(model, LR, MOMENTUM, WEIGHT_DECAY)
            fns = {c: (lambda s=step: s(xb, yb)) for c in CONFIGS}
            if torch is not None:
                ts = torch_train_step(torch, torch_twin(torch, model), LR, MOMENTUM, WEIGHT_DECAY)
                fns["torch"] = lambda s=ts: s(xb, yb)
            rows.append((f"{label} train step", batch, training_flops(model) * batch, interleaved(fns, rounds)))
        if not args.quick:
            model = dnnpar_nets()["resnet"](**RESNET, softmax=False).eval()
            folded = fold_batchnorm(model)
            tm = None
            if torch is not None:
                torch.manual_seed(0)
                tm = torch_nets(torch)["resnet"](**RESNET, softmax=False).eval()
            macs = sum(r.macs for r in summary(model).rows)
            for batch in (1, 64):
                x, _ = batch_of(rng, RESNET["in_shape"], batch)
                fns = {"unfused": lambda: model.forward(x), "fused": lambda: folded.forward(x)}
                if tm is not None:
                    xt = torch.from_numpy(x)

                    def tfwd():
                        with torch.inference_mode():
                            return tm(xt)
                    fns["torch"] = tfwd
                rows.append(("ResNet-style 32x32 inference", batch, 2.0 * macs * batch, interleaved(fns, rounds)))
    set_config("fused")
    print(f"dnnpar conv fusion, numpy backend, {cpu_native.blas_threads()} thread(s); NumPy SGEMM {peak:,.0f} GFLOP/s measured in this run "
          f"(the bound each row's GFLOP/s is read against); median of {rounds} interleaved rounds")
    head = f"{'row':<30} {'batch':>5} {'unfused ms':>11} {'fused ms':>9} {'speedup':>8} {'torch ms':>9} " \
           f"{'fused/torch':>11} {'fused GFLOP/s':>13} {'% SGEMM':>8}"
    print(head)
    print("-" * len(head))
    for label, batch, flops, ms in rows:
        t, f = ms.get("torch"), ms["fused"]
        gf = flops / (f * 1e-3) / 1e9
        t_ms, ratio = ("-", "-") if t is None else (f"{t:.2f}", f"{f / t:.2f}x")
        print(f"{label:<30} {batch:>5} {ms['unfused']:>11.2f} {f:>9.2f} {ms['unfused'] / f:>7.2f}x {t_ms:>9} "
              f"{ratio:>11} {gf:>13.1f} {100 * gf / peak:>7.1f}%")
    print(f"other load on the machine during the run: {load.text()}")
    if torch is None:
        print("torch not importable: no PyTorch column (pip install torch)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
