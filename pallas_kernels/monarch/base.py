"""The Monarch matmul op's call value: one set of argument checks building one ``MonarchCall``.

Dao, Chen, Sohoni, Desai, Poli, Grogan, Liu, Rao, Rudra, Re: "Monarch: Expressive Structured
Matrices for Efficient and Accurate Training", arXiv 2204.00595 (ICML 2022).

A Monarch matrix is a block-diagonal matrix, a fixed transpose permutation and a second
block-diagonal matrix; multiplying by it costs O(n^1.5) instead of O(n^2) when nblocks = sqrt(n).

Conventions (the general rectangular form of the reference code, see shared/PAPERS.md):
``x [..., k*p]``, ``w1 [k, q, p]`` (k blocks mapping p -> q), the intermediate ``[.., k, q]`` is
transposed to ``[.., q, k]``, flattened and regrouped into l blocks of r (``l*r == k*q``),
``w2 [l, s, r]``, output ``[..., l*s]``. Every shape with ``l*r == k*q`` is accepted.

The table of implementations and the public ``monarch_matmul`` are in ``api.py``.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from pallas_kernels.op import Implementation

__all__ = ["MonarchCall", "MonarchImplementation", "check_arguments", "check_shapes"]


@dataclasses.dataclass(frozen=True)
class MonarchCall:
    """One checked Monarch product: what every implementation receives.

    Attributes:
      x2d: ``[rows, k*p]``, the input's leading dims flattened, in the promoted dtype.
      w1: ``[k, q, p]``, same dtype.
      w2: ``[l, s, r]`` with ``l*r == k*q``, same dtype.
    """

    x2d: jax.Array
    w1: jax.Array
    w2: jax.Array


@dataclasses.dataclass(frozen=True)
class MonarchImplementation(Implementation):
    """An implementation of the Monarch op: ``__call__(call: MonarchCall) -> [rows, l*s]``."""

    def __call__(self, call: MonarchCall) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError


def check_shapes(x: jax.Array, w1: jax.Array, w2: jax.Array) -> tuple[int, ...]:
    """Checks a Monarch call and returns ``(k, q, p, l, s, r)``; raises ``ValueError`` naming
    the offending argument otherwise."""
    if getattr(w1, "ndim", None) != 3:
        raise ValueError(f"w1 must be [k, q, p]; got w1.shape={tuple(jnp.shape(w1))}")
    if getattr(w2, "ndim", None) != 3:
        raise ValueError(f"w2 must be [l, s, r]; got w2.shape={tuple(jnp.shape(w2))}")
    k, q, p = w1.shape
    l, s, r = w2.shape
    if min(k, q, p, l, s, r) < 1:
        raise ValueError(f"empty factor: w1.shape={tuple(w1.shape)}, w2.shape={tuple(w2.shape)}")
    if l * r != k * q:
        raise ValueError(
            f"w2.shape={tuple(w2.shape)} and w1.shape={tuple(w1.shape)} do not chain: "
            f"l*r={l * r} != k*q={k * q}"
        )
    if getattr(x, "ndim", 0) < 1 or x.shape[-1] != k * p:
        raise ValueError(
            f"x.shape={tuple(jnp.shape(x))}: last dim must be k*p={k * p} for "
            f"w1.shape={tuple(w1.shape)}"
        )
    for name, arr in (("x", x), ("w1", w1), ("w2", w2)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"{name}.dtype={arr.dtype} must be floating")
    return k, q, p, l, s, r


def check_arguments(
    x: jax.Array, w1: jax.Array, w2: jax.Array
) -> tuple[MonarchCall, tuple[int, ...]]:
    """The one set of checks: the call value (inputs promoted to one dtype, rows flattened)
    and the leading dims of ``x`` to restore."""
    check_shapes(x, w1, w2)
    dtype = jnp.result_type(x, w1, w2)
    batch = tuple(x.shape[:-1])
    x2d = x.astype(dtype).reshape(math.prod(batch), x.shape[-1])
    return MonarchCall(x2d, w1.astype(dtype), w2.astype(dtype)), batch
