"""16-bit gradient encodings (dnnpar.parallel.half) against ml_dtypes' float16 / bfloat16 as the
independent oracle, and the allreduce's 16-bit sum over real MPI ranks against a float64 sum
within the module's derived bound."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from dnnpar.parallel import half

ml_dtypes = pytest.importorskip("ml_dtypes")
ORACLE = {"fp16": np.float16, "bf16": ml_dtypes.bfloat16}
ROOT = Path(__file__).resolve().parents[1]


def _values(rng, n=4099):
    x = rng.standard_normal(n).astype(np.float32) * np.float32(2.0) ** rng.integers(-30, 20, n).astype(np.float32)
    x[:8] = [0.0, -0.0, np.inf, -np.inf, np.nan, 65504.0, 65520.0, 1e-8]  # edges: overflow, subnormal fp16
    return x


@pytest.fixture(params=["native", "numpy"])
def impl(request, monkeypatch):
    """Both implementations in turn: dnnpar/cpu/half.cpp (skipped where it cannot be built) and NumPy."""
    from dnnpar.backend import cpu_native

    if request.param == "native" and cpu_native.library("half") is None:
        pytest.skip(f"native half kernels unavailable: {cpu_native.unavailable_reason('half')}")
    monkeypatch.setitem(half.NATIVE, "use", request.param == "native")
    return request.param


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_encode_decode_match_the_oracle(impl, rng, kind):
    x = _values(rng)
    bits = half.encode(x, kind)
    assert bits.dtype == np.uint16 and bits.shape == x.shape
    want = x.astype(ORACLE[kind])                        # round to nearest even, as ml_dtypes does
    np.testing.assert_array_equal(bits, want.view(np.uint16))
    back = half.decode(bits, kind)
    np.testing.assert_array_equal(back, want.astype(np.float32))


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_add_into_is_the_rounded_sum(impl, rng, kind):
    a, b = half.encode(_values(rng)[8:] * 1e-3, kind), half.encode(_values(rng)[8:] * 1e-3, kind)
    exact = half.decode(a, kind).astype(np.float64) + half.decode(b, kind).astype(np.float64)
    out = b.copy()
    half.add_into(a, out, kind)
    got = half.decode(out, kind).astype(np.float64)
    u, tiny, _ = half.FORMATS[kind]
    assert np.all(np.abs(got - exact) <= u * np.abs(exact) + tiny / 2)


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
def test_native_equals_numpy_bit_for_bit(monkeypatch, rng, kind):
    """Every 16-bit pattern (subnormals, normals, infinities, NaNs) and random float32 values: the
    native kernels and NumPy's casts give the same bits (encode, decode, and the rounded sum), NaN
    for NaN."""
    from dnnpar.backend import cpu_native

    if cpu_native.library("half") is None:
        pytest.skip(f"native half kernels unavailable: {cpu_native.unavailable_reason('half')}")
    every = np.arange(1 << 16, dtype=np.uint16)
    x = np.concatenate([half.decode(every, kind), _values(rng, 20011),
                        np.array([np.float32(np.nan) * -1, 6.1035156e-05, 5.9604645e-08, 2.9802322e-08],
                                 np.float32)]).astype(np.float32)
    a, b = every, every[::-1].copy()
    got = {}
    for use in (True, False):
        monkeypatch.setitem(half.NATIVE, "use", use)
        s = b.copy()
        half.add_into(a, s, kind)
        got[use] = (half.encode(x, kind), half.decode(every, kind), s)
    for n, p in zip(got[True], got[False]):
        fn, fp = (half.decode(n, kind), half.decode(p, kind)) if n.dtype == np.uint16 else (n, p)
        nan = np.isnan(fn)
        np.testing.assert_array_equal(nan, np.isnan(fp))  # a NaN's payload may differ: F16C quiets it
        np.testing.assert_array_equal(n[~nan], p[~nan])


def test_unknown_format_is_refused():
    with pytest.raises(ValueError, match="16-bit format"):
        half.encode(np.zeros(3, np.float32), "fp8")


WORKER = textwrap.dedent('''
    import sys
    import numpy as np
    from dnnpar.parallel import half
    from dnnpar.parallel.comm import MPICommunicator
    kind, seed, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    comm = MPICommunicator(timeout=60)
    rng = np.random.default_rng(seed)
    n = 10007  # prime: no segment of MPI's reduce-scatter is a round size
    vals = (rng.standard_normal((comm.size, n)) * 10.0 ** rng.uniform(-6, 1, (comm.size, n))).astype(np.float32)
    bits = half.encode(vals[comm.rank], kind)
    h = comm.start_allreduce_sum16(bits, kind)
    comm.wait([h], "test")
    got = comm.comm.gather(bits, root=0)
    if comm.rank == 0:
        np.savez(out, vals=vals, got=np.stack(got))
''')


@pytest.mark.parametrize("kind,nranks", [("fp16", 2), ("bf16", 3), ("fp16", 4)])
def test_allreduce_sum16_within_the_bound(tmp_path, rng, kind, nranks):
    pytest.importorskip("mpi4py")
    from dnnpar.parallel.comm import mpi_env, mpiexec
    script = tmp_path / "w.py"
    script.write_text(WORKER)
    out = tmp_path / "o.npz"
    env = mpi_env(dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")))
    r = subprocess.run(mpiexec(nranks) + [sys.executable, str(script), kind, str(int(rng.integers(1 << 30))), str(out)],
                       env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    d = np.load(out)
    got = d["got"]
    assert all(np.array_equal(got[0], g) for g in got[1:])   # every rank holds the same sums
    v = d["vals"].astype(np.float64)
    err = np.abs(half.decode(got[0], kind).astype(np.float64) - v.sum(axis=0))
    bound = half.sum_bound(np.abs(v).sum(axis=0), nranks, kind)
    assert np.all(err <= bound), float(np.max(err / bound))
    assert float(np.max(err)) > 0  # 16-bit rounding really happened (the check could fail)
