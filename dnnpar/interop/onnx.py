"""ONNX import and export for CNNs: the operators ``torch.onnx.export`` emits for convolutional
networks (opsets 13-21), mapped onto dnnpar layers wired as a :class:`~dnnpar.nn.base.Graph`.

    model = from_onnx("resnet.onnx")           # a Graph in eval mode, trainable (model.train())
    proto = to_onnx(model, "out.onnx", opset=17)

Import never trusts the file: the bytes are parsed as a ``ModelProto`` without loading external
data, and every tensor's claimed shape is checked against the bytes it holds, every node's inputs
against what earlier nodes define (a cycle or a missing input is an error), every attribute
against the operator's list, before any weight array or layer is built. Everything wrong is one
:class:`~dnnpar.errors.OnnxError` naming the node (or initializer, or graph part) and what is
wrong; an operator or attribute dnnpar cannot represent names the supported set.

Constants fold at import: initializers and ``Constant`` outputs combine with numpy, and so does
the shape arithmetic exporters emit for a dynamic batch (``Shape`` -> ``Gather`` / ``Squeeze`` ->
``Unsqueeze`` -> ``Concat`` -> a ``Reshape``'s shape, the batch size kept symbolic); an ``Add`` of
a constant right after a bias-free Conv / Gemm / MatMul becomes that layer's bias;
``GlobalAveragePool`` followed by ``Flatten`` becomes one pooling layer. Only the nodes the
graph output depends on are imported.
"""
from __future__ import annotations

import math
import os
import re
from pathlib import Path

import numpy as np

from ..errors import OnnxError

#: opset versions of the default domain that import and export accept
SUPPORTED_OPSETS = range(13, 22)
#: protobuf cannot hold more than 2 GiB in one message
MAX_FILE_BYTES = 2**31 - 1
#: most elements one initializer, constant or folded constant may hold (1 GiB of float32)
MAX_ELEMENTS = 2**28
#: largest size of one non-batch axis of the graph input, and of one sample of any tensor
MAX_DIM = 2**20
MAX_SAMPLE_ELEMENTS = 2**28
MAX_NODES = 100_000
#: largest kernel, stride, padding or dilation an attribute may give
MAX_WINDOW = 2**16

_ONNX_HINT = "pip install 'dnnpar[onnx]'"


def _onnx():
    try:
        import onnx
        import onnx.checker  # noqa: F401
        import onnx.helper  # noqa: F401
        import onnx.numpy_helper  # noqa: F401
    except ImportError as e:
        raise ImportError(f"ONNX import / export needs the onnx package: {_ONNX_HINT}") from e
    return onnx


def _sanitize(name: str) -> str:
    s = re.sub(r"[^A-Za-z0-9_]+", "_", name).strip("_")
    return s or "node"


class _T:
    """A tensor computed at run time: the dnnpar node producing it (or the graph input) and the
    shape of one sample."""

    __slots__ = ("node", "shape")

    def __init__(self, node: str, shape: tuple):
        self.node, self.shape = node, tuple(int(d) for d in shape)


class _Dims:
    """An int64 tensor computed from the graph input's shape (``Shape`` and what exporters build
    from it: ``x.view(x.size(0), -1)``): each entry an int, except the batch size, None, known
    only at run time. ``scalar``: a 0-d tensor (one entry) rather than a 1-D one. Such a value
    folds at import and may only end as a ``Reshape``'s shape."""

    __slots__ = ("dims", "scalar")

    def __init__(self, dims, scalar=False):
        self.dims, self.scalar = tuple(None if d is None else int(d) for d in dims), scalar


def _dims_or_array(dims, scalar):
    """``dims`` as a constant when the batch is not among them, else a :class:`_Dims`."""
    if None in dims:
        return _Dims(dims, scalar)
    return np.asarray(dims[0] if scalar else list(dims), np.int64)


# element type -> (numpy dtype, TensorProto field holding typed data)
_DTYPES = {1: (np.float32, "float_data"), 11: (np.float64, "double_data"), 7: (np.int64, "int64_data"),
           6: (np.int32, "int32_data"), 9: (np.uint8, "int32_data")}  # bool: one byte, read as != 0
_DTYPE_NAMES = {1: "float", 2: "uint8", 3: "int8", 4: "uint16", 5: "int16", 6: "int32", 7: "int64", 8: "string",
                9: "bool", 10: "float16", 11: "double", 12: "uint32", 13: "uint64", 16: "bfloat16"}
_ATTR_NAMES = {1: "float", 2: "int", 3: "string", 4: "tensor", 5: "graph", 6: "floats", 7: "ints", 8: "strings"}
F, I, S, TENSOR, FS, IS = 1, 2, 3, 4, 6, 7


class _Importer:
    def __init__(self, proto, path):
        self.m, self.path = proto, path
        self.values: dict[str, object] = {}  # ONNX tensor name -> np.ndarray (constant) or _T
        self.nodes: list[list] = []           # [name, layer, [input names]] of the dnnpar Graph
        self.layer_of: dict[str, object] = {}
        self.names: set[str] = {"input"}
        self.skip_flatten: set[int] = set()
        self.owner: dict[str, str] = {}       # dnnpar node -> the ONNX tensor its layer computes

    def err(self, message, field=None):
        return OnnxError(message, self.path, field)

    # ------------------------------------------------------------------ validation
    def tensor(self, t, field):
        """A TensorProto as a numpy array, after checking its claimed shape against its bytes."""
        if t.data_location == 1 or len(t.external_data):
            raise self.err("refers to external data: dnnpar imports models with their weights inside the file "
                           "(onnx.save_model(model, path, save_as_external_data=False))", field)
        if t.HasField("segment"):
            raise self.err("is a segment of a tensor split over several messages (not supported)", field)
        if t.data_type not in _DTYPES:
            raise self.err(f"data type {_DTYPE_NAMES.get(t.data_type, t.data_type)}: dnnpar imports float, double, "
                           "int32, int64 and bool tensors", field)
        dims = list(t.dims)
        if len(dims) > 8:
            raise self.err(f"has {len(dims)} dimensions (at most 8)", field)
        count, nonzero = 1, 1
        for d in dims:
            if d < 0:
                raise self.err(f"has a negative dimension in {dims}", field)
            count, nonzero = count * d, nonzero * max(d, 1)
            # an empty tensor may still claim more than NumPy can shape
            if nonzero > MAX_ELEMENTS:
                raise self.err(f"claims shape {dims}, over the limit of {MAX_ELEMENTS} elements", field)
        dtype, typed = _DTYPES[t.data_type]
        itemsize = np.dtype(dtype).itemsize
        if t.raw_data:
            if len(t.raw_data) != count * itemsize:
                raise self.err(f"claims shape {dims} ({count * itemsize} bytes of {np.dtype(dtype).name}), its "
                               f"raw_data holds {len(t.raw_data)}", field)
            arr = np.frombuffer(t.raw_data, np.dtype(dtype).newbyteorder("<")).astype(dtype).reshape(dims)
        else:
            data = getattr(t, typed)
            if len(data) != count:
                raise self.err(f"claims shape {dims} ({count} elements), it holds {len(data)}", field)
            arr = np.asarray(data, dtype=np.int64 if t.data_type == 9 else dtype).reshape(dims)
        return arr != 0 if t.data_type == 9 else arr

    def graph_input(self, vi):
        field = f"graph input {vi.name!r}"
        if not vi.type.HasField("tensor_type"):
            raise self.err("is not a tensor", field)
        tt = vi.type.tensor_type
        if tt.elem_type != 1:
            raise self.err(f"has element type {_DTYPE_NAMES.get(tt.elem_type, tt.elem_type)}, dnnpar models take "
                           "float", field)
        if not tt.HasField("shape"):
            raise self.err("has no shape (dnnpar needs (N, C, H, W) or (N, features))", field)
        dims = list(tt.shape.dim)
        if len(dims) not in (2, 4):
            raise self.err(f"has rank {len(dims)}: dnnpar models take (N, C, H, W) or (N, features)", field)
        sample = []
        for k, d in enumerate(dims[1:], 1):
            if not d.HasField("dim_value"):
                raise self.err(f"axis {k} is symbolic ({d.dim_param!r}): only the batch axis may be dynamic", field)
            if not 1 <= d.dim_value <= MAX_DIM:
                raise self.err(f"axis {k} has size {d.dim_value}, outside [1, {MAX_DIM}]", field)
            sample.append(int(d.dim_value))
        if math.prod(sample) > MAX_SAMPLE_ELEMENTS:
            raise self.err(f"one sample of shape {sample} exceeds {MAX_SAMPLE_ELEMENTS} elements", field)
        return tuple(sample)

    def attrs(self, node, field, spec):
        """``spec``: name -> (attribute type, default). Unknown or mistyped attributes are errors."""
        out = {k: d for k, (_, d) in spec.items()}
        seen = set()
        for a in node.attribute:
            if a.name not in spec:
                raise self.err(f"attribute {a.name!r} is not supported (dnnpar reads "
                               f"{', '.join(sorted(spec)) or 'none'})", field)
            if a.name in seen:
                raise self.err(f"attribute {a.name!r} given twice", field)
            seen.add(a.name)
            want = spec[a.name][0]
            if a.ref_attr_name:
                raise self.err(f"attribute {a.name!r} refers to a function attribute (not supported)", field)
            if a.type != want:
                raise self.err(f"attribute {a.name!r} is of type {_ATTR_NAMES.get(a.type, a.type)}, "
                               f"{node.op_type} needs {_ATTR_NAMES[want]}", field)
            if want == S:
                try:
                    out[a.name] = a.s.decode("ascii")
                except UnicodeDecodeError:
                    raise self.err(f"attribute {a.name!r} is not an ASCII string", field) from None
            else:
                out[a.name] = {F: a.f, I: a.i, TENSOR: a.t, FS: list(a.floats), IS: list(a.ints)}[want]
            if want in (F, FS) and not np.all(np.isfinite(out[a.name])):
                raise self.err(f"attribute {a.name!r} is not finite ({out[a.name]})", field)
        return out

    # ------------------------------------------------------------------ values
    def inp(self, node, k, field, kind=None, optional=False, dims=False):
        """Input ``k`` of ``node``: a constant ("const"), a run-time tensor ("tensor") or either;
        ``dims``: a value computed from the input's shape (:class:`_Dims`) is accepted too."""
        name = node.input[k] if k < len(node.input) else ""
        if not name:
            if optional:
                return None
            raise self.err(f"input {k} is missing", field)
        v = self.values[name]
        if isinstance(v, _Dims) and not dims:
            raise self.err(f"input {k} ({name!r}) is computed from the input's shape (it holds the dynamic batch "
                           f"size); dnnpar folds such values only into shape arithmetic ({', '.join(_SHAPE_OPS)}) "
                           "and a Reshape's shape", field)
        if kind == "const" and isinstance(v, _T):
            raise self.err(f"input {k} ({name!r}) must be a constant (an initializer or Constant output); it is "
                           "computed from the graph input", field)
        if kind == "tensor" and not isinstance(v, _T):
            raise self.err(f"input {k} ({name!r}) is a constant; dnnpar needs it computed from the graph input "
                           "here", field)
        return v

    def scalar(self, v, what, field):
        if v is None:
            return None
        if v.size != 1:
            raise self.err(f"{what} must be a scalar, got shape {v.shape}", field)
        return v.reshape(()).item()

    def ints(self, values, what, field, lo, hi, n=2):
        if len(values) != n or not all(lo <= int(v) <= hi for v in values):
            raise self.err(f"{what} must be {n} integers in [{lo}, {hi}], got {list(values)}", field)
        return tuple(int(v) for v in values)

    def emit(self, node, field, layer, ins: list):
        """Add ``layer`` reading the run-time tensors ``ins``; return its output tensor."""
        base = _sanitize(node.name or (node.output[0] if node.output else "") or node.op_type)
        name, k = base, 1
        while name in self.names:
            k += 1
            name = f"{base}_{k}"
        self.names.add(name)
        try:
            shape = tuple(layer.output_shape(*[t.shape for t in ins]))
        except (ValueError, TypeError, IndexError, ZeroDivisionError) as e:
            raise self.err(f"does not fit its input shapes {[t.shape for t in ins]}: {e}", field) from e
        if not shape or any(d < 1 for d in shape) or math.prod(shape) > MAX_SAMPLE_ELEMENTS:
            raise self.err(f"gives samples of shape {shape}, outside what dnnpar runs", field)
        self.nodes.append([name, layer, [t.node for t in ins]])
        self.layer_of[name] = layer
        return _T(name, shape)

    def set_params(self, layer, **arrays):
        from ..backend import get_backend

        be = get_backend()
        for key, arr in arrays.items():
            if arr is None:
                continue
            d = layer.buffers if key.startswith("running_") else layer.params
            arr = np.ascontiguousarray(arr, dtype=np.float32)
            if key in d and tuple(d[key].shape) != arr.shape:
                raise ValueError(f"{key} has shape {arr.shape}, the layer needs {tuple(d[key].shape)}")
            d[key] = be.asarray(arr)
            if key == "bias" and hasattr(layer, "bias"):
                layer.bias = True  # a folded bias: the layer's config must say it has one

    # ------------------------------------------------------------------ the walk
    def run(self):
        m = self.m
        if not m.HasField("graph"):
            raise self.err("holds no graph (not an ONNX model?)", "graph")
        opsets = {}
        for o in m.opset_import:
            opsets[o.domain or "ai.onnx"] = o.version
        if "ai.onnx" not in opsets:
            raise self.err("imports no opset of the default domain", "opset_import")
        self.opset = opsets["ai.onnx"]
        if self.opset not in SUPPORTED_OPSETS:
            raise self.err(f"opset {self.opset}: dnnpar imports opsets {SUPPORTED_OPSETS.start}.."
                           f"{SUPPORTED_OPSETS.stop - 1}", "opset_import")
        g = m.graph
        if len(g.node) > MAX_NODES:
            raise self.err(f"has {len(g.node)} nodes (at most {MAX_NODES})", "graph")
        if len(g.sparse_initializer):
            raise self.err("has sparse initializers (not supported)", "graph")
        for t in g.initializer:
            field = f"initializer {t.name!r}"
            if not t.name or t.name in self.values:
                raise self.err("has an empty or duplicate name", field)
            self.values[t.name] = self.tensor(t, field)
        inputs = [vi for vi in g.input if vi.name not in self.values]
        if len(inputs) != 1:
            raise self.err(f"has {len(inputs)} inputs besides its initializers ({[vi.name for vi in inputs][:5]}); "
                           "dnnpar models take one", "graph inputs")
        if len(g.output) != 1:
            raise self.err(f"has {len(g.output)} outputs; dnnpar models give one", "graph outputs")
        if not inputs[0].name:
            raise self.err("has an empty name", "graph input")
        self.input_shape = self.graph_input(inputs[0])
        self.values[inputs[0].name] = _T("input", self.input_shape)
        out_name = g.output[0].name

        # every input defined before it is read: catches cycles, dangling names and disorder
        defined = set(self.values)
        for i, node in enumerate(g.node):
            field = self.field(node, i)
            if node.domain not in ("", "ai.onnx"):
                raise self.err(f"operator {node.domain}.{node.op_type} is not supported: dnnpar imports "
                               f"{', '.join(SUPPORTED_OPERATORS)} of the default domain", field)
            for name in node.input:
                if name and name not in defined:
                    raise self.err(f"reads {name!r}, which no earlier node, initializer or graph input defines (a "
                                   "cycle, a missing input, or nodes out of topological order)", field)
            for name in node.output:
                if name and name in defined:
                    raise self.err(f"writes {name!r}, which is already defined", field)
                defined.add(name)
        if out_name not in defined:
            raise self.err(f"{out_name!r} is not computed by any node", "graph output")

        # only the nodes the output depends on
        needed, live = {out_name}, []
        for i in range(len(g.node) - 1, -1, -1):
            node = g.node[i]
            if any(o in needed for o in node.output if o):
                live.append(i)
                needed.update(n for n in node.input if n)
        live.reverse()
        self.uses = {}
        for i in live:
            for n in g.node[i].input:
                self.uses[n] = self.uses.get(n, 0) + 1
        self.uses[out_name] = self.uses.get(out_name, 0) + 1
        self.readers = {}
        for i in live:
            for n in g.node[i].input:
                self.readers.setdefault(n, []).append(i)
        self.g, self.out_name = g, out_name

        for i in live:
            node = g.node[i]
            field = self.field(node, i)
            conv = _CONVERTERS.get(node.op_type)
            if conv is not None and self.opset < _OP_SINCE.get(node.op_type, 0):
                raise self.err(f"operator {node.op_type} is not in opset {self.opset} (it was added in opset "
                               f"{_OP_SINCE[node.op_type]})", field)
            if conv is None:
                raise self.err(f"operator {node.op_type!r} is not supported: dnnpar imports "
                               f"{', '.join(SUPPORTED_OPERATORS)}", field)
            try:
                results = conv(self, node, field, i)
            except OnnxError:
                raise
            except (ValueError, TypeError, IndexError, ZeroDivisionError, OverflowError) as e:
                raise self.err(f"{node.op_type}: {e}", field) from e
            if not isinstance(results, tuple):
                results = (results,)
            for k, name in enumerate(node.output):
                if not name:
                    continue
                if k >= len(results):
                    if name in self.uses:
                        raise self.err(f"output {k} ({name!r}) is read, dnnpar computes only output 0 of "
                                       f"{node.op_type}", field)
                    continue
                self.values[name] = results[k]
                if isinstance(results[k], _T) and results[k].node not in self.owner:
                    self.owner[results[k].node] = name
        return self.finish()

    def field(self, node, i):
        return f"node {node.name or i!r} ({node.op_type})"

    def finish(self):
        from ..nn.base import Graph

        out = self.values[self.out_name]
        if not isinstance(out, _T):
            raise self.err("is a constant: the model does not depend on its input", "graph output")
        if out.node == "input":
            out = self.emit(_FakeNode("identity"), "graph output", _layer("layers", "Identity"), [out])
        try:
            model = Graph([tuple(n) for n in self.nodes], input_shape=self.input_shape,
                          name=_sanitize(self.g.name) if self.g.name else "onnx_model", output=out.node)
        except (ValueError, TypeError) as e:
            raise self.err(f"does not form a dnnpar graph: {e}", "graph") from e
        return model.eval()

    # ------------------------------------------------------------------ folding helpers
    def channel_vector(self, c, shape, n):
        """``c`` as an (n,) vector if it broadcasts against samples of ``shape`` along axis 1 only
        (a bias), else None."""
        nd = len(shape) + 1
        if c.ndim > nd:
            return None
        cs = (1,) * (nd - c.ndim) + c.shape
        if cs[0] != 1 or any(d != 1 for d in cs[2:]) or cs[1] not in (1, n):
            return None
        return np.broadcast_to(c.reshape(cs[1]), (n,)).astype(np.float32)

    def sample_value(self, c, shape, field):
        """A constant operand of a run-time tensor, as an array broadcastable to one sample."""
        nd = len(shape) + 1
        if c.ndim > nd:
            raise self.err(f"a constant of shape {c.shape} does not broadcast to samples of shape {shape}", field)
        cs = (1,) * (nd - c.ndim) + c.shape
        ok = cs[0] == 1
        if ok:
            try:
                ok = tuple(np.broadcast_shapes(cs[1:], shape)) == tuple(shape)
            except ValueError:
                ok = False
        if not ok:
            raise self.err(f"a constant of shape {c.shape} does not broadcast to one sample of shape {shape} "
                           "without changing it", field)
        return np.ascontiguousarray(c.reshape(cs[1:]), dtype=np.float32)


class _FakeNode:
    def __init__(self, name):
        self.name, self.output, self.op_type = name, [name], "Identity"


def _layer(module: str, cls: str, *args, **kwargs):
    """A dnnpar layer by module and class name (those the ONNX import maps onto)."""
    import importlib

    mod = importlib.import_module(f"dnnpar.nn.{module}")
    if not hasattr(mod, cls):
        raise ValueError(f"this dnnpar has no {cls} layer")
    return getattr(mod, cls)(*args, **kwargs)


def _float_weight(w, ndim, what):
    if w.ndim != ndim or w.size == 0:
        raise ValueError(f"{what} must be a non-empty {ndim}-D constant, got shape {w.shape}")
    if w.dtype.kind != "f":
        raise ValueError(f"{what} must be float, got {w.dtype}")
    w = w.astype(np.float32)
    if not np.isfinite(w).all():
        raise ValueError(f"{what} holds NaN or infinity (or values past float32's range): a corrupt file?")
    return w


def _pads(imp, a, field, kernel):
    auto = a.get("auto_pad", "NOTSET")
    pads = a.get("pads") or [0, 0, 0, 0]
    if auto not in ("NOTSET", "VALID"):
        raise imp.err(f"auto_pad={auto} is not supported (dnnpar needs explicit symmetric pads: NOTSET or VALID)",
                      field)
    if auto == "VALID" and any(pads):
        raise imp.err("auto_pad=VALID with non-zero pads", field)
    p = imp.ints(pads, "pads", field, 0, MAX_WINDOW, n=4)
    if p[0] != p[2] or p[1] != p[3]:
        raise imp.err(f"asymmetric pads {list(p)} (begin != end) are not supported", field)
    return p[0], p[1]


def _window(imp, a, field, kernel_from=None):
    k = a.get("kernel_shape") or kernel_from
    if k is None:
        raise imp.err("kernel_shape is required", field)
    kernel = imp.ints(k, "kernel_shape", field, 1, MAX_WINDOW)
    stride = imp.ints(a.get("strides") or [1, 1], "strides", field, 1, MAX_WINDOW)
    dil = imp.ints(a.get("dilations") or [1, 1], "dilations", field, 1, MAX_WINDOW)
    return kernel, stride, _pads(imp, a, field, kernel), dil


_WINDOW_ATTRS = {"auto_pad": (S, "NOTSET"), "kernel_shape": (IS, None), "pads": (IS, None), "strides": (IS, None),
                 "dilations": (IS, None)}


def _spatial(imp, x, field):
    if len(x.shape) != 3:
        raise imp.err(f"needs (N, C, H, W) input, got samples of shape {x.shape}", field)


# ---------------------------------------------------------------------- operators
def _conv(imp, node, field, i):
    a = imp.attrs(node, field, {**_WINDOW_ATTRS, "group": (I, 1)})
    x = imp.inp(node, 0, field, "tensor")
    _spatial(imp, x, field)
    w = _float_weight(imp.inp(node, 1, field, "const"), 4, "the weight")
    b = imp.inp(node, 2, field, "const", optional=True)
    if a["kernel_shape"] is not None and tuple(a["kernel_shape"]) != w.shape[2:]:
        raise imp.err(f"kernel_shape {a['kernel_shape']} differs from the weight's {w.shape[2:]}", field)
    kernel, stride, pad, dil = _window(imp, a, field, list(w.shape[2:]))
    groups = a["group"]
    c, o = x.shape[0], w.shape[0]
    if not 1 <= groups <= c or w.shape[1] * groups != c or o % groups:
        raise imp.err(f"group={groups} does not fit {c} input channels and a weight of shape {w.shape}", field)
    if b is not None:
        b = _float_weight(b, 1, "the bias")
        if b.shape != (o,):
            raise imp.err(f"bias of shape {b.shape}, the weight has {o} output channels", field)
    # groups == C is a depthwise convolution: Conv2d runs it on the depthwise kernel
    layer = _layer("conv", "Conv2d", c, o, kernel, stride=stride, padding=pad, dilation=dil, groups=groups,
                   bias=b is not None)
    imp.set_params(layer, weight=w, bias=b)
    return imp.emit(node, field, layer, [x])


def _linear(imp, node, field, x, w_out_in, bias):
    if len(x.shape) != 1:
        raise imp.err(f"needs (N, features) input, got samples of shape {x.shape}", field)
    o, k = w_out_in.shape
    layer = _layer("layers", "Linear", k, o, bias=bias is not None)
    imp.set_params(layer, weight=w_out_in, bias=bias)
    return imp.emit(node, field, layer, [x])


def _gemm(imp, node, field, i):
    a = imp.attrs(node, field, {"alpha": (F, 1.0), "beta": (F, 1.0), "transA": (I, 0), "transB": (I, 0)})
    if a["transA"]:
        raise imp.err("transA=1 (a transposed batch) is not supported", field)
    x = imp.inp(node, 0, field, "tensor")
    b = _float_weight(imp.inp(node, 1, field, "const"), 2, "B")
    w = (b if a["transB"] else b.T) * np.float32(a["alpha"])
    c = imp.inp(node, 2, field, "const", optional=True)
    bias = None
    if c is not None:
        bias = imp.channel_vector(np.asarray(c, np.float32), (w.shape[0],), w.shape[0])
        if bias is None:
            raise imp.err(f"C of shape {c.shape} is not a bias of {w.shape[0]} outputs (a per-batch C is not "
                          "supported)", field)
        bias = bias * np.float32(a["beta"])
    return _linear(imp, node, field, x, np.ascontiguousarray(w), bias)


def _matmul(imp, node, field, i):
    imp.attrs(node, field, {})
    x = imp.inp(node, 0, field, "tensor")
    b = _float_weight(imp.inp(node, 1, field, "const"), 2, "B")
    return _linear(imp, node, field, x, np.ascontiguousarray(b.T), None)


_BIAS_LAYERS = ("Conv2d", "DepthwiseConv2d", "PointwiseConv2d", "Linear")


def _binary(op):
    def convert(imp, node, field, i):
        imp.attrs(node, field, {})
        x, y = imp.inp(node, 0, field), imp.inp(node, 1, field)
        if not isinstance(x, _T) and not isinstance(y, _T):  # fold
            shape = np.broadcast_shapes(x.shape, y.shape)
            if math.prod(shape) > MAX_ELEMENTS:
                raise imp.err(f"folding constants of shapes {x.shape} and {y.shape} exceeds {MAX_ELEMENTS} elements",
                              field)
            with np.errstate(all="ignore"):
                if op == "div" and x.dtype.kind in "iu":
                    if np.any(y == 0):
                        raise imp.err("integer division by zero in a constant", field)
                    return x // y
                return {"add": np.add, "sub": np.subtract, "mul": np.multiply, "div": np.divide}[op](x, y)
        if isinstance(x, _T) and isinstance(y, _T):
            if op == "add":
                if x.shape != y.shape:
                    raise imp.err(f"adds computed tensors of shapes {x.shape} and {y.shape}: dnnpar adds equal "
                                  "shapes only", field)
                return imp.emit(node, field, _layer("graph", "Add"), [x, y])
            if op == "mul":
                return imp.emit(node, field, _layer("graph", "Mul"), [x, y])
            raise imp.err(f"{node.op_type} of two computed tensors is not supported (only of a tensor and a "
                          "constant)", field)
        t, c, swapped = (x, y, False) if isinstance(x, _T) else (y, x, True)
        if c.dtype.kind not in "fiu":
            raise imp.err(f"constant operand of type {c.dtype}", field)
        t_name = node.input[1 if swapped else 0]
        # a bias folds into the layer computing t only if nothing else reads t (or an alias of it)
        if op == "add" and imp.uses.get(t_name) == 1 and imp.owner.get(t.node) == t_name:
            layer = imp.layer_of.get(t.node)
            if type(layer).__name__ in _BIAS_LAYERS and "bias" not in layer.params:
                n = layer.params["weight"].shape[0]
                bias = imp.channel_vector(c, t.shape, n)
                if bias is not None:
                    imp.set_params(layer, bias=bias)
                    return t
        if op == "div" and swapped:
            raise imp.err("dividing a constant by a computed tensor is not supported", field)
        kind = "rsub" if (op == "sub" and swapped) else op
        value = imp.sample_value(c, t.shape, field)
        return imp.emit(node, field, _layer("layers", "ConstantOp", kind, value), [t])
    return convert


def _unary(cls, **spec):
    def convert(imp, node, field, i):
        a = imp.attrs(node, field, spec)
        return imp.emit(node, field, _layer("layers", cls, **a), [imp.inp(node, 0, field, "tensor")])
    return convert


def _clip(imp, node, field, i):
    imp.attrs(node, field, {})
    x = imp.inp(node, 0, field, "tensor")
    lo = imp.scalar(imp.inp(node, 1, field, "const", optional=True), "min", field)
    hi = imp.scalar(imp.inp(node, 2, field, "const", optional=True), "max", field)
    if lo is None and hi is None:
        return x
    if lo == 0 and hi is None:
        return imp.emit(node, field, _layer("layers", "ReLU"), [x])
    if lo == 0 and hi == 6:
        return imp.emit(node, field, _layer("layers", "ReLU6"), [x])
    if lo is not None and hi is not None and not lo <= hi:
        raise imp.err(f"min {lo} > max {hi}", field)
    return imp.emit(node, field, _layer("layers", "Clip", None if lo is None else float(lo),
                                        None if hi is None else float(hi)), [x])


def _ceil_ok(imp, x, kernel, stride, pad, field):
    """ceil_mode=1 is accepted where it gives the same size as floor."""
    for size, k, s, p in zip(x.shape[1:], kernel, stride, pad):
        if (size + 2 * p - k) % s:
            raise imp.err("ceil_mode=1 changes the output size here (dnnpar pools with floor)", field)


def _maxpool(imp, node, field, i):
    a = imp.attrs(node, field, {**_WINDOW_ATTRS, "ceil_mode": (I, 0), "storage_order": (I, 0)})
    x = imp.inp(node, 0, field, "tensor")
    _spatial(imp, x, field)
    kernel, stride, pad, dil = _window(imp, a, field)
    if dil != (1, 1):
        raise imp.err(f"dilations {list(dil)} on a pool are not supported", field)
    if a["storage_order"]:
        raise imp.err("storage_order=1 is not supported", field)
    if a["ceil_mode"]:
        _ceil_ok(imp, x, kernel, stride, pad, field)
    return imp.emit(node, field, _layer("layers", "MaxPool2d", kernel, stride, pad), [x])


def _avgpool(imp, node, field, i):
    a = imp.attrs(node, field, {**_WINDOW_ATTRS, "ceil_mode": (I, 0), "count_include_pad": (I, 0)})
    x = imp.inp(node, 0, field, "tensor")
    _spatial(imp, x, field)
    kernel, stride, pad, dil = _window(imp, a, field)
    if dil != (1, 1):
        raise imp.err(f"dilations {list(dil)} on a pool are not supported", field)
    if a["ceil_mode"]:
        _ceil_ok(imp, x, kernel, stride, pad, field)
    kw = {"count_include_pad": bool(a["count_include_pad"])} if any(pad) else {}
    return imp.emit(node, field, _layer("layers", "AvgPool2d", kernel, stride, pad, **kw), [x])


def _gap_layer(imp, node, i, keepdims):
    """GlobalAvgPool2d; keepdims output read only by a Flatten (axis 1) pools and flattens at once."""
    readers = imp.readers.get(node.output[0], [])
    if keepdims and len(readers) == 1 and node.output[0] != imp.out_name:
        r = imp.g.node[readers[0]]
        if r.op_type == "Flatten" and all(a.name != "axis" or (a.type == I and a.i in (1, -3)) for a in r.attribute):
            imp.skip_flatten.add(readers[0])
            keepdims = False
    return _layer("layers", "GlobalAvgPool2d", keepdims=True) if keepdims else _layer("layers", "GlobalAvgPool2d")


def _gap(imp, node, field, i):
    imp.attrs(node, field, {})
    x = imp.inp(node, 0, field, "tensor")
    _spatial(imp, x, field)
    return imp.emit(node, field, _gap_layer(imp, node, i, True), [x])


def _reducemean(imp, node, field, i):
    spec = {"keepdims": (I, 1)}
    if imp.opset < 18:
        spec["axes"] = (IS, None)
    else:
        spec["noop_with_empty_axes"] = (I, 0)
    a = imp.attrs(node, field, spec)
    x = imp.inp(node, 0, field, "tensor")
    _spatial(imp, x, field)
    axes = a.get("axes") if imp.opset < 18 else imp.inp(node, 1, field, "const", optional=True)
    axes = None if axes is None else [int(v) for v in np.asarray(axes).reshape(-1)]
    if not axes or sorted(v % 4 if -4 <= v < 4 else v for v in axes) != [2, 3]:
        raise imp.err(f"ReduceMean over axes {axes}: dnnpar reduces over H, W (axes 2, 3) only", field)
    return imp.emit(node, field, _gap_layer(imp, node, i, bool(a["keepdims"])), [x])


def _batchnorm(imp, node, field, i):
    a = imp.attrs(node, field, {"epsilon": (F, 1e-5), "momentum": (F, 0.9), "training_mode": (I, 0)})
    if a["training_mode"]:
        raise imp.err("training_mode=1 is not supported (dnnpar imports inference graphs; train the imported "
                      "model with model.train())", field)
    x = imp.inp(node, 0, field, "tensor")
    _spatial(imp, x, field)
    c = x.shape[0]
    arrs = [_float_weight(imp.inp(node, k, field, "const"), 1, what)
            for k, what in enumerate(("scale", "B", "mean", "var"), 1)]
    if any(v.shape != (c,) for v in arrs):
        raise imp.err(f"scale, B, mean and var must have {c} elements, got {[v.shape for v in arrs]}", field)
    if not a["epsilon"] > 0 or not 0 <= a["momentum"] <= 1:
        raise imp.err(f"epsilon {a['epsilon']} must be > 0 and momentum {a['momentum']} in [0, 1]", field)
    if np.any(arrs[3] + np.float32(a["epsilon"]) <= 0):
        raise imp.err("var + epsilon must be positive", field)
    layer = _layer("layers", "BatchNorm2d", c, eps=float(a["epsilon"]), momentum=1.0 - float(a["momentum"]))
    imp.set_params(layer, weight=arrs[0], bias=arrs[1], running_mean=arrs[2], running_var=arrs[3])
    return imp.emit(node, field, layer, [x])


def _flatten(imp, node, field, i):
    a = imp.attrs(node, field, {"axis": (I, 1)})
    x = imp.inp(node, 0, field, "tensor")
    rank = len(x.shape) + 1
    if a["axis"] not in (1, 1 - rank):
        raise imp.err(f"axis={a['axis']}: dnnpar flattens each sample (axis 1)", field)
    if i in imp.skip_flatten or len(x.shape) == 1:
        return _T(x.node, (math.prod(x.shape),))
    return imp.emit(node, field, _layer("layers", "Flatten"), [x])


def _reshape(imp, node, field, i):
    a = imp.attrs(node, field, {"allowzero": (I, 0)})
    x = imp.inp(node, 0, field, dims=True)
    shape = imp.inp(node, 1, field, "const", dims=True)
    if isinstance(shape, _Dims) and not isinstance(x, _T):
        raise imp.err(f"reshapes a constant to the shape value {_dims_text(shape)}", field)
    if isinstance(shape, _Dims):
        if shape.scalar or None in shape.dims[1:]:
            raise imp.err(f"shape {_dims_text(shape)} puts the batch size elsewhere than axis 0", field)
        target = list(shape.dims[1:])
    else:
        if shape.dtype != np.int64 or shape.ndim != 1 or shape.size < 1:
            raise imp.err(f"shape must be a 1-D int64 constant, got {shape.dtype} of shape {shape.shape}", field)
        target = [int(v) for v in shape]
    if a["allowzero"] and 0 in target:
        raise imp.err("allowzero=1 with a zero in the shape is not supported", field)
    if isinstance(x, _Dims):  # dynamo's x.size(0) as a 1-D tensor: reshape to [-1] or [1]
        if target not in ([-1], [len(x.dims)]) and not (target == [] and len(x.dims) == 1):
            raise imp.err(f"reshapes the shape value {_dims_text(x)} to {target}", field)
        return _Dims(x.dims, target == [])
    if not isinstance(x, _T):
        return _fold_reshape(imp, x, target, field)
    if isinstance(shape, _Dims):  # the batch size, then the sample's sizes
        target = [0] + target
    full = (None,) + x.shape
    for k, v in enumerate(target):
        if v == 0:
            if k >= len(full):
                raise imp.err(f"shape {target}: 0 at axis {k} copies an axis the input does not have", field)
            target[k] = full[k] if k else 0
        elif v < -1:
            raise imp.err(f"shape {target} has a negative size other than -1", field)
    n = math.prod(x.shape)
    rest = target[1:]
    if target[0] == 0:
        if rest.count(-1) > 1:
            raise imp.err(f"shape {list(shape)} has more than one -1", field)
        if -1 in rest:
            known = math.prod(v for v in rest if v != -1)
            if known == 0 or n % known:
                raise imp.err(f"shape {list(shape)} does not fit samples of shape {x.shape}", field)
            rest[rest.index(-1)] = n // known
    elif target[0] == -1:
        if -1 in rest:
            raise imp.err(f"shape {list(shape)} has more than one -1", field)
    else:
        raise imp.err(f"shape {list(shape)} fixes the batch size at {target[0]}: dnnpar keeps the batch axis "
                      "dynamic (use 0 or -1 there)", field)
    if math.prod(rest) != n or any(v < 1 for v in rest):
        raise imp.err(f"shape {list(shape)} does not keep the batch: samples of shape {x.shape} ({n} elements) "
                      f"cannot become {rest}", field)
    rest = tuple(rest)
    if rest == x.shape:
        return x
    if rest == (n,):
        return imp.emit(node, field, _layer("layers", "Flatten"), [x])
    return imp.emit(node, field, _layer("layers", "Reshape", rest), [x])


def _fold_reshape(imp, c, target, field):
    """Reshape of a constant (ONNX semantics: 0 copies the input's axis, one -1 is inferred)."""
    target = [c.shape[k] if v == 0 and k < c.ndim else v for k, v in enumerate(target)]
    if any(v < -1 for v in target) or target.count(-1) > 1:
        raise imp.err(f"shape {target} is not a valid reshape target", field)
    try:
        return np.reshape(c, target)
    except ValueError as e:
        raise imp.err(f"cannot reshape a constant of shape {c.shape} to {target}: {e}", field) from None


def _dims_text(d: "_Dims") -> str:
    body = ", ".join("N" if v is None else str(v) for v in d.dims)
    return body if d.scalar else f"[{body}]"


def _const_ints(imp, v, what, field):
    """An int constant (0-d or 1-D) as a list of Python ints."""
    v = np.asarray(v)
    if v.dtype.kind not in "iu" or v.ndim > 1:
        raise imp.err(f"{what} must be a 0-d or 1-D int constant, got {v.dtype} of shape {v.shape}", field)
    return [int(k) for k in v.reshape(-1)]


def _shape(imp, node, field, i):
    a = imp.attrs(node, field, {"start": (I, 0), "end": (I, None)})
    x = imp.inp(node, 0, field)
    full = [None, *x.shape] if isinstance(x, _T) else list(np.shape(x))
    if (a["start"] or a["end"] is not None) and imp.opset < 15:
        raise imp.err(f"attributes start / end are opset-15 additions (this model is opset {imp.opset})", field)
    # ONNX clamps start and end into [0, rank] after adding rank to negative ones, as Python slicing does
    return _dims_or_array(full[a["start"]:a["end"]], False)


def _gather(imp, node, field, i):
    a = imp.attrs(node, field, {"axis": (I, 0)})
    data = imp.inp(node, 0, field, "const", dims=True)
    idx = imp.inp(node, 1, field, "const")
    if np.asarray(idx).dtype.kind not in "iu":
        raise imp.err(f"indices must be int, got {np.asarray(idx).dtype}", field)
    is_dims = isinstance(data, _Dims)
    rank = (0 if data.scalar else 1) if is_dims else np.ndim(data)
    if not -rank <= a["axis"] < rank:  # a scalar has no axis to gather along
        raise imp.err(f"axis={a['axis']} on a rank-{rank} tensor", field)
    size = len(data.dims) if is_dims else np.shape(data)[a["axis"]]
    if np.ndim(idx) > 1:
        raise imp.err(f"indices of shape {np.shape(idx)}: dnnpar folds 0-d or 1-D indices only", field)
    flat = _const_ints(imp, idx, "indices", field)
    if any(not -size <= k < size for k in flat):
        raise imp.err(f"indices {flat} out of range for an axis of size {size}", field)
    if is_dims:
        return _dims_or_array([data.dims[k] for k in flat], np.ndim(idx) == 0)
    return np.take(data, np.asarray(idx, np.int64), axis=a["axis"])


def _axes(imp, node, field):
    """Unsqueeze / Squeeze axes: input 1 in every supported opset (13 on), optional for Squeeze."""
    v = imp.inp(node, 1, field, "const", optional=True)
    return None if v is None else _const_ints(imp, v, "axes", field)


def _distinct_axes(imp, axes, rank, field):
    if any(not -rank <= k < rank for k in axes) or len({k % rank for k in axes}) != len(axes):
        raise imp.err(f"axes {axes} out of range or repeated for rank {rank}", field)
    return tuple(k % rank for k in axes)


def _unsqueeze(imp, node, field, i):
    imp.attrs(node, field, {})
    x = imp.inp(node, 0, field, "const", dims=True)
    axes = _axes(imp, node, field)
    if not axes:
        raise imp.err("needs its axes input", field)
    if isinstance(x, _Dims):
        if not (x.scalar and axes in ([0], [-1])):
            raise imp.err(f"unsqueezing the shape value {_dims_text(x)} at {axes}: dnnpar folds a scalar to 1-D only",
                          field)
        return _Dims(x.dims)
    return np.expand_dims(x, _distinct_axes(imp, axes, np.ndim(x) + len(axes), field))


def _squeeze(imp, node, field, i):
    imp.attrs(node, field, {})
    x = imp.inp(node, 0, field, "const", dims=True)
    axes = _axes(imp, node, field)
    if isinstance(x, _Dims):
        if x.scalar or len(x.dims) != 1 or axes not in (None, [0], [-1]):
            raise imp.err(f"squeezing the shape value {_dims_text(x)} at {axes}: dnnpar folds one entry to a "
                          "scalar only", field)
        return _Dims(x.dims, True)
    if axes is None:
        return np.squeeze(x)
    axes = _distinct_axes(imp, axes, np.ndim(x), field)
    if any(np.shape(x)[k] != 1 for k in axes):
        raise imp.err(f"squeezes axes {list(axes)} of shape {np.shape(x)}, not all of size 1", field)
    return np.squeeze(x, axes)


def _cast(imp, node, field, i):
    a = imp.attrs(node, field, {"to": (I, None), "saturate": (I, 1)})
    x = imp.inp(node, 0, field, dims=True)
    if a["to"] not in _DTYPES:
        raise imp.err(f"cast to {_DTYPE_NAMES.get(a['to'], a['to'])}: dnnpar folds casts to float, double, "
                      "int32, int64 and bool", field)
    dtype = _DTYPES[a["to"]][0] if a["to"] != 9 else np.bool_
    if isinstance(x, _T):
        if a["to"] != 1:
            raise imp.err(f"a cast of a computed tensor to {_DTYPE_NAMES[a['to']]}: dnnpar computes in float", field)
        return x
    if isinstance(x, _Dims):
        if a["to"] not in (6, 7):
            raise imp.err(f"a cast of the shape value {_dims_text(x)} to {_DTYPE_NAMES[a['to']]}", field)
        return x
    with np.errstate(all="ignore"):
        if x.dtype.kind == "f" and np.dtype(dtype).kind in "iu" and not np.all(np.isfinite(x)):
            raise imp.err("a cast of a non-finite constant to an int type", field)
        return x.astype(dtype)


def _cast_like(imp, node, field, i):
    imp.attrs(node, field, {"saturate": (I, 1)})
    x = imp.inp(node, 0, field, dims=True)
    like = imp.inp(node, 1, field, dims=True)
    if isinstance(x, (_T, _Dims)):  # computed tensors are float, shape values int64: a cast to their own kind
        if isinstance(x, _T) != isinstance(like, _T):
            raise imp.err("casts a computed tensor or shape value to another kind (not supported)", field)
        return x
    dtype = np.float32 if isinstance(like, _T) else np.int64 if isinstance(like, _Dims) else like.dtype
    if x.dtype.kind == "f" and np.dtype(dtype).kind in "iub" and not np.all(np.isfinite(x)):
        raise imp.err("a cast of a non-finite constant to an int type", field)
    return x.astype(dtype)


def _expand(imp, node, field, i):
    imp.attrs(node, field, {})
    x = imp.inp(node, 0, field, "const")
    shape = _const_ints(imp, imp.inp(node, 1, field, "const"), "shape", field)
    if np.ndim(imp.values[node.input[1]]) != 1 or any(d < 0 for d in shape):
        raise imp.err(f"shape {shape} must be 1-D and of sizes >= 0", field)
    try:
        out = np.broadcast_shapes(np.shape(x), tuple(shape))
    except ValueError:
        raise imp.err(f"a constant of shape {np.shape(x)} does not broadcast to {shape}", field) from None
    if math.prod(out) > MAX_ELEMENTS:
        raise imp.err(f"expanding to {list(out)} exceeds {MAX_ELEMENTS} elements", field)
    return np.broadcast_to(x, out).copy()


def _dropout(imp, node, field, i):
    imp.attrs(node, field, {"seed": (I, 0)})
    x = imp.inp(node, 0, field, "tensor")
    p = imp.scalar(imp.inp(node, 1, field, "const", optional=True), "ratio", field)
    train = imp.scalar(imp.inp(node, 2, field, "const", optional=True), "training_mode", field)
    if train:
        raise imp.err("training_mode=true is not supported (dnnpar imports inference graphs)", field)
    p = 0.5 if p is None else float(p)
    if not 0.0 <= p < 1.0:
        raise imp.err(f"ratio {p} outside [0, 1)", field)
    return imp.emit(node, field, _layer("layers", "Dropout", p), [x])


def _softmax(imp, node, field, i):
    a = imp.attrs(node, field, {"axis": (I, -1)})
    x = imp.inp(node, 0, field, "tensor")
    rank = len(x.shape) + 1
    if not -rank <= a["axis"] < rank or a["axis"] % rank == 0:
        raise imp.err(f"axis={a['axis']} on rank-{rank} input: dnnpar takes softmax within a sample (axis >= 1)",
                      field)
    return imp.emit(node, field, _layer("layers", "Softmax", a["axis"] % rank), [x])


def _concat(imp, node, field, i):
    a = imp.attrs(node, field, {"axis": (I, None)})
    xs = [imp.inp(node, k, field, dims=True) for k in range(len(node.input))]
    if xs and not any(isinstance(x, _T) for x in xs):
        return _concat_constants(imp, xs, a["axis"], field)
    if not all(isinstance(x, _T) for x in xs):
        raise imp.err("concatenates computed tensors with constants (not supported)", field)
    if len(xs) < 2:
        if len(xs) == 1:
            return xs[0]
        raise imp.err("needs at least one input", field)
    rank = len(xs[0].shape) + 1
    if a["axis"] is None or a["axis"] not in (1, 1 - rank):
        raise imp.err(f"axis={a['axis']}: dnnpar concatenates along channels (axis 1) only", field)
    return imp.emit(node, field, _layer("graph", "Concat", axis=1), xs)


def _concat_constants(imp, xs, axis, field):
    """Concat of constants and shape values (``[batch, -1]`` for a Reshape), folded."""
    if any(isinstance(x, _Dims) for x in xs):
        if axis not in (0, -1) or any(np.ndim(x) != 1 for x in xs if not isinstance(x, _Dims)) or \
                any(x.scalar for x in xs if isinstance(x, _Dims)):
            raise imp.err(f"concatenates shape values along axis {axis}: dnnpar folds 1-D ones along axis 0",
                          field)
        dims = []
        for x in xs:
            dims += list(x.dims) if isinstance(x, _Dims) else _const_ints(imp, x, "a shape part", field)
        return _dims_or_array(dims, False)
    rank = np.ndim(xs[0])
    if axis is None or rank == 0 or not -rank <= axis < rank:
        raise imp.err(f"axis={axis} on constants of rank {rank}", field)
    try:
        return np.concatenate(xs, axis=axis)
    except ValueError as e:
        raise imp.err(f"constants of shapes {[np.shape(x) for x in xs]} do not concatenate: {e}", field) from None


def _identity(imp, node, field, i):
    imp.attrs(node, field, {})
    return imp.inp(node, 0, field, dims=True)


def _constant(imp, node, field, i):
    a = imp.attrs(node, field, {"value": (TENSOR, None), "value_float": (F, None), "value_floats": (FS, None),
                                "value_int": (I, None), "value_ints": (IS, None)})
    given = [k for k, v in a.items() if v is not None]
    if len(given) != 1:
        raise imp.err(f"needs exactly one value attribute, got {given}", field)
    k, v = given[0], a[given[0]]
    if k == "value":
        return imp.tensor(v, f"{field} value")
    return np.asarray(v, np.float32 if k.startswith("value_float") else np.int64)


_CONVERTERS = {
    "Conv": _conv, "Gemm": _gemm, "MatMul": _matmul,
    "Add": _binary("add"), "Sub": _binary("sub"), "Mul": _binary("mul"), "Div": _binary("div"),
    "Relu": _unary("ReLU"), "Sigmoid": _unary("Sigmoid"), "HardSwish": _unary("HardSwish"),
    "HardSigmoid": _unary("HardSigmoid", alpha=(F, 0.2), beta=(F, 0.5)), "Clip": _clip,
    "MaxPool": _maxpool, "AveragePool": _avgpool, "GlobalAveragePool": _gap, "ReduceMean": _reducemean,
    "BatchNormalization": _batchnorm, "Flatten": _flatten, "Reshape": _reshape, "Dropout": _dropout,
    "Softmax": _softmax, "Concat": _concat, "Identity": _identity, "Constant": _constant,
    "Shape": _shape, "Gather": _gather, "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Cast": _cast,
    "CastLike": _cast_like, "Expand": _expand,
}
#: operators whose values fold at import, shapes included (the dynamic batch's shape arithmetic)
_SHAPE_OPS = ("Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Cast", "CastLike", "Reshape", "Identity")
#: operators newer than the oldest supported opset
_OP_SINCE = {"HardSwish": 14, "CastLike": 15}
#: ONNX operators (default domain) that :func:`from_onnx` imports
SUPPORTED_OPERATORS = tuple(sorted(_CONVERTERS))


def _parse(src):
    onnx = _onnx()
    from google.protobuf.message import DecodeError

    if isinstance(src, onnx.ModelProto):
        return src, None
    path = None
    if isinstance(src, (bytes, bytearray, memoryview)):
        data = bytes(src)
    elif isinstance(src, (str, os.PathLike)):
        path = Path(src)
        if not path.is_file():
            raise FileNotFoundError(f"no such ONNX file: {path}")
        if path.stat().st_size > MAX_FILE_BYTES:
            raise OnnxError(f"is {path.stat().st_size} bytes, over protobuf's 2 GiB limit", path)
        data = path.read_bytes()
    else:
        raise TypeError(f"from_onnx takes a path, bytes or an onnx.ModelProto, got {type(src).__name__}")
    if len(data) > MAX_FILE_BYTES:
        raise OnnxError(f"is {len(data)} bytes, over protobuf's 2 GiB limit", path)
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, ValueError, RuntimeError, RecursionError) as e:
        raise OnnxError(f"is not an ONNX ModelProto (truncated or corrupt?): {e}", path) from None
    return proto, path


def from_onnx(path_or_model):
    """Import an ONNX model (a path, its bytes, or an ``onnx.ModelProto``) as a dnnpar
    :class:`~dnnpar.nn.base.Graph` in eval mode, its layers on the active backend.

    The graph must take one float tensor, (N, C, H, W) or (N, features) with only N dynamic, and
    give one; the nodes it depends on must use :data:`SUPPORTED_OPERATORS` of opsets 13-21 with
    weights as initializers or constants. Anything else is an :class:`~dnnpar.errors.OnnxError`
    naming the node; a missing file is FileNotFoundError; a missing onnx package ImportError."""
    proto, path = _parse(path_or_model)
    return _Importer(proto, path).run()


# ---------------------------------------------------------------------- export
class _Exporter:
    def __init__(self, model, opset):
        from ..backend import get_backend

        self.model, self.opset, self.be = model, opset, get_backend()
        self.nodes, self.inits = [], []
        onnx = _onnx()
        self.h, self.nh = onnx.helper, onnx.numpy_helper

    def init(self, name, arr, dtype=np.float32):
        self.inits.append(self.nh.from_array(np.array(arr, dtype=dtype, order="C"), name))  # 0-d stays 0-d
        return name

    def param(self, lname, layer, key):
        d = layer.buffers if key in layer.buffers else layer.params
        return self.init(f"{lname}.{key}", self.be.to_numpy(d[key]))

    def node(self, op, ins, outs, name, **attrs):
        self.nodes.append(self.h.make_node(op, ins, outs, name=name, **attrs))

    def layer(self, lname, layer, ins, out):
        kind = None
        for cls in type(layer).__mro__:
            if cls.__name__ in _EXPORTERS:
                kind = cls.__name__
                break
        if kind is None:
            hint = (" (export a .dnnz with dnnz_to_onnx, which decodes it to dense weights)"
                    if type(layer).__name__ == "CompressedLinear" else "")
            raise ValueError(f"to_onnx: layer {lname!r} is a {type(layer).__name__}, which has no ONNX form (dnnpar "
                             f"exports {', '.join(sorted(_EXPORTERS))}){hint}")
        need = _MIN_OPSET.get(kind, SUPPORTED_OPSETS.start)
        if self.opset < need:
            raise ValueError(f"to_onnx: layer {lname!r} ({kind}) needs opset >= {need}, got {self.opset}")
        _EXPORTERS[kind](self, lname, layer, ins, out)

    def conv(self, lname, layer, ins, out, groups, dilation):
        (ph, pw) = layer.padding
        args = [ins[0], self.param(lname, layer, "weight")]
        if "bias" in layer.params:
            args.append(self.param(lname, layer, "bias"))
        self.node("Conv", args, [out], lname, kernel_shape=list(layer.kernel_size), strides=list(layer.stride),
                  pads=[ph, pw, ph, pw], dilations=list(dilation), group=groups)


def _ex_conv(ex, lname, layer, ins, out):
    ex.conv(lname, layer, ins, out, layer.groups, layer.dilation)


def _ex_depthwise(ex, lname, layer, ins, out):
    ex.conv(lname, layer, ins, out, layer.channels, (1, 1))


def _ex_linear(ex, lname, layer, ins, out):
    args = [ins[0], ex.param(lname, layer, "weight")]
    if "bias" in layer.params:
        args.append(ex.param(lname, layer, "bias"))
    ex.node("Gemm", args, [out], lname, transB=1)


def _ex_simple(op, **attrs_of):
    def export(ex, lname, layer, ins, out):
        ex.node(op, ins, [out], lname, **{k: f(layer) for k, f in attrs_of.items()})
    return export


def _ex_clip(ex, lname, layer, ins, out):
    lo, hi = getattr(layer, "min_value", None), getattr(layer, "max_value", None)
    if type(layer).__name__ == "ReLU6":
        lo, hi = 0.0, 6.0
    args = [ins[0], "" if lo is None else ex.init(f"{lname}.min", lo), "" if hi is None else ex.init(f"{lname}.max", hi)]
    while args[-1] == "":
        args.pop()
    ex.node("Clip", args, [out], lname)


def _ex_pool(op):
    def export(ex, lname, layer, ins, out):
        (ph, pw) = layer.padding
        attrs = dict(kernel_shape=list(layer.kernel_size), strides=list(layer.stride), pads=[ph, pw, ph, pw])
        if op == "AveragePool":
            attrs["count_include_pad"] = int(getattr(layer, "count_include_pad", True))
        ex.node(op, ins, [out], lname, **attrs)
    return export


def _ex_gap(ex, lname, layer, ins, out):
    if getattr(layer, "keepdims", False):
        ex.node("GlobalAveragePool", ins, [out], lname)
    else:
        ex.node("GlobalAveragePool", ins, [f"{lname}.pooled"], lname)
        ex.node("Flatten", [f"{lname}.pooled"], [out], f"{lname}.flatten", axis=1)


def _ex_batchnorm(ex, lname, layer, ins, out):
    args = [ins[0]] + [ex.param(lname, layer, k) for k in ("weight", "bias", "running_mean", "running_var")]
    ex.node("BatchNormalization", args, [out], lname, epsilon=float(layer.eps), momentum=1.0 - float(layer.momentum))


def _ex_dropout(ex, lname, layer, ins, out):
    ex.node("Dropout", [ins[0], ex.init(f"{lname}.ratio", layer.p)], [out], lname)


def _ex_reshape(ex, lname, layer, ins, out):
    ex.node("Reshape", [ins[0], ex.init(f"{lname}.shape", [0, *layer.shape], np.int64)], [out], lname)


def _ex_constop(ex, lname, layer, ins, out):
    value = ex.init(f"{lname}.value", ex.be.to_numpy(layer.buffers["value"]) if "value" in layer.buffers
                    else layer.value)
    op = {"add": "Add", "sub": "Sub", "rsub": "Sub", "mul": "Mul", "div": "Div"}[layer.op]
    ex.node(op, [value, ins[0]] if layer.op == "rsub" else [ins[0], value], [out], lname)


def _ex_add(ex, lname, layer, ins, out):
    acc = ins[0]
    for k, x in enumerate(ins[1:], 1):
        dst = out if k == len(ins) - 1 else f"{lname}.sum{k}"
        ex.node("Add", [acc, x], [dst], lname if dst == out else dst)
        acc = dst


_EXPORTERS = {
    "Conv2d": _ex_conv, "DepthwiseConv2d": _ex_depthwise, "Linear": _ex_linear,
    "ReLU": _ex_simple("Relu"), "Identity": _ex_simple("Identity"), "Sigmoid": _ex_simple("Sigmoid"),
    "HardSwish": _ex_simple("HardSwish"), "Flatten": _ex_simple("Flatten", axis=lambda layer: 1),
    "HardSigmoid": _ex_simple("HardSigmoid", alpha=lambda layer: float(layer.alpha), beta=lambda layer: float(layer.beta)),
    "Softmax": _ex_simple("Softmax", axis=lambda layer: int(layer.axis)),
    "Mul": _ex_simple("Mul"), "Concat": _ex_simple("Concat", axis=lambda layer: 1),
    "Clip": _ex_clip, "ReLU6": _ex_clip,
    "MaxPool2d": _ex_pool("MaxPool"), "AvgPool2d": _ex_pool("AveragePool"), "GlobalAvgPool2d": _ex_gap,
    "BatchNorm2d": _ex_batchnorm, "Dropout": _ex_dropout, "Reshape": _ex_reshape, "ConstantOp": _ex_constop,
    "Add": _ex_add,
}

#: layers whose ONNX operator is newer than the oldest supported opset
_MIN_OPSET = {"HardSwish": _OP_SINCE["HardSwish"]}


def to_onnx(model, path=None, opset: int = 17):
    """Export a dnnpar :class:`~dnnpar.nn.base.Graph` (or Sequential) as an ONNX model of the
    given ``opset`` (13-21): standard operators, parameters and buffers as initializers named
    ``layer.param``, the batch axis dynamic ("N"). The model passes
    ``onnx.checker.check_model(full_check=True)``; it is written to ``path`` if given and returned.
    A layer without an ONNX form (a compressed sparse layer) or a model without ``input_shape``
    is a ValueError."""
    from ..nn.base import Graph

    onnx = _onnx()
    if not isinstance(model, Graph):
        raise TypeError(f"to_onnx: model must be a dnnpar Graph or Sequential, got {type(model).__name__}")
    if isinstance(opset, bool) or not isinstance(opset, (int, np.integer)) or opset not in SUPPORTED_OPSETS:
        raise ValueError(f"to_onnx: opset must be an int in {SUPPORTED_OPSETS.start}..{SUPPORTED_OPSETS.stop - 1}, "
                         f"got {opset!r}")
    if model.input_shape is None:
        raise ValueError(f"to_onnx: {model.name} has no input_shape (the ONNX graph input needs one)")
    shapes = model.output_shapes()
    ex = _Exporter(model, int(opset))
    names = {model.input_name: model.input_name}
    for lname, layer in model.layers:
        ex.layer(lname, layer, [names[i] for i in model.inputs_of[lname]], lname)
        names[lname] = lname
    h = onnx.helper
    x = h.make_tensor_value_info(model.input_name, onnx.TensorProto.FLOAT, ["N", *model.input_shape])
    y = h.make_tensor_value_info(names[model.output], onnx.TensorProto.FLOAT, ["N", *shapes[model.output]])
    graph = h.make_graph(ex.nodes, _sanitize(model.name), [x], [y], initializer=ex.inits)
    opsets = [h.make_opsetid("", int(opset))]
    proto = h.make_model(graph, opset_imports=opsets, producer_name="dnnpar",
                         ir_version=h.find_min_ir_version_for(opsets))
    onnx.checker.check_model(proto, full_check=True)
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        onnx.save_model(proto, str(path))
    return proto


def dnnz_to_onnx(path, out, opset: int = 17):
    """Export a compressed ``.dnnz`` model (a zoo model or a stored graph, such as a compressed
    ONNX import) as ONNX: decoded to dense weights (each kept weight its centroid, pruned weights
    exact zeros), then :func:`to_onnx`. A bad .dnnz is a DnnzError, raised before anything is
    written."""
    from ..compress.pipeline import load

    return to_onnx(load(path, sparse=False), out, opset=opset)
