"""Device meshes and the one table that maps logical axis names to mesh axes.

Every parameter in efflax carries logical axis names (``nn.with_logical_partitioning``); this
module is the only place that turns them into mesh axes. Meshes have the axes
``('data', 'expert', 'model')``; a batch is split over ``data`` and ``expert`` together (expert
parallelism reuses the data-parallel devices, as in GShard/Switch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from pallas_kernels._compat import shard_map  # noqa: F401 - re-exported as efflax.sharding.shard_map

MESH_AXES = ("data", "expert", "model")
BATCH_AXES = ("data", "expert")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", BATCH_AXES),
    ("length", None),
    ("embed", None),
    ("mlp", "model"),
    ("heads", "model"),
    ("kv_heads", "model"),
    ("kv", None),
    ("joined_kv", "model"),
    ("vocab", "model"),
    ("classes", None),
    ("expert", "expert"),
    ("expert_mlp", "model"),
    ("monarch_blocks", "model"),
    ("channels", None),
    ("conv_window", None),
)


def make_mesh(
    *,
    data: int | None = None,
    expert: int = 1,
    model: int = 1,
    devices: Sequence[Any] | None = None,
) -> Mesh:
    """Builds a ``('data', 'expert', 'model')`` mesh.

    Args:
      data: size of the data axis; ``None`` takes every device left after expert and model.
      expert: size of the expert axis.
      model: size of the model (tensor-parallel) axis.
      devices: devices to use (default ``jax.devices()``).

    Returns:
      A ``jax.sharding.Mesh`` with the three named axes.
    """
    devices = list(jax.devices() if devices is None else devices)
    for name, size in (("expert", expert), ("model", model)):
        if size < 1:
            raise ValueError(f"{name}={size} must be >= 1")
    if data is None:
        if len(devices) % (expert * model):
            raise ValueError(
                f"expert*model={expert * model} does not divide the {len(devices)} devices"
            )
        data = len(devices) // (expert * model)
    if data < 1:
        raise ValueError(f"data={data} must be >= 1")
    needed = data * expert * model
    if needed > len(devices):
        raise ValueError(
            f"mesh data={data} x expert={expert} x model={model} needs {needed} devices, "
            f"only {len(devices)} available"
        )
    grid = np.asarray(devices[:needed], dtype=object).reshape(data, expert, model)
    return Mesh(grid, MESH_AXES)


def logical_to_mesh_spec(logical: Sequence[str | None] | None) -> PartitionSpec:
    """Maps a tuple of logical axis names to a ``PartitionSpec`` with the rules above."""
    if logical is None:
        return PartitionSpec()
    return nn.logical_to_mesh_axes(tuple(logical), LOGICAL_AXIS_RULES)


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(mesh, PartitionSpec())


def data_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding of an array whose leading axis is the batch."""
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    return NamedSharding(mesh, PartitionSpec(axes, *([None] * (ndim - 1))))


def params_shardings(params: Any, mesh: Mesh) -> Any:
    """``NamedSharding`` per leaf of a params tree, from the logical names it carries.

    Leaves without logical names (plain arrays) are replicated.
    """
    specs = nn.get_partition_spec(params)
    mesh_specs = nn.logical_to_mesh(specs, LOGICAL_AXIS_RULES)
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        mesh_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def shard_params(params: Any, mesh: Mesh) -> Any:
    """Places a (possibly logically boxed) params tree on ``mesh`` and unboxes it."""
    shardings = params_shardings(params, mesh)
    return jax.device_put(nn.unbox(params), shardings)


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Splits every array of ``batch`` along its leading (batch) axis over the mesh.

    Raises:
      ValueError: if the batch size does not divide over the data-parallel devices.
    """
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    ways = math.prod(mesh.shape[a] for a in axes)

    def put(x):
        x = np.asarray(x) if not isinstance(x, jax.Array) else x
        if x.ndim == 0 or x.shape[0] % ways:
            raise ValueError(
                f"batch leading dim {x.shape[:1]} must divide over {ways} data-parallel devices"
            )
        return jax.device_put(x, data_sharding(mesh, x.ndim))

    return jax.tree.map(put, batch)
