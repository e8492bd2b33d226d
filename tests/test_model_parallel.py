"""AlexNet's two-column model parallelism and the conv-data / fc-model hybrid, over two real MPI
ranks: logits and every gradient equal the single-device model's, to the float32 bound for sums
taken in another order (tests/oracles.py)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import dnnpar as dp
from oracles import assert_reordered_close, longest_sum
from dnnpar.nn import SoftmaxCrossEntropy
from dnnpar.nn.models import alexnet

pytest.importorskip("mpi4py", reason="model-parallel tests need mpi4py: pip install 'dnnpar[dist]'")
from dnnpar.parallel.comm import mpi_env, mpiexec  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
IN_SHAPE, CLASSES, BATCH = (3, 67, 67), 10, 4  # a small AlexNet: the real layer structure, 67x67 input

WORKER = textwrap.dedent('''
    import sys
    import numpy as np
    import dnnpar as dp
    from dnnpar.nn import SoftmaxCrossEntropy
    from dnnpar.nn.models import alexnet
    from dnnpar.parallel.comm import MPICommunicator
    from dnnpar.parallel.model_parallel import split_model
    mode, groups, seed, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    batch = int(sys.argv[5]) if len(sys.argv) > 5 else 4
    dp.set_backend("numpy")

    class Counting(MPICommunicator):
        """Counts the float bytes each collective call moves out of this rank (ring algorithms),
        independently of the model's own bookkeeping; the int64 shape handshake is not data."""
        sent = {"gather": 0, "reduce": 0, "allreduce": 0}

        def allgather(self, local, out):
            if local.dtype == np.float32:
                self.sent["gather"] += local.nbytes * (self.size - 1)
            super().allgather(local, out)

        def reduce_scatter(self, send, recv):
            self.sent["reduce"] += send.nbytes * (self.size - 1) // self.size
            super().reduce_scatter(send, recv)

        def allreduce_sum(self, buffers):
            self.sent["allreduce"] += sum(b.nbytes for b in buffers) * 2 * (self.size - 1) // self.size
            super().allreduce_sum(buffers)

    comm = Counting(timeout=60)
    model = alexnet(num_classes=10, groups=groups, in_shape=(3, 67, 67), dropout=0.0, seed=1)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 3, 67, 67)).astype(np.float32)
    y = rng.integers(0, 10, batch)
    pm = split_model(model, comm, mode)
    lo, hi = batch * comm.rank // comm.size, batch * (comm.rank + 1) // comm.size
    xin = x if mode == "model" else x[lo:hi]
    try:
        logits = pm.forward(xin)
    except ValueError as e:
        print("ValueError:", e, flush=True)
        sys.exit(3)
    loss_fn = SoftmaxCrossEntropy()
    loss = loss_fn(logits, y)
    pm.backward(loss_fn.backward())
    pm.sync_grads()
    arrays = {f"grad/{k}": g for k, _, g in pm.named_parameters()}
    arrays.update({f"rows/{k}": np.array([s.start, s.stop]) for k, s in pm.owned.items()})
    np.savez(out.replace(".npz", f"{comm.rank}.npz"), logits=logits, loss=loss, bytes=pm.bytes_sent, replicated=np.array(pm.replicated),
             stats=np.array([pm.stats.get(k, 0) for k in comm.sent]), counted=np.array(list(comm.sent.values())),
             **arrays)
''')


def _reference(groups, seed):
    with dp.use_backend("numpy"):
        model = alexnet(num_classes=CLASSES, groups=groups, in_shape=IN_SHAPE, dropout=0.0, seed=1)
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((BATCH,) + IN_SHAPE).astype(np.float32)
        y = rng.integers(0, CLASSES, BATCH)
        loss_fn = SoftmaxCrossEntropy()
        logits = model.forward(x)
        loss = loss_fn(logits, y)
        model.backward(loss_fn.backward())
        return logits, float(loss), {k: g for k, _, g in model.named_parameters()}, longest_sum(model, BATCH)


@pytest.mark.parametrize("mode,groups", [("model", 2), ("hybrid", 1)])
def test_split_equals_the_single_device_model(tmp_path, mode, groups, rng):
    seed = int(rng.integers(1 << 30))  # fresh per run, replayable through DNNPAR_TEST_SEED
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = mpi_env(dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")))
    r = subprocess.run(mpiexec(2) + [sys.executable, str(script), mode, str(groups), str(seed),
                                     str(tmp_path / "rank.npz")], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    logits, loss, grads, sums = _reference(groups, seed)
    for rank in (0, 1):
        _check_rank(np.load(tmp_path / f"rank{rank}.npz"), logits, loss, grads, sums)


def _check_rank(got, logits, loss, grads, sums):
    """The split model's results against the single device's: both are float32, with the same
    sums taken in other orders (another GEMM blocking per half, the reduction over ranks)."""
    n, depth = sums
    assert_reordered_close(got["logits"], logits, n, depth // 2, "logits")  # the forward half of the chain
    assert_reordered_close(got["loss"], np.float64(loss), n, depth // 2 + 1, "loss")
    checked = 0
    for key in got.files:
        if not key.startswith("grad/"):
            continue
        name = key[5:]
        layer = name.rsplit(".", 1)[0]
        want = grads[name]
        if f"rows/{layer}" in got.files:
            lo, hi = got[f"rows/{layer}"]
            want = want[lo:hi]
        else:
            assert layer in set(got["replicated"].tolist())
        assert_reordered_close(got[key], want, n, depth, name)
        checked += 1
    assert checked == len(grads)  # every parameter of the model, sliced or whole
    # the bytes the model reports per step are exactly what went through the communicator
    np.testing.assert_array_equal(got["stats"], got["counted"])
    assert int(got["bytes"]) == int(got["counted"].sum())
    gather, reduce, allreduce = got["counted"].tolist()
    assert gather > 0
    if len(got["replicated"]):       # hybrid: the conv gradients are allreduced
        assert allreduce > 0
    else:                            # model parallel: nothing is replicated, split layers reduce-scatter
        assert allreduce == 0 and reduce > 0


def test_hybrid_refuses_a_batch_that_does_not_split_evenly(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = mpi_env(dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")))
    r = subprocess.run(mpiexec(2) + [sys.executable, str(script), "hybrid", "1", "0", str(tmp_path / "r.npz"), "5"],
                       env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode != 0
    assert "the ranks hold different shapes [(2, 256), (3, 256)]" in r.stdout, r.stdout + r.stderr[-2000:]


class _Ranks:
    """Rank / size only: split_model builds its layers without communicating."""
    name, timeout = "fake", 1.0

    def __init__(self, rank, size):
        self.rank, self.size = rank, size


def test_bad_input_is_a_clear_error():
    from dnnpar.nn import Sequential, Conv2d, ReLU, BatchNorm2d
    from dnnpar.parallel.model_parallel import split_model

    with dp.use_backend("numpy"):
        net = alexnet(num_classes=CLASSES, groups=2, in_shape=IN_SHAPE, seed=1)
        with pytest.raises(ValueError, match="unknown parallel mode 'pipeline'"):
            split_model(net, _Ranks(0, 2), "pipeline")
        with pytest.raises(ValueError, match="at least 2 ranks"):
            split_model(net, _Ranks(0, 1))
        with pytest.raises(ValueError, match="conv2 has 2 groups; 4 ranks split only groups 1 or 4"):
            split_model(net, _Ranks(0, 4))
        convs = Sequential(("conv", Conv2d(3, 4, 3)), ("relu", ReLU()), input_shape=(3, 8, 8))
        with pytest.raises(ValueError, match="no Linear layer"):
            split_model(convs, _Ranks(0, 2), "hybrid")
        with pytest.raises(ValueError, match="5 outputs, not divisible by 2 ranks"):
            split_model(Sequential(("conv", Conv2d(3, 5, 3)), input_shape=(3, 8, 8)), _Ranks(0, 2))
        with pytest.raises(NotImplementedError, match="no model-parallel rule for BatchNorm2d"):
            split_model(Sequential(("conv", Conv2d(3, 4, 3)), ("bn", BatchNorm2d(4)), input_shape=(3, 8, 8)),
                        _Ranks(0, 2))
        part = split_model(net, _Ranks(1, 2))
        assert part.owned["fc6"] == slice(2048, 4096) and part.owned["conv1"] == slice(48, 96)
        assert [n for n, _ in part.net.layers if n.startswith("gather")] == \
            ["gather_conv3", "gather_fc6", "gather_fc7", "gather_fc8", "gather_logits"]
