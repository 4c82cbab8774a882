"""The attention op's call value: one set of argument checks building one frozen ``AttentionCall``.

Scaled dot-product attention (Vaswani et al., "Attention Is All You Need", arXiv:1706.03762,
2017), computed exactly by every implementation; FlashAttention (Dao et al., arXiv:2205.14135,
2022; FlashAttention-2, arXiv:2307.08691, 2023) computes it in O(seq) memory.

``pallas_kernels.attention.dot_product_attention`` (``api.py``) checks its arguments once
(:func:`check_arguments`) into an :class:`AttentionCall` - the inputs, one :class:`Mask` and the
normalised scalars - and hands that one value to the implementation the op's table picks
(``api.py``). Every implementation computes the same function; they differ in
what they can express: the Pallas kernel takes causal masks, segment ids (so also padding) and
block-sparse masks, not dense boolean masks, additive biases or dropout, and refuses those so that
``'auto'`` falls through to XLA.

Masking semantics, the same for every implementation (including the reference):
- A query sees a key when every mask says so: ``causal`` (query ``i`` sees keys ``j <= i``,
  top-left aligned as in ``jax.nn.dot_product_attention``; with ``q_offset`` query ``i`` sits at
  position ``q_offset + i``), ``segment_ids`` (equal ids), ``mask`` (True) and ``block_mask``
  (the tile is on).
- A key a query does not see has **no influence** on that query's output or on any gradient
  through it, even when its key/value hold NaN or inf. (``jax.nn.dot_product_attention`` and
  ``flax.linen.dot_product_attention`` do not guarantee this: a masked NaN value turns the
  output NaN through ``0 * NaN``.) A non-finite value a query does see makes that query's row NaN.
- A query that sees no key at all gets zeros and zero gradients (jax.nn and Flax give the mean of
  all values there).
- ``bias`` is added to the scaled scores; it is not a mask.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import _checks
from pallas_kernels.op import Implementation

__all__ = [
    "AttentionCall",
    "AttentionImplementation",
    "Mask",
    "SUPPORTED_DTYPES",
    "check_arguments",
    "dropout_keep_mask",
    "expand_block_mask",
    "finite_or_zero",
]

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_PRECISION_NAMES = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32", "fastest")


@dataclasses.dataclass(frozen=True)
class Mask:
    """Which keys each query sees: every part must say so (an empty ``Mask()`` masks nothing).

    Attributes:
      causal: query ``i`` sees keys ``j <= i`` (top-left aligned), or ``j <= q_offset + i``.
      q_offset: with ``causal``, the int32 scalar position of the first query, or None.
      segment_ids: ``(q_ids [batch, q_len], kv_ids [batch, kv_len])``, int32 (int64 only when
        traced with ``jax_enable_x64``): equal ids see each other.
      dense: bool rank 4, broadcastable to ``[batch, heads, q_len, kv_len]`` (the ``mask=``
        argument).
      block_mask: bool ``[heads or 1, q_blocks, kv_blocks]`` tiles of ``block_shape``.
      block_shape: the ``(block_q, block_k)`` tile of ``block_mask``.
    """

    causal: bool = False
    q_offset: jax.Array | None = None
    segment_ids: tuple[jax.Array, jax.Array] | None = None
    dense: jax.Array | None = None
    block_mask: jax.Array | None = None
    block_shape: tuple[int, int] | None = None

    @property
    def is_empty(self) -> bool:
        """Whether every query sees every key."""
        return (
            not self.causal
            and self.segment_ids is None
            and self.dense is None
            and (self.block_mask is None)
        )

    def elements(self, q_len: int, kv_len: int) -> jax.Array | None:
        """Bool broadcastable to ``[batch, heads, q_len, kv_len]``, or ``None`` when every query
        sees every key."""
        parts = []
        if self.dense is not None:
            parts.append(self.dense)
        if self.causal:
            rows = jnp.arange(q_len, dtype=jnp.int32)
            if self.q_offset is not None:
                rows = rows + self.q_offset
            cols = jnp.arange(kv_len, dtype=jnp.int32)
            parts.append((rows[:, None] >= cols[None, :])[None, None])
        if self.segment_ids is not None:
            q_ids, kv_ids = self.segment_ids
            parts.append((q_ids[:, :, None] == kv_ids[:, None, :])[:, None])
        if self.block_mask is not None:
            expanded = expand_block_mask(self.block_mask, self.block_shape, q_len, kv_len)
            parts.append(expanded[None])
        if not parts:
            return None
        visible = parts[0]
        for part in parts[1:]:
            visible = visible & part
        return visible


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """One checked call of the attention op: what every implementation receives.

    Built once by :func:`check_arguments`; an implementation reads what it needs and raises
    :class:`pallas_kernels.op.Unsupported` for what it cannot honour.

    Attributes:
      query: ``[batch, q_len, num_heads, head_dim]``.
      key, value: ``[batch, kv_len, num_kv_heads, head_dim]``, same dtype.
      mask: the :class:`Mask`.
      bias: float rank 4, broadcastable to ``[batch, heads, q_len, kv_len]``, or None.
      sm_scale: the finite score scale > 0 (a float), or a traced float32 scalar.
      dropout_rate: in [0, 1); 0.0 means no dropout (and ``dropout_rng`` is None).
      dropout_rng: one PRNG key, or None.
      broadcast_dropout: one dropout mask ``[q_len, kv_len]`` shared over batch and heads.
      precision: the matmul precision of the XLA path (None, a ``lax.Precision``, a name or a
        pair).
    """

    query: jax.Array
    key: jax.Array
    value: jax.Array
    mask: Mask = Mask()
    bias: jax.Array | None = None
    sm_scale: Any = 1.0
    dropout_rate: float = 0.0
    dropout_rng: jax.Array | None = None
    broadcast_dropout: bool = True
    precision: Any = None

    @property
    def shape(self) -> tuple[int, int, int, int, int, int]:
        """``(batch, q_len, kv_len, num_heads, num_kv_heads, head_dim)``."""
        batch, q_len, num_heads, head_dim = self.query.shape
        return batch, q_len, self.key.shape[1], num_heads, self.key.shape[2], head_dim

    @property
    def group(self) -> int:
        """Query heads per key/value head (GQA)."""
        return self.query.shape[2] // self.key.shape[2]


@dataclasses.dataclass(frozen=True)
class AttentionImplementation(Implementation):
    """An implementation of the attention op: ``__call__(call: AttentionCall) -> [batch, q_len,
    num_heads, head_dim]`` in the dtype of ``call.query``."""

    def __call__(self, call: AttentionCall) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError


# --------------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------------


def _shape(x: Any) -> Any:
    return tuple(x.shape) if hasattr(x, "shape") else type(x).__name__


def _qkv(query: Any, key: Any, value: Any) -> tuple[int, int, int, int, int, int]:
    for name, x in (("query", query), ("key", key), ("value", value)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(
                f"{name}.shape={_shape(x)} must be [batch, seq, heads, head_dim] (4 dims)"
            )
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype={x.dtype} must be float32, bfloat16 or float16")
    if not query.dtype == key.dtype == value.dtype:
        raise ValueError(
            f"query, key and value dtypes must match: {query.dtype}, {key.dtype}, {value.dtype}"
        )
    if key.shape != value.shape:
        raise ValueError(f"key.shape={key.shape} and value.shape={value.shape} must be equal")
    batch, q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[1], key.shape[2]
    if min(query.shape) < 1 or min(key.shape) < 1:
        raise ValueError(f"empty dimension in query.shape={query.shape} or key.shape={key.shape}")
    if key.shape[0] != batch:
        raise ValueError(f"key.shape={key.shape} and query.shape={query.shape}: batch differs")
    if key.shape[3] != head_dim:
        raise ValueError(f"key.shape={key.shape} and query.shape={query.shape}: head_dim differs")
    if num_heads % num_kv_heads:
        raise ValueError(
            f"num_kv_heads={num_kv_heads} (key.shape[2]) must divide num_heads={num_heads} "
            "(query.shape[2])"
        )
    return batch, q_len, kv_len, num_heads, num_kv_heads, head_dim


def _broadcastable(name: str, x: Any, target: tuple[int, ...], *, boolean: bool) -> jax.Array:
    """``x`` as a rank-4 array whose every dim is 1 or the target's (leading 1s added)."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        raise ValueError(f"{name} of type {type(x).__name__} must be an array")
    if boolean and x.dtype != jnp.bool_:
        raise ValueError(f"{name}.dtype={x.dtype} must be bool (True = attend)")
    if not boolean and not jnp.issubdtype(x.dtype, jnp.floating):
        raise ValueError(f"{name}.dtype={x.dtype} must be floating")
    shape = tuple(x.shape)
    if len(shape) > 4 or any(
        d not in (1, t) for d, t in zip(shape[::-1], target[::-1], strict=False)
    ):
        raise ValueError(
            f"{name}.shape={shape} does not broadcast to [batch, heads, q_len, kv_len] = "
            f"{list(target)}"
        )
    return jnp.reshape(x, (1,) * (4 - len(shape)) + shape)


def _segment_ids(segment_ids: Any, batch: int, q_len: int, kv_len: int):
    if segment_ids is None:
        return None
    if hasattr(segment_ids, "shape"):
        if q_len != kv_len:
            raise ValueError(
                f"segment_ids.shape={_shape(segment_ids)}: with q_len={q_len} != "
                f"kv_len={kv_len} pass a (q_segment_ids, kv_segment_ids) pair"
            )
        segment_ids = (segment_ids, segment_ids)
    if not isinstance(segment_ids, tuple | list) or len(segment_ids) != 2:
        raise ValueError(
            f"segment_ids of type {type(segment_ids).__name__} must be an array [batch, seq] or "
            "a (q_segment_ids, kv_segment_ids) pair"
        )
    pair = []
    names = ("q_segment_ids", "kv_segment_ids")
    shapes = ((batch, q_len), (batch, kv_len))
    for name, ids, shape in zip(names, segment_ids, shapes, strict=True):
        if not hasattr(ids, "shape") or tuple(ids.shape) != shape:
            raise ValueError(f"{name}.shape={_shape(ids)} must be {shape}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"{name}.dtype={ids.dtype} must be an integer type")
        if jnp.dtype(ids.dtype).itemsize <= 4:
            # int8..int32/uint32 -> int32 is one-to-one (uint32 wraps, but equal ids stay
            # equal and different ones different), so equality is unchanged
            pair.append(jnp.asarray(ids).astype(jnp.int32))
            continue
        values = _checks.concrete(ids)
        if values is None:
            # traced 64-bit ids (jax_enable_x64): compared as they are, never wrapped
            pair.append(ids)
            continue
        info = np.iinfo(np.int32)
        outside = values[(values < info.min) | (values > info.max)]
        if outside.size:
            raise ValueError(
                f"{name} ({ids.dtype}) holds {outside.size} values outside the int32 range, "
                f"such as {outside.reshape(-1)[:3].tolist()}; segment ids are compared as "
                "int32, where they would wrap (2**32 would equal 0): use ids that fit int32"
            )
        pair.append(jnp.asarray(values.astype(np.int32)))
    return tuple(pair)


def _q_offset(q_offset: Any, causal: bool) -> jax.Array | None:
    if q_offset is None:
        return None
    if not causal:
        raise ValueError(f"q_offset={q_offset!r} only applies with causal=True")
    if isinstance(q_offset, bool) or not (
        isinstance(q_offset, numbers.Integral)
        or (hasattr(q_offset, "dtype") and jnp.issubdtype(q_offset.dtype, jnp.integer))
    ):
        raise ValueError(f"q_offset={q_offset!r} must be an int or an integer scalar array")
    if jnp.ndim(q_offset) != 0:
        raise ValueError(f"q_offset.shape={_shape(q_offset)} must be () (a scalar)")
    value = _checks.concrete(q_offset)
    if value is not None and int(value) < 0:
        raise ValueError(f"q_offset={int(value)} must be >= 0")
    return jnp.asarray(q_offset, jnp.int32)


def _block_mask(block_mask: Any, block_shape: Any, num_heads: int, q_len: int, kv_len: int):
    if block_mask is None:
        if block_shape is not None:
            raise ValueError(f"block_shape={block_shape!r} is only used with a block_mask")
        return None, None
    if (
        not isinstance(block_shape, tuple | list)
        or len(block_shape) != 2
        or not all(isinstance(b, numbers.Integral) and b >= 1 for b in block_shape)
    ):
        raise ValueError(
            f"block_shape={block_shape!r} must be the (block_q, block_k) tile of the block_mask"
        )
    block_q, block_k = (int(b) for b in block_shape)
    expected = (-(-q_len // block_q), -(-kv_len // block_k))
    if (
        not hasattr(block_mask, "dtype")
        or block_mask.dtype != jnp.bool_
        or block_mask.ndim != 3
        or block_mask.shape[0] not in (1, num_heads)
        or tuple(block_mask.shape[1:]) != expected
    ):
        raise ValueError(
            f"block_mask (shape {_shape(block_mask)}, dtype {getattr(block_mask, 'dtype', None)}) "
            f"must be bool [1 or {num_heads}, {expected[0]}, {expected[1]}] for q_len={q_len}, "
            f"kv_len={kv_len} in tiles of block_shape={(block_q, block_k)}"
        )
    return jnp.asarray(block_mask), (block_q, block_k)


def _precision(precision: Any) -> Any:
    def one(p):
        if p is None or isinstance(p, lax.Precision | lax.DotAlgorithmPreset):
            return
        if isinstance(p, str) and p.lower() in _PRECISION_NAMES:
            return
        raise ValueError(
            f"precision={precision!r} must be None, a jax.lax.Precision, one of "
            f"{_PRECISION_NAMES} or a pair of those"
        )

    if isinstance(precision, tuple | list):
        if len(precision) != 2:
            raise ValueError(f"precision={precision!r} as a sequence must be a pair")
        for p in precision:
            one(p)
        return tuple(precision)
    one(precision)
    return precision


def _dropout(dropout_rate: Any, dropout_rng: Any, broadcast_dropout: Any):
    rate = _checks.probability("dropout_rate", dropout_rate, allow_one=False)
    _checks.boolean("broadcast_dropout", broadcast_dropout)
    if rate == 0.0:
        return 0.0, None
    if dropout_rng is None:
        raise ValueError(f"dropout_rate={dropout_rate!r} > 0 needs a dropout_rng (a PRNG key)")
    is_typed_key = hasattr(dropout_rng, "dtype") and jnp.issubdtype(
        dropout_rng.dtype, jax.dtypes.prng_key
    )
    is_raw_key = (
        hasattr(dropout_rng, "dtype")
        and dropout_rng.dtype == jnp.uint32
        and tuple(dropout_rng.shape) == (2,)
    )
    if not (is_typed_key and dropout_rng.shape == ()) and not is_raw_key:
        raise ValueError(
            f"dropout_rng (shape {_shape(dropout_rng)}, dtype {getattr(dropout_rng, 'dtype', '?')})"
            " must be one PRNG key (jax.random.key or jax.random.PRNGKey)"
        )
    return rate, dropout_rng


def check_arguments(
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
) -> AttentionCall:
    """The one set of checks of the attention family; returns the normalised call value.

    Raises:
      ValueError: naming the argument and its value, for anything malformed (see
        :func:`dot_product_attention` for what each argument must be).
    """
    batch, q_len, kv_len, num_heads, _, head_dim = _qkv(query, key, value)
    target = (batch, num_heads, q_len, kv_len)
    causal = _checks.boolean("causal", causal)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    elif _checks.concrete(sm_scale) is None:
        # traced (e.g. a learned temperature): the XLA path and the reference take it as an
        # array; the kernels need it at trace time and refuse the call
        sm_scale = _checks.traced_scalar("sm_scale", sm_scale)
    else:
        sm_scale = _checks.positive_float("sm_scale", sm_scale)
    block_mask, block_shape = _block_mask(block_mask, block_shape, num_heads, q_len, kv_len)
    dropout_rate, dropout_rng = _dropout(dropout_rate, dropout_rng, broadcast_dropout)
    return AttentionCall(
        query=query,
        key=key,
        value=value,
        mask=Mask(
            causal=causal,
            q_offset=_q_offset(q_offset, causal),
            segment_ids=_segment_ids(segment_ids, batch, q_len, kv_len),
            dense=None if mask is None else _broadcastable("mask", mask, target, boolean=True),
            block_mask=block_mask,
            block_shape=block_shape,
        ),
        bias=None if bias is None else _broadcastable("bias", bias, target, boolean=False),
        sm_scale=sm_scale,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        broadcast_dropout=bool(broadcast_dropout),
        precision=_precision(precision),
    )


# --------------------------------------------------------------------------------------------
# Semantics shared by the implementations that materialise scores
# --------------------------------------------------------------------------------------------


def expand_block_mask(
    block_mask: jax.Array, block_shape: tuple[int, int], q_len: int, kv_len: int
) -> jax.Array:
    """``[h, q_blocks, kv_blocks]`` tiles -> ``[h, q_len, kv_len]`` elements."""
    block_q, block_k = block_shape
    expanded = jnp.repeat(jnp.repeat(block_mask, block_q, axis=1), block_k, axis=2)
    return expanded[:, :q_len, :kv_len]


def dropout_keep_mask(
    rng: jax.Array, rate: float, shape: tuple[int, int, int, int], broadcast: bool
) -> jax.Array:
    """The kept attention weights, drawn exactly as ``flax.linen.dot_product_attention`` draws
    them (same key and shape: the same mask): ``[1, 1, q, kv]`` if ``broadcast`` else ``shape``."""
    draw_shape = (1, 1, *shape[2:]) if broadcast else shape
    return jax.random.bernoulli(rng, 1.0 - rate, draw_shape)


def finite_or_zero(x: jax.Array, axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """``x`` with non-finite entries zeroed, and whether each vector along ``axis`` had one."""
    finite = jnp.isfinite(x)
    return jnp.where(finite, x, jnp.zeros((), x.dtype)), ~jnp.all(finite, axis=axis)
