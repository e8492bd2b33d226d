import subprocess
import sys

import pytest

from dnnpar import kernels


def run(*args):
    return subprocess.run([sys.executable, "-m", "dnnpar.cli", *args], capture_output=True, text=True)


def test_demo_trains_lenet5_on_the_embedded_sample():
    p = run("demo", "--epochs", "1")
    assert p.returncode == 0, p.stderr
    assert "431,080" in p.stdout and "conv1" in p.stdout  # the summary table
    acc = float(p.stdout.split("test accuracy ")[1].split("%")[0])
    assert 50 < acc <= 100


@pytest.mark.parametrize("backend", ["numpy", "emu"])
def test_tour_checks_and_times_both_algorithms(backend):
    p = run("tour", "--backend", backend, "--repeat", "2", "--batch", "2")
    assert p.returncode == 0, p.stderr
    assert f"on the '{backend}' backend" in p.stdout
    rows = [ln.split() for ln in p.stdout.splitlines() if ln.split()[:1] in (["direct"], ["im2col"]) and len(ln.split()) == 4]
    assert [r[0] for r in rows] == ["direct", "im2col"]
    assert all(float(r[1]) > 0 and float(r[3]) < 1e-4 for r in rows)
    assert "results agree with the float64 oracle" in p.stdout


@pytest.mark.skipif(kernels.find_nvcc() is None, reason="nvcc not found")
def test_kernels_command_prints_the_ptxas_table():
    p = run("kernels", "--arch", "90", "--source", "gemm.cu")
    assert p.returncode == 0, p.stderr
    from dnnpar.backend.sources import kernel_names, read_source

    lines = [ln for ln in p.stdout.splitlines() if "sgemm_" in ln]
    assert len(lines) == len(kernel_names(read_source("gemm.cu"))) == 4 and all("sm_90" in ln for ln in lines)


def test_cuda_without_gpu_is_a_clean_error():
    from dnnpar.backend.cuda import cuda_unavailable_reason

    if cuda_unavailable_reason() is None:
        pytest.skip("a GPU is usable here")
    p = run("tour", "--backend", "cuda")
    assert p.returncode == 2
    assert "needs a usable NVIDIA GPU" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("strategy", ["hogwild", "ps"])
def test_resume_is_refused_where_it_cannot_apply(strategy, capsys):
    from dnnpar.cli import main

    assert main(["train", "--subset", "embedded", "--epochs", "1", "--parallel", strategy, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"--resume is not supported with --parallel {strategy}" in err and "Traceback" not in err


def test_unreachable_ray_address_is_a_clean_error(capsys):
    from dnnpar.cli import main

    pytest.importorskip("ray")
    assert main(["train", "--subset", "embedded", "--epochs", "1", "--parallel", "ps",
                 "--address", "127.0.0.1:9"]) == 2
    assert "no Ray cluster answers at 127.0.0.1:9" in capsys.readouterr().err
