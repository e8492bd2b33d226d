#!/usr/bin/env python3
"""Training speed of the numpy backend against PyTorch on the CPU, measured side by side in one run.

    python benchmarks/training.py                  # conv layer at batch 64, one LeNet-5 epoch on Fashion-MNIST
    python benchmarks/training.py --quick          # conv at batch 8, LeNet-5 on the embedded sample (< 2 min)
    python benchmarks/training.py --only conv --out bench-out/

conv:   DESIGN.md's anchor layer (batch 64, 64->64 channels, 56x56, 3x3, pad 1), forward and
        forward + backward: dp.ops.conv2d / dp.ops.conv2d_backward against
        torch.nn.functional.conv2d (inference mode; autograd for forward + backward).
lenet5: one training epoch of Caffe's LeNet-5 (batch 64, SGD lr 0.01, momentum 0.9, weight decay
        5e-4): dnnpar's model.forward / backward + SGD.step against the same network in torch,
        started from the same weights and fed the same batches in the same order.

torch is an optional peer, never a dependency: without it the peer column says so. Prints a
plain-text table and writes it as markdown plus the raw numbers as JSON into --out. This is a
measurement, never a test: the target from the issue (numpy backend within 2x of PyTorch) is
printed beside each row as met / MISSED for the reader to judge.
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under `python -m benchmarks.training`
from _common import (OtherLoad, blas_name, check_text, common_meta, dnnpar_train_step, median,  # noqa: E402
                     optional_torch, rand, rel_err, render_markdown, render_text, run_and_report, run_section,
                     time_runs, torch_train_step, training_flops, write_report)

import dnnpar as dp  # noqa: E402  (_common put the checkout on sys.path)
from dnnpar.data import fashion_mnist  # noqa: E402
from dnnpar.nn.models import build  # noqa: E402
from dnnpar.train import ProgressBar  # noqa: E402

#: the issue's target: dnnpar time / torch time at most this
TARGET_RATIO = 2.0
TARGET_TEXT = f"numpy backend within {TARGET_RATIO:g}x of PyTorch (dnnpar time / torch time <= {TARGET_RATIO:g})"

CONV = (64, 64, 64, 56, 3)   # DESIGN.md's anchor layer: N, C, O, H=W, KH=KW (pad 1)
CONV_QUICK_N = 8
BATCH, LR, MOMENTUM, WEIGHT_DECAY = 64, 0.01, 0.9, 5e-4
WARMUP_STEPS = 3             # training steps on a throwaway model before the timed epoch
EVAL_IMAGES = 1000           # test images scored after the epoch (a sanity check, not timed)
NOISY_SPREAD = 0.25          # a row's spread (see Row.spread) above this: flagged noisy
NOISY_OTHER_CORES = 0.2      # other processes busy on more cores than this during a measurement: noisy


# ---------------------------------------------------------------------------- results
@dataclass
class Row:
    """One measurement of dnnpar and its torch peer; derived columns are filled by :meth:`finish`."""
    section: str
    what: str
    size: str
    runs_ms: list = field(default_factory=list)   # dnnpar, ms of each run
    peer_runs_ms: list = field(default_factory=list)
    flops: float = 0.0          # floating-point operations of one run
    images: int = 0             # images processed by one run
    peer: str = ""
    check: str = ""
    note: str = ""
    other_cores: float | None = None       # cores other processes kept busy during the dnnpar runs
    peer_other_cores: float | None = None  # ... during the peer's runs
    noise: str = ""                        # another sign of a noisy measurement, in words
    # derived
    ms: float | None = None
    peer_ms: float | None = None
    gflops: float | None = None
    peer_gflops: float | None = None
    images_per_s: float | None = None
    peer_images_per_s: float | None = None
    ratio: float | None = None       # dnnpar ms / peer ms: above 1 means dnnpar is slower
    target_met: bool | None = None
    spread: float | None = None      # of the dnnpar runs: (max - min) / median, or (p90 - p10) / median from 10 runs
    peer_spread: float | None = None

    def finish(self) -> None:
        def rates(runs):
            ms = median(runs)
            if not ms:
                return None, None, None, None
            lo, hi = np.percentile(runs, (10, 90)) if len(runs) >= 10 else (min(runs), max(runs))
            spread = float(hi - lo) / ms if len(runs) > 1 else None
            return (ms, self.flops / (ms / 1e3) / 1e9 if self.flops else None,
                    self.images / (ms / 1e3) if self.images else None, spread)

        self.ms, self.gflops, self.images_per_s, self.spread = rates(self.runs_ms)
        self.peer_ms, self.peer_gflops, self.peer_images_per_s, self.peer_spread = rates(self.peer_runs_ms)
        if self.ms and self.peer_ms:
            self.ratio = self.ms / self.peer_ms
            self.target_met = self.ratio <= TARGET_RATIO

    def noise_signs(self) -> list[str]:
        """Why this row's times may be off, in words; empty when nothing looked wrong."""
        signs = []
        for who, spread, cores in (("dnnpar", self.spread, self.other_cores),
                                   ("peer", self.peer_spread, self.peer_other_cores)):
            if spread is not None and spread > NOISY_SPREAD:
                signs.append(f"{who} spread ±{50 * spread:.0f}%")
            if cores is not None and cores > NOISY_OTHER_CORES:
                signs.append(f"others busy on {cores:.1f} cores during {who}")
        return signs + ([self.noise] if self.noise else [])


# ---------------------------------------------------------------------------- the benchmark
class TrainingBench:
    COLUMNS = ("what", "size", "median ms", "GFLOP/s", "images/s", "peer", "peer ms", "peer GFLOP/s",
               "dnnpar/peer", "target", "runs", "check")
    RIGHT = {2, 3, 4, 6, 7, 8, 10}

    def __init__(self, args):
        self.args, self.quick = args, args.quick
        self.rows: list[Row] = []
        self.meta = common_meta("numpy", args)
        self.meta["blas"] = blas_name()
        self.torch = optional_torch()
        if self.torch is not None:
            self.meta["torch"] = f"{self.torch.__version__} ({self.torch.get_num_threads()} threads, the default)"
        else:
            self.meta["torch"] = "not installed (no peer; `pip install torch` to measure one)"
        self.repeat = args.repeat or (15 if self.quick else 30)
        self.budget_s = 1.0 if self.quick else 4.0
        self.rng = np.random.default_rng(args.seed)

    def time(self, fn):
        """(ms of each run, the first call's result, cores other processes kept busy meanwhile)."""
        with OtherLoad() as load:
            runs, first = time_runs(fn, self.repeat, self.budget_s)
        return runs, first, load.cores

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def section(self, name: str, fn) -> None:
        """Run one group; a failure becomes an error row and the run goes on (the numpy conv path
        may be mid-rewrite when this runs)."""
        run_section(name, fn, self.args.only, self.meta,
                    lambda msg: self.add(Row(name, f"{name}: error", "-", note=msg)))

    def run(self) -> None:
        dp.set_backend("numpy")
        self.section("conv", self.conv)
        self.section("lenet5", self.lenet5)

    # ---- conv layer
    def conv(self) -> None:
        n, c, o, hw, k = CONV
        n = CONV_QUICK_N if self.quick else n
        x, w = rand(self.rng, (n, c, hw, hw)), rand(self.rng, (o, c, k, k)) * 0.05
        b, dy = rand(self.rng, o), rand(self.rng, (n, o, hw, hw))
        size = f"N{n} {c}->{o} {hw}x{hw} {k}x{k} p1"
        flops = 2.0 * n * o * hw * hw * c * k * k  # forward; backward is dx + dw, twice that

        fwd = self.add(Row("conv", "conv2d forward", size, flops=flops, images=n))
        fwd.runs_ms, y, fwd.other_cores = self.time(lambda: dp.ops.conv2d(x, w, b, padding=1))

        def forward_backward():
            dp.ops.conv2d(x, w, b, padding=1)
            return dp.ops.conv2d_backward(x, w, dy, padding=1)

        both = self.add(Row("conv", "conv2d forward + backward", size, flops=3 * flops, images=n))
        both.runs_ms, grads, both.other_cores = self.time(forward_backward)
        if self.torch is None:
            return
        torch, F = self.torch, self.torch.nn.functional
        fwd.peer = both.peer = "torch F.conv2d (CPU)"
        xt, wt, bt, dyt = (torch.from_numpy(a) for a in (x, w, b, dy))
        with torch.inference_mode():
            fwd.peer_runs_ms, yt, fwd.peer_other_cores = self.time(lambda: F.conv2d(xt, wt, bt, padding=1))
        fwd.check = f"y {check_text(rel_err(y, yt.numpy()))}"

        leaves = [torch.from_numpy(a.copy()).requires_grad_() for a in (x, w, b)]

        def torch_forward_backward():
            for t in leaves:
                t.grad = None  # fresh gradients each run, as dnnpar returns fresh arrays
            F.conv2d(*leaves, padding=1).backward(dyt)
            return [t.grad for t in leaves]

        both.peer_runs_ms, want, both.peer_other_cores = self.time(torch_forward_backward)
        both.check = ", ".join(f"{name} {check_text(rel_err(got, ref.numpy()))}"
                               for name, got, ref in zip(("dx", "dw", "db"), grads, want))

    # ---- LeNet-5 epoch
    def dataset(self):
        if self.quick or self.args.subset == "embedded":
            return fashion_mnist.load(subset="embedded"), ""
        try:
            return fashion_mnist.load(self.args.data_dir, "full"), ""
        except FileNotFoundError:
            return fashion_mnist.load(subset="embedded"), \
                "full Fashion-MNIST not found: the embedded sample instead (see dnnpar.data.fashion_mnist)"

    def batches(self, data, limit=None):
        """The epoch's batches (the first ``limit`` of them), in the same order for both frameworks."""
        return itertools.islice(fashion_mnist.batches(data.x_train, data.y_train, BATCH, seed=self.args.seed,
                                                      epoch=1), limit)

    training_flops = staticmethod(training_flops)  # shared with models.py (_common)

    def lenet5(self) -> None:
        data, note = self.dataset()
        seed = self.args.seed
        model = build("lenet5", seed=seed)
        n_images, n_batches = len(data.y_train), -(-len(data.y_train) // BATCH)
        embedded = Path(data.source) == fashion_mnist.EMBEDDED
        size = f"{n_images:,} images ({'embedded sample' if embedded else 'full'}), batch {BATCH}"
        self.meta["lenet5 data"] = repr(data)
        flops_per_image = self.training_flops(model)
        epoch = self.add(Row("lenet5", "LeNet-5 train epoch", size, flops=flops_per_image * n_images,
                             images=n_images, note=note))
        step = self.add(Row("lenet5", "LeNet-5 train step (median)", f"batch {BATCH}",
                            flops=flops_per_image * BATCH, images=BATCH))
        if self.torch is not None:
            torch_model = self.torch_lenet5(model.state_dict())  # the same initial weights
            xb = data.x_train[:BATCH]
            with self.torch.inference_mode():
                logits_err = rel_err(model.forward(xb), torch_model(self.torch.from_numpy(xb)).numpy())

        # one framework after the other: run side by side batch by batch, each one's idle threads
        # (OpenBLAS, OpenMP) spin on the cores the other needs, and torch's steps took twice as long
        self.epoch("dnnpar warm-up", self.dnnpar_step(build("lenet5", seed=seed + 1)), self.batches(data, WARMUP_STEPS))
        step.runs_ms, loss, step.other_cores = self.epoch("dnnpar", self.dnnpar_step(model), self.batches(data),
                                                          n_batches)
        epoch.runs_ms, epoch.other_cores = [sum(step.runs_ms)], step.other_cores
        epoch.noise = self.epoch_tail("dnnpar", step.runs_ms)
        acc = self.dnnpar_accuracy(model, data)
        if self.torch is None:
            epoch.check = f"dnnpar loss {loss:.4f}, test acc {100 * acc:.1f}%"
            return
        warm = self.torch_lenet5(build("lenet5", seed=seed + 1).state_dict())
        self.epoch("torch warm-up", self.torch_step(warm), self.batches(data, WARMUP_STEPS))
        step.peer_runs_ms, t_loss, step.peer_other_cores = self.epoch("torch", self.torch_step(torch_model),
                                                                      self.batches(data), n_batches)
        epoch.peer_runs_ms, epoch.peer_other_cores = [sum(step.peer_runs_ms)], step.peer_other_cores
        epoch.noise = ", ".join(s for s in (epoch.noise, self.epoch_tail("torch", step.peer_runs_ms)) if s)
        epoch.peer = step.peer = "torch LeNet-5 (CPU)"
        step.check = f"initial logits {check_text(logits_err)}"
        epoch.check = (f"loss {loss:.4f} / {t_loss:.4f}, test acc {100 * acc:.1f}% / "
                       f"{100 * self.torch_accuracy(torch_model, data):.1f}% (dnnpar / torch)")

    @staticmethod
    def epoch(name: str, step, batches, total: int | None = None):
        """Run ``step(x, y) -> loss`` over the batches: (ms of each step, mean loss, cores other
        processes kept busy meanwhile). The progress bar (shown when ``total`` is given) is not timed."""
        steps, loss_sum, seen = [], 0.0, 0
        bar = ProgressBar(total or 0, f"{name} LeNet-5 epoch", enabled=total is not None)
        with OtherLoad() as load:
            for i, (xb, yb) in enumerate(batches, 1):
                t = time.perf_counter()
                loss = step(xb, yb)
                steps.append((time.perf_counter() - t) * 1e3)
                loss_sum, seen = loss_sum + loss * len(yb), seen + len(yb)
                bar.update(i, loss_sum / seen)
        return steps, loss_sum / max(seen, 1), load.cores

    @staticmethod
    def epoch_tail(who: str, steps) -> str:
        """A sign of a noisy epoch: its time well above steps x the median step (a burst of load
        from elsewhere stretches some steps; the median does not move)."""
        tail = sum(steps) / (len(steps) * median(steps)) if steps else 1.0
        return f"{who} epoch {tail:.2f}x (steps x median step)" if tail > 1 + NOISY_SPREAD else ""

    @staticmethod
    def dnnpar_step(model):
        """One step of what dnnpar.train.train runs per batch, without its accuracy bookkeeping."""
        return dnnpar_train_step(model, LR, MOMENTUM, WEIGHT_DECAY)

    def torch_step(self, model):
        return torch_train_step(self.torch, model, LR, MOMENTUM, WEIGHT_DECAY)

    @staticmethod
    def dnnpar_accuracy(model, data) -> float:
        model.eval()
        logits = np.concatenate([model.forward(data.x_test[i:i + 500]) for i in range(0, EVAL_IMAGES, 500)])
        model.train()
        return float((logits.argmax(axis=1) == data.y_test[:len(logits)]).mean())

    def torch_lenet5(self, state: dict):
        """Caffe's LeNet-5 in torch, loaded from a dnnpar state dict (same OIHW / (out, in) layouts)."""
        nn = self.torch.nn
        layers = {"conv1": nn.Conv2d(1, 20, 5), "pool1": nn.MaxPool2d(2), "conv2": nn.Conv2d(20, 50, 5),
                  "pool2": nn.MaxPool2d(2), "flatten": nn.Flatten(), "fc1": nn.Linear(800, 500),
                  "relu1": nn.ReLU(), "fc2": nn.Linear(500, 10)}
        model = nn.Sequential(*layers.values())
        with self.torch.no_grad():
            for name, layer in layers.items():
                for pname, p in layer.named_parameters():
                    p.copy_(self.torch.from_numpy(state[f"{name}.{pname}"]))
        return model

    def torch_accuracy(self, model, data) -> float:
        with self.torch.inference_mode():
            logits = model(self.torch.from_numpy(data.x_test[:EVAL_IMAGES])).numpy()
        return float((logits.argmax(axis=1) == data.y_test[:len(logits)]).mean())

    # ---- output
    def finish(self) -> None:
        for r in self.rows:
            r.finish()

    def table_cells(self) -> list[list[str]]:
        def num(v, fmt):
            return "-" if v is None else format(v, fmt)

        out = []
        for r in self.rows:
            if r.ratio is not None:
                target = f"<={TARGET_RATIO:g}x: {'met' if r.target_met else 'MISSED'}"
            elif r.ms is not None:
                target = "? (no peer)"
            else:
                target = "-"
            peer = r.peer or ("torch not installed" if self.torch is None and r.ms is not None else "-")
            runs = "-" if not r.runs_ms else str(len(r.runs_ms)) + (
                f" (±{50 * r.spread:.0f}%)" if r.spread is not None else "")
            signs = r.noise_signs()
            noisy = f"NOISY: {', '.join(signs)}" if signs else ""
            check = "; ".join(s for s in (r.check, r.note, noisy) if s) or "-"
            out.append([r.what, r.size, num(r.ms, ",.1f"), num(r.gflops, ",.1f"), num(r.images_per_s, ",.0f"),
                        peer, num(r.peer_ms, ",.1f"), num(r.peer_gflops, ",.1f"),
                        "-" if r.ratio is None else f"{r.ratio:.2f}x", target, runs, check])
        return out

    def header_lines(self) -> list[str]:
        return ["dnnpar training benchmark, numpy backend vs PyTorch (CPU)"] + \
            [f"{k}: {v}" for k, v in self.meta.items()] + [f"target: {TARGET_TEXT}"]

    def footnotes(self) -> list[str]:
        return [
            "median ms: median of the timed runs after warm-up (conv: time.perf_counter around each call, as many "
            "runs as fit in a time budget, at least 3; LeNet-5 epoch: one epoch after "
            f"{WARMUP_STEPS} warm-up steps on a throwaway model, so one run, the sum of its steps; step: median over "
            "the epoch's steps, which shrugs off a neighbour's load better). dnnpar runs first, then torch.",
            "GFLOP/s: conv forward 2*N*O*OH*OW*C*KH*KW, forward + backward three times that (dx and dw); "
            "LeNet-5 training 2*MACs forward + 2*MACs weight gradients + 2*MACs input gradients (none for conv1).",
            f"dnnpar/peer = dnnpar ms / peer ms (below 1: dnnpar is faster); target {TARGET_TEXT}.",
            "runs: timed runs (± half the spread, as % of the median: max - min, or p90 - p10 from 10 runs on, "
            "so the last, smaller LeNet-5 batch does not count). NOISY: a spread above "
            f"{100 * NOISY_SPREAD:.0f}%, other processes busy on more than {NOISY_OTHER_CORES:g} cores during the "
            "runs (/proc/stat less this process; other guests on the same host show only through the spread), or "
            f"an epoch more than {100 * NOISY_SPREAD:.0f}% longer than its steps x its median step. When the "
            "epoch row is noisy, the step row's medians are the better guide. The JSON keeps every run.",
            "check: max relative error against torch's result (conv: y, dx, dw, db; LeNet-5: the initial "
            f"models' logits on one batch, then each framework's mean epoch loss and accuracy on the first "
            f"{EVAL_IMAGES} test images after training from the same weights on the same batches).",
        ]

    def text(self) -> str:
        return render_text(self.header_lines(), self.COLUMNS, self.table_cells(), self.RIGHT, self.footnotes())

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        return write_report(out_dir, "training-numpy",
                            render_markdown(self.header_lines(), self.COLUMNS, self.table_cells(), self.RIGHT,
                                            self.footnotes()),
                            {"meta": self.meta, "target_ratio": TARGET_RATIO, "rows": [asdict(r) for r in self.rows]})


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench-out",
                    help="folder for the markdown table and the JSON (default: bench-out/)")
    ap.add_argument("--quick", action="store_true",
                    help="conv at batch 8 and LeNet-5 on the embedded sample (under 2 minutes)")
    ap.add_argument("--only", nargs="+", choices=("conv", "lenet5"), help="run only these sections")
    ap.add_argument("--subset", choices=("full", "embedded"), default="full",
                    help="LeNet-5 data: the full Fashion-MNIST (falls back to the embedded sample when not "
                         "found) or the embedded sample; --quick implies embedded")
    ap.add_argument("--data-dir", help="where the Fashion-MNIST IDX files are (default: dnnpar's search path)")
    ap.add_argument("--repeat", type=int, help="most timed runs per conv measurement (default 30, --quick 15)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    return run_and_report(TrainingBench(args), args.out)


if __name__ == "__main__":
    sys.exit(main())
