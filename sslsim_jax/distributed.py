"""Devices and hosts: the mesh, the shardings the pipeline uses, and multi-host start-up.

The only module that names devices. Everything else receives a `jax.sharding.Mesh` with a
``"data"`` axis and a ``"stats"`` axis and places arrays with the shardings built here::

    distributed.initialize("10.0.0.1:1234", num_processes=2, process_id=0)  # multi-host only
    mesh = distributed.make_mesh()                 # every local device of every process
    batch = distributed.shard_batch(local_batch, mesh)   # [B_local, ...] -> global [B, ...]
    params = jax.device_put(params, distributed.replicated(mesh))

Batches are split over ``"data"`` along their leading (utterance) axis and copied along
``"stats"``. Statistics stay replicated, so a jitted update that reduces a sharded batch into
replicated statistics makes XLA insert the cross-device (and cross-host) reduction; or, with
``stat_shards`` S > 1, the joint co-moment is split by rows over the S devices of ``"stats"``
(`sslsim_jax.sharded`). No ``pmap``.

A mesh over several processes uses the same number of local devices in every process (the
first ``devices`` of each), so a global batch is the concatenation of the processes' local
batches in process order. The analysis itself (`sslsim_jax.analysis`) runs every process on a
``local=True`` mesh over its own share of the audio and merges the statistics across processes
once at the end, so processes never wait on each other batch by batch. Run the work of a
multi-process run under `exit_on_failure`, so that one failing process ends the run at once.
"""

from __future__ import annotations

import contextlib
import os
import sys
import traceback
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

__all__ = [
    "DATA",
    "STATS",
    "allgather_json",
    "batch_multiple",
    "data_sharding",
    "exit_now",
    "exit_on_failure",
    "fetch_replicated",
    "initialize",
    "make_mesh",
    "replicated",
    "row_sharding",
    "settle",
    "shard_batch",
]

DATA = "data"
STATS = "stats"
AUTO = "auto"


def initialize(
    coordinator: str | None = None,
    *,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_seconds: int = 300,
) -> bool:
    """Joins a multi-process run (``jax.distributed.initialize``); call before any computation.

    Args:
        coordinator: ``"HOST:PORT"`` of process 0's coordination service; ``"auto"`` lets JAX
            read the cluster from the environment (Cloud TPU VMs, SLURM, Open MPI); None runs
            a single process and does nothing.
        num_processes: the number of processes (required with an explicit ``coordinator``).
        process_id: this process's index in ``[0, num_processes)`` (required with an explicit
            ``coordinator``).
        timeout_seconds: how long to wait for the other processes to join.

    Returns:
        True when a multi-process run was joined.

    Raises:
        ValueError: inconsistent settings; the message names the flag.
    """
    if coordinator is None:
        if num_processes not in (None, 1) or process_id not in (None, 0):
            raise ValueError(
                "--num-processes/--process-id: need --coordinator HOST:PORT (or 'auto')"
            )
        return False
    if coordinator != AUTO:
        if num_processes is None or process_id is None:
            raise ValueError(
                f"--coordinator {coordinator}: also give --num-processes and --process-id"
            )
        if num_processes < 1:
            raise ValueError(f"--num-processes: expected >= 1, got {num_processes}")
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process-id: expected 0 <= id < {num_processes} (--num-processes), "
                f"got {process_id}"
            )
        host, _, port = coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"--coordinator: expected HOST:PORT, got {coordinator!r}")
    # CPU collectives across processes need gloo, chosen before the backend starts; the
    # setting only concerns the CPU backend, so it is harmless on GPU and TPU hosts.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {"initialization_timeout": timeout_seconds}
    if coordinator != AUTO:
        kwargs |= dict(
            coordinator_address=coordinator, num_processes=num_processes, process_id=process_id
        )
    jax.distributed.initialize(**kwargs)
    global _joined
    _joined = True
    return True


_joined = False


def joined() -> bool:
    """Whether this process joined a multi-process run through `initialize`."""
    return _joined


def settle(tree: Any) -> Any:
    """``tree`` once the computations producing it have finished, in a multi-process CPU run;
    ``tree`` at once otherwise.

    A multi-process CPU run does its collectives through gloo, and with several gloo programs
    in flight over a process's own devices, one process can wait forever: two processes with
    two CPU devices each, running small all-reduce programs over their own devices 20 at a
    time, hung in every run (a CI run of the two-process test did too), while one at a time
    never did, nor did 20 at a time in one process (XLA's in-process collectives). Code that
    dispatches collective programs one after another settles each before the next.
    """
    if _joined and jax.default_backend() == "cpu":
        jax.block_until_ready(tree)
    return tree


def exit_now(code: int) -> None:
    """Ends this process at once with ``code`` (streams flushed, no clean-up).

    For a failed process of a multi-process run: a normal exit waits in JAX's shutdown barrier
    for the other processes, which wait in their next collective for this one, so the whole
    run would hang for the barrier's 5 minutes. Gone, this process makes the others'
    collectives fail within seconds.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


@contextlib.contextmanager
def exit_on_failure() -> Iterator[None]:
    """In a joined multi-process run, an exception in the block prints its traceback and ends
    the process at once (`exit_now` with status 1) instead of propagating; outside one it
    propagates as usual. The CLI runs every command so; from Python::

        distributed.initialize(...)
        with distributed.exit_on_failure():
            analyze(...)
    """
    try:
        yield
    except BaseException:
        if not _joined:
            raise
        traceback.print_exc()
        exit_now(1)


def make_mesh(devices: int | None = None, *, local: bool = False, stat_shards: int = 1) -> Mesh:
    """A mesh ``("data", "stats")`` over the first ``devices`` local devices of each process.

    Args:
        devices: local devices per process (None: all of them).
        local: this process's devices only (the analysis runs each process on its own part of
            the audio and merges statistics across processes at the end).
        stat_shards: size of the ``"stats"`` axis, the devices one copy of the joint statistics
            is split over (consecutive devices); must divide ``devices``.

    Returns:
        A `Mesh` of ``devices * jax.process_count()`` devices, ordered by process, shaped
        [devices / stat_shards, stat_shards], with ``Auto`` axis types (shardings are propagated
        by the compiler, not checked by types).

    Raises:
        ValueError: ``devices`` is not in ``[1, jax.local_device_count()]`` or not a multiple of
            ``stat_shards``; names the argument.
    """
    available = jax.local_device_count()
    if devices is None:
        devices = available
    if not 1 <= devices <= available:
        raise ValueError(
            f"devices: expected 1 <= N <= {available} (local {jax.default_backend()} devices), "
            f"got {devices}"
        )
    if stat_shards < 1 or devices % stat_shards:
        raise ValueError(
            f"stat_shards: expected a divisor of the {devices} devices (devices), got {stat_shards}"
        )
    chosen = []
    for p in [jax.process_index()] if local else range(jax.process_count()):
        mine = sorted((d for d in jax.devices() if d.process_index == p), key=lambda d: d.id)
        chosen.extend(mine[:devices])
    shape = (len(chosen) // stat_shards, stat_shards)
    return jax.make_mesh(shape, (DATA, STATS), axis_types=(AxisType.Auto,) * 2, devices=chosen)


def data_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (utterance or frame) axis split over ``"data"``, the rest whole (and copied
    along ``"stats"``)."""
    return NamedSharding(mesh, PartitionSpec(DATA))


def replicated(mesh: Mesh) -> NamedSharding:
    """A full copy on every device of the mesh (params, statistics)."""
    return NamedSharding(mesh, PartitionSpec())


def row_sharding(mesh: Mesh, leading: int = 0) -> NamedSharding:
    """Axis ``leading`` split over ``"stats"`` (rows of sharded statistics), copied along
    ``"data"``."""
    return NamedSharding(mesh, PartitionSpec(*([None] * leading), STATS))


def batch_multiple(mesh: Mesh) -> int:
    """Local batches must hold a multiple of this many utterances: this process's devices
    along ``"data"``."""
    local = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
    return local // mesh.shape[STATS]


def shard_batch(local: np.ndarray, mesh: Mesh) -> jax.Array:
    """A global array split over ``"data"`` from this process's part.

    Args:
        local: [B_local, ...] this process's rows; ``B_local`` a multiple of
            ``batch_multiple(mesh)`` and equal in every process.

    Returns:
        [B_local * process_count, ...] global array, rows in process order.
    """
    local = np.asarray(local)
    if local.shape[0] % batch_multiple(mesh):
        raise ValueError(
            f"expected a leading axis divisible by {batch_multiple(mesh)} local devices, "
            f"got shape {local.shape}"
        )
    return jax.make_array_from_process_local_data(data_sharding(mesh), local)


def fetch_replicated(tree: Any) -> Any:
    """Host (numpy) copies of the arrays in ``tree``, from this process's devices.

    Replicated arrays are read from one device, which works for arrays that span several
    processes, where ``np.asarray`` would not; arrays split over this process's devices (sharded
    statistics on a local mesh) are assembled. Further work on the copies (the metrics) then
    runs once, on the default device, rather than replicated on every device of the mesh.
    """

    def fetch(x):
        if not isinstance(x, jax.Array):
            return x
        if x.is_fully_replicated:
            return np.asarray(x.addressable_data(0))
        if x.is_fully_addressable:
            return np.asarray(x)
        raise ValueError(f"expected a replicated or process-local array, got {x.sharding}")

    return jax.tree.map(fetch, tree)


def allgather_json(value: Any) -> list[Any]:
    """Every process's ``value`` (JSON-serialisable), in process order; ``[value]`` alone."""
    if jax.process_count() == 1:
        return [value]
    import json

    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(value).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.array([len(data)])))[:, 0]
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[: len(data)] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))  # [P, max size]
    return [json.loads(bytes(row[:n])) for row, n in zip(gathered, sizes, strict=True)]
