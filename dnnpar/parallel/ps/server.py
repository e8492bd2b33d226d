"""One server shard of the parameter vector (a Ray asyncio actor): momentum SGD on pushes,
the clock table that BSP / SSP pulls wait on, staleness counts, and its atomic checkpoint.
"""
from __future__ import annotations

import asyncio
import os
from collections import Counter
from pathlib import Path

import numpy as np

def _save_npz_atomic(path: Path, **arrays) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


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
