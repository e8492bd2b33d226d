"""Static evidence: every kernel compiles for sm_75, sm_80 and sm_90 without a warning, and
ptxas reports no register spills where the design says there must be none."""
import os

import pytest

from dnnpar import kernels
from conftest import STATIC_REPORT
from dnnpar.backend.sources import SOURCES, kernel_names, read_source

NVCC = kernels.find_nvcc()
REQUIRED = bool(os.environ.get("DNNPAR_REQUIRE_NVCC"))  # CI: a missing tool fails instead of skipping


def needs(*tools):
    missing = [t for t in tools if kernels.find_tool(t) is None]
    return pytest.mark.skipif(bool(missing) and not REQUIRED,
                              reason=f"{', '.join(missing)} not found (CUDA toolkit, or the dev extra's wheels)")


needs_nvcc = needs("nvcc")


@pytest.fixture(scope="module")
def reports():
    if NVCC is None:
        pytest.fail("nvcc not found: install the CUDA toolkit or `pip install nvidia-cuda-nvcc`")
    reps = kernels.report()
    STATIC_REPORT[:] = reps
    return reps


@needs_nvcc
def test_every_kernel_compiles_for_every_target(reports):
    got = {(r.source, r.kernel, r.arch) for r in reports}
    want = {(s, k, a) for s in SOURCES for k in kernel_names(read_source(s)) for a in kernels.ARCHS}
    assert want and got == want


@needs_nvcc
@pytest.mark.parametrize("kernel", ["sgemm_regblock", "sgemm_regblock_db", "sgemm_tiled", "sgemm_tf32", "sgemm_bf16", "csr_spmv_scalar", "csr_spmv_vector",
                                    "csr_spmv_scalar_cb", "csr_spmv_vector_cb", "csr_spmm", "csr_spmm_cb",
                                    "conv2d_igemm", "conv2d_igemm_dx", "conv2d_igemm_dw", "conv_sum_splits"])
def test_no_spills_on_sm90(reports, kernel):
    (r,) = [r for r in reports if r.kernel == kernel and r.arch == "90"]
    assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack == 0, r
    assert 0 < r.registers <= 255


@needs_nvcc
@pytest.mark.parametrize("kernel,stages", [("sgemm_regblock", 1), ("sgemm_regblock_db", 2)])
def test_regblock_keeps_its_tile_in_registers_and_shared_memory(reports, kernel, stages):
    """8x8 accumulators + 16 operands need well over 64 registers; A and B tiles of 8 x 132 floats
    per shared-memory stage (one, or two when double-buffered); no spills."""
    (r,) = [r for r in reports if r.kernel == kernel and r.arch == "90"]
    assert r.registers >= 96
    assert r.smem == stages * 2 * 8 * 132 * 4
    assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack == 0
    assert r.barriers >= 1


@needs_nvcc
@pytest.mark.parametrize("arch", ["75", "80", "90"])
@pytest.mark.parametrize("kernel", ["conv2d_igemm", "conv2d_igemm_dx", "conv2d_igemm_dw"])
def test_implicit_gemm_conv_keeps_two_stages_in_shared_memory(reports, kernel, arch):
    """cuda/conv_implicit.cu: two stages of A (8 x 68 floats, padded) and B (8 x 64 floats), 16
    accumulators per thread in registers without spills under __launch_bounds__(256), one barrier."""
    (r,) = [r for r in reports if r.kernel == kernel and r.arch == arch]
    assert r.smem == 2 * (8 * 68 + 8 * 64) * 4
    assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack == 0, r
    assert 16 < r.registers <= 255 and r.barriers == 1


@needs_nvcc
@pytest.mark.parametrize("arch", ["80", "90"])
@pytest.mark.parametrize("kernel", ["sgemm_tf32", "sgemm_bf16"])
def test_tensor_core_gemm_keeps_its_pipeline_in_shared_memory_without_spills(reports, kernel, arch):
    """sgemm_tf32 / sgemm_bf16 on tensor-core targets: 3 stages x (A + B) x 1280 floats of shared
    memory, 32 accumulators + 16 fragment registers per thread in registers, no spills, one
    barrier. sm_75 is skipped on purpose: mma.sync .tf32 / .bf16 and cp.async need sm_80, so there
    the kernels are compiled to a trap (the op refuses such devices before launching)."""
    (r,) = [r for r in reports if r.kernel == kernel and r.arch == arch]
    assert r.smem == 3 * 2 * 64 * 20 * 4
    assert r.spill_stores == 0 and r.spill_loads == 0 and r.stack == 0, r
    assert 48 <= r.registers <= 255 and r.barriers == 1


@needs_nvcc
def test_a_warning_is_an_error(tmp_path, monkeypatch):
    """The report refuses code nvcc warns about (here: an unused variable made into a warning)."""
    import dnnpar.backend.sources as sources

    bad = tmp_path / "gemm.cu"
    bad.write_text(read_source("gemm.cu") + '\nextern "C" __global__ void w(float* p) { int unused = 1; '
                   'p[0] = 1.f / 0; }\n')
    monkeypatch.setattr(sources, "source_path", lambda name: bad)
    monkeypatch.setattr(kernels, "source_path", lambda name: bad)
    sources.read_source.cache_clear()
    monkeypatch.setattr(kernels, "read_source", lambda name: bad.read_text())
    try:
        with pytest.raises(kernels.KernelBuildError, match="warnings") as info:
            kernels.compile_source("gemm.cu", "90", NVCC)
        assert "unused" in str(info.value)
    finally:
        sources.read_source.cache_clear()


def test_parse_ptxas_reads_registers_spills_and_smem():
    text = """ptxas info    : Compiling entry function 'k1' for 'sm_90'
ptxas info    : Function properties for k1
    16 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 8448 bytes smem, 400 bytes cmem[0]
ptxas info    : Compiling entry function 'k2' for 'sm_90'
ptxas info    : Function properties for k2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 12 registers, used 0 barriers, 380 bytes cmem[0]"""
    r1, r2 = kernels.parse_ptxas(text, "x.cu")
    assert (r1.kernel, r1.registers, r1.spill_stores, r1.spill_loads, r1.stack, r1.smem, r1.barriers) == \
        ("k1", 40, 8, 4, 16, 8448, 1)
    assert (r2.kernel, r2.registers, r2.smem, r2.barriers) == ("k2", 12, 0, 0)


@needs("nvcc", "cuobjdump", "nvdisasm")
def test_sass_shows_the_optimisations_the_source_claims(tmp_path):
    """The register-blocked SGEMM really issues 128-bit shared loads in its inner loop (8 k-steps
    x 4 float4 = 32 LDS.128), 128-bit global loads and stores, and 8x8x8 = 512 FMAs per tile;
    the vector SpMV really reduces with warp shuffles."""
    if kernels.find_tool("cuobjdump") is None or kernels.find_tool("nvdisasm") is None:
        pytest.fail("cuobjdump/nvdisasm missing: `pip install nvidia-cuda-cuobjdump nvidia-cuda-nvdisasm` (dev extra)")
    _, gemm_sass = kernels.compile_source("gemm.cu", "90", NVCC, sass=True)
    mix = kernels.instruction_mix(gemm_sass)
    for name in ("sgemm_regblock", "sgemm_regblock_db"):
        rb = mix[name]
        assert rb["LDS.128"] >= 32 and rb["LDS"] == 0, (name, rb)
        assert rb["LDG.E.128"] > 0 and rb["STG.E.128"] > 0 and rb["STS.128"] > 0, (name, rb)
        assert rb["FFMA"] >= 512, (name, rb)
    assert mix["sgemm_tiled"]["LDS.128"] == 0 and mix["sgemm_tiled"]["BAR"] >= 2
    _, spmv_sass = kernels.compile_source("spmv.cu", "90", NVCC, sass=True)
    smix = kernels.instruction_mix(spmv_sass)
    assert smix["csr_spmv_vector"]["SHFL"] >= 1 and smix["csr_spmv_scalar"]["SHFL"] == 0
    # tensor cores: 2 k-steps x 2 x 4 mma tiles = 16 HMMA per 16-deep tile; asynchronous zero-filling
    # 16-byte global->shared copies (and the 4-byte ones for unaligned operands); no FFMA main loop
    # (bf16: one m16n8k16 step, 8 HMMA per tile)
    for name, hmma in (("sgemm_tf32", 16), ("sgemm_bf16", 8)):
        tc = mix[name]
        assert tc["HMMA"] >= hmma and tc["LDGSTS.E.BYPASS.128"] >= 4 and tc["LDGSTS"] >= 16 and tc["FFMA"] < 64, tc
    assert "HMMA.1688.F32.TF32" in gemm_sass and "HMMA.16816.F32.BF16" in gemm_sass
    _, sm75 = kernels.compile_source("gemm.cu", "75", NVCC, sass=True)
    mix75 = kernels.instruction_mix(sm75)
    assert mix75["sgemm_tf32"]["HMMA"] == 0 and mix75["sgemm_bf16"]["HMMA"] == 0  # the trap stubs
