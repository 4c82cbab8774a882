"""Learned token merging: N tokens -> M learned convex combinations of them (PatchMerger, TokenLearner).

Renggli, Pinto, Houlsby, Mustafa, Puigcerver, Riquelme, "Learning to Merge Tokens in Vision
Transformers", arXiv:2202.12015, 2022 (their "PatchMerger"); Ryoo, Piergiovanni, Arnab,
Dehghani, Angelova, "TokenLearner: What Can 8 Learned Tokens Do for Images and Videos?",
NeurIPS 2021, arXiv:2106.11297 (version 1.1 of the official scenic code).
Placed between two encoder blocks, the module replaces the N tokens by M << N tokens, each a
softmax-weighted average over the N inputs, so the later blocks cost about M/N as much.

- :class:`LearnedTokenMerger` (Renggli et al.'s PatchMerger):
  ``Y = softmax_N(W LN(X)^T) LN(X)`` with M learned queries ``W [M, D]``, optionally scaled by
  ``D^-1/2`` (as in lucidrains/vit-pytorch).
- :class:`TokenLearner` (v1.1, scenic ``TokenLearnerModuleV11``): weights from the tokens
  themselves, ``A = softmax_N(MLP(LN(X)))`` with ``MLP = Dense(64) -> gelu -> Dense(M)``, and
  ``Y = A^T X`` (the raw tokens, not normalised).

Not to be confused with Swin's "PatchMerging" or Qwen-VL's "PatchMerger" (2x2 neighbour concat
plus an MLP, a fixed spatial downsampling) nor with ToMe's "token merging" (bipartite matching of
similar tokens): here every output is a learned, input-dependent convex combination of all
inputs. Both share :func:`merge_tokens`, which also takes a padding mask (padded tokens get
exactly zero weight).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from pallas_kernels import _checks

__all__ = ["LearnedTokenMerger", "TokenLearner", "merge_tokens"]


def merge_tokens(
    scores: jax.Array, tokens: jax.Array, mask: jax.Array | None = None
) -> tuple[jax.Array, jax.Array]:
    """``softmax`` of ``scores`` over the input tokens, then the weighted sums of ``tokens``.

    Args:
      scores: ``[batch, M, N]`` real (integer or floating) logits of each of the M outputs over
        the N inputs.
      tokens: ``[batch, N, D]`` real; integer tokens are averaged in float32 (a convex
        combination of integers is not an integer).
      mask: optional ``[batch, N]`` bool, True for real tokens; masked tokens get weight 0 and
        have no influence on the outputs or their gradients, whatever they hold (NaN and inf
        included). A row with no real token gives all-zero weights and a zero output token.

    Returns:
      ``(merged [batch, M, D], weights [batch, M, N] float32)``: ``merged`` in ``tokens``' dtype
      if it is floating, else float32; each row of the weights sums to 1 over the real tokens.
      The softmax runs in float32.

    Raises:
      ValueError: naming the argument, for a non-array, a wrong rank or shape, a bool, complex
        or other non-real dtype, or an empty batch or token axis.
    """
    scores = _as_array("scores", scores)
    tokens = _as_array("tokens", tokens)
    _checks.array("scores", scores, ndim=3, kind="real", layout="[batch, M, N]")
    _checks.array("tokens", tokens, ndim=3, kind="real", layout="[batch, N, D]")
    if scores.shape[::2] != tokens.shape[:2]:
        raise ValueError(
            f"scores.shape={scores.shape} must be [batch, M, N] and tokens.shape="
            f"{tokens.shape} [batch, N, D] with the same batch and N"
        )
    if tokens.shape[1] == 0:
        raise ValueError(f"tokens.shape={tokens.shape} holds no token to merge (N = 0)")
    if not jnp.issubdtype(tokens.dtype, jnp.floating):
        tokens = tokens.astype(jnp.float32)
    scores = scores.astype(jnp.float32)
    if mask is None:
        weights = jax.nn.softmax(scores, axis=-1)
    else:
        mask = _as_array("mask", mask)
        if mask.shape != tokens.shape[:2] or mask.dtype != jnp.bool_:
            raise ValueError(
                f"mask (shape {mask.shape}, dtype {mask.dtype}) must be a bool "
                f"{tokens.shape[:2]} array"
            )
        # Select, never multiply: 0 * NaN is NaN, in the forward pass and in the gradient.
        tokens = jnp.where(mask[:, :, None], tokens, jnp.zeros((), tokens.dtype))
        mask = mask[:, None, :]
        scores = jnp.where(mask, scores, 0.0)
        row_max = jnp.max(jnp.where(mask, scores, -jnp.inf), axis=-1, keepdims=True)
        row_max = jax.lax.stop_gradient(jnp.where(jnp.isfinite(row_max), row_max, 0.0))
        # Masked entries go through exp(0) and are then zeroed: finite values and gradients.
        exp = jnp.where(mask, jnp.exp(jnp.where(mask, scores - row_max, 0.0)), 0.0)
        total = jnp.sum(exp, axis=-1, keepdims=True)
        weights = exp / jnp.where(total > 0, total, 1.0)
    merged = jnp.einsum("bmn,bnd->bmd", weights.astype(tokens.dtype), tokens)
    return merged, weights


def _as_array(name: str, value: Any) -> jax.Array:
    """Lists and numpy arrays as JAX arrays; anything else that is not an array is refused."""
    if isinstance(value, list | tuple):
        try:
            return jnp.asarray(value)
        except (TypeError, ValueError) as error:
            raise ValueError(
                f"{name} must be an array, got a ragged or non-numeric list"
            ) from error
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise ValueError(f"{name} must be an array, got {type(value).__name__}")
    return value


def _layer_norm(dtype: Any, param_dtype: Any, name: str) -> nn.LayerNorm:
    return nn.LayerNorm(
        dtype=dtype,
        param_dtype=param_dtype,
        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("embed",)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("embed",)),
        name=name,
    )


def _check_input(
    tokens: Any, mask: Any, num_tokens: int, dtype: Any
) -> tuple[jax.Array, jax.Array | None]:
    """The module's ``tokens`` (lists and integer arrays converted) and ``mask``, checked; masked
    tokens are replaced by zeros so that nothing they hold reaches the layer norm or the MLP."""
    _checks.int_at_least("num_tokens", num_tokens, 1)
    tokens = _as_array("tokens", tokens)
    _checks.array("tokens", tokens, ndim=3, kind="real", layout="[batch, tokens, features]")
    if 0 in tokens.shape:
        raise ValueError(f"tokens.shape={tokens.shape} has a zero-length axis")
    tokens = tokens.astype(dtype)
    if mask is not None:
        mask = _as_array("mask", mask)
        if mask.shape != tokens.shape[:2] or mask.dtype != jnp.bool_:
            raise ValueError(
                f"mask (shape {mask.shape}, dtype {mask.dtype}) must be a bool "
                f"{tokens.shape[:2]} array"
            )
        tokens = jnp.where(mask[:, :, None], tokens, jnp.zeros((), tokens.dtype))
    return tokens, mask


class LearnedTokenMerger(nn.Module):
    """Renggli et al.'s PatchMerger: M learned queries pool the N input tokens.

    ``Y = softmax_N(W LN(X)^T * s) LN(X)`` with ``W [M, D]``, ``s = D^-1/2`` if ``scale`` else 1.
    The merge weights are sown as ``intermediates/merge_weights`` (``[batch, M, N]``).

    Attributes:
      num_tokens: M, the number of output tokens (paper: 8 for ViT-B/L/H, placed mid-encoder).
      use_layer_norm: normalise the tokens first (paper: yes); without it ``LN`` is the identity.
      scale: multiply the scores by ``D^-1/2``.
      dtype: computation dtype; the softmax runs in float32.
      param_dtype: parameter dtype.

    Example:
      >>> merger = LearnedTokenMerger(num_tokens=8)
      >>> variables = merger.init(jax.random.key(0), x)            # x: [batch, N, D]
      >>> y = merger.apply(variables, x, mask=mask)                # y: [batch, 8, D]
    """

    num_tokens: int
    use_layer_norm: bool = True
    scale: bool = False
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Merges ``tokens [batch, N, D]`` (``mask [batch, N]``) into ``[batch, M, D]``."""
        x, mask = _check_input(tokens, mask, self.num_tokens, self.dtype)
        if self.use_layer_norm:
            x = _layer_norm(self.dtype, self.param_dtype, "norm")(x)
        queries = self.param(
            "queries",
            nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("length", "embed")),
            (self.num_tokens, x.shape[-1]),
            self.param_dtype,
        )
        scores = jnp.einsum("md,bnd->bmn", queries.astype(self.dtype), x)
        if self.scale:
            scores = scores * x.shape[-1] ** -0.5
        merged, weights = merge_tokens(scores, x, mask)
        self.sow("intermediates", "merge_weights", weights)
        return merged


class TokenLearner(nn.Module):
    """TokenLearner v1.1: token weights from an MLP over the normalised tokens themselves.

    ``A = softmax_N(Dense_M(gelu(Dense_h(LN(X)))))`` (``[batch, N, M]``, softmax over N) and
    ``Y = A^T X``. The merge weights are sown as ``intermediates/merge_weights``.

    Attributes:
      num_tokens: M, the number of output tokens (scenic default 8).
      bottleneck_dim: hidden width of the MLP (scenic: 64).
      dtype: computation dtype; the softmax runs in float32.
      param_dtype: parameter dtype.
    """

    num_tokens: int
    bottleneck_dim: int = 64
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, *, mask: jax.Array | None = None) -> jax.Array:
        """Merges ``tokens [batch, N, D]`` (``mask [batch, N]``) into ``[batch, M, D]``."""
        _checks.int_at_least("bottleneck_dim", self.bottleneck_dim, 1)
        x, mask = _check_input(tokens, mask, self.num_tokens, self.dtype)
        h = _layer_norm(self.dtype, self.param_dtype, "norm")(x)

        def dense(features: int, axes: tuple[str | None, str | None], name: str) -> nn.Dense:
            return nn.Dense(
                features,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), axes[1:]),
                name=name,
            )

        h = nn.gelu(dense(self.bottleneck_dim, ("embed", "mlp"), "hidden")(h))
        scores = dense(self.num_tokens, ("mlp", None), "scores")(h)  # [batch, N, M]
        merged, weights = merge_tokens(jnp.swapaxes(scores, 1, 2), x, mask)
        self.sow("intermediates", "merge_weights", weights)
        return merged
