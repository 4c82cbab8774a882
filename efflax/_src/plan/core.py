"""Plans: compile a training step for hardware you do not have, and read what it would need.

XLA compiles for devices that are not attached: libtpu describes whole TPU slices
(``jax.experimental.topologies.get_topology_desc(topology_name="v5e:2x4", platform="tpu")``)
and the CUDA plugin describes GPU hosts from a ``GpuTargetConfig`` (``tools/gpu_specs/``). A
step is traced on abstract arguments (``jax.ShapeDtypeStruct`` with a ``NamedSharding`` on the
target's mesh), so no parameter is ever materialised, then compiled for the target; the plan
reads the compiled program: memory per device (what XLA allocates), the collectives in the
partitioned HLO, the FLOPs of the traced program and, on TPU, XLA's own step-time estimate.

Everything here is what the compiler says, not a measurement on the hardware.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import math
import os
import pathlib
import re
import sys
import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.extend
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from efflax._src import sharding as _sharding

__all__ = [
    "TARGETS",
    "Plan",
    "PlanError",
    "Target",
    "abstract_batch",
    "abstract_train_state",
    "compile_for",
    "get_target",
    "target_mesh",
]

GiB = 1024**3
_ROOT = pathlib.Path(__file__).resolve().parents[3]
_SPEC_DIRS = (_ROOT / "tools" / "gpu_specs", _ROOT.parent / "shared" / "gpu_specs")
_INSTALL_HINT = (
    "install the compile-only toolchain: `make plan-env` (builds .venv-xla from "
    "constraints/xla.txt: jax + libtpu + the CUDA plugin), or `pip install 'efflax[tpu]'` for "
    "TPU targets and `pip install --no-deps jax-cuda13-plugin==<jax version> "
    "jax-cuda13-pjrt==<jax version>` for GPU targets; then run it with that Python, e.g. "
    "`JAX_PLATFORMS=cpu .venv-xla/bin/efflax plan --target v5e-8`"
)


class PlanError(ValueError):
    """A plan that cannot be made: unknown target, missing toolchain, bad sharding."""


@dataclasses.dataclass(frozen=True)
class Target:
    """One machine a plan compiles for (chip facts from the vendors' public spec sheets).

    Attributes:
      name: the name used on the command line (``'v5e-8'``, ``'h100x8'``).
      platform: ``'tpu'`` or ``'gpu'``.
      topology: libtpu topology (``'v5e:2x4'``) or GPU ``'hosts x 1 x gpus'`` (``'1x1x8'``).
      chip: chip name.
      hbm_bytes: memory per chip the compiled program must fit in.
      peak_flops: dense bf16 FLOP/s per chip (for MFU).
      interconnect: chip-to-chip links, for the report.
      hbm_bandwidth: HBM bytes/s per chip (for the roofline bound).
      gpu_spec: the ``GpuTargetConfig`` file (GPU targets).
      device_kind: ``device_kind`` of the compile-only devices.
    """

    name: str
    platform: str
    topology: str
    chip: str
    hbm_bytes: int
    peak_flops: float
    interconnect: str
    hbm_bandwidth: float = 0.0
    gpu_spec: str | None = None
    device_kind: str | None = None

    @property
    def chips(self) -> int:
        if self.platform == "gpu":
            hosts, _, per_host = (int(n) for n in self.topology.split("x"))
            return hosts * per_host
        dims = self.topology.split(":")[1].split("x")
        return math.prod(int(n) for n in dims)


_V5E = dict(
    chip="TPU v5e",
    hbm_bytes=int(15.75 * GiB),
    peak_flops=197e12,
    interconnect="ICI",
    hbm_bandwidth=819e9,
)
_V5P = dict(
    chip="TPU v5p", hbm_bytes=95 * GiB, peak_flops=459e12, interconnect="ICI", hbm_bandwidth=2765e9
)
_V6E = dict(
    chip="TPU v6e", hbm_bytes=32 * GiB, peak_flops=918e12, interconnect="ICI", hbm_bandwidth=1640e9
)
# device_memory_size of tools/gpu_specs/*.txtpb (XLA's own GPU spec files): 79.1 GiB.
_H100 = dict(
    chip="NVIDIA H100 SXM",
    hbm_bytes=84942979072,
    peak_flops=989e12,
    interconnect="NVLink 900 GB/s",
    gpu_spec="h100_sxm.txtpb",
    device_kind="NVIDIA H100 80GB HBM3",
)
_A100 = dict(
    chip="NVIDIA A100 SXM 80GB",
    hbm_bytes=84942979072,
    peak_flops=312e12,
    interconnect="NVLink 600 GB/s",
    gpu_spec="a100_sxm_80.txtpb",
    device_kind="NVIDIA A100-SXM4-80GB",
)

# Cloud TPU names: v5e-N and v6e-N count chips; v5p-N counts TensorCores (2 per chip), so
# v5p-8 is 4 chips.
TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("h100x8", "gpu", "1x1x8", **_H100),
        Target("h100x16", "gpu", "2x1x8", **_H100),
        Target("a100x8", "gpu", "1x1x8", **_A100),
        Target("v5e-8", "tpu", "v5e:2x4", **_V5E),
        Target("v5e-16", "tpu", "v5e:4x4", **_V5E),
        Target("v5e-64", "tpu", "v5e:8x8", **_V5E),
        Target("v5e-256", "tpu", "v5e:16x16", **_V5E),
        Target("v5p-8", "tpu", "v5p:2x2x1", **_V5P),
        Target("v5p-64", "tpu", "v5p:2x4x4", **_V5P),
        Target("v5p-256", "tpu", "v5p:4x4x8", **_V5P),
        Target("v6e-8", "tpu", "v6e:2x4", **_V6E),
        Target("v6e-64", "tpu", "v6e:8x8", **_V6E),
        Target("v6e-256", "tpu", "v6e:16x16", **_V6E),
    )
}


def get_target(target: str | Target) -> Target:
    """The :class:`Target` named ``target`` (a ``Target`` is returned as it is).

    Raises:
      PlanError: an unknown name (the message lists the known ones).
    """
    if isinstance(target, Target):
        return target
    if not isinstance(target, str) or target.lower() not in TARGETS:
        raise PlanError(
            f"target={target!r} is not a known target; known: {', '.join(TARGETS)} "
            "(v5e-N and v6e-N count chips, v5p-N counts TensorCores: v5p-8 is 4 chips)"
        )
    return TARGETS[target.lower()]


def _check_toolchain(target: Target) -> None:
    if target.platform == "tpu" and importlib.util.find_spec("libtpu") is None:
        raise PlanError(
            f"target {target.name!r} needs libtpu to compile for TPUs, and this Python "
            f"({sys.executable}, jax {jax.__version__}) has none; {_INSTALL_HINT}"
        )
    if target.platform == "gpu":
        found = importlib.util.find_spec("jax_plugins") is not None and any(
            importlib.util.find_spec(f"jax_plugins.xla_cuda{v}") is not None for v in (12, 13)
        )
        if not found:
            raise PlanError(
                f"target {target.name!r} needs JAX's CUDA plugin to compile for GPUs, and this "
                f"Python ({sys.executable}, jax {jax.__version__}) has none; {_INSTALL_HINT}"
            )


def _gpu_spec_text(target: Target) -> str:
    for directory in _SPEC_DIRS:
        path = directory / target.gpu_spec
        if path.is_file():
            return path.read_text()
    raise PlanError(
        f"target {target.name!r}: GPU description {target.gpu_spec} not found in "
        f"{', '.join(str(d) for d in _SPEC_DIRS)}"
    )


def _target_devices(name: str) -> tuple[Any, ...]:
    _check_toolchain(TARGETS[name])
    return _describe(name)


@functools.cache
def _describe(name: str) -> tuple[Any, ...]:
    target = TARGETS[name]
    from jax.experimental import topologies

    # libtpu warns at start-up that it sees no TPU; these two describe the host to it.
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5litepod-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    # Compiling needs no exclusive hold of a TPU: let several processes (pytest workers,
    # parallel plans) load libtpu at once instead of failing on its lock file.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    try:
        if target.platform == "tpu":
            topology = topologies.get_topology_desc(topology_name=target.topology, platform="tpu")
        else:
            topology = topologies.get_topology_desc(
                "aot", "cuda", target_config=_gpu_spec_text(target), topology=target.topology
            )
    except PlanError:
        raise
    except Exception as e:  # what the plugin raises differs by version; say which target
        raise PlanError(
            f"cannot describe target {target.name!r} ({target.topology}) with jax "
            f"{jax.__version__}: {type(e).__name__}: {str(e).splitlines()[0]}"
        ) from None
    return tuple(topology.devices)


def target_mesh(
    target: str | Target, *, data: int | None = None, expert: int = 1, model: int = 1
) -> Mesh:
    """A ``('data', 'expert', 'model')`` mesh of compile-only devices of ``target``.

    Args:
      target: a name from :data:`TARGETS` or a :class:`Target`.
      data: data-parallel ways (default: every chip left after expert and model).
      expert: expert-parallel ways.
      model: tensor-parallel ways.

    Raises:
      PlanError: unknown target, missing toolchain, or axis sizes that do not multiply to the
        target's chips.
    """
    target = get_target(target)
    devices = _target_devices(target.name)
    for name, ways in (("expert", expert), ("model", model)):
        if not isinstance(ways, int) or ways < 1:
            raise PlanError(f"{name}={ways!r} must be an int >= 1")
    if data is None:
        if len(devices) % (expert * model):
            raise PlanError(
                f"expert={expert} x model={model} does not divide the {len(devices)} chips of "
                f"{target.name}"
            )
        data = len(devices) // (expert * model)
    if not isinstance(data, int) or data < 1 or data * expert * model != len(devices):
        raise PlanError(
            f"mesh data={data} x expert={expert} x model={model} must use exactly the "
            f"{len(devices)} chips of {target.name}"
        )
    shape = (data, expert, model)
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
    except Exception:  # a shape the topology-aware layout refuses: plain order
        grid = np.asarray(devices, dtype=object).reshape(shape)
    return _sharding.auto_axes(Mesh(grid, _sharding.MESH_AXES))


# --------------------------------------------------------------------------------------------
# Abstract arguments


def _divisibility(path: str, shape: tuple[int, ...], spec: PartitionSpec, mesh: Mesh, logical):
    for dim, entry in enumerate(spec):
        if entry is None:
            continue
        axes = (entry,) if isinstance(entry, str) else tuple(entry)
        ways = math.prod(mesh.shape[a] for a in axes)
        if shape[dim] % ways:
            name = f" (logical axis {logical[dim]!r})" if logical is not None else ""
            raise PlanError(
                f"{path}: dimension {dim} of shape {shape}{name} is split over mesh axes "
                f"{axes} ({ways} ways), which does not divide {shape[dim]}; change the model "
                f"size, the mesh (data/expert/model ways) or the logical-axis rules"
            )


def _spec_of(leaf: Any, mesh: Mesh, rules) -> tuple[PartitionSpec, Any]:
    if isinstance(leaf, nn.LogicallyPartitioned):
        return _sharding.logical_to_mesh_spec(leaf.names, mesh=mesh, rules=rules), leaf.names
    if isinstance(leaf, nn.Partitioned):
        return _sharding._drop_missing_axes(PartitionSpec(*leaf.names), mesh), None
    return PartitionSpec(), None


def shard_abstract(tree: Any, mesh: Mesh, *, rules=_sharding.LOGICAL_AXIS_RULES) -> Any:
    """``ShapeDtypeStruct`` leaves with ``NamedSharding`` from the logical names they carry.

    ``tree`` is an abstract pytree (from ``jax.eval_shape``) whose leaves may be boxed with
    logical names (``nn.LogicallyPartitioned``); boxes are removed, unboxed leaves are
    replicated.

    Raises:
      PlanError: a dimension whose mesh axes do not divide it (naming the array and axis).
    """
    mesh = _sharding.auto_axes(mesh)

    def place(path, leaf):
        spec, logical = _spec_of(leaf, mesh, rules)
        value = leaf.unbox() if isinstance(leaf, nn.meta.AxisMetadata) else leaf
        where = "state" + jax.tree_util.keystr(path)
        _divisibility(where, tuple(value.shape), spec, mesh, logical)
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=NamedSharding(mesh, spec))

    return jax.tree_util.tree_map_with_path(
        place, tree, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata)
    )


def abstract_train_state(
    model: nn.Module,
    tx: Any,
    *example_inputs: Any,
    mesh: Mesh,
    rules=_sharding.LOGICAL_AXIS_RULES,
    extra: Mapping[str, Any] | None = None,
    init_kwargs: Mapping[str, Any] | None = None,
) -> Any:
    """An ``efflax.training.TrainState`` of ``ShapeDtypeStruct`` leaves sharded on ``mesh``.

    ``model.init`` and ``tx.init`` run under ``jax.eval_shape``: nothing is allocated, so a
    model too large for this machine (or for the target) can be planned. Parameters and the
    optimizer state take their shardings from the parameters' logical axis names and
    ``rules`` (the optimizer state mirrors the parameters), everything else is replicated.

    Args:
      model: a Flax linen module whose parameters carry logical names.
      tx: the optax transform.
      example_inputs: the arguments of ``model.init`` after the rng (shapes and dtypes only:
        ``jax.ShapeDtypeStruct`` or arrays), e.g. one ``[batch, seq]`` int32 token array.
      mesh: the target's mesh (:func:`target_mesh`).
      rules: the logical-axis table.
      extra: ``TrainState.extra`` entries (abstract or concrete; replicated).
      init_kwargs: keyword arguments of ``model.init``.

    Raises:
      PlanError: a parameter dimension the mesh does not divide.
    """
    from efflax._src.training.state import TrainState

    shapes = [(tuple(np.shape(x)), x.dtype) for x in example_inputs]

    def create():
        key = jax.random.key(0)
        # Traced zeros (not ShapeDtypeStructs): modules may inspect their inputs.
        inputs = [jax.numpy.zeros(shape, dtype) for shape, dtype in shapes]
        variables = model.init(key, *inputs, **dict(init_kwargs or {}))
        return TrainState.create(
            apply_fn=model.apply, params=variables["params"], tx=tx, rng=key, extra=extra
        )

    return shard_abstract(jax.eval_shape(create), mesh, rules=rules)


def abstract_batch(shapes: Mapping[str, tuple[tuple[int, ...], Any]], mesh: Mesh) -> dict:
    """A batch of ``ShapeDtypeStruct`` split over the mesh's data axes along the leading dim.

    Args:
      shapes: ``{name: (shape, dtype)}``.
      mesh: the target's mesh.

    Raises:
      PlanError: a leading dimension the data-parallel ways do not divide.
    """
    mesh = _sharding.auto_axes(mesh)
    axes = _sharding.batch_axes(mesh)
    out = {}
    for name, (shape, dtype) in shapes.items():
        spec = PartitionSpec(axes, *([None] * (len(shape) - 1)))
        _divisibility(f"batch[{name!r}]", tuple(shape), spec, mesh, ("batch",) * len(shape))
        out[name] = jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=NamedSharding(mesh, spec))
    return out


# --------------------------------------------------------------------------------------------
# Reading the compiled program

COLLECTIVES = (
    "all-reduce",
    "all-gather",
    "reduce-scatter",
    "all-to-all",
    "ragged-all-to-all",
    "collective-permute",
    "collective-broadcast",
)
_DTYPE_BYTES = {
    "pred": 1,
    "s4": 0.5,
    "u4": 0.5,
    "s8": 1,
    "u8": 1,
    "f8e4m3fn": 1,
    "f8e5m2": 1,
    "s16": 2,
    "u16": 2,
    "f16": 2,
    "bf16": 2,
    "s32": 4,
    "u32": 4,
    "f32": 4,
    "s64": 8,
    "u64": 8,
    "f64": 8,
    "c64": 8,
    "c128": 16,
}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_INSTRUCTION = re.compile(
    r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][a-z0-9\-]*)\(", re.MULTILINE
)


def _shape_bytes(text: str) -> int:
    total = 0.0
    for dtype, dims in _ARRAY.findall(text):
        if dtype in _DTYPE_BYTES:
            total += _DTYPE_BYTES[dtype] * math.prod(int(d) for d in dims.split(",") if d)
    return int(total)


def collectives_of(hlo_text: str) -> dict[str, tuple[int, int]]:
    """``{kind: (count, bytes)}`` of the collectives in a partitioned HLO module's text.

    Bytes are the per-device result sizes (an all-gather's gathered output, a reduce-scatter's
    shard, an all-reduce's buffer). Async pairs are counted once (at ``-done``); an op inside
    a loop body is counted once, not once per iteration.
    """
    found: dict[str, list[int]] = {}
    for result, op in _INSTRUCTION.findall(hlo_text):
        base = op[: -len("-done")] if op.endswith("-done") else op
        if op.endswith("-start") or base not in COLLECTIVES:
            continue
        entry = found.setdefault(base, [0, 0])
        entry[0] += 1
        entry[1] += _shape_bytes(result)
    return {k: (v[0], v[1]) for k, v in sorted(found.items())}


def _sub_jaxprs(params: Mapping[str, Any]):
    for value in params.values():
        for item in value if isinstance(value, list | tuple) else (value,):
            if isinstance(item, jax.extend.core.ClosedJaxpr):
                yield item.jaxpr
            elif isinstance(item, jax.extend.core.Jaxpr):
                yield item


def matmul_flops(jaxpr: Any) -> tuple[float, list[str]]:
    """FLOPs of the matrix products in a (closed) jaxpr, and what the count could not see.

    ``2 * output elements * contracted size`` per ``dot_general`` (the usual definition of
    model FLOPs: elementwise work is left out); a ``scan`` body counts ``length`` times, a
    ``shard_map`` body once per device, the larger branch of a ``cond``; a Pallas kernel counts
    its declared ``cost_estimate`` (none declared: not counted, and said).
    """
    caveats: set[str] = set()

    def walk(jx, multiplier: float) -> float:
        total = 0.0
        for eqn in jx.eqns:
            name = eqn.primitive.name
            if name == "dot_general":
                (lhs_contract, _), _ = eqn.params["dimension_numbers"]
                lhs = eqn.invars[0].aval.shape
                out = eqn.outvars[0].aval.shape
                total += multiplier * 2 * math.prod(out) * math.prod(lhs[d] for d in lhs_contract)
                continue
            if name == "pallas_call":
                estimate = eqn.params.get("cost_estimate")
                if estimate is not None and getattr(estimate, "flops", None):
                    total += multiplier * float(estimate.flops)
                else:
                    caveats.add("a Pallas kernel without a cost_estimate is not counted")
                continue
            if name == "cond":
                branches = eqn.params["branches"]
                total += max(walk(b.jaxpr, multiplier) for b in branches)
                continue
            inner = multiplier
            if name == "scan":
                inner *= eqn.params["length"]
            elif name == "while":
                caveats.add("a while loop's body is counted once")
            elif name == "shard_map":
                mesh = eqn.params["mesh"]
                manual = eqn.params.get("manual_axes", mesh.axis_names)
                inner *= math.prod(mesh.shape[a] for a in manual)
            for sub in _sub_jaxprs(eqn.params):
                total += walk(sub, inner)
        return total

    jx = getattr(jaxpr, "jaxpr", jaxpr)
    return walk(jx, 1.0), sorted(caveats)


def _bytes_per_device(tree: Any) -> int:
    total = 0
    for leaf in jax.tree.leaves(tree):
        shape = tuple(leaf.shape)
        sharding = getattr(leaf, "sharding", None)
        if sharding is not None:
            shape = sharding.shard_shape(shape)
        total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
    return total


def _categorise(args: Sequence[Any]) -> dict[str, int]:
    """Per-device bytes of the arguments: parameters, optimizer state, the rest."""
    sizes = {"params": 0, "opt_state": 0, "other": 0}
    for path, leaf in jax.tree_util.tree_leaves_with_path(tuple(args)):
        names = [getattr(k, "name", None) or getattr(k, "key", None) for k in path]
        kind = "params" if "params" in names else "opt_state" if "opt_state" in names else "other"
        sizes[kind] += _bytes_per_device([leaf])
    return sizes


def _gib(n: float) -> str:
    if abs(n) >= GiB / 10:
        return f"{n / GiB:.2f} GiB"
    return f"{n / 2**20:.1f} MiB"


@dataclasses.dataclass
class Plan:
    """What a compiled step needs on ``target``, per device (one chip or GPU).

    Memory figures are what XLA allocates for the compiled program (``memory_analysis``);
    ``estimated_seconds`` is XLA's cost-model estimate (TPU only), not a measurement.

    Attributes:
      target: the :class:`Target`.
      mesh_shape: ``{axis: ways}``.
      params_bytes / opt_state_bytes / other_argument_bytes: the arguments' shards.
      argument_bytes / output_bytes / alias_bytes / temp_bytes / code_bytes: XLA's figures.
      collectives: ``{kind: (count, result bytes per device)}`` in the partitioned program.
      flops: FLOPs of one step of the traced (unpartitioned) program, all devices together.
      device_flops: FLOPs of the compiled per-device program (TPU; includes recomputation).
      estimated_seconds: XLA's estimated step time (TPU), None where it has none or the value
        is not usable (see ``notes``).
      compile_seconds: wall time of the compile here.
      notes: what a reader must know about the figures.
      complete: False when the compiler stopped (out of memory): only the memory is known.
      bytes_accessed: XLA's count of memory traffic per device (TPU), for ``roofline_seconds``.
    """

    target: Target
    mesh_shape: dict[str, int]
    params_bytes: int
    opt_state_bytes: int
    other_argument_bytes: int
    argument_bytes: int
    output_bytes: int
    alias_bytes: int
    temp_bytes: int
    code_bytes: int
    collectives: dict[str, tuple[int, int]]
    flops: float | None
    device_flops: float | None
    estimated_seconds: float | None
    compile_seconds: float
    versions: dict[str, str]
    notes: list[str] = dataclasses.field(default_factory=list)
    complete: bool = True
    bytes_accessed: float | None = None

    @property
    def roofline_seconds(self) -> float | None:
        """A lower bound on the step time: XLA's per-device FLOPs at peak or its bytes accessed
        at HBM bandwidth, whichever is slower (communication and overheads ignored; TPU)."""
        if not self.device_flops or not self.bytes_accessed or not self.target.hbm_bandwidth:
            return None
        return max(
            self.device_flops / self.target.peak_flops,
            self.bytes_accessed / self.target.hbm_bandwidth,
        )

    @property
    def total_bytes(self) -> int:
        """Peak per device: arguments + outputs not aliased to them + temporaries + code."""
        return (
            self.argument_bytes
            + self.output_bytes
            - self.alias_bytes
            + self.temp_bytes
            + self.code_bytes
        )

    @property
    def fits(self) -> bool:
        return self.total_bytes <= self.target.hbm_bytes

    @property
    def headroom_bytes(self) -> int:
        """Chip memory left (negative: how much is missing)."""
        return self.target.hbm_bytes - self.total_bytes

    @property
    def mfu(self) -> float | None:
        """Model FLOPs per chip over (estimated time x peak), from XLA's estimate."""
        if self.estimated_seconds is None or not self.flops:
            return None
        return self.flops / self.target.chips / (self.estimated_seconds * self.target.peak_flops)

    def to_dict(self) -> dict[str, Any]:
        return {
            "target": self.target.name,
            "chip": self.target.chip,
            "chips": self.target.chips,
            "mesh": self.mesh_shape,
            "params_bytes": self.params_bytes,
            "opt_state_bytes": self.opt_state_bytes,
            "other_argument_bytes": self.other_argument_bytes,
            "argument_bytes": self.argument_bytes,
            "output_bytes": self.output_bytes,
            "alias_bytes": self.alias_bytes,
            "temp_bytes": self.temp_bytes,
            "code_bytes": self.code_bytes,
            "total_bytes": self.total_bytes,
            "hbm_bytes": self.target.hbm_bytes,
            "fits": self.fits,
            "collectives": {k: {"count": c, "bytes": b} for k, (c, b) in self.collectives.items()},
            "flops": self.flops,
            "device_flops": self.device_flops,
            "estimated_seconds": self.estimated_seconds,
            "mfu": self.mfu,
            "bytes_accessed": self.bytes_accessed,
            "roofline_seconds": self.roofline_seconds,
            "compile_seconds": self.compile_seconds,
            "versions": self.versions,
            "notes": list(self.notes),
            "complete": self.complete,
        }

    def __str__(self) -> str:
        t = self.target
        mesh = " x ".join(f"{k} {v}" for k, v in self.mesh_shape.items())
        verdict = (
            f"FITS with {_gib(self.headroom_bytes)} to spare"
            if self.fits
            else f"DOES NOT FIT: {_gib(-self.headroom_bytes)} over"
        )
        extrapolated = any(n.startswith("EXTRAPOLATED") for n in self.notes)
        lines = [
            f"plan for {t.name}: {t.chips} x {t.chip} ({t.topology}), mesh {mesh}"
            + (" [extrapolated in depth: see the note]" if extrapolated else ""),
            "memory per device (what XLA allocates for the compiled step):",
            f"  parameters        {_gib(self.params_bytes)}",
            f"  optimizer state   {_gib(self.opt_state_bytes)}",
            f"  other arguments   {_gib(self.other_argument_bytes)} (batch, step, rng, ...)",
            f"  arguments (XLA)   {_gib(self.argument_bytes)}",
            f"  outputs (XLA)     {_gib(self.output_bytes)}, {_gib(self.alias_bytes)} of them "
            "in donated argument buffers",
            f"  temporaries       {_gib(self.temp_bytes)}",
            f"  total             {_gib(self.total_bytes)} of {_gib(t.hbm_bytes)}: {verdict}",
        ]
        if not self.complete:
            lines.append("collectives per step: unknown (the compile stopped)")
        elif self.collectives:
            lines.append("collectives per step (per device; ops in loop bodies counted once):")
            for kind, (count, nbytes) in self.collectives.items():
                lines.append(f"  {kind:20s} {count:4d} ops  {nbytes / 2**20:10.1f} MiB")
        else:
            lines.append("collectives per step: none")
        if self.flops:
            lines.append(
                f"FLOPs per step      {self.flops:.3e} (traced program, all devices; "
                f"{self.flops / t.chips:.3e} per device)"
            )
        if self.estimated_seconds is not None:
            mfu = self.mfu
            lines.append(
                f"step time (XLA's estimate, not a measurement) {self.estimated_seconds * 1e3:.2f} "
                f"ms"
                + (
                    f", implied MFU {100 * mfu:.1f}% of {t.peak_flops / 1e12:.0f} TFLOP/s"
                    if mfu
                    else ""
                )
            )
        roofline = self.roofline_seconds
        if roofline is not None:
            bound = self.flops / t.chips / (roofline * t.peak_flops) if self.flops else None
            lines.append(
                f"roofline bound (XLA's per-device FLOPs at peak, bytes at {t.hbm_bandwidth / 1e9:.0f}"
                f" GB/s; no communication) >= {roofline * 1e3:.2f} ms"
                + (f", so MFU <= {100 * bound:.0f}%" if bound else "")
            )
        lines.extend(f"note: {n}" for n in self.notes)
        lines.append(
            f"compiled in {self.compile_seconds:.0f} s with "
            + ", ".join(f"{k} {v}" for k, v in self.versions.items())
        )
        return "\n".join(lines)


def extrapolate(shallow: Plan, deeper: Plan, depths: tuple[int, int], depth: int) -> Plan:
    """A plan at ``depth`` layers from plans compiled at ``depths``, linear in the depth.

    Every compiled figure (XLA's memory figures, collectives, per-device FLOPs, the time
    estimate) is ``a + b * layers`` through the two compiled points: each layer of a
    ``TransformerLM`` adds the same parameters, saved activations and collectives. The caller
    overwrites what it knows exactly at ``depth`` (parameter and optimizer bytes, FLOPs).
    """
    low, high = depths
    if not 0 < low < high:
        raise PlanError(f"depths={depths} must be two increasing layer counts >= 1")
    weight = (depth - low) / (high - low)

    def line(a, b):
        if a is None or b is None:
            return None
        return a + (b - a) * weight

    collectives = {}
    for kind in sorted(set(shallow.collectives) | set(deeper.collectives)):
        c1, b1 = shallow.collectives.get(kind, (0, 0))
        c2, b2 = deeper.collectives.get(kind, (0, 0))
        collectives[kind] = (max(0, round(line(c1, c2))), max(0, round(line(b1, b2))))
    fields = (
        "params_bytes",
        "opt_state_bytes",
        "other_argument_bytes",
        "argument_bytes",
        "output_bytes",
        "alias_bytes",
        "temp_bytes",
        "code_bytes",
    )
    plan = dataclasses.replace(
        deeper,
        **{name: round(line(getattr(shallow, name), getattr(deeper, name))) for name in fields},
        collectives=collectives,
        flops=line(shallow.flops, deeper.flops),
        device_flops=line(shallow.device_flops, deeper.device_flops),
        bytes_accessed=line(shallow.bytes_accessed, deeper.bytes_accessed),
        estimated_seconds=line(shallow.estimated_seconds, deeper.estimated_seconds),
        compile_seconds=shallow.compile_seconds + deeper.compile_seconds,
        notes=[n for n in deeper.notes],
        complete=shallow.complete and deeper.complete,
    )
    plan.notes.append(
        f"EXTRAPOLATED: compiled at {low} and {high} layers, every compiled figure (memory, "
        f"collectives, time estimate) taken linearly to {depth} layers"
    )
    return plan


def _versions() -> dict[str, str]:
    from importlib import metadata

    out = {"jax": jax.__version__}
    for dist in ("jaxlib", "libtpu", "jax-cuda13-plugin"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def _check_on_target(args: Sequence[Any], target: Target) -> dict[str, int]:
    """Every leaf must be abstract and sharded over the target's devices; returns mesh shape."""
    devices = set(_target_devices(target.name))
    mesh_shape: dict[str, int] | None = None
    for path, leaf in jax.tree_util.tree_leaves_with_path(tuple(args)):
        where = f"args{jax.tree_util.keystr(path)}"
        if isinstance(leaf, nn.meta.AxisMetadata):
            raise PlanError(
                f"{where} is still boxed ({type(leaf).__name__}); pass the tree through "
                "efflax.plan.shard_abstract (abstract_train_state does)"
            )
        sharding = getattr(leaf, "sharding", None)
        if not isinstance(leaf, jax.ShapeDtypeStruct) or not isinstance(sharding, NamedSharding):
            raise PlanError(
                f"{where} must be a jax.ShapeDtypeStruct with a NamedSharding on the mesh of "
                f"efflax.plan.target_mesh({target.name!r}) (got {type(leaf).__name__}"
                f"{'' if sharding is None else ' with ' + type(sharding).__name__}); see "
                "efflax.plan.abstract_train_state / abstract_batch"
            )
        if not set(sharding.mesh.devices.flat) <= devices:
            raise PlanError(
                f"{where} is placed on devices that are not {target.name}'s (build its mesh "
                f"with efflax.plan.target_mesh({target.name!r}))"
            )
        _divisibility(where, tuple(leaf.shape), sharding.spec, sharding.mesh, None)
        mesh_shape = mesh_shape or dict(sharding.mesh.shape)
    return mesh_shape or {}


_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def _out_of_memory(message: str) -> tuple[str, int] | None:
    """What libtpu's out-of-memory refusal says a program needs: ``('temp', bytes)`` (HLO
    temporaries) or ``('used', bytes)`` (everything); None for another error."""
    if "Ran out of memory" not in message:
        return None
    for kind, pattern in (
        ("temp", r"memory required for HLO temporaries \(([0-9.]+)([KMGT]?)\)"),
        ("used", r"Used ([0-9.]+)([KMGT]?) of [0-9.]+[KMGT]? hbm"),
    ):
        found = re.search(pattern, message)
        if found:
            return kind, int(float(found.group(1)) * _UNITS[found.group(2)])
    return None


def _refused_plan(
    target: Target,
    mesh_shape: dict[str, int],
    arg_sizes: dict[str, int],
    refusal: tuple[str, int],
    flops: float | None,
) -> Plan:
    """The plan of a program libtpu refused to compile for lack of memory."""
    arguments = sum(arg_sizes.values())
    kind, nbytes = refusal
    temp = nbytes if kind == "temp" else max(0, nbytes - arguments)
    return Plan(
        target=target,
        mesh_shape=mesh_shape,
        params_bytes=arg_sizes["params"],
        opt_state_bytes=arg_sizes["opt_state"],
        other_argument_bytes=arg_sizes["other"],
        argument_bytes=arguments,
        output_bytes=0,
        alias_bytes=0,
        temp_bytes=temp,
        code_bytes=0,
        collectives={},
        flops=flops,
        device_flops=None,
        estimated_seconds=None,
        compile_seconds=0.0,
        versions=_versions(),
        notes=[
            f"libtpu refused the program for lack of memory (its figure: "
            f"{'temporaries' if kind == 'temp' else 'total'} {_gib(nbytes)} per chip); "
            "the arguments are counted from their shards, nothing for outputs; collectives "
            "and step time are unknown (the compile stopped)"
        ],
        complete=False,
    )


def _lowering_context(target: Target, args: Sequence[Any]) -> Any:
    """GPU targets: an abstract mesh naming the GPU, so Pallas kernels lower for its compute
    capability on a host without one (JAX >= 0.11 asks for it)."""
    import contextlib

    sharding = jax.sharding
    if target.platform != "gpu" or not hasattr(sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    mesh = next(leaf.sharding.mesh for leaf in jax.tree.leaves(tuple(args)))
    device = sharding.AbstractDevice(
        device_kind=target.device_kind, num_cores=_GPU_CORES[target.gpu_spec], platform="gpu"
    )
    abstract = sharding.AbstractMesh(
        tuple(mesh.shape.values()),
        tuple(mesh.axis_names),
        axis_types=tuple(mesh.axis_types),
        abstract_device=device,
    )
    return sharding.use_abstract_mesh(abstract)


_GPU_CORES = {"h100_sxm.txtpb": 132, "a100_sxm_80.txtpb": 108}


def _xla_message(e: Exception) -> str:
    text = str(e)
    lines = [ln for ln in text.splitlines() if ln.strip()]
    first = lines[0] if lines else type(e).__name__
    return first[:400]


def compile_for(
    step: Callable[..., Any],
    *abstract_args: Any,
    target: str | Target,
    flops: float | None = None,
    progress: Callable[[str], None] | None = None,
    label: str = "step",
) -> Plan:
    """Compiles ``step`` for ``target`` on abstract arguments and reads what it needs.

    Args:
      step: the training step, ``jax.jit``-ed or plain (it is wrapped in ``jax.jit``; a jitted
        function keeps its donation). ``efflax.training.make_train_step``'s step works.
      abstract_args: the step's arguments as ``jax.ShapeDtypeStruct`` with ``NamedSharding``
        on :func:`target_mesh` (``abstract_train_state``, ``abstract_batch``).
      target: a name from :data:`TARGETS` (``'v5e-8'``, ``'h100x8'``, ...).
      flops: model FLOPs per step to use for MFU instead of the traced program's count.
      progress: called with a line before and after the compile (default: print to stderr).
      label: what is compiled, for the progress lines.

    Returns:
      A :class:`Plan` (``print(plan)`` for the report, ``plan.to_dict()`` for JSON).

    Raises:
      PlanError: unknown target, missing toolchain (names what to install), arguments that
        are not abstract or not on the target's devices, shardings that do not divide, or a
        compile XLA refused (its first line).

    Example:
      >>> mesh = target_mesh("v5e-8", model=2)
      >>> state = abstract_train_state(model, tx, tokens, mesh=mesh)
      >>> plan = compile_for(train_step, state, abstract_batch(shapes, mesh), target="v5e-8")
    """
    target = get_target(target)
    say = progress or (lambda line: print(line, file=sys.stderr, flush=True))
    mesh_shape = _check_on_target(abstract_args, target)
    jitted = step if hasattr(step, "lower") else jax.jit(step)
    start = time.perf_counter()
    mesh_text = " x ".join(f"{k} {v}" for k, v in mesh_shape.items())
    say(f"[plan] compiling {label} for {target.name} (mesh {mesh_text}); large steps take minutes")
    notes: list[str] = []
    arg_sizes = _categorise(abstract_args)
    try:
        with _lowering_context(target, abstract_args):
            traced_flops, flop_caveats = matmul_flops(jax.make_jaxpr(jitted)(*abstract_args))
            lowered = jitted.lower(*abstract_args)
    except PlanError:
        raise
    except Exception as e:
        raise PlanError(
            f"{label} cannot be traced for {target.name}: {type(e).__name__}: {_xla_message(e)}"
        ) from None
    try:
        compiled = lowered.compile()
    except Exception as e:
        refusal = _out_of_memory(str(e))
        if refusal is None:
            raise PlanError(
                f"{label} does not compile for {target.name}: {type(e).__name__}: {_xla_message(e)}"
            ) from None
        plan = _refused_plan(target, mesh_shape, arg_sizes, refusal, flops or traced_flops)
        plan.compile_seconds = time.perf_counter() - start
        say(
            f"[plan] {label} on {target.name}: does NOT fit ({_gib(-plan.headroom_bytes)} over; "
            "libtpu stopped the compile)"
        )
        return plan
    seconds = time.perf_counter() - start
    memory = compiled.memory_analysis()
    try:
        cost = compiled.cost_analysis()
    except Exception:
        cost = None
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else None
    device_flops = estimated = bytes_accessed = None
    if cost:
        device_flops = float(cost.get("flops", 0.0)) or None
        bytes_accessed = float(cost.get("bytes accessed", 0.0)) or None
        raw = cost.get("optimal_seconds")
        if raw is not None:
            raw = float(raw)
            if math.isfinite(raw) and raw > 0:
                estimated = raw
            else:
                notes.append(
                    f"XLA's step-time estimate came out as {raw!r}, which is meaningless (seen "
                    "for whole large programs); no time or MFU is reported"
                )
    if target.platform == "gpu":
        notes.append("XLA gives no step-time estimate for GPU targets: no time or MFU reported")
    model_flops = flops if flops is not None else traced_flops
    if flops is None:
        notes.append(
            "FLOPs: the matrix products of the traced step (forward, backward, optimizer), all "
            "devices together, before XLA partitions or rematerialises anything"
            + "".join(f"; {c}" for c in flop_caveats)
        )
    plan = Plan(
        target=target,
        mesh_shape=mesh_shape,
        params_bytes=arg_sizes["params"],
        opt_state_bytes=arg_sizes["opt_state"],
        other_argument_bytes=arg_sizes["other"],
        argument_bytes=int(memory.argument_size_in_bytes),
        output_bytes=int(memory.output_size_in_bytes),
        alias_bytes=int(memory.alias_size_in_bytes),
        temp_bytes=int(memory.temp_size_in_bytes),
        code_bytes=int(getattr(memory, "generated_code_size_in_bytes", 0) or 0),
        collectives=collectives_of(compiled.as_text()),
        flops=model_flops,
        device_flops=device_flops,
        estimated_seconds=estimated,
        compile_seconds=seconds,
        bytes_accessed=bytes_accessed,
        versions=_versions(),
        notes=notes,
    )
    mfu = plan.mfu
    if mfu is not None and mfu > 1.0:
        plan.notes.append(
            f"the implied MFU {100 * mfu:.0f}% exceeds 100%: XLA's estimate is not usable here"
        )
        plan.estimated_seconds = None
    say(
        f"[plan] {label} on {target.name}: compiled in {seconds:.0f} s, "
        f"{_gib(plan.total_bytes)} per device, "
        + ("fits" if plan.fits else f"does NOT fit ({_gib(-plan.headroom_bytes)} over)")
    )
    return plan
