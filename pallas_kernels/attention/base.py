"""The attention op: one signature, one set of argument checks, the registry of implementations.

Scaled dot-product attention (Vaswani et al., "Attention Is All You Need", arXiv:1706.03762,
2017), computed exactly by every implementation; FlashAttention (Dao et al., arXiv:2205.14135,
2022; FlashAttention-2, arXiv:2307.08691, 2023) computes it in O(seq) memory.

``dot_product_attention`` checks its arguments once and hands the normalised call to
``ATTENTION_OP``, which runs the requested implementation or, for ``'auto'``, the first one of
the backend's preference order that accepts the call (GPU: ``pallas_triton``, ``cudnn``,
``xla``; elsewhere: ``xla``). Every implementation computes the same function; they differ in
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
from jax import lax

from pallas_kernels import _checks
from pallas_kernels.op import Implementation
from pallas_kernels.op import Op

__all__ = [
    "ATTENTION_OP",
    "AttentionImplementation",
    "SUPPORTED_DTYPES",
    "check_arguments",
    "dot_product_attention",
    "dropout_keep_mask",
    "element_mask",
    "expand_block_mask",
    "finite_or_zero",
]

ATTENTION_OP = Op(
    "dot_product_attention",
    auto_order={"gpu": ("pallas_triton", "cudnn", "xla"), "*": ("xla",)},
    aliases={"pallas": "pallas_triton"},
)

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_PRECISION_NAMES = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32", "fastest")


@dataclasses.dataclass(frozen=True)
class AttentionImplementation(Implementation):
    """An implementation of :func:`dot_product_attention`.

    ``__call__(query, key, value, **normalised)`` receives the arguments as
    :func:`check_arguments` returns them (``segment_ids`` an int32 pair, ``mask`` and ``bias``
    rank 4, ``sm_scale`` a float, ...), and raises :class:`pallas_kernels.op.Unsupported` before
    computing anything when it cannot honour one of them.
    """

    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        *,
        bias: jax.Array | None,
        mask: jax.Array | None,
        causal: bool,
        q_offset: jax.Array | None,
        segment_ids: tuple[jax.Array, jax.Array] | None,
        block_mask: jax.Array | None,
        block_shape: tuple[int, int] | None,
        sm_scale: float,
        dropout_rate: float,
        dropout_rng: jax.Array | None,
        broadcast_dropout: bool,
        precision: Any,
    ) -> jax.Array:  # pragma: no cover - abstract
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
        pair.append(jnp.asarray(ids).astype(jnp.int32))
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
) -> dict[str, Any]:
    """The one set of checks of the attention family; returns the normalised keyword arguments.

    Raises:
      ValueError: naming the argument and its value, for anything malformed (see
        :func:`dot_product_attention` for what each argument must be).
    """
    batch, q_len, kv_len, num_heads, _, head_dim = _qkv(query, key, value)
    target = (batch, num_heads, q_len, kv_len)
    causal = _checks.boolean("causal", causal)
    if sm_scale is None:
        sm_scale = 1.0 / math.sqrt(head_dim)
    else:
        sm_scale = _checks.positive_float("sm_scale", sm_scale)
    block_mask, block_shape = _block_mask(block_mask, block_shape, num_heads, q_len, kv_len)
    dropout_rate, dropout_rng = _dropout(dropout_rate, dropout_rng, broadcast_dropout)
    return dict(
        bias=None if bias is None else _broadcastable("bias", bias, target, boolean=False),
        mask=None if mask is None else _broadcastable("mask", mask, target, boolean=True),
        causal=causal,
        q_offset=_q_offset(q_offset, causal),
        segment_ids=_segment_ids(segment_ids, batch, q_len, kv_len),
        block_mask=block_mask,
        block_shape=block_shape,
        sm_scale=sm_scale,
        dropout_rate=dropout_rate,
        dropout_rng=dropout_rng,
        broadcast_dropout=bool(broadcast_dropout),
        precision=_precision(precision),
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
    kwargs = check_arguments(
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
    return ATTENTION_OP.dispatch(implementation, query, key, value, **kwargs)


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


def element_mask(
    q_len: int,
    kv_len: int,
    *,
    mask: jax.Array | None,
    causal: bool,
    q_offset: jax.Array | None,
    segment_ids: tuple[jax.Array, jax.Array] | None,
    block_mask: jax.Array | None,
    block_shape: tuple[int, int] | None,
) -> jax.Array | None:
    """Which keys each query sees: bool broadcastable to ``[batch, heads, q_len, kv_len]``, or
    ``None`` when every query sees every key."""
    parts = []
    if mask is not None:
        parts.append(mask)
    if causal:
        rows = jnp.arange(q_len, dtype=jnp.int32)
        if q_offset is not None:
            rows = rows + q_offset
        parts.append((rows[:, None] >= jnp.arange(kv_len, dtype=jnp.int32)[None, :])[None, None])
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids
        parts.append((q_ids[:, :, None] == kv_ids[:, None, :])[:, None])
    if block_mask is not None:
        parts.append(expand_block_mask(block_mask, block_shape, q_len, kv_len)[None])
    if not parts:
        return None
    visible = parts[0]
    for part in parts[1:]:
        visible = visible & part
    return visible


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
