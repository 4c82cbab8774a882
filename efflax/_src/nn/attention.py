"""Multi-head attention whose kernel is a choice: FlashAttention (Pallas), XLA or cuDNN.

Dao, Fu, Ermon, Rudra, Re, "FlashAttention: Fast and Memory-Efficient Exact Attention with
IO-Awareness", arXiv:2205.14135, 2022 (FlashAttention-2: Dao, arXiv:2307.08691, 2023).
Rotary embeddings: Su et al., "RoFormer", arXiv:2104.09864, 2021.
The module projects inputs to query/key/value heads (GQA: fewer key/value heads), optionally
rotates queries and keys, and computes exact softmax attention with the chosen kernel; the
'pallas' kernel never materialises the S x S score matrix.

Example:
  >>> layer = MultiHeadAttention(num_heads=8, num_kv_heads=2, causal=True, rope=True)
  >>> variables = layer.init(jax.random.key(0), x)            # x: [batch, seq, features]
  >>> y = layer.apply(variables, x, padding_mask=mask)         # mask: [batch, seq] bool
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array
Initializer = Callable[..., Array]

IMPLEMENTATIONS = ("pallas", "xla", "cudnn", "auto")
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
# Key/value positions excluded by a padding mask get this segment id, which no query carries.
PADDING_SEGMENT_ID = np.iinfo(np.int32).min

QKV_KERNEL_AXES = ("embed", "heads", "kv")
KV_KERNEL_AXES = ("embed", "kv_heads", "kv")
OUT_KERNEL_AXES = ("heads", "kv", "embed")


def resolve_implementation(implementation: str, backend: str | None = None) -> str:
    """Turns ``'auto'`` into a concrete kernel and checks that it can run on ``backend``.

    Args:
      implementation: one of ``'pallas'``, ``'xla'``, ``'cudnn'``, ``'auto'``.
      backend: the JAX platform (``'cpu'``, ``'gpu'``, ``'tpu'``); default
        ``jax.default_backend()``.

    Returns:
      ``'pallas'``, ``'xla'`` or ``'cudnn'``. ``'auto'`` is Pallas on GPU and XLA elsewhere.

    Raises:
      ValueError: for an unknown implementation, or ``'cudnn'`` without a GPU.
    """
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r} must be one of {IMPLEMENTATIONS}")
    backend = jax.default_backend() if backend is None else backend
    if implementation == "auto":
        return "pallas" if backend == "gpu" else "xla"
    if implementation == "cudnn" and backend != "gpu":
        raise ValueError(f"implementation='cudnn' needs an NVIDIA GPU, backend is {backend!r}")
    return implementation


def _check_inputs(query: Array, key: Array, value: Array, segment_ids: Any) -> None:
    for name, x in (("query", query), ("key", key), ("value", value)):
        if x.ndim != 4:
            raise ValueError(f"{name}.shape={x.shape} must be [batch, seq, heads, head_dim]")
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype={x.dtype} must be float32, bfloat16 or float16")
    if key.shape != value.shape:
        raise ValueError(f"key.shape={key.shape} and value.shape={value.shape} must match")
    if not query.dtype == key.dtype == value.dtype:
        raise ValueError(f"dtypes must match: {query.dtype=}, {key.dtype=}, {value.dtype=}")
    batch, q_len, num_heads, head_dim = query.shape
    if key.shape[0] != batch:
        raise ValueError(f"key batch {key.shape[0]} != query batch {batch}")
    if key.shape[3] != head_dim:
        raise ValueError(f"key head_dim {key.shape[3]} != query head_dim {head_dim}")
    if num_heads % key.shape[2]:
        raise ValueError(f"kv heads {key.shape[2]} must divide query heads {num_heads}")
    if segment_ids is not None:
        if not isinstance(segment_ids, tuple | list) or len(segment_ids) != 2:
            raise ValueError(
                f"segment_ids={segment_ids!r} must be a (q_segment_ids, kv_segment_ids) pair"
            )
        q_ids, kv_ids = segment_ids
        expected = ((batch, q_len), (batch, key.shape[1]))
        for name, ids, shape in zip(("q", "kv"), (q_ids, kv_ids), expected, strict=True):
            if ids.shape != shape:
                raise ValueError(f"{name}_segment_ids.shape={ids.shape} must be {shape}")
            if not jnp.issubdtype(ids.dtype, jnp.integer):
                raise ValueError(f"{name}_segment_ids.dtype={ids.dtype} must be an integer type")


def _element_mask(
    q_len: int, kv_len: int, *, causal: bool, segment_ids: tuple[Array, Array] | None
) -> Array | None:
    """The [batch or 1, 1, q_len, kv_len] boolean mask (True = attend) of causal + segments."""
    mask = None
    if causal:
        # Query i sees keys 0..i (top-left aligned), as in jax.nn.dot_product_attention.
        mask = (jnp.arange(q_len)[:, None] >= jnp.arange(kv_len)[None, :])[None, None]
    if segment_ids is not None:
        q_ids, kv_ids = segment_ids
        same = (q_ids[:, :, None] == kv_ids[:, None, :])[:, None]
        mask = same if mask is None else mask & same
    return mask


def _xla_or_cudnn_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    causal: bool,
    segment_ids: tuple[Array, Array] | None,
    sm_scale: float | None,
    implementation: str,
) -> Array:
    if segment_ids is None:
        # No row can be fully masked, so the library's own causal mask is exact.
        return jax.nn.dot_product_attention(
            query, key, value, scale=sm_scale, is_causal=causal, implementation=implementation
        )
    mask = _element_mask(query.shape[1], key.shape[1], causal=causal, segment_ids=segment_ids)
    # cuDNN takes its mask as a full [batch, 1, q_len, kv_len] bias.
    mask = jnp.broadcast_to(mask, (query.shape[0], 1, query.shape[1], key.shape[1]))
    out = jax.nn.dot_product_attention(
        query, key, value, mask=mask, scale=sm_scale, implementation=implementation
    )
    # A query that sees no key gets zeros (as the Pallas kernel gives), not a uniform average.
    row_has_key = jnp.any(mask, axis=-1)  # [batch, 1, q_len]
    return jnp.where(jnp.swapaxes(row_has_key, 1, 2)[..., None], out, jnp.zeros((), out.dtype))


def dot_product_attention(
    query: Array,
    key: Array,
    value: Array,
    *,
    causal: bool = False,
    segment_ids: tuple[Array, Array] | None = None,
    sm_scale: float | None = None,
    implementation: str = "auto",
    block_sizes: Any = None,
    interpret: bool | None = None,
) -> Array:
    """Exact softmax attention with a choice of kernel; all give the same numbers.

    Args:
      query: ``[batch, q_len, heads, head_dim]``.
      key: ``[batch, kv_len, kv_heads, head_dim]``; ``kv_heads`` divides ``heads`` (GQA/MQA).
      value: same shape as ``key``.
      causal: query ``i`` attends to keys ``0..i``.
      segment_ids: optional ``(q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])``
        int arrays; a query attends only to keys of its own segment. A query that attends to no
        key at all gets zeros.
      sm_scale: logit scale, default ``1/sqrt(head_dim)``.
      implementation: ``'pallas'`` (FlashAttention kernel, interpret mode on CPU), ``'xla'``,
        ``'cudnn'`` (``jax.nn.dot_product_attention``) or ``'auto'`` (Pallas on GPU, else XLA).
      block_sizes: Pallas tile sizes (a ``pallas_kernels.flash_attention.BlockSizes``); Pallas only.
      interpret: Pallas interpret mode (default: on CPU only); Pallas only.

    Returns:
      ``[batch, q_len, heads, head_dim]`` in the dtype of ``query``; softmax runs in float32.

    Raises:
      ValueError: on inconsistent shapes or dtypes, an unknown implementation, or an argument the
        chosen implementation cannot honour (cuDNN without a GPU or in float32, block sizes or
        interpret mode for a non-Pallas kernel).
    """
    implementation = resolve_implementation(implementation)
    if segment_ids is not None:
        segment_ids = tuple(segment_ids)
    _check_inputs(query, key, value, segment_ids)
    if implementation == "pallas":
        # Imported here so that efflax.nn imports even where Pallas cannot be (an old jaxlib).
        from pallas_kernels.flash_attention import flash_attention

        return flash_attention(
            query,
            key,
            value,
            causal=causal,
            segment_ids=segment_ids,
            sm_scale=sm_scale,
            block_sizes=block_sizes,
            interpret=interpret,
        )
    if block_sizes is not None:
        raise ValueError(f"block_sizes={block_sizes!r} is only for implementation='pallas'")
    if interpret is not None:
        raise ValueError(f"interpret={interpret!r} is only for implementation='pallas'")
    if implementation == "cudnn" and jnp.dtype(query.dtype) not in _CUDNN_DTYPES:
        raise ValueError(f"implementation='cudnn' needs bfloat16 or float16, got {query.dtype}")
    return _xla_or_cudnn_attention(
        query,
        key,
        value,
        causal=causal,
        segment_ids=segment_ids,
        sm_scale=sm_scale,
        implementation=implementation,
    )


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
    if segment_ids is not None and not isinstance(segment_ids, tuple | list):
        segment_ids = (segment_ids, segment_ids)
    if padding_mask is None:
        return None if segment_ids is None else tuple(segment_ids)
    if padding_mask.ndim != 2 or padding_mask.dtype != jnp.bool_:
        raise ValueError(
            f"padding_mask (shape {padding_mask.shape}, dtype {padding_mask.dtype}) must be "
            "a [batch, kv_len] bool array"
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
      positions: ``[batch, seq]`` or ``[seq]`` integer positions.
      base: wavelength base.

    Returns:
      The rotated ``x``, same shape and dtype (computed in float32).
    """
    head_dim = x.shape[-1]
    if head_dim % 2:
        raise ValueError(f"head_dim={head_dim} must be even for rotary embeddings")
    if base <= 0:
        raise ValueError(f"{base=} must be > 0")
    positions = jnp.broadcast_to(positions, x.shape[:2]).astype(jnp.float32)
    inv_freq = base ** (-jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim)
    angles = positions[:, :, None, None] * inv_freq  # [batch, seq, 1, head_dim/2]
    sin, cos = jnp.sin(angles), jnp.cos(angles)
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return rotated.astype(x.dtype)


class MultiHeadAttention(nn.Module):
    """Multi-head (GQA/MQA) attention with rotary embeddings and a pluggable kernel.

    Attributes:
      num_heads: query heads.
      head_dim: features per head; default ``in_features // num_heads``.
      num_kv_heads: key/value heads (divides ``num_heads``); default ``num_heads``.
      out_features: output features; default the query input's features.
      causal: causal (autoregressive) masking.
      rope: rotate queries and keys with rotary position embeddings.
      rope_base: the rotary wavelength base.
      implementation: ``'pallas'``, ``'xla'``, ``'cudnn'`` or ``'auto'`` (Pallas on GPU).
      sm_scale: logit scale, default ``1/sqrt(head_dim)``.
      block_sizes: Pallas tile sizes (Pallas only).
      interpret: Pallas interpret mode, default on CPU only (Pallas only).
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
    implementation: str = "auto"
    sm_scale: float | None = None
    block_sizes: Any = None
    interpret: bool | None = None
    use_bias: bool = False
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Initializer = nn.initializers.lecun_normal()
    bias_init: Initializer = nn.initializers.zeros_init()

    def _check_config(self, in_features: int) -> tuple[int, int]:
        if self.num_heads < 1:
            raise ValueError(f"num_heads={self.num_heads} must be >= 1")
        num_kv_heads = self.num_heads if self.num_kv_heads is None else self.num_kv_heads
        if num_kv_heads < 1 or self.num_heads % num_kv_heads:
            raise ValueError(
                f"num_kv_heads={self.num_kv_heads} must be >= 1 and divide "
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
        if head_dim < 1:
            raise ValueError(f"head_dim={head_dim} must be >= 1")
        if self.rope and head_dim % 2:
            raise ValueError(f"head_dim={head_dim} must be even when rope=True")
        if self.rope and self.rope_base <= 0:
            raise ValueError(f"rope_base={self.rope_base} must be > 0")
        if self.implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"implementation={self.implementation!r} must be one of {IMPLEMENTATIONS}"
            )
        return num_kv_heads, head_dim

    @nn.compact
    def __call__(
        self,
        inputs_q: Array,
        inputs_kv: Array | None = None,
        *,
        padding_mask: Array | None = None,
        segment_ids: Array | tuple[Array, Array] | None = None,
        positions: Array | None = None,
        kv_positions: Array | None = None,
    ) -> Array:
        """Attends from ``inputs_q`` to ``inputs_kv`` (default: self-attention).

        Args:
          inputs_q: ``[batch, q_len, features]``.
          inputs_kv: ``[batch, kv_len, kv_features]``; default ``inputs_q``.
          padding_mask: ``[batch, kv_len]`` bool, True for real tokens; padded keys are ignored.
          segment_ids: packed sequences: ``[batch, seq]`` int (self-attention) or a
            ``(q_ids [batch, q_len], kv_ids [batch, kv_len])`` pair.
          positions: ``[batch, q_len]`` (or ``[q_len]``) rotary positions of the queries;
            default ``0..q_len-1``. Restart them per segment for packed sequences.
          kv_positions: rotary positions of the keys; default ``positions`` for
            self-attention, ``0..kv_len-1`` otherwise.

        Returns:
          ``[batch, q_len, out_features]``.
        """
        self_attention = inputs_kv is None
        inputs_kv = inputs_q if self_attention else inputs_kv
        if inputs_q.ndim != 3 or inputs_kv.ndim != 3:
            raise ValueError(
                f"inputs_q.shape={inputs_q.shape} and inputs_kv.shape={inputs_kv.shape} must be "
                "[batch, seq, features]"
            )
        num_kv_heads, head_dim = self._check_config(inputs_q.shape[-1])
        batch, q_len = inputs_q.shape[:2]
        kv_len = inputs_kv.shape[1]
        if padding_mask is not None and padding_mask.shape != (batch, kv_len):
            raise ValueError(f"padding_mask.shape={padding_mask.shape} must be {(batch, kv_len)}")
        if segment_ids is not None and not isinstance(segment_ids, tuple | list):
            if not self_attention:
                raise ValueError("cross-attention needs segment_ids as a (q_ids, kv_ids) pair")
            if segment_ids.shape != (batch, q_len):
                raise ValueError(f"segment_ids.shape={segment_ids.shape} must be {(batch, q_len)}")

        def projection(num: int, name: str, axes: tuple[str, ...]) -> nn.DenseGeneral:
            return nn.DenseGeneral(
                features=(num, head_dim),
                axis=-1,
                use_bias=self.use_bias,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(self.kernel_init, axes),
                bias_init=nn.with_logical_partitioning(self.bias_init, axes[1:]),
                name=name,
            )

        query = projection(self.num_heads, "query", QKV_KERNEL_AXES)(inputs_q)
        key = projection(num_kv_heads, "key", KV_KERNEL_AXES)(inputs_kv)
        value = projection(num_kv_heads, "value", KV_KERNEL_AXES)(inputs_kv)

        if self.rope:
            if positions is None:
                positions = jnp.arange(q_len)
            if kv_positions is None:
                kv_positions = positions if self_attention else jnp.arange(kv_len)
            rotate = functools.partial(apply_rotary_embedding, base=self.rope_base)
            query, key = rotate(query, positions), rotate(key, kv_positions)
        elif positions is not None or kv_positions is not None:
            raise ValueError("positions/kv_positions are only used with rope=True")

        segment_ids = segment_ids_with_padding(padding_mask, q_len, segment_ids)
        encoded = dot_product_attention(
            query,
            key,
            value,
            causal=self.causal,
            segment_ids=segment_ids,
            sm_scale=self.sm_scale,
            implementation=self.implementation,
            block_sizes=self.block_sizes,
            interpret=self.interpret,
        )
        out_features = inputs_q.shape[-1] if self.out_features is None else self.out_features
        return nn.DenseGeneral(
            features=out_features,
            axis=(-2, -1),
            use_bias=self.use_bias,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=nn.with_logical_partitioning(self.kernel_init, OUT_KERNEL_AXES),
            bias_init=nn.with_logical_partitioning(self.bias_init, ("embed",)),
            name="out",
        )(encoded)
