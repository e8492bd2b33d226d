"""Static evidence for every kernel: compile ``cuda/*.cu`` for real GPU targets and report what
ptxas says about each kernel (registers, spills, shared memory, barriers).

    python -m dnnpar.kernels            # or: dnnpar kernels
    python -m dnnpar.kernels --arch 90 --sass

No GPU is needed: nvcc compiles to cubin for sm_75 (Turing), sm_80 (Ampere) and sm_90 (Hopper)
with the NVRTC options the cuda backend uses. Any compiler or ptxas warning is an error.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from .backend.cuda import NVRTC_OPTIONS
from .backend.sources import SOURCES, cache_dir, digest, kernel_names, read_source, source_path

ARCHS = ("75", "80", "90")


class KernelBuildError(RuntimeError):
    """nvcc failed or warned on a kernel file."""


@dataclass
class KernelReport:
    source: str
    kernel: str
    arch: str
    registers: int
    spill_stores: int
    spill_loads: int
    stack: int
    smem: int
    barriers: int


def find_tool(name: str) -> str | None:
    """A CUDA tool (nvcc, cuobjdump, nvdisasm) from $NAME, PATH, $CUDA_HOME/bin,
    /usr/local/cuda/bin, or the NVIDIA pip wheels (nvidia-cuda-nvcc, nvidia-cuda-cuobjdump, ...)."""
    candidates = [os.environ.get(name.upper()), shutil.which(name)]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates.append(str(Path(root) / "bin" / name))
    try:
        import nvidia  # namespace package of the NVIDIA pip wheels
        for base in nvidia.__path__:
            candidates += [str(p) for p in sorted(Path(base).glob(f"*/bin/{name}"))]
    except ImportError:
        pass
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    return None


def find_nvcc() -> str | None:
    return find_tool("nvcc")


_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used (\d+) barriers)?(?:, (\d+) bytes smem)?")


def parse_ptxas(text: str, source: str) -> list[KernelReport]:
    """Parse ``-Xptxas -v`` output into one report per (kernel, arch)."""
    reports, cur = [], None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            cur = KernelReport(source, m.group(1), m.group(2), 0, 0, 0, 0, 0, 0)
            reports.append(cur)
        elif cur and (m := _PROPS.search(line)):
            cur.stack, cur.spill_stores, cur.spill_loads = (int(g) for g in m.groups())
        elif cur and (m := _USED.search(line)):
            cur.registers = int(m.group(1))
            cur.barriers = int(m.group(2) or 0)
            cur.smem = int(m.group(3) or 0)
    return reports


def compile_source(source: str, arch: str, nvcc: str, sass: bool = False) -> tuple[list[KernelReport], str]:
    """Compile one file for one arch; returns the ptxas reports and (with ``sass``) the SASS
    from cuobjdump."""
    code = read_source(source)
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "k.cubin"
        cmd = [nvcc, "-cubin", f"-arch=sm_{arch}", *NVRTC_OPTIONS, "-Xptxas", "-v", "-Werror", "all-warnings",
               "-o", str(cubin), str(source_path(source))]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        out = proc.stdout + proc.stderr
        warned = [ln for ln in out.splitlines() if "warning" in ln.lower()]
        if proc.returncode != 0 or warned:
            raise KernelBuildError(f"nvcc sm_{arch} {source}: {'warnings' if proc.returncode == 0 else 'failed'}\n"
                                   f"{' '.join(cmd)}\n{out[-4000:]}")
        reports = parse_ptxas(out, source)
        names = {r.kernel for r in reports}
        missing = set(kernel_names(code)) - names
        if missing:
            raise KernelBuildError(f"ptxas reported nothing for {sorted(missing)} in {source} (sm_{arch})")
        text = disassemble(cubin) if sass else ""
        return reports, text


def disassemble(cubin: Path) -> str:
    """SASS of a cubin (cuobjdump, which needs nvdisasm beside it or on PATH)."""
    dump, disasm = find_tool("cuobjdump"), find_tool("nvdisasm")
    if dump is None or disasm is None:
        raise KernelBuildError("SASS needs cuobjdump and nvdisasm: install the CUDA toolkit or "
                               "`pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm` (in the dev extra)")
    env = dict(os.environ, PATH=f"{Path(disasm).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([dump, "-sass", str(cubin)], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise KernelBuildError(f"cuobjdump failed on {cubin}:\n{proc.stderr[-2000:]}")
    return proc.stdout


_FUNC = re.compile(r"Function : (\w+)")
_OP = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*(?:\.[A-Z0-9_]+)*)")
#: instruction classes worth reading when judging a kernel
MIX = ("FFMA", "HMMA", "LDG.E.128", "LDG.E", "LDGSTS.E.BYPASS.128", "LDGSTS", "LDS.128", "LDS", "LDSM.16.MT88.4",
       "LDSM", "STS.128", "STS", "STG.E.128", "STG.E", "SHFL", "BAR")


def instruction_mix(sass: str) -> dict[str, dict[str, int]]:
    """Per kernel, how many instructions of each class in :data:`MIX` the SASS holds (a load
    counts once, in its widest matching class: LDG.E.128.CONSTANT is LDG.E.128)."""
    out: dict[str, dict[str, int]] = {}
    cur = None
    for line in sass.splitlines():
        if m := _FUNC.search(line):
            cur = out.setdefault(m.group(1), {k: 0 for k in MIX})
        elif cur is not None and (m := _OP.search(line)):
            op = m.group(1)
            for cls in MIX:
                if op == cls or op.startswith(cls + "."):
                    cur[cls] += 1
                    break
    return out


def report(archs=ARCHS, sources=SOURCES, nvcc: str | None = None, jobs: int | None = None) -> list[KernelReport]:
    """ptxas reports for every kernel of every source on every arch (cached by source hash)."""
    import json

    nvcc = nvcc or find_nvcc()
    if nvcc is None:
        raise KernelBuildError("nvcc not found: install the CUDA toolkit, or `pip install nvidia-cuda-nvcc`, "
                               "or point $NVCC at it")
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()[-1]
    cache = cache_dir("ptxas")

    def one(job):
        source, arch = job
        key = digest(read_source(source), arch, version, " ".join(NVRTC_OPTIONS))
        f = cache / f"{Path(source).stem}-sm{arch}-{key}.json"
        if f.exists():
            return [KernelReport(**r) for r in json.loads(f.read_text())]
        reps, _ = compile_source(source, arch, nvcc)
        f.write_text(json.dumps([r.__dict__ for r in reps]))
        return reps

    jobs_list = [(s, a) for s in sources for a in archs]
    with ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 2) as pool:
        return [r for reps in pool.map(one, jobs_list) for r in reps]


def format_table(reports: list[KernelReport]) -> str:
    head = f"{'source':<15} {'kernel':<20} {'arch':>5} {'regs':>5} {'spill st':>9} {'spill ld':>9} {'stack':>6} {'smem B':>7} {'bar':>4}"
    lines = [head, "-" * len(head)]
    for r in sorted(reports, key=lambda r: (SOURCES.index(r.source), r.kernel, r.arch)):
        lines.append(f"{r.source:<15} {r.kernel:<20} {'sm_' + r.arch:>5} {r.registers:>5} {r.spill_stores:>9} "
                     f"{r.spill_loads:>9} {r.stack:>6} {r.smem:>7} {r.barriers:>4}")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="dnnpar kernels", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", action="append", choices=ARCHS, help="target(s); default: all of 75, 80, 90")
    ap.add_argument("--source", action="append", choices=SOURCES, help="kernel file(s); default: all")
    ap.add_argument("--sass", action="store_true",
                    help="also print each kernel's SASS instruction mix (needs cuobjdump + nvdisasm)")
    ap.add_argument("--sass-full", action="store_true", help="with --sass: print the whole SASS too")
    args = ap.parse_args(argv)
    try:
        reps = report(tuple(args.arch or ARCHS), tuple(args.source or SOURCES))
    except KernelBuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_table(reps))
    if args.sass:
        nvcc = find_nvcc()
        print(f"\nSASS instruction mix (static counts; {', '.join(MIX)})")
        print(f"{'kernel':<20} {'arch':>5} " + " ".join(f"{c:>9}" for c in MIX))
        for s in args.source or SOURCES:
            for a in args.arch or ARCHS:
                try:
                    _, text = compile_source(s, a, nvcc, sass=True)
                except KernelBuildError as e:
                    print(f"error: {e}", file=sys.stderr)
                    return 1
                for kernel, mix in instruction_mix(text).items():
                    print(f"{kernel:<20} {'sm_' + a:>5} " + " ".join(f"{mix[c]:>9}" for c in MIX))
                if args.sass_full:
                    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
