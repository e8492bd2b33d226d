import os
import zlib

import numpy as np
import pytest
from hypothesis import settings


import dnnpar as dp
from dnnpar.backend import poison_outputs
from dnnpar.backend.cuda import cuda_unavailable_reason

#: DNNPAR_TEST_SEED draws fresh random inputs (rng fixture) and, through pytest's
#: --hypothesis-seed, fresh generated cases; unset (a newcomer's run) both are fixed
TEST_SEED = int(os.environ.get("DNNPAR_TEST_SEED", "0"))
settings.register_profile("dnnpar", deadline=None, database=None, derandomize=TEST_SEED == 0, print_blob=True)
settings.load_profile("dnnpar")

#: backends every kernel test runs on; cuda only where a GPU is usable
BACKENDS = ["numpy", "emu", pytest.param("cuda", marks=pytest.mark.gpu)]
KERNEL_BACKENDS = ["emu", pytest.param("cuda", marks=pytest.mark.gpu)]


def pytest_addoption(parser):
    parser.addoption("--seeded-only", action="store_true",
                     help="run only the tests whose inputs depend on DNNPAR_TEST_SEED (the rng fixture or "
                          "hypothesis): CI's second pass at a random seed")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--seeded-only"):
        keep = [i for i in items if "rng" in getattr(i, "fixturenames", ()) or
                getattr(getattr(i, "obj", None), "is_hypothesis_test", False)]
        config.hook.pytest_deselected(items=[i for i in items if i not in keep])
        items[:] = keep
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
    seed = zlib.crc32(request.node.nodeid.encode()) ^ TEST_SEED
    return np.random.default_rng(seed)


#: ptxas reports gathered by test_static.py, printed at the end of the run so CI logs show them
STATIC_REPORT = []


def pytest_terminal_summary(terminalreporter):
    if STATIC_REPORT:
        from dnnpar.kernels import format_table

        terminalreporter.section("ptxas report (nvcc, all targets)")
        terminalreporter.write_line(format_table(STATIC_REPORT))


def pytest_report_header(config):
    return f"DNNPAR_TEST_SEED={TEST_SEED} (set it to draw other random inputs)"


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


def run_json_script(tmp_path, script: str, **env) -> dict:
    """Run ``script`` in a fresh Python with the project importable, its own kernel cache (unless
    ``env`` names a DNNPAR_CACHE) and ``env`` on top (no DNNPAR_NATIVE / thread-count overrides); returns the JSON of its last
    stdout line (the no-compiler fallback tests)."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    full = {k: v for k, v in os.environ.items()
            if k not in ("DNNPAR_NATIVE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}
    full.update({"DNNPAR_CACHE": str(tmp_path / "cache"), **env})
    full["PYTHONPATH"] = os.pathsep.join([str(root), full.get("PYTHONPATH", "")])
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=full, cwd=tmp_path,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return json.loads(p.stdout.strip().splitlines()[-1])


def run_in_threads(body, n: int = 4, timeout: float = 120, what: str = "a native call") -> None:
    """body(i) on n Python threads at once; fails when one is still running after ``timeout`` s."""
    import threading

    workers = [threading.Thread(target=body, args=(i,)) for i in range(n)]
    for th in workers:
        th.start()
    for th in workers:
        th.join(timeout=timeout)
    assert not any(th.is_alive() for th in workers), f"{what} hung"


def native_backend(name: str):
    """The numpy backend (a context manager) for tests of the native library ``name``; the test is
    skipped, with the reason, where that library cannot be built."""
    from dnnpar.backend import cpu_native

    if cpu_native.library(name) is None:
        pytest.skip(f"native {name} kernel unavailable: {cpu_native.unavailable_reason(name)}")
    return dp.use_backend("numpy")
