"""Convolution ops: im2col / col2im (``cuda/im2col.cu``), conv2d as im2col + GEMM, as the
direct loop (``cuda/conv_direct.cu``) or as an implicit GEMM (``cuda/conv_implicit.cu``), and its
backward pass (GEMMs + col2im, or implicit GEMMs).

Layouts: x is NCHW, w is OIHW; im2col's matrix is
(C*KH*KW, N*OH*OW), rows (c, kh, kw), columns (n, oh, ow).
The ``*_numpy`` references beside each launcher are the numpy backend's implementation and are
dtype-generic (float64 inputs, inside ``dp.precision("float64")``, give a float64 result). They
read each kernel tap's window of the unpadded input (:meth:`ConvGeometry.tap_window`), so no
padded copy of x is made whatever the padding.

On the numpy backend, float32 im2col / col2im and the GEMM's epilogues (bias + ReLU / ReLU6 ->
NCHW forward; dy -> GEMM layout with the activation's mask and db backward) run natively
(``dnnpar/cpu/conv.cpp``, built at first use, see :mod:`dnnpar.backend.cpu_native`); the NumPy
code is the fallback without a compiler, the float64 path, and what ``NATIVE["use"] = False`` (or
``DNNPAR_NATIVE=0``) selects.
"""
from __future__ import annotations

import re
from typing import NamedTuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..backend import compute_dtype, cpu_native, get_backend
from ..backend.sources import read_source
from ..nvtx import annotate_range, ranged
from ._common import (ConvGeometry, _plain_ints, as_int, check_array, check_count, check_same_dtype,
                      grid_stride_blocks, i32, plane_grid)
from .activation import activate_, activation_grad, check_activation
from .gemm import gemm, gemm_numpy

ALGOS = ("im2col", "direct", "implicit_gemm")
IGEMM_TARGET_BLOCKS = 264  # dw splits its reduction until about this many blocks (2 per SM of a 132-SM GPU)
IGEMM_MIN_CHUNK = 256      # ... but never into ranges shorter than this (partial buffers cost memory traffic)
MAX_GRID_YZ = 65535
#: the native glue's switch (tests, benchmarks): False keeps the numpy backend on NumPy
NATIVE = {"use": True}


def native_library(*arrays):
    """The native conv library when it takes a numpy-backend call on these operands (NumPy
    float32 arrays, NATIVE["use"] on, the library built here), else None."""
    return cpu_native.takes("conv", NATIVE["use"], *arrays)


#: narrowest output rows the native im2col / col2im take: below them a row of one image is a few
#: floats and NumPy's whole-tap strided copies win (``benchmarks/conv_fusion.py`` prints both paths).
#: Measured on 2 AVX-512 cores (December 2026), numpy against native: im2col of LeNet-5's conv2
#: (64x20x12^2, 5x5, 8 columns) 1.50 / 0.39 ms, 16x128x4^2 3x3 0.25 / 0.16, 16x512x2^2 0.21 / 0.32;
#: col2im 16x128x4^2 0.61 / 0.14, 16x512x2^2 0.34 / 0.39.
NATIVE_MIN_OW = {"im2col": 4, "col2im": 4}
#: smallest output (elements) the native epilogues take: a call costs ~10 us of fixed overhead
#: (ctypes, the thread team), more than NumPy's whole epilogue below this (measured on 2 cores:
#: 512 x 4 outputs 11 against 7 us, 512 x 16 even, 128 x 256 12 against 22 us)
NATIVE_MIN_EPILOGUE = {"size": 8192}


#: the register-tiled direct kernels (dnnpar/cpu/conv.cpp) on the numpy backend, and where they
#: beat BLAS on im2col (measured on 2 AVX-512 cores, ``benchmarks/kernels.py --only conv`` prints
#: both paths): "use" False keeps the BLAS paths. Two families: vectors over output "positions"
#: (grid rows, padding computed and dropped) and over output "channels" (the outputs alone,
#: channels padded to whole vectors, but dy or y transposed between NCHW and its
#: [position][channel] layout, one scalar move per element); a layer takes the family of the
#: higher efficiency (ties: channels), unless "vectors" names one. Efficiency: the share of the
#: family's lanes that are real outputs (positions: a padded row computes Wq - OW dropped
#: columns, small planes their dropped rows too; channels: O of the vectors' lanes), for
#: channels times K / (K + cost), K = C*KH*KW the reduction, cost "channels_cost" (forward)
#: or "channels_cost_backward" (dW): the reduction whose vector FMAs per output cost what the
#: transpose does. Measured on 2 AMD EPYC (Zen 4) cores (2026-12-03, batch 64, ms forward / dW,
#: positions against channels): 3 -> 16 3x3 at 32x32 0.56 / 1.15 against 0.72 / 1.76; 16 -> 64
#: 1x1 at 32x32 2.18 / 4.03 against 4.26 / 5.66; 16 -> 16 3x3 at 32x32 2.47 / 5.04 against
#: 2.73 / 4.56; 32 -> 32 3x3 at 16x16 3.67 / 7.96 against 3.50 / 4.04; 64 -> 64 3x3 at 8x8 (64
#: of 100 grid positions kept) 2.86 / 5.99 against 2.83 / 2.83 (batch 16: 1.55 / 2.34 against
#: 1.09 / 0.64). "min_efficiency": the smallest efficiency the chosen family may have;
#: "max_k": the largest reduction C*KH*KW (beyond it BLAS's larger blocks win: 128 -> 256
#: channels at 8x8 ran 2.1x slower tiled); "min_plane_1x1": a 1x1 kernel only on planes of at
#: least this many outputs (on 3x3 .. 12x12 planes one GEMM over the batch is 1.1-2x faster);
#: "min_positions_backward": the positions family's dW reduces over N*OH*OW positions, too few
#: of them per tile cost more than BLAS (a 64-channel 8x8 layer at batch 1 took 2x longer; the
#: channels family's took 0.42 of BLAS's time there, and has no such limit);
#: "min_positions_large_k": beyond "max_k", the tiled kernels still run from this many output
#: positions N*OH*OW on (measured December 2026 against im2col + GEMM, forward / backward ms:
#: AlexNet's 96 -> 256 5x5 at 27x27, batch 8, 27 / 75 against 33 / 83; 128 -> 128 at 112x112,
#: batch 2, 31 / 67 against 53 / 124; 128 -> 128 at 16x16, batch 16, 4.6 / 12.6 against 7.2 /
#: 15.2; below it BLAS wins: 384 -> 384 at 13x13, batch 8, 19 / 72 against 15 / 43)
TILED = {"use": True, "vectors": None, "channels_cost": 32, "channels_cost_backward": 8, "min_efficiency": 0.6,
         "max_k": 600, "min_plane_1x1": 256, "min_positions_backward": 1024, "min_positions_large_k": 4096}


def tiled_efficiency(g: ConvGeometry, tile: int) -> float:
    """The share of the positions family's computed grid positions that are outputs of ``g``
    (see dnnpar/cpu/conv.cpp: rows of Wq = ceil((W + 2 PW) / SW) positions, OW of them kept;
    an image's OH rows rounded up to whole tiles of ``tile`` positions, or, where those are fewer
    than 4 tiles, its Hq = ceil((H + 2 PH) / SH) rows run across images)."""
    hq = -(-(g.h + 2 * g.padding[0]) // g.stride[0])
    wq = -(-(g.w + 2 * g.padding[1]) // g.stride[1])
    run = g.oh * wq
    computed = -(-run // tile) * tile if run >= 4 * tile else hq * wq
    return g.oh * g.ow / computed


def channel_efficiency(o: int, vl: int, cvmax: int) -> float:
    """The share of the channels family's lanes that are real output channels: O of the
    ceil(O / (CV*VL)) blocks of CV = min(CVMAX, ceil(O / VL)) vectors."""
    width = min(cvmax, -(-o // vl)) * vl
    return o / (-(-o // width) * width)


def tiled_kernel(g: ConvGeometry, o: int, *arrays, backward: bool = False) -> str | None:
    """The tiled family ("positions" or "channels") that takes this one-group geometry with ``o``
    output channels on these operands, else None (the BLAS paths): C-contiguous float32 NumPy
    arrays; TILED and NATIVE on; TILED's limits; padded planes within twice the input plus the
    im2col matrix; not a 1x1 kernel with a stride, which reads a quarter of the padded input it
    packs. ``backward``: for dW (and dx)."""
    taps = g.kh * g.kw
    (sh, sw), (ph, pw) = g.stride, g.padding
    grid = g.n * (-(-(g.h + 2 * ph) // sh) * sh) * (-(-(g.w + 2 * pw) // sw) * sw)  # packed floats per channel
    if (not TILED["use"] or (g.c * taps > TILED["max_k"] and g.n * g.oh * g.ow < TILED["min_positions_large_k"])
            # the packed planes hold the padding: never far beyond the input or the im2col matrix
            # BLAS would build (padding 2**30 around one pixel is valid, and BLAS's path is cheap)
            or grid > 2 * g.n * g.h * g.w + taps * g.n * g.oh * g.ow + (1 << 16)
            or (taps == 1 and (g.stride != (1, 1) or g.oh * g.ow < TILED["min_plane_1x1"]))
            or not all(a is None or (isinstance(a, np.ndarray) and a.flags.c_contiguous) for a in arrays)):
        return None
    if native_library(*arrays) is None:
        return None
    shape = cpu_native.conv_tiled_shape()
    k = g.c * taps
    eff = {"positions": tiled_efficiency(g, shape["fnv"] * shape["vl"]),
           "channels": channel_efficiency(o, shape["vl"], shape["cvmax"])
           * k / (k + TILED["channels_cost_backward" if backward else "channels_cost"])}
    if backward and g.n * g.oh * g.ow < TILED["min_positions_backward"]:
        eff["positions"] = 0.0
    family = TILED["vectors"] or max(("channels", "positions"), key=eff.__getitem__)  # ties: channels
    return family if eff[family] >= TILED["min_efficiency"] else None


def chan_dx_ok(g: ConvGeometry, o: int, *arrays) -> bool:
    """Whether the channels family's scatter kernel takes dx of this strided one-group geometry
    (``o`` output channels) on these operands: TILED on and not forced to positions, C-contiguous
    float32 NumPy arrays, the zero-padded image (Hp x Wp) within twice the input plus its taps'
    outputs, and TILED["min_efficiency"] of its lanes (C of the vectors' lanes, times
    K / (K + channels_cost_backward) with K = O*KH*KW). Stride 1 keeps the flipped forward.
    Measured on 2 AMD EPYC (Zen 4) cores (2026-12-03, ms, against dcols = W^T dY + col2im): 16 -> 32
    3x3 stride 2 at 32x32, batch 64, 1.23 against 5.20; 32 -> 64 at 16x16 2.03 against 4.37;
    64 -> 128 at 16x16, batch 16, 1.17 against 2.75; 16 -> 32 1x1 stride 2, batch 64, 0.51
    against 0.88."""
    (ph, pw) = g.padding
    if (not TILED["use"] or TILED["vectors"] == "positions" or g.stride == (1, 1)
            or (g.h + 2 * ph) * (g.w + 2 * pw) > 2 * g.h * g.w + g.kh * g.kw * g.oh * g.ow + (1 << 16)
            or not all(a is None or (isinstance(a, np.ndarray) and a.flags.c_contiguous) for a in arrays)
            or native_library(*arrays) is None):
        return False
    shape = cpu_native.conv_tiled_shape()
    k = o * g.kh * g.kw
    eff = channel_efficiency(g.c, shape["vl"], shape["cvmax"]) * k / (k + TILED["channels_cost_backward"])
    return eff >= TILED["min_efficiency"]


def _native_geo(g: ConvGeometry):
    return (g.n, g.c, g.h, g.w, g.kh, g.kw, g.oh, g.ow, *g.stride, *g.padding, *g.dilation)


# ---------------------------------------------------------------- NumPy references
def im2col_numpy(x, g: ConvGeometry):
    cols = np.zeros((g.c, g.kh, g.kw, g.n, g.oh, g.ow), dtype=x.dtype)
    for i, j, (oh, ow), (ih, iw) in g.taps():
        cols[:, i, j, :, oh, ow] = x[:, :, ih, iw].transpose(1, 0, 2, 3)
    return cols.reshape(g.cols_shape)


def col2im_numpy(cols, g: ConvGeometry):
    dx = np.zeros((g.n, g.c, g.h, g.w), dtype=cols.dtype)
    c6 = cols.reshape(g.c, g.kh, g.kw, g.n, g.oh, g.ow)
    for i, j, (oh, ow), (ih, iw) in g.taps():
        dx[:, :, ih, iw] += c6[:, i, j, :, oh, ow].transpose(1, 0, 2, 3)
    return dx


def conv2d_dx_numpy(w, dyt, g: ConvGeometry):
    """dx of a convolution without the dcols matrix and col2im, from dy as (N*OH*OW, O) rows (the
    transposed view of the (O, N*OH*OW) GEMM layout: BLAS reads it transposed): for each kernel
    tap one GEMM (N*OH*OW, O) @ (O, C), added into the tap's strided window of an NHWC gradient.
    About twice as fast as dcols + col2im on LeNet-sized layers (contiguous adds, no 6-D transpose)."""
    wt = np.ascontiguousarray(w.transpose(2, 3, 0, 1))                       # (KH, KW, O, C)
    dxh = np.zeros((g.n, g.h, g.w, g.c), dtype=np.result_type(w, dyt))
    for i, j, (oh, ow), (ih, iw) in g.taps():
        dxh[:, ih, iw] += gemm_numpy(dyt, wt[i, j]).reshape(g.n, g.oh, g.ow, g.c)[:, oh, ow]
    return np.ascontiguousarray(dxh.transpose(0, 3, 1, 2))


def conv2d_direct_numpy(x, w, bias, g: ConvGeometry):
    """One GEMM per kernel tap over shifted windows of the input: no im2col matrix is built."""
    acc = np.zeros((g.n, g.oh, g.ow, w.shape[0]), dtype=np.result_type(x, w))
    for i, j, (oh, ow), (ih, iw) in g.taps():
        acc[:, oh, ow] += np.tensordot(x[:, :, ih, iw], w[:, :, i, j], axes=([1], [1]))
    if bias is not None:
        acc += bias
    return np.ascontiguousarray(acc.transpose(0, 3, 1, 2))


# ---------------------------------------------------------------- the numpy backend's fast path
# Stride-1 convolutions on the CPU (almost every layer of VGG, LeNet, MobileNet's pointwise and
# the input gradient of every stride-1 layer) avoid the whole-batch im2col matrix, which for a
# 64x64x56x56 layer is 462 MB written and read back. The input is laid out NHWC and padded once;
# then output position p = (n, h, w) of the padded grid reads input rows p + i*dh*Wp + j*dw, so
# for a block of consecutive positions, each kernel row i is ONE strided window of the flat
# input (row stride C, KW*C contiguous values when dw == 1). A block of im2col rows is built
# from KH such copies into a cache-sized buffer and multiplied at once by the (KH*KW*C, O)
# weight matrix. Grid positions outside the output (the padding ring) are computed and dropped.
# Measured on a 2-core AVX-512 machine (November 2026, quiet): the blocked path pays for its NHWC
# transposes only when the whole-batch im2col matrix would be large. LeNet-5's layers (4-8 MB)
# and a 128-channel 28x28 layer at batch 8 (29 MB) run faster as one im2col + one GEMM forward;
# a 64-channel 56x56 layer at batch 8 (58 MB) is 16% faster forward and 27% backward blocked,
# and the backward of the 29 MB layer already gains 32%.
FAST_ROWS = 4096            # im2col rows per block: 4096 x 576 floats = 9.4 MB for a 64-channel 3x3 layer
FAST_FORWARD_BYTES = 32 << 20   # blocked forward from this im2col size on
FAST_BACKWARD_BYTES = 16 << 20  # blocked backward from this im2col size on
FAST_DX_MIN_CHANNELS = 8        # dx as a convolution with C outputs: a GEMM with N = C, poor below this
DX_DCOLS_MAX_BYTES = 32 << 20   # dx by dcols + col2im up to this dcols size (else a GEMM per tap: no dcols)


def _cols_bytes(g: ConvGeometry, itemsize: int) -> int:
    return g.c * g.kh * g.kw * g.n * g.oh * g.ow * itemsize


def _fast_path_ok(g: ConvGeometry, itemsize: int = 4) -> bool:
    return g.stride == (1, 1) and _cols_bytes(g, itemsize) >= FAST_FORWARD_BYTES


class _ShiftedRows:
    """im2col rows of a padded NHWC batch, a block at a time (see above)."""

    def __init__(self, x, g: ConvGeometry):
        ph, pw = g.padding
        self.g = g
        self.hp, self.wp = g.h + 2 * ph, g.w + 2 * pw
        xp_ = np.zeros((g.n, self.hp, self.wp, g.c), dtype=x.dtype)
        xp_[:, ph:ph + g.h, pw:pw + g.w, :] = x.transpose(0, 2, 3, 1)
        self.flat = xp_.reshape(-1)
        dh, dw = g.dilation
        self.total = g.n * self.hp * self.wp
        self.rows = self.total - ((g.kh - 1) * dh * self.wp + (g.kw - 1) * dw)  # last position any tap reads
        self.width = g.kh * g.kw * g.c
        self.buf = np.empty((min(FAST_ROWS, self.rows), self.width), dtype=x.dtype)

    def blocks(self):
        g, c, item = self.g, self.g.c, self.flat.itemsize
        dh, dw = g.dilation
        for a in range(0, self.rows, self.buf.shape[0]):
            n = min(self.buf.shape[0], self.rows - a)
            if dw == 1:  # a kernel row's KW taps are KW*C consecutive values
                seg = g.kw * c
                for i in range(g.kh):
                    src = as_strided(self.flat[(a + i * dh * self.wp) * c:], shape=(n, seg), strides=(c * item, item))
                    self.buf[:n, i * seg:(i + 1) * seg] = src
            else:
                for i in range(g.kh):
                    for j in range(g.kw):
                        off = (a + i * dh * self.wp + j * dw) * c
                        col = (i * g.kw + j) * c
                        self.buf[:n, col:col + c] = as_strided(self.flat[off:], shape=(n, c), strides=(c * item, item))
            yield a, n, self.buf[:n]

    def to_output(self, y):
        """(total, O) grid rows -> (N, O, OH, OW)."""
        g = self.g
        grid = y.reshape(g.n, self.hp, self.wp, -1)[:, :g.oh, :g.ow, :]
        return np.ascontiguousarray(grid.transpose(0, 3, 1, 2))

    def from_output(self, dy):
        """(N, O, OH, OW) -> (total, O) grid rows, zero on the padding ring."""
        g = self.g
        grid = np.zeros((g.n, self.hp, self.wp, dy.shape[1]), dtype=dy.dtype)
        grid[:, :g.oh, :g.ow, :] = dy.transpose(0, 2, 3, 1)
        return grid.reshape(self.total, -1)


def conv2d_fast_numpy(x, w, bias, g: ConvGeometry):
    """Stride-1 convolution by blocked NHWC im2col + GEMM (numpy backend)."""
    rows = _ShiftedRows(x, g)
    wm = np.ascontiguousarray(w.transpose(2, 3, 1, 0)).reshape(rows.width, w.shape[0])  # rows (i, j, c)
    y = np.zeros((rows.total, w.shape[0]), dtype=np.result_type(x, w))
    for a, n, block in rows.blocks():
        gemm_numpy(block, wm, out=y[a:a + n])
    if bias is not None:
        y += bias
    return rows.to_output(y)


def conv2d_backward_fast_numpy(x, w, dy, g: ConvGeometry, need_dx: bool):
    """Stride-1 gradients: dW accumulated over the same blocks of im2col rows; dx as the
    stride-1 convolution of dy with the flipped, transposed kernel (full correlation)."""
    rows = _ShiftedRows(x, g)
    dyg = rows.from_output(dy)
    dwm = np.zeros((rows.width, w.shape[0]), dtype=np.result_type(x, dy))
    for a, n, block in rows.blocks():
        gemm_numpy(block, dyg[a:a + n], trans_a=True, beta=1.0, c=dwm, out=dwm)
    dw = np.ascontiguousarray(dwm.reshape(g.kh, g.kw, g.c, w.shape[0]).transpose(3, 2, 0, 1))
    dx = None
    if need_dx:
        (dh, dwl), (ph, pw) = g.dilation, g.padding
        wflip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        gb = ConvGeometry.make("conv2d_backward", dy.shape, g.kh, g.kw, 1,
                               (dh * (g.kh - 1) - ph, dwl * (g.kw - 1) - pw), g.dilation)
        dx = conv2d_fast_numpy(dy, wflip, None, gb)  # always blocked here: this path is for large layers
    return dx, dw


def _backward_fast_ok(g: ConvGeometry, itemsize: int = 4) -> bool:
    (dh, dw), (ph, pw) = g.dilation, g.padding
    return (g.stride == (1, 1) and _cols_bytes(g, itemsize) >= FAST_BACKWARD_BYTES and g.c >= FAST_DX_MIN_CHANNELS
            and ph <= dh * (g.kh - 1) and pw <= dw * (g.kw - 1))


# ---------------------------------------------------------------- ops
def geometry_for_x(op, x, kh, kw, stride, padding, dilation, be):
    """Check x (the backend's (N, C, H, W) array of the compute dtype, or a DLPack view of one)
    and the geometry around it; returns (x as the backend's array, geometry)."""
    x = check_array(op, "x", x, ndim=4, backend=be)
    return x, ConvGeometry.make(op, x.shape, kh, kw, stride, padding, dilation)


@ranged("dnnpar.im2col")
def im2col(x, kh: int, kw: int, stride=1, padding=0, dilation=1):
    """x (N, C, H, W) -> cols (C*kh*kw, N*OH*OW), in the compute dtype (float32)."""
    be = get_backend()
    x, g = geometry_for_x("im2col", x, kh, kw, stride, padding, dilation, be)
    g.check_cols("im2col")
    if not be.runs_kernels:
        if g.ow < NATIVE_MIN_OW["im2col"] or native_library(x) is None:
            return im2col_numpy(x, g)
        return cpu_native.conv_im2col(x, be.empty(g.cols_shape, x.dtype), _native_geo(g))
    ncols = g.n * g.oh * g.ow  # the kernel's "plane" is one input channel over the whole batch
    grid = plane_grid("im2col", ncols, g.c)
    cols = be.empty(g.cols_shape, x.dtype)
    be.launch("im2col.cu", "im2col", grid, (256,), (x, cols, *g.kernel_args()))
    return cols


@ranged("dnnpar.col2im")
def col2im(cols, x_shape, kh: int, kw: int, stride=1, padding=0, dilation=1):
    """cols (C*kh*kw, N*OH*OW) -> x (N, C, H, W), summing overlapping taps (the adjoint of im2col)."""
    be = get_backend()
    cols = check_array("col2im", "cols", cols, ndim=2, backend=be)
    g = ConvGeometry.make("col2im", x_shape, kh, kw, stride, padding, dilation)
    if tuple(cols.shape) != g.cols_shape:
        raise ValueError(f"col2im: cols must have shape {g.cols_shape} for x_shape {tuple(x_shape)}, "
                         f"got {tuple(cols.shape)}")
    if not be.runs_kernels:
        if g.ow < NATIVE_MIN_OW["col2im"] or native_library(cols) is None:
            return col2im_numpy(cols, g)
        return cpu_native.conv_col2im(cols, be.empty((g.n, g.c, g.h, g.w), cols.dtype), _native_geo(g))
    grid = plane_grid("col2im", g.h * g.w, g.n * g.c)
    x = be.empty((g.n, g.c, g.h, g.w), cols.dtype)
    be.launch("im2col.cu", "col2im", grid, (256,), (cols, x, *g.kernel_args()))
    return x


def check_bias(op, bias, channels, be):
    if bias is None:
        return None
    bias = check_array(op, "bias", bias, ndim=1, backend=be)
    if bias.shape[0] != channels:
        raise ValueError(f"{op}: bias must have shape ({channels},), got {tuple(bias.shape)}")
    return bias


def check_groups(op, groups, c, w_shape, weight_name="w"):
    """groups as an int dividing C and O, with w (O, C/groups, KH, KW); returns it."""
    groups = as_int(groups, "groups", op)
    o = w_shape[0]
    if groups < 1 or c % groups or o % groups:
        raise ValueError(f"{op}: groups={groups} must be >= 1 and divide both the input channels C={c} and the "
                         f"output channels O={o}")
    if groups > MAX_GRID_YZ:
        raise ValueError(f"{op}: groups={groups} exceeds {MAX_GRID_YZ}, the kernels' grid limit")
    if w_shape[1] != c // groups and groups == 1:
        raise ValueError(f"{op}: x has {c} channels but w expects {w_shape[1]} (w shape {tuple(w_shape)})")
    if w_shape[1] != c // groups:
        raise ValueError(f"{op}: x has {c} channels in {groups} group(s), so {weight_name} must have C/groups = "
                         f"{c // groups} input channels, got shape {tuple(w_shape)}")
    return groups


def igemm_tile() -> tuple[int, int, int, int]:
    """(BM, BN, BK, threads) as cuda/conv_implicit.cu #defines them: Python never restates them."""
    code = read_source("conv_implicit.cu")
    return tuple(int(re.search(rf"#define IG_{k}\s+(\d+)", code).group(1)) for k in ("BM", "BN", "BK", "THREADS"))


def _igemm_grid(op, ncols, rows, z):
    bm, bn, _, _ = igemm_tile()
    gy = -(-rows // bm)
    if gy > MAX_GRID_YZ or z > MAX_GRID_YZ:
        raise ValueError(f"{op}: implicit_gemm needs a grid of {gy} x {z} blocks along y and z, beyond {MAX_GRID_YZ}")
    return (max(1, -(-ncols // bn)), gy, z)


@ranged("dnnpar.conv2d")
def conv2d(x, w, bias=None, stride=1, padding=0, dilation=1, algo: str = "im2col", return_cols: bool = False,
           activation: str | None = None, groups: int = 1):
    """2-D convolution (cross-correlation, as in every DL framework).

    x (N, C, H, W), w (O, C/groups, KH, KW), bias (O,) or None -> (N, O, OH, OW), all float32 on every
    backend (float64 only inside ``dp.precision("float64")`` on the numpy backend).
    stride, padding, dilation: an int or an (h, w) pair of ints; sizes whose index arithmetic
    does not fit 32 bits are a ValueError before anything is allocated.
    algo: "im2col" (im2col + one GEMM for the whole batch), "direct" (the plain loop) or
    "implicit_gemm" (cuda/conv_implicit.cu: tiled GEMM whose im2col tiles are gathered into shared
    memory, nothing materialised; the numpy backend computes it with its im2col / blocked path).
    groups: C and O split into ``groups`` independent convolutions (groups = C: depthwise);
    implicit_gemm takes them in one launch, the other algos loop over the groups.
    activation: None, "relu" or "relu6", applied to the biased output (:func:`activation.activate_`;
    fused into implicit_gemm's epilogue on a kernel backend, with the same NaN behaviour).
    return_cols: return (y, cols), cols being the im2col matrix of x when this call built one
    (else None: implicit_gemm and groups > 1 never keep one), for :func:`conv2d_backward` to reuse.
    The activation's gradient: pass ``activation`` and the output y to :func:`conv2d_backward`
    (which masks dy as :func:`dnnpar.ops.activation.activation_grad` does).
    """
    out = _conv2d(x, w, bias, stride, padding, dilation, algo, groups, activation)
    return out if return_cols else out[0]


#: the numpy backend's one-group forward plans: the checked geometry and the path that
#: :func:`_plan_single` chose, by everything checking and choosing read (the operands' types,
#: shapes, strides and dtypes, the hyper-parameters, the compute dtype, the switches). A layer
#: that runs the same shapes again (inference, every training step) skips both: ~40 us per call,
#: as much as a batch-1 layer's arithmetic. Never the arrays' contents, which no check reads.
_PLANS: dict = {}
PLAN_CAPACITY = 1024
#: ``PLAN["use"] = False``: check and choose on every call (tests compare both)
PLAN = {"use": True}


def _plan_key(be, x, w, bias, stride, padding, dilation, algo, groups, activation):
    """The key of a forward plan, or None where there is none (a kernel backend, an operand that
    is not a NumPy array, a size that is not a plain int or tuple of them -- True == 1 and
    1.0 == 1 as keys, but the checks refuse them --, an activation that is not None or a str)."""
    if (not PLAN["use"] or be.runs_kernels or groups != 1 or type(x) is not np.ndarray or type(w) is not np.ndarray
            or not (bias is None or type(bias) is np.ndarray) or type(algo) is not str
            or not (activation is None or type(activation) is str)
            or not _plain_ints((stride, padding, dilation))):
        return None
    return (be, compute_dtype(be), x.shape, x.strides, x.dtype, w.shape, w.strides, w.dtype,
            None if bias is None else (bias.shape, bias.strides, bias.dtype), stride, padding, dilation, algo,
            activation, NATIVE["use"], tuple(TILED.values()), NATIVE_MIN_EPILOGUE["size"], NATIVE_MIN_OW["im2col"],
            FAST_FORWARD_BYTES, FAST_ROWS)



def _conv2d(x, w, bias, stride, padding, dilation, algo, groups=1, activation=None):
    be = get_backend()
    key = _plan_key(be, x, w, bias, stride, padding, dilation, algo, groups, activation)
    plan = _PLANS.get(key) if key is not None else None
    if plan is not None:
        y, cols, applied = _run_single(plan, x, w, bias, be, activation)
        return (y if applied else activate_(be.xp, y, activation)), None if algo == "implicit_gemm" else cols
    if algo not in ALGOS:
        raise ValueError(f"conv2d: unknown algo {algo!r}: one of {', '.join(ALGOS)}")
    # the `act` argument of conv2d_igemm: the same codes as the native CPU kernels'
    act = cpu_native.ACTIVATION_CODES[check_activation("conv2d", activation)]
    w = check_array("conv2d", "w", w, ndim=4, backend=be)
    x, g = geometry_for_x("conv2d", x, w.shape[2], w.shape[3], stride, padding, dilation, be)
    groups = check_groups("conv2d", groups, g.c, w.shape)
    o = w.shape[0]
    bias = check_bias("conv2d", bias, o, be)
    check_same_dtype("conv2d", x=x, w=w, bias=bias)
    check_count("conv2d", "output (N, O, OH, OW)", (g.n, o, g.oh, g.ow))
    if algo == "implicit_gemm" and be.runs_kernels:
        grid = _igemm_grid("conv2d", g.n * g.oh * g.ow, o // groups, groups)
        out = be.empty((g.n, o, g.oh, g.ow))
        b = bias if bias is not None else be.xp.zeros(1, np.float32)  # not read: has_bias = 0
        be.launch("conv_implicit.cu", "conv2d_igemm", grid, (igemm_tile()[3],),
                  (x, w, b, i32(bias is not None), i32(act), out, *_igemm_args(g, o, groups)))
        return out, None
    if groups == 1 and key is not None:
        if len(_PLANS) >= PLAN_CAPACITY:
            _PLANS.clear()
        plan = _PLANS[key] = _plan_single(g, x, w, bias, algo, be)
        y, cols, applied = _run_single(plan, x, w, bias, be, activation)
        return (y if applied else activate_(be.xp, y, activation)), None if algo == "implicit_gemm" else cols
    if groups == 1:
        y, cols, applied = _conv2d_single(x, w, bias, g, algo, be, activation)
        return (y if applied else activate_(be.xp, y, activation)), None if algo == "implicit_gemm" else cols
    cg, og = g.c // groups, o // groups
    xp = be.xp
    parts = [_conv2d_single(xp.ascontiguousarray(x[:, k * cg:(k + 1) * cg]), w[k * og:(k + 1) * og],
                            None if bias is None else bias[k * og:(k + 1) * og],
                            ConvGeometry.make("conv2d", (g.n, cg, g.h, g.w), g.kh, g.kw, g.stride, g.padding,
                                              g.dilation), algo, be, None)[0]
             for k in range(groups)]
    return activate_(xp, xp.concatenate(parts, axis=1), activation), None


def _igemm_args(g: ConvGeometry, o: int, groups: int):
    return tuple(i32(v) for v in (g.n, g.c, g.h, g.w, o, g.kh, g.kw, g.oh, g.ow, *g.stride, *g.padding,
                                  *g.dilation, groups))


class _Plan(NamedTuple):
    """How the numpy backend computes one group's forward: ``path`` "direct" (the NumPy loop),
    "tiled" (a native direct kernel, of family ``vectors``), "fast" (blocked NumPy) or "im2col"
    (im2col, native or NumPy by ``native_im2col``, then one GEMM and the native epilogue if
    ``epilogue``)."""
    path: str
    g: ConvGeometry
    o: int
    native_im2col: bool = False
    epilogue: bool = False
    vectors: str | None = None


def _plan_single(g: ConvGeometry, x, w, bias, algo, be) -> _Plan:
    """The numpy backend's path for one group (the choice :func:`_conv2d_single` makes there)."""
    o = w.shape[0]
    if algo == "im2col":
        g.check_cols("conv2d")  # though the fast path never builds it
    if algo == "direct":
        return _Plan("direct", g, o)
    vectors = tiled_kernel(g, o, x, w, bias)
    if vectors is not None:
        return _Plan("tiled", g, o, vectors=vectors)
    if _fast_path_ok(g, x.itemsize):
        return _Plan("fast", g, o)
    native_im2col = g.ow >= NATIVE_MIN_OW["im2col"] and native_library(x) is not None
    epilogue = (o * g.n * g.oh * g.ow >= NATIVE_MIN_EPILOGUE["size"] and x.dtype == np.float32
                and native_library(x, bias) is not None)
    return _Plan("im2col", g, o, native_im2col, epilogue)


def _run_single(plan: _Plan, x, w, bias, be, activation=None):
    """Run a :class:`_Plan` on its operands: (y, cols or None, whether ``activation`` was applied)."""
    g, o = plan.g, plan.o
    if plan.path == "direct":
        return conv2d_direct_numpy(x, w, bias, g), None, False
    if plan.path == "tiled":
        return cpu_native.conv_tiled_forward(x, w, bias, be.empty((g.n, o, g.oh, g.ow)), _native_geo(g),
                                             activation, vectors=plan.vectors), None, True
    if plan.path == "fast":
        return conv2d_fast_numpy(x, w, bias, g), None, False
    with annotate_range("dnnpar.im2col"):  # the ranges the public ops open (Nsight's view)
        cols = (cpu_native.conv_im2col(x, be.empty(g.cols_shape, x.dtype), _native_geo(g)) if plan.native_im2col
                else im2col_numpy(x, g))
    with annotate_range("dnnpar.gemm"):
        y = gemm_numpy(w.reshape(o, -1), cols)  # (O, N*OH*OW)
    if plan.epilogue:  # bias + activation + NCHW in one pass
        return cpu_native.conv_epilogue(y, bias, be.empty((g.n, o, g.oh, g.ow)), activation), cols, True
    if bias is not None:
        y += bias[:, None]
    return be.xp.ascontiguousarray(y.reshape(o, g.n, g.oh, g.ow).transpose(1, 0, 2, 3)), cols, False


def _conv2d_single(x, w, bias, g: ConvGeometry, algo, be, activation=None):
    """One group: (y, cols or None, whether ``activation`` was applied: the native epilogue's)."""
    if not be.runs_kernels:
        return _run_single(_plan_single(g, x, w, bias, algo, be), x, w, bias, be, activation)
    o = w.shape[0]
    if algo == "im2col":
        g.check_cols("conv2d")
    if algo == "direct":
        out = be.empty((g.n, o, g.oh, g.ow))
        b = bias if bias is not None else be.xp.zeros(1, np.float32)  # not read: has_bias = 0
        be.launch("conv_direct.cu", "conv2d_direct", (grid_stride_blocks(g.n * o * g.oh * g.ow),), (256,),
                  (x, w, b, i32(bias is not None), out,
                   *(i32(v) for v in (g.n, g.c, g.h, g.w, o, g.kh, g.kw, g.oh, g.ow, *g.stride, *g.padding,
                                      *g.dilation))))
        return out, None, False
    cols = im2col(x, g.kh, g.kw, g.stride, g.padding, g.dilation)
    y = gemm(w.reshape(o, -1), cols)  # (O, N*OH*OW)
    if bias is not None:
        y += bias[:, None]
    return be.xp.ascontiguousarray(y.reshape(o, g.n, g.oh, g.ow).transpose(1, 0, 2, 3)), cols, False


def _check_dy(op, dy, want, be):
    dy = check_array(op, "dy", dy, ndim=4, backend=be)
    if tuple(dy.shape) != tuple(want):
        raise ValueError(f"{op}: dy must have the output's shape {tuple(want)}, got {tuple(dy.shape)}")
    return dy


@ranged("dnnpar.conv2d_backward")
def conv2d_backward(x, w, dy, stride=1, padding=0, dilation=1, need_dx: bool = True, cols=None, groups: int = 1,
                    algo: str = "im2col", activation: str | None = None, y=None):
    """Gradients of :func:`conv2d`: returns (dx or None, dw, db) for x (N, C, H, W), w (O, C/groups, KH, KW)
    and dy (N, O, OH, OW) (the gradient after any activation has been applied to it by the caller).
    algo "im2col" / "direct": dw = dY @ cols^T and dcols = W^T @ dY are two GEMMs (NT and TN); dx is
    col2im(dcols) (numpy backend, C >= 8: one GEMM per tap added into NHWC windows instead); groups > 1
    loop over the groups. algo "implicit_gemm" on a kernel backend: dx and dw are implicit GEMMs of
    cuda/conv_implicit.cu (dx a gather, dw a split reduction summed in a fixed order: deterministic),
    all groups in one launch; on the numpy backend it takes the im2col path.
    db is dy summed over n, oh, ow. ``cols``: x's im2col matrix kept from the forward pass
    (``conv2d(..., return_cols=True)``, groups = 1 only), else it is rebuilt.
    activation, y: the forward's fused activation and its activated output (N, O, OH, OW); dy is
    then the gradient at y and is masked as :func:`dnnpar.ops.activation.activation_grad` does
    (numpy backend, float32, groups = 1: in the same native pass that lays dy out for the GEMMs)."""
    be = get_backend()
    if algo not in ALGOS:
        raise ValueError(f"conv2d_backward: unknown algo {algo!r}: one of {', '.join(ALGOS)}")
    w = check_array("conv2d_backward", "w", w, ndim=4, backend=be)
    x, g = geometry_for_x("conv2d_backward", x, w.shape[2], w.shape[3], stride, padding, dilation, be)
    groups = check_groups("conv2d_backward", groups, g.c, w.shape)
    o = w.shape[0]
    dy = _check_dy("conv2d_backward", dy, (g.n, o, g.oh, g.ow), be)
    check_activation("conv2d_backward", activation)
    if activation is not None:
        if y is None:
            raise ValueError(f"conv2d_backward: activation={activation!r} needs the forward's activated output y")
        y = _check_dy("conv2d_backward", y, dy.shape, be)
    check_same_dtype("conv2d_backward", x=x, w=w, dy=dy, y=y)
    if cols is not None and (groups > 1 or algo == "implicit_gemm"):
        raise ValueError("conv2d_backward: cols can be reused only with groups=1 and algo 'im2col' or 'direct'")
    xp = be.xp
    if groups == 1 and not (algo == "implicit_gemm" and be.runs_kernels):
        g.check_cols("conv2d_backward")
        return _backward_single(x, w, dy, g, need_dx, cols, be, activation, y)
    if activation is not None:
        dy = activation_grad(xp, dy, y, activation)
    if algo == "implicit_gemm" and be.runs_kernels:
        dx, dw = _backward_igemm(x, w, dy, g, groups, need_dx, be)
        return dx, dw, dy.sum(axis=(0, 2, 3))
    cg, og = g.c // groups, o // groups
    gg = ConvGeometry.make("conv2d_backward", (g.n, cg, g.h, g.w), g.kh, g.kw, g.stride, g.padding, g.dilation)
    gg.check_cols("conv2d_backward")
    parts = [_backward_single(xp.ascontiguousarray(x[:, k * cg:(k + 1) * cg]), w[k * og:(k + 1) * og],
                              xp.ascontiguousarray(dy[:, k * og:(k + 1) * og]), gg, need_dx, None, be)
             for k in range(groups)]
    dx = xp.concatenate([p[0] for p in parts], axis=1) if need_dx else None
    return dx, xp.concatenate([p[1] for p in parts]), xp.concatenate([p[2] for p in parts])


def _backward_igemm(x, w, dy, g: ConvGeometry, groups, need_dx, be):
    o = w.shape[0]
    cg, og = g.c // groups, o // groups
    bk, threads = igemm_tile()[2:]
    args = _igemm_args(g, o, groups)
    dx = None
    if need_dx:
        grid = _igemm_grid("conv2d_backward", g.n * g.h * g.w, cg, groups)
        dx = be.empty((g.n, g.c, g.h, g.w))
        be.launch("conv_implicit.cu", "conv2d_igemm_dx", grid, (threads,), (w, dy, dx, *args))
    ncols, k = cg * g.kh * g.kw, g.n * g.oh * g.ow
    gx, gy, _ = _igemm_grid("conv2d_backward", ncols, og, groups)
    want = max(1, min(-(-IGEMM_TARGET_BLOCKS // (gx * gy * groups)), -(-k // IGEMM_MIN_CHUNK), MAX_GRID_YZ // groups))
    chunk = -(-(-(-k // want)) // bk) * bk  # whole BK slices per split
    splits = -(-k // chunk)
    dw = be.empty(w.shape)
    partial = dw if splits == 1 else be.empty(check_count("conv2d_backward", "dw partial sums",
                                                          (splits, o, ncols)))
    be.launch("conv_implicit.cu", "conv2d_igemm_dw", (gx, gy, groups * splits), (threads,),
              (x, dy, partial, i32(chunk), *args))
    if splits > 1:
        be.launch("conv_implicit.cu", "conv_sum_splits", (grid_stride_blocks(w.size),), (256,),
                  (partial, dw, i32(splits), np.int64(w.size)))
    return dx, dw


def _backward_single(x, w, dy, g: ConvGeometry, need_dx, cols, be, activation=None, y=None):
    """One group's (dx or None, dw, db) by GEMMs (+ col2im); dy masked by ``activation`` at y first."""
    xp = be.xp
    o = w.shape[0]
    if cols is not None:
        cols = check_array("conv2d_backward", "cols", cols, ndim=2, backend=be)
        if tuple(cols.shape) != g.cols_shape:
            raise ValueError(f"conv2d_backward: cols must have shape {g.cols_shape}, got {tuple(cols.shape)}")
    vectors = None if cols is not None or be.runs_kernels else tiled_kernel(g, o, x, w, dy, y, backward=True)
    if vectors is not None:
        return _backward_tiled(x, w, dy, g, need_dx, be, activation, y, vectors)
    fast = cols is None and not be.runs_kernels and _backward_fast_ok(g, x.itemsize)
    native = (not fast and not be.runs_kernels and dy.size >= NATIVE_MIN_EPILOGUE["size"]
              and native_library(dy, y) is not None)
    if activation is not None and not native:
        dy = activation_grad(xp, dy, y, activation)
    if fast:
        dx, dw = conv2d_backward_fast_numpy(x, w, dy, g, need_dx)
        return dx, dw, dy.sum(axis=(0, 2, 3))
    if cols is None:
        cols = im2col(x, g.kh, g.kw, g.stride, g.padding, g.dilation)
    direct_dx = need_dx and not be.runs_kernels and chan_dx_ok(g, o, dy, w)
    if direct_dx and activation is not None and native:
        dyx = activation_grad(xp, dy, y, activation)  # the masked dy in NCHW, for the scatter kernel
    else:
        dyx = dy
    if native:  # mask, (N, O, P) -> (O, N*P) and db in one pass
        dy2, db = cpu_native.conv_epilogue_backward(dy, y, be.empty((o, g.n * g.oh * g.ow)), be.empty((o,)),
                                                    activation)
    else:
        dy2 = xp.ascontiguousarray(dy.transpose(1, 0, 2, 3)).reshape(o, -1)
        db = dy2.sum(axis=1)
    dw = gemm(dy2, cols, trans_b=True).reshape(w.shape)
    if direct_dx:
        return cpu_native.conv_chan_dx(np.ascontiguousarray(dyx), w, be.empty((g.n, g.c, g.h, g.w)), _native_geo(g)), \
            dw, db
    return (_dx_gemm(w, dy2, g, be) if need_dx else None), dw, db


def _dx_gemm(w, dy2, g: ConvGeometry, be):
    """dx from dy in the GEMM layout (O, N*OH*OW): dcols = W^T dY and col2im; on the numpy
    backend with C >= 8, one GEMM per kernel tap added into NHWC windows instead where there is
    no native col2im or dcols would pass DX_DCOLS_MAX_BYTES. Measured on 2 AVX-512 cores
    (December 2026, batch 16 unless said), dcols + col2im against the taps: 1.65 / 2.74 ms
    (LeNet-5's conv2 at batch 64), 1.19 / 2.15 (16 -> 16 at 32^2), 0.54 / 1.21 (16 -> 32 at 32^2,
    stride 2), 4.62 / 6.10 (256 -> 256 at 8^2), 0.22 / 0.28 (64 -> 64 at 4^2), 1.78 / 5.21 (512 ->
    512 at 2^2, NumPy's col2im there)."""
    if (not be.runs_kernels and g.c >= FAST_DX_MIN_CHANNELS
            and (native_library(w, dy2) is None or _cols_bytes(g, dy2.dtype.itemsize) > DX_DCOLS_MAX_BYTES)):
        return conv2d_dx_numpy(w, dy2.T, g)
    dcols = gemm(w.reshape(w.shape[0], -1), dy2, trans_a=True)
    return col2im(dcols, (g.n, g.c, g.h, g.w), g.kh, g.kw, g.stride, g.padding, g.dilation)


def _dx_geometry(dy_shape, g: ConvGeometry):
    """dx of a stride-1 convolution as the stride-1 convolution of dy with the flipped, transposed
    kernel (full correlation, padding DH*(KH-1) - PH), or None where that padding is negative."""
    (dh, dw), (ph, pw) = g.dilation, g.padding
    if g.stride != (1, 1) or ph > dh * (g.kh - 1) or pw > dw * (g.kw - 1):
        return None
    return ConvGeometry.make("conv2d_backward", dy_shape, g.kh, g.kw, 1,
                             (dh * (g.kh - 1) - ph, dw * (g.kw - 1) - pw), g.dilation)


def _backward_tiled(x, w, dy, g: ConvGeometry, need_dx, be, activation, y, vectors):
    """(dx or None, dw, db) by the tiled kernels: dW and db in one pass that masks dy (kept for dx
    when there is an activation); dx at stride 1 by the tiled forward kernel on the masked dy (one
    full correlation with the flipped kernel), else -- a stride, or TILED's rules turning that
    down -- by the GEMM path on it. (A strided dx as one tiled correlation per stride phase was
    2-3x slower than the GEMM path on every layer measured, 2026-12-03: 16 -> 32 channels at 32x32,
    batch 16, 2.19 against 0.67 ms; 32 -> 64 at 112x112, batch 8, 15.7 against 7.9 ms.)"""
    o = w.shape[0]
    dw, db = be.empty(w.shape), be.empty((o,))
    dym = be.empty(dy.shape) if activation is not None and need_dx else None
    cpu_native.conv_tiled_dw(x, dy, y, dw, db, dym, activation, geo=_native_geo(g), vectors=vectors)
    if not need_dx:
        return None, dw, db
    dyx = dym if dym is not None else dy
    if chan_dx_ok(g, o, dyx, w):
        return cpu_native.conv_chan_dx(dyx, w, be.empty((g.n, g.c, g.h, g.w)), _native_geo(g)), dw, db
    gb = _dx_geometry(dy.shape, g)
    if gb is not None:
        wflip = np.ascontiguousarray(w[:, :, ::-1, ::-1].transpose(1, 0, 2, 3))
        dx_vectors = tiled_kernel(gb, g.c, dyx, wflip)
        if dx_vectors is not None:
            return cpu_native.conv_tiled_forward(dyx, wflip, None, be.empty((g.n, g.c, g.h, g.w)),
                                                 _native_geo(gb), vectors=dx_vectors), dw, db
    return _dx_gemm(w, np.ascontiguousarray(dyx.transpose(1, 0, 2, 3)).reshape(o, -1), g, be), dw, db
