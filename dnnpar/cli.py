"""The ``dnnpar`` command.

Every argument is checked where it is parsed (:mod:`dnnpar.argcheck` ``type=`` functions) and
every file a command reads or writes is checked before the long work starts. A bad argument is
one line ``dnnpar CMD: error: argument --x: ...`` and exit status 2; an error found while running
(a file, a data set, a diverging run, a parallel fault) is one line ``dnnpar: error: ...`` and
status 2; Ctrl-C exits 130; a bug is ``dnnpar: internal error: ...`` and status 1 (the traceback
with ``DNNPAR_DEBUG=1``). Never a traceback otherwise.
"""
from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from . import argcheck as ck

# per-strategy learning rates: asynchronous updates (ps) apply stale gradients, which diverge
# at the synchronous rate
DEFAULT_LR = {"none": 0.01, "data": 0.01, "hogwild": 0.01, "ps": 0.005}
DEFAULT_QUALITY = 1.0


class ArgumentParser(argparse.ArgumentParser):
    """argparse with a one-line usage error (``PROG: error: MESSAGE``, exit 2) and every default
    shown in --help."""

    def __init__(self, *a, **k):
        k.setdefault("formatter_class", argparse.ArgumentDefaultsHelpFormatter)
        super().__init__(*a, **k)

    def _get_values(self, action, arg_strings):
        # argparse drops a '--' given as an option's value ('--epochs=--') and hands the option an
        # empty list, unconverted: refuse it as the missing value it is
        if action.option_strings and arg_strings == ["--"] and action.nargs not in (argparse.PARSER,
                                                                                    argparse.REMAINDER):
            raise argparse.ArgumentError(action, "expected one argument ('--' is not a value)")
        return super()._get_values(action, arg_strings)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {ck.one_line(message)}\n")


def _say(*a):
    print(*a, flush=True)


# ---------------------------------------------------------------------------- pre-flight checks
def _check_data(subset: str, data_dir) -> None:
    """The data set a command will read is there, before any work. An explicit --data-dir is
    never replaced by another folder of the search path."""
    from .data import fashion_mnist

    if subset == "embedded":
        if data_dir is not None:
            raise ValueError("--data-dir is for --subset full; --subset embedded uses the sample inside the package")
        return
    if data_dir is None:
        fashion_mnist.locate()  # FileNotFoundError listing where it looked and how to get it
        return
    try:
        found = fashion_mnist.locate(data_dir)
    except FileNotFoundError:
        found = None
    if found is None or Path(found).resolve() != Path(data_dir).resolve():
        raise FileNotFoundError(f"--data-dir {data_dir}: the four Fashion-MNIST files (train-images-idx3-ubyte.gz, "
                                "train-labels-idx1-ubyte.gz, t10k-images-idx3-ubyte.gz, t10k-labels-idx1-ubyte.gz) "
                                "are not all there")


def _data_for(model, data, subset, data_dir, command: str, one_shot_ok: bool = False, load: bool = True):
    """The data set ``command`` runs ``model`` on, by the one rule of train, compress,
    sensitivity and evaluate: ``--data FILE.npz`` if given (checked against the model's input
    shape and classes before anything is trained); else Fashion-MNIST (``subset`` / ``data_dir``)
    when the model takes 1x28x28 images and scores 10 classes; else None where ``one_shot_ok``
    (compress: one-shot compression), or a ValueError saying what the model takes and that
    ``--data`` is needed. ``load`` False: only the checks (the files are there), returns None."""
    from .data import fashion_mnist, user

    if data is not None:
        if subset is not None or data_dir is not None:
            raise ValueError("--data and --subset/--data-dir: give one (--data is the whole data set)")
        return user.load_for_model(data, model)
    try:
        fits = user.fits_fashion_mnist(model)
    except ValueError:  # not a classifier: no data set can be scored, but its weights can still be compressed
        if one_shot_ok and subset is None and data_dir is None:
            return None
        raise
    if fits:
        subset = subset or "full"
        _check_data(subset, data_dir)
        return fashion_mnist.load(data_dir, subset) if load else None
    need = (f"{command}: {user.describe_model(model)}, not Fashion-MNIST's 1x28x28 images of 10 classes: give "
            "--data FILE.npz (x: (N, C, H, W) float32 images, y: integer labels)")
    if subset is not None or data_dir is not None:
        raise ValueError(f"--subset/--data-dir: {need}")
    if one_shot_ok:
        return None
    raise ValueError(need)


def _checkpoint_model(path, model) -> str:
    """The zoo model a checkpoint holds; ``model`` (a --model flag, or None) must agree."""
    from .checkpoint import parse_meta
    from .errors import CheckpointError
    from .nn.base import load_npz

    arrays = load_npz(path)
    if "meta" not in arrays:  # bare weights (model.save): they say nothing of the model
        if model is None:
            raise CheckpointError("holds weights only, no record of the model: give --model", path, "meta")
        return model
    held = parse_meta(arrays, path).model
    if model is not None and model != held:
        raise ValueError(f"--model {model}: {path} holds a {held} (leave --model out to use it)")
    return held


def _free_name(path: Path) -> Path:
    k = 2
    while path.with_name(f"{path.stem}-{k}{path.suffix}").exists():
        k += 1
    return path.with_name(f"{path.stem}-{k}{path.suffix}")


def _train_checkpoint(args) -> tuple[str, str | None]:
    """The checkpoint this run writes, and a note to print when it is not the default one.
    --resume: the file must be this model's. Otherwise an existing file is another run's: an
    explicit --checkpoint is refused, the default name moves to the next free one (MODEL-2.npz),
    unless --overwrite."""
    explicit = args.checkpoint is not None
    path = Path(args.checkpoint or f"checkpoints/{re.sub(r'[^A-Za-z0-9_.-]', '_', args.model)}.npz")
    note = None
    if path.is_dir():
        raise IsADirectoryError(f"--checkpoint {path}: is a folder; give a file name")
    if args.resume:
        if not path.exists():
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        _checkpoint_model(path, args.model)
    elif path.exists() and not args.overwrite:
        if explicit:
            raise FileExistsError(f"--checkpoint {path} exists (another run's): --resume continues it, "
                                  "--overwrite replaces it")
        old, path = path, _free_name(path)
        note = f"{old} exists (another run's): this run writes {path} (--resume continues {old}, --overwrite replaces it)"
    ck.check_writable(path, create_parent=not explicit)
    return str(path), note


# ---------------------------------------------------------------------------- commands
def _demo(args) -> int:
    from .demo import training_demo

    return training_demo(backend=args.backend, epochs=args.epochs)


def _tour(args) -> int:
    from .demo import convolution_tour

    return convolution_tour(backend=args.backend, batch=args.batch, repeat=args.repeat)


def _summary(args) -> int:
    from .nn.models import build
    from .nn.summary import summary

    if (args.onnx is None) == (args.model is None):
        raise ValueError("summary: give a zoo MODEL or --onnx FILE (one of them)")
    if args.onnx:
        from .interop import from_onnx
        print(summary(from_onnx(args.onnx), args.batch_size).table())
        return 0
    kwargs = {}
    if args.model == "mobilenet_v1":
        kwargs = {"alpha": args.alpha, "resolution": args.resolution}
    elif args.model == "alexnet":
        kwargs = {"groups": args.groups}
    print(summary(build(args.model, **kwargs), args.batch_size).table())
    return 0


def _train_model(args):
    """(model or None, its name) for train: --onnx imported; a graph checkpoint being resumed,
    rebuilt from its spec; else the zoo model (--model, default lenet5), built later from the
    config."""
    if args.onnx:
        if args.model is not None:
            raise ValueError("--model and --onnx: give one (the ONNX file is the model)")
        from .interop import from_onnx
        model = from_onnx(args.onnx)
        return model, model.name
    if args.resume and args.checkpoint is not None and Path(args.checkpoint).is_file():
        name = _checkpoint_model(args.checkpoint, args.model)
        from .checkpoint import build_model_from, read_meta
        if read_meta(args.checkpoint).graph is not None:
            model = build_model_from(args.checkpoint)
            return model, model.name
        return None, name
    return None, args.model or "lenet5"


def _train(args) -> int:
    from .train import TrainConfig, build_model, train

    if args.parallel in ("hogwild", "ps") and args.resume:
        # their workers start from the model's initialisation: refuse rather than ignore
        raise ValueError(f"--resume is not supported with --parallel {args.parallel} (it continues a "
                         "single-process or --parallel data run)")
    if args.parallel != "data" and (args.accumulate != 1 or not args.overlap or args.grad_compression[0] != "none"):
        raise ValueError(f"--accumulate, --no-overlap and --grad-compression are options of --parallel data, "
                         f"not of --parallel {args.parallel}")
    if args.parallel in ("hogwild", "ps") and (args.onnx or args.data):
        raise ValueError(f"--parallel {args.parallel} trains zoo models on Fashion-MNIST: --onnx and --data train "
                         "with --parallel none or data")
    model, name = _train_model(args)
    if model is not None and args.parallel in ("hogwild", "ps"):
        raise ValueError(f"--parallel {args.parallel} trains zoo models: {name} (a graph model) trains with "
                         "--parallel none or data")
    args.model = name
    lr = DEFAULT_LR[args.parallel] if args.lr is None else args.lr
    cfg = TrainConfig(model=name, epochs=args.epochs, batch_size=args.batch_size, lr=lr,
                      momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
                      schedule=args.schedule, seed=args.seed, subset=args.subset or "full", data_dir=args.data_dir,
                      data_file=str(args.data) if args.data else None,
                      backend=args.backend)
    cfg.validate()
    if model is None:
        model = build_model(cfg)
    # hogwild and the parameter server load Fashion-MNIST themselves: only check that it fits and is there
    data = _data_for(model, args.data, args.subset, args.data_dir, "train", load=args.parallel in ("none", "data"))
    if args.parallel == "data":  # every rank holds the whole model and data set, and trains its shard
        return _train_data_parallel(args, cfg, model, data)
    checkpoint, note = _train_checkpoint(args)
    if note:
        _say(note)
    if args.lr is None and args.parallel != "none":
        _say(f"learning rate {lr:g} (the --parallel {args.parallel} default; --lr sets another)")
    files = dict(checkpoint=checkpoint, plot=args.plot, progress=not args.quiet)   # the engine writes them all
    if args.parallel == "hogwild":
        from .parallel.hogwild import run_hogwild
        result = run_hogwild(cfg, workers=args.workers, **files)
    elif args.parallel == "ps":
        from .parallel.ps import run_parameter_server
        result = run_parameter_server(cfg, workers=args.workers, servers=args.servers,
                                      consistency=args.consistency, address=args.address,
                                      checkpoint_every=args.ps_checkpoint_every, on_cluster_loss=_exit_with, **files)
    else:
        result = train(cfg, resume=args.resume, data=data, model=model, **files)
    if args.report:
        result.write_report(args.report)
    print(f"checkpoint: {checkpoint}" + (f"; report: {args.report}" if args.report else ""))
    return 0


def _train_data_parallel(args, cfg, model, data) -> int:
    """One rank of `mpiexec -n N dnnpar train --parallel data`: any failure ends the whole job."""
    from .parallel.comm import DEFAULT_TIMEOUT, launched_by_mpiexec, make_communicator
    from .parallel.data_parallel import DEFAULT_BUCKET_MB, make_grad_hook, run_data_parallel

    if cfg.backend:  # before the communicator: "auto" picks NCCL for the cuda backend
        from .backend import set_backend
        set_backend(cfg.backend)
    comm = make_communicator(args.comm, timeout=DEFAULT_TIMEOUT if args.timeout is None else args.timeout)
    checkpoint, note = _train_checkpoint(args)   # every rank the same name; rank 0 alone writes it
    if comm.rank == 0:
        if comm.size == 1 and not launched_by_mpiexec():
            _say("--parallel data: running a single rank (start with mpiexec -n N for more)")
        if note:
            _say(note)
    bucket_mb = DEFAULT_BUCKET_MB if args.bucket_mb is None else args.bucket_mb
    hook = make_grad_hook(*args.grad_compression, warmup_epochs=args.dgc_warmup, seed=cfg.seed)
    par = run_data_parallel(cfg, comm, bucket_mb=bucket_mb, accumulate=args.accumulate, overlap=args.overlap,
                                  hook=hook, report=args.report, checkpoint=checkpoint, resume=args.resume,
                                  plot=args.plot, progress=not args.quiet, model=model, data=data).details
    if par.is_root:
        if hook is None:
            sent = f"allreduce: {par.bytes_reduced / 2**20:,.1f} MiB"
        else:
            steady = hook.report_extra().get("grad_bytes_per_step_after_warmup")
            sent = (f"{hook.name.upper()} sent {par.bytes_sent / max(par.steps, 1):,.0f} bytes per step per rank"
                    + (f" ({steady:,.0f} after the warm-up; " if steady is not None else " (")
                    + f"the dense allreduce: {par.report_dense_bytes():,.0f})")
        print(f"checkpoint: {checkpoint}; {sent} in {par.steps} steps, "
              f"{par.comm_seconds:.2f} s in flight on rank 0, {100 * par.overlap_fraction():.0f}% of it hidden "
              "behind backward" + (f"; report: {args.report}" if args.report else ""))
    return 0


def _load_checkpoint_model(args):
    """(model, name) for --checkpoint: the model the checkpoint records (--model, if given, must
    agree), its weights loaded."""
    from .checkpoint import build_model_from

    name = _checkpoint_model(args.checkpoint, args.model)
    return build_model_from(args.checkpoint) if _has_meta(args.checkpoint) else _bare_zoo(name, args.checkpoint)


def _model_from_args(args):
    """The model a command works on: ``--onnx FILE`` imported, else the ``--checkpoint``'s."""
    if getattr(args, "onnx", None):
        if args.model is not None or args.checkpoint is not None:
            raise ValueError(f"--{'model' if args.model is not None else 'checkpoint'} and --onnx: give one (the "
                             "ONNX file is the model)")
        from .interop import from_onnx
        return from_onnx(args.onnx)
    if args.checkpoint is None:
        raise ValueError("give --checkpoint (a trained .npz) or --onnx (a model to import)")
    return _load_checkpoint_model(args)


def _has_meta(path) -> bool:
    from .nn.base import load_npz
    found = []
    load_npz(path, lambda members, p: found.append("meta" in members) or [])
    return found[0]


def _bare_zoo(name, path):
    from .nn.models import build
    model = build(name) if name in ("lenet300", "lenet5") else build(name, num_classes=10)
    model.load(path)
    return model


def _import(args) -> int:
    from .checkpoint import save_checkpoint
    from .interop import from_onnx

    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists: --overwrite replaces it")
    _set_backend(args)
    model = from_onnx(args.path)
    save_checkpoint(args.out, model, {"model": model.name})
    print(f"imported {model.name} ({model.num_parameters():,} parameters, {len(model.layers)} layers) from "
          f"{args.path}; wrote {args.out}")
    return 0


def _export(args) -> int:
    from .interop import dnnz_to_onnx, to_onnx

    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists: --overwrite replaces it")
    with open(args.path, "rb") as f:
        magic = f.read(4)
    if magic[:2] == b"PK":  # an .npz (zip): a checkpoint
        from .checkpoint import build_model_from
        from .errors import CheckpointError
        if not _has_meta(args.path):
            raise CheckpointError("holds weights only, no record of the model: nothing to export", args.path, "meta")
        to_onnx(build_model_from(args.path), args.out, opset=args.opset)
    else:
        dnnz_to_onnx(args.path, args.out, opset=args.opset)
    print(f"wrote {args.out} (ONNX opset {args.opset}) from {args.path}")
    return 0


def _set_backend(args):
    if args.backend:
        from .backend import set_backend
        return set_backend(args.backend)
    return None


def _compress(args) -> int:
    from .compress import prune
    from .compress.pipeline import CompressConfig, compress, save
    from .data import user

    if Path(args.out).exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists: --overwrite replaces it")
    be = _set_backend(args)
    model = _model_from_args(args)
    quality = ck.quality_for(args.quality, prune.prunable_layers(model), DEFAULT_QUALITY, model.name)
    cfg = CompressConfig(quality=quality, cycles=args.cycles, retrain_epochs=args.retrain_epochs,
                         finetune_epochs=args.finetune_epochs, conv_bits=args.conv_bits, fc_bits=args.fc_bits,
                         conv_index_bits=args.conv_index_bits, fc_index_bits=args.fc_index_bits, init=args.init,
                         lr=args.lr, finetune_lr=args.finetune_lr, weight_decay=args.weight_decay,
                         seed=args.seed)
    cfg.validate(model)
    data = _data_for(model, args.data, args.subset, args.data_dir, "compress", one_shot_ok=True)
    source = args.onnx or args.checkpoint
    if data is None:
        print(f"compressing {model.name} from {source} one-shot: {user.describe_model(model)}, no data set fits "
              "(give --data FILE.npz to retrain)" + (f", backend {be.name}" if be else ""))
    else:
        print(f"compressing {model.name} from {source} on {data!r}" + (f", backend {be.name}" if be else ""))
    from .backend import get_backend
    before = {n: get_backend().to_numpy(p).copy() for n, p, _ in model.named_parameters() if n.endswith(".weight")}
    codes, report, log = compress(model, data, cfg, progress=not args.quiet)
    if args.plot:
        from .compress.encode import plot_histograms
        plot_histograms({k.rsplit(".", 1)[0]: v for k, v in before.items()}, codes, args.plot)
        print(f"weight histograms written to {args.plot}")
    meta = {"config": cfg.__dict__, "retrained": data is not None}
    if data is not None:
        meta["accuracy"] = log
        if args.data is not None:
            meta["data_file"] = str(args.data)
        else:
            meta["data"] = {"subset": args.subset or "full", "data_dir": args.data_dir}
    save(args.out, model, codes, meta=meta)
    print(report.table())
    if data is None:
        print(f"one-shot compression: pruned and weight-shared without retraining or fine-tuning, accuracy not "
              f"measured (give --data FILE.npz to retrain and measure it); wrote {args.out}")
    else:
        print(f"accuracy: {100 * log['baseline']:.2f}% dense -> {100 * log['final']:.2f}% compressed "
              f"({100 * (log['final'] - log['baseline']):+.2f} points); wrote {args.out}")
    return 0


def _plan(args) -> int:
    from .parallel.plan import run_from_args
    return run_from_args(args)


def _sensitivity(args) -> int:
    from dataclasses import replace

    from .compress import prune
    from .train import evaluate

    _set_backend(args)
    model = _model_from_args(args)
    if args.layers:
        ck.check_layers(args.layers, prune.prunable_layers(model), model.name, "--layers")
    data = _data_for(model, args.data, args.subset, args.data_dir, "sensitivity")
    if args.limit:
        data = replace(data, x_test=data.x_test[:args.limit], y_test=data.y_test[:args.limit])
    score = lambda m: evaluate(m, data.x_test, data.y_test)  # noqa: E731
    dense = score(model)
    result = prune.sensitivity(model, score, sparsities=tuple(args.sparsities), layers=args.layers or None)
    print(f"{model.name}: test accuracy with one layer pruned (no retraining); dense {100 * dense:.2f}% "
          f"on {len(data.y_test):,} test images")
    print(prune.sensitivity_table(result))
    if args.plot:
        sizes = {n: int(model[n].params["weight"].size) for n in result}
        prune.plot_sensitivity(result, dense, sizes, title=f"{model.name}: one layer pruned at a time", path=args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _evaluate(args) -> int:
    from .compress.encode import Report
    from .compress.pipeline import load, read_codes
    from .train import evaluate

    if (args.path is None) == (args.onnx is None):
        raise ValueError("evaluate: give a .dnnz PATH or --onnx FILE (one of them)")
    if args.onnx:
        from .interop import from_onnx
        model = from_onnx(args.onnx)
        data = _data_for(model, args.data, args.subset, args.data_dir, "evaluate")
        acc = evaluate(model, data.x_test, data.y_test)
        print(f"{args.onnx}: {model.name} ({model.num_parameters():,} parameters), test accuracy {100 * acc:.2f}% "
              f"on {len(data.y_test):,} images of {data!r}")
        return 0
    header, codes, others = read_codes(args.path)
    meta = header.get("meta") if isinstance(header.get("meta"), dict) else {}
    recorded = meta.get("data")
    subset, data_dir = args.subset, args.data_dir
    if args.data is None and subset is None and data_dir is None and isinstance(recorded, dict):
        subset, data_dir = recorded.get("subset"), recorded.get("data_dir")  # the data it was compressed on
        if subset not in ("full", "embedded") or not (data_dir is None or isinstance(data_dir, str)):
            subset, data_dir = "full", None
    model = load(args.path, sparse=not args.dense)
    try:
        data = _data_for(model, args.data, subset, data_dir, "evaluate")
    except ValueError as e:
        if args.data is None and isinstance(meta.get("data_file"), str):
            raise ValueError(f"{e} (it was compressed on {meta['data_file']})") from None
        raise
    acc = evaluate(model, data.x_test, data.y_test)
    report = Report(header["model"], codes, int(sum(v.size for v in others.values())))
    print(report.table())
    orig, _, _ = report.totals()
    size = os.path.getsize(args.path)
    ratio = orig / 8 / size
    # a tiny model's header (a graph spec, say) can outweigh its weights
    than = f"{ratio:.1f}x smaller than" if ratio >= 1 else f"{1 / ratio:.1f}x larger than"
    print(f"{args.path}: {size:,} bytes on disk ({than} the float32 weights), "
          f"test accuracy {100 * acc:.2f}% on {len(data.y_test):,} images of {data!r} "
          f"({'dense decode' if args.dense else 'fc layers run as CSR x codebook'})")
    return 0


def _predict(args) -> int:
    from .predict import load_model_and_data, predict_files

    _set_backend(args)
    model, trained_on = load_model_and_data(args.model)
    table, rows = predict_files(model, args.inputs, args.top_k, args.normalize, trained_on)
    if args.json:
        import json
        print(json.dumps(rows, indent=1))
    else:
        print(table)
    return 0


# ---------------------------------------------------------------------------- the parser
def build_parser() -> ArgumentParser:
    from . import __version__
    from .nn.models import MODELS

    models = sorted(MODELS)
    ap = ArgumentParser(prog="dnnpar", description="fast and parallel DNNs from hand-written CUDA kernels")
    ap.add_argument("--version", action="version", version=f"dnnpar {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name, help):
        return sub.add_parser(name, help=help, description=help)

    def backend(p):
        p.add_argument("--backend", choices=("numpy", "cuda", "emu"), default=None,
                       help="None: cuda when a GPU is usable, else numpy")

    def data(p, subset_help="None: full"):
        p.add_argument("--data", type=ck.existing_file, default=None, metavar="FILE.npz",
                       help="a data set of your own: x (N, C, H, W) float32 (float64 cast, uint8 scaled to 0..1), "
                            "y integer labels, optional x_test / y_test (else 1/7 held out). None: Fashion-MNIST "
                            "when the model takes 1x28x28 images of 10 classes")
        p.add_argument("--subset", choices=("full", "embedded"), default=None,
                       help=f"Fashion-MNIST: full, the 70,000 images (see --data-dir); embedded, the sample inside "
                            f"the package ({subset_help})")
        p.add_argument("--data-dir", type=ck.data_dir, default=None,
                       help="folder with the four Fashion-MNIST .gz files (None: $DNNPAR_DATA, "
                            "~/.cache/dnnpar/fashion-mnist, /usr/share/datasets/fashion-mnist)")

    def plot(p, what):
        p.add_argument("--plot", type=ck.plot_file, default=None, metavar="PNG",
                       help=f"write {what} to this PNG (needs pip install 'dnnpar[plot]')")

    d = command("demo", "train LeNet-5 on the embedded Fashion-MNIST sample: summary and accuracy")
    backend(d)
    d.add_argument("--epochs", type=ck.positive_int, default=4, help="training epochs")
    d.set_defaults(fn=_demo)

    t = command("tour", "the convolution tour: direct loop vs im2col + GEMM on the active backend")
    backend(t)
    t.add_argument("--batch", type=ck.int_range(1, 1024), default=8, help="images in the conv layer's batch")
    t.add_argument("--repeat", type=ck.int_range(1, 10_000), default=5, help="timed runs per algorithm (median reported)")
    t.set_defaults(fn=_tour)

    s = command("summary", "per-layer shapes, parameters, MACs and memory of a model")
    s.add_argument("model", choices=models, nargs="?", default=None, help="the zoo model (or --onnx)")
    s.add_argument("--onnx", type=ck.existing_file, default=None, help="an ONNX model, imported (instead of MODEL)")
    s.add_argument("--batch-size", type=ck.positive_int, default=1, help="batch for the memory column")
    s.add_argument("--alpha", type=ck.positive_float, default=1.0, help="mobilenet_v1 width multiplier")
    s.add_argument("--resolution", type=ck.int_range(32, 4096), default=224, help="mobilenet_v1 input resolution")
    s.add_argument("--groups", type=ck.int_range(1, 2), default=1, help="alexnet: 2 for the original two-tower net")
    s.set_defaults(fn=_summary)

    tr = command("train", "train a model on Fashion-MNIST or a data set of your own (--data)")
    tr.add_argument("--model", choices=models, default=None, help="the zoo model (None: lenet5, or the one a "
                                                                  "--resume checkpoint holds)")
    tr.add_argument("--onnx", type=ck.existing_file, default=None,
                    help="an ONNX model, imported and trained (instead of --model); its checkpoint holds the graph")
    tr.add_argument("--epochs", type=ck.positive_int, default=10, help="training epochs")
    tr.add_argument("--batch-size", type=ck.positive_int, default=64, help="mini-batch (per rank / worker in parallel runs)")
    tr.add_argument("--lr", type=ck.positive_float, default=None,
                    help="peak learning rate (None: " + ", ".join(f"{k} {v:g}" for k, v in DEFAULT_LR.items())
                         + " by --parallel)")
    tr.add_argument("--momentum", type=ck.momentum, default=0.9, help="SGD momentum, in [0, 1)")
    tr.add_argument("--nesterov", action="store_true", help="Nesterov momentum")
    tr.add_argument("--weight-decay", type=ck.nonneg_float, default=5e-4, help="L2 weight decay")
    tr.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine", help="learning-rate schedule")
    tr.add_argument("--seed", type=ck.int_range(0, 2**32 - 1), default=0, help="initialisation and shuffling seed")
    data(tr)
    backend(tr)
    tr.add_argument("--checkpoint", default=None,
                    help="checkpoint file, written each epoch (None: checkpoints/MODEL.npz, or MODEL-2.npz... when "
                         "that is another run's)")
    tr.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    tr.add_argument("--overwrite", action="store_true", help="replace an existing --checkpoint")
    plot(tr, "the loss/accuracy curves")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    par = tr.add_argument_group("parallel training")
    par.add_argument("--parallel", choices=("none", "data", "hogwild", "ps"), default="none",
                     help="data: synchronous allreduce over MPI/NCCL (launch with mpiexec -n N); hogwild: lock-free "
                          "workers over shared memory; ps: parameter server on Ray")
    par.add_argument("--comm", choices=("auto", "mpi", "nccl"), default="auto",
                     help="data: the allreduce engine (auto: NCCL on the cuda backend, else MPI)")
    par.add_argument("--bucket-mb", type=ck.positive_float, default=None,
                     help="data: gradient bucket size in MiB for the fused allreduce (None: 4; keep it under 32: "
                          "above, glibc maps MPI's temporary buffer anew, page faults and all, on every call)")
    par.add_argument("--accumulate", type=ck.positive_int, default=1, metavar="K",
                     help="data: K micro-batches of --batch-size per step, one gradient reduction (DDP's no_sync)")
    par.add_argument("--overlap", action=argparse.BooleanOptionalAction, default=True,
                     help="data: start each gradient bucket's allreduce as soon as backward has written it "
                          "(--no-overlap: all of them after backward)")
    par.add_argument("--report", type=ck.writable_file, default=None, metavar="FILE.json",
                     help="every strategy: write final_accuracy, grad_bytes_per_step (what one rank / worker "
                          "sends per step, indices included), dense_grad_bytes_per_step, comm_seconds, "
                          "overlap_fraction, images_per_s (data: rank 0's) as JSON")
    par.add_argument("--grad-compression", type=_grad_compression, default=("none", None), metavar="none|fp16|bf16|dgc:DENSITY",
                     help="data: what each rank sends -- none (dense float32 allreduce), fp16 / bf16 (16-bit values, "
                          "each addition of the allreduce rounded to 16 bits: half the bytes) or Deep Gradient Compression at "
                          "DENSITY (dgc:0.001: the top 0.1%% of the accumulated gradient as index/value pairs, "
                          "warm-up from 25%% over the first 4 epochs; momentum correction and masking)")
    par.add_argument("--dgc-warmup", type=ck.int_range(0, 1000), default=4, metavar="EPOCHS",
                     help="data, dgc: epochs over which the density falls from 25%% to DENSITY (0: none)")
    par.add_argument("--timeout", type=ck.positive_float, default=None,
                     help="data: seconds a collective may wait for a rank before the job is aborted "
                          "(None: $DNNPAR_COMM_TIMEOUT, else 120)")
    par.add_argument("--workers", type=ck.int_range(1, 256), default=2, help="hogwild / ps: worker count")
    par.add_argument("--servers", type=ck.int_range(1, 256), default=1, help="ps: parameter-server shards")
    par.add_argument("--consistency", type=_consistency, default="asp", help="ps: bsp | asp | ssp:S (staleness bound S)")
    par.add_argument("--address", default=None, help="ps: a Ray cluster address (None: a local Ray)")
    par.add_argument("--ps-checkpoint-every", type=ck.positive_int, default=50,
                     help="ps: each server shard checkpoints every K updates (restarted from it after a crash)")
    tr.set_defaults(fn=_train)

    pl = command("plan", "parallel training beyond one machine: compute against communication, "
                         "scaling efficiency for 8-512 GPUs")
    from .parallel.plan import add_arguments as plan_arguments
    plan_arguments(pl)
    pl.set_defaults(fn=_plan)

    se = command("sensitivity", "pruning sensitivity: accuracy with one layer pruned at a time")
    se.add_argument("--model", choices=models, default=None, help="None: the model the checkpoint holds")
    se.add_argument("--checkpoint", type=ck.existing_file, default=None,
                    help="a trained model (.npz from dnnpar train or dnnpar import)")
    se.add_argument("--onnx", type=ck.existing_file, default=None, help="an ONNX model, imported (instead of --checkpoint)")
    se.add_argument("--sparsities", type=ck.sparsity, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95],
                    help="fractions pruned, each in [0, 1)")
    se.add_argument("--layers", nargs="+", help="only these conv / fc layers (None: every one)")
    se.add_argument("--limit", type=ck.nonneg_int, default=0, help="score on the first N test images only (0: all)")
    data(se)
    backend(se)
    plot(se, "accuracy against sparsity")
    se.set_defaults(fn=_sensitivity)

    c = command("compress", "Deep Compression: prune, share weights, Huffman-code, write a .dnnz")
    c.add_argument("--model", choices=models, default=None, help="None: the model the checkpoint holds")
    c.add_argument("--checkpoint", type=ck.existing_file, default=None,
                    help="a trained model (.npz from dnnpar train or dnnpar import)")
    c.add_argument("--onnx", type=ck.existing_file, default=None, help="an ONNX model, imported (instead of --checkpoint)")
    c.add_argument("--out", type=ck.writable_file, required=True, help="the .dnnz file to write")
    c.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    c.add_argument("--quality", type=ck.quality, default=DEFAULT_QUALITY,
                   help='threshold = quality x std per layer: a number > 0, or JSON like \'{"fc1": 1.8, "fc3": 1.0}\' '
                        f'(layers left out: {DEFAULT_QUALITY:g})')
    c.add_argument("--cycles", type=ck.int_range(1, 1000), default=3, help="prune -> retrain cycles")
    c.add_argument("--retrain-epochs", type=ck.nonneg_int, default=2, help="retraining epochs per cycle")
    c.add_argument("--finetune-epochs", type=ck.nonneg_int, default=2, help="centroid fine-tuning epochs")
    for flag, default, what in (("--conv-bits", 8, "conv weight"), ("--fc-bits", 5, "fc weight"),
                                ("--conv-index-bits", 8, "conv relative-index"), ("--fc-index-bits", 5, "fc relative-index")):
        c.add_argument(flag, type=ck.int_range(1, 16), default=default, help=f"bits per {what}")
    c.add_argument("--init", choices=("linear", "random", "density"), default="linear", help="k-means centroid init")
    c.add_argument("--lr", type=ck.positive_float, default=0.005, help="retraining learning rate")
    c.add_argument("--finetune-lr", type=ck.positive_float, default=1e-4, help="centroid fine-tuning learning rate")
    c.add_argument("--weight-decay", type=ck.nonneg_float, default=5e-4, help="L2 while retraining the pruned model")
    c.add_argument("--seed", type=ck.int_range(0, 2**32 - 1), default=0, help="k-means and shuffling seed")
    data(c)
    backend(c)
    c.add_argument("--quiet", action="store_true", help="no progress bar")
    plot(c, "each layer's weight histogram before/after, centroids marked,")
    c.set_defaults(fn=_compress)

    ev = command("evaluate", "accuracy and size of a .dnnz, run from its compressed form (or accuracy of an "
                             "ONNX model)")
    ev.add_argument("path", type=ck.existing_file, nargs="?", default=None, help="the .dnnz file (or --onnx)")
    ev.add_argument("--onnx", type=ck.existing_file, default=None, help="an ONNX model, imported (instead of PATH)")
    ev.add_argument("--dense", action="store_true", help="decode every layer to dense weights instead")
    data(ev, "None: the Fashion-MNIST subset the file was compressed on (recorded in it), else full")
    ev.set_defaults(fn=_evaluate)

    pr = command("predict", "top-k classes with probabilities for the images in a file")
    pr.add_argument("model", type=ck.existing_file, metavar="MODEL",
                    help="a checkpoint (.npz from dnnpar train / import), a .dnnz or an .onnx model")
    pr.add_argument("inputs", type=ck.existing_file, nargs="+", metavar="INPUTS",
                    help="images: .npz (member x), .npy, IDX (.gz or not) or PNG (grayscale or RGB), each of the "
                         "model's input shape (never resized)")
    pr.add_argument("--top-k", type=ck.int_range(1, 1000), default=3, help="classes shown per image")
    pr.add_argument("--normalize", choices=("auto", "fashion-mnist", "unit"), default="auto",
                    help="uint8 pixels (PNG, IDX, uint8 arrays) are scaled to 0..1 (unit, as a --data set's are); "
                         "fashion-mnist also standardises them as dnnpar train does on Fashion-MNIST; auto: "
                         "unit for a model its file says was trained on a --data set, else fashion-mnist for a "
                         "model of 1x28x28 images and 10 classes, else unit. Float arrays "
                         "are fed as they are")
    pr.add_argument("--json", action="store_true", help="print JSON instead of a table")
    backend(pr)
    pr.set_defaults(fn=_predict)

    im = command("import", "an ONNX model as a dnnpar checkpoint (.npz holding the graph and its weights)")
    im.add_argument("path", type=ck.existing_file, help="the .onnx file")
    im.add_argument("--out", type=ck.writable_file, required=True, help="the .npz checkpoint to write")
    im.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    backend(im)
    im.set_defaults(fn=_import)

    ex = command("export", "a checkpoint (.npz) or compressed model (.dnnz) as ONNX")
    ex.add_argument("path", type=ck.existing_file, help="the .npz checkpoint or .dnnz file")
    ex.add_argument("--out", type=ck.writable_file, required=True, help="the .onnx file to write")
    ex.add_argument("--opset", type=ck.int_range(13, 21), default=17, help="ONNX opset version")
    ex.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    ex.set_defaults(fn=_export)

    command("kernels", "compile every kernel for sm_75/80/90 and print the ptxas report (dnnpar kernels --help)")
    return ap


def _grad_compression(text: str):
    """--grad-compression: none | dgc:DENSITY (argparse type; one line on a bad value)."""
    from .parallel.data_parallel import parse_grad_compression
    try:
        return parse_grad_compression(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _consistency(text: str) -> str:
    from .parallel.ps import parse_consistency

    try:
        parse_consistency(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# ---------------------------------------------------------------------------- errors
def _error_line(e: BaseException) -> tuple[str, int] | None:
    """(one line, exit status) for an error that says what to change; None for a bug."""
    from .backend import BackendUnavailable
    from .parallel.comm import CommTimeoutError

    if isinstance(e, ImportError):
        name = (e.name or "").split(".")[0]
        if name not in ck.EXTRAS and "pip install" not in str(e):
            return None
        msg = str(e)
        if "pip install" not in msg:
            msg = f"{msg}: pip install 'dnnpar[{ck.EXTRAS[name]}]'"
        return ck.one_line(msg), 2
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in str(e.strerror or ""):
        return ck.one_line(f"{e.filename}: {e.strerror or e}"), 2
    if isinstance(e, (ValueError, OSError, BackendUnavailable, ConnectionError, TimeoutError, FloatingPointError,
                      CommTimeoutError, _parallel_error())):
        return ck.one_line(str(e) or type(e).__name__), 2
    return None


def _parallel_error():
    from .errors import ParallelError
    return ParallelError


def _exit_with(message: str) -> None:
    """End the process now with ``message`` as the one error line (a watcher thread's last word
    when what the run stands on is gone: nothing in this process can go on)."""
    try:
        sys.stdout.flush()
    except (OSError, ValueError):
        pass
    sys.stderr.write(f"dnnpar: error: {ck.one_line(message)}\n")
    sys.stderr.flush()
    os._exit(2)


def _quiet_stdout() -> None:
    """After a broken pipe (``dnnpar plan | head``): point stdout at /dev/null so that the
    interpreter's final flush does not complain (Python docs, "Note on SIGPIPE")."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout without a descriptor (captured in tests)
        pass


def main(argv=None) -> int:
    """Run one ``dnnpar`` command; returns the exit status (0 ok, 1 internal error, 2 bad input or
    a run that failed for a stated reason, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    try:
        if argv[:1] == ["kernels"]:  # its own parser: python -m dnnpar.kernels
            from . import kernels
            return kernels.main(argv[1:])
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as e:  # --help, --version (0) or a usage error (2, its line already printed)
            return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
        status = args.fn(args)
        sys.stdout.flush()
        return status
    except KeyboardInterrupt:
        print("dnnpar: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        _quiet_stdout()
        return 1
    except Exception as e:  # noqa: BLE001 - the one place errors become exit statuses
        known = _error_line(e)
        if os.environ.get("DNNPAR_DEBUG"):
            import traceback
            traceback.print_exc()
        if known is not None:
            print(f"dnnpar: error: {known[0]}", file=sys.stderr)
            return known[1]
        print(f"dnnpar: internal error: {type(e).__name__}: {ck.one_line(str(e))} "
              "(run with DNNPAR_DEBUG=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
