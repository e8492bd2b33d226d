"""The README's command blocks run as written, in the order a reader meets them, in one fresh
folder (so a block may use a checkpoint an earlier block wrote), shortened to fit a CPU machine.

What is changed, and why:
- ``--subset embedded`` is added to commands that read Fashion-MNIST (the full set is not here);
- ``--epochs`` becomes 1 (2 for a ``--resume``, which continues the first), compression cycles and
  epochs 1: the commands and their flags stay, the budget shrinks;
- ``mpiexec -n N`` runs 2 ranks (2 cores), through the mpiexec the [dist] extra installs;
- the user's own files the "Bring your own model" block names (``mine.npz``, ``photo.png``,
  ``batch.npy``) are written into the folder first, from the embedded Fashion-MNIST sample, in
  the formats that block documents: commands given ``--data`` get no ``--subset``.

What is skipped, and why (each skip is listed by ``test_every_skip_has_a_reason``):
- installs (``sudo``/``apt-get``/``pip``/``python3 -m venv``): CI runs the "Two commands" blocks as
  written; here the package is already installed;
- ``. .venv/bin/activate``: the tests already run in the environment;
- ``python -m pytest``: it is this suite;
- GPU lines (``--backend cuda``, ``--comm nccl``): no GPU on a CPU machine;
- ``--address HEAD_IP``: needs a Ray cluster (tests/test_ps.py joins one it starts).
Training lines must end well above chance (test accuracy > 50% on the embedded subset: chance is 10%).
"""
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dnnpar.data.idx import read_idx

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"

SKIPS = (
    (re.compile(r"^(sudo|apt-get|pip|python3? -m (venv|pip))\b"), "an install step (CI runs the install blocks)"),
    (re.compile(r"^(\.|source) \S*activate"), "activates the virtual environment (the tests run in one)"),
    (re.compile(r"\bpytest\b"), "the test suite itself"),
    (re.compile(r"--backend cuda|--comm nccl"), "needs a GPU"),
    (re.compile(r"--address\s+\S*HEAD"), "needs a running Ray cluster"),
)
DATA_COMMANDS = ("train", "compress", "sensitivity")
SHORTEN = {"--epochs": "1", "--cycles": "1", "--retrain-epochs": "1", "--finetune-epochs": "1"}


def command_lines(text: str) -> list[str]:
    """Every command of every ```bash block: continuation lines joined, comments dropped,
    ``a && b`` split into its commands."""
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            group = []
            for token in shlex.split(line, comments=True) + ["&&"]:
                if token == "&&":
                    if group:
                        lines.append(shlex.join(group))
                    group = []
                else:
                    group.append(token)
    return lines


def skip_reason(line: str) -> str | None:
    for pattern, reason in SKIPS:
        if pattern.search(line):
            return reason
    return None


def rewrite(line: str) -> list[str] | None:
    """The argv to run for one README command, or None when it is no dnnpar command."""
    argv = shlex.split(line)
    prefix = []
    if argv[0] == "mpiexec":
        from dnnpar.parallel.comm import mpiexec
        prefix, argv = mpiexec(2), argv[3:]
    if argv[0] != "dnnpar":
        return None
    sub = argv[1]
    out = list(argv)
    for flag, short in SHORTEN.items():
        if flag in out:
            i = out.index(flag)
            out[i + 1] = "2" if flag == "--epochs" and "--resume" in out else short
    if sub == "train" and "--epochs" not in out:
        out += ["--epochs", "2" if "--resume" in out else "1"]
    if sub == "demo" and "--epochs" not in out:
        out += ["--epochs", "1"]
    if sub == "compress":
        for flag in ("--cycles", "--retrain-epochs", "--finetune-epochs"):
            if flag not in out:
                out += [flag, "1"]
    if sub in DATA_COMMANDS and "--subset" not in out and "--data" not in out:
        out += ["--subset", "embedded"]
    if sub in ("train", "compress"):
        out += ["--quiet"]
    exe = shutil.which("dnnpar", path=os.path.dirname(sys.executable)) or shutil.which("dnnpar")
    return prefix + [exe] + out[1:]


def write_user_files(folder: Path) -> None:
    """A user's data set and images, as the README describes them: ``mine.npz`` with x (N, 1, 28,
    28) float32 and y int labels, an 8-bit grayscale ``photo.png`` and a uint8 ``batch.npy``."""
    from PIL import Image

    from dnnpar.data import fashion_mnist

    d = fashion_mnist.load(subset="embedded")
    np.savez(folder / "mine.npz", x=d.x_train, y=d.y_train, x_test=d.x_test, y_test=d.y_test)
    raw = read_idx(fashion_mnist.EMBEDDED / "t10k-images-idx3-ubyte.gz", expect_ndim=3)
    Image.fromarray(raw[0]).save(folder / "photo.png")
    np.save(folder / "batch.npy", raw[1:5, None])


def last_test_accuracy(stdout: str) -> float:
    rows = [ln.split() for ln in stdout.splitlines()
            if re.match(r"^\s*\d+\s+\d+\.\d+\s+\d+\.\d+\s+[\d.]+%\s+[\d.]+%", ln)]
    assert rows, f"no per-epoch table in:\n{stdout}"
    return float(rows[-1][4].rstrip("%"))


LINES = command_lines(README.read_text())


def test_the_readme_has_the_blocks_this_test_expects():
    runnable = [ln for ln in LINES if skip_reason(ln) is None]
    assert any("dnnpar demo" in ln for ln in runnable)
    assert any("--parallel ps" in ln and "ssp:2" in ln for ln in runnable)
    assert any(ln.startswith("mpiexec") for ln in runnable)
    assert any("dnnpar compress" in ln for ln in runnable) and any("dnnpar evaluate" in ln for ln in runnable)


def test_every_skip_has_a_reason():
    skipped = {ln: skip_reason(ln) for ln in LINES if skip_reason(ln)}
    assert all(skipped.values())
    # the installs name the extras the blocks use
    text = README.read_text()
    if "--plot" in text:
        assert any("[plot]" in ln or "[dev]" in ln for ln in skipped), "a block uses --plot: an install must bring it"


def test_every_linked_figure_and_file_exists():
    """A relative link or image in the README names a file of the repository (a moved figure
    would otherwise show as a broken image)."""
    links = re.findall(r"\]\(([^)#\s]+)\)", README.read_text())
    local = [ln for ln in links if "://" not in ln and not ln.startswith("mailto:")]
    assert any(ln.endswith(".svg") for ln in local), "the README shows the scaling figure"
    missing = [ln for ln in local if not (ROOT / ln).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_readme_commands_run_as_written(tmp_path):
    """All runnable lines in order, in one folder: exit 0, and training well above chance."""
    pytest.importorskip("matplotlib")   # the README installs the [plot] extra before its --plot lines
    env = dict(os.environ, DNNPAR_DATA=str(tmp_path / "no-data"))
    from dnnpar.parallel.comm import mpi_env
    env = mpi_env(env)
    write_user_files(tmp_path)
    ran = 0
    for line in LINES:
        if skip_reason(line):
            continue
        argv = rewrite(line)
        if argv is None:
            continue
        if argv[0].endswith("mpiexec") and shutil.which(argv[0]) is None:
            continue
        p = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
        assert p.returncode == 0, f"{line}\n-> {shlex.join(argv)}\nstdout:\n{p.stdout[-3000:]}\nstderr:\n{p.stderr[-3000:]}"
        assert "Traceback" not in p.stderr, (line, p.stderr[-3000:])
        if " train " in f" {line} " or "dnnpar demo" in line:
            acc = (float(p.stdout.split("test accuracy ")[1].split("%")[0]) if "dnnpar demo" in line
                   else last_test_accuracy(p.stdout))
            assert acc > 50, f"{line}: test accuracy {acc}%\n{p.stdout[-2000:]}"
        ran += 1
    assert ran >= 12, ran
    assert (tmp_path / "lenet5.png").stat().st_size > 0 and (tmp_path / "hist.png").stat().st_size > 0
