"""Deep Gradient Compression (Lin, Han, Mao, Wang & Dally, ICLR 2018) for synchronous data parallel.

Each rank sends the largest ``density`` fraction of its accumulated gradient as (index, value)
pairs instead of the dense gradient; what it does not send stays in its local accumulator and goes
out later, so no gradient is lost, only delayed. As in the paper (section 3):

- **Momentum correction.** The accumulator holds momentum-SGD velocities, not raw gradients:
  ``u = m u + g``, ``v = v + u`` on each rank; the ranks' sparse ``v`` are summed and the weights
  take a plain step ``p -= lr * sum``. The optimizer applies neither momentum nor weight decay to
  those parameters again (:meth:`DGC.sparse_names`; weight decay enters ``g`` on each rank as
  ``wd * p / N``, so the N ranks add up to one ``wd * p``).
- **Momentum factor masking.** Where an entry was sent, its ``u`` is zeroed with its ``v``, so
  stale momentum of a long-delayed entry does not push it further (``mask_momentum``).
- **Local gradient clipping** (``clip_norm``): each rank clips its own gradient to
  ``clip_norm / sqrt(N)`` before accumulating (the paper's scaling of the threshold by N^-1/2).
- **Warm-up**: the density falls exponentially from ``warmup_density`` (25%) to ``density`` over
  the first ``warmup_epochs`` epochs (25%, 6.25%, 1.6%, 0.4%, then 0.1% for four epochs).
- **Sampled threshold**: the top-k threshold of each parameter is estimated on a random sample
  of ``sample_fraction`` of its entries (at least ``min_sample``), as the paper does, rather than
  sorting the whole gradient; entries above it are taken, and if there are more than k, the k
  largest of those (a partition of the candidates, not of the whole array).

Parameters smaller than ``min_sparse`` entries (128: biases, small BatchNorm scales and shifts)
are sent dense, through the ordinary allreduce, with ordinary momentum: they are a negligible
share of the bytes, and every larger one gains (a pair per ``1 / density`` entries). A density at or above ``dense_above`` (default 0.5: a pair of int32
index + float32 value costs two dense entries) sends everything dense -- with density 1.0 DGC is
exactly dense synchronous SGD with momentum.

Exchange: every rank sends exactly K pairs (K = the sum over sparse parameters of
ceil(density x size); a rank whose threshold found fewer pads with index -1), so one fixed-size
``allgather`` of the (N, K) indices and values moves them; every rank sums all N x K pairs in the
same order and so applies bit-identical updates. Bytes one rank sends per step:
``8 K + 4 x dense parameters`` against ``4 x all parameters`` dense.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace

import numpy as np

from ..backend import cpu_native
from .data_parallel import GradHook
from .flat import ParamLayout

#: bytes per sent entry: int32 index + float32 value
PAIR_BYTES = 8


@dataclass(frozen=True)
class DGCConfig:
    density: float = 0.001
    momentum: float = 0.9
    weight_decay: float = 0.0
    clip_norm: float | None = None
    warmup_epochs: int = 4
    warmup_density: float = 0.25
    mask_momentum: bool = True
    sample_fraction: float = 0.01
    min_sample: int = 4096
    min_sparse: int = 128
    dense_above: float = 0.5

    def __post_init__(self):
        def real(name, lo, hi, lo_open=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or not (lo < v if lo_open else lo <= v) or v > hi:
                raise ValueError(f"DGC: {name} must be a number in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
        real("density", 0, 1, lo_open=True)
        real("warmup_density", 0, 1, lo_open=True)
        real("sample_fraction", 0, 1, lo_open=True)
        real("momentum", 0, 1)
        real("weight_decay", 0, 1)
        real("dense_above", 0, math.inf, lo_open=True)
        if self.clip_norm is not None:
            real("clip_norm", 0, math.inf, lo_open=True)
        for name in ("warmup_epochs", "min_sample", "min_sparse"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if name == "min_sample" else 0):
                raise ValueError(f"DGC: {name} must be an int >= {1 if name == 'min_sample' else 0}, got {v!r}")

    def density_at(self, epoch: int) -> float:
        """The density of ``epoch`` (1-based): warm-up from ``warmup_density`` down to ``density``
        over the first ``warmup_epochs`` epochs, exponentially; ``density`` after."""
        if self.warmup_epochs == 0 or epoch > self.warmup_epochs or self.warmup_density <= self.density:
            return self.density
        return self.warmup_density * (self.density / self.warmup_density) ** ((max(epoch, 1) - 1) / self.warmup_epochs)


@dataclass
class DGCStats:
    steps: int = 0
    bytes_sent: int = 0          # by this rank, all steps (pairs + dense entries)
    dense_bytes: int = 0         # what dense allreduce would have sent, all steps
    comm_seconds: float = 0.0
    select_seconds: float = 0.0
    last_density: float = 1.0
    steady_steps: int = 0        # steps after the warm-up (at the configured density)
    steady_bytes: int = 0        # what this rank sent in them
    steady: bool = False         # whether the step last counted is one of them
    by_epoch: dict = field(default_factory=dict)   # epoch -> [steps, bytes sent]
    _current: list | None = field(default=None, repr=False)   # by_epoch's entry for the step last counted

    def count_step(self, cfg: "DGCConfig", epoch: int, dense_bytes: int) -> None:
        """One more step of ``epoch``: its density, and what dense allreduce would send."""
        self.steps += 1
        self.last_density = cfg.density_at(epoch)
        self.dense_bytes += dense_bytes
        self.steady = self.last_density == cfg.density
        self.steady_steps += self.steady
        self._current = self.by_epoch.setdefault(int(epoch), [0, 0])
        self._current[0] += 1

    def count_bytes(self, n: int) -> None:
        """``n`` bytes this rank sent in the step last counted."""
        self.bytes_sent += n
        if self.steady:
            self.steady_bytes += n
        if self._current is not None:
            self._current[1] += n

    @property
    def bytes_per_step(self) -> float:
        return self.bytes_sent / max(self.steps, 1)

    @property
    def dense_bytes_per_step(self) -> float:
        return self.dense_bytes / max(self.steps, 1)

    @property
    def ratio(self) -> float:
        return self.dense_bytes / max(self.bytes_sent, 1)

    def bytes_per_step_by_epoch(self) -> dict[int, float]:
        """Epoch -> mean bytes this rank sent per step in it (the warm-up's falling density)."""
        return {e: b / max(n, 1) for e, (n, b) in sorted(self.by_epoch.items())}

    @property
    def steady_bytes_per_step(self) -> float | None:
        """Bytes per step after the warm-up (what the configured density costs); None before."""
        return self.steady_bytes / self.steady_steps if self.steady_steps else None


class DGC:
    """One rank's DGC state over the flat parameter vector of ``layout`` (host float32 arrays)."""

    def __init__(self, layout: ParamLayout, cfg: DGCConfig, world: int, rank: int = 0, seed: int = 0):
        if layout.size >= 2**31:
            raise ValueError(f"DGC: {layout.size:,} parameters do not fit int32 indices")
        self.layout, self.cfg, self.world, self.rank = layout, cfg, int(world), int(rank)
        self.sparse = [s for s in layout.slots if s.size >= cfg.min_sparse]
        self.dense = [s for s in layout.slots if s.size < cfg.min_sparse]
        self.u = np.zeros(layout.size, np.float32)   # momentum (velocity) per entry
        self.v = np.zeros(layout.size, np.float32)   # accumulated, not yet sent
        self._mag = np.empty(layout.size, np.float32)  # |v|, scratch for the selection
        self.rng = np.random.default_rng([seed, rank, 0xD6C])
        self.stats = DGCStats()

    def sparse_names(self, epoch: int) -> set[str]:
        """Parameters whose update DGC computes whole in ``epoch`` (momentum and weight decay
        included): the optimizer takes a plain ``p -= lr * g`` step on them. Empty in an epoch
        that sends everything dense (its momentum is then the optimizer's; the density only
        falls, so a run goes dense -> sparse at most once, and DGC's momentum starts from zero
        there)."""
        return set() if self.sends_dense(epoch) else {s.name for s in self.sparse}

    def sends_dense(self, epoch: int) -> bool:
        """Whether ``epoch`` sends every gradient dense (no parameter large enough, or a density
        at which pairs would not be smaller)."""
        return not self.sparse or self.cfg.density_at(epoch) >= self.cfg.dense_above

    def k_of(self, size: int, density: float) -> int:
        return min(size, max(1, math.ceil(density * size)))

    # ------------------------------------------------------------------ selection
    def select(self, a: np.ndarray, k: int, mag: np.ndarray | None = None) -> np.ndarray:
        """Indices of (about) the k largest |a|, sorted: a sampled threshold, then the k largest of
        the entries above it. Never more than k; fewer only when the sample overestimates.
        ``mag``: |a| when the caller has it already."""
        n = a.size
        if k >= n:
            return np.arange(n, dtype=np.int64)
        mag = np.abs(a) if mag is None else mag
        s = min(n, max(self.cfg.min_sample, math.ceil(self.cfg.sample_fraction * n)))
        if s >= n:
            cand = np.argpartition(mag, n - k)[n - k:]
        else:
            sample = mag[self.rng.integers(0, n, s)]
            ks = max(1, math.ceil(k * s / n))
            thr = np.partition(sample, s - ks)[s - ks]
            cand = np.flatnonzero(mag >= thr) if thr > 0 else np.flatnonzero(mag > 0)
            if cand.size > k:
                cand = cand[np.argpartition(mag[cand], cand.size - k)[cand.size - k:]]
        return np.sort(cand)

    def clip(self, grad: np.ndarray, share: float) -> np.ndarray:
        """Local gradient clipping: this rank's own gradient (``grad / share``) to an L2 norm of at
        most ``clip_norm / sqrt(N)``; ``grad`` itself when no clipping is configured or needed."""
        if self.cfg.clip_norm is None:
            return grad
        local = float(np.linalg.norm(grad.astype(np.float64))) / max(share, 1e-30)
        limit = self.cfg.clip_norm / math.sqrt(self.world)
        return grad * np.float32(limit / local) if local > limit else grad

    # ------------------------------------------------------------------ one step
    def encode(self, slots, grad: np.ndarray, params, share: float, epoch: int):
        """Momentum correction, selection and masking for the sparse parameters among ``slots``
        (their gradients in the flat ``grad``, already scaled by this rank's ``share``; weight
        decay adds ``wd * p / N`` on each rank, so the N ranks add one ``wd * p``; ``params``:
        name -> parameter array, or a flat vector). Returns (indices, values) of fixed length
        sum(ceil(density x size)), flat-vector indices, -1 where a rank found fewer."""
        cfg = self.cfg
        density = cfg.density_at(epoch)
        sparse = [s for s in slots if s.size >= cfg.min_sparse]
        if sparse:
            first, last = min(s.offset for s in sparse), max(s.stop for s in sparse)
            clipped = self.clip(grad[first:last], share)
        ks = [self.k_of(s.size, density) for s in sparse]
        idx = np.full(sum(ks), -1, np.int32)
        val = np.zeros(sum(ks), np.float32)
        pos = 0
        m = np.float32(cfg.momentum)
        wd = np.float32(cfg.weight_decay / self.world)
        for s, k in zip(sparse, ks):
            g = clipped[s.offset - first:s.stop - first]
            p = None
            if wd:
                p = params[s.offset:s.stop] if isinstance(params, np.ndarray) else params[s.name].reshape(-1)
            u, v, mag = self.u[s.offset:s.stop], self.v[s.offset:s.stop], self._mag[s.offset:s.stop]
            if not cpu_native.dgc_accumulate(u, v, g, p, m, wd, mag):  # NumPy: the same bits
                if wd:
                    g = g + wd * p
                u *= m
                u += g
                v += u
                mag = None
            sel = self.select(v, k, mag)
            idx[pos:pos + sel.size] = sel + s.offset
            val[pos:pos + sel.size] = v[sel]
            v[sel] = 0
            if cfg.mask_momentum:
                u[sel] = 0
            pos += k
        return idx, val

    def scatter_sum(self, all_idx: np.ndarray, all_val: np.ndarray, lo: int, hi: int) -> np.ndarray:
        """Sum of every rank's pairs (rows of all_idx / all_val) into entries [lo, hi) of the flat
        vector, in rank-then-position order (the same on every rank: float64 accumulation, one
        rounding to float32)."""
        i, w = all_idx.reshape(-1), all_val.reshape(-1)
        keep = i >= 0
        # summed over the distinct indices only (a few per cent of the range): bincount adds in
        # input order, so each sum is the one a full-length bincount would give
        where, slot = np.unique(i[keep] - lo, return_inverse=True)
        if where.size and (where[0] < 0 or where[-1] >= hi - lo):
            raise ValueError(f"DGC: a received index lies outside the entries [{lo}, {hi}) being summed")
        out = np.zeros(hi - lo, np.float32)
        out[where] = np.bincount(slot, weights=w[keep].astype(np.float64), minlength=where.size)
        return out

    def step(self, grad: np.ndarray, params: np.ndarray, share: float, comm, epoch: int) -> np.ndarray:
        """The whole vector in one exchange (the one-call form of what :class:`DGCHook` does per
        bucket): this rank's flat ``grad`` (scaled by its ``share`` of the global batch) in, the
        update every rank applies out: for the dense parameters the sum of the ranks' scaled
        gradients (the optimizer adds weight decay and momentum as usual), for the sparse ones
        the sum of the ranks' sent velocities (a plain step). Collective."""
        self.layout._check_vec(grad)
        if self.world > 1 and comm is None:
            raise ValueError(f"DGC: a world of {self.world} ranks needs a communicator")
        st = self.stats
        st.count_step(self.cfg, epoch, 4 * self.layout.size)
        out = np.array(grad, dtype=np.float32, copy=True)
        t = time.perf_counter()
        if self.sends_dense(epoch):
            if self.world > 1:
                comm.allreduce_sum([out])
            st.comm_seconds += time.perf_counter() - t
            st.count_bytes(4 * self.layout.size)
            return out
        idx, val = self.encode(self.layout.slots, grad, params, share, epoch)
        st.select_seconds += time.perf_counter() - t
        t = time.perf_counter()
        if self.world > 1:
            all_idx = np.empty((self.world, idx.size), np.int32)
            all_val = np.empty((self.world, idx.size), np.float32)
            comm.allgather(idx, all_idx)
            comm.allgather(val, all_val)
            dense = [out[s.offset:s.stop] for s in self.dense]
            if dense:
                flat = np.concatenate(dense)
                comm.allreduce_sum([flat])
                off = 0
                for d in dense:
                    d[...] = flat[off:off + d.size]
                    off += d.size
        else:
            all_idx, all_val = idx[None], val[None]
        st.comm_seconds += time.perf_counter() - t
        st.count_bytes(PAIR_BYTES * idx.size + 4 * sum(s.size for s in self.dense))
        summed = self.scatter_sum(all_idx, all_val, 0, self.layout.size)
        for s in self.sparse:
            out[s.offset:s.stop] = summed[s.offset:s.stop]
        return out

    def state(self) -> dict:
        return {"dgc/u": self.u, "dgc/v": self.v}


class DGCHook(GradHook):
    """DGC as :class:`~dnnpar.parallel.data_parallel.DataParallel`'s ``hook``: each bucket, as
    backward finishes it, is encoded (:meth:`DGC.encode`) and its payload -- the bucket's pairs
    and its small dense parameters, one int32 buffer -- starts a non-blocking all-gather at once
    (overlapped with the rest of backward like the dense allreduce); after the wait every rank
    decodes the same sums into the bucket. Momentum and weight decay are the optimizer's (its
    ``plain`` set then skips them for the sparse parameters, which DGC updates whole).
    Host (NumPy) arrays over MPI; not on the cuda backend yet."""

    name = "dgc"

    def __init__(self, cfg: DGCConfig, seed: int = 0):
        self.cfg, self.seed = cfg, seed
        self.dgc: DGC | None = None
        self.epoch = 1
        self._pending: dict = {}
        self._sent: dict = {}

    def bind(self, par, model, optimizer) -> None:
        from ..backend import get_backend

        if get_backend().name == "cuda":
            raise ValueError("--grad-compression dgc runs on the numpy backend over MPI; the cuda backend "
                             "(NCCL) is not supported yet")
        if optimizer is None:
            raise ValueError("DGC needs the optimizer: it folds momentum and weight decay into the update")
        if getattr(optimizer, "nesterov", False):
            raise ValueError("DGC's momentum correction is plain momentum: Nesterov is not supported")
        cfg = replace(self.cfg, momentum=float(optimizer.momentum), weight_decay=float(optimizer.weight_decay))
        self.dgc = DGC(par.layout, cfg, par.size, par.rank, self.seed)
        self.par, self.opt = par, optimizer
        self.params = {name: p for name, p, _ in model.named_parameters()}
        self.groups = {id(v): g for v, g in zip(par.buckets.views, par.buckets.groups)}

    @property
    def stats(self) -> DGCStats:
        return self.dgc.stats

    def begin_step(self, epoch) -> None:
        self.epoch = 1 if epoch is None else int(epoch)
        self.dense_now = self.dgc.sends_dense(self.epoch)
        self.opt.plain = self.dgc.sparse_names(self.epoch)
        self.dgc.stats.count_step(self.cfg, self.epoch, 4 * self.dgc.layout.size)

    def start(self, comm, bucket):
        if self.dense_now:
            self._sent[id(bucket)] = None
            return super().start(comm, bucket)
        t = time.perf_counter()
        group = self.groups[id(bucket)]
        grad = self.par.buckets.grad
        idx, val = self.dgc.encode(group, grad, self.params, self.par.step_share, self.epoch)
        dense = [s for s in group if s.size < self.dgc.cfg.min_sparse]
        k, d = idx.size, sum(s.size for s in dense)
        payload = np.empty(2 * k + d, np.int32)
        payload[:k] = idx
        payload[k:2 * k] = val.view(np.int32)
        off = 2 * k
        for s in dense:
            payload[off:off + s.size] = grad[s.offset:s.stop].view(np.int32)
            off += s.size
        out = np.empty((self.par.size, payload.size), np.int32)
        self.dgc.stats.select_seconds += time.perf_counter() - t
        self._pending[id(bucket)] = (group, k, dense, out)
        self._sent[id(bucket)] = payload.nbytes
        return comm.start_allgather(payload, out)

    def finish(self, bucket) -> None:
        if id(bucket) not in self._pending:
            return
        group, k, dense, out = self._pending.pop(id(bucket))
        grad = self.par.buckets.grad
        lo, hi = group[0].offset, group[-1].stop
        summed = self.dgc.scatter_sum(out[:, :k], out[:, k:2 * k].view(np.float32), lo, hi)
        for s in group:
            if s.size >= self.dgc.cfg.min_sparse:
                grad[s.offset:s.stop] = summed[s.offset - lo:s.stop - lo]
        vals = out[:, 2 * k:].view(np.float32)
        total = vals[0].copy()
        for r in range(1, vals.shape[0]):   # rank order: the same float32 sums on every rank
            total += vals[r]
        off = 0
        for s in dense:
            grad[s.offset:s.stop] = total[off:off + s.size]
            off += s.size

    def bytes_sent(self, bucket, ranks: int) -> int:
        """A ring all-gather: every rank forwards N - 1 payloads of the bucket's size; the
        dense path: the allreduce's 2 (N - 1) / N."""
        n = self._sent.get(id(bucket))
        b = super().bytes_sent(bucket, ranks) if n is None else (ranks - 1) * n
        self.dgc.stats.count_bytes(b)
        return b

    def report_extra(self) -> dict:
        """``dgc_density``, ``dgc_warmup_epochs``, and ``grad_bytes_per_step_after_warmup``: bytes
        per step at the configured density (None when the run ended inside the warm-up), over
        ``steps_after_warmup`` steps -- the whole run's ``grad_bytes_per_step`` includes the
        denser warm-up epochs; ``grad_bytes_per_step_by_epoch``, the same per epoch run."""
        st = self.dgc.stats
        return {"dgc_density": self.cfg.density, "dgc_warmup_epochs": self.cfg.warmup_epochs,
                "grad_bytes_per_step_after_warmup": st.steady_bytes_per_step, "steps_after_warmup": st.steady_steps,
                "grad_bytes_per_step_by_epoch": [[e, b] for e, b in st.bytes_per_step_by_epoch().items()]}
