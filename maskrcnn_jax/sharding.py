"""Device mesh and NamedSharding helpers (the current form of pjit).

One mesh axis, ``data``: the global batch is split over it and the train
state is replicated. Multi-host runs (Cloud TPU pods, multi-node GPU) start
with :func:`maybe_initialize_distributed`; each host then feeds its own slice
of the global batch and :func:`global_batch` assembles the global array.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def maybe_initialize_distributed(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    timeout_s: int | None = None,
) -> None:
    """Joins a multi-process JAX run: explicitly, or where the platform provides it.

    With ``coordinator_address`` (``HOST:PORT`` of process 0; the CLI's
    ``--coordinator_address``), ``num_processes`` and ``process_id`` the
    processes meet there (a GPU cluster, or several CPU processes on one
    machine for tests). Without them, Cloud TPU VMs of a pod slice and SLURM /
    Open MPI launches configure themselves, and on a single machine nothing
    happens; ``MASKRCNN_JAX_DISTRIBUTED=0`` skips that auto-detection, ``=1``
    forces it. A second call, once initialised, does nothing.

    Cross-process collectives of the CPU backend use gloo (the setting is
    read by the CPU backend only). ``timeout_s`` bounds joining (an
    unreachable coordinator), the heartbeat after which a silent process is
    declared dead (so the others exit instead of waiting forever) and the
    shutdown barrier; JAX's defaults (300 s / 100 s / 300 s) apply otherwise.

    Raises:
      ValueError: one line naming the flag and value: a ``process_id`` outside
        ``0..num_processes-1``, missing companions of ``coordinator_address``,
        or a coordinator that could not be joined within the timeout.
    """
    if jax.distributed.is_initialized():
        return
    timeouts = {}
    if timeout_s is not None:
        if timeout_s < 1:
            raise ValueError(f"--distributed_timeout={timeout_s} must be at least 1 second")
        timeouts = dict(
            initialization_timeout=int(timeout_s),
            heartbeat_timeout_seconds=int(timeout_s),
            shutdown_timeout_seconds=int(timeout_s),
        )
    if coordinator_address:
        if num_processes is None or process_id is None:
            raise ValueError(
                f"--coordinator_address={coordinator_address} needs --num_processes and "
                "--process_id too"
            )
        if num_processes < 1:
            raise ValueError(f"--num_processes={num_processes} must be at least 1")
        if not 0 <= process_id < num_processes:
            raise ValueError(
                f"--process_id={process_id} is not in 0..{num_processes - 1} "
                f"(--num_processes={num_processes})"
            )
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        if process_id != 0:  # jaxlib aborts the process on a join timeout: check first.
            _wait_for_coordinator(coordinator_address, timeout_s or 300)
        try:
            jax.distributed.initialize(
                coordinator_address, num_processes, process_id, **timeouts
            )
        except Exception as e:  # jaxlib raises XlaRuntimeError & co. with long texts
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise ValueError(
                f"--coordinator_address={coordinator_address}: process {process_id} could not "
                f"join within {timeout_s or 300} s ({type(e).__name__}: {first[:200]})"
            ) from e
        return
    if num_processes is not None or process_id is not None:
        raise ValueError("--num_processes / --process_id need --coordinator_address")
    flag = os.environ.get("MASKRCNN_JAX_DISTRIBUTED", "auto")
    if flag == "0":
        return
    tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    launcher = any(
        k in os.environ for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")
    )
    if flag == "1" or tpu_pod or launcher:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(**timeouts)


def _wait_for_coordinator(address: str, timeout_s: int) -> None:
    """Polls ``HOST:PORT`` until it accepts a TCP connection; one-line ValueError after the timeout."""
    import socket
    import time

    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1):
                return
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                raise ValueError(
                    f"--coordinator_address={address}: no coordinator reachable within "
                    f"--distributed_timeout={timeout_s} s"
                ) from None
            time.sleep(0.5)


def wait_for_processes(name: str, timeout_s: int = 1800) -> None:
    """Waits until every process gets here, through the coordination service (no collective).

    Used before the first cross-process collective: gloo gives a peer only 30 s to
    join a new communicator, less than the spread of compile times between processes
    on a loaded machine. A dead process is still detected by the heartbeat.
    """
    if jax.process_count() > 1:
        from jax._src import distributed  # No public barrier without a collective.

        distributed.global_state.client.wait_at_barrier(name, timeout_s * 1000)


def make_mesh(num_devices: int | None = None) -> Mesh:
    """A 1-D mesh over the first ``num_devices`` devices (all by default)."""
    devices = jax.devices()
    if num_devices is not None:
        if num_devices > len(devices):
            raise ValueError(f"asked for {num_devices} devices, only {len(devices)} exist")
        devices = devices[:num_devices]
    return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over ``data``; other axes whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_size(global_batch_size: int, mesh: Mesh) -> None:
    n = mesh.shape[DATA_AXIS]
    if global_batch_size % n:
        raise ValueError(
            f"train.batch_size={global_batch_size} is not divisible by the {n} devices of the mesh"
        )


def global_batch(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Assembles each host's slice of the batch into global sharded arrays.

    Args:
      local_batch: this process's examples, leading axis = global batch /
        process count.
    """
    sharding = data_sharded(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
        for k, v in local_batch.items()
    }


def tree_replicated(tree: Any, mesh: Mesh) -> Any:
    return jax.tree.map(lambda _: replicated(mesh), tree)
