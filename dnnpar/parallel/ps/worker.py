"""A parameter-server worker (a Ray actor): a whole model; each step pulls every shard,
computes one mini-batch's gradient and pushes each slice to its shard.
"""
from __future__ import annotations

import os
import time

import numpy as np

from ... import backend as _backend
from ...nn import SoftmaxCrossEntropy
from ...steps import TrainConfig, build_model, forward_backward
from ..flat import ParamLayout
from .cluster import RETRY_SECONDS

class PSWorker:
    """A whole model and the training data; trains one epoch's part per :meth:`run_epoch` call."""

    def __init__(self, worker: int, model_name: str, seed: int, backend: str, servers: list,
                 bounds: list, x: np.ndarray, y: np.ndarray):
        _backend.set_backend(backend)
        self.be = _backend.get_backend()
        self.worker, self.servers, self.bounds = worker, servers, bounds
        self.model = build_model(TrainConfig(model=model_name, seed=seed))
        self.model.train()
        self.layout = ParamLayout(self.model)
        self.loss_fn = SoftmaxCrossEntropy()
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
        t0, loss_sum, correct, comm = time.perf_counter(), 0.0, 0, 0.0
        for i in range(steps):
            idx = np.sort(indices[i * batch_size:(i + 1) * batch_size])
            xb, yb = self.x[idx], self.y[idx]
            tc = time.perf_counter()
            pulled = self._fanout("pull", [(self.worker, self.clock)] * len(self.servers))
            comm += time.perf_counter() - tc
            self.layout.scatter_params(self.model, np.concatenate([p for _, _, p in pulled]))
            loss, logits = self.forward_backward(self.model, self.loss_fn, self.be.asarray(xb), self.be.asarray(yb),
                                            f"in worker {self.worker} at step {self.clock}")
            grad = self.be.to_numpy(self.layout.gather_grads(self.model))
            tc = time.perf_counter()
            self._fanout("push", [(self.worker, self.clock, v, m, grad[lo:hi], loss)
                                  for (v, m, _), (lo, hi) in zip(pulled, self.bounds)])
            comm += time.perf_counter() - tc
            self.acks = [a + 1 for a in self.acks]
            self.clock += 1
            loss_sum += loss * len(yb)
            correct += int((self.be.to_numpy(logits).argmax(axis=1) == yb).sum())
        self._fanout("finish_epoch", [(self.worker, self.clock)] * len(self.servers))
        return {"worker": self.worker, "steps": steps, "images": steps * batch_size, "loss_sum": loss_sum,
                "correct": correct, "seconds": time.perf_counter() - t0, "comm_seconds": comm,
                "grad_bytes": steps * int(grad.nbytes) if steps else 0, "acks": list(self.acks)}
