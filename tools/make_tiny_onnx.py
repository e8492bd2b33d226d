"""Write notebooks/data/tiny_resnet.onnx: a ResNet of a few KB for Fashion-MNIST (1x28x28 -> 10)
built with dnnpar and exported with dnnpar.interop.to_onnx, so notebooks/05_interop.ipynb has a
model to import where PyTorch is not installed. Stem conv 8@3x3 stride 2 + BN + ReLU, one basic
residual block (two 3x3 convs with BN, identity shortcut, Add, ReLU), global average pooling, fc.

    python tools/make_tiny_onnx.py [--out notebooks/data/tiny_resnet.onnx]
"""
import argparse
from pathlib import Path

from dnnpar.interop import from_onnx, to_onnx
from dnnpar.nn import Add, BatchNorm2d, Conv2d, GlobalAvgPool2d, Graph, Linear, ReLU


def tiny_resnet(channels: int = 8, num_classes: int = 10, seed: int = 0) -> Graph:
    c = channels
    return Graph([
        ("stem", Conv2d(1, c, 3, stride=2, padding=1, bias=False, seed=seed), ["input"]),
        ("stem_bn", BatchNorm2d(c), ["stem"]), ("stem_relu", ReLU(), ["stem_bn"]),
        ("b1_conv1", Conv2d(c, c, 3, padding=1, bias=False, seed=seed + 1), ["stem_relu"]),
        ("b1_bn1", BatchNorm2d(c), ["b1_conv1"]), ("b1_relu1", ReLU(), ["b1_bn1"]),
        ("b1_conv2", Conv2d(c, c, 3, padding=1, bias=False, seed=seed + 2), ["b1_relu1"]),
        ("b1_bn2", BatchNorm2d(c), ["b1_conv2"]),
        ("b1_add", Add(), ["b1_bn2", "stem_relu"]), ("b1_relu2", ReLU(), ["b1_add"]),
        ("pool", GlobalAvgPool2d(), ["b1_relu2"]), ("fc", Linear(c, num_classes, seed=seed + 3), ["pool"]),
    ], input_shape=(1, 28, 28), name="tiny_resnet")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "notebooks/data/tiny_resnet.onnx"))
    args = ap.parse_args()
    to_onnx(tiny_resnet(), args.out)
    from_onnx(args.out)  # the file imports back
    print(f"wrote {args.out} ({Path(args.out).stat().st_size} bytes)")


if __name__ == "__main__":
    main()
