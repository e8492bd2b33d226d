"""Communication models and scaling predictions: ``dnnpar plan --model vgg16 --workers 64
--bandwidth 25 --latency 5``.

Per training step of one worker (batch ``b`` per worker, ``n`` workers, one link of bandwidth
``B`` bytes/s and latency ``alpha`` s per worker, ``S`` = gradient bytes = 4 x parameters):

**Compute.** ``t_c = 3 * 2 * MACs * b / F``: forward = 2 FLOPs per multiply-accumulate of the
model's accounting (:func:`dnnpar.nn.summary.summary`), backward ~ 2 x forward (weights and
inputs), ``F`` = sustained FLOP/s per GPU (``--tflops``, default 10: an assumption, about a
V100 at 65% of its FP32 peak; use what your GPU sustains on this model).

**(a) Ring allreduce** (Patarasuk & Yuan 2009; the bandwidth-optimal bound of Thakur,
Rabenseifner & Gropp 2005; what Horovod and NCCL run): a reduce-scatter and an all-gather of
``n - 1`` steps each, every step moving ``S / n`` bytes per link:
``t = 2 (n - 1) alpha + 2 (n - 1) / n * S / B``. Reduction arithmetic (``(n - 1) / n * S * gamma``)
is ignored here: on GPUs it runs far faster than any link (see :func:`ring_allreduce_time`).

**(b) Sharded parameter server** (Li et al. 2014, OSDI; the per-link accounting used e.g. by
Sergeev & Del Balso 2018, section 2, and Luo et al. 2018, PHub): ``k`` server shards, each on
its own machine with one link of bandwidth ``B``; every worker pushes its whole gradient
(``S/k`` to each shard) and then pulls the whole model (``S/k`` from each shard). In each phase a
worker's link carries ``S`` and a shard's link ``n S / k``; the slower end sets the time:
``t = 2 alpha + 2 * S / B * max(1, n / k)``. ``k = n`` (as many server machines as workers) is
the best case, ``k = 1`` the classic bottleneck.

**(c) Hybrid** (Krizhevsky 2014, "One weird trick for parallelizing convolutional neural
networks"; :mod:`dnnpar.parallel.model_parallel` implements this split): the layers before the
first Linear are data parallel (their gradients, ``S_conv``, are ring-allreduced); the Linear
layers are model parallel, each worker owning ``1/n`` of every fc layer's output units. Every
fc layer's input for the whole batch (``n b d_i`` floats, ``d_i`` its input width) is
all-gathered in the forward pass and its gradient reduce-scattered in the backward pass, and
the logits are gathered once. A ring all-gather / reduce-scatter of ``T`` bytes in all takes
``(n - 1) alpha + (n - 1) / n * T / B``. The fc weights never move, but activations grow with
``n``: the trick pays at small ``n`` (Krizhevsky used 8 GPUs) and loses at large ``n``.

**(d) Compressed gradients.** fp16: the ring allreduce of ``S / 2`` bytes. Deep Gradient
Compression (Lin, Han et al., ICLR 2018): every worker sends the top ``D`` fraction of its
accumulated gradient as (int32 index, float32 value) pairs, ``s = 8 ceil(D P)`` bytes (``P``
parameters), and a ring all-gather delivers every worker's pairs to every worker (sparse sums do
not stay sparse, so they are gathered, not reduced): ``t = (n - 1) alpha + (n - 1) s / B`` --
unlike the allreduce it grows with ``n``: with ``s = 2 D S``, DGC sends more than the dense
ring (``2 (n - 1) / n S``) once ``n > 1 / D`` (1,000 workers at ``D = 0.1%``). Top-k selection and the local accumulation are
compute, not counted. Every gradient is sparsified here (DGC sends layers too small to gain
dense; they are a negligible share of the bytes of these models).

**Efficiency.** ``t_c / (t_c + t_comm)`` with no overlap; with ideal overlap of the gradient
exchange with the backward pass (wait-free backprop, Horovod's tensor fusion):
``t_c / (t_fwd + max(t_bwd, t_comm))`` (for the hybrid only the conv allreduce overlaps; the
activation exchanges sit on the critical path). ``n = 1`` communicates nothing.

Reference (printed beside the predictions): Horovod (Sergeev & Del Balso 2018, arXiv
1802.05799) measured 90% scaling efficiency for ResNet-101 and Inception V3 and 68% for VGG-16
on 512 Pascal GPUs (128 servers x 4) over 25 Gb/s RoCE. DGC (Lin et al. 2018, abstract) reports
gradient compression of 270x to 600x without accuracy loss, ResNet-50's gradient cut from 97 MB
to 0.35 MB.
"""
from __future__ import annotations

import argparse
import json
import math
from dataclasses import asdict, dataclass, field
from functools import lru_cache

F32 = 4
GBIT = 1e9 / 8                 # bytes/s in one Gb/s
DEFAULT_TFLOPS = 10.0
DEFAULT_BATCH = 32
SCALING_WORKERS = (8, 16, 32, 64, 128, 256, 512)
SCALING_BANDWIDTHS = (25.0, 100.0)
#: Sergeev & Del Balso 2018 (Horovod), scaling efficiency at 512 GPUs, 25 Gb/s RoCE
HOROVOD_512 = {"resnet101": 0.90, "inception_v3": 0.90, "vgg16": 0.68}
HOROVOD_NOTE = "Horovod (Sergeev & Del Balso 2018): 512 Pascal GPUs, 25 Gb/s RoCE"
#: DGC's default density (0.1% of the gradient entries sent) and bytes per sent entry (int32 index + float32 value)
DEFAULT_DENSITY = 0.001
DGC_PAIR_BYTES = 8
DGC_NOTE = ("DGC (Lin, Han et al., ICLR 2018): 270x-600x smaller gradients without accuracy loss, "
            "ResNet-50 97 MB -> 0.35 MB")


# ---------------------------------------------------------------------------- formulas
def _check_n(n):
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"workers must be an int >= 1, got {n!r}")


def ring_allreduce_time(nbytes: float, n: int, alpha_s: float, bandwidth_Bps: float,
                        gamma_s_per_byte: float = 0.0) -> float:
    """Seconds for a ring allreduce of ``nbytes`` over ``n`` ranks:
    2(n-1) alpha + 2(n-1)/n S/B + (n-1)/n S gamma.

    ``gamma`` (seconds per byte reduced, the third term of Thakur, Rabenseifner & Gropp 2005) is 0
    for planning: a GPU sums at hundreds of GB/s, far above any link. Over shared memory the sum
    costs about as much as the copy, so ``benchmarks/comm_model.py`` measures it."""
    _check_n(n)
    return (2 * (n - 1) * alpha_s + 2 * (n - 1) / n * nbytes / bandwidth_Bps
            + (n - 1) / n * nbytes * gamma_s_per_byte)


def ring_allgather_time(total_bytes: float, n: int, alpha_s: float, bandwidth_Bps: float) -> float:
    """Seconds for a ring all-gather (or reduce-scatter) whose result is ``total_bytes``:
    (n-1) alpha + (n-1)/n T/B."""
    _check_n(n)
    return (n - 1) * alpha_s + (n - 1) / n * total_bytes / bandwidth_Bps


def dgc_bytes(params: int, density: float) -> int:
    """Bytes one worker sends per step under DGC at ``density``: ceil(density P) (index, value) pairs."""
    return DGC_PAIR_BYTES * math.ceil(density * params)


def dgc_time(params: int, density: float, n: int, alpha_s: float, bandwidth_Bps: float) -> float:
    """Seconds for the ring all-gather of every worker's DGC pairs: (n-1) alpha + (n-1) s/B."""
    return ring_allgather_time(n * dgc_bytes(params, density), n, alpha_s, bandwidth_Bps)


def ps_time(nbytes: float, n: int, servers: int, alpha_s: float, bandwidth_Bps: float) -> float:
    """Seconds for push + pull through ``servers`` shards: 2 alpha + 2 S/B max(1, n/k); 0 for n = 1."""
    _check_n(n)
    if isinstance(servers, bool) or not isinstance(servers, int) or servers < 1:
        raise ValueError(f"servers must be an int >= 1, got {servers!r}")
    if n == 1:
        return 0.0
    return 2 * alpha_s + 2 * nbytes / bandwidth_Bps * max(1.0, n / servers)


# ---------------------------------------------------------------------------- model accounting
@dataclass(frozen=True)
class ModelCost:
    """What the models need from a network: parameters and MACs per image, the conv / fc split
    (before / from the first Linear) and the per-sample width of every fc layer's input."""
    name: str
    params: int
    macs: int                  # per image, forward
    conv_params: int
    fc_params: int
    fc_inputs: tuple           # per-sample floats entering each Linear of the fc part
    logits: int                # per-sample outputs
    source: str = "dnnpar.nn.summary"

    @property
    def grad_bytes(self) -> int:
        return self.params * F32


#: not in the zoo: published counts, so that Horovod's ResNet-101 figure has a prediction beside it
ANALYTIC = {"resnet101": ModelCost("resnet101", 44_549_160, 7_800_000_000, 44_549_160 - 2_049_000, 2_049_000,
                                   (2048,), 1000, "He et al. 2016; torchvision's counts (44.5 M params, 7.8 GMACs)")}


def model_names() -> list[str]:
    from ..nn.models import MODELS
    return list(MODELS) + list(ANALYTIC)


@lru_cache(maxsize=None)
def model_cost(name: str) -> ModelCost:
    """The :class:`ModelCost` of a zoo model at its default (ImageNet) shape, from the project's
    layer accounting; builds the model once per process (VGG-16: a few seconds)."""
    import numpy as np

    from ..backend import use_backend
    from ..nn.models import MODELS, build
    from ..nn.summary import summary

    if name in ANALYTIC:
        return ANALYTIC[name]
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: one of {', '.join(model_names())}")
    with use_backend("numpy"):
        s = summary(build(name), 1)
    first_fc = next((i for i, r in enumerate(s.rows) if r.kind == "Linear"), len(s.rows))
    conv = sum(r.params for r in s.rows[:first_fc])
    shapes = [tuple(s.input_shape)] + [r.out_shape for r in s.rows]
    fc_inputs = tuple(int(np.prod(shapes[i])) for i, r in enumerate(s.rows) if i >= first_fc and r.kind == "Linear")
    return ModelCost(name, s.params, s.macs, conv, s.params - conv, fc_inputs, int(np.prod(s.rows[-1].out_shape)))


# ---------------------------------------------------------------------------- the plan
@dataclass
class StrategyRow:
    strategy: str
    bytes_sent: float          # per worker per step
    comm_s: float
    efficiency: float          # no overlap
    efficiency_overlap: float  # ideal overlap with the backward pass


@dataclass
class PlanReport:
    model: str
    workers: int
    bandwidth_gbps: float
    latency_us: float
    batch_size: int
    tflops: float
    servers: int | None
    cost: ModelCost
    compute_s: float
    rows: list
    scaling: dict = field(default_factory=dict)   # "25" -> {"ring": [...], "ring_overlap": [...], ...}
    scaling_workers: tuple = SCALING_WORKERS
    density: float = DEFAULT_DENSITY

    def row(self, strategy_prefix: str) -> StrategyRow:
        return next(r for r in self.rows if r.strategy.startswith(strategy_prefix))

    def table(self) -> str:
        c = self.cost
        L = [f"plan: {self.model} on {self.workers} workers, batch {self.batch_size} per worker, "
             f"{self.bandwidth_gbps:g} Gb/s links, {self.latency_us:g} us latency, {self.tflops:g} TFLOP/s sustained per GPU",
             f"  {c.params:,} parameters ({c.grad_bytes / 1e6:,.1f} MB of float32 gradients; conv {c.conv_params:,}, "
             f"fc {c.fc_params:,}), {c.macs / 1e9:.2f} GMACs per image [{c.source}]",
             f"  compute per step (forward + backward = 3 x forward): {1e3 * self.compute_s:.1f} ms",
             f"  DGC at density {self.density:g}: {_mb(dgc_bytes(c.params, self.density))} per worker per step, "
             f"{c.grad_bytes / dgc_bytes(c.params, self.density):,.0f}x less than the dense gradient",
             "",
             f"{'strategy':<34} {'sent/worker':>12} {'comm ms':>9} {'efficiency':>11} {'w/ overlap':>11}",
             "-" * 81]
        for r in self.rows:
            L.append(f"{r.strategy:<34} {_mb(r.bytes_sent):>12} {1e3 * r.comm_s:>9.1f} {100 * r.efficiency:>10.1f}% "
                     f"{100 * r.efficiency_overlap:>10.1f}%")
        L += ["", scaling_table(self.model, self.scaling, self.scaling_workers, self.density)]
        return "\n".join(L)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cost"] = asdict(self.cost)
        return d


def _mb(b: float) -> str:
    return f"{b / 1e6:,.1f} MB" if b >= 1e5 else f"{b / 1e3:,.1f} kB"


def _check_density(density):
    if isinstance(density, bool) or not isinstance(density, (int, float)) or not 0 < density <= 1:
        raise ValueError(f"DGC density must be a number in (0, 1], got {density!r}")


def _validate(workers, bandwidth_gbps, latency_us, batch_size, tflops, servers, density=DEFAULT_DENSITY):
    _check_n(workers)
    _check_density(density)
    for label, v in (("bandwidth (Gb/s)", bandwidth_gbps), ("TFLOP/s", tflops)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
            raise ValueError(f"{label} must be a finite number > 0, got {v!r}")
    if isinstance(latency_us, bool) or not isinstance(latency_us, (int, float)) or not math.isfinite(latency_us) \
            or latency_us < 0:
        raise ValueError(f"latency (us) must be a finite number >= 0, got {latency_us!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch size must be an int >= 1, got {batch_size!r}")
    if servers is not None and (isinstance(servers, bool) or not isinstance(servers, int) or servers < 1):
        raise ValueError(f"servers must be an int >= 1, got {servers!r}")


def compute_time(cost: ModelCost, batch_size: int, tflops: float) -> float:
    """Seconds of forward + backward for one worker's batch: 3 x 2 x MACs x b / F."""
    return 3 * 2 * cost.macs * batch_size / (tflops * 1e12)


def strategies(cost: ModelCost, n: int, bandwidth_gbps: float, latency_us: float, batch_size: int,
               tflops: float, servers: int | None = None, density: float = DEFAULT_DENSITY) -> list[StrategyRow]:
    """One row per strategy for ``n`` workers (see the module docstring for every formula)."""
    B, a = bandwidth_gbps * GBIT, latency_us * 1e-6
    t_c = compute_time(cost, batch_size, tflops)
    t_f, t_b = t_c / 3, 2 * t_c / 3
    S = cost.grad_bytes

    def row(name, sent, comm, overlappable=None):
        overlappable = comm if overlappable is None else overlappable
        exposed = comm - overlappable
        return StrategyRow(name, sent, comm, t_c / (t_c + comm), t_c / (t_f + exposed + max(t_b, overlappable)))

    rows = [row("ring allreduce (data parallel)", 2 * (n - 1) / n * S, ring_allreduce_time(S, n, a, B)),
            row("ring allreduce, fp16 gradients", (n - 1) / n * S, ring_allreduce_time(S / 2, n, a, B)),
            row(f"DGC, density {density:g}", (n - 1) * dgc_bytes(cost.params, density),
                dgc_time(cost.params, density, n, a, B))]
    for k in ([servers] if servers is not None else [1, n]):
        rows.append(row(f"parameter server, {k} shard{'s' if k > 1 else ''}", S if n > 1 else 0.0,
                        ps_time(S, n, k, a, B)))
    if cost.fc_params and cost.conv_params:
        conv_t = ring_allreduce_time(cost.conv_params * F32, n, a, B)
        # every fc input: an all-gather forward + a reduce-scatter backward of T = n b d floats;
        # the logits: one all-gather
        gathers = [n * batch_size * d * F32 for d in cost.fc_inputs for _ in (0, 1)] + \
            [n * batch_size * cost.logits * F32]
        act_t = sum(ring_allgather_time(T, n, a, B) for T in gathers)
        sent = 2 * (n - 1) / n * cost.conv_params * F32 + (n - 1) / n * sum(gathers)
        rows.append(row("hybrid (conv data, fc model)", sent, conv_t + act_t, overlappable=conv_t))
    return rows


def plan(model_name: str, workers: int, bandwidth_gbps: float, latency_us: float, batch_size: int = DEFAULT_BATCH,
         tflops: float = DEFAULT_TFLOPS, servers: int | None = None,
         scaling_workers=SCALING_WORKERS, scaling_bandwidths=SCALING_BANDWIDTHS,
         density: float = DEFAULT_DENSITY) -> PlanReport:
    """Predicted per-step compute and communication of ``model_name`` on ``workers`` GPUs, and the
    scaling efficiency of ring allreduce (with and without overlap), DGC at ``density``, the hybrid
    and the parameter server for ``scaling_workers`` on ``scaling_bandwidths`` Gb/s links.

    Raises ValueError for workers < 1, bandwidth <= 0, latency < 0, batch < 1, TFLOP/s <= 0,
    servers < 1, density outside (0, 1] or an unknown model (the message lists the models)."""
    _validate(workers, bandwidth_gbps, latency_us, batch_size, tflops, servers, density)
    cost = model_cost(model_name)
    rows = strategies(cost, workers, bandwidth_gbps, latency_us, batch_size, tflops, servers, density)
    return PlanReport(model_name, workers, float(bandwidth_gbps), float(latency_us), batch_size, float(tflops), servers,
                      cost, compute_time(cost, batch_size, tflops), rows,
                      scaling(cost, latency_us, batch_size, tflops, scaling_workers, scaling_bandwidths, density),
                      tuple(scaling_workers), float(density))


def scaling(cost: ModelCost, latency_us: float, batch_size: int = DEFAULT_BATCH, tflops: float = DEFAULT_TFLOPS,
            workers=SCALING_WORKERS, bandwidths=SCALING_BANDWIDTHS, density: float = DEFAULT_DENSITY) -> dict:
    """{"25": {"ring": [eff per n], "ring_overlap": [...], "dgc_overlap": [...], "hybrid": [...],
    "ps_k=n_overlap": [...]}, ...}"""
    out = {}
    for bw in bandwidths:
        cols = {"ring": [], "ring_overlap": [], "dgc_overlap": [], "hybrid": [], "ps_k=n_overlap": []}
        for n in workers:
            rows = strategies(cost, n, bw, latency_us, batch_size, tflops, servers=n, density=density)
            ring, dgc, ps = rows[0], rows[2], rows[3]
            hyb = rows[4] if len(rows) > 4 else None
            cols["ring"].append(ring.efficiency)
            cols["ring_overlap"].append(ring.efficiency_overlap)
            cols["dgc_overlap"].append(dgc.efficiency_overlap)
            cols["hybrid"].append(hyb.efficiency_overlap if hyb else float("nan"))
            cols["ps_k=n_overlap"].append(ps.efficiency_overlap)
        out[f"{bw:g}"] = cols
    return out


def scaling_table(model: str, sc: dict, workers=SCALING_WORKERS, density: float = DEFAULT_DENSITY) -> str:
    """Predicted scaling efficiency (%) per worker count and link speed; Horovod's measured
    figure at 512 GPUs beside it where published."""
    bws = list(sc)
    head = f"{'GPUs':>5} " + " ".join(f"{'ring ' + b + 'G':>10} {'+overlap':>9} {'DGC':>7} {'hybrid':>7} {'PS k=n':>7}"
                                      for b in bws) + f" {'Horovod':>9}"
    L = [f"predicted scaling efficiency, {model} (ring: no overlap; +overlap, DGC at density {density:g}, hybrid "
         "and PS: ideal overlap with backward)", head, "-" * len(head)]
    ref = HOROVOD_512.get(model)
    for i, n in enumerate(workers):
        cells = " ".join(f"{100 * sc[b]['ring'][i]:>9.1f}% {100 * sc[b]['ring_overlap'][i]:>8.1f}% "
                         f"{_pct(sc[b]['dgc_overlap'][i]):>7} "
                         f"{_pct(sc[b]['hybrid'][i]):>7} {_pct(sc[b]['ps_k=n_overlap'][i]):>7}" for b in bws)
        hv = f"{100 * ref:.0f}% (25G)" if (ref is not None and n == 512) else ""
        L.append(f"{n:>5} {cells} {hv:>9}")
    L.append(f"Horovod reference: {HOROVOD_NOTE}: ResNet-101 90%, Inception V3 90%, VGG-16 68%")
    L.append(f"DGC reference: {DGC_NOTE}")
    return "\n".join(L)


def _pct(x: float) -> str:
    return "-" if x != x else f"{100 * x:.1f}%"


# ---------------------------------------------------------------------------- command line
def add_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The arguments of ``dnnpar plan`` (for a subparser of the main CLI), each checked as it is
    parsed (:mod:`dnnpar.argcheck`)."""
    from .. import argcheck as ck

    p.add_argument("--model", default="vgg16", help=f"one of {', '.join(model_names())}")
    p.add_argument("--workers", type=ck.int_range(1, 1 << 20), default=8, help="GPUs / workers N")
    p.add_argument("--bandwidth", type=ck.positive_float, default=25.0, help="link bandwidth per worker, Gb/s")
    p.add_argument("--latency", type=ck.nonneg_float, default=5.0, help="per-message latency alpha, microseconds")
    p.add_argument("--batch-size", type=ck.int_range(1, 1 << 20), default=DEFAULT_BATCH, help="batch per worker")
    p.add_argument("--tflops", type=ck.positive_float, default=DEFAULT_TFLOPS,
                   help="sustained FP32 TFLOP/s per GPU (an assumption)")
    p.add_argument("--servers", type=ck.int_range(1, 1 << 20), default=None,
                   help="parameter-server shards k (None: show k = 1 and k = N)")
    p.add_argument("--density", type=ck.positive_float, default=DEFAULT_DENSITY,
                   help="DGC's fraction of gradient entries sent per step, in (0, 1]")
    p.add_argument("--json", type=ck.writable_file, default=None, metavar="PATH", help="also write the plan as JSON")
    return p


def run_from_args(args, out=print) -> int:
    rep = plan(args.model, args.workers, args.bandwidth, args.latency, args.batch_size, args.tflops, args.servers,
               density=args.density)
    out(rep.table())
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rep.to_dict(), f, indent=1)
        out(f"plan written to {args.json}")
    return 0


def main(argv=None) -> int:
    """``python -m dnnpar.parallel.plan --model vgg16 --workers 64 --bandwidth 25 --latency 5``;
    a bad argument exits with status 2 and the error (argparse's convention)."""
    p = add_arguments(argparse.ArgumentParser(prog="dnnpar plan", description=__doc__.split("\n\n")[0],
                                              formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    args = p.parse_args(argv)
    try:
        return run_from_args(args)
    except ValueError as e:
        p.error(str(e))


if __name__ == "__main__":
    raise SystemExit(main())
