"""The training engine: one epoch driver for every strategy (PyTorch Lightning's shape: one
loop, strategies plugged in).

:func:`run` owns what every run does the same way: the backend of the run, loading the data,
building the model, the optimizer, ``--resume``, the learning-rate schedule, the progress bar,
the epoch records and table, the finite-loss check, evaluation, a checkpoint after every epoch,
the ``--plot`` file and the :class:`~dnnpar.reporting.RunResult`. A :class:`Strategy` owns how
one epoch's gradients are computed and applied:

- :class:`Local`: mini-batch SGD in this process;
- :class:`dnnpar.parallel.data_parallel.DataParallel`: a :class:`Local` whose steps shard each
  batch over the ranks and sum the gradients (only rank 0 prints, evaluates and writes files);
- Hogwild and the parameter server run their epochs in worker processes / actors and report
  their own figures (their strategies are listed in ``dnnpar.parallel``).

The protocol, in call order: ``check(cfg)`` (before any data is read), ``prepare(cfg, model,
data)`` (sizes, before any large allocation), ``make_optimizer(cfg, model)``, ``start(model,
optimizer, start_epoch, out)`` (returns the epoch to start from), ``describe()``,
then per epoch ``steps_per_epoch()``, ``train_epoch(epoch, lr, bar) -> EpochStats``,
``evaluate(model, x, y)`` and ``end_epoch(epoch)``; ``finish(model)`` returns the final model, ``comm_stats()`` the
communication figures, ``details(history)`` the strategy's own report; ``close()`` always runs.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import backend as _backend
from .checkpoint import load_training, save_training
from .data import fashion_mnist
from .nn import SoftmaxCrossEntropy
from .nn.optim import SGD, make_schedule
from .reporting import CommStats, EpochRecord, History, ProgressBar, RunResult, plot_history
from .steps import TrainConfig, build_model, evaluate, forward_backward


@dataclass
class EpochStats:
    """One epoch's training figures, summed over everything the strategy ran (all ranks / workers)."""
    seen: int
    loss_sum: float
    correct: int

    @property
    def loss(self) -> float:
        return self.loss_sum / self.seen if self.seen else float("nan")


def _quiet(*args, **kwargs) -> None:
    pass


class Strategy:
    """The base of every strategy: the defaults of a single process (see the module docstring)."""

    name = "local"
    #: the backend the strategy must run on (None: the run's); Hogwild and the PS need numpy
    backend: str | None = None
    #: whether ``--resume`` can continue a run of this strategy
    resumable = True

    @property
    def is_root(self) -> bool:
        """Whether this process prints, evaluates for the record and writes files."""
        return True

    def check(self, cfg: TrainConfig) -> None:
        """Refuse what the strategy cannot run, before any data is read."""

    def prepare(self, cfg: TrainConfig, model, data) -> None:
        """Refuse a model or data set the strategy cannot run, before any large allocation."""

    def make_optimizer(self, cfg: TrainConfig, model):
        return SGD(model, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay)

    def start(self, model, optimizer, start_epoch: int, out) -> int:
        return start_epoch

    def describe(self) -> str | None:
        return None

    def steps_per_epoch(self) -> int:
        raise NotImplementedError

    def train_epoch(self, epoch: int, lr: float, bar: ProgressBar) -> EpochStats:
        raise NotImplementedError

    def evaluate(self, model, x, y) -> float:
        return evaluate(model, x, y)

    def finish(self, model):
        return model

    def comm_stats(self) -> CommStats:
        return CommStats()

    def end_epoch(self, epoch: int) -> None:
        """After the epoch's record is printed (the parameter server stops here when no worker is left)."""

    def details(self, history):
        """The strategy's own report of the run (RunResult.details)."""
        return None

    def report_extra(self) -> dict:
        """Strategy-specific ``--report`` keys."""
        return {}

    def close(self) -> None:
        """After the run, whatever happened (processes, shared memory, clusters)."""


class Local(Strategy):
    """Mini-batch SGD in this process. Its step hooks (``micro_batches``, ``begin_step``,
    ``begin_micro``, ``finish_step``, ``reduce_stats``, ``global_batch``) are the places where
    synchronous data parallel shards the batch and sums the gradients."""

    def start(self, model, optimizer, start_epoch: int, out) -> int:
        self.model, self.opt, self.loss_fn = model, optimizer, SoftmaxCrossEntropy()
        return start_epoch

    def bind(self, cfg: TrainConfig, data) -> None:
        self.cfg, self.data = cfg, data

    # -- the step hooks (single process: one part, nothing to reduce)
    def global_batch(self, batch_size: int) -> int:
        return batch_size

    def micro_batches(self, xb, yb) -> list:
        return [(xb, yb, 1.0)]

    def begin_step(self, model, epoch: int | None = None) -> None:
        pass

    def begin_micro(self, share: float, last: bool) -> None:
        pass

    def finish_step(self) -> None:
        pass

    def reduce_stats(self, *values) -> list:
        return list(values)

    def comm_stats(self) -> CommStats:
        return CommStats(steps=getattr(self, "optimizer_steps", 0))   # one process sends nothing

    # -- the epoch
    def steps_per_epoch(self) -> int:
        return -(-len(self.data.y_train) // self.global_batch(self.cfg.batch_size))

    def train_epoch(self, epoch: int, lr: float, bar: ProgressBar) -> EpochStats:
        be, model, opt, data = _backend.get_backend(), self.model, self.opt, self.data
        opt.lr = lr
        model.train()
        seen, correct, loss_sum = 0, 0, 0.0
        for i, (xb, yb) in enumerate(fashion_mnist.batches(data.x_train, data.y_train,
                                                            self.global_batch(self.cfg.batch_size),
                                                            seed=self.cfg.seed, epoch=epoch), 1):
            parts = self.micro_batches(xb, yb)
            self.begin_step(model, epoch)
            for k, (x, y, share) in enumerate(parts):
                self.begin_micro(share, last=k == len(parts) - 1)
                if len(y):
                    loss, logits = forward_backward(model, self.loss_fn, be.asarray(x), be.asarray(y),
                                                    f"at epoch {epoch}, batch {i} (lr {opt.lr:g})")
                    correct += int((be.to_numpy(logits).argmax(axis=1) == y).sum())
                    seen += len(y)
                    loss_sum += loss * len(y)
            self.finish_step()   # data parallel: a rank with no samples adds zeros
            opt.step()
            self.optimizer_steps = getattr(self, "optimizer_steps", 0) + 1
            bar.update(i, loss_sum / max(seen, 1))
        be.synchronize()
        seen, loss_sum, correct = self.reduce_stats(seen, loss_sum, correct)
        return EpochStats(int(seen), float(loss_sum), int(correct))


def run(strategy: Strategy, cfg: TrainConfig, checkpoint=None, resume: bool = False, plot=None,
        progress: bool = True, out=print, data: fashion_mnist.Dataset | None = None, model=None,
        optimizer=None) -> RunResult:
    """Train ``cfg.model`` with ``strategy``; returns a :class:`~dnnpar.reporting.RunResult`.

    ``data``: a loaded Dataset (default ``cfg.subset`` through ``cfg.data_dir``); ``model``: a
    prebuilt model (default ``cfg.model`` built with ``cfg.seed``); ``optimizer``: a prebuilt
    optimizer with ``lr``, ``step()`` and ``state()`` (default: the strategy's, SGD from ``cfg``);
    ``checkpoint``: a file written after every epoch (``resume``: continued from it); ``plot``:
    a PNG of the curves. ``cfg.backend`` (or the strategy's own) is active for the run and the
    previous backend is restored afterwards. A loss that is not finite is a FloatingPointError."""
    cfg.validate()
    if strategy.backend is not None and cfg.backend not in (None, strategy.backend):
        raise ValueError(f"{strategy.name} trains on the {strategy.backend} backend; got backend {cfg.backend!r}")
    if resume and not strategy.resumable:
        raise ValueError(f"--resume is not supported with {strategy.name} (it continues a single-process or "
                         "data-parallel run)")
    strategy.check(cfg)
    backend = cfg.backend or strategy.backend
    if backend:
        with _backend.use_backend(backend):
            return _run(strategy, cfg, checkpoint, resume, plot, progress, out, data, model, optimizer)
    return _run(strategy, cfg, checkpoint, resume, plot, progress, out, data, model, optimizer)


def _run(strategy, cfg, checkpoint, resume, plot, progress, out, data, model, optimizer) -> RunResult:
    t_start = time.perf_counter()
    be = _backend.get_backend()
    data = data or fashion_mnist.load(cfg.data_dir, cfg.subset)
    if model is None:
        model = build_model(cfg)
    strategy.prepare(cfg, model, data)
    model.check_input(be.asarray(data.x_train[:1]))
    if isinstance(strategy, Local):
        strategy.bind(cfg, data)
    opt = optimizer or strategy.make_optimizer(cfg, model)
    schedule = make_schedule(cfg.schedule, cfg.lr, cfg.epochs)
    start_epoch, history = 1, History()
    root = strategy.is_root
    if resume and root:  # data parallel: rank 0 reads the checkpoint, start() hands it to the others
        if checkpoint is None or not Path(checkpoint).exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}")
        start_epoch, history = load_training(checkpoint, model, opt, cfg)
        out(f"resumed from {checkpoint} after epoch {start_epoch - 1}")
    if not root:
        out, progress, checkpoint, plot = _quiet, False, None, None
    try:
        start_epoch = strategy.start(model, opt, start_epoch, out)
        out(f"training {model.name} ({model.num_parameters():,} parameters) on {data!r}, backend '{be.name}'")
        what = strategy.describe()
        if what:
            out(what)
        out(history.table_header())
        for r in history.records:
            out(history.row(r))
        for epoch in range(start_epoch, cfg.epochs + 1):
            lr = schedule(epoch - 1)
            bar = ProgressBar(strategy.steps_per_epoch(), f"epoch {epoch}/{cfg.epochs}", enabled=progress)
            t0 = time.perf_counter()
            stats = strategy.train_epoch(epoch, lr, bar)
            seconds = time.perf_counter() - t0
            seen = max(stats.seen, 1)   # 0 only when every parameter-server worker died (end_epoch says so)
            loss = stats.loss_sum / seen
            bar.update(bar.total, loss)
            if not np.isfinite(loss):
                raise FloatingPointError(f"the mean loss of epoch {epoch} is {loss} (lr {lr:g}): training "
                                         "diverged; lower the learning rate")
            test_acc = strategy.evaluate(model, data.x_test, data.y_test)
            rec = EpochRecord(epoch, lr, loss, stats.correct / seen, test_acc, stats.seen / seconds, seconds)
            history.records.append(rec)
            out(history.row(rec))
            if checkpoint is not None:
                save_training(checkpoint, model, optimizer=opt, cfg=cfg, epoch=epoch, history=history)
            strategy.end_epoch(epoch)
        model = strategy.finish(model)
    finally:
        strategy.close()
    if plot:
        plot_history(history, plot)
        out(f"curves written to {plot}")
    return RunResult(model, history, strategy.name, strategy.comm_stats(), time.perf_counter() - t_start,
                     strategy.details(history), strategy.report_extra())
