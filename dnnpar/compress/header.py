"""What a ``.dnnz`` header and its sections must mean, checked before anything is built.

The container (``container.py``) vouches for the bytes; this module vouches for their meaning.
The header is a JSON object::

    {"format": "dnnz-deep-compression", "version": 1,
     "model": "<Sequential.name>", "builder": "<a key of dnnpar.nn.models.MODELS>" | "graph",
     "kwargs": {...the builder's keyword arguments...},
     "graph": {...Graph.spec()...},           # exactly when builder is "graph" (kwargs then {})
     "meta": {"accuracy": {...}, "config": {...}, "data": {"subset": ..., "data_dir": ...}, ...},
     "layers": [{"name", "shape", "weight_bits", "index_bits", "entries", "code_nbits",
                 "rel_nbits", "has_bias"}, ...]}

and the sections are, per compressed layer ``L``: ``L/codebook`` (float32, 2^weight_bits values,
the first 0.0: code 0 is the filler / pruned weight), ``L/rows`` (uint16 or uint32, entries per
row), ``L/codes.table``, ``L/codes``, ``L/rel.table``, ``L/rel`` (bytes) and ``L/bias`` exactly
when ``has_bias``; plus ``param/<layer>.<name>`` (finite float32) for every other parameter and
buffer. Anything else, missing or mistyped is a :class:`DnnzError` naming the field.

The builder's keyword arguments are bounded so that no header can ask for a model much larger
than VGG-16 (``num_classes`` <= 10,000, inputs of at most 3 x 256 x 256 values): the model is
built only after these checks, and its layers are then checked against the header's shapes.

A model outside the zoo (an imported ONNX graph) is stored as ``"builder": "graph"`` with its
structure in ``"graph"`` (:meth:`dnnpar.nn.base.Graph.spec`); the spec is checked by
:func:`dnnpar.nn.graph_from_spec` when the model is built, under the parameter cap
:func:`described_parameters` derives from the file. Sections and layer entries follow the same
rules for both kinds of builder.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import DnnzError
from ..schema import Fields

FORMAT = "dnnz-deep-compression"
FORMAT_VERSION = 1
MAX_CLASSES = 10_000
MAX_INPUT_VALUES = 3 * 256 * 256    # C x H x W of the largest input a header may ask for
MAX_SEED = 2**62
MAX_LAYER_WEIGHTS = 2**28           # per compressed layer: > VGG-16 fc6 (102.8 M), < int32 columns
MAX_LAYERS = 4096
LAYER_KEYS = ("name", "shape", "weight_bits", "index_bits", "entries", "code_nbits", "rel_nbits", "has_bias")
LAYER_SECTIONS = ("codebook", "rows", "codes.table", "codes", "rel.table", "rel")
HEADER_KEYS = ("format", "version", "model", "builder", "kwargs", "meta", "layers", "graph")
GRAPH = "graph"                     # the builder of a model stored with its graph spec

# smallest input height / width each zoo model's pooling stack accepts
_MIN_SIDE = {"lenet300": 1, "lenet5": 16, "alexnet": 67, "vgg16": 32}


def _in_shape(f: Fields, builder: str) -> tuple:
    shape = f.ints("in_shape", 3, 1, MAX_INPUT_VALUES)
    if min(shape[1:]) < _MIN_SIDE[builder]:
        raise f.fail(f"{builder} needs inputs of at least {_MIN_SIDE[builder]}x{_MIN_SIDE[builder]}, got {shape}",
                     "in_shape")
    if shape[0] * shape[1] * shape[2] > MAX_INPUT_VALUES:
        raise f.fail(f"{shape} has more than {MAX_INPUT_VALUES} values", "in_shape")
    return shape


def _classes(f: Fields):
    return f.int("num_classes", 1, MAX_CLASSES)


def _seed(f: Fields):
    return f.int("seed", 0, MAX_SEED)


def _dropout(f: Fields):
    return f.float("dropout", 0.0, 0.99)


#: builder -> {keyword: checker(Fields) -> value}; a keyword outside its table is refused
KWARGS = {
    "lenet300": {"num_classes": _classes, "in_shape": lambda f: _in_shape(f, "lenet300"), "seed": _seed},
    "lenet5": {"num_classes": _classes, "in_shape": lambda f: _in_shape(f, "lenet5"), "seed": _seed},
    "alexnet": {"num_classes": _classes, "groups": lambda f: f.int("groups", 1, 2),
                "in_shape": lambda f: _in_shape(f, "alexnet"), "dropout": _dropout, "seed": _seed},
    "vgg16": {"num_classes": _classes, "in_shape": lambda f: _in_shape(f, "vgg16"), "dropout": _dropout,
              "seed": _seed},
    "mobilenet_v1": {"alpha": lambda f: f.float("alpha", 0.0, 4.0, open_lo=True),
                     "resolution": lambda f: f.int("resolution", 32, 256), "num_classes": _classes,
                     "in_channels": lambda f: f.int("in_channels", 1, 3), "seed": _seed},
}


@dataclass(frozen=True)
class LayerMeta:
    """One entry of the header's ``layers`` list, validated."""
    name: str
    shape: tuple
    weight_bits: int
    index_bits: int
    entries: int
    code_nbits: int
    rel_nbits: int
    has_bias: bool

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def cols(self) -> int:
        return int(np.prod(self.shape[1:]))


@dataclass(frozen=True)
class Header:
    """A validated .dnnz header (``raw``: the JSON object itself, for callers that print it)."""
    model: str
    builder: str
    kwargs: dict
    meta: dict
    layers: tuple
    raw: dict
    graph: dict | None = None   # the spec when builder is "graph" (checked when it is built)


def _layer(f: Fields) -> LayerMeta:
    f.only(LAYER_KEYS)
    name = f.str("name")
    if not name or "/" in name or "." in name or len(name) > 200:
        raise f.fail(f"{name!r} is not a layer name", "name")
    shape = f.ints("shape", {2, 4}, 1, MAX_LAYER_WEIGHTS)
    if int(np.prod(shape, dtype=object)) > MAX_LAYER_WEIGHTS:
        raise f.fail(f"{shape} holds more than {MAX_LAYER_WEIGHTS} weights", "shape")
    wb, ib = f.int("weight_bits", 1, 16), f.int("index_bits", 1, 16)
    rows_cols = int(np.prod(shape, dtype=object))
    # an entry consumes at least one column position of its row, so entries <= rows x cols
    entries = f.int("entries", 0, rows_cols)
    # every Huffman code has at least one bit and at most MAX_CODE_LENGTH (20)
    code_nbits = f.int("code_nbits", entries, 20 * entries)
    rel_nbits = f.int("rel_nbits", entries, 20 * entries)
    return LayerMeta(name, shape, wb, ib, entries, code_nbits, rel_nbits, f.bool("has_bias"))


def _meta(f: Fields) -> dict:
    """``meta`` is free-form, but the parts dnnpar reads are checked."""
    if "accuracy" in f.obj:
        acc = f.sub("accuracy")
        for k in acc.obj:
            acc.float(k, 0.0, 1.0)
    if "config" in f.obj:
        f.sub("config")
    if "data" in f.obj:
        data = f.sub("data")
        data.only(("subset", "data_dir"))
        data.str("subset", ("full", "embedded"))
        data.str("data_dir", optional=True, default=None)
    return f.obj


def parse_header(header, path=None) -> Header:
    """The validated meaning of a .dnnz header; DnnzError naming the first bad field."""
    from ..nn.models import MODELS

    f = Fields(header, DnnzError, path)
    f.only(HEADER_KEYS)
    if f.str("format") != FORMAT:
        raise f.fail(f"{header['format']!r} is not {FORMAT!r}: not a dnnpar compressed model", "format")
    f.int("version", FORMAT_VERSION, FORMAT_VERSION)
    model = f.str("model")
    builder = f.str("builder", (*MODELS, GRAPH))
    kw = f.sub("kwargs")
    if builder == GRAPH and kw.obj:
        raise kw.fail(f"must be {{}} for a \"{GRAPH}\" builder (its spec describes the model), got keys "
                      f"{', '.join(map(repr, sorted(kw.obj)))}"[:300])
    table = KWARGS.get(builder, {})
    kw.only(table)
    kwargs = {k: table[k](kw) for k in kw.obj}
    graph = None
    if builder == GRAPH:
        graph = f.sub("graph").obj
    elif "graph" in f.obj:
        raise f.fail(f"only a \"{GRAPH}\" builder stores a graph spec ({builder} is built from its kwargs)", "graph")
    meta = _meta(f.sub("meta"))
    items = f.list("layers", MAX_LAYERS)
    lf = Fields({}, DnnzError, path, "layers")
    layers = tuple(_layer(lf.item(item, i)) for i, item in enumerate(items))
    names = [m.name for m in layers]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise f.fail(f"layer(s) {', '.join(dup)} listed more than once", "layers")
    return Header(model, builder, kwargs, meta, layers, header, graph)


def described_parameters(hdr: Header, others: dict) -> int:
    """The parameters and buffers a .dnnz describes: every compressed layer's weights (rows x
    cols of its header shape) and bias, plus the elements of its ``param/`` sections (``others``:
    their arrays, by name).

    This is the cap a stored graph spec is built under. Every parameter and buffer of a loaded
    model comes from the file (load refuses one that is missing or unexpected), so a spec that
    asks for more than this cannot be the file's model and is refused before anything is built.
    The ``param/`` elements are backed by bytes in the file; a layer's weights are not (a pruned
    layer may hold no entries at all), but decoding the layer allocates rows x cols weights
    anyway, so building the model costs no more than decoding the file already does: what the
    header may declare stays bounded by MAX_LAYER_WEIGHTS per layer and, for a graph, by the
    spec module's own cap (see pipeline._build)."""
    total = sum(m.rows * m.cols + (m.rows if m.has_bias else 0) for m in hdr.layers)
    return int(total + sum(int(v.size) for v in others.values()))


def check_sections(hdr: Header, sections: dict, path=None) -> None:
    """Every section the header implies is there with its type, dtype and shape, and nothing
    else is (``param/`` sections are matched against the model on load)."""
    expected = {}
    for m in hdr.layers:
        for key in LAYER_SECTIONS + (("bias",) if m.has_bias else ()):
            expected[f"{m.name}/{key}"] = (m, key)
    for name in sections:
        if name not in expected and not (name.startswith("param/") and "." in name[6:]):
            raise DnnzError("unknown section (not implied by the header's layers, not a param/ array)", path,
                            f"section {name!r}")
    for name, (m, key) in expected.items():
        if name not in sections:
            raise DnnzError(f"missing (layer {m.name} needs its {key})", path, f"section {name!r}")
        v = sections[name]
        raw = key in ("codes.table", "codes", "rel.table", "rel")
        if raw != isinstance(v, bytes):
            raise DnnzError(f"must be {'raw bytes' if raw else 'an array'}", path, f"section {name!r}")
        if raw:
            continue
        want = {"codebook": ((1 << m.weight_bits,), ("<f4",)), "rows": ((m.rows,), ("<u2", "<u4")),
                "bias": ((m.rows,), ("<f4",))}[key]
        if v.shape != want[0] or v.dtype.str not in want[1]:
            raise DnnzError(f"{v.dtype} array of shape {v.shape}, expected {' or '.join(want[1])} of shape "
                            f"{want[0]}", path, f"section {name!r}")
        if v.dtype.kind == "f" and not np.all(np.isfinite(v)):
            raise DnnzError("holds non-finite values", path, f"section {name!r}")
        if key == "codebook" and v[0] != 0.0:
            raise DnnzError(f"codebook[0] is {float(v[0])!r}: code 0 is the filler and must be 0.0", path,
                            f"section {name!r}")
    for name, v in sections.items():
        if name.startswith("param/"):
            if not isinstance(v, np.ndarray) or v.dtype.str != "<f4":
                raise DnnzError("must be a float32 array", path, f"section {name!r}")
            if not np.all(np.isfinite(v)):
                raise DnnzError("holds non-finite values", path, f"section {name!r}")
