"""Graph specs: every zoo model and a graph with every layer type survive spec() -> JSON ->
graph_from_spec with their structure, and with load_state_dict their outputs; thousands of
mutated specs (wrong types, huge ints, NaN, unknown layers and keys, bad wiring, missing keys)
each end in SpecError or a graph that runs."""
import copy
import json

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dnnpar as dp
from dnnpar import nn
from dnnpar.errors import SpecError
from dnnpar.nn.graph import Add, Concat, Graph, Mul
from dnnpar.nn.models import alexnet, lenet5, lenet300, mobilenet_v1, vgg16


def every_layer_net(seed=0):
    """A small graph that uses every type of nn.LAYER_TYPES once or more."""
    c = np.linspace(0.5, 1.5, 4, dtype=np.float32).reshape(4, 1, 1)
    return Graph([
        ("conv", nn.Conv2d(3, 4, 3, padding=1, seed=seed), ["input"]),
        ("bn", nn.BatchNorm2d(4), ["conv"]),
        ("relu", nn.ReLU(), ["bn"]),
        ("dw", nn.DepthwiseConv2d(4, 3, padding=1, seed=seed + 1), ["relu"]),
        ("pw", nn.PointwiseConv2d(4, 4, seed=seed + 2), ["dw"]),
        ("add", Add(), ["pw", "relu"]),
        ("relu6", nn.ReLU6(), ["add"]),
        ("gap", nn.GlobalAvgPool2d(keepdims=True), ["relu6"]),
        ("hsig", nn.HardSigmoid(), ["gap"]),
        ("mul", Mul(), ["relu6", "hsig"]),
        ("hsw", nn.HardSwish(), ["mul"]),
        ("clip", nn.Clip(-2.0, 2.0), ["hsw"]),
        ("const", nn.ConstantOp("mul", c), ["clip"]),
        ("mp", nn.MaxPool2d(2), ["const"]),
        ("ap", nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), ["const"]),
        ("cat", Concat(), ["mp", "ap"]),
        ("sig", nn.Sigmoid(), ["cat"]),
        ("id", nn.Identity(), ["sig"]),
        ("reshape", nn.Reshape((8, -1)), ["id"]),
        ("sm", nn.Softmax(axis=2), ["reshape"]),
        ("flat", nn.Flatten(), ["sm"]),
        ("drop", nn.Dropout(0.2), ["flat"]),
        ("fc", nn.Linear(128, 5, seed=seed + 3), ["drop"]),
    ], input_shape=(3, 8, 8), name="every_layer")


ZOO = {"lenet300": lenet300, "lenet5": lenet5,
       "alexnet": lambda: alexnet(num_classes=10, in_shape=(3, 67, 67)),
       "alexnet_2tower": lambda: alexnet(num_classes=10, groups=2, in_shape=(3, 67, 67)),
       "vgg16": lambda: vgg16(num_classes=10, in_shape=(3, 32, 32)),
       "mobilenet_v1": lambda: mobilenet_v1(alpha=0.25, resolution=32, num_classes=10), "every_layer": every_layer_net}


def _structure(model):
    return [(n, type(layer), layer.config(), model.inputs_of[n],
             {k: tuple(v.shape) for k, v in {**layer.params, **layer.buffers}.items()}) for n, layer in model.layers]


def test_every_layer_type_is_in_the_all_layer_net():
    assert {type(layer).__name__ for _, layer in every_layer_net().layers} == set(nn.LAYER_TYPES)
    assert all(nn.LAYER_TYPES[k].__name__ == k for k in nn.LAYER_TYPES)


@pytest.mark.parametrize("name", list(ZOO))
def test_round_trip_keeps_structure_and_outputs(name, rng):
    with dp.use_backend("numpy"):
        model = ZOO[name]()
        text = json.dumps(model.spec())  # JSON, no custom encoder
        spec = json.loads(text)
        twin = nn.graph_from_spec(text)
        assert twin.spec() == spec and _structure(twin) == _structure(model)
        assert (twin.name, twin.input_shape, twin.output, twin.input_name) == \
            (model.name, model.input_shape, model.output, model.input_name)
        state = {k: v + rng.standard_normal(v.shape).astype(np.float32) * 0.1 for k, v in model.state_dict().items()}
        state = {k: (np.abs(v) + 0.5 if k.endswith("running_var") else v) for k, v in state.items()}
        model.load_state_dict(state)
        twin.load_state_dict(model.state_dict())
        model.eval(), twin.eval()
        x = rng.standard_normal((2,) + model.input_shape).astype(np.float32)
        np.testing.assert_array_equal(twin.forward(x), model.forward(x))


def test_spec_errors_name_the_field():
    base = every_layer_net().spec()

    def refused(mutate, field, match, **kw):
        spec = copy.deepcopy(base)
        mutate(spec)
        with pytest.raises(SpecError, match=match) as e:
            nn.graph_from_spec(spec, **kw)
        assert e.value.field == field, (e.value.field, str(e.value))
        assert isinstance(e.value, ValueError)

    def setter(path, value):
        def mutate(spec):
            d = spec
            for k in path[:-1]:
                d = d[k]
            d[path[-1]] = value
        return mutate

    refused(setter(["nodes", 0, "config", "kernel_size"], 65), "nodes[0].config.kernel_size", "65 is not in \\[1, 64\\]")
    refused(setter(["nodes", 0, "config", "kernel_size"], [3, 3.0]), "nodes[0].config.kernel_size[1]",
            "must be an integer")
    refused(setter(["nodes", 0, "config", "in_channels"], True), "nodes[0].config.in_channels", "must be an integer")
    refused(setter(["nodes", 0, "config", "in_channels"], 4), "nodes[0]", "expects 4 input channels, the previous layer gives 3")
    refused(setter(["nodes", 0, "config", "out_channels"], 5), "nodes[1]", "expects 4 channels")
    refused(setter(["nodes", 0, "config", "groups"], 2), "nodes[0].config", "do not split into 2 groups")
    refused(setter(["nodes", 1, "config", "eps"], float("nan")), "nodes[1].config.eps", "must be finite")
    refused(setter(["nodes", 3, "type"], "Conv3d"), "nodes[3].type", "unknown layer type 'Conv3d'")
    refused(setter(["nodes", 3, "inputs"], ["nowhere"]), "nodes[3].inputs[0]", "neither the graph input")
    refused(setter(["nodes", 3, "inputs"], ["pw"]), "nodes[3].inputs[0]", "neither the graph input")  # a later node
    refused(setter(["nodes", 5, "inputs"], ["pw"]), "nodes[5].inputs", "takes 2 or more input")
    refused(setter(["nodes", 9, "inputs"], ["relu6", "hsig", "gap"]), "nodes[9].inputs", "takes 2 input")
    refused(setter(["nodes", 3, "name"], "conv"), "nodes[3].name", "earlier node's name")
    refused(setter(["nodes", 3, "name"], "input"), "nodes[3].name", "graph input")
    refused(lambda s: s["nodes"][2]["config"].update(seed=3), "nodes[2].config", "unknown key\\(s\\) 'seed'")
    refused(lambda s: s["nodes"][0]["config"].pop("bias"), "nodes[0].config.bias", "missing")
    refused(lambda s: s["nodes"][0].pop("inputs"), "nodes[0].inputs", "missing")
    refused(lambda s: s.pop("input_shape"), "input_shape", "missing")
    refused(setter(["input_shape"], [3, 9, 8]), "nodes[15]", "Concat needs >= 2 inputs equal but for channels")
    refused(setter(["input_shape"], [3, 8]), "nodes[0]", "Conv2d expects|values to unpack")
    refused(setter(["output"], "nowhere"), "output", "is not a node")
    refused(setter(["nodes"], []), "nodes", "at least one node")
    refused(setter(["nodes", 18, "config", "shape"], [8, 0]), "nodes[18].config.shape", "a size of 0")
    refused(setter(["nodes", 18, "config", "shape"], [7, -1]), "nodes[19]" if False else "nodes[18]", "cannot reshape")
    refused(setter(["nodes", 12, "config", "value"], {"shape": [3, 1, 1], "dtype": "float32"}), "nodes[12]",
            "does not broadcast")
    refused(setter(["nodes", 12, "config", "value"], {"shape": [4, 1, 1], "dtype": "float64"}),
            "nodes[12].config.value.dtype", "is not one of")
    refused(setter(["nodes", 12, "config", "op"], "pow"), "nodes[12].config.op", "is not one of")
    refused(setter(["nodes", 21, "config", "p"], 1.0), "nodes[21].config.p", "not in \\[0, 1\\)")
    refused(setter(["nodes", 22, "config", "in_features"], 2**16), "nodes[22]", "Linear expects 65536 features, the previous layer gives \\(128,\\)")
    refused(setter(["nodes", 22, "config", "in_features"], 2**16 + 1), "nodes[22].config.in_features", "not in")
    refused(setter(["nodes", 11, "config", "min_value"], 3.0), "nodes[11].config", "exceeds max_value")
    refused(lambda s: None, "nodes[22]", "837 parameters by this node, over the cap of 800", max_parameters=800)
    for i in range(4):  # conv layers of the biggest kernels, widest channels: refused before any allocation
        refused(lambda s: s["nodes"].insert(0, {"name": f"huge{i}", "type": "Conv2d", "inputs": ["input"], "config": {
            "in_channels": 2**16, "out_channels": 2**16, "kernel_size": 64, "stride": 1, "padding": 0, "dilation": 1,
            "groups": 1, "bias": True, "algo": "im2col"}}), "nodes[0]", "over the cap of 268435456")
    with pytest.raises(SpecError, match="not valid JSON"):
        nn.graph_from_spec('{"name": NaN}')
    with pytest.raises(SpecError, match="must be an object"):
        nn.graph_from_spec([1, 2])
    with pytest.raises(SpecError, match="unknown key\\(s\\) '1'"):
        nn.graph_from_spec({**base, 1: 2})
    with pytest.raises(SpecError, match="not JSON-able data"):
        nn.graph_from_spec({**base, "name": object()})
    with pytest.raises(SpecError, match="name: must be a string, got a number"):
        nn.graph_from_spec({**base, "name": float("nan")})
    tupled = {**base, "input_shape": (np.int64(3), 8, 8)}  # tuples and NumPy ints read as JSON lists and ints
    assert nn.graph_from_spec(tupled).input_shape == (3, 8, 8)
    with pytest.raises(TypeError, match="max_parameters must be an int"):
        nn.graph_from_spec(base, max_parameters=1e9)
    with pytest.raises(ValueError, match="graph specs cannot describe"):
        Graph([("x", _Custom(), ["input"])]).spec()


class _Custom(nn.Layer):
    def forward(self, x):
        return x


# ---------------------------------------------------------------- fuzzing
BASE = every_layer_net().spec()
FUZZ_CAP = 2**20  # parameters: keeps every accepted mutant cheap to build and run


def _paths(obj, prefix=()):
    """Every (path) to a value inside obj, containers included."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, prefix + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, prefix + (i,))


PATHS = list(_paths(BASE))[1:]
NAMES = [n["name"] for n in BASE["nodes"]] + ["input"]

weird = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 70), st.integers(-2**70, 2**70), st.sampled_from([2**16, 2**16 + 1, 2**31]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 0.5, 1.0, 1e-300, 1e308]),
    st.text(max_size=6), st.sampled_from(NAMES + list(nn.LAYER_TYPES) + ["Conv3d", "", "im2col", "direct", "mul"]),
    st.lists(st.integers(-2, 70), max_size=5), st.lists(st.sampled_from(NAMES), max_size=4),
    st.dictionaries(st.sampled_from(["shape", "dtype", "x"]), st.sampled_from([[4, 1, 1], "float32", 1]), max_size=3),
    st.sampled_from([[4, 1, 1], [1], [], [8, -1], [-1, -1], [3, 3]]))


def _apply(spec, path, action, value):
    d = spec
    for k in path[:-1]:
        d = d[k]
    key = path[-1]
    if action == "set":
        d[key] = value
    elif action == "delete":
        del d[key]
    elif action == "add_key" and isinstance(d[key], dict):
        d[key][str(value)[:8]] = value
    elif action == "duplicate" and isinstance(d, list):
        d.insert(key, copy.deepcopy(d[key]))
    elif action == "swap" and isinstance(d, list) and len(d) > 1:
        j = (key + 1) % len(d)
        d[key], d[j] = d[j], d[key]


def _accepts_or_refuses(spec):
    """graph_from_spec either raises SpecError or gives a graph whose every node has a shape and
    which runs forward and backward at those shapes."""
    try:
        g = nn.graph_from_spec(spec, max_parameters=FUZZ_CAP)
    except SpecError as e:
        assert str(e) and isinstance(e, ValueError)
        return False
    shapes = g.output_shapes()
    if int(np.prod(g.input_shape)) <= 4096:
        y = g.forward(np.zeros((2,) + g.input_shape, np.float32))
        assert y.shape == (2,) + shapes[g.output]
        g.backward(np.ones(y.shape, np.float32))
    return True


mutation = st.tuples(st.sampled_from(PATHS), st.sampled_from(["set", "set", "set", "delete", "add_key", "duplicate",
                                                            "swap"]), weird)


@settings(max_examples=3000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(mutation, min_size=1, max_size=3))
def test_mutated_specs_end_in_spec_error_or_a_graph_that_runs(mutations):
    spec = copy.deepcopy(BASE)
    for path, action, value in mutations:
        try:
            _apply(spec, path, action, value)
        except (KeyError, IndexError, TypeError):  # an earlier mutation removed or replaced the path
            pass
    with dp.use_backend("numpy"):
        _accepts_or_refuses(spec)


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, len(BASE["nodes"]) - 1), st.data())
def test_every_config_key_takes_any_value_safely(index, data):
    """One config value of one node replaced by anything: SpecError or a graph that runs."""
    spec = copy.deepcopy(BASE)
    cfg = spec["nodes"][index]["config"]
    if not cfg:
        cfg["extra"] = data.draw(weird)
    else:
        key = data.draw(st.sampled_from(sorted(cfg)))
        cfg[key] = data.draw(weird)
    with dp.use_backend("numpy"):
        _accepts_or_refuses(spec)


@settings(max_examples=500, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.integers(0, len(json.dumps(BASE))), st.binary(max_size=4))
def test_damaged_json_text_is_refused_or_parsed(cut, junk):
    text = json.dumps(BASE).encode()
    with dp.use_backend("numpy"):
        _accepts_or_refuses(text[:cut] + junk + text[cut + len(junk):])
