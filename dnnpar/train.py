"""Training: mini-batch SGD with a progress bar, a per-epoch table, atomic checkpoints and resume.

    dnnpar train --model lenet5 --epochs 15 --batch-size 64 --lr 0.01 --backend numpy

:func:`train` is the engine's epoch driver (:func:`dnnpar.engine.run`) with local training or,
given a :class:`~dnnpar.parallel.data_parallel.DataParallel`, synchronous data parallel. The
names below are re-exported from where they live: the config and one step in
:mod:`dnnpar.steps`, records, progress and plots in :mod:`dnnpar.reporting`.
"""
from __future__ import annotations

from .data import fashion_mnist
from .engine import Local, run
from .reporting import BAR_FORMAT, EpochRecord, History, ProgressBar, RunResult, plot_history
from .steps import TrainConfig, build_model, evaluate, forward_backward, predict

__all__ = ["BAR_FORMAT", "EpochRecord", "History", "ProgressBar", "RunResult", "TrainConfig", "build_model",
           "evaluate", "forward_backward", "plot_history", "predict", "train"]


def train(cfg: TrainConfig, checkpoint=None, resume: bool = False, plot=None, progress: bool = True,
          out=print, data: fashion_mnist.Dataset | None = None, model=None, optimizer=None,
          parallel=None) -> RunResult:
    """Train on Fashion-MNIST; returns a :class:`~dnnpar.reporting.RunResult` (``.model``,
    ``.history``, ``.final_accuracy``, ``.report()``).

    ``data``: a loaded :class:`Dataset` (default: ``cfg.subset`` found through ``cfg.data_dir``).
    ``model``: a prebuilt model (default: ``cfg.model`` built with ``cfg.seed``).
    ``optimizer``: a prebuilt optimizer with ``lr``, ``step()`` and ``state()`` (default: SGD from
    ``cfg``); Deep Compression retrains with masked SGD and with centroid SGD.
    ``parallel``: a :class:`dnnpar.parallel.data_parallel.DataParallel` (synchronous data parallel
    over MPI / NCCL): ``cfg.batch_size`` is then the batch of each rank (of each micro-batch, with
    ``accumulate``), every step's gradients are summed over the ranks (overlapped with backward),
    and only rank 0 prints, evaluates and writes checkpoints.
    ``cfg.backend`` is active for the run and the previous backend is restored afterwards."""
    return run(parallel if parallel is not None else Local(), cfg, checkpoint=checkpoint, resume=resume, plot=plot,
               progress=progress, out=out, data=data, model=model, optimizer=optimizer)
