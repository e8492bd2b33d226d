"""What the benchmark scripts share: the environment header, timing on the CPU, error checks
against a peer's result, and the table printed on stdout / written as markdown and JSON.

Not a public module: the scripts in this folder import it as ``_common`` (their own folder is on
``sys.path`` when run as ``python benchmarks/<script>.py``).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python benchmarks/<script>.py` from a checkout, without PYTHONPATH
    sys.path.insert(0, str(ROOT))

import dnnpar as dp  # noqa: E402


# ---------------------------------------------------------------------------- numbers
def median(xs):
    return statistics.median(xs) if xs else None


def rel_err(got, want) -> float:
    """max |got - want| / max |want| (host NumPy or device CuPy arrays)."""
    on_device = any(type(a).__module__.startswith("cupy") for a in (got, want))
    xp = sys.modules["cupy"] if on_device else np
    got = xp.asarray(got, dtype=xp.float64)
    want = xp.asarray(want, dtype=xp.float64)
    if got.shape != want.shape:
        want = want.reshape(got.shape)
    scale = float(xp.abs(want).max()) or 1.0
    return float(xp.abs(got - want).max()) / scale


def check_text(err: float, tol: float = 1e-3) -> str:
    return f"{err:.0e}" if err <= tol else f"MISMATCH {err:.1e}"


def rand(rng, shape):
    return rng.standard_normal(shape, dtype=np.float32)


def time_runs(fn, repeat: int, budget_s: float, warmup_s: float = 0.2):
    """Time ``fn`` on the CPU with time.perf_counter: returns (ms of each run, the warm-up call's result).

    Warm-up is one call, or as many as fit in ``warmup_s``; then as many runs as fit in
    ``budget_s``, at least 3 (the slow paths) and at most ``repeat`` (the fast ones, whose median
    then shrugs off a noisy neighbour on a shared machine). The first result is returned for the
    correctness check, so slow paths are not run once more."""
    t_warm = time.perf_counter() + warmup_s
    first = fn()
    while time.perf_counter() < t_warm:
        fn()
    runs, t_end = [], time.perf_counter() + budget_s
    while len(runs) < repeat:
        t = time.perf_counter()
        fn()
        runs.append((time.perf_counter() - t) * 1e3)
        if len(runs) >= 3 and time.perf_counter() > t_end:
            break
    return runs, first


def training_flops(model) -> float:
    """FLOP of one training step per image: forward 2*MACs, weight gradients 2*MACs, input
    gradients 2*MACs of every layer but the first (the model's input gets no gradient)."""
    from dnnpar.nn.summary import summary

    rows = summary(model).rows
    macs = sum(r.macs for r in rows)
    return 2.0 * (3 * macs - rows[0].macs)


def dnnpar_train_step(model, lr: float, momentum: float, weight_decay: float):
    """``step(xb, yb) -> loss``: one step of what dnnpar.train.train runs per batch (forward,
    softmax cross-entropy, backward, SGD), without its bookkeeping. Puts ``model`` in train mode."""
    from dnnpar.nn import SoftmaxCrossEntropy
    from dnnpar.nn.optim import SGD

    opt, loss_fn = SGD(model, lr, momentum, weight_decay=weight_decay), SoftmaxCrossEntropy()
    model.train()

    def step(xb, yb) -> float:
        loss = float(loss_fn(model.forward(xb), yb))
        model.backward(loss_fn.backward())
        opt.step()
        return loss
    return step


def torch_train_step(torch, model, lr: float, momentum: float, weight_decay: float):
    """The same step for a torch module: cross_entropy, backward, torch.optim.SGD."""
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    model.train()

    def step(xb, yb) -> float:
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(torch.from_numpy(xb)), torch.from_numpy(yb))
        loss.backward()
        opt.step()
        return loss.item()
    return step


def sgemm_peak_gflops(n: int = 2048, budget_s: float = 2.0) -> float:
    """The machine's measured float32 peak for the benchmarks' GFLOP/s columns: NumPy's SGEMM
    (BLAS, all its threads) on n x n x n, the median of the runs that fit in ``budget_s``."""
    rng = np.random.default_rng(0)
    a, b = rand(rng, (n, n)), rand(rng, (n, n))
    runs, _ = time_runs(lambda: a @ b, 10, budget_s)
    return 2.0 * n**3 / (median(runs) * 1e-3) / 1e9


def rss_mb() -> tuple[float, float]:
    """(current, peak) resident set size of this process in MB, from /proc/self/status (VmRSS,
    VmHWM). Not getrusage's ru_maxrss: Linux carries that across fork and exec, so a child
    started by a big parent would report the parent's peak. NaN where /proc is missing."""
    vals = {}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                vals[key] = int(rest.split()[0]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return vals.get("VmRSS", float("nan")), vals.get("VmHWM", float("nan"))


# ---------------------------------------------------------------------------- environment
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def blas_name() -> str:
    try:
        cfg = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return f"{cfg.get('name', '?')} {cfg.get('version', '')}".strip()
    except Exception:
        return "?"


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() or "?"
    except Exception:
        return "?"


def optional_torch():
    """torch when importable (an optional peer, never a dependency), else None."""
    try:
        import torch
        return torch
    except Exception:
        return None


def common_meta(backend: str, args) -> dict:
    meta = {
        "backend": backend,
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "dnnpar": f"{dp.__version__} ({git_commit()})",
        "python": platform.python_version(),
        "numpy": np.__version__,
        "cpu": f"{cpu_name()}, {cpu_cores()} cores",
        "quick": bool(args.quick),
    }
    env = {k: os.environ[k] for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS",
                                      "OMP_NUM_THREADS", "CUPY_TF32", "CUPY_ACCELERATORS",
                                      "NVIDIA_TF32_OVERRIDE") if k in os.environ}
    if env:
        meta["env"] = " ".join(f"{k}={v}" for k, v in env.items())
    return meta


class OtherLoad:
    """CPU time that everything but this process used while a block ran: the machine's busy time
    from /proc/stat (user, nice, system, irq, softirq; plus steal, what the hypervisor gave other
    guests) minus this process's own user + system time. Linux only; elsewhere ``cores`` is None.

        with OtherLoad() as load:
            ...
        load.cores   # average number of cores busy with other work during the block
    """

    def __init__(self):
        self.cores = self.steal_cores = self.wall_s = None

    @staticmethod
    def _machine():
        try:
            with open("/proc/stat") as f:
                user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        except (OSError, ValueError):
            return None
        hz = os.sysconf("SC_CLK_TCK")
        return (user + nice + system + irq + softirq) / hz, steal / hz

    @staticmethod
    def _own() -> float:
        import resource

        return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                     resource.getrusage(resource.RUSAGE_CHILDREN)))

    def __enter__(self):
        self.t0, self.m0, self.own0 = time.perf_counter(), self._machine(), self._own()
        return self

    def __exit__(self, *exc):
        self.wall_s = time.perf_counter() - self.t0
        m1 = self._machine()
        if self.m0 is not None and m1 is not None and self.wall_s > 0:
            busy = m1[0] - self.m0[0] - (self._own() - self.own0)
            self.cores = max(0.0, busy) / self.wall_s
            self.steal_cores = (m1[1] - self.m0[1]) / self.wall_s
        return False

    def text(self) -> str:
        if self.cores is None:
            return "n/a"
        steal = f", {self.steal_cores:.2f} stolen by the hypervisor" if self.steal_cores and self.steal_cores >= 0.01 else ""
        return f"{self.cores:.2f} of {cpu_cores()} cores{steal} over {self.wall_s:.0f} s"


def run_section(name: str, fn, only, meta: dict, on_error) -> None:
    """Run one benchmark group ``fn`` unless ``only`` (a list of names, or None) leaves it out.
    A failure is handed to ``on_error(message)`` (which adds an error row) and the run goes on;
    ``meta`` records how busy other processes kept the machine meanwhile."""
    if only and name not in only:
        return
    print(f"[{name}] ...", file=sys.stderr, flush=True)
    with OtherLoad() as load:
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- a benchmark reports, it does not stop
            on_error(f"{type(e).__name__}: {e}"[:160])
            traceback.print_exc()
    meta[f"CPU used by other processes during {name}"] = load.text()
    print(f"[{name}] {load.wall_s:.1f} s", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- output
def text_table(columns, cells, right) -> list[str]:
    """Plain-text table lines: ``cells`` is a list of rows of strings; columns whose index is in
    ``right`` are right-aligned."""
    rows = [list(columns)] + [list(r) for r in cells]
    width = [max(len(row[i]) for row in rows) for i in range(len(columns))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.rjust(width[i]) if i in right else c.ljust(width[i])
                               for i, c in enumerate(row)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in width))
    return lines


def markdown_table(columns, cells, right) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |",
             "|" + "|".join("---:" if i in right else "---" for i in range(len(columns))) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in cells]
    return lines


def render_text(header: list[str], columns, cells, right, footnotes: list[str]) -> str:
    return "\n".join(header + [""] + text_table(columns, cells, right) + [""] + footnotes)


def render_markdown(header: list[str], columns, cells, right, footnotes: list[str]) -> str:
    lines = [f"# {header[0]}", ""] + [f"- {ln}" for ln in header[1:]] + [""]
    lines += markdown_table(columns, cells, right)
    lines += [""] + [f"{ln}  " for ln in footnotes]
    return "\n".join(lines) + "\n"


def write_report(out_dir: Path, stem: str, markdown: str, payload: dict) -> tuple[Path, Path]:
    """``<stem>.md`` and ``<stem>.json`` in ``out_dir`` (created if missing)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    md, js = out_dir / f"{stem}.md", out_dir / f"{stem}.json"
    md.write_text(markdown)
    js.write_text(json.dumps(payload, indent=1) + "\n")
    return md, js


def run_and_report(bench, out_dir) -> int:
    """Run a benchmark object (run / finish / text / write / meta), print its table and write
    its markdown and JSON. Outputs are not poisoned while timing (DNNPAR_POISON adds a fill)."""
    from dnnpar.backend import poison_outputs

    t0 = time.perf_counter()
    with poison_outputs(False):
        bench.run()
    bench.meta["wall time"] = f"{time.perf_counter() - t0:.0f} s"
    bench.finish()
    print(bench.text())
    md, js = bench.write(Path(out_dir))
    print(f"\nwrote {md} and {js}")
    return 0
