"""Checkpoints: the ``.npz`` files dnnpar writes for a model (never pickled).

Members: ``param/<layer>.<name>`` (parameters and buffers), ``opt/velocity/<name>`` (momentum,
training checkpoints only) and ``meta``, a JSON string::

    {"version": 1, "config": {...TrainConfig...}, "epoch": E, "history": [{...EpochRecord...}, ...]}

``config["model"]`` names the zoo model, so commands that take a checkpoint know what to build.
A model outside the zoo (an imported ONNX graph) also stores its structure: meta gains
``"graph": spec`` (:meth:`dnnpar.nn.base.Graph.spec`), and ``config["model"]`` is then the
graph's name, any non-empty string. :func:`build_model_from` builds either kind.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from .errors import CheckpointError
from .nn.base import check_model_members, load_npz
from .reporting import EpochRecord, History
from .schema import Fields, loads_json
from .steps import TrainConfig

CHECKPOINT_VERSION = 1


@dataclass(frozen=True)
class CheckpointMeta:
    """What a checkpoint's ``meta`` member says: the training config (``config["model"]`` is the
    zoo model's name), the last finished epoch (0: none) and the per-epoch records (dicts)."""
    config: dict
    epoch: int
    history: list = field(default_factory=list)
    graph: dict | None = None   # the spec of a non-zoo model (checked by graph_from_spec when built)

    @property
    def model(self) -> str:
        return self.config["model"]


MAX_HISTORY = 100_000
MAX_META_BYTES = 64 * 1024 * 1024  # the meta member's text, as NumPy stores it (4 bytes a character)
_POS_FLOAT = dict(lo=0.0, hi=None)


def _config_schema():
    """TrainConfig field -> checker(Fields, key); tests keep it equal to TrainConfig's fields."""
    from .nn.models import MODELS

    return {
        "model": lambda f, k: f.str(k, tuple(MODELS)),
        "epochs": lambda f, k: f.int(k, 1, 10**9),
        "batch_size": lambda f, k: f.int(k, 1, 2**31 - 1),
        "lr": lambda f, k: f.float(k, 0.0, None, open_lo=True),  # TrainConfig: lr > 0
        "momentum": lambda f, k: f.float(k, 0.0, 1.0),
        "nesterov": lambda f, k: f.bool(k),
        "weight_decay": lambda f, k: f.float(k, **_POS_FLOAT),
        "schedule": lambda f, k: f.str(k, ("cosine", "step", "constant")),
        "seed": lambda f, k: f.int(k, 0, 2**63 - 1),
        "subset": lambda f, k: f.str(k, ("full", "embedded")),
        "data_dir": lambda f, k: f.str(k, optional=True),
        "backend": lambda f, k: f.str(k, ("numpy", "cuda", "emu"), optional=True),
        "data_file": lambda f, k: f.str(k, optional=True),
    }


#: EpochRecord field -> (lo, hi) of its finite value (``epoch``: an integer)
RECORD_RANGES = {"epoch": (1, None), "lr": (0.0, None), "loss": (0.0, None), "train_acc": (0.0, 1.0),
                 "test_acc": (0.0, 1.0), "images_per_s": (0.0, None), "seconds": (0.0, None)}


def _check_meta(meta, path=None) -> CheckpointMeta:
    f = Fields(meta, CheckpointError, path, "meta")
    f.only(("version", "config", "epoch", "history", "graph"))
    f.int("version", CHECKPOINT_VERSION, CHECKPOINT_VERSION)
    graph = f.sub("graph").obj if "graph" in meta else None
    cfg = f.sub("config")
    schema = _config_schema()
    if graph is not None:  # the model is the stored graph: its name is free text
        schema["model"] = lambda f, k: f.str(k)
    cfg.only(schema)
    name = cfg.str("model")  # required; the other fields default to TrainConfig's
    if graph is not None and not 0 < len(name) <= 256:
        raise cfg.fail("must be a non-empty name of at most 256 characters", "model")
    for k in cfg.obj:
        schema[k](cfg, k)
    # the ranges training enforces (TrainConfig.validate) are the ones a checkpoint must meet
    try:
        TrainConfig(**cfg.obj).validate()
    except (TypeError, ValueError) as e:
        raise CheckpointError(str(e), path, "meta.config") from None
    epoch = f.int("epoch", 0, 10**9)
    history = f.list("history", MAX_HISTORY)
    hf = Fields({}, CheckpointError, path, "meta.history")
    last = 0
    for i, rec in enumerate(history):
        r = hf.item(rec, i)
        r.only(RECORD_RANGES)
        for k, (lo, hi) in RECORD_RANGES.items():
            if k == "epoch":
                e = r.int(k, last + 1, epoch)  # epochs 1..E, in order, each once
            else:
                r.float(k, lo, hi)
        last = e
    return CheckpointMeta(cfg.obj, epoch, history, graph)


def meta_json(config: dict, epoch: int, history: list, graph: dict | None = None) -> np.ndarray:
    """The ``meta`` member for ``config`` (a dict), ``epoch`` and ``history`` (a list of dicts);
    checked with the reader's schema first (CheckpointError naming the field), so a writer
    never produces metadata :func:`parse_meta` refuses."""
    meta = {"version": CHECKPOINT_VERSION, "config": config, "epoch": epoch, "history": history}
    if graph is not None:
        meta["graph"] = graph
    try:
        text = json.dumps(meta, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"cannot be written as JSON ({e})", None, "meta") from None
    _check_meta(loads_json(text, CheckpointError, None, "meta"))
    return np.array(text)


def parse_meta(arrays: dict, path=None) -> CheckpointMeta:
    """The validated ``meta`` of a loaded checkpoint's arrays; CheckpointError naming the field."""
    if "meta" not in arrays:
        raise CheckpointError("not a dnnpar checkpoint (no meta member)", path, "meta")
    m = arrays["meta"]
    if not isinstance(m, np.ndarray) or m.ndim != 0 or m.dtype.kind != "U":
        raise CheckpointError(f"must be a text scalar, got {getattr(m, 'dtype', type(m))} of shape "
                              f"{getattr(m, 'shape', None)}", path, "meta")
    return _check_meta(loads_json(str(m), CheckpointError, path, "meta"), path)


def _meta_member(members: dict, path) -> list[str]:
    if "meta" not in members:
        raise CheckpointError("not a dnnpar checkpoint (no meta member)", path, "meta")
    m = members["meta"]
    if m.shape != () or m.dtype.kind != "U" or m.dtype.itemsize > MAX_META_BYTES:
        raise CheckpointError(f"must be a text scalar of at most {MAX_META_BYTES // 4} characters, got {m.dtype} of "
                              f"shape {m.shape}", path, "meta")
    return ["meta"]


def read_meta(path) -> CheckpointMeta:
    """The validated metadata of the checkpoint at ``path`` (which model, which epoch); only the
    ``meta`` member is read."""
    return parse_meta(load_npz(path, _meta_member), path)


def is_zoo_model(model) -> bool:
    """Whether ``model`` is one the zoo builds by name (else its checkpoint stores its spec)."""
    from .nn.models import MODELS
    return getattr(model, "name", None) in MODELS


def save_checkpoint(path, model, config: dict, epoch: int = 0, history: list | None = None,
                    optimizer_state: dict | None = None) -> None:
    """Write ``model`` with its metadata (and the optimizer's state arrays, if given) atomically.
    A model outside the zoo is stored with its graph spec (``config["model"]`` its name).
    The metadata is validated first: nothing is written that :func:`load_checkpoint` refuses."""
    from .backend import get_backend
    be = get_backend()
    graph = None
    if not is_zoo_model(model):
        graph = model.spec()
        config = {**config, "model": model.name}
    meta = meta_json(config, epoch, history or [], graph)
    arrays = {f"opt/{k}": be.to_numpy(v) for k, v in (optimizer_state or {}).items()}
    arrays["meta"] = meta
    model.save(path, **arrays)


def load_checkpoint(path, model, optimizer=None, expect_model: str | None = None) -> CheckpointMeta:
    """Restore ``model`` (and the optimizer's momentum, if given) from ``path``; returns the
    metadata. Everything is checked before anything is read or copied: the metadata's schema,
    the model (``expect_model``), every parameter's name, dtype and shape, and the momentum
    buffers (float32, each of its parameter's shape). Every violation is a CheckpointError."""
    from .backend import get_backend

    meta = read_meta(path)  # first: a checkpoint of another model is named as such
    if expect_model is not None and meta.model != expect_model:
        raise CheckpointError(f"holds a {meta.model} checkpoint, not {expect_model}", path, "config.model")

    def check(members, p):
        names = check_model_members(model, members, p)
        shapes = {n: tuple(q.shape) for n, q, _ in model.named_parameters()}
        for k, m in members.items():
            if k == "meta" or k.startswith("param/"):
                continue
            pname = k[len("opt/velocity/"):]
            if not k.startswith("opt/velocity/") or pname not in shapes:
                raise CheckpointError("is not a parameter, a momentum buffer of one, or meta", p, f"member {k!r}")
            if m.dtype != np.float32 or m.shape != shapes[pname]:
                raise CheckpointError(f"{m.dtype} of shape {m.shape}, the momentum of {pname} must be float32 of shape "
                                      f"{shapes[pname]}", p, f"member {k!r}")
        return names + [k for k in members if k.startswith("opt/")]

    arrays = load_npz(path, check)
    model.load_state_dict({k[len("param/"):]: v for k, v in arrays.items() if k.startswith("param/")})
    if optimizer is not None:
        be = get_backend()
        optimizer.velocity = {k[len("opt/velocity/"):]: be.asarray(v) for k, v in arrays.items()
                              if k.startswith("opt/velocity/")}
    return meta


def _param_elements(members: dict) -> int:
    return int(sum(int(np.prod(m.shape, dtype=np.int64)) for k, m in members.items() if k.startswith("param/")))


def build_model_from(path):
    """The model a checkpoint holds, its weights loaded: the zoo model ``config["model"]`` names
    or, when the meta holds a ``graph``, that graph, checked by
    :func:`dnnpar.nn.graph_from_spec` before it is built with a parameter cap of the elements
    the file's ``param/`` members hold (a spec cannot ask for more weights than the file
    carries). Everything wrong is a CheckpointError naming the field."""
    from .errors import SpecError
    from .nn.models import build
    from .nn.spec import graph_from_spec

    seen = {}

    def meta_and_sizes(members, p):
        seen["params"] = _param_elements(members)
        return _meta_member(members, p)

    meta = parse_meta(load_npz(path, meta_and_sizes), path)
    if meta.graph is not None:
        try:
            model = graph_from_spec(meta.graph, max_parameters=seen["params"], path=path)
        except SpecError as e:
            what = str(e)[len(e.path) + 2:] if e.path and str(e).startswith(e.path) else str(e)
            raise CheckpointError(f"does not describe a buildable model ({what})", path, "meta.graph") from None
        if model.name != meta.model:
            raise CheckpointError(f"names {meta.model!r}, its graph is {model.name!r}", path, "config.model")
    else:
        name = meta.model
        model = build(name) if name in ("lenet300", "lenet5") else build(name, num_classes=10)
    model.load(path)
    return model


def save_training(path, model, optimizer, cfg: TrainConfig, epoch: int, history: History) -> None:
    """A training checkpoint after ``epoch``: model, momentum (``optimizer.state()``; None: no
    optimizer state, as Hogwild's and the parameter server's live in their workers), config and history."""
    save_checkpoint(path, model, asdict(cfg), epoch, [asdict(r) for r in history.records],
                    optimizer.state() if optimizer is not None else None)


def load_training(path, model, optimizer, cfg: TrainConfig) -> tuple[int, History]:
    """Restore model and optimizer for ``--resume``; returns (next epoch, history). Refuses a
    checkpoint of another model or a corrupt file with a CheckpointError naming it."""
    meta = load_checkpoint(path, model, optimizer, expect_model=cfg.model)
    return meta.epoch + 1, History([EpochRecord(**r) for r in meta.history])
