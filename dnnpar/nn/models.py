"""The model zoo: LeNet-300-100, LeNet-5 (Caffe), AlexNet (2012, one or two towers), VGG-16,
MobileNet v1. Every constructor is seeded and returns a :class:`Sequential` with ``input_shape``."""
from __future__ import annotations

from .base import Sequential
from .conv import Conv2d, DepthwiseConv2d, PointwiseConv2d
from .layers import BatchNorm2d, Dropout, Flatten, GlobalAvgPool2d, Linear, MaxPool2d, ReLU


def lenet300(num_classes: int = 10, in_shape=(1, 28, 28), seed: int = 0) -> Sequential:
    """LeNet-300-100: 784-300-100-10 fully connected (266,610 parameters)."""
    n_in = in_shape[0] * in_shape[1] * in_shape[2]
    return Sequential(("flatten", Flatten()),
                      ("fc1", Linear(n_in, 300, seed=seed)), ("relu1", ReLU()),
                      ("fc2", Linear(300, 100, seed=seed + 1)), ("relu2", ReLU()),
                      ("fc3", Linear(100, num_classes, seed=seed + 2)),
                      input_shape=in_shape, name="lenet300")


def lenet5(num_classes: int = 10, in_shape=(1, 28, 28), seed: int = 0) -> Sequential:
    """Caffe's LeNet: conv 20@5x5, pool, conv 50@5x5, pool, fc 500, ReLU, fc 10 (431,080 parameters)."""
    c, h, w = in_shape
    flat = 50 * (((h - 4) // 2 - 4) // 2) * (((w - 4) // 2 - 4) // 2)
    return Sequential(("conv1", Conv2d(c, 20, 5, seed=seed)), ("pool1", MaxPool2d(2)),
                      ("conv2", Conv2d(20, 50, 5, seed=seed + 1)), ("pool2", MaxPool2d(2)),
                      ("flatten", Flatten()),
                      ("fc1", Linear(flat, 500, seed=seed + 2)), ("relu1", ReLU()),
                      ("fc2", Linear(500, num_classes, seed=seed + 3)),
                      input_shape=in_shape, name="lenet5")


def alexnet(num_classes: int = 1000, groups: int = 1, in_shape=(3, 227, 227), dropout: float = 0.5,
            seed: int = 0) -> Sequential:
    """AlexNet as in Krizhevsky et al. 2012 (Caffe's bvlc_alexnet layout, without LRN).

    ``groups=2`` is the original two-tower net: conv2, conv4 and conv5 see only the maps of their
    own half (60,965,224 parameters); conv3 and the fc layers see both. ``groups=1`` is the same
    net on one device (62,378,344 parameters)."""
    if groups not in (1, 2):
        raise ValueError(f"alexnet: groups must be 1 or 2, got {groups}")
    g = groups
    layers = [("conv1", Conv2d(in_shape[0], 96, 11, stride=4, seed=seed)), ("relu1", ReLU()),
              ("pool1", MaxPool2d(3, 2)),
              ("conv2", Conv2d(96, 256, 5, padding=2, groups=g, seed=seed + 1)), ("relu2", ReLU()),
              ("pool2", MaxPool2d(3, 2)),
              ("conv3", Conv2d(256, 384, 3, padding=1, seed=seed + 2)), ("relu3", ReLU()),
              ("conv4", Conv2d(384, 384, 3, padding=1, groups=g, seed=seed + 3)), ("relu4", ReLU()),
              ("conv5", Conv2d(384, 256, 3, padding=1, groups=g, seed=seed + 4)), ("relu5", ReLU()),
              ("pool5", MaxPool2d(3, 2)), ("flatten", Flatten())]
    flat = Sequential(*layers, input_shape=in_shape).output_shape(in_shape)[0]
    layers += [("fc6", Linear(flat, 4096, seed=seed + 5)), ("relu6", ReLU()), ("drop6", Dropout(dropout, seed=seed + 6)),
               ("fc7", Linear(4096, 4096, seed=seed + 7)), ("relu7", ReLU()), ("drop7", Dropout(dropout, seed=seed + 8)),
               ("fc8", Linear(4096, num_classes, seed=seed + 9))]
    return Sequential(*layers, input_shape=in_shape, name=f"alexnet{'-2tower' if g == 2 else ''}")


VGG16_CFG = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"]


def vgg16(num_classes: int = 1000, in_shape=(3, 224, 224), dropout: float = 0.5, seed: int = 0) -> Sequential:
    """VGG-16 (configuration D): 13 conv 3x3 + 3 fc, 138,357,544 parameters at 224x224."""
    layers, c, block, idx = [], in_shape[0], 1, 1
    for v in VGG16_CFG:
        if v == "M":
            layers.append((f"pool{block}", MaxPool2d(2)))
            block, idx = block + 1, 1
            continue
        layers += [(f"conv{block}_{idx}", Conv2d(c, v, 3, padding=1, seed=seed + len(layers))),
                   (f"relu{block}_{idx}", ReLU())]
        c, idx = v, idx + 1
    layers.append(("flatten", Flatten()))
    flat = Sequential(*layers, input_shape=in_shape).output_shape(in_shape)[0]
    layers += [("fc6", Linear(flat, 4096, seed=seed + 100)), ("relu6", ReLU()), ("drop6", Dropout(dropout, seed=seed + 101)),
               ("fc7", Linear(4096, 4096, seed=seed + 102)), ("relu7", ReLU()), ("drop7", Dropout(dropout, seed=seed + 103)),
               ("fc8", Linear(4096, num_classes, seed=seed + 104))]
    return Sequential(*layers, input_shape=in_shape, name="vgg16")


# (output channels, stride) of the 13 depthwise-separable blocks of MobileNet v1
MOBILENET_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2), (512, 1), (512, 1), (512, 1),
                    (512, 1), (512, 1), (1024, 2), (1024, 1)]


def mobilenet_v1(alpha: float = 1.0, resolution: int = 224, num_classes: int = 1000, in_channels: int = 3,
                 seed: int = 0) -> Sequential:
    """MobileNet v1 (Howard et al. 2017) with width multiplier ``alpha`` and input ``resolution``:
    a full 3x3 conv, then 13 blocks of depthwise 3x3 + BN + ReLU, pointwise 1x1 + BN + ReLU,
    global average pooling and one fc layer. 1.0-224: 4.2 M parameters, 569 M multiply-adds."""
    if alpha <= 0 or resolution < 32:
        raise ValueError(f"mobilenet_v1: need alpha > 0 and resolution >= 32, got {alpha}, {resolution}")

    def ch(c):
        return max(8, int(c * alpha))

    c = ch(32)
    layers = [("conv0", Conv2d(in_channels, c, 3, stride=2, padding=1, bias=False, seed=seed)),
              ("bn0", BatchNorm2d(c)), ("relu0", ReLU())]
    for i, (out, stride) in enumerate(MOBILENET_BLOCKS, 1):
        o = ch(out)
        layers += [(f"dw{i}", DepthwiseConv2d(c, 3, stride=stride, padding=1, bias=False, seed=seed + 2 * i)),
                   (f"dw{i}_bn", BatchNorm2d(c)), (f"dw{i}_relu", ReLU()),
                   (f"pw{i}", PointwiseConv2d(c, o, bias=False, seed=seed + 2 * i + 1)),
                   (f"pw{i}_bn", BatchNorm2d(o)), (f"pw{i}_relu", ReLU())]
        c = o
    layers += [("pool", GlobalAvgPool2d()), ("fc", Linear(c, num_classes, seed=seed + 99))]
    return Sequential(*layers, input_shape=(in_channels, resolution, resolution),
                      name=f"mobilenet_v1_{alpha:g}_{resolution}")


MODELS = {"lenet300": lenet300, "lenet5": lenet5, "alexnet": alexnet, "vgg16": vgg16, "mobilenet_v1": mobilenet_v1}


def build(name: str, **kwargs) -> Sequential:
    """A model by name (``MODELS``); keyword arguments go to its constructor."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}: one of {', '.join(MODELS)}")
    return MODELS[name](**kwargs)
