"""Hogwild (Niu, Recht, Ré and Wright 2011): lock-free asynchronous SGD inside one machine.

    result = run_hogwild(TrainConfig(model="lenet300", subset="embedded", epochs=3), workers=2)
    result.model, result.history, result.details   # the trained model, the epochs, a HogwildReport

One float32 parameter vector lives in ``multiprocessing.shared_memory``; every worker process
makes its model's parameters views into it (:meth:`ParamLayout.bind` with ``copy_in=False``),
runs forward/backward on its own mini-batch with whatever the vector holds at that moment, and
applies ``p -= lr * g`` in place, with no lock. Updates of different workers may interleave
element by element; that is the point (sparse or small updates rarely collide, and a collision
only loses part of one step).

Design choices, and why:

- **spawn, not fork.** A forked child inherits the parent's OpenBLAS thread pool in an undefined
  state (a known deadlock), and its BLAS thread count cannot be changed after the library has
  loaded. Spawned children start a fresh interpreter, so the thread limits below take effect.
- **One BLAS thread per worker.** ``OPENBLAS_NUM_THREADS``, ``OMP_NUM_THREADS``,
  ``MKL_NUM_THREADS`` (and friends) are set to 1 in the environment the children are spawned
  with (the parent's own environment is restored right after); parallelism comes from the
  workers, not from BLAS threads fighting over the same cores.
- **Data in shared memory too.** The training images are copied once into a shared block that
  every worker reads, instead of being pickled to each one. Each worker owns a disjoint shard
  (a seeded permutation cut into ``workers`` pieces) and reshuffles it every epoch.
- **Momentum per worker.** Each worker runs the project's :class:`~dnnpar.nn.optim.SGD` on its
  views, so weight decay and momentum work; the velocity is private to the worker (it is not
  shared), the parameters are.
- **Epoch boundaries are synchronous.** After every epoch the parent waits for all workers,
  evaluates the shared parameters on the test set (through its own views: it never writes to
  the vector during training), then starts the next epoch with the schedule's learning rate.
- **No hang, no leak.** The parent polls the workers' exit codes while it waits: a worker that
  dies (a signal, ``os._exit``, an uncaught exception) ends the run with a ParallelError (a RuntimeError) naming
  the worker and its exit code, and the other workers are terminated. The shared blocks are
  unlinked in a ``finally`` whatever happens.

Stability: stale reads act like extra momentum (Mitliagkas et al. 2016, "Asynchrony begets
momentum"), so a learning rate at the edge of stability for synchronous SGD can diverge with 2+
workers (measured here: lenet5, embedded subset, batch 32, momentum 0.9: lr 0.01 trains with 1
worker and diverges with 2; lr 0.005 gives 80% with both). A diverged run raises with the
worker's FloatingPointError; lower ``lr`` or ``momentum``.

Models with buffers (BatchNorm running statistics) are refused: only parameters are shared.
The numpy backend is used in the workers (one CPU core each).

Fault injection for the tests: ``fail={"worker": w, "after_steps": k, "how": "exit" | "raise"}``
makes worker ``w`` call ``os._exit(3)`` or raise after ``k`` steps of its first epoch.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from multiprocessing import shared_memory

import numpy as np

from .. import backend as _backend
from ..errors import ParallelError
from ..nn import SoftmaxCrossEntropy
from ..nn.optim import SGD
from ..engine import EpochStats, Strategy, run
from ..reporting import CommStats, ProgressBar, RunResult
from ..steps import TrainConfig, build_model, forward_backward
from .flat import ParamLayout

#: the environment every worker is spawned with: one BLAS / OpenMP thread
ONE_THREAD_ENV = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                  "VECLIB_MAXIMUM_THREADS": "1", "NUMEXPR_NUM_THREADS": "1"}
FAIL_EXIT_CODE = 3
_POLL_S = 0.1


@dataclass
class HogwildReport:
    workers: int
    history: object                                     # dnnpar.reporting.History (per-epoch records)
    images_per_s: float = 0.0                            # all workers, training time only
    wall_s: float = 0.0                                  # the whole run: data, start-up, epochs, evaluation
    startup_s: float = 0.0                               # spawning the workers until all are ready
    steps_per_worker: list = field(default_factory=list)
    param_change: list = field(default_factory=list)     # per epoch: ||vec_after - vec_before||_2
    blas_threads_per_worker: int = 1

    @property
    def final_accuracy(self) -> float:
        return self.history.records[-1].test_acc if self.history.records else float("nan")


    def table(self) -> str:
        h = self.history
        lines = [f"hogwild: {self.workers} worker(s), 1 BLAS thread each", h.table_header()]
        lines += [h.row(r) for r in h.records]
        lines.append(f"{self.images_per_s:,.0f} images/s over the epochs; wall {self.wall_s:.1f} s "
                     f"(start-up {self.startup_s:.1f} s); steps per worker {self.steps_per_worker}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- shared memory
class SharedArray:
    """A NumPy array over a ``multiprocessing.shared_memory`` block. The creator unlinks it;
    everyone closes it after dropping their views (:meth:`close` drops this object's own)."""

    def __init__(self, shape, dtype, name: str | None = None):
        self.shape, self.dtype = tuple(shape), np.dtype(dtype)
        nbytes = max(1, int(np.prod(self.shape)) * self.dtype.itemsize)
        self.owner = name is None
        self.shm = shared_memory.SharedMemory(create=True, size=nbytes) if self.owner else \
            shared_memory.SharedMemory(name=name)
        self.array = np.ndarray(self.shape, self.dtype, buffer=self.shm.buf)

    @property
    def name(self) -> str:
        return self.shm.name

    def spec(self) -> tuple:
        """What a worker needs to attach: (name, shape, dtype string)."""
        return self.shm.name, self.shape, self.dtype.str

    @classmethod
    def attach(cls, spec) -> "SharedArray":
        name, shape, dtype = spec
        return cls(shape, dtype, name=name)

    def close(self) -> None:
        self.array = None
        try:
            self.shm.close()
        except BufferError:  # a view is still alive somewhere in this process; unlink still frees it
            pass

    def unlink(self) -> None:
        try:
            self.shm.unlink()
        except FileNotFoundError:
            pass


@contextmanager
def _spawn_env(env: dict):
    """Set ``env`` in os.environ while children are spawned (they copy it), then restore it."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# ---------------------------------------------------------------------------- the worker
def _worker(rank: int, args: dict, commands, results) -> None:
    """One Hogwild worker (a spawned process). Commands: ("epoch", e, lr) or None (stop)."""
    try:
        _backend.set_backend("numpy")
        params = SharedArray.attach(args["params"])
        xs, ys = SharedArray.attach(args["x"]), SharedArray.attach(args["y"])
        progress = SharedArray.attach(args["progress"])
        model = build_model(TrainConfig(model=args["model"], seed=args["seed"]))
        ParamLayout(model).bind(model, params.array, copy_in=False)
        opt = SGD(model, args["lr"], args["momentum"], args["nesterov"], args["weight_decay"])
        loss_fn = SoftmaxCrossEntropy()
        shard, batch, fail = args["shard"], args["batch_size"], args.get("fail") or {}
        results.put(("ready", rank, os.getpid()))
        steps = 0
        while True:
            cmd = commands.get()
            if cmd is None:
                break
            _, epoch, lr = cmd
            opt.lr = lr
            model.train()
            order = shard[np.random.default_rng([args["seed"], epoch, rank]).permutation(len(shard))]
            seen = correct = 0
            loss_sum = 0.0
            for start in range(0, len(order) - batch + 1, batch):   # full batches only
                idx = np.sort(order[start:start + batch])
                xb, yb = xs.array[idx], ys.array[idx]
                loss, logits = forward_backward(model, loss_fn, xb, yb, f"in worker {rank} at epoch {epoch} (lr {lr:g})")
                opt.step()   # in place on the shared vector, no lock
                steps += 1
                seen += len(yb)
                loss_sum += loss * len(yb)
                correct += int((logits.argmax(axis=1) == yb).sum())
                progress.array[rank] += 1
                if fail.get("worker") == rank and steps == fail.get("after_steps", 0):
                    if fail.get("how", "exit") == "exit":
                        os._exit(FAIL_EXIT_CODE)
                    raise RuntimeError(f"injected failure in worker {rank} after {steps} steps")
            results.put(("epoch", rank, {"epoch": epoch, "seen": seen, "loss_sum": loss_sum,
                                         "correct": correct, "steps": steps}))
    except BaseException:  # noqa: BLE001 - reported to the parent, which raises
        e = sys.exc_info()[1]
        results.put(("error", rank, (f"{type(e).__name__}: {e}", traceback.format_exc())))
        raise SystemExit(1)


# ---------------------------------------------------------------------------- the parent
class _Pool:
    """The worker processes and their queues; :meth:`wait` collects one message per worker."""

    def __init__(self, ctx, workers: int, args: dict):
        self.results = ctx.Queue()
        self.commands = [ctx.Queue() for _ in range(workers)]
        self.procs = []
        with _spawn_env(ONE_THREAD_ENV):
            for r in range(workers):
                wargs = dict(args, shard=args["shards"][r])
                wargs.pop("shards")
                p = ctx.Process(target=_worker, args=(r, wargs, self.commands[r], self.results),
                                name=f"hogwild-worker-{r}", daemon=True)
                p.start()
                self.procs.append(p)

    def wait(self, kind: str, on_tick=None, timeout: float | None = None) -> dict:
        """One ``kind`` message from every worker -> {rank: payload}. A worker that reports an
        error or exits ends the run with a ParallelError (a RuntimeError) naming it."""
        got, deadline = {}, None if timeout is None else time.monotonic() + timeout
        while len(got) < len(self.procs):
            try:
                msg_kind, rank, payload = self.results.get(timeout=_POLL_S)
            except queue.Empty:
                msg_kind = None
            if msg_kind == "error":
                self._join(rank, 5.0)
                code = self.procs[rank].exitcode
                raise ParallelError(f"hogwild worker {rank} failed (exit code {code}): {payload[0]}", payload[1])
            if msg_kind == kind:
                got[rank] = payload
            elif msg_kind is not None:
                raise ParallelError(f"hogwild: unexpected message {msg_kind!r} from worker {rank}")
            for r, p in enumerate(self.procs):
                if r not in got and p.exitcode is not None:
                    self._drain_error(r)
                    hint = ("; a worker that dies before it is ready is often a script that starts the run "
                            "outside `if __name__ == \"__main__\":` (workers are spawned, and re-import the "
                            "main module): see its traceback above") if kind == "ready" else ""
                    raise ParallelError(f"hogwild worker {r} (pid {p.pid}) died with exit code {p.exitcode}"
                                       f"{_describe_exit(p.exitcode)} while the run waited for its {kind!r} "
                                       f"message; the other workers were stopped{hint}")
            if on_tick is not None:
                on_tick()
            if deadline is not None and time.monotonic() > deadline:
                missing = [r for r in range(len(self.procs)) if r not in got]
                raise ParallelError(f"hogwild workers {missing} sent no {kind!r} message in {timeout:.0f} s")
        return got

    def _join(self, rank: int, timeout: float) -> None:
        self.procs[rank].join(timeout)

    def _drain_error(self, rank: int) -> None:
        """A worker that raised puts its traceback on the queue before exiting: prefer that."""
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            try:
                msg_kind, r, payload = self.results.get(timeout=0.1)
            except queue.Empty:
                continue
            if msg_kind == "error":
                raise ParallelError(f"hogwild worker {r} failed (exit code {self.procs[r].exitcode}): {payload[0]}",
                                    payload[1])

    def send(self, cmd) -> None:
        for q in self.commands:
            q.put(cmd)

    def shutdown(self) -> None:
        for q in self.commands:
            try:
                q.put(None)
            except (ValueError, OSError):
                pass
        for p in self.procs:
            p.join(timeout=5.0)
        for p in self.procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=2.0)
            if p.is_alive():
                p.kill()
                p.join(timeout=2.0)
        for q in [self.results, *self.commands]:
            q.close()
            q.cancel_join_thread()


def _describe_exit(code: int) -> str:
    if code is not None and code < 0:
        import signal
        try:
            return f" (killed by {signal.Signals(-code).name})"
        except ValueError:
            return f" (killed by signal {-code})"
    return ""


class Hogwild(Strategy):
    """The engine's strategy ``"hogwild"``: ``workers`` spawned processes train each epoch on
    the parameter vector in shared memory; the parent (the driver) only sets each epoch's
    learning rate, waits, and evaluates through views of the vector (module docstring)."""

    name = "hogwild"
    backend = "numpy"       # the workers share host memory
    resumable = False       # the workers' momentum lives (and dies) in them

    def __init__(self, workers: int, fail: dict | None = None, start_timeout: float = 300.0):
        if not isinstance(workers, (int, np.integer)) or isinstance(workers, bool) or workers < 1:
            raise ValueError(f"hogwild needs at least 1 worker (an int), got {workers!r}")
        self.workers, self.fail, self.start_timeout = int(workers), fail, start_timeout
        self.blocks, self.pool, self.final = [], None, None
        self.changes, self.steps, self.startup_s = [], [], 0.0

    def prepare(self, cfg, model, data) -> None:
        buffers = [n for n, _ in model.named_buffers()]
        if buffers:
            raise ValueError(f"hogwild shares parameters only, and {cfg.model} has buffers "
                             f"({', '.join(buffers[:3])}{'...' if len(buffers) > 3 else ''}) that would stay "
                             "private to each worker")
        n = len(data.y_train)
        if n // self.workers < cfg.batch_size:
            raise ValueError(f"{self.workers} workers with batch {cfg.batch_size} need at least "
                             f"{self.workers * cfg.batch_size} training images; got {n}")
        self.cfg, self.data, self.n_train = cfg, data, n

    def make_optimizer(self, cfg, model):
        return None   # each worker runs its own SGD on its views

    def _block(self, shape, dtype) -> SharedArray:
        b = SharedArray(shape, dtype)
        self.blocks.append(b)
        return b

    def start(self, model, optimizer, start_epoch: int, out) -> int:
        cfg, data, workers = self.cfg, self.data, self.workers
        t0 = time.perf_counter()
        self.layout = ParamLayout(model)
        self.params = self._block((self.layout.size,), np.float32)
        xs, ys = self._block(data.x_train.shape, np.float32), self._block(data.y_train.shape, np.int64)
        self.prog = self._block((workers,), np.int64)
        xs.array[...] = data.x_train
        ys.array[...] = data.y_train
        self.prog.array[...] = 0
        self.layout.gather_params(model, out=self.params.array)
        self.layout.bind(model, self.params.array, copy_in=False)   # the parent reads (evaluates) through views
        perm = np.random.default_rng([cfg.seed, 12345]).permutation(self.n_train)
        shards = np.array_split(perm, workers)
        args = {"params": self.params.spec(), "x": xs.spec(), "y": ys.spec(), "progress": self.prog.spec(),
                "model": cfg.model, "seed": cfg.seed, "lr": cfg.lr, "momentum": cfg.momentum,
                "nesterov": cfg.nesterov, "weight_decay": cfg.weight_decay, "batch_size": cfg.batch_size,
                "shards": shards, "fail": self.fail}
        self.pool = _Pool(mp.get_context("spawn"), workers, args)
        self.pool.wait("ready", timeout=self.start_timeout)
        self.startup_s = time.perf_counter() - t0
        self.steps_per_epoch_ = sum(len(sh) // cfg.batch_size for sh in shards)
        self.model_name = model.name
        return start_epoch

    def describe(self) -> str:
        return (f"hogwild: {self.workers} worker process(es), 1 BLAS thread each, {self.model_name} "
                f"({self.layout.size:,} parameters in shared memory); batch {self.cfg.batch_size} per worker")

    def steps_per_epoch(self) -> int:
        return self.steps_per_epoch_

    def train_epoch(self, epoch: int, lr: float, bar: ProgressBar) -> EpochStats:
        total = self.steps_per_epoch_
        before, base = self.params.array.copy(), int(self.prog.array.sum())
        self.pool.send(("epoch", epoch, lr))
        res = self.pool.wait("epoch", on_tick=lambda: bar.update(min(int(self.prog.array.sum()) - base, total)))
        self.changes.append(float(np.linalg.norm(self.params.array - before)))
        self.steps = [res[r]["steps"] for r in range(self.workers)]
        return EpochStats(sum(r["seen"] for r in res.values()), sum(r["loss_sum"] for r in res.values()),
                          sum(r["correct"] for r in res.values()))

    def finish(self, model):
        """A model of its own holding the final shared parameters (the shared block is freed)."""
        self.final = self.params.array.copy()
        model = build_model(self.cfg)
        self.layout.scatter_params(model, self.final)
        return model

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
        for b in self.blocks:
            b.close()
            b.unlink()
        self.blocks = []

    def comm_stats(self) -> CommStats:
        return CommStats(steps=int(np.mean(self.steps)) if self.steps else 0)

    def details(self, history):
        return HogwildReport(self.workers, history, history.images_per_s(), 0.0, self.startup_s, self.steps,
                             self.changes)

    def report_extra(self) -> dict:
        return {"workers": self.workers, "shared_update_bytes_per_step": 4 * self.layout.size,
                "startup_s": self.startup_s}


def run_hogwild(cfg, workers: int, out=print, data=None, progress: bool = True, fail: dict | None = None,
                start_timeout: float = 300.0, **run_kwargs) -> RunResult:
    """Train ``cfg.model`` on Fashion-MNIST with ``workers`` Hogwild processes; returns a
    :class:`~dnnpar.reporting.RunResult` whose ``model`` holds a copy of the final shared
    parameters and whose ``details`` is the :class:`HogwildReport`. The workers send no messages
    (they update the shared vector in place), so its gradient bytes and communication seconds are
    0; the report's ``shared_update_bytes_per_step`` is what one step writes there (4 bytes per
    parameter).

    ``cfg``: a :class:`dnnpar.train.TrainConfig`; ``cfg.batch_size`` is each worker's batch, and
    one epoch is every worker going once through its shard (so the whole set is seen once, in
    about the same number of steps as synchronous SGD with the same batch). ``data``: a loaded
    Dataset (default ``cfg.subset`` through ``cfg.data_dir``). ``fail``: fault injection (module
    docstring). Raises ValueError for ``workers < 1``, a non-numpy backend, a model with buffers
    or too little data; ParallelError (a RuntimeError) when a worker dies or raises."""
    result = run(Hogwild(workers, fail, start_timeout), cfg, out=out, data=data, progress=progress, **run_kwargs)
    result.details.wall_s = result.wall_s
    return result
