"""Ray, as the parameter server uses it: importing it (an optional extra), a local Ray's
session folder, joining a cluster, calls that survive a restarting actor, and the raylet watch.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

from ...backend.sources import cache_dir

#: how long a worker keeps retrying a call to a server that died (Ray restarts it meanwhile)
RETRY_SECONDS = 60.0
#: how long the driver waits for a TCP answer from a Ray address before giving up
CONNECT_TIMEOUT = 5.0
#: the longest Ray temp dir we use: Ray puts unix sockets at
#: <dir>/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store (about 64 characters more), and
#: a socket path longer than 107 characters is refused by the kernel
MAX_RAY_TEMP_DIR = 40


def _import_ray():
    try:
        import ray
    except ImportError as e:
        raise ImportError("the parameter server needs Ray: pip install dnnpar[dist]") from e
    return ray


def ray_temp_dir(out=print) -> str:
    """Where a local Ray keeps its session: ``cache_dir("ray")``, or a short folder under the
    system temp dir when that path would make Ray's unix socket paths too long."""
    root = Path(os.environ.get("DNNPAR_CACHE", Path.home() / ".cache" / "dnnpar")) / "ray"
    if len(str(root)) <= MAX_RAY_TEMP_DIR:
        return str(cache_dir("ray"))
    short = Path(tempfile.gettempdir()) / f"dnnpar-ray-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    short.mkdir(parents=True, exist_ok=True)
    out(f"note: {root} is too long for Ray's socket paths ({len(str(root))} > {MAX_RAY_TEMP_DIR} characters); "
        f"using {short} for Ray's session files")
    return str(short)


def check_address(address: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Fail fast (ConnectionError) when ``host:port`` or ``ray://host:port`` does not answer TCP."""
    m = re.fullmatch(r"(?:ray://)?\[?([^\]\s]+?)\]?:(\d+)", address.strip())
    if not m:
        if address.strip() == "auto":
            return
        raise ValueError(f"Ray address {address!r}: expected 'host:port', 'ray://host:port' or 'auto'")
    host, port = m.group(1), int(m.group(2))
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        which = ("Ray client server port (10001 by default)" if address.strip().startswith("ray://")
                 else "GCS port (6379 by default)")
        raise ConnectionError(
            f"no Ray cluster answers at {address} ({e}; waited {timeout:g} s). Check that `ray start --head` "
            f"runs on {host}, that {port} is its {which}, and that no firewall blocks it") from None


def connect(address: str | None = None, out=print) -> bool:
    """Start a local Ray (address None) or join the cluster at ``address``; nothing when Ray is
    already initialized in this process. Returns True when this call started or joined it (the
    caller then shuts it down)."""
    ray = _import_ray()
    if address is not None:
        check_address(address)
    if ray.is_initialized():
        return False
    if address is None:
        ray.init(_temp_dir=ray_temp_dir(out), include_dashboard=False, log_to_driver=False,
                 logging_level="warning")
    else:
        try:
            ray.init(address=address, log_to_driver=False, logging_level="warning")
        except (ConnectionError, RuntimeError) as e:
            raise ConnectionError(
                f"could not join the Ray cluster at {address}: {e}\nCheck that it is a Ray head node of the same "
                "Ray version, and, where the cluster uses token authentication, that this machine has its token "
                "(RAY_AUTH_TOKEN or ~/.ray/auth_token) and RAY_AUTH_MODE=token") from e
        nodes = [nd for nd in ray.nodes() if nd.get("Alive")]
        out(f"joined the Ray cluster at {address}: {len(nodes)} node(s), "
            f"{ray.cluster_resources().get('CPU', 0):g} CPUs")
    return True


def _call_server(ray, server, method: str, *args, retry_s: float = RETRY_SECONDS):
    from ray.exceptions import RayActorError

    deadline = time.monotonic() + retry_s
    while True:
        try:
            return ray.get(getattr(server, method).remote(*args), timeout=retry_s)
        except RayActorError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _watch_raylet(ray, on_loss):
    """Watch this process's local raylet, if it started one; when it dies, call ``on_loss`` with
    a one-line message (from a watcher thread: Ray's driver exits on its own a few seconds after
    its raylet, with nothing but Ray's log, so the caller must say what happened first). Returns
    the Event that stops the watch (set it before ``ray.shutdown``, which ends the raylet), or None."""
    node = getattr(getattr(ray, "_private", None) and ray._private.worker, "_global_node", None)
    procs = getattr(node, "all_processes", {}).get("raylet") if node is not None else None
    if not procs or getattr(procs[0], "process", None) is None:
        return None
    proc, stop = procs[0].process, threading.Event()

    def watch():
        while not stop.wait(0.25):
            if proc.poll() is not None:
                code = proc.returncode
                how = (f"killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
                       else f"exited with code {code}")
                on_loss(f"parameter server: Ray's raylet (pid {proc.pid}) {how}; the workers and shards it ran "
                        "are gone, so the run stops")
                return

    threading.Thread(target=watch, name="dnnpar-raylet-watch", daemon=True).start()
    return stop
