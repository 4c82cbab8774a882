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
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention.base import ATTENTION_OP
from pallas_kernels.attention.base import AttentionImplementation
from pallas_kernels.attention.base import dropout_keep_mask
from pallas_kernels.attention.base import element_mask
from pallas_kernels.attention.base import finite_or_zero

__all__ = ["XlaAttention", "attention_weights"]


def _grouped(x: jax.Array, num_kv_heads: int, group: int) -> jax.Array:
    """``[b, heads or 1, q, kv]`` -> ``[b, kv_heads or 1, group or 1, q, kv]``."""
    if x.shape[1] == 1:
        return x[:, :, None]
    return x.reshape(x.shape[0], num_kv_heads, group, *x.shape[2:])


def _softmax(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array | None,
    *,
    bias: jax.Array | None,
    mask: jax.Array | None,
    causal: bool,
    q_offset: jax.Array | None,
    segment_ids: tuple[jax.Array, jax.Array] | None,
    block_mask: jax.Array | None,
    block_shape: tuple[int, int] | None,
    sm_scale: float,
    precision: Any,
) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
    """Float32 weights ``[b, kv_heads, group, q, kv]``, whether each row sees a non-finite input
    (``[b, kv_heads, group, q]``, or None), and the cleaned ``value`` (or None)."""
    batch, q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[1], key.shape[2]
    group = num_heads // num_kv_heads
    visible = element_mask(
        q_len,
        kv_len,
        mask=mask,
        causal=causal,
        q_offset=q_offset,
        segment_ids=segment_ids,
        block_mask=block_mask,
        block_shape=block_shape,
    )
    poisoned = None
    if visible is not None:
        query, bad_query = finite_or_zero(query)  # [b, q, heads]
        key, bad_key = finite_or_zero(key)  # [b, kv, kv_heads]
        if value is not None:
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
        precision=precision,
        preferred_element_type=jnp.float32,
    )
    scores = scores * jnp.float32(sm_scale)
    if bias is not None:
        scores = scores + _grouped(bias, num_kv_heads, group).astype(jnp.float32)
    if visible is not None:
        scores = jnp.where(visible, scores, -jnp.inf)
    row_max = lax.stop_gradient(jnp.max(scores, axis=-1, keepdims=True))
    if visible is not None:
        row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)  # a row that sees no key
    weights = jnp.exp(scores - row_max)
    total = jnp.sum(weights, axis=-1, keepdims=True)
    if visible is not None:
        total = total + jnp.float32(1e-30)  # >= 1 where a key is seen; 0 / 1e-30 = 0 elsewhere
    return weights / total, poisoned, value


def attention_weights(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array | None = None,
    **normalised: Any,
) -> jax.Array:
    """The float32 softmax weights ``[batch, heads, q_len, kv_len]`` (before dropout).

    Takes the op's normalised arguments (without the dropout ones); ``value`` only for its
    non-finite check. A row that sees a non-finite entry is NaN.
    """
    batch, q_len, num_heads, _ = query.shape
    weights, poisoned, _ = _softmax(query, key, value, **normalised)
    if poisoned is not None:
        weights = jnp.where(poisoned[..., None], jnp.nan, weights)
    return weights.reshape(batch, num_heads, q_len, key.shape[1])


@dataclasses.dataclass(frozen=True)
class XlaAttention(AttentionImplementation):
    """The XLA path (``implementation='xla'``): supports every argument, ``jax.jvp``-able."""

    name = "xla"

    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        *,
        bias: jax.Array | None,
        mask: jax.Array | None,
        causal: bool,
        q_offset: jax.Array | None,
        segment_ids: tuple[jax.Array, jax.Array] | None,
        block_mask: jax.Array | None,
        block_shape: tuple[int, int] | None,
        sm_scale: float,
        dropout_rate: float,
        dropout_rng: jax.Array | None,
        broadcast_dropout: bool,
        precision: Any,
    ) -> jax.Array:
        batch, q_len, num_heads, head_dim = query.shape
        kv_len, num_kv_heads = key.shape[1], key.shape[2]
        weights, poisoned, clean_value = _softmax(
            query,
            key,
            value,
            bias=bias,
            mask=mask,
            causal=causal,
            q_offset=q_offset,
            segment_ids=segment_ids,
            block_mask=block_mask,
            block_shape=block_shape,
            sm_scale=sm_scale,
            precision=precision,
        )
        if dropout_rate > 0.0:
            keep = dropout_keep_mask(
                dropout_rng, dropout_rate, (batch, num_heads, q_len, kv_len), broadcast_dropout
            )
            keep = _grouped(keep, num_kv_heads, num_heads // num_kv_heads)
            weights = jnp.where(keep, weights / (1.0 - dropout_rate), 0.0)
        out = jnp.einsum(
            "bhgqk,bkhd->bqhgd",
            weights.astype(value.dtype),
            value if clean_value is None else clean_value,
            precision=precision,
            preferred_element_type=jnp.float32,
        )
        if poisoned is not None:
            out = jnp.where(poisoned.transpose(0, 3, 1, 2)[..., None], jnp.nan, out)
        return out.reshape(batch, q_len, num_heads, head_dim).astype(query.dtype)


ATTENTION_OP.register(XlaAttention())
