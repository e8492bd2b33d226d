"""Checkpoints: the ``.npz`` files dnnpar writes for a model (never pickled).

Members: ``param/<layer>.<name>`` (parameters and buffers), ``opt/velocity/<name>`` (momentum,
training checkpoints only) and ``meta``, a JSON string::

    {"version": 1, "config": {...TrainConfig...}, "epoch": E, "history": [{...EpochRecord...}, ...]}

``config["model"]`` names the zoo model, so commands that take a checkpoint know what to build.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

from .errors import CheckpointError
from .nn.base import load_npz

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint's ``meta`` member says: the training config (``config["model"]`` is the
    zoo model's name), the last finished epoch (0: none) and the per-epoch records (dicts)."""
    config: dict
    epoch: int
    history: list = field(default_factory=list)

    @property
    def model(self) -> str:
        return self.config["model"]


def meta_json(config: dict, epoch: int, history: list) -> np.ndarray:
    """The ``meta`` member for ``config`` (a dict), ``epoch`` and ``history`` (a list of dicts)."""
    return np.array(json.dumps({"version": CHECKPOINT_VERSION, "config": config, "epoch": epoch,
                                "history": history}))


def parse_meta(arrays: dict, path=None) -> CheckpointMeta:
    """The validated ``meta`` of a loaded checkpoint's arrays; CheckpointError naming the field."""
    if "meta" not in arrays:
        raise CheckpointError("not a dnnpar checkpoint (no meta member)", path, "meta")
    try:
        meta = json.loads(str(arrays["meta"]))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"corrupt metadata ({e})", path, "meta") from e
    if not isinstance(meta, dict):
        raise CheckpointError("metadata is not a JSON object", path, "meta")
    if meta.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint version {meta.get('version')!r} is not {CHECKPOINT_VERSION}", path,
                              "version")
    config = meta.get("config")
    if not isinstance(config, dict) or not isinstance(config.get("model"), str):
        raise CheckpointError("config must be an object naming the model", path, "config")
    return CheckpointMeta(config, meta.get("epoch"), meta.get("history", []))


def read_meta(path) -> CheckpointMeta:
    """The validated metadata of the checkpoint at ``path`` (which model, which epoch)."""
    return parse_meta(load_npz(path), path)


def save_checkpoint(path, model, config: dict, epoch: int = 0, history: list | None = None,
                    optimizer_state: dict | None = None) -> None:
    """Write ``model`` with its metadata (and the optimizer's state arrays, if given) atomically."""
    from .backend import get_backend
    be = get_backend()
    arrays = {f"opt/{k}": be.to_numpy(v) for k, v in (optimizer_state or {}).items()}
    arrays["meta"] = meta_json(config, epoch, history or [])
    model.save(path, **arrays)


def load_checkpoint(path, model, optimizer=None, expect_model: str | None = None) -> CheckpointMeta:
    """Restore ``model`` (and the optimizer's momentum, if given) from ``path``; returns the
    metadata. A checkpoint of another model than ``expect_model`` is a CheckpointError."""
    from .backend import get_backend
    arrays = load_npz(path)
    meta = parse_meta(arrays, path)
    if expect_model is not None and meta.model != expect_model:
        raise CheckpointError(f"holds a {meta.model} checkpoint, not {expect_model}", path, "config.model")
    model.load_state_dict({k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")})
    if optimizer is not None:
        be = get_backend()
        optimizer.velocity = {k[len("opt/velocity/"):]: be.asarray(v) for k, v in arrays.items()
                              if k.startswith("opt/velocity/")}
    return meta
