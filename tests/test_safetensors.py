"""safetensors load / save (dnnpar.interop.safetensors): round trips in both spellings, PyTorch's
names for the zoo, mismatches listed in full, dtype conversion, and fuzzed files that end in a
CheckpointError or a correct load, never a crash or a raw exception."""
import json
import struct

import numpy as np
import pytest

pytest.importorskip("safetensors")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from dnnpar.errors import CheckpointError  # noqa: E402
from dnnpar.interop import load_safetensors, name_map, save_safetensors, torch_definition  # noqa: E402
from dnnpar.nn import BatchNorm2d, Conv2d, Flatten, Linear, ReLU, Sequential, models  # noqa: E402


def tiny(seed=0):
    return Sequential(("conv", Conv2d(1, 2, 3, seed=seed)), ("bn", BatchNorm2d(2)), ("relu", ReLU()),
                      ("flat", Flatten()), ("fc", Linear(8, 3, seed=seed + 1)), input_shape=(1, 4, 4), name="tiny")


def randomize(model, rng):
    for _, layer in model.layers:
        for d in (layer.params, layer.buffers):
            for k, v in d.items():
                d[k][...] = rng.random(v.shape, dtype=np.float32) + 0.5


def same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(np.array_equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("names", ["dnnpar", "torch"])
@pytest.mark.parametrize("load_names", ["auto", "same"])
def test_round_trip(tmp_path, rng, names, load_names):
    m = tiny()
    randomize(m, rng)
    save_safetensors(m, tmp_path / "m.safetensors", names=names)
    m2 = tiny(seed=7)
    load_safetensors(m2, tmp_path / "m.safetensors", names=names if load_names == "same" else load_names)
    assert same_state(m, m2)
    keys = set(load_file(str(tmp_path / "m.safetensors")))
    counter = "1.num_batches_tracked" if names == "torch" else "bn.num_batches_tracked"
    assert counter in keys and set(name_map(m, names).values()) == keys - {counter}


def test_lenet5_torch_names(tmp_path, rng):
    """A state dict in the names of the nn.Sequential that torch_definition prints (what a
    LeNet-5 trained in PyTorch saves, written here with NumPy: torch is not needed) loads into
    lenet5, found by names='auto' without metadata."""
    m = models.lenet5()
    want = {"0.weight": (20, 1, 5, 5), "0.bias": (20,), "2.weight": (50, 20, 5, 5), "2.bias": (50,),
            "5.weight": (500, 800), "5.bias": (500,), "7.weight": (10, 500), "7.bias": (10,)}
    state = {k: rng.standard_normal(s).astype(np.float32) for k, s in want.items()}
    save_file(state, str(tmp_path / "l5.safetensors"))
    load_safetensors(m, tmp_path / "l5.safetensors")
    assert np.array_equal(m["fc1"].params["weight"], state["5.weight"])
    assert np.array_equal(m["conv2"].params["bias"], state["2.bias"])
    src = torch_definition(m)
    assert "nn.Conv2d(1, 20, kernel_size=5)" in src and "nn.Linear(800, 500)" in src and "# 7: fc2" in src


def test_mismatch_lists_everything(tmp_path, rng):
    m = tiny()
    save_safetensors(m, tmp_path / "m.safetensors")
    state = load_file(str(tmp_path / "m.safetensors"))
    del state["conv.bias"], state["bn.running_var"]
    state["extra.weight"] = np.zeros(2, np.float32)
    state["fc.weight"] = np.zeros((3, 9), np.float32)
    state["fc.bias"] = np.zeros(3, np.int32)
    save_file(state, str(tmp_path / "bad.safetensors"))
    with pytest.raises(CheckpointError) as e:
        load_safetensors(m, tmp_path / "bad.safetensors")
    msg = str(e.value)
    for part in ("missing 2: conv.bias, bn.running_var", "unexpected 1: extra.weight", "fc.weight is (3, 9)",
                 "fc.bias I32", str(tmp_path / "bad.safetensors")):
        assert part in msg, (part, msg)
    before = tiny().state_dict()
    assert all(np.array_equal(before[k], v) for k, v in m.state_dict().items())  # untouched


@pytest.mark.parametrize("dtype", [np.float16, np.float64])
def test_dtype_conversion(tmp_path, rng, dtype):
    m = tiny()
    state = {k: rng.standard_normal(v.shape).astype(dtype) for k, v in m.state_dict().items()}
    save_file(state, str(tmp_path / "m.safetensors"))
    load_safetensors(m, tmp_path / "m.safetensors", names="dnnpar")
    got = m.state_dict()
    assert all(got[k].dtype == np.float32 and np.array_equal(got[k], state[k].astype(np.float32)) for k in state)


def test_float64_out_of_range_refused(tmp_path):
    m = tiny()
    state = {k: v.astype(np.float64) for k, v in m.state_dict().items()}
    state["fc.weight"][0, 0] = 1e300
    save_file(state, str(tmp_path / "m.safetensors"))
    with pytest.raises(CheckpointError, match="float32's range"):
        load_safetensors(m, tmp_path / "m.safetensors")


def test_arguments(tmp_path):
    m = tiny()
    with pytest.raises(ValueError, match="names must be one of"):
        save_safetensors(m, tmp_path / "m.safetensors", names="keras")
    with pytest.raises(TypeError, match="dnnpar model"):
        save_safetensors(object(), tmp_path / "m.safetensors")
    with pytest.raises(FileNotFoundError):
        load_safetensors(m, tmp_path / "none.safetensors")
    (tmp_path / "empty").write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        load_safetensors(m, tmp_path / "empty")


# ------------------------------------------------------------------ fuzz: byte flips, truncation, header edits
def _valid_bytes(tmp_path_factory):
    d = tmp_path_factory.mktemp("st")
    m = tiny()
    save_safetensors(m, d / "m.safetensors", names="torch")
    return (d / "m.safetensors").read_bytes()


def _header_edit(data: bytes, draw) -> bytes:
    n = struct.unpack("<Q", data[:8])[0]
    head = json.loads(data[8:8 + n])
    key = draw(st.sampled_from(sorted(k for k in head if k != "__metadata__")))
    field = draw(st.sampled_from(["dtype", "shape", "data_offsets", "drop", "rename"]))
    if field == "drop":
        del head[key]
    elif field == "rename":
        head[key + "x"] = head.pop(key)
    elif field == "dtype":
        head[key]["dtype"] = draw(st.sampled_from(["F16", "F64", "BF16", "I64", "U8", "BOOL", "F8_E4M3", "Q", 3]))
    elif field == "shape":
        head[key]["shape"] = draw(st.lists(st.one_of(st.integers(-2, 10), st.just(2**62), st.just("1")),
                                           max_size=5))
    else:
        head[key]["data_offsets"] = draw(st.lists(st.integers(-5, 2**64 + 5), min_size=0, max_size=3))
    body = json.dumps(head).encode()
    if draw(st.booleans()):
        body += b" " * draw(st.integers(0, 7))  # the format pads the header with spaces
    new_n = draw(st.sampled_from([len(body), len(body), len(body) + 1, max(len(body) - 1, 0), 2**63]))
    return struct.pack("<Q", new_n) + body + data[8 + n:]


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    return _valid_bytes(tmp_path_factory)


@settings(max_examples=1500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_fuzz_file(tmp_path, valid, data):
    kind = data.draw(st.sampled_from(["flip", "truncate", "header", "extend"]))
    buf = bytearray(valid)
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        buf = buf[:data.draw(st.integers(0, len(buf) - 1))]
    elif kind == "extend":
        buf += bytes(data.draw(st.integers(1, 64)))
    else:
        buf = bytearray(_header_edit(bytes(valid), data.draw))
    p = tmp_path / "f.safetensors"
    p.write_bytes(bytes(buf))
    m = tiny(seed=3)
    try:
        load_safetensors(m, p)
    except CheckpointError:
        assert same_state(m, tiny(seed=3))  # refused before the model changed
        return
    # accepted: each tensor is what the (possibly flipped) file holds, as float32
    ref = tiny()
    ref_names = name_map(m, "torch")
    got = m.state_dict()
    assert set(got) == set(ref_names) and all(v.dtype == np.float32 and v.shape == ref.state_dict()[k].shape
                                              for k, v in got.items())
