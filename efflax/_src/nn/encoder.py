"""A small pre-norm transformer encoder whose FFNs can be dense or mixture-of-experts.

Vaswani et al., "Attention Is All You Need", arXiv:1706.03762 (2017), with pre-layer-norm blocks
(Xiong et al., arXiv:2002.04745). Used by the expert-choice experiment (Zhou et al.,
arXiv:2202.09368, which interleaves MoE and dense FFN layers) and as a ready classifier: tokens
`[batch, tokens, features]` -> linear embedding + learned positions -> blocks -> mean pool ->
logits. Attention is `efflax._src.nn.attention.MultiHeadAttention` (non-causal), on the kernel
the attention op picks (`implementation='auto'`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflax._src.nn.attention import MultiHeadAttention
from pallas_kernels import _checks
from pallas_kernels.op import Implementation

__all__ = ["DenseFeedForward", "EncoderBlock", "Encoder"]


def _dense(features: int, axes: tuple[Any, Any], dtype, param_dtype, name: str) -> nn.Dense:
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
        name=name,
    )


def _layer_norm(dtype, param_dtype, name: str) -> nn.LayerNorm:
    # LayerNorm statistics are computed in float32 by flax whatever `dtype` is.
    return nn.LayerNorm(
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


class DenseFeedForward(nn.Module):
    """`gelu(x W_i) W_o` (or GEGLU); the dense baseline of `MoEFeedForward`."""

    hidden: int
    activation: str = "gelu"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, *, deterministic: bool = True) -> jax.Array:
        del deterministic
        _checks.int_at_least("hidden", self.hidden)
        if self.activation not in ("gelu", "geglu"):
            raise ValueError(f"activation={self.activation!r} must be 'gelu' or 'geglu'")
        d = x.shape[-1]
        args = (self.dtype, self.param_dtype)
        h = nn.gelu(_dense(self.hidden, ("embed", "mlp"), *args, "wi_0")(x))
        if self.activation == "geglu":
            h = h * _dense(self.hidden, ("embed", "mlp"), *args, "wi_1")(x)
        return _dense(d, ("mlp", "embed"), *args, "wo")(h)


class EncoderBlock(nn.Module):
    """Pre-norm block: `x + attn(norm(x))`, then `x + ffn(norm(x))`."""

    num_heads: int
    ffn: Callable[..., nn.Module]
    implementation: str | Implementation = "auto"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool = True,
        padding_mask: jax.Array | None = None,
    ) -> jax.Array:
        """``padding_mask``: ``[batch, tokens]`` bool, True for real tokens: padded keys are
        seen by no query, and an ``ffn`` that takes ``padding_mask=`` (``MoEFeedForward``)
        gets it."""
        _checks.function("ffn", self.ffn)
        args = (self.dtype, self.param_dtype)
        h = _layer_norm(*args, "attention_norm")(x)
        x = x + MultiHeadAttention(
            self.num_heads,
            implementation=self.implementation,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attention",
        )(h, padding_mask=padding_mask)
        h = _layer_norm(*args, "ffn_norm")(x)
        ffn = self.ffn(name="ffn")
        kwargs = {}
        if padding_mask is not None and "padding_mask" in inspect.signature(ffn).parameters:
            # An FFN that mixes tokens (MoEFeedForward's routing) is told which are padding.
            kwargs["padding_mask"] = padding_mask
        return x + ffn(h, deterministic=deterministic, **kwargs)


class Encoder(nn.Module):
    """Transformer encoder classifier: `[batch, tokens, features]` -> `[batch, num_classes]`.

    Attributes:
      num_layers: number of blocks.
      d_model: model width.
      num_heads: attention heads.
      mlp_hidden: hidden width of the dense FFNs.
      num_classes: logits; `None` returns the final token representations `[b, t, d_model]`.
      max_len: number of learned position embeddings.
      moe: factory of the MoE FFN, e.g. `functools.partial(MoEFeedForward, num_experts=8,
        hidden=64)`; `None` makes every FFN dense.
      moe_every: with `moe`, block `i` uses it when `i % moe_every == moe_every - 1` (2: every
        other block, as in the paper; 1: every block).
      implementation: passed to `MultiHeadAttention`: `'auto'` (the attention op's
        resolver: the Pallas kernel on a GPU, XLA elsewhere), a name or a configured
        implementation such as `PallasTritonAttention(block_sizes=...)`.
      block: factory of the whole block, replacing attention + FFN (e.g.
        `functools.partial(efflax.nn.FLASH, chunk_size=64, causal=False)`); called as
        `block(name=f"block_{i}")(h, deterministic=..., padding_mask=...)` and must return the
        block's output including its residual. `None`: `EncoderBlock` (with `moe` where set).

    Example:
      >>> model = Encoder(num_layers=2, d_model=32, num_heads=4, mlp_hidden=64, num_classes=10)
      >>> variables = model.init(jax.random.key(0), jnp.ones((2, 40, 1)))
    """

    num_layers: int
    d_model: int
    num_heads: int
    mlp_hidden: int
    num_classes: int | None = None
    max_len: int = 512
    moe: Callable[..., nn.Module] | None = None
    moe_every: int = 2
    implementation: str | Implementation = "auto"
    block: Callable[..., nn.Module] | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool = True,
        padding_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Encodes ``x`` ``[batch, tokens, features]``.

        ``padding_mask`` (``[batch, tokens]`` bool, True for real tokens): padded tokens are
        attended by no query and left out of the mean pooling of the classifier head.
        """
        if getattr(x, "ndim", None) != 3:
            raise ValueError(f"x must be [batch, tokens, features], got x.shape={jnp.shape(x)}")
        _checks.array("x", x, nonempty=True, layout="[batch, tokens, features]")
        _checks.int_at_least("num_layers", self.num_layers, 0)
        for name in ("d_model", "num_heads", "mlp_hidden", "max_len"):
            _checks.int_at_least(name, getattr(self, name))
        if self.num_classes is not None:
            _checks.int_at_least("num_classes", self.num_classes)
        if x.shape[1] > self.max_len:
            raise ValueError(f"{x.shape[1]} tokens exceed max_len={self.max_len}")
        if self.moe is not None and self.moe_every < 1:
            raise ValueError(f"{self.moe_every=} must be >= 1")
        if self.moe is not None and self.block is not None:
            raise ValueError("set either moe= (an FFN) or block= (a whole block), not both")
        if padding_mask is not None and (
            padding_mask.shape != x.shape[:2] or padding_mask.dtype != jnp.bool_
        ):
            raise ValueError(
                f"padding_mask (shape {padding_mask.shape}, dtype {padding_mask.dtype}) must be "
                f"a bool array of shape {x.shape[:2]}"
            )
        if padding_mask is not None:
            # Padded tokens become zeros before any arithmetic (select, never multiply: 0 * NaN
            # is NaN): what they held reaches no real output and no gradient.
            x = jnp.where(padding_mask[:, :, None], x, jnp.zeros((), x.dtype))
        args = (self.dtype, self.param_dtype)
        h = _dense(self.d_model, (None, "embed"), *args, "embedding")(x.astype(self.dtype))
        positions = self.param(
            "positions",
            nn.with_logical_partitioning(nn.initializers.normal(0.02), ("length", "embed")),
            (self.max_len, self.d_model),
            self.param_dtype,
        )
        h = h + positions[: x.shape[1]].astype(self.dtype)
        for i in range(self.num_layers):
            if self.block is not None:
                h = self.block(name=f"block_{i}")(
                    h, deterministic=deterministic, padding_mask=padding_mask
                )
                continue
            if self.moe is not None and i % self.moe_every == self.moe_every - 1:
                ffn = self.moe
            else:
                ffn = _dense_ffn(self.mlp_hidden, *args)
            h = EncoderBlock(
                self.num_heads,
                ffn,
                implementation=self.implementation,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name=f"block_{i}",
            )(h, deterministic=deterministic, padding_mask=padding_mask)
        h = _layer_norm(*args, "final_norm")(h)
        if self.num_classes is None:
            return h
        h32 = h.astype(jnp.float32)
        if padding_mask is None:
            pooled = jnp.mean(h32, axis=1)
        else:
            real = padding_mask[:, :, None]
            count = jnp.sum(real.astype(jnp.float32), axis=1)
            pooled = jnp.sum(jnp.where(real, h32, 0.0), axis=1) / jnp.maximum(count, 1.0)
        pooled = pooled.astype(self.dtype)
        return _dense(self.num_classes, ("embed", "classes"), *args, "head")(pooled)


def _dense_ffn(hidden: int, dtype, param_dtype) -> Callable[..., nn.Module]:
    def make(**kwargs):
        return DenseFeedForward(hidden, dtype=dtype, param_dtype=param_dtype, **kwargs)

    return make
