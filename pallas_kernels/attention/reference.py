"""The attention oracle: plain jnp in float32, every feature, no custom VJP, no tricks.

It materialises what the definition says, ``[batch, heads, q_len, kv_len, head_dim]`` keys and
values as each query sees them (a key a query does not see is replaced by zeros *before* any
arithmetic), so that "a masked key has no influence" holds by construction, for the output and for
``jax.grad``. O(q_len * kv_len * head_dim) memory: for tests, not for use.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention.base import AttentionCall
from pallas_kernels.attention.base import AttentionImplementation
from pallas_kernels.attention.base import dropout_keep_mask

__all__ = ["ReferenceAttention"]


@dataclasses.dataclass(frozen=True)
class ReferenceAttention(AttentionImplementation):
    """The float32 oracle (``implementation='reference'``); supports every argument.

    ``precision`` is accepted and ignored: it always computes at ``Precision.HIGHEST``.
    """

    name = "reference"

    def __call__(self, call: AttentionCall) -> jax.Array:
        batch, q_len, kv_len, num_heads, _, head_dim = call.shape
        group = call.group
        visible = call.mask.elements(q_len, kv_len)
        if visible is None:
            visible = jnp.ones((), bool)
        visible = jnp.broadcast_to(visible, (batch, num_heads, q_len, kv_len))

        def per_query(x):  # [b, kv, kv_heads, d] -> [b, heads, q, kv, d], zero where unseen
            x = jnp.repeat(x.astype(jnp.float32), group, axis=2).transpose(0, 2, 1, 3)
            x = jnp.broadcast_to(x[:, :, None], (batch, num_heads, q_len, kv_len, head_dim))
            return jnp.where(visible[..., None], x, 0.0)

        hp = lax.Precision.HIGHEST
        q = call.query.astype(jnp.float32).transpose(0, 2, 1, 3)  # [b, h, q, d]
        scores = (
            jnp.einsum("bhqd,bhqkd->bhqk", q, per_query(call.key), precision=hp) * call.sm_scale
        )
        if call.bias is not None:
            scores = scores + jnp.where(visible, call.bias.astype(jnp.float32), 0.0)
        scores = jnp.where(visible, scores, -jnp.inf)
        row_max = jnp.max(scores, axis=-1, keepdims=True)
        row_max = lax.stop_gradient(jnp.where(row_max == -jnp.inf, 0.0, row_max))
        weights = jnp.where(visible, jnp.exp(scores - row_max), 0.0)
        total = jnp.sum(weights, axis=-1, keepdims=True)
        weights = weights / jnp.where(total == 0.0, 1.0, total)
        if call.dropout_rate > 0.0:
            keep = dropout_keep_mask(
                call.dropout_rng, call.dropout_rate, weights.shape, call.broadcast_dropout
            )
            weights = jnp.where(keep, weights / (1.0 - call.dropout_rate), 0.0)
        out = jnp.einsum("bhqk,bhqkd->bqhd", weights, per_query(call.value), precision=hp)
        return out.astype(call.query.dtype)
