"""The Monarch matmul op: one signature, one set of argument checks, the registry.

Dao, Chen, Sohoni, Desai, Poli, Grogan, Liu, Rao, Rudra, Re: "Monarch: Expressive Structured
Matrices for Efficient and Accurate Training", arXiv 2204.00595 (ICML 2022).

A Monarch matrix is a block-diagonal matrix, a fixed transpose permutation and a second
block-diagonal matrix; multiplying by it costs O(n^1.5) instead of O(n^2) when nblocks = sqrt(n).

Conventions (the general rectangular form of the reference code, see shared/PAPERS.md):
``x [..., k*p]``, ``w1 [k, q, p]`` (k blocks mapping p -> q), the intermediate ``[.., k, q]`` is
transposed to ``[.., q, k]``, flattened and regrouped into l blocks of r (``l*r == k*q``),
``w2 [l, s, r]``, output ``[..., l*s]``. Every shape with ``l*r == k*q`` is accepted.

Implementations (``implementation=``): ``'reference'`` (plain einsums, the oracle),
``'xla'`` (the fast XLA path, row-chunked on CPU), ``'pallas_triton'`` (alias ``'pallas'``: the
fused Pallas kernel, which needs ``r % k == 0``) or a configured instance of one of them;
``'auto'`` tries ``pallas_triton`` then ``xla`` on a GPU, ``xla`` elsewhere.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.op import Implementation
from pallas_kernels.op import Op

__all__ = ["MONARCH_OP", "check_shapes", "monarch_matmul"]

MONARCH_OP = Op(
    "monarch_matmul",
    auto_order={"gpu": ("pallas_triton", "xla"), "*": ("xla",)},
    aliases={"pallas": "pallas_triton"},
)


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


def monarch_matmul(
    x: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    *,
    implementation: str | Implementation = "auto",
) -> jax.Array:
    """Monarch product ``x -> blockdiag(w2) P blockdiag(w1) x``.

    Args:
      x: ``[..., k*p]``, any number of leading dims (including none).
      w1: ``[k, q, p]``, first block-diagonal factor.
      w2: ``[l, s, r]`` with ``l*r == k*q``, second block-diagonal factor.
      implementation: ``'auto'``, ``'reference'``, ``'xla'``, ``'pallas_triton'`` (or
        ``'pallas'``), or a configured instance (``PallasTritonMonarch(block_sizes=...,
        interpret=True)``, ``XlaMonarch(row_chunk=None)``). An explicitly named implementation
        that cannot run the call raises ``ValueError`` saying why; ``'auto'`` falls through.

    Returns:
      ``[..., l*s]`` in the promoted dtype of the inputs (float32 accumulation); every
      implementation gives the same numbers up to rounding and is differentiable.

    Example:
      >>> w1, w2 = jnp.ones((8, 6, 5)), jnp.ones((12, 3, 4))
      >>> monarch_matmul(jnp.ones((2, 40)), w1, w2).shape
      (2, 36)
    """
    _, _, p, l, s, _ = check_shapes(x, w1, w2)
    dtype = jnp.result_type(x, w1, w2)
    batch = x.shape[:-1]
    x2d = x.astype(dtype).reshape(math.prod(batch), x.shape[-1])
    y = MONARCH_OP.dispatch(implementation, x2d, w1.astype(dtype), w2.astype(dtype))
    return y.reshape(*batch, l * s)
