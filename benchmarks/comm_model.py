#!/usr/bin/env python3
"""Check the ring-allreduce model of :mod:`dnnpar.parallel.plan` against MPI on this machine, then
print the predicted scaling tables.

    python benchmarks/comm_model.py                  # n = 2 and 4, 4 kB .. 64 MB
    python benchmarks/comm_model.py --quick          # fewer sizes and repeats (under a minute)

1. ``mpiexec -n 2`` and ``mpiexec -n 4`` run this file with ``--worker``: every rank times
   ``comm.Allreduce`` (sum) of float32 buffers from 4 kB to 64 MB: warm-up calls, then repeats,
   each between barriers; a repeat's time is the slowest rank's (reduced with MAX) and the
   median repeat is kept.
2. alpha and B are fitted on the n = 2 times by least squares on
   ``t = 2(n-1) alpha + 2(n-1)/n S/B`` (relative residuals, so that 4 kB and 64 MB weigh alike;
   alpha is clipped at 0).
3. The fitted model predicts the n = 4 times; measured vs predicted with the relative error,
   "met" where it is within 30% for sizes >= 1 MB (the target), "MISSED" otherwise.
4. The scaling-efficiency tables of ``dnnpar plan`` for VGG-16 (and ResNet-101, from published
   counts) on 8..512 GPUs at 25 and 100 Gb/s, beside Horovod's measured 68% / 90% at 512 GPUs.

Loopback MPI runs over shared memory (MPICH's ch4 shm path), so alpha and B describe this
machine's memory system, not a network. With more ranks than cores the ranks time-share cores
(MPICH polls while it waits), which inflates the n = 4 times: the output says how many cores
there are. A measurement, never a test: nothing is asserted. Writes markdown + JSON into --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT = "RESULT "
SIZES = [4 << 10, 16 << 10, 64 << 10, 256 << 10, 1 << 20, 4 << 20, 16 << 20, 64 << 20]
QUICK_SIZES = [4 << 10, 64 << 10, 1 << 20, 4 << 20, 16 << 20]
TARGET, TARGET_FROM = 0.30, 1 << 20


# ---------------------------------------------------------------------------- the MPI worker
def worker(sizes: list[int], repeats: int, warmup: int, budget_s: float) -> None:
    """Run under mpiexec: rank 0 prints one RESULT line of JSON {size: median seconds}."""
    import numpy as np
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank, n = comm.Get_rank(), comm.Get_size()
    out = {}
    for size in sizes:
        count = max(1, size // 4)
        send = np.ones(count, np.float32)
        recv = np.empty_like(send)
        for _ in range(warmup):
            comm.Allreduce(send, recv, op=MPI.SUM)
        times, t_start = [], time.perf_counter()
        for i in range(repeats):
            comm.Barrier()
            t0 = MPI.Wtime()
            comm.Allreduce(send, recv, op=MPI.SUM)
            dt = MPI.Wtime() - t0
            times.append(comm.allreduce(dt, op=MPI.MAX))
            # rank 0's clock decides for everyone whether this size's budget is spent (at least 3 repeats)
            if comm.bcast(i >= 2 and time.perf_counter() - t_start > budget_s, root=0):
                break
        if abs(float(recv[0]) - n) > 1e-3:
            raise RuntimeError(f"allreduce of {size} B gave {recv[0]}, expected {n}")
        out[str(size)] = {"median_s": float(np.median(times)), "repeats": len(times)}
    if rank == 0:
        print(RESULT + json.dumps({"ranks": n, "times": out}), flush=True)


def measure(n: int, sizes, repeats: int, warmup: int, budget_s: float, timeout: float = 600) -> dict:
    """Launch ``n`` ranks of the worker and return {size: median seconds}."""
    from dnnpar.parallel.comm import mpi_env, mpiexec

    cmd = mpiexec(n) + [sys.executable, str(Path(__file__).resolve()), "--worker",
                               "--sizes", ",".join(map(str, sizes)), "--repeats", str(repeats),
                               "--warmup", str(warmup), "--budget", str(budget_s)]
    env = mpi_env()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT)]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    got = json.loads(lines[-1][len(RESULT):])
    return {int(k): v["median_s"] for k, v in got["times"].items()}


# ---------------------------------------------------------------------------- the fit
def fit_alpha_beta(times: dict, n: int) -> tuple[float, float]:
    """(alpha s, B bytes/s) of ``t = 2(n-1) alpha + 2(n-1)/n S/B`` by least squares on relative
    residuals; alpha clipped at 0."""
    import numpy as np

    S = np.array(sorted(times), float)
    t = np.array([times[int(s)] for s in S])
    A = np.stack([2 * (n - 1) * np.ones_like(S), 2 * (n - 1) / n * S], axis=1) / t[:, None]
    (alpha, inv_b), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    if alpha < 0:
        alpha = 0.0
        inv_b = float(np.linalg.lstsq(A[:, 1:], np.ones_like(t), rcond=None)[0][0])
    if inv_b <= 0:
        raise RuntimeError(f"the fit gave a non-positive 1/B ({inv_b}): the times do not grow with size")
    return float(alpha), float(1.0 / inv_b)


def compare(times4: dict, alpha: float, bandwidth: float, n: int = 4) -> list[dict]:
    from dnnpar.parallel.plan import ring_allreduce_time

    rows = []
    for s in sorted(times4):
        pred = ring_allreduce_time(s, n, alpha, bandwidth)
        err = (pred - times4[s]) / times4[s]
        verdict = ("met" if abs(err) <= TARGET else "MISSED") if s >= TARGET_FROM else "-"
        rows.append({"bytes": s, "measured_s": times4[s], "predicted_s": pred, "error": err, "target": verdict})
    return rows


def _size(b: int) -> str:
    return f"{b >> 20} MB" if b >= 1 << 20 else f"{b >> 10} kB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default=None, help="comma-separated byte counts")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget", type=float, default=2.0, help="seconds of repeats per size at most")
    p.add_argument("--ranks", default="2,4", help="the fit uses the first, the check the others")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--latency-us", type=float, default=5.0, help="alpha for the scaling tables")
    p.add_argument("--out", default="bench-out")
    a = p.parse_args(argv)
    sizes = [int(s) for s in a.sizes.split(",")] if a.sizes else (QUICK_SIZES if a.quick else SIZES)
    repeats = a.repeats or (7 if a.quick else 21)
    if a.worker:
        worker(sizes, repeats, a.warmup, a.budget)
        return 0

    from dnnpar.parallel import plan as P

    ranks = [int(r) for r in a.ranks.split(",")]
    cores = os.cpu_count()
    header = [f"# Allreduce model vs loopback MPI ({time.strftime('%Y-%m-%d %H:%M')})", "",
              f"machine: {cores} cores; mpi4py + {_mpi_version()}; ranks {ranks}; one BLAS thread per rank",
              f"each time: median of up to {repeats} barrier-separated repeats after {a.warmup} warm-up calls, "
              "the slowest rank's time per repeat"]
    if max(ranks) > (cores or 1):
        header.append(f"NOTE: {max(ranks)} ranks on {cores} cores oversubscribe the machine: ranks time-share cores "
                      "(MPICH busy-polls), so those times include scheduling delays the model does not have")
    print("\n".join(header), flush=True)
    measured = {}
    for n in ranks:
        t0 = time.perf_counter()
        measured[n] = measure(n, sizes, repeats, a.warmup, a.budget)
        print(f"mpiexec -n {n}: {len(sizes)} sizes in {time.perf_counter() - t0:.1f} s", flush=True)
    n_fit = ranks[0]
    alpha, bw = fit_alpha_beta(measured[n_fit], n_fit)
    md = header + ["", f"fit on n = {n_fit}: alpha = {alpha * 1e6:.2f} us, B = {bw / 1e9:.2f} GB/s "
                       f"(t = 2(n-1) alpha + 2(n-1)/n S/B)", ""]
    fit_rows = compare(measured[n_fit], alpha, bw, n_fit)
    md += [f"| size | n={n_fit} measured ms | fitted ms | error |", "|---:|---:|---:|---:|"]
    md += [f"| {_size(r['bytes'])} | {1e3 * r['measured_s']:.3f} | {1e3 * r['predicted_s']:.3f} | "
           f"{100 * r['error']:+.0f}% |" for r in fit_rows]
    checks = {}
    for n in ranks[1:]:
        rows = compare(measured[n], alpha, bw, n)
        checks[n] = rows
        md += ["", f"| size | n={n} measured ms | predicted ms | error | within {TARGET:.0%} (>= 1 MB) |",
               "|---:|---:|---:|---:|:---|"]
        md += [f"| {_size(r['bytes'])} | {1e3 * r['measured_s']:.3f} | {1e3 * r['predicted_s']:.3f} | "
               f"{100 * r['error']:+.0f}% | {r['target']} |" for r in rows]
        big = [r for r in rows if r["bytes"] >= TARGET_FROM]
        ok = sum(r["target"] == "met" for r in big)
        md.append(f"\nn = {n}: target met for {ok} of {len(big)} sizes >= 1 MB"
                  + (" (oversubscribed: see the note)" if n > (cores or 1) else ""))
    md += ["", f"## Predicted scaling (dnnpar plan: batch {P.DEFAULT_BATCH} per GPU, {P.DEFAULT_TFLOPS:g} TFLOP/s "
               f"sustained per GPU, latency {a.latency_us:g} us)", ""]
    tables = {}
    for model in ("vgg16", "resnet101"):
        cost = P.model_cost(model)
        sc = P.scaling(cost, a.latency_us)
        tables[model] = sc
        md += ["```", P.scaling_table(model, sc), "```", ""]
    text = "\n".join(md)
    print("\n".join(md[len(header):]))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comm_model.md").write_text(text + "\n")
    (out / "comm_model.json").write_text(json.dumps({
        "cores": cores, "ranks": ranks, "sizes": sizes, "measured_s": {str(k): v for k, v in measured.items()},
        "fit": {"ranks": n_fit, "alpha_s": alpha, "bandwidth_Bps": bw}, "checks": {str(k): v for k, v in checks.items()},
        "scaling": tables, "scaling_workers": list(P.SCALING_WORKERS), "horovod_512": P.HOROVOD_512}, indent=1))
    print(f"\nwritten: {out / 'comm_model.md'}, {out / 'comm_model.json'}")
    return 0


def _mpi_version() -> str:
    try:
        from mpi4py import MPI
        return MPI.Get_library_version().splitlines()[0].strip()
    except Exception as e:  # noqa: BLE001 - only for the header
        return f"MPI unavailable ({e})"


if __name__ == "__main__":
    raise SystemExit(main())
