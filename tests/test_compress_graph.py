"""Deep Compression of graph models (imported ONNX graphs, residual and inverted-residual nets):
the .dnnz stores the graph spec, loads back as the same model, runs compressed (fc layers as
CSR x codebook) within the float32 reordering bound of the decoded model, and exports to ONNX
(decoded weights, pruned zeros kept) that the ONNX reference evaluator runs to the same result;
the same through the CLI; and headers whose spec and layer entries disagree are refused."""
import json
from pathlib import Path

import numpy as np
import pytest

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install 'dnnpar[onnx]')")
from onnx import numpy_helper as nh  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

import dnnpar as dp  # noqa: E402
from dnnpar import nn  # noqa: E402
from dnnpar.cli import main  # noqa: E402
from dnnpar.compress import container, prune  # noqa: E402
from dnnpar.compress.pipeline import CompressConfig, CompressedLinear, compress, load, read_codes, save  # noqa: E402
from dnnpar.data import fashion_mnist  # noqa: E402
from dnnpar.errors import DnnzError  # noqa: E402
from dnnpar.interop import dnnz_to_onnx, from_onnx  # noqa: E402
from dnnpar.nn.graph import Add, Graph  # noqa: E402
from dnnpar.train import predict  # noqa: E402
from oracles import assert_reordered_close, longest_sum  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY_RESNET = ROOT / "notebooks" / "data" / "tiny_resnet.onnx"


def mobilenet_v2_block(seed=0, c=4):
    """A MobileNet-v2-style net for 1x28x28 inputs: stride-2 stem, one inverted residual (1x1
    expand + BN + ReLU6, 3x3 depthwise + ReLU6, 1x1 project, Add with the skip), pool, two fc."""
    e = 3 * c
    return Graph([
        ("stem", nn.Conv2d(1, c, 3, stride=2, padding=1, seed=seed), ["input"]),
        ("stem_relu", nn.ReLU(), ["stem"]),
        ("expand", nn.PointwiseConv2d(c, e, bias=False, seed=seed + 1), ["stem_relu"]),
        ("expand_bn", nn.BatchNorm2d(e), ["expand"]), ("relu6a", nn.ReLU6(), ["expand_bn"]),
        ("dw", nn.DepthwiseConv2d(e, 3, padding=1, bias=False, seed=seed + 2), ["relu6a"]),
        ("relu6b", nn.ReLU6(), ["dw"]),
        ("project", nn.Conv2d(e, c, 1, seed=seed + 3), ["relu6b"]),
        ("res", Add(), ["project", "stem_relu"]),
        ("pool", nn.GlobalAvgPool2d(), ["res"]),
        ("fc1", nn.Linear(c, 16, seed=seed + 4), ["pool"]), ("fc_relu", nn.ReLU(), ["fc1"]),
        ("fc2", nn.Linear(16, 10, seed=seed + 5), ["fc_relu"]),
    ], input_shape=(1, 28, 28), name="mobilenet_v2_tiny")


@pytest.fixture(autouse=True, scope="module")
def _numpy_backend():
    with dp.use_backend("numpy"):
        yield


@pytest.fixture(scope="module")
def small():
    d = fashion_mnist.load(subset="embedded")
    return fashion_mnist.Dataset(d.x_train[:512], d.y_train[:512], d.x_test[:128], d.y_test[:128], d.source)


CFG = CompressConfig(quality=0.8, cycles=1, retrain_epochs=1, finetune_epochs=1, lr=0.01)


@pytest.fixture(scope="module", params=["tiny_resnet", "mobilenet_v2"])
def compressed(request, small, tmp_path_factory):
    """(model after compression, its codes, the .dnnz written from it) for each graph."""
    model = from_onnx(TINY_RESNET) if request.param == "tiny_resnet" else mobilenet_v2_block()
    codes, _, log = compress(model, small, CFG, out=lambda s: None)
    path = tmp_path_factory.mktemp("graph-dnnz") / f"{request.param}.dnnz"
    save(path, model, codes, meta={"accuracy": log})
    return model, codes, log, path


def test_graph_dnnz_stores_the_spec_and_loads_the_same_model(compressed):
    model, codes, log, path = compressed
    header, back, others = read_codes(path)
    assert header["builder"] == "graph" and header["kwargs"] == {}
    assert header["graph"] == json.loads(json.dumps(model.spec()))
    assert sorted(c.name for c in back) == sorted(prune.prunable_layers(model))
    dense = load(path, sparse=False)
    assert type(dense) is Graph and dense.spec() == model.spec() and not dense.training
    # every parameter and buffer is the compressed model's, bit for bit (weights: codebook[codes])
    want, got = model.state_dict(), dense.state_dict()
    assert sorted(want) == sorted(got)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    model.eval()
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    np.testing.assert_array_equal(dense.forward(x), model.forward(x))


@pytest.mark.parametrize("backend", ["numpy", "emu"])
def test_graph_dnnz_runs_compressed_as_the_decoded_model(compressed, small, backend):
    model, codes, log, path = compressed
    with dp.use_backend(backend):
        sparse, dense = load(path), load(path, sparse=False)
        fcs = [n for n, layer in model.layers if isinstance(layer, nn.Linear)]
        assert fcs and all(isinstance(sparse[n], CompressedLinear) for n in fcs)
        assert all(isinstance(sparse[n], (nn.Conv2d, nn.DepthwiseConv2d)) for n in prune.prunable_layers(model)
                   if n not in fcs)  # conv layers are decoded
        x = small.x_test[:24]
        # the same float32 products summed in another order (CSR rows against a dense GEMM)
        n, depth = longest_sum(dense, len(x))
        assert_reordered_close(sparse.forward(x), dense.forward(x), n, depth // 2, "SpMM")
        assert_reordered_close(sparse.forward(x[:1]), dense.forward(x[:1]), n, depth // 2, "SpMV")
    acc = float((predict(load(path), small.x_test) == small.y_test).mean())
    assert acc == pytest.approx(log["final"], abs=2 / len(small.y_test))  # a near-tie may flip


def _reference(proto, x):
    return ReferenceEvaluator(proto).run(None, {proto.graph.input[0].name: x})[0]


def test_graph_dnnz_exports_to_onnx_with_pruned_zeros(compressed, small, tmp_path):
    model, codes, log, path = compressed
    proto = dnnz_to_onnx(path, tmp_path / "m.onnx")
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)
    inits = {t.name: nh.to_array(t) for t in proto.graph.initializer}
    for c in codes:  # every pruned weight is an exact zero, every kept one its centroid
        np.testing.assert_array_equal(inits[f"{c.name}.weight"], c.codebook[c.dense_codes()], err_msg=c.name)
    dense = load(path, sparse=False)
    x = small.x_test[:8].astype(np.float32)
    n, depth = longest_sum(dense, len(x))
    assert_reordered_close(_reference(onnx.load(tmp_path / "m.onnx"), x), dense.forward(x), n, depth // 2,
                           "ONNX reference evaluator")


def test_cli_compresses_evaluates_and_exports_an_onnx_graph(tmp_path, capsys, small):
    out, exported = tmp_path / "x.dnnz", tmp_path / "y.onnx"
    assert main(["compress", "--onnx", TINY_RESNET, "--out", out, "--subset", "embedded", "--cycles", "1",
                 "--retrain-epochs", "0", "--finetune-epochs", "0", "--quiet"]) == 0
    assert "wrote" in capsys.readouterr().out and out.exists()
    assert main(["evaluate", out, "--subset", "embedded"]) == 0
    text = capsys.readouterr().out
    assert "tiny_resnet" in text and "CSR x codebook" in text and "test accuracy" in text
    assert main(["evaluate", out, "--dense", "--subset", "embedded"]) == 0
    assert "dense decode" in capsys.readouterr().out
    assert main(["export", out, "--out", exported]) == 0
    onnx.checker.check_model(str(exported), full_check=True)
    dense = load(out, sparse=False)
    x = small.x_test[:8].astype(np.float32)
    n, depth = longest_sum(dense, len(x))
    assert_reordered_close(_reference(onnx.load(exported), x), dense.forward(x), n, depth // 2, "exported")
    # and the export imports back as the same graph (same layers, the decoded weights)
    again = from_onnx(exported)
    assert [n for n, _ in again.layers] == [n for n, _ in dense.layers]


def test_a_zoo_model_is_still_stored_by_its_builder(tmp_path, rng):
    from dnnpar.nn.models import lenet300

    m = lenet300(num_classes=3, in_shape=(1, 4, 4))
    codes, _, _ = compress(m, _random_data(rng, (1, 4, 4), 3), CompressConfig(cycles=1, retrain_epochs=0,
                                                                               finetune_epochs=0), out=lambda s: None)
    save(tmp_path / "z.dnnz", m, codes, model_kwargs={"num_classes": 3, "in_shape": [1, 4, 4]})
    header, _, _ = read_codes(tmp_path / "z.dnnz")
    assert header["builder"] == "lenet300" and "graph" not in header
    # without its kwargs it is not the default lenet300: the file then holds its graph instead
    save(tmp_path / "g.dnnz", m, codes)
    header, _, _ = read_codes(tmp_path / "g.dnnz")
    assert header["builder"] == "graph" and header["model"] == "lenet300"
    x = rng.standard_normal((3, 1, 4, 4)).astype(np.float32)
    np.testing.assert_array_equal(load(tmp_path / "g.dnnz", sparse=False).forward(x),
                                  load(tmp_path / "z.dnnz", sparse=False).forward(x))
    with pytest.raises(ValueError, match="do not build it with a zoo builder"):
        save(tmp_path / "bad.dnnz", m, codes, model_kwargs={"num_classes": 4, "in_shape": [1, 4, 4]})


def _random_data(rng, shape, classes, n=32):
    x = rng.standard_normal((n, *shape)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int64)
    return fashion_mnist.Dataset(x, y, x[:8], y[:8], "random")


# ------------------------------------------------------------------ headers that lie
def _rewrite(path, out, edit_header, edit_sections=lambda s: s):
    header, sections = container.read(path)
    container.write(out, edit_header(json.loads(json.dumps(header))), edit_sections(dict(sections)))
    return out


def _node(header, name):
    return next(n for n in header["graph"]["nodes"] if n["name"] == name)


def test_graph_headers_that_lie_are_dnnz_errors_naming_the_field(compressed, tmp_path):
    model, codes, log, path = compressed
    fc = [n for n, layer in model.layers if isinstance(layer, nn.Linear)][-1]
    conv = [n for n, layer in model.layers if isinstance(layer, nn.Conv2d)][0]

    def lie(edit_header, edit_sections=lambda s: s):
        bad = _rewrite(path, tmp_path / "lie.dnnz", edit_header, edit_sections)
        with pytest.raises(DnnzError) as info:
            load(bad)
        assert str(bad) in str(info.value)
        return info.value

    def fewer_outputs(h):  # the spec's fc has one output fewer than the layer entry says
        _node(h, fc)["config"]["out_features"] -= 1
        return h
    e = lie(fewer_outputs)
    assert e.field == f"layers.{fc}.shape" and "the model's is" in str(e)

    def more_outputs(h):  # ... or one more: more weights than the file describes
        _node(h, fc)["config"]["out_features"] += 1
        return h
    e = lie(more_outputs)
    assert e.field.startswith("graph.nodes[") and "over the cap" in str(e)

    def flip_bias(h):
        _node(h, conv)["config"]["bias"] = not _node(h, conv)["config"]["bias"]
        return h
    e = lie(flip_bias)
    if "bias" in model[conv].params:  # the spec drops a bias the file holds
        assert e.field == f"layers.{conv}.has_bias" and "has no bias" in str(e)
    else:  # the spec asks for a bias the file does not hold
        assert e.field.startswith("graph.nodes[") and "over the cap" in str(e)

    def drop_layer(h):  # a prunable layer missing from the entries (its sections gone too)
        h["layers"] = [m for m in h["layers"] if m["name"] != fc]
        return h
    e = lie(drop_layer, lambda s: {k: v for k, v in s.items() if not k.startswith(f"{fc}/")})
    assert e.field.startswith("graph.nodes[") and "cap" in str(e)  # its weights are nowhere in the file

    def extra_layer(h):  # an entry for a layer the graph does not have
        h["layers"].append({**next(m for m in h["layers"] if m["name"] == fc), "name": "ghost"})
        return h
    e = lie(extra_layer, lambda s: {**s, **{k.replace(f"{fc}/", "ghost/"): v for k, v in s.items()
                                            if k.startswith(f"{fc}/")}})
    assert e.field == "layers" and "not in the model ['ghost']" in str(e)

    e = lie(lambda h: {**h, "model": "other"})
    assert e.field == "model" and "the graph spec builds" in str(e)
    e = lie(lambda h: {**h, "kwargs": {"num_classes": 3}})
    assert e.field == "kwargs" and "must be {} for a \"graph\" builder" in str(e)
    e = lie(lambda h: {k: v for k, v in h.items() if k != "graph"})
    assert e.field == "graph" and "missing" in str(e)
    e = lie(lambda h: {**h, "builder": "lenet300"})
    assert e.field == "graph" and "only a" in str(e)

    def unknown_type(h):
        _node(h, conv)["type"] = "Conv3d"
        return h
    e = lie(unknown_type)
    assert e.field.endswith(".type") and e.field.startswith("graph.nodes[") and "unknown layer type" in str(e)
