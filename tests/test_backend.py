import subprocess
import sys

import numpy as np
import pytest

import dnnpar as dp
from dnnpar.backend.cuda import cuda_unavailable_reason


def test_use_backend_restores_the_previous_one():
    dp.set_backend("numpy")
    with dp.use_backend("emu") as be:
        assert be.name == "emu" and dp.get_backend() is be
        with dp.use_backend("numpy"):
            assert dp.get_backend().name == "numpy"
        assert dp.get_backend().name == "emu"
    assert dp.get_backend().name == "numpy"


def test_unknown_backend():
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        dp.set_backend("tpu")


def test_default_is_cuda_only_with_a_usable_gpu():
    code = "import dnnpar as dp; print(dp.get_backend().name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ("numpy" if cuda_unavailable_reason() else "cuda")


@pytest.mark.skipif(cuda_unavailable_reason() is None, reason="a GPU is usable here")
def test_asking_for_cuda_without_a_gpu_says_why():
    with pytest.raises(dp.BackendUnavailable, match="needs a usable NVIDIA GPU: .+"):
        dp.set_backend("cuda")


def test_poisoned_outputs_are_nan_until_written():
    from dnnpar.backend import poison_outputs

    with dp.use_backend("emu") as be, poison_outputs(True):
        assert np.isnan(be.empty((3,))).all()
        assert (be.empty((2,), np.int32) == np.iinfo(np.int32).max).all()


def test_emu_cache_is_reused(tmp_path, monkeypatch):
    """A second process finds the compiled kernel in the cache instead of rebuilding it."""
    monkeypatch.setenv("DNNPAR_CACHE", str(tmp_path))
    code = ("import numpy as np, dnnpar as dp; dp.set_backend('emu'); "
            "print(dp.ops.gemm(np.ones((2, 3), np.float32), np.ones((3, 2), np.float32))[0, 0])")
    for _ in range(2):
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        assert out.strip() == "3.0"
    assert len(list((tmp_path / "emu").glob("gemm-*.so"))) == 1
