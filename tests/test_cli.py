import argparse
import os
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
    # the SGEMM ladder (naive, tiled, regblock, regblock_db) and the tensor-core rungs (tf32, bf16)
    assert len(lines) == len(kernel_names(read_source("gemm.cu"))) == 6 and all("sm_90" in ln for ln in lines)


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


@pytest.mark.parametrize("strategy,flag", [("none", ["--accumulate", "2"]), ("hogwild", ["--no-overlap"]),
                                           ("ps", ["--accumulate", "2"]), ("none", ["--grad-compression", "dgc:0.01"])])
def test_data_parallel_options_are_refused_elsewhere(strategy, flag, capsys, tmp_path, monkeypatch):
    from dnnpar.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["train", "--subset", "embedded", "--epochs", "1", "--parallel", strategy, *flag]) == 2
    err = capsys.readouterr().err
    assert (f"--accumulate, --no-overlap and --grad-compression are options of --parallel data, not of "
            f"--parallel {strategy}" in err and "Traceback" not in err)
    assert not (tmp_path / "r.json").exists()


def test_unreachable_ray_address_is_a_clean_error(capsys):
    from dnnpar.cli import main

    pytest.importorskip("ray")
    assert main(["train", "--subset", "embedded", "--epochs", "1", "--parallel", "ps",
                 "--address", "127.0.0.1:9"]) == 2
    assert "no Ray cluster answers at 127.0.0.1:9" in capsys.readouterr().err


# ------------------------------------------------------------------ errors: one line, before the work
def call(argv):
    import contextlib
    import io

    from dnnpar.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def one_line(err):
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_version_and_every_default_in_help():
    import dnnpar
    from dnnpar.cli import build_parser

    code, out, _ = call(["--version"])
    assert code == 0 and out.strip() == f"dnnpar {dnnpar.__version__}"
    ap = build_parser()
    subs = next(a for a in ap._actions if isinstance(a, argparse._SubParsersAction)).choices
    checked = 0
    for name, p in subs.items():
        if name == "kernels":   # its own parser (python -m dnnpar.kernels)
            continue
        formatter = p._get_formatter()
        for action in p._actions:
            if action.option_strings and action.dest not in ("help",):
                assert action.help, (name, action.dest)
                assert "%(default)" in formatter._get_help_string(action), (name, action.dest)
                checked += 1
        assert "(default:" in p.format_help()
    assert checked > 60


def test_usage_error_is_one_line_naming_the_argument():
    code, _, err = call(["train", "--lr", "nan"])
    assert code == 2 and one_line(err) == "dnnpar train: error: argument --lr: 'nan' is not a finite number"


@pytest.mark.parametrize("argv, says", [
    (["train", "--subset", "embedded", "--data-dir", "."], "--data-dir is for --subset full"),
    (["compress", "--checkpoint", "/dev/zero", "--out", "x.dnnz"], "/dev/zero: not a regular file"),
    (["compress", "--checkpoint", "{ckpt}", "--out", "/missing/dir/x.dnnz"], "folder /missing/dir does not exist"),
    (["compress", "--checkpoint", "{ckpt}", "--out", "{tmp}"], "is a folder"),
    (["compress", "--checkpoint", "{ckpt}", "--out", "{ckpt}"], "exists: --overwrite replaces it"),
    (["compress", "--checkpoint", "{ckpt}", "--out", "{tmp}/m.dnnz", "--model", "lenet300"], "holds a lenet5"),
    (["compress", "--checkpoint", "{ckpt}", "--out", "{tmp}/m.dnnz", "--quality", '{"fc1": null}'], "got null"),
    (["compress", "--checkpoint", "{ckpt}", "--out", "{tmp}/m.dnnz", "--quality", '{"fc9": 1}'],
     "lenet5 has no prunable layer 'fc9'"),
    (["sensitivity", "--checkpoint", "{ckpt}", "--layers", "relu1"], "lenet5 has no prunable layer 'relu1'"),
    (["sensitivity", "--checkpoint", "{ckpt}", "--limit", "-5"], "argument --limit"),
    (["tour", "--repeat", "0"], "argument --repeat"),
    (["train", "--subset", "embedded", "--parallel", "data", "--comm", "nccl"], "needs the cuda backend"),
    (["train", "--subset", "embedded", "--checkpoint", "{ckpt}"], "exists (another run's): --resume continues it"),
    (["train", "--subset", "embedded", "--checkpoint", "{tmp}/none.npz", "--resume"], "--resume: no checkpoint"),
    (["train", "--subset", "embedded", "--model", "lenet300", "--checkpoint", "{ckpt}", "--resume"],
     "holds a lenet5"),
    (["evaluate", "{tmp}/absent.dnnz"], "no such file"),
    (["evaluate", "{ckpt}", "--data-dir", "{tmp}/nowhere"], "no such folder"),
])
def test_bad_input_is_one_line_before_any_work(tmp_path, argv, says):
    from dnnpar.checkpoint import save_checkpoint
    from dnnpar.nn.models import build

    ckpt = tmp_path / "lenet5.npz"
    save_checkpoint(ckpt, build("lenet5"), {"model": "lenet5"})
    code, _, err = call([a.replace("{ckpt}", str(ckpt)).replace("{tmp}", str(tmp_path)) for a in argv])
    assert code == 2 and says in one_line(err), err


def test_data_dir_without_the_files_is_not_replaced(tmp_path):
    code, _, err = call(["train", "--data-dir", str(tmp_path), "--epochs", "1"])
    assert code == 2 and "are not all there" in one_line(err)


def test_plot_without_matplotlib_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import fails as if not installed
    code, out, err = call(["train", "--subset", "embedded", "--plot", str(tmp_path / "c.png")])
    assert code == 2 and "pip install 'dnnpar[plot]'" in one_line(err) and not out   # nothing trained


def test_errors_broken_pipe_interrupt_and_bugs(monkeypatch):
    import dnnpar.cli as cli
    from dnnpar.errors import ParallelError

    def raising(exc):
        def fn(args):
            raise exc
        return fn

    for exc, code, says in [(ParallelError("every worker died"), 2, "dnnpar: error: every worker died"),
                            (KeyboardInterrupt(), 130, "dnnpar: interrupted"),
                            (ImportError("no ray", name="ray"), 2, "pip install 'dnnpar[dist]'"),
                            (KeyError("oops"), 1, "dnnpar: internal error: KeyError"),
                            (BrokenPipeError(), 1, None)]:
        monkeypatch.setattr(cli, "_plan", raising(exc))
        got, _, err = call(["plan"])
        assert got == code, (exc, err)
        if says is None:
            assert err == ""
        else:
            assert says in one_line(err)


def test_plan_into_a_closed_pipe_exits_quietly():
    p = subprocess.Popen(f"{sys.executable} -m dnnpar.cli plan --workers 64 | head -1", shell=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=120)
    assert out and "Traceback" not in err and "BrokenPipe" not in err and "Exception ignored" not in err


def test_a_run_never_overwrites_another_runs_checkpoint(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = ["train", "--model", "lenet300", "--subset", "embedded", "--epochs", "1", "--quiet", "--lr", "0.05"]
    assert call(base)[0] == 0
    first = (tmp_path / "checkpoints" / "lenet300.npz").read_bytes()
    code, out, _ = call(base + ["--seed", "1"])
    assert code == 0 and "this run writes checkpoints/lenet300-2.npz" in out
    assert (tmp_path / "checkpoints" / "lenet300.npz").read_bytes() == first
    assert (tmp_path / "checkpoints" / "lenet300-2.npz").exists()
    code, out, _ = call(base + ["--seed", "1", "--overwrite"])
    assert code == 0 and (tmp_path / "checkpoints" / "lenet300.npz").read_bytes() != first


def test_compress_reads_the_model_and_evaluate_the_data_set(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert call(["train", "--model", "lenet300", "--subset", "embedded", "--epochs", "1", "--quiet",
                 "--lr", "0.05"])[0] == 0
    # the help's own example: fc2 left out takes the default; the model comes from the checkpoint
    code, out, err = call(["compress", "--checkpoint", "checkpoints/lenet300.npz", "--out", "m.dnnz", "--subset",
                           "embedded", "--quality", '{"fc1": 1.8, "fc3": 1.0}', "--cycles", "1",
                           "--retrain-epochs", "0", "--finetune-epochs", "0", "--quiet"])
    assert code == 0, err
    assert "compressing lenet300" in out
    code, out, err = call(["evaluate", "m.dnnz"])   # the embedded subset, as recorded: no full data set here
    assert code == 0 and "embedded" in out, err
    acc = float(out.split("test accuracy ")[1].split("%")[0])
    assert acc > 50


def test_data_parallel_without_mpiexec_says_single_rank(tmp_path):
    pytest.importorskip("mpi4py")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI", "PMIX", "OMPI_", "HYDRA", "MPI_"))}
    p = subprocess.run([sys.executable, "-m", "dnnpar.cli", "train", "--parallel", "data", "--subset", "embedded",
                        "--epochs", "1", "--model", "lenet300", "--lr", "0.05", "--quiet"],
                       capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "running a single rank (start with mpiexec -n N for more)" in p.stdout


def test_hogwild_progress_shows_no_loss_before_the_first(tmp_path):
    p = subprocess.run([sys.executable, "-m", "dnnpar.cli", "train", "--parallel", "hogwild", "--subset", "embedded",
                        "--epochs", "1", "--model", "lenet300", "--lr", "0.05"],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "epoch 1/1" in p.stderr and "100%" in p.stderr       # tqdm milestone lines in a log
    assert "nan" not in p.stderr.lower()
    assert len([ln for ln in p.stderr.splitlines() if "epoch 1/1" in ln]) <= 6
