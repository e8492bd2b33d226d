"""Layer precision ("fp32" | "tf32" | "bf16"): a Linear layer's three GEMMs on tensor-core
rounding, against float64 products of the unrounded operands within the TF32 / BF16 bound
(tests/oracles.py tensor_core_gemm_bound), on the numpy backend and the emu backend (which
runs gemm.cu's mma.sync kernels through its exact instruction models)."""
import numpy as np
import pytest

import dnnpar as dp
from dnnpar.nn import Sequential, graph_from_spec
from dnnpar.nn.layers import Linear, ReLU
from oracles import U_BF16, U_TF32, assert_sum_close, tensor_core_gemm_bound, worst_sum_bound

UNIT = {"tf32": U_TF32, "bf16": U_BF16}


@pytest.mark.parametrize("backend", ["numpy", "emu"], indirect=True)
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_linear_precision_within_its_bound(backend, rng, precision):
    n, k, m = 5, 37, 19   # primes: no tile multiple
    layer = Linear(k, m, seed=int(rng.integers(1 << 20)), precision=precision)
    x = rng.standard_normal((n, k)).astype(np.float32)
    dy = rng.standard_normal((n, m)).astype(np.float32)
    w = backend.to_numpy(layer.params["weight"]).astype(np.float64)
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    u = UNIT[precision]

    def bound(mag, terms):
        return tensor_core_gemm_bound(mag, terms, u)

    y = backend.to_numpy(layer.forward(backend.asarray(x)))
    # bias is zero at init: y = x W^T
    assert_sum_close(y, x64 @ w.T, np.abs(x64) @ np.abs(w.T), k, "forward", bound=bound, bound_name=precision)
    dx = backend.to_numpy(layer.backward(backend.asarray(dy)))
    assert_sum_close(dx, dy64 @ w, np.abs(dy64) @ np.abs(w), m, "dx", bound=bound, bound_name=precision)
    dw = backend.to_numpy(layer.grads["weight"])
    assert_sum_close(dw, dy64.T @ x64, np.abs(dy64.T) @ np.abs(x64), n, "dw", bound=bound, bound_name=precision)
    # the operands really were rounded: the result leaves the FP32 summation bound somewhere
    fp32_limit = worst_sum_bound(np.abs(x64) @ np.abs(w.T), k)
    assert np.any(np.abs(y - x64 @ w.T) > fp32_limit), f"{precision}: no operand rounding visible"


def test_precision_is_checked_and_kept_in_the_spec():
    with pytest.raises(ValueError, match="precision"):
        Linear(3, 3, precision="fp8")
    m = Sequential(("fc", Linear(4, 3, precision="bf16")), ("relu", ReLU()), input_shape=(4,))
    spec = m.spec()
    assert graph_from_spec(spec)["fc"].precision == "bf16"
    del spec["nodes"][0]["config"]["precision"]   # a file written before the field existed
    assert graph_from_spec(spec)["fc"].precision == "fp32"


def test_float64_mode_refuses_tensor_core_precision(rng):
    layer = Linear(3, 2, precision="tf32")
    with dp.precision("float64"):
        with pytest.raises(TypeError, match="float32"):
            layer.forward(rng.standard_normal((2, 3)))
