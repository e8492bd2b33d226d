#!/usr/bin/env python3
"""Whole models against PyTorch CPU and ONNX Runtime CPU, measured side by side in one run.

    python benchmarks/models.py                  # ResNet- and MobileNet-v2-style nets + the zoo
    python benchmarks/models.py --quick          # smaller inputs and budgets (a few minutes)
    python benchmarks/models.py --only resnet mobilenet_v2 --out bench-out/

PLACEHOLDER
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common, also under `python -m benchmarks.models`
import _common  # noqa: E402,F401  (puts the checkout on sys.path)


# ---------------------------------------------------------------------------- the two architectures
#: (width multiplier, input (C, H, W)) of each architecture; --quick and tests pass smaller ones
RESNET = dict(width=16, in_shape=(3, 32, 32))
MOBILENET_V2 = dict(width=16, in_shape=(3, 64, 64))
#: MobileNet v2's inverted-residual stages: (expansion t, output channels as multiples of the
#: width, blocks n, first stride s), a shortened version of the paper's Table 2
MOBILENET_V2_STAGES = ((1, 1, 1, 1), (4, 1.5, 2, 2), (4, 2, 2, 2))


def torch_nets(torch):
    """PyTorch definitions of the ResNet-style and the MobileNet-v2-style net: {name: class}.

    ResNet-style: conv-BN-ReLU stem; basic blocks (two 3x3 conv-BN, a residual Add, a 1x1 conv-BN
    shortcut where the shape changes) at widths w, 2w, 4w; AvgPool 3x3 stride 1 padding 1
    (padding counted); a BatchNorm after it that no conv precedes, so every exporter keeps one
    BatchNormalization node; global average pool, flatten, Linear, optional Softmax.
    MobileNet-v2-style: conv-BN-ReLU6 stem at stride 2; inverted residuals (1x1 expand-BN-ReLU6,
    3x3 depthwise-BN-ReLU6, 1x1 project-BN, Add when the shape is kept); a Concat of a 1x1
    conv-BN-ReLU6 branch and an AvgPool 3x3 padding 1 branch (padding not counted); global
    average pool, ``x.reshape(x.shape[0], -1)``, Linear, optional Softmax."""
    nn = torch.nn

    def conv_bn(cin, cout, k=3, s=1, groups=1, act=None):
        layers = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, act()) if act is not None else nn.Sequential(*layers)

    class BasicBlock(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.body = nn.Sequential(conv_bn(cin, cout, 3, stride, act=nn.ReLU), conv_bn(cout, cout, 3))
            self.short = nn.Identity() if (cin, stride) == (cout, 1) else conv_bn(cin, cout, 1, stride)
            self.relu = nn.ReLU()

        def forward(self, x):
            return self.relu(self.body(x) + self.short(x))

    class ResNet(nn.Module):
        def __init__(self, width=16, in_shape=(3, 32, 32), num_classes=10, softmax=True):
            super().__init__()
            w = width
            self.stem = conv_bn(in_shape[0], w, act=nn.ReLU)
            self.blocks = nn.Sequential(BasicBlock(w, w, 1), BasicBlock(w, 2 * w, 2), BasicBlock(2 * w, 4 * w, 2))
            self.pool = nn.AvgPool2d(3, stride=1, padding=1)
            self.bn = nn.BatchNorm2d(4 * w)
            self.fc = nn.Linear(4 * w, num_classes)
            self.softmax = softmax

        def forward(self, x):
            x = self.bn(self.pool(self.blocks(self.stem(x))))
            x = self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))
            return torch.softmax(x, dim=1) if self.softmax else x

    class InvertedResidual(nn.Module):
        def __init__(self, cin, cout, stride, t):
            super().__init__()
            hid = cin * t
            self.res = (cin, stride) == (cout, 1)
            expand = [conv_bn(cin, hid, 1, act=nn.ReLU6)] if t != 1 else []
            self.conv = nn.Sequential(*expand, conv_bn(hid, hid, 3, stride, groups=hid, act=nn.ReLU6),
                                      conv_bn(hid, cout, 1))

        def forward(self, x):
            return x + self.conv(x) if self.res else self.conv(x)

    class MobileNetV2(nn.Module):
        def __init__(self, width=16, in_shape=(3, 64, 64), num_classes=10, softmax=True):
            super().__init__()
            self.stem = conv_bn(in_shape[0], width, 3, 2, act=nn.ReLU6)
            blocks, c = [], width
            for t, mult, n, s in MOBILENET_V2_STAGES:
                for k in range(n):
                    blocks.append(InvertedResidual(c, int(mult * width), s if k == 0 else 1, t))
                    c = int(mult * width)
            self.blocks = nn.Sequential(*blocks)
            self.branch = conv_bn(c, c, 1, act=nn.ReLU6)
            self.pool = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
            self.fc = nn.Linear(2 * c, num_classes)
            self.softmax = softmax

        def forward(self, x):
            x = self.blocks(self.stem(x))
            x = nn.functional.adaptive_avg_pool2d(torch.cat([self.branch(x), self.pool(x)], dim=1), 1)
            x = self.fc(x.reshape(x.shape[0], -1))
            return torch.softmax(x, dim=1) if self.softmax else x

    return {"resnet": ResNet, "mobilenet_v2": MobileNetV2}


def dnnpar_nets():
    """The same two architectures as dnnpar Graphs ({name: builder(width, in_shape, num_classes,
    softmax, seed)}): what the benchmark exports with to_onnx when torch is not importable."""
    from dnnpar import nn
    from dnnpar.nn.graph import Add, Concat

    def resnet(width=16, in_shape=(3, 32, 32), num_classes=10, softmax=True, seed=0):
        nodes, w = [], width

        def conv_bn(name, x, cin, cout, k=3, s=1, groups=1, act=None):
            nodes.append((f"{name}.conv", nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False,
                                                    seed=seed + len(nodes)), [x]))
            nodes.append((f"{name}.bn", nn.BatchNorm2d(cout), [f"{name}.conv"]))
            if act is None:
                return f"{name}.bn"
            nodes.append((f"{name}.act", act(), [f"{name}.bn"]))
            return f"{name}.act"

        x = conv_bn("stem", "input", in_shape[0], w, act=nn.ReLU)
        for b, (cin, cout, s) in enumerate([(w, w, 1), (w, 2 * w, 2), (2 * w, 4 * w, 2)]):
            y = conv_bn(f"block{b}.body1", conv_bn(f"block{b}.body0", x, cin, cout, 3, s, act=nn.ReLU), cout, cout)
            skip = x if (cin, s) == (cout, 1) else conv_bn(f"block{b}.short", x, cin, cout, 1, s)
            nodes += [(f"block{b}.add", Add(), [y, skip]), (f"block{b}.relu", nn.ReLU(), [f"block{b}.add"])]
            x = f"block{b}.relu"
        nodes += [("pool", nn.AvgPool2d(3, 1, 1), [x]), ("bn", nn.BatchNorm2d(4 * w), ["pool"]),
                  ("gap", nn.GlobalAvgPool2d(), ["bn"]), ("fc", nn.Linear(4 * w, num_classes, seed=seed), ["gap"])]
        if softmax:
            nodes.append(("softmax", nn.Softmax(1), ["fc"]))
        return nn.Graph(nodes, input_shape=tuple(in_shape), name="resnet_style")

    def mobilenet_v2(width=16, in_shape=(3, 64, 64), num_classes=10, softmax=True, seed=0):
        nodes = []

        def conv_bn(name, x, cin, cout, k=3, s=1, groups=1, act=None):
            nodes.append((f"{name}.conv", nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False,
                                                    seed=seed + len(nodes)), [x]))
            nodes.append((f"{name}.bn", nn.BatchNorm2d(cout), [f"{name}.conv"]))
            if act is None:
                return f"{name}.bn"
            nodes.append((f"{name}.act", act(), [f"{name}.bn"]))
            return f"{name}.act"

        x, c, b = conv_bn("stem", "input", in_shape[0], width, 3, 2, act=nn.ReLU6), width, 0
        for t, mult, n, s in MOBILENET_V2_STAGES:
            for k in range(n):
                cout, stride, hid = int(mult * width), s if k == 0 else 1, c * t
                y = conv_bn(f"ir{b}.expand", x, c, hid, 1, act=nn.ReLU6) if t != 1 else x
                y = conv_bn(f"ir{b}.dw", y, hid, hid, 3, stride, groups=hid, act=nn.ReLU6)
                y = conv_bn(f"ir{b}.project", y, hid, cout, 1)
                if (c, stride) == (cout, 1):
                    nodes.append((f"ir{b}.add", Add(), [y, x]))
                    y = f"ir{b}.add"
                x, c, b = y, cout, b + 1
        branch = conv_bn("branch", x, c, c, 1, act=nn.ReLU6)
        nodes += [("pool", nn.AvgPool2d(3, 1, 1, count_include_pad=False), [x]),
                  ("cat", Concat(), [branch, "pool"]), ("gap", nn.GlobalAvgPool2d(keepdims=True), ["cat"]),
                  ("flatten", nn.Flatten(), ["gap"]), ("fc", nn.Linear(2 * c, num_classes, seed=seed), ["flatten"])]
        if softmax:
            nodes.append(("softmax", nn.Softmax(1), ["fc"]))
        return nn.Graph(nodes, input_shape=tuple(in_shape), name="mobilenet_v2_style")

    return {"resnet": resnet, "mobilenet_v2": mobilenet_v2}
