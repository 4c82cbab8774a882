"""The decode contract: one set of checks for every module that decodes with a ``'cache'``.

``MultiHeadAttention`` (``decode=True``), the GAU layers (``GatedAttentionUnit``, ``FLASH``,
``FLASHQuad`` with ``decode=True`` at call time) and ``TransformerLM`` / ``generate`` over them
all follow it:

1. The first call with decode (``init``, or ``apply`` without a cache) fixes the cache from its
   input ``[batch, length, ...]`` (the cache batch and the cache length) and computes as
   without decode.
2. Every later call feeds ``[batch, t, ...]`` at the cache index: a batch other than the
   cache's, or ``t > length``, is a ``ValueError`` naming both (shapes are known under ``jit``).
3. Where the index is known (outside ``jit``), ``index + t > length`` is a ``ValueError`` naming
   the cache length and the position.
4. Under ``jit`` the index is traced and cannot raise: positions ``>= length`` are not written
   (never clamped onto earlier slots), their mixing output (attention, GAU) is zero, the rest
   of the cache is left as it was, and the index keeps counting, so :func:`overflowed` of the
   cache flags the call (``efflax.nn.decode_overflowed``). Never NaN.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import _checks

__all__ = ["check_cache", "check_position", "check_step", "overflowed", "positions", "write"]

Array = jax.Array


def check_step(name: str, shape: tuple[int, ...], *, cache_batch: int, cache_length: int) -> None:
    """A decode step ``name`` of ``shape [batch, t, ...]`` must match the cache it writes to."""
    batch, length = shape[:2]
    if batch != cache_batch:
        raise ValueError(
            f"{name}.shape={tuple(shape)}: a decode step of batch {batch} on a cache of batch "
            f"{cache_batch} (re-initialise the cache for another batch size)"
        )
    if not 1 <= length <= cache_length:
        raise ValueError(
            f"{name}.shape={tuple(shape)}: a decode step of {_positions(length)} on a cache of "
            f"length {cache_length} (set by the input of the call that made the cache)"
        )


def _positions(count: int) -> str:
    return f"{count} position{'' if count == 1 else 's'}"


def check_position(name: str, index: Any, length: int, cache_length: int) -> None:
    """Raises when the cache index is known and ``index + length`` runs past the cache."""
    known = _checks.concrete(index)
    if known is not None and int(known) + length > cache_length:
        raise ValueError(
            f"{name}: a decode step of {_positions(length)} at cache position {int(known)} runs "
            f"past the cache length {cache_length} (positions {int(known)}.."
            f"{int(known) + length - 1}; make the cache longer)"
        )


def positions(index: Array, length: int, cache_length: int) -> tuple[Array, Array]:
    """The step's positions ``index + [0, length)`` and whether each lies inside the cache."""
    steps = index + jnp.arange(length, dtype=jnp.int32)
    return steps, steps < cache_length


def write(cache: Array, update: Array, index: Array) -> Array:
    """``cache[:, index:index + t] = update`` with the positions past the cache dropped.

    ``lax.dynamic_update_slice`` would clamp the start and overwrite earlier positions.
    """
    steps = index + jnp.arange(update.shape[1], dtype=jnp.int32)
    return cache.at[:, steps].set(update.astype(cache.dtype), mode="drop")


def _module_caches(cache: Any) -> Iterator[tuple[Array, int, int]]:
    """``(index, batch, length)`` of every decoding module's cache in a ``'cache'`` collection."""
    if not hasattr(cache, "items"):
        return
    if "cache_index" in cache and "cached_key" in cache:  # MultiHeadAttention
        yield cache["cache_index"], *cache["cached_key"].shape[:2]
    elif "index" in cache and "length" in cache and "keys" in cache:  # GatedAttentionUnit
        yield cache["index"], cache["keys"].shape[0], cache["length"].shape[0]
    for value in cache.values():
        yield from _module_caches(value)


def check_cache(name: str, shape: tuple[int, ...], cache: Any) -> None:
    """:func:`check_step` and :func:`check_position` of a step ``name`` against every module
    cache in a ``'cache'`` collection (for a model that holds decoding modules, so that its
    own argument is named)."""
    for index, batch, length in _module_caches(cache):
        check_step(name, shape, cache_batch=batch, cache_length=length)
        check_position(name, index, shape[1], length)


def overflowed(cache: Any) -> Array:
    """Whether a module of a ``'cache'`` collection was fed positions past its cache length.

    Outside ``jit`` such a call raises; under ``jit`` the index is traced and cannot, so the
    positions are dropped, their outputs zeroed, and this flag tells (e.g. on the cache that
    ``model.apply(..., decode=True, mutable=['cache'])`` returns).

    Args:
      cache: a ``'cache'`` collection (or the variables holding one) of ``MultiHeadAttention``,
        the GAU layers or a model built from them.

    Returns:
      A bool scalar array.
    """
    if hasattr(cache, "items") and "cache" in cache:
        cache = cache["cache"]
    flags = [jnp.asarray(index) > length for index, _, length in _module_caches(cache)]
    if not flags:
        raise ValueError(
            "cache holds no decoding module's cache (pass the 'cache' collection of a module "
            "called with decode=True)"
        )
    return jnp.any(jnp.stack(flags))
