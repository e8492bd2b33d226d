"""The parameter server's driver: starts the shards and workers on Ray, runs the epochs,
retires dead workers, injects faults, and reports (:class:`PSReport`, inside the RunResult).
"""
from __future__ import annotations

import os
import shutil
import signal
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from ... import backend as _backend
from ...backend.sources import cache_dir
from ...data import fashion_mnist
from ...errors import ParallelError
from ...nn.optim import make_schedule
from ...reporting import CommStats, EpochRecord, History, ProgressBar, RunResult
from ...steps import build_model, evaluate
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
        comm_s, grad_bytes, worker_steps = 0.0, 0, 0   # over all workers' finished epochs
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
            comm_s += sum(r["comm_seconds"] for r in results)
            grad_bytes += sum(r["grad_bytes"] for r in results)
            worker_steps += sum(r["steps"] for r in results)
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
        # a worker pushes its whole gradient as dense float32 slices each step (no indices) and
        # computes nothing meanwhile: all of its pull / push time is exposed
        per_worker = comm_s / workers
        comm = CommStats(grad_bytes / max(worker_steps, 1), 4 * layout.size, per_worker, per_worker,
                         worker_steps // workers)
        return RunResult(model, history, "ps", comm, report.wall_s, report,
                         {"workers": workers, "servers": servers, "consistency": str(mode),
                          "max_staleness": report.max_staleness, "dead_workers": dead})
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
