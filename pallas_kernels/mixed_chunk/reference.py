"""The plain ``[T, T]`` oracle of mixed-chunk attention: it builds the weight matrix explicitly.

No chunked arithmetic, no prefix sums, no custom VJP: ``W`` is written entry by entry from the
definition in :mod:`pallas_kernels.mixed_chunk.base` (float32, highest precision) and multiplied
by ``V``. Quadratic in memory; for tests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.mixed_chunk.base import MixedChunkCall
from pallas_kernels.mixed_chunk.base import MixedChunkImplementation
from pallas_kernels.mixed_chunk.base import check_arguments

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


def _reference(call: MixedChunkCall) -> jax.Array:
    weights = mixed_chunk_weights(
        call.quad_q,
        call.quad_k,
        call.lin_q,
        call.lin_k,
        chunk_size=call.chunk_size,
        causal=call.causal,
        quad_scale=call.quad_scale,
        lin_scale=call.lin_scale,
        bias=call.bias,
        key_mask=call.key_mask,
    )
    value = call.value
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
    call = check_arguments(
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
    return _reference(call)


@dataclasses.dataclass(frozen=True)
class ReferenceMixedChunk(MixedChunkImplementation):
    """The explicit ``[T, T]`` computation behind the op (``implementation='reference'``)."""

    name = "reference"

    def __call__(self, call: MixedChunkCall) -> jax.Array:
        return _reference(call)
