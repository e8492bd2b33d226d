"""What a training run shows and returns: epoch records, the per-epoch table, the progress bar,
the loss/accuracy plot, and :class:`RunResult`, the one result type of every strategy (local,
data parallel, Hogwild, parameter server) with the ``--report FILE.json`` writer.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

#: the keys every ``--report`` holds, whatever the strategy (a strategy may add its own)
REPORT_KEYS = ("strategy", "model", "epochs", "final_accuracy", "images_per_s", "grad_bytes_per_step",
               "dense_grad_bytes_per_step", "comm_seconds", "exposed_comm_seconds", "overlap_fraction")


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

    def images_per_s(self) -> float:
        """Images per second over the training time of all epochs (evaluation excluded)."""
        seconds = sum(r.seconds for r in self.records)
        return sum(r.images_per_s * r.seconds for r in self.records) / seconds if seconds > 0 else 0.0


@dataclass
class CommStats:
    """What one rank (worker) sent for its gradients. ``grad_bytes_per_step``: bytes one rank
    sends per step, indices included; ``dense_grad_bytes_per_step``: what the same strategy would
    send with dense float32 gradients; ``comm_seconds``: time some gradient message was in flight
    (this rank's); ``exposed_comm_seconds``: the part nothing else ran beside;
    ``overlap_fraction``: 1 - exposed / comm, the share hidden behind computation."""
    grad_bytes_per_step: float = 0.0
    dense_grad_bytes_per_step: float = 0.0
    comm_seconds: float = 0.0
    exposed_comm_seconds: float = 0.0
    steps: int = 0

    @property
    def overlap_fraction(self) -> float:
        return max(0.0, 1.0 - self.exposed_comm_seconds / self.comm_seconds) if self.comm_seconds > 0 else 0.0


@dataclass
class RunResult:
    """The result of :func:`dnnpar.engine.run` for every strategy. ``model`` holds the final
    parameters; ``history`` the epoch records (on a data-parallel rank other than 0, only the
    epochs it ran); ``details``: the strategy's own figures (a HogwildReport, a PSReport, the
    DataParallel object), or None for local training; ``extra``: strategy-specific report keys."""
    model: object
    history: History
    strategy: str = "local"
    comm: CommStats = field(default_factory=CommStats)
    wall_s: float = 0.0
    details: object = None
    extra: dict = field(default_factory=dict)

    @property
    def final_accuracy(self) -> float:
        return self.history.records[-1].test_acc if self.history.records else float("nan")

    @property
    def images_per_s(self) -> float:
        return self.history.images_per_s()

    def report(self) -> dict:
        """The ``--report`` figures as a JSON-ready dict (:data:`REPORT_KEYS` first)."""
        c = self.comm
        recs = self.history.records
        rep = {"strategy": self.strategy, "model": getattr(self.model, "name", None), "epochs": len(recs),
               "final_accuracy": recs[-1].test_acc if recs else None, "images_per_s": self.images_per_s,
               "grad_bytes_per_step": c.grad_bytes_per_step, "dense_grad_bytes_per_step": c.dense_grad_bytes_per_step,
               "comm_seconds": c.comm_seconds, "exposed_comm_seconds": c.exposed_comm_seconds,
               "overlap_fraction": c.overlap_fraction, "steps": c.steps, "wall_s": self.wall_s}
        rep.update(self.extra)
        return rep

    def write_report(self, path) -> None:
        """:meth:`report` as JSON at ``path``."""
        Path(path).write_text(json.dumps(self.report(), indent=1) + "\n")


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
        from tqdm.auto import tqdm   # tqdm.auto looks for Jupyter: only when a bar is shown

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


def plot_history(history: History, path=None):
    """Loss and accuracy curves; written to ``path`` as PNG when given. Returns the figure
    (matplotlib's object API: no global backend is switched, so notebooks keep inline plots)."""
    from matplotlib.figure import Figure   # matplotlib is the optional [plot] extra

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
