"""Monarch matrix products as a fused Pallas kernel.

Dao, Chen, Sohoni, Desai, Poli, Grogan, Liu, Rao, Rudra, Re: "Monarch: Expressive Structured
Matrices for Efficient and Accurate Training", arXiv 2204.00595 (ICML 2022).

A Monarch matrix is a block-diagonal matrix, a fixed transpose permutation and a second
block-diagonal matrix; multiplying by it costs O(n^1.5) instead of O(n^2) when nblocks = sqrt(n).

Conventions (the general rectangular form of the reference code, see shared/PAPERS.md):
``x [..., k*p]``, ``w1 [k, q, p]`` (k blocks mapping p -> q), the intermediate ``[.., k, q]`` is
transposed to ``[.., q, k]``, flattened and regrouped into l blocks of r (``l*r == k*q``),
``w2 [l, s, r]``, output ``[..., l*s]``. Dense matrices follow the ``x @ kernel`` convention
of ``flax.linen.Dense``: ``kernel [in_features, out_features]``.

How the kernel folds the permutation into its indexing (needs ``r % k == 0``, t = r // k):
output block ``a`` receives from input block ``j`` exactly the t intermediate channels
``w1[j, a*t:(a+1)*t]``, so ``y_a = sum_j (x_j @ F[a, j]) @ G[a, j]`` with
``F[a, j] = w1[j, a*t:(a+1)*t].T`` (``[p, t]``) and ``G[a, j][v] = w2[a, :, v*k + j]``
(``[t, s]``). One program owns a tile of batch rows and one output block; the ``[rows, t]``
intermediate lives in registers and never goes to device memory. The input gradient is the same
kernel with the factors transposed; the factor gradients are per-(a, j) outer products reduced
over rows (a second kernel, partial sums over row splits added outside).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._compat import compiler_params_kwargs
from pallas_kernels._compat import resolve_interpret

# Triton's dot needs every dimension >= 16; smaller tiles use a multiply-and-reduce instead.
_MIN_DOT_DIM = 16


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the Monarch kernels.

    Attributes:
      block_rows: batch rows per program (rows are zero-padded up to a multiple).
      block_in: chunk of an input block's width reduced per step inside a program (None: whole
        block). Must divide the block width.
      block_rank: chunk of the t intermediate channels linking one (output, input) block pair
        (None: all t). Each chunk is computed once and consumed at once, so the on-chip
        intermediate is ``[block_rows, block_rank]``. Must divide t.
      block_out: tile of an output block's width per program in the forward and input-gradient
        kernel (None: whole block; tiling recomputes the intermediate once per tile).
      weight_grad_block_out: the same for the factor-gradient kernel, whose float32 accumulator
        is ``[block_rank, weight_grad_block_out]``.
      weight_grad_row_splits: partial sums over rows for the factor gradients (None: enough
        splits for about 256 programs).
      num_warps, num_stages: Triton compiler parameters on GPU (None: Triton's defaults).

    The defaults are untuned guesses for GPUs (no GPU was available when they were set).
    """

    block_rows: int = 32
    block_in: int | None = 64
    block_rank: int | None = 32
    block_out: int | None = None
    weight_grad_block_out: int | None = 256
    weight_grad_row_splits: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None

    def __post_init__(self):
        if self.block_rows < 1:
            raise ValueError(f"{self.block_rows=} must be >= 1")
        for name in (
            "block_in",
            "block_rank",
            "block_out",
            "weight_grad_block_out",
            "weight_grad_row_splits",
            "num_warps",
            "num_stages",
        ):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name}={value} must be >= 1 or None")


def _tile(block: int | None, dim: int, name: str) -> int:
    """The tile for a dimension: the whole dimension if the block is None or larger."""
    if block is None or block >= dim:
        return dim
    if dim % block:
        raise ValueError(f"{name}={block} must divide the size it tiles, {dim}")
    return block


def _check_shapes(x: jax.Array, w1: jax.Array, w2: jax.Array) -> tuple[int, ...]:
    if w1.ndim != 3:
        raise ValueError(f"w1 must be [k, q, p]; got w1.shape={tuple(w1.shape)}")
    if w2.ndim != 3:
        raise ValueError(f"w2 must be [l, s, r]; got w2.shape={tuple(w2.shape)}")
    k, q, p = w1.shape
    l, s, r = w2.shape
    if l * r != k * q:
        raise ValueError(
            f"w2.shape={tuple(w2.shape)} and w1.shape={tuple(w1.shape)} do not chain: "
            f"l*r={l * r} != k*q={k * q}"
        )
    if x.ndim < 1 or x.shape[-1] != k * p:
        raise ValueError(
            f"x.shape={tuple(x.shape)}: last dim must be k*p={k * p} for w1.shape={tuple(w1.shape)}"
        )
    for name, arr in (("x", x), ("w1", w1), ("w2", w2)):
        if not jnp.issubdtype(arr.dtype, jnp.floating):
            raise ValueError(f"{name}.dtype={arr.dtype} must be floating")
    return k, q, p, l, s, r


def _precision(dtype) -> lax.Precision | None:
    # Full float32 products (no TF32) so that float32 results match the reference to ~1e-6.
    return lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _einsum(spec, a, b):
    """An einsum with float32 accumulation, cast back to the operands' dtype."""
    out = jnp.einsum(spec, a, b, preferred_element_type=jnp.float32, precision=_precision(a.dtype))
    return out.astype(a.dtype)


def _intermediate(x2d, w1, w2):
    """``z [rows, l, r]``: first block-diagonal product, then the transpose permutation."""
    k, q, p = w1.shape
    l, _, r = w2.shape
    h = _einsum("bjp,jqp->bjq", x2d.reshape(-1, k, p), w1)
    return h.transpose(0, 2, 1).reshape(-1, l, r)


def _two_einsums(x2d, w1, w2):
    l, s, _ = w2.shape
    return _einsum("blr,lsr->bls", _intermediate(x2d, w1, w2), w2).reshape(-1, l * s)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_two_einsums(x2d, w1, w2, row_chunk: int):
    """Rows in chunks of ``row_chunk`` (a multiple of x2d's rows), each chunk cache-resident."""
    chunks = x2d.reshape(-1, row_chunk, x2d.shape[1])
    y = lax.map(lambda xc: _two_einsums(xc, w1, w2), chunks)
    return y.reshape(x2d.shape[0], -1)


def _chunked_fwd(x2d, w1, w2, row_chunk):
    # Only the inputs are saved: the backward recomputes each chunk's intermediate in cache
    # instead of writing [rows, k*q] to memory and reading it back.
    return _chunked_two_einsums(x2d, w1, w2, row_chunk), (x2d, w1, w2)


def _chunked_bwd(row_chunk, residuals, dy):
    x2d, w1, w2 = residuals
    k, q, p = w1.shape
    l, s, r = w2.shape

    def one_chunk(grads, chunk):
        dw1, dw2 = grads
        xc, dyc = chunk
        z = _intermediate(xc, w1, w2)
        dyc = dyc.reshape(-1, l, s)
        dw2 = dw2 + jnp.einsum("bls,blr->lsr", dyc, z, preferred_element_type=jnp.float32)
        dh = _einsum("bls,lsr->blr", dyc, w2).reshape(-1, q, k).transpose(0, 2, 1)
        dw1 = dw1 + jnp.einsum(
            "bjq,bjp->jqp", dh, xc.reshape(-1, k, p), preferred_element_type=jnp.float32
        )
        dx = _einsum("bjq,jqp->bjp", dh, w1).reshape(-1, k * p)
        return (dw1, dw2), dx

    zeros = (jnp.zeros(w1.shape, jnp.float32), jnp.zeros(w2.shape, jnp.float32))
    chunks = (
        x2d.reshape(-1, row_chunk, k * p),
        dy.astype(x2d.dtype).reshape(-1, row_chunk, l * s),
    )
    (dw1, dw2), dx = lax.scan(one_chunk, zeros, chunks)
    return dx.reshape(x2d.shape), dw1.astype(w1.dtype), dw2.astype(w2.dtype)


_chunked_two_einsums.defvjp(_chunked_fwd, _chunked_bwd)


def monarch_matmul_reference(
    x: jax.Array, w1: jax.Array, w2: jax.Array, *, row_chunk: int | None = None
) -> jax.Array:
    """Monarch product as two einsums with float32 accumulation (test oracle, CPU fast path).

    Args:
      x: ``[..., k*p]``.
      w1: ``[k, q, p]``, first block-diagonal factor.
      w2: ``[l, s, r]`` with ``l*r == k*q``, second block-diagonal factor.
      row_chunk: if set, rows are processed ``row_chunk`` at a time in a loop, forward and
        backward (a custom VJP that recomputes each chunk's intermediate), so the transposes
        between the einsums stay in cache: faster on CPU, not on GPU. This path supports
        reverse-mode differentiation only (no ``jax.jvp``).

    Returns:
      ``[..., l*s]`` in the promoted dtype of the inputs.
    """
    k, q, p, l, s, r = _check_shapes(x, w1, w2)
    if row_chunk is not None and row_chunk < 1:
        raise ValueError(f"{row_chunk=} must be >= 1 or None")
    dtype = jnp.result_type(x, w1, w2)
    x, w1, w2 = x.astype(dtype), w1.astype(dtype), w2.astype(dtype)
    batch = x.shape[:-1]
    rows = math.prod(batch)
    x2d = x.reshape(rows, k * p)
    if row_chunk is None or rows <= row_chunk:
        y = _two_einsums(x2d, w1, w2)
    else:
        padded = pl.cdiv(rows, row_chunk) * row_chunk
        x2d = jnp.pad(x2d, ((0, padded - rows), (0, 0)))
        y = _chunked_two_einsums(x2d, w1, w2, row_chunk)[:rows]
    return y.reshape(*batch, l * s)


@jax.jit
def monarch_to_dense(w1: jax.Array, w2: jax.Array) -> jax.Array:
    """The dense matrix of a Monarch product, ``[k*p, l*s]`` with ``x @ matrix == monarch(x)``."""
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
    if matrix.ndim != 2:
        raise ValueError(f"matrix must be 2-D [in, out]; got matrix.shape={tuple(matrix.shape)}")
    n_in, n_out = matrix.shape
    if nblocks < 1 or n_in % nblocks or n_out % nblocks:
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


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _mm(a, b, *, use_dot: bool, precision):
    """``a [M, K] @ b [K, N]`` accumulated in float32."""
    if use_dot:
        return lax.dot_general(
            a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
    return jnp.sum(a.astype(jnp.float32)[:, :, None] * b.astype(jnp.float32)[None, :, :], axis=1)


def _mm_tn(a, b, *, use_dot: bool, precision):
    """``a.T @ b`` for ``a [K, M]``, ``b [K, N]``, accumulated in float32."""
    if use_dot:
        return lax.dot_general(
            a, b, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
    return jnp.sum(a.astype(jnp.float32)[:, :, None] * b.astype(jnp.float32)[:, None, :], axis=0)


def _gpu_params(block_sizes: BlockSizes, interpret: bool) -> dict:
    # Pointer-based Triton lowering: a program loads only the slices it indexes, so a row tile
    # may span the whole input width.
    return compiler_params_kwargs(
        interpret=interpret, num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
    )


def _chain_kernel(
    x_ref, f_ref, g_ref, o_ref, *, width_in, block_in, block_rank, use_dot, precision
):
    """``o = sum_i (x_i @ F[i]) @ G[i]`` for one row tile and one output (sub-)block.

    x_ref ``[rows, I*width_in]``, f_ref ``[I, width_in, t]``, g_ref ``[I, t, block_out]``,
    o_ref ``[rows, block_out]``. The ``[rows, block_rank]`` intermediate stays on chip.
    """
    rows, block_out = o_ref.shape
    num_in, _, t = f_ref.shape
    compute_dtype = x_ref.dtype

    def over_input_blocks(i, acc):
        def over_rank_chunks(c, acc):
            rank = pl.multiple_of(c * block_rank, block_rank)

            def over_in_chunks(e, h):
                col = pl.multiple_of(i * width_in + e * block_in, block_in)
                row = pl.multiple_of(e * block_in, block_in)
                xs = x_ref[:, pl.ds(col, block_in)]
                fs = f_ref[i, pl.ds(row, block_in), pl.ds(rank, block_rank)]
                return h + _mm(xs, fs, use_dot=use_dot, precision=precision)

            h = lax.fori_loop(
                0, width_in // block_in, over_in_chunks, jnp.zeros((rows, block_rank), jnp.float32)
            )
            gs = g_ref[i, pl.ds(rank, block_rank), :]
            return acc + _mm(h.astype(compute_dtype), gs, use_dot=use_dot, precision=precision)

        return lax.fori_loop(0, t // block_rank, over_rank_chunks, acc)

    acc = lax.fori_loop(0, num_in, over_input_blocks, jnp.zeros((rows, block_out), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def _chain(x2d, f, g, block_sizes: BlockSizes, interpret: bool):
    """``y[:, o-th block] = sum_i (x[:, i-th block] @ f[o, i]) @ g[o, i]`` as one pallas_call."""
    num_out, num_in, width_in, t = f.shape
    width_out = g.shape[-1]
    rows = x2d.shape[0]
    block_rows = block_sizes.block_rows
    padded = pl.cdiv(rows, block_rows) * block_rows
    if padded != rows:
        x2d = jnp.pad(x2d, ((0, padded - rows), (0, 0)))
    block_in = _tile(block_sizes.block_in, width_in, "block_in")
    block_rank = _tile(block_sizes.block_rank, t, "block_rank")
    block_out = _tile(block_sizes.block_out, width_out, "block_out")
    tiles_out = width_out // block_out
    use_dot = min(block_rows, block_in, block_rank, block_out) >= _MIN_DOT_DIM
    kernel = functools.partial(
        _chain_kernel,
        width_in=width_in,
        block_in=block_in,
        block_rank=block_rank,
        use_dot=use_dot,
        precision=_precision(x2d.dtype),
    )
    y = pl.pallas_call(
        kernel,
        grid=(padded // block_rows, num_out, tiles_out),
        in_specs=[
            pl.BlockSpec((block_rows, num_in * width_in), lambda b, o, n: (b, 0)),
            pl.BlockSpec((None, num_in, width_in, t), lambda b, o, n: (o, 0, 0, 0)),
            pl.BlockSpec((None, num_in, t, block_out), lambda b, o, n: (o, 0, 0, n)),
        ],
        out_specs=pl.BlockSpec((block_rows, block_out), lambda b, o, n: (b, o * tiles_out + n)),
        out_shape=jax.ShapeDtypeStruct((padded, num_out * width_out), x2d.dtype),
        interpret=interpret,
        name="monarch_chain",
        **_gpu_params(block_sizes, interpret),
    )(x2d, f, g)
    return y[:rows]


def _outer_kernel(a_ref, m_ref, b_ref, o_ref, *, block_rows, block_in, use_dot, precision):
    """``o = sum_rows (a @ M).T @ b`` over this program's rows: one factor-gradient tile.

    a_ref ``[rows, width_a]``, m_ref ``[width_a, block_rank]``, b_ref ``[rows, block_out]``,
    o_ref ``[block_rank, block_out]`` (float32).
    """
    rows, width_a = a_ref.shape
    block_rank, block_out = o_ref.shape
    compute_dtype = a_ref.dtype

    def over_row_tiles(rb, acc):
        r0 = pl.multiple_of(rb * block_rows, block_rows)

        def over_chunks(c, h):
            col = pl.multiple_of(c * block_in, block_in)
            a_tile = a_ref[pl.ds(r0, block_rows), pl.ds(col, block_in)]
            m_tile = m_ref[pl.ds(col, block_in), :]
            return h + _mm(a_tile, m_tile, use_dot=use_dot, precision=precision)

        h = lax.fori_loop(
            0, width_a // block_in, over_chunks, jnp.zeros((block_rows, block_rank), jnp.float32)
        )
        b_tile = b_ref[pl.ds(r0, block_rows), :]
        return acc + _mm_tn(h.astype(compute_dtype), b_tile, use_dot=use_dot, precision=precision)

    acc = lax.fori_loop(
        0, rows // block_rows, over_row_tiles, jnp.zeros((block_rank, block_out), jnp.float32)
    )
    o_ref[...] = acc


def _outer(a2d, m, b2d, *, a_by_out: bool, block_sizes: BlockSizes, interpret: bool):
    """``out[o, i] = (a_blk @ m[o, i]).T @ b_blk`` summed over rows; float32 ``[O, I, t, wb]``.

    ``a_blk`` is a's o-th block if ``a_by_out`` else its i-th block; ``b_blk`` is the other one.
    """
    num_out, num_in, width_a, t = m.shape
    num_b_blocks = num_in if a_by_out else num_out
    width_b = b2d.shape[1] // num_b_blocks
    rows = a2d.shape[0]
    block_rows = block_sizes.block_rows
    block_in = _tile(block_sizes.block_in, width_a, "block_in")
    block_rank = _tile(block_sizes.block_rank, t, "block_rank")
    block_out = _tile(block_sizes.weight_grad_block_out, width_b, "weight_grad_block_out")
    tiles_rank, tiles_out = t // block_rank, width_b // block_out
    splits = block_sizes.weight_grad_row_splits
    if splits is None:
        programs = num_out * num_in * tiles_rank * tiles_out
        splits = max(1, min(pl.cdiv(256, programs), pl.cdiv(rows, block_rows)))
    chunk = splits * block_rows
    padded = pl.cdiv(rows, chunk) * chunk
    if padded != rows:  # zero rows add nothing to the sums
        a2d = jnp.pad(a2d, ((0, padded - rows), (0, 0)))
        b2d = jnp.pad(b2d, ((0, padded - rows), (0, 0)))
    rows_per_split = padded // splits
    use_dot = min(block_rows, block_in, block_rank, block_out) >= _MIN_DOT_DIM

    def a_index(o, i, c, n, sp):
        return (sp, o if a_by_out else i)

    def b_index(o, i, c, n, sp):
        return (sp, (i if a_by_out else o) * tiles_out + n)

    kernel = functools.partial(
        _outer_kernel,
        block_rows=block_rows,
        block_in=block_in,
        use_dot=use_dot,
        precision=_precision(a2d.dtype),
    )
    partial_sums = pl.pallas_call(
        kernel,
        grid=(num_out, num_in, tiles_rank, tiles_out, splits),
        in_specs=[
            pl.BlockSpec((rows_per_split, width_a), a_index),
            pl.BlockSpec((None, None, width_a, block_rank), lambda o, i, c, n, sp: (o, i, 0, c)),
            pl.BlockSpec((rows_per_split, block_out), b_index),
        ],
        out_specs=pl.BlockSpec(
            (None, None, None, block_rank, block_out), lambda o, i, c, n, sp: (sp, o, i, c, n)
        ),
        out_shape=jax.ShapeDtypeStruct((splits, num_out, num_in, t, width_b), jnp.float32),
        interpret=interpret,
        name="monarch_weight_grad",
        **_gpu_params(block_sizes, interpret),
    )(a2d, m, b2d)
    return partial_sums.sum(axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(x2d, f, g, block_sizes: BlockSizes, interpret: bool):
    return _chain(x2d, f, g, block_sizes, interpret)


def _fused_fwd(x2d, f, g, block_sizes, interpret):
    return _chain(x2d, f, g, block_sizes, interpret), (x2d, f, g)


def _fused_bwd(block_sizes, interpret, residuals, dy):
    x2d, f, g = residuals
    dy = dy.astype(x2d.dtype)
    # dx_i = sum_o (dy_o @ G[o, i].T) @ F[o, i].T: the same chain with transposed factors.
    dx = _chain(dy, g.transpose(1, 0, 3, 2), f.transpose(1, 0, 3, 2), block_sizes, interpret)
    # dG[o, i] = (x_i @ F[o, i]).T @ dy_o
    dg = _outer(x2d, f, dy, a_by_out=False, block_sizes=block_sizes, interpret=interpret)
    # dF[o, i].T = (dy_o @ G[o, i].T).T @ x_i
    df_t = _outer(
        dy,
        g.transpose(0, 1, 3, 2),
        x2d,
        a_by_out=True,
        block_sizes=block_sizes,
        interpret=interpret,
    )
    return dx, df_t.transpose(0, 1, 3, 2).astype(f.dtype), dg.astype(g.dtype)


_fused.defvjp(_fused_fwd, _fused_bwd)


def monarch_matmul(
    x: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Monarch product ``x -> blockdiag(w2) P blockdiag(w1) x`` in one fused Pallas kernel.

    Args:
      x: ``[..., k*p]``, any number of leading dims (including none).
      w1: ``[k, q, p]``.
      w2: ``[l, s, r]`` with ``l*r == k*q``; the kernel needs ``r % k == 0`` (true for the
        shapes ``MonarchDense`` builds when nblocks divides ``min(in, out) / nblocks``).
      block_sizes: tiles; defaults to ``BlockSizes()``.
      interpret: Pallas interpret mode; None means interpret on CPU, compiled on GPU.

    Returns:
      ``[..., l*s]`` in the promoted dtype, equal to ``monarch_matmul_reference``;
      differentiable (custom VJP with Pallas backward kernels).

    Example:
      >>> w1, w2 = jnp.ones((4, 4, 4)), jnp.ones((4, 4, 4))
      >>> monarch_matmul(jnp.ones((2, 16)), w1, w2).shape
      (2, 16)
    """
    k, q, p, l, s, r = _check_shapes(x, w1, w2)
    if r % k:
        raise ValueError(
            f"the Pallas Monarch kernel needs r % k == 0; got w1.shape={tuple(w1.shape)}, "
            f"w2.shape={tuple(w2.shape)} (r={r}, k={k}); use monarch_matmul_reference"
        )
    block_sizes = BlockSizes() if block_sizes is None else block_sizes
    interpret = resolve_interpret(interpret)
    dtype = jnp.result_type(x, w1, w2)
    t = r // k
    batch = x.shape[:-1]
    x2d = x.astype(dtype).reshape(math.prod(batch), k * p)
    # Fold the permutation into the factor layout (cheap: size of the weights, not the batch).
    f = w1.astype(dtype).reshape(k, l, t, p).transpose(1, 0, 3, 2)  # [l, k, p, t]
    g = w2.astype(dtype).reshape(l, s, t, k).transpose(0, 3, 2, 1)  # [l, k, t, s]
    y = _fused(x2d, f, g, block_sizes, interpret)
    return y.reshape(*batch, l * s)
