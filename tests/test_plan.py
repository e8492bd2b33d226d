"""dnnpar plan: the communication formulas, their monotonic behaviour, the model accounting, bad
input, and one real loopback MPI measurement by benchmarks/comm_model.py (never a timing assert)."""
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dnnpar.parallel import plan as P

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks" / "comm_model.py"


@pytest.fixture(scope="module")
def vgg():
    return P.model_cost("vgg16")   # builds VGG-16 once (a few seconds)


def test_ring_allreduce_hand_values():
    # n = 4, alpha = 10 us, B = 1 GB/s, S = 100 MB: 6 alpha + 1.5 S/B = 60 us + 150 ms
    assert P.ring_allreduce_time(100e6, 4, 10e-6, 1e9) == pytest.approx(0.15006)
    # n = 2: 2 alpha + S/B
    assert P.ring_allreduce_time(8e6, 2, 1e-6, 4e9) == pytest.approx(2e-6 + 2e-3)
    assert P.ring_allgather_time(100e6, 4, 10e-6, 1e9) == pytest.approx(30e-6 + 0.075)
    # parameter server: 2 alpha + 2 S/B max(1, n/k)
    assert P.ps_time(100e6, 8, 2, 5e-6, 1e9) == pytest.approx(10e-6 + 2 * 0.1 * 4)
    assert P.ps_time(100e6, 8, 8, 5e-6, 1e9) == pytest.approx(10e-6 + 0.2)
    assert P.ps_time(100e6, 8, 16, 5e-6, 1e9) == pytest.approx(10e-6 + 0.2)


def test_dgc_hand_values_and_crossover():
    # 1,000,001 parameters at density 0.1%: ceil(1000.001) = 1001 pairs of 8 bytes
    assert P.dgc_bytes(1_000_001, 0.001) == 8 * 1001
    # n = 4: 3 alpha + 3 s / B
    assert P.dgc_time(1_000_000, 0.01, 4, 10e-6, 1e9) == pytest.approx(30e-6 + 3 * 80_000 / 1e9)
    # DGC sends 2 D S per worker: it moves fewer bytes than the dense ring exactly while n < 1 / D
    cost = P.ModelCost("toy", 10_000_000, 1, 10_000_000, 0, (), 10)
    for n, fewer in ((999, True), (1001, False)):
        ring, _, dgc = P.strategies(cost, n, 25, 0, 1, 10, density=0.001)[:3]
        assert ring.strategy.startswith("ring allreduce (") and dgc.strategy == "DGC, density 0.001"
        assert (dgc.bytes_sent < ring.bytes_sent) == fewer, n
    # fp16 halves the dense ring's bytes and time (no latency)
    rows = P.strategies(cost, 8, 25, 0, 1, 10)
    assert rows[1].bytes_sent == pytest.approx(rows[0].bytes_sent / 2) and rows[1].comm_s == pytest.approx(rows[0].comm_s / 2)


@pytest.mark.parametrize("density", [0, -0.1, 1.5, float("nan"), True, "0.1"])
def test_bad_density(density):
    with pytest.raises(ValueError, match="DGC density must be a number in"):
        P.plan("lenet300", 4, 25, 5, density=density)


def test_one_worker_communicates_nothing(vgg):
    assert P.ring_allreduce_time(1e9, 1, 1e-3, 1e9) == 0
    assert P.ring_allgather_time(1e9, 1, 1e-3, 1e9) == 0
    assert P.ps_time(1e9, 1, 1, 1e-3, 1e9) == 0
    for r in P.strategies(vgg, 1, 25, 5, 32, 10):
        assert r.comm_s == 0 and r.bytes_sent == 0 and r.efficiency == 1 and r.efficiency_overlap == 1, r


def test_vgg16_accounting(vgg):
    assert vgg.params == 138_357_544
    assert vgg.grad_bytes == 138_357_544 * 4
    assert vgg.conv_params == 14_714_688 and vgg.fc_params == 123_642_856
    assert vgg.fc_inputs == (25088, 4096, 4096) and vgg.logits == 1000
    assert vgg.macs == pytest.approx(15.47e9, rel=1e-3)
    rep = P.plan("vgg16", 8, 25, 5)
    # compute: 3 x 2 x MACs x 32 / 10 TFLOP/s
    assert rep.compute_s == pytest.approx(6 * vgg.macs * 32 / 10e12)
    ring = rep.row("ring")
    assert ring.bytes_sent == pytest.approx(2 * 7 / 8 * vgg.grad_bytes)
    assert ring.comm_s == pytest.approx(14 * 5e-6 + 2 * 7 / 8 * vgg.grad_bytes / (25e9 / 8))
    assert ring.efficiency == pytest.approx(rep.compute_s / (rep.compute_s + ring.comm_s))
    hyb = rep.row("hybrid")
    gathers = [8 * 32 * d * 4 for d in (25088, 25088, 4096, 4096, 4096, 4096)] + [8 * 32 * 1000 * 4]
    assert hyb.bytes_sent == pytest.approx(2 * 7 / 8 * vgg.conv_params * 4 + 7 / 8 * sum(gathers))
    # Krizhevsky's point: at 8 workers the hybrid moves far fewer bytes than data parallel
    assert hyb.bytes_sent < ring.bytes_sent / 3
    text = rep.table()
    assert "vgg16" in text and "68%" in text and "ring allreduce" in text and "512" in text


def test_efficiency_drops_with_workers_and_rises_with_bandwidth(vgg):
    def eff(n, bw, strategy=0, overlap=False):
        r = P.strategies(vgg, n, bw, 5, 32, 10, servers=n)[strategy]
        return r.efficiency_overlap if overlap else r.efficiency

    ns = [1, 2, 4, 8, 16, 64, 512]
    for strategy in (0, 2):   # ring, hybrid
        for overlap in (False, True):
            e = [eff(n, 25, strategy, overlap) for n in ns]
            assert all(a >= b for a, b in zip(e, e[1:])), (strategy, overlap, e)
    for n in (8, 64, 512):
        e = [eff(n, bw) for bw in (1, 10, 25, 100, 400)]
        assert all(a < b for a, b in zip(e, e[1:])), e
        assert eff(n, 25, overlap=True) >= eff(n, 25)
    # one parameter shard for everyone: a bottleneck growing with n
    assert P.ps_time(1e8, 64, 1, 0, 1e9) == pytest.approx(32 * P.ps_time(1e8, 2, 1, 0, 1e9))
    sc = P.plan("vgg16", 8, 25, 5).scaling
    assert set(sc) == {"25", "100"} and len(sc["25"]["ring"]) == len(P.SCALING_WORKERS)
    assert all(a >= b for a, b in zip(sc["25"]["ring"], sc["25"]["ring"][1:]))
    assert all(h > l for h, l in zip(sc["100"]["ring"], sc["25"]["ring"]))


@pytest.mark.parametrize("kwargs, match", [
    ({"workers": 0}, "workers"), ({"workers": 2.5}, "workers"), ({"workers": True}, "workers"),
    ({"bandwidth_gbps": 0}, "bandwidth"), ({"bandwidth_gbps": -1}, "bandwidth"),
    ({"bandwidth_gbps": math.inf}, "bandwidth"), ({"latency_us": -1}, "latency"),
    ({"latency_us": math.nan}, "latency"), ({"batch_size": 0}, "batch"), ({"tflops": 0}, "TFLOP"),
    ({"servers": 0}, "servers"), ({"model_name": "resnet50"}, "vgg16, mobilenet_v1"),
])
def test_bad_input(kwargs, match):
    args = dict(model_name="lenet300", workers=4, bandwidth_gbps=25, latency_us=5)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        P.plan(**args)


def test_main_prints_and_writes_json(tmp_path, capsys):
    assert P.main(["--model", "lenet5", "--workers", "16", "--bandwidth", "100", "--latency", "2",
                   "--json", str(tmp_path / "p.json")]) == 0
    out = capsys.readouterr().out
    assert "lenet5 on 16 workers" in out and "parameter server, 16 shards" in out
    d = json.loads((tmp_path / "p.json").read_text())
    assert d["workers"] == 16 and d["cost"]["params"] == 431_080
    with pytest.raises(SystemExit) as e:
        P.main(["--model", "nope"])
    assert e.value.code == 2
    assert "unknown model 'nope'" in capsys.readouterr().err


def _comm_model():
    spec = importlib.util.spec_from_file_location("comm_model", BENCH)
    cm = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cm)
    return cm


def test_fit_recovers_link_and_predicts_the_ring(rng):
    cm = _comm_model()
    alpha, bw, gamma, n = rng.uniform(1e-6, 2e-5), rng.uniform(1e9, 2e10), rng.uniform(5e-11, 2e-10), 4
    # synthetic records: exchange and reduce of S/n follow the model exactly, the allreduce is the ring
    rec = {s: {"chunk_bytes": s // n, "exchange_s": alpha + (s // n) / bw, "reduce_s": 3e-7 + (s // n) * gamma,
               "allreduce_s": P.ring_allreduce_time(s, n, alpha, bw, gamma)} for s in cm.SIZES}
    link = cm.fit_link(rec)
    assert link["alpha_s"] == pytest.approx(alpha, rel=1e-6) and link["bandwidth_Bps"] == pytest.approx(bw, rel=1e-6)
    assert link["gamma_s_per_byte"] == pytest.approx(gamma, rel=1e-6)
    assert link["reduce_call_s"] == pytest.approx(3e-7, rel=1e-6)
    rows = cm.compare(rec, link, n)
    assert all(abs(r["alpha_beta_error"]) < 1e-6 for r in rows)
    assert rows[-1]["alpha_beta_target"] == "met" and rows[0]["alpha_beta_target"] == "-"
    # the per-size prediction adds the reductions' call cost: 2(n-1) exchanges + (n-1) reductions
    big = rows[-1]
    assert big["per_size_s"] == pytest.approx(big["measured_s"] + (n - 1) * 3e-7, rel=1e-9)
    # a measured allreduce twice the model's is a miss; an oversubscribed N is never judged
    slow = {s: dict(r, allreduce_s=2 * r["allreduce_s"]) for s, r in rec.items()}
    assert cm.compare(slow, link, n)[-1]["alpha_beta_target"] == "MISSED"
    assert {r["alpha_beta_target"] for r in cm.compare(slow, link, n, judged=False)} == {"-"}
    with pytest.raises(RuntimeError, match="do not grow"):
        cm.fit_affine({1: 2.0, 2: 1.0})


def test_ring_gamma_term():
    assert P.ring_allreduce_time(8e6, 2, 1e-6, 4e9, 1e-10) == pytest.approx(2e-6 + 2e-3 + 4e-4)


@pytest.mark.skipif(importlib.util.find_spec("mpi4py") is None, reason="mpi4py is not installed (pip install "
                    "'dnnpar[dist]'): no MPI measurement")
def test_comm_model_worker_under_mpiexec():
    cm = _comm_model()
    sizes = [4096, 65536]
    from dnnpar.parallel.comm import mpi_env, mpiexec

    cmd = mpiexec(2) + [sys.executable, str(BENCH), "--worker", "--sizes", ",".join(map(str, sizes)),
                        "--repeats", "3", "--warmup", "1", "--budget", "0.2"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=mpi_env())
    assert r.returncode == 0, r.stderr
    line = [ln for ln in r.stdout.splitlines() if ln.startswith(cm.RESULT)]
    assert len(line) == 1, r.stdout
    got = json.loads(line[0][len(cm.RESULT):])
    assert got["ranks"] == 2 and sorted(int(k) for k in got["times"]) == sizes
    for s, v in got["times"].items():
        assert v["allreduce_s"] > 0 and v["exchange_s"] > 0 and v["reduce_s"] > 0 and 1 <= v["repeats"] <= 3
        assert v["chunk_bytes"] == int(s) // 2 and v["faults_per_call"] >= 0
