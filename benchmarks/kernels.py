#!/usr/bin/env python3
"""Benchmark every dnnpar kernel against its library peer, measured side by side in one run.

    python benchmarks/kernels.py                    # cuda when CuPy sees a GPU, else numpy
    python benchmarks/kernels.py --backend numpy --quick
    python benchmarks/kernels.py --backend cuda --out bench-out/

cuda:  SGEMM ladder (naive / tiled / regblock / regblock_db) vs cuBLAS (cupy.matmul), sgemm_tf32 vs cuBLAS
       with TF32 tensor cores; CSR SpMV (scalar,
       vector, uint8 codebook) and SpMM vs cuSPARSE (cupyx.scipy.sparse); im2col and depthwise
       conv as GB/s against the device-to-device copy bandwidth measured in the same run; direct
       vs im2col conv. Timed with CUDA events after warm-up; the median of many runs.
numpy: the numpy backend vs NumPy / SciPy (and PyTorch's CPU conv when torch is importable).
       Timed with time.perf_counter; the median of several runs after warm-up.

Prints a plain-text table and writes the same table as markdown plus the raw numbers as JSON
into --out. This is a measurement, never a test: no timing is asserted. Targets from the issue
are printed beside the numbers (met / MISSED) for the reader to judge.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under `python -m benchmarks.kernels`
from _common import (blas_name, check_text, common_meta, median, optional_torch, rand,  # noqa: E402
                     rel_err, render_markdown, render_text, run_and_report, time_runs, write_report)

import dnnpar as dp  # noqa: E402  (_common put the checkout on sys.path)
from dnnpar.backend.cuda import cuda_unavailable_reason  # noqa: E402
from dnnpar.ops.gemm import ALGOS as GEMM_ALGOS, TENSOR_CORE_ALGOS  # noqa: E402

#: Non-tensor-core FP32 peak (TFLOP/s) from NVIDIA's datasheets, matched on the device name.
#: H200 SXM is the same GH100 die at the same clocks as H100 SXM. PCIe / NVL parts run lower
#: clocks, so they (and every other device) get "n/a" unless --fp32-peak says otherwise.
FP32_PEAK_TFLOPS = (("H100", 67.0), ("H200", 67.0))
FP32_PEAK_EXCLUDE = ("PCIE", "NVL")

#: the issue's targets, printed beside the numbers
TARGET_GEMM = 75.0     # the default SGEMM (sgemm_regblock_db), % of cuBLAS at 4096^3
TARGET_TF32 = 80.0     # the tensor-core GEMM (sgemm_tf32), % of cuBLAS with TF32 tensor cores at 4096^3
TARGET_SPMV = 80.0     # CSR SpMV, % of cuSPARSE on the 1M-row matrix
TARGET_IM2COL = 70.0   # im2col, % of the measured device bandwidth
TARGET_DEPTHWISE_RATIO = 1.5  # numpy backend: depthwise (forward, forward + backward) at most 1.5x PyTorch CPU

CODEBOOK_SIZE = 32     # 5-bit weight sharing, what Deep Compression uses for fc layers
SPMM_BATCH = 64


# ---------------------------------------------------------------------------- results
@dataclass
class Row:
    """One measured kernel; derived columns are filled in by :meth:`Bench.finish`."""
    section: str
    kernel: str
    size: str
    runs_ms: list = field(default_factory=list)
    flops: float = 0.0          # useful floating-point operations of one call
    bytes: float = 0.0          # compulsory DRAM traffic of one call (each operand once)
    unit: str = "GFLOP/s"       # which rate the table shows: "GFLOP/s" or "GB/s"
    roof: str = ""              # "flop" (FP32 peak) | "mem" (copy bandwidth) | "both" | "" (none)
    peer: str = ""
    peer_ms: float | None = None
    target: float | None = None  # % of peer (target_of="peer") or of roofline (target_of="roof")
    target_of: str = "peer"
    check: str = ""             # max relative error against the peer's result
    note: str = ""
    host_us: float | None = None  # cuda: host time to enqueue one call (Python + launch)
    # derived
    ms: float | None = None
    rate: float | None = None
    pct_peer: float | None = None
    pct_roof: float | None = None
    target_met: bool | None = None


# ---------------------------------------------------------------------------- random inputs
def random_csr_host(rng, m: int, k: int, density: float):
    """Sorted, duplicate-free CSR arrays (indptr int32, indices int32, values float32).

    Small matrices draw an exact Bernoulli(density) mask; large ones draw ~density * k random
    columns per row and drop repeats (at 16 per row of 10^6 that loses ~0.01%)."""
    if m * k <= 2 * 10**8:
        mask = rng.random((m, k), dtype=np.float32) < density
        rows, cols = np.nonzero(mask)
        del mask
    else:
        lengths = rng.binomial(k, density, size=m)
        rows = np.repeat(np.arange(m, dtype=np.int64), lengths)
        keys = np.unique(rows * k + rng.integers(0, k, size=rows.size, dtype=np.int64))
        rows, cols = keys // k, keys % k
        del keys
    indptr = np.zeros(m + 1, dtype=np.int64)
    np.cumsum(np.bincount(rows, minlength=m), out=indptr[1:])
    values = rand(rng, rows.size)
    return indptr.astype(np.int32), cols.astype(np.int32), values


def codebook_of(rng, values):
    """Quantise values onto a sorted 32-entry codebook: (codes uint8, codebook float32, the
    quantised float32 values), so the float and codebook matrices are the same matrix."""
    codebook = np.sort(rand(rng, CODEBOOK_SIZE))
    codes = np.clip(np.searchsorted(codebook, values), 0, CODEBOOK_SIZE - 1).astype(np.uint8)
    return codes, codebook, codebook[codes]


def csr_size(m, k, nnz):
    per_row = nnz / m
    return f"{m}x{k} {100.0 * nnz / (m * k):.3g}% ({per_row:.0f}/row)" if per_row >= 100 else \
        f"{m}x{k} {100.0 * nnz / (m * k):.2g}% ({per_row:.3g}/row)"


# ---------------------------------------------------------------------------- the harness
class Bench:
    def __init__(self, backend: str, args):
        self.backend = backend
        self.args = args
        self.quick = args.quick
        self.rows: list[Row] = []
        self.meta = common_meta(backend, args)
        self.bandwidth = None   # bytes / s, measured in this run
        self.peak = args.fp32_peak * 1e12 if args.fp32_peak else None  # FLOP / s
        self.peak_source = "--fp32-peak" if args.fp32_peak else "n/a"
        self.torch = optional_torch()

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def section(self, name: str, fn) -> None:
        """Run one group of benchmarks; a failure becomes an error row, and the run goes on."""
        if self.args.only and name not in self.args.only:
            return
        t0 = time.perf_counter()
        print(f"[{name}] ...", file=sys.stderr, flush=True)
        try:
            fn()
        except Exception as e:  # noqa: BLE001 -- a benchmark reports, it does not stop
            self.add(Row(name, f"{name}: error", "-", note=f"{type(e).__name__}: {e}"[:160]))
            traceback.print_exc()
        finally:
            self.release()
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)

    def release(self) -> None:
        pass

    # ---- derived columns and output
    def finish(self) -> None:
        bw, peak = self.bandwidth, self.peak
        for r in self.rows:
            r.ms = median(r.runs_ms)
            if not r.ms:
                continue
            sec = r.ms / 1e3
            if r.unit == "GB/s":
                r.rate = r.bytes / sec / 1e9 if r.bytes else None
            else:
                r.rate = r.flops / sec / 1e9 if r.flops else None
            if r.peer_ms:
                r.pct_peer = 100.0 * r.peer_ms / r.ms
            t_flop = r.flops / peak if (peak and r.flops) else None
            t_mem = r.bytes / bw if (bw and r.bytes) else None
            bound = {"flop": t_flop, "mem": t_mem,
                     "both": max((t for t in (t_flop, t_mem) if t), default=None)}.get(r.roof)
            if bound:
                r.pct_roof = 100.0 * bound / sec
            if r.target is not None:
                got = r.pct_peer if r.target_of == "peer" else r.pct_roof
                r.target_met = None if got is None else got >= r.target

    COLUMNS = ("kernel", "size", "median ms", "rate", "peer", "peer ms", "% of peer", "% of roofline", "target",
               "check")

    def table_cells(self) -> list[list[str]]:
        def num(v, fmt):
            return "-" if v is None else format(v, fmt)

        out = []
        for r in self.rows:
            target = ""
            if r.target is not None:
                what = "peer" if r.target_of == "peer" else "roofline"
                verdict = {True: "met", False: "MISSED", None: "?"}[r.target_met]
                target = f">={r.target:.0f}% {what}: {verdict}"
            rate = "-" if r.rate is None else f"{r.rate:,.1f} {r.unit}"
            roof = num(r.pct_roof, ".1f")
            if r.pct_roof is None and r.roof == "flop" and r.ms:
                roof = "n/a"
            check = (r.check or "-") + (f"; {r.note}" if r.note else "")
            out.append([r.kernel, r.size, num(r.ms, ".3f"), rate, r.peer or "-", num(r.peer_ms, ".3f"),
                        num(r.pct_peer, ".1f"), roof, target or "-", check])
        return out

    def header_lines(self) -> list[str]:
        lines = [f"dnnpar kernel benchmark, backend {self.backend}"]
        for k, v in self.meta.items():
            lines.append(f"{k}: {v}")
        bw = f"{self.bandwidth / 1e9:,.0f} GB/s (measured in this run)" if self.bandwidth else "n/a"
        peak = f"{self.peak / 1e12:.1f} TFLOP/s ({self.peak_source})" if self.peak else "n/a"
        lines.append(f"roofline: FP32 peak {peak}; memory bandwidth {bw}")
        return lines

    RIGHT = {2, 3, 5, 6, 7}  # numeric columns, right-aligned

    def text(self) -> str:
        return render_text(self.header_lines(), self.COLUMNS, self.table_cells(), self.RIGHT, self.footnotes())

    def markdown(self) -> str:
        return render_markdown(self.header_lines(), self.COLUMNS, self.table_cells(), self.RIGHT, self.footnotes())

    def footnotes(self) -> list[str]:
        return ["% of peer = peer ms / ms (above 100: faster than the peer). % of roofline = the time the "
                "FP32 peak (flop) or the measured bandwidth (mem; compulsory bytes, each operand once) "
                "allows / the time measured. check = max relative error against the peer's result.",
                f"Targets (the issue, for the cuda backend): the register-blocked SGEMM (sgemm_regblock_db, the default) >= {TARGET_GEMM:.0f}% of cuBLAS at "
                f"4096^3; the tensor-core GEMM (sgemm_tf32) >= {TARGET_TF32:.0f}% of cuBLAS with TF32 tensor cores at 4096^3 "
                "(its check is against FP32 cuBLAS: TF32 operands give ~1e-4); "
                f"CSR SpMV >= {TARGET_SPMV:.0f}% of cuSPARSE on the 1M-row matrix; im2col >= "
                f"{TARGET_IM2COL:.0f}% of the measured device bandwidth."]

    def write(self, out_dir: Path) -> tuple[Path, Path]:
        return write_report(out_dir, f"kernels-{self.backend}", self.markdown(),
                            {"meta": self.meta,
                             "roofline": {"fp32_peak_flops": self.peak, "fp32_peak_source": self.peak_source,
                                          "bandwidth_bytes_per_s": self.bandwidth},
                             "rows": [asdict(r) for r in self.rows]})


# ---------------------------------------------------------------------------- CPU (numpy backend)
def conv_path(x, w, stride, padding) -> str:
    """Which numpy-backend path dp.ops.conv2d's forward takes for this layer: "tiled positions" /
    "tiled channels" (the register-tiled direct kernels of dnnpar/cpu/conv.cpp, vectors over
    output positions or channels) or "BLAS" (im2col + GEMM, or the blocked NHWC GEMMs)."""
    from dnnpar.ops import conv as C
    from dnnpar.ops._common import ConvGeometry

    g = ConvGeometry.make("conv2d", x.shape, w.shape[2], w.shape[3], stride, padding, 1)
    vectors = C.tiled_kernel(g, w.shape[0], x, w)
    return f"tiled {vectors}" if vectors else "BLAS"


@contextlib.contextmanager
def temporarily(table: dict, **values):
    """``table`` with ``values`` set inside the block, restored after."""
    saved = {k: table[k] for k in values}
    table.update(values)
    try:
        yield
    finally:
        table.update(saved)


class CpuBench(Bench):
    """The numpy backend against NumPy / SciPy (and torch's CPU conv when importable)."""

    COPY_MIB = 256
    GEMM_SIZES = (512, 1024, 2048)
    FC6 = (4096, 25088, 0.04)                   # VGG-16 fc6 (M, K, density)
    CONV = (64, 64, 64, 56, 3)                  # DESIGN.md's anchor layer: N, C, O, H=W, KH=KW (pad 1)
    CONV_QUICK_N = 16
    #: MobileNet v1's depthwise layers, 3x3 pad 1: (model, C, H=W, stride); the batch PyTorch's
    #: own CPU benchmarks of MobileNet use
    DEPTHWISE_N = 16
    DEPTHWISE_SHAPES = tuple(("224", c, hw, s) for c, hw, s in (
        (32, 112, 1), (64, 112, 2), (128, 56, 1), (128, 56, 2), (256, 28, 1), (256, 28, 2), (512, 14, 1),
        (512, 14, 2), (1024, 7, 1))) + tuple(("a0.5 96", c, hw, s) for c, hw, s in (
            (16, 48, 1), (32, 48, 2), (64, 24, 1), (64, 24, 2), (128, 12, 1), (128, 12, 2), (256, 6, 1),
            (256, 6, 2), (512, 3, 1)))
    DEPTHWISE_QUICK = (("224", 32, 112, 1), ("224", 256, 28, 2), ("a0.5 96", 64, 24, 1), ("a0.5 96", 512, 3, 1))

    def __init__(self, args):
        super().__init__("numpy", args)
        import scipy
        import scipy.sparse

        self.sp = scipy.sparse
        self.meta.update({"scipy": scipy.__version__, "blas": blas_name()})
        if self.torch is not None:
            self.meta["torch"] = f"{self.torch.__version__} ({self.torch.get_num_threads()} threads)"
        self.repeat = args.repeat or (25 if self.quick else 50)
        self.budget_s = 1.0 if self.quick else 4.0
        self.rng = np.random.default_rng(args.seed)
        self.last = None

    def time(self, fn) -> list[float]:
        """ms of each run (:func:`_common.time_runs`: within this measurement's time budget, at
        least 3 and at most --repeat); the warm-up call's result is kept in ``self.last``."""
        runs, self.last = time_runs(fn, self.repeat, self.budget_s)
        return runs

    def run(self) -> None:
        dp.set_backend("numpy")
        self.section("memory", self.memory)
        self.section("gemm", self.gemm)
        self.section("sparse", self.sparse)
        self.section("conv", self.conv)
        self.section("conv_layers", self.conv_layers)
        self.section("depthwise", self.depthwise)
        self.section("norm_pool", self.norm_pool)

    #: BatchNorm2d + ReLU (MobileNet v1 a0.5 96, batch 16: C, H=W) and pooling (N, C, H=W, window,
    #: stride: VGG-16 at 32^2's first pool, LeNet-5's, a 3x3/2 overlapping one)
    BN_SHAPES = ((16, 48), (64, 24), (128, 12), (512, 3))
    POOL_SHAPES = ((16, 64, 32, 2, 2), (64, 6, 28, 2, 2), (16, 64, 56, 3, 2))

    def norm_pool(self) -> None:
        """BatchNorm2d training forward + fused ReLU, and its backward; MaxPool2d / AvgPool2d
        forward + backward; beside PyTorch's CPU batch_norm + relu / max_pool2d / avg_pool2d with
        autograd at the same thread count. GB/s counts compulsory traffic: BN forward reads x,
        writes y (statistics pass reads x twice more), backward reads x, y, dy twice and writes dx."""
        from dnnpar.backend import cpu_native

        threads = cpu_native.threads("norm") or 1
        torch = self.torch
        if torch is not None:
            torch.set_num_threads(threads)
        self.meta["norm/pool threads"] = f"dnnpar {threads}, torch {threads if torch is not None else '-'}"
        n = self.DEPTHWISE_N
        for c, hw in self.BN_SHAPES[:2] if self.quick else self.BN_SHAPES:
            x, dy = rand(self.rng, (n, c, hw, hw)), rand(self.rng, (n, c, hw, hw))
            gamma, beta = rand(self.rng, (c,)), rand(self.rng, (c,))

            def step():
                y, st = dp.ops.batch_norm(x, gamma, beta, activation="relu")
                return dp.ops.batch_norm_backward(x, y, dy, gamma, st, True, "relu")

            runs = self.time(step)
            dgamma = self.last[1]
            row = dict(bytes=float(x.nbytes) * (4 + 7), unit="GB/s", roof="mem")
            size = f"N{n} {c}ch {hw}x{hw}"
            if torch is None:
                self.add(Row("norm_pool", "dp batch_norm+relu fwd+bwd", size, runs, **row))
                continue
            xg = torch.from_numpy(x).clone().requires_grad_()
            gg, bg = torch.from_numpy(gamma).clone().requires_grad_(), torch.from_numpy(beta).clone().requires_grad_()
            dyt = torch.from_numpy(dy)

            def torch_step():
                out = torch.relu(torch.nn.functional.batch_norm(xg, None, None, gg, bg, training=True, eps=1e-5))
                return torch.autograd.grad(out, (xg, gg, bg), dyt)

            t_t = self.time(torch_step)
            self.add(Row("norm_pool", "dp batch_norm+relu fwd+bwd", size, runs, peer="torch (CPU)",
                         peer_ms=median(t_t), check=check_text(rel_err(dgamma, self.last[1].numpy())),
                         note=f"dp/torch {median(runs) / median(t_t):.2f}x", **row))
        for pn, c, hw, k, st in self.POOL_SHAPES:
            x = rand(self.rng, (pn, c, hw, hw))
            for name, layer, tfn in (("max", dp.nn.MaxPool2d(k, st), "max_pool2d"),
                                     ("avg", dp.nn.AvgPool2d(k, st), "avg_pool2d")):
                oh = layer.output_shape((c, hw, hw))[1]
                dy = rand(self.rng, (pn, c, oh, oh))

                def step():
                    layer.forward(x)
                    return layer.backward(dy)

                runs = self.time(step)
                dx = self.last
                # forward reads x, writes y; backward reads dy (and x, y for max), writes dx
                row = dict(bytes=float(x.nbytes) * (2 + (2 if name == "max" else 1)) + float(dy.nbytes) * 2,
                           unit="GB/s", roof="mem")
                size = f"N{pn} {c}ch {hw}x{hw} k{k}s{st}"
                if torch is None:
                    self.add(Row("norm_pool", f"dp {name}_pool2d fwd+bwd", size, runs, **row))
                    continue
                xg, dyt = torch.from_numpy(x).clone().requires_grad_(), torch.from_numpy(dy)
                f = getattr(torch.nn.functional, tfn)

                def torch_step():
                    return torch.autograd.grad(f(xg, k, st), (xg,), dyt)[0]

                t_t = self.time(torch_step)
                self.add(Row("norm_pool", f"dp {name}_pool2d fwd+bwd", size, runs, peer="torch (CPU)",
                             peer_ms=median(t_t), check=check_text(rel_err(dx, self.last.numpy())),
                             note=f"dp/torch {median(runs) / median(t_t):.2f}x", **row))

    def memory(self) -> None:
        n = self.COPY_MIB * 2**20 // 4
        src, dst = rand(self.rng, n), np.empty(n, np.float32)
        copy = self.add(Row("memory", "np.copyto (1 thread)", f"{4 * n / 2**20:.0f} MiB",
                            self.time(lambda: np.copyto(dst, src)), bytes=8.0 * n, unit="GB/s"))
        # a BLAS GEMV streams its matrix on every core: the read bandwidth the sparse kernels face
        a, v = src.reshape(-1, 4096), rand(self.rng, 4096)
        gemv = self.add(Row("memory", "np.matmul GEMV read stream", f"{a.shape[0]}x{a.shape[1]}",
                            self.time(lambda: a @ v), bytes=4.0 * a.size, unit="GB/s"))
        self.bandwidth = max(r.bytes / (median(r.runs_ms) / 1e3) for r in (copy, gemv))
        for r in (copy, gemv):
            r.roof = "mem"

    def gemm(self) -> None:
        for s in self.GEMM_SIZES:
            a, b = rand(self.rng, (s, s)), rand(self.rng, (s, s))
            peer = self.time(lambda: np.matmul(a, b))
            flops = 2.0 * s ** 3
            self.add(Row("gemm", "np.matmul (BLAS)", f"{s}^3", peer, flops=flops, roof="flop"))
            self.add(Row("gemm", "dp.ops.gemm", f"{s}^3", self.time(lambda: dp.ops.gemm(a, b)), flops=flops,
                         roof="flop", peer="np.matmul", peer_ms=median(peer),
                         check=check_text(rel_err(dp.ops.gemm(a, b), a @ b))))
        self.fc_small_batch()
        self.openblas_default_coretype()

    #: (out, in features, batch): AlexNet's fc6 at batch 8 (its three products stream the 151 MB of
    #: weights or their gradient: memory-bound, so the rows print GB/s against the copy bandwidth)
    FC_SMALL_BATCH = ((4096, 9216, 8),)

    def fc_small_batch(self) -> None:
        """A fully connected layer's forward x W^T, input gradient dy W and weight gradient dy^T x
        at a small batch through dp.ops.gemm (dnnpar/cpu/blas.cpp's own loops for these shapes)
        against np.matmul (OpenBLAS on its own threads) and torch.matmul when installed. Every
        product writes into an output kept between calls, as Linear's weight gradient is (a fresh
        151 MB array is mapped page by page on each call, which would dwarf the product)."""
        torch = self.torch
        for out_f, in_f, batch in self.FC_SMALL_BATCH:
            w = rand(self.rng, (out_f, in_f))
            x, dy = rand(self.rng, (batch, in_f)), rand(self.rng, (batch, out_f))
            size = f"{out_f}x{in_f}, batch {batch}"
            # label, (a, b, trans_a, trans_b), shape of the product
            for label, (a, b, ta, tb), shape in (
                    ("forward x W^T", (x, w, False, True), (batch, out_f)),
                    ("input gradient dy W", (dy, w, False, False), (batch, in_f)),
                    ("weight gradient dy^T x", (dy, x, True, False), (out_f, in_f))):
                opa, opb = (a.T if ta else a), (b.T if tb else b)
                buf = np.zeros(shape, np.float32)
                row = dict(flops=2.0 * out_f * in_f * batch, bytes=4.0 * w.size, unit="GB/s", roof="mem")
                peer = self.time(lambda: np.matmul(opa, opb, out=buf))
                want = buf.copy()
                self.add(Row("gemm", f"np.matmul, fc {label}", size, peer, **row))
                if torch is not None:
                    ta_, tb_, tbuf = torch.from_numpy(opa), torch.from_numpy(opb), torch.zeros(shape)
                    self.add(Row("gemm", f"torch.matmul, fc {label}", size,
                                 self.time(lambda: torch.matmul(ta_, tb_, out=tbuf)), peer="np.matmul",
                                 peer_ms=median(peer), **row))
                mine = np.full(shape, np.nan, np.float32)
                runs = self.time(lambda: dp.ops.gemm(a, b, trans_a=ta, trans_b=tb, out=mine))
                self.add(Row("gemm", f"dp.ops.gemm, fc {label}", size, runs, peer="np.matmul", peer_ms=median(peer),
                             check=check_text(rel_err(mine, want)), **row))

    def openblas_default_coretype(self) -> None:
        """With OPENBLAS_CORETYPE pinned (DESIGN.md: Haswell on AVX-512 machines), also time
        np.matmul at 2048^3 in a child process with OpenBLAS left to pick its own kernels."""
        if "OPENBLAS_CORETYPE" not in os.environ or self.args.only:
            return
        code = ("import time, numpy as np; a = np.random.default_rng(0).standard_normal((2048, 2048), "
                "dtype=np.float32); a @ a; ts = []\n"
                "for _ in range(5):\n t = time.perf_counter(); a @ a; ts.append(time.perf_counter() - t)\n"
                "print(sorted(ts)[2] * 1e3)")
        env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
        row = Row("gemm", "np.matmul, OPENBLAS_CORETYPE unset (child process)", "2048^3", flops=2.0 * 2048 ** 3,
                  roof="flop")
        try:
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
            if out.returncode == 0:
                row.runs_ms = [float(out.stdout.split()[-1])]
            else:
                row.note = f"child exited {out.returncode} (OpenBLAS may not run on this CPU without the pin)"
        except Exception as e:  # noqa: BLE001
            row.note = f"{type(e).__name__}: {e}"
        self.add(row)

    def sparse(self) -> None:
        m, k, density = self.FC6
        indptr, indices, values = random_csr_host(self.rng, m, k, density)
        codes, codebook, qvalues = codebook_of(self.rng, values)
        nnz = indices.size
        size = csr_size(m, k, nnz)
        csr = dp.sparse.CSR(qvalues, indices, indptr, (m, k))
        csr_cb = dp.sparse.CSR(codes, indices, indptr, (m, k), codebook=codebook)
        ref = self.sp.csr_matrix((qvalues, indices, indptr), shape=(m, k))
        dense = ref.toarray()
        # bytes: values + column indices + row pointers + x + y (or X and Y at batch B)
        def traffic(vb, b):
            return nnz * (vb + 4.0) + 4.0 * (m + 1) + 4.0 * b * (k + m)

        for b in (1, SPMM_BATCH):
            x = rand(self.rng, k) if b == 1 else rand(self.rng, (k, b))
            name = "spmv" if b == 1 else "spmm"
            op = dp.ops.spmv if b == 1 else dp.ops.spmm
            label = size if b == 1 else f"{size}, batch {b}"
            flops = 2.0 * nnz * b
            kw = dict(flops=flops, unit="GB/s" if b == 1 else "GFLOP/s", roof="mem" if b == 1 else "both")
            t_dense = self.time(lambda: dense @ x)
            self.add(Row("sparse", "np.matmul dense (BLAS)", label, t_dense, bytes=4.0 * (m * k + b * (k + m)),
                         **{**kw, "flops": 2.0 * m * k * b, "roof": "mem" if b == 1 else "flop"}))
            t_scipy = self.time(lambda: ref @ x)
            want = self.last
            self.add(Row("sparse", f"scipy csr_matrix @ {'x' if b == 1 else 'X'}", label, t_scipy,
                         bytes=traffic(4, b), peer="np.matmul dense", peer_ms=median(t_dense),
                         check=check_text(rel_err(want, dense @ x)), **kw))
            for kind, mat, vb in (("float32", csr, 4), ("uint8 codebook", csr_cb, 1)):
                runs = self.time(lambda: op(mat, x))
                self.add(Row("sparse", f"dp.ops.{name} {kind}", label, runs, bytes=traffic(vb, b),
                             peer="scipy csr_matrix", peer_ms=median(t_scipy),
                             check=check_text(rel_err(self.last, want)), **kw))

    def conv(self) -> None:
        n, c, o, hw, kk = self.CONV
        n = self.CONV_QUICK_N if self.quick else n
        x, w = rand(self.rng, (n, c, hw, hw)), rand(self.rng, (o, c, kk, kk)) * 0.05
        size = f"N{n} {c}->{o} {hw}x{hw} {kk}x{kk} p1"
        flops = 2.0 * n * o * hw * hw * c * kk * kk
        t_im2col = self.time(lambda: dp.ops.conv2d(x, w, padding=1))
        want = self.last
        peer, peer_ms, peer_out = "", None, None
        if self.torch is not None:
            torch = self.torch
            xt, wt = torch.from_numpy(x), torch.from_numpy(w)
            with torch.inference_mode():
                t_torch = self.time(lambda: torch.nn.functional.conv2d(xt, wt, padding=1))
                peer_out = torch.nn.functional.conv2d(xt, wt, padding=1).numpy()
            self.add(Row("conv", "torch conv2d (CPU)", size, t_torch, flops=flops, roof="flop",
                         check=check_text(rel_err(peer_out, want))))
            peer, peer_ms = "torch conv2d", median(t_torch)
        self.add(Row("conv", f"dp.ops.conv2d ({conv_path(x, w, 1, 1)})", size, t_im2col, flops=flops, roof="flop",
                     peer=peer, peer_ms=peer_ms,
                     check=check_text(rel_err(want, peer_out)) if peer_out is not None else ""))
        t_direct = self.time(lambda: dp.ops.conv2d(x, w, padding=1, algo="direct"))
        self.add(Row("conv", "dp.ops.conv2d direct", size, t_direct, flops=flops, roof="flop",
                     peer="dp conv2d im2col", peer_ms=median(t_im2col), check=check_text(rel_err(self.last, want))))
        cols_bytes = 4.0 * c * kk * kk * n * hw * hw
        self.add(Row("conv", "dp.ops.im2col", size, self.time(lambda: dp.ops.im2col(x, kk, kk, padding=1)),
                     bytes=x.nbytes + cols_bytes, unit="GB/s", roof="mem"))

    #: the zoo's and the interop graphs' convolution layers (N, C, O, H=W, K, stride; padding K // 2)
    CONV_LAYERS = ((16, 16, 16, 32, 3, 1), (16, 16, 32, 32, 3, 2), (16, 64, 64, 8, 3, 1), (64, 6, 16, 14, 5, 1),
                   (16, 64, 64, 32, 3, 1), (16, 128, 128, 16, 3, 1), (16, 256, 256, 8, 3, 1),
                   (16, 512, 512, 4, 3, 1), (16, 32, 64, 48, 1, 1), (16, 256, 256, 6, 1, 1),
                   (64, 32, 64, 16, 3, 2), (64, 64, 64, 8, 3, 1))  # the ResNet-style net's last stage, batch 64
    CONV_LAYERS_QUICK = CONV_LAYERS[:3] + CONV_LAYERS[6:7] + CONV_LAYERS[8:9] + CONV_LAYERS[10:]

    def conv_layers(self) -> None:
        """Each layer's forward and forward + backward (dx, dW, db) by the path dp.ops.conv2d takes
        (the tiled direct kernels of one family, vectors over output positions or channels, or BLAS
        on im2col, by ops.conv.TILED's rules), by the other tiled family and by the BLAS path alone
        (each forced: the references for the rules), and by PyTorch's CPU conv2d with autograd."""
        from dnnpar.ops import conv as C

        for n, c, o, hw, k, stride in (self.CONV_LAYERS_QUICK if self.quick else self.CONV_LAYERS):
            x, w = rand(self.rng, (n, c, hw, hw)), rand(self.rng, (o, c, k, k)) * 0.05
            pad = k // 2
            y = dp.ops.conv2d(x, w, None, stride, pad)
            dy = rand(self.rng, y.shape)
            size = f"N{n} {c}->{o} {hw}x{hw} {k}x{k} s{stride}"
            fwd = 2.0 * y.size * c * k * k
            step = {"fwd": (fwd, lambda: dp.ops.conv2d(x, w, None, stride, pad)),
                    "fwd+bwd": (3 * fwd, lambda: (dp.ops.conv2d(x, w, None, stride, pad),
                                                  dp.ops.conv2d_backward(x, w, dy, stride, pad)))}
            peer = {}
            if self.torch is not None:
                torch = self.torch
                xt, wt, dyt = torch.from_numpy(x), torch.from_numpy(w), torch.from_numpy(dy)

                def torch_both():
                    xg, wg = xt.detach().requires_grad_(), wt.detach().requires_grad_()
                    torch.nn.functional.conv2d(xg, wg, None, stride, pad).backward(dyt)
                with torch.inference_mode():
                    peer["fwd"] = self.time(lambda: torch.nn.functional.conv2d(xt, wt, None, stride, pad))
                peer["fwd+bwd"] = self.time(torch_both)
            path = conv_path(x, w, stride, pad)
            for what, (flops, fn) in step.items():
                ref = median(peer[what]) if what in peer else None
                self.add(Row("conv_layers", f"conv2d {what} ({path})", size, self.time(fn), flops=flops, roof="flop",
                             peer="torch" if ref else "", peer_ms=ref))
                if path.startswith("tiled"):  # the other family and BLAS, forced
                    other = "positions" if path.endswith("channels") else "channels"
                    for label, switch in ((f"tiled {other} forced", dict(vectors=other)),
                                          ("BLAS, tiled off", dict(use=False))):
                        with temporarily(C.TILED, **switch):
                            self.add(Row("conv_layers", f"conv2d {what} ({label})", size, self.time(fn),
                                         flops=flops, roof="flop", peer="torch" if ref else "", peer_ms=ref))

    def depthwise(self) -> None:
        """MobileNet v1's depthwise layers (3x3, pad 1), forward and forward + backward (dx, dw),
        beside PyTorch's CPU conv2d(groups=C) and its autograd backward, at the same thread count."""
        from dnnpar.backend import cpu_native

        threads = cpu_native.threads("depthwise") or 1  # the native kernel's team (BLAS's thread count)
        torch = self.torch
        if torch is not None:
            torch.set_num_threads(threads)
        self.meta["depthwise threads"] = f"dnnpar {threads}, torch {threads if torch is not None else '-'}"
        n = self.DEPTHWISE_N
        shapes = self.DEPTHWISE_QUICK if self.quick else self.DEPTHWISE_SHAPES
        for model, c, hw, stride in shapes:
            x, w = rand(self.rng, (n, c, hw, hw)), rand(self.rng, (c, 1, 3, 3))
            oh = (hw + 2 - 3) // stride + 1
            dy = rand(self.rng, (n, c, oh, oh))
            size = f"{model} N{n} {c}ch {hw}x{hw} s{stride}"
            x_b, y_b = float(x.nbytes), 4.0 * n * c * oh * oh
            fwd = dict(flops=2.0 * n * c * oh * oh * 9, bytes=x_b + y_b, unit="GB/s", roof="mem",
                       target=100.0 / TARGET_DEPTHWISE_RATIO)
            # forward + backward: x and y once forward; x, dy read and dx written backward
            both = dict(flops=3 * fwd["flops"], bytes=3 * x_b + 2 * y_b, unit="GB/s", roof="mem",
                        target=100.0 / TARGET_DEPTHWISE_RATIO)
            t_f = self.time(lambda: dp.ops.depthwise_conv2d(x, w, stride=stride, padding=1))
            y = self.last

            def step():
                dp.ops.depthwise_conv2d(x, w, stride=stride, padding=1)
                return dp.ops.depthwise_conv2d_backward(x, w, dy, stride=stride, padding=1)

            t_fb = self.time(step)
            dw = self.last[1]
            if torch is None:
                self.add(Row("depthwise", "dp.ops.depthwise_conv2d", size, t_f, **fwd))
                self.add(Row("depthwise", "dp depthwise forward + backward", size, t_fb, **both))
                continue
            xt, wt, dyt = (torch.from_numpy(a) for a in (x, w, dy))
            with torch.inference_mode():
                t_tf = self.time(lambda: torch.nn.functional.conv2d(xt, wt, stride=stride, padding=1, groups=c))
                y_t = self.last.numpy()
            xg, wg = xt.clone().requires_grad_(), wt.clone().requires_grad_()

            def torch_step():
                out = torch.nn.functional.conv2d(xg, wg, stride=stride, padding=1, groups=c)
                return torch.autograd.grad(out, (xg, wg), dyt)

            t_tfb = self.time(torch_step)
            dw_t = self.last[1].numpy()
            for kernel, runs, peer_runs, kw, err in (
                    ("dp.ops.depthwise_conv2d", t_f, t_tf, fwd, rel_err(y, y_t)),
                    ("dp depthwise forward + backward", t_fb, t_tfb, both, rel_err(dw, dw_t))):
                self.add(Row("depthwise", kernel, size, runs, peer="torch (CPU)",
                             peer_ms=median(peer_runs), check=check_text(err),
                             note=f"dp/torch {median(runs) / median(peer_runs):.2f}x", **kw))

    def footnotes(self):
        return super().footnotes() + [
            "CPU: time.perf_counter, median after warm-up (fewer runs for the slow paths; "
            "see runs_ms in the JSON). The memory bound is the faster of np.copyto and a BLAS GEMV stream.",
            f"depthwise (numpy backend): target dp/torch <= {TARGET_DEPTHWISE_RATIO}x (>= "
            f"{100 / TARGET_DEPTHWISE_RATIO:.0f}% of peer) for forward and for forward + backward, both sides on "
            "the same thread count; GB/s counts x and y once forward and x, dy, dx backward; check: forward y, "
            "and dw for forward + backward, against torch.",
        ]


# ---------------------------------------------------------------------------- GPU (cuda backend)
@contextlib.contextmanager
def cublas_tf32(cp):
    """cupy.matmul on float32 with cuBLAS's TF32 compute type (what CUPY_TF32=1 selects at import),
    switched for this block only."""
    from cupy._core import _routines_linalg as linalg

    old = linalg.get_compute_type(np.float32)
    linalg.set_compute_type(np.float32, linalg.COMPUTE_TYPE_TF32)
    try:
        yield
    finally:
        linalg.set_compute_type(np.float32, old)


SPIN_SRC = r"""
extern "C" __global__ void bench_spin(long long cycles) {
    long long t0 = clock64();
    while (clock64() - t0 < cycles) { }
}
"""


class GpuBench(Bench):
    """The cuda backend's kernels against cuBLAS / cuSPARSE (and cuDNN via torch when present)."""

    COPY_MIB, COPY_MIB_QUICK = 1024, 512
    GEMM_SIZES = ((1024,) * 3, (2048,) * 3, (4096,) * 3, (4093, 4091, 4099))   # (M, N, K)
    GEMM_SIZES_QUICK = ((1024,) * 3, (4096,) * 3)
    GEMM_TARGET_SIZE = (4096,) * 3
    NAIVE_MAX = 2048                            # sgemm_naive only up to this size
    MATRICES = (("1M-row", 1_000_000, 1_000_000, 16e-6), ("fc6", 4096, 25088, 0.04))  # (label, M, K, density)
    SPMV_TARGET_MATRIX = "1M-row"
    SPMM_QUICK_MATRICES = ("fc6",)
    CONV = (32, 64, 64, 56, 3)                  # VGG-like layer: N, C, O, H=W, KH=KW (pad 1)
    DEPTHWISE = (32, 256, 28)                   # MobileNet layer: N, C, H=W (3x3, pad 1)

    def __init__(self, args):
        super().__init__("cuda", args)
        import cupy  # only here: the numpy path must run without CuPy
        import cupyx.scipy.sparse

        self.cp = cupy
        self.cpsp = cupyx.scipy.sparse
        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props.get("name", b"?")
        self.device_name = name.decode() if isinstance(name, bytes) else str(name)
        self.l2_bytes = int(props.get("l2CacheSize") or self._attribute("cudaDevAttrL2CacheSize") or 64 * 2**20)
        self.clock_khz = int(self._attribute("cudaDevAttrClockRate") or props.get("clockRate") or 2_000_000)
        rt, drv = cupy.cuda.runtime.runtimeGetVersion(), cupy.cuda.runtime.driverGetVersion()
        self.meta.update({
            "device": f"{self.device_name} (sm_{dev.compute_capability}, {props.get('multiProcessorCount', '?')} SMs, "
                      f"{int(props.get('totalGlobalMem', 0)) / 2**30:.0f} GiB, L2 {self.l2_bytes / 2**20:.0f} MiB)",
            "cupy": cupy.__version__,
            "cuda": f"runtime {rt // 1000}.{rt % 1000 // 10}, driver {drv // 1000}.{drv % 1000 // 10}",
            "l2 flush between runs": not args.no_flush,
        })
        if self.peak is None:
            upper = self.device_name.upper()
            for key, tflops in FP32_PEAK_TFLOPS:
                if key in upper and not any(x in upper for x in FP32_PEAK_EXCLUDE):
                    self.peak, self.peak_source = tflops * 1e12, f"datasheet figure for {key} SXM"
                    break
        self.torch = self._cuda_torch()
        if self.torch is not None:
            self.meta["torch"] = f"{self.torch.__version__} (cuDNN {self.torch.backends.cudnn.version()}, TF32 off)"
        self.repeat = args.repeat or (10 if self.quick else 30)
        self.warmup = 3
        self.rng = np.random.default_rng(args.seed)
        self.spin = cupy.RawKernel(SPIN_SRC, "bench_spin")
        self.flush = None if args.no_flush else cupy.empty(max(2 * self.l2_bytes, 64 * 2**20) // 4, np.float32)

    def _attribute(self, name: str):
        """A device attribute, or None where this CUDA / CuPy lacks it."""
        try:
            rt = self.cp.cuda.runtime
            return rt.deviceGetAttribute(getattr(rt, name), self.cp.cuda.Device().id)
        except Exception:
            return None

    def _cuda_torch(self):
        torch = self.torch
        try:
            if torch is None or not torch.cuda.is_available():
                return None
            torch.backends.cudnn.allow_tf32 = False  # FP32 against FP32
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.benchmark = True    # the peer gets its best algorithm (chosen in warm-up)
            return torch
        except Exception:
            return None

    def dev(self, a):
        return self.cp.asarray(a)

    def release(self) -> None:
        self.cp.cuda.Device().synchronize()
        self.cp.get_default_memory_pool().free_all_blocks()

    def time(self, fn, row_note: list | None = None):
        """Per-run CUDA events around ``fn`` after warm-up; returns (ms list, host µs per call).

        The GPU is first held busy by a spin kernel long enough for every timed call to be queued
        behind it, so the events time the device work back to back and not Python's launch
        overhead (that is reported separately as host µs). Between runs a memset larger than L2
        evicts the operands, so a matrix that happens to fit in L2 is still read from DRAM."""
        cp = self.cp
        for _ in range(self.warmup):
            fn()
        cp.cuda.Device().synchronize()
        t = time.perf_counter()
        fn()
        host = time.perf_counter() - t
        if self.flush is not None:
            t = time.perf_counter()
            self.flush.fill(0)
            host += time.perf_counter() - t
        cp.cuda.Device().synchronize()
        starts = [cp.cuda.Event() for _ in range(self.repeat)]
        ends = [cp.cuda.Event() for _ in range(self.repeat)]
        spin_s = min(0.5, 1e-3 + 2.0 * self.repeat * host)
        self.spin((1,), (1,), (np.int64(spin_s * self.clock_khz * 1e3),))
        t = time.perf_counter()
        for s, e in zip(starts, ends):
            if self.flush is not None:
                self.flush.fill(0)
            s.record()
            fn()
            e.record()
        enqueue = time.perf_counter() - t
        ends[-1].synchronize()
        runs = [cp.cuda.get_elapsed_time(s, e) for s, e in zip(starts, ends)]
        if enqueue > spin_s and row_note is not None:
            row_note.append("host-bound: runs may include launch gaps")
        return runs, host * 1e6

    def measure(self, section, kernel, size, fn, **kw) -> Row:
        notes: list[str] = []
        runs, host_us = self.time(fn, notes)
        row = Row(section, kernel, size, runs, host_us=host_us, **kw)
        if notes:
            row.note = "; ".join(filter(None, [row.note, *notes]))
        return self.add(row)

    def run(self) -> None:
        dp.set_backend("cuda")
        self.section("memory", self.memory)
        self.section("gemm", self.gemm)
        self.section("spmv", self.spmv)
        self.section("spmm", self.spmm)
        self.section("conv", self.conv)
        self.section("depthwise", self.depthwise)

    def torch_peer(self, section: str, fn):
        """Run an optional torch peer; a failure there becomes an error row, not a lost section."""
        try:
            return fn()
        except Exception as e:  # noqa: BLE001
            self.add(Row(section, "torch peer: error", "-", note=f"{type(e).__name__}: {e}"[:160]))
            traceback.print_exc()
            return None

    def memory(self) -> None:
        cp = self.cp
        n = (self.COPY_MIB_QUICK if self.quick else self.COPY_MIB) * 2**20 // 4
        src, dst = cp.ones(n, np.float32), cp.empty(n, np.float32)
        size = f"{4 * n / 2**20:.0f} MiB"
        a = self.measure("memory", "cupy.copyto (D2D)", size, lambda: cp.copyto(dst, src), bytes=8.0 * n, unit="GB/s")
        b = self.measure("memory", "cudaMemcpyAsync D2D", size,
                         lambda: dst.data.copy_from_device_async(src.data, 4 * n), bytes=8.0 * n, unit="GB/s")
        self.bandwidth = max(r.bytes / (median(r.runs_ms) / 1e3) for r in (a, b))
        for r in (a, b):
            r.roof = "mem"

    def gemm(self) -> None:
        cp = self.cp
        for m, n, k in self.GEMM_SIZES_QUICK if self.quick else self.GEMM_SIZES:
            a, b = self.dev(rand(self.rng, (m, k))), self.dev(rand(self.rng, (k, n)))
            size = f"{m}^3" if m == n == k else f"{m}x{n}x{k}"
            flops = 2.0 * m * n * k
            peer = self.measure("gemm", "cupy.matmul (cuBLAS)", size, lambda: cp.matmul(a, b), flops=flops, roof="flop")
            want = cp.matmul(a, b)
            for algo in GEMM_ALGOS:
                if algo == "naive" and max(m, n, k) > self.NAIVE_MAX:
                    continue
                if algo in TENSOR_CORE_ALGOS:
                    continue  # their peer is cuBLAS with TF32 tensor cores, below
                target = TARGET_GEMM if (algo == "regblock_db" and (m, n, k) == self.GEMM_TARGET_SIZE) else None
                self.measure("gemm", f"sgemm_{algo}", size, lambda: dp.ops.gemm(a, b, algo=algo), flops=flops,
                             roof="flop", peer="cuBLAS", peer_ms=median(peer.runs_ms), target=target,
                             check=check_text(rel_err(dp.ops.gemm(a, b, algo=algo), want)))
            with cublas_tf32(cp):
                tc_peer = self.measure("gemm", "cupy.matmul (cuBLAS, TF32 tensor cores)", size,
                                       lambda: cp.matmul(a, b), flops=flops,
                                       check=check_text(rel_err(cp.matmul(a, b), want)),
                                       note="check: against FP32 cuBLAS (~1e-4 says TF32 was used)")
            for algo in TENSOR_CORE_ALGOS:  # bf16 beside the same peer: float32 in and out, no BF16 cuBLAS peer
                target = TARGET_TF32 if (algo == "tf32" and (m, n, k) == self.GEMM_TARGET_SIZE) else None
                self.measure("gemm", f"sgemm_{algo}", size, lambda: dp.ops.gemm(a, b, algo=algo), flops=flops,
                             peer="cuBLAS TF32", peer_ms=median(tc_peer.runs_ms), target=target,
                             check=check_text(rel_err(dp.ops.gemm(a, b, algo=algo), want)),
                             note="check: against FP32 cuBLAS")
            del a, b, want
            self.release()

    def _matrices(self, labels=None):
        """(label, float32 CSR, codebook CSR, cuSPARSE matrix, dense or None) for each test matrix;
        the float32 and the codebook matrix hold the same (quantised) values."""
        for label, m, k, density in self.MATRICES:
            if labels is not None and label not in labels:
                continue
            indptr, indices, values = random_csr_host(self.rng, m, k, density)
            codes, codebook, qvalues = codebook_of(self.rng, values)
            csr = dp.sparse.CSR(qvalues, indices, indptr, (m, k))
            csr_cb = dp.sparse.CSR(codes, indices, indptr, (m, k), codebook=codebook)
            ref = self.cpsp.csr_matrix((csr.data, csr.indices, csr.indptr), shape=(m, k))
            dense = None
            if m * k <= 2 * 10**8:
                dense = self.cp.zeros((m, k), np.float32)
                rows = np.repeat(np.arange(m), np.diff(indptr))
                dense[self.dev(rows), csr.indices] = csr.data
            yield label, csr, csr_cb, ref, dense
            del csr, csr_cb, ref, dense
            self.release()

    def spmv(self) -> None:
        cp = self.cp
        for label, csr, csr_cb, ref, dense in self._matrices():
            m, k = csr.shape
            nnz = csr.nnz
            size = f"{label} {csr_size(m, k, nnz)}"
            x = self.dev(rand(self.rng, k))
            def traffic(vb):
                return nnz * (vb + 4.0) + 4.0 * (m + 1) + 4.0 * (k + m)
            kw = dict(flops=2.0 * nnz, unit="GB/s", roof="mem")
            peer = self.measure("spmv", "cupyx csr_matrix @ x (cuSPARSE)", size, lambda: ref @ x,
                                bytes=traffic(4), **kw)
            want = ref @ x
            if dense is not None:
                self.measure("spmv", "cupy.matmul dense GEMV (cuBLAS)", size, lambda: cp.matmul(dense, x),
                             bytes=4.0 * (m * k + m + k), **{**kw, "flops": 2.0 * m * k},
                             check=check_text(rel_err(cp.matmul(dense, x), want)))
            for name, mat, vb in (("", csr, 4), (" uint8 codebook", csr_cb, 1)):
                # the target is for the float32 kernels: the codebook ones move fewer bytes than cuSPARSE
                target = TARGET_SPMV if (label == self.SPMV_TARGET_MATRIX and vb == 4) else None
                for algo in ("scalar", "vector"):
                    self.measure("spmv", f"csr_spmv_{algo}{name}", size, lambda: dp.ops.spmv(mat, x, algo=algo),
                                 bytes=traffic(vb), peer="cuSPARSE", peer_ms=median(peer.runs_ms), target=target,
                                 check=check_text(rel_err(dp.ops.spmv(mat, x, algo=algo), want)), **kw)
            del x, want

    def spmm(self) -> None:
        cp = self.cp
        b = SPMM_BATCH
        for label, csr, csr_cb, ref, dense in self._matrices(self.SPMM_QUICK_MATRICES if self.quick else None):
            m, k = csr.shape
            nnz = csr.nnz
            size = f"{label} {csr_size(m, k, nnz)}, batch {b}"
            X = self.dev(rand(self.rng, (k, b)))
            Xf = cp.asfortranarray(X)  # cupyx hands cuSPARSE a column-major X: convert outside the timing
            def traffic(vb):
                return nnz * (vb + 4.0) + 4.0 * (m + 1) + 4.0 * b * (k + m)
            kw = dict(flops=2.0 * nnz * b, roof="both")
            peer = self.measure("spmm", "cupyx csr_matrix @ X (cuSPARSE)", size, lambda: ref @ Xf,
                                bytes=traffic(4), **kw)
            want = ref @ Xf
            if dense is not None:
                self.measure("spmm", "cupy.matmul dense (cuBLAS)", size, lambda: cp.matmul(dense, X),
                             bytes=4.0 * (m * k + b * (m + k)), **{**kw, "flops": 2.0 * m * k * b},
                             check=check_text(rel_err(cp.matmul(dense, X), want)))
            for name, mat, vb in (("", csr, 4), ("_cb", csr_cb, 1)):
                self.measure("spmm", f"csr_spmm{name}", size, lambda: dp.ops.spmm(mat, X), bytes=traffic(vb),
                             peer="cuSPARSE", peer_ms=median(peer.runs_ms),
                             check=check_text(rel_err(dp.ops.spmm(mat, X), want)), **kw)
            del X, Xf, want

    def _torch_conv(self, x, w, **kw):
        """torch's conv2d (cuDNN) on the same device buffers, enqueued on CuPy's current stream."""
        torch = self.torch
        xt, wt = torch.from_dlpack(x), torch.from_dlpack(w)
        ptr = self.cp.cuda.get_current_stream().ptr  # 0: the legacy default stream, torch's own default too

        def run():
            with (torch.cuda.stream(torch.cuda.ExternalStream(ptr)) if ptr else contextlib.nullcontext()), \
                    torch.inference_mode():
                return torch.nn.functional.conv2d(xt, wt, **kw)

        return run, lambda: self.cp.from_dlpack(run().contiguous())

    def conv(self) -> None:
        cp = self.cp
        n, c, o, hw, kk = self.CONV
        x_host = rand(self.rng, (n, c, hw, hw))
        x, w = self.dev(x_host), self.dev(rand(self.rng, (o, c, kk, kk)) * 0.05)
        size = f"N{n} {c}->{o} {hw}x{hw} {kk}x{kk} p1"
        cols_bytes = 4.0 * c * kk * kk * n * hw * hw
        with dp.use_backend("numpy"):
            cols_ref = dp.ops.im2col(x_host, kk, kk, padding=1)
        err = rel_err(cp.asnumpy(dp.ops.im2col(x, kk, kk, padding=1)), cols_ref)
        del cols_ref
        self.measure("conv", "im2col", size, lambda: dp.ops.im2col(x, kk, kk, padding=1),
                     bytes=x.nbytes + cols_bytes, unit="GB/s", roof="mem", target=TARGET_IM2COL, target_of="roof",
                     peer="", check=check_text(err) + " (vs numpy backend)")
        flops = 2.0 * n * o * hw * hw * c * kk * kk
        w2 = w.reshape(o, -1)

        def im2col_cublas():
            y = cp.matmul(w2, dp.ops.im2col(x, kk, kk, padding=1))
            return cp.ascontiguousarray(y.reshape(o, n, hw, hw).transpose(1, 0, 2, 3))

        want = im2col_cublas()
        peer = self.measure("conv", "im2col + cupy.matmul (cuBLAS)", size, im2col_cublas, flops=flops, roof="flop")
        conv = self.measure("conv", "conv2d im2col (im2col + sgemm_regblock_db)", size,
                            lambda: dp.ops.conv2d(x, w, padding=1), flops=flops, roof="flop",
                            peer="im2col+cuBLAS", peer_ms=median(peer.runs_ms),
                            check=check_text(rel_err(dp.ops.conv2d(x, w, padding=1), want)))
        self.measure("conv", "conv2d direct", size, lambda: dp.ops.conv2d(x, w, padding=1, algo="direct"),
                     flops=flops, roof="flop", peer="conv2d im2col", peer_ms=median(conv.runs_ms),
                     check=check_text(rel_err(dp.ops.conv2d(x, w, padding=1, algo="direct"), want)))
        igemm = self.measure("conv", "conv2d implicit_gemm (conv2d_igemm, no im2col buffer)", size,
                             lambda: dp.ops.conv2d(x, w, padding=1, algo="implicit_gemm"), flops=flops, roof="flop",
                             peer="conv2d im2col", peer_ms=median(conv.runs_ms),
                             check=check_text(rel_err(dp.ops.conv2d(x, w, padding=1, algo="implicit_gemm"), want)))
        dy = self.dev(rand(self.rng, want.shape))
        self.measure("conv", "conv2d_backward implicit_gemm (dx gather + split dw)", size,
                     lambda: dp.ops.conv2d_backward(x, w, dy, padding=1, algo="implicit_gemm"), flops=2 * flops,
                     roof="flop", peer="backward im2col",
                     peer_ms=median(self.measure("conv", "conv2d_backward im2col (GEMMs + col2im)", size,
                                                 lambda: dp.ops.conv2d_backward(x, w, dy, padding=1),
                                                 flops=2 * flops, roof="flop").runs_ms))
        if self.torch is not None:
            def torch_conv():
                run, result = self._torch_conv(x, w, padding=1)
                return self.measure("conv", "torch conv2d (cuDNN)", size, run, flops=flops, roof="flop",
                                    check=check_text(rel_err(result(), want)))

            t = self.torch_peer("conv", torch_conv)
            if t is not None:
                for label, mine in (("im2col", conv), ("implicit_gemm", igemm)):
                    self.add(Row("conv", f"conv2d {label} vs cuDNN", size, mine.runs_ms, flops=flops, roof="flop",
                                 peer="cuDNN", peer_ms=median(t.runs_ms), host_us=mine.host_us))

    def depthwise(self) -> None:
        """MobileNet layer: memory bound, so GB/s against the copy bandwidth."""
        cp = self.cp
        n, c, hw = self.DEPTHWISE
        x_host, w_host = rand(self.rng, (n, c, hw, hw)), rand(self.rng, (c, 1, 3, 3))
        x, w = self.dev(x_host), self.dev(w_host)
        size = f"N{n} {c}ch {hw}x{hw} 3x3 p1"
        kw = dict(flops=2.0 * x.size * 9, bytes=2.0 * x.nbytes + w.nbytes, unit="GB/s", roof="mem")
        got = cp.asnumpy(dp.ops.depthwise_conv2d(x, w, padding=1))

        def torch_depthwise():
            run, result = self._torch_conv(x, w, padding=1, groups=c)
            t = self.measure("depthwise", "torch depthwise conv2d (cuDNN)", size, run, **kw)
            return t, rel_err(got, cp.asnumpy(result()))

        peer = self.torch_peer("depthwise", torch_depthwise) if self.torch is not None else None
        if peer is not None:
            peer_name, peer_ms, check = "cuDNN", median(peer[0].runs_ms), check_text(peer[1])
        else:
            with dp.use_backend("numpy"):
                want = dp.ops.depthwise_conv2d(x_host, w_host, padding=1)
            peer_name, peer_ms, check = "", None, check_text(rel_err(got, want)) + " (vs numpy backend)"
        self.measure("depthwise", "depthwise_conv2d", size, lambda: dp.ops.depthwise_conv2d(x, w, padding=1),
                     peer=peer_name, peer_ms=peer_ms, check=check, **kw)

    def footnotes(self):
        return super().footnotes() + [
            "cuda: CUDA events around each call, median of the runs after warm-up; the calls are queued behind a "
            "spin kernel so launch overhead is not timed, and a memset larger than L2 runs between calls"
            + (" (disabled by --no-flush)." if self.flush is None else "."),
            "cuSPARSE SpMM gets a column-major X (what cupyx converts to anyway), made outside the timing.",
        ]


# ---------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("cuda", "numpy"), help="default: cuda when CuPy sees a GPU, else numpy")
    ap.add_argument("--out", default="bench-out",
                    help="folder for the markdown table and the JSON (default: bench-out/)")
    ap.add_argument("--quick", action="store_true",
                    help="fewer sizes and runs (the CPU run takes well under 2 minutes)")
    ap.add_argument("--repeat", type=int, help="timed runs per kernel (cuda; default 30, --quick 10) or the most "
                         "per kernel (numpy, within a time budget; default 50, --quick 25)")
    ap.add_argument("--only", nargs="+", help="run only these sections (cuda: memory gemm spmv spmm conv depthwise; "
                                              "numpy: memory gemm sparse conv depthwise); without memory, %% of roofline "
                                              "for memory-bound rows is n/a")
    ap.add_argument("--fp32-peak", type=float,
                    help="FP32 peak in TFLOP/s for the roofline column "
                         "(default: the datasheet figure when the device is an H100/H200 SXM)")
    ap.add_argument("--no-flush", action="store_true", help="cuda: do not evict L2 between timed runs")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    backend = args.backend
    if backend is None:
        backend = "cuda" if cuda_unavailable_reason() is None else "numpy"
    elif backend == "cuda" and (reason := cuda_unavailable_reason()):
        print(f"error: --backend cuda: {reason}", file=sys.stderr)
        return 2

    return run_and_report(GpuBench(args) if backend == "cuda" else CpuBench(args), args.out)


if __name__ == "__main__":
    sys.exit(main())
