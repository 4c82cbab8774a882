"""Mixed-chunk attention (FLASH): the one set of checks, building one ``MixedChunkCall``.

Weiguo Hua, Zihang Dai, Hanxiao Liu, Quoc V. Le, "Transformer Quality in Linear Time",
ICML 2022, arXiv:2202.10447. The sequence is cut into chunks of ``chunk_size`` tokens: inside a
chunk, tokens attend quadratically with ``relu^2`` weights; across chunks, a linear-attention
term carries ``sum_j k_lin_j^T v_j`` (over earlier chunks when causal, over all chunks otherwise).

Written as one ``[T, T]`` weight matrix (what :func:`mixed_chunk_attention_reference` builds),
with ``c(i) = i // chunk_size``, ``m_j`` the key mask and ``[.]`` an indicator:

    W_ij = m_j [c(i) = c(j)] [j <= i or not causal] relu(quad_scale q_i.k_j + bias[i % C, j % C])^2
         + m_j [c(j) < c(i) or not causal] lin_scale ql_i.kl_j
    out_i = sum_j W_ij v_j

so the non-causal linear term includes the query's own chunk (the paper's ``sum_{h=1..G}``).
Without ``lin_q``/``lin_k`` only the quadratic term is computed: with ``chunk_size >= T`` that is
the Gated Attention Unit's full ``relu^2`` attention. A length that is not a multiple of
``chunk_size`` leaves a shorter last chunk; implementations pad it, and padded keys carry no
weight.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import _checks
from pallas_kernels.op import Implementation

__all__ = [
    "MixedChunkCall",
    "MixedChunkImplementation",
    "check_arguments",
    "mask_values",
]

SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


@dataclasses.dataclass(frozen=True)
class MixedChunkCall:
    """One checked call of mixed-chunk attention: what every implementation receives.

    Attributes:
      quad_q, quad_k: ``[batch, seq, s]``.
      value: ``[batch, seq, e]``.
      lin_q, lin_k: ``[batch, seq, s_lin]``, or both None (no linear term).
      bias: ``[chunk_size, chunk_size]`` float, or None.
      key_mask: ``[batch, seq]`` bool (True = real token), or None. Where it is False, the
        inputs above already hold zeros (whatever the caller passed there).
      chunk_size: tokens per chunk, ``<= seq`` (a longer one is cut to ``seq``).
      causal: the causal variant.
      quad_scale, lin_scale: finite floats, or traced float32 scalars.
    """

    quad_q: jax.Array
    quad_k: jax.Array
    value: jax.Array
    lin_q: jax.Array | None
    lin_k: jax.Array | None
    bias: jax.Array | None
    key_mask: jax.Array | None
    chunk_size: int
    causal: bool
    quad_scale: float
    lin_scale: float

    @property
    def inputs(self) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array | None, jax.Array | None]:
        """``(quad_q, quad_k, value, lin_q, lin_k)``."""
        return self.quad_q, self.quad_k, self.value, self.lin_q, self.lin_k


@dataclasses.dataclass(frozen=True)
class MixedChunkImplementation(Implementation):
    """An implementation of mixed-chunk attention: ``__call__(call: MixedChunkCall) ->
    [batch, seq, e]`` in the inputs' dtype."""

    def __call__(self, call: MixedChunkCall) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError


def check_arguments(
    quad_q: Any,
    quad_k: Any,
    value: Any,
    lin_q: Any,
    lin_k: Any,
    *,
    chunk_size: Any,
    causal: Any,
    quad_scale: Any,
    lin_scale: Any,
    bias: Any,
    key_mask: Any,
) -> MixedChunkCall:
    """Validates a call; returns the call value every implementation takes.

    A ``chunk_size`` longer than the sequence is cut to the sequence length (one chunk; a
    ``bias`` is cut to match), which changes nothing in the result.
    """
    arrays = {"quad_q": quad_q, "quad_k": quad_k, "value": value}
    if (lin_q is None) != (lin_k is None):
        raise ValueError(
            f"lin_q and lin_k must both be given or both be None, got lin_q "
            f"{'None' if lin_q is None else 'an array'} and lin_k "
            f"{'None' if lin_k is None else 'an array'}"
        )
    if lin_q is not None:
        arrays.update(lin_q=lin_q, lin_k=lin_k)
    for name, x in arrays.items():
        if getattr(x, "ndim", None) != 3:
            raise ValueError(
                f"{name}.shape={getattr(x, 'shape', None)} must be [batch, seq, features]"
            )
        if jnp.dtype(x.dtype) not in SUPPORTED_DTYPES:
            raise ValueError(f"{name}.dtype={x.dtype} must be float32, bfloat16 or float16")
    dtypes = {name: jnp.dtype(x.dtype) for name, x in arrays.items()}
    if len(set(dtypes.values())) != 1:
        raise ValueError(f"dtypes must match, got {dtypes}")
    batch, seq_len, _ = value.shape
    for name, x in arrays.items():
        if x.shape[:2] != (batch, seq_len):
            raise ValueError(
                f"{name}.shape={x.shape} and value.shape={value.shape} must agree in [batch, seq]"
            )
    if batch == 0 or seq_len == 0 or value.shape[2] == 0 or quad_q.shape[2] == 0:
        raise ValueError(f"empty dimension in quad_q.shape={quad_q.shape}, {value.shape=}")
    if quad_k.shape != quad_q.shape:
        raise ValueError(f"quad_k.shape={quad_k.shape} must equal quad_q.shape={quad_q.shape}")
    if lin_q is not None and lin_k.shape != lin_q.shape:
        raise ValueError(f"lin_k.shape={lin_k.shape} must equal lin_q.shape={lin_q.shape}")
    if lin_q is not None and lin_q.shape[2] == 0:
        raise ValueError(f"empty dimension in lin_q.shape={lin_q.shape}")

    chunk_size = _checks.int_at_least("chunk_size", chunk_size, 1)
    if not isinstance(causal, bool):
        raise ValueError(f"causal={causal!r} must be a bool")
    quad_scale = _scale("quad_scale", quad_scale)
    lin_scale = _scale("lin_scale", lin_scale)

    if bias is not None:
        if getattr(bias, "shape", None) != (chunk_size, chunk_size):
            raise ValueError(
                f"bias.shape={getattr(bias, 'shape', None)} must be [chunk_size, chunk_size] = "
                f"{(chunk_size, chunk_size)}"
            )
        if not jnp.issubdtype(bias.dtype, jnp.floating):
            raise ValueError(f"bias.dtype={bias.dtype} must be a float type")
    if key_mask is not None:
        if getattr(key_mask, "shape", None) != (batch, seq_len):
            raise ValueError(
                f"key_mask.shape={getattr(key_mask, 'shape', None)} must be [batch, seq] = "
                f"{(batch, seq_len)}"
            )
        if key_mask.dtype != jnp.bool_:
            raise ValueError(f"key_mask.dtype={key_mask.dtype} must be bool (True = real token)")

    if chunk_size > seq_len:
        chunk_size = seq_len
        if bias is not None:
            bias = bias[:seq_len, :seq_len]
    if key_mask is not None:
        # Masked positions are padding: whatever they hold (NaN and inf included) must reach
        # no real output or gradient. Selected away here, once, for every implementation:
        # `where` (never a multiplication by the mask, 0 * NaN = NaN), so no gradient reaches
        # them either.
        quad_q, quad_k, value, lin_q, lin_k = (
            None if x is None else jnp.where(key_mask[..., None], x, jnp.zeros((), x.dtype))
            for x in (quad_q, quad_k, value, lin_q, lin_k)
        )
    return MixedChunkCall(
        quad_q=quad_q,
        quad_k=quad_k,
        value=value,
        lin_q=lin_q,
        lin_k=lin_k,
        bias=bias,
        key_mask=key_mask,
        chunk_size=chunk_size,
        causal=causal,
        quad_scale=quad_scale,
        lin_scale=lin_scale,
    )


def _scale(name: str, value: Any) -> Any:
    """A finite float, or a traced float32 scalar (the XLA path and the reference take one;
    the Pallas kernel needs the number at trace time and refuses the call)."""
    if _checks.concrete(value) is None:
        return _checks.traced_scalar(name, value)
    return _checks.finite_float(name, value)


def mask_values(value: jax.Array, key_mask: jax.Array | None) -> jax.Array:
    """``value`` with the rows of masked keys zeroed.

    Every weight ``W_ij`` multiplies ``v_j``, so a zero row removes key ``j`` from both terms
    exactly, and its gradient (``dv_j`` times the mask) is zero as well.
    """
    if key_mask is None:
        return value
    return jnp.where(key_mask[..., None], value, jnp.zeros((), value.dtype))
