"""Mixed-chunk attention as chunked XLA computation: linear in the sequence length.

The sequence is padded to whole chunks and reshaped to ``[batch, G, C, .]``. The quadratic term
is a batched ``[C, C]`` ``relu^2`` attention per chunk; the linear term forms each chunk's
``K_lin^T V`` (``[s_lin, e]``) and combines them over chunks: causal, an *exclusive* prefix sum
written as a shift (``[0, cumsum[:-1]]``; ``cumsum - x`` would let a later chunk leak in through
rounding), non-causal, the sum over all chunks. Cost ``O(T C (s + e) + T s_lin e)``. Plain jnp,
so every autodiff mode works (``jax.jvp`` included).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax

from pallas_kernels.mixed_chunk.base import MixedChunkCall
from pallas_kernels.mixed_chunk.base import MixedChunkImplementation
from pallas_kernels.mixed_chunk.base import mask_values

__all__ = ["XlaMixedChunk", "mixed_chunk_attention_xla"]


def _precision(dtype) -> lax.Precision | None:
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _chunked(x: jax.Array, num_chunks: int, chunk_size: int) -> jax.Array:
    """``[b, T, d]`` -> ``[b, G, C, d]``, zero-padding the last chunk."""
    pad = num_chunks * chunk_size - x.shape[1]
    if pad:
        x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
    return x.reshape(x.shape[0], num_chunks, chunk_size, x.shape[2])


def mixed_chunk_attention_xla(call: MixedChunkCall) -> jax.Array:
    """The chunked computation of a checked call (see ``base.check_arguments``)."""
    chunk_size, causal = call.chunk_size, call.causal
    quad_q, quad_k, value, lin_q, lin_k = call.inputs
    batch, seq_len, _ = value.shape
    num_chunks = -(-seq_len // chunk_size)
    # float16 weights overflow (relu^2 of a score above 256); bfloat16 has float32's range.
    mm_dtype = jnp.float32 if value.dtype == jnp.float16 else value.dtype
    precision = _precision(mm_dtype)

    def einsum(spec, a, b):
        return jnp.einsum(
            spec,
            a.astype(mm_dtype),
            b.astype(mm_dtype),
            precision=precision,
            preferred_element_type=jnp.float32,
        )

    # Padded tail keys and masked keys have zero values, so they carry no weight in either term.
    value = _chunked(mask_values(value, call.key_mask), num_chunks, chunk_size)
    q, k = (_chunked(x, num_chunks, chunk_size) for x in (quad_q, quad_k))

    scores = einsum("bgis,bgjs->bgij", q, k) * call.quad_scale
    if call.bias is not None:
        scores = scores + call.bias.astype(jnp.float32)
    weights = jnp.square(jax.nn.relu(scores))
    if causal:
        visible = jnp.tril(jnp.ones((chunk_size, chunk_size), bool))
        weights = jnp.where(visible, weights, 0.0)
    out = einsum("bgij,bgje->bgie", weights, value)

    if lin_q is not None:
        ql, kl = (_chunked(x, num_chunks, chunk_size) for x in (lin_q, lin_k))
        chunk_states = einsum("bgjs,bgje->bgse", kl, value)  # [b, G, s_lin, e]
        if causal:
            inclusive = jnp.cumsum(chunk_states, axis=1)
            states = jnp.concatenate([jnp.zeros_like(inclusive[:, :1]), inclusive[:, :-1]], axis=1)
            linear = einsum("bgis,bgse->bgie", ql, states)
        else:
            linear = einsum("bgis,bse->bgie", ql, jnp.sum(chunk_states, axis=1))
        out = out + linear * call.lin_scale

    out = out.reshape(batch, num_chunks * chunk_size, -1)[:, :seq_len]
    return out.astype(value.dtype)


@dataclasses.dataclass(frozen=True)
class XlaMixedChunk(MixedChunkImplementation):
    """Chunked XLA computation (``implementation='xla'``); runs everywhere, every autodiff mode."""

    name = "xla"

    def __call__(self, call: MixedChunkCall) -> jax.Array:
        return mixed_chunk_attention_xla(call)
