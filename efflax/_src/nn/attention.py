"""Multi-head attention on the attention op: FlashAttention (Pallas), cuDNN or XLA, one resolver.

Dao, Fu, Ermon, Rudra, Re, "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness", arXiv:2205.14135, 2022 (FlashAttention-2: Dao, arXiv:2307.08691, 2023).
Rotary embeddings: Su et al., "RoFormer", arXiv:2104.09864, 2021.

- ``dot_product_attention``: a drop-in ``attention_fn`` for Flax's
  ``nn.MultiHeadDotProductAttention`` (its signature, every argument honoured), plus
  ``causal``/``segment_ids``, which the Pallas kernel can tile; a dense boolean mask, a bias or
  dropout runs on XLA. The kernel is chosen by ``pallas_kernels.attention``'s op
  (``implementation='auto'``: Pallas, then cuDNN, then XLA on a GPU; the Pallas Mosaic TPU
  kernels, then XLA, on a TPU; XLA elsewhere).
- ``MultiHeadAttention``: GQA/MQA projections, rotary embeddings, masks (causal, padding,
  segments, general), attention dropout, and autoregressive decoding with a key/value cache in
  Flax's ``'cache'`` collection.

Example:
  >>> layer = MultiHeadAttention(num_heads=8, num_kv_heads=2, causal=True, rope=True)
  >>> variables = layer.init(jax.random.key(0), x)            # x: [batch, seq, features]
  >>> y = layer.apply(variables, x, padding_mask=mask)         # mask: [batch, seq] bool
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from efflax._src.nn import _decode
from pallas_kernels import _checks
from pallas_kernels.attention import api as attention_op
from pallas_kernels.attention.base import AttentionCall
from pallas_kernels.attention.base import check_arguments
from pallas_kernels.attention.base import dropout_keep_mask
from pallas_kernels.attention.xla import attention_weights
from pallas_kernels.op import Implementation

Array = jax.Array
Initializer = Callable[..., Array]

# Key/value positions excluded by a padding mask get this segment id, which no query carries.
PADDING_SEGMENT_ID = np.iinfo(np.int32).min

QKV_KERNEL_AXES = ("embed", "heads", "kv")
KV_KERNEL_AXES = ("embed", "kv_heads", "kv")
OUT_KERNEL_AXES = ("heads", "kv", "embed")


def _flatten_batch(name: str, x: Array | None, batch_shape: tuple[int, ...]) -> Array | None:
    """A mask/bias over ``[*batch_shape, heads, q, kv]`` as ``[prod(batch) or 1, heads, q, kv]``."""
    if x is None:
        return None
    if not hasattr(x, "shape"):
        raise ValueError(f"{name} of type {type(x).__name__} must be an array")
    rank = len(batch_shape) + 3
    if x.ndim > rank:
        raise ValueError(f"{name}.shape={x.shape} has more dims than [*batch, heads, q, kv]")
    x = jnp.reshape(x, (1,) * (rank - x.ndim) + tuple(x.shape))
    leading = x.shape[: len(batch_shape)]
    if any(d not in (1, b) for d, b in zip(leading, batch_shape, strict=True)):
        raise ValueError(
            f"{name}.shape={x.shape} does not broadcast over the batch dims {batch_shape}"
        )
    if all(d == 1 for d in leading):
        return x.reshape(1, *x.shape[-3:])
    x = jnp.broadcast_to(x, batch_shape + x.shape[-3:])
    return x.reshape(math.prod(batch_shape), *x.shape[-3:])


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    bias: Array | None = None,
    mask: Array | None = None,
    broadcast_dropout: bool = True,
    dropout_rng: Array | None = None,
    dropout_rate: float = 0.0,
    deterministic: bool = False,
    dtype: Any = None,
    precision: Any = None,
    module: nn.Module | None = None,
    force_fp32_for_softmax: bool = False,
    einsum_dot_general: Callable[..., Array] | None = None,
    qk_attn_weights_einsum: Callable[..., Array] | None = None,
    attn_weights_value_einsum: Callable[..., Array] | None = None,
    *,
    causal: bool = False,
    segment_ids: Array | tuple[Array, Array] | None = None,
    sm_scale: float | None = None,
    implementation: str | Implementation = "auto",
) -> Array:
    """Flax's ``dot_product_attention`` on efflax's attention op: a drop-in ``attention_fn``.

    ``nn.MultiHeadDotProductAttention(..., attention_fn=efflax.nn.dot_product_attention)``
    passes its mask, dropout and precision here and they are all honoured (Flax silently drops
    the arguments an ``attention_fn`` does not accept, so an incomplete signature would ignore a
    causal mask). The numbers (values and gradients) equal ``flax.linen.dot_product_attention``'s,
    including on a query that sees no key (e.g. a padded query under causal + padding masks),
    which gets Flax's mean of all values (with Flax's dropout of those weights); the one
    difference: a masked-out key holding NaN or inf has no influence on a query that sees some
    other key (Flax, like ``jax.nn``, returns NaN there). ``MultiHeadAttention`` and the op
    (``pallas_kernels.dot_product_attention``) give such a query zeros and zero gradients
    instead.

    Args:
      query: ``[*batch, q_len, num_heads, head_dim]``.
      key, value: ``[*batch, kv_len, num_kv_heads, head_dim]``; ``num_kv_heads`` divides
        ``num_heads`` (GQA, which Flax's own function does not take).
      bias: float, broadcastable to ``[*batch, num_heads, q_len, kv_len]``, added to the scores.
      mask: broadcastable to ``[*batch, num_heads, q_len, kv_len]``; False (or 0, as in Flax's
        float masks from ``nn.make_causal_mask``) = not seen.
      broadcast_dropout: one dropout mask shared over batch and heads.
      dropout_rng: PRNG key for dropout (needed when it is active).
      dropout_rate: attention-weight dropout probability in [0, 1).
      deterministic: no dropout (Flax's default is False: dropout when ``dropout_rate > 0``).
      dtype: computation dtype (inputs are promoted as in Flax); default the inputs' dtype.
      precision: matmul precision of the XLA path (the kernels are at least as precise).
      module: a Flax module to sow the (pre-dropout) weights into ``'intermediates'``, as
        Flax does with ``sow_weights=True`` (the weights are computed on the XLA path).
      force_fp32_for_softmax: accepted; the softmax always runs in float32.
      einsum_dot_general, qk_attn_weights_einsum, attn_weights_value_einsum: Flax's hooks for
        custom (e.g. quantised) einsums; efflax computes its own, so anything but None raises.
      causal: query ``i`` sees keys ``j <= i`` (the Pallas kernel skips the masked tiles).
      segment_ids: ``[batch, seq]`` or a ``(q_ids, kv_ids)`` pair: packed sequences / padding
        the Pallas kernel can tile (needs exactly one batch dim).
      sm_scale: score scale, default ``1 / sqrt(head_dim)``.
      implementation: ``'auto'`` or a name/instance of ``pallas_kernels.ATTENTION_OP``.

    Returns:
      ``[*batch, q_len, num_heads, head_dim]`` in the computation dtype.

    Raises:
      ValueError: naming the argument, for anything malformed or that no implementation can
        honour (dropout without an rng, custom einsums, a mask that does not broadcast, ...).
    """
    for name, hook in (
        ("einsum_dot_general", einsum_dot_general),
        ("qk_attn_weights_einsum", qk_attn_weights_einsum),
        ("attn_weights_value_einsum", attn_weights_value_einsum),
    ):
        if hook is not None:
            raise ValueError(
                f"{name}={hook!r} is not supported: efflax's attention kernels compute their own "
                "matmuls (use flax.linen.dot_product_attention for custom einsums)"
            )
    _checks.boolean("force_fp32_for_softmax", force_fp32_for_softmax)
    _checks.boolean("deterministic", deterministic)
    for name, x in (("query", query), ("key", key), ("value", value)):
        if getattr(x, "ndim", 0) < 3:
            raise ValueError(
                f"{name}.shape={getattr(x, 'shape', None)} must be [..., seq, heads, dim]"
            )
    if not query.ndim == key.ndim == value.ndim or query.shape[:-3] != key.shape[:-3]:
        raise ValueError(
            f"query.shape={query.shape}, key.shape={key.shape}: batch dims must be equal"
        )
    if dtype is not None:
        try:
            jnp.dtype(dtype)
        except TypeError:
            raise ValueError(f"dtype={dtype!r} is not a dtype") from None
    query, key, value = nn.dtypes.promote_dtype(query, key, value, dtype=dtype)
    if hasattr(mask, "dtype") and mask.dtype != jnp.bool_:
        # Flax's masks (nn.make_causal_mask, nn.make_attention_mask) are float 0/1 arrays, used
        # with jnp.where: nonzero = attend.
        mask = mask != 0
    batch_shape = query.shape[:-3]
    if len(batch_shape) != 1:
        if segment_ids is not None:
            raise ValueError(
                f"segment_ids need exactly one batch dim; query.shape={query.shape} has "
                f"{len(batch_shape)}"
            )
        flat = lambda x: x.reshape(math.prod(batch_shape), *x.shape[-3:])
        query, key, value = flat(query), flat(key), flat(value)
        mask = _flatten_batch("mask", mask, batch_shape)
        bias = _flatten_batch("bias", bias, batch_shape)
    rate = 0.0 if deterministic else dropout_rate
    if rate and dropout_rng is None:
        raise ValueError(
            f"dropout_rate={dropout_rate!r} with deterministic=False needs a dropout_rng "
            "(or pass deterministic=True)"
        )
    op_arguments = dict(
        bias=bias,
        mask=mask,
        causal=causal,
        segment_ids=segment_ids,
        sm_scale=sm_scale,
        dropout_rate=rate,
        dropout_rng=dropout_rng,
        broadcast_dropout=broadcast_dropout,
        precision=precision,
    )
    out = attention_op.dot_product_attention(
        query, key, value, **op_arguments, implementation=implementation
    )
    if module is not None or mask is not None or segment_ids is not None:
        call = check_arguments(query, key, value, **op_arguments)
        out = _flax_rows_that_see_no_key(call, out)
        if module is not None:
            weights = attention_weights(call)
            weights = weights.reshape(*batch_shape, *weights.shape[1:]).astype(query.dtype)
            module.sow("intermediates", "attention_weights", weights)
    return out.reshape(*batch_shape, *out.shape[1:])


def _flax_rows_that_see_no_key(call: AttentionCall, out: Array) -> Array:
    """``out`` with the rows whose query sees no key replaced by Flax's numbers there.

    Flax replaces masked scores by a large negative number, so such a row's softmax is uniform:
    the mean of all values (after Flax's dropout of those weights, drawn the same way), with
    gradients to the values only. The op gives zeros there; ``where`` selects Flax's row (and
    its gradients) instead.
    """
    batch, q_len, kv_len, num_heads, num_kv_heads, head_dim = call.shape
    visible = call.mask.elements(q_len, kv_len)
    if visible is None:
        return out
    empty = ~jnp.any(visible, axis=-1)  # [b or 1, heads or 1, q]
    values = call.value.astype(jnp.float32)
    if call.dropout_rate > 0.0:
        keep = dropout_keep_mask(
            call.dropout_rng,
            call.dropout_rate,
            (batch, num_heads, q_len, kv_len),
            call.broadcast_dropout,
        )
        weights = keep.astype(jnp.float32) / ((1.0 - call.dropout_rate) * kv_len)
        weights = jnp.broadcast_to(weights, (batch, num_heads, q_len, kv_len))
        weights = weights.reshape(batch, num_kv_heads, call.group, q_len, kv_len)
        fallback = jnp.einsum("bhgqk,bkhd->bqhgd", weights, values, precision="highest")
        fallback = fallback.reshape(batch, q_len, num_heads, head_dim)
    else:
        fallback = jnp.repeat(jnp.mean(values, axis=1), call.group, axis=1)[:, None]
    empty = jnp.broadcast_to(empty, (batch, num_heads, q_len)).transpose(0, 2, 1)[..., None]
    return jnp.where(empty, fallback.astype(out.dtype), out)


def segment_ids_with_padding(
    padding_mask: Array | None,
    q_len: int,
    segment_ids: Array | tuple[Array, Array] | None = None,
) -> tuple[Array, Array] | None:
    """Folds a key padding mask into segment ids, so every kernel handles it the same way.

    Args:
      padding_mask: ``[batch, kv_len]`` bool, True for real tokens, or None.
      q_len: query length (for the default query segment ids).
      segment_ids: None, one ``[batch, seq]`` array (self-attention) or a ``(q_ids, kv_ids)``
        pair.

    Returns:
      A ``(q_ids, kv_ids)`` int32 pair, or None when both inputs are None. Padded keys get
      ``PADDING_SEGMENT_ID`` and are seen by no query.
    """
    _checks.int_at_least("q_len", q_len)
    if segment_ids is not None and not isinstance(segment_ids, tuple | list):
        segment_ids = (segment_ids, segment_ids)
    if padding_mask is None:
        return None if segment_ids is None else tuple(segment_ids)
    if getattr(padding_mask, "ndim", None) != 2 or padding_mask.dtype != jnp.bool_:
        raise ValueError(
            f"padding_mask (shape {getattr(padding_mask, 'shape', None)}, dtype "
            f"{getattr(padding_mask, 'dtype', None)}) must be a [batch, kv_len] bool array"
        )
    batch, kv_len = padding_mask.shape
    if segment_ids is None:
        q_ids = jnp.zeros((batch, q_len), jnp.int32)
        kv_ids = jnp.zeros((batch, kv_len), jnp.int32)
    else:
        q_ids, kv_ids = segment_ids
        if kv_ids.shape != padding_mask.shape:
            raise ValueError(
                f"padding_mask.shape={padding_mask.shape} != kv_segment_ids.shape={kv_ids.shape}"
            )
        q_ids, kv_ids = q_ids.astype(jnp.int32), kv_ids.astype(jnp.int32)
    return q_ids, jnp.where(padding_mask, kv_ids, PADDING_SEGMENT_ID)


def apply_rotary_embedding(x: Array, positions: Array, *, base: float = 10_000.0) -> Array:
    """Rotates pairs of features by position-dependent angles (RoPE, half-split layout).

    Feature ``j`` and ``j + head_dim/2`` are rotated by ``position * base**(-2j/head_dim)``, so
    the dot product of a rotated query and key depends only on their position difference.

    Args:
      x: ``[batch, seq, heads, head_dim]`` with an even ``head_dim``.
      positions: ``[batch, seq]``, ``[1, seq]`` or ``[seq]`` positions (ints or floats).
      base: wavelength base, finite and > 0.

    Returns:
      The rotated ``x``, same shape and dtype (computed in float32).
    """
    if getattr(x, "ndim", None) != 4:
        raise ValueError(f"x.shape={getattr(x, 'shape', None)} must be [batch, seq, heads, dim]")
    # An integer x would be rounded after the rotation, a complex one lose its imaginary part.
    _checks.array("x", x, kind="floating")
    batch, seq, _, head_dim = x.shape
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} (x.shape[-1]) must be even for rotary embeddings")
    _checks.positive_float("base", base)
    shape = tuple(getattr(positions, "shape", ()))
    if not (
        (len(shape) == 1 and shape[0] == seq)
        or (len(shape) == 2 and shape[1] == seq and shape[0] in (1, batch))
    ):
        raise ValueError(
            f"positions.shape={shape} must be [{seq}] or [{batch} or 1, {seq}] for "
            f"x.shape={x.shape}"
        )
    dtype = getattr(positions, "dtype", None)
    if not (jnp.issubdtype(dtype, jnp.integer) or jnp.issubdtype(dtype, jnp.floating)):
        raise ValueError(f"positions.dtype={positions.dtype} must be integer or floating")
    positions = jnp.broadcast_to(positions, (batch, seq)).astype(jnp.float32)
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions[:, :, None, None] * inv_freq  # [batch, seq, 1, head_dim/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head (GQA/MQA) attention with rotary embeddings, masks, dropout and a KV cache.

    A query that sees no key (e.g. a padded query under ``causal`` and ``padding_mask`` with
    segment ids) gets zeros and zero gradients, as the op defines it; Flax's
    ``MultiHeadDotProductAttention`` gives the mean of the values there (and so does
    :func:`dot_product_attention`, the drop-in ``attention_fn``).

    Attributes:
      num_heads: query heads.
      head_dim: features per head; default ``in_features // num_heads``.
      num_kv_heads: key/value heads (divides ``num_heads``); default ``num_heads``.
      out_features: output features; default the query input's features.
      causal: causal (autoregressive) masking.
      rope: rotate queries and keys with rotary position embeddings.
      rope_base: the rotary wavelength base.
      implementation: ``'auto'`` (one resolver: the attention op's), a name (``'xla'``,
        ``'pallas_triton'``/``'pallas'``, ``'cudnn'``, ``'reference'``) or a configured
        implementation, e.g. ``PallasTritonAttention(block_sizes=..., interpret=True)``.
      sm_scale: logit scale, default ``1/sqrt(head_dim)``.
      dropout_rate: attention-weight dropout (needs a ``'dropout'`` rng when active).
      broadcast_dropout: one dropout mask shared over batch and heads (Flax's default).
      deterministic: no dropout; may instead be passed to ``__call__`` (Flax's ``merge_param``).
      decode: autoregressive decoding with a key/value cache in the ``'cache'`` collection. The
        cache batch and length are fixed by the input of the ``init`` call (as in Flax); each
        later call writes its tokens at the cache index (a prompt, then one token per call) and
        attends causally to everything cached. Needs ``causal=True`` and self-attention.
        Follows the decode contract of ``efflax._src.nn._decode`` (shared with the GAU
        layers): a step of another batch or past the cache is a ValueError; under ``jit``
        positions past the cache are dropped, attend to nothing and flag the cache.
      precision: matmul precision (projections and the XLA attention path).
      use_bias: biases on the projections.
      dtype: computation dtype (default: inferred from inputs and params).
      param_dtype: parameter dtype.
      kernel_init, bias_init: initializers, wrapped with the logical axis names.
    """

    num_heads: int
    head_dim: int | None = None
    num_kv_heads: int | None = None
    out_features: int | None = None
    causal: bool = False
    rope: bool = False
    rope_base: float = 10_000.0
    implementation: str | Implementation = "auto"
    sm_scale: float | None = None
    dropout_rate: float = 0.0
    broadcast_dropout: bool = True
    deterministic: bool | None = None
    decode: bool = False
    precision: Any = None
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()

    def _check_config(self, in_features: int) -> tuple[int, int]:
        _checks.int_at_least("num_heads", self.num_heads)
        num_kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        if not isinstance(num_kv_heads, int) or num_kv_heads < 1 or self.num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads!r} must be an int >= 1 that divides "
                f"num_heads={self.num_heads}"
            )
        head_dim = self.head_dim
        if head_dim is None:
            if in_features % self.num_heads:
                raise ValueError(
                    f"num_heads={self.num_heads} must divide the {in_features} input features "
                    "(or set head_dim)"
                )
            head_dim = in_features // self.num_heads
        _checks.int_at_least("head_dim", head_dim)
        if self.rope and head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even when rope=True")
        if self.rope:
            _checks.positive_float("rope_base", self.rope_base)
        _checks.boolean("causal", self.causal)
        _checks.boolean("decode", self.decode)
        _checks.probability("dropout_rate", self.dropout_rate, allow_one=False)
        if not (isinstance(self.implementation, str) and self.implementation == "auto"):
            attention_op.ATTENTION_OP.get(self.implementation)  # an unknown name raises here
        return num_kv_heads, head_dim

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        mask: Array | None = None,
        padding_mask: Array | None = None,
        segment_ids: Array | tuple[Array, Array] | None = None,
        positions: Array | None = None,
        kv_positions: Array | None = None,
        deterministic: bool | None = None,
    ) -> Array:
        """Attends from ``inputs_q`` to ``inputs_kv`` (default: self-attention).

        Args:
          inputs_q: ``[batch, q_len, features]``.
          inputs_kv: ``[batch, kv_len, kv_features]``; default ``inputs_q``.
          mask: bool, broadcastable to ``[batch, num_heads, q_len, kv_len]`` (with ``decode``:
            ``kv_len`` is the cache length); False = not seen. Runs on XLA (the kernel tiles only
            structural masks: ``causal``, ``padding_mask``, ``segment_ids``).
          padding_mask: ``[batch, kv_len]`` bool, True for real tokens; padded keys are ignored.
          segment_ids: packed sequences: ``[batch, seq]`` int (self-attention) or a
            ``(q_ids [batch, q_len], kv_ids [batch, kv_len])`` pair.
          positions: ``[batch, q_len]`` (or ``[q_len]``) rotary positions of the queries;
            default ``0..q_len-1`` (with ``decode``: the cache index onwards).
          kv_positions: rotary positions of the keys; default ``positions`` for
            self-attention, ``0..kv_len-1`` otherwise.
          deterministic: no dropout (merged with the attribute; needed when dropout is on).

        Returns:
          ``[batch, q_len, out_features]``.
        """
        self_attention = inputs_kv is None
        inputs_kv = inputs_q if self_attention else inputs_kv
        if getattr(inputs_q, "ndim", None) != 3 or getattr(inputs_kv, "ndim", None) != 3:
            raise ValueError(
                f"inputs_q.shape={getattr(inputs_q, 'shape', None)} and inputs_kv.shape="
                f"{getattr(inputs_kv, 'shape', None)} must be [batch, seq, features]"
            )
        num_kv_heads, head_dim = self._check_config(inputs_q.shape[-1])
        batch, q_len = inputs_q.shape[:2]
        kv_len = inputs_kv.shape[1]
        if inputs_kv.shape[0] != batch:
            raise ValueError(
                f"inputs_kv.shape={inputs_kv.shape} and inputs_q.shape={inputs_q.shape}: "
                "batch differs"
            )
        if padding_mask is not None and getattr(padding_mask, "shape", None) != (batch, kv_len):
            raise ValueError(
                f"padding_mask.shape={getattr(padding_mask, 'shape', None)} must be "
                f"{(batch, kv_len)}"
            )
        if segment_ids is not None and not isinstance(segment_ids, tuple | list):
            if not self_attention:
                raise ValueError("cross-attention needs segment_ids as a (q_ids, kv_ids) pair")
            if getattr(segment_ids, "shape", None) != (batch, q_len):
                raise ValueError(
                    f"segment_ids.shape={getattr(segment_ids, 'shape', None)} must be "
                    f"{(batch, q_len)}"
                )
        if not self.rope and (positions is not None or kv_positions is not None):
            raise ValueError("positions/kv_positions are only used with rope=True")

        if self.decode and self.has_variable("cache", "cached_key"):
            # The decode contract's checks, before any work (the cache is read, not written).
            cache_batch, cache_length = self.get_variable("cache", "cached_key").shape[:2]
            _decode.check_step(
                "inputs_q", inputs_q.shape, cache_batch=cache_batch, cache_length=cache_length
            )
            index = self.get_variable("cache", "cache_index")
            _decode.check_position("inputs_q", index, q_len, cache_length)

        dropout_rng = None
        if self.dropout_rate > 0.0:
            deterministic = nn.merge_param("deterministic", self.deterministic, deterministic)
            _checks.boolean("deterministic", deterministic)
            if not deterministic:
                dropout_rng = self.make_rng("dropout")
        rate = self.dropout_rate if dropout_rng is not None else 0.0

        def projection(num: int, name: str, axes: tuple[str, ...]) -> nn.DenseGeneral:
            return nn.DenseGeneral(
                features=(num, head_dim),
                axis=-1,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                precision=self.precision,
                kernel_init=nn.with_logical_partitioning(self.kernel_init, axes),
                bias_init=nn.with_logical_partitioning(self.bias_init, axes[1:]),
                name=name,
            )

        query = projection(self.num_heads, "query", QKV_KERNEL_AXES)(inputs_q)
        key = projection(num_kv_heads, "key", KV_KERNEL_AXES)(inputs_kv)
        value = projection(num_kv_heads, "value", KV_KERNEL_AXES)(inputs_kv)

        q_offset = None
        if self.decode:
            for name, arg in (
                ("inputs_kv", None if self_attention else inputs_kv),
                ("padding_mask", padding_mask),
                ("segment_ids", segment_ids),
                ("positions", positions),
                ("kv_positions", kv_positions),
            ):
                if arg is not None:
                    raise ValueError(
                        f"decode=True does not take {name} (self-attention over the cache; "
                        "positions follow the cache index; use mask= for other masking)"
                    )
            if not self.causal:
                raise ValueError("decode=True needs causal=True")
            query, key, value, q_offset = self._update_cache(query, key, value)
        elif self.rope:
            if positions is None:
                positions = jnp.arange(q_len)
            if kv_positions is None:
                kv_positions = positions if self_attention else jnp.arange(kv_len)
            rotate = functools.partial(apply_rotary_embedding, base=self.rope_base)
            query, key = rotate(query, positions), rotate(key, kv_positions)

        encoded = attention_op.dot_product_attention(
            query,
            key,
            value,
            mask=mask,
            causal=self.causal,
            q_offset=q_offset,
            segment_ids=segment_ids_with_padding(padding_mask, q_len, segment_ids),
            sm_scale=self.sm_scale,
            dropout_rate=rate,
            dropout_rng=dropout_rng,
            broadcast_dropout=self.broadcast_dropout,
            precision=self.precision,
            implementation=self.implementation,
        )
        if q_offset is not None:
            # The decode contract under jit: positions past the cache are not written and
            # attend to nothing (zeros); the cache index keeps counting (_decode.overflowed).
            _, inside = _decode.positions(q_offset, q_len, key.shape[1])
            encoded = jnp.where(inside[None, :, None, None], encoded, jnp.zeros((), encoded.dtype))
        out_features = inputs_q.shape[-1] if self.out_features is None else self.out_features
        _checks.int_at_least("out_features", out_features)
        return nn.DenseGeneral(
            features=out_features,
            axis=(-2, -1),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            precision=self.precision,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, OUT_KERNEL_AXES),
            bias_init=nn.with_logical_partitioning(self.bias_init, ("embed",)),
            name="out",
        )(encoded)

    def _update_cache(
        self, query: Array, key: Array, value: Array
    ) -> tuple[Array, Array, Array, Array | None]:
        """Writes this call's keys/values into the cache; returns what to attend with.

        The ``init`` call creates the cache (its length is the input's) and attends as without
        ``decode``; later calls append at the cache index and attend over the whole cache with
        ``q_offset`` = the index (unwritten slots lie in every query's future).
        """
        initialized = self.has_variable("cache", "cached_key")
        cached_key = self.variable("cache", "cached_key", jnp.zeros, key.shape, key.dtype)
        cached_value = self.variable("cache", "cached_value", jnp.zeros, value.shape, value.dtype)
        cache_index = self.variable("cache", "cache_index", lambda: jnp.array(0, jnp.int32))
        q_len = query.shape[1]
        if not initialized:
            if self.rope:
                positions = jnp.arange(q_len)
                query = apply_rotary_embedding(query, positions, base=self.rope_base)
                key = apply_rotary_embedding(key, positions, base=self.rope_base)
            return query, key, value, None
        index = cache_index.value  # the step was checked against the cache in __call__
        if self.rope:
            positions = index + jnp.arange(q_len)
            query = apply_rotary_embedding(query, positions, base=self.rope_base)
            key = apply_rotary_embedding(key, positions, base=self.rope_base)
        cached_key.value = _decode.write(cached_key.value, key, index)
        cached_value.value = _decode.write(cached_value.value, value, index)
        cache_index.value = index + q_len
        return query, cached_key.value, cached_value.value, index
