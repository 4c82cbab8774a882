"""Attention on XLA: two einsums and a float32 softmax, every feature, differentiable in any mode.

The ``[batch, heads, q_len, kv_len]`` scores are materialised (O(seq^2) memory, like
``jax.nn.dot_product_attention(implementation='xla')``); GQA groups query heads over their shared
key/value head instead of repeating K/V. When some query does not see some key, non-finite
query/key/value entries are replaced by zeros before the matmuls, so a key a query does not see
cannot leak ``0 * NaN`` into it (nor into any gradient), and the output rows that do see one are
set to NaN afterwards (a boolean reduction: peak memory stays that of ``jax.nn``'s XLA path).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention.base import AttentionCall
from pallas_kernels.attention.base import AttentionImplementation
from pallas_kernels.attention.base import dropout_keep_mask
from pallas_kernels.attention.base import finite_or_zero

__all__ = ["XlaAttention", "attention_weights"]


def _grouped(x: jax.Array, num_kv_heads: int, group: int) -> jax.Array:
    """``[b, heads or 1, q, kv]`` -> ``[b, kv_heads or 1, group or 1, q, kv]``."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], num_kv_heads, group, *x.shape[2:])


def _softmax(call: AttentionCall) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Float32 weights ``[b, kv_heads, group, q, kv]``, whether each row sees a non-finite input
    (``[b, kv_heads, group, q]``, or None), and the cleaned ``value`` (or None)."""
    batch, q_len, kv_len, _, num_kv_heads, head_dim = call.shape
    group = call.group
    query, key, value = call.query, call.key, call.value
    visible = call.mask.elements(q_len, kv_len)
    poisoned = None
    if visible is not None:
        query, bad_query = finite_or_zero(query)  # [b, q, heads]
        key, bad_key = finite_or_zero(key)  # [b, kv, kv_heads]
        value, bad_value = finite_or_zero(value)
        bad_key = bad_key | bad_value
        visible = _grouped(visible, num_kv_heads, group)
        # A boolean reduction (no gradient, fused by XLA): the rows that see a non-finite entry.
        bad_key = bad_key.transpose(0, 2, 1)[:, :, None, None, :]  # [b, kv_heads, 1, 1, kv]
        bad_query = bad_query.reshape(batch, q_len, num_kv_heads, group).transpose(0, 2, 3, 1)
        poisoned = jnp.any(visible & bad_key, axis=-1) | bad_query
    grouped_q = query.reshape(batch, q_len, num_kv_heads, group, head_dim)
    scores = jnp.einsum(
        "bqhgd,bkhd->bhgqk",
        grouped_q,
        key,
        precision=call.precision,
        preferred_element_type=jnp.float32,
    )
    scores = scores * jnp.asarray(call.sm_scale, jnp.float32)
    if call.bias is not None:
        scores = scores + _grouped(call.bias, num_kv_heads, group).astype(jnp.float32)
    if visible is not None:
        scores = jnp.where(visible, scores, -jnp.inf)
    row_max = lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    if visible is not None:
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # a row that sees no key
    weights = jnp.exp(scores - row_max)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    if visible is not None:
        total = total + jnp.float32(1e-30)  # >= 1 where a key is seen; 0 / 1e-30 = 0 elsewhere
    weights = weights / total
    if visible is not None:
        # Also in the backward pass: a masked weight's cotangent (dO . v, which may overflow for
        # a huge masked value) is selected away, never multiplied by a zero weight.
        weights = jnp.where(visible, weights, 0.0)
    return weights, poisoned, None if visible is None else value


def attention_weights(call: AttentionCall) -> jax.Array:
    """The float32 softmax weights ``[batch, heads, q_len, kv_len]`` of a call (before
    dropout). A row that sees a non-finite entry is NaN."""
    batch, q_len, kv_len, num_heads, _, _ = call.shape
    weights, poisoned, _ = _softmax(call)
    if poisoned is not None:
        weights = jnp.where(poisoned[..., None], jnp.nan, weights)
    return weights.reshape(batch, num_heads, q_len, kv_len)


@dataclasses.dataclass(frozen=True)
class XlaAttention(AttentionImplementation):
    """The XLA path (``implementation='xla'``): supports every argument, ``jax.jvp``-able."""

    name = "xla"

    def __call__(self, call: AttentionCall) -> jax.Array:
        batch, q_len, kv_len, num_heads, num_kv_heads, head_dim = call.shape
        weights, poisoned, clean_value = _softmax(call)
        if call.dropout_rate > 0.0:
            keep = dropout_keep_mask(
                call.dropout_rng,
                call.dropout_rate,
                (batch, num_heads, q_len, kv_len),
                call.broadcast_dropout,
            )
            keep = _grouped(keep, num_kv_heads, call.group)
            weights = jnp.where(keep, weights / (1.0 - call.dropout_rate), 0.0)
        value = call.value if clean_value is None else clean_value
        out = jnp.einsum(
            "bhgqk,bkhd->bqhgd",
            weights.astype(value.dtype),
            value,
            precision=call.precision,
            preferred_element_type=jnp.float32,
        )
        if poisoned is not None:
            out = jnp.where(poisoned.transpose(0, 3, 1, 2)[..., None], jnp.nan, out)
        return out.reshape(batch, q_len, num_heads, head_dim).astype(call.query.dtype)
