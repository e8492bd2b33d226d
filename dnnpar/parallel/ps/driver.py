"""The parameter server's driver: starts the shards and workers on Ray, runs the epochs,
retires dead workers, injects faults, and reports (:class:`PSReport`, inside the RunResult).
"""
from __future__ import annotations

import os
import shutil
import signal
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ...backend.sources import cache_dir
from ...engine import EpochStats, Strategy, run
from ...errors import ParallelError
from ...reporting import CommStats, ProgressBar, RunResult
from ..flat import ParamLayout
from .cluster import _call_server, _import_ray, _watch_raylet, connect
from .consistency import parse_consistency, render_histogram, shard_bounds
from .server import ShardServer
from .worker import PSWorker

#: the driver gives up, with an error, when no shard applied an update for this long
STALL_SECONDS = float(os.environ.get("DNNPAR_PS_STALL_SECONDS", "300"))


@dataclass
class PSReport:
    workers: int
    servers: int
    consistency: str
    history: object                                    # dnnpar.reporting.History (per-epoch records)
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


class ParameterServer(Strategy):
    """The engine's strategy ``"ps"``: the epochs run in Ray worker actors against sharded
    server actors; the driver sets each epoch's learning rate, watches progress, faults and
    stalls, retires dead workers, and evaluates the shards' assembled parameters."""

    name = "ps"
    backend = "numpy"       # the actors get no GPU
    resumable = False       # momentum lives in the shards, which end with the run

    def __init__(self, workers: int, servers: int, consistency: str = "asp", address: str | None = None,
                 fail: dict | None = None, checkpoint_every: int = 50, on_cluster_loss=None):
        self.mode = parse_consistency(consistency)
        self.workers, self.servers, self.address, self.fail = workers, servers, address, fail
        self.checkpoint_every, self.on_cluster_loss = checkpoint_every, on_cluster_loss
        self.actors, self.started, self.watch, self.run_dir = [], False, None, None
        self.comm_s, self.grad_bytes, self.worker_steps, self.summary = 0.0, 0, 0, None

    def check(self, cfg) -> None:
        _import_ray()
        if self.workers < 1 or self.servers < 1:
            raise ValueError(f"need at least 1 worker and 1 server, got workers={self.workers}, "
                             f"servers={self.servers}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if cfg.nesterov:
            raise ValueError("the parameter server's shards apply plain momentum SGD; Nesterov is not implemented "
                             "there (drop --nesterov)")

    def prepare(self, cfg, model, data) -> None:
        self.layout = ParamLayout(model)
        self.bounds = shard_bounds(self.layout.size, self.servers)
        self.faults = _Faults(self.fail, self.workers, self.servers)
        n = len(data.y_train)
        if self.workers > n // cfg.batch_size:
            raise ValueError(f"{self.workers} workers but only {n // cfg.batch_size} full batches of "
                             f"{cfg.batch_size} per epoch ({n} training images): every worker needs at least one batch")
        self.cfg, self.data, self.n = cfg, data, n

    def make_optimizer(self, cfg, model):
        return None   # the shards apply the updates

    def start(self, model, optimizer, start_epoch: int, out) -> int:
        cfg, workers, bounds = self.cfg, self.workers, self.bounds
        self.ray = ray = _import_ray()
        self.out, self.model = out, model
        self.started = connect(self.address, out)
        self.run_dir = cache_dir("ps") / (f"run-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}-"
                                          f"{time.monotonic_ns() % 10**6}")
        self.run_dir.mkdir(parents=True)
        if self.on_cluster_loss is not None:
            self.watch = _watch_raylet(ray, self.on_cluster_loss)
        init = self.layout.gather_params(model, out=np.empty(self.layout.size, np.float32))
        Server = ray.remote(ShardServer).options(num_cpus=0, max_restarts=5, max_task_retries=0,
                                                 max_concurrency=1000)
        self.shards = [Server.remote(k, hi - lo, cfg.lr, cfg.momentum, cfg.weight_decay, self.mode.bound, workers,
                                     str(self.run_dir / f"shard-{k}.npz"), self.checkpoint_every)
                       for k, (lo, hi) in enumerate(bounds)]
        self.actors += self.shards
        x_ref, y_ref = ray.put(self.data.x_train), ray.put(self.data.y_train)
        Worker = ray.remote(PSWorker).options(num_cpus=0, max_restarts=0)
        self.procs = [Worker.remote(w, cfg.model, cfg.seed, "numpy", self.shards, bounds, x_ref, y_ref)
                      for w in range(workers)]
        self.actors += self.procs
        self.worker_pids = ray.get([p.pid.remote() for p in self.procs], timeout=120)
        self.server_pids = ray.get([s.pid.remote() for s in self.shards], timeout=120)
        ray.get([s.initialize.remote(init[lo:hi]) for s, (lo, hi) in zip(self.shards, bounds)], timeout=120)
        self.alive, self.dead = list(range(workers)), []
        self.acks = {w: [0] * self.servers for w in range(workers)}
        return start_epoch

    def describe(self) -> str:
        return (f"parameter server: {self.workers} workers, {self.servers} shards of "
                f"{[hi - lo for lo, hi in self.bounds]} floats, consistency {self.mode}; run dir {self.run_dir}")

    def _epoch_shape(self) -> tuple[int, int, int]:
        """(batch, part, steps) of each live worker: the global batch of one clock stays
        workers * batch_size, so survivors of a dead worker take larger batches and a clock (and an
        epoch) means the same with fewer workers."""
        batch = (self.cfg.batch_size * self.workers) // len(self.alive)
        part = self.n // len(self.alive)
        return batch, part, part // batch

    def steps_per_epoch(self) -> int:
        return self._epoch_shape()[2] * len(self.alive)

    def train_epoch(self, epoch: int, lr: float, bar: ProgressBar) -> EpochStats:
        ray, shards, procs, alive, out = self.ray, self.shards, self.procs, self.alive, self.out
        for s in shards:
            _call_server(ray, s, "set_lr", lr, len(alive))
            _call_server(ray, s, "reset_loss")
        order = np.random.default_rng([self.cfg.seed, epoch]).permutation(self.n)
        batch, part, steps = self._epoch_shape()
        pending = {procs[w].run_epoch.remote(order[i * part:i * part + steps * batch], batch): w
                   for i, w in enumerate(alive)}
        results, clock0 = [], None
        last_total, last_change = None, time.monotonic()
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.25)
            for ref in ready:
                w = pending.pop(ref)
                try:
                    results.append(ray.get(ref))
                    self.acks[w] = results[-1]["acks"]
                except ray.exceptions.RayTaskError as e:
                    # the worker raised (diverged, gave up on a dead server): not a death; its own
                    # exception, without Ray's remote traceback around it
                    raise _task_cause(e, f"parameter server worker {w}") from None
                except ray.exceptions.RayActorError:
                    self.dead.append(w)
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
                self.faults.check(clocks, versions, self.worker_pids, self.server_pids, out)
                bar.update(min(sum(max(0, clocks[w] - clock0) for w in alive), bar.total), loss)
        self.comm_s += sum(r["comm_seconds"] for r in results)
        self.grad_bytes += sum(r["grad_bytes"] for r in results)
        self.worker_steps += sum(r["steps"] for r in results)
        # the model the driver evaluates: the shards assembled
        self.layout.scatter_params(self.model, np.concatenate([_call_server(ray, s, "snapshot") for s in shards]))
        return EpochStats(sum(r["images"] for r in results), sum(r["loss_sum"] for r in results),
                          sum(r["correct"] for r in results))

    def end_epoch(self, epoch: int) -> None:
        if not self.alive:
            raise ParallelError(f"parameter server: every worker died by epoch {epoch} ({len(self.dead)} of "
                                f"{self.workers} killed or lost); nothing is left to train")

    def finish(self, model):
        """The shards' figures, while they live (:meth:`details` assembles the PSReport)."""
        stats = [_call_server(self.ray, s, "stats") for s in self.shards]
        staleness, lag = Counter(), Counter()
        for st in stats:
            staleness.update({int(k): v for k, v in st["staleness"].items()})
            lag.update({int(k): v for k, v in st["lag"].items()})
        # acknowledged pushes per shard: the survivors' counts plus what dead workers had acknowledged
        # by their last finished epoch (their last epoch's acks are unknown, so lost updates are
        # only counted exactly where no worker died)
        acked = [sum(self.acks[w][k] for w in self.acks) for k in range(self.servers)]
        versions = [st["version"] for st in stats]
        self.summary = dict(staleness=dict(sorted(staleness.items())), lag=dict(sorted(lag.items())),
                            versions=versions, restarts=[st["restarts"] for st in stats],
                            lost=[None if self.dead else max(0, a - v) for a, v in zip(acked, versions)])
        return model

    def close(self) -> None:
        if self.watch is not None:
            self.watch.set()
        for a in self.actors:
            try:
                self.ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead
                pass
        if self.run_dir is not None:
            shutil.rmtree(self.run_dir, ignore_errors=True)   # the checkpoints only serve restarts within the run
        if self.started:
            self.ray.shutdown()

    def comm_stats(self) -> CommStats:
        # a worker pushes its whole gradient as dense float32 slices each step (no indices) and
        # computes nothing meanwhile: all of its pull / push time is exposed
        per_worker = self.comm_s / self.workers
        return CommStats(self.grad_bytes / max(self.worker_steps, 1), 4 * self.layout.size, per_worker, per_worker,
                         self.worker_steps // self.workers)

    def details(self, history):
        sm = self.summary or dict(staleness={}, lag={}, versions=[], restarts=[], lost=[])
        return PSReport(self.workers, self.servers, str(self.mode), history, sm["staleness"], sm["lag"],
                        sm["versions"], [hi - lo for lo, hi in self.bounds], history.images_per_s(), 0.0,
                        list(self.dead), sm["restarts"], sm["lost"], str(self.run_dir))

    def report_extra(self) -> dict:
        return {"workers": self.workers, "servers": self.servers, "consistency": str(self.mode),
                "max_staleness": max(self.summary["staleness"]) if self.summary and self.summary["staleness"] else 0,
                "dead_workers": list(self.dead)}


def run_parameter_server(cfg, workers: int, servers: int, consistency: str = "asp", address: str | None = None,
                         out=print, data=None, fail: dict | None = None, checkpoint_every: int = 50,
                         progress: bool = True, on_cluster_loss=None, **run_kwargs) -> RunResult:
    """Train ``cfg.model`` with ``workers`` Ray worker actors and ``servers`` parameter shards.

    ``consistency``: "bsp" | "asp" | "ssp:S". ``address``: None starts a local Ray (session files
    under ``cache_dir("ray")``); else the cluster to join ("host:port", "ray://host:port",
    "auto"). When Ray is already initialized in this process it is used as it is and left running.
    ``data``: a loaded Dataset (default ``cfg.subset`` through ``cfg.data_dir``). ``fail``: fault
    injection (see the module docstring). ``on_cluster_loss``: called (from a watcher thread) with
    a one-line message when the local raylet this process started dies; the CLI prints it and
    exits, since Ray's driver exits by itself soon after. Returns a :class:`~dnnpar.reporting.RunResult`: its model
    holds the servers' final parameters, its ``details`` is the :class:`PSReport`. A run whose workers all died, or whose Ray cluster
    failed, raises ParallelError; a worker's own error (a diverging loss) is raised as itself."""
    strategy = ParameterServer(workers, servers, consistency, address, fail, checkpoint_every, on_cluster_loss)
    try:
        result = run(strategy, cfg, out=out, data=data, progress=progress, **run_kwargs)
    except Exception as e:
        ray = sys.modules.get("ray")
        if ray is None or not isinstance(e, ray.exceptions.RayError):
            raise
        if isinstance(e, ray.exceptions.RayTaskError):
            raise _task_cause(e, "parameter server") from None
        # the raylet, GCS or an actor's node went away
        raise ParallelError(f"parameter server: the Ray cluster failed ({type(e).__name__}: "
                            f"{_first_line(e)}); Ray's own logs are in its session folder", str(e)) from None
    result.details.wall_s = result.wall_s
    out(result.details.render())
    return result
