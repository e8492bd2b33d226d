"""The ``dnnpar`` command."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _demo(args) -> int:
    from .demo import training_demo

    return training_demo(backend=args.backend, epochs=args.epochs)


def _tour(args) -> int:
    from .demo import convolution_tour

    return convolution_tour(backend=args.backend, batch=args.batch, repeat=args.repeat)


def _summary(args) -> int:
    from .nn.models import build
    from .nn.summary import summary

    kwargs = {}
    if args.model == "mobilenet_v1":
        kwargs = {"alpha": args.alpha, "resolution": args.resolution}
    elif args.model == "alexnet":
        kwargs = {"groups": args.groups}
    print(summary(build(args.model, **kwargs), args.batch_size).table())
    return 0


def _train(args) -> int:
    from .train import TrainConfig, train

    cfg = TrainConfig(model=args.model, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
                      schedule=args.schedule, seed=args.seed, subset=args.subset, data_dir=args.data_dir,
                      backend=args.backend)
    checkpoint = args.checkpoint or f"checkpoints/{args.model}.npz"
    if args.parallel == "data":
        return _train_data_parallel(args, cfg, checkpoint)
    if args.parallel in ("hogwild", "ps"):
        if args.resume:  # their workers start from the model's initialisation: refuse rather than ignore
            raise ValueError(f"--resume is not supported with --parallel {args.parallel} (it continues a "
                             "single-process or --parallel data run)")
        if args.parallel == "hogwild":
            from .parallel.hogwild import run_hogwild
            model, report = run_hogwild(cfg, workers=args.workers, progress=not args.quiet)
        else:
            from .parallel.ps import run_parameter_server
            model, report = run_parameter_server(cfg, workers=args.workers, servers=args.servers,
                                                 consistency=args.consistency, address=args.address,
                                                 checkpoint_every=args.ps_checkpoint_every, progress=not args.quiet)
        Path(checkpoint).parent.mkdir(parents=True, exist_ok=True)
        from dataclasses import asdict

        from .checkpoint import save_checkpoint
        save_checkpoint(checkpoint, model, asdict(cfg), cfg.epochs, [asdict(r) for r in report.history.records])
        print(f"final model: {checkpoint}")
        if args.plot:
            from .train import plot_history
            plot_history(report.history, args.plot)
            print(f"curves written to {args.plot}")
        return 0
    train(cfg, checkpoint=checkpoint, resume=args.resume, plot=args.plot, progress=not args.quiet)
    print(f"checkpoint: {checkpoint}")
    return 0


def _train_data_parallel(args, cfg, checkpoint) -> int:
    """One rank of `mpiexec -n N dnnpar train --parallel data`: any failure ends the whole job."""
    from .parallel.comm import make_communicator
    from .parallel.data_parallel import run_data_parallel

    if cfg.backend:  # before the communicator: "auto" picks NCCL for the cuda backend
        from .backend import set_backend
        set_backend(cfg.backend)
    from .parallel.comm import DEFAULT_TIMEOUT
    from .parallel.data_parallel import DEFAULT_BUCKET_MB

    comm = make_communicator(args.comm, timeout=DEFAULT_TIMEOUT if args.timeout is None else args.timeout)
    bucket_mb = DEFAULT_BUCKET_MB if args.bucket_mb is None else args.bucket_mb
    _, _, par = run_data_parallel(cfg, comm, bucket_mb=bucket_mb, checkpoint=checkpoint, resume=args.resume,
                                  plot=args.plot, progress=not args.quiet)
    if par.is_root:
        print(f"checkpoint: {checkpoint}; allreduce: {par.bytes_reduced / 2**20:,.1f} MiB in {par.steps} steps, "
              f"{par.comm_seconds:.2f} s on rank 0")
    return 0


def _compress(args) -> int:
    import json

    from .compress.pipeline import CompressConfig, compress, save
    from .data import fashion_mnist
    from .nn.models import build

    be = None
    if args.backend:
        from .backend import set_backend
        be = set_backend(args.backend)
    quality = json.loads(args.quality) if args.quality.strip().startswith("{") else float(args.quality)
    cfg = CompressConfig(quality=quality, cycles=args.cycles, retrain_epochs=args.retrain_epochs,
                         finetune_epochs=args.finetune_epochs, conv_bits=args.conv_bits, fc_bits=args.fc_bits,
                         conv_index_bits=args.conv_index_bits, fc_index_bits=args.fc_index_bits, init=args.init,
                         lr=args.lr, finetune_lr=args.finetune_lr, weight_decay=args.weight_decay,
                         seed=args.seed)
    model = build(args.model)
    model.load(args.checkpoint)
    data = fashion_mnist.load(args.data_dir, args.subset)
    print(f"compressing {model.name} from {args.checkpoint} on {data!r}" + (f", backend {be.name}" if be else ""))
    from .backend import get_backend
    before = {n: get_backend().to_numpy(p).copy() for n, p, _ in model.named_parameters() if n.endswith(".weight")}
    codes, report, log = compress(model, data, cfg, progress=not args.quiet)
    if args.plot:
        from .compress.encode import plot_histograms
        plot_histograms({k.rsplit(".", 1)[0]: v for k, v in before.items()}, codes, args.plot)
        print(f"weight histograms written to {args.plot}")
    save(args.out, model, codes, meta={"accuracy": log, "config": cfg.__dict__})
    print(report.table())
    print(f"accuracy: {100 * log['baseline']:.2f}% dense -> {100 * log['final']:.2f}% compressed "
          f"({100 * (log['final'] - log['baseline']):+.2f} points); wrote {args.out}")
    return 0


def _plan(args) -> int:
    from .parallel.plan import run_from_args
    return run_from_args(args)


def _sensitivity(args) -> int:
    from .compress import prune
    from .data import fashion_mnist
    from .nn.models import build
    from .train import evaluate

    if args.backend:
        from .backend import set_backend
        set_backend(args.backend)
    sparsities = tuple(args.sparsities)
    if not sparsities or any(not 0.0 <= s < 1.0 for s in sparsities):
        raise ValueError(f"--sparsities must be fractions in [0, 1), got {list(sparsities)}")
    model = build(args.model)
    model.load(args.checkpoint)
    data = fashion_mnist.load(args.data_dir, args.subset)
    if args.limit:
        data = fashion_mnist.Dataset(data.x_train, data.y_train, data.x_test[:args.limit], data.y_test[:args.limit],
                                     data.source)
    score = lambda m: evaluate(m, data.x_test, data.y_test)  # noqa: E731
    dense = score(model)
    layers = args.layers or None
    result = prune.sensitivity(model, score, sparsities=sparsities, layers=layers)
    print(f"{model.name}: test accuracy with one layer pruned (no retraining); dense {100 * dense:.2f}% "
          f"on {len(data.y_test):,} test images")
    print(prune.sensitivity_table(result))
    if args.plot:
        sizes = {n: int(model[n].params["weight"].size) for n in result}
        prune.plot_sensitivity(result, dense, sizes, title=f"{model.name}: one layer pruned at a time", path=args.plot)
        print(f"plot written to {args.plot}")
    return 0


def _evaluate(args) -> int:
    import os

    from .compress.pipeline import load, read_codes
    from .compress.encode import Report
    from .data import fashion_mnist
    from .train import evaluate

    header, codes, others = read_codes(args.path)
    model = load(args.path, sparse=not args.dense)
    data = fashion_mnist.load(args.data_dir, args.subset)
    acc = evaluate(model, data.x_test, data.y_test)
    report = Report(header["model"], codes, int(sum(v.size for v in others.values())))
    print(report.table())
    orig, _, _ = report.totals()
    size = os.path.getsize(args.path)
    print(f"{args.path}: {size:,} bytes on disk ({orig / 8 / size:.1f}x smaller than the float32 weights), "
          f"test accuracy {100 * acc:.2f}% on {len(data.y_test):,} images "
          f"({'dense decode' if args.dense else 'fc layers run as CSR x codebook'})")
    return 0


def main(argv=None) -> int:
    from .nn.models import MODELS

    ap = argparse.ArgumentParser(prog="dnnpar", description="fast and parallel DNNs from hand-written CUDA kernels")
    sub = ap.add_subparsers(dest="command", required=True)
    backend = dict(choices=("numpy", "cuda", "emu"), default=None, help="default: cuda when a GPU is usable, else numpy")

    d = sub.add_parser("demo", help="train LeNet-5 on the embedded Fashion-MNIST sample: summary and accuracy")
    d.add_argument("--backend", **backend)
    d.add_argument("--epochs", type=int, default=4)
    d.set_defaults(fn=_demo)

    t = sub.add_parser("tour", help="the convolution tour: direct loop vs im2col + GEMM on the active backend")
    t.add_argument("--backend", **backend)
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--repeat", type=int, default=5, help="timed runs per algorithm (median reported)")
    t.set_defaults(fn=_tour)

    s = sub.add_parser("summary", help="per-layer shapes, parameters, MACs and memory of a model")
    s.add_argument("model", choices=sorted(MODELS))
    s.add_argument("--batch-size", type=int, default=1)
    s.add_argument("--alpha", type=float, default=1.0, help="mobilenet_v1 width multiplier")
    s.add_argument("--resolution", type=int, default=224, help="mobilenet_v1 input resolution")
    s.add_argument("--groups", type=int, default=1, help="alexnet: 2 for the original two-tower net")
    s.set_defaults(fn=_summary)

    tr = sub.add_parser("train", help="train a model on Fashion-MNIST")
    tr.add_argument("--model", choices=sorted(MODELS), default="lenet5")
    tr.add_argument("--epochs", type=int, default=10)
    tr.add_argument("--batch-size", type=int, default=64)
    tr.add_argument("--lr", type=float, default=0.01)
    tr.add_argument("--momentum", type=float, default=0.9)
    tr.add_argument("--nesterov", action="store_true")
    tr.add_argument("--weight-decay", type=float, default=5e-4)
    tr.add_argument("--schedule", choices=("cosine", "step", "constant"), default="cosine")
    tr.add_argument("--seed", type=int, default=0)
    tr.add_argument("--subset", choices=("full", "embedded"), default="full",
                    help="full: the 70,000 images (see --data-dir); embedded: the sample inside the package")
    tr.add_argument("--data-dir", default=None, help="folder with the four Fashion-MNIST .gz files")
    tr.add_argument("--backend", **backend)
    tr.add_argument("--checkpoint", default=None, help="checkpoint file, written each epoch (default checkpoints/MODEL.npz)")
    tr.add_argument("--resume", action="store_true", help="continue from --checkpoint")
    tr.add_argument("--plot", default=None, help="write the loss/accuracy curves to this PNG")
    tr.add_argument("--quiet", action="store_true", help="no progress bar")
    par = tr.add_argument_group("parallel training")
    par.add_argument("--parallel", choices=("none", "data", "hogwild", "ps"), default="none",
                     help="data: synchronous allreduce over MPI/NCCL (launch with mpiexec -n N); hogwild: lock-free "
                          "workers over shared memory; ps: parameter server on Ray")
    par.add_argument("--comm", choices=("auto", "mpi", "nccl"), default="auto",
                     help="data: the allreduce engine (auto: NCCL on the cuda backend, else MPI)")
    par.add_argument("--bucket-mb", type=float, default=None,
                     help="data: gradient bucket size in MiB for the fused allreduce (default 4; keep it under 32: "
                          "above, glibc maps MPI's temporary buffer anew, page faults and all, on every call)")
    par.add_argument("--timeout", type=float, default=None,
                     help="data: seconds a collective may wait for a rank before the job is aborted "
                          "(default: $DNNPAR_COMM_TIMEOUT, else 120)")
    par.add_argument("--workers", type=int, default=2, help="hogwild / ps: worker count")
    par.add_argument("--servers", type=int, default=1, help="ps: parameter-server shards")
    par.add_argument("--consistency", default="asp", help="ps: bsp | asp | ssp:S (staleness bound S)")
    par.add_argument("--address", default=None, help="ps: a Ray cluster address (default: a local Ray)")
    par.add_argument("--ps-checkpoint-every", type=int, default=50,
                     help="ps: each server shard checkpoints every K updates (restarted from it after a crash)")
    tr.set_defaults(fn=_train)

    pl = sub.add_parser("plan", help="parallel training beyond one machine: compute against communication, "
                                     "scaling efficiency for 8-512 GPUs")
    from .parallel.plan import add_arguments as plan_arguments
    plan_arguments(pl)
    pl.set_defaults(fn=_plan)

    se = sub.add_parser("sensitivity", help="pruning sensitivity: accuracy with one layer pruned at a time")
    se.add_argument("--model", choices=sorted(MODELS), default="lenet300")
    se.add_argument("--checkpoint", required=True, help="a trained model (.npz from dnnpar train)")
    se.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.8, 0.9, 0.95])
    se.add_argument("--layers", nargs="+", help="only these layers (default: every conv and fc layer)")
    se.add_argument("--limit", type=int, default=0, help="score on the first N test images only (faster)")
    se.add_argument("--subset", choices=("full", "embedded"), default="full")
    se.add_argument("--data-dir", default=None)
    se.add_argument("--backend", **backend)
    se.add_argument("--plot", default=None, help="write accuracy against sparsity to this PNG")
    se.set_defaults(fn=_sensitivity)

    c = sub.add_parser("compress", help="Deep Compression: prune, share weights, Huffman-code, write a .dnnz")
    c.add_argument("--model", choices=sorted(MODELS), default="lenet300")
    c.add_argument("--checkpoint", required=True, help="a trained model (.npz from dnnpar train)")
    c.add_argument("--out", required=True, help="the .dnnz file to write")
    c.add_argument("--quality", default="1.0",
                   help='threshold = quality x std per layer: a number, or JSON like \'{"fc1": 1.8, "fc3": 1.0}\'')
    c.add_argument("--cycles", type=int, default=3)
    c.add_argument("--retrain-epochs", type=int, default=2)
    c.add_argument("--finetune-epochs", type=int, default=2)
    c.add_argument("--conv-bits", type=int, default=8)
    c.add_argument("--fc-bits", type=int, default=5)
    c.add_argument("--conv-index-bits", type=int, default=8)
    c.add_argument("--fc-index-bits", type=int, default=5)
    c.add_argument("--init", choices=("linear", "random", "density"), default="linear")
    c.add_argument("--lr", type=float, default=0.005)
    c.add_argument("--finetune-lr", type=float, default=1e-4)
    c.add_argument("--weight-decay", type=float, default=5e-4, help="L2 while retraining the pruned model")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--subset", choices=("full", "embedded"), default="full")
    c.add_argument("--data-dir", default=None)
    c.add_argument("--backend", **backend)
    c.add_argument("--quiet", action="store_true")
    c.add_argument("--plot", default=None, help="PNG of each layer's weight histogram before/after, centroids marked")
    c.set_defaults(fn=_compress)

    ev = sub.add_parser("evaluate", help="accuracy and size of a .dnnz, run from its compressed form")
    ev.add_argument("path")
    ev.add_argument("--dense", action="store_true", help="decode every layer to dense weights instead")
    ev.add_argument("--subset", choices=("full", "embedded"), default="full")
    ev.add_argument("--data-dir", default=None)
    ev.set_defaults(fn=_evaluate)

    sub.add_parser("kernels", help="compile every kernel for sm_75/80/90 and print the ptxas report "
                   "(dnnpar kernels --help)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["kernels"]:  # its own parser: python -m dnnpar.kernels
        from . import kernels

        return kernels.main(argv[1:])
    args = ap.parse_args(argv)
    from .backend import BackendUnavailable

    try:
        return args.fn(args)
    # errors that say what to change (a Ray address that does not answer, a stalled parameter
    # server): the message, not a traceback
    except (BackendUnavailable, FileNotFoundError, ValueError, FloatingPointError, ConnectionError,
            TimeoutError) as e:
        print(f"dnnpar: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
