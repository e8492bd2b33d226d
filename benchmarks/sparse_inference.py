#!/usr/bin/env python3
"""Sparse inference on VGG-16's fc6 shape: compressed CSR x codebook products against dense
GEMV / GEMM and the library CSR, measured side by side in one run.

    python benchmarks/sparse_inference.py               # CPU, and the GPU too when CuPy sees one
    python benchmarks/sparse_inference.py --quick       # fewer runs (well under a minute on 2 cores)
    python benchmarks/sparse_inference.py --backend numpy --out bench-out/
    python benchmarks/sparse_inference.py --backend cuda   # GPU only; fails with the reason without one

The matrix: 4096 x 25088 (fc6), 4% of the entries kept at random (seeded), quantised onto a
32-entry codebook (5 bits, Deep Compression's fc layers; entry 0 is 0.0, the code fillers use).
Every format below holds exactly this matrix, and every result is checked against a float64 product.

CPU (batch 1 = SpMV, batch 64 = SpMM):
  np.matmul on the dense float32 matrix (BLAS GEMV / GEMM, every core), SciPy's csr_matrix in
  float32 (one core), and dp.ops.spmv / spmm on the numpy backend, which runs the native kernel
  dnnpar/cpu/csr_codebook.cpp (uint8 gaps + uint8 codes: 2 bytes per nonzero; rows over dnnpar/cpu/parallel.h's pool),
  also timed on one thread beside SciPy's one.
GPU (CuPy, imported only for it): cupy.matmul (cuBLAS), cupyx csr_matrix (cuSPARSE, float32), and
  dp.ops.spmv (vector and scalar) / dp.ops.spmm on the cuda backend with the uint8-codebook CSR.

Prints the table (speedups against dense and against the library CSR, bytes per nonzero of each
format, and each row's bandwidth bound: the bytes it must move at least -- matrix, x and y, once --
over the stream bandwidth measured in the same run, and the % of that bound the cold run reached)
and writes it as markdown plus every run as JSON into --out. A measurement, never a test: the
issue's targets (CPU, cold cache: >= 12x dense GEMV at batch 1, >= 8x dense GEMM at batch 64) are
printed as met / MISSED for the reader to judge.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under `python -m benchmarks.sparse_inference`
from _common import (OtherLoad, blas_name, check_text, common_meta, cpu_cores, median,  # noqa: E402
                     rand, rel_err, render_markdown, render_text, run_and_report, time_runs, write_report)
from kernels import SPIN_SRC, random_csr_host  # noqa: E402  (the same seeded fc6 generator as kernels.py)

import dnnpar as dp  # noqa: E402  (_common put the checkout on sys.path)
from dnnpar.backend import cpu_native  # noqa: E402
from dnnpar.backend.cuda import cuda_unavailable_reason  # noqa: E402

FC6 = (4096, 25088)          # VGG-16 fc6: 4096 outputs, 512 * 7 * 7 inputs
DENSITY = 0.04               # Deep Compression keeps 4% of fc6 (Table 5)
CODEBOOK_BITS = 5            # 32 shared weights for fc layers
BATCHES = (1, 64)

#: the issue's targets per batch (the native kernel's cold run against dense), and what the paper
#: measured (Deep Compression, section 6, batch 1)
TARGETS = {1: 12.0, 64: 8.0}
PAPER = "Deep Compression measured 9.3x on a CPU (MKL) and 8.8x on a Titan X at batch 1"

NOISY_SPREAD = 0.25          # a row's (p90 - p10) / median above this: flagged noisy
NOISY_OTHER_CORES = 0.2      # other processes busy on more cores than this during a row: noisy


# ---------------------------------------------------------------------------- the matrix
def quantise(values: np.ndarray, bits: int):
    """Deep Compression's linear codebook: code 0 is 0.0 (fillers); the other 2^bits - 1 centroids
    are spaced evenly over [min, max]. Returns (codes uint8 in 1.., codebook float32)."""
    n = (1 << bits) - 1
    centroids = np.linspace(values.min(), values.max(), n).astype(np.float32)
    mid = (centroids[1:] + centroids[:-1]) / 2
    codes = (1 + np.searchsorted(mid, values)).astype(np.uint8)
    return codes, np.concatenate([[np.float32(0.0)], centroids]).astype(np.float32)


@dataclass
class Fc6:
    m: int
    k: int
    indptr: np.ndarray       # int32
    indices: np.ndarray      # int32
    codes: np.ndarray        # uint8
    codebook: np.ndarray     # float32, entry 0 is 0.0
    values: np.ndarray       # float32, codebook[codes]: the float32 formats hold exactly these

    @property
    def nnz(self) -> int:
        return int(self.indices.size)

    def size_text(self) -> str:
        return f"{self.m}x{self.k}, {100.0 * self.nnz / (self.m * self.k):.2f}% ({self.nnz / self.m:.0f}/row)"

    def dense(self) -> np.ndarray:
        out = np.zeros((self.m, self.k), np.float32)
        rows = np.repeat(np.arange(self.m), np.diff(self.indptr))
        out[rows, self.indices] = self.values
        return out

    def oracle(self, dense: np.ndarray, x: np.ndarray) -> np.ndarray:
        """The product in float64 (row blocks of the dense matrix, so memory stays small)."""
        x64 = x.astype(np.float64)
        out = np.empty((self.m,) + x.shape[1:], np.float64)
        for lo in range(0, self.m, 512):
            out[lo:lo + 512] = dense[lo:lo + 512].astype(np.float64) @ x64
        return out


def make_fc6(seed: int, density: float, bits: int) -> Fc6:
    rng = np.random.default_rng(seed)
    m, k = FC6
    indptr, indices, values = random_csr_host(rng, m, k, density)
    codes, codebook = quantise(values, bits)
    return Fc6(m, k, indptr, indices, codes, codebook, codebook[codes])


# bytes each format stores (everything a product must read, x and y aside)
def dense_bytes(f: Fc6) -> float:
    return 4.0 * f.m * f.k


def csr32_bytes(f: Fc6) -> float:
    """float32 values + int32 column indices + int32 row pointers (SciPy, cuSPARSE)."""
    return 8.0 * f.nnz + 4.0 * (f.m + 1)


def csr_cb_bytes(f: Fc6) -> float:
    """dnnpar's CSR on the GPU: uint8 codes + int32 columns + int32 row pointers + codebook."""
    return 5.0 * f.nnz + 4.0 * (f.m + 1) + 4.0 * f.codebook.size


# ---------------------------------------------------------------------------- results
@dataclass
class Row:
    """One timed product; derived columns are filled in by :meth:`Bench.finish`."""
    device: str                  # "cpu" | "gpu"
    batch: int
    kernel: str
    fmt: str                     # storage format, in words
    matrix_bytes: float          # bytes the format stores
    nnz: int
    operand_bytes: float = 0.0   # x and y (or X and Y): read / written once at least
    runs_ms: list = field(default_factory=list)       # warm: the matrix may sit in cache between runs
    cold_runs_ms: list = field(default_factory=list)  # the last-level cache flushed before each run
    dense: bool = False          # the dense baseline of its device and batch
    library: bool = False        # the library CSR (SciPy / cuSPARSE) of its device and batch
    target: bool = False         # the row the target is judged on
    check: str = ""
    note: str = ""
    other_cores: float | None = None
    # derived
    ms: float | None = None
    cold_ms: float | None = None
    spread: float | None = None
    vs_dense: float | None = None
    vs_dense_cold: float | None = None
    vs_library: float | None = None
    bound_ms: float | None = None    # (matrix + operand bytes) / the run's stream bandwidth
    of_bound: float | None = None    # bound_ms / cold ms (warm ms where there is no cold run)
    target_met: bool | None = None

    @property
    def moved_bytes(self) -> float:
        return self.matrix_bytes + self.operand_bytes

    @property
    def bytes_per_nnz(self) -> float:
        return self.matrix_bytes / self.nnz


def spread_of(runs) -> float | None:
    if len(runs) < 2:
        return None
    lo, hi = np.percentile(runs, (10, 90)) if len(runs) >= 10 else (min(runs), max(runs))
    return float(hi - lo) / median(runs)


# ---------------------------------------------------------------------------- the harness
class Bench:
    COLUMNS = ("device", "batch", "kernel", "format", "B/nnz", "matrix MB", "median ms", "runs", "cold ms",
               "bound ms", "% of bound", "vs dense", "vs dense (cold)", "vs library CSR", "target", "check")
    RIGHT = {1, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13}

    def __init__(self, args, cpu: bool, gpu: bool):
        self.args, self.quick = args, args.quick
        self.do_cpu, self.do_gpu = cpu, gpu
        self.rows: list[Row] = []
        self.meta = common_meta("+".join(b for b, on in (("numpy", cpu), ("cuda", gpu)) if on), args)
        self.meta["blas"] = blas_name()
        self.repeat = args.repeat or (10 if self.quick else 40)
        self.budget_s = 0.5 if self.quick else 3.0
        self.cold_repeat = 3 if self.quick else 10
        self.fc6: Fc6 | None = None

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def section(self, name: str, fn) -> None:
        """Run one group; a failure becomes an error row and the run goes on."""
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        with OtherLoad() as load:
            try:
                fn()
            except Exception as e:  # noqa: BLE001 -- a benchmark reports, it does not stop
                self.add(Row(name.split()[0], 0, f"{name}: error", "-", 0.0, 1, note=f"{type(e).__name__}: {e}"[:200]))
                traceback.print_exc()
        self.meta[f"CPU used by other processes during {name}"] = load.text()
        print(f"[{name}] {load.wall_s:.1f} s", file=sys.stderr, flush=True)

    def run(self) -> None:
        t = time.perf_counter()
        self.fc6 = make_fc6(self.args.seed, self.args.density, CODEBOOK_BITS)
        f = self.fc6
        self.meta["matrix"] = (f"fc6 {f.size_text()}, seed {self.args.seed}; codebook of {f.codebook.size} "
                               f"(5 bits, entry 0 = 0.0); built in {time.perf_counter() - t:.1f} s")
        if self.do_cpu:
            self.section("cpu", self.cpu)
        if self.do_gpu:
            self.section("gpu", self.gpu)

    # ---- CPU
    def time_cpu(self, fn):
        """(warm runs ms, first result, other cores): _common.time_runs within this row's budget."""
        with OtherLoad() as load:
            runs, first = time_runs(fn, self.repeat, self.budget_s)
        return runs, first, load.cores

    def cold_cpu(self, fn, flush: np.ndarray) -> list[float]:
        """ms of runs each made right after writing a buffer twice the last-level cache, so the
        matrix (and x) come from DRAM as in a network whose other layers ran in between."""
        runs = []
        for _ in range(self.cold_repeat):
            flush.fill(1.0)
            t = time.perf_counter()
            fn()
            runs.append((time.perf_counter() - t) * 1e3)
        return runs

    def cpu(self) -> None:
        dp.set_backend("numpy")
        f = self.fc6
        lib = cpu_native.library()
        threads = cpu_native.threads()
        self.meta["native kernel"] = (f"dnnpar/cpu/csr_codebook.cpp, {threads} threads "
                                      f"({cpu_native.threads_rule()})" if lib is not None
                                      else f"unavailable ({cpu_native.unavailable_reason()}): dp.ops falls back "
                                           "to SciPy")
        try:
            import scipy
            import scipy.sparse
            self.meta["scipy"] = scipy.__version__
            sp = scipy.sparse.csr_matrix((f.values, f.indices, f.indptr), shape=(f.m, f.k))
        except ImportError:
            sp = None
            self.meta["scipy"] = "not installed (no SciPy row)"
        csr = dp.sparse.CSR(f.codes, f.indices, f.indptr, (f.m, f.k), codebook=f.codebook)
        compact = csr.compact()
        compact_bytes = compact.nbytes
        self.meta["compact format"] = (f"{compact.entries:,} entries for {f.nnz:,} nonzeros ({compact.fillers} "
                                       f"fillers), {compact.bytes_per_nonzero():.3f} B/nnz with row offsets and "
                                       "codebook")
        dense = f.dense()
        llc = last_level_cache_bytes()
        flush = np.empty(max(2 * llc, 64 << 20) // 4, np.float32)
        self.meta["cold runs"] = (f"{self.cold_repeat} per row, each after writing {flush.nbytes >> 20} MiB "
                                  f"(LLC {llc >> 20} MiB)")
        rng = np.random.default_rng(self.args.seed + 1)
        for b in BATCHES:
            x = rand(rng, f.k) if b == 1 else rand(rng, (f.k, b))
            want = f.oracle(dense, x)
            what = "GEMV" if b == 1 else "GEMM"
            op = dp.ops.spmv if b == 1 else dp.ops.spmm
            native = cpu_native.spmv if b == 1 else cpu_native.spmm
            xy = 4.0 * (f.k + f.m) * b  # x read, y written: once each at least

            runs, got, cores = self.time_cpu(lambda: dense @ x)
            self.add(Row("cpu", b, f"np.matmul dense ({what}, BLAS)", "dense float32", dense_bytes(f), f.nnz, xy, runs,
                         dense=True, check=check_text(rel_err(got, want)), other_cores=cores,
                         note="cold = warm: 411 MB never fits a cache"))
            if sp is not None:
                runs, got, cores = self.time_cpu(lambda: sp @ x)
                self.add(Row("cpu", b, "scipy csr_matrix (1 thread)", "CSR f32 val + i32 col", csr32_bytes(f), f.nnz,
                             xy, runs, self.cold_cpu(lambda: sp @ x, flush), library=True,
                             check=check_text(rel_err(got, want)), other_cores=cores))
            kind = "native kernel" if lib is not None else "no native kernel: SciPy"
            runs, got, cores = self.time_cpu(lambda: op(csr, x))
            self.add(Row("cpu", b, f"dp.ops.{op.__name__} numpy backend ({kind})",
                         "u8 gap + u8 code" if lib is not None else "CSR f32 val + i32 col",
                         compact_bytes if lib is not None else csr32_bytes(f), f.nnz, xy, runs,
                         self.cold_cpu(lambda: op(csr, x), flush), target=True,
                         check=check_text(rel_err(got, want)), other_cores=cores))
            if lib is not None and threads != 1:
                out = np.empty((f.m,) + x.shape[1:], np.float32)
                one = lambda: native(compact, x, out, threads=1)  # noqa: E731
                runs, got, cores = self.time_cpu(one)
                self.add(Row("cpu", b, "native kernel, 1 thread", "u8 gap + u8 code", compact_bytes, f.nnz, xy, runs,
                             self.cold_cpu(one, flush), check=check_text(rel_err(got.copy(), want)),
                             other_cores=cores))

    # ---- GPU
    def gpu(self) -> None:
        GpuTimer(self).run()

    # ---- output
    def finish(self) -> None:
        for r in self.rows:
            r.ms, r.cold_ms, r.spread = median(r.runs_ms), median(r.cold_runs_ms), spread_of(r.runs_ms)
        for r in self.rows:
            peers = [p for p in self.rows if p.device == r.device and p.batch == r.batch and p.ms]
            dense = next((p for p in peers if p.dense), None)
            library = next((p for p in peers if p.library), None)
            if r.ms and dense:
                r.vs_dense = dense.ms / r.ms
                if r.cold_ms:
                    r.vs_dense_cold = (dense.cold_ms or dense.ms) / r.cold_ms
            if r.ms and library and r is not library:
                r.vs_library = library.ms / r.ms
            if r.target and r.batch in TARGETS and (r.vs_dense_cold or r.vs_dense) is not None:
                r.target_met = (r.vs_dense_cold or r.vs_dense) >= TARGETS[r.batch]
        for dev in {r.device for r in self.rows}:
            # the stream bandwidth: the dense GEMV's read rate (its 411 MB stream from DRAM, every core)
            gemv = next((p for p in self.rows if p.device == dev and p.dense and p.batch == 1 and p.ms), None)
            if gemv is None:
                continue
            bw = gemv.moved_bytes / (gemv.ms * 1e-3)
            self.meta[f"{dev} stream bandwidth"] = (f"{bw / 1e9:.1f} GB/s: the dense GEMV's {gemv.moved_bytes / 1e6:.0f} MB "
                                                    f"in {gemv.ms:.3f} ms (median), this run")
            for r in self.rows:
                if r.device == dev and r.matrix_bytes and r.ms:
                    r.bound_ms = r.moved_bytes / bw * 1e3
                    r.of_bound = r.bound_ms / (r.cold_ms or r.ms)

    def noise_signs(self, r: Row) -> list[str]:
        signs = []
        if r.spread is not None and r.spread > NOISY_SPREAD:
            signs.append(f"spread ±{50 * r.spread:.0f}%")
        if r.other_cores is not None and r.other_cores > NOISY_OTHER_CORES:
            signs.append(f"others busy on {r.other_cores:.1f} cores")
        return signs

    def table_cells(self) -> list[list[str]]:
        def num(v, fmt, suffix=""):
            return "-" if v is None else format(v, fmt) + suffix

        out = []
        for r in self.rows:
            target = "-"
            if r.target and r.batch in TARGETS:
                verdict = {True: "met", False: "MISSED", None: "?"}[r.target_met]
                target = f">={TARGETS[r.batch]:g}x dense (cold): {verdict}"
            runs = "-" if not r.runs_ms else str(len(r.runs_ms)) + (
                f" (±{50 * r.spread:.0f}%)" if r.spread is not None else "")
            signs = self.noise_signs(r)
            check = "; ".join(s for s in (r.check, r.note, f"NOISY: {', '.join(signs)}" if signs else "") if s) or "-"
            out.append([r.device, str(r.batch) if r.batch else "-", r.kernel, r.fmt,
                        num(r.bytes_per_nnz if r.matrix_bytes else None, ".2f"),
                        num(r.matrix_bytes / 1e6 if r.matrix_bytes else None, ",.1f"),
                        num(r.ms, ".3f"), runs, num(r.cold_ms, ".3f"), num(r.bound_ms, ".3f"),
                        num(None if r.of_bound is None else 100 * r.of_bound, ".1f", "%"),
                        num(r.vs_dense, ".1f", "x"), num(r.vs_dense_cold, ".1f", "x"), num(r.vs_library, ".2f", "x"),
                        target, check])
        return out

    def verdict(self) -> str:
        parts = []
        for b, want in TARGETS.items():
            r = next((r for r in self.rows if r.target and r.batch == b and r.target_met is not None), None)
            what = f"CPU >= {want:g}x dense {'GEMV' if b == 1 else 'GEMM'} at batch {b} (cold)"
            if r is None:
                parts.append(f"{what}: not measured")
                continue
            pct = f", {100 * r.of_bound:.0f}% of its bandwidth bound" if r.of_bound is not None else ""
            parts.append(f"{what}: {'met' if r.target_met else 'MISSED'} ({r.vs_dense_cold or r.vs_dense:.1f}x cold, "
                         f"{r.vs_dense:.1f}x warm{pct})")
        return "targets: " + "; ".join(parts) + f". {PAPER}."

    def header_lines(self) -> list[str]:
        return ["dnnpar sparse inference benchmark: VGG-16 fc6, compressed CSR x codebook vs dense"] + \
            [f"{k}: {v}" for k, v in self.meta.items()] + [self.verdict()]

    def footnotes(self) -> list[str]:
        return [
            "B/nnz: bytes the format stores per nonzero (row pointers / offsets and codebook included; x and y "
            "not). dense: 4 * M * K / nnz. CSR f32: 4 B value + 4 B int32 column. u8 gap + u8 code: Deep "
            "Compression's format, 1 B relative column (gaps over 255 bridged by filler entries) + 1 B codebook "
            "index, int64 row offsets. GPU u8 code + i32 col: dnnpar's cuda kernels (csr_spmv_*_cb).",
            "median ms: warm, the median of the timed runs after warm-up (CPU: time.perf_counter, as many runs as fit "
            f"in {self.budget_s:g} s, at least 3, at most {self.repeat}; GPU: CUDA events, calls queued behind a "
            "spin kernel so launch overhead is not timed, L2 evicted between runs). Warm favours the small formats "
            "on the CPU: the 8 MB compact matrix stays in the 32 MB L3 between runs, SciPy's 33 MB and the dense "
            "411 MB do not. cold ms: each run right after a buffer twice the last-level cache was written, so the "
            "matrix and x come from DRAM, as in a network whose other layers ran in between.",
            "vs dense = dense ms / ms on the same device and batch (cold column: dense warm ms, which is DRAM-bound "
            "anyway, / cold ms); vs library CSR = SciPy (CPU) or cuSPARSE (GPU) ms / ms. SciPy uses one core; "
            "BLAS and the native kernel use every core (the '1 thread' row is the per-core comparison).",
            f"runs: timed runs (± half of p90 - p10, or max - min under 10 runs, as % of the median). NOISY: a "
            f"spread above {100 * NOISY_SPREAD:.0f}% or other processes busy on more than {NOISY_OTHER_CORES:g} "
            "cores during the row (/proc/stat less this process). On a 2-core machine shared with other jobs, read "
            "flagged rows as rough: multi-threaded rows suffer most (a thread descheduled mid-product stalls it).",
            "check: max relative error against a float64 product of the same matrix.",
            "bound ms: the bytes a row must move at least (the matrix as its format stores it, x and y once each) "
            "over the stream bandwidth of this run (the dense GEMV's read rate: 411 MB streamed from DRAM by BLAS on "
            "every core); % of bound = bound ms / cold ms (warm ms for rows without a cold run). 100% would be a "
            "product as fast as reading its operands.",
            "Targets (the issue): the numpy backend's row, cold, >= "
            + ", ".join(f"{v:g}x dense at batch {b}" for b, v in TARGETS.items()) + f" on the CPU. {PAPER}.",
        ]

    def text(self) -> str:
        return render_text(self.header_lines(), self.COLUMNS, self.table_cells(), self.RIGHT, self.footnotes())

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        return write_report(out_dir, "sparse_inference",
                            render_markdown(self.header_lines(), self.COLUMNS, self.table_cells(), self.RIGHT,
                                            self.footnotes()),
                            {"meta": self.meta, "targets": TARGETS, "verdict": self.verdict(),
                             "rows": [{**asdict(r), "bytes_per_nnz": r.bytes_per_nnz, "moved_bytes": r.moved_bytes}
                                      for r in self.rows]})


def last_level_cache_bytes() -> int:
    """The largest CPU cache (Linux sysfs), or 32 MiB when it cannot be read."""
    best = 0
    for p in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        try:
            text = p.read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
            best = max(best, int(text.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            pass
    return best or 32 << 20


# ---------------------------------------------------------------------------- GPU
class GpuTimer:
    """The GPU rows: cuBLAS and cuSPARSE against dnnpar's cuda kernels on the same matrix, timed
    with CUDA events as in benchmarks/kernels.py (queued behind a spin kernel, L2 evicted)."""

    WARMUP = 3

    def __init__(self, bench: Bench):
        import cupy  # only here: the CPU path must run without CuPy
        import cupyx.scipy.sparse

        self.b = bench
        self.cp, self.cpsp = cupy, cupyx.scipy.sparse
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props.get("name", b"?")
        name = name.decode() if isinstance(name, bytes) else str(name)
        l2 = int(props.get("l2CacheSize") or 64 * 2**20)
        try:  # CUDA 13 dropped clockRate from the properties; the attribute remains
            rt_ = cupy.cuda.runtime
            clock = rt_.deviceGetAttribute(rt_.cudaDevAttrClockRate, dev.id)
        except Exception:  # noqa: BLE001
            clock = None
        self.clock_khz = int(clock or props.get("clockRate") or 2_000_000)
        rt, drv = cupy.cuda.runtime.runtimeGetVersion(), cupy.cuda.runtime.driverGetVersion()
        bench.meta["device"] = (f"{name} (sm_{dev.compute_capability}, {props.get('multiProcessorCount', '?')} SMs, "
                                f"L2 {l2 / 2**20:.0f} MiB); cupy {cupy.__version__}, CUDA runtime {rt // 1000}."
                                f"{rt % 1000 // 10}, driver {drv // 1000}.{drv % 1000 // 10}")
        self.repeat = bench.args.repeat or (10 if bench.quick else 30)
        self.flush = cupy.empty(max(2 * l2, 64 * 2**20) // 4, np.float32)
        self.spin = cupy.RawKernel(SPIN_SRC, "bench_spin")

    def time(self, fn) -> list[float]:
        cp = self.cp
        for _ in range(self.WARMUP):
            fn()
        cp.cuda.Device().synchronize()
        t = time.perf_counter()
        fn()
        self.flush.fill(0)
        host = time.perf_counter() - t
        cp.cuda.Device().synchronize()
        starts = [cp.cuda.Event() for _ in range(self.repeat)]
        ends = [cp.cuda.Event() for _ in range(self.repeat)]
        spin_s = min(0.5, 1e-3 + 2.0 * self.repeat * host)
        self.spin((1,), (1,), (np.int64(spin_s * self.clock_khz * 1e3),))
        for s, e in zip(starts, ends):
            self.flush.fill(0)
            s.record()
            fn()
            e.record()
        ends[-1].synchronize()
        return [cp.cuda.get_elapsed_time(s, e) for s, e in zip(starts, ends)]

    def run(self) -> None:
        cp, f, b = self.cp, self.b.fc6, self.b
        with dp.use_backend("cuda"):
            csr_cb = dp.sparse.CSR(f.codes, f.indices, f.indptr, (f.m, f.k), codebook=f.codebook)
            ref = self.cpsp.csr_matrix((cp.asarray(f.values), cp.asarray(f.indices), cp.asarray(f.indptr)),
                                       shape=(f.m, f.k))
            host_dense = f.dense()
            dense = cp.asarray(host_dense)
            rng = np.random.default_rng(b.args.seed + 1)
            for batch in BATCHES:
                x_host = rand(rng, f.k) if batch == 1 else rand(rng, (f.k, batch))
                want = f.oracle(host_dense, x_host)
                x = cp.asarray(x_host)
                what = "GEMV" if batch == 1 else "GEMM"
                xy = 4.0 * (f.k + f.m) * batch
                b.add(Row("gpu", batch, f"cupy.matmul dense ({what}, cuBLAS)", "dense float32", dense_bytes(f), f.nnz,
                          xy, self.time(lambda: cp.matmul(dense, x)), dense=True,
                          check=check_text(rel_err(cp.matmul(dense, x), want))))
                # cupyx hands cuSPARSE a column-major X: convert outside the timing (as kernels.py does)
                xs = x if batch == 1 else cp.asfortranarray(x)
                b.add(Row("gpu", batch, "cupyx csr_matrix (cuSPARSE)", "CSR f32 val + i32 col", csr32_bytes(f), f.nnz,
                          xy, self.time(lambda: ref @ xs), library=True, check=check_text(rel_err(ref @ xs, want))))
                if batch == 1:
                    for algo in ("vector", "scalar"):
                        b.add(Row("gpu", batch, f"dp.ops.spmv cuda csr_spmv_{algo}_cb", "u8 code + i32 col",
                                  csr_cb_bytes(f), f.nnz, xy, self.time(lambda: dp.ops.spmv(csr_cb, x, algo=algo)),
                                  check=check_text(rel_err(dp.ops.spmv(csr_cb, x, algo=algo), want))))
                else:
                    b.add(Row("gpu", batch, "dp.ops.spmm cuda csr_spmm_cb", "u8 code + i32 col", csr_cb_bytes(f),
                              f.nnz, xy, self.time(lambda: dp.ops.spmm(csr_cb, x)),
                              check=check_text(rel_err(dp.ops.spmm(csr_cb, x), want))))
        cp.cuda.Device().synchronize()
        cp.get_default_memory_pool().free_all_blocks()


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("numpy", "cuda"),
                    help="numpy: the CPU rows only; cuda: the GPU rows only (an error without a usable GPU); "
                         "default: the CPU, and the GPU too when CuPy sees one")
    ap.add_argument("--out", default="bench-out",
                    help="folder for the markdown table and the JSON (default: bench-out/)")
    ap.add_argument("--quick", action="store_true", help="fewer runs (well under a minute on 2 CPU cores)")
    ap.add_argument("--repeat", type=int, help="most warm runs per CPU row (default 40, --quick 10; within a time "
                                               "budget of 3 s, 0.5 s) or the runs per GPU row (default 30, --quick 10)")
    ap.add_argument("--density", type=float, default=DENSITY, help=f"kept fraction (default {DENSITY})")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not 0.0 < args.density <= 1.0:
        ap.error(f"--density must be in (0, 1], got {args.density}")

    reason = cuda_unavailable_reason()
    if args.backend == "cuda" and reason:
        print(f"error: --backend cuda needs a usable GPU: {reason}", file=sys.stderr)
        return 2
    cpu = args.backend in (None, "numpy")
    gpu = args.backend == "cuda" or (args.backend is None and reason is None)
    if args.backend is None and reason:
        print(f"note: no GPU rows ({reason})", file=sys.stderr)
    print(f"CPU: {cpu_cores()} cores; building the fc6 matrix ...", file=sys.stderr, flush=True)
    return run_and_report(Bench(args, cpu, gpu), args.out)


if __name__ == "__main__":
    sys.exit(main())
