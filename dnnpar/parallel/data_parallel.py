"""Synchronous data-parallel SGD (the allreduce strategy).

Every rank holds the whole model. Each step draws one global mini-batch of ``N * b`` samples
from the same seeded order on every rank (:func:`dnnpar.data.fashion_mnist.batches`); rank r
takes slice r, ``b`` samples. After the backward pass each rank scales its gradients by its
share of the global batch (``b / (N b)``, exact for a short last batch too), the gradients are
summed over the ranks in fused buckets (:class:`Buckets`: contiguous runs of parameters up to
``bucket_mb`` MiB, packed into one buffer each, all in flight at once), and every rank applies
the same SGD update. N ranks at batch b therefore follow 1 rank at batch N*b up to float
rounding; ``tests/test_parallel.py`` checks it (rtol 1e-5). Buffers (BatchNorm's running
statistics) are per rank, computed from each rank's own slice, as in PyTorch's DDP without
SyncBatchNorm: a model with BatchNorm is not bit-for-bit the single-process one.

The training loop itself is :func:`dnnpar.train.train`, given a :class:`DataParallel` as
``parallel``: it shards each batch, reduces gradients and statistics through it, and only rank
0 prints, evaluates and writes checkpoints.

Run it with ``mpiexec -n N dnnpar train --parallel data ...``. Fault injection for the tests:
``fail={"rank": r, "step": k, "how": "kill" | "hang"}`` makes rank r die (SIGKILL) or stop
answering at step k. A dead rank is reported by mpiexec, which ends the job; a silent one makes
the others raise :class:`CommTimeoutError` within the communicator's timeout, and the job is
aborted with that message.
"""
from __future__ import annotations

import os
import signal
import time

import numpy as np

from ..backend import get_backend
from .comm import Communicator, make_communicator
from .flat import ParamLayout

DEFAULT_BUCKET_MB = 4.0


class Buckets:
    """Parameters grouped into contiguous buckets of at most ``bucket_bytes`` (a parameter larger
    than that is a bucket of its own), each with one flat buffer of the backend."""

    def __init__(self, layout: ParamLayout, bucket_bytes: int, xp):
        if bucket_bytes <= 0:
            raise ValueError(f"bucket size must be > 0 bytes, got {bucket_bytes}")
        groups, cur, cur_bytes = [], [], 0
        for s in layout.slots:
            if cur and cur_bytes + 4 * s.size > bucket_bytes:
                groups.append(cur)
                cur, cur_bytes = [], 0
            cur.append(s)
            cur_bytes += 4 * s.size
        if cur:
            groups.append(cur)
        self.groups = groups
        self.buffers = [xp.empty(sum(s.size for s in g), dtype=np.float32) for g in groups]

    def __len__(self) -> int:
        return len(self.groups)

    def sizes(self) -> list[int]:
        return [int(b.nbytes) for b in self.buffers]

    def pack(self, grads: dict, scale: float) -> None:
        for g, buf in zip(self.groups, self.buffers):
            off = 0
            for s in g:
                src = grads.get(s.name)
                if src is None:
                    buf[off:off + s.size] = 0
                else:
                    buf[off:off + s.size] = src.reshape(-1)
                    if scale != 1.0:
                        buf[off:off + s.size] *= np.float32(scale)
                off += s.size

    def unpack(self, model) -> None:
        by_layer = dict(model.layers)
        for g, buf in zip(self.groups, self.buffers):
            off = 0
            for s in g:
                lname, pname = s.name.rsplit(".", 1)
                layer = by_layer[lname]
                view = buf[off:off + s.size].reshape(s.shape)
                if layer.grads.get(pname) is None:
                    layer.grads[pname] = view.copy()
                else:
                    layer.grads[pname][...] = view
                off += s.size


class DataParallel:
    """The per-step collective work of synchronous data parallelism, for :func:`dnnpar.train.train`."""

    def __init__(self, comm: Communicator | None = None, bucket_mb: float = DEFAULT_BUCKET_MB,
                 fail: dict | None = None):
        self.comm = comm if comm is not None else make_communicator("auto")
        self.rank, self.size = self.comm.rank, self.comm.size
        if not bucket_mb > 0:
            raise ValueError(f"--bucket-mb must be > 0, got {bucket_mb}")
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.fail = dict(fail or {})
        self.buckets: Buckets | None = None
        self.layout: ParamLayout | None = None
        self.steps = 0
        self.comm_seconds = 0.0
        self.bytes_reduced = 0

    # ------------------------------------------------------------------ setup
    def check_data(self, n_train: int, batch_size: int) -> None:
        """N ranks need at least one sample each per step."""
        if self.size * batch_size > n_train:
            raise ValueError(f"{self.size} ranks x batch {batch_size} = {self.size * batch_size} samples per step, "
                             f"but the training set has only {n_train}: use fewer ranks or a smaller batch")

    def setup(self, model, optimizer=None, start_epoch: int = 1) -> int:
        """Bucket the parameters and make every rank start where rank 0 does: its parameters and
        buffers (BatchNorm statistics), its optimizer's momentum buffers (``optimizer.velocity``, filled by a resumed checkpoint that
        only rank 0 needs to read) and its start epoch, which is returned."""
        self.layout = ParamLayout(model)
        self.buckets = Buckets(self.layout, self.bucket_bytes, get_backend().xp)
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
        return batch_size * self.size

    def shard(self, xb, yb):
        """This rank's slice of a global batch, and its share of the batch (for the gradient scale).
        The split is as even as possible, so a short last batch still adds up exactly."""
        m = len(yb)
        lo, hi = m * self.rank // self.size, m * (self.rank + 1) // self.size
        return xb[lo:hi], yb[lo:hi], (hi - lo) / m

    def allreduce_grads(self, model, share: float) -> None:
        """Sum ``share * grad`` over the ranks, in fused buckets, into every rank's gradients."""
        self._maybe_fail()
        grads = {name: g for name, _, g in model.named_parameters()}
        self.buckets.pack(grads, share)
        t0 = time.perf_counter()
        self.comm.allreduce_sum(self.buckets.buffers)
        self.comm_seconds += time.perf_counter() - t0
        self.bytes_reduced += sum(self.buckets.sizes())
        self.buckets.unpack(model)
        self.steps += 1

    def evaluate(self, model, x, y) -> float:
        """Test accuracy with the test set split over the ranks (every rank holds the same
        parameters): the ranks stay in step, so none waits on a collective while rank 0 scores."""
        from ..train import evaluate

        n = len(y)
        lo, hi = n * self.rank // self.size, n * (self.rank + 1) // self.size
        correct = evaluate(model, x[lo:hi], y[lo:hi]) * (hi - lo) if hi > lo else 0.0
        (total,) = self.reduce_stats(correct)
        return total / n

    def reduce_stats(self, *values) -> list[float]:
        return [float(v) for v in self.comm.allreduce_scalars(values)]

    def _maybe_fail(self) -> None:
        f = self.fail
        if f and f.get("rank") == self.rank and f.get("step") == self.steps:
            if f.get("how", "kill") == "hang":
                while True:  # stop answering: never reach the collective
                    time.sleep(3600)
            os.kill(os.getpid(), signal.SIGKILL)  # die the way an OOM kill or a crash does

    def describe(self) -> str:
        sizes = self.buckets.sizes() if self.buckets else []
        return (f"data parallel over {self.size} rank(s) ({self.comm.name}), {len(sizes)} gradient bucket(s) of "
                f"<= {self.bucket_bytes / 2**20:g} MiB ({sum(sizes):,} bytes per step)")


def run_data_parallel(cfg, comm: Communicator | None = None, bucket_mb: float = DEFAULT_BUCKET_MB,
                      fail: dict | None = None, **train_kwargs):
    """One rank of a data-parallel run: :func:`dnnpar.train.train` with a :class:`DataParallel`.
    Any exception on any rank (a :class:`CommTimeoutError` included) aborts the whole MPI job
    with its message, so the other ranks never wait for it. Returns (model, history, parallel); only
    rank 0's history holds the epochs before a resume (it alone reads the checkpoint)."""
    from ..train import train

    par = DataParallel(comm, bucket_mb=bucket_mb, fail=fail)
    try:
        model, history = train(cfg, parallel=par, **train_kwargs)
    except BaseException as e:  # noqa: BLE001 - a rank that stops must take the job down, not hang it
        if par.size > 1:
            par.comm.abort(f"{type(e).__name__}: {e}; aborting all {par.size} ranks")
        raise
    return model, history, par
