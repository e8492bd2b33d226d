"""Parameter server on Ray: sharded servers, BSP / SSP / ASP, staleness, fault tolerance.

    result = run_parameter_server(TrainConfig(model="lenet300", subset="embedded", epochs=2, lr=0.05),
                                  workers=3, servers=2, consistency="ssp:2")
    print(result.details.render())   # result.details: the PSReport

Sharding
    The model's parameters are one float32 vector (:class:`~dnnpar.parallel.flat.ParamLayout`).
    ``S`` server actors (:class:`ShardServer`) each own one contiguous, balanced slice of it
    (:func:`shard_bounds`: sizes differ by at most one float) with its momentum buffer, and apply
    SGD (momentum, weight decay: the same rule as :class:`dnnpar.nn.optim.SGD`) to every gradient
    slice pushed to them, one push at a time, as it arrives. ``W`` worker actors
    (:class:`PSWorker`) each hold a whole model: a step pulls every shard, computes the gradient
    of one mini-batch of the worker's data, and pushes each slice to its shard.

Data
    Every epoch the training set is permuted from ``(seed, epoch)`` and cut into one contiguous,
    disjoint part per live worker; every worker runs the same number of full batches
    (``(N // W) // batch``; the few samples left over are a different random handful each epoch).
    Servers scale every pushed gradient by ``1 / W``, so that one clock (W pushes) moves the
    parameters about as far as one SGD step on the global batch ``W * batch`` (and the usual
    single-process learning rate works).
    Epochs end with a barrier: the driver waits for every worker, assembles the shards and
    evaluates the test accuracy, then sets the epoch's learning rate on the servers.

Clocks and consistency
    A worker's *clock* is the number of steps it has finished (it keeps counting over epochs).
    A server knows every worker's clock (workers send it with every pull and push) and the
    *slowest clock*: the minimum over workers still training. A pull by a worker at clock ``c``
    waits on the server until ``slowest >= c - s``:

    - ``"bsp"``   s = 0: nobody starts step t+1 before every worker has pushed step t
    - ``"ssp:s"`` a worker may run at most ``s`` clocks ahead of the slowest one
    - ``"asp"``   no wait at all

Staleness (in clocks, so that the bounds above are assertions, not hopes)
    A pull returns the shard's slowest clock ``m``: the parameters hold every worker's updates of
    clocks ``< m``. The gradient computed at clock ``c`` from them is applied as an update of
    clock ``c``, so it may miss other workers' updates of clocks ``m .. c-1``; its staleness is
    ``c - m`` (the server's clock version it belongs to minus the clock version it pulled). BSP
    gives 0 for every gradient, SSP:s at most s, ASP whatever the speeds make it. Counting raw
    updates instead would charge BSP with the W-1 pushes of its own clock that land between a
    pull and a push; that number is reported too, as the *update lag* histogram.

Faults
    - A dead worker (SIGKILL, crash): its epoch call fails, the driver *retires* it on every
      server (so BSP / SSP stop waiting for its clock) and the epoch finishes with the others.
      The rest of the dead worker's part of that epoch is dropped; from the next epoch on the
      training set is split over the survivors, each taking a batch of ``W * batch / W_live``
      (the global batch of a clock stays the same), so later epochs lose no data and take as
      many clocks as before.
    - A dead server: Ray restarts the actor (``max_restarts``); its ``__init__`` finds the shard's
      checkpoint (``shard-K.npz`` under the run directory, written atomically every
      ``checkpoint_every`` updates and on every retire; npz, loaded with ``allow_pickle=False``)
      and resumes from it. Updates applied after that checkpoint are lost. Workers retry a
      failed call for :data:`RETRY_SECONDS`; pushes carry their clock, so a retried push that the
      checkpoint already holds is acknowledged without being applied twice. A restarted shard
      knows no clock until each worker calls again, except those of workers that already ended
      their epoch (``finish_epoch``, checkpointed on arrival), so a BSP / SSP pull never waits for
      a worker that has nothing more to send; should anything still stall, the driver raises after
      :data:`STALL_SECONDS` without an update rather than hang. Lost updates per shard
      = pushes acknowledged to workers - updates the shard finally holds.

Fault injection (tests, demos): ``fail={"worker": w, "after_steps": k}`` SIGKILLs worker w's
process once it has pushed k steps; ``fail={"server": k, "after_updates": u}`` SIGKILLs shard k's
process once it has applied u updates. The driver sends the signal itself, so the actors must
run on the driver's machine (always so for a local Ray).

The package, by concern: :mod:`.consistency` (modes, shard bounds, histograms), :mod:`.server`
(:class:`ShardServer`), :mod:`.worker` (:class:`PSWorker`), :mod:`.cluster` (Ray: connect,
retrying calls, the raylet watch) and :mod:`.driver` (:func:`run_parameter_server`, :class:`PSReport`).
"""
from .cluster import (CONNECT_TIMEOUT, MAX_RAY_TEMP_DIR, RETRY_SECONDS, _call_server, _import_ray,  # noqa: F401
                      check_address, connect, ray_temp_dir)
from .consistency import Consistency, parse_consistency, render_histogram, shard_bounds
from .driver import STALL_SECONDS, ParameterServer, PSReport, run_parameter_server
from .server import ShardServer
from .worker import PSWorker

__all__ = ["CONNECT_TIMEOUT", "MAX_RAY_TEMP_DIR", "RETRY_SECONDS", "STALL_SECONDS", "Consistency", "ParameterServer", "PSReport",
           "PSWorker", "ShardServer", "check_address", "connect", "parse_consistency", "ray_temp_dir",
           "render_histogram", "run_parameter_server", "shard_bounds"]
