"""Layers with explicit forward/backward, models, optimizers and accounting."""
from .base import Layer, Sequential, load_npz, save_npz_atomic  # noqa: F401
from .conv import Conv2d, DepthwiseConv2d, PointwiseConv2d  # noqa: F401
from .layers import (AvgPool2d, BatchNorm2d, Dropout, Flatten, GlobalAvgPool2d, Linear, MaxPool2d,  # noqa: F401
                     ReLU, SoftmaxCrossEntropy)
