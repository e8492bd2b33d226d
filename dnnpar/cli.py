"""The ``dnnpar`` command: ``dnnpar demo | kernels``."""
from __future__ import annotations

import argparse
import sys


def _demo(args) -> int:
    from .demo import convolution_tour

    return convolution_tour(backend=args.backend, batch=args.batch, repeat=args.repeat)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dnnpar", description="fast and parallel DNNs from hand-written CUDA kernels")
    sub = ap.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="the convolution tour: direct loop vs im2col + GEMM on the active backend")
    d.add_argument("--backend", choices=("numpy", "cuda", "emu"), default=None,
                   help="default: cuda when a GPU is usable, else numpy")
    d.add_argument("--batch", type=int, default=8)
    d.add_argument("--repeat", type=int, default=5, help="timed runs per algorithm (median reported)")
    d.set_defaults(fn=_demo)
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
    except BackendUnavailable as e:
        print(f"dnnpar: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
