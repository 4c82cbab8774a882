"""The one place for differences between JAX versions (0.10 to 0.12) and backends.

Every other module of efflax and pallas_kernels imports these helpers instead of touching
version-dependent names directly, so an API move in JAX means one edit here:

- `backend_kind` / `compile_platform` / `is_gpu` / `default_interpret` / `resolve_interpret`:
  which platform the program is compiled for (the devices of the current mesh or abstract mesh,
  else the default backend; 'gpu' covers JAX's 'gpu', 'cuda' and 'rocm' names), and whether
  Pallas kernels run in interpret mode (`interpret=None`: interpret unless compiled for a GPU).
- `gpu_compiler_params` / `compiler_params_kwargs`: the Triton compiler-params class is
  `plgpu.CompilerParams` since JAX 0.7 (`plgpu.TritonCompilerParams` before). The Triton
  backend of Pallas is deprecated since JAX 0.11; its deprecation warning is left visible, and
  `has_triton_backend` tells whether it is still there (the compiled Pallas Triton
  implementations refuse the call where it is gone, so `'auto'` runs the XLA path).
- `multiple_of`, `cdiv`: Pallas helpers (identity / plain arithmetic where unavailable).
- `shard_map`: `jax.shard_map` (JAX >= 0.7) or `jax.experimental.shard_map`; a mesh with
  `Explicit` axes (what `jax.make_mesh` builds by default since JAX 0.10) is run as its `Auto`
  twin (`auto_axes`), so inputs of any placement are resharded to the specs instead of refused.
- `to_varying`: marks a replicated value as device-varying inside `shard_map`
  (`lax.pcast(..., to='varying')`, `lax.pvary` before it, a no-op before either existed).
- `widen_for_cpu_dot`: XLA:CPU of JAX 0.12 cannot run a bf16 x bf16 -> f32 dot inside a loop
  (`UNIMPLEMENTED: Unsupported element type for DotThunk::Execute`); on CPU 16-bit operands
  are widened to float32 first (exact: their products fit float32).
- `cuda_lowering`: lowering Pallas Triton kernels for CUDA on a host without a GPU needs an
  abstract GPU device since JAX 0.11 (`No supported GPU devices found`); JAX 0.10 assumed
  compute capability 9.0. `use_mesh`: `jax.set_mesh` or `jax.sharding.use_mesh`.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import jax
from jax import lax
from jax.experimental import pallas as pl

_GPU_PLATFORMS = ("gpu", "cuda", "rocm")


def compile_platform() -> str | None:
    """The platform of the devices the program being traced is compiled for, when a mesh says.

    The current abstract mesh (``jax.sharding.get_abstract_mesh()``: set by ``jax.set_mesh`` /
    ``use_mesh``, including meshes of compile-only devices from
    ``jax.experimental.topologies.get_topology_desc(..., platform='tpu')``, or by
    ``jax.sharding.use_abstract_mesh`` with an ``AbstractDevice``), else the concrete mesh
    (``jax.sharding.get_mesh()``); ``None`` when neither names a platform (JAX before abstract
    devices, or no mesh).
    """
    sharding = jax.sharding
    get_abstract_mesh = getattr(sharding, "get_abstract_mesh", None)
    if get_abstract_mesh is not None:
        mesh = get_abstract_mesh()
        device = getattr(mesh, "abstract_device", None)
        platform = getattr(device, "platform", None)
        if platform:
            return platform
    get_mesh = getattr(sharding, "get_mesh", None)
    if get_mesh is not None:
        try:
            devices = getattr(get_mesh(), "devices", None)
        except (RuntimeError, ValueError):  # pragma: no cover - no mesh on some versions
            devices = None
        if devices is not None and getattr(devices, "size", 0):
            return getattr(devices.flat[0], "platform", None)
    return None


def backend_kind(backend: str | None = None) -> str:
    """``'gpu'``, ``'cpu'`` or ``'tpu'`` for a JAX platform name.

    ``backend=None``: the platform the program is compiled for - the devices of the mesh or
    abstract mesh it is traced under (:func:`compile_platform`), else JAX's default backend. The
    one resolver of every op's ``'auto'`` (and of ``interpret=None``), so a program lowered for
    a TPU or GPU mesh from a CPU host picks that platform's kernels.
    """
    if backend is None:
        backend = compile_platform() or jax.default_backend()
    return "gpu" if backend in _GPU_PLATFORMS else backend


def is_gpu(backend: str | None = None) -> bool:
    """Whether ``backend`` (default: JAX's default backend) is an NVIDIA or AMD GPU."""
    return backend_kind(backend) == "gpu"


def default_interpret() -> bool:
    """Whether Pallas kernels should run in interpret mode on the platform compiled for."""
    return not is_gpu()


def check_interpret(interpret: bool | None) -> None:
    """Raises unless ``interpret`` is None, True or False (without touching the backend)."""
    if interpret is not None and not isinstance(interpret, bool):
        raise ValueError(f"{interpret=} must be None, True or False")


def resolve_interpret(interpret: bool | None, platform: str = "gpu") -> bool:
    """`None` -> compiled when compiling for ``platform`` (the kernel's chip: ``'gpu'`` for the
    Triton kernels, ``'tpu'`` for the Mosaic ones), interpreted elsewhere; a bool is returned
    unchanged.

    Resolving ``None`` initialises JAX's backends: call it when a kernel runs, never at import
    time or in a constructor (users configure JAX after importing efflax).
    """
    check_interpret(interpret)
    return backend_kind() != platform if interpret is None else interpret


@functools.cache
def _triton_module() -> Any:
    from jax.experimental.pallas import triton as plgpu

    return plgpu


def widen_for_cpu_dot(*arrays: jax.Array) -> tuple[jax.Array, ...]:
    """16-bit float operands as float32 on CPU (same products, float32 accumulation either way)."""
    if backend_kind() != "cpu":
        return arrays
    return tuple(
        a.astype(jax.numpy.float32) if a.dtype in (jax.numpy.bfloat16, jax.numpy.float16) else a
        for a in arrays
    )


def has_triton_backend() -> bool:
    """Whether this JAX still ships Pallas' Triton backend (deprecated since JAX 0.11)."""
    try:
        _triton_module()
    except ImportError:  # pragma: no cover - a JAX that removed it
        return False
    return True


def gpu_compiler_params(*, num_warps: int | None = None, num_stages: int | None = None) -> Any:
    """Compiler parameters for the Pallas Triton (GPU) backend, whatever the class is called."""
    plgpu = _triton_module()
    params_cls = getattr(plgpu, "CompilerParams", None) or plgpu.TritonCompilerParams
    return params_cls(num_warps=num_warps, num_stages=num_stages)


def compiler_params_kwargs(
    *, interpret: bool, num_warps: int | None, num_stages: int | None
) -> dict[str, Any]:
    """`pallas_call` keyword arguments carrying GPU compiler params (none in interpret mode)."""
    if interpret:
        return {}
    return {"compiler_params": gpu_compiler_params(num_warps=num_warps, num_stages=num_stages)}


def multiple_of(x: jax.Array, multiple: int) -> jax.Array:
    """Tells the compiler that `x` is a multiple of `multiple` (for aligned, vectorised loads)."""
    hint = getattr(pl, "multiple_of", None)
    return x if hint is None else hint(x, multiple)


def cdiv(a: int, b: int) -> int:
    """Ceiling division of Python ints (``pl.cdiv`` without the dependency on its location)."""
    return -(-a // b)


def auto_axes(mesh: Any) -> Any:
    """``mesh`` with every axis of type ``Auto`` (itself if it already is, or has no axis types).

    ``jax.make_mesh`` gives ``Explicit`` axes by default since JAX 0.10; under them
    ``shard_map`` demands inputs already sharded exactly as ``in_specs`` and a matmul that
    contracts a sharded axis needs a hand-written output sharding. On the ``Auto`` twin (same
    devices, same names) XLA's partitioner inserts the resharding.
    """
    axis_type = getattr(jax.sharding, "AxisType", None)
    types = getattr(mesh, "axis_types", None)
    if axis_type is None or types is None or all(t == axis_type.Auto for t in types):
        return mesh
    return jax.sharding.Mesh(
        mesh.devices, mesh.axis_names, axis_types=(axis_type.Auto,) * len(mesh.axis_names)
    )


def shard_map(fn: Any, *, mesh: Any, in_specs: Any, out_specs: Any) -> Any:
    """``jax.shard_map`` (JAX >= 0.7), or ``jax.experimental.shard_map`` on older JAX.

    A mesh with ``Explicit`` axes is used as its ``Auto`` twin (see :func:`auto_axes`).
    """
    mesh = auto_axes(mesh)
    if hasattr(jax, "shard_map"):
        return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs)
    from jax.experimental.shard_map import shard_map as legacy  # pragma: no cover - old JAX

    return legacy(  # pragma: no cover - old JAX
        fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_rep=False
    )


def to_varying(x: jax.Array, axis_name: str) -> jax.Array:
    """Marks a value that is equal on all devices of ``axis_name`` as device-varying, so both
    branches of a ``lax.cond`` inside ``shard_map`` have the same type (a no-op on data)."""
    if hasattr(lax, "pcast"):
        return lax.pcast(x, (axis_name,), to="varying")
    if hasattr(lax, "pvary"):  # pragma: no cover - JAX versions between pvary and pcast
        return lax.pvary(x, (axis_name,))
    return x  # pragma: no cover - before varying-manual-axes types existed


def backends_initialized() -> bool:
    """Whether this process has started JAX's backends (no public API says so; a process that
    forks workers must not have: the children would share its runtime's threads)."""
    from jax._src import xla_bridge

    return xla_bridge.backends_are_initialized()


# Device kinds of the GPUs the kernels are compiled for without one (shared/gpu_specs/).
H100_DEVICE_KIND = "NVIDIA H100 80GB HBM3"
A100_DEVICE_KIND = "NVIDIA A100-SXM4-80GB"


def has_abstract_devices() -> bool:
    """Whether this JAX has ``AbstractDevice`` and ``use_abstract_mesh`` (JAX >= 0.7)."""
    sharding = jax.sharding
    return hasattr(sharding, "AbstractDevice") and hasattr(sharding, "use_abstract_mesh")


@contextlib.contextmanager
def abstract_platform(platform: str, device_kind: str, num_cores: int | None = 1) -> Iterator[None]:
    """Traces inside an abstract mesh of one abstract ``platform`` device (``'tpu'``, ``'gpu'``).

    What a program lowered for that platform from another host sees: :func:`backend_kind`
    returns ``platform``. A no-op on a JAX without abstract devices.
    """
    if not has_abstract_devices():  # pragma: no cover - old JAX
        yield
        return
    sharding = jax.sharding
    device = sharding.AbstractDevice(
        device_kind=device_kind, num_cores=num_cores, platform=platform
    )
    mesh = sharding.AbstractMesh((1,), ("x",), abstract_device=device)
    with sharding.use_abstract_mesh(mesh):
        yield


def cuda_lowering(device_kind: str = H100_DEVICE_KIND, num_cores: int = 132) -> Any:
    """Context for ``.lower(lowering_platforms=("cuda",))`` of Pallas kernels without a GPU.

    Lowers for the compute capability of ``device_kind`` through an abstract mesh of one
    abstract GPU device. JAX >= 0.11 requires it; JAX 0.10 accepts it too (and without it
    assumed compute capability 9.0).
    """
    return abstract_platform("gpu", device_kind, num_cores)


def use_mesh(mesh: Any) -> Any:
    """Context manager making ``mesh`` the current mesh (``jax.set_mesh`` / ``use_mesh``)."""
    if hasattr(jax, "set_mesh"):
        return jax.set_mesh(mesh)
    if hasattr(jax.sharding, "use_mesh"):  # pragma: no cover - JAX versions before set_mesh
        return jax.sharding.use_mesh(mesh)
    return mesh  # pragma: no cover - a Mesh is its own context manager on old JAX


def auto_partitioned_axes() -> tuple[Any, tuple[str, ...]]:
    """``(mesh, axes)``: the current mesh and its axes of size > 1 that XLA partitions
    automatically (not manual, i.e. not already inside a ``shard_map`` over them).

    Mosaic TPU kernels cannot be partitioned by XLA; a caller traced under such a mesh wraps
    them in ``shard_map`` over these axes. ``(None, ())`` without a mesh (or on a JAX without
    abstract meshes).
    """
    get_abstract_mesh = getattr(jax.sharding, "get_abstract_mesh", None)
    if get_abstract_mesh is None:  # pragma: no cover - old JAX
        return None, ()
    mesh = get_abstract_mesh()
    if mesh is None or getattr(mesh, "empty", False) or not getattr(mesh, "shape", None):
        return None, ()
    manual = set(getattr(mesh, "manual_axes", ()) or ())
    axes = tuple(name for name, size in mesh.shape.items() if size > 1 and name not in manual)
    return mesh, axes


def has_explicit_axes(mesh: Any) -> bool:
    """Whether ``mesh`` has an axis of type ``Explicit`` (``jax.make_mesh``'s default since 0.10)."""
    axis_type = getattr(jax.sharding, "AxisType", None)
    types = getattr(mesh, "axis_types", ()) or ()
    return axis_type is not None and any(t == axis_type.Explicit for t in types)


def shard_map_on(mesh: Any, fn: Any, in_specs: Any, out_specs: Any) -> Any:
    """``jax.shard_map`` over the (abstract) context ``mesh``; inputs on ``Explicit`` axes are
    resharded to ``in_specs`` first (shard_map refuses them otherwise)."""

    def run(*args):
        if has_explicit_axes(mesh):
            args = [jax.sharding.reshard(a, s) for a, s in zip(args, in_specs, strict=True)]
        # check_vma=False: a pallas_call's outputs carry no varying-axes type.
        return jax.shard_map(
            fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False
        )(*args)

    return run
