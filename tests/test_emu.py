"""What the emu backend proves beyond "the results match": races, out-of-bounds accesses,
barrier deadlocks and launch-argument mistakes are caught as Python errors, deterministically."""
import re

import numpy as np
import pytest

import dnnpar as dp
from dnnpar.backend.emu import EmuMemoryError, EmuModule, EmuSchedulingError
from dnnpar.backend.sources import read_source
import oracles
from oracles import assert_sum_close

SCHEDULES = [("forward", 0), ("reverse", 0), ("random", 1), ("random", 2), ("random", 3)]


@pytest.fixture
def emu():
    with dp.use_backend("emu") as be:
        yield be


def remove_nth(code: str, needle: str, n: int, inside: str) -> str:
    """Delete the n-th occurrence of `needle` inside the definition of kernel `inside`."""
    start = code.index(f"{inside}(")
    hits = [m.start() for m in re.finditer(re.escape(needle), code) if m.start() > start]
    assert len(hits) > n, f"{needle!r} #{n} not found in {inside}"
    i = hits[n]
    return code[:i] + "/* removed */" + code[i + len(needle):]


def run_schedules(be, fn):
    out = []
    for order, seed in SCHEDULES:
        with be.schedule(order, seed):
            out.append(np.array(fn()))
    return out


def gemm_case(rng):
    a = rng.standard_normal((70, 90)).astype(np.float32)
    b = rng.standard_normal((90, 50)).astype(np.float32)
    return a, b, a.astype(np.float64) @ b


@pytest.mark.parametrize("kernel,which", [("sgemm_tiled", 0), ("sgemm_tiled", 1), ("sgemm_regblock", 0),
                                          ("sgemm_regblock", 1), ("sgemm_regblock_db", 0), ("sgemm_regblock_db", 1)])
def test_missing_syncthreads_is_caught(emu, rng, kernel, which):
    a, b, want = gemm_case(rng)
    algo = kernel[len("sgemm_"):]
    scale = np.abs(want).max()

    good = run_schedules(emu, lambda: dp.ops.gemm(a, b, algo=algo))
    for r in good:  # a correct kernel gives the same bits whatever the order of its threads
        np.testing.assert_array_equal(r, good[0])
    assert_sum_close(good[0], want, np.abs(a.astype(np.float64)) @ np.abs(b), a.shape[1], kernel)

    broken = remove_nth(read_source("gemm.cu"), "__syncthreads();", which, kernel)
    with emu.source_override("gemm.cu", broken):
        bad = run_schedules(emu, lambda: dp.ops.gemm(a, b, algo=algo))
        again = run_schedules(emu, lambda: dp.ops.gemm(a, b, algo=algo))
    errors = [np.nan_to_num(np.abs(r - want), nan=np.inf).max() / scale for r in bad]
    assert max(errors) > 1e-2, f"removing barrier {which} of {kernel} went unnoticed: errors {errors}"
    for r1, r2 in zip(bad, again):  # the detection itself is deterministic
        np.testing.assert_array_equal(r1, r2)


def test_missing_barrier_after_codebook_staging_is_caught(emu, rng):
    dense = (rng.random((300, 200)) < 0.1) * rng.integers(1, 16, (300, 200))
    cb = rng.standard_normal(16).astype(np.float32)
    csr = dp.sparse.CSR.from_dense(dense.astype(np.uint8), codebook=cb)
    x = rng.standard_normal(200).astype(np.float32)
    want = np.where(dense > 0, cb[dense], 0.0) @ x.astype(np.float64)
    broken = remove_nth(read_source("spmv.cu"), "__syncthreads();", 0, "stage_codebook")
    with emu.source_override("spmv.cu", broken):
        bad = run_schedules(emu, lambda: dp.ops.spmv(csr, x, algo="scalar"))
    errors = [np.nan_to_num(np.abs(r - want), nan=np.inf).max() / np.abs(want).max() for r in bad]
    assert max(errors) > 1e-2


def test_out_of_bounds_write_is_a_python_error(emu, rng):
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    code = read_source("im2col.cu")
    store = "float* out = cols + (long long)c * taps * ncols + col;"
    assert store in code
    broken = code.replace(store, store[:-1] + " + 1;", 1)  # every store one element too far
    with emu.source_override("im2col.cu", broken):
        with pytest.raises(EmuMemoryError, match=r"0 bytes past the end of argument 1 \(cols"):
            dp.ops.im2col(x, 3, 3)
    # the interpreter is intact and the real kernel still runs
    assert dp.ops.im2col(x, 3, 3).shape == (27, 18)


def test_out_of_bounds_read_names_the_argument(emu, rng):
    # drop the row bound when staging A: the last block tile reads rows past the end of A
    code = read_source("gemm.cu")
    guard = "if (gr < extent && vec && gk + 3 < K)"
    assert guard in code
    broken = code.replace(guard, "if (vec && gk + 3 < K)", 1)
    a = rng.standard_normal((130, 64)).astype(np.float32)
    b = rng.standard_normal((64, 16)).astype(np.float32)
    with emu.source_override("gemm.cu", broken):
        with pytest.raises(EmuMemoryError, match=r"past the end of argument 4 \(A: float32 array of 8320"):
            dp.ops.gemm(a, b, algo="regblock")


TOY = r'''
extern "C" __global__ void warp_sum(const float* x, float* out, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    float v = i < n ? x[i] : 0.f;
    for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
    float w = i < n ? x[i] : 0.f;
    for (int m = 1; m < 32; m <<= 1) w = fmaxf(w, __shfl_xor_sync(0xffffffffu, w, m));
    if ((threadIdx.x & 31) == 0) { out[2 * (i / 32)] = v; out[2 * (i / 32) + 1] = w; }
}
extern "C" __global__ void divergent_barrier(float* out) {
    if (threadIdx.x < 16) __syncthreads();
    else out[threadIdx.x] = __shfl_down_sync(0xffffffffu, 1.f, 1);
}
'''


@pytest.fixture(scope="module")
def toy():
    with dp.use_backend("emu") as be:
        return EmuModule(TOY, "toy.cu", be.cxx)


def test_warp_shuffles_follow_cuda_semantics(toy, rng):
    n = 200
    x = rng.standard_normal(n).astype(np.float32)
    out = np.full(2 * 8, np.nan, np.float32)  # 2 blocks x 4 warps
    toy.launch("warp_sum", (2,), (128,), (x, out, np.int32(n)), order="random", seed=5)
    padded = np.zeros(256, np.float32)
    padded[:n] = x
    warps = padded.reshape(8, 32)
    w64 = warps.astype(np.float64)
    assert_sum_close(out[0::2], w64.sum(1), np.abs(w64).sum(1), 32, "warp sums")
    np.testing.assert_array_equal(out[1::2], warps.max(1))


def test_barrier_in_divergent_code_is_reported_not_hung(toy):
    with pytest.raises(EmuSchedulingError, match="deadlock"):
        toy.launch("divergent_barrier", (1,), (32,), (np.zeros(32, np.float32),))


def test_launch_arguments_are_checked_against_the_kernel_signature(toy):
    x, out = np.zeros(4, np.float32), np.zeros(2, np.float32)
    with pytest.raises(TypeError, match="argument n must be numpy.int32"):
        toy.launch("warp_sum", (1,), (32,), (x, out, 4))  # a Python int: CuPy would pass 64 bits
    with pytest.raises(TypeError, match="argument x must be float32, got float64"):
        toy.launch("warp_sum", (1,), (32,), (x.astype(np.float64), out, np.int32(4)))
    with pytest.raises(TypeError, match="takes 3 arguments"):
        toy.launch("warp_sum", (1,), (32,), (x, out))
    with pytest.raises(ValueError, match="C-contiguous"):
        toy.launch("warp_sum", (1,), (32,), (np.zeros(8, np.float32)[::2], out, np.int32(4)))
    with pytest.raises(ValueError, match="1..1024"):
        toy.launch("warp_sum", (1,), (2048,), (x, out, np.int32(4)))
    with pytest.raises(ValueError, match="no kernel"):
        toy.launch("nope", (1,), (32,), ())



# ---------------------------------------------------------------------------- ldmatrix
LDM_LD = 24  # b16 elements per shared row: 16 + 8 of padding, rows 48 bytes apart (16-byte aligned)
LDM = r"""
#define LD 24
// 32 rows of LD b16 elements are staged in shared memory; lane t points at row rows[t], element
// cols[t] (0 or 8); every lane writes the four registers ldmatrix (.trans when trans) gave it.
extern "C" __global__ void ldm_probe(const unsigned* src, const int* rows, const int* cols, unsigned* out, int trans,
                                     int misalign) {
    __shared__ __align__(16) unsigned S[32 * LD / 2];
    const int t = threadIdx.x;
    for (int i = t; i < 32 * LD / 2; i += blockDim.x) S[i] = src[i];
    __syncthreads();
    const unsigned short* p = reinterpret_cast<const unsigned short*>(S) + rows[t] * LD + cols[t] + misalign;
    unsigned r[4];
    if (trans) ldmatrix_x4_trans(r, p);
    else ldmatrix_x4(r, p);
    for (int j = 0; j < 4; ++j) out[4 * t + j] = r[j];
}
extern "C" __global__ void ldm_global(const unsigned* src, unsigned* out) {
    unsigned r[4];
    ldmatrix_x4(r, src + 4 * threadIdx.x);
    out[threadIdx.x] = r[0];
}
"""


@pytest.fixture(scope="module")
def ldm():
    with dp.use_backend("emu") as be:
        return EmuModule(LDM, "ldm.cu", be.cxx)


def ldmatrix_isa(buf: np.ndarray, rows: np.ndarray, cols: np.ndarray, trans: bool) -> np.ndarray:
    """The PTX ISA's ldmatrix .x4 layout, computed independently: matrix j's row k is the 8
    elements at lane 8j+k's address; lane i's register j holds elements (i/4, 2(i%4)) and
    (i/4, 2(i%4)+1) of matrix j (of its transpose for .trans), the first in the low half."""
    mats = np.empty((4, 8, 8), np.uint32)
    for j in range(4):
        for k in range(8):
            lane = 8 * j + k
            mats[j, k] = buf[rows[lane], cols[lane]:cols[lane] + 8]
    if trans:
        mats = mats.transpose(0, 2, 1)
    want = np.empty((32, 4), np.uint32)
    for i in range(32):
        for j in range(4):
            want[i, j] = mats[j, i // 4, 2 * (i % 4)] | mats[j, i // 4, 2 * (i % 4) + 1] << 16
    return want


@pytest.mark.parametrize("trans", [0, 1])
def test_ldmatrix_model_follows_the_isa_layout(ldm, rng, trans):
    """Fresh random b16 contents and a random row address per lane (a permutation of 32 rows,
    each at column 0 or 8), poisoned output: every lane's four registers are what the ISA says."""
    buf = rng.integers(0, 1 << 16, size=(32, LDM_LD), dtype=np.uint32)
    src = (buf[:, 0::2] | buf[:, 1::2] << 16).astype(np.uint32).ravel()  # little-endian b16 pairs
    rows = rng.permutation(32).astype(np.int32)
    cols = (8 * rng.integers(0, 2, size=32)).astype(np.int32)
    out = np.full(128, 0xDEADBEEF, np.uint32)
    ldm.launch("ldm_probe", (1,), (32,), (src, rows, cols, out, np.int32(trans), np.int32(0)), order="random", seed=3)
    got = out.reshape(32, 4)
    np.testing.assert_array_equal(got, ldmatrix_isa(buf, rows, cols, bool(trans)))
    # the control: the other variant's layout differs, so the comparison above can fail
    assert not np.array_equal(got, ldmatrix_isa(buf, rows, cols, not trans))


def test_ldmatrix_checks_its_addresses_and_the_warp(ldm, rng):
    src = np.zeros(32 * LDM_LD // 2, np.uint32)
    rows, cols = np.arange(32, dtype=np.int32), np.zeros(32, np.int32)
    out = np.zeros(128, np.uint32)
    with pytest.raises(ValueError, match="not 16-byte aligned"):
        ldm.launch("ldm_probe", (1,), (32,), (src, rows, cols, out, np.int32(0), np.int32(1)))
    with pytest.raises(ValueError, match="ldmatrix needs all 32 lanes"):
        ldm.launch("ldm_probe", (1,), (16,), (src, rows, cols, out, np.int32(0), np.int32(0)))
    with pytest.raises(ValueError, match="not in shared memory"):
        ldm.launch("ldm_global", (1,), (32,), (np.zeros(128, np.uint32), np.zeros(32, np.uint32)))

# ---------------------------------------------------------------------------- sgemm_tf32, sgemm_bf16
# Planted bugs in the tensor-core GEMM, each a string edit of the real source. All variants go
# into one module (each in its own namespace, the kernel renamed), so the host compiler runs once.
TC_SECTION = "// ------------------------------------------------------------------ tensor cores"
TC_BUGS = {
    "no_syncthreads": [("__syncthreads();                 // ... and everyone's", "// ... and everyone's")],
    "no_cp_async_wait": [("cp_async_wait<TC_STAGES - 2>();", "/* removed */")],
    "cp_async_wait_one_group_short": [("cp_async_wait<TC_STAGES - 2>();", "cp_async_wait<TC_STAGES - 1>();")],
    # a1 is (g+8, t) and a2 (g, t+4): swapped
    "a_fragment_a1_a2": [("af[i][1] = cvt_rna_tf32(tc_at(sa, a_k, r + 8, k8 + q));",
                          "af[i][1] = cvt_rna_tf32(tc_at(sa, a_k, r, k8 + q + 4));"),
                         ("af[i][2] = cvt_rna_tf32(tc_at(sa, a_k, r, k8 + q + 4));",
                          "af[i][2] = cvt_rna_tf32(tc_at(sa, a_k, r + 8, k8 + q));")],
    # b0 is (t, g) and b1 (t+4, g): swapped
    "b_fragment_b0_b1": [("bf[j][0] = cvt_rna_tf32(tc_at(sb, b_k, c, k8 + q));",
                          "bf[j][0] = cvt_rna_tf32(tc_at(sb, b_k, c, k8 + q + 4));"),
                         ("bf[j][1] = cvt_rna_tf32(tc_at(sb, b_k, c, k8 + q + 4));",
                          "bf[j][1] = cvt_rna_tf32(tc_at(sb, b_k, c, k8 + q));")],
    # bf16 ldmatrix row addresses: lane l must point at matrix l / 8, row l % 8; here lanes 8..15
    # and 16..23 swap roles for A (matrix 1 gets rows k 8.., matrix 2 rows 8..: a1 and a2 swapped)
    "bf16_ldmatrix_a_lane_mapping": [("ah + (wm + i * 16 + (mi & 1) * 8 + row) * TC_LDHA + (mi >> 1) * 8",
                                      "ah + (wm + i * 16 + (mi >> 1) * 8 + row) * TC_LDHA + (mi & 1) * 8")],
    # bf16: B is stored k-major, so its fragments need ldmatrix .trans; without it b0 gets (g, 2t..)
    "bf16_ldmatrix_b_missing_trans": [("ldmatrix_x4_trans(r, bh", "ldmatrix_x4(r, bh")],
    # no cvt.rna: the raw float32 bits go to the tensor core, which reads them truncated to TF32
    "no_tf32_rounding": [(TC_SECTION, TC_SECTION + "\ninline unsigned cvt_rna_tf32(float x) { unsigned u; "
                          "std::memcpy(&u, &x, 4); return u; }  // shadows the real one in this namespace")],
    # d1 is (g, 2t+1) and d2 (g+8, 2t): swapped in the epilogue
    "d_fragment_d1_d2": [("g + (e >> 1) * 8, col = n0 + wn + j * 8 + 2 * q + (e & 1);",
                          "g + (e & 1) * 8, col = n0 + wn + j * 8 + 2 * q + (e >> 1);")],
}


def tc_variants(code: str) -> str:
    """gemm.cu followed by one copy of its tensor-core section per planted bug, the kernel
    renamed sgemm_tf32_<bug> and its helpers in a namespace of their own."""
    section = code[code.index(TC_SECTION):]
    out = [code]
    for bug, edits in TC_BUGS.items():
        v = section
        for old, new in edits:
            assert v.count(old) == 1, (bug, old)
            v = v.replace(old, new)
        v = v.replace("sgemm_tf32(", f"sgemm_tf32_{bug}(").replace("sgemm_bf16(", f"sgemm_bf16_{bug}(")
        out.append(f"namespace bug_{bug} {{\n{v}\n}}\nusing bug_{bug}::sgemm_tf32_{bug};\nusing bug_{bug}::sgemm_bf16_{bug};\n")
    return "\n".join(out)


@pytest.fixture(scope="module")
def tc_module():
    with dp.use_backend("emu") as be:
        return EmuModule(tc_variants(read_source("gemm.cu")), "gemm_tc_bugs.cu", be.cxx)


def launch_tc(module, kernel, a, b, order="forward", seed=0):
    """The launch dp.ops.gemm(a, b, algo="tf32") makes, of `kernel` in `module`; C poisoned."""
    from dnnpar.ops.gemm import _launch_shape

    (m, k), n = a.shape, b.shape[1]
    grid, block = _launch_shape("tf32", m, n)
    c = np.full((m, n), np.nan, np.float32)
    i32 = np.int32
    module.launch(kernel, grid, block, (i32(m), i32(n), i32(k), np.float32(1), a, i32(k), i32(0), b, i32(n), i32(0),
                                        np.float32(0), c, i32(n)), order=order, seed=seed)
    return c


def tc_fails(c, a, b, precision="tf32") -> bool:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    check = oracles.assert_tf32_close if precision == "tf32" else oracles.assert_bf16_close
    try:
        check(c, a64 @ b64, np.abs(a64) @ np.abs(b64), a.shape[1], "planted")
    except AssertionError:
        return True
    return False


def tc_case(rng):
    # 2 x 2 blocks, the last ones partial; K: 6 tiles of 16 (the pipeline wraps twice), ragged; lda, ldb
    # multiples of 4 (16-byte cp.async)
    return rng.standard_normal((70, 92)).astype(np.float32), rng.standard_normal((92, 100)).astype(np.float32)


@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_tensor_core_gemm_is_schedule_independent_and_within_the_bound(tc_module, rng, precision):
    a, b = tc_case(rng)
    runs = [launch_tc(tc_module, f"sgemm_{precision}", a, b, o, s) for o, s in SCHEDULES]
    for r in runs:
        np.testing.assert_array_equal(r, runs[0])
    assert not tc_fails(runs[0], a, b, precision)


# (bug, kernel): the race bugs on both kernels, each fragment bug on the kernel it edits
TC_CASES = [(bug, "bf16" if bug.startswith("bf16_") else "tf32") for bug in TC_BUGS if bug != "no_tf32_rounding"] + \
    [(bug, "bf16") for bug in ("no_syncthreads", "no_cp_async_wait", "cp_async_wait_one_group_short")]


@pytest.mark.parametrize("bug,precision", TC_CASES)
def test_tensor_core_gemm_planted_bug_is_caught(tc_module, rng, bug, precision):
    """A race (missing barrier, missing or short cp.async wait) gives a wrong result under some
    schedule; a wrong fragment index under every one; the TF32 / BF16 bound is tight enough to
    see it."""
    a, b = tc_case(rng)
    caught = []
    for order, seed in SCHEDULES:
        try:
            caught.append(tc_fails(launch_tc(tc_module, f"sgemm_{precision}_{bug}", a, b, order, seed), a, b,
                                   precision))
        except EmuSchedulingError:
            caught.append(True)
    if "fragment" in bug or "ldmatrix" in bug:
        assert all(caught), f"{bug}: missed under schedules {[s for s, c in zip(SCHEDULES, caught) if not c]}"
    else:
        assert any(caught), f"{bug} went unnoticed under every schedule"


def test_missing_tf32_rounding_is_caught(tc_module, rng):
    """Without cvt.rna the tensor core truncates the operands (the emulator reads a .tf32 register
    as the hardware does): the result may still be near the float64 product, but it is not the
    product of the TF32-rounded operands, which the correct kernel matches to float32 rounding."""
    a, b = tc_case(rng)
    ra, rb = oracles.tf32(a), oracles.tf32(b)
    want, mag = ra @ rb, np.abs(ra) @ np.abs(rb)
    oracles.assert_sum_close(launch_tc(tc_module, "sgemm_tf32", a, b), want, mag, a.shape[1], "sgemm_tf32")
    with pytest.raises(AssertionError, match="beyond the float32 summation bound"):
        oracles.assert_sum_close(launch_tc(tc_module, "sgemm_tf32_no_tf32_rounding", a, b), want, mag, a.shape[1],
                                 "sgemm_tf32 without cvt.rna")


def test_mma_needs_the_whole_warp(tc_module, rng):
    """mma.sync is warp-wide: a block that ends inside a warp is refused, not half-computed."""
    a, b = tc_case(rng)
    c = np.zeros((70, 100), np.float32)
    i32 = np.int32
    with pytest.raises(ValueError, match="mma.sync needs all 32 lanes"):
        tc_module.launch("sgemm_tf32", (2, 2), (100,), (i32(70), i32(100), i32(92), np.float32(1), a, i32(92), i32(0),
                                                          b, i32(100), i32(0), np.float32(0), c, i32(100)))
