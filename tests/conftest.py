import os
import zlib

import numpy as np
import pytest

import dnnpar as dp
from dnnpar.backend import poison_outputs
from dnnpar.backend.cuda import cuda_unavailable_reason

#: backends every kernel test runs on; cuda only where a GPU is usable
BACKENDS = ["numpy", "emu", pytest.param("cuda", marks=pytest.mark.gpu)]
KERNEL_BACKENDS = ["emu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_collection_modifyitems(config, items):
    reason = cuda_unavailable_reason()
    if reason is None:
        return
    skip = pytest.mark.skip(reason=f"no usable GPU: {reason}")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _poisoned_outputs():
    """Every op output starts as NaN, so an element a kernel never writes fails the test."""
    with poison_outputs(True):
        yield


@pytest.fixture
def rng(request):
    """Random inputs drawn per test: reproducible from the test id, and fresh for every value of
    DNNPAR_TEST_SEED (CI draws a new one each run and prints it)."""
    seed = zlib.crc32(request.node.nodeid.encode()) ^ int(os.environ.get("DNNPAR_TEST_SEED", "0"))
    return np.random.default_rng(seed)


#: ptxas reports gathered by test_static.py, printed at the end of the run so CI logs show them
STATIC_REPORT = []


def pytest_terminal_summary(terminalreporter):
    if STATIC_REPORT:
        from dnnpar.kernels import format_table

        terminalreporter.section("ptxas report (nvcc, all targets)")
        terminalreporter.write_line(format_table(STATIC_REPORT))


def pytest_report_header(config):
    return f"DNNPAR_TEST_SEED={os.environ.get('DNNPAR_TEST_SEED', '0')} (set it to draw other random inputs)"


@pytest.fixture
def backend(request):
    with dp.use_backend(request.param) as be:
        yield be


def assert_close(got, want, tol=1e-5, what=""):
    """Normwise relative error of a float32 result against a float64 oracle."""
    got = np.asarray(got)
    assert got.shape == want.shape, f"{what}: shape {got.shape} != {want.shape}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite output (an element left unwritten?)"
    scale = max(float(np.max(np.abs(want))), 1e-30) if want.size else 1.0
    err = float(np.max(np.abs(got.astype(np.float64) - want))) / scale if want.size else 0.0
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"
