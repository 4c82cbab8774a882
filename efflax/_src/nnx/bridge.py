"""Flax NNX from efflax's linen modules: ``nnx.bridge.ToNNX`` plus efflax's logical sharding.

Every efflax parameter carries logical axis names (``nn.with_logical_partitioning``). NNX turns
that metadata into an ``out_sharding`` annotation on each ``nnx.Variable`` and, with eager
sharding on (the default since Flax 0.12), wants a mesh context at creation time to resolve it.
:func:`to_nnx` creates the variables with eager sharding off, keeping the logical names as
metadata, and then (given a mesh) places every variable with efflax's one logical-axis table,
the same placement ``efflax.sharding.shard_params`` gives the linen version. Without a mesh
the module is a plain single-device NNX module.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import linen as nn
from flax import nnx
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from efflax._src import sharding as _sharding

# Metadata keys under which Flax versions keep a Variable's sharding annotation.
_SHARDING_KEYS = ("out_sharding", "sharding_names", "sharding")


def _partition_spec(variable: nnx.Variable, mesh: Mesh, rules: _sharding.Rules) -> PartitionSpec:
    metadata = variable.get_metadata()
    names = next((metadata[k] for k in _SHARDING_KEYS if metadata.get(k) is not None), None)
    if names is None:
        return PartitionSpec()
    if isinstance(names, PartitionSpec):
        names = tuple(names)
    if metadata.get("linen_meta_type") is nn.Partitioned:  # mesh axis names already
        return _sharding._drop_missing_axes(PartitionSpec(*names), mesh)
    return _sharding.logical_to_mesh_spec(names, mesh=mesh, rules=rules)


def _broadcast(sharding: NamedSharding, value: Any) -> Any:
    return jax.tree.map(lambda _: sharding, value)


def logical_shardings(
    module: nnx.Module, mesh: Mesh, *, rules: _sharding.Rules = _sharding.LOGICAL_AXIS_RULES
) -> nnx.State:
    """A ``NamedSharding`` per variable of ``module`` (an ``nnx.State``), from its logical names.

    Variables without logical names (a decode cache, a counter) are replicated.

    Raises:
      ValueError: a logical name that is not in ``rules``, or a mesh the table cannot use
        (see ``efflax.sharding.check_mesh``).
    """
    if not isinstance(module, nnx.Module):
        raise TypeError(f"module must be an nnx.Module, got {type(module).__name__}")
    mesh = _sharding.check_mesh(mesh, rules)
    state = nnx.state(module)
    return jax.tree.map(
        lambda v: NamedSharding(mesh, _partition_spec(v, mesh, rules)),
        state,
        is_leaf=lambda x: isinstance(x, nnx.Variable),
    )


def shard(
    module: nnx.Module, mesh: Mesh, *, rules: _sharding.Rules = _sharding.LOGICAL_AXIS_RULES
) -> nnx.Module:
    """Places every variable of ``module`` on ``mesh`` by its logical names, in place.

    Returns ``module`` (for chaining). In a multi-process run every process passes the same
    values and each copies only its own shards (``efflax.distributed.put_global``).
    """
    from efflax._src.distributed import put_global

    mesh = _sharding.check_mesh(mesh, rules)
    state = nnx.state(module)
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    values = [v.get_value() for v in variables]
    # A sown collection holds a tuple of arrays in one variable: every array gets its sharding.
    shardings = [
        _broadcast(NamedSharding(mesh, _partition_spec(v, mesh, rules)), value)
        for v, value in zip(variables, values, strict=True)
    ]
    placed = put_global(values, shardings)
    for variable, value in zip(variables, placed, strict=True):
        variable.set_value(value)
    return module


def to_nnx(
    module: nn.Module,
    *sample_args: Any,
    rngs: nnx.Rngs | int,
    mesh: Mesh | None = None,
    rules: _sharding.Rules = _sharding.LOGICAL_AXIS_RULES,
    **sample_kwargs: Any,
) -> nnx.Module:
    """An initialized NNX module (``nnx.bridge.ToNNX``) running the efflax linen ``module``.

    Args:
      module: any efflax linen module or model (``efflax.nn.MultiHeadAttention``,
        ``MonarchDense``, ``MoEFeedForward``, ``FLASH``, ``efflax.models.TransformerLM``, ...).
      *sample_args: inputs of one call, used for shape-based initialization (as
        ``module.init`` would be called). With ``decode=True`` (a KV cache), pass the full
        length the cache must hold.
      rngs: ``nnx.Rngs`` or an int seed. ``params`` (or ``default``) initializes and is then
        dropped; any other stream (``dropout``, ``jitter``, ``gating_dropout``) is kept and
        drawn from at every call, as ``ToNNX`` does. A call can also pass ``rngs=`` itself.
      mesh: place the variables on this mesh by their logical axis names (efflax's table, or
        ``rules``); ``None`` keeps them where JAX put them (plain use).
      rules: the logical-axis table (default ``efflax.sharding.LOGICAL_AXIS_RULES``).
      **sample_kwargs: keyword arguments of the sample call (``decode=True``, ...).

    Returns:
      The NNX module: call it like the linen module's ``apply`` without the variables
      (``model(x, deterministic=False)``; ``model(x, decode=True, mutable=['cache'])``
      updates its cache in place). Its parameters are ``nnx.Param`` variables that keep the
      logical names as metadata, so ``nnx.Optimizer(model, tx, wrt=nnx.Param)`` works as usual.

    Example:
      >>> import jax.numpy as jnp
      >>> from flax import nnx
      >>> import efflax
      >>> layer = efflax.nnx.to_nnx(
      ...     efflax.nn.MonarchDense(16, nblocks=4), jnp.zeros((2, 16)), rngs=nnx.Rngs(0)
      ... )
      >>> layer(jnp.ones((2, 16))).shape
      (2, 16)
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be a flax.linen Module, got {type(module).__name__}")
    if isinstance(rngs, bool) or not isinstance(rngs, nnx.Rngs | int):
        raise TypeError(f"rngs must be an nnx.Rngs or an int seed, got {rngs!r}")
    if isinstance(rngs, int):
        rngs = nnx.Rngs(rngs)
    if mesh is not None:
        mesh = _sharding.check_mesh(mesh, rules)
    with nnx.use_eager_sharding(False):
        model = nnx.bridge.ToNNX(module, rngs=rngs)
        nnx.bridge.lazy_init(model, *sample_args, **sample_kwargs)
    # ToNNX draws from every stream it holds at every call. The params stream is spent once
    # initialized; dropping it leaves a module whose calls mutate no RNG state unless it needs
    # randomness (a dropout stream), so pure functions of its parameters (a loss under
    # jax.grad, efflax.optim's sharpness probes) can merge and call it at any trace level.
    streams = {name: stream for name, stream in rngs.items() if name not in ("params", "default")}
    model.to_nnx__rngs = (
        nnx.Rngs(**{n: s.key.get_value() for n, s in streams.items()}) if streams else None
    )
    if mesh is not None:
        shard(model, mesh, rules=rules)
    return model
