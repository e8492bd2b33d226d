"""Functional ops: validate, pick a launch shape, run a kernel (cuda / emu) or the NumPy reference."""
from .conv import col2im, conv2d, conv2d_backward, im2col  # noqa: F401
from .depthwise import depthwise_conv2d, depthwise_conv2d_backward  # noqa: F401
from .gemm import gemm  # noqa: F401
from .gemm import precision_algo as gemm_precision_algo  # noqa: F401
from .loss import softmax_cross_entropy  # noqa: F401
from .norm import batch_norm, batch_norm_backward  # noqa: F401
from .pool import avg_pool2d, avg_pool2d_backward, max_pool2d, max_pool2d_backward  # noqa: F401
from .sparse import spmm, spmv  # noqa: F401

__all__ = ["conv2d", "conv2d_backward", "depthwise_conv2d", "depthwise_conv2d_backward", "im2col", "col2im",
           "gemm", "spmv", "spmm", "softmax_cross_entropy", "batch_norm", "batch_norm_backward",
           "max_pool2d", "max_pool2d_backward", "avg_pool2d", "avg_pool2d_backward"]
