"""The Pallas Mosaic TPU FlashAttention kernels as an implementation of the attention op.

The kernels live in ``pallas_mosaic_tpu_kernel.py``; this is the glue: what the kernels can
express (causal masks with ``q_offset``, segment ids, block-sparse masks, GQA/MQA, any length,
float32 and bfloat16 on a TPU, float16 too in interpret mode) and a clear
:class:`~pallas_kernels.op.Unsupported` for the rest (dense boolean masks, additive biases,
dropout, head_dim > 256, block masks whose tile the kernel tiles cannot divide), so ``'auto'``
falls through to XLA.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels._compat import check_interpret
from pallas_kernels._compat import resolve_interpret
from pallas_kernels.attention.base import AttentionCall
from pallas_kernels.attention.base import AttentionImplementation
from pallas_kernels.attention.pallas_mosaic_tpu_kernel import BlockSizes
from pallas_kernels.attention.pallas_mosaic_tpu_kernel import flash_attention_tpu
from pallas_kernels.attention.pallas_mosaic_tpu_kernel import resolve_block_sizes
from pallas_kernels.attention.pallas_mosaic_tpu_kernel import tile_config_problem
from pallas_kernels.op import Unsupported

__all__ = ["MosaicTpuAttention"]

_MAX_HEAD_DIM = 256
# The block mask is scalar-prefetched into SMEM (1 MiB on v5e) as bits: 4 Mi tiles = 512 KiB.
_MAX_MASK_TILES = 1 << 22


def refusal(
    query: jax.Array,
    *,
    bias: Any,
    mask: Any,
    dropout_rate: float,
    block_shape: tuple[int, int] | None,
    block_sizes: BlockSizes | None,
    interpret: bool,
) -> tuple[str | None, BlockSizes | None]:
    """Why the kernels cannot run this call (None if they can), and the tiles they would use."""
    if mask is not None:
        return (
            "a dense boolean mask cannot be tiled; pass causal=, segment_ids= or a block_mask",
            None,
        )
    if bias is not None:
        return "an additive bias is not supported by the TPU kernel", None
    if dropout_rate > 0.0:
        return "dropout is not supported by the TPU kernel", None
    head_dim = query.shape[-1]
    if head_dim > _MAX_HEAD_DIM:
        return f"head_dim={head_dim} > {_MAX_HEAD_DIM}", None
    if not interpret and jnp.dtype(query.dtype) == jnp.float16:
        return "float16 does not compile for a TPU (use bfloat16 or float32)", None
    try:
        tiles = resolve_block_sizes(block_sizes, block_shape, head_dim)
    except ValueError as e:
        return str(e), None
    problem = tile_config_problem(tiles, interpret=interpret)
    if problem is None and block_shape is not None and not interpret:
        if block_shape[1] % 128 or block_shape[0] % 16:
            problem = f"block_shape={block_shape} must be (multiple of 16, multiple of 128) on TPU"
    return problem, tiles


@dataclasses.dataclass(frozen=True)
class MosaicTpuAttention(AttentionImplementation):
    """FlashAttention Pallas Mosaic TPU kernels (``implementation='pallas_mosaic_tpu'``).

    Expresses causal masks (with ``q_offset``), segment ids (so padding), block-sparse masks
    (whose tile the kernel tiles divide) and GQA/MQA, at any length; refuses a dense boolean
    ``mask``, a ``bias``, dropout and head_dim > 256, so ``'auto'`` falls through.
    Differentiable by ``jax.grad`` (backward kernels), not by ``jax.jvp``.

    Attributes:
      block_sizes: the kernel tiles; default ``BlockSizes.get_default(head_dim=...)`` (with a
        block mask: capped at, and dividing, its ``block_shape``).
      interpret: run in Pallas interpret mode (on CPU); ``None``: compiled on a TPU backend,
        interpreted elsewhere.
    """

    name = "pallas_mosaic_tpu"
    supports_forward_mode = False
    block_sizes: BlockSizes | None = None
    interpret: bool | None = None

    def __post_init__(self):
        if self.block_sizes is not None and not isinstance(self.block_sizes, BlockSizes):
            raise ValueError(f"block_sizes={self.block_sizes!r} must be a BlockSizes or None")
        check_interpret(self.interpret)

    def resolved_interpret(self) -> bool:
        """``interpret``, with ``None`` resolved against the default backend (at call time)."""
        return resolve_interpret(self.interpret, "tpu")

    def __call__(self, call: AttentionCall) -> jax.Array:
        # float32 dots run at HIGHEST precision, so `precision` needs nothing here
        mask = call.mask
        return self.attend(
            call.query,
            call.key,
            call.value,
            bias=call.bias,
            dense_mask=mask.dense,
            causal=mask.causal,
            q_offset=mask.q_offset,
            segment_ids=mask.segment_ids,
            block_mask=mask.block_mask,
            block_shape=mask.block_shape,
            sm_scale=call.sm_scale,
            dropout_rate=call.dropout_rate,
        )

    def attend(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        *,
        bias: jax.Array | None,
        dense_mask: jax.Array | None,
        causal: bool,
        q_offset: jax.Array | None,
        segment_ids: tuple[jax.Array, jax.Array] | None,
        block_mask: jax.Array | None,
        block_shape: tuple[int, int] | None,
        sm_scale: Any,
        dropout_rate: float,
    ) -> jax.Array:
        """Runs the kernels on checked arguments, or raises :class:`Unsupported` first."""
        interpret = self.resolved_interpret()
        if not isinstance(sm_scale, float | int):
            raise Unsupported("the kernel needs sm_scale known at trace time (a Python number)")
        if block_mask is not None and block_mask.size > _MAX_MASK_TILES:
            raise Unsupported(
                f"block_mask.shape={tuple(block_mask.shape)}: more than {_MAX_MASK_TILES} tiles "
                "do not fit the TPU's scalar memory (1 bit each); use a coarser block_shape"
            )
        reason, tiles = refusal(
            query,
            bias=bias,
            mask=dense_mask,
            dropout_rate=dropout_rate,
            block_shape=block_shape,
            block_sizes=self.block_sizes,
            interpret=interpret,
        )
        if reason is not None:
            raise Unsupported(reason)
        return flash_attention_tpu(
            query,
            key,
            value,
            segment_ids,
            q_offset,
            block_mask,
            causal=causal,
            sm_scale=float(sm_scale),
            block_sizes=tiles,
            block_shape=None if block_shape is None else tuple(block_shape),
            interpret=interpret,
        )
