"""A byte-level causal transformer language model built from efflax layers.

Decoder-only transformer (Radford et al., "Language Models are Unsupervised Multitask Learners",
2019) with pre-norm blocks (Xiong et al., arXiv:2002.04745), RMSNorm (Zhang & Sennrich,
arXiv:1910.07467), rotary position embeddings (Su et al., arXiv:2104.09864) and a gated linear
unit MLP (Shazeer, "GLU Variants Improve Transformer", arXiv:2002.05202). Bytes in, next-byte
logits out; ``decode=True`` runs it one step at a time on a key/value cache (see
``efflax.models.generate``).

The attention + MLP block is a factory attribute, so another token mixer can take its place; the
block contract is documented on :class:`TransformerLM`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflax._src.nn import _decode
from efflax._src.nn.attention import MultiHeadAttention
from pallas_kernels import _checks
from pallas_kernels.op import Implementation

__all__ = ["GluFeedForward", "TransformerBlock", "TransformerLM"]

_KERNEL_INIT = nn.initializers.lecun_normal()


def _dense(features: int, axes: tuple[str, str], dtype: Any, param_dtype: Any, name: str):
    return nn.Dense(
        features,
        use_bias=False,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(_KERNEL_INIT, axes),
        name=name,
    )


def _rms_norm(dtype: Any, param_dtype: Any, name: str) -> nn.RMSNorm:
    # Flax reduces in float32 whatever `dtype` is.
    return nn.RMSNorm(
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        name=name,
    )


class GluFeedForward(nn.Module):
    """``(silu(x W_gate) * x W_up) W_down`` (SwiGLU)."""

    hidden: int
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _checks.int_at_least("mlp_hidden", self.hidden)
        args = (self.dtype, self.param_dtype)
        gate = _dense(self.hidden, ("embed", "mlp"), *args, "gate")(x)
        up = _dense(self.hidden, ("embed", "mlp"), *args, "up")(x)
        return _dense(x.shape[-1], ("mlp", "embed"), *args, "down")(nn.silu(gate) * up)


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` (causal, RoPE), then ``x + glu(norm(x))``.

    Follows the block contract of :class:`TransformerLM`.
    """

    num_heads: int
    mlp_hidden: int
    num_kv_heads: int | None = None
    dropout_rate: float = 0.0
    implementation: str | Implementation = "auto"
    rope_base: float = 10_000.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(
        self, x: jax.Array, *, deterministic: bool = True, decode: bool = False
    ) -> jax.Array:
        if getattr(x, "ndim", None) != 3:
            raise ValueError(f"x.shape={getattr(x, 'shape', None)} must be [batch, seq, d_model]")
        args = (self.dtype, self.param_dtype)
        h = _rms_norm(*args, "attention_norm")(x)
        h = MultiHeadAttention(
            self.num_heads,
            num_kv_heads=self.num_kv_heads,
            causal=True,
            rope=True,
            rope_base=self.rope_base,
            implementation=self.implementation,
            dropout_rate=self.dropout_rate,
            decode=decode,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="attention",
        )(h, deterministic=deterministic)
        x = x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
        h = GluFeedForward(self.mlp_hidden, *args, name="mlp")(_rms_norm(*args, "mlp_norm")(x))
        return x + nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)


class TransformerLM(nn.Module):
    """Causal LM over bytes (or any small vocabulary): tokens ``[batch, seq]`` -> logits.

    Attributes:
      vocab_size: number of token ids (256 for bytes).
      num_layers: blocks.
      d_model: model width.
      num_heads: attention heads.
      num_kv_heads: key/value heads (GQA); default ``num_heads``.
      mlp_hidden: hidden width of the GLU MLP; default ``4 * d_model``.
      dropout_rate: dropout on attention weights and residual branches (``'dropout'`` rng).
      implementation: the attention kernel (``'auto'``, a name or a configured
        ``pallas_kernels`` implementation).
      rope_base: rotary wavelength base.
      block: factory of the blocks, replacing :class:`TransformerBlock` (e.g. a GAU block). The
        contract: ``block(name=f"block_{i}")`` builds one block and
        ``block(...)(x, *, deterministic: bool, decode: bool)`` maps ``x [batch, seq, d_model]``
        to the same shape, causally (position ``t`` sees only ``<= t``), with dropout only when
        ``not deterministic``. With ``decode=True`` it keeps its state in the ``'cache'``
        collection: the ``init`` call fixes the cache from its input length, later calls append
        their positions (a prompt, then one token per call), as ``MultiHeadAttention`` does,
        under the same decode contract (``efflax._src.nn._decode``: steps of another batch or
        past the cache raise; under ``jit`` they are dropped, zeroed and flagged, see
        ``efflax.nn.decode_overflowed``). A block that cannot decode raises on ``decode=True``.
      dtype: computation dtype; logits are returned in float32.
      param_dtype: parameter dtype.

    Example:
      >>> lm = TransformerLM(num_layers=2, d_model=64, num_heads=4)
      >>> tokens = jnp.zeros((8, 128), jnp.int32)
      >>> params = lm.init(jax.random.key(0), tokens)["params"]
      >>> lm.apply({"params": params}, tokens).shape
      (8, 128, 256)
    """

    vocab_size: int = 256
    num_layers: int = 2
    d_model: int = 128
    num_heads: int = 4
    num_kv_heads: int | None = None
    mlp_hidden: int | None = None
    dropout_rate: float = 0.0
    implementation: str | Implementation = "auto"
    rope_base: float = 10_000.0
    block: Callable[..., nn.Module] | None = None
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def _block_factory(self) -> Callable[..., nn.Module]:
        if self.block is not None:
            return self.block
        mlp_hidden = 4 * self.d_model if self.mlp_hidden is None else self.mlp_hidden
        _checks.int_at_least("mlp_hidden", mlp_hidden)

        def make(**kwargs: Any) -> nn.Module:
            return TransformerBlock(
                num_heads=self.num_heads,
                mlp_hidden=mlp_hidden,
                num_kv_heads=self.num_kv_heads,
                dropout_rate=self.dropout_rate,
                implementation=self.implementation,
                rope_base=self.rope_base,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                **kwargs,
            )

        return make

    @nn.compact
    def __call__(
        self, tokens: jax.Array, *, deterministic: bool = True, decode: bool = False
    ) -> jax.Array:
        """Next-token logits ``[batch, seq, vocab_size]`` (float32) for ``tokens [batch, seq]``."""
        _checks.int_at_least("vocab_size", self.vocab_size)
        _checks.int_at_least("num_layers", self.num_layers)
        _checks.int_at_least("d_model", self.d_model)
        _checks.probability("dropout_rate", self.dropout_rate, allow_one=False)
        _checks.boolean("deterministic", deterministic)
        _checks.boolean("decode", decode)
        if getattr(tokens, "ndim", None) != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
            raise ValueError(
                f"tokens (shape {getattr(tokens, 'shape', None)}, dtype "
                f"{getattr(tokens, 'dtype', None)}) must be integer ids [batch, seq]"
            )
        if tokens.shape[1] == 0:
            raise ValueError(f"tokens.shape={tokens.shape} holds no token (an empty sequence)")
        known = _checks.concrete(tokens)
        if (
            known is not None
            and known.size
            and not 0 <= known.min() <= known.max() < self.vocab_size
        ):
            raise ValueError(
                f"tokens: token ids in [{known.min()}, {known.max()}] must lie in [0, {self.vocab_size})"
            )
        if decode and "cache" in self.variables:
            # The blocks check too; here the message names this call's argument.
            _decode.check_cache("tokens", tokens.shape, self.variables["cache"])
        args = (self.dtype, self.param_dtype)
        x = nn.Embed(
            self.vocab_size,
            self.d_model,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            embedding_init=nn.with_logical_partitioning(
                nn.initializers.normal(stddev=1.0), ("vocab", "embed")
            ),
            name="embedding",
        )(tokens)
        x = nn.Dropout(self.dropout_rate)(x, deterministic=deterministic)
        make_block = self._block_factory()
        for i in range(self.num_layers):
            x = make_block(name=f"block_{i}")(x, deterministic=deterministic, decode=decode)
        x = _rms_norm(*args, "final_norm")(x)
        logits = _dense(self.vocab_size, ("embed", "vocab"), *args, "logits")(x)
        return logits.astype(jnp.float32)
