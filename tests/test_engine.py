"""The training engine: the epoch driver's contract with a strategy (call order, records,
checkpoints, resume, the finite-loss check) and the one result type / --report of every strategy."""
import json
import subprocess
import sys

import numpy as np
import pytest

from dnnpar.data import fashion_mnist
from dnnpar.engine import EpochStats, Local, Strategy, run
from dnnpar.reporting import REPORT_KEYS, RunResult
from dnnpar.train import TrainConfig, train


@pytest.fixture(scope="module")
def small():
    d = fashion_mnist.load(None, "embedded")
    return fashion_mnist.Dataset(d.x_train[:600], d.y_train[:600], d.x_test[:200], d.y_test[:200], d.source)


class Scripted(Strategy):
    """A strategy that trains nothing: it records the driver's calls and returns the epoch
    figures it is given (``losses[e - 1]`` for epoch e)."""
    name = "scripted"

    def __init__(self, losses, resumable=True):
        self.losses, self.resumable, self.calls = losses, resumable, []

    def check(self, cfg):
        self.calls.append("check")

    def prepare(self, cfg, model, data):
        self.calls.append("prepare")

    def start(self, model, optimizer, start_epoch, out):
        self.calls.append(("start", start_epoch))
        return start_epoch

    def steps_per_epoch(self):
        return 3

    def train_epoch(self, epoch, lr, bar):
        self.calls.append(("epoch", epoch, lr))
        return EpochStats(seen=100, loss_sum=100 * self.losses[epoch - 1], correct=40 + epoch)

    def evaluate(self, model, x, y):
        return 0.25

    def close(self):
        self.calls.append("close")


def test_driver_calls_the_protocol_in_order_and_records_each_epoch(small, tmp_path):
    cfg = TrainConfig(model="lenet300", epochs=3, lr=0.1, schedule="step", seed=2)
    s = Scripted([2.0, 1.5, 1.0])
    res = run(s, cfg, checkpoint=tmp_path / "c.npz", progress=False, out=lambda *a: None, data=small)
    assert isinstance(res, RunResult) and res.strategy == "scripted"
    assert s.calls[:3] == ["check", "prepare", ("start", 1)] and s.calls[-1] == "close"
    from dnnpar.nn.optim import make_schedule
    sched = make_schedule("step", 0.1, 3)
    assert [c for c in s.calls if c[0] == "epoch"] == [("epoch", e, sched(e - 1)) for e in (1, 2, 3)]
    assert [r.loss for r in res.history.records] == [2.0, 1.5, 1.0]
    assert [r.train_acc for r in res.history.records] == [0.41, 0.42, 0.43]
    assert res.final_accuracy == 0.25
    # the checkpoint after the last epoch holds all three records; resume continues after it
    s2 = Scripted([2.0, 1.5, 1.0, 0.5])
    res2 = run(s2, TrainConfig(**{**cfg.__dict__, "epochs": 4}), checkpoint=tmp_path / "c.npz", resume=True,
               progress=False, out=lambda *a: None, data=small)
    assert ("start", 4) in s2.calls and [r.epoch for r in res2.history.records] == [1, 2, 3, 4]


def test_driver_refuses_a_diverged_epoch_and_a_resume_it_cannot_apply(small, tmp_path):
    cfg = TrainConfig(model="lenet300", epochs=2)
    s = Scripted([1.0, float("nan")])
    with pytest.raises(FloatingPointError, match="mean loss of epoch 2 is nan"):
        run(s, cfg, progress=False, out=lambda *a: None, data=small)
    assert s.calls[-1] == "close"   # closed whatever happened
    s = Scripted([1.0], resumable=False)
    with pytest.raises(ValueError, match="--resume is not supported with scripted"):
        run(s, cfg, checkpoint=tmp_path / "x.npz", resume=True, progress=False, out=lambda *a: None, data=small)
    assert s.calls == []            # refused before anything ran


def test_local_strategy_is_train_and_reports_no_communication(small, tmp_path):
    cfg = TrainConfig(model="lenet300", epochs=1, batch_size=37, lr=0.05, seed=4, backend="numpy")
    a = train(cfg, progress=False, out=lambda *a: None, data=small)
    b = run(Local(), cfg, progress=False, out=lambda *a: None, data=small)
    for (n, p, _), (_, q, _) in zip(a.model.named_parameters(), b.model.named_parameters()):
        np.testing.assert_array_equal(p, q, err_msg=n)
    rep = a.report()
    assert set(REPORT_KEYS) <= set(rep) and rep["strategy"] == "local" and rep["model"] == "lenet300"
    assert rep["grad_bytes_per_step"] == rep["dense_grad_bytes_per_step"] == 0 and rep["overlap_fraction"] == 0
    assert 0 <= rep["final_accuracy"] <= 1 and rep["images_per_s"] > 0 and rep["epochs"] == 1
    assert rep["steps"] == -(-600 // 37) and rep["final_accuracy"] == a.history.records[-1].test_acc


@pytest.mark.parametrize("parallel,strategy", [("none", "local"), ("hogwild", "hogwild")])
def test_cli_report_and_checkpoint_for_every_local_strategy(parallel, strategy, tmp_path):
    """--report for --parallel none and hogwild (data: tests/test_parallel.py, ps: tests/test_ps.py);
    the engine writes the checkpoint of each, with one record per epoch."""
    from dnnpar.checkpoint import read_meta

    rep, ck = tmp_path / "r.json", tmp_path / "c.npz"
    p = subprocess.run([sys.executable, "-m", "dnnpar.cli", "train", "--subset", "embedded", "--epochs", "2",
                        "--model", "lenet300", "--lr", "0.05", "--quiet", "--parallel", parallel, "--report", str(rep),
                        "--checkpoint", str(ck)], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    got = json.loads(rep.read_text())
    assert set(REPORT_KEYS) <= set(got) and got["strategy"] == strategy and got["epochs"] == 2
    assert 0 <= got["final_accuracy"] <= 1 and got["images_per_s"] > 0 and got["grad_bytes_per_step"] == 0
    assert f"report: {rep}" in p.stdout
    meta = read_meta(ck)
    assert meta.epoch == 2 and [r["epoch"] for r in meta.history] == [1, 2]
    assert meta.history[-1]["test_acc"] == got["final_accuracy"]
