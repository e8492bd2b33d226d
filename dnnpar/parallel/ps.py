"""Parameter server on Ray: sharded servers, BSP / SSP / ASP, staleness, fault tolerance.

    model, report = run_parameter_server(TrainConfig(model="lenet300", subset="embedded", epochs=2, lr=0.05),
                                         workers=3, servers=2, consistency="ssp:2")
    print(report.render())

Sharding
    The model's parameters are one float32 vector (:class:`~dnnpar.parallel.flat.ParamLayout`).
    ``S`` server actors (:class:`ShardServer`) each own one contiguous, balanced slice of it
    (:func:`shard_bounds`: sizes differ by at most one float) with its momentum buffer, and apply
    SGD (momentum, weight decay: the same rule as :class:`dnnpar.nn.optim.SGD`) to every gradient
    slice pushed to them, one push at a time, as it arrives. ``W`` worker actors
    (:class:`PSWorker`) each hold a whole model: a step pulls every shard, computes the gradient
    of one mini-batch of the worker's data, and pushes each slice to its shard.

Data
    Every epoch the training set is permuted from ``(seed, epoch)`` and cut into one contiguous,
    disjoint part per live worker; every worker runs the same number of full batches
    (``(N // W) // batch``; the few samples left over are a different random handful each epoch).
    Servers scale every pushed gradient by ``1 / W``, so that one clock (W pushes) moves the
    parameters about as far as one SGD step on the global batch ``W * batch`` (and the usual
    single-process learning rate works).
    Epochs end with a barrier: the driver waits for every worker, assembles the shards and
    evaluates the test accuracy, then sets the epoch's learning rate on the servers.

Clocks and consistency
    A worker's *clock* is the number of steps it has finished (it keeps counting over epochs).
    A server knows every worker's clock (workers send it with every pull and push) and the
    *slowest clock*: the minimum over workers still training. A pull by a worker at clock ``c``
    waits on the server until ``slowest >= c - s``:

    - ``"bsp"``   s = 0: nobody starts step t+1 before every worker has pushed step t
    - ``"ssp:s"`` a worker may run at most ``s`` clocks ahead of the slowest one
    - ``"asp"``   no wait at all

Staleness (in clocks, so that the bounds above are assertions, not hopes)
    A pull returns the shard's slowest clock ``m``: the parameters hold every worker's updates of
    clocks ``< m``. The gradient computed at clock ``c`` from them is applied as an update of
    clock ``c``, so it may miss other workers' updates of clocks ``m .. c-1``; its staleness is
    ``c - m`` (the server's clock version it belongs to minus the clock version it pulled). BSP
    gives 0 for every gradient, SSP:s at most s, ASP whatever the speeds make it. Counting raw
    updates instead would charge BSP with the W-1 pushes of its own clock that land between a
    pull and a push; that number is reported too, as the *update lag* histogram.

Faults
    - A dead worker (SIGKILL, crash): its epoch call fails, the driver *retires* it on every
      server (so BSP / SSP stop waiting for its clock) and the epoch finishes with the others.
      The rest of the dead worker's part of that epoch is dropped; from the next epoch on the
      training set is split over the survivors, each taking a batch of ``W * batch / W_live``
      (the global batch of a clock stays the same), so later epochs lose no data and take as
      many clocks as before.
    - A dead server: Ray restarts the actor (``max_restarts``); its ``__init__`` finds the shard's
      checkpoint (``shard-K.npz`` under the run directory, written atomically every
      ``checkpoint_every`` updates and on every retire; npz, loaded with ``allow_pickle=False``)
      and resumes from it. Updates applied after that checkpoint are lost. Workers retry a
      failed call for :data:`RETRY_SECONDS`; pushes carry their clock, so a retried push that the
      checkpoint already holds is acknowledged without being applied twice. A restarted shard
      knows no clock until each worker calls again, except those of workers that already ended
      their epoch (``finish_epoch``, checkpointed on arrival), so a BSP / SSP pull never waits for
      a worker that has nothing more to send; should anything still stall, the driver raises after
      :data:`STALL_SECONDS` without an update rather than hang. Lost updates per shard
      = pushes acknowledged to workers - updates the shard finally holds.

Fault injection (tests, demos): ``fail={"worker": w, "after_steps": k}`` SIGKILLs worker w's
process once it has pushed k steps; ``fail={"server": k, "after_updates": u}`` SIGKILLs shard k's
process once it has applied u updates. The driver sends the signal itself, so the actors must
run on the driver's machine (always so for a local Ray).
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ParallelError

#: the driver gives up, with an error, when no shard applied an update for this long
STALL_SECONDS = float(os.environ.get("DNNPAR_PS_STALL_SECONDS", "300"))
#: how long a worker keeps retrying a call to a server that died (Ray restarts it meanwhile)
RETRY_SECONDS = 60.0
#: how long the driver waits for a TCP answer from a Ray address before giving up
CONNECT_TIMEOUT = 5.0
#: the longest Ray temp dir we use: Ray puts unix sockets at
#: <dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store (about 64 characters more), and
#: a socket path longer than 107 characters is refused by the kernel
MAX_RAY_TEMP_DIR = 40


# ---------------------------------------------------------------------------------------------
# small pure pieces


@dataclass(frozen=True)
class Consistency:
    """A parsed consistency mode; ``bound`` is the staleness bound s (None: ASP, unbounded)."""
    name: str
    bound: int | None

    def __str__(self) -> str:
        return f"ssp:{self.bound}" if self.name == "ssp" else self.name


def parse_consistency(mode: str) -> Consistency:
    """``"bsp"`` | ``"asp"`` | ``"ssp:S"`` (S an integer >= 0; ssp:0 is BSP)."""
    text = str(mode).strip().lower()
    if text == "bsp":
        return Consistency("bsp", 0)
    if text == "asp":
        return Consistency("asp", None)
    m = re.fullmatch(r"ssp:(.*)", text)
    if m:
        try:
            s = int(m.group(1))
        except ValueError:
            s = -1
        if s < 0 or not re.fullmatch(r"\s*\+?\d+\s*", m.group(1)):
            raise ValueError(f"consistency {mode!r}: the staleness bound after 'ssp:' must be an integer >= 0, "
                             f"e.g. 'ssp:2'")
        return Consistency("ssp", s)
    raise ValueError(f"unknown consistency mode {mode!r}: use 'bsp', 'asp' or 'ssp:S' (S >= 0, e.g. 'ssp:2')")


def shard_bounds(size: int, servers: int) -> list[tuple[int, int]]:
    """``servers`` contiguous (lo, hi) slices of ``range(size)``, sizes differing by at most 1."""
    if servers < 1:
        raise ValueError(f"need at least 1 server, got {servers}")
    if servers > size:
        raise ValueError(f"{servers} servers for {size} parameters: every shard needs at least one float")
    base, extra = divmod(size, servers)
    bounds, lo = [], 0
    for k in range(servers):
        hi = lo + base + (1 if k < extra else 0)
        bounds.append((lo, hi))
        lo = hi
    return bounds


def render_histogram(hist: dict, label: str = "staleness", width: int = 40) -> str:
    """Counts per value as text bars, one line per value from 0 to the largest seen."""
    if not hist:
        return f"{label}: (no updates)"
    total = sum(hist.values())
    top = max(hist.values())
    lines = [f"{label:>10} {'count':>8} {'share':>7}"]
    for v in range(0, max(hist) + 1):
        n = hist.get(v, 0)
        bar = "#" * (round(width * n / top) if n else 0)
        lines.append(f"{v:>10} {n:>8} {100 * n / total:>6.1f}% {bar}")
    return "\n".join(lines)


def _save_npz_atomic(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# actors (plain classes; run_parameter_server wraps them with ray.remote)


class ShardServer:
    """One shard of the parameter vector: SGD with momentum on pushes, the clock table, staleness.

    An asyncio actor: a pull that must wait (BSP / SSP) parks on a condition without blocking
    pushes; pushes run one at a time on the event loop, so updates never interleave."""

    def __init__(self, shard: int, size: int, lr: float, momentum: float, weight_decay: float,
                 bound: int | None, workers: int, checkpoint: str, checkpoint_every: int):
        """A first start holds zeros until :meth:`initialize`; a restart (Ray reconstructing the
        actor) reloads ``checkpoint``. The initial values come through a method, not the
        constructor, so that a restart never depends on an object in Ray's store."""
        import ray

        self.shard, self.bound, self.momentum, self.weight_decay = shard, bound, momentum, weight_decay
        self.checkpoint_path, self.checkpoint_every = Path(checkpoint), checkpoint_every
        self.params = np.zeros(size, np.float32)
        self.velocity = np.zeros_like(self.params)
        self.lr = float(lr)
        self.scale = 1.0 / workers                        # each push is 1/W of a step (see set_lr)
        self.version = 0                                  # updates applied
        self.clocks = np.zeros(workers, np.int64)         # steps each worker has finished; -1: not known yet
        self.applied = np.full(workers, -1, np.int64)     # last clock applied per worker (dedupes retries)
        self.retired = np.zeros(workers, bool)            # dead workers nobody waits for
        self.finished = np.full(workers, -1, np.int64)    # clock at which each worker last ended an epoch
        self.staleness: Counter = Counter()
        self.lag: Counter = Counter()
        self.restarts, self.restored_version = 0, None
        self.loss_sum, self.loss_n = 0.0, 0
        self._cond = None
        if ray.get_runtime_context().was_current_actor_reconstructed:
            if not self.checkpoint_path.exists():
                raise RuntimeError(f"shard {shard} restarted but finds no checkpoint at {self.checkpoint_path} "
                                   "(on a multi-node cluster the run directory must be on shared storage)")
            self._restore()
            self._checkpoint()

    async def initialize(self, params: np.ndarray) -> None:
        """The shard's initial values (first start only); checkpointed at once."""
        if params.shape != self.params.shape:
            raise ValueError(f"shard {self.shard}: got {params.shape} initial values for {self.params.shape}")
        self.params = np.array(params, dtype=np.float32, copy=True)
        self.checkpoint_path.parent.mkdir(parents=True, exist_ok=True)
        self._checkpoint()

    # -- checkpoint ------------------------------------------------------------------------
    def _checkpoint(self) -> None:
        keys = np.array(sorted(self.staleness), np.int64)
        lkeys = np.array(sorted(self.lag), np.int64)
        _save_npz_atomic(self.checkpoint_path, params=self.params, velocity=self.velocity,
                         version=np.int64(self.version), lr=np.float64(self.lr),
                         scale=np.float64(self.scale),
                         applied=self.applied, retired=self.retired, finished=self.finished,
                         restarts=np.int64(self.restarts),
                         stale_keys=keys, stale_counts=np.array([self.staleness[k] for k in keys], np.int64),
                         lag_keys=lkeys, lag_counts=np.array([self.lag[k] for k in lkeys], np.int64))

    def _restore(self) -> None:
        with np.load(self.checkpoint_path, allow_pickle=False) as z:
            if z["params"].shape != self.params.shape:
                raise ValueError(f"{self.checkpoint_path}: shard of {z['params'].shape} floats, "
                                 f"expected {self.params.shape}")
            self.params, self.velocity = z["params"].copy(), z["velocity"].copy()
            self.version, self.lr, self.scale = int(z["version"]), float(z["lr"]), float(z["scale"])
            self.applied, self.retired = z["applied"].copy(), z["retired"].copy()
            # the clocks moved on since the checkpoint: unknown until each worker calls again (its
            # pull or push carries its clock); BSP / SSP pulls wait for that, ASP uses what is known.
            # A worker that already ended its epoch will not call again before the next one: its
            # end-of-epoch clock (checkpointed when it arrived) stands in, so nobody waits for it.
            self.finished = z["finished"].copy()
            self.clocks[:] = self.finished
            self.restarts = int(z["restarts"]) + 1
            self.staleness = Counter(dict(zip(z["stale_keys"].tolist(), z["stale_counts"].tolist())))
            self.lag = Counter(dict(zip(z["lag_keys"].tolist(), z["lag_counts"].tolist())))
        self.restored_version = self.version

    # -- clocks ------------------------------------------------------------------------------
    @property
    def cond(self):
        import asyncio

        if self._cond is None:
            self._cond = asyncio.Condition()
        return self._cond

    def _slowest(self) -> int:
        live = self.clocks[~self.retired]
        known = live[live >= 0]
        return int(known.min()) if known.size else max(0, int(self.clocks.max()))

    def _may_run(self, clock: int) -> bool:
        live = self.clocks[~self.retired]
        return bool((live >= 0).all()) and self._slowest() >= clock - self.bound

    async def _notify(self) -> None:
        async with self.cond:
            self.cond.notify_all()

    async def _announce(self, worker: int, clock: int) -> None:
        if clock > self.clocks[worker]:
            self.clocks[worker] = clock
            await self._notify()

    # -- the protocol ---------------------------------------------------------------------------
    async def pull(self, worker: int, clock: int):
        """Parameters for ``worker`` at ``clock`` (steps it has finished), once the consistency
        mode allows. Returns (version, slowest clock, parameters)."""
        await self._announce(worker, clock)
        if self.bound is not None:
            async with self.cond:
                await self.cond.wait_for(lambda: self._may_run(clock))
        return self.version, min(self._slowest(), clock), self.params.copy()

    async def push(self, worker: int, clock: int, pulled_version: int, pulled_slowest: int,
                   grad: np.ndarray, loss: float) -> int:
        """Apply ``worker``'s gradient of step ``clock``; returns the shard's version. A push the
        shard already holds (a retry after a restart) is acknowledged, not applied again."""
        if clock > self.applied[worker]:
            g = np.float32(self.scale) * grad
            if self.weight_decay:
                g += np.float32(self.scale * self.weight_decay) * self.params
            if self.momentum:
                self.velocity *= self.momentum
                self.velocity += g
                g = self.velocity
            self.params -= np.float32(self.lr) * g
            self.applied[worker] = clock
            self.version += 1
            self.staleness[clock - pulled_slowest] += 1
            self.lag[max(0, self.version - 1 - pulled_version)] += 1
            self.loss_sum, self.loss_n = self.loss_sum + loss, self.loss_n + 1
            if self.version % self.checkpoint_every == 0:
                self._checkpoint()
        await self._announce(worker, clock + 1)
        return self.version

    async def finish_epoch(self, worker: int, clock: int) -> None:
        """``worker`` ended its epoch at ``clock`` and sends nothing more until the next one;
        checkpointed at once, so that a restarted shard knows this clock without waiting for it."""
        self.finished[worker] = clock
        self._checkpoint()
        await self._announce(worker, clock)

    async def retire(self, worker: int) -> None:
        """``worker`` is dead: stop waiting for its clock (checkpointed at once, so a restart
        does not wait for it again)."""
        if not self.retired[worker]:
            self.retired[worker] = True
            self._checkpoint()
            await self._notify()

    async def set_lr(self, lr: float, live_workers: int) -> None:
        """The epoch's learning rate; every gradient is scaled by 1 / live_workers, so that one
        clock (W pushes) moves the parameters as far as one step on a W times larger batch."""
        self.lr, self.scale = float(lr), 1.0 / max(1, live_workers)
        self._checkpoint()

    async def snapshot(self) -> np.ndarray:
        return self.params.copy()

    async def progress(self) -> dict:
        mean = self.loss_sum / self.loss_n if self.loss_n else float("nan")
        return {"version": self.version, "clocks": self.clocks.tolist(), "loss": mean}

    async def reset_loss(self) -> None:
        self.loss_sum, self.loss_n = 0.0, 0

    async def stats(self) -> dict:
        return {"version": self.version, "staleness": dict(self.staleness), "lag": dict(self.lag),
                "restarts": self.restarts, "restored_version": self.restored_version, "pid": os.getpid()}

    async def pid(self) -> int:
        return os.getpid()


class PSWorker:
    """A whole model and the training data; trains one epoch's part per :meth:`run_epoch` call."""

    def __init__(self, worker: int, model_name: str, seed: int, backend: str, servers: list,
                 bounds: list, x: np.ndarray, y: np.ndarray):
        from .. import backend as _backend
        from ..nn import SoftmaxCrossEntropy
        from ..train import TrainConfig, build_model
        from .flat import ParamLayout

        _backend.set_backend(backend)
        self.be = _backend.get_backend()
        self.worker, self.servers, self.bounds = worker, servers, bounds
        self.model = build_model(TrainConfig(model=model_name, seed=seed))
        self.model.train()
        self.layout = ParamLayout(self.model)
        self.loss_fn = SoftmaxCrossEntropy()
        from ..train import forward_backward
        self.forward_backward = forward_backward
        self.x, self.y = x, y
        self.clock = 0
        self.acks = [0] * len(servers)

    def pid(self) -> int:
        return os.getpid()

    def _fanout(self, method: str, args: list):
        """Call ``method`` on every shard at once; a call that fails because its server died is
        sent again (Ray restarts the server) for up to RETRY_SECONDS."""
        import ray
        from ray.exceptions import RayActorError

        refs = [getattr(s, method).remote(*a) for s, a in zip(self.servers, args)]
        out = [None] * len(refs)
        for k, ref in enumerate(refs):
            deadline = time.monotonic() + RETRY_SECONDS
            while True:
                try:
                    out[k] = ray.get(ref)
                    break
                except RayActorError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.2)
                    ref = getattr(self.servers[k], method).remote(*args[k])
        return out

    def run_epoch(self, indices: np.ndarray, batch_size: int) -> dict:
        """Train on ``indices`` (a whole number of batches). Returns the epoch's statistics."""
        steps = len(indices) // batch_size
        t0, loss_sum, correct = time.perf_counter(), 0.0, 0
        for i in range(steps):
            idx = np.sort(indices[i * batch_size:(i + 1) * batch_size])
            xb, yb = self.x[idx], self.y[idx]
            pulled = self._fanout("pull", [(self.worker, self.clock)] * len(self.servers))
            self.layout.scatter_params(self.model, np.concatenate([p for _, _, p in pulled]))
            loss, logits = self.forward_backward(self.model, self.loss_fn, self.be.asarray(xb), self.be.asarray(yb),
                                            f"in worker {self.worker} at step {self.clock}")
            grad = self.be.to_numpy(self.layout.gather_grads(self.model))
            self._fanout("push", [(self.worker, self.clock, v, m, grad[lo:hi], loss)
                                  for (v, m, _), (lo, hi) in zip(pulled, self.bounds)])
            self.acks = [a + 1 for a in self.acks]
            self.clock += 1
            loss_sum += loss * len(yb)
            correct += int((self.be.to_numpy(logits).argmax(axis=1) == yb).sum())
        self._fanout("finish_epoch", [(self.worker, self.clock)] * len(self.servers))
        return {"worker": self.worker, "steps": steps, "images": steps * batch_size, "loss_sum": loss_sum,
                "correct": correct, "seconds": time.perf_counter() - t0, "acks": list(self.acks)}


# ---------------------------------------------------------------------------------------------
# the report


@dataclass
class PSReport:
    workers: int
    servers: int
    consistency: str
    history: object                                    # dnnpar.train.History (per-epoch records)
    staleness: dict = field(default_factory=dict)      # clocks -> gradients applied with that staleness
    update_lag: dict = field(default_factory=dict)     # updates applied between pull and push -> count
    updates_per_shard: list = field(default_factory=list)
    shard_sizes: list = field(default_factory=list)
    images_per_s: float = 0.0
    wall_s: float = 0.0
    dead_workers: list = field(default_factory=list)
    server_restarts: list = field(default_factory=list)    # per shard
    lost_updates: list = field(default_factory=list)       # per shard; None where a worker died (unknown)
    run_dir: str = ""        # the shards' checkpoints during the run (removed when it ends)

    @property
    def final_accuracy(self) -> float:
        return self.history.records[-1].test_acc if self.history.records else float("nan")

    @property
    def max_staleness(self) -> int:
        return max(self.staleness) if self.staleness else 0

    def staleness_text(self) -> str:
        return render_histogram(self.staleness, "staleness")

    def render(self) -> str:
        lines = [f"parameter server: {self.workers} workers, {self.servers} shards {self.shard_sizes}, "
                 f"consistency {self.consistency}",
                 f"final test accuracy {100 * self.final_accuracy:.2f}%, {self.images_per_s:,.0f} images/s, "
                 f"wall {self.wall_s:.1f} s",
                 f"updates applied per shard: {self.updates_per_shard}"]
        if self.dead_workers:
            lines.append(f"workers died: {self.dead_workers} (the rest of their epoch was dropped; later epochs "
                         "were split over the survivors)")
        if any(self.server_restarts):
            lines.append(f"server restarts per shard: {self.server_restarts}; updates lost (acknowledged but "
                         f"not in the restored checkpoint): {self.lost_updates}")
        lines.append("gradient staleness in clocks (the update's clock minus the slowest clock it was computed from):")
        lines.append(self.staleness_text())
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Ray connection


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError("the parameter server needs Ray: pip install dnnpar[dist]") from e
    return ray


def ray_temp_dir(out=print) -> str:
    """Where a local Ray keeps its session: ``cache_dir("ray")``, or a short folder under the
    system temp dir when that path would make Ray's unix socket paths too long."""
    from ..backend.sources import cache_dir

    root = Path(os.environ.get("DNNPAR_CACHE", Path.home() / ".cache" / "dnnpar")) / "ray"
    if len(str(root)) <= MAX_RAY_TEMP_DIR:
        return str(cache_dir("ray"))
    short = Path(tempfile.gettempdir()) / f"dnnpar-ray-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    short.mkdir(parents=True, exist_ok=True)
    out(f"note: {root} is too long for Ray's socket paths ({len(str(root))} > {MAX_RAY_TEMP_DIR} characters); "
        f"using {short} for Ray's session files")
    return str(short)


def check_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail fast (ConnectionError) when ``host:port`` or ``ray://host:port`` does not answer TCP."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\]\s]+?)\]?:(\d+)", address.strip())
    if not m:
        if address.strip() == "auto":
            return
        raise ValueError(f"Ray address {address!r}: expected 'host:port', 'ray://host:port' or 'auto'")
    host, port = m.group(1), int(m.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        which = ("Ray client server port (10001 by default)" if address.strip().startswith("ray://")
                 else "GCS port (6379 by default)")
        raise ConnectionError(
            f"no Ray cluster answers at {address} ({e}; waited {timeout:g} s). Check that `ray start --head` "
            f"runs on {host}, that {port} is its {which}, and that no firewall blocks it") from None


def connect(address: str | None = None, out=print) -> bool:
    """Start a local Ray (address None) or join the cluster at ``address``; nothing when Ray is
    already initialized in this process. Returns True when this call started or joined it (the
    caller then shuts it down)."""
    ray = _import_ray()
    if address is not None:
        check_address(address)
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(_temp_dir=ray_temp_dir(out), include_dashboard=False, log_to_driver=False,
                 logging_level="warning")
    else:
        try:
            ray.init(address=address, log_to_driver=False, logging_level="warning")
        except (ConnectionError, RuntimeError) as e:
            raise ConnectionError(
                f"could not join the Ray cluster at {address}: {e}\nCheck that it is a Ray head node of the same "
                "Ray version, and, where the cluster uses token authentication, that this machine has its token "
                "(RAY_AUTH_TOKEN or ~/.ray/auth_token) and RAY_AUTH_MODE=token") from e
        nodes = [nd for nd in ray.nodes() if nd.get("Alive")]
        out(f"joined the Ray cluster at {address}: {len(nodes)} node(s), "
            f"{ray.cluster_resources().get('CPU', 0):g} CPUs")
    return True


# ---------------------------------------------------------------------------------------------
# the driver


class _Faults:
    """The driver's fault injection: SIGKILL a worker or a server process once it got far enough."""

    def __init__(self, fail: dict | None, workers: int, servers: int):
        fail = dict(fail or {})
        self.worker = fail.pop("worker", None)
        self.after_steps = fail.pop("after_steps", 20)
        self.server = fail.pop("server", None)
        self.after_updates = fail.pop("after_updates", 30)
        if fail:
            raise ValueError(f"fail: unknown keys {sorted(fail)}; use worker/after_steps or server/after_updates")
        if self.worker is not None and not 0 <= self.worker < workers:
            raise ValueError(f"fail: worker {self.worker} is not in 0..{workers - 1}")
        if self.server is not None and not 0 <= self.server < servers:
            raise ValueError(f"fail: server {self.server} is not in 0..{servers - 1}")
        self.worker_done = self.server_done = False

    def check(self, clocks: list, versions: dict, worker_pids: list, server_pids: list, out) -> None:
        if self.worker is not None and not self.worker_done and clocks[self.worker] >= self.after_steps:
            os.kill(worker_pids[self.worker], signal.SIGKILL)
            self.worker_done = True
            out(f"fault injection: SIGKILL worker {self.worker} (pid {worker_pids[self.worker]}) "
                f"after {clocks[self.worker]} steps")
        if (self.server is not None and not self.server_done
                and versions.get(self.server, -1) >= self.after_updates):
            os.kill(server_pids[self.server], signal.SIGKILL)
            self.server_done = True
            out(f"fault injection: SIGKILL server {self.server} (pid {server_pids[self.server]}) "
                f"after {versions[self.server]} updates")


def _call_server(ray, server, method: str, *args, retry_s: float = RETRY_SECONDS):
    from ray.exceptions import RayActorError

    deadline = time.monotonic() + retry_s
    while True:
        try:
            return ray.get(getattr(server, method).remote(*args), timeout=retry_s)
        except RayActorError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _watch_raylet(ray, on_loss):
    """Watch this process's local raylet, if it started one; when it dies, call ``on_loss`` with
    a one-line message (from a watcher thread: Ray's driver exits on its own a few seconds after
    its raylet, with nothing but Ray's log, so the caller must say what happened first). Returns
    the Event that stops the watch (set it before ``ray.shutdown``, which ends the raylet), or None."""
    import threading

    node = getattr(getattr(ray, "_private", None) and ray._private.worker, "_global_node", None)
    procs = getattr(node, "all_processes", {}).get("raylet") if node is not None else None
    if not procs or getattr(procs[0], "process", None) is None:
        return None
    proc, stop = procs[0].process, threading.Event()

    def watch():
        while not stop.wait(0.25):
            if proc.poll() is not None:
                code = proc.returncode
                how = (f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
                       else f"exited with code {code}")
                on_loss(f"parameter server: Ray's raylet (pid {proc.pid}) {how}; the workers and shards it ran "
                        "are gone, so the run stops")
                return

    threading.Thread(target=watch, name="dnnpar-raylet-watch", daemon=True).start()
    return stop


def _first_line(e) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def _task_cause(e, who: str) -> BaseException:
    """The exception a Ray task raised, as itself where it is one of dnnpar's documented kinds
    (a FloatingPointError from a diverging worker, say); else a ParallelError naming ``who``."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, (ValueError, FloatingPointError, TimeoutError, ConnectionError, OSError, ParallelError)):
        return cause
    what = f"{type(cause).__name__}: {cause}" if cause is not None else _first_line(e)
    return ParallelError(f"{who} failed: {_first_line(what)}", str(e))


def run_parameter_server(cfg, workers: int, servers: int, consistency: str = "asp", address: str | None = None,
                         out=print, data=None, fail: dict | None = None, checkpoint_every: int = 50,
                         progress: bool = True, on_cluster_loss=None):
    """Train ``cfg.model`` with ``workers`` Ray worker actors and ``servers`` parameter shards.

    ``consistency``: "bsp" | "asp" | "ssp:S". ``address``: None starts a local Ray (session files
    under ``cache_dir("ray")``); else the cluster to join ("host:port", "ray://host:port",
    "auto"). When Ray is already initialized in this process it is used as it is and left running.
    ``data``: a loaded Dataset (default ``cfg.subset`` through ``cfg.data_dir``). ``fail``: fault
    injection (see the module docstring). ``on_cluster_loss``: called (from a watcher thread) with
    a one-line message when the local raylet this process started dies; the CLI prints it and
    exits, since Ray's driver exits by itself soon after. Returns ``(model, PSReport)``: the model
    holds the servers' final parameters. A run whose workers all died, or whose Ray cluster
    failed, raises ParallelError; a worker's own error (a diverging loss) is raised as itself."""
    from .. import backend as _backend
    from ..data import fashion_mnist
    from ..nn.optim import make_schedule
    from ..train import EpochRecord, History, ProgressBar, build_model, evaluate
    from .flat import ParamLayout

    cfg.validate()
    mode = parse_consistency(consistency)
    if cfg.backend not in (None, "numpy"):
        raise ValueError(f"the parameter server trains on the numpy backend (its actors get no GPU); "
                         f"got backend {cfg.backend!r}")
    _import_ray()
    if workers < 1 or servers < 1:
        raise ValueError(f"need at least 1 worker and 1 server, got workers={workers}, servers={servers}")
    if checkpoint_every < 1:
        raise ValueError(f"checkpoint_every must be >= 1, got {checkpoint_every}")
    if cfg.nesterov:
        raise ValueError("the parameter server's shards apply plain momentum SGD; Nesterov is not implemented "
                         "there (drop --nesterov)")
    with _backend.use_backend("numpy"):
        model = build_model(cfg)
    layout = ParamLayout(model)
    bounds = shard_bounds(layout.size, servers)
    faults = _Faults(fail, workers, servers)
    data = data or fashion_mnist.load(cfg.data_dir, cfg.subset)
    n = len(data.y_train)
    if workers > n // cfg.batch_size:
        raise ValueError(f"{workers} workers but only {n // cfg.batch_size} full batches of {cfg.batch_size} "
                         f"per epoch ({n} training images): every worker needs at least one batch")
    ray = _import_ray()
    started = connect(address, out)
    from ..backend.sources import cache_dir

    run_dir = cache_dir("ps") / f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    run_dir.mkdir(parents=True)
    actors = []
    watch = _watch_raylet(ray, on_cluster_loss) if on_cluster_loss is not None else None
    try:
        t_start = time.perf_counter()
        init = layout.gather_params(model, out=np.empty(layout.size, np.float32))
        schedule = make_schedule(cfg.schedule, cfg.lr, cfg.epochs)
        Server = ray.remote(ShardServer).options(num_cpus=0, max_restarts=5, max_task_retries=0,
                                                 max_concurrency=1000)
        shards = [Server.remote(k, hi - lo, schedule(0), cfg.momentum, cfg.weight_decay, mode.bound, workers,
                                str(run_dir / f"shard-{k}.npz"), checkpoint_every)
                  for k, (lo, hi) in enumerate(bounds)]
        actors += shards
        x_ref, y_ref = ray.put(data.x_train), ray.put(data.y_train)
        Worker = ray.remote(PSWorker).options(num_cpus=0, max_restarts=0)
        procs = [Worker.remote(w, cfg.model, cfg.seed, "numpy", shards, bounds, x_ref, y_ref)
                 for w in range(workers)]
        actors += procs
        worker_pids = ray.get([p.pid.remote() for p in procs], timeout=120)
        server_pids = ray.get([s.pid.remote() for s in shards], timeout=120)
        ray.get([s.initialize.remote(init[lo:hi]) for s, (lo, hi) in zip(shards, bounds)], timeout=120)
        out(f"parameter server: {workers} workers, {servers} shards of {[hi - lo for lo, hi in bounds]} floats, "
            f"consistency {mode}, {model.name} ({layout.size:,} parameters) on {data!r}; run dir {run_dir}")
        history, alive, dead = History(), list(range(workers)), []
        acks = {w: [0] * servers for w in range(workers)}
        out(history.table_header())
        train_seconds, train_images = 0.0, 0
        for epoch in range(1, cfg.epochs + 1):
            lr = schedule(epoch - 1)
            for s in shards:
                _call_server(ray, s, "set_lr", lr, len(alive))
                _call_server(ray, s, "reset_loss")
            order = np.random.default_rng([cfg.seed, epoch]).permutation(n)
            # the global batch of one clock stays workers * batch_size: survivors of a dead worker
            # take larger batches, so a clock (and an epoch) means the same with fewer workers
            batch = (cfg.batch_size * workers) // len(alive)
            part = n // len(alive)
            steps = part // batch
            pending = {procs[w].run_epoch.remote(order[i * part:i * part + steps * batch], batch): w
                       for i, w in enumerate(alive)}
            bar = ProgressBar(steps * len(alive), f"epoch {epoch}/{cfg.epochs}", enabled=progress)
            t0, results, clock0 = time.perf_counter(), [], None
            last_total, last_change = None, time.monotonic()
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
                for ref in ready:
                    w = pending.pop(ref)
                    try:
                        results.append(ray.get(ref))
                        acks[w] = results[-1]["acks"]
                    except ray.exceptions.RayTaskError as e:
                        # the worker raised (diverged, gave up on a dead server): not a death; its own
                        # exception, without Ray's remote traceback around it
                        raise _task_cause(e, f"parameter server worker {w}") from None
                    except ray.exceptions.RayActorError:
                        dead.append(w)
                        alive.remove(w)
                        out(f"worker {w} died during epoch {epoch}; the others go on without it")
                        for s in shards:
                            _call_server(ray, s, "retire", w)
                            _call_server(ray, s, "set_lr", lr, len(alive))
                if ready and not pending:
                    break
                versions, clocks, loss = {}, None, float("nan")
                for k, s in enumerate(shards):   # progress and fault triggers; a restarting shard is skipped
                    try:
                        p = ray.get(s.progress.remote(), timeout=1.0)
                    except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
                        continue
                    versions[k] = p["version"]
                    clocks, loss = clocks or p["clocks"], p["loss"] if k == 0 else loss
                total = sum(versions.values())
                if total != last_total:
                    last_total, last_change = total, time.monotonic()
                elif time.monotonic() - last_change > STALL_SECONDS:  # never a silent hang
                    raise TimeoutError(
                        f"parameter server: no update applied for {STALL_SECONDS:g} s in epoch {epoch} (workers "
                        f"{sorted(pending.values())} still running, shard versions {versions}); a worker may wait "
                        "on a restarted shard for a clock it will not send again (DNNPAR_PS_STALL_SECONDS)")
                if clocks is not None:
                    clock0 = clock0 if clock0 is not None else min(clocks[w] for w in alive)
                    faults.check(clocks, versions, worker_pids, server_pids, out)
                    bar.update(min(sum(max(0, clocks[w] - clock0) for w in alive), steps * len(alive)), loss)
            seconds = time.perf_counter() - t0
            done = sum(r["loss_sum"] for r in results) / max(1, sum(r["images"] for r in results))
            bar.update(bar.total, done)
            images = sum(r["images"] for r in results)
            train_seconds, train_images = train_seconds + seconds, train_images + images
            vec = np.concatenate([_call_server(ray, s, "snapshot") for s in shards])
            layout.scatter_params(model, vec)
            with _backend.use_backend("numpy"):
                test_acc = evaluate(model, data.x_test, data.y_test)
            seen = max(images, 1)
            rec = EpochRecord(epoch, lr, sum(r["loss_sum"] for r in results) / seen,
                              sum(r["correct"] for r in results) / seen, test_acc, images / seconds, seconds)
            history.records.append(rec)
            out(history.row(rec))
            if not alive:
                raise ParallelError(f"parameter server: every worker died by epoch {epoch} ({len(dead)} of {workers} "
                                    "killed or lost); nothing is left to train")
        stats = [_call_server(ray, s, "stats") for s in shards]
        staleness, lag = Counter(), Counter()
        for st in stats:
            staleness.update({int(k): v for k, v in st["staleness"].items()})
            lag.update({int(k): v for k, v in st["lag"].items()})
        # acknowledged pushes per shard: the survivors' counts plus what dead workers had acknowledged
        # by their last finished epoch (their last epoch's acks are unknown, so lost updates are
        # only counted exactly where no worker died)
        acked = [sum(acks[w][k] for w in acks) for k in range(servers)]
        versions = [st["version"] for st in stats]
        report = PSReport(workers, servers, str(mode), history, dict(sorted(staleness.items())),
                          dict(sorted(lag.items())), versions, [hi - lo for lo, hi in bounds],
                          train_images / max(train_seconds, 1e-9), time.perf_counter() - t_start, dead,
                          [st["restarts"] for st in stats],
                          [None if dead else max(0, a - v) for a, v in zip(acked, versions)], str(run_dir))
        out(report.render())
        return model, report
    except ray.exceptions.RayTaskError as e:
        raise _task_cause(e, "parameter server") from None
    except ray.exceptions.RayError as e:   # the raylet, GCS or an actor's node went away
        raise ParallelError(f"parameter server: the Ray cluster failed ({type(e).__name__}: "
                            f"{_first_line(e)}); Ray's own logs are in its session folder", str(e)) from None
    finally:
        if watch is not None:
            watch.set()
        for a in actors:
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        shutil.rmtree(run_dir, ignore_errors=True)   # the checkpoints only serve restarts within the run
        if started:
            ray.shutdown()
