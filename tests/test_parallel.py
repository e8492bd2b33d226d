"""Synchronous data parallelism over real MPI (mpiexec + mpi4py): N ranks at batch b follow one
rank at batch N*b; a dead or silent rank ends the job with an error; bucketing; bad input."""
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

import dnnpar as dp
from dnnpar.checkpoint import build_model_from
from dnnpar.data import fashion_mnist
from dnnpar.nn.models import build
from dnnpar.steps import predict
from dnnpar.nn.optim import SGD
from oracles import assert_reordered_close, longest_sum, reorder_tolerance

pytest.importorskip("mpi4py", reason="the data-parallel tests need mpi4py: pip install 'dnnpar[dist]'")
from dnnpar.parallel.comm import Communicator, mpi_env, mpiexec  # noqa: E402
from dnnpar.parallel.data_parallel import DataParallel  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# One rank of a run: train `steps` global batches of a slice of the embedded set, then rank 0
# writes the final parameters. Arguments: model batch steps extra out_path [options_json]; options:
# fail, accumulate (micro-batches per step), overlap.
WORKER = textwrap.dedent('''
    import json, os, sys
    import numpy as np
    from dnnpar.data import fashion_mnist
    from dnnpar.train import TrainConfig
    from dnnpar.parallel.comm import MPICommunicator
    from dnnpar.parallel.data_parallel import run_data_parallel
    model, batch, steps, extra, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    opts = json.loads(sys.argv[6]) if len(sys.argv) > 6 else {}
    k = opts.get("accumulate", 1)
    comm = MPICommunicator(timeout=float(os.environ.get("TEST_TIMEOUT", "60")))
    d = fashion_mnist.load(None, "embedded")
    n = steps * batch * k * comm.size + extra  # `extra` samples make a short last batch
    d = fashion_mnist.Dataset(d.x_train[:n], d.y_train[:n], d.x_test[:200], d.y_test[:200], d.source)
    cfg = TrainConfig(model=model, epochs=1, batch_size=batch, lr=0.01, momentum=0.9, weight_decay=5e-4,
                      schedule="constant", seed=3)
    hook = None
    if "dgc" in opts:
        from dnnpar.parallel.dgc import DGCConfig, DGCHook
        hook = DGCHook(DGCConfig(**opts["dgc"]), seed=3)
    if "half" in opts:
        from dnnpar.parallel.data_parallel import HalfPrecisionHook
        hook = HalfPrecisionHook(opts["half"])
    result = run_data_parallel(cfg, comm, bucket_mb=0.05, fail=opts.get("fail"), accumulate=k,
                               overlap=opts.get("overlap", True), hook=hook, data=d, progress=False,
                               out=lambda *a: None)
    m, hist, par = result.model, result.history, result.details
    if comm.rank == 0:
        np.savez(out, **{k: v for k, v in m.state_dict().items()}, loss=hist.records[-1].loss,
                 buckets=len(par.buckets), bytes_sent=par.bytes_sent, steps=par.steps,
                 dense_bytes=par.report_dense_bytes())
    if opts.get("every_rank"):
        np.savez(out + f".rank{comm.rank}.npz", **m.state_dict())
''')


def _env():
    return mpi_env(dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")))


def _run(tmp_path, n, args, timeout=240, extra_env=None):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = _env()
    env.update(extra_env or {})
    t0 = time.monotonic()
    r = subprocess.run(mpiexec(n) + [sys.executable, str(script), *map(str, args)], env=env, capture_output=True,
                       text=True, timeout=timeout)
    return r, time.monotonic() - t0


class _RecordingSGD(SGD):
    """SGD that remembers, per parameter and step, the largest |grad + wd * p| it applied: the
    scale of the gradient errors a reordered run can make (see _param_bound)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.scales = {}

    def step(self):
        for name, p, g in self.model.named_parameters():
            self.scales.setdefault(name, []).append(float(np.max(np.abs(g + self.weight_decay * p))))
        super().step()


def _single(model, batch, steps, extra, nranks, accumulate=1, extra_depth=0):
    """The reference: one process, no MPI, batch nranks * batch (``batch`` = the ranks' micro-batch
    times ``accumulate``), same data and seed. Returns the final parameters, the last loss and, per
    parameter, how far float32 reordering may move it."""
    from dnnpar.data import fashion_mnist
    from dnnpar.train import TrainConfig, train, build_model

    d = fashion_mnist.load(None, "embedded")
    n = steps * batch * nranks + extra
    d = fashion_mnist.Dataset(d.x_train[:n], d.y_train[:n], d.x_test[:200], d.y_test[:200], d.source)
    cfg = TrainConfig(model=model, epochs=1, batch_size=batch * nranks, lr=0.01, momentum=0.9, weight_decay=5e-4,
                      schedule="constant", seed=3)
    with dp.use_backend("numpy"):
        m = build_model(cfg)
        opt = _RecordingSGD(m, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay)
        result = train(cfg, data=d, model=m, optimizer=opt, progress=False, out=lambda *a: None)
        m, hist = result.model, result.history
    sums, depth = longest_sum(m, batch * nranks)
    # + 1: the allreduce's sum over ranks; + 1 more: the sum over micro-batches
    tol = reorder_tolerance(sums, depth + 1 + (accumulate > 1) + extra_depth)
    return m.state_dict(), hist.records[-1].loss, {k: _param_bound(v, cfg, tol) for k, v in opt.scales.items()}


def _param_bound(scales, cfg, tol):
    """Momentum SGD spreads a gradient error d_k into every later step: p_T moves by
    lr * sum_t sum_{k<=t} mu^(t-k) d_k, and each |d_k| <= tol * scale_k (the reordering bound of
    that step's gradient)."""
    total, v = 0.0, 0.0
    for s in scales:
        v = cfg.momentum * v + tol * s
        total += cfg.lr * v
    return total


@pytest.mark.parametrize("model,nranks,extra,accumulate", [("lenet300", 2, 0, 1), ("lenet300", 4, 7, 1),
                                                             ("lenet5", 2, 5, 1), ("lenet300", 4, 7, 2),
                                                             ("lenet5", 2, 5, 3)])
def test_n_ranks_at_batch_b_equal_one_rank_at_batch_nb(tmp_path, model, nranks, extra, accumulate):
    """N ranks of K micro-batches of b follow one rank at batch N*K*b (so K x b equals K*b); a short
    last batch (`extra`) leaves some ranks' first micro-batches empty."""
    batch, steps = 8, 6
    out = tmp_path / "params.npz"
    r, _ = _run(tmp_path, nranks, [model, batch, steps, extra, out, json.dumps({"accumulate": accumulate})])
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(out)
    want, want_loss, bound = _single(model, batch * accumulate, steps, extra, nranks, accumulate)
    assert int(got["buckets"]) > 1  # 0.05 MiB buckets: the fused path with several buckets
    for k, w in want.items():
        err = float(np.max(np.abs(got[k].astype(np.float64) - w)))
        assert err <= bound[k], f"{k}: differs by {err:.3e}, beyond the float32 reordering bound {bound[k]:.3e}"
    with dp.use_backend("numpy"):
        start = build(model, seed=3).state_dict()  # the runs' initial parameters (TrainConfig seed 3)
    moved = max(float(np.abs(want[k] - start[k]).max()) for k in want)
    assert moved > 1e-3  # the steps really trained: equal parameters are not just equal initialisations
    n, depth = longest_sum(build(model), batch * accumulate * nranks)
    assert_reordered_close(got["loss"], np.float64(want_loss), n, steps * depth, "mean loss")


@pytest.mark.parametrize("model,nranks,extra", [("lenet300", 2, 0), ("lenet5", 4, 5)])
def test_dgc_at_density_one_equals_dense_momentum_sgd(tmp_path, model, nranks, extra):
    """Deep Gradient Compression sending every entry (density 1.0 through the sparse path, no
    momentum masking) follows one rank of dense momentum SGD at batch N*b: each rank's
    momentum-corrected velocities, all-gathered and summed, are the dense velocity of the summed
    gradients (linearity), to float32 rounding -- one more chained sum than the dense allreduce
    (the velocities' recursion per rank, summed after it)."""
    batch, steps = 8, 6
    out = tmp_path / "params.npz"
    dgc = {"density": 1.0, "dense_above": 2.0, "mask_momentum": False, "min_sparse": 1}
    r, _ = _run(tmp_path, nranks, [model, batch, steps, extra, out, json.dumps({"dgc": dgc})])
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(out)
    want, _, bound = _single(model, batch, steps, extra, nranks, extra_depth=1)
    for k, w in want.items():
        err = float(np.max(np.abs(got[k].astype(np.float64) - w)))
        assert err <= bound[k], f"{k}: differs by {err:.3e}, beyond the float32 reordering bound {bound[k]:.3e}"
    # every entry as an (index, value) pair: twice the dense payload per rank and peer
    n_params = sum(v.size for v in want.values())
    assert int(got["bytes_sent"]) == int(got["steps"]) * (nranks - 1) * 8 * n_params


# (model, epochs, lr): long enough for each entry of the largest layer to be sent a few times at
# 0.1% (94 steps per epoch on the 6,000 embedded images at 2 x 32); LeNet-5 diverges at lr 0.05
DGC_PARITY = [("lenet300", 40, 0.05), ("lenet5", 20, 0.01)]


@pytest.mark.parametrize("model, epochs, lr", DGC_PARITY, ids=[m for m, _, _ in DGC_PARITY])
def test_dgc_at_a_tenth_of_a_percent_ends_within_half_a_point_of_dense(tmp_path, model, epochs, lr):
    """DGC at density 0.1% (four warm-up epochs from 25%, the paper's) against dense sync SGD on 2
    ranks, same seed, schedule and epochs: after the warm-up it sends >= 100x fewer bytes per step,
    and its test accuracy is not below dense's by more than 0.5 points beyond what the 1,000 test
    images resolve -- two standard errors of the paired per-image difference (McNemar's), computed
    from the two models' predictions (about 0.6-0.8 points here)."""
    test = fashion_mnist.load(None, "embedded")
    runs = {}
    for hook in ("none", "dgc:0.001"):
        report, ckpt = tmp_path / f"{hook[:3]}.json", tmp_path / f"{hook[:3]}.npz"
        r = subprocess.run(mpiexec(2) + [sys.executable, "-m", "dnnpar.cli", "train", "--parallel", "data",
                                         "--model", model, "--subset", "embedded", "--epochs", str(epochs),
                                         "--batch-size", "32", "--lr", str(lr), "--grad-compression", hook,
                                         "--dgc-warmup", "4", "--report", str(report), "--quiet",
                                         "--checkpoint", str(ckpt)],
                           env=_env(), capture_output=True, text=True, timeout=600, cwd=tmp_path)
        assert r.returncode == 0, r.stderr[-3000:]
        runs[hook] = json.loads(report.read_text()), predict(build_model_from(ckpt), test.x_test), r.stdout
    (dense, p_dense, _), (dgc, p_dgc, out) = runs["none"], runs["dgc:0.001"]
    assert dgc["hook"] == "dgc" and dgc["steps_after_warmup"] == dgc["steps"] * (epochs - 4) // epochs, dgc
    assert dgc["grad_bytes_per_step_after_warmup"] * 100 <= dgc["dense_grad_bytes_per_step"], dgc
    assert dgc["grad_bytes_per_step_after_warmup"] < dgc["grad_bytes_per_step"] < dense["grad_bytes_per_step"]
    assert "DGC sent" in out and "after the warm-up" in out
    y = test.y_test
    for rep, pred in ((dense, p_dense), (dgc, p_dgc)):   # the predictions are the reported models'
        assert float((pred == y).mean()) == pytest.approx(rep["final_accuracy"], abs=1e-9)
    d = (p_dense == y).astype(np.float64) - (p_dgc == y)
    gap, se = d.mean(), d.std(ddof=1) / np.sqrt(d.size)
    assert gap <= 0.005 + 2 * se, (f"DGC {100 * dgc['final_accuracy']:.1f}% against dense {100 * dense['final_accuracy']:.1f}%: "
                                   f"{100 * gap:.2f} points behind, beyond 0.5 + 2 x {100 * se:.2f}")


def test_cli_fp16_report(tmp_path):
    """``--grad-compression fp16`` through the CLI: the report names the hook and half the bytes."""
    report = tmp_path / "r.json"
    r = subprocess.run(mpiexec(2) + [sys.executable, "-m", "dnnpar.cli", "train", "--parallel", "data", "--model",
                                     "lenet300", "--subset", "embedded", "--epochs", "1", "--batch-size", "64",
                                     "--grad-compression", "fp16", "--report", str(report),
                                     "--quiet", "--checkpoint", str(tmp_path / "c.npz")],
                       env=_env(), capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    rep = json.loads(report.read_text())
    assert rep["hook"] == "fp16" and rep["final_accuracy"] > 0.3, rep
    assert rep["grad_bytes_per_step"] == pytest.approx(rep["dense_grad_bytes_per_step"] / 2, abs=rep["buckets"]), rep
    assert "FP16 sent" in r.stdout


@pytest.mark.parametrize("model,kind,nranks", [("lenet300", "fp16", 2), ("lenet5", "bf16", 3)])
def test_16_bit_allreduce_keeps_replicas_identical_and_halves_the_bytes(tmp_path, model, kind, nranks):
    """--grad-compression fp16 / bf16: every rank decodes the same 16-bit sums (the replicas stay
    bit-identical), each rank sends exactly half the dense allreduce's bytes, and training still
    lowers the loss (the sums' error bound is tests/test_half.py's)."""
    batch, steps = 8, 6
    out = tmp_path / "params.npz"
    r, _ = _run(tmp_path, nranks, [model, batch, steps, 3, out, json.dumps({"half": kind, "every_rank": True})])
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(out)
    ranks = [np.load(f"{out}.rank{i}.npz") for i in range(nranks)]
    for k in ranks[0].files:
        for other in ranks[1:]:
            np.testing.assert_array_equal(ranks[0][k], other[k], err_msg=k)
    # 2 (N - 1) / N of 2 bytes per value, against 4: half, up to each bucket's rounding to whole bytes
    assert abs(int(got["bytes_sent"]) * 2 - int(got["dense_bytes"]) * int(got["steps"])) \
        <= 2 * int(got["steps"]) * int(got["buckets"])
    with dp.use_backend("numpy"):
        start = build(model, seed=3).state_dict()
    assert max(float(np.abs(got[k] - start[k]).max()) for k in start) > 1e-3
    assert np.isfinite(float(got["loss"]))


# A residual Graph (a skip connection joined by Add, so one tensor fans out and its gradients
# sum) for 28x28 Fashion-MNIST; average pools, not max pools, so no argmax can flip between the
# reordered sums of the two runs. Shared by the worker and the one-rank reference below.
RESIDUAL_NET = textwrap.dedent('''
    def residual_net(seed):
        from dnnpar.nn.base import Graph
        from dnnpar.nn.conv import Conv2d
        from dnnpar.nn.graph import Add
        from dnnpar.nn.layers import AvgPool2d, Flatten, Linear, ReLU
        return Graph([
            ("conv1", Conv2d(1, 4, 3, padding=1, seed=seed), ["input"]),
            ("relu1", ReLU(), ["conv1"]),
            ("pool1", AvgPool2d(2, 2), ["relu1"]),
            ("conv2", Conv2d(4, 4, 3, padding=1, seed=seed + 1), ["pool1"]),
            ("relu2", ReLU(), ["conv2"]),
            ("conv3", Conv2d(4, 4, 3, padding=1, seed=seed + 2), ["relu2"]),
            ("add", Add(), ["conv3", "pool1"]),
            ("relu3", ReLU(), ["add"]),
            ("pool2", AvgPool2d(2, 2), ["relu3"]),
            ("flatten", Flatten(), ["pool2"]),
            ("fc", Linear(4 * 7 * 7, 10, seed=seed + 3), ["flatten"]),
        ], input_shape=(1, 28, 28), name="residual")
''')

GRAPH_WORKER = RESIDUAL_NET + textwrap.dedent('''
    import sys
    import numpy as np
    from dnnpar.data import fashion_mnist
    from dnnpar.train import TrainConfig
    from dnnpar.parallel.comm import MPICommunicator
    from dnnpar.parallel.data_parallel import run_data_parallel
    batch, steps, out = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    comm = MPICommunicator(timeout=60)
    d = fashion_mnist.load(None, "embedded")
    n = steps * batch * comm.size
    d = fashion_mnist.Dataset(d.x_train[:n], d.y_train[:n], d.x_test[:200], d.y_test[:200], d.source)
    cfg = TrainConfig(model="lenet300", epochs=1, batch_size=batch, lr=0.01, momentum=0.9, weight_decay=5e-4,
                      schedule="constant", seed=3)
    # each rank builds the net from another seed: the run must start from rank 0's parameters
    result = run_data_parallel(cfg, comm, bucket_mb=0.002, data=d, progress=False, out=lambda *a: None,
                               model=residual_net(3 + 10 * comm.rank))
    m, hist, par = result.model, result.history, result.details
    if comm.rank == 0:
        np.savez(out, **m.state_dict(), loss=hist.records[-1].loss, buckets=len(par.buckets))
''')


def test_graph_n_ranks_at_batch_b_equal_one_rank_at_batch_nb(tmp_path):
    """A residual Graph under 2-rank data parallel at batch b follows one rank at batch 2b, within
    the float32 reordering bound of tests/oracles.py, as the Sequential models do above."""
    batch, steps, nranks = 8, 6, 2
    script, out = tmp_path / "graph_worker.py", tmp_path / "params.npz"
    script.write_text(GRAPH_WORKER)
    r = subprocess.run(mpiexec(nranks) + [sys.executable, str(script), str(batch), str(steps), str(out)],
                       env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(out)
    assert int(got["buckets"]) > 1

    from dnnpar.data import fashion_mnist
    from dnnpar.train import TrainConfig, train

    ns = {}
    exec(RESIDUAL_NET, ns)
    d = fashion_mnist.load(None, "embedded")
    n = steps * batch * nranks
    d = fashion_mnist.Dataset(d.x_train[:n], d.y_train[:n], d.x_test[:200], d.y_test[:200], d.source)
    cfg = TrainConfig(model="lenet300", epochs=1, batch_size=batch * nranks, lr=0.01, momentum=0.9,
                      weight_decay=5e-4, schedule="constant", seed=3)
    with dp.use_backend("numpy"):
        m = ns["residual_net"](3)
        start = m.state_dict()
        opt = _RecordingSGD(m, cfg.lr, cfg.momentum, cfg.nesterov, cfg.weight_decay)
        result = train(cfg, data=d, model=m, optimizer=opt, progress=False, out=lambda *a: None)
        m, hist = result.model, result.history
    want = m.state_dict()
    sums, depth = longest_sum(m, batch * nranks)
    tol = reorder_tolerance(sums, depth + 1)  # + 1: the allreduce's sum over ranks
    assert set(got.files) - {"loss", "buckets"} == set(want)
    for k, w in want.items():
        bound = _param_bound(opt.scales[k], cfg, tol)
        err = float(np.max(np.abs(got[k].astype(np.float64) - w)))
        assert err <= bound, f"{k}: differs by {err:.3e}, beyond the float32 reordering bound {bound:.3e}"
    assert max(float(np.abs(want[k] - start[k]).max()) for k in want) > 1e-3  # the steps really trained
    assert_reordered_close(got["loss"], np.float64(hist.records[-1].loss), sums, steps * depth, "mean loss")


RESUME_WORKER = textwrap.dedent('''
    import sys
    import numpy as np
    from dnnpar.data import fashion_mnist
    from dnnpar.train import TrainConfig
    from dnnpar.parallel.comm import MPICommunicator
    from dnnpar.parallel.data_parallel import run_data_parallel
    epochs, resume, ckpt, out = int(sys.argv[1]), sys.argv[2] == "1", sys.argv[3], sys.argv[4]
    comm = MPICommunicator(timeout=60)
    d = fashion_mnist.load(None, "embedded")
    d = fashion_mnist.Dataset(d.x_train[:160], d.y_train[:160], d.x_test[:50], d.y_test[:50], d.source)
    cfg = TrainConfig(model="lenet300", epochs=epochs, batch_size=8, lr=0.01, momentum=0.9, weight_decay=5e-4,
                      schedule="constant", seed=3)  # a schedule over `epochs` would differ between 2 and 3
    # only rank 0 is given the real checkpoint path: the others must get everything from it
    path = ckpt if comm.rank == 0 else ckpt + f".rank{comm.rank}-has-no-file"
    result = run_data_parallel(cfg, comm, bucket_mb=0.05, data=d, progress=False, out=lambda *a: None,
                               checkpoint=path, resume=resume)
    m, hist, par = result.model, result.history, result.details
    if comm.rank == 0:
        np.savez(out, **m.state_dict(), epochs=len(hist.records))
''')


def test_resume_continues_exactly_where_the_run_stopped(tmp_path):
    """2 ranks, 3 epochs straight == 2 epochs, then --resume for the third (momentum and epoch
    come from rank 0's checkpoint; the other ranks never read it)."""
    script = tmp_path / "resume.py"
    script.write_text(RESUME_WORKER)

    def run(epochs, resume, ckpt, out):
        r = subprocess.run(mpiexec(2) + [sys.executable, str(script), str(epochs), "1" if resume else "0",
                                         str(ckpt), str(out)], env=_env(), capture_output=True, text=True,
                           timeout=240)
        assert r.returncode == 0, r.stderr[-3000:]
        return np.load(out)

    straight = run(3, False, tmp_path / "a.npz", tmp_path / "straight.npz")
    run(2, False, tmp_path / "b.npz", tmp_path / "first.npz")
    resumed = run(3, True, tmp_path / "b.npz", tmp_path / "resumed.npz")
    assert int(straight["epochs"]) == int(resumed["epochs"]) == 3
    for k in straight.files:  # the same sums in the same order: bitwise equal
        np.testing.assert_array_equal(resumed[k], straight[k], err_msg=k)


HOOKS = {"dense": {}, "dgc": {"dgc": {"density": 0.01, "warmup_epochs": 0}}, "fp16": {"half": "fp16"}}


@pytest.mark.parametrize("how,overlap,hook", [("kill", True, "dense"), ("hang", False, "dense"),
                                              ("hang-in-backward", True, "dense"), ("kill", True, "dgc"),
                                              ("hang-in-backward", True, "dgc"), ("hang-in-backward", True, "fp16")])
def test_a_dead_or_silent_rank_ends_the_job_with_an_error(tmp_path, how, overlap, hook):
    """Killed, silent before its step, or silent in backward with its first bucket in flight
    (overlap): the job ends with an error within the communicator's timeout -- with the dense
    allreduce, DGC's all-gathers and the 16-bit allreduce alike."""
    out = tmp_path / "params.npz"
    opts = {"fail": {"rank": 1, "step": 3, "how": how}, "overlap": overlap, **HOOKS[hook]}
    r, seconds = _run(tmp_path, 2, ["lenet300", 8, 40, 0, out, json.dumps(opts)], timeout=120,
                      extra_env={"TEST_TIMEOUT": "8"})
    assert r.returncode != 0
    assert not out.exists()
    if how == "kill":  # mpiexec notices the dead rank and ends the job
        assert "BAD TERMINATION" in r.stdout + r.stderr and "signal 9" in r.stdout + r.stderr
    else:  # rank 0 times out, names the problem and aborts the job (rank 1 included)
        assert "CommTimeoutError" in r.stderr and "did not complete within 8 s" in r.stderr, r.stderr[-2000:]
        assert "aborting all 2 ranks" in r.stderr
    assert seconds < 60


# One job, two runs of the same training: buckets started from backward (overlap) and all after it.
# Rank 0 writes both runs' parameters and their counters. Arguments: model batch steps accumulate out.
OVERLAP_WORKER = textwrap.dedent('''
    import sys
    import numpy as np
    from dnnpar.data import fashion_mnist
    from dnnpar.train import TrainConfig
    from dnnpar.parallel.comm import MPICommunicator
    from dnnpar.parallel.data_parallel import run_data_parallel
    model, batch, steps, k, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
    comm = MPICommunicator(timeout=60)
    d = fashion_mnist.load(None, "embedded")
    n = steps * batch * k * comm.size + 3  # a short last batch too
    d = fashion_mnist.Dataset(d.x_train[:n], d.y_train[:n], d.x_test[:100], d.y_test[:100], d.source)
    cfg = TrainConfig(model=model, epochs=1, batch_size=batch, lr=0.01, momentum=0.9, weight_decay=5e-4,
                      schedule="constant", seed=3)
    saved = {}
    for overlap in (True, False):
        result = run_data_parallel(cfg, comm, bucket_mb=0.01, accumulate=k, overlap=overlap, data=d,
                                   progress=False, out=lambda *a: None)
        m, hist, par = result.model, result.history, result.details
        tag = "on" if overlap else "off"
        saved.update({f"{tag}/{name}": v for name, v in m.state_dict().items()})
        saved.update({f"{tag}:started_in_backward": par.started_in_backward, f"{tag}:steps": par.steps,
                      f"{tag}:buckets": len(par.buckets), f"{tag}:fraction": par.overlap_fraction(),
                      f"{tag}:comm": par.comm_seconds, f"{tag}:exposed": par.exposed_seconds})
    if comm.rank == 0:
        np.savez(out, **saved)
''')


@pytest.mark.parametrize("model,nranks,accumulate", [("lenet5", 2, 1), ("lenet300", 4, 2)])
def test_overlapped_allreduce_gives_the_same_parameters_as_after_backward(tmp_path, model, nranks, accumulate):
    """Buckets started from backward sum the same buffers as buckets started after it: the same
    parameters bit for bit (a rank without samples in the last step too); and with overlap every
    bucket of every step with a backward pass really began in it."""
    script, out = tmp_path / "overlap.py", tmp_path / "both.npz"
    script.write_text(OVERLAP_WORKER)
    r = subprocess.run(mpiexec(nranks) + [sys.executable, str(script), model, "8", "4", str(accumulate), str(out)],
                       env=_env(), capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    got = np.load(out)
    names = [k[3:] for k in got.files if k.startswith("on/")]
    assert names and len(names) == len([k for k in got.files if k.startswith("off/")])
    for name in names:
        np.testing.assert_array_equal(got[f"on/{name}"], got[f"off/{name}"], err_msg=name)
    steps, buckets = int(got["on:steps"]), int(got["on:buckets"])
    assert steps == 5 and buckets > 3 and int(got["off:steps"]) == steps
    # the short last batch of 3 leaves rank 0 of 4 without samples: it has no backward to start from
    assert int(got["on:started_in_backward"]) == (steps - (3 // nranks == 0)) * buckets
    assert int(got["off:started_in_backward"]) == 0
    assert float(got["off:fraction"]) == 0.0  # nothing overlapped: all of it was waited for
    assert 0.0 <= float(got["on:fraction"]) <= 1.0 and 0 < float(got["on:exposed"]) <= float(got["on:comm"])


class _OneRank(Communicator):
    """A communicator of one rank (the sum over ranks is the buffer itself) that logs its starts."""
    name = "one"

    def __init__(self, events):
        super().__init__(0, 1, 1.0)
        self.events = events

    def allreduce_sum(self, buffers):
        pass

    def bcast(self, buf, root=0):
        pass

    def allreduce_scalars(self, values):
        return np.asarray(values, np.float64)

    def start_allreduce_sum(self, buf):
        self.events.append(("start", buf))
        return super().start_allreduce_sum(buf)


@pytest.mark.parametrize("overlap", [True, False])
def test_gradients_land_in_bucket_views_and_buckets_start_in_backward_order(rng, overlap):
    """lenet5, 3 micro-batches of uneven sizes on one rank: the model's gradients end as views of
    one flat vector (poisoned before), equal to one backward of the whole batch within the
    reordering bound; buckets (contiguous, last layers first) start in order, from backward when
    overlapping (before the first layer's gradients exist), after it otherwise."""
    from dnnpar.nn import SoftmaxCrossEntropy
    from dnnpar.train import forward_backward

    with dp.use_backend("numpy"):
        events = []
        par = DataParallel(_OneRank(events), bucket_mb=0.02, accumulate=3, overlap=overlap)
        m = build("lenet5", seed=int(rng.integers(1000)))
        x = rng.standard_normal((11, 1, 28, 28)).astype(np.float32)
        y = rng.integers(0, 10, 11)
        loss_fn = SoftmaxCrossEntropy()
        forward_backward(m, loss_fn, x, y)
        want = {n: g.astype(np.float64) for n, _, g in m.named_parameters()}
        par.setup(m)
        b, layout = par.buckets, par.layout
        assert len(b) > 2 and [s for g in reversed(b.groups) for s in g] == list(layout.slots)
        assert b.groups[0][-1] == layout.slots[-1]  # bucket 0: the last layer's parameters
        for g, v in zip(b.groups, b.views):
            assert v.base is b.grad and v.size == sum(s.size for s in g) and (v.nbytes <= 0.02 * 2**20 or len(g) == 1)
            assert v.__array_interface__["data"][0] == b.grad.__array_interface__["data"][0] + 4 * g[0].offset
        b.grad[...] = np.nan
        hooked = par._on_grads
        par._on_grads = lambda lname, layer: (events.append(("layer", lname)), hooked(lname, layer))
        parts = par.micro_batches(x, y)
        assert [len(p[1]) for p in parts] == [3, 4, 4] and sum(p[2] for p in parts) == 1.0
        par.begin_step(m)
        for k, (xk, yk, share) in enumerate(parts):
            par.begin_micro(share, last=k == 2)
            forward_backward(m, loss_fn, xk, yk)
        par.finish_step()
        assert m.grad_hook is None  # outside a step backward leaves the buckets alone
        starts = [i for i, e in enumerate(events) if e[0] == "start"]
        assert len(starts) == len(b) and all(events[i][1] is v for i, v in zip(starts, b.views))  # in order
        last_layer_event = max(i for i, e in enumerate(events) if e[0] == "layer")
        if overlap:
            assert starts[0] < last_layer_event < starts[-1]
        else:
            assert starts[0] > last_layer_event
        n, depth = longest_sum(m, 11)
        for name, _, g in m.named_parameters():
            assert np.shares_memory(g, b.grad), name
            assert_reordered_close(g, want[name], n, depth + 1, name)  # + 1: the sum over micro-batches


class _Solo:
    """A communicator of one rank (no MPI): what DataParallel needs for its argument checks."""
    name, rank, size, timeout = "solo", 0, 1, 1.0


def test_a_step_that_raises_leaves_no_hook_on_the_model():
    """A diverging step (a NaN image: the loss is not finite) re-raises on one rank, and the model's
    backward no longer writes into the run's buckets afterwards."""
    from dnnpar.data import fashion_mnist
    from dnnpar.parallel.data_parallel import run_data_parallel
    from dnnpar.train import TrainConfig

    d = fashion_mnist.load(None, "embedded")
    x = d.x_train[:64].copy()
    x[40] = np.nan  # in the third batch of 16
    d = fashion_mnist.Dataset(x, d.y_train[:64], d.x_test[:10], d.y_test[:10], d.source)
    with dp.use_backend("numpy"):
        m = build("lenet300", seed=0)
        cfg = TrainConfig(model="lenet300", epochs=1, batch_size=8, schedule="constant")
        with pytest.raises(FloatingPointError, match="the loss became nan at epoch 1, batch"):
            run_data_parallel(cfg, _OneRank([]), accumulate=2, data=d, model=m, progress=False, out=lambda *a: None)
    assert m.grad_hook is None


def test_bad_input_is_a_clear_error():
    from dnnpar.parallel.comm import make_communicator

    with pytest.raises(ValueError, match="unknown communicator 'gloo'"):
        make_communicator("gloo")
    with pytest.raises(ValueError, match="bucket-mb must be > 0"):
        DataParallel(_Solo(), bucket_mb=0)
    with pytest.raises(ValueError, match="accumulate must be >= 1 micro-batches per step, got 0"):
        DataParallel(_Solo(), accumulate=0)
    with pytest.raises(TypeError, match="accumulate must be an integer, got 2.0"):
        DataParallel(_Solo(), accumulate=2.0)
    with pytest.raises(ValueError, match="'how' must be one of kill, hang, hang-in-backward, got 'crash'"):
        DataParallel(_Solo(), fail={"rank": 0, "step": 1, "how": "crash"})
    par = DataParallel(_Solo())
    par.size = 4
    with pytest.raises(ValueError, match="4 ranks x batch 64 = 256 samples per step, but the training set has only 100"):
        par.check_data(100, 64)
    par.accumulate = 3
    with pytest.raises(ValueError, match="4 ranks x batch 8 x 3 micro-batches = 96 samples per step, but the "
                                         "training set has only 95"):
        par.check_data(95, 8)
    with pytest.raises(ValueError, match="at least one MPI rank"):
        mpiexec(0)


@pytest.mark.parametrize("timeout", [0.02, 0.2])   # below and above the spin period
def test_poll_waits_for_done_and_times_out_with_the_timeout_error(timeout):
    from dnnpar.parallel import comm as C

    c = C.Communicator(0, 2, timeout)
    polls = []
    c._poll(lambda: polls.append(1) or len(polls) >= 3, "quick")   # done on the third poll
    assert len(polls) == 3
    cleaned = []

    def failing_cleanup():
        cleaned.append(1)
        raise RuntimeError("abort failed too")

    t0 = time.monotonic()
    with pytest.raises(C.CommTimeoutError, match=f"rank 0/2: never did not complete within {timeout:g} s"):
        c._poll(lambda: False, "never", on_timeout=failing_cleanup)
    assert timeout <= time.monotonic() - t0 < timeout + 2.0 and cleaned == [1]
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="timeout must be > 0"):
            C.Communicator(0, 1, bad)


def test_cli_runs_data_parallel_under_mpiexec(tmp_path):
    """2 ranks x 2 micro-batches of 16 (64 per step), overlapped, with a --report."""
    ck, rep = tmp_path / "ck.npz", tmp_path / "report.json"
    r = subprocess.run(mpiexec(2) + [sys.executable, "-m", "dnnpar.cli", "train", "--parallel", "data", "--model",
                                     "lenet300", "--subset", "embedded", "--epochs", "1", "--batch-size", "16",
                                     "--accumulate", "2", "--lr", "0.05", "--checkpoint", str(ck), "--report",
                                     str(rep), "--quiet"],
                       env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data parallel over 2 rank(s) (mpi)" in r.stdout
    assert "allreduce overlapped with backward, 2 micro-batches per step; batch 16 per rank, 64 per step" in r.stdout
    assert r.stdout.count("training lenet300") == 1  # rank 0 alone prints
    acc = float(r.stdout.split("\n    1 ")[1].split("%")[1].split()[0])  # test accuracy of epoch 1
    assert acc > 60.0
    assert ck.exists()
    got = json.loads(rep.read_text())
    assert got["final_accuracy"] == pytest.approx(acc / 100, abs=5e-5)
    assert got["strategy"] == "data" and got["ranks"] == 2 and got["accumulate"] == 2 and got["overlap"] is True
    assert got["steps"] == -(-6000 // 64)  # the embedded set's 6,000 training images
    # the dense hook sends the whole gradient: 2 (N-1)/N of 4 bytes per parameter
    assert got["grad_bytes_per_step"] == got["dense_grad_bytes_per_step"] == 4 * build("lenet300").num_parameters()
    assert 0 < got["exposed_comm_seconds"] <= got["comm_seconds"] and 0 <= got["overlap_fraction"] <= 1
    assert got["images_per_s"] > 0


def test_cli_data_parallel_trains_an_imported_graph_on_a_user_data_set(tmp_path, rng):
    """``mpiexec -n 2 dnnpar train --onnx M --data D --parallel data`` at batch b follows
    ``dnnpar train --onnx M --data D`` at batch 2b: the same graph checkpoint, weights within the
    float32 reordering bound of the sums the ranks split."""
    pytest.importorskip("onnx")
    from dnnpar.checkpoint import build_model_from, read_meta
    from dnnpar.interop import to_onnx
    from tests.test_cli_data import small_graph, user_set

    g = small_graph(int(rng.integers(1000)))
    to_onnx(g, tmp_path / "g.onnx")
    x, y = user_set(rng, n=84)
    np.savez(tmp_path / "d.npz", x=x, y=y)
    common = ["train", "--onnx", str(tmp_path / "g.onnx"), "--data", str(tmp_path / "d.npz"), "--epochs", "2",
              "--lr", "0.05", "--quiet"]
    r = subprocess.run(mpiexec(2) + [sys.executable, "-m", "dnnpar.cli", *common, "--parallel", "data",
                                     "--batch-size", "6", "--checkpoint", str(tmp_path / "dp.npz")],
                       env=_env(), capture_output=True, text=True, timeout=240, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "data parallel over 2 rank(s) (mpi)" in r.stdout
    one = subprocess.run([sys.executable, "-m", "dnnpar.cli", *common, "--batch-size", "12", "--checkpoint",
                          str(tmp_path / "one.npz")], env=_env(), capture_output=True, text=True, timeout=240,
                         cwd=tmp_path)
    assert one.returncode == 0, one.stderr[-3000:]
    meta = read_meta(tmp_path / "dp.npz")
    assert meta.graph is not None and meta.epoch == 2 and meta.config["data_file"] == str(tmp_path / "d.npz")
    dp_model, one_model = build_model_from(tmp_path / "dp.npz"), build_model_from(tmp_path / "one.npz")
    n, depth = longest_sum(one_model, 12)
    steps = 2 * (72 // 12)  # 84 images, 12 held out: 72 train, whole batches of 12 per epoch
    for (name, p, _), (_, q, _) in zip(dp_model.named_parameters(), one_model.named_parameters()):
        assert not np.array_equal(q, g.state_dict()[name]), name  # it trained
        assert_reordered_close(p, q, n, (depth + 1) * steps, f"{name} after {steps} steps")  # + 1: the allreduce


@pytest.mark.gpu
def test_nccl_allreduce_on_the_gpu(tmp_path):
    """NCCL through CuPy, bootstrapped over MPI; one rank per GPU on this machine."""
    import cupy as cp

    n = min(cp.cuda.runtime.getDeviceCount(), 2)
    code = textwrap.dedent('''
        import cupy as cp, numpy as np
        from dnnpar.parallel.comm import NCCLCommunicator
        c = NCCLCommunicator(timeout=30)
        a = cp.arange(1000, dtype=cp.float32) * (c.rank + 1)
        b = cp.full(5, c.rank, dtype=cp.float32)
        c.allreduce_sum([a, b])
        s = c.size * (c.size + 1) / 2
        assert cp.allclose(a, cp.arange(1000, dtype=cp.float32) * s), a[:4]
        assert cp.allclose(b, c.size * (c.size - 1) / 2)
        print("ok", c.rank, c.size)
    ''')
    script = tmp_path / "nccl.py"
    script.write_text(code)
    r = subprocess.run(mpiexec(n) + [sys.executable, str(script)], env=_env(), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("ok") == n


def test_missing_mpi_says_what_to_install(monkeypatch):
    from dnnpar.parallel.comm import MPICommunicator

    monkeypatch.setitem(sys.modules, "mpi4py", None)  # what an environment without mpi4py looks like
    with pytest.raises(ImportError, match=r"pip install 'dnnpar\[dist\]'"):
        MPICommunicator()
