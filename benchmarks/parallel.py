#!/usr/bin/env python3
"""Parallel training on this machine (CPU): throughput and scaling of synchronous data parallel
(MPI allreduce), Hogwild and the Ray parameter server for 1, 2 and 4 workers, and the cost of
AlexNet's model-parallel and hybrid splits, measured side by side in one run.

    python benchmarks/parallel.py                 # lenet300 on the embedded subset, 1 / 2 / 4 workers
    python benchmarks/parallel.py --quick         # one epoch, fewer sizes (a couple of minutes)
    python benchmarks/parallel.py --model lenet5 --subset full --epochs 2
    python benchmarks/parallel.py --model lenet5 --strategies --no-split --overlap-ab 5   # overlap A/B only
    python benchmarks/parallel.py --strategies --no-split --dgc-parity 4   # DGC 0.1% against dense, 4 seeds

Every worker process runs with one BLAS thread (OPENBLAS_NUM_THREADS=1 and friends), so the
scaling measures the parallel strategy and not BLAS threading; the 1-worker row is the same
code with one process. On a machine with fewer cores than workers the extra workers time-share
cores: the table says how many cores there are, and efficiency past that count is not expected.
Accuracy is the test accuracy after the run (the same epochs and learning rate for every row).

Model parallel / hybrid: one forward + backward step of AlexNet (two columns, dropout off) on
2 MPI ranks against the single-process model, with the bytes each rank sends per step.

A measurement, never a test: nothing is asserted about time. Writes markdown + JSON into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

RESULT = "RESULT "


def _env() -> dict:
    from dnnpar.parallel.comm import mpi_env

    return mpi_env(dict(os.environ, PYTHONPATH=str(C.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")))


def _run_worker(n: int, args: list[str], timeout: float = 1800) -> dict:
    """Run this script as an MPI job of n ranks in worker mode; return rank 0's RESULT line."""
    from dnnpar.parallel.comm import mpiexec

    cmd = mpiexec(n) + [sys.executable, __file__, "--worker", *args]
    r = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-2000:]}")
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT)]
    if not lines:
        raise RuntimeError(f"no result from {' '.join(cmd)}:\n{r.stdout[-2000:]}")
    return json.loads(lines[-1][len(RESULT):])


def _correct(model, a) -> str:
    """Which test images ``model`` classifies right, one '1' or '0' per image."""
    from dnnpar.data import fashion_mnist
    from dnnpar.steps import predict

    d = fashion_mnist.load(a.data_dir, a.subset)
    return "".join("01"[int(c)] for c in predict(model, d.x_test) == d.y_test)


# ---------------------------------------------------------------------------- workers (under mpiexec)
def worker(argv) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("kind", choices=("data", "split"))
    ap.add_argument("--model", default="lenet300")
    ap.add_argument("--subset", default="embedded")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--mode", default="model")
    ap.add_argument("--in-size", type=int, default=227)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--overlap", type=int, default=1, help="data: 1 start buckets from backward, 0 after it")
    ap.add_argument("--accumulate", type=int, default=1)
    ap.add_argument("--bucket-mb", type=float, default=None)
    ap.add_argument("--grad-compression", default="none", help="data: none | fp16 | bf16 | dgc:DENSITY")
    ap.add_argument("--dgc-warmup", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--schedule", default="constant")
    ap.add_argument("--predictions", action="store_true", help="data: also report which test images the model gets right")
    a = ap.parse_args(argv)
    import dnnpar as dp
    from dnnpar.parallel.comm import MPICommunicator

    dp.set_backend("numpy")
    comm = MPICommunicator()
    if a.kind == "data":
        from dnnpar.parallel.data_parallel import run_data_parallel
        from dnnpar.train import TrainConfig

        cfg = TrainConfig(model=a.model, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, subset=a.subset,
                          data_dir=a.data_dir, schedule=a.schedule, seed=a.seed)
        from dnnpar.parallel.data_parallel import DEFAULT_BUCKET_MB, make_grad_hook, parse_grad_compression

        hook = make_grad_hook(*parse_grad_compression(a.grad_compression), warmup_epochs=a.dgc_warmup, seed=a.seed)
        t0 = time.perf_counter()
        result = run_data_parallel(cfg, comm, bucket_mb=a.bucket_mb or DEFAULT_BUCKET_MB,
                                   accumulate=a.accumulate, overlap=bool(a.overlap), progress=False,
                                   hook=hook, out=lambda *x: None)
        par = result.details
        wall = time.perf_counter() - t0
        if comm.rank == 0:
            rep = result.report()
            print(RESULT + json.dumps({"images_s": rep["images_per_s"], "test_acc": rep["final_accuracy"],
                                       "wall_s": wall, "comm_s": par.comm_seconds, "exposed_s": par.exposed_seconds,
                                       "overlap_fraction": rep["overlap_fraction"], "steps": par.steps,
                                       "buckets": rep["buckets"],
                                       "bytes_per_step": par.bytes_reduced / max(par.steps, 1),
                                       "sent_per_step": rep["grad_bytes_per_step"],
                                       "dense_sent_per_step": rep["dense_grad_bytes_per_step"],
                                       "sent_after_warmup": rep.get("grad_bytes_per_step_after_warmup"),
                                       "sent_by_epoch": rep.get("grad_bytes_per_step_by_epoch"),
                                       "acc_by_epoch": [r.test_acc for r in result.history.records],
                                       "correct": _correct(result.model, a) if a.predictions else None}),
                  flush=True)
        return 0
    # split: AlexNet (two columns, dropout off), one forward + backward per step
    from dnnpar.nn import SoftmaxCrossEntropy
    from dnnpar.nn.models import alexnet
    from dnnpar.parallel.model_parallel import split_model

    groups = 2 if a.mode in ("model", "single2") else 1
    model = alexnet(num_classes=1000, groups=groups, in_shape=(3, a.in_size, a.in_size), dropout=0.0, seed=0)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((a.batch_size, 3, a.in_size, a.in_size)).astype(np.float32)
    y = rng.integers(0, 1000, a.batch_size)
    net = model if a.mode.startswith("single") else split_model(model, comm, a.mode)
    if a.mode == "hybrid":
        n = a.batch_size // comm.size
        x = x[comm.rank * n:(comm.rank + 1) * n]
    loss_fn = SoftmaxCrossEntropy()

    def step():
        logits = net.forward(x)
        loss_fn(logits, y)
        net.backward(loss_fn.backward())
        if hasattr(net, "sync_grads"):
            net.sync_grads()

    step()  # warm-up
    if hasattr(net, "reset_stats"):
        net.reset_stats()
    times = []
    for _ in range(a.steps):
        comm.barrier()
        t0 = time.perf_counter()
        step()
        comm.barrier()
        times.append(time.perf_counter() - t0)
    if comm.rank == 0:
        sent = net.bytes_sent / a.steps if hasattr(net, "bytes_sent") else 0
        print(RESULT + json.dumps({"ms": 1e3 * float(np.median(times)), "bytes_per_step": sent,
                                   "params": int(sum(p.size for _, p, _ in net.named_parameters()))}), flush=True)
    return 0


def _save(fig, path: Path) -> Path:
    """A figure as ``path``, SVG text kept as text and no date (the file diffs only when it changes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    import matplotlib
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "dnnpar"}):
        fig.savefig(path, metadata={"Date": None} if path.suffix == ".svg" else None)
    return path


# ---------------------------------------------------------------------------- the benchmark
class ParallelBench:
    def __init__(self, args):
        self.args = args
        self.meta = C.common_meta("numpy", args)
        self.meta["workload"] = (f"{args.model} on the {args.subset} Fashion-MNIST, {args.epochs} epoch(s), batch "
                                 f"{args.batch_size} per worker, lr {args.lr}")
        self.meta["threads"] = "one BLAS thread per worker process"
        self.meta["DGC"] = (f"warm-up over {args.dgc_warmup} epoch(s) from 25%; bytes per step are the whole run's "
                            "mean, warm-up included")
        self.rows = []  # dicts

    def add(self, **row):
        self.rows.append(row)
        print(f"  {row['strategy']:<28} {row['workers']:>3}  {row.get('images_s', float('nan')):10.0f} img/s", flush=True)

    def run(self):
        a = self.args
        common = ["--model", a.model, "--subset", a.subset, "--epochs", str(a.epochs), "--batch-size",
                  str(a.batch_size), "--lr", str(a.lr)] + (["--data-dir", a.data_dir] if a.data_dir else [])
        for strategy in a.strategies:
            for n in a.workers:
                try:
                    self.add(**self.measure(STRATEGIES[strategy], n, common))
                except Exception as e:  # noqa: BLE001 - report and go on with the other rows
                    first = (str(e).strip().splitlines() or [""])[0]
                    self.rows.append({"strategy": STRATEGIES[strategy], "workers": n, "error": f"{type(e).__name__}: {first}"[:200]})
                    print(f"  {strategy} x{n}: {self.rows[-1]['error']}", flush=True)
        if a.split:
            self.measure_split()
        if a.overlap_ab:
            self.measure_overlap()
        if a.dgc_parity:
            self.measure_dgc_parity()

    def measure_dgc_parity(self):
        """DGC at 0.1% against dense sync SGD on 2 ranks, seed by seed (the same seed, cosine
        schedule and epochs for both), long enough for DGC to send each entry of the largest layer
        a few times: accuracy gap with two standard errors of the paired per-image difference,
        bytes per step after the warm-up and over the whole run."""
        a = self.args
        self.parity_rows, self.parity_curves = [], {}
        for model in a.parity_models:
            epochs, lr = PARITY[model]
            epochs = a.parity_epochs or epochs
            base = ["data", "--model", model, "--subset", a.subset, "--epochs", str(epochs), "--batch-size",
                    str(a.batch_size), "--lr", str(lr), "--schedule", "cosine", "--predictions"] + (
                       ["--data-dir", a.data_dir] if a.data_dir else [])
            for seed in range(a.dgc_parity):
                dense = _run_worker(2, base + ["--seed", str(seed)])
                dgc = _run_worker(2, base + ["--seed", str(seed), "--grad-compression", "dgc:0.001",
                                             "--dgc-warmup", str(a.parity_warmup)])
                d = np.array([int(x) for x in dense["correct"]], np.float64) - [int(x) for x in dgc["correct"]]
                self.parity_rows.append({
                    "model": model, "epochs": epochs, "lr": lr, "seed": seed, "dense_acc": dense["test_acc"],
                    "dgc_acc": dgc["test_acc"], "gap": float(d.mean()), "se": float(d.std(ddof=1) / np.sqrt(d.size)),
                    "test_images": int(d.size), "dense_sent": dense["sent_per_step"], "sent": dgc["sent_per_step"],
                    "sent_after_warmup": dgc["sent_after_warmup"]})
                self.parity_curves.setdefault(model, []).append(
                    {"dense_acc": dense["acc_by_epoch"], "dgc_acc": dgc["acc_by_epoch"],
                     "dgc_sent": dgc["sent_by_epoch"], "dense_sent": dense["sent_per_step"]})
                r = self.parity_rows[-1]
                print(f"  DGC 0.1% against dense, {model} seed {seed}: {100 * r['dgc_acc']:.1f}% / "
                      f"{100 * r['dense_acc']:.1f}%", flush=True)
        self.meta["DGC parity"] = (f"2 ranks, batch {a.batch_size} per rank, cosine schedule, warm-up over "
                                   f"{a.parity_warmup} epoch(s) from 25%, seeds 0-{a.dgc_parity - 1}")

    def parity_notes(self) -> list[str]:
        rows = getattr(self, "parity_rows", None)
        if not rows:
            return []
        cells = [[r["model"], str(r["epochs"]), str(r["seed"]), f"{100 * r['dense_acc']:.1f}%",
                  f"{100 * r['dgc_acc']:.1f}%", f"{100 * r['gap']:+.2f} ± {200 * r['se']:.2f}",
                  f"{r['sent_after_warmup']:,.0f}", f"{r['dense_sent'] / r['sent_after_warmup']:,.0f}x",
                  f"{r['dense_sent'] / r['sent']:,.0f}x"] for r in rows]
        for model in dict.fromkeys(r["model"] for r in rows):
            gaps = [r["gap"] for r in rows if r["model"] == model]
            spread = float(np.std(gaps, ddof=1) / np.sqrt(len(gaps))) if len(gaps) > 1 else float("nan")
            cells.append([model, "", "mean", "", "", f"{100 * np.mean(gaps):+.2f} ± {200 * spread:.2f}", "", "", ""])
        return ["", "DGC at 0.1% against dense sync SGD (2 ranks, the same seed for both):"] + C.text_table(
            ("model", "epochs", "seed", "dense", "DGC 0.1%", "gap, points (± 2 SE)", "DGC bytes/step after warm-up",
             "fewer than dense, after warm-up", "whole run"), cells, {1, 2, 3, 4, 5, 6, 7, 8}) + [
            "gap: dense accuracy minus DGC's (positive: DGC behind); ± 2 SE: two standard errors of the paired "
            "per-image difference on the test images (a seed's row), or of the seeds' gaps (the mean row).",
            "whole run: the bytes over every step, the warm-up's denser epochs included."]

    def measure_overlap(self):
        """Sync data parallel on 2 ranks with buckets started from backward against all of them after
        it: the pairs interleaved, ``--overlap-ab`` times, medians (and ranges: the noise)."""
        a = self.args
        common = ["data", "--model", a.model, "--subset", a.subset, "--epochs", "1", "--batch-size",
                  str(a.batch_size), "--lr", str(a.lr), "--bucket-mb", str(a.ab_bucket_mb)] + (
                     ["--data-dir", a.data_dir] if a.data_dir else [])
        runs = {1: [], 0: []}
        for _ in range(a.overlap_ab):
            for ov in (1, 0):
                runs[ov].append(_run_worker(2, common + ["--overlap", str(ov)]))
        self.overlap_rows = []
        exposed_off = C.median([r["exposed_s"] / r["steps"] for r in runs[0]])
        for ov, label in ((1, "from backward (--overlap)"), (0, "after backward (--no-overlap)")):
            rs = runs[ov]
            img = [r["images_s"] for r in rs]
            exposed = C.median([r["exposed_s"] / r["steps"] for r in rs])
            self.overlap_rows.append({
                "allreduce": label, "images_s": C.median(img), "images_s_min": min(img), "images_s_max": max(img),
                "comm_ms_per_step": 1e3 * C.median([r["comm_s"] / r["steps"] for r in rs]),
                "exposed_ms_per_step": 1e3 * exposed, "hidden_in_run": C.median([r["overlap_fraction"] for r in rs]),
                "exposed_vs_no_overlap": exposed / exposed_off if exposed_off > 0 else float("nan"),
                "buckets": rs[0]["buckets"]})
        # paired: each overlap run against the no-overlap run beside it (the load drifts between pairs)
        ratios = [on["images_s"] / off["images_s"] for on, off in zip(runs[1], runs[0])]
        self.overlap_pairs = {"images_s_ratio_median": C.median(ratios), "min": min(ratios), "max": max(ratios)}
        self.meta["overlap workload"] = (f"{a.model}, 2 ranks, batch {a.batch_size} per rank, {a.ab_bucket_mb:g} MiB "
                                         f"buckets, 1 epoch per run, {a.overlap_ab} interleaved pairs")

    def measure(self, strategy: str, n: int, common: list[str]) -> dict:
        a = self.args
        if strategy in SYNC_VARIANTS:
            extra = SYNC_VARIANTS[strategy] + (["--dgc-warmup", str(a.dgc_warmup)] if strategy.startswith("sync, DGC") else [])
            r = _run_worker(n, ["data", *common, *extra])
            sent, dense = r["sent_per_step"], r["dense_sent_per_step"]
            return {"strategy": strategy, "workers": n, "images_s": r["images_s"], "test_acc": r["test_acc"],
                    "sent_per_step": sent, "dense_sent_per_step": dense,
                    "comm": (f"{r['comm_s']:.1f} s in flight, {100 * r['overlap_fraction']:.0f}% hidden; sends "
                             f"{sent / 1e3:,.1f} kB/step" + (f" ({dense / sent:,.0f}x fewer than dense)"
                                                            if sent > 0 and dense > sent * 1.01 else ""))}
        from dnnpar.train import TrainConfig

        cfg = TrainConfig(model=a.model, epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, subset=a.subset,
                          data_dir=a.data_dir, schedule="constant", backend="numpy")
        if strategy == "hogwild":
            from dnnpar.parallel.hogwild import run_hogwild
            result = run_hogwild(cfg, workers=n, progress=False, out=lambda *x: None)
            rep = result.details
            return {"strategy": strategy, "workers": n, "images_s": rep.images_per_s, "test_acc": rep.final_accuracy,
                    "comm": "shared memory, no locks"}
        if strategy.startswith("parameter server"):
            from dnnpar.parallel.ps import run_parameter_server
            result = run_parameter_server(cfg, workers=n, servers=1, consistency="asp", progress=False,
                                          out=lambda *x: None)
            rep = result.details
            return {"strategy": strategy, "workers": n, "images_s": rep.images_per_s, "test_acc": rep.final_accuracy,
                    "comm": f"staleness max {rep.max_staleness}"}
        raise ValueError(strategy)

    def measure_split(self):
        a = self.args
        size, batch = (67, 8) if a.quick else (227, 16)
        base = ["split", "--in-size", str(size), "--batch-size", str(batch), "--steps", "2" if a.quick else "3"]
        single = _run_worker(1, base + ["--mode", "single2"])
        self.split_rows = [("AlexNet 2 columns, 1 process", 1, single["ms"], 0.0)]
        for mode, label in (("model", "model parallel (2 columns)"), ("hybrid", "hybrid (conv data, fc model)")):
            r = _run_worker(2, base + ["--mode", mode])
            self.split_rows.append((label, 2, r["ms"], r["bytes_per_step"]))
        self.meta["split workload"] = f"AlexNet at {size}x{size}, batch {batch}, forward + backward, dropout off"

    def finish(self):
        dense = {r["workers"]: r["test_acc"] for r in self.rows if r["strategy"] == STRATEGIES["sync"] and "test_acc" in r}
        for r in self.rows:
            if r["strategy"] in SYNC_VARIANTS and "test_acc" in r and r["workers"] in dense:
                r["acc_vs_dense"] = r["test_acc"] - dense[r["workers"]]
        base = {}
        for r in self.rows:
            if "images_s" in r and r["workers"] == min(self.args.workers):
                base[r["strategy"]] = r["images_s"] * 1 / r["workers"]
        for r in self.rows:
            b = base.get(r["strategy"])
            if "images_s" in r and b:
                r["speedup"] = r["images_s"] / (b * min(self.args.workers))
                r["efficiency"] = r["speedup"] / (r["workers"] / min(self.args.workers))

    def cells(self):
        out = []
        for r in self.rows:
            if "error" in r:
                out.append([r["strategy"], str(r["workers"]), "-", "-", "-", "-", "-", r["error"]])
                continue
            d = r.get("acc_vs_dense")
            out.append([r["strategy"], str(r["workers"]), f"{r['images_s']:,.0f}", f"{r.get('speedup', 0):.2f}x",
                         f"{100 * r.get('efficiency', 0):.0f}%", f"{100 * r['test_acc']:.2f}%",
                         "-" if d is None else f"{100 * d:+.2f}", r["comm"]])
        return out

    COLUMNS = ("strategy", "workers", "images/s", "speedup", "efficiency", "test acc", "vs dense sync (points)",
               "communication")

    def header(self):
        return ["dnnpar parallel training benchmark (CPU)"] + [f"{k}: {v}" for k, v in self.meta.items()]

    def footnotes(self):
        notes = [f"speedup: images/s over the same strategy's {min(self.args.workers)}-worker row; efficiency: "
                 "speedup / worker ratio. This machine has "
                 f"{C.cpu_cores()} cores: rows with more workers than cores time-share them."]
        if getattr(self, "split_rows", None):
            notes.append("")
            notes += C.text_table(("split", "ranks", "ms / step", "MB sent per rank per step"),
                                  [[s, str(n), f"{ms:,.0f}", f"{b / 1e6:,.2f}"] for s, n, ms, b in self.split_rows],
                                  {1, 2, 3})
        if getattr(self, "overlap_rows", None):
            notes.append("")
            notes += C.text_table(
                ("allreduce", "buckets", "images/s (min-max)", "in flight ms/step", "exposed ms/step",
                 "hidden (in run)", "exposed / no-overlap's"),
                [[r["allreduce"], str(r["buckets"]), f"{r['images_s']:,.0f} ({r['images_s_min']:,.0f}-"
                  f"{r['images_s_max']:,.0f})", f"{r['comm_ms_per_step']:.2f}", f"{r['exposed_ms_per_step']:.2f}",
                  f"{100 * r['hidden_in_run']:.0f}%", f"{r['exposed_vs_no_overlap']:.2f}"] for r in self.overlap_rows],
                {1, 2, 3, 4, 5, 6})
            pr = self.overlap_pairs
            notes.append(f"images/s with overlap / without, pair by pair: median {pr['images_s_ratio_median']:.3f} "
                         f"(min {pr['min']:.3f}, max {pr['max']:.3f}).")
            notes.append("in flight: time some bucket's allreduce was running (seen at layer boundaries and in the "
                         "wait); exposed: waited for after backward; hidden = 1 - exposed / in flight.")
        return notes + self.parity_notes()

    def text(self):
        return C.render_text(self.header(), self.COLUMNS, self.cells(), {1, 2, 3, 4, 5, 6}, self.footnotes())

    def plot(self, path: Path):
        """The scaling figure: images/s against workers per strategy (beside linear scaling from
        each one's fewest-worker row), gradient bytes each rank sends per step (log scale), and
        test accuracy against dense sync. Needs matplotlib (the [plot] extra); returns the path
        written, or None without it."""
        try:
            from matplotlib.figure import Figure
        except ImportError:
            return None
        rows = [r for r in self.rows if "images_s" in r]
        strategies = list(dict.fromkeys(r["strategy"] for r in rows))
        fig = Figure(figsize=(15, 4.6), layout="constrained")
        ax_s, ax_b, ax_a = fig.subplots(1, 3)
        for k, name in enumerate(strategies):
            mine = sorted((r for r in rows if r["strategy"] == name), key=lambda r: r["workers"])
            n = [r["workers"] for r in mine]
            color = f"C{k % 10}"
            ax_s.plot(n, [r["images_s"] for r in mine], "o-", color=color, label=name)
            ax_s.plot(n, [mine[0]["images_s"] * w / n[0] for w in n], ":", color=color, alpha=0.5)
            sent = [(w, r["sent_per_step"]) for w, r in zip(n, mine) if r.get("sent_per_step")]
            if sent:   # a single rank sends nothing: no point at 0 on the log axis
                ax_b.plot(*zip(*sent), "o-", color=color, label=name)
            ax_a.plot(n, [100 * r["test_acc"] for r in mine], "o-", color=color, label=name)
        ax_s.set(title="throughput (dotted: linear scaling)", xlabel="workers", ylabel="images / s")
        ax_b.set(title="gradient bytes one rank sends per step", xlabel="workers", ylabel="bytes", yscale="log")
        ax_a.set(title="final test accuracy", xlabel="workers", ylabel="%")
        for ax in (ax_s, ax_b, ax_a):
            ax.set_xticks(sorted({r["workers"] for r in rows}))
            ax.grid(alpha=0.3)
        ax_s.legend(fontsize=7)
        ax_b.legend(fontsize=7)
        fig.suptitle(f"dnnpar parallel training, {self.meta['workload']}; {C.cpu_cores()} cores", fontsize=9)
        return _save(fig, path)

    def plot_parity(self, path: Path):
        """DGC against dense, per model: test accuracy per epoch (thin: each seed, thick: their
        mean), and the bytes one rank sends per step, epoch by epoch (the warm-up's falling
        density, log scale). Needs matplotlib; returns the path written, or None."""
        try:
            from matplotlib.figure import Figure
            from matplotlib.ticker import MaxNLocator
        except ImportError:
            return None
        curves = self.parity_curves
        fig = Figure(figsize=(5 * (len(curves) + 1), 4.2), layout="constrained")
        axes = fig.subplots(1, len(curves) + 1)
        ax_b = axes[-1]
        for k, (ax, (model, runs)) in enumerate(zip(axes, curves.items())):
            for key, label, color in (("dense_acc", "dense sync", "C0"), ("dgc_acc", "DGC 0.1%", "C1")):
                accs = np.array([r[key] for r in runs]) * 100
                e = np.arange(1, accs.shape[1] + 1)
                for acc in accs:
                    ax.plot(e, acc, color=color, alpha=0.25, lw=0.8)
                ax.plot(e, accs.mean(axis=0), color=color, lw=2, label=f"{label} (mean of {len(runs)} seeds)")
            ax.set(title=f"{model}: test accuracy", xlabel="epoch", ylabel="%")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            sent = runs[0]["dgc_sent"]
            ax_b.plot([e for e, _ in sent], [b for _, b in sent], "o-", ms=3, color=f"C{k + 2}", label=f"{model}, DGC 0.1%")
            ax_b.axhline(runs[0]["dense_sent"], ls=":", color=f"C{k + 2}", label=f"{model}, dense")
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_b.set(title="bytes one rank sends per step", xlabel="epoch", ylabel="bytes", yscale="log")
        ax_b.grid(alpha=0.3)
        ax_b.legend(fontsize=7)
        fig.suptitle(f"DGC at 0.1% against dense sync SGD: {self.meta['DGC parity']}", fontsize=9)
        return _save(fig, path)

    def write(self, out_dir: Path):
        for plot in (self.plot(Path(out_dir) / "parallel-scaling.svg") if self.rows else None,
                     self.plot_parity(Path(out_dir) / "dgc-parity.svg") if getattr(self, "parity_curves", None) else None):
            if plot is not None:
                print(f"wrote {plot}")
        md = C.render_markdown(self.header(), self.COLUMNS, self.cells(), {1, 2, 3, 4, 5, 6}, self.footnotes())
        return C.write_report(out_dir, "parallel", md, {"meta": self.meta, "rows": self.rows,
                                                        "split": getattr(self, "split_rows", None),
                                                        "overlap": getattr(self, "overlap_rows", None),
                                                        "overlap_pairs": getattr(self, "overlap_pairs", None),
                                                        "dgc_parity": getattr(self, "parity_rows", None),
                                                        "dgc_parity_curves": getattr(self, "parity_curves", None)})


#: --dgc-parity: model -> (epochs, lr); LeNet-5 diverges at lr 0.05
PARITY = {"lenet300": (40, 0.05), "lenet5": (20, 0.01)}

#: --strategies name -> the row label
STRATEGIES = {"sync": "sync (MPI allreduce)", "sync-no-overlap": "sync, allreduce after backward",
              "fp16": "sync, fp16 gradients", "bf16": "sync, bf16 gradients",
              "dgc1": "sync, DGC 1%", "dgc01": "sync, DGC 0.1%",
              "hogwild": "hogwild", "ps": "parameter server (Ray, ASP)"}
#: row label -> the data-parallel worker's extra options (DGC rows add --dgc-warmup)
SYNC_VARIANTS = {STRATEGIES["sync"]: [], STRATEGIES["sync-no-overlap"]: ["--overlap", "0"],
                 STRATEGIES["fp16"]: ["--grad-compression", "fp16"], STRATEGIES["bf16"]: ["--grad-compression", "bf16"],
                 STRATEGIES["dgc1"]: ["--grad-compression", "dgc:0.01"],
                 STRATEGIES["dgc01"]: ["--grad-compression", "dgc:0.001"]}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        return worker(argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="lenet300", choices=("lenet300", "lenet5"))
    ap.add_argument("--subset", default="embedded", choices=("embedded", "full"))
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--strategies", nargs="*", default=list(STRATEGIES), choices=STRATEGIES, metavar="STRATEGY",
                    help="any of: " + "; ".join(f"{k} = {v}" for k, v in STRATEGIES.items()))
    ap.add_argument("--no-split", dest="split", action="store_false", help="skip the AlexNet model / hybrid rows")
    ap.add_argument("--overlap-ab", type=int, default=0, metavar="PAIRS",
                    help="also time sync data parallel on 2 ranks with the allreduce overlapped with backward "
                         "against after it, PAIRS interleaved runs each")
    ap.add_argument("--dgc-warmup", type=int, default=1, metavar="EPOCHS",
                    help="DGC rows: epochs over which the density falls from 25%% to DENSITY")
    ap.add_argument("--dgc-parity", type=int, default=0, metavar="SEEDS",
                    help="also train dense sync and DGC 0.1%% on 2 ranks for SEEDS seeds each (per model: "
                         + ", ".join(f"{m} {e} epochs at lr {lr}" for m, (e, lr) in PARITY.items())
                         + ") and compare their test accuracy; writes dgc-parity.svg")
    ap.add_argument("--parity-models", nargs="+", default=list(PARITY), choices=PARITY)
    ap.add_argument("--parity-epochs", type=int, default=None, help="--dgc-parity epochs (None: per model, above)")
    ap.add_argument("--parity-warmup", type=int, default=4, metavar="EPOCHS",
                    help="--dgc-parity: DGC's warm-up epochs (the paper's 4)")
    ap.add_argument("--ab-bucket-mb", type=float, default=0.25, help="bucket size for --overlap-ab")
    ap.add_argument("--quick", action="store_true", help="1 epoch, 1 and 2 workers, the small AlexNet")
    ap.add_argument("--out", default="bench-out")
    args = ap.parse_args(argv)
    if args.quick:
        args.epochs, args.workers = 1, [1, 2]
    return C.run_and_report(ParallelBench(args), args.out)


if __name__ == "__main__":
    sys.exit(main())
