"""Training: mini-batch SGD with a progress bar, a per-epoch table, atomic checkpoints and resume.

    dnnpar train --model lenet5 --epochs 15 --batch-size 64 --lr 0.01 --backend numpy
"""
from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from . import backend as _backend
from . import checkpoint
from .data import fashion_mnist
from .nn import SoftmaxCrossEntropy
from .nn.base import Graph
from .nn.fusion import fold_batchnorm
from .nn.models import build
from .nn.optim import SGD, make_schedule

@dataclass
class TrainConfig:
    model: str = "lenet5"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 0.01
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 5e-4
    schedule: str = "cosine"
    seed: int = 0
    subset: str = "full"
    data_dir: str | None = None
    backend: str | None = None
    data_file: str | None = None   # a --data set trained on (then subset and data_dir are unused)

    def validate(self):
        """ValueError / TypeError naming the first field out of range (before any data is read)."""
        for name in ("epochs", "batch_size", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise TypeError(f"{name} must be an integer, got {v!r}")
        if self.epochs < 1 or self.batch_size < 1:
            raise ValueError(f"epochs and batch size must be >= 1, got {self.epochs}, {self.batch_size}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")
        for name, lo, hi, what in (("lr", 0.0, None, "> 0"), ("momentum", 0.0, 1.0, "in [0, 1)"),
                                   ("weight_decay", 0.0, None, ">= 0")):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float, np.floating, np.integer)):
                raise TypeError(f"{name} must be a number, got {v!r}")
            try:
                v = float(v)
            except OverflowError:  # an int beyond float range
                v = float("inf")
            ok = np.isfinite(v) and v >= lo and (hi is None or v < hi) and (name != "lr" or v > 0)
            if not ok:
                raise ValueError(f"{name} must be a finite number {what}, got {v}")
        if self.schedule not in ("cosine", "step", "constant"):
            raise ValueError(f"schedule {self.schedule!r}: 'cosine', 'step' or 'constant'")
        if self.subset not in ("full", "embedded"):
            raise ValueError(f"subset {self.subset!r}: 'full' or 'embedded'")


@dataclass
class EpochRecord:
    epoch: int
    lr: float
    loss: float
    train_acc: float
    test_acc: float
    images_per_s: float
    seconds: float


@dataclass
class History:
    records: list = field(default_factory=list)

    def table_header(self) -> str:
        return f"{'epoch':>5} {'lr':>9} {'loss':>8} {'train acc':>10} {'test acc':>9} {'images/s':>9} {'time s':>7}"

    @staticmethod
    def row(r: EpochRecord) -> str:
        return (f"{r.epoch:>5} {r.lr:>9.5f} {r.loss:>8.4f} {100 * r.train_acc:>9.2f}% {100 * r.test_acc:>8.2f}% "
                f"{r.images_per_s:>9.0f} {r.seconds:>7.1f}")


# tqdm's default with the label's colon dropped: "epoch 2/10  50%|###   | 47/94 [...]"
BAR_FORMAT = "{desc} {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}{postfix}]"


class _LineStream:
    """A log file seen through tqdm: each redraw becomes one line (tqdm redraws with a carriage
    return, which a CI log shows as one long line)."""

    def __init__(self, stream):
        self.stream = stream

    def write(self, text: str) -> None:
        text = text.replace("\r", "").rstrip()
        if text:
            self.stream.write(text + "\n")

    def flush(self) -> None:
        self.stream.flush()


class ProgressBar:
    """Progress over the batches of an epoch on stderr, through ``tqdm.auto``: a widget in
    Jupyter, a bar redrawn in place on a terminal, about four milestone lines otherwise (CI
    logs). ``update(done, loss)`` takes the batches done so far and the running mean loss
    (None or NaN before the first one: no loss shown)."""

    def __init__(self, total: int, label: str, stream=None, enabled: bool = True):
        self.total, self.label, self.enabled = total, label, enabled
        self.bar = None
        if not enabled:
            return
        from tqdm.auto import tqdm

        stream = stream or sys.stderr
        tty = hasattr(stream, "isatty") and stream.isatty()
        # a log: a line at each quarter and the last, none at 0%
        kw = dict(file=stream, dynamic_ncols=True) if tty else dict(
            file=_LineStream(stream), mininterval=0, ncols=80, miniters=max(1, total // 4), delay=1e-6)
        self.bar = tqdm(total=total, desc=label, unit="batch", bar_format=BAR_FORMAT, **kw)

    def update(self, done: int, loss: float | None = None) -> None:
        if self.bar is None:
            return
        if loss is not None and np.isfinite(loss):
            self.bar.set_postfix_str(f"loss {loss:.4f}", refresh=False)
        done = min(int(done), self.total)
        if done > self.bar.n:
            self.bar.update(done - self.bar.n)
        if done >= self.total:
            self.close()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def build_model(cfg: TrainConfig):
    """``cfg.model`` built with ``cfg.seed`` for Fashion-MNIST (10 classes; the LeNets have 10 already)."""
    if cfg.model in ("lenet300", "lenet5"):
        return build(cfg.model, seed=cfg.seed)
    return build(cfg.model, seed=cfg.seed, num_classes=10)


def forward_backward(model, loss_fn, xb, yb, where: str = ""):
    """One mini-batch of backend arrays: forward, loss, backward (the layers' grads are filled).
    Returns (loss as a float, logits). A loss that is not finite is a FloatingPointError naming
    ``where`` (e.g. "at epoch 2, batch 17"), before the backward pass spreads it."""
    logits = model.forward(xb)
    loss = float(loss_fn(logits, yb))
    if not np.isfinite(loss):
        raise FloatingPointError(f"the loss became {loss} {where}: training diverged; lower the learning rate")
    model.backward(loss_fn.backward())
    return loss, logits


def predict(model, x: np.ndarray, batch_size: int = 1000) -> np.ndarray:
    """Class predictions (NumPy int64) in eval mode, Conv2d -> BatchNorm2d pairs folded into one
    convolution (:func:`dnnpar.nn.fusion.fold_batchnorm`, an inference copy); the model's mode is
    restored afterwards."""
    be = _backend.get_backend()
    was_training = model.training
    model.eval()
    try:
        fwd = fold_batchnorm(model) if isinstance(model, Graph) else model
        return np.concatenate([be.to_numpy(fwd.forward(be.asarray(x[s:s + batch_size]))).argmax(axis=1)
                               for s in range(0, len(x), batch_size)]) if len(x) else np.zeros(0, np.int64)
    finally:
        model.train(was_training)


def evaluate(model, x: np.ndarray, y: np.ndarray, batch_size: int = 1000) -> float:
    """Top-1 accuracy in eval mode."""
    return float((predict(model, x, batch_size) == y).mean()) if len(y) else 0.0


def save_checkpoint(path, model, opt, cfg: TrainConfig, epoch: int, history: History) -> None:
    """A training checkpoint: model, momentum, config, epoch and history (dnnpar.checkpoint)."""
    checkpoint.save_checkpoint(path, model, asdict(cfg), epoch, [asdict(r) for r in history.records], opt.state())


def load_checkpoint(path, model, opt, cfg: TrainConfig):
    """Restore model and optimizer; returns (next epoch, history). Refuses a checkpoint of another
    model or a corrupt file with a CheckpointError naming it."""
    meta = checkpoint.load_checkpoint(path, model, opt, expect_model=cfg.model)
    return meta.epoch + 1, History([EpochRecord(**r) for r in meta.history])


def plot_history(history: History, path=None):
    """Loss and accuracy curves; written to ``path`` as PNG when given. Returns the figure
    (matplotlib's object API: no global backend is switched, so notebooks keep inline plots)."""
    from matplotlib.figure import Figure

    e = [r.epoch for r in history.records]
    fig = Figure(figsize=(10, 3.6))
    a1, a2 = fig.subplots(1, 2)
    a1.plot(e, [r.loss for r in history.records], marker="o")
    a1.set(xlabel="epoch", ylabel="training loss", title="loss")
    a2.plot(e, [100 * r.train_acc for r in history.records], marker="o", label="train")
    a2.plot(e, [100 * r.test_acc for r in history.records], marker="s", label="test")
    a2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    a2.legend()
    for a in (a1, a2):
        a.grid(alpha=0.3)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=110)
    return fig


def train(cfg: TrainConfig, checkpoint=None, resume: bool = False, plot=None, progress: bool = True,
          out=print, data: fashion_mnist.Dataset | None = None, model=None, optimizer=None, parallel=None):
    """Train on Fashion-MNIST; returns (model, history).

    ``data``: a loaded :class:`Dataset` (default: ``cfg.subset`` found through ``cfg.data_dir``).
    ``model``: a prebuilt model (default: ``cfg.model`` built with ``cfg.seed``).
    ``optimizer``: a prebuilt optimizer with ``lr``, ``step()`` and ``state()`` (default: SGD from
    ``cfg``); Deep Compression retrains with masked SGD and with centroid SGD.
    ``parallel``: a :class:`dnnpar.parallel.data_parallel.DataParallel` (synchronous data parallel
    over MPI / NCCL): ``cfg.batch_size`` is then the batch of each rank (of each micro-batch, with
    ``accumulate``), every step's gradients are summed over the ranks (overlapped with backward),
    and only rank 0 prints, evaluates and writes checkpoints.
    ``cfg.backend`` is active for the run and the previous backend is restored afterwards."""
    cfg.validate()
    if cfg.backend:
        with _backend.use_backend(cfg.backend):
            return train(replace(cfg, backend=None), checkpoint, resume, plot, progress, out, data, model, optimizer,
                         parallel)
    be = _backend.get_backend()
    data = data or fashion_mnist.load(cfg.data_dir, cfg.subset)
    if model is None:
        model = build_model(cfg)
    model.check_input(be.asarray(data.x_train[:1]))
    opt = optimizer or SGD(model, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay)
    schedule = make_schedule(cfg.schedule, cfg.lr, cfg.epochs)
    loss_fn = SoftmaxCrossEntropy()
    start_epoch, history = 1, History()
    root = parallel is None or parallel.is_root
    if resume and root:  # data parallel: rank 0 reads the checkpoint, setup() hands it to the others
        if checkpoint is None or not Path(checkpoint).exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {checkpoint}")
        start_epoch, history = load_checkpoint(checkpoint, model, opt, cfg)
        out(f"resumed from {checkpoint} after epoch {start_epoch - 1}")
    if parallel is not None:
        parallel.check_data(len(data.y_train), cfg.batch_size)
        # every rank starts from rank 0's parameters, momentum and epoch
        start_epoch = parallel.setup(model, opt, start_epoch)
        if not root:
            out, progress, checkpoint, plot = (lambda *a, **k: None), False, None, None
    out(f"training {model.name} ({model.num_parameters():,} parameters) on {data!r}, backend '{be.name}'")
    if parallel is not None:
        out(parallel.describe() + f"; batch {cfg.batch_size} per rank, {parallel.global_batch(cfg.batch_size)} "
            "per step")
    out(history.table_header())
    for r in history.records:
        out(history.row(r))
    step_batch = cfg.batch_size if parallel is None else parallel.global_batch(cfg.batch_size)
    n_batches = -(-len(data.y_train) // step_batch)
    for epoch in range(start_epoch, cfg.epochs + 1):
        opt.lr = schedule(epoch - 1)
        model.train()
        bar = ProgressBar(n_batches, f"epoch {epoch}/{cfg.epochs}", enabled=progress)
        t0, seen, correct, loss_sum = time.perf_counter(), 0, 0, 0.0
        for i, (xb, yb) in enumerate(fashion_mnist.batches(data.x_train, data.y_train, step_batch,
                                                            seed=cfg.seed, epoch=epoch), 1):
            # data parallel: this rank's micro-batches, its gradients summed over the ranks from backward on
            parts = [(xb, yb, 1.0)] if parallel is None else parallel.micro_batches(xb, yb)
            if parallel is not None:
                parallel.begin_step(model, epoch)
            for k, (x, y, share) in enumerate(parts):
                if parallel is not None:
                    parallel.begin_micro(share, last=k == len(parts) - 1)
                if len(y):
                    loss, logits = forward_backward(model, loss_fn, be.asarray(x), be.asarray(y),
                                                    f"at epoch {epoch}, batch {i} (lr {opt.lr:g})")
                    correct += int((be.to_numpy(logits).argmax(axis=1) == y).sum())
                    seen += len(y)
                    loss_sum += loss * len(y)
            if parallel is not None:
                parallel.finish_step()  # a rank with no samples adds zeros
            opt.step()
            bar.update(i, loss_sum / max(seen, 1))
        be.synchronize()
        seconds = time.perf_counter() - t0
        if parallel is not None:
            seen, loss_sum, correct = parallel.reduce_stats(seen, loss_sum, correct)
        test_acc = (evaluate(model, data.x_test, data.y_test) if parallel is None
                    else parallel.evaluate(model, data.x_test, data.y_test))
        rec = EpochRecord(epoch, opt.lr, loss_sum / seen, correct / seen, test_acc, seen / seconds, seconds)
        history.records.append(rec)
        out(history.row(rec))
        if checkpoint is not None:
            save_checkpoint(checkpoint, model, opt, cfg, epoch, history)
    if plot:
        plot_history(history, plot)
        out(f"curves written to {plot}")
    return model, history
