"""Optimizer, data and training loop: correctness, determinism, checkpoints and errors."""
import gzip
import struct
import subprocess
import sys

import numpy as np
import pytest

import dnnpar as dp
from dnnpar.data import fashion_mnist
from dnnpar.data.idx import read_idx, write_idx
from dnnpar.nn import Linear, Sequential
from dnnpar.nn.optim import SGD, CosineLR, StepLR
from dnnpar.train import TrainConfig, train


@pytest.fixture(scope="module")
def small_data():
    d = fashion_mnist.load(subset="embedded")
    keep_tr, keep_te = slice(0, 640), slice(0, 200)
    return fashion_mnist.Dataset(d.x_train[keep_tr], d.y_train[keep_tr], d.x_test[keep_te], d.y_test[keep_te], d.source)


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_the_textbook_update(nesterov, rng):
    with dp.use_backend("numpy"):
        m = Sequential(("fc", Linear(3, 2, seed=1)))
        p0 = m["fc"].params["weight"].copy()
        opt = SGD(m, lr=0.1, momentum=0.9, nesterov=nesterov, weight_decay=0.01)
        v = np.zeros_like(p0)
        p = p0.astype(np.float64)
        for _ in range(3):
            g = rng.standard_normal(p0.shape).astype(np.float32)
            m["fc"].grads["weight"] = g.copy()
            m["fc"].grads["bias"] = np.zeros(2, np.float32)
            opt.step()
            gd = g + 0.01 * p
            v = 0.9 * v + gd if v.any() else gd
            p = p - 0.1 * (gd + 0.9 * v if nesterov else v)
        np.testing.assert_allclose(m["fc"].params["weight"], p, rtol=1e-5, atol=1e-6)


def test_schedules():
    assert StepLR(0.1, 2, 0.5)(0) == 0.1 and StepLR(0.1, 2, 0.5)(3) == 0.05
    c = CosineLR(0.1, 10)
    assert c(0) == pytest.approx(0.1) and c(5) == pytest.approx(0.05) and c(10) == pytest.approx(0.0)


def test_sgd_masks_keep_pruned_weights_at_zero():
    with dp.use_backend("numpy"):
        m = Sequential(("fc", Linear(4, 4, seed=1)))
        opt = SGD(m, lr=0.1, momentum=0.9)
        mask = (np.arange(16).reshape(4, 4) % 3 != 0).astype(np.float32)
        opt.masks["fc.weight"] = mask
        m["fc"].params["weight"] *= mask
        for _ in range(3):
            m["fc"].grads["weight"] = np.ones((4, 4), np.float32)
            m["fc"].grads["bias"] = np.ones(4, np.float32)
            opt.step()
        assert np.all(m["fc"].params["weight"][mask == 0] == 0)


def test_embedded_sample_is_real_and_balanced():
    d = fashion_mnist.load(subset="embedded")
    assert d.x_train.shape == (6000, 1, 28, 28) and d.x_test.shape == (1000, 1, 28, 28)
    assert np.bincount(d.y_train).tolist() == [600] * 10 and np.bincount(d.y_test).tolist() == [100] * 10
    assert abs(float(d.x_train.mean())) < 0.1 and 0.9 < float(d.x_train.std()) < 1.1


def test_batches_are_a_seeded_permutation():
    x, y = np.arange(10)[:, None], np.arange(10)
    a = [b[1].tolist() for b in fashion_mnist.batches(x, y, 4, seed=1, epoch=2)]
    b = [b[1].tolist() for b in fashion_mnist.batches(x, y, 4, seed=1, epoch=2)]
    c = [b[1].tolist() for b in fashion_mnist.batches(x, y, 4, seed=1, epoch=3)]
    assert a == b and a != c and sorted(sum(a, [])) == list(range(10)) and [len(v) for v in a] == [4, 4, 2]


def test_idx_round_trip_and_corruption(tmp_path):
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz", 3), a)
    raw = gzip.decompress((tmp_path / "a.gz").read_bytes())
    (tmp_path / "trunc").write_bytes(raw[:-1])
    with pytest.raises(ValueError, match="announces \\(2, 3, 4\\) \\(40 bytes\\) but the file holds 39"):
        read_idx(tmp_path / "trunc")
    (tmp_path / "magic").write_bytes(b"\x01\x02" + raw[2:])
    with pytest.raises(ValueError, match="bad IDX magic"):
        read_idx(tmp_path / "magic")
    (tmp_path / "b.gz").write_bytes((tmp_path / "a.gz").read_bytes()[:20])
    with pytest.raises(ValueError, match="cannot decompress"):
        read_idx(tmp_path / "b.gz")
    with pytest.raises(ValueError, match="has 3 dimensions, expected 1"):
        read_idx(tmp_path / "a.gz", 1)


def test_missing_dataset_names_the_places_searched(tmp_path, monkeypatch):
    monkeypatch.setenv("DNNPAR_DATA", str(tmp_path / "env"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(fashion_mnist, "search_path",
                        lambda data_dir=None: [tmp_path / "flag", tmp_path / "env", tmp_path / "home"])
    with pytest.raises(FileNotFoundError, match="(?s)Looked in:.*flag.*env.*home.*apt-get install dataset-fashion-mnist"):
        fashion_mnist.load()


def test_an_explicit_data_dir_is_the_only_place_looked_in(tmp_path, monkeypatch):
    # a copy elsewhere (DNNPAR_DATA) must not stand in for a --data-dir that is wrong
    monkeypatch.setenv("DNNPAR_DATA", str(fashion_mnist.EMBEDDED))
    with pytest.raises(FileNotFoundError, match="--data-dir .*nowhere is not a folder"):
        fashion_mnist.load(tmp_path / "nowhere")
    (tmp_path / "some").mkdir()
    (tmp_path / "some" / "train-labels-idx1-ubyte.gz").write_bytes(
        (fashion_mnist.EMBEDDED / "train-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(FileNotFoundError, match=r"missing train-images-idx3-ubyte\(.gz\), t10k-images"):
        fashion_mnist.load(tmp_path / "some")


def test_corrupt_dataset_file_is_named(tmp_path):
    for stem in fashion_mnist.FILES.values():
        (tmp_path / f"{stem}.gz").write_bytes((fashion_mnist.EMBEDDED / f"{stem}.gz").read_bytes())
    lbl = tmp_path / "t10k-labels-idx1-ubyte.gz"
    lbl.write_bytes(gzip.compress(struct.pack(">HBB", 0, 8, 1) + struct.pack(">I", 1000) + bytes([3] * 999 + [12])))
    with pytest.raises(ValueError, match="test label 12 is outside 0..9"):
        fashion_mnist.load(tmp_path)


def test_training_learns_and_resume_is_exact(small_data, tmp_path):
    cfg = TrainConfig(model="lenet5", epochs=2, batch_size=32, lr=0.01, backend="numpy")
    logs = []
    result = train(cfg, checkpoint=tmp_path / "a.npz", progress=False, out=logs.append, data=small_data)
    straight, hist = result.model, result.history
    assert hist.records[-1].loss < hist.records[0].loss and hist.records[-1].test_acc > 0.5
    assert any("train acc" in line for line in logs)
    # one epoch, stop, resume for the second: the same parameters to the bit
    one = TrainConfig(**{**cfg.__dict__, "epochs": 1})
    train(one, checkpoint=tmp_path / "b.npz", progress=False, out=lambda s: None, data=small_data)
    result = train(cfg, checkpoint=tmp_path / "b.npz", resume=True, progress=False, out=lambda s: None,
                   data=small_data)
    resumed, hist2 = result.model, result.history
    assert [r.epoch for r in hist2.records] == [1, 2]
    for (n, p, _), (_, q, _) in zip(straight.named_parameters(), resumed.named_parameters()):
        np.testing.assert_array_equal(p, q, err_msg=n)


def test_checkpoint_errors(small_data, tmp_path):
    cfg = TrainConfig(model="lenet300", epochs=1, batch_size=64, backend="numpy")
    train(cfg, checkpoint=tmp_path / "c.npz", progress=False, out=lambda s: None, data=small_data)
    other = TrainConfig(**{**cfg.__dict__, "model": "lenet5", "epochs": 2})
    with pytest.raises(ValueError, match="holds a lenet300 checkpoint, not lenet5"):
        train(other, checkpoint=tmp_path / "c.npz", resume=True, progress=False, out=lambda s: None, data=small_data)
    (tmp_path / "bad.npz").write_bytes((tmp_path / "c.npz").read_bytes()[:500])
    with pytest.raises(ValueError, match="not a readable dnnpar .npz file"):
        train(cfg, checkpoint=tmp_path / "bad.npz", resume=True, progress=False, out=lambda s: None, data=small_data)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train(cfg, checkpoint=tmp_path / "none.npz", resume=True, progress=False, out=lambda s: None, data=small_data)


def test_divergence_is_reported(small_data):
    cfg = TrainConfig(model="lenet300", epochs=1, batch_size=64, lr=1e6, backend="numpy")
    with pytest.raises(FloatingPointError, match="training diverged; lower the learning rate"):
        with np.errstate(all="ignore"):
            train(cfg, progress=False, out=lambda s: None, data=small_data)


def test_cli_train_on_the_embedded_sample(tmp_path):
    p = subprocess.run([sys.executable, "-m", "dnnpar.cli", "train", "--model", "lenet300", "--epochs", "1",
                        "--subset", "embedded", "--batch-size", "256", "--checkpoint", str(tmp_path / "m.npz"), "--plot", str(tmp_path / "c.png")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "epoch 1/1 100%" in p.stderr  # the progress bar
    assert (tmp_path / "m.npz").exists() and (tmp_path / "c.png").stat().st_size > 1000


def test_cli_reports_a_missing_dataset_cleanly(tmp_path, monkeypatch, capsys):
    from dnnpar.cli import main

    monkeypatch.setattr(fashion_mnist, "search_path", lambda data_dir=None: [tmp_path / "nowhere"])
    assert main(["train", "--data-dir", str(tmp_path / "nowhere"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "Fashion-MNIST not found" in err and "nowhere" in err


def test_cli_summary():
    p = subprocess.run([sys.executable, "-m", "dnnpar.cli", "summary", "vgg16", "--batch-size", "32"],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "138,357,544" in p.stdout and "GMACs per image: 15.470" in p.stdout and "training at batch 32" in p.stdout
