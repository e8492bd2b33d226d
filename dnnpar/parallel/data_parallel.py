"""Synchronous data-parallel SGD (the allreduce strategy).

Every rank holds the whole model. Each step draws one global mini-batch of ``N * K * b`` samples
from the same seeded order on every rank (:func:`dnnpar.data.fashion_mnist.batches`); rank r
takes slice r and runs it as ``K`` micro-batches of ``b`` (``accumulate=K``, PyTorch DDP's
``no_sync``: K forward/backward passes, one reduction). N ranks at batch b with K micro-batches
therefore follow 1 rank at batch N*K*b up to float rounding; ``tests/test_parallel.py`` checks it
against the float32 reordering bound of ``tests/oracles.py``. Buffers (BatchNorm's running
statistics) are per rank, computed from each rank's own micro-batches, as in PyTorch's DDP without
SyncBatchNorm: a model with BatchNorm is not bit-for-bit the single-process one.

**Gradients as bucket views.** The gradients live in one flat float32 vector (laid out as
:class:`~dnnpar.parallel.flat.ParamLayout`, layer order; float32 is the only parameter dtype); :class:`Buckets` are contiguous slices
of it of at most ``bucket_mb`` MiB, numbered from the last layer back, the order backward writes
them. The model's ``grad_hook`` (:class:`dnnpar.nn.base.Graph`) sees each layer's fresh gradient
once: it is scaled by the rank's share of the global batch straight into its view (one pass;
added to it for micro-batches after the first) and the layer's ``grads`` entry becomes that view,
so the optimizer reads the reduced sums where they land: no pack and unpack copies.

**Overlap** (``overlap=True``, the default). When the last micro-batch's backward has written a
bucket's last gradient, its non-blocking allreduce starts at once (buckets start strictly in
bucket order, the same on every rank) while backward goes on; each later layer's hook tests the
ones in flight (MPI moves a collective forward only inside MPI calls). The step waits only for
what is still in flight. ``overlap=False`` starts every bucket after backward, all in flight at
once: the same sums, so the same parameters bit for bit. On NCCL the starts are deferred to the
wait (``NCCLCommunicator`` keeps its tested grouped allreduce; a second stream would go there).
What sits between "bucket ready" and "allreduce" is a :class:`GradHook` (``hook=``): the dense
sum by default; a compressing hook (DGC, fp16) would encode there and decode after the wait.

Measured per run (rank 0's figures in :meth:`DataParallel.report`): ``comm_seconds``, the time
some bucket was in flight (observed at layer boundaries and in the wait), ``exposed_comm_seconds``,
the part spent waiting after backward, and ``overlap_fraction`` = 1 - exposed / comm, the share
of communication hidden behind backward (0 without overlap).

The training loop itself is the engine's (:func:`dnnpar.engine.run`; :func:`dnnpar.train.train`
given a :class:`DataParallel` as ``parallel``): a DataParallel is a :class:`~dnnpar.engine.Local`
strategy whose step hooks shard each batch into micro-batches and open and finish each step, and
only rank 0 prints, evaluates and writes checkpoints.

Run it with ``mpiexec -n N dnnpar train --parallel data ...``. Fault injection for the tests:
``fail={"rank": r, "step": k, "how": "kill" | "hang" | "hang-in-backward"}`` makes rank r die
(SIGKILL) or stop answering at step k (before its forward pass, or in the backward pass of its
last micro-batch, after the first layer's hook: with overlap, the buckets that layer completed
are in flight). A dead rank is reported by mpiexec, which ends the job; a silent one
makes the others raise :class:`CommTimeoutError` within the communicator's timeout, and the job
is aborted with that message.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np

from ..backend import get_backend
from ..engine import Local, run
from ..reporting import CommStats
from ..steps import evaluate
from . import half
from .comm import Communicator, make_communicator
from .flat import ParamLayout

DEFAULT_BUCKET_MB = 4.0
FAIL_HOWS = ("kill", "hang", "hang-in-backward")


class Buckets:
    """One flat float32 gradient vector ``grad`` (ParamLayout's offsets) and its buckets:
    contiguous slices ``views[i]`` of at most ``bucket_bytes`` (a parameter larger than that is a
    bucket of its own), bucket 0 holding the last parameters: the order backward writes them."""

    def __init__(self, layout: ParamLayout, bucket_bytes: int, xp):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket size must be > 0 bytes, got {bucket_bytes}")
        groups, cur, cur_bytes = [], [], 0
        for s in reversed(layout.slots):
            if cur and cur_bytes + 4 * s.size > bucket_bytes:
                groups.append(cur[::-1])
                cur, cur_bytes = [], 0
            cur.append(s)
            cur_bytes += 4 * s.size
        if cur:
            groups.append(cur[::-1])
        self.groups = groups  # each group in layer order, so its slots are one contiguous run
        self.grad = xp.zeros(layout.size, dtype=np.float32)
        self.views = [self.grad[g[0].offset:g[-1].stop] for g in groups]
        self.bucket_of = {s.name: i for i, g in enumerate(groups) for s in g}

    def __len__(self) -> int:
        return len(self.groups)

    def sizes(self) -> list[int]:
        return [int(v.nbytes) for v in self.views]

    def view(self, slot):
        """The slice of ``grad`` that holds ``slot``'s gradient, in the parameter's shape."""
        return self.grad[slot.offset:slot.stop].reshape(slot.shape)


def allreduce_bytes(nbytes: int, ranks: int) -> int:
    """Bytes one rank sends to sum ``nbytes`` over ``ranks`` with a bandwidth-optimal allreduce
    (ring, or reduce-scatter + all-gather): 2 (N - 1) / N of the buffer."""
    return 2 * (ranks - 1) * int(nbytes) // ranks


class GradHook:
    """What happens between "a bucket's gradients are ready" and "they are summed". The dense
    default hands the bucket to the communicator's allreduce as it is. A compressing hook (top-k
    with indices, fp16) would override :meth:`start` to encode and reduce its payload,
    :meth:`finish` to decode into the bucket after the wait, and :meth:`bytes_sent` to count
    its payload, indices included."""

    name = "dense"

    def bind(self, par, model, optimizer) -> None:
        """Once, after :meth:`DataParallel.setup` has laid out the buckets (a hook that keeps
        per-parameter state sizes it here)."""

    def begin_step(self, epoch: int | None) -> None:
        """Before a step's first forward pass (``epoch``: 1-based, None when the loop does not say)."""

    def start(self, comm: Communicator, bucket):
        """Begin the reduction of ``bucket`` (a float32 view, summed in place); returns a handle
        of ``comm`` (``comm.test`` / ``comm.wait``)."""
        return comm.start_allreduce_sum(bucket)

    def finish(self, bucket) -> None:
        """After the wait: ``bucket`` must hold the sum over the ranks."""

    def bytes_sent(self, bucket, ranks: int) -> int:
        return allreduce_bytes(bucket.nbytes, ranks)

    def report_extra(self) -> dict:
        """The hook's own ``--report`` keys (none for the dense hook)."""
        return {}


class HalfPrecisionHook(GradHook):
    """``--grad-compression fp16 | bf16``: each bucket is sent as 16-bit values (PyTorch DDP's
    fp16 / bf16 compression hooks): encoded on the host as it is ready, summed by an allreduce
    whose every addition rounds to 16 bits (:mod:`dnnpar.parallel.half`, the error bound there),
    decoded into the bucket after the wait. Half the bytes of the dense allreduce; every rank
    decodes the same sums, so the replicas stay identical."""

    def __init__(self, kind: str):
        if kind not in half.FORMATS:
            raise ValueError(f"HalfPrecisionHook: kind must be one of {', '.join(half.FORMATS)}, got {kind!r}")
        self.name = self.kind = kind
        self._bits: dict = {}

    def bind(self, par, model, optimizer) -> None:
        self._bits = {id(v): np.empty(v.size, np.uint16) for v in par.buckets.views}

    def start(self, comm: Communicator, bucket):
        bits = self._bits[id(bucket)]
        half.encode(get_backend().to_numpy(bucket).reshape(-1), self.kind, out=bits)
        return comm.start_allreduce_sum16(bits, self.kind)

    def finish(self, bucket) -> None:
        be = get_backend()
        summed = half.decode(self._bits[id(bucket)], self.kind)
        if isinstance(bucket, np.ndarray):
            bucket.reshape(-1)[...] = summed
        else:
            bucket[...] = be.asarray(summed).reshape(bucket.shape)

    def bytes_sent(self, bucket, ranks: int) -> int:
        return allreduce_bytes(2 * bucket.size, ranks)


GRAD_COMPRESSIONS = "none | fp16 | bf16 | dgc:DENSITY"


def parse_grad_compression(spec: str) -> tuple[str, float | None]:
    """``--grad-compression``: ``none`` | ``fp16`` | ``bf16`` | ``dgc:DENSITY`` (e.g. ``dgc:0.001``)
    -> (kind, density or None); a ValueError naming the choices otherwise."""
    if not isinstance(spec, str):
        raise ValueError(f"--grad-compression must be a string, got {spec!r}")
    s = spec.strip().lower()
    if s in ("none", "fp16", "bf16"):
        return s, None
    if s.startswith("dgc:"):
        try:
            d = float(s[4:])
        except ValueError:
            d = float("nan")
        if not (0 < d <= 1):
            raise ValueError(f"--grad-compression {spec!r}: DENSITY must be a number in (0, 1], e.g. dgc:0.001")
        return "dgc", d
    raise ValueError(f"--grad-compression {spec!r}: one of {GRAD_COMPRESSIONS} (e.g. dgc:0.001)")


def make_grad_hook(kind: str, density: float | None = None, warmup_epochs: int = 4, seed: int = 0):
    """The hook for a parsed ``--grad-compression`` (None for "none": the dense allreduce)."""
    if kind == "none":
        return None
    if kind in ("fp16", "bf16"):
        return HalfPrecisionHook(kind)
    if kind == "dgc":
        from .dgc import DGCConfig, DGCHook
        return DGCHook(DGCConfig(density=density, warmup_epochs=warmup_epochs), seed=seed)
    raise ValueError(f"unknown gradient compression {kind!r}: one of {GRAD_COMPRESSIONS}")


class DataParallel(Local):
    """The per-step collective work of synchronous data parallelism: the engine's strategy
    ``"data"`` (:func:`dnnpar.train.train` with ``parallel=``).

    ``accumulate``: micro-batches per step (K; one reduction each step). ``overlap``: start each
    bucket's allreduce from backward (default) or all of them after it. ``hook``: the
    :class:`GradHook` between a ready bucket and its reduction (default: dense)."""

    def __init__(self, comm: Communicator | None = None, bucket_mb: float = DEFAULT_BUCKET_MB,
                 fail: dict | None = None, accumulate: int = 1, overlap: bool = True, hook: GradHook | None = None):
        if isinstance(accumulate, bool) or not isinstance(accumulate, (int, np.integer)):
            raise TypeError(f"--accumulate must be an integer, got {accumulate!r}")
        if accumulate < 1:
            raise ValueError(f"--accumulate must be >= 1 micro-batches per step, got {accumulate}")
        if not bucket_mb > 0:
            raise ValueError(f"--bucket-mb must be > 0, got {bucket_mb}")
        if fail and fail.get("how", "kill") not in FAIL_HOWS:
            raise ValueError(f"fail: 'how' must be one of {', '.join(FAIL_HOWS)}, got {fail.get('how')!r}")
        self.comm = comm if comm is not None else make_communicator("auto")
        self.rank, self.size = self.comm.rank, self.comm.size
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.accumulate, self.overlap = int(accumulate), bool(overlap)
        self.hook = hook if hook is not None else GradHook()
        self.fail = dict(fail or {})
        self.buckets: Buckets | None = None
        self.layout: ParamLayout | None = None
        self.steps = 0
        self.comm_seconds = 0.0          # time some bucket was in flight
        self.exposed_seconds = 0.0       # of which spent waiting after backward
        self.started_in_backward = 0     # buckets whose allreduce began during backward
        self.bytes_reduced = 0           # gradient payload summed (bytes per rank, all steps)
        self.bytes_sent = 0              # what this rank sent for it (GradHook.bytes_sent)
        self._step = None

    name = "data"

    # ------------------------------------------------------------------ the engine's strategy protocol
    def prepare(self, cfg, model, data) -> None:
        self.check_data(len(data.y_train), cfg.batch_size)

    def start(self, model, optimizer, start_epoch: int, out) -> int:
        """Every rank starts from rank 0's parameters, momentum and epoch (:meth:`setup`)."""
        super().start(model, optimizer, start_epoch, out)
        return self.setup(model, optimizer, start_epoch)

    def comm_stats(self) -> CommStats:
        return CommStats(self.bytes_sent / max(self.steps, 1), self.report_dense_bytes(), self.comm_seconds,
                         self.exposed_seconds, self.steps)

    def details(self, history):
        return self

    def report_extra(self) -> dict:
        return {"ranks": self.size, "comm": self.comm.name, "hook": self.hook.name, "accumulate": self.accumulate,
                "overlap": self.overlap, "buckets": len(self.buckets or []), "bucket_bytes": self.bucket_bytes,
                **self.hook.report_extra()}

    # ------------------------------------------------------------------ setup
    def check_data(self, n_train: int, batch_size: int) -> None:
        """N ranks need at least one sample each per step."""
        need = self.global_batch(batch_size)
        if need > n_train:
            k = f" x {self.accumulate} micro-batches" if self.accumulate > 1 else ""
            raise ValueError(f"{self.size} ranks x batch {batch_size}{k} = {need} samples per step, "
                             f"but the training set has only {n_train}: use fewer ranks or a smaller batch")

    def setup(self, model, optimizer=None, start_epoch: int = 1) -> int:
        """Bucket the parameters and make every rank start where rank 0 does: its parameters and
        buffers (BatchNorm statistics), its optimizer's momentum buffers (``optimizer.velocity``, filled by a resumed checkpoint that
        only rank 0 needs to read) and its start epoch, which is returned."""
        self.layout = ParamLayout(model)
        self.buckets = Buckets(self.layout, self.bucket_bytes, get_backend().xp)
        self.hook.bind(self, model, optimizer)
        vec = self.layout.gather_params(model)
        self.comm.bcast(vec, root=0)
        self.layout.scatter_params(model, vec)
        for name, b in model.named_buffers():  # BatchNorm statistics: a resumed rank 0 has them
            if not b.flags.c_contiguous or b.dtype != np.float32:
                raise ValueError(f"data parallel: buffer {name} must be C-contiguous float32, got {b.dtype}")
            self.comm.bcast(b, root=0)
        velocity = getattr(optimizer, "velocity", None)
        epoch, has_velocity = self.comm.allreduce_scalars(
            [start_epoch if self.is_root else 0, float(bool(velocity)) if self.is_root else 0.0])
        if has_velocity:
            xp = get_backend().xp
            for name, p, _ in model.named_parameters():
                # a buffer rank 0 lacks is zeros here: v = mu * 0 + g equals its first v = g
                v = velocity.get(name) if self.is_root else None
                v = xp.zeros_like(p) if v is None else xp.ascontiguousarray(v, dtype=p.dtype)
                if v.shape != p.shape:  # before any collective moves it: a mismatch would hang or corrupt
                    raise ValueError(f"data parallel: momentum buffer {name} has shape {v.shape}, the parameter "
                                     f"{p.shape} (a checkpoint of another model?)")
                self.comm.bcast(v, root=0)
                velocity[name] = v
        return int(epoch)

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    # ------------------------------------------------------------------ per step
    def global_batch(self, batch_size: int) -> int:
        return batch_size * self.size * self.accumulate

    def shard(self, xb, yb):
        """This rank's slice of a global batch, and its share of the batch (for the gradient scale).
        The split is as even as possible, so a short last batch still adds up exactly."""
        m = len(yb)
        lo, hi = m * self.rank // self.size, m * (self.rank + 1) // self.size
        return xb[lo:hi], yb[lo:hi], (hi - lo) / m

    def micro_batches(self, xb, yb) -> list:
        """This rank's slice of a global batch as ``accumulate`` micro-batches ``(x, y, share)``,
        ``share`` = its fraction of the global batch (split as evenly as :meth:`shard` splits;
        only the first ones can be empty, and all of them on a rank without samples)."""
        m = len(yb)
        x, y, _ = self.shard(xb, yb)
        n, k = len(y), self.accumulate
        return [(x[n * i // k:n * (i + 1) // k], y[n * i // k:n * (i + 1) // k],
                 (n * (i + 1) // k - n * i // k) / m) for i in range(k)]

    def begin_step(self, model, epoch: int | None = None) -> None:
        """Before the step's first forward pass: the model's ``grad_hook`` now writes into the buckets."""
        self._maybe_fail("hang", "kill")
        self.hook.begin_step(epoch)
        n = len(self.buckets)
        missing = [0] * n
        for s in self.layout.slots:
            missing[self.buckets.bucket_of[s.name]] += 1
        self._step = dict(model=model, layers=dict(model.layers), written=set(), missing=missing, next=0,
                          handles=[], share=0.0, share_total=0.0, last=False, since=None, busy=0.0,
                          in_backward=True)
        model.grad_hook = self._on_grads

    def begin_micro(self, share: float, last: bool) -> None:
        """Before a micro-batch's backward: its share of the global batch, and whether it is the step's last."""
        self._step.update(share=share, last=last, share_total=self._step["share_total"] + share)

    @property
    def step_share(self) -> float:
        """This rank's share of the current step's global batch (its micro-batches' together)."""
        return self._step["share_total"] if self._step is not None else 0.0

    def _on_grads(self, lname: str, layer) -> None:
        """Graph.grad_hook: ``layer`` has just written its gradients."""
        st, b = self._step, self.buckets
        xp = get_backend().xp
        share = np.float32(st["share"])
        for pname in layer.params:
            g, name = layer.grads.get(pname), f"{lname}.{pname}"
            if g is None:
                continue
            slot = self.layout[name]
            view = b.view(slot)
            if name in st["written"]:
                view += g * share  # a later micro-batch: accumulate
            else:
                xp.multiply(g, share, out=view)
                st["written"].add(name)
            layer.grads[pname] = view
            if st["last"]:
                st["missing"][b.bucket_of[name]] -= 1
        if st["last"] and self.overlap:
            self._start_ready()
        self._progress()
        if st["last"]:
            self._maybe_fail("hang-in-backward")

    def _start_ready(self, every: bool = False) -> None:
        """Start, in bucket order, each bucket whose gradients are all written (``every``: all)."""
        st = self._step
        while st["next"] < len(self.buckets) and (every or st["missing"][st["next"]] == 0):
            i = st["next"]
            if st["since"] is None:
                st["since"] = time.perf_counter()
            st["handles"].append(self.hook.start(self.comm, self.buckets.views[i]))
            st["next"] += 1
            self.started_in_backward += st["in_backward"]

    def _progress(self) -> None:
        """Test the buckets in flight (MPI progresses them only in MPI calls); note when all are done."""
        st = self._step
        if st["since"] is not None and self.comm.test(st["handles"]):
            st["busy"] += time.perf_counter() - st["since"]
            st["since"] = None

    def finish_step(self) -> None:
        """After the step's last backward: start what has not started, wait for everything, and
        leave the summed gradients in the model's ``grads`` (views of the buckets)."""
        st = self._step
        st["model"].grad_hook = None
        st["in_backward"] = False
        for s in self.layout.slots:  # a rank without samples, or a layer that got no gradient: zeros
            if s.name not in st["written"]:
                view = self.buckets.view(s)
                view[...] = 0
                lname, pname = s.name.rsplit(".", 1)
                st["layers"][lname].grads[pname] = view
        t0 = time.perf_counter()  # from here on communication is exposed: nothing else runs
        self._start_ready(every=True)
        self.comm.wait(st["handles"], f"allreduce of {len(self.buckets)} gradient bucket(s), "
                                      f"{self.buckets.grad.nbytes:,} bytes")
        t1 = time.perf_counter()
        for v in self.buckets.views:
            self.hook.finish(v)
        if st["since"] is not None:
            st["busy"] += t1 - st["since"]
        self.comm_seconds += st["busy"]
        self.exposed_seconds += t1 - t0
        self.bytes_reduced += self.buckets.grad.nbytes
        self.bytes_sent += sum(self.hook.bytes_sent(v, self.size) for v in self.buckets.views)
        self.steps += 1
        self._step = None

    def abandon_step(self) -> None:
        """A step that raised: the model's backward no longer feeds the buckets."""
        if self._step is not None:
            self._step["model"].grad_hook = None
            self._step = None

    def evaluate(self, model, x, y) -> float:
        """Test accuracy with the test set split over the ranks (every rank holds the same
        parameters): the ranks stay in step, so none waits on a collective while rank 0 scores."""
        n = len(y)
        lo, hi = n * self.rank // self.size, n * (self.rank + 1) // self.size
        correct = evaluate(model, x[lo:hi], y[lo:hi]) * (hi - lo) if hi > lo else 0.0
        (total,) = self.reduce_stats(correct)
        return total / n

    def reduce_stats(self, *values) -> list[float]:
        return [float(v) for v in self.comm.allreduce_scalars(values)]

    def _maybe_fail(self, *hows) -> None:
        f = self.fail
        if f and f.get("rank") == self.rank and f.get("step") == self.steps and f.get("how", "kill") in hows:
            if f.get("how", "kill") == "kill":
                os.kill(os.getpid(), signal.SIGKILL)  # die the way an OOM kill or a crash does
            while True:  # stop answering: never reach the (next) collective
                time.sleep(3600)

    # ------------------------------------------------------------------ reporting
    def overlap_fraction(self) -> float:
        """The share of communication time hidden behind backward: 1 - exposed / in flight."""
        return max(0.0, 1.0 - self.exposed_seconds / self.comm_seconds) if self.comm_seconds > 0 else 0.0

    def report_dense_bytes(self) -> int:
        """Bytes one rank would send per step with the dense allreduce (2 (N - 1) / N of the gradient)."""
        return allreduce_bytes(self.buckets.grad.nbytes, self.size) if self.buckets else 0

    def describe(self) -> str:
        sizes = self.buckets.sizes() if self.buckets else []
        k = f", {self.accumulate} micro-batches per step" if self.accumulate > 1 else ""
        return (f"data parallel over {self.size} rank(s) ({self.comm.name}), {len(sizes)} gradient bucket(s) of "
                f"<= {self.bucket_bytes / 2**20:g} MiB ({sum(sizes):,} bytes per step), allreduce "
                f"{'overlapped with' if self.overlap else 'after'} backward{k}"
                + ("" if self.hook.name == "dense" else f", gradients compressed by {self.hook.name}")
                + (f"; batch {self.cfg.batch_size} per rank, {self.global_batch(self.cfg.batch_size)} per step"
                   if getattr(self, "cfg", None) is not None else ""))


def run_data_parallel(cfg, comm: Communicator | None = None, bucket_mb: float = DEFAULT_BUCKET_MB,
                      fail: dict | None = None, accumulate: int = 1, overlap: bool = True,
                      hook: GradHook | None = None, report=None, **train_kwargs):
    """One rank of a data-parallel run: the engine with a :class:`DataParallel` strategy
    (``accumulate``, ``overlap``, ``hook``: see there). ``report``: a path where rank 0 writes
    :meth:`RunResult.report <dnnpar.reporting.RunResult.report>` as JSON after training. Any
    exception on any rank (a :class:`CommTimeoutError` included) aborts the whole MPI job with its
    message, so the other ranks never wait for it. Returns a :class:`~dnnpar.reporting.RunResult`
    (``details``: the DataParallel); only rank 0's history holds the epochs before a resume (it
    alone reads the checkpoint)."""
    par = DataParallel(comm, bucket_mb=bucket_mb, fail=fail, accumulate=accumulate, overlap=overlap, hook=hook)
    try:
        result = run(par, cfg, **train_kwargs)
        if report is not None and par.is_root:
            result.write_report(report)
    except BaseException as e:  # noqa: BLE001 - a rank that stops must take the job down, not hang it
        par.abandon_step()
        if par.size > 1:
            par.comm.abort(f"{type(e).__name__}: {e}; aborting all {par.size} ranks")
        raise
    return result
