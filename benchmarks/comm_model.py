#!/usr/bin/env python3
"""Check the ring-allreduce model of :mod:`dnnpar.parallel.plan` against MPI on this machine, then
print the predicted scaling tables.

    python benchmarks/comm_model.py                  # n = 2 and 4 ranks, 4 kB .. 64 MB
    python benchmarks/comm_model.py --quick          # fewer sizes and repeats (under a minute)

1. ``mpiexec -n N`` runs this file with ``--worker`` for every N of ``--ranks``. For each size S
   (4 kB .. 64 MB of float32) every rank times, between barriers, keeping the slowest rank's time
   per repeat and the median repeat:
   - **allreduce**: the call data-parallel training makes, ``MPICommunicator.allreduce_sum``
     (``Iallreduce`` in place, polled), with the minor page faults per call;
   - **exchange**: one ring step, ``Sendrecv`` of S/N bytes to the right neighbour while receiving
     S/N from the left, all ranks at once (the link under the ring's load);
   - **reduce**: MPI's own sum of S/N bytes into S/N (``MPI.SUM.Reduce_local``).
2. The link is fitted on the exchanges alone, ``t = alpha + m/B`` (least squares on relative
   residuals, so that 2 kB and 32 MB weigh alike), and the sum on the reductions, ``t = c + m gamma``.
3. Those parameters, which never saw an allreduce, predict it:
   ``t = 2(N-1) alpha + 2(N-1)/N S/B + (N-1)/N S gamma`` (:func:`plan.ring_allreduce_time`; the
   gamma term of Thakur, Rabenseifner & Gropp 2005: over shared memory a sum costs about what a
   copy costs). Measured vs predicted with the relative error; "met" where within 30% for sizes
   >= 1 MB (the target). MPICH runs this as reduce-scatter + all-gather by recursive halving and
   doubling: at N = 2 exactly the ring's steps; at N = 4 the same bytes, but 2 log2 N latencies
   instead of 2(N-1). The alpha-beta prediction leaves out the reduction's fixed call cost (the
   fit reports it), as ``dnnpar plan`` does. A second prediction takes the exchange and reduction times measured at
   S/N itself instead of one fitted line (size-dependent link parameters, as in PLogP): one B
   cannot follow the caches, and on a shared-memory "link" the chunks above the last-level cache
   move at half the in-cache rate. N larger than the core count is measured but not judged: the ranks then
   time-share cores, which no link model describes.
4. The scaling-efficiency tables of ``dnnpar plan`` for VGG-16 (and ResNet-101, from published
   counts) on 8..512 GPUs at 25 and 100 Gb/s, beside Horovod's measured 68% / 90% at 512 GPUs.

**The allocator.** MPI allocates a temporary buffer per allreduce (S bytes for MPICH's
reduce-scatter + all-gather, half of it touched at N = 2). glibc serves allocations above its
mmap threshold, capped at 32 MiB, with a fresh mmap, so from S = 32 MiB on every call page-faults
the touched part in again (8,193 faults per 64 MB call here, 2.2x the time). That is the
allocator, not the link: the ranks run with ``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge>``
(heap memory, kept; the benchmark's own buffers are separate mappings, untouched by it), and
``--malloc default`` shows the artefact. Training's gradient buckets (``--bucket-mb``, 4 MiB by
default) stay well below the cap.

Loopback MPI runs over shared memory, so alpha, B and gamma describe this machine's memory
system, not a network. A measurement, never a test: nothing is asserted. Writes markdown + JSON
into --out.
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
#: glibc tunables that keep MPI's temporary buffers on the heap, resident between calls
RESIDENT_MALLOC = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40)}


# ---------------------------------------------------------------------------- the MPI worker
def _timed(comm, fn, repeats: int, warmup: int, budget_s: float, before=None) -> tuple[float, int, int]:
    """(median of the slowest rank's seconds, repeats run, minor page faults per call on this rank)."""
    import resource

    import numpy as np
    from mpi4py import MPI

    for _ in range(warmup):
        if before:
            before()
        fn()
    times, faults, t_start = [], 0, time.perf_counter()
    for i in range(repeats):
        if before:
            before()
        comm.Barrier()
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        t0 = time.perf_counter()
        fn()
        dt = time.perf_counter() - t0
        faults += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
        times.append(comm.allreduce(dt, op=MPI.MAX))
        # rank 0's clock decides for everyone whether this size's budget is spent (at least 3 repeats)
        if comm.bcast(i >= 2 and time.perf_counter() - t_start > budget_s, root=0):
            break
    return float(np.median(times)), len(times), faults // len(times)


def _mapped(count: int):
    """A float32 array in an anonymous mapping of its own: the benchmark's buffers stay where they
    are whatever the malloc tunables do to MPI's (heap memory runs exchanges at different speeds)."""
    import mmap

    import numpy as np

    return np.frombuffer(mmap.mmap(-1, 4 * count), np.float32)


def worker(sizes: list[int], repeats: int, warmup: int, budget_s: float) -> None:
    """Run under mpiexec: rank 0 prints one RESULT line of JSON {size: {allreduce_s, ...}}."""
    import numpy as np
    from mpi4py import MPI

    from dnnpar.parallel.comm import MPICommunicator

    comm = MPI.COMM_WORLD
    dcomm = MPICommunicator(comm)
    rank, n = comm.Get_rank(), comm.Get_size()
    right, left = (rank + 1) % n, (rank - 1) % n
    out = {}
    for size in sizes:
        buf = _mapped(max(1, size // 4))
        t_ar, reps, faults = _timed(comm, lambda: dcomm.allreduce_sum([buf]), repeats, warmup, budget_s,
                                    before=lambda: buf.fill(1.0))
        if abs(float(buf[0]) - n) > 1e-3 or abs(float(buf[-1]) - n) > 1e-3:
            raise RuntimeError(f"allreduce of {size} B gave {buf[0]}, {buf[-1]}, expected {n}")
        m = max(1, size // 4 // n)
        send, recv = _mapped(m), _mapped(m)
        send.fill(1.0)
        t_x, _, _ = _timed(comm, lambda: comm.Sendrecv(send, right, 0, recv, left, 0), repeats, warmup, budget_s)
        t_r, _, _ = _timed(comm, lambda: MPI.SUM.Reduce_local(send, recv), repeats, warmup, budget_s)
        out[str(size)] = {"allreduce_s": t_ar, "repeats": reps, "faults_per_call": faults,
                          "chunk_bytes": 4 * m, "exchange_s": t_x, "reduce_s": t_r}
    if rank == 0:
        print(RESULT + json.dumps({"ranks": n, "times": out}), flush=True)


def measure(n: int, sizes, repeats: int, warmup: int, budget_s: float, malloc: str = "resident",
            timeout: float = 900) -> dict:
    """Launch ``n`` ranks of the worker and return {size: the worker's record}."""
    from dnnpar.parallel.comm import mpi_env, mpiexec

    cmd = mpiexec(n) + [sys.executable, str(Path(__file__).resolve()), "--worker",
                        "--sizes", ",".join(map(str, sizes)), "--repeats", str(repeats),
                        "--warmup", str(warmup), "--budget", str(budget_s)]
    env = mpi_env()
    env.setdefault("PYTHONPATH", str(ROOT))
    if malloc == "resident":
        env.update(RESIDENT_MALLOC)
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(RESULT)]
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(cmd)} failed (exit {r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    got = json.loads(lines[-1][len(RESULT):])
    return {int(k): v for k, v in got["times"].items()}


# ---------------------------------------------------------------------------- the fit
def fit_affine(points: dict) -> tuple[float, float]:
    """(intercept, slope) of ``t = intercept + m * slope`` through {m: t} by least squares on
    relative residuals; the intercept is clipped at 0."""
    import numpy as np

    m = np.array(sorted(points), float)
    t = np.array([points[k] for k in sorted(points)], float)
    if len(m) < 2 or np.any(t <= 0):
        raise ValueError(f"need >= 2 positive times to fit a line, got {points}")
    A = np.stack([np.ones_like(m), m], axis=1) / t[:, None]
    (c, slope), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    if c < 0:
        c = 0.0
        slope = float(np.linalg.lstsq(A[:, 1:], np.ones_like(t), rcond=None)[0][0])
    if slope <= 0:
        raise RuntimeError(f"the fit gave a non-positive slope ({slope}): the times do not grow with size")
    return float(c), float(slope)


def fit_link(record: dict) -> dict:
    """alpha, B from the ring exchanges and gamma from the reductions of one N's record."""
    alpha, inv_b = fit_affine({r["chunk_bytes"]: r["exchange_s"] for r in record.values()})
    c_red, gamma = fit_affine({r["chunk_bytes"]: r["reduce_s"] for r in record.values()})
    return {"alpha_s": alpha, "bandwidth_Bps": 1.0 / inv_b, "gamma_s_per_byte": gamma, "reduce_call_s": c_red}


def compare(record: dict, link: dict, n: int, judged: bool = True) -> list[dict]:
    """One row per size: the measured allreduce against two predictions that never saw one.

    ``alpha_beta``: :func:`plan.ring_allreduce_time` with ``link``'s single alpha, B and gamma.
    ``per_size``: the same ring, 2(N-1) steps of exchange and N-1 sums, but with the exchange and
    reduction times measured at S/N itself (PLogP-style size-dependent link parameters, Kielmann
    et al. 2000), which follows the caches where one B cannot."""
    from dnnpar.parallel.plan import ring_allreduce_time

    def verdict(s, err):
        return ("met" if abs(err) <= TARGET else "MISSED") if judged and s >= TARGET_FROM else "-"

    rows = []
    for s in sorted(record):
        r = record[s]
        measured = r["allreduce_s"]
        ab = ring_allreduce_time(s, n, link["alpha_s"], link["bandwidth_Bps"], link["gamma_s_per_byte"])
        ps = 2 * (n - 1) * r["exchange_s"] + (n - 1) * r["reduce_s"]
        e_ab, e_ps = (ab - measured) / measured, (ps - measured) / measured
        rows.append({"bytes": s, "measured_s": measured, "alpha_beta_s": ab, "alpha_beta_error": e_ab,
                     "alpha_beta_target": verdict(s, e_ab), "per_size_s": ps, "per_size_error": e_ps,
                     "per_size_target": verdict(s, e_ps)})
    return rows


def _mark(verdict: str) -> str:
    return {"met": "met ", "MISSED": "MISSED "}.get(verdict, "")


def _size(b: int) -> str:
    return f"{b >> 20} MB" if b >= 1 << 20 else f"{b >> 10} kB"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--sizes", default=None, help="comma-separated byte counts")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget", type=float, default=2.0, help="seconds of repeats per size and measurement at most")
    p.add_argument("--ranks", default="2,4", help="comma-separated rank counts, each fitted and checked on its own")
    p.add_argument("--malloc", choices=("resident", "default"), default="resident",
                   help="resident: glibc keeps MPI's temporary buffers (see the docstring); default: as glibc is")
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
    cores = os.cpu_count() or 1
    header = [f"# Allreduce model vs loopback MPI ({time.strftime('%Y-%m-%d %H:%M')})", "",
              f"machine: {cores} cores; mpi4py + {_mpi_version()}; ranks {ranks}; one BLAS thread per rank; "
              f"allocator: {a.malloc}" + (f" ({' '.join(f'{k}={v}' for k, v in RESIDENT_MALLOC.items())})"
                                          if a.malloc == "resident" else ""),
              f"each time: median of up to {repeats} barrier-separated repeats after {a.warmup} warm-up calls, "
              "the slowest rank's time per repeat",
              "model: t = 2(N-1) alpha + 2(N-1)/N S/B + (N-1)/N S gamma, with alpha, B fitted on ring exchanges "
              "(Sendrecv of S/N) and gamma on MPI's reduction alone: no allreduce time enters the fit"]
    if max(ranks) > cores:
        header.append(f"NOTE: N > {cores} ranks oversubscribe the cores: measured, not judged")
    print("\n".join(header), flush=True)
    md, records, links, checks = list(header), {}, {}, {}
    for n in ranks:
        t0 = time.perf_counter()
        records[n] = rec = measure(n, sizes, repeats, a.warmup, a.budget, a.malloc)
        print(f"mpiexec -n {n}: {len(sizes)} sizes in {time.perf_counter() - t0:.1f} s", flush=True)
        links[n] = link = fit_link(rec)
        judged = n <= cores
        checks[n] = rows = compare(rec, link, n, judged)
        md += ["", f"## N = {n}" + ("" if judged else f" (oversubscribed: {n} ranks on {cores} cores, not judged)"),
               "", f"link: alpha = {link['alpha_s'] * 1e6:.2f} us, B = {link['bandwidth_Bps'] / 1e9:.2f} GB/s; "
                   f"sum: gamma = {1e9 * link['gamma_s_per_byte']:.3f} ns/B "
                   f"({1e-9 / link['gamma_s_per_byte']:.2f} GB/s)", "",
               "| size | exchange S/N ms | reduce S/N ms | allreduce ms | faults/call | alpha-beta ms | error | "
               "per-size ms | error |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        md += [f"| {_size(r['bytes'])} | {1e3 * rec[r['bytes']]['exchange_s']:.3f} | "
               f"{1e3 * rec[r['bytes']]['reduce_s']:.3f} | {1e3 * r['measured_s']:.3f} | "
               f"{rec[r['bytes']]['faults_per_call']} | {1e3 * r['alpha_beta_s']:.3f} | "
               f"{100 * r['alpha_beta_error']:+.0f}% {_mark(r['alpha_beta_target'])}| {1e3 * r['per_size_s']:.3f} | "
               f"{100 * r['per_size_error']:+.0f}% {_mark(r['per_size_target'])}|" for r in rows]
        if judged:
            big = [r for r in rows if r["bytes"] >= TARGET_FROM]
            md.append(f"\nN = {n}, within {TARGET:.0%} for sizes >= 1 MB (target): alpha-beta "
                      f"{sum(r['alpha_beta_target'] == 'met' for r in big)} of {len(big)}, per-size "
                      f"{sum(r['per_size_target'] == 'met' for r in big)} of {len(big)}")
    md += ["", f"## Predicted scaling (dnnpar plan: batch {P.DEFAULT_BATCH} per GPU, {P.DEFAULT_TFLOPS:g} TFLOP/s "
               f"sustained per GPU, latency {a.latency_us:g} us)", ""]
    tables = {}
    for model in ("vgg16", "resnet101"):
        sc = P.scaling(P.model_cost(model), a.latency_us)
        tables[model] = sc
        md += ["```", P.scaling_table(model, sc), "```", ""]
    text = "\n".join(md)
    print("\n".join(md[len(header):]))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comm_model.md").write_text(text + "\n")
    (out / "comm_model.json").write_text(json.dumps({
        "cores": cores, "ranks": ranks, "sizes": sizes, "malloc": a.malloc,
        "measured": {str(n): {str(s): r for s, r in rec.items()} for n, rec in records.items()},
        "fits": {str(k): v for k, v in links.items()}, "checks": {str(k): v for k, v in checks.items()},
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
