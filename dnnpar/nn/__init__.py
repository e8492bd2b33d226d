"""Layers with explicit forward/backward, models, optimizers and accounting."""
from .base import Graph, Layer, Sequential, load_npz, save_npz_atomic  # noqa: F401
from .conv import Conv2d, DepthwiseConv2d, PointwiseConv2d  # noqa: F401
from .graph import Add, Concat, Mul  # noqa: F401
from .layers import (AvgPool2d, BatchNorm2d, Clip, ConstantOp, Dropout, Flatten, GlobalAvgPool2d,  # noqa: F401
                     HardSigmoid, HardSwish, Identity, Linear, MaxPool2d, ReLU, ReLU6, Reshape, Sigmoid, Softmax,
                     SoftmaxCrossEntropy)
from .spec import LAYER_TYPES, graph_from_spec  # noqa: F401
