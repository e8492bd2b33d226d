"""Generated command lines against ``dnnpar.cli.main``, in process: every bad argument ends in
exit status 2 and exactly one stderr line (``dnnpar CMD: error: argument --x: ...`` or
``dnnpar: error: ...``), never a traceback; every good one parses to the value given (or, for the
cheap commands ``plan`` and ``summary``, runs and exits 0). Validation runs before any work, so
each case costs milliseconds."""
import argparse
import contextlib
import io
import json
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dnnpar import argcheck as ck
from dnnpar.cli import build_parser, main

SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))


def call(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def assert_one_error_line(code, err, argv):
    assert code == 2, (argv, code, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, (argv, err)
    return lines[0]


# text that looks like a number or nearly: the edges each flag must sort out
NUMBERS = st.one_of(
    st.sampled_from(["nan", "NaN", "inf", "-inf", "+inf", "Infinity", "1e400", "-1e400", "0", "-0", "-1", "1",
                     "0.5", "1.0", "2", "1e-9", "abc", "", " ", "1,5", "0x10", "1_000", "None", "null", "--",
                     "9" * 40, "-" + "9" * 40, "1.5", "1e3", "0.999999", "0.99999999999999999"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(2**70), 2**70).map(str),
    st.text(max_size=8),
)


def as_float(text):
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def as_int(text):
    try:
        return int(text)
    except ValueError:
        return None


def positive_float(text):
    v = as_float(text)
    return v if v is not None and v > 0 else None


def nonneg_float(text):
    v = as_float(text)
    return v if v is not None and v >= 0 else None


def fraction(text):
    v = as_float(text)
    return v if v is not None and 0 <= v < 1 else None


def int_in(lo, hi=None):
    def check(text):
        v = as_int(text)
        return v if v is not None and v >= lo and (hi is None or v <= hi) else None
    return check


# (command prefix, flag, oracle, argparse dest)
FLAGS = [
    (["train"], "--epochs", int_in(1), "epochs"),
    (["train"], "--batch-size", int_in(1), "batch_size"),
    (["train"], "--lr", positive_float, "lr"),
    (["train"], "--momentum", fraction, "momentum"),
    (["train"], "--weight-decay", nonneg_float, "weight_decay"),
    (["train"], "--seed", int_in(0, 2**32 - 1), "seed"),
    (["train"], "--workers", int_in(1, 256), "workers"),
    (["train"], "--servers", int_in(1, 256), "servers"),
    (["train"], "--bucket-mb", positive_float, "bucket_mb"),
    (["train"], "--timeout", positive_float, "timeout"),
    (["train"], "--ps-checkpoint-every", int_in(1), "ps_checkpoint_every"),
    (["demo"], "--epochs", int_in(1), "epochs"),
    (["tour"], "--repeat", int_in(1, 10_000), "repeat"),
    (["tour"], "--batch", int_in(1, 1024), "batch"),
    (["summary", "lenet5"], "--batch-size", int_in(1), "batch_size"),
    (["summary", "mobilenet_v1"], "--alpha", positive_float, "alpha"),
    (["summary", "alexnet"], "--groups", int_in(1, 2), "groups"),
    (["plan"], "--workers", int_in(1, 1 << 20), "workers"),
    (["plan"], "--bandwidth", positive_float, "bandwidth"),
    (["plan"], "--latency", nonneg_float, "latency"),
    (["plan"], "--tflops", positive_float, "tflops"),
    (["plan"], "--batch-size", int_in(1, 1 << 20), "batch_size"),
    (["plan"], "--servers", int_in(1, 1 << 20), "servers"),
    (["compress", "--checkpoint", "{ckpt}", "--out", "{out}"], "--lr", positive_float, "lr"),
    (["compress", "--checkpoint", "{ckpt}", "--out", "{out}"], "--finetune-lr", positive_float, "finetune_lr"),
    (["compress", "--checkpoint", "{ckpt}", "--out", "{out}"], "--weight-decay", nonneg_float, "weight_decay"),
    (["compress", "--checkpoint", "{ckpt}", "--out", "{out}"], "--cycles", int_in(1, 1000), "cycles"),
    (["compress", "--checkpoint", "{ckpt}", "--out", "{out}"], "--retrain-epochs", int_in(0), "retrain_epochs"),
    (["compress", "--checkpoint", "{ckpt}", "--out", "{out}"], "--fc-bits", int_in(1, 16), "fc_bits"),
    (["compress", "--checkpoint", "{ckpt}", "--out", "{out}"], "--conv-index-bits", int_in(1, 16), "conv_index_bits"),
    (["sensitivity", "--checkpoint", "{ckpt}"], "--limit", int_in(0), "limit"),
    (["sensitivity", "--checkpoint", "{ckpt}"], "--sparsities", fraction, "sparsities"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A real lenet300 checkpoint and a free output path."""
    from dnnpar.checkpoint import save_checkpoint
    from dnnpar.nn.models import build

    d = tmp_path_factory.mktemp("cli")
    ckpt = d / "lenet300.npz"
    save_checkpoint(ckpt, build("lenet300", seed=0), {"model": "lenet300"})
    return {"ckpt": str(ckpt), "out": str(d / "m.dnnz"), "dir": d}


@settings(max_examples=3000, **SETTINGS)
@given(case=st.sampled_from(FLAGS), text=NUMBERS)
def test_every_numeric_flag_refuses_what_it_cannot_use(files, case, text):
    """3,000 cases: each numeric flag of each command against edge and random text."""
    prefix, flag, oracle, dest = case
    argv = [a.format(**files) for a in prefix] + [f"{flag}={text}"]
    want = oracle(text)
    if want is None:
        line = assert_one_error_line(*call(argv)[::2], argv)
        assert f"argument {flag}" in line, line
        return
    args = build_parser().parse_args(argv)
    got = getattr(args, dest)
    assert (got[0] if isinstance(got, list) else got) == want
    if prefix[0] in ("plan", "summary") and not (prefix[1:] == ["mobilenet_v1"] and want > 64):
        code, out, err = call(argv)
        assert code == 0 and out and not err, (argv, err)


JSON_VALUES = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**1100), 2**1100),
                        st.none(), st.booleans(), st.text(max_size=4), st.lists(st.integers(), max_size=2),
                        st.dictionaries(st.text(max_size=2), st.integers(), max_size=1))
LAYER_NAMES = st.sampled_from(["fc1", "fc2", "fc3", "fc9", "relu1", "conv1", "", "FC1"])
LENET300 = ["fc1", "fc2", "fc3"]


def good_quality(v):
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return False
    try:
        return math.isfinite(v) and v > 0
    except OverflowError:
        return False


@settings(max_examples=1500, **SETTINGS)
@given(spec=st.one_of(st.dictionaries(LAYER_NAMES, JSON_VALUES, max_size=4),
                      JSON_VALUES, st.text(max_size=12)))
def test_quality_is_a_positive_number_or_an_object_of_known_layers(spec, files):
    """1,500 cases: numbers, JSON objects (unknown names, null, strings, bools, NaN, huge
    integers) and broken JSON. Layers left out take the default 1.0."""
    text = json.dumps(spec) if not isinstance(spec, str) else spec
    try:
        parsed = ck.quality(text)
    except argparse.ArgumentTypeError as e:
        assert str(e) and "\n" not in str(e)
        if isinstance(spec, dict):
            assert not all(good_quality(v) for v in spec.values())
        argv = ["compress", "--checkpoint", files["ckpt"], "--out", files["out"], "--quality", text]
        line = assert_one_error_line(*call(argv)[::2], argv)
        assert "argument --quality" in line
        return
    if isinstance(spec, dict):
        assert all(good_quality(v) for v in spec.values())
        if set(spec) <= set(LENET300):
            full = ck.quality_for(parsed, LENET300, 1.0, "lenet300")
            assert full == {n: float(spec.get(n, 1.0)) for n in LENET300}
        else:
            with pytest.raises(ValueError, match="no prunable layer"):
                ck.quality_for(parsed, LENET300, 1.0, "lenet300")
            # through the command: refused after the checkpoint is read, before any compression
            argv = ["compress", "--checkpoint", files["ckpt"], "--out", files["out"], "--quality", text]
            line = assert_one_error_line(*call(argv)[::2], argv)
            assert line.startswith("dnnpar: error: --quality: lenet300 has no prunable layer")
    else:
        assert parsed > 0 and math.isfinite(parsed)


TOKENS = st.sampled_from(["--lr", "--epochs", "--model", "--subset", "--data-dir", "--backend", "--quality",
                          "--plot", "--checkpoint", "--workers", "--consistency", "--parallel", "--comm", "-x",
                          "--", "nan", "-1", "0", "lenet5", "vgg16", "embedded", "full", "ssp:", "ssp:-1", "bsp",
                          "{", "{}", "/dev/zero", "/", "/missing/dir/f", "data", "nccl", "zzz", "1e999"])


@settings(max_examples=1000, **SETTINGS)
@given(command=st.sampled_from(["train", "compress", "sensitivity", "evaluate", "tour", "demo", "plan", "summary",
                                "nope"]),
       tokens=st.lists(st.one_of(TOKENS, st.text(max_size=6)), max_size=6))
def test_random_command_lines_end_in_one_line(command, tokens):
    """1,000 cases: random tokens after a command. A trailing ``--epochs 0`` (or ``--workers 0``)
    keeps every case from starting work; whatever comes first, exactly one error line."""
    stopper = {"train": ["--epochs", "0"], "demo": ["--epochs", "0"], "tour": ["--repeat", "0"],
               "plan": ["--workers", "0"], "summary": ["--batch-size", "0"],
               "compress": ["--cycles", "0"], "sensitivity": ["--limit", "-1"]}.get(command, ["--no-such-flag"])
    argv = [command, *tokens, *stopper]
    code, out, err = call(argv)
    assert_one_error_line(code, err, argv)


@settings(max_examples=300, **SETTINGS)
@given(kind=st.sampled_from(["missing_parent", "folder", "device", "exists", "parent_is_file", "ok"]),
       where=st.sampled_from(["--out", "--checkpoint"]), name=st.text(st.characters(categories=["L", "N"]),
                                                                      min_size=1, max_size=8))
def test_file_arguments_are_checked_before_the_work(files, kind, where, name):
    """300 cases: paths to files that cannot be read or written, for compress --out/--checkpoint."""
    d = files["dir"]
    path = {"missing_parent": str(d / "no-such" / name / "f.dnnz"), "folder": str(d),
            "device": "/dev/zero" if where == "--checkpoint" else "/dev/null",
            "exists": files["ckpt"] if where == "--out" else str(d / f"{name}.absent"),
            "parent_is_file": files["ckpt"] + "/x.dnnz", "ok": None}[kind]
    # only the good case needs a stopper (--cycles 0) to keep compression from starting: the
    # others must be refused on their own, before any work
    argv = ["compress", "--checkpoint", files["ckpt"], "--out", files["out"]] + (["--cycles", "0"] if path is None else [])
    if path is not None:
        argv[argv.index(where) + 1] = path
    line = assert_one_error_line(*call(argv)[::2], argv)
    if kind == "ok":   # both files fine: the --cycles 0 error is the one reported
        assert "argument --cycles" in line
    else:
        assert where in line or "exists" in line, line
        assert "Traceback" not in line
    assert not np.any([p.name.startswith(".dnnpar-check") for p in d.iterdir()])  # the probe file is gone
