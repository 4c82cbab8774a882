"""Attention through cuDNN's fused flash-attention kernels (``jax.nn.dot_product_attention``).

NVIDIA GPUs only, bfloat16/float16, head_dim a multiple of 8 (at most 128, 256 from Hopper on).
Causal masking is passed as cuDNN's own causal mask (its skipped tiles cost nothing); segment ids,
``q_offset``, block masks and boolean masks become one dense mask (cuDNN takes it as a bias).
Dropout is refused (jax.nn's cuDNN path has none), and so is anything else it cannot express, so
``'auto'`` falls through to XLA.

cuDNN multiplies masked weights (zero) by the values, so a NaN in a masked-out value would leak;
masked calls therefore run on inputs whose non-finite entries are zeroed, and the rows that see a
non-finite entry are set to NaN afterwards. Rows that see no key are set to zero.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.attention.base import AttentionCall
from pallas_kernels.attention.base import AttentionImplementation
from pallas_kernels.attention.base import finite_or_zero
from pallas_kernels.op import Unsupported

__all__ = ["CudnnAttention"]

_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def _max_head_dim() -> int:
    try:
        capability = float(getattr(jax.devices()[0], "compute_capability", "0"))
    except (RuntimeError, ValueError):
        capability = 0.0
    return 256 if capability >= 9.0 else 128


@dataclasses.dataclass(frozen=True)
class CudnnAttention(AttentionImplementation):
    """cuDNN flash attention (``implementation='cudnn'``)."""

    name = "cudnn"
    platforms = ("gpu",)
    supports_forward_mode = False  # jax.nn's cuDNN attention is a custom_vjp

    def __call__(self, call: AttentionCall) -> jax.Array:
        # no dropout; bf16/f16 inputs (precision does not apply)
        batch, q_len, kv_len, num_heads, num_kv_heads, head_dim = call.shape
        query, key, value, bias = call.query, call.key, call.value, call.bias
        causal, q_offset = call.mask.causal, call.mask.q_offset
        if not isinstance(call.sm_scale, float):
            raise Unsupported("jax.nn's cuDNN attention needs sm_scale known at trace time")
        if jnp.dtype(query.dtype) not in _DTYPES:
            raise Unsupported(f"cuDNN attention needs bfloat16 or float16, not {query.dtype}")
        if head_dim % 8 or head_dim > _max_head_dim():
            raise Unsupported(
                f"head_dim={head_dim} must be a multiple of 8 and <= {_max_head_dim()}"
            )
        if call.dropout_rate > 0.0:
            raise Unsupported("jax.nn's cuDNN attention has no dropout")
        # an offset causal mask goes in the dense mask
        dense = dataclasses.replace(call.mask, causal=q_offset is not None).elements(q_len, kv_len)
        if (dense is not None or bias is not None) and (q_len % 2 or kv_len % 2):
            raise Unsupported(
                f"cuDNN takes a mask or bias only for even lengths (q_len={q_len}, kv_len={kv_len})"
            )
        cudnn_causal = causal and q_offset is None
        masked = dense is not None or cudnn_causal
        if masked:
            query, bad_query = finite_or_zero(query)  # [b, q, heads]
            key, bad_key = finite_or_zero(key)
            value, bad_value = finite_or_zero(value)
            bad_key = jnp.repeat(bad_key | bad_value, num_heads // num_kv_heads, axis=2)
        full = (batch, num_heads, q_len, kv_len)

        def four_d(x):  # cuDNN wants [b or 1, heads or 1, q_len, kv_len]
            return None if x is None else jnp.broadcast_to(x, (*x.shape[:2], q_len, kv_len))

        out = jax.nn.dot_product_attention(
            query,
            key,
            value,
            bias=four_d(bias),
            mask=four_d(dense),
            scale=call.sm_scale,
            is_causal=cudnn_causal,
            implementation="cudnn",
        )
        if not masked:
            return out
        bad_cols = bad_key.transpose(0, 2, 1)[:, :, None, :]  # [b, heads, 1, kv]
        if dense is None:
            # Causal only: query i sees keys 0..i, so it is poisoned by the first bad key <= i.
            prefix_bad = lax.cummax(bad_cols[:, :, 0].astype(jnp.int32), axis=2) > 0
            last_seen = jnp.minimum(jnp.arange(q_len), kv_len - 1)
            seen_bad = jnp.take(prefix_bad, last_seen, axis=2)  # [b, heads, q]
            sees_any = jnp.ones((), bool)
        else:
            visible = dense
            if cudnn_causal:
                rows = jnp.arange(q_len)[:, None] >= jnp.arange(kv_len)[None, :]
                visible = visible & rows
            visible = jnp.broadcast_to(visible, full)
            seen_bad = jnp.any(visible & bad_cols, axis=-1)  # [b, heads, q]
            sees_any = jnp.any(visible, axis=-1)
        seen_bad = seen_bad | bad_query.transpose(0, 2, 1)
        seen_bad = seen_bad.transpose(0, 2, 1)[..., None]  # [b, q, heads, 1]
        sees_any = jnp.broadcast_to(sees_any, full[:3]).transpose(0, 2, 1)[..., None]
        out = jnp.where(sees_any, out, jnp.zeros((), out.dtype))
        return jnp.where(seen_bad, jnp.full((), jnp.nan, out.dtype), out)
