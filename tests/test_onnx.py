"""ONNX import and export (dnnpar.interop): every supported operator round-trips ONNX -> dnnpar ->
ONNX against onnx's reference evaluator, whole ResNet- and MobileNet-v2-style graphs import, train
and export, the zoo exports and re-imports equal, and malformed or unsupported models are one
OnnxError (fuzzed)."""
import copy
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dnnpar as dp
from dnnpar.errors import OnnxError
from oracles import assert_reordered_close

onnx = pytest.importorskip("onnx", reason="the onnx extra is not installed (pip install 'dnnpar[onnx]')")
from onnx import TensorProto, helper as h, numpy_helper as nh  # noqa: E402
from onnx.reference import ReferenceEvaluator  # noqa: E402

from dnnpar.interop import SUPPORTED_OPERATORS, dnnz_to_onnx, from_onnx, to_onnx  # noqa: E402

try:
    import onnxruntime
except ImportError:
    onnxruntime = None

FLOAT = TensorProto.FLOAT


def model_of(nodes, inits, in_shape, opset=17, in_name="x", out_name="y", batch="N", out_shape=None):
    """An ONNX model with one float input (batch axis symbolic) and one output, as torch exports;
    ``out_shape`` (one sample's) where shape inference cannot derive it."""
    out = None if out_shape is None else [batch, *out_shape]
    g = h.make_graph(nodes, "test", [h.make_tensor_value_info(in_name, FLOAT, [batch, *in_shape])],
                     [h.make_tensor_value_info(out_name, FLOAT, out)],
                     initializer=[nh.from_array(np.asarray(v), k) for k, v in inits.items()])
    opsets = [h.make_opsetid("", opset)]
    m = h.make_model(g, opset_imports=opsets, ir_version=h.find_min_ir_version_for(opsets))
    # the output's shape as torch writes it: inferred, batch axis symbolic
    m = onnx.shape_inference.infer_shapes(m, strict_mode=True)
    onnx.checker.check_model(m, full_check=True)
    return m


def reference(m, x):
    return ReferenceEvaluator(m).run(None, {m.graph.input[0].name: x})[0]


def round_trip(m, x, n, depth, opset=17, backend="numpy", oracle=None):
    """Import ``m``, run it on ``backend``, compare with the reference evaluator; export, check,
    run the export on the reference evaluator (and onnxruntime if present), compare again.
    ``oracle``: a float64 result to compare with instead, where the reference evaluator is wrong."""
    want = reference(m, x) if oracle is None else oracle
    with dp.use_backend(backend) as be:
        model = from_onnx(m.SerializeToString())
        got = be.to_numpy(model.forward(be.asarray(x)))
        assert_reordered_close(got, want, n, depth, "dnnpar vs the ONNX reference")
        back = to_onnx(model, opset=opset)  # checker(full_check=True) runs inside
    assert back.opset_import[0].version == opset
    again = reference(back, x) if oracle is None else from_onnx(back).forward(x)
    assert_reordered_close(again, want, n, depth, "re-exported model vs the original")
    if onnxruntime is not None:
        sess = onnxruntime.InferenceSession(back.SerializeToString(), providers=["CPUExecutionProvider"])
        assert_reordered_close(sess.run(None, {back.graph.input[0].name: x})[0], want, n, depth, "onnxruntime")
    return model, back


def f32(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(np.float32)


# ---------------------------------------------------------------------- one case per operator
# each: rng, opset -> (nodes, initializers, input shape, longest sum, chained sums)
def _conv(rng, opset, groups=1, cin=4, cout=6, **attrs):
    w = f32(rng, cout, cin // groups, 3, 3, scale=0.3)
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["y"], group=groups, **attrs)]
    return nodes, {"w": w, "b": f32(rng, cout)}, (cin, 9, 9), cin // groups * 9 + 1, 1


def _conv_fold(rng, opset):
    nodes = [h.make_node("Conv", ["x", "w"], ["c"], pads=[1, 1, 1, 1]), h.make_node("Add", ["c", "b"], ["y"])]
    return nodes, {"w": f32(rng, 5, 3, 3, 3), "b": f32(rng, 1, 5, 1, 1)}, (3, 6, 6), 28, 1


def _gemm(rng, opset, **attrs):
    tb = attrs.get("transB", 0)
    b = f32(rng, 7, 10) if tb else f32(rng, 10, 7)
    nodes = [h.make_node("Gemm", ["x", "B", "C"], ["y"], **attrs)]
    return nodes, {"B": b, "C": f32(rng, 1, 7)}, (10,), 11, 2


def _matmul_add(rng, opset):
    nodes = [h.make_node("MatMul", ["x", "B"], ["m"]), h.make_node("Add", ["bias", "m"], ["y"])]
    return nodes, {"B": f32(rng, 12, 5), "bias": f32(rng, 5)}, (12,), 13, 1


def _elementwise(op, const_first=False, cshape=(3, 1, 1)):
    def case(rng, opset):
        c = f32(rng, *cshape) + (3.0 if op == "Div" else 0.0)
        ins = ["c", "x"] if const_first else ["x", "c"]
        return [h.make_node(op, ins, ["y"])], {"c": c}, (3, 4, 5), 1, 1
    return case


def _two_tensors(op, second_shape):
    def case(rng, opset):
        nodes = [h.make_node("Conv", ["x", "w"], ["a"]),
                 h.make_node("ReduceMean", ["a"], ["g"], axes=[2, 3]) if second_shape and opset < 18 else
                 h.make_node("GlobalAveragePool", ["a"], ["g"]),
                 h.make_node(op, ["a", "g" if second_shape else "x2"], ["y"])]
        if not second_shape:
            nodes[1:] = [h.make_node("Relu", ["a"], ["x2"]), h.make_node(op, ["a", "x2"], ["y"])]
        return nodes, {"w": f32(rng, 3, 3, 1, 1)}, (3, 5, 5), 4, 2
    return case


def _unary(op, **attrs):
    def case(rng, opset):
        return [h.make_node(op, ["x"], ["y"], **attrs)], {}, (3, 4, 4), 1, 1
    return case


def _clip(lo, hi):
    def case(rng, opset):
        names = ["x", "lo" if lo is not None else "", "hi" if hi is not None else ""]
        while names[-1] == "":
            names.pop()
        inits = {k: np.float32(v) for k, v in (("lo", lo), ("hi", hi)) if v is not None}
        return [h.make_node("Clip", names, ["y"])], inits, (3, 4, 4), 1, 1
    return case


def _pool(op, **attrs):
    def case(rng, opset):
        return [h.make_node(op, ["x"], ["y"], **attrs)], {}, (2, 9, 8), 9, 1
    return case


def _reducemean(keepdims):
    def case(rng, opset):
        if opset < 18:
            nodes = [h.make_node("ReduceMean", ["x"], ["y"], axes=[-2, -1], keepdims=keepdims)]
            return nodes, {}, (3, 5, 4), 20, 1
        nodes = [h.make_node("ReduceMean", ["x", "axes"], ["y"], keepdims=keepdims)]
        return nodes, {"axes": np.array([2, 3], np.int64)}, (3, 5, 4), 20, 1
    return case


def _gap_flatten(rng, opset):
    nodes = [h.make_node("GlobalAveragePool", ["x"], ["g"]), h.make_node("Flatten", ["g"], ["y"])]
    return nodes, {}, (4, 3, 3), 9, 1


def _batchnorm(rng, opset):
    c = 4
    inits = {"s": f32(rng, c), "b": f32(rng, c), "m": f32(rng, c), "v": rng.uniform(0.5, 2, c).astype(np.float32)}
    return [h.make_node("BatchNormalization", ["x", "s", "b", "m", "v"], ["y"], epsilon=1e-3)], inits, (c, 3, 3), 1, 2


def _reshape(shape):
    def case(rng, opset):
        return [h.make_node("Reshape", ["x", "shape"], ["y"])], {"shape": np.array(shape, np.int64)}, (4, 3, 2), 1, 1
    return case


def _dropout(rng, opset):
    nodes = [h.make_node("Dropout", ["x", "r"], ["y"])]
    return nodes, {"r": np.float32(0.3)}, (6,), 1, 1


def _softmax(axis, shape):
    def case(rng, opset):
        return [h.make_node("Softmax", ["x"], ["y"], axis=axis)], {}, shape, shape[axis] if axis > 0 else shape[-1], 2
    return case


def _concat(rng, opset):
    nodes = [h.make_node("Relu", ["x"], ["r"]), h.make_node("Sigmoid", ["x"], ["s"]),
             h.make_node("Concat", ["r", "x", "s"], ["y"], axis=1)]
    return nodes, {}, (2, 3, 3), 1, 1


def _identity_constant(rng, opset):
    w = f32(rng, 4, 2, 1, 1)
    nodes = [h.make_node("Constant", [], ["w"], value=nh.from_array(w)),
             h.make_node("Identity", ["x"], ["i"]), h.make_node("Conv", ["i", "w"], ["y"])]
    return nodes, {}, (2, 3, 3), 2, 1


def _dynamic_reshape(style):
    """The shape arithmetic exporters emit for ``x.view(x.size(0), -1)`` with a dynamic batch:
    TorchScript's Shape -> Gather -> Unsqueeze -> Concat, dynamo's Shape(start, end) -> Squeeze ->
    Reshape -> Concat -> Reshape(allowzero=1), with a Cast on the way."""
    def case(rng, opset):
        i64 = lambda *v: np.array(v, np.int64)  # noqa: E731
        inits = {"zero": np.array(0, np.int64), "axes0": i64(0), "minus1": i64(-1), "rest": i64(24)}
        nodes = [h.make_node("Shape", ["x"], ["s"])]
        if style == "Cast":
            nodes.append(h.make_node("Cast", ["s"], ["s_"], to=TensorProto.INT64))
        s = "s_" if style == "Cast" else "s"
        if style in ("Squeeze", "Reshape") and opset >= 15:
            nodes[0] = h.make_node("Shape", ["x"], ["s1"], start=0, end=1)
        else:
            nodes.append(h.make_node("Gather", [s, "axes0"], ["s1"], axis=0))  # 1-D indices: a 1-D result
        if style in ("Squeeze", "Reshape"):
            nodes += [h.make_node("Squeeze", ["s1"], ["n"]), h.make_node("Reshape", ["n", "minus1"], ["n1"]),
                      h.make_node("Concat", ["n1", "rest"], ["shape"], axis=0)]
        else:
            nodes += [h.make_node("Gather", [s, "zero"], ["n"], axis=0),
                      h.make_node("Unsqueeze", ["n", "axes0"], ["n1"]),
                      h.make_node("Concat", ["n1", "minus1"], ["shape"], axis=0)]
        allow = {"allowzero": 1} if style == "Reshape" and opset >= 14 else {}
        nodes.append(h.make_node("Reshape", ["x", "shape"], ["y"], **allow))
        return nodes, inits, (4, 3, 2), 1, 1
    return case


def _zero_bias(style):
    """Dynamo's unoptimized Conv bias: zeros expanded to Shape(w)[0:1], CastLike the input."""
    def case(rng, opset):
        w = f32(rng, 6, 4, 3, 3, scale=0.3)
        nodes = [h.make_node("Constant", [], ["zero"], value=nh.from_array(np.array(0.0, np.float32)))]
        if opset >= 15:
            nodes += [h.make_node("Shape", ["w"], ["o"], start=0, end=1),
                      h.make_node("CastLike", ["zero", "x"], ["zero_"])]
        else:
            nodes += [h.make_node("Shape", ["w"], ["ws"]), h.make_node("Gather", ["ws", "i0"], ["o"], axis=0),
                      h.make_node("Cast", ["zero"], ["zero_"], to=TensorProto.FLOAT)]
        nodes += [h.make_node("Expand", ["zero_", "o"], ["b"]), h.make_node("Conv", ["x", "w", "b"], ["y"])]
        return nodes, {"w": w, "i0": np.array([0], np.int64)}, (4, 5, 5), 37, 1
    return case


OPS = {
    "Conv": _conv, "Conv-strided-padded-dilated": lambda r, o: _conv(r, o, strides=[2, 1], pads=[1, 2, 1, 2],
                                                                      dilations=[1, 2]),
    "Conv-groups2": lambda r, o: _conv(r, o, groups=2), "Conv-depthwise": lambda r, o: _conv(r, o, 4, 4, 4, pads=[1] * 4),
    "Conv+Add-bias": _conv_fold, "Gemm": _gemm, "Gemm-alpha-beta-transB": lambda r, o: _gemm(r, o, alpha=0.5, beta=2.0,
                                                                                          transB=1),
    "MatMul+Add": _matmul_add, "Add-const": _elementwise("Add"), "Sub-const": _elementwise("Sub", cshape=(5,)),
    "Sub-rsub": _elementwise("Sub", True), "Mul-const": _elementwise("Mul", True, (1, 3, 4, 1)),
    "Div-const": _elementwise("Div"), "Add-tensors": _two_tensors("Add", False),
    "Mul-tensors": _two_tensors("Mul", False), "Mul-SE-gate": _two_tensors("Mul", True),
    "Relu": _unary("Relu"), "Sigmoid": _unary("Sigmoid"), "HardSigmoid": _unary("HardSigmoid", alpha=0.3, beta=0.4),
    "HardSwish": _unary("HardSwish"), "Clip-relu6": _clip(0.0, 6.0), "Clip": _clip(-0.5, 0.7),
    "Clip-min": _clip(-0.2, None), "Clip-relu": _clip(0.0, None),
    "MaxPool": _pool("MaxPool", kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
    "MaxPool-ceil-exact": _pool("MaxPool", kernel_shape=[3, 2], strides=[2, 2], ceil_mode=1),
    "AveragePool": _pool("AveragePool", kernel_shape=[2, 2], strides=[2, 2]),
    "AveragePool-pad-excluded": _pool("AveragePool", kernel_shape=[3, 3], strides=[1, 2], pads=[1, 1, 1, 1]),
    "AveragePool-pad-included": _pool("AveragePool", kernel_shape=[3, 3], pads=[1, 1, 1, 1], count_include_pad=1),
    "GlobalAveragePool": _pool("GlobalAveragePool"), "GlobalAveragePool+Flatten": _gap_flatten,
    "ReduceMean": _reducemean(1), "ReduceMean-flat": _reducemean(0), "BatchNormalization": _batchnorm,
    "Flatten": _unary("Flatten"), "Reshape-0": _reshape([0, -1]), "Reshape--1": _reshape([-1, 24]),
    "Reshape-3d": _reshape([0, 4, 6]), "Dropout": _dropout, "Softmax": _softmax(-1, (7,)),
    "Softmax-channels": _softmax(1, (5, 2, 2)), "Concat": _concat, "Identity+Constant": _identity_constant,
}
#: cases whose output shape ONNX's shape inference cannot derive (it depends on the input's
#: shape at run time): built with the output shape torch writes, (N, ...), in their own test
SHAPE_OPS = {"Shape+Gather+Unsqueeze+Concat": _dynamic_reshape("Gather"), "Cast": _dynamic_reshape("Cast"),
             "Squeeze": _dynamic_reshape("Squeeze"), "Reshape-allowzero": _dynamic_reshape("Reshape"),
             "Expand": _zero_bias("Expand"), "CastLike": _zero_bias("CastLike")}


def test_every_supported_operator_has_a_case():
    covered = {k.split("-")[0].split("+")[0] for k in OPS} | {"Constant", "Identity", "MatMul", "Add", "Flatten"}
    covered |= {op for k in SHAPE_OPS for op in k.split("-")[0].split("+")}
    assert set(SUPPORTED_OPERATORS) <= covered, set(SUPPORTED_OPERATORS) - covered


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
@pytest.mark.parametrize("case", sorted(OPS))
def test_operator_round_trips(case, opset, rng):
    if case == "HardSwish" and opset < 14:
        pytest.skip("HardSwish is an opset-14 operator")
    nodes, inits, in_shape, n, depth = OPS[case](rng, opset)
    m = model_of(nodes, inits, in_shape, opset=opset)
    x = f32(rng, 3, *in_shape)
    oracle = None
    if case == "BatchNormalization" and opset < 14:
        # onnx's reference BatchNormalization-9 uses batch statistics whenever momentum is set (its
        # default); the operator's inference output uses the given mean and var
        c = lambda k: inits[k].astype(np.float64)[None, :, None, None]  # noqa: E731
        oracle = (x - c("m")) / np.sqrt(c("v") + 1e-3) * c("s") + c("b")
    round_trip(m, x, n, depth, opset=opset, oracle=oracle)


@pytest.mark.parametrize("opset", [13, 17, 18, 21])
@pytest.mark.parametrize("case", sorted(SHAPE_OPS))
def test_dynamic_batch_shape_arithmetic_round_trips(case, opset, rng):
    """The shape arithmetic folds at import (the batch size stays symbolic): any batch runs."""
    nodes, inits, in_shape, n, depth = SHAPE_OPS[case](rng, opset)
    m = model_of(nodes, inits, in_shape, opset=opset, out_shape=(24,) if "Reshape" in nodes[-1].op_type else None)
    model, _ = round_trip(m, f32(rng, 3, *in_shape), n, depth, opset=opset)
    assert not any(type(layer).__name__ == "ConstantOp" for _, layer in model.layers)  # folded, not computed
    assert model.forward(f32(rng, 7, *in_shape)).shape[0] == 7


def test_small_conv_round_trips_on_emu(rng):
    nodes, inits, in_shape, n, depth = _conv(rng, 17, pads=[1, 1, 1, 1], strides=[2, 2])
    round_trip(model_of(nodes, inits, in_shape), f32(rng, 2, *in_shape), n, depth, backend="emu")


def test_bias_folds_into_the_layer_and_shared_outputs_do_not(rng):
    nodes, inits, in_shape, _, _ = _conv_fold(rng, 17)
    model = from_onnx(model_of(nodes, inits, in_shape))
    assert len(model.layers) == 1 and "bias" in model.layers[0][1].params and model.layers[0][1].bias is True
    # conv output read twice: the Add must stay a layer of its own, the conv keeps no bias
    nodes += [h.make_node("Relu", ["c"], ["r"]), h.make_node("Add", ["y", "r"], ["z"])]
    m = model_of(nodes, inits, in_shape, out_name="z")
    model = from_onnx(m)
    assert "bias" not in model.layers[0][1].params
    x = f32(rng, 2, *in_shape)
    assert_reordered_close(model.forward(x), reference(m, x), 28, 2)


# ---------------------------------------------------------------------- whole models
def _conv_bn(prefix, x, cin, cout, k, stride, rng, inits, nodes, groups=1, act="Relu"):
    """torch.onnx.export's shapes for conv (no bias) -> BatchNorm (eval, unfolded) -> activation."""
    inits[f"{prefix}.conv.weight"] = f32(rng, cout, cin // groups, k, k, scale=math.sqrt(2 / (cin // groups * k * k)))
    for name, v in (("weight", rng.uniform(0.5, 1.5, cout)), ("bias", rng.standard_normal(cout) * 0.1),
                    ("running_mean", rng.standard_normal(cout) * 0.1), ("running_var", rng.uniform(0.5, 1.5, cout))):
        inits[f"{prefix}.bn.{name}"] = v.astype(np.float32)
    c, b = f"/{prefix}/conv/Conv_output_0", f"/{prefix}/bn/BatchNormalization_output_0"
    nodes.append(h.make_node("Conv", [x, f"{prefix}.conv.weight"], [c], name=f"/{prefix}/conv/Conv", group=groups,
                             kernel_shape=[k, k], strides=[stride, stride], pads=[k // 2] * 4, dilations=[1, 1]))
    nodes.append(h.make_node("BatchNormalization", [c] + [f"{prefix}.bn.{n}" for n in
                                                         ("weight", "bias", "running_mean", "running_var")],
                             [b], name=f"/{prefix}/bn/BatchNormalization", epsilon=1e-5, momentum=0.9))
    if act is None:
        return b
    a = f"/{prefix}/act/{act}_output_0"
    if act == "Relu":
        nodes.append(h.make_node("Relu", [b], [a], name=f"/{prefix}/act/Relu"))
    else:  # ReLU6 as torch exports it: Clip with constant min / max inputs
        nodes.append(h.make_node("Clip", [b, "/Constant_output_0", "/Constant_1_output_0"], [a],
                                 name=f"/{prefix}/act/Clip"))
    return a


def _head(x, c, classes, rng, inits, nodes, softmax=True):
    nodes.append(h.make_node("GlobalAveragePool", [x], ["/pool/GlobalAveragePool_output_0"], name="/pool/GAP"))
    nodes.append(h.make_node("Flatten", ["/pool/GlobalAveragePool_output_0"], ["/Flatten_output_0"], axis=1,
                             name="/Flatten"))
    inits["fc.weight"], inits["fc.bias"] = f32(rng, classes, c, scale=0.3), f32(rng, classes, scale=0.1)
    nodes.append(h.make_node("Gemm", ["/Flatten_output_0", "fc.weight", "fc.bias"],
                             ["logits" if softmax else "output"], name="/fc/Gemm", alpha=1.0, beta=1.0, transB=1))
    if softmax:
        nodes.append(h.make_node("Softmax", ["logits"], ["output"], axis=1, name="/Softmax"))


def resnet_style(rng, opset=17):
    nodes, inits = [], {}
    x = _conv_bn("stem", "input", 3, 8, 3, 1, rng, inits, nodes)
    for blk, (cin, cout, stride) in enumerate([(8, 8, 1), (8, 16, 2)]):
        a = _conv_bn(f"layer{blk}.conv1", x, cin, cout, 3, stride, rng, inits, nodes)
        b = _conv_bn(f"layer{blk}.conv2", a, cout, cout, 3, 1, rng, inits, nodes, act=None)
        skip = x if (cin, stride) == (cout, 1) else _conv_bn(f"layer{blk}.down", x, cin, cout, 1, stride, rng, inits,
                                                             nodes, act=None)
        s, r = f"/layer{blk}/Add_output_0", f"/layer{blk}/Relu_output_0"
        nodes += [h.make_node("Add", [b, skip], [s], name=f"/layer{blk}/Add"),
                  h.make_node("Relu", [s], [r], name=f"/layer{blk}/Relu")]
        x = r
    _head(x, 16, 5, rng, inits, nodes)
    return model_of(nodes, inits, (3, 12, 12), opset=opset, in_name="input", out_name="output", batch="batch_size")


def mobilenet_v2_style(rng, opset=17):
    nodes = [h.make_node("Constant", [], ["/Constant_output_0"], value=nh.from_array(np.float32(0.0)), name="/Constant"),
             h.make_node("Constant", [], ["/Constant_1_output_0"], value=nh.from_array(np.float32(6.0)),
                         name="/Constant_1")]
    inits = {}
    x = _conv_bn("features.0", "input", 3, 8, 3, 2, rng, inits, nodes, act="Clip")
    c = 8
    for i, (t, cout, stride) in enumerate([(1, 8, 1), (4, 12, 2), (4, 12, 1)], 1):
        hid = c * t
        y = x if t == 1 else _conv_bn(f"features.{i}.expand", x, c, hid, 1, 1, rng, inits, nodes, act="Clip")
        y = _conv_bn(f"features.{i}.dw", y, hid, hid, 3, stride, rng, inits, nodes, groups=hid, act="Clip")
        y = _conv_bn(f"features.{i}.project", y, hid, cout, 1, 1, rng, inits, nodes, act=None)
        if stride == 1 and c == cout:
            nodes.append(h.make_node("Add", [x, y], [f"/features.{i}/Add_output_0"], name=f"/features.{i}/Add"))
            y = f"/features.{i}/Add_output_0"
        x, c = y, cout
    _head(x, c, 4, rng, inits, nodes, softmax=False)
    return model_of(nodes, inits, (3, 16, 16), opset=opset, in_name="input", out_name="output", batch="batch_size")


@pytest.mark.parametrize("build", [resnet_style, mobilenet_v2_style])
def test_whole_model_imports_trains_and_exports(build, rng):
    m = build(rng)
    x = f32(rng, 4, *[d.dim_value for d in m.graph.input[0].type.tensor_type.shape.dim[1:]])
    model, _ = round_trip(m, x, 16 * 9 + 1, 2 * 12)
    assert any(type(layer).__name__ == "BatchNorm2d" for _, layer in model.layers)  # BN kept unfolded
    if build is mobilenet_v2_style:
        kinds = {type(layer).__name__ for _, layer in model.layers}
        assert {"ReLU6", "Add"} <= kinds
        assert any(getattr(layer, "groups", 1) > 1 and layer.groups == layer.in_channels for _, layer in model.layers)
    # training: the gradient flows through BN, residual adds and the head
    from dnnpar.nn.optim import SGD

    model.train()
    labels = rng.integers(0, model.output_shape(model.input_shape)[0], size=x.shape[0])
    before = {n: p.copy() for n, p, _ in model.named_parameters()}
    opt = SGD(model, lr=0.05, momentum=0.9)
    losses = []
    for _ in range(2):
        out = model.forward(x)
        if build is resnet_style:  # the head ends in Softmax: cross-entropy on its probabilities
            p = out[np.arange(len(labels)), labels]
            losses.append(float(-np.log(p).mean()))
            dy = np.zeros_like(out)
            dy[np.arange(len(labels)), labels] = -1.0 / (p * len(labels))
        else:
            loss_fn = dp.nn.SoftmaxCrossEntropy()
            losses.append(float(loss_fn(out, labels)))
            dy = loss_fn.backward()
        model.backward(dy.astype(np.float32))
        opt.step()
    assert all(np.isfinite(losses))
    for n, p, _ in model.named_parameters():
        assert np.all(np.isfinite(p)), n
    for n, p, g in model.named_parameters():
        assert g is not None and np.all(np.isfinite(g)), n
    # every weight moves (a BN bias feeding a conv + training-mode BN has a zero gradient: the
    # second BN subtracts the per-channel shift, so biases are not all required to move)
    stuck = [n for n, p, _ in model.named_parameters() if np.array_equal(p, before[n]) and
             type(model[n.rsplit(".", 1)[0]]).__name__ in ("Conv2d", "Linear")]
    assert not stuck, stuck
    model.eval()
    from dnnpar.nn.spec import graph_from_spec  # the imported graph has a spec: dnnpar can rebuild it

    rebuilt = graph_from_spec(model.spec())
    rebuilt.load_state_dict(model.state_dict())
    np.testing.assert_array_equal(rebuilt.eval().forward(x), model.forward(x))
    back = to_onnx(model)
    assert_reordered_close(reference(back, x), model.forward(x), 16 * 9 + 1, 2 * 12, "trained model exported")


ZOO = [("lenet300", {}), ("lenet5", {}), ("alexnet", {"num_classes": 10, "in_shape": (3, 67, 67)}),
       ("alexnet", {"num_classes": 10, "in_shape": (3, 67, 67), "groups": 2}),
       ("vgg16", {"num_classes": 10, "in_shape": (3, 32, 32)}),
       ("mobilenet_v1", {"alpha": 0.25, "resolution": 32, "num_classes": 10})]


@pytest.mark.parametrize("name,kwargs", ZOO, ids=[f"{n}{'-2tower' if k.get('groups') else ''}" for n, k in ZOO])
def test_zoo_exports_and_reimports_equal(name, kwargs, rng, tmp_path):
    from dnnpar.nn.models import build

    model = build(name, **kwargs).eval()
    for _, layer in model.layers:  # non-trivial statistics, so BN export is checked too
        if "running_var" in layer.buffers:
            layer.buffers["running_var"][...] = rng.uniform(0.5, 2, layer.buffers["running_var"].shape)
    to_onnx(model, tmp_path / "m.onnx")
    back = from_onnx(tmp_path / "m.onnx")
    assert back.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        np.testing.assert_array_equal(back.state_dict()[k], v, err_msg=k)
    x = f32(rng, 2, *model.input_shape)
    np.testing.assert_array_equal(back.forward(x), model.forward(x))
    if name in ("lenet5", "mobilenet_v1"):  # the exported graph means what dnnpar computes
        from oracles import longest_sum

        n, depth = longest_sum(model, 2)
        assert_reordered_close(reference(onnx.load(tmp_path / "m.onnx"), x), model.forward(x), n, depth)


def test_dnnz_exports_dense_with_pruned_zeros(tmp_path, rng):
    from dnnpar.compress.pipeline import CompressConfig, compress, load, save
    from dnnpar.data import fashion_mnist
    from dnnpar.nn.models import lenet300

    d = fashion_mnist.load(subset="embedded")
    data = fashion_mnist.Dataset(d.x_train[:256], d.y_train[:256], d.x_test[:64], d.y_test[:64], d.source)
    with dp.use_backend("numpy"):
        m = lenet300()
        codes, _, _ = compress(m, data, CompressConfig(quality=1.0, cycles=1, retrain_epochs=0, finetune_epochs=0),
                               out=lambda s: None)
        save(tmp_path / "m.dnnz", m, codes)
        proto = dnnz_to_onnx(tmp_path / "m.dnnz", tmp_path / "m.onnx")
        dense = load(tmp_path / "m.dnnz", sparse=False)
    w = nh.to_array(next(t for t in proto.graph.initializer if t.name == "fc1.weight"))
    assert (w == 0).mean() > 0.3  # the pruned weights are exported as zeros
    x = data.x_test[:8].astype(np.float32)
    assert_reordered_close(reference(onnx.load(tmp_path / "m.onnx"), x), dense.forward(x), 785, 4)


# ---------------------------------------------------------------------- refusals: one OnnxError each
def _simple(rng, opset=17):
    nodes = [h.make_node("Conv", ["x", "w", "b"], ["c"], pads=[1, 1, 1, 1], name="conv"),
             h.make_node("BatchNormalization", ["c", "s", "bb", "m", "v"], ["n"], name="bn"),
             h.make_node("Relu", ["n"], ["r"], name="relu"),
             h.make_node("MaxPool", ["r"], ["p"], kernel_shape=[2, 2], strides=[2, 2], name="pool"),
             h.make_node("GlobalAveragePool", ["p"], ["g"], name="gap"), h.make_node("Flatten", ["g"], ["f"], name="fl"),
             h.make_node("Gemm", ["f", "W", "B"], ["y"], transB=1, name="fc")]
    inits = {"w": f32(rng, 4, 2, 3, 3), "b": f32(rng, 4), "s": f32(rng, 4), "bb": f32(rng, 4), "m": f32(rng, 4),
             "v": np.ones(4, np.float32), "W": f32(rng, 3, 4), "B": f32(rng, 3)}
    return model_of(nodes, inits, (2, 6, 6), opset=opset)


def _with(rng, edit):
    m = _simple(rng)
    edit(m)
    return m


def _node(m, name):
    return next(n for n in m.graph.node if n.name == name)


def _set_attr(m, node, **attrs):
    n = _node(m, node)
    keep = [a for a in n.attribute if a.name not in attrs]
    del n.attribute[:]
    n.attribute.extend(keep + [h.make_attribute(k, v) for k, v in attrs.items()])


REFUSALS = {
    "unsupported operator": (lambda m: setattr(_node(m, "relu"), "op_type", "LeakyRelu"),
                             ["node 'relu' (LeakyRelu)", "operator 'LeakyRelu' is not supported", "Conv, Div, Dropout, Expand, Flatten, Gather, Gemm"]),
    "custom domain": (lambda m: setattr(_node(m, "relu"), "domain", "com.microsoft"), ["com.microsoft.Relu"]),
    "asymmetric pads": (lambda m: _set_attr(m, "conv", pads=[0, 0, 1, 1]), ["node 'conv'", "asymmetric pads"]),
    "auto_pad SAME": (lambda m: _set_attr(m, "conv", auto_pad="SAME_UPPER", pads=[0, 0, 0, 0]), ["auto_pad=SAME_UPPER"]),
    "ceil_mode": (lambda m: _set_attr(m, "pool", ceil_mode=1, kernel_shape=[3, 3]), ["ceil_mode=1"]),
    "pool dilations": (lambda m: _set_attr(m, "pool", dilations=[2, 2]), ["dilations [2, 2] on a pool"]),
    "storage_order": (lambda m: _set_attr(m, "pool", storage_order=1), ["storage_order=1"]),
    "unknown attribute": (lambda m: _set_attr(m, "relu", alpha=0.1), ["attribute 'alpha' is not supported"]),
    "wrong attribute type": (lambda m: _set_attr(m, "conv", group=1.0), ["attribute 'group' is of type float"]),
    "BN training": (lambda m: _set_attr(m, "bn", training_mode=1), ["training_mode=1"]),
    "Gemm transA": (lambda m: _set_attr(m, "fc", transA=1), ["transA=1"]),
    "flatten axis": (lambda m: _set_attr(m, "fl", axis=2), ["node 'fl'", "axis=2"]),
    "missing input": (lambda m: _node(m, "relu").input.__setitem__(0, "nowhere"), ["reads 'nowhere'"]),
    "cycle": (lambda m: _node(m, "bn").input.__setitem__(0, "r"), ["node 'bn'", "reads 'r'", "cycle"]),
    "weight from the input": (lambda m: _node(m, "conv").input.__setitem__(1, "x"), ["must be a constant"]),
    "external data": (lambda m: m.graph.initializer[0].external_data.add().CopyFrom(
        onnx.StringStringEntryProto(key="location", value="../../etc/passwd")), ["initializer 'w'", "external data"]),
    "huge shape": (lambda m: m.graph.initializer[0].dims.__setitem__(0, 2**40), ["claims shape", "over the limit"]),
    "short data": (lambda m: m.graph.initializer[0].dims.__setitem__(0, 5), ["raw_data holds"]),
    "float16": (lambda m: setattr(m.graph.initializer[0], "data_type", TensorProto.FLOAT16), ["data type float16"]),
    "old opset": (lambda m: m.opset_import[0].__setattr__("version", 12), ["opset 12", "13..21"]),
    "symbolic channels": (lambda m: m.graph.input[0].type.tensor_type.shape.dim[1].__setattr__("dim_param", "C"),
                          ["only the batch axis may be dynamic"]),
    "huge input": (lambda m: m.graph.input[0].type.tensor_type.shape.dim[2].__setattr__("dim_value", 2**40),
                   ["outside [1,"]),
    "two outputs": (lambda m: m.graph.output.append(h.make_tensor_value_info("r", FLOAT, None)), ["2 outputs"]),
    "no graph": (lambda m: m.ClearField("graph"), ["holds no graph"]),
    "empty tensor of huge shape": (lambda m: m.graph.initializer[0].dims.__setitem__(slice(None), [0, 2**40, 2**40]),
                                   ["over the limit"]),
    "NaN weight": (lambda m: m.graph.initializer[0].CopyFrom(nh.from_array(np.full((4, 2, 3, 3), np.nan, np.float32),
                                                                            "w")), ["node 'conv'", "NaN"]),
    "NaN attribute": (lambda m: _set_attr(m, "fc", alpha=float("nan")), ["attribute 'alpha' is not finite"]),
    "HardSwish in opset 13": (lambda m: (setattr(_node(m, "relu"), "op_type", "HardSwish"),
                                         m.opset_import[0].__setattr__("version", 13)), ["added in opset 14"]),
    "channel mismatch": (lambda m: m.graph.initializer[0].CopyFrom(nh.from_array(np.ones((4, 3, 3, 3), np.float32),
                                                                                  "w")), ["node 'conv'", "group=1"]),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_refusals_name_the_node_and_the_problem(case, rng):
    edit, words = REFUSALS[case]
    m = _with(rng, edit)
    with pytest.raises(OnnxError) as e:
        from_onnx(m.SerializeToString())
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.parametrize("nodes,inits,words", [
    ([h.make_node("Concat", ["x", "x"], ["y"], axis=2)], {}, "axis=2: dnnpar concatenates along channels"),
    ([h.make_node("Softmax", ["x"], ["y"], axis=0)], {}, "axis=0 on rank-4 input"),
    ([h.make_node("ReduceMean", ["x", "a"], ["y"])], {"a": np.array([1], np.int64)}, r"over axes \[1\]"),
    ([h.make_node("Reshape", ["x", "s"], ["y"])], {"s": np.array([2, -1], np.int64)}, "fixes the batch size at 2"),
    ([h.make_node("Sub", ["x", "x"], ["y"])], {}, "Sub of two computed tensors"),
    ([h.make_node("Add", ["x", "c"], ["y"])], {"c": np.ones((2, 3, 1, 1), np.float32)}, "does not broadcast to one"),
    ([h.make_node("Dropout", ["x", "r", "t"], ["y"])], {"r": np.float32(0.1), "t": np.array(True)},
     "training_mode=true"),
])
def test_semantics_that_do_not_fit_are_refused(nodes, inits, words):
    with pytest.raises(OnnxError, match=words):
        from_onnx(model_of(nodes, inits, (3, 4, 4), opset=18))


def test_compressed_layers_are_refused_with_the_way_out():
    from dnnpar.compress.pipeline import CompressedLinear
    from dnnpar.nn.base import Sequential
    from dnnpar.sparse import CSR

    csr = CSR(np.ones(1, np.float32), np.zeros(1, np.int32), np.array([0, 1, 1], np.int32), (2, 3))
    model = Sequential(("fc", CompressedLinear(csr, None, 3, 2)), input_shape=(3,))
    with pytest.raises(ValueError, match="dnnz_to_onnx"):
        to_onnx(model)


def test_bad_files(tmp_path, rng):
    good = _simple(rng).SerializeToString()
    for name, data, words in [("truncated", good[:len(good) // 2], "not an ONNX ModelProto"),
                              ("text", b"hello, this is not protobuf \xff\xfe", "not an ONNX ModelProto"),
                              ("empty", b"", "holds no graph")]:
        p = tmp_path / f"{name}.onnx"
        p.write_bytes(data)
        with pytest.raises(OnnxError, match=words) as e:
            from_onnx(p)
        assert str(p) in str(e.value)
    with pytest.raises(FileNotFoundError):
        from_onnx(tmp_path / "missing.onnx")
    with pytest.raises(TypeError, match="path, bytes or an onnx.ModelProto"):
        from_onnx(42)


def test_export_refusals(rng):
    from dnnpar.nn.layers import HardSwish, Linear
    from dnnpar.nn.base import Layer, Sequential

    model = Sequential(("fc", Linear(4, 3)), input_shape=(4,))
    for opset in (12, 22, 17.0, True):
        with pytest.raises(ValueError, match="opset must be an int in 13..21"):
            to_onnx(model, opset=opset)
    with pytest.raises(ValueError, match="needs opset >= 14"):
        to_onnx(Sequential(("hs", HardSwish()), input_shape=(4,)), opset=13)

    class Odd(Layer):
        def forward(self, x):
            return x

    with pytest.raises(ValueError, match="layer 'odd' is a Odd, which has no ONNX form"):
        to_onnx(Sequential(("odd", Odd()), input_shape=(4,)))
    with pytest.raises(ValueError, match="no input_shape"):
        to_onnx(Sequential(("fc", Linear(4, 3))))
    with pytest.raises(TypeError, match="Graph or Sequential"):
        to_onnx("model.onnx")


@pytest.mark.parametrize("batch", ["batch_size", -1, 0, 1, 7])
def test_dynamic_batch_as_dim_param_or_value(batch, rng):
    nodes, inits, in_shape, n, depth = _conv(rng, 17)
    model = from_onnx(model_of(nodes, inits, in_shape, batch=batch) if batch != -1 else _neg_batch(nodes, inits))
    assert model.forward(f32(rng, 3, *in_shape)).shape == (3, 6, 7, 7)


def _neg_batch(nodes, inits):
    m = model_of(nodes, inits, (4, 9, 9))
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1  # some exporters write -1
    return m


def test_onnxruntime_agrees(rng):
    if onnxruntime is None:
        pytest.skip("onnxruntime is not installed (not a dev dependency): the reference evaluator is the oracle")
    m = resnet_style(rng)
    x = f32(rng, 2, 3, 12, 12)
    got = from_onnx(m).forward(x)
    sess = onnxruntime.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"])
    assert_reordered_close(got, sess.run(None, {"input": x})[0], 16 * 9 + 1, 12)


def test_torch_exported_model_imports(rng, tmp_path):
    torch = pytest.importorskip("torch", reason="torch is not installed (not a dev dependency): no real "
                                                "torch.onnx.export output to import")
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU6(), nn.Conv2d(8, 8, 3, groups=8),
                        nn.Hardswish(), nn.MaxPool2d(2), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2),
                        nn.Linear(8, 4), nn.Softmax(dim=1)).eval()
    x = f32(rng, 2, 3, 12, 12)
    kw = dict(input_names=["input"], output_names=["output"], dynamic_axes={"input": {0: "N"}}, opset_version=17)
    try:
        torch.onnx.export(net, torch.from_numpy(x), str(tmp_path / "t.onnx"), dynamo=False, **kw)
    except TypeError:  # a torch without the dynamo switch
        torch.onnx.export(net, torch.from_numpy(x), str(tmp_path / "t.onnx"), **kw)
    with torch.no_grad():
        want = net(torch.from_numpy(x)).numpy()
    model = from_onnx(tmp_path / "t.onnx")
    assert_reordered_close(model.forward(x), want, 8 * 9 + 1, 6)
    assert_reordered_close(reference(to_onnx(model), x), want, 8 * 9 + 1, 6)


def test_missing_onnx_package_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match=r"pip install 'dnnpar\[onnx\]'"):
        from_onnx(b"")


# ---------------------------------------------------------------------- fuzzing
_BASE = _simple(np.random.default_rng(1234))
_BASE_BYTES = _BASE.SerializeToString()
_MOBILE = mobilenet_v2_style(np.random.default_rng(5))  # Constant, Clip, depthwise, residual Add


def _imported_is_correct(m_bytes, model):
    """An accepted model computes what ONNX's reference evaluator computes (when it runs it)."""
    shape = model.input_shape
    if math.prod(shape) > 4096:
        return
    x = np.random.default_rng(0).standard_normal((2, *shape)).astype(np.float32)
    with np.errstate(all="ignore"):  # flipped bytes make huge weights: overflow is checked below
        got = model.forward(x)
    m = onnx.load_from_string(m_bytes)
    if m.opset_import[0].version < 14 and any(n.op_type == "BatchNormalization" for n in m.graph.node):
        return  # the reference BatchNormalization-9 is not the operator (see test_operator_round_trips)
    try:
        # float32 overflow inside (huge flipped weights): what becomes inf or NaN depends on the
        # order of operations, so such a model is no test of correctness
        with np.errstate(over="raise", invalid="raise"):
            want = ReferenceEvaluator(m).run(None, {model_input_name(m_bytes): x})[0]
    except Exception:  # that, or the mutation made a model the reference evaluator itself rejects
        return
    want = np.asarray(want, np.float64)
    if not np.isfinite(want).all():
        return
    if want.shape != got.shape and want.size == got.size:
        want = want.reshape(got.shape)  # GlobalAveragePool + Flatten fused: same values
    # both bases: sums of <= 100 terms (a 32-channel 1x1 conv, a 2-channel 3x3), <= 12 chained
    assert_reordered_close(got, want, 100, 12, "fuzzed model that imported")


def model_input_name(m_bytes):
    m = onnx.load_from_string(m_bytes)
    inits = {t.name for t in m.graph.initializer}
    return next(vi.name for vi in m.graph.input if vi.name not in inits)


def _check(data):
    try:
        model = from_onnx(data)
    except OnnxError:
        return "error"
    _imported_is_correct(data, model)
    return "ok"


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.tuples(st.integers(0, len(_BASE_BYTES) - 1), st.integers(1, 255)), min_size=1, max_size=4),
       st.integers(0, len(_BASE_BYTES)))
def test_fuzz_byte_flips_and_truncation(flips, cut):
    data = bytearray(_BASE_BYTES)
    for pos, xor in flips:
        data[pos] ^= xor
    _check(bytes(data[:cut] if cut < 40 else data))


_OPS = list(SUPPORTED_OPERATORS) + ["LeakyRelu", "Loop", "If", "Shape", "Gather", ""]
_INTS = st.one_of(st.integers(-3, 8), st.sampled_from([2**31, -2**31, 2**62, 2**16 + 1]))


@st.composite
def mutations(draw, base):
    """``base`` (a valid model) with one to three of its fields mutated."""
    m = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.sampled_from(["op", "input", "attr", "attr_type", "dims", "dtype", "raw", "graph_in", "opset",
                                     "drop_node", "swap_nodes", "output", "external"]))
        g = m.graph
        if kind in ("op", "input", "attr", "attr_type", "drop_node") and not len(g.node):
            continue
        node = g.node[draw(st.integers(0, len(g.node) - 1))] if len(g.node) else None
        t = g.initializer[draw(st.integers(0, len(g.initializer) - 1))]
        names = ["x", "", "nowhere"] + [o for n in g.node for o in n.output] + [i.name for i in g.initializer]
        if kind == "op":
            node.op_type = draw(st.sampled_from(_OPS))
        elif kind == "input" and len(node.input):
            node.input[draw(st.integers(0, len(node.input) - 1))] = draw(st.sampled_from(names))
        elif kind == "attr":
            name = draw(st.sampled_from(["pads", "strides", "kernel_shape", "dilations", "group", "axis", "transB",
                                         "epsilon", "ceil_mode", "alpha"]))
            keep = [a for a in node.attribute if a.name != name]
            del node.attribute[:]
            if name in ("group", "axis", "transB", "ceil_mode"):
                val = draw(_INTS)
            elif name in ("epsilon", "alpha"):
                val = draw(st.one_of(st.floats(-1, 2), st.just(float("nan"))))
            else:
                val = draw(st.lists(_INTS, min_size=0, max_size=5))
            node.attribute.extend(keep + [h.make_attribute(name, val, attr_type=None if val != [] else
                                                           onnx.AttributeProto.INTS)])
        elif kind == "attr_type" and len(node.attribute):
            node.attribute[0].type = draw(st.integers(0, 14))
        elif kind == "dims":
            t.dims[:] = draw(st.lists(_INTS, min_size=0, max_size=5))
        elif kind == "dtype":
            t.data_type = draw(st.integers(0, 17))
        elif kind == "raw":
            t.raw_data = t.raw_data[:draw(st.integers(0, len(t.raw_data)))]
        elif kind == "graph_in":
            dims = g.input[0].type.tensor_type.shape.dim
            d = dims[draw(st.integers(0, len(dims) - 1))]
            if draw(st.booleans()):
                d.dim_value = draw(st.integers(-2, 2**40))
            else:
                d.dim_param = "S"
        elif kind == "opset":
            m.opset_import[0].version = draw(st.integers(0, 30))
        elif kind == "drop_node":
            del g.node[draw(st.integers(0, len(g.node) - 1))]
        elif kind == "swap_nodes" and len(g.node) > 1:
            i, j = draw(st.integers(0, len(g.node) - 1)), draw(st.integers(0, len(g.node) - 1))
            a, b = copy.deepcopy(g.node[i]), copy.deepcopy(g.node[j])
            g.node[i].CopyFrom(b)
            g.node[j].CopyFrom(a)
        elif kind == "output":
            g.output[0].name = draw(st.sampled_from(names))
        elif kind == "external":
            t.data_location = TensorProto.EXTERNAL
    return m.SerializeToString()


@settings(max_examples=2500, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutations(_BASE))
def test_fuzz_field_mutations(data):
    _check(data)


@settings(max_examples=1000, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutations(_MOBILE))
def test_fuzz_field_mutations_of_an_inverted_residual_net(data):
    _check(data)


def _dynamic_base(style, opset):
    nodes, inits, in_shape, _, _ = SHAPE_OPS[style](np.random.default_rng(9), opset)
    return model_of(nodes, inits, in_shape, opset=opset, out_shape=(24,) if nodes[-1].op_type == "Reshape" else None)


@settings(max_examples=1500, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.sampled_from([_dynamic_base(k, o) for k in ("Shape+Gather+Unsqueeze+Concat", "Reshape-allowzero",
                                                       "CastLike") for o in (13, 17)]).flatmap(mutations))
def test_fuzz_field_mutations_of_the_dynamic_batch_shape_arithmetic(data):
    """Shape / Gather / Unsqueeze / Squeeze / Concat / Cast / CastLike / Expand mutated: an OnnxError or a
    model that computes what the reference evaluator does."""
    _check(data)
