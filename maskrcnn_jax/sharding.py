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


def maybe_initialize_distributed() -> None:
    """Calls ``jax.distributed.initialize()`` where the platform provides it.

    Cloud TPU VMs of a pod slice and SLURM / Open MPI launches configure
    themselves; on a single machine nothing happens. Set
    ``MASKRCNN_JAX_DISTRIBUTED=0`` to skip it, ``=1`` to force it.
    """
    flag = os.environ.get("MASKRCNN_JAX_DISTRIBUTED", "auto")
    if flag == "0":
        return
    tpu_pod = "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")
    launcher = any(
        k in os.environ for k in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "JAX_COORDINATOR_ADDRESS")
    )
    if flag == "1" or tpu_pod or launcher:
        jax.distributed.initialize()


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
