"""The Monarch oracle: two plain einsums with float32 accumulation, and dense <-> Monarch.

No custom VJP: JAX differentiates it in every mode (reverse, ``jax.jvp``, Hessians), which makes
it the reference every other implementation is tested against. ``monarch_to_dense`` and
``dense_to_monarch`` (the closed-form projection of the paper, Dao et al., arXiv 2204.00595)
live here too.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import _checks
from pallas_kernels._compat import widen_for_cpu_dot
from pallas_kernels.monarch.base import MonarchCall
from pallas_kernels.monarch.base import MonarchImplementation
from pallas_kernels.monarch.base import check_arguments

__all__ = [
    "ReferenceMonarch",
    "dense_to_monarch",
    "monarch_matmul_reference",
    "monarch_to_dense",
]


def precision_for(dtype) -> lax.Precision | None:
    """Full float32 products (no TF32) for float32, so results match to ~1e-6."""
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def einsum32(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """An einsum of ``a`` and ``b`` accumulated (and returned) in float32."""
    precision = precision_for(a.dtype)
    a, b = widen_for_cpu_dot(a, b)
    return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=precision)


def einsum(spec: str, a: jax.Array, b: jax.Array) -> jax.Array:
    """An einsum with float32 accumulation, cast back to the first operand's dtype."""
    return einsum32(spec, a, b).astype(a.dtype)


def intermediate(x2d: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
    """``z [rows, l, r]``: the first block-diagonal product, then the transpose permutation."""
    k, q, p = w1.shape
    l, _, r = w2.shape
    h = einsum("bjp,jqp->bjq", x2d.reshape(-1, k, p), w1)
    return h.transpose(0, 2, 1).reshape(-1, l, r)


def two_einsums(x2d: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
    """``[rows, k*p] -> [rows, l*s]``: the Monarch product of rows, as written in the paper."""
    l, s, _ = w2.shape
    return einsum("blr,lsr->bls", intermediate(x2d, w1, w2), w2).reshape(-1, l * s)


@dataclasses.dataclass(frozen=True)
class ReferenceMonarch(MonarchImplementation):
    """Two einsums (the oracle); runs everywhere, differentiable in every mode."""

    name = "reference"

    def __call__(self, call: MonarchCall) -> jax.Array:
        return two_einsums(call.x2d, call.w1, call.w2)


def monarch_matmul_reference(x: jax.Array, w1: jax.Array, w2: jax.Array) -> jax.Array:
    """Monarch product as two einsums with float32 accumulation: the test oracle.

    Args:
      x: ``[..., k*p]``.
      w1: ``[k, q, p]``, first block-diagonal factor.
      w2: ``[l, s, r]`` with ``l*r == k*q``, second block-diagonal factor.

    Returns:
      ``[..., l*s]`` in the promoted dtype of the inputs.
    """
    call, batch = check_arguments(x, w1, w2)
    return ReferenceMonarch()(call).reshape(*batch, -1)


@jax.jit
def monarch_to_dense(w1: jax.Array, w2: jax.Array) -> jax.Array:
    """The dense matrix of a Monarch product, ``[k*p, l*s]`` with ``x @ matrix == monarch(x)``.

    Dense matrices follow the ``x @ kernel`` convention of ``flax.linen.Dense``.
    """
    if w1.ndim != 3:
        raise ValueError(f"w1 must be [k, q, p]; got w1.shape={tuple(w1.shape)}")
    k, _, p = w1.shape
    eye = jnp.eye(k * p, dtype=jnp.result_type(w1, w2))
    return monarch_matmul_reference(eye, w1, w2)


def _channel_maps(k: int, q: int, l: int, r: int) -> dict[str, np.ndarray]:
    """For every w1 row and w2 column: its (output block, input block, rank slot)."""
    # w1 row (j, i) and w2 column (a, c) are the same intermediate channel m = i*k + j = a*r + c.
    # Channel m links input block j = m % k to output block a = m // r; the channels of one
    # (a, j) pair are numbered v = c // k, the rank slot they take in that block.
    m1 = np.arange(q)[None, :] * k + np.arange(k)[:, None]  # [k, q]
    m2 = np.arange(l)[:, None] * r + np.arange(r)[None, :]  # [l, r]
    return {
        "w1_a": m1 // r,
        "w1_v": (m1 % r) // k,
        "w2_j": m2 % k,
        "w2_v": (m2 % r) // k,
    }


@functools.partial(jax.jit, static_argnames="nblocks")
def dense_to_monarch(matrix: jax.Array, nblocks: int) -> tuple[jax.Array, jax.Array]:
    """Closed-form projection of a dense ``[in, out]`` matrix onto Monarch factors.

    The factors have the shapes ``MonarchDense`` uses: ``w1 [nblocks, q, in/nblocks]`` and
    ``w2 [nblocks, out/nblocks, q]`` with ``q = min(in, out) / nblocks``. Each (output block,
    input block) sub-matrix is fed by its own disjoint set of intermediate channels, so the
    Frobenius-optimal projection takes, per block, the best low-rank approximation (rank
    ``q / nblocks``; 1 when nblocks = sqrt(n)) from a truncated SVD. A Monarch matrix projects
    onto itself.

    Args:
      matrix: ``[in_features, out_features]`` (``x @ matrix`` convention).
      nblocks: number of blocks; must divide both sizes.

    Returns:
      ``(w1, w2)`` in float32 (or the matrix's wider float dtype).
    """
    _checks.array("matrix", matrix, ndim=2, kind="real", layout="[in, out]")
    n_in, n_out = matrix.shape
    _checks.int_at_least("nblocks", nblocks)
    if n_in % nblocks or n_out % nblocks:
        raise ValueError(f"{nblocks=} must divide both sizes of matrix.shape={(n_in, n_out)}")
    k = l = nblocks
    p, s = n_in // nblocks, n_out // nblocks
    q = r = min(p, s)
    dtype = jnp.promote_types(matrix.dtype, jnp.float32)
    # blocks[a, j] = M[a-th output rows, j-th input columns], M = matrix.T
    blocks = matrix.astype(dtype).reshape(k, p, l, s).transpose(2, 0, 3, 1)
    u, sv, vh = jnp.linalg.svd(blocks, full_matrices=False)  # [l,k,s,R], [l,k,R], [l,k,R,p]
    rank = sv.shape[-1]
    root = jnp.sqrt(sv)
    maps = _channel_maps(k, q, l, r)
    # Channels beyond the block's rank (only when a block gets more channels than min(s, p))
    # carry zeros.
    v1 = np.minimum(maps["w1_v"], rank - 1)
    keep1 = jnp.asarray(maps["w1_v"] < rank, dtype)
    j_idx = np.arange(k)[:, None]
    w1 = vh[maps["w1_a"], j_idx, v1, :] * (root[maps["w1_a"], j_idx, v1] * keep1)[..., None]
    v2 = np.minimum(maps["w2_v"], rank - 1)
    keep2 = jnp.asarray(maps["w2_v"] < rank, dtype)
    a_idx = np.arange(l)[:, None]
    w2 = u[a_idx, maps["w2_j"], :, v2] * (root[a_idx, maps["w2_j"], v2] * keep2)[..., None]
    return w1, w2.transpose(0, 2, 1)  # [l, r, s] -> [l, s, r]
