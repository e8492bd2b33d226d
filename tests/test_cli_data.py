"""User data sets (``--data file.npz``), the one data rule of train / compress / sensitivity /
evaluate, one-shot compression, ``train --onnx``, ``evaluate --onnx`` and ``dnnpar predict``;
every bad input is one line with exit status != 0. The data-set reader and predict's image
readers are fuzzed (hypothesis): every case ends in DataError or the arrays the file holds."""
import io
import json
import warnings
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dnnpar import nn
from dnnpar.checkpoint import build_model_from, read_meta, save_checkpoint
from dnnpar.cli import main
from dnnpar.data import fashion_mnist
from dnnpar.data.idx import write_idx
from dnnpar.data.user import SPLIT_SEED, load_user_data, read_images
from dnnpar.errors import DataError, FileFormatError
from dnnpar.nn.models import build

SHAPE, CLASSES = (3, 16, 16), 4


def small_graph(seed=0):
    """A classifier of 3x16x16 images into 4 classes: not Fashion-MNIST's shape."""
    return nn.Sequential(("conv1", nn.Conv2d(3, 4, 3, padding=1, seed=seed)), ("relu1", nn.ReLU()),
                         ("pool", nn.MaxPool2d(2)), ("flat", nn.Flatten()),
                         ("fc1", nn.Linear(4 * 8 * 8, 16, seed=seed + 1)), ("relu2", nn.ReLU()),
                         ("fc2", nn.Linear(16, CLASSES, seed=seed + 2)), input_shape=SHAPE, name="small_graph")


def user_set(rng, n=70, shape=SHAPE, classes=CLASSES, dtype=np.float32):
    """Images whose mean brightness tells the class (learnable), labels 0..classes-1."""
    y = rng.integers(0, classes, n)
    x = rng.random((n, *shape)) * 0.5 + (y / classes)[:, None, None, None] * 0.5
    if dtype == np.uint8:
        return (x * 255).astype(np.uint8), y
    return x.astype(dtype), y


@pytest.fixture
def graph_files(tmp_path, rng):
    """(checkpoint .npz, .onnx, data .npz) of the 3x16x16 graph and a data set for it."""
    pytest.importorskip("onnx")
    from dnnpar.interop import to_onnx

    g = small_graph(int(rng.integers(1000)))
    save_checkpoint(tmp_path / "g.npz", g, {"model": g.name})
    to_onnx(g, tmp_path / "g.onnx")
    x, y = user_set(rng)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    return tmp_path / "g.npz", tmp_path / "g.onnx", tmp_path / "d.npz"


@pytest.fixture
def fashion_files(tmp_path):
    """A trained-enough LeNet-300-100 checkpoint (Fashion-MNIST shape) and a small --data set
    cut from the embedded sample (uint8 pixels, as a user would save them)."""
    d = fashion_mnist.load(subset="embedded")
    m = build("lenet300")
    save_checkpoint(tmp_path / "l.npz", m, {"model": "lenet300"})
    from dnnpar.data.idx import read_idx
    raw = read_idx(fashion_mnist.EMBEDDED / "t10k-images-idx3-ubyte.gz")[:140, None]
    np.savez(tmp_path / "f.npz", x=raw, y=d.y_test[:140])
    return tmp_path / "l.npz", tmp_path / "f.npz"


def fails(capsys, argv, *words):
    """The command fails with one error line (exit != 0) holding every word."""
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert rc != 0, err
    assert len(err.splitlines()) == 1 and err.startswith("dnnpar"), err
    assert "Traceback" not in err and "internal error" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


def ok(capsys, argv):
    rc = main([str(a) for a in argv])
    out = capsys.readouterr()
    assert rc == 0, out.err
    return out.out


# ---------------------------------------------------------------------------- the reader
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.uint8])
def test_reader_accepts_the_documented_dtypes(tmp_path, rng, dtype):
    x, y = user_set(rng, n=50, dtype=dtype)
    np.savez(tmp_path / "d.npz", x=x, y=y.astype(np.int32))
    d = load_user_data(tmp_path / "d.npz", SHAPE, CLASSES)
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64 and d.classes == CLASSES
    # the held-out split: a fixed seed, round(n/7) images, disjoint, together every image once
    order = np.random.default_rng(SPLIT_SEED).permutation(50)
    test, train = np.sort(order[:7]), np.sort(order[7:])
    want = x.astype(np.float32) / np.float32(255) if dtype == np.uint8 else x.astype(np.float32)
    np.testing.assert_array_equal(d.x_test, want[test])
    np.testing.assert_array_equal(d.x_train, want[train])
    np.testing.assert_array_equal(d.y_test, y[test])
    again = load_user_data(tmp_path / "d.npz", SHAPE, CLASSES)
    np.testing.assert_array_equal(again.y_test, d.y_test)


def test_reader_uses_a_given_test_split(tmp_path, rng):
    x, y = user_set(rng, n=20)
    xt, yt = user_set(rng, n=5)
    np.savez(tmp_path / "d.npz", x=x, y=y, x_test=xt, y_test=yt)
    d = load_user_data(tmp_path / "d.npz")
    np.testing.assert_array_equal(d.x_train, x)
    np.testing.assert_array_equal(d.x_test, xt)
    assert d.classes == max(y.max(), yt.max()) + 1


def _bad_sets(rng):
    x, y = user_set(rng, n=10)
    nan = x.copy()
    nan[3, 1, 2, 2] = np.nan
    return {
        "missing y": ({"x": x}, "y"),
        "unexpected member": ({"x": x, "y": y, "labels": y}, "labels"),
        "3-D x": ({"x": x[:, 0], "y": y}, "x"),
        "int32 x": ({"x": x.astype(np.int32), "y": y}, "x"),
        "float16 x": ({"x": x.astype(np.float16), "y": y}, "x"),
        "NaN": ({"x": nan, "y": y}, "x"),
        "inf": ({"x": np.where(nan != nan, np.inf, nan), "y": y}, "x"),
        "float64 beyond float32": ({"x": np.full((4, *SHAPE), 1e39), "y": y[:4]}, "x"),
        "negative label": ({"x": x, "y": np.where(y == y[0], -1, y)}, "y"),
        "label >= classes": ({"x": x, "y": np.full(10, CLASSES)}, "y"),
        "float labels": ({"x": x, "y": y.astype(np.float32)}, "y"),
        "bool labels": ({"x": x, "y": y > 1}, "y"),
        "2-D labels": ({"x": x, "y": y[:, None]}, "y"),
        "label count": ({"x": x, "y": y[:9]}, "y"),
        "x_test alone": ({"x": x, "y": y, "x_test": x}, "y_test"),
        "x_test shape": ({"x": x, "y": y, "x_test": x[:, :2], "y_test": y}, "x_test"),
        "one image, no test split": ({"x": x[:1], "y": y[:1]}, "x"),
        "empty x": ({"x": x[:0], "y": y[:0]}, "x"),
        "sample shape vs model": ({"x": x[:, :, :8], "y": y}, "x"),
    }


@pytest.mark.parametrize("case", list(_bad_sets(np.random.default_rng(0))))
def test_reader_errors_name_file_and_member(tmp_path, rng, case):
    arrays, field = _bad_sets(rng)[case]
    np.savez(tmp_path / "d.npz", **arrays)
    with pytest.raises(DataError) as e:
        load_user_data(tmp_path / "d.npz", SHAPE, CLASSES, "small_graph")
    assert e.value.field == field and e.value.path == str(tmp_path / "d.npz")
    if case == "sample shape vs model":
        assert "3x8x16" in str(e.value) and "3x16x16" in str(e.value)


def test_reader_refuses_pickles_npy_garbage_and_truncation(tmp_path, rng):
    x, y = user_set(rng, n=10)
    np.savez(tmp_path / "obj.npz", x=np.array([object()] * 10), y=y)  # object arrays are pickled
    (tmp_path / "one.npz").write_bytes(_npy_bytes(x))  # a lone .npy under an .npz name
    (tmp_path / "junk.npz").write_bytes(b"not a zip at all")
    np.savez(tmp_path / "ok.npz", x=x, y=y)
    raw = (tmp_path / "ok.npz").read_bytes()
    (tmp_path / "cut.npz").write_bytes(raw[:len(raw) // 2])
    for name, word in (("obj", "pickles"), ("one", ".npy"), ("junk", "readable"), ("cut", "")):
        with pytest.raises(DataError) as e:
            load_user_data(tmp_path / f"{name}.npz")
        assert word in str(e.value) and str(tmp_path / name) in str(e.value)


def _npz_with_header(path, name, shape, dtype="<f4", payload=b""):
    """An .npz whose member claims ``shape`` but holds ``payload`` bytes."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, {"descr": dtype, "fortran_order": False, "shape": shape})
    other = "x" if name == "y" else "y"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr(f"{name}.npy", head.getvalue() + payload)
        zf.writestr(f"{other}.npy", _npy_bytes(np.zeros((2, 1, 1, 1), np.float32) if other == "x"
                                               else np.zeros(2, np.int64)))


def _npy_bytes(a):
    b = io.BytesIO()
    np.save(b, a)
    return b.getvalue()


# ---------------------------------------------------------------------------- reader fuzz
DTYPES = ["<f4", ">f4", "<f8", "|u1", "<f2", "<i4", "<i8", "|b1", "<c8", "<u2", "|i1"]
LABEL_DTYPES = ["<i8", "<i4", "|u1", "<u8", ">i2", "<f4", "|b1"]


def _expected_valid(members, classes, sample_shape):
    """The reader's rules, restated: whether the file is a valid data set for the model."""
    if set(members) - {"x", "y", "x_test", "y_test"} or not {"x", "y"} <= set(members):
        return False
    if ("x_test" in members) != ("y_test" in members):
        return False
    pairs = [("x", "y")] + ([("x_test", "y_test")] if "x_test" in members else [])
    for xk, yk in pairs:
        x, y = members[xk], members[yk]
        if x.dtype.str not in ("<f4", ">f4", "<f8", "|u1") or x.ndim != 4 or min(x.shape) < 1:
            return False
        if x.shape[1:] != sample_shape:
            return False
        if y.dtype.kind not in "iu" or y.ndim != 1 or len(y) != len(x):
            return False
        if y.min() < 0 or y.max() >= classes:
            return False
        with np.errstate(all="ignore"):
            finite = np.isfinite(x.astype(np.float32)).all()
        if x.dtype.kind == "f" and not finite:
            return False
    if "x_test" not in members and len(members["x"]) < 2:
        return False
    return True


MUTATIONS = ("x dtype", "y dtype", "x shape", "sample shape", "poison", "label range", "label count", "drop",
             "extra", "single", "2-D labels", "fortran", "big-endian", "none")


@st.composite
def member_sets(draw):
    """A valid data set for (1, 2, 3) samples of 5 classes, then 0-2 mutations, some harmless
    (dtype float64 / uint8, Fortran order, big-endian), most not."""
    n = draw(st.integers(1, 6))

    def images(k):
        return (np.arange(k * 6, dtype=np.float64).reshape(k, 1, 2, 3) % 7 / 7).astype(np.float32)

    m = {"x": images(n), "y": np.array(draw(st.lists(st.integers(0, 4), min_size=n, max_size=n)), np.int64)}
    if draw(st.booleans()):
        k = draw(st.integers(1, 3))
        m["x_test"], m["y_test"] = images(k), np.array(draw(st.lists(st.integers(0, 4), min_size=k, max_size=k)))
    for mutation in draw(st.lists(st.sampled_from(MUTATIONS), max_size=2)):
        xk = draw(st.sampled_from([k for k in ("x", "x_test") if k in m] or ["x"]))
        yk = "y" if xk == "x" else "y_test"
        if xk not in m or yk not in m:
            continue
        x, y = m[xk], m[yk]
        if mutation == "x dtype":
            with np.errstate(all="ignore"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m[xk] = (x * 255).astype(np.dtype(draw(st.sampled_from(DTYPES))))
        elif mutation == "y dtype":
            with np.errstate(all="ignore"):
                m[yk] = y.astype(np.dtype(draw(st.sampled_from(LABEL_DTYPES))))
        elif mutation == "x shape" and x.ndim == 4:
            m[xk] = x.reshape(draw(st.sampled_from([(len(x), -1), (len(x), 1, -1), (len(x), 1, *x.shape[1:]), (-1,)])))
        elif mutation == "sample shape":
            m[xk] = np.zeros((len(x), *draw(st.sampled_from([(1, 3, 2), (2, 2, 3), (1, 2, 4), (1, 0, 3)]))),
                             np.float32)
        elif mutation == "poison" and x.size:
            x = x.astype(np.float64)
            x.flat[draw(st.integers(0, x.size - 1))] = draw(st.sampled_from([np.nan, np.inf, -np.inf, 1e39, -1e300]))
            m[xk] = x
        elif mutation == "label range" and y.size:
            y = y.astype(np.int64)
            y[draw(st.integers(0, len(y) - 1))] = draw(st.sampled_from([-1, 5, 6, 2**40, -2**62]))
            m[yk] = y
        elif mutation == "label count":
            m[yk] = np.concatenate([y, y[:1]]) if draw(st.booleans()) else y[:-1]
        elif mutation == "drop":
            del m[draw(st.sampled_from(sorted(m)))]
        elif mutation == "extra":
            m[draw(st.sampled_from(["labels", "X", "x_val"]))] = np.zeros(2)
        elif mutation == "single":
            m[xk], m[yk] = x[:1], y[:1]
        elif mutation == "2-D labels":
            m[yk] = y[:, None]
        elif mutation == "fortran":
            m[xk] = np.asfortranarray(x)
        elif mutation == "big-endian" and x.dtype.kind == "f":
            with np.errstate(all="ignore"):
                m[xk] = x.astype(">f4")
    return m


@settings(max_examples=1500, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(members=member_sets())
def test_fuzz_reader_structured(tmp_path_factory, members):
    path = tmp_path_factory.mktemp("fz") / "d.npz"
    np.savez(path, **members)
    valid = _expected_valid(members, 5, (1, 2, 3))
    try:
        d = load_user_data(path, (1, 2, 3), 5)
    except DataError as e:
        event(f"DataError in {e.field}")
        assert not valid, e
        assert e.path == str(path)
        return
    event("loaded")
    assert valid
    def conv(a):
        return a.astype(np.float32) / np.float32(255) if a.dtype.kind == "u" else a.astype(np.float32)
    x = conv(members["x"])
    if "x_test" in members:
        np.testing.assert_array_equal(d.x_train, x)
        np.testing.assert_array_equal(d.x_test, conv(members["x_test"]))
        np.testing.assert_array_equal(d.y_test, members["y_test"].astype(np.int64))
    else:
        assert len(d.y_train) + len(d.y_test) == len(x) and len(d.y_test) >= 1
        assert sorted(map(bytes, np.concatenate([d.x_train, d.x_test]))) == sorted(map(bytes, x))
    assert d.x_train.dtype == np.float32 and d.y_train.dtype == np.int64


@pytest.fixture(scope="module")
def valid_npz_bytes():
    rng = np.random.default_rng(7)
    x, y = user_set(rng, n=8, shape=(1, 2, 3))
    b = io.BytesIO()
    np.savez(b, x=x, y=y)
    return b.getvalue(), x, y


@settings(max_examples=1000, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_fuzz_reader_bytes(tmp_path_factory, valid_npz_bytes, data):
    """Truncated or corrupted archives: DataError, or exactly the arrays that were written."""
    raw, x, y = valid_npz_bytes
    buf = bytearray(raw)
    kind = data.draw(st.sampled_from(["truncate", "flip", "both"]))
    if kind in ("truncate", "both"):
        buf = buf[:data.draw(st.integers(0, len(buf) - 1))]
    if kind in ("flip", "both") and buf:
        for _ in range(data.draw(st.integers(1, 4))):
            i = data.draw(st.integers(0, len(buf) - 1))
            buf[i] ^= data.draw(st.integers(1, 255))
    path = tmp_path_factory.mktemp("fb") / "d.npz"
    path.write_bytes(bytes(buf))
    try:
        d = load_user_data(path)
    except DataError:
        event("DataError")
        return
    event("loaded")
    np.testing.assert_array_equal(np.sort(np.concatenate([d.y_train, d.y_test])), np.sort(y))
    assert sorted(map(bytes, np.concatenate([d.x_train, d.x_test]))) == sorted(map(bytes, x))


@settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(shape=st.lists(st.integers(0, 2**40), min_size=0, max_size=6).map(tuple),
       dtype=st.sampled_from(DTYPES), member=st.sampled_from(["x", "y", "x_test"]))
def test_fuzz_huge_declared_shapes(tmp_path_factory, shape, dtype, member):
    """A member whose header claims far more than the file holds: refused before allocating."""
    path = tmp_path_factory.mktemp("fh") / "d.npz"
    _npz_with_header(path, member, shape, dtype, payload=b"\0" * 64)
    try:
        load_user_data(path)
    except DataError as e:
        event(f"DataError in {e.field}")
        assert e.path == str(path)
        return
    raise AssertionError(f"{shape} of {dtype} read from 64 bytes")  # no claim here can be both true and valid


@settings(max_examples=600, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(shape=st.one_of(st.tuples(*[st.integers(1, 4)] * 4), st.tuples(st.integers(1, 4), st.integers(1, 5),
                                                                      st.integers(1, 5), st.just(3)),
                       st.lists(st.integers(0, 4), min_size=0, max_size=5).map(tuple)),
       dtype=st.sampled_from(DTYPES[:4] * 2 + DTYPES), cut=st.integers(0, 300), fortran=st.booleans(),
       fmt=st.sampled_from(["npy", "npz", "idx", "png"]))
def test_fuzz_prediction_inputs(tmp_path_factory, shape, dtype, cut, fortran, fmt):
    """predict's reader on .npy / .npz / IDX / PNG files of random shape and dtype, maybe
    truncated: DataError / IDXError or exactly the images written, scaled as documented."""
    folder = tmp_path_factory.mktemp("fp")
    a = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) % 251
    a = np.asfortranarray(a) if fortran else a
    with np.errstate(all="ignore"):
        a = a.astype(np.dtype(dtype))
    if fmt in ("png", "idx") and a.dtype.kind == "c":
        return  # (the writers below take real pixels)
    path = folder / f"in.{fmt}"
    if fmt == "npy":
        np.save(path, a)
    elif fmt == "npz":
        np.savez(path, x=a)
    elif fmt == "idx":
        try:
            write_idx(path, a)
        except ValueError:
            return
    else:
        from PIL import Image
        if a.ndim == 4 and a.shape[0] == 1 and a.shape[1] in (1, 3):  # one (1, C, H, W) image as PNG
            a = a[0, 0] if a.shape[1] == 1 else a[0].transpose(1, 2, 0)
        if a.ndim not in (2, 3) or min(a.shape, default=0) < 1 or (a.ndim == 3 and a.shape[2] != 3):
            return
        a = a.astype(np.uint8)
        Image.fromarray(a).save(path)
    raw = path.read_bytes()
    truncated = cut < 100 and cut < len(raw)
    if truncated:
        path.write_bytes(raw[:len(raw) - 1 - cut])
    try:
        x, pixels = read_images(path)
    except FileFormatError as e:
        event(f"{fmt}: {type(e).__name__}")
        assert e.path == str(path)
        return
    event(f"{fmt}: read")
    assert not truncated or fmt == "png"  # a PNG may lose only its trailing chunk
    assert x.dtype == np.float32 and x.ndim == 4
    if fmt == "png":
        want = a[None, None] if a.ndim == 2 else a.transpose(2, 0, 1)[None]
    elif fmt == "idx":
        want = a.reshape((1, 1) + a.shape if a.ndim == 2 else (a.shape[0], 1) + a.shape[1:] if a.ndim == 3
                         else a.shape)
    else:
        want = a
    want = want.astype(np.float32) / np.float32(255) if pixels else want.astype(np.float32)
    assert pixels == (np.dtype(dtype) == np.uint8 or fmt in ("png", "idx"))
    np.testing.assert_array_equal(x, want)


# ---------------------------------------------------------------------------- the data rule
def test_train_onnx_on_user_data_writes_a_graph_checkpoint(tmp_path, capsys, graph_files):
    _, onnx_path, data = graph_files
    out = ok(capsys, ["train", "--onnx", onnx_path, "--data", data, "--epochs", "2", "--batch-size", "16",
                      "--checkpoint", tmp_path / "t.npz", "--quiet"])
    assert "data set" in out and "checkpoint:" in out
    assert read_meta(tmp_path / "t.npz").graph is not None and read_meta(tmp_path / "t.npz").epoch == 2
    assert read_meta(tmp_path / "t.npz").config["data_file"] == str(data)  # what it was trained on
    trained = build_model_from(tmp_path / "t.npz")
    from dnnpar.interop import from_onnx
    start = from_onnx(onnx_path)
    assert trained.name == start.name
    assert not np.array_equal(trained["fc2"].params["weight"], start["fc2"].params["weight"])
    # and the graph checkpoint trains on (resume: epochs 3..3)
    ok(capsys, ["train", "--checkpoint", tmp_path / "t.npz", "--resume", "--data", data, "--epochs", "3",
                "--batch-size", "16", "--quiet"])
    assert read_meta(tmp_path / "t.npz").epoch == 3


def test_data_rule_errors(tmp_path, capsys, graph_files, fashion_files):
    ckpt, onnx_path, data = graph_files
    lenet, fdata = fashion_files
    fails(capsys, ["train", "--onnx", onnx_path, "--epochs", "1"], "3x16x16", "4 classes", "--data")
    fails(capsys, ["train", "--model", "lenet5", "--data", data, "--epochs", "1"], "3x16x16", "1x28x28", str(data))
    fails(capsys, ["train", "--model", "vgg16", "--epochs", "1"], "3x224x224", "--data")
    fails(capsys, ["train", "--data", fdata, "--subset", "embedded"], "--data and --subset")
    fails(capsys, ["train", "--data", fdata, "--parallel", "hogwild"], "--parallel none")
    fails(capsys, ["train", "--onnx", onnx_path, "--model", "lenet5"], "--model and --onnx")
    fails(capsys, ["sensitivity", "--checkpoint", ckpt], "sensitivity", "3x16x16", "--data")
    fails(capsys, ["sensitivity", "--checkpoint", lenet, "--data", data], "3x16x16", "1x28x28")
    fails(capsys, ["compress", "--checkpoint", ckpt, "--data", fdata, "--out", tmp_path / "c.dnnz"],
          "1x28x28", "3x16x16")
    fails(capsys, ["compress", "--checkpoint", ckpt, "--subset", "embedded", "--out", tmp_path / "c.dnnz"],
          "--subset", "--data")
    fails(capsys, ["evaluate"], "PATH or --onnx")
    fails(capsys, ["evaluate", "--onnx", onnx_path], "evaluate", "--data")
    assert not (tmp_path / "c.dnnz").exists()


def test_sensitivity_and_evaluate_on_user_data(capsys, graph_files):
    ckpt, onnx_path, data = graph_files
    out = ok(capsys, ["sensitivity", "--checkpoint", ckpt, "--data", data, "--sparsities", "0.5"])
    assert "fc1" in out and "10 test images" in out  # round(70 / 7) held out
    out = ok(capsys, ["evaluate", "--onnx", onnx_path, "--data", data])
    assert "test accuracy" in out and "10 images" in out


def test_compress_on_user_data_then_evaluate_and_predict(tmp_path, capsys, fashion_files):
    from dnnpar.compress.pipeline import read_codes
    lenet, fdata = fashion_files
    out = ok(capsys, ["compress", "--checkpoint", lenet, "--data", fdata, "--cycles", "1", "--retrain-epochs", "1",
                      "--finetune-epochs", "0", "--out", tmp_path / "c.dnnz", "--quiet"])
    assert "accuracy:" in out
    header, _, _ = read_codes(tmp_path / "c.dnnz")
    assert header["meta"]["retrained"] is True and header["meta"]["data_file"] == str(fdata)
    assert set(header["meta"]["accuracy"]) == {"baseline", "pruned", "quantized", "final"}
    out = ok(capsys, ["evaluate", tmp_path / "c.dnnz", "--data", fdata])
    assert "20 images of <data set" in out
    out = ok(capsys, ["predict", tmp_path / "c.dnnz", fdata, "--top-k", "2"])
    assert len(out.strip().splitlines()) == 3 + 140 and "%" in out
    assert out.startswith("inputs: uint8 pixels scaled to 0..1;")
    # the file says it was compressed on a uint8 --data set (scaled to 0..1, never standardised):
    # auto feeds predict's uint8 pixels the same way, though the model has Fashion-MNIST's shape
    auto, unit, fashion = (json.loads(ok(capsys, ["predict", tmp_path / "c.dnnz", fdata, "--json"] + extra))
                           for extra in ([], ["--normalize", "unit"], ["--normalize", "fashion-mnist"]))
    assert auto == unit and auto != fashion


def test_one_shot_compression_python_api(rng):
    from dnnpar.compress import prune
    from dnnpar.compress.pipeline import CompressConfig, compress
    g = small_graph(int(rng.integers(1000)))
    before = {n: g[n].params["weight"].copy() for n in prune.prunable_layers(g)}
    lines = []
    codes, report, log = compress(g, None, CompressConfig(quality=1.0, conv_bits=4, fc_bits=3), out=lines.append)
    assert log == {} and "one-shot" in lines[0] and "accuracy not measured" in lines[0]
    for c in codes:
        w = g[c.name].params["weight"]
        kept = w != 0
        # pruned once to quality x std of the original weights: what is left is what was above it
        thr = before[c.name].std()
        assert np.all(np.abs(before[c.name][kept]) >= thr * (1 - 1e-6))
        assert kept.mean() < 1
        bits = 4 if c.name == "conv1" else 3
        assert len(np.unique(w[kept])) <= 2 ** bits
        np.testing.assert_array_equal(c.codebook[c.dense_codes()].reshape(w.shape), w)
    assert "small_graph" in report.table()


def test_one_shot_compression_cli(tmp_path, capsys, graph_files, rng):
    """compress of a model no known data fits: one-shot, said on the console and in the .dnnz;
    then evaluate (--data) and predict run on the file. Storing a graph model in a .dnnz is
    another change (s5-dnnz): until it is merged, the save is refused and the test stops there."""
    ckpt, _, data = graph_files
    rc = main(["compress", "--checkpoint", ckpt, "--out", tmp_path / "c.dnnz", "--quality", "0.8", "--quiet"])
    out = capsys.readouterr()
    if rc != 0 and "only models of the zoo" in out.err:
        assert "one-shot" in out.out
        pytest.skip("graph models in .dnnz files come with the s5-dnnz change")
    assert rc == 0, out.err
    assert "one-shot compression" in out.out and "accuracy not measured" in out.out
    from dnnpar.compress.pipeline import read_codes
    header, _, _ = read_codes(tmp_path / "c.dnnz")
    assert header["meta"]["retrained"] is False and "accuracy" not in header["meta"]
    fails(capsys, ["evaluate", tmp_path / "c.dnnz"], "--data")
    assert "test accuracy" in ok(capsys, ["evaluate", tmp_path / "c.dnnz", "--data", data])
    x, _ = user_set(rng, n=3)
    np.save(tmp_path / "x.npy", x)
    assert len(ok(capsys, ["predict", tmp_path / "c.dnnz", tmp_path / "x.npy"]).splitlines()) == 6  # the inputs line, head, rule, 3 images


# ---------------------------------------------------------------------------- predict
def _softmax(z):
    z = z.astype(np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def test_predict_every_input_format_gives_the_same_answer(tmp_path, capsys, fashion_files):
    from PIL import Image
    from dnnpar.data.idx import read_idx
    lenet, _ = fashion_files
    pixels = read_idx(fashion_mnist.EMBEDDED / "t10k-images-idx3-ubyte.gz")[:3]
    for i in range(3):
        Image.fromarray(pixels[i]).save(tmp_path / f"p{i}.png")
    np.save(tmp_path / "u8.npy", pixels[:, None])
    standard = (pixels[:, None].astype(np.float32) / np.float32(255) - np.float32(fashion_mnist.MEAN)) \
        / np.float32(fashion_mnist.STD)
    np.save(tmp_path / "f32.npy", standard)
    np.savez(tmp_path / "x.npz", x=pixels[:, None])
    write_idx(tmp_path / "i.idx", pixels)
    write_idx(tmp_path / "i.idx.gz", pixels)
    files = [tmp_path / f"p{i}.png" for i in range(3)] + [tmp_path / n for n in
                                                          ("u8.npy", "f32.npy", "x.npz", "i.idx", "i.idx.gz")]
    rows = json.loads(ok(capsys, ["predict", lenet, *files, "--top-k", "3", "--json"]))
    assert len(rows) == 3 + 5 * 3
    model = build_model_from(lenet)
    model.eval()
    p = _softmax(model.forward(standard))
    by_image = {}
    for r in rows:
        i = int(r["input"][-5]) if r["input"].endswith(".png") else r["image"]
        top = r["top"]
        assert [t["probability"] for t in top] == sorted((t["probability"] for t in top), reverse=True)
        assert top[0]["class"] == int(np.argmax(p[i]))
        assert top[0]["name"] == fashion_mnist.CLASSES[top[0]["class"]]
        # float32 forward of the same standardised pixels: softmax within a few float32 ulps
        np.testing.assert_allclose([t["probability"] for t in top], p[i][[t["class"] for t in top]], rtol=1e-5)
        by_image.setdefault(i, []).append([t["class"] for t in top])
    assert all(len({tuple(v) for v in got}) == 1 for got in by_image.values())
    table = ok(capsys, ["predict", lenet, tmp_path / "p0.png"])
    assert "1st" in table and fashion_mnist.CLASSES[rows[0]["top"][0]["class"]] in table
    # --normalize unit: the model sees 0..1 pixels, not standardised ones: another answer
    unit = json.loads(ok(capsys, ["predict", lenet, tmp_path / "u8.npy", "--json", "--normalize", "unit"]))
    pu = _softmax(model.forward(pixels[:, None].astype(np.float32) / np.float32(255)))
    np.testing.assert_allclose(unit[0]["top"][0]["probability"], pu[0].max(), rtol=1e-5)


def test_predict_rgb_png_and_onnx_model(tmp_path, capsys, graph_files, rng):
    from PIL import Image
    ckpt, onnx_path, _ = graph_files
    img = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(img).save(tmp_path / "rgb.png")
    a = json.loads(ok(capsys, ["predict", ckpt, tmp_path / "rgb.png", "--json", "--top-k", "4"]))
    b = json.loads(ok(capsys, ["predict", onnx_path, tmp_path / "rgb.png", "--json", "--top-k", "4"]))
    assert [t["name"] for t in a[0]["top"]] == [str(t["class"]) for t in a[0]["top"]]  # indices, not names
    np.testing.assert_allclose([t["probability"] for t in a[0]["top"]], [t["probability"] for t in b[0]["top"]],
                               rtol=1e-5, atol=1e-7)
    assert sum(t["probability"] for t in a[0]["top"]) == pytest.approx(1.0, abs=1e-9)
    model = build_model_from(ckpt)
    model.eval()
    p = _softmax(model.forward(np.ascontiguousarray(img.transpose(2, 0, 1)[None], np.float32) / np.float32(255)))
    assert [t["class"] for t in a[0]["top"]] == list(np.argsort(-p[0], kind="stable"))


def test_predict_errors(tmp_path, capsys, graph_files, fashion_files, rng):
    from PIL import Image
    ckpt, _, data = graph_files
    lenet, _ = fashion_files
    Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8)).save(tmp_path / "gray.png")
    Image.fromarray(rng.integers(0, 256, (16, 16, 4), dtype=np.uint8)).save(tmp_path / "rgba.png")
    Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)).save(tmp_path / "big.png")
    (tmp_path / "junk.bin").write_bytes(b"\x01\x02garbage")
    (tmp_path / "cut.png").write_bytes((tmp_path / "gray.png").read_bytes()[:60])
    np.save(tmp_path / "obj.npy", np.array([object()]), allow_pickle=True)
    fails(capsys, ["predict", ckpt, tmp_path / "gray.png"], "gray.png", "1x16x16", "3x16x16")
    fails(capsys, ["predict", ckpt, tmp_path / "rgba.png"], "RGBA")
    fails(capsys, ["predict", ckpt, tmp_path / "big.png"], "3x20x16", "not resized")
    fails(capsys, ["predict", ckpt, tmp_path / "junk.bin"], "not an .npz, .npy, IDX or PNG")
    fails(capsys, ["predict", ckpt, tmp_path / "cut.png"], "cut.png")
    fails(capsys, ["predict", ckpt, tmp_path / "obj.npy"], "objects")
    fails(capsys, ["predict", ckpt, data, "--top-k", "5"], "--top-k 5", "4 classes")
    fails(capsys, ["predict", lenet, data], "3x16x16", "1x28x28")
    fails(capsys, ["predict", tmp_path / "junk.bin", data])
    fails(capsys, ["predict", ckpt, tmp_path / "nope.png"], "no such file")


def test_a_model_that_is_not_a_classifier(tmp_path, capsys, rng):
    """Its weights compress one-shot; training, scoring and predicting say why they cannot."""
    from dnnpar.cli import _data_for
    conv = nn.Sequential(("conv1", nn.Conv2d(3, 4, 3, padding=1)), input_shape=SHAPE, name="features")
    assert _data_for(conv, None, None, None, "compress", one_shot_ok=True) is None
    with pytest.raises(ValueError, match="not one score per class"):
        _data_for(conv, None, None, None, "train")
    save_checkpoint(tmp_path / "c.npz", conv, {"model": conv.name})
    x, _ = user_set(rng, n=2)
    np.save(tmp_path / "x.npy", x)
    fails(capsys, ["predict", tmp_path / "c.npz", tmp_path / "x.npy"], "4x16x16", "not one score per class")
