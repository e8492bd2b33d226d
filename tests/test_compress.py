"""Deep Compression: pruning, relative-index CSR, weight sharing, the pipeline and .dnnz files."""
import subprocess
import sys

import numpy as np
import pytest

import dnnpar as dp
from dnnpar.compress import container, prune, quantize, relative_csr
from dnnpar.compress.encode import size_model
from dnnpar.compress.pipeline import CompressConfig, compress, load, read_codes, save
from dnnpar.data import fashion_mnist
from dnnpar.nn import models
from dnnpar.train import TrainConfig, predict, train
from oracles import assert_reordered_close, longest_sum


# ------------------------------------------------------------------ relative-index CSR
def test_relative_indices_insert_fillers_as_in_the_paper():
    a = np.zeros((3, 40), np.uint16)
    a[0, 39], a[2, 0], a[2, 3] = 3, 1, 2
    m = relative_csr.encode(a, 3)  # gaps up to 7 zeros
    # row 0: 39 zeros before the entry -> 4 fillers (each 7 zeros + itself) then rel 7; row 1 empty
    assert m.rel.tolist() == [7, 7, 7, 7, 7, 0, 2]
    assert m.codes.tolist() == [0, 0, 0, 0, 3, 1, 2]
    assert m.indptr.tolist() == [0, 5, 5, 7] and m.fillers == 4
    np.testing.assert_array_equal(relative_csr.decode(m), a)


@pytest.mark.parametrize("bits", [1, 2, 5, 8, 16])
@pytest.mark.parametrize("density", [0.0, 0.003, 0.05, 0.5, 1.0])
def test_relative_csr_round_trip(bits, density, rng):
    a = ((rng.random((13, 257)) < density) * rng.integers(1, 31, (13, 257))).astype(np.uint16)
    a[0] = 0
    m = relative_csr.encode(a, bits)
    assert m.rel.max(initial=0) <= (1 << bits) - 1
    np.testing.assert_array_equal(relative_csr.decode(m), a)
    # entries = nonzeros + fillers, and fillers are exactly the long gaps' share
    assert m.entries - m.fillers == np.count_nonzero(a)


def test_relative_csr_rejects_bad_bits():
    with pytest.raises(ValueError, match="index bits must be in 1..16, got 17"):
        relative_csr.encode(np.ones((2, 2), np.uint16), 17)


# ------------------------------------------------------------------ pruning
def test_magnitude_pruning_threshold_is_quality_times_std(rng):
    with dp.use_backend("numpy"):
        m = models.lenet300(seed=3)
        w = m["fc2"].params["weight"].copy()
        masks = prune.magnitude_masks(m, {"fc2": 1.3})
        assert set(masks) == {"fc2.weight"}
        np.testing.assert_array_equal(masks["fc2.weight"], (np.abs(w) >= 1.3 * w.std()).astype(np.float32))
        prune.apply_masks(m, masks)
        assert prune.kept_fraction(m)["fc2"] == pytest.approx(masks["fc2.weight"].mean())
        with pytest.raises(ValueError, match="quality must be > 0"):
            prune.magnitude_masks(m, 0.0)
        with pytest.raises(ValueError, match="no prunable layer 'fc9'"):
            prune.magnitude_masks(m, {"fc9": 1.0})


def test_percentile_masks_and_cubic_schedule():
    with dp.use_backend("numpy"):
        m = models.lenet300()
        masks = prune.percentile_masks(m, 0.9)
        for key, mask in masks.items():
            assert abs(1 - mask.mean() - 0.9) < 1e-3, key
    assert prune.cubic_sparsity(0, 0.9) == 0.0 and prune.cubic_sparsity(100, 0.9, steps=100) == pytest.approx(0.9)
    mid = prune.cubic_sparsity(50, 0.9, steps=100)
    assert 0.9 * (1 - 0.5 ** 3) == pytest.approx(mid)


def test_sensitivity_restores_weights():
    with dp.use_backend("numpy"):
        m = models.lenet300(seed=1)
        before = {n: p.copy() for n, p, _ in m.named_parameters()}
        calls = []
        res = prune.sensitivity(m, lambda model: calls.append(1) or prune.kept_fraction(model)["fc1"],
                                sparsities=(0.5, 0.9), layers=["fc1"])
        assert [round(a, 2) for _, a in res["fc1"]] == [0.5, 0.1]
        for n, p, _ in m.named_parameters():
            np.testing.assert_array_equal(p, before[n])
        assert "fc1" in prune.sensitivity_table(res)


# ------------------------------------------------------------------ weight sharing
@pytest.mark.parametrize("init", quantize.INITS)
def test_kmeans_and_sharing(init, rng):
    w = rng.standard_normal((40, 50)).astype(np.float32)
    w[np.abs(w) < 0.8] = 0
    s = quantize.share_layer(w, 4, init=init)
    assert s.codebook.shape == (16,) and s.codebook[0] == 0.0
    assert np.all((s.codes == 0) == (w == 0))  # pruned stays pruned, survivors get codes 1..15
    assert s.codes.max() <= 15
    err = (s.weights() - w)[w != 0]
    nz = w[w != 0]
    # Lloyd's algorithm does no worse than 15 evenly spaced levels (rms step / sqrt(12))
    assert np.sqrt((err ** 2).mean()) <= (nz.max() - nz.min()) / 15 / np.sqrt(12)


def test_centroid_gradient_is_the_sum_of_member_gradients():
    with dp.use_backend("numpy"):
        m = models.lenet300(seed=2)
        shared = quantize.share_weights(m, {"fc3": 2})
        s = shared["fc3"]
        cb0 = s.codebook.copy()
        g = np.random.default_rng(0).standard_normal(s.codes.shape).astype(np.float32)
        for n, layer in m.layers:
            for k, p in layer.params.items():
                layer.grads[k] = np.zeros_like(p)
        m["fc3"].grads["weight"] = g
        opt = quantize.CentroidSGD(m, shared, lr=0.1, momentum=0.0)
        opt.step()
        for j in range(1, 4):
            step = 0.1 * g[s.codes == j].astype(np.float64).sum()
            assert s.codebook[j] == pytest.approx(cb0[j] - step, abs=1e-6 * max(1.0, abs(step)))
        assert s.codebook[0] == 0.0
        np.testing.assert_array_equal(m["fc3"].params["weight"], s.codebook[s.codes])


def test_vgg16_size_model_matches_deep_compression_table5():
    """Table 5's densities with 8-bit conv / 5-bit fc weights and 5-bit indices: P+Q storage
    within 10% of the paper's 3.2% (31x), fillers included."""
    m = models.vgg16()
    shapes = {n: tuple(l.params["weight"].shape) for n, l in m.layers if "weight" in l.params}
    kept = [.58, .22, .34, .36, .53, .24, .42, .32, .27, .34, .35, .29, .36, .04, .04, .23]
    density = dict(zip(shapes, kept))
    wbits = {n: 8 if n.startswith("conv") else 5 for n in shapes}
    orig, pq = size_model(shapes, density, wbits, {n: 5 for n in shapes})
    assert abs(pq / orig - 0.032) / 0.032 < 0.10, f"P+Q = {100 * pq / orig:.2f}%"


# ------------------------------------------------------------------ the pipeline and .dnnz
@pytest.fixture(scope="module")
def small():
    d = fashion_mnist.load(subset="embedded")
    return fashion_mnist.Dataset(d.x_train[:1500], d.y_train[:1500], d.x_test[:300], d.y_test[:300], d.source)


@pytest.fixture(scope="module")
def compressed(small, tmp_path_factory):
    with dp.use_backend("numpy"):
        result = train(TrainConfig(model="lenet300", epochs=2, lr=0.05), data=small, progress=False, out=lambda s: None)
        m = result.model
        dense_pred = predict(m, small.x_test)
        codes, report, log = compress(m, small, CompressConfig(quality={"fc1": 1.5, "fc2": 1.3, "fc3": 0.8},
                                                               cycles=2, retrain_epochs=1, finetune_epochs=1),
                                      out=lambda s: None)
        path = tmp_path_factory.mktemp("dnnz") / "lenet300.dnnz"
        save(path, m, codes, meta={"accuracy": log})
        return m, codes, report, log, path, dense_pred


def test_pipeline_compresses_and_keeps_accuracy(compressed, small):
    m, codes, report, log, path, dense_pred = compressed
    assert report.ratio() > 20
    assert log["final"] > log["baseline"] - 0.08  # tiny data, short schedule
    table = report.table()
    for col in ("P+Q+H", "fc1", "fc2", "fc3", "total", "compression:"):
        assert col in table
    assert path.stat().st_size * 8 >= report.totals()[2] * 0.95  # the file holds what the report counts


def test_dnnz_round_trip_is_exact(compressed):
    m, codes, report, log, path, _ = compressed
    header, back, _ = read_codes(path)
    assert header["meta"]["accuracy"]["final"] == log["final"]
    for a, b in zip(codes, back):
        np.testing.assert_array_equal(a.csr.codes, b.csr.codes)  # codebook indices bit for bit
        np.testing.assert_array_equal(a.csr.rel, b.csr.rel)
        np.testing.assert_array_equal(a.codebook, b.codebook)
        np.testing.assert_array_equal(a.dense_codes(), b.dense_codes())


@pytest.mark.parametrize("backend", ["numpy", "emu"])
def test_sparse_codebook_inference_equals_the_decoded_dense_model(compressed, small, backend):
    _, _, _, log, path, _ = compressed
    with dp.use_backend(backend):
        sparse, dense = load(path), load(path, sparse=False)
        assert type(sparse["fc1"]).__name__ == "CompressedLinear"
        x = small.x_test[:40]
        # the same float32 products summed in another order (CSR rows against a dense GEMM)
        n, depth = longest_sum(dense, len(x))
        assert_reordered_close(sparse.forward(x), dense.forward(x), n, depth // 2, "SpMM")
        assert_reordered_close(sparse.forward(x[:1]), dense.forward(x[:1]), n, depth // 2, "SpMV")
    with dp.use_backend("numpy"):
        acc = float((predict(load(path), small.x_test) == small.y_test).mean())
    assert acc == pytest.approx(log["final"], abs=1e-9)


def test_dnnz_fc_layers_reach_the_kernel_as_the_files_streams(compressed, small, monkeypatch):
    """A loaded fc layer's kernel form is the reader's entry streams themselves (same buffers),
    and loading plus inference neither decode absolute columns nor re-encode: they agree with
    the dense-decoded model."""
    from dnnpar.backend import cpu_native
    from dnnpar.compress.pipeline import sparse_weight

    _, _, _, _, path, _ = compressed
    with dp.use_backend("numpy"):
        _, layers, _ = read_codes(path)
        assert sum(c.csr.fillers for c in layers) > 0, "the file should hold fillers"
        for c in layers:
            form = sparse_weight(c).compact()
            assert form.gaps is c.csr.rel and form.codes is c.csr.codes and form.rowptr is c.csr.indptr, c.name
            assert form.filler_code == (0 if c.csr.fillers else -1)
        dense = load(path, sparse=False)
        if cpu_native.library() is None:
            pytest.skip("no native kernel here: SciPy needs absolute columns")
        for mod, names in ((relative_csr, ("relative_stream", "columns")),
                           (dp.sparse, ("relative_stream", "relative_columns", "_compact"))):
            for name in names:
                monkeypatch.setattr(mod, name, lambda *a, **kw: pytest.fail("decoded or re-encoded"))
        sparse = load(path)
        x = small.x_test[:40]
        n, depth = longest_sum(dense, len(x))
        assert_reordered_close(sparse.forward(x), dense.forward(x), n, depth // 2, "SpMM")
        assert_reordered_close(sparse.forward(x[:1]), dense.forward(x[:1]), n, depth // 2, "SpMV")


def test_rows_running_past_the_last_column_are_refused():
    """The reader's check (row sums of relative indices, no column decoded) and the decoder agree."""
    indptr = np.array([0, 2, 2, 3], np.int64)
    ok = np.array([3, 5, 9], np.uint8)  # rows end at columns 9, -, 9 of 10
    relative_csr.check_spans(indptr, ok, 10)
    np.testing.assert_array_equal(relative_csr.columns(indptr, ok, 10), [3, 9, 9])
    bad = np.array([3, 5, 10], np.uint8)  # row 2 ends at column 10
    for fn in (relative_csr.check_spans, relative_csr.columns):
        with pytest.raises(ValueError, match="run past column 9"):
            fn(indptr, bad, 10)


def test_corrupt_dnnz_always_fails_cleanly(compressed, tmp_path):
    _, _, _, _, path, _ = compressed
    data = path.read_bytes()
    rng = np.random.default_rng(7)
    for i in range(150):
        b = bytearray(data)
        kind = i % 3
        if kind == 0:
            for _ in range(rng.integers(1, 4)):
                b[rng.integers(0, len(b))] ^= 1 << int(rng.integers(0, 8))
        elif kind == 1:
            b = b[:rng.integers(0, len(b))]
        else:
            pos = rng.integers(0, len(b))
            b[pos:pos] = bytes(rng.integers(0, 256, rng.integers(1, 9), dtype=np.uint8))
        bad = tmp_path / f"bad{i}.dnnz"
        bad.write_bytes(bytes(b))
        if bytes(b) == data:
            continue
        with pytest.raises(container.DnnzError):
            load(bad)


def test_bad_compression_settings(small):
    m = models.lenet300()
    for kwargs, msg in [({"fc_bits": 17}, "fc_bits must be an integer in 1..16, got 17"),
                        ({"conv_index_bits": 0}, "conv_index_bits must be an integer in 1..16"),
                        ({"quality": -1.0}, "quality must be > 0"),
                        ({"quality": {"conv9": 1.0}}, "no prunable layer 'conv9'"),
                        ({"bits": {"fc1": 3, "fc7": 2}}, "no prunable layer 'fc7'")]:
        with pytest.raises(ValueError, match=msg):
            compress(m, small, CompressConfig(**kwargs), out=lambda s: None)


def test_cli_compress_and_evaluate(tmp_path):
    with dp.use_backend("numpy"):
        m = models.lenet300()
        m.save(tmp_path / "m.npz")
    out = tmp_path / "m.dnnz"
    p = subprocess.run([sys.executable, "-m", "dnnpar.cli", "compress", "--model", "lenet300", "--checkpoint",
                        str(tmp_path / "m.npz"), "--out", str(out), "--subset", "embedded", "--cycles", "1",
                        "--retrain-epochs", "0", "--finetune-epochs", "0", "--quiet", "--plot", str(tmp_path / "h.png")],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "P+Q+H" in p.stdout and out.exists() and (tmp_path / "h.png").stat().st_size > 5000
    e = subprocess.run([sys.executable, "-m", "dnnpar.cli", "evaluate", str(out), "--subset", "embedded"],
                       capture_output=True, text=True)
    assert e.returncode == 0, e.stderr
    assert "bytes on disk" in e.stdout and "CSR x codebook" in e.stdout
    bad = subprocess.run([sys.executable, "-m", "dnnpar.cli", "compress", "--model", "lenet300", "--checkpoint",
                          str(tmp_path / "m.npz"), "--out", str(tmp_path / "x.dnnz"), "--fc-bits", "20",
                          "--subset", "embedded"], capture_output=True, text=True)
    assert bad.returncode == 2 and "argument --fc-bits: '20' must be an integer in 1..16" in bad.stderr
    assert not (tmp_path / "x.dnnz").exists()


def test_cli_sensitivity_prints_the_table_and_plots(tmp_path):
    with dp.use_backend("numpy"):
        m = models.lenet300(seed=2)
        m.save(tmp_path / "m.npz")
    png = tmp_path / "s.png"
    p = subprocess.run([sys.executable, "-m", "dnnpar.cli", "sensitivity", "--model", "lenet300", "--checkpoint",
                        str(tmp_path / "m.npz"), "--subset", "embedded", "--limit", "300", "--sparsities", "0.5",
                        "0.99", "--plot", str(png)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert any(ln.startswith("fc1") for ln in lines) and any(ln.startswith("fc3") for ln in lines)
    assert "50% pruned" in p.stdout and "99% pruned" in p.stdout
    assert png.stat().st_size > 5000
    bad = subprocess.run([sys.executable, "-m", "dnnpar.cli", "sensitivity", "--checkpoint", str(tmp_path / "m.npz"),
                          "--sparsities", "1.5", "--subset", "embedded"], capture_output=True, text=True)
    assert bad.returncode != 0 and "argument --sparsities: '1.5' must be a fraction in [0, 1)" in bad.stderr
