"""PyTorch and ONNX Runtime as real peers: networks written in torch.nn (residual adds, inverted
residuals with ReLU6 and depthwise convs, BatchNorm kept unfolded, AvgPool with padding, Concat,
Flatten / Reshape, a softmax head), exported by ``torch.onnx.export`` with a dynamic batch axis,
imported with ``from_onnx``, run in eval mode against PyTorch, re-exported with ``to_onnx`` and run
again on onnx's reference evaluator and onnxruntime; a LeNet-5 trained in PyTorch through
safetensors both ways; torch tensors handed straight to dnnpar ops and models (DLPack).

Marked ``peer``: skipped when torch is not importable. CI's third pass installs torch (CPU) and
onnxruntime and runs ``pytest -m peer``.
"""
import copy
import importlib.util
import io
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import dnnpar as dp
from dnnpar.nn import models

pytestmark = pytest.mark.peer
torch = pytest.importorskip("torch", reason="the peer tests need PyTorch: pip install 'dnnpar[peers]'")
onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install 'dnnpar[onnx]')")
from onnx.reference import ReferenceEvaluator  # noqa: E402

from dnnpar.interop import from_onnx, load_safetensors, save_safetensors, to_onnx, torch_definition  # noqa: E402

try:
    import onnxruntime
except ImportError:
    onnxruntime = None

_spec = importlib.util.spec_from_file_location("bench_models", Path(__file__).resolve().parents[1] / "benchmarks"
                                               / "models.py")
bench_models = sys.modules["bench_models"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(bench_models)  # the benchmark's torch definitions: tested here, timed there
NETS = bench_models.torch_nets(torch)

#: the issue's bound: dnnpar within this normwise relative error of PyTorch
REL = 1e-4
SMALL = {"resnet": dict(width=4, in_shape=(3, 12, 12)), "mobilenet_v2": dict(width=4, in_shape=(3, 16, 16))}

try:
    import onnxscript  # noqa: F401
    HAVE_ONNXSCRIPT = True
except ImportError:
    HAVE_ONNXSCRIPT = False

# How each model leaves PyTorch. TorchScript's exporter folds an eval-mode BatchNorm into the conv
# before it unless training=PRESERVE; the dynamo exporter (torch's default, needs onnxscript) folds
# them in its optimizer unless optimize=False, which also leaves the raw Shape / Squeeze / Concat
# arithmetic of the dynamic batch in the graph.
EXPORTS = [("torchscript", 13, {}), ("torchscript", 17, {}), ("torchscript-bn-unfolded", 13, {}),
           ("torchscript-bn-unfolded", 17, {}), ("dynamo", 18, {}), ("dynamo-unoptimized", 18, {})]


def make_net(name, softmax=True, seed=0):
    torch.manual_seed(seed)
    m = NETS[name](**SMALL[name], softmax=softmax)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # BatchNorm statistics other than 0 / 1, so that unfolded BN is really tested
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                c = mod.num_features
                mod.running_mean.copy_(torch.rand(c, generator=gen) - 0.5)
                mod.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                mod.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                mod.bias.copy_(torch.rand(c, generator=gen) - 0.5)
    return m.eval()


def export(m, name, how, opset, batch=2):
    """ONNX bytes of net ``name`` exported by torch.onnx.export at ``batch``, the batch axis dynamic."""
    x = torch.randn(batch, *SMALL[name]["in_shape"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if how.startswith("dynamo"):
            if not HAVE_ONNXSCRIPT:
                pytest.skip("the dynamo exporter needs onnxscript (pip install onnxscript)")
            prog = torch.onnx.export(m, (x,), None, input_names=["x"], output_names=["y"], opset_version=opset,
                                     dynamo=True, optimize=how == "dynamo", verbose=False,
                                     dynamic_shapes=({0: torch.export.Dim("N", min=1, max=1024)},))
            return prog.model_proto.SerializeToString()
        f = io.BytesIO()
        extra = {"training": torch.onnx.TrainingMode.PRESERVE} if how.endswith("bn-unfolded") else {}
        torch.onnx.export(m, (x,), f, input_names=["x"], output_names=["y"], opset_version=opset, dynamo=False,
                          dynamic_axes={"x": {0: "N"}, "y": {0: "N"}}, **extra)
        return f.getvalue()


def rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / np.abs(want).max())


def torch_out(m, x, double=False):
    with torch.no_grad():
        if double:
            return copy.deepcopy(m).double()(torch.from_numpy(x.astype(np.float64))).numpy()
        return m(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("how,opset,_", EXPORTS, ids=[f"{h}-{o}" for h, o, _ in EXPORTS])
@pytest.mark.parametrize("name", sorted(NETS))
def test_torch_export_imports_runs_and_reexports_within_1e4(name, how, opset, _, rng):
    m = make_net(name)
    data = export(m, name, how, opset)
    ops = {n.op_type for n in onnx.load_from_string(data).graph.node}
    if how.endswith(("bn-unfolded", "unoptimized")):
        assert "BatchNormalization" in ops and {"Conv", "Add", "AveragePool", "Softmax"} <= ops, ops
    if name == "mobilenet_v2":
        assert "Concat" in ops and "Clip" in ops, ops
    model = from_onnx(data)
    assert not model.training
    kinds = {type(layer).__name__ for _, layer in model.layers}
    assert {"Add", "Softmax"} <= kinds and ("BatchNorm2d" in kinds) == ("BatchNormalization" in ops)
    in_shape = SMALL[name]["in_shape"]
    back = to_onnx(model, opset=max(opset, 13))
    sess = (onnxruntime.InferenceSession(back.SerializeToString(), providers=["CPUExecutionProvider"])
            if onnxruntime is not None else None)
    for batch in (1, 3, 8):  # the export traced batch 2: the batch axis must really be dynamic
        x = rng.standard_normal((batch, *in_shape)).astype(np.float32)
        want, want64 = torch_out(m, x), torch_out(m, x, double=True)
        got = model.forward(x)
        assert rel_err(got, want) <= REL, f"dnnpar vs torch at batch {batch}: {rel_err(got, want):.2e}"
        assert rel_err(got, want64) <= REL, f"dnnpar vs torch float64 at batch {batch}"
        if opset >= 14:  # onnx's reference BatchNormalization-9 uses batch statistics when momentum is set
            again = ReferenceEvaluator(back).run(None, {back.graph.input[0].name: x})[0]
            assert rel_err(again, want) <= REL, f"re-export on onnx.reference at batch {batch}"
        if sess is not None:
            again = sess.run(None, {back.graph.input[0].name: x})[0]
            assert rel_err(again, want) <= REL, f"re-export on onnxruntime at batch {batch}"


@pytest.mark.skipif(onnxruntime is None, reason="onnxruntime is not installed (pip install 'dnnpar[peers]')")
@pytest.mark.parametrize("name", sorted(NETS))
def test_onnxruntime_on_torch_export_agrees(name, rng):
    """The original export on onnxruntime beside dnnpar: the three runtimes on one file."""
    m = make_net(name)
    data = export(m, name, "torchscript-bn-unfolded", 17)
    sess = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    x = rng.standard_normal((5, *SMALL[name]["in_shape"])).astype(np.float32)
    want = torch_out(m, x, double=True)
    assert rel_err(sess.run(None, {"x": x})[0], want) <= REL
    assert rel_err(from_onnx(data).forward(x), want) <= REL


@pytest.mark.parametrize("name", sorted(NETS))
def test_imported_torch_model_trains_like_torch(name, rng):
    """The softmax-free net imported, then one SGD step in training mode (batch statistics in
    BatchNorm) on both sides: the losses and the updated eval-mode outputs agree."""
    from dnnpar.nn import SoftmaxCrossEntropy
    from dnnpar.nn.optim import SGD

    m = make_net(name, softmax=False)
    model = from_onnx(export(m, name, "torchscript-bn-unfolded", 17)).train()
    x = rng.standard_normal((6, *SMALL[name]["in_shape"])).astype(np.float32)
    y = rng.integers(0, 10, 6)
    loss_fn = SoftmaxCrossEntropy()
    loss = float(loss_fn(model.forward(x), y))
    model.backward(loss_fn.backward())
    SGD(model, 0.05, momentum=0.9).step()
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    t_loss = torch.nn.functional.cross_entropy(m(torch.from_numpy(x)), torch.from_numpy(y))
    t_loss.backward()
    opt.step()
    assert abs(loss - t_loss.item()) <= REL * abs(t_loss.item())
    m.eval()
    model.eval()
    # BN's running statistics moved on both sides (momentum conventions agree) and so did the weights
    assert rel_err(model.forward(x), torch_out(m, x)) <= 1e-3


# ---------------------------------------------------------------------- safetensors, LeNet-5
def _torch_lenet5():
    ns = {}
    exec(torch_definition(models.lenet5()), ns)  # the nn.Sequential the module docstring prints
    return ns["model"]


def test_lenet5_trained_in_torch_loads_into_dnnpar_and_back(tmp_path, rng):
    st_torch = pytest.importorskip("safetensors.torch")
    torch.manual_seed(1)
    tm = _torch_lenet5()
    opt = torch.optim.SGD(tm.parameters(), lr=0.05, momentum=0.9)
    for _ in range(5):  # a few real training steps: the weights are not the initialisation
        xb = torch.from_numpy(rng.standard_normal((16, 1, 28, 28)).astype(np.float32))
        yb = torch.from_numpy(rng.integers(0, 10, 16))
        opt.zero_grad()
        torch.nn.functional.cross_entropy(tm(xb), yb).backward()
        opt.step()
    tm.eval()
    path = tmp_path / "lenet5.safetensors"
    st_torch.save_file(tm.state_dict(), str(path))
    m = models.lenet5(seed=7).eval()
    load_safetensors(m, path)
    x = rng.standard_normal((4, 1, 28, 28)).astype(np.float32)
    want = torch_out(tm, x, double=True)
    assert rel_err(m.forward(x), want) <= REL
    # dnnpar -> safetensors (torch names) -> torch load_state_dict(strict=True)
    m2 = models.lenet5(seed=11).eval()
    out = tmp_path / "from_dnnpar.safetensors"
    save_safetensors(m2, out, names="torch")
    tm2 = _torch_lenet5().eval()
    tm2.load_state_dict(st_torch.load_file(str(out)), strict=True)
    assert rel_err(torch_out(tm2, x), m2.forward(x)) <= REL


# ---------------------------------------------------------------------- DLPack
def test_torch_tensors_go_straight_into_ops_without_a_copy(rng):
    from dnnpar.ops._common import check_array

    x = torch.from_numpy(rng.standard_normal((2, 3, 7, 6)).astype(np.float32))
    w = torch.from_numpy(rng.standard_normal((4, 3, 3, 3)).astype(np.float32))
    b = torch.from_numpy(rng.standard_normal(4).astype(np.float32))
    got = check_array("op", "x", x)
    assert got.__array_interface__["data"][0] == x.data_ptr()  # a view of the tensor's memory
    np.testing.assert_array_equal(dp.ops.conv2d(x, w, b, padding=1), dp.ops.conv2d(x.numpy(), w.numpy(), b.numpy(),
                                                                                    padding=1))
    want = torch.nn.functional.conv2d(x.double(), w.double(), b.double(), padding=1).numpy()
    assert rel_err(dp.ops.conv2d(x, w, b, padding=1), want) <= REL
    dw = torch.from_numpy(rng.standard_normal((3, 1, 3, 3)).astype(np.float32))
    want = torch.nn.functional.conv2d(x.double(), dw.double(), stride=2, groups=3).numpy()
    assert rel_err(dp.ops.depthwise_conv2d(x, dw, stride=2), want) <= REL
    a, bm = (torch.from_numpy(rng.standard_normal(s).astype(np.float32)) for s in ((5, 6), (6, 4)))
    c = torch.from_numpy(rng.standard_normal((5, 4)).astype(np.float32))
    want = (a.double() @ bm.double() + c.double()).numpy()
    out = dp.ops.gemm(a, bm, c=c, beta=1.0)  # c is updated in place: the tensor's own memory
    assert out.__array_interface__["data"][0] == c.data_ptr()
    assert rel_err(c.numpy(), want) <= REL
    csr = dp.sparse.CSR.from_dense(np.where(rng.random((5, 6)) < 0.5, 1.0, 0.0).astype(np.float32))
    v = torch.from_numpy(rng.standard_normal(6).astype(np.float32))
    np.testing.assert_array_equal(dp.ops.spmv(csr, v), dp.ops.spmv(csr, v.numpy()))


def test_torch_tensors_into_model_forward(rng):
    m = models.lenet300().eval()
    t = torch.from_numpy(rng.standard_normal((2, 1, 28, 28)).astype(np.float32))
    assert m.check_input(t).__array_interface__["data"][0] == t.data_ptr()
    np.testing.assert_array_equal(m.forward(t), m.forward(t.numpy()))


def test_torch_tensors_dnnpar_cannot_view_are_one_clear_error(rng):
    x = torch.from_numpy(rng.standard_normal((3, 4)).astype(np.float32))
    with pytest.raises(ValueError, match="must be C-contiguous"):
        dp.ops.gemm(x.t(), x)  # a transposed view: DLPack hands over its strides
    with pytest.raises(TypeError, match="must be float32, got float64"):
        dp.ops.gemm(x.double(), x.t().contiguous())
    with pytest.raises(TypeError, match="cannot be viewed as a numpy array through DLPack"):
        dp.ops.gemm(x.clone().requires_grad_(), x.t().contiguous())  # torch refuses to export it
    with pytest.raises(TypeError, match="input batch must be float32|must be float32"):
        models.lenet300().forward(torch.zeros((1, 1, 28, 28), dtype=torch.float16))


@pytest.mark.parametrize("name", sorted(NETS))
def test_the_benchmark_dnnpar_twin_is_the_torch_architecture(name):
    """benchmarks/models.py builds each net as a dnnpar Graph when torch is absent: the same
    parameters and buffers, shape for shape, and the same layer kinds as the torch export imports to."""
    twin = bench_models.dnnpar_nets()[name](**SMALL[name])
    imported = from_onnx(export(make_net(name), name, "torchscript-bn-unfolded", 17))
    shapes = lambda g: sorted(tuple(v.shape) for v in g.state_dict().values())  # noqa: E731
    assert shapes(twin) == shapes(imported)
    kinds = lambda g: sorted(type(layer).__name__ for _, layer in g.layers)  # noqa: E731
    assert kinds(twin) == kinds(imported)
    to_onnx(twin)  # and it exports, for onnxruntime
