"""Communicators for synchronous data parallelism: MPI (mpi4py) on CPUs, NCCL (through CuPy) on
GPUs, bootstrapped over MPI. One small interface, as in ChainerMN:

    comm = make_communicator("auto")        # NCCL when the backend is cuda, else MPI
    comm.allreduce_sum([buf1, buf2])        # in place, every buffer in flight at once
    h = comm.start_allreduce_sum(buf)       # non-blocking: returns at once ...
    comm.test([h]); comm.wait([h], "what")  # ... progress / completion (data parallel's overlap)
    comm.bcast(buf, root=0); comm.barrier()

**No silent hang.** MPI collectives block forever when a peer has died or stopped answering.
Every collective here is started non-blocking and polled against a deadline (``timeout``
seconds, default 120, or ``DNNPAR_COMM_TIMEOUT``); past it a :class:`CommTimeoutError` names
the operation, the rank and the timeout. The entry point (``dnnpar train --parallel data``) then
aborts the whole MPI job (``MPI_Abort``) so that mpiexec ends every rank with that message.
"""
from __future__ import annotations

import os
import sys
import time

import numpy as np

DEFAULT_TIMEOUT = float(os.environ.get("DNNPAR_COMM_TIMEOUT", "120"))
#: seconds a collective is polled without sleeping before the polls back off (Communicator._poll)
SPIN_SECONDS = 0.05


class CommTimeoutError(RuntimeError):
    """A collective did not complete in time: a rank died or stopped answering."""


def _mpi():
    try:
        from mpi4py import MPI
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("data-parallel training needs MPI through mpi4py: pip install 'dnnpar[dist]' "
                          f"(mpi4py + the mpich wheel, which brings mpiexec) ({e})") from e
    return MPI


class Communicator:
    """rank / size, in-place sum-allreduce of a list of buffers, broadcast, barrier, all-gather,
    reduce-scatter; every wait bounded by ``timeout`` (:meth:`_poll`)."""

    name = "base"

    def __init__(self, rank: int, size: int, timeout: float):
        if not timeout > 0:  # NaN too: it would never expire
            raise ValueError(f"communicator timeout must be > 0 seconds, got {timeout}")
        self.rank, self.size, self.timeout = rank, size, float(timeout)

    def allreduce_sum(self, buffers) -> None:
        """Sum every buffer over the ranks, in place."""
        raise NotImplementedError

    def start_allreduce_sum(self, buf) -> "Deferred":
        """Begin summing ``buf`` over the ranks, in place; returns a handle for :meth:`test` and
        :meth:`wait`. ``buf`` must not be written until the wait returns. This default defers
        the whole sum to :meth:`wait` (one :meth:`allreduce_sum` of every deferred buffer): the
        shape for a communicator without a tested non-blocking path (NCCL, below)."""
        return Deferred(buf)

    def test(self, handles) -> bool:
        """Whether every handle's collective has completed; also moves MPI's forward (MPI
        progresses a non-blocking collective only inside MPI calls). Never blocks."""
        return not handles

    def wait(self, handles, what: str) -> None:
        """Until every handle's collective has completed, bounded by ``timeout`` (CommTimeoutError)."""
        if handles:
            self.allreduce_sum([h.buf for h in handles])

    def bcast(self, buf, root: int = 0) -> None:
        raise NotImplementedError

    def barrier(self) -> None:
        raise NotImplementedError

    def allgather(self, local: np.ndarray, out: np.ndarray) -> None:
        """``out[r] = local`` of rank r (host arrays of one shape on every rank)."""
        raise NotImplementedError

    def start_allgather(self, local: np.ndarray, out: np.ndarray):
        """Begin :meth:`allgather`; a handle for :meth:`test` / :meth:`wait` (host arrays)."""
        raise NotImplementedError(f"{type(self).__name__} has no non-blocking allgather")

    def start_allreduce_sum16(self, bits: np.ndarray, kind: str):
        """Begin summing a host uint16 vector of ``kind`` ("fp16" | "bf16") bit patterns over the
        ranks, in place, each addition rounded to 16 bits (:mod:`dnnpar.parallel.half`); a handle
        for :meth:`test` / :meth:`wait`."""
        raise NotImplementedError(f"{type(self).__name__} has no 16-bit allreduce")

    def reduce_scatter(self, send: np.ndarray, recv: np.ndarray) -> None:
        """``recv = sum over ranks of send[rank]`` (host arrays)."""
        raise NotImplementedError

    def allreduce_scalars(self, values) -> np.ndarray:
        """Sum a few float64 numbers (loss sums, counts) over the ranks."""
        raise NotImplementedError

    def _poll(self, done, what: str, on_timeout=None) -> None:
        """Wait until ``done()``; past the deadline call ``on_timeout`` and raise CommTimeoutError.

        MPI moves a non-blocking collective forward only inside MPI calls, and a small NCCL
        collective ends in microseconds, so for the first ``SPIN_SECONDS`` this polls without
        sleeping (yielding the core to any other runnable process, as MPICH's blocking calls do):
        sleeps between polls stalled every step of the ring (a 4 MB MPI allreduce of 2 ranks took
        3.8x as long with 10 us .. 1 ms sleeps). Past that a peer is late, not fast: the polls
        back off to one per millisecond."""
        start = time.monotonic()
        deadline = start + self.timeout
        spin_until = min(deadline, start + SPIN_SECONDS)
        pause = 1e-5
        while not done():
            now = time.monotonic()
            if now < spin_until:
                os.sched_yield()
                continue
            if now > deadline:
                try:
                    if on_timeout is not None:
                        on_timeout()
                finally:  # the timeout is the error to report, whatever the clean-up raises
                    raise CommTimeoutError(
                        f"rank {self.rank}/{self.size}: {what} did not complete within {self.timeout:g} s: another "
                        "rank died or stopped answering (if a step is legitimately that slow, raise --timeout or "
                        "DNNPAR_COMM_TIMEOUT)")
            time.sleep(pause)
            pause = min(pause * 2, 1e-3)

    def abort(self, message: str, code: int = 1) -> None:
        """End every rank of the job (after printing ``message`` on this one)."""
        print(f"dnnpar [rank {self.rank}/{self.size}]: {message}", file=sys.stderr, flush=True)
        os._exit(code)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(rank={self.rank}, size={self.size}, timeout={self.timeout:g}s)"


class Deferred:
    """A sum not started yet: :meth:`Communicator.wait` runs it."""
    __slots__ = ("buf",)

    def __init__(self, buf):
        self.buf = buf


class MPIPending:
    """One MPI non-blocking collective in flight: its request and its host buffer (a CuPy array
    ``dev`` is staged through ``host`` and written back when the wait returns)."""
    __slots__ = ("request", "host", "dev")

    def __init__(self, request, host, dev):
        self.request, self.host, self.dev = request, host, dev


class MPICommunicator(Communicator):
    """Host buffers (NumPy; CuPy arrays are staged through host memory) over an mpi4py
    communicator (default COMM_WORLD)."""

    name = "mpi"

    def __init__(self, comm=None, timeout: float = DEFAULT_TIMEOUT):
        MPI = _mpi()
        self.MPI = MPI
        self.comm = comm if comm is not None else MPI.COMM_WORLD
        super().__init__(self.comm.Get_rank(), self.comm.Get_size(), timeout)

    def _wait(self, requests, what: str) -> None:
        self._poll(lambda: self.MPI.Request.Testall(requests), what)

    @staticmethod
    def _host(buf):
        if isinstance(buf, np.ndarray):
            return buf, None
        import cupy as cp  # a CuPy array: stage through host memory
        return cp.asnumpy(buf), buf

    def allreduce_sum(self, buffers) -> None:
        for b in buffers:  # before any collective starts: a refused buffer must not leave others in flight
            if not b.flags.c_contiguous:
                raise ValueError("allreduce_sum: buffers must be C-contiguous")
        # MPI's own start and wait, also for NCCL's host lists (a CuPy buffer there is staged)
        handles = [MPICommunicator.start_allreduce_sum(self, b) for b in buffers]
        MPICommunicator.wait(self, handles, f"allreduce of {len(handles)} bucket(s), "
                                            f"{sum(h.host.nbytes for h in handles):,} bytes")

    def start_allreduce_sum(self, buf) -> MPIPending:
        if not buf.flags.c_contiguous:
            raise ValueError("allreduce_sum: buffers must be C-contiguous")
        host, dev = self._host(buf)
        return MPIPending(self.comm.Iallreduce(self.MPI.IN_PLACE, host, op=self.MPI.SUM), host, dev)

    def start_allgather(self, local: np.ndarray, out: np.ndarray) -> MPIPending:
        """Begin ``out[r] = local`` of rank r (host arrays); a handle for :meth:`test` / :meth:`wait`."""
        if out.shape != (self.size,) + local.shape or out.dtype != local.dtype or not out.flags.c_contiguous:
            raise ValueError(f"allgather: out must be C-contiguous {(self.size,) + local.shape} {local.dtype}, "
                             f"got {out.shape} {out.dtype}")
        return MPIPending(self.comm.Iallgather(local, out), out, None)

    _ops16: dict = {}  # kind -> MPI.Op, created once per process (after MPI_Init)

    def start_allreduce_sum16(self, bits: np.ndarray, kind: str) -> MPIPending:
        from . import half

        if kind not in half.FORMATS:
            raise ValueError(f"allreduce_sum16: unknown format {kind!r}: one of {', '.join(half.FORMATS)}")
        if not (isinstance(bits, np.ndarray) and bits.dtype == np.uint16 and bits.flags.c_contiguous):
            raise ValueError("allreduce_sum16: bits must be a C-contiguous host uint16 array")
        op = MPICommunicator._ops16.get(kind)
        if op is None:  # MPI's reduction calls it with (in, inout) raw buffers of the uint16 payload
            def reduce16(a, b, _datatype, kind=kind):
                half.add_into(np.frombuffer(a, np.uint16), np.frombuffer(b, np.uint16), kind)
            op = MPICommunicator._ops16[kind] = self.MPI.Op.Create(reduce16, commute=True)
        return MPIPending(self.comm.Iallreduce(self.MPI.IN_PLACE, [bits, self.MPI.UINT16_T], op=op), bits, None)

    def test(self, handles) -> bool:
        return bool(self.MPI.Request.Testall([h.request for h in handles])) if handles else True

    def wait(self, handles, what: str) -> None:
        reqs = [h.request for h in handles]
        self._wait(reqs, what)
        for h in handles:  # mpi4py set each request to MPI_REQUEST_NULL: a later test is true at once
            if h.dev is not None:
                h.dev.set(h.host)

    def bcast(self, buf, root: int = 0) -> None:
        h, dev = self._host(buf)
        self._wait([self.comm.Ibcast(h, root=root)], f"broadcast of {h.nbytes:,} bytes from rank {root}")
        if dev is not None:
            dev.set(h)

    def barrier(self) -> None:
        self._wait([self.comm.Ibarrier()], "barrier")

    def allgather(self, local: np.ndarray, out: np.ndarray) -> None:
        """``out[r] = local`` of rank r, for every rank (host arrays; every rank the same shape)."""
        if out.shape != (self.size,) + local.shape or out.dtype != local.dtype:
            raise ValueError(f"allgather: out must have shape {(self.size,) + local.shape} and dtype {local.dtype}, "
                             f"got {out.shape} {out.dtype}")
        self._wait([self.comm.Iallgather(local, out)], f"allgather of {local.nbytes:,} bytes per rank")

    def reduce_scatter(self, send: np.ndarray, recv: np.ndarray) -> None:
        """``recv = sum over ranks of send[rank]`` (host arrays; send is (size,) + recv.shape)."""
        if send.shape != (self.size,) + recv.shape or send.dtype != recv.dtype or not send.flags.c_contiguous:
            raise ValueError(f"reduce_scatter: send must be C-contiguous {(self.size,) + recv.shape} {recv.dtype}, "
                             f"got {send.shape} {send.dtype}")
        self._wait([self.comm.Ireduce_scatter_block(send, recv, op=self.MPI.SUM)],
                   f"reduce-scatter of {send.nbytes:,} bytes")

    def allreduce_scalars(self, values) -> np.ndarray:
        buf = np.asarray(values, dtype=np.float64).copy()
        self.allreduce_sum([buf])
        return buf

    def abort(self, message: str, code: int = 1) -> None:
        print(f"dnnpar [rank {self.rank}/{self.size}]: {message}", file=sys.stderr, flush=True)
        time.sleep(0.5)  # let mpiexec forward the message before MPI_Abort tears the job down
        self.comm.Abort(code)


class NCCLCommunicator(MPICommunicator):
    """Device buffers (CuPy) summed by NCCL; the NCCL unique id travels over MPI, which also
    carries the scalar reductions. Each rank uses GPU ``local_rank``: one GPU per rank on a node
    (more ranks than GPUs is an error; ``--comm mpi`` shares a GPU)."""

    name = "nccl"

    def __init__(self, comm=None, timeout: float = DEFAULT_TIMEOUT):
        super().__init__(comm, timeout)
        import cupy as cp
        from cupy.cuda import nccl

        self.cp, self.nccl = cp, nccl
        local = self.comm.Split_type(self.MPI.COMM_TYPE_SHARED)
        ndev = cp.cuda.runtime.getDeviceCount()
        if local.Get_size() > ndev:
            raise RuntimeError(f"NCCL: {local.Get_size()} ranks on this node but {ndev} GPU(s); NCCL needs one GPU "
                               "per rank (use --comm mpi to share a GPU)")
        self.device = local.Get_rank()
        cp.cuda.Device(self.device).use()
        # NCCL_UNIQUE_ID_BYTES = 128, sent as a plain buffer with one leading byte saying whether
        # this CuPy spells the id as bytes (CuPy >= 14) or as a tuple of ints (older)
        buf = np.zeros(129, np.uint8)
        if self.rank == 0:
            uid = nccl.get_unique_id()
            buf[0] = isinstance(uid, bytes)
            buf[1:] = np.frombuffer(uid, np.uint8) if buf[0] else np.array(uid, np.int64).astype(np.int8).view(np.uint8)
        self._wait([self.comm.Ibcast(buf, root=0)], "broadcast of the NCCL unique id")
        uid = buf[1:].tobytes() if buf[0] else tuple(int(v) for v in buf[1:].view(np.int8))
        self.nccl_comm = nccl.NcclCommunicator(self.size, uid, self.rank)
        self.stream = cp.cuda.Stream(non_blocking=True)

    def _sync(self, what: str) -> None:
        event = self.stream.record()
        self._poll(lambda: event.done, f"NCCL {what}", on_timeout=self.nccl_comm.abort)

    def allreduce_sum(self, buffers) -> None:
        cp, nccl = self.cp, self.nccl
        if any(isinstance(b, np.ndarray) for b in buffers):
            return super().allreduce_sum(buffers)  # host scalars and the like go over MPI
        cp.cuda.get_current_stream().synchronize()  # the gradients are complete
        nccl.groupStart()
        for b in buffers:
            if b.dtype != np.float32 or not b.flags.c_contiguous:
                raise ValueError("NCCL allreduce_sum: buffers must be C-contiguous float32")
            self.nccl_comm.allReduce(b.data.ptr, b.data.ptr, b.size, nccl.NCCL_FLOAT32, nccl.NCCL_SUM,
                                     self.stream.ptr)
        nccl.groupEnd()
        self._sync(f"allreduce of {len(buffers)} bucket(s)")

    # Non-blocking sums of device buffers are deferred to the wait, where they run as one grouped
    # allreduce_sum (above): the overlap is not tested on GPUs yet. A second-stream version: start =
    # the comm stream waits on an event of the compute stream and launches allReduce there; test =
    # its done event; wait = poll that event (with nccl_comm.abort on timeout, as _sync does).
    def start_allreduce_sum(self, buf):
        if isinstance(buf, np.ndarray):
            return super().start_allreduce_sum(buf)   # host buffers go over MPI
        return Communicator.start_allreduce_sum(self, buf)

    def test(self, handles) -> bool:
        host = [h for h in handles if not isinstance(h, Deferred)]
        return len(host) == len(handles) and super().test(host)

    def wait(self, handles, what: str) -> None:
        host = [h for h in handles if not isinstance(h, Deferred)]
        if host:
            super().wait(host, what)
        Communicator.wait(self, [h for h in handles if isinstance(h, Deferred)], what)

    def bcast(self, buf, root: int = 0) -> None:
        if isinstance(buf, np.ndarray):
            return super().bcast(buf, root)
        if buf.dtype != np.float32 or not buf.flags.c_contiguous:
            raise ValueError("NCCL bcast: the buffer must be C-contiguous float32")
        cp = self.cp
        cp.cuda.get_current_stream().synchronize()
        self.nccl_comm.bcast(buf.data.ptr, buf.size, self.nccl.NCCL_FLOAT32, root, self.stream.ptr)
        self._sync(f"broadcast from rank {root}")


def mpiexec(n: int) -> list[str]:
    """The command prefix that starts ``n`` ranks: the mpiexec installed beside this Python (the
    mpich wheel of ``dnnpar[dist]`` puts it there), else the one on PATH."""
    import shutil
    from pathlib import Path

    if n < 1:
        raise ValueError(f"need at least one MPI rank, got {n}")
    here = Path(sys.executable).parent / "mpiexec"
    exe = str(here) if here.exists() else shutil.which("mpiexec")
    if exe is None:
        raise FileNotFoundError("mpiexec not found: pip install 'dnnpar[dist]' (the mpich wheel brings it)")
    return [exe, "-n", str(n)]


def launched_by_mpiexec(env=None) -> bool:
    """Whether this process was started by a process manager (mpiexec / srun) rather than alone:
    MPICH's Hydra and Slurm set PMI_*, Open MPI OMPI_COMM_WORLD_* / PMIX_*."""
    env = os.environ if env is None else env
    return any(k in env for k in ("PMI_RANK", "PMI_SIZE", "PMI_FD", "PMIX_RANK", "OMPI_COMM_WORLD_SIZE",
                                  "MPI_LOCALNRANKS", "SLURM_PROCID"))


def mpi_env(base: dict | None = None, threads: int = 1) -> dict:
    """An environment for ``mpiexec`` jobs started from Python: ``threads`` BLAS/OpenMP threads per
    rank (ranks, not BLAS, should share the cores) and Open MPI allowed to start as root (a
    container's user; MPICH ignores the variables)."""
    env = dict(os.environ if base is None else base)
    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        env[k] = str(threads)
    env.update(OMPI_ALLOW_RUN_AS_ROOT="1", OMPI_ALLOW_RUN_AS_ROOT_CONFIRM="1")
    return env


COMMS = ("auto", "mpi", "nccl")


def make_communicator(kind: str = "auto", timeout: float = DEFAULT_TIMEOUT) -> Communicator:
    """``auto``: NCCL when the active backend is cuda, MPI otherwise."""
    if kind not in COMMS:
        raise ValueError(f"unknown communicator {kind!r}; choose one of {', '.join(COMMS)}")
    from ..backend import get_backend
    backend = get_backend().name
    if kind == "auto":
        kind = "nccl" if backend == "cuda" else "mpi"
    if kind == "nccl" and backend != "cuda":  # NCCL sums device buffers: say so before touching MPI
        raise ValueError(f"--comm nccl needs the cuda backend (--backend cuda, a GPU per rank) and CuPy with "
                         f"NCCL (pip install 'dnnpar[cuda13]'); the active backend is {backend!r}: use --comm mpi")
    return NCCLCommunicator(timeout=timeout) if kind == "nccl" else MPICommunicator(timeout=timeout)
