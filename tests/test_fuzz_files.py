"""Property / fuzz tests of the three file formats: .dnnz, checkpoints (.npz), IDX.

Each generated file is written with valid checksums (a .dnnz is re-serialised with fresh CRC32s
and SHA-256, an .npz re-zipped), so only the readers' validation of what the bytes *mean* can
refuse it. Every case must end in the format's one documented error (DnnzError,
CheckpointError, IDXError) or in a successful load whose result is checked against what the
file says. Writers are checked too: whatever they write, the reader accepts and reproduces.

Hypothesis runs derandomised (the same cases every run) unless DNNPAR_TEST_SEED is set, which
then seeds it, so CI's fresh seed draws fresh cases.
"""
from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import struct
import tempfile
import zipfile
import zlib
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import dnnpar as dp  # noqa: E402
from dnnpar import checkpoint  # noqa: E402
from dnnpar.compress import container, header as dnnz_header, pipeline, prune, quantize  # noqa: E402
from dnnpar.compress.encode import encode_layer  # noqa: E402
from dnnpar.data import fashion_mnist, idx  # noqa: E402
from dnnpar.errors import CheckpointError, DnnzError, IDXError  # noqa: E402
from dnnpar.nn.models import build  # noqa: E402
from dnnpar.nn.optim import SGD  # noqa: E402
from dnnpar.train import EpochRecord, TrainConfig  # noqa: E402
from oracles import assert_reordered_close, longest_sum  # noqa: E402

_SEED = int(os.environ.get("DNNPAR_TEST_SEED", "0") or 0)


def fuzz(n: int):
    """``n`` generated cases, deterministic unless DNNPAR_TEST_SEED is set."""
    def deco(f):
        f = settings(max_examples=n, deadline=None, derandomize=_SEED == 0, database=None,
                     suppress_health_check=list(HealthCheck))(f)
        return seed(_SEED)(f) if _SEED else f
    return deco


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory(prefix="dnnpar-fuzz-") as d:
        yield Path(d)


@pytest.fixture(autouse=True, scope="module")
def _numpy_backend():
    with dp.use_backend("numpy"):
        yield


# ------------------------------------------------------------------ JSON mutations (shared)
RAW = "\x00raw\x00"  # placeholder replaced by raw JSON text after dumping
NASTY = st.one_of(
    st.none(), st.booleans(), st.integers(-2**70, 2**70), st.sampled_from([0, -1, 1, 2, 16, 17, 10**12, 2**64]),
    st.floats(allow_nan=False, allow_infinity=False), st.sampled_from([0.5, -0.0, 1.0, 1e300]),
    st.text(max_size=8), st.sampled_from(["", "lenet300", "fc1", "vgg16", "full"]),
    st.lists(st.integers(-3, 2**40), max_size=5), st.just({}), st.just([]),
    st.sampled_from(["1e999", "-1e999", "NaN", "Infinity", "-Infinity", "1" * 150]).map(lambda t: (RAW, t)))


def _paths(obj, prefix=()):
    """Every (path, value) inside a JSON value, the root included."""
    yield prefix, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


@st.composite
def json_mutation(draw, doc):
    """The JSON text of ``doc`` with one value replaced (by a wrong type, a huge, negative or
    non-finite number...), one key removed or added, a list item added, or a key duplicated."""
    doc = json.loads(json.dumps(doc))
    path = draw(st.sampled_from([p for p, _ in _paths(doc)]))
    kind = draw(st.sampled_from(["replace", "replace", "delete", "add", "duplicate"]))
    parent, key, node = None, None, doc
    for k in path:
        parent, key, node = node, k, node[k]
    raw = None
    plain = NASTY.filter(lambda v: not isinstance(v, tuple))
    if kind == "replace" and parent is not None:
        value = draw(NASTY)
        if isinstance(value, tuple):
            value, raw = RAW, value[1]
        parent[key] = value
    elif kind == "delete" and parent is not None:
        del parent[key]
    elif kind != "duplicate" and isinstance(node, dict):
        node[draw(st.sampled_from(["extra", "name", "model", "x"]))] = draw(plain)
    elif kind != "duplicate" and isinstance(node, list):
        node.append(draw(plain))
    text = json.dumps(doc)
    if raw is not None:
        text = text.replace(json.dumps(RAW), raw)
    if kind == "duplicate":
        starts = [i for i in range(len(text) - 1) if text[i] == "{" and text[i + 1] == '"']
        if starts:
            at = draw(st.sampled_from(starts))
            first_key = text[at + 1:].split('"')[1]
            text = text[:at + 1] + json.dumps(first_key) + ": 0, " + text[at + 1:]
    return text


# ------------------------------------------------------------------ .dnnz
def _random_codes(model, rng, weight_bits, index_bits, density):
    codes = []
    for n in prune.prunable_layers(model):
        layer = model[n]
        shape = tuple(layer.params["weight"].shape)
        k = 1 << weight_bits
        c = np.where(rng.random(shape) < density, rng.integers(1, k, shape), 0).astype(np.uint16)
        codebook = np.zeros(k, np.float32)
        codebook[1:] = rng.standard_normal(k - 1).astype(np.float32)
        bias = layer.params.get("bias")
        codes.append(encode_layer(n, quantize.SharedLayer(codebook, c, weight_bits), index_bits,
                                  None if bias is None else rng.standard_normal(bias.shape).astype(np.float32)))
    return codes


def serialize(header_text: str, sections: list) -> bytes:
    """A .dnnz with valid checksums from JSON text and (name, ndarray | bytes) pairs, exactly in
    container.py's documented layout (duplicated names allowed, to test the reader)."""
    body = bytearray()
    hb = header_text.encode("utf-8")
    body += struct.pack("<4sHHI", b"DNNZ", 1, 0, len(hb)) + hb + struct.pack("<I", len(sections))
    for name, value in sections:
        nb = name.encode("utf-8")
        if isinstance(value, bytes):
            code, shape, payload = 0, (len(value),), value
        else:
            code = container.DTYPE_CODES[value.dtype.newbyteorder("<")]
            shape, payload = value.shape, np.ascontiguousarray(value).tobytes()
        body += struct.pack("<H", len(nb)) + nb + struct.pack("<BB", code, len(shape))
        body += struct.pack(f"<{len(shape)}QQ", *shape, len(payload)) + payload + struct.pack("<I", zlib.crc32(payload))
    return bytes(body) + hashlib.sha256(body).digest()


@pytest.fixture(scope="module")
def dnnz(workdir):
    """A valid small .dnnz (LeNet-300-100 on 1x4x4 inputs, 3 classes) and its reference output."""
    rng = np.random.default_rng(11)
    kwargs = {"num_classes": 3, "in_shape": [1, 4, 4], "seed": 5}
    model = build("lenet300", **kwargs)
    codes = _random_codes(model, rng, 4, 3, 0.3)
    path = workdir / "good.dnnz"
    pipeline.save(path, model, codes, model_kwargs=kwargs, meta={"accuracy": {"final": 0.5}})
    header, sections = container.read(path)
    x = rng.standard_normal((2, 1, 4, 4)).astype(np.float32)
    ref = pipeline.load(path, sparse=False).forward(x)
    return header, sections, x, ref


def _load_dnnz(path, x=None, ref=None):
    """load() must end in DnnzError or a model holding exactly the file's values in every
    parameter and buffer (none left at its initial value); with ``ref``, also computing ``ref``
    on ``x``. Returns 'ok' or 'refused'."""
    try:
        model = pipeline.load(path, sparse=False)
    except DnnzError:
        return "refused"
    _, codes, others = pipeline.read_codes(path)
    by_layer = {c.name: c for c in codes}
    for n, p in [(n, p) for n, p, _ in model.named_parameters()] + list(model.named_buffers()):
        lname, key = n.rsplit(".", 1)
        c = by_layer.get(lname)
        want = others[n] if c is None else (c.codebook[c.dense_codes()] if key == "weight" else c.bias)
        np.testing.assert_array_equal(p, want, err_msg=n)
    if ref is not None:
        np.testing.assert_array_equal(model.forward(x), ref)
    return "ok"


@fuzz(1200)
@given(data=st.data())
def test_dnnz_header_mutations_end_in_dnnz_error_or_the_same_model(dnnz, workdir, data):
    header, sections, x, ref = dnnz
    text = data.draw(json_mutation(header))
    path = workdir / "h.dnnz"
    path.write_bytes(serialize(text, list(sections.items())))
    _load_dnnz(path, x, ref)  # accepted only if the model computes what the original file does


SECTION_OPS = st.sampled_from(["drop", "extra", "duplicate", "flip", "truncate", "extend", "retype", "reshape",
                               "nonfinite", "codebook0", "swap"])


@fuzz(700)
@given(data=st.data())
def test_dnnz_section_mutations_end_in_dnnz_error_or_the_same_model(dnnz, workdir, data):
    header, sections, x, ref = dnnz
    items = [(k, v if isinstance(v, bytes) else np.array(v)) for k, v in sections.items()]
    for _ in range(data.draw(st.integers(1, 2))):
        op = data.draw(SECTION_OPS)
        i = data.draw(st.integers(0, len(items) - 1))
        name, v = items[i]
        if op == "drop":
            del items[i]
        elif op == "extra":
            items.append((data.draw(st.sampled_from(["fc9/codes", "param/fc1.weight", "param/x.y", "junk",
                                                     "fc1/rows2", "param/fc1"])), np.zeros(3, np.float32)))
        elif op == "duplicate":
            items.append((name, v))
        elif op == "swap":
            j = data.draw(st.integers(0, len(items) - 1))
            items[i], items[j] = (name, items[j][1]), (items[j][0], v)
        else:
            shape = getattr(v, "shape", None)  # the section's own, whatever its name (an extra one too)
            raw = bytearray(v if isinstance(v, bytes) else v.tobytes())
            if op == "flip" and raw:
                for _ in range(data.draw(st.integers(1, 3))):
                    raw[data.draw(st.integers(0, len(raw) - 1))] ^= 1 << data.draw(st.integers(0, 7))
            elif op == "truncate":
                raw = raw[:data.draw(st.integers(0, max(len(raw) - 1, 0)))]
            elif op == "extend":
                raw += bytes(data.draw(st.integers(1, 8)))
            if isinstance(v, bytes):
                items[i] = (name, bytes(raw))
                continue
            if op == "retype":
                with np.errstate(invalid="ignore"):
                    v = v.astype(data.draw(st.sampled_from([np.float64, np.int32, np.uint8, np.uint16, np.int64])))
            elif op == "reshape":
                v = v.reshape(-1)[:max(v.size - 1, 0)] if v.size else np.zeros(2, v.dtype)
            elif op == "nonfinite" and v.dtype.kind == "f" and v.size:
                v = v.copy()
                v.reshape(-1)[data.draw(st.integers(0, v.size - 1))] = data.draw(st.sampled_from([np.nan, np.inf]))
            elif op == "codebook0" and name.endswith("/codebook") and v.size:
                v = v.copy()
                v[0] = 0.25
            elif op in ("flip", "truncate", "extend"):
                n = len(raw) // v.dtype.itemsize
                v = np.frombuffer(bytes(raw[:n * v.dtype.itemsize]), v.dtype).copy()
                if op == "flip" and v.size == int(np.prod(shape)):
                    v = v.reshape(shape)
            items[i] = (name, v)
    path = workdir / "s.dnnz"
    path.write_bytes(serialize(json.dumps(header), items))
    _load_dnnz(path)  # a flipped float is a different valid model: it must hold the file's values


@fuzz(400)
@given(data=st.data())
def test_dnnz_byte_flips_and_truncations_end_in_dnnz_error(dnnz, workdir, data):
    header, sections, x, ref = dnnz
    good = serialize(json.dumps(header), list(sections.items()))
    b = bytearray(good)
    if data.draw(st.booleans()):
        for _ in range(data.draw(st.integers(1, 4))):
            b[data.draw(st.integers(0, len(b) - 1))] ^= 1 << data.draw(st.integers(0, 7))
    else:
        b = b[:data.draw(st.integers(0, max(len(b) - 1, 0)))]
    path = workdir / "b.dnnz"
    path.write_bytes(bytes(b))
    outcome = _load_dnnz(path, x, ref)
    assert outcome == "refused" or bytes(b) == good


@fuzz(40)
@given(builder=st.sampled_from(["lenet300", "lenet5"]), classes=st.integers(1, 12),
       side=st.sampled_from([16, 20, 24]),  # lenet5's fc1 size is right only where (side - 4) // 2 - 4 is even
       weight_bits=st.integers(1, 9), index_bits=st.integers(1, 6), density=st.sampled_from([0.0, 0.05, 0.5, 1.0]),
       model_seed=st.integers(0, 2**31), data_seed=st.integers(0, 2**31),
       subset=st.sampled_from(["full", "embedded"]), data_dir=st.one_of(st.none(), st.text(max_size=10)))
def test_dnnz_writer_output_is_always_read_back_exactly(workdir, builder, classes, side, weight_bits, index_bits,
                                                        density, model_seed, data_seed, subset, data_dir):
    rng = np.random.default_rng(data_seed)
    kwargs = {"num_classes": classes, "in_shape": [1, side, side], "seed": model_seed}
    model = build(builder, **kwargs)
    codes = _random_codes(model, rng, weight_bits, index_bits, density)
    path = workdir / "w.dnnz"
    pipeline.save(path, model, codes, model_kwargs=kwargs,
                  meta={"accuracy": {"final": float(rng.random())}, "data": {"subset": subset, "data_dir": data_dir}})
    back = pipeline.load(path, sparse=False)
    for c in codes:
        np.testing.assert_array_equal(back[c.name].params["weight"], c.codebook[c.dense_codes()])
        if c.bias is not None:
            np.testing.assert_array_equal(back[c.name].params["bias"], c.bias)
    sparse = pipeline.load(path)  # the CSR x codebook form of the same file is accepted too
    x = rng.standard_normal((2, 1, side, side)).astype(np.float32)
    # the CSR products sum each output's terms in another order than the dense GEMMs: within the
    # float32 reordering bound for the longest fan-in, one chained sum per compressed layer
    n, _ = longest_sum(back, 2)
    assert_reordered_close(sparse.forward(x), back.forward(x), n, len(codes), "sparse vs dense forward")


def test_dnnz_header_schema_names_the_field(dnnz, workdir):
    header, sections, x, ref = dnnz
    items = list(sections.items())
    cases = {
        "kwargs.num_classes": {**header, "kwargs": {**header["kwargs"], "num_classes": 10**12}},
        "kwargs.in_shape": {**header, "kwargs": {**header["kwargs"], "in_shape": [1, 4]}},
        "builder": {**header, "builder": "resnet50"},
        "layers[0].entries": {**header, "layers": [{**header["layers"][0], "entries": -1}] + header["layers"][1:]},
        "layers[1].has_bias": {**header, "layers": [header["layers"][0], {**header["layers"][1], "has_bias": 1}]
                               + header["layers"][2:]},
        "layers": {**header, "layers": header["layers"] + header["layers"][:1]},
    }
    for field, h in cases.items():
        path = workdir / "named.dnnz"
        path.write_bytes(serialize(json.dumps(h), items))
        with pytest.raises(DnnzError) as info:
            pipeline.load(path)
        assert info.value.field == field and str(path) in str(info.value), (field, str(info.value))
    for raw in ("1e999", "Infinity", "NaN"):
        path.write_bytes(serialize(json.dumps(header).replace('"entries": ', f'"entries": {raw}, "x": ', 1), items))
        with pytest.raises(DnnzError, match="non-finite|overflows"):
            pipeline.load(path)
    # a file missing a layer does not load with that layer's random initial weights
    fewer = {**header, "layers": header["layers"][:2]}
    path.write_bytes(serialize(json.dumps(fewer), [(k, v) for k, v in items if not k.startswith("fc3/")]))
    with pytest.raises(DnnzError, match=r"every prunable layer.*missing \['fc3'\]"):
        pipeline.load(path)
    # has_bias false for a layer that has one: its bias would stay random
    nob = {**header, "layers": [{**header["layers"][0], "has_bias": False}] + header["layers"][1:]}
    path.write_bytes(serialize(json.dumps(nob), [(k, v) for k, v in items if k != "fc1/bias"]))
    with pytest.raises(DnnzError, match="has_bias is false but fc1") as info:
        pipeline.load(path)
    assert info.value.field == "layers.fc1.has_bias"


def test_dnnz_kwargs_tables_match_the_zoo():
    import inspect

    from dnnpar.nn.models import MODELS

    assert set(dnnz_header.KWARGS) == set(MODELS)
    for name, table in dnnz_header.KWARGS.items():
        assert set(table) <= set(inspect.signature(MODELS[name]).parameters), name


# ------------------------------------------------------------------ .dnnz of graph models
def _tiny_graph(c=3, classes=4, side=6, seed=0):
    """conv (no bias) -> BN -> ReLU -> [conv] + skip -> GAP -> fc: a residual graph of every
    section kind (compressed conv and fc layers, BN parameters and buffers as param/)."""
    from dnnpar import nn
    from dnnpar.nn.graph import Add, Graph

    g = Graph([
        ("conv1", nn.Conv2d(1, c, 3, padding=1, bias=False, seed=seed), ["input"]),
        ("bn", nn.BatchNorm2d(c), ["conv1"]), ("relu", nn.ReLU(), ["bn"]),
        ("conv2", nn.Conv2d(c, c, 3, padding=1, seed=seed + 1), ["relu"]),
        ("add", Add(), ["conv2", "relu"]),
        ("pool", nn.GlobalAvgPool2d(), ["add"]), ("fc", nn.Linear(c, classes, seed=seed + 2), ["pool"]),
    ], input_shape=(1, side, side), name="tiny_graph")
    rng = np.random.default_rng(seed)
    bn = g["bn"]
    for d in (bn.params, bn.buffers):  # BN values that differ from their defaults, so a lost one shows
        for k in d:
            d[k][...] = rng.uniform(0.5, 1.5, d[k].shape).astype(np.float32)
    return g


@pytest.fixture(scope="module")
def graph_dnnz(workdir):
    """A valid small graph .dnnz (builder "graph"), its input and reference output."""
    rng = np.random.default_rng(12)
    model = _tiny_graph()
    codes = _random_codes(model, rng, 4, 3, 0.4)
    path = workdir / "graph.dnnz"
    pipeline.save(path, model, codes, meta={"accuracy": {"final": 0.5}})
    header, sections = container.read(path)
    assert header["builder"] == "graph"
    x = rng.standard_normal((2, 1, 6, 6)).astype(np.float32)
    ref = pipeline.load(path, sparse=False).forward(x)
    return header, sections, x, ref


def _load_graph_dnnz(path, header, original, x, ref):
    """A graph .dnnz must end in DnnzError or in a model holding exactly the file's values
    (:func:`_load_dnnz`) that is the graph its header's spec describes: the original file's
    model (computing ``ref`` on ``x``) when the spec is unchanged, else the model
    graph_from_spec builds from that spec, with the file's weights, computing the same.
    ``header``: the file's header (JSON text or dict); ``original``: the valid file's header."""
    from dnnpar.nn.spec import graph_from_spec

    if _load_dnnz(path) == "refused":
        return "refused"
    model = pipeline.load(path, sparse=False)
    spec = json.loads(header)["graph"] if isinstance(header, str) else header["graph"]
    if spec == original["graph"]:
        np.testing.assert_array_equal(model.forward(x), ref)
        return "ok"
    oracle = graph_from_spec(spec)
    assert oracle.spec() == model.spec()
    oracle.load_state_dict(model.state_dict())
    oracle.eval()
    if int(np.prod(oracle.input_shape)) <= 4096:
        xs = np.random.default_rng(1).standard_normal((2, *oracle.input_shape)).astype(np.float32)
        np.testing.assert_array_equal(model.forward(xs), oracle.forward(xs))
    return "ok"


@fuzz(1000)
@given(data=st.data())
def test_graph_dnnz_header_mutations_end_in_dnnz_error_or_the_described_model(graph_dnnz, workdir, data):
    header, sections, x, ref = graph_dnnz
    text = data.draw(json_mutation(header))
    path = workdir / "gh.dnnz"
    path.write_bytes(serialize(text, list(sections.items())))
    _load_graph_dnnz(path, text, header, x, ref)


SPEC_LIES = st.sampled_from(["config_int", "config_bias", "entry_shape", "drop_node", "drop_entry",
                             "drop_entry_and_sections", "rename_entry", "rename_node", "ghost_entry", "swap_entries",
                             "output"])


@fuzz(300)
@given(data=st.data())
def test_graph_dnnz_spec_and_layer_lies_end_in_dnnz_error_or_the_described_model(graph_dnnz, workdir, data):
    """Structured lies between the spec and the layer entries: a prunable node's sizes, a bias,
    an entry's shape, a node or entry dropped, renamed, invented or swapped."""
    header, sections, x, ref = graph_dnnz
    h = json.loads(json.dumps(header))
    items = dict(sections)
    nodes, layers = h["graph"]["nodes"], h["layers"]
    for _ in range(data.draw(st.integers(1, 2))):
        op = data.draw(SPEC_LIES)
        node = data.draw(st.sampled_from(nodes)) if nodes else None
        entry = data.draw(st.sampled_from(layers)) if layers else None
        if op == "config_int" and node and node["config"]:
            ints = [k for k, v in node["config"].items() if isinstance(v, int) and not isinstance(v, bool)]
            if ints:
                node["config"][data.draw(st.sampled_from(ints))] = data.draw(st.integers(0, 8))
        elif op == "config_bias" and node and "bias" in node["config"]:
            node["config"]["bias"] = not node["config"]["bias"]
        elif op == "entry_shape" and entry:
            k = data.draw(st.integers(0, len(entry["shape"]) - 1))
            entry["shape"][k] = data.draw(st.integers(1, 8))
        elif op == "drop_node" and node:
            nodes.remove(node)
        elif op.startswith("drop_entry") and entry:
            layers.remove(entry)
            if op == "drop_entry_and_sections":
                items = {k: v for k, v in items.items() if not k.startswith(entry["name"] + "/")}
        elif op == "rename_entry" and entry:
            new = data.draw(st.sampled_from(["bn", "pool", "fc", "conv1", "ghost"]))
            items = {(new + k[len(entry["name"]):] if k.startswith(entry["name"] + "/") else k): v
                     for k, v in items.items()}
            entry["name"] = new
        elif op == "rename_node" and node:
            node["name"] = data.draw(st.sampled_from(["bn", "ghost", "fc", "conv2"]))
        elif op == "ghost_entry" and entry:
            layers.append({**entry, "name": "ghost"})
            items.update({"ghost" + k[len(entry["name"]):]: v for k, v in items.items()
                          if k.startswith(entry["name"] + "/")})
        elif op == "swap_entries" and len(layers) > 1:
            i, j = data.draw(st.integers(0, len(layers) - 1)), data.draw(st.integers(0, len(layers) - 1))
            layers[i]["name"], layers[j]["name"] = layers[j]["name"], layers[i]["name"]
        elif op == "output":
            h["graph"]["output"] = data.draw(st.sampled_from(["bn", "pool", "add", "fc", "input", "ghost"]))
    path = workdir / "gl.dnnz"
    path.write_bytes(serialize(json.dumps(h), list(items.items())))
    _load_graph_dnnz(path, h, header, x, ref)


@fuzz(40)
@given(c=st.integers(1, 5), classes=st.integers(1, 6), side=st.integers(3, 8), weight_bits=st.integers(1, 9),
       index_bits=st.integers(1, 6), density=st.sampled_from([0.0, 0.05, 0.5, 1.0]), model_seed=st.integers(0, 2**31),
       data_seed=st.integers(0, 2**31))
def test_graph_dnnz_writer_output_is_always_read_back_exactly(workdir, c, classes, side, weight_bits, index_bits,
                                                              density, model_seed, data_seed):
    rng = np.random.default_rng(data_seed)
    model = _tiny_graph(c, classes, side, model_seed)
    codes = _random_codes(model, rng, weight_bits, index_bits, density)
    path = workdir / "gw.dnnz"
    pipeline.save(path, model, codes)
    back = pipeline.load(path, sparse=False)
    assert back.spec() == model.spec()
    for c_ in codes:
        np.testing.assert_array_equal(back[c_.name].params["weight"], c_.codebook[c_.dense_codes()])
    for n, b in model.named_buffers():
        np.testing.assert_array_equal(dict(back.named_buffers())[n], b)
    sparse = pipeline.load(path)  # fc as CSR x codebook where its codes fit 8 bits, else decoded
    assert type(sparse["fc"]).__name__ == ("CompressedLinear" if weight_bits <= 8 else "Linear")
    x = rng.standard_normal((2, 1, side, side)).astype(np.float32)
    n, depth = longest_sum(back, len(x))  # the same products summed in another order
    assert_reordered_close(sparse.forward(x), back.forward(x), n, depth // 2, "CSR x codebook")


# ------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def ckpt(workdir):
    """A valid training checkpoint of a small LeNet-300-100 with momentum for some parameters."""
    rng = np.random.default_rng(3)
    model = build("lenet300", num_classes=3, in_shape=(1, 4, 4))
    opt = SGD(model, 0.1, 0.9)
    opt.velocity = {n: rng.standard_normal(p.shape).astype(np.float32) for n, p, _ in model.named_parameters()
                    if n.startswith("fc2")}
    cfg = asdict(TrainConfig(model="lenet300", epochs=3))
    history = [asdict(EpochRecord(e, 0.01, 1.0 / e, 0.5, 0.4, 1000.0, 1.5)) for e in (1, 2)]
    path = workdir / "good.npz"
    checkpoint.save_checkpoint(path, model, cfg, 2, history, opt.state())
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return model, arrays


def _fresh_model():
    return build("lenet300", num_classes=3, in_shape=(1, 4, 4), seed=99)


def _npy_bytes(arr: np.ndarray, header: dict | None = None, version=(1, 0), data: bytes | None = None) -> bytes:
    buf = io.BytesIO()
    h = {"descr": np.lib.format.dtype_to_descr(arr.dtype), "fortran_order": False, "shape": arr.shape}
    h.update(header or {})
    # (the header writers put the magic string first themselves)
    (np.lib.format.write_array_header_1_0 if version == (1, 0) else np.lib.format.write_array_header_2_0)(buf, h)
    buf.write(arr.tobytes() if data is None else data)
    return buf.getvalue()


def _zip(path, members: list, compress: bool = False):
    import warnings

    with warnings.catch_warnings():  # duplicated names are one of the cases
        warnings.simplefilter("ignore", UserWarning)
        _zip_members(path, members, compress)


def _zip_members(path, members, compress):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED) as zf:
        for name, raw in members:
            zf.writestr(name + ".npy", raw)


def _load_ckpt(path):
    """load_checkpoint must end in CheckpointError or restore exactly what NumPy's own reader
    finds in the file, with metadata train.py can rebuild its config and records from."""
    model = _fresh_model()
    opt = SGD(model, 0.1, 0.9)
    try:
        meta = checkpoint.load_checkpoint(path, model, opt, expect_model="lenet300")
    except CheckpointError:
        return "refused"
    with np.load(path, allow_pickle=False) as z:
        ref_arrays = {k: z[k] for k in z.files}
    for n, p, _ in model.named_parameters():
        np.testing.assert_array_equal(p, ref_arrays[f"param/{n}"])
    assert set(opt.velocity) == {k[len("opt/velocity/"):] for k in ref_arrays if k.startswith("opt/")}
    for n, v in opt.velocity.items():
        np.testing.assert_array_equal(v, ref_arrays[f"opt/velocity/{n}"])
    assert isinstance(meta.epoch, int) and meta.epoch >= 0 and meta.model == "lenet300"
    [EpochRecord(**r) for r in meta.history]  # the records train.py rebuilds
    TrainConfig(**meta.config).validate()
    return "ok"


@fuzz(800)
@given(data=st.data())
def test_checkpoint_meta_mutations_end_in_checkpoint_error_or_a_correct_load(ckpt, workdir, data):
    _, arrays = ckpt
    meta = json.loads(str(arrays["meta"]))
    text = data.draw(json_mutation(meta))
    path = workdir / "m.npz"
    np.savez(path, **{**arrays, "meta": np.array(text)})
    _load_ckpt(path)
    try:
        checkpoint.read_meta(path).model  # what the CLI asks of a checkpoint
    except CheckpointError:
        pass


NPY_OPS = st.sampled_from(["huge_shape", "shape", "dtype", "object", "fortran", "short", "long", "drop", "extra",
                           "rename", "v2", "deflate", "meta_array", "velocity_dtype", "velocity_shape", "swap"])


@fuzz(700)
@given(data=st.data())
def test_checkpoint_member_mutations_end_in_checkpoint_error_or_a_correct_load(ckpt, workdir, data):
    _, arrays = ckpt
    members = [(k, _npy_bytes(v)) for k, v in arrays.items()]
    compress = False
    for _ in range(data.draw(st.integers(1, 2))):
        if not members:
            break
        op = data.draw(NPY_OPS)
        i = data.draw(st.integers(0, len(members) - 1))
        name, _ = members[i]
        v = arrays.get(name, np.zeros(3, np.float32))
        if op == "huge_shape":
            members[i] = (name, _npy_bytes(v, {"shape": data.draw(st.sampled_from([(10**12,), (2**31, 2**31), (2**63,)]))}))
        elif op == "shape":
            members[i] = (name, _npy_bytes(v, {"shape": tuple(data.draw(st.lists(st.integers(0, 400), max_size=3)))}))
        elif op == "dtype" and v.dtype.kind == "f":
            members[i] = (name, _npy_bytes(v.astype(data.draw(st.sampled_from([np.float64, np.float16, np.int32])))))
        elif op == "object":
            members[i] = (name, _npy_bytes(v, {"descr": "|O"}))
        elif op == "fortran" and v.ndim == 2:
            members[i] = (name, _npy_bytes(v, {"fortran_order": True}))
        elif op == "short":
            raw = members[i][1]
            members[i] = (name, raw[:data.draw(st.integers(0, max(len(raw) - 1, 0)))])
        elif op == "long":
            members[i] = (name, members[i][1] + bytes(data.draw(st.integers(1, 16))))
        elif op == "drop":
            del members[i]
        elif op == "extra":
            members.append((data.draw(st.sampled_from(["param/fc9.weight", "opt/other", "opt/velocity/fc1.weight",
                                                      "junk"])), _npy_bytes(np.zeros(3, np.float32))))
        elif op == "rename":
            members[i] = (name + "x", members[i][1])
        elif op == "v2":
            members[i] = (name, _npy_bytes(v, version=(2, 0)))
        elif op == "deflate":
            compress = True
        elif op == "meta_array":
            members = [(k, _npy_bytes(np.zeros(2, np.float32)) if k == "meta" else r) for k, r in members]
        elif op == "velocity_dtype":
            members = [(k, _npy_bytes(arrays[k].astype(np.float64)) if k.startswith("opt/") and k in arrays
                       else r) for k, r in members]
        elif op == "velocity_shape":
            members = [(k, _npy_bytes(arrays[k].reshape(-1)) if k.startswith("opt/") and k in arrays else r) for k, r in members]
        elif op == "swap":
            j = data.draw(st.integers(0, len(members) - 1))
            members[i], members[j] = (name, members[j][1]), (members[j][0], members[i][1])
    path = workdir / "n.npz"
    _zip(path, members, compress)
    _load_ckpt(path)
    try:
        _fresh_model().load(path)
    except CheckpointError:
        pass


def test_checkpoint_errors_name_the_problem(ckpt, workdir):
    model, arrays = ckpt
    with open(workdir / "single.npz", "wb") as f:
        np.save(f, arrays["param/fc1.weight"])
    with pytest.raises(CheckpointError, match="single .npy array, not an .npz"):
        checkpoint.load_checkpoint(workdir / "single.npz", _fresh_model())
    members = [(k, _npy_bytes(v)) for k, v in arrays.items() if k != "param/fc1.weight"]
    members.append(("param/fc1.weight", _npy_bytes(arrays["param/fc1.weight"], {"shape": (10**12,)})))
    _zip(workdir / "huge.npz", members)
    with pytest.raises(CheckpointError, match=r"claims shape \(1000000000000,\)") as info:
        _fresh_model().load(workdir / "huge.npz")
    assert info.value.field == "member 'param/fc1.weight'"
    meta = json.loads(str(arrays["meta"]))
    for change, field in (({"epoch": -1}, "meta.epoch"), ({"config": {"epochs": 3}}, "meta.config.model"),
                          ({"history": [{"epoch": 1}]}, "meta.history[0].lr"), ({"config": []}, "meta.config")):
        np.savez(workdir / "meta.npz", **{**arrays, "meta": np.array(json.dumps({**meta, **change}))})
        with pytest.raises(CheckpointError) as info:
            checkpoint.load_checkpoint(workdir / "meta.npz", _fresh_model())
        assert info.value.field == field, str(info.value)
    np.savez(workdir / "vel.npz", **{**arrays, "opt/velocity/fc2.weight": arrays["opt/velocity/fc2.weight"].astype(np.float64)})
    with pytest.raises(CheckpointError, match="momentum of fc2.weight must be float32"):
        checkpoint.load_checkpoint(workdir / "vel.npz", _fresh_model(), SGD(_fresh_model(), 0.1))
    np.savez(workdir / "miss.npz", **{k: v for k, v in arrays.items() if k != "param/fc3.bias"})
    with pytest.raises(CheckpointError, match="has fc3.bias, the checkpoint does not"):
        _fresh_model().load(workdir / "miss.npz")


def test_checkpoint_config_schema_matches_train_config():
    assert set(checkpoint._config_schema()) == {f.name for f in fields(TrainConfig)}
    assert set(checkpoint.RECORD_RANGES) == {f.name for f in fields(EpochRecord)}


@fuzz(150)
@given(model=st.sampled_from(["lenet300", "lenet5", "vgg16", "alexnet", "mobilenet_v1"]), epochs=st.integers(1, 50),
       batch=st.integers(1, 4096), lr=st.floats(0, 10, exclude_min=True), momentum=st.floats(0, 1, exclude_max=True),
       wd=st.floats(0, 1),
       schedule=st.sampled_from(["cosine", "step", "constant"]), sd=st.integers(0, 2**63 - 1),
       subset=st.sampled_from(["full", "embedded"]), data_dir=st.one_of(st.none(), st.text(max_size=12)),
       backend=st.sampled_from([None, "numpy", "emu", "cuda"]), done=st.integers(0, 5), nesterov=st.booleans(),
       rec=st.tuples(st.floats(0, 10), st.floats(0, 1e3), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1e7),
                     st.floats(0, 1e5)))
def test_checkpoint_writer_output_is_always_read_back(ckpt, workdir, model, epochs, batch, lr, momentum, wd,
                                                      schedule, sd, subset, data_dir, backend, done, nesterov, rec):
    net, arrays = ckpt
    cfg = asdict(TrainConfig(model, epochs, batch, lr, momentum, nesterov, wd, schedule, sd, subset, data_dir,
                             backend))
    history = [asdict(EpochRecord(e, *rec)) for e in range(1, done + 1)]
    path = workdir / "w.npz"
    checkpoint.save_checkpoint(path, net, cfg, done, history)
    meta = checkpoint.read_meta(path)
    assert (meta.model, meta.config, meta.epoch, meta.history) == (model, cfg, done, history)
    fresh = _fresh_model()
    checkpoint.load_checkpoint(path, fresh)
    for (n, p, _), (_, q, _) in zip(net.named_parameters(), fresh.named_parameters()):
        np.testing.assert_array_equal(p, q, err_msg=n)


# ------------------------------------------------------------------ IDX
@pytest.fixture
def small_cap(monkeypatch):
    monkeypatch.setattr(idx, "MAX_IDX_BYTES", 1 << 20)


@fuzz(1200)
@given(zero=st.sampled_from([0, 0, 0, 1, 256]), code=st.sampled_from([0x08, 0x08, 0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E,
                                                                      0x00, 0x07, 0xFF]),
       dims=st.lists(st.one_of(st.integers(0, 6), st.sampled_from([2**16, 2**31, 2**32 - 1])), max_size=4),
       ndim_lie=st.sampled_from([0, 0, 0, 1, -1]), extra=st.sampled_from([0, 0, 0, -1, 1, 5]),
       gz=st.booleans(), gz_cut=st.sampled_from([None, None, None, 1, 10]), expect=st.sampled_from([None, 1, 2, 3]))
def test_idx_headers_end_in_idx_error_or_the_exact_array(workdir, small_cap, zero, code, dims, ndim_lie, extra, gz,
                                                         gz_cut, expect):
    ndim = max(0, len(dims) + ndim_lie)
    size = int(np.prod(dims, dtype=object)) if dims else 1
    n_payload = max(0, min(size, 4096) + extra)
    payload = bytes(np.random.default_rng(len(dims) + extra + 1).integers(0, 256, n_payload, dtype=np.uint8))
    raw = struct.pack(">HBB", zero, code, min(ndim, 255)) + b"".join(struct.pack(">I", d) for d in dims) + payload
    path = workdir / ("f.gz" if gz else "f")
    blob = gzip.compress(raw, mtime=0) if gz else raw
    if gz and gz_cut:
        blob = blob[:-gz_cut]
    path.write_bytes(blob)
    try:
        got = idx.read_idx(path, expect)
    except IDXError:
        return
    assert zero == 0 and code == 0x08 and ndim == len(dims) >= 1 and size == n_payload and size <= 1 << 20
    assert expect in (None, ndim) and not (gz and gz_cut)
    assert got.dtype == np.uint8 and got.shape == tuple(dims)
    assert got.tobytes() == payload


def test_idx_gzip_bombs_cost_nothing(workdir, small_cap):
    zeros = gzip.compress(struct.pack(">HBBI", 0, 8, 1, 4 << 20) + bytes(4 << 20), mtime=0)  # 4 MiB in ~4 KiB
    (workdir / "bomb.gz").write_bytes(zeros)
    with pytest.raises(IDXError, match="over the 1048576-byte limit"):
        idx.read_idx(workdir / "bomb.gz")
    lie = gzip.compress(struct.pack(">HBBI", 0, 8, 1, 10) + bytes(4 << 20), mtime=0)  # says 10, inflates to 4 MiB
    (workdir / "lie.gz").write_bytes(lie)
    with pytest.raises(IDXError, match=r"announces \(10,\) \(18 bytes\) but the file holds more than 18"):
        idx.read_idx(workdir / "lie.gz")
    (workdir / "f32").write_bytes(struct.pack(">HBBI", 0, 0x0D, 1, 2) + np.array([1.5, 2], ">f4").tobytes())
    with pytest.raises(IDXError, match=r"data type 0x0d \(float32\) is not supported") as info:
        idx.read_idx(workdir / "f32")
    assert info.value.field == "dtype"


def _write_split(folder: Path, n_train, n_test, labels_train, labels_test, side=28):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(n_train * 31 + n_test)
    idx.write_idx(folder / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (n_train, side, side), dtype=np.uint8))
    idx.write_idx(folder / "t10k-images-idx3-ubyte", rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8))
    idx.write_idx(folder / "train-labels-idx1-ubyte.gz", np.asarray(labels_train, np.uint8))
    idx.write_idx(folder / "t10k-labels-idx1-ubyte", np.asarray(labels_test, np.uint8))


@fuzz(300)
@given(n_train=st.integers(0, 4), n_test=st.integers(0, 3), side=st.sampled_from([28, 28, 28, 27]),
       train_labels=st.lists(st.sampled_from([0, 3, 9, 9, 10, 255]), max_size=5),
       test_labels=st.lists(st.integers(0, 12), max_size=4))
def test_fashion_mnist_splits_end_in_idx_error_or_a_correct_data_set(workdir, n_train, n_test, side, train_labels,
                                                                      test_labels):
    folder = workdir / "fm"
    _write_split(folder, n_train, n_test, train_labels, test_labels, side)
    try:
        d = fashion_mnist.load(folder)
    except IDXError:
        ok = (side == 28 and n_train >= 1 and n_test >= 1 and len(train_labels) == n_train
              and len(test_labels) == n_test and max(train_labels + test_labels) <= 9)
        assert not ok, "a valid data set was refused"
        return
    assert side == 28 and len(train_labels) == n_train >= 1 and len(test_labels) == n_test >= 1
    assert d.y_train.tolist() == train_labels and d.y_test.tolist() == test_labels
    assert d.x_train.shape == (n_train, 1, 28, 28) and d.x_train.dtype == np.float32


@fuzz(300)
@given(shape=st.lists(st.integers(0, 9), min_size=1, max_size=4), gz=st.booleans(), s=st.integers(0, 2**32))
def test_idx_writer_output_is_always_read_back(workdir, shape, gz, s):
    a = np.random.default_rng(s).integers(0, 256, shape, dtype=np.uint8)
    path = workdir / ("r.gz" if gz else "r")
    idx.write_idx(path, a)
    np.testing.assert_array_equal(idx.read_idx(path, len(shape)), a)


def test_idx_writer_refuses_what_the_reader_cannot_read(workdir):
    with pytest.raises(ValueError, match="uint8"):
        idx.write_idx(workdir / "x", np.array([1, 300]))
    with pytest.raises(ValueError, match="uint8"):
        idx.write_idx(workdir / "x", np.array([-1]))
    with pytest.raises(ValueError, match="1..255 dimensions"):
        idx.write_idx(workdir / "x", np.uint8(3))
