"""The plain ``[T, T]`` oracle of mixed-chunk attention: it builds the weight matrix explicitly.

No chunked arithmetic, no prefix sums, no custom VJP: ``W`` is written entry by entry from the
definition in :mod:`pallas_kernels.mixed_chunk.base` (float32, highest precision) and multiplied
by ``V``. Quadratic in memory; for tests.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.mixed_chunk.base import MIXED_CHUNK_ATTENTION
from pallas_kernels.mixed_chunk.base import check_arguments
from pallas_kernels.op import Implementation

__all__ = ["ReferenceMixedChunk", "mixed_chunk_attention_reference", "mixed_chunk_weights"]

_HIGHEST = lax.Precision.HIGHEST


def mixed_chunk_weights(
    quad_q: jax.Array,
    quad_k: jax.Array,
    lin_q: jax.Array | None,
    lin_k: jax.Array | None,
    *,
    chunk_size: int,
    causal: bool,
    quad_scale: float,
    lin_scale: float,
    bias: jax.Array | None,
    key_mask: jax.Array | None,
) -> jax.Array:
    """The ``[batch, T, T]`` float32 weight matrix ``W`` of mixed-chunk attention."""
    seq_len = quad_q.shape[1]
    positions = jnp.arange(seq_len)
    row, col = positions[:, None], positions[None, :]
    same_chunk = (row // chunk_size) == (col // chunk_size)
    earlier_chunk = (col // chunk_size) < (row // chunk_size)
    visible = (col <= row) if causal else jnp.ones((seq_len, seq_len), bool)

    scores = jnp.einsum(
        "bis,bjs->bij", quad_q.astype(jnp.float32), quad_k.astype(jnp.float32), precision=_HIGHEST
    )
    scores = scores * quad_scale
    if bias is not None:
        # bias[i % C, j % C]: the same in-chunk pattern for every chunk.
        local = positions % chunk_size
        scores = scores + bias.astype(jnp.float32)[local[:, None], local[None, :]]
    weights = jnp.where(same_chunk & visible, jnp.square(jax.nn.relu(scores)), 0.0)
    if lin_q is not None:
        linear = jnp.einsum(
            "bis,bjs->bij", lin_q.astype(jnp.float32), lin_k.astype(jnp.float32), precision=_HIGHEST
        )
        reach = earlier_chunk if causal else jnp.ones((seq_len, seq_len), bool)
        weights = weights + jnp.where(reach, linear * lin_scale, 0.0)
    if key_mask is not None:
        weights = jnp.where(key_mask[:, None, :], weights, 0.0)
    return weights


def _reference(
    quad_q,
    quad_k,
    value,
    lin_q,
    lin_k,
    *,
    bias,
    key_mask,
    chunk_size,
    causal,
    quad_scale,
    lin_scale,
):
    weights = mixed_chunk_weights(
        quad_q,
        quad_k,
        lin_q,
        lin_k,
        chunk_size=chunk_size,
        causal=causal,
        quad_scale=quad_scale,
        lin_scale=lin_scale,
        bias=bias,
        key_mask=key_mask,
    )
    out = jnp.einsum("bij,bje->bie", weights, value.astype(jnp.float32), precision=_HIGHEST)
    return out.astype(value.dtype)


def mixed_chunk_attention_reference(
    quad_q: jax.Array,
    quad_k: jax.Array,
    value: jax.Array,
    lin_q: jax.Array | None = None,
    lin_k: jax.Array | None = None,
    *,
    chunk_size: int,
    causal: bool,
    quad_scale: float = 1.0,
    lin_scale: float = 1.0,
    bias: jax.Array | None = None,
    key_mask: jax.Array | None = None,
) -> jax.Array:
    """Mixed-chunk attention from the explicit ``[T, T]`` weight matrix (the test oracle).

    Same arguments and checks as :func:`pallas_kernels.mixed_chunk.mixed_chunk_attention`
    (without ``implementation``). Computes in float32 from upcast inputs.
    """
    kwargs = check_arguments(
        quad_q,
        quad_k,
        value,
        lin_q,
        lin_k,
        chunk_size=chunk_size,
        causal=causal,
        quad_scale=quad_scale,
        lin_scale=lin_scale,
        bias=bias,
        key_mask=key_mask,
    )
    return _reference(**kwargs)


@dataclasses.dataclass(frozen=True)
class ReferenceMixedChunk(Implementation):
    """The explicit ``[T, T]`` computation behind the op interface (``implementation='reference'``)."""

    name: ClassVar[str] = "reference"

    def __call__(self, **kwargs) -> jax.Array:
        return _reference(**kwargs)


MIXED_CHUNK_ATTENTION.register(ReferenceMixedChunk())
