"""The numpy backend's GEMMs on dnnpar's own thread pool (dnnpar/cpu/blas.cpp: each thread's block
of C by NumPy's OpenBLAS single-threaded) against float64 oracles, and the one pool that every
native library shares (dnnpar/cpu/runtime.cpp)."""
import textwrap

import numpy as np
import pytest

import dnnpar as dp
from conftest import run_in_threads, run_json_script
from oracles import assert_sum_close
from dnnpar.backend import cpu_native

pytestmark = pytest.mark.skipif(cpu_native.blas_library() is None,
                                reason=f"GEMM on the pool unavailable: {cpu_native.blas_unavailable_reason()}")

# (M, K, N): size 1, primes, edges just past a multiple of 16 (the split's unit), M >= N and
# M < N (rows or columns are split), and sizes that split over several threads
SHAPES = [(1, 1, 1), (1, 7, 97), (97, 13, 1), (17, 31, 33), (61, 113, 97), (257, 19, 16), (33, 600, 1025),
          (1000, 37, 83), (5, 4099, 7)]
IDS = [f"{m}x{k}x{n}" for m, k, n in SHAPES]


def operands(rng, m, k, n, ta, tb, padded=False):
    """op(A) (m, k) and op(B) (k, n) as the arrays BLAS reads: stored transposed when ta / tb, and
    with ``padded`` as views into wider arrays (a leading dimension larger than the row)."""
    def stored(rows, cols):
        if not padded:
            return rng.standard_normal((rows, cols), dtype=np.float32)
        return rng.standard_normal((rows, cols + 5), dtype=np.float32)[:, 2:cols + 2]
    a = stored(k, m) if ta else stored(m, k)
    b = stored(n, k) if tb else stored(k, n)
    return a, b


def oracle(a, b, ta, tb, alpha=1.0, beta=0.0, c=None):
    A = (a.T if ta else a).astype(np.float64)
    B = (b.T if tb else b).astype(np.float64)
    want, mag = alpha * (A @ B), abs(alpha) * (np.abs(A) @ np.abs(B))
    if beta:
        want, mag = want + beta * c, mag + abs(beta) * np.abs(c.astype(np.float64))
    return want, mag


def on_each_team(fresh, run, want, mag, k, what, exact=False):
    """``run(out, threads)`` into a ``fresh()`` output on 1, 2 and 3 threads: it returns ``out``,
    within the float32 summation bound of ``k`` products each time, and with ``exact`` the same
    bits on each."""
    runs = []
    for t in (1, 2, 3):
        out = fresh()
        assert run(out, t) is out
        assert_sum_close(out, want, mag, k, what=f"{what} threads={t}")
        runs.append(out)
    if exact:
        for r in runs[1:]:
            np.testing.assert_array_equal(r, runs[0])


@pytest.mark.parametrize("m,k,n", SHAPES, ids=IDS)
@pytest.mark.parametrize("ta,tb", [(False, False), (True, False), (False, True), (True, True)],
                         ids=["NN", "TN", "NT", "TT"])
def test_sgemm_matches_float64(rng, m, k, n, ta, tb):
    """Every element within the float32 summation bound of K products, on 1, 2 and 3 threads,
    with an output poisoned by NaN (beta = 0 must not read it)."""
    a, b = operands(rng, m, k, n, ta, tb)
    want, mag = oracle(a, b, ta, tb)
    on_each_team(lambda: np.full((m, n), np.nan, np.float32),
                 lambda out, t: cpu_native.sgemm(a, b, out, ta, tb, threads=t), want, mag, k, f"{m}x{k}x{n} ta={ta} tb={tb}")


@pytest.mark.parametrize("m,k,n", [(61, 113, 97), (300, 70, 11), (7, 500, 400)], ids=lambda v: str(v))
def test_sgemm_views_alpha_beta(rng, m, k, n):
    """Operands that are views (leading dimension past the row, transposed views passed as they
    are), alpha and beta != 0 (C read and updated in place)."""
    for ta, tb in ((False, True), (True, False)):
        a, b = operands(rng, m, k, n, ta, tb, padded=True)
        c = rng.standard_normal((m, n), dtype=np.float32)
        want, mag = oracle(a, b, ta, tb, -0.75, 1.5, c)
        out = c.copy()
        assert cpu_native.sgemm(a, b, out, ta, tb, alpha=-0.75, beta=1.5) is out
        assert_sum_close(out, want, mag, k + 1, what=f"views ta={ta} tb={tb}")
        # the same product with the transposes expressed as views instead of flags
        out2 = np.full((m, n), np.nan, np.float32)
        cpu_native.sgemm(a.T if ta else a, b.T if tb else b, out2)
        want2, mag2 = oracle(a, b, ta, tb)
        assert_sum_close(out2, want2, mag2, k, what=f"transposed views ta={ta} tb={tb}")


# A few rows against a B of 4 MB or more, plain or transposed (a fully connected layer's forward
# and input gradient at a small batch), run on dnnpar's own loops, not OpenBLAS: M 1..8 (9:
# OpenBLAS again in A B; A B^T takes up to 16 rows, in two passes), K from one vector (16) up
# with ragged tails (B's rows go eight at a time in A B), N odd and even (two rows of B at a
# time in A B^T) and past a tile of C's columns (512 floats at M = 8 in A B); one B just under
# 4 MB (OpenBLAS); and 17 rows (OpenBLAS)
SMALL_M = [(1, 16, 65537), (2, 17, 61681), (3, 31, 33829), (5, 113, 9281), (7, 600, 1749), (8, 4099, 257),
           (8, 21, 49933), (9, 40, 26215), (8, 1024, 1023), (13, 37, 28411), (16, 64, 16411), (17, 64, 16411)]


@pytest.mark.parametrize("m,k,n", SMALL_M, ids=[f"{m}x{k}x{n}" for m, k, n in SMALL_M])
@pytest.mark.parametrize("tb", [False, True], ids=["NN", "NT"])
def test_small_m_products(rng, m, k, n, tb):
    """Within the float32 summation bound of K products on 1, 2 and 3 threads, bit for bit the
    same on each (every element is one thread's, summed in one order), with a NaN-poisoned output
    (beta = 0 must not read it); and with alpha, beta and padded views of A, B and C's rows."""
    a, b = operands(rng, m, k, n, False, tb)
    want, mag = oracle(a, b, False, tb)
    on_each_team(lambda: np.full((m, n), np.nan, np.float32),
                 lambda out, t: cpu_native.sgemm(a, b, out, trans_b=tb, threads=t), want, mag, k, f"{m}x{k}x{n}",
                 exact=m <= 8 or (tb and m <= 16))
    a, b = operands(rng, m, k, n, False, tb, padded=True)
    want, mag = oracle(a, b, False, tb)
    c = rng.standard_normal((m, n), dtype=np.float32)
    want_ab, mag_ab = oracle(a, b, False, tb, -0.75, 1.5, c)
    out = c.copy()
    assert cpu_native.sgemm(a, b, out, trans_b=tb, alpha=-0.75, beta=1.5) is out
    assert_sum_close(out, want_ab, mag_ab, k + 1, what=f"{m}x{k}x{n} views, alpha, beta")
    out = np.full((m, n), np.nan, np.float32)
    cpu_native.sgemm(a, b, out, trans_b=tb)
    assert_sum_close(out, want, mag, k, what=f"{m}x{k}x{n} views")


@pytest.mark.parametrize("k", [1, 3, 8, 13, 16, 17])
@pytest.mark.parametrize("n, shift", [(4099, 0), (4112, 0), (4112, 1)], ids=["ragged", "aligned", "shifted"])
def test_large_weight_gradient_with_a_short_reduction(rng, k, n, shift):
    """A^T B with K <= 16 and C of 32 MB or more (a fully connected layer's weight gradient at a
    small batch) is written by dnnpar's streaming loop (17: OpenBLAS): within the summation bound on
    1, 2 and 3 threads and bit for bit the same on each, every element of the NaN-poisoned C
    written. Rows of 4,099 floats start at every offset from the 64-byte boundary (one row at a
    time); rows of 4,112 all start as the first does (four rows at a time, the last rows of a
    thread's share one by one), C's first row aligned, or one float past a boundary."""
    m = 2053  # 33.7 MB of C
    a, b = operands(rng, m, k, n, True, False, padded=True)
    want, mag = oracle(a, b, True, False)

    def poisoned():
        base = np.full(m * n + 16, np.nan, np.float32)
        lead = (-base.ctypes.data // 4) % 16 + shift  # floats to the next 64-byte boundary, plus the shift
        return base[lead:lead + m * n].reshape(m, n)

    on_each_team(poisoned, lambda out, t: cpu_native.sgemm(a, b, out, trans_a=True, threads=t), want, mag, k,
                 f"k={k}", exact=k <= 16)


def test_sgemm_declines_what_blas_cannot_read(rng):
    """A non-unit-stride operand or a non-contiguous / read-only / wrongly typed output: None,
    nothing written (the caller uses NumPy); a shape mismatch: ValueError."""
    a = rng.standard_normal((40, 60), dtype=np.float32)
    b = rng.standard_normal((60, 50), dtype=np.float32)
    out = np.full((40, 50), np.nan, np.float32)
    assert cpu_native.sgemm(a[:, ::2], b[::2], out) is None
    assert np.isnan(out).all()
    assert cpu_native.sgemm(a.astype(np.float64), b, out) is None
    assert cpu_native.sgemm(a, b, np.empty((50, 40), np.float32).T) is None
    ro = np.empty((40, 50), np.float32)
    ro.flags.writeable = False
    assert cpu_native.sgemm(a, b, ro) is None
    with pytest.raises(ValueError, match="do not match"):
        cpu_native.sgemm(a, b, np.empty((40, 51), np.float32))
    with pytest.raises(ValueError, match="do not match"):
        cpu_native.sgemm(a, a, np.empty((40, 60), np.float32))


def test_openblas_thread_count_is_restored(rng):
    """The pool sets OpenBLAS to one thread for its blocks and restores the count after each
    call, whatever the caller set (threadpoolctl's limit included)."""
    from threadpoolctl import threadpool_limits

    a = rng.standard_normal((300, 200), dtype=np.float32)
    out = np.empty((300, 300), np.float32)
    before = cpu_native.blas_threads()
    cpu_native.sgemm(a, a, out, trans_b=True)
    assert cpu_native.blas_threads() == before
    with threadpool_limits(1):
        cpu_native.sgemm(a, a, out, trans_b=True)
        assert cpu_native.blas_threads() == 1
    assert cpu_native.blas_threads() == before


def test_concurrent_callers(rng):
    """Four Python threads multiplying at once (ctypes drops the GIL; a caller that finds the
    pool busy computes its blocks on its own thread): every result right, none lost, and
    OpenBLAS's thread count back where it was."""
    before = cpu_native.blas_threads()
    a = rng.standard_normal((129, 77), dtype=np.float32)
    b = rng.standard_normal((77, 211), dtype=np.float32)
    want, mag = oracle(a, b, False, False)
    bad = []

    def hammer(i):
        for r in range(25):
            out = np.full((129, 211), np.nan, np.float32)
            cpu_native.sgemm(a, b, out, threads=1 + (i + r) % 3)
            try:
                assert_sum_close(out, want, mag, 77)
            except AssertionError as e:
                bad.append((i, r, str(e)))
    run_in_threads(hammer, what="a GEMM")
    assert not bad, bad[:3]
    assert cpu_native.blas_threads() == before


@pytest.mark.parametrize("use", [True, False], ids=["pool", "numpy"])
def test_ops_gemm_on_either_path(rng, use, monkeypatch):
    """ops.gemm on the numpy backend gives the same error model with the pool (large products)
    and with NumPy's matmul (``ops.gemm.NATIVE["use"] = False``), alpha and beta included."""
    import sys
    G = sys.modules["dnnpar.ops.gemm"]
    monkeypatch.setitem(G.NATIVE, "use", use)
    a = rng.standard_normal((70, 300), dtype=np.float32)
    b = rng.standard_normal((250, 300), dtype=np.float32)
    c = rng.standard_normal((70, 250), dtype=np.float32)
    assert 70 * 250 * 300 >= G.POOL_MIN_WORK
    want, mag = oracle(a, b, False, True, 0.5, -2.0, c)
    with dp.use_backend("numpy"):
        got = dp.ops.gemm(a, b, trans_b=True, alpha=0.5, beta=-2.0, c=c.copy())
    assert_sum_close(got, want, mag, 301, what=f"ops.gemm use={use}")


ONE_POOL_SCRIPT = textwrap.dedent("""
    import json, os
    import numpy as np
    from dnnpar.backend import cpu_native as cn

    def threads():
        return len(os.listdir("/proc/self/task"))
    base = threads()
    rng = np.random.default_rng(0)
    # a call of team 3 into each of four libraries: depthwise, BatchNorm, pooling, the GEMMs
    x = rng.standard_normal((4, 32, 40, 40), dtype=np.float32)
    w = rng.standard_normal((32, 1, 3, 3), dtype=np.float32)
    cn.depthwise_forward(x, w, None, np.empty_like(x), (4, 32, 40, 40, 3, 3, 40, 40, 1, 1, 1, 1), threads=3)
    c = 32
    cn.batch_norm_forward(x, np.ones(c, np.float32), np.zeros(c, np.float32), np.zeros(c), np.ones(c),
                          np.empty(c), np.empty_like(x), 1e-5, True, "relu", threads=3)
    cn.max_pool_forward(x, np.empty((4, 32, 20, 20), np.float32), (4, 32, 40, 40, 2, 2, 20, 20, 2, 2, 0, 0), threads=3)
    a = rng.standard_normal((400, 400), dtype=np.float32)
    cn.sgemm(a, a, np.empty_like(a), threads=3)
    print(json.dumps({"new_threads": threads() - base, "blas": cn.blas_unavailable_reason()}))
""")


def test_every_library_runs_on_one_pool(tmp_path):
    """Calls of team 3 into four native libraries start two workers in all, not two per
    library: one pool, so no library's idle workers spin beside another's."""
    if cpu_native.library("depthwise") is None or cpu_native.library("pool") is None:
        pytest.skip("native kernels unavailable")
    from dnnpar.backend.sources import cache_dir
    # this process's kernel cache (the libraries are built already): a fresh process, no rebuild
    out = run_json_script(tmp_path, ONE_POOL_SCRIPT, DNNPAR_CACHE=str(cache_dir("cpu").parent))
    assert out["blas"] is None, out
    assert out["new_threads"] == 2, out


def test_other_blas_libraries_keep_numpy():
    """Only OpenBLAS with its pthreads layer is driven from the pool (its thread count can be set
    per call, its symbols are known); any other BLAS gets a reason and NumPy's matmul."""
    from types import SimpleNamespace as NS
    assert "threadpoolctl found no BLAS" in cpu_native._openblas_entry_points(None)
    assert "mkl" in cpu_native._openblas_entry_points(NS(internal_api="mkl", threading_layer="intel"))
    assert "openmp" in cpu_native._openblas_entry_points(NS(internal_api="openblas", threading_layer="openmp"))


FORK_SCRIPT = textwrap.dedent("""
    import json, os, signal
    import numpy as np
    from dnnpar.backend import cpu_native as cn

    rng = np.random.default_rng(0)
    a = rng.standard_normal((400, 400), dtype=np.float32)
    x = rng.standard_normal((4, 32, 40, 40), dtype=np.float32)
    w = rng.standard_normal((32, 1, 3, 3), dtype=np.float32)
    geo = (4, 32, 40, 40, 3, 3, 40, 40, 1, 1, 1, 1)
    want_c = cn.sgemm(a, a, np.empty_like(a), threads=2)       # the parent's workers exist now
    want_y = cn.depthwise_forward(x, w, None, np.empty_like(x), geo, threads=2)
    pid = os.fork()
    if pid == 0:
        signal.alarm(60)                                          # a hang ends the child, not the test
        c = cn.sgemm(a, a, np.full_like(a, np.nan), threads=2)
        y = cn.depthwise_forward(x, w, None, np.full_like(x, np.nan), geo, threads=2)
        os._exit(0 if np.array_equal(c, want_c) and np.array_equal(y, want_y) else 3)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"child": os.waitstatus_to_exitcode(status)}))
""")


def test_a_forked_child_gets_a_pool_of_its_own(tmp_path):
    """fork() after the pool has workers (multiprocessing's default on Linux): the child's
    parallel GEMM and kernel run on new workers and give the parent's bits, instead of waiting
    forever for the parent's workers, which the child does not have."""
    if cpu_native.library("depthwise") is None:
        pytest.skip("native kernels unavailable")
    from dnnpar.backend.sources import cache_dir
    out = run_json_script(tmp_path, FORK_SCRIPT, DNNPAR_CACHE=str(cache_dir("cpu").parent))
    assert out["child"] == 0, out


CLAIM_SCRIPT = textwrap.dedent("""
    import ctypes, json, os, threading
    from dnnpar.backend import cpu_native as cn

    rt = cn.library("runtime")
    Body = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
    rt.dnnpar_pool_run.argtypes = [ctypes.c_int, Body, ctypes.c_void_p]
    rt.dnnpar_pool_run.restype = None
    ran = []
    body = Body(lambda ctx, tid, nt: ran.append((tid, nt, threading.get_native_id())))
    me = threading.get_native_id()
    out = {}
    for phase in ("free", "one core"):
        if phase == "one core":  # the caller and every worker on one CPU, as a scheduler may leave them
            cpu = min(os.sched_getaffinity(0))
            for task in os.listdir("/proc/self/task"):
                os.sched_setaffinity(int(task), {cpu})
        wrong, caller_alone = [], 0
        for call in range(300):
            team = (2, 3, 1, 4, 2)[call % 5]
            ran.clear()
            rt.dnnpar_pool_run(team, body, None)
            if sorted(t for t, _, _ in ran) != list(range(team)) or any(n != team for _, n, _ in ran):
                wrong.append((call, team, list(ran)))
            caller_alone += team > 1 and all(who == me for _, _, who in ran)
        out[phase] = {"wrong": wrong[:3], "caller_alone": caller_alone, "calls": 240}
    print(json.dumps(out))
""")


def test_every_share_runs_once_whoever_claims_it(tmp_path):
    """runtime.cpp's pool hands out shares by claim: each share (tid) of a call runs exactly once,
    by a worker or by the caller, which runs every share no worker has claimed when it is done
    with its own. With the whole process on one CPU (a scheduler may leave a worker on the
    caller's core), the worker cannot run while the caller does, so the caller runs the call
    alone instead of waiting for it: without the claim, every call there waited for the worker
    (measured: 260 us for a 57 us product)."""
    if cpu_native.library("runtime") is None:
        pytest.skip("native kernels unavailable")
    from dnnpar.backend.sources import cache_dir
    out = run_json_script(tmp_path, CLAIM_SCRIPT, DNNPAR_CACHE=str(cache_dir("cpu").parent))
    for phase in ("free", "one core"):
        assert out[phase]["wrong"] == [], out
    # the worker gets the core only when the scheduler preempts the caller mid-call: rare
    assert out["one core"]["caller_alone"] > out["one core"]["calls"] // 2, out
