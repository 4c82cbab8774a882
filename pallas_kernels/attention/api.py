"""The attention op family: the public functions and the table of implementations.

How ``dot_product_attention`` runs: :func:`~pallas_kernels.attention.base.check_arguments`
checks the arguments once and builds one frozen
:class:`~pallas_kernels.attention.base.AttentionCall` (inputs, one
:class:`~pallas_kernels.attention.base.Mask`, normalised scalars); ``ATTENTION_OP`` hands it to
the requested implementation or, for ``'auto'``, to the first one in the order below for the
platform the program is compiled for (the devices of the current mesh or abstract mesh, else the
default backend) that accepts it. An implementation that cannot honour a call raises
``Unsupported``: ``'auto'`` falls through, an explicit request becomes a ``ValueError`` that says
why.

To add an implementation (e.g. ``'pallas_mosaic_tpu'``):

1. write one frozen dataclass, a subclass of
   :class:`~pallas_kernels.attention.base.AttentionImplementation` with a class attribute
   ``name = 'pallas_mosaic_tpu'`` (and ``platforms = ('tpu',)``, ``supports_forward_mode`` as it
   is), whose ``__call__(self, call: AttentionCall)`` reads the call value and raises
   ``Unsupported`` for what it cannot do, in its own module;
2. add one line to ``IMPLEMENTATIONS`` below (its default-configured instance);
3. put its name in ``AUTO_ORDER`` for the platform it should be preferred on (``'tpu'``).

Nothing registers itself by being imported: this table is the whole route to a kernel.
"""

from __future__ import annotations

from typing import Any

import jax

from pallas_kernels.attention.base import check_arguments
from pallas_kernels.attention.cudnn import CudnnAttention
from pallas_kernels.attention.pallas_triton import BlockSizes
from pallas_kernels.attention.pallas_triton import PallasTritonAttention
from pallas_kernels.attention.reference import ReferenceAttention
from pallas_kernels.attention.xla import XlaAttention
from pallas_kernels.op import Implementation
from pallas_kernels.op import Op

__all__ = [
    "ATTENTION_OP",
    "AUTO_ORDER",
    "IMPLEMENTATIONS",
    "dot_product_attention",
    "flash_attention",
    "flash_attention_reference",
]

# The table: every implementation of the op, default-configured, by its `name`.
IMPLEMENTATIONS: tuple[Implementation, ...] = (
    XlaAttention(),
    PallasTritonAttention(),
    CudnnAttention(),
    ReferenceAttention(),
)
# What 'auto' tries, in order, per platform compiled for ('*': any other platform).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "gpu": ("pallas_triton", "cudnn", "xla"),
    "*": ("xla",),
}
ATTENTION_OP = Op(
    "dot_product_attention",
    implementations=IMPLEMENTATIONS,
    auto_order=AUTO_ORDER,
    aliases={"pallas": "pallas_triton"},
)


def dot_product_attention(
    query: jax.Array,
    key: jax.Array,
    value: jax.Array,
    *,
    bias: jax.Array | None = None,
    mask: jax.Array | None = None,
    causal: bool = False,
    q_offset: int | jax.Array | None = None,
    segment_ids: Any = None,
    block_mask: jax.Array | None = None,
    block_shape: tuple[int, int] | None = None,
    sm_scale: float | None = None,
    dropout_rate: float = 0.0,
    dropout_rng: jax.Array | None = None,
    broadcast_dropout: bool = True,
    precision: Any = None,
    implementation: str | Implementation = "auto",
) -> jax.Array:
    """``softmax(sm_scale * q k^T + bias, masked) v``, exact, with a choice of implementation.

    Args:
      query: ``[batch, q_len, num_heads, head_dim]``, float32, bfloat16 or float16.
      key, value: ``[batch, kv_len, num_kv_heads, head_dim]``, same dtype; ``num_kv_heads``
        divides ``num_heads`` (GQA/MQA: query head ``h`` uses key/value head
        ``h // (num_heads // num_kv_heads)``).
      bias: float, broadcastable to ``[batch, num_heads, q_len, kv_len]``; added to the scaled
        scores (differentiable).
      mask: bool, broadcastable to ``[batch, num_heads, q_len, kv_len]``; False = the query does
        not see the key.
      causal: query ``i`` sees keys ``j <= i`` (top-left aligned).
      q_offset: with ``causal``, the position of the first query (an int or a traced int32
        scalar): query ``i`` sees keys ``j <= q_offset + i``. Used when decoding with a cache.
      segment_ids: ``(q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])`` ints, or
        one ``[batch, seq]`` array when ``q_len == kv_len``; a query sees only keys with its id
        (packed sequences; padding is a segment id no query has).
      block_mask: bool ``[num_heads or 1, ceil(q_len / block_q), ceil(kv_len / block_k)]``:
        tiles that are off are not seen (and the Pallas kernel skips them).
      block_shape: the ``(block_q, block_k)`` tile of ``block_mask``.
      sm_scale: finite score scale > 0; default ``1 / sqrt(head_dim)``.
      dropout_rate: probability in [0, 1) of dropping an attention weight (the kept ones are
        scaled by ``1 / (1 - dropout_rate)``), as in Flax.
      dropout_rng: the PRNG key of the dropout mask (needed when ``dropout_rate > 0``).
      broadcast_dropout: one dropout mask ``[q_len, kv_len]`` shared over batch and heads.
      precision: matmul precision of the XLA path (the others compute at least as precisely).
      implementation: ``'auto'``, ``'xla'``, ``'pallas_triton'`` (alias ``'pallas'``),
        ``'cudnn'``, ``'reference'`` or a configured instance
        (``PallasTritonAttention(block_sizes=..., interpret=True)``).

    Returns:
      ``[batch, q_len, num_heads, head_dim]`` in the dtype of ``query`` (float32 softmax). A
      masked key never influences an output, even when it holds NaN; a query that sees no key
      gets zeros (see the module docstring).

    Raises:
      ValueError: for a malformed argument (naming it), an unknown implementation, or an
        explicitly requested implementation that cannot honour the call (saying why).

    Example:
      >>> q = k = v = jnp.ones((2, 100, 4, 64), jnp.bfloat16)
      >>> dot_product_attention(q, k, v, causal=True).shape
      (2, 100, 4, 64)
    """
    call = check_arguments(
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
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        broadcast_dropout=broadcast_dropout,
        precision=precision,
    )
    return ATTENTION_OP(call, implementation)


def _kernel_block_mask(block_mask, block_sizes):
    if block_mask is None:
        return None
    if block_sizes is None:
        raise ValueError("block_mask needs the block_sizes it was built with (block_sizes=None)")
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes={block_sizes!r} must be a BlockSizes or None")
    return (block_sizes.block_q, block_sizes.block_k)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    sm_scale: float | None = None,
    block_mask: jax.Array | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Exact softmax attention in O(seq) memory, differentiable through Pallas kernels.

    The kernel itself; :func:`pallas_kernels.dot_product_attention` is the op that chooses it.

    Args:
      q: `[batch, q_len, num_heads, head_dim]`, float32, bfloat16 or float16.
      k, v: `[batch, kv_len, num_kv_heads, head_dim]`, same dtype; `num_kv_heads` divides
        `num_heads` (GQA / MQA: query head h uses K/V head `h // (num_heads // num_kv_heads)`).
      causal: query i sees keys j <= i (top-left aligned, as `jax.nn.dot_product_attention`).
      segment_ids: `(q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])` ints;
        a query sees only keys with the same id (packed sequences).
      sm_scale: score scale, default `1 / sqrt(head_dim)`.
      block_mask: bool `[num_heads or 1, ceil(q_len / block_q), ceil(kv_len / block_k)]`;
        tiles that are off are skipped. Build it with `causal_block_mask`, `local_block_mask` or
        `block_mask_from_mask`, and pass the same `block_sizes`.
      block_sizes: tiles and GPU launch parameters; default `BlockSizes.get_default()`
        (required with `block_mask`).
      interpret: run the kernels in Pallas interpret mode; None: interpret unless on a GPU.

    Returns:
      `[batch, q_len, num_heads, head_dim]` in q's dtype (float32 accumulation). A query that
      sees no key gets zeros, and zero gradients; a key a query does not see never influences
      it, even when it holds NaN.

    Example:
      >>> q = k = v = jnp.ones((2, 100, 4, 64), jnp.bfloat16)
      >>> flash_attention(q, k, v, causal=True).shape
      (2, 100, 4, 64)
    """
    implementation = PallasTritonAttention(block_sizes=block_sizes, interpret=interpret)
    return dot_product_attention(
        q,
        k,
        v,
        causal=causal,
        segment_ids=segment_ids,
        sm_scale=sm_scale,
        block_mask=block_mask,
        block_shape=_kernel_block_mask(block_mask, block_sizes),
        implementation=implementation,
    )


def flash_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    sm_scale: float | None = None,
    block_mask: jax.Array | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Plain-jnp attention with the same arguments and semantics as `flash_attention`.

    The op's float32 oracle (`implementation='reference'`): it materialises the scores (and the
    keys/values each query sees), so it is for tests, not a fast path. `block_mask` is expanded
    to elements with `block_sizes`. Fully masked rows give zeros (and zero gradients).
    """
    return dot_product_attention(
        q,
        k,
        v,
        causal=causal,
        segment_ids=segment_ids,
        sm_scale=sm_scale,
        block_mask=block_mask,
        block_shape=_kernel_block_mask(block_mask, block_sizes),
        implementation="reference",
    )
