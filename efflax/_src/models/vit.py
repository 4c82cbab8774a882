"""A small Vision Transformer with an optional learned token merger in the middle.

Dosovitskiy et al., "An Image is Worth 16x16 Words: Transformers for Image Recognition at Scale",
arXiv:2010.11929, 2020: non-overlapping patches -> linear embedding + learned positions ->
pre-norm encoder blocks (``efflax.nn.EncoderBlock``) -> final LayerNorm -> mean pool -> linear
head (no class token). With ``merger`` set (e.g. ``efflax.nn.LearnedTokenMerger``, Renggli et
al., arXiv:2202.12015) the N patch tokens are replaced by M merged tokens after block
``merge_after``, and the later blocks run on M tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflax._src.nn.encoder import DenseFeedForward
from efflax._src.nn.encoder import EncoderBlock
from pallas_kernels import _checks
from pallas_kernels.op import Implementation

__all__ = ["ViT", "patchify"]


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
    """``[batch, H, W, C]`` (or ``[batch, H, W]``) -> ``[batch, (H/p)(W/p), p*p*C]`` patches.

    Patches are in row-major order; within a patch the features are ``(row, column, channel)``.
    """
    _checks.int_at_least("patch_size", patch_size, 1)
    _checks.array("images", images, nonempty=True, layout="[batch, height, width(, channels)]")
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4:
        raise ValueError(f"images.shape={images.shape} must be [batch, height, width(, channels)]")
    batch, height, width, channels = images.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"patch_size={patch_size} must divide the image size {height}x{width}")
    p = patch_size
    x = images.reshape(batch, height // p, p, width // p, p, channels)
    x = x.transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(batch, (height // p) * (width // p), p * p * channels)


class ViT(nn.Module):
    """Vision Transformer classifier: ``[batch, H, W(, C)]`` images -> ``[batch, classes]``.

    Attributes:
      patch_size: side of the square patches.
      num_layers: encoder blocks.
      d_model: token width.
      num_heads: attention heads.
      mlp_hidden: hidden width of the FFNs.
      num_classes: logits.
      merger: factory of a token merger (called with ``name='merger'``), e.g.
        ``functools.partial(LearnedTokenMerger, num_tokens=4)``; ``None`` for a plain ViT.
      merge_after: with ``merger``, the number of blocks before it (default ``num_layers // 2``).
      implementation: passed to ``efflax.nn.MultiHeadAttention``.
      dtype: computation dtype.
      param_dtype: parameter dtype.

    Example:
      >>> model = ViT(patch_size=2, num_layers=4, d_model=64, num_heads=4, mlp_hidden=128,
      ...             num_classes=10, merger=functools.partial(LearnedTokenMerger, num_tokens=4))
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8)))
    """

    patch_size: int
    num_layers: int
    d_model: int
    num_heads: int
    mlp_hidden: int
    num_classes: int
    merger: Callable[..., nn.Module] | None = None
    merge_after: int | None = None
    implementation: str | Implementation = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def merge_position(self) -> int | None:
        """The number of blocks before the merger (None without a merger)."""
        if self.merger is None:
            return None
        position = self.num_layers // 2 if self.merge_after is None else self.merge_after
        if not 0 <= position <= self.num_layers:
            raise ValueError(f"merge_after={self.merge_after} must be in [0, {self.num_layers}]")
        return position

    @nn.compact
    def __call__(self, images: jax.Array, *, deterministic: bool = True) -> jax.Array:
        _checks.int_at_least("num_layers", self.num_layers, 1)
        for name in ("d_model", "num_heads", "mlp_hidden", "num_classes"):
            _checks.int_at_least(name, getattr(self, name))
        merge_at = self.merge_position()
        args = dict(dtype=self.dtype, param_dtype=self.param_dtype)

        def dense(features: int, axes: tuple[str | None, str | None], name: str) -> nn.Dense:
            return nn.Dense(
                features,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
                name=name,
                **args,
            )

        def layer_norm(name: str) -> nn.LayerNorm:
            return nn.LayerNorm(
                scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
                name=name,
                **args,
            )

        patches = patchify(images.astype(self.dtype), self.patch_size)
        h = dense(self.d_model, (None, "embed"), "embedding")(patches)
        positions = self.param(
            "positions",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
            h.shape[1:],
            self.param_dtype,
        )
        h = h + positions.astype(self.dtype)
        ffn = functools.partial(DenseFeedForward, self.mlp_hidden, **args)
        for i in range(self.num_layers + 1):
            if i == merge_at:
                h = self.merger(name="merger")(h)
            if i == self.num_layers:
                break
            h = EncoderBlock(
                self.num_heads,
                ffn,
                implementation=self.implementation,
                name=f"block_{i}",
                **args,
            )(h, deterministic=deterministic)
        h = layer_norm("final_norm")(h)
        pooled = jnp.mean(h.astype(jnp.float32), axis=1).astype(self.dtype)
        return dense(self.num_classes, ("embed", "classes"), "head")(pooled)
