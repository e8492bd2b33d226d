"""Graph specs: a model's structure as JSON-able data, and the checked way back to a model.

    spec = model.spec()                  # {"name", "input_shape", "input_name", "output", "nodes": [...]}
    json.dumps(spec)                     # every value is JSON
    g = graph_from_spec(spec)            # a Graph of the same structure (fresh weights)
    g.load_state_dict(model.state_dict())

Each node is ``{"name", "type", "config", "inputs"}``: ``type`` a key of :data:`LAYER_TYPES`,
``config`` the layer's :meth:`~dnnpar.nn.base.Layer.config`. :func:`graph_from_spec` trusts
nothing: every field is checked for type and range (through :mod:`dnnpar.schema`), the model's
parameter count is computed from the configs and capped before any layer is built (building
allocates), and the built graph must have an output shape for every node. Anything wrong is
one :class:`~dnnpar.errors.SpecError` naming the field (``nodes[3].config.kernel_size``).
"""
from __future__ import annotations

import json

import numpy as np

from .. import ops
from ..ops._common import as_int
from ..ops.gemm import PRECISIONS
from ..errors import SpecError
from ..schema import Fields, check_int, loads_json
from .base import Graph, constructor_args
from .conv import Conv2d, DepthwiseConv2d, PointwiseConv2d
from .graph import Add, Concat, Mul
from .layers import (CONSTANT_OPS, MIN_BN_EPS, AvgPool2d, BatchNorm2d, Clip, ConstantOp, Dropout, Flatten, GlobalAvgPool2d,
                     HardSigmoid, HardSwish, Identity, Linear, MaxPool2d, ReLU, ReLU6, Reshape, Sigmoid, Softmax)

#: every layer a graph spec may name: class name -> class
LAYER_TYPES: dict[str, type] = {cls.__name__: cls for cls in (
    Linear, Conv2d, PointwiseConv2d, DepthwiseConv2d, BatchNorm2d, ReLU, ReLU6, Clip, Sigmoid, HardSigmoid,
    HardSwish, Softmax, Identity, Dropout, Flatten, Reshape, MaxPool2d, AvgPool2d, GlobalAvgPool2d, ConstantOp,
    Add, Concat, Mul)}

#: bounds that keep any single config small: counts of channels / features, window sizes, ranks
MAX_COUNT = 2**16
MAX_WINDOW = 64
MAX_RANK = 8
MAX_NODES = 4096
MAX_INPUTS = 64
MAX_NAME = 256
#: default cap on the parameters (and buffers) of a model built from a spec
MAX_PARAMETERS = 2**28


def _int_or_pair(lo, hi, nullable=False):
    def check(f: Fields, key):
        v = f.obj[key]
        if v is None and nullable:
            return None
        if isinstance(v, list):
            return list(f.ints(key, length=2, lo=lo, hi=hi))
        if isinstance(v, bool) or not isinstance(v, int):
            raise f.fail(f"must be an integer or a list of 2 integers{' or null' if nullable else ''}, "
                         f"got {type(v).__name__}", key)
        return check_int(v, lo, hi, f, key)
    return check


def _count(f, key):
    return f.int(key, 1, MAX_COUNT)


def _real(lo=None, hi=None, open_lo=False, nullable=False):
    def check(f: Fields, key):
        if nullable and f.obj[key] is None:
            return None
        return f.float(key, lo, hi, open_lo=open_lo)
    return check


def _dropout_p(f, key):
    p = f.float(key, 0.0, 1.0)
    if p == 1.0:
        raise f.fail("1.0 is not in [0, 1)", key)
    return p


def _reshape_shape(f, key):
    dims = f.ints(key, length=set(range(1, MAX_RANK + 1)), lo=-1, hi=2**24)
    if 0 in dims:
        raise f.fail("a size of 0 is not allowed (only sizes >= 1 and one -1)", key)
    return list(dims)


def _constant_value(f, key):
    v = f.sub(key)
    v.only({"shape", "dtype"})
    v.str("dtype", choices=("float32",))
    return {"shape": list(v.ints("shape", length=set(range(MAX_RANK + 1)), lo=1, hi=MAX_COUNT)), "dtype": "float32"}


_WINDOW = _int_or_pair(1, MAX_WINDOW)
#: constructor argument -> its check (the names mean the same in every layer that has them)
_CHECKS = {
    "in_features": _count, "out_features": _count, "in_channels": _count, "out_channels": _count,
    "channels": _count, "groups": _count,
    "kernel_size": _WINDOW, "dilation": _WINDOW, "padding": _int_or_pair(0, MAX_WINDOW),
    "stride": _WINDOW,
    "bias": lambda f, k: f.bool(k), "count_include_pad": lambda f, k: f.bool(k),
    "keepdims": lambda f, k: f.bool(k),
    "algo": lambda f, k: f.str(k, choices=ops.conv.ALGOS),
    "p": _dropout_p, "eps": _real(MIN_BN_EPS, 1.0), "momentum": _real(0.0, 1.0),
    "min_value": _real(-3.4e38, 3.4e38, nullable=True), "max_value": _real(-3.4e38, 3.4e38, nullable=True),
    "alpha": _real(-1e6, 1e6), "beta": _real(-1e6, 1e6),
    "axis": lambda f, k: f.int(k, 1, MAX_RANK),
    "shape": _reshape_shape,
    "op": lambda f, k: f.str(k, choices=CONSTANT_OPS),
    "value": _constant_value,
    "precision": lambda f, k: f.str(k, choices=tuple(PRECISIONS), default="fp32"),
}
#: arguments added after files were first written: a config without them takes this default
_OPTIONAL = {"precision"}
#: pooling windows default their stride to the window (null)
_POOL_CHECKS = {"stride": _int_or_pair(1, MAX_WINDOW, nullable=True)}


def _prod(v) -> int:
    out = 1
    for s in ([v, v] if isinstance(v, int) else v):
        out *= s
    return out


def _parameters(cls, c: dict) -> int:
    """Parameters and buffers a layer of this (checked) config will allocate."""
    if cls is Linear:
        return c["in_features"] * c["out_features"] + c["out_features"] * c["bias"]
    if cls is Conv2d:
        return c["out_channels"] * (c["in_channels"] // c["groups"]) * _prod(c["kernel_size"]) + \
            c["out_channels"] * c["bias"]
    if cls is PointwiseConv2d:
        return c["in_channels"] * c["out_channels"] + c["out_channels"] * c["bias"]
    if cls is DepthwiseConv2d:
        return c["channels"] * (_prod(c["kernel_size"]) + c["bias"])
    if cls is BatchNorm2d:
        return 4 * c["channels"]
    if cls is ConstantOp:
        return _prod(c["value"]["shape"])
    return 0


def graph_to_spec(graph: Graph) -> dict:
    """The JSON-able spec of ``graph`` (see the module docstring); ValueError for a layer whose
    type is not in :data:`LAYER_TYPES`."""
    nodes = []
    for lname, layer in graph.layers:
        tname = type(layer).__name__
        if LAYER_TYPES.get(tname) is not type(layer):
            raise ValueError(f"{graph.name}: layer {lname!r} is a {tname}, which graph specs cannot describe "
                             f"(dnnpar.nn.LAYER_TYPES: {', '.join(LAYER_TYPES)})")
        nodes.append({"name": lname, "type": tname, "config": layer.config(), "inputs": list(graph.inputs_of[lname])})
    return {"name": graph.name, "input_shape": None if graph.input_shape is None else list(graph.input_shape),
            "input_name": graph.input_name, "output": graph.output, "nodes": nodes}


def _name(f: Fields, key, default=None):
    v = f.str(key) if default is None else f.str(key, default=default)
    if not v or len(v) > MAX_NAME:
        raise f.fail(f"must be a non-empty string of at most {MAX_NAME} characters", key)
    return v


def _check_node(f: Fields, seen: set) -> tuple:
    """(name, class, kwargs, inputs) of one node, every field checked; nothing is built."""
    f.only({"name", "type", "config", "inputs"})
    lname = _name(f, "name")
    if lname in seen:
        raise f.fail(f"{lname!r} is the graph input or an earlier node's name", "name")
    tname = f.str("type")
    if tname not in LAYER_TYPES:
        raise f.fail(f"unknown layer type {tname[:80]!r} (one of {', '.join(LAYER_TYPES)})", "type")
    cls = LAYER_TYPES[tname]
    ins = f.list("inputs", max_len=MAX_INPUTS)
    arity = getattr(cls, "arity", 1)
    if not ins or (arity is not None and len(ins) != arity) or (arity is None and len(ins) < 2):
        raise f.fail(f"{tname} takes {arity or '2 or more'} input(s), got {len(ins)}", "inputs")
    for j, i in enumerate(ins):
        if not isinstance(i, str) or i not in seen:
            raise f.fail(f"{str(i)[:80]!r} is neither the graph input nor an earlier node", f"inputs[{j}]")
    cf = f.sub("config")
    args = constructor_args(cls)
    missing = [a for a in args if a not in cf.obj and a not in _OPTIONAL]
    if missing:
        raise cf.fail(f"missing (a {tname} config holds {', '.join(args) or 'nothing'})", missing[0])
    cf.only(args)
    checks = {**_CHECKS, **(_POOL_CHECKS if cls in (MaxPool2d, AvgPool2d) else {})}
    return lname, cls, {a: checks[a](cf, a) for a in args}, list(ins)


def _numpy_scalar(v):
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON")


def _as_json(spec):
    """A Python spec through JSON, so that it is checked as a file would be: tuples become lists,
    NumPy scalars numbers, non-string keys strings (then refused as unknown keys); NaN and
    infinities stay, for the field checks to name."""
    try:
        return json.loads(json.dumps(spec, default=_numpy_scalar))
    except (TypeError, ValueError, RecursionError) as e:
        raise SpecError(f"is not JSON-able data ({e})"[:300]) from None


def graph_from_spec(spec, max_parameters: int = MAX_PARAMETERS, path=None) -> Graph:
    """A :class:`Graph` built from ``spec`` (a dict, read as JSON data, or JSON text) on the
    active backend, with fresh (seed 0) weights; load them with ``load_state_dict``. SpecError, naming the field, for
    anything that does not describe a buildable model, checked before anything is allocated;
    ``max_parameters`` caps the parameters and buffers of the whole model."""
    if as_int(max_parameters, "max_parameters", "graph_from_spec") < 0:
        raise ValueError(f"graph_from_spec: max_parameters must be >= 0, got {max_parameters}")
    if isinstance(spec, (str, bytes, bytearray, memoryview)):
        spec = loads_json(spec, SpecError, path)
    else:
        spec = _as_json(spec)
    top = Fields(spec, SpecError, path)
    top.only({"name", "input_shape", "input_name", "output", "nodes"})
    name = _name(top, "name", default="graph")
    input_name = _name(top, "input_name", default="input")
    input_shape = top.ints("input_shape", length={1, 2, 3, 4}, lo=1, hi=MAX_COUNT)
    if _prod(input_shape) >= 2**31:
        raise top.fail(f"{tuple(input_shape)} is over 2**31 elements per sample", "input_shape")
    raw = top.list("nodes", max_len=MAX_NODES)
    if not raw:
        raise top.fail("must list at least one node", "nodes")
    seen, planned, total = {input_name}, [], 0
    for i, item in enumerate(raw):
        f = Fields(item, SpecError, path, f"nodes[{i}]")
        node = _check_node(f, seen)
        total += _parameters(node[1], node[2])
        if total > max_parameters:
            raise f.fail(f"the model would hold {total} parameters by this node, over the cap of {max_parameters}")
        seen.add(node[0])
        planned.append(node)
    output = top.str("output", default=None, optional=True)
    if output is not None and (output == input_name or output not in seen):
        raise top.fail(f"{output[:80]!r} is not a node", "output")
    built = []
    for i, (lname, cls, kwargs, ins) in enumerate(planned):
        try:
            built.append((lname, cls(**kwargs), ins))
        except (ValueError, TypeError) as e:
            raise SpecError(str(e), path, f"nodes[{i}].config") from None
    graph = Graph(built, input_shape=tuple(input_shape), name=name, output=output, input_name=input_name)
    shapes = {input_name: tuple(input_shape)}
    for i, (lname, layer) in enumerate(graph.layers):
        try:
            shapes[lname] = tuple(layer.output_shape(*[shapes[j] for j in graph.inputs_of[lname]]))
        except (ValueError, TypeError) as e:
            raise SpecError(f"does not fit its input(s): {e}", path, f"nodes[{i}]") from None
    return graph


__all__ = ["LAYER_TYPES", "graph_from_spec", "graph_to_spec", "SpecError"]
