"""Bring your own model: graph checkpoints (meta "graph": spec), `dnnpar import` / `dnnpar export`
and the errors they give (one line, exit status != 0)."""
import json

import numpy as np
import pytest

import dnnpar as dp
from dnnpar.checkpoint import build_model_from, read_meta, save_checkpoint
from dnnpar.cli import main
from dnnpar.errors import CheckpointError
from dnnpar.nn.base import save_npz_atomic

pytest.importorskip("onnx")

from oracles import assert_reordered_close, longest_sum  # noqa: E402
from tests.test_graph import residual_net  # noqa: E402


def _x(rng, model, n=3):
    return rng.standard_normal((n, *model.input_shape)).astype(np.float32)


def test_graph_checkpoint_round_trip(tmp_path, rng):
    g = residual_net(seed=int(rng.integers(1000)))
    g.eval()
    path = tmp_path / "g.npz"
    save_checkpoint(path, g, {"model": "ignored"})
    meta = read_meta(path)
    assert meta.model == g.name and meta.graph == g.spec()
    back = build_model_from(path)
    back.eval()
    x = _x(rng, g)
    np.testing.assert_array_equal(back.forward(x), g.forward(x))


def test_zoo_checkpoint_still_builds(tmp_path):
    m = dp.nn.models.build("lenet300")
    save_checkpoint(tmp_path / "z.npz", m, {"model": "lenet300"})
    assert read_meta(tmp_path / "z.npz").graph is None
    assert build_model_from(tmp_path / "z.npz").name == "lenet300"


def _rewrite_meta(path, edit):
    arrays = dict(np.load(path))
    meta = json.loads(str(arrays["meta"]))
    edit(meta)
    arrays["meta"] = np.array(json.dumps(meta))
    save_npz_atomic(path, arrays)


@pytest.mark.parametrize("edit, field", [
    (lambda m: m["graph"]["nodes"][0].update(type="Nope"), "meta.graph"),
    (lambda m: m["graph"].update(name="other"), "config.model"),
    (lambda m: m.update(graph=[1]), "meta.graph"),
    (lambda m: m["config"].update(model=""), "meta.config.model"),
    # more weights than the file holds: refused by the cap before anything is built
    (lambda m: m["graph"]["nodes"][0]["config"].update(out_channels=60000), "meta.graph"),
])
def test_bad_graph_meta_is_checkpoint_error(tmp_path, edit, field):
    g = residual_net()
    path = tmp_path / "g.npz"
    save_checkpoint(path, g, {"model": g.name})
    _rewrite_meta(path, edit)
    with pytest.raises(CheckpointError) as e:
        build_model_from(path)
    assert e.value.field.endswith(field.split(".")[-1])


def test_cli_import_export_round_trip(tmp_path, rng, capsys):
    from dnnpar.interop import from_onnx, to_onnx

    g = residual_net(seed=int(rng.integers(1000)))
    g.eval()
    to_onnx(g, tmp_path / "m.onnx")
    assert main(["import", tmp_path / "m.onnx", "--out", tmp_path / "m.npz"]) == 0
    assert "wrote" in capsys.readouterr().out
    back = build_model_from(tmp_path / "m.npz")
    back.eval()
    x = _x(rng, g)
    n, depth = longest_sum(g, len(x))  # the imported graph may sum in another order (a folded BN)
    assert_reordered_close(back.forward(x), g.forward(x), n, depth, "imported checkpoint")
    assert main(["export", tmp_path / "m.npz", "--out", tmp_path / "again.onnx", "--opset", "13"]) == 0
    again = from_onnx(tmp_path / "again.onnx")
    assert_reordered_close(again.forward(x), g.forward(x), n, depth, "re-exported ONNX")


def _error(capsys, argv, code=2):
    assert main(argv) == code
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "error" in err
    return err


def test_cli_interop_errors(tmp_path, capsys):
    (tmp_path / "junk.onnx").write_bytes(b"\x01\x02not onnx")
    assert "junk.onnx" in _error(capsys, ["import", tmp_path / "junk.onnx", "--out", tmp_path / "o.npz"])
    assert "no such file" in _error(capsys, ["import", tmp_path / "none.onnx", "--out", tmp_path / "o.npz"])
    m = dp.nn.models.build("lenet300")
    m.save(tmp_path / "bare.npz")
    assert "weights only" in _error(capsys, ["export", tmp_path / "bare.npz", "--out", tmp_path / "o.onnx"])
    assert "opset" in _error(capsys, ["export", tmp_path / "bare.npz", "--out", tmp_path / "o.onnx", "--opset", "9"])
    (tmp_path / "o.onnx").write_bytes(b"x")
    save_checkpoint(tmp_path / "z.npz", m, {"model": "lenet300"})
    assert "exists" in _error(capsys, ["export", tmp_path / "z.npz", "--out", tmp_path / "o.onnx"])
    (tmp_path / "bad.dnnz").write_bytes(b"garbage")
    assert "bad.dnnz" in _error(capsys, ["export", tmp_path / "bad.dnnz", "--out", tmp_path / "p.onnx"])


def test_cli_onnx_flag(tmp_path, rng, capsys):
    from dnnpar.interop import to_onnx

    g = residual_net(seed=int(rng.integers(1000)))
    to_onnx(g, tmp_path / "m.onnx")
    assert main(["summary", "--onnx", tmp_path / "m.onnx"]) == 0
    assert "fc" in capsys.readouterr().out
    assert "one of them" in _error(capsys, ["summary", "lenet5", "--onnx", tmp_path / "m.onnx"])
    assert "one of them" in _error(capsys, ["summary"])
    assert "--onnx" in _error(capsys, ["sensitivity", "--subset", "embedded"])
    assert "give one" in _error(capsys, ["sensitivity", "--model", "lenet5", "--onnx", tmp_path / "m.onnx",
                                         "--subset", "embedded"])
