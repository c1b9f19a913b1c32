"""The one data-parallel layout: a 1-D `data` mesh over every device of every process."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

DATA_AXIS = "data"


def create_mesh() -> jax.sharding.Mesh:
    # Auto axes: jit's in/out shardings fix the layout and XLA propagates it (make_mesh defaults to Explicit).
    return jax.make_mesh((jax.device_count(),), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: jax.sharding.Mesh) -> NamedSharding:
    """Leading (batch) axis split over the `data` axis."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def check_batch_size(global_batch_size: int, field: str) -> None:
    """The global batch must split evenly over all devices."""
    devices = jax.device_count()
    if global_batch_size <= 0 or global_batch_size % devices:
        raise ValueError(
            f"{field}={global_batch_size} must be a positive multiple of the device count ({devices})."
        )


def to_global(local_batch: dict, mesh: jax.sharding.Mesh) -> dict:
    """Assembles each process's slice of a batch into one global array sharded over `data`."""
    sharding = batch_sharded(mesh)
    return {
        k: jax.make_array_from_process_local_data(sharding, np.asarray(v)) for k, v in local_batch.items()
    }
