"""Device meshes and the one table that maps logical axis names to mesh axes.

Every parameter in efflax carries logical axis names (``nn.with_logical_partitioning``); this
module is the only place that turns them into mesh axes. Meshes have the axes
``('data', 'expert', 'model')``; a batch is split over ``data`` and ``expert`` together (expert
parallelism reuses the data-parallel devices, as in GShard/Switch).

Any mesh whose axes are named from ``MESH_AXES`` works, including one from ``jax.make_mesh``
(whose axes are ``Explicit`` by default in JAX >= 0.10) and one that lacks some of the axes
(a logical name mapped to a missing mesh axis is replicated). efflax shards with XLA's automatic
partitioner, so what it places goes on the ``Auto`` version of the mesh (same devices, same
names, see :func:`auto_axes`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from pallas_kernels import _checks
from pallas_kernels import _compat
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

Rules = Sequence[tuple[str, Any]]


def _check_rules(rules: Rules) -> None:
    """``rules`` must be a sequence of ``(logical name, mesh axis or axes or None)`` pairs."""
    ok = not isinstance(rules, str | bytes) and isinstance(rules, Sequence)
    for rule in rules if ok else ():
        if not (isinstance(rule, Sequence) and len(rule) == 2 and isinstance(rule[0], str)):
            ok = False
            break
        target = rule[1]
        if not (
            target is None
            or isinstance(target, str)
            or (isinstance(target, Sequence) and all(isinstance(a, str) for a in target))
        ):
            ok = False
            break
    if not ok:
        raise ValueError(
            f"rules={rules!r} must be a sequence of (logical_name, mesh_axis) pairs, like "
            "efflax.sharding.LOGICAL_AXIS_RULES"
        )


def _check_mesh_type(mesh: Any) -> None:
    if not isinstance(mesh, Mesh):
        raise ValueError(f"mesh={mesh!r} must be a jax.sharding.Mesh")


def _rule_targets(rules: Rules) -> set[str]:
    targets: set[str] = set()
    for _, target in rules:
        if isinstance(target, str):
            targets.add(target)
        elif target is not None:
            targets.update(target)
    return targets


def auto_axes(mesh: Mesh) -> Mesh:
    """``mesh`` with every axis of type ``Auto`` (the same mesh if it already is).

    ``jax.make_mesh`` gives ``Explicit`` axes by default (JAX >= 0.10), under which a matmul that
    contracts a sharded axis needs a hand-written output sharding; efflax leaves that to XLA's
    partitioner, so it places arrays on this equivalent mesh.
    """
    _check_mesh_type(mesh)
    return _compat.auto_axes(mesh)


def check_mesh(mesh: Mesh, rules: Rules = LOGICAL_AXIS_RULES) -> Mesh:
    """The ``Auto`` version of ``mesh``, after checking that the logical table can use it.

    Raises:
      ValueError: a mesh axis of size > 1 that no rule maps to (its devices would only hold
        copies), or a mesh with none of the batch axes.
    """
    mesh = auto_axes(mesh)
    _check_rules(rules)
    used = _rule_targets(rules)
    unused = [a for a in mesh.axis_names if a not in used and mesh.shape[a] > 1]
    if unused:
        raise ValueError(
            f"mesh axis {unused[0]!r} (of mesh axes {tuple(mesh.axis_names)}) is not used by the "
            f"logical-axis table, so its {mesh.shape[unused[0]]} devices would hold copies; name "
            f"the mesh axes from {MESH_AXES} (e.g. jax.make_mesh((8,), ('data',)))"
        )
    return mesh


def make_mesh(
    *,
    data: int | None = None,
    expert: int = 1,
    model: int = 1,
    devices: Sequence[Any] | None = None,
    dcn: Sequence[int] | None = None,
) -> Mesh:
    """Builds a ``('data', 'expert', 'model')`` mesh, following the topology across hosts.

    In one process the devices are laid out in order. With several processes (one per host,
    see ``efflax.distributed``), the mesh is built with
    ``jax.experimental.mesh_utils.create_hybrid_device_mesh``: each host's devices form the
    fast (ICI/NVLink) part of every axis and the hosts are laid out over the slow (DCN) part,
    ``dcn`` hosts along ``(data, expert, model)``.

    Args:
      data: size of the data axis; ``None`` takes every device left after expert and model.
      expert: size of the expert axis.
      model: size of the model (tensor-parallel) axis.
      devices: devices to use (default ``jax.devices()``, every process's devices).
      dcn: hosts (processes) along each axis, e.g. ``(2, 1, 1)``; default: as many as
        possible along ``data``, then ``expert``, then ``model``. Only with several processes.

    Returns:
      A ``jax.sharding.Mesh`` with the three named axes (``Auto`` axis types).

    Example:
      >>> mesh = make_mesh(expert=4)  # 8 devices: data 2 x expert 4
    """
    if devices is not None and (
        isinstance(devices, str | bytes | jax.Device) or not isinstance(devices, Iterable)
    ):
        raise ValueError(f"devices={devices!r} must be a list of jax devices (jax.devices())")
    devices = list(jax.devices() if devices is None else devices)
    if not devices:
        raise ValueError("devices=[] must hold at least one device")
    for i, device in enumerate(devices):
        if not isinstance(device, jax.Device):
            raise ValueError(f"devices[{i}]={device!r} must be a jax device (from jax.devices())")
    if len(set(devices)) != len(devices):
        raise ValueError(f"devices={devices!r} lists a device twice")
    expert = _checks.int_at_least("expert", expert)
    model = _checks.int_at_least("model", model)
    if data is not None:
        data = _checks.int_at_least("data", data)
    if dcn is not None:
        if isinstance(dcn, str | bytes) or not isinstance(dcn, Sequence):
            raise ValueError(
                f"dcn={dcn!r} must be three ints >= 1 (hosts along data, expert, model)"
            )
        dcn = tuple(dcn)
        if len(dcn) != 3 or any(
            isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1 for n in dcn
        ):
            raise ValueError(f"dcn={dcn} must be three ints >= 1 (hosts along data, expert, model)")
        dcn = tuple(int(n) for n in dcn)
    if data is None:
        if len(devices) % (expert * model):
            raise ValueError(
                f"expert*model={expert * model} does not divide the {len(devices)} devices"
            )
        data = len(devices) // (expert * model)
    _checks.int_at_least("data", data)
    needed = data * expert * model
    if needed > len(devices):
        raise ValueError(
            f"mesh data={data} x expert={expert} x model={model} needs {needed} devices, "
            f"only {len(devices)} available"
        )
    devices = devices[:needed]
    processes = sorted({d.process_index for d in devices})
    if len(processes) == 1:
        if dcn is not None and tuple(dcn) != (1, 1, 1):
            raise ValueError(f"dcn={tuple(dcn)} needs devices of several processes")
        grid = np.asarray(devices, dtype=object).reshape(data, expert, model)
        return Mesh(grid, MESH_AXES)

    from jax.experimental import mesh_utils

    shape = (data, expert, model)
    dcn = _default_dcn(shape, len(processes)) if dcn is None else tuple(dcn)
    if len(dcn) != 3 or any(not isinstance(n, int) or n < 1 for n in dcn):
        raise ValueError(f"dcn={dcn} must be three ints >= 1 (hosts along data, expert, model)")
    if math.prod(dcn) != len(processes) or any(s % n for s, n in zip(shape, dcn, strict=True)):
        raise ValueError(
            f"dcn={dcn} must multiply to the {len(processes)} processes and divide the mesh "
            f"shape data={data}, expert={expert}, model={model}"
        )
    per_host = tuple(s // n for s, n in zip(shape, dcn, strict=True))
    grid = mesh_utils.create_hybrid_device_mesh(
        per_host, dcn, devices, process_is_granule=True, allow_split_physical_axes=True
    )
    return Mesh(grid, MESH_AXES)


def _default_dcn(shape: tuple[int, int, int], processes: int) -> tuple[int, int, int]:
    """Hosts along (data, expert, model): as many as possible on data, then expert, then model."""
    remaining, dcn = processes, []
    for size in shape:
        along = math.gcd(size, remaining)
        dcn.append(along)
        remaining //= along
    if remaining != 1:
        raise ValueError(
            f"cannot lay {processes} processes over the mesh data={shape[0]} x expert="
            f"{shape[1]} x model={shape[2]}; pass dcn= or change the axis sizes"
        )
    return tuple(dcn)


def _check_logical(logical: Sequence[str | None], rules: Rules) -> None:
    named = [name for name in logical if name is not None]
    if len(set(named)) != len(named):
        raise ValueError(
            f"logical={tuple(logical)!r} names an axis twice; each logical name may shard one "
            "dimension (use None for the others)"
        )
    known = {name for name, _ in rules}
    for name in logical:
        if name is not None and name not in known:
            raise ValueError(
                f"logical axis {name!r} is not in the logical-axis table (known: "
                f"{sorted(known)}); fix the name or pass rules=LOGICAL_AXIS_RULES + "
                f"(({name!r}, mesh_axis_or_None),)"
            )


def _drop_missing_axes(spec: PartitionSpec, mesh: Mesh | None) -> PartitionSpec:
    """Mesh axes ``mesh`` lacks are dropped: that dimension is replicated over them."""
    if mesh is None:
        return spec
    names = set(mesh.axis_names)

    def keep(entry):
        if entry is None:
            return None
        if isinstance(entry, str):
            return entry if entry in names else None
        kept = tuple(a for a in entry if a in names)
        return kept if len(kept) > 1 else (kept[0] if kept else None)

    return PartitionSpec(*(keep(e) for e in spec))


def logical_to_mesh_spec(
    logical: Sequence[str | None] | None,
    *,
    mesh: Mesh | None = None,
    rules: Rules = LOGICAL_AXIS_RULES,
) -> PartitionSpec:
    """Maps a tuple of logical axis names to a ``PartitionSpec`` with the rules above.

    Args:
      logical: logical names (``None`` = replicated dimension).
      mesh: if given, mesh axes it does not have are dropped (replicated).
      rules: the logical-axis table (default ``LOGICAL_AXIS_RULES``).

    Raises:
      ValueError: a name that is not in the table (a typo must not silently replicate).
    """
    if logical is None:
        return PartitionSpec()
    if isinstance(logical, str):
        raise ValueError(f"logical={logical!r} must be a tuple of names, e.g. ({logical!r},)")
    if not isinstance(logical, Sequence) or not all(
        name is None or isinstance(name, str) for name in logical
    ):
        raise ValueError(f"logical={logical!r} must be a tuple of names (str or None)")
    if mesh is not None:
        _check_mesh_type(mesh)
    _check_rules(rules)
    _check_logical(logical, rules)
    return _drop_missing_axes(nn.logical_to_mesh_axes(tuple(logical), tuple(rules)), mesh)


def replicated(mesh: Mesh) -> NamedSharding:
    """A sharding that keeps a full copy on every device of ``mesh``."""
    return NamedSharding(auto_axes(mesh), PartitionSpec())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes a batch is split over (``BATCH_AXES`` the mesh has).

    Raises:
      ValueError: the mesh has none of them.
    """
    _check_mesh_type(mesh)
    axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
    if not axes:
        raise ValueError(
            f"the mesh axes {tuple(mesh.axis_names)} include none of the batch axes {BATCH_AXES}; "
            f"name the data-parallel axis 'data'"
        )
    return axes


def data_sharding(mesh: Mesh, ndim: int = 1) -> NamedSharding:
    """Sharding of an array whose leading axis is the batch."""
    ndim = _checks.int_at_least("ndim", ndim)
    mesh = check_mesh(mesh)
    return NamedSharding(mesh, PartitionSpec(batch_axes(mesh), *([None] * (ndim - 1))))


def params_shardings(params: Any, mesh: Mesh, *, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """``NamedSharding`` per leaf of a params tree, from the logical names it carries.

    Leaves without logical names (plain arrays) are replicated.

    Raises:
      ValueError: a logical name that is not in ``rules``.
    """
    mesh = check_mesh(mesh, rules)

    def sharding(leaf):
        if isinstance(leaf, nn.LogicallyPartitioned):
            spec = logical_to_mesh_spec(leaf.names, mesh=mesh, rules=rules)
        elif isinstance(leaf, nn.Partitioned):  # boxed with mesh axis names directly
            spec = _drop_missing_axes(PartitionSpec(*leaf.names), mesh)
        else:
            spec = PartitionSpec()
        return NamedSharding(mesh, spec)

    return jax.tree.map(sharding, params, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))


def shard_params(params: Any, mesh: Mesh, *, rules: Rules = LOGICAL_AXIS_RULES) -> Any:
    """Places a (possibly logically boxed) params tree on ``mesh`` and unboxes it.

    Works in a multi-process run too: every process passes the same (host-local) values and
    each copies only the shards its own devices hold.
    """
    from efflax._src.distributed import _put_global

    return _put_global(nn.unbox(params), params_shardings(params, mesh, rules=rules), "params")


def shard_batch(batch: Any, mesh: Mesh) -> Any:
    """Splits every array of ``batch`` along its leading (batch) axis over the mesh.

    In a multi-process run ``batch`` is the global batch (the same in every process); each
    process copies only its own rows. ``efflax.data.Loader(mesh=...)`` reads only those rows.

    Raises:
      ValueError: if the batch size does not divide over the data-parallel devices.
    """
    from efflax._src.distributed import _put_global

    mesh = check_mesh(mesh)
    ways = math.prod(mesh.shape[a] for a in batch_axes(mesh))

    def sharding(path, x):
        shape = tuple(x.shape) if hasattr(x, "shape") else np.shape(x)
        if len(shape) == 0 or shape[0] % ways:
            raise ValueError(
                f"batch{jax.tree_util.keystr(path)} has shape {shape}: its leading (batch) dim "
                f"must divide over {ways} data-parallel devices"
            )
        return data_sharding(mesh, len(shape))

    return _put_global(batch, jax.tree_util.tree_map_with_path(sharding, batch), "batch")
