"""The Monarch kernel bodies (Pallas Triton): the fused chain, the fused factor-gradient
outer product, and the staged path's block-diagonal GEMMs.

Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate Training",
arXiv 2204.00595 (ICML 2022). The ``pallas_call``s, tiles and custom VJPs that use them are the
op glue in ``pallas_triton.py``.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._compat import multiple_of

__all__ = ["chain_kernel", "gemm_kernel", "gemm_tn_kernel", "mm", "mm_tn", "outer_kernel"]


def mm(a, b, *, use_dot: bool, precision):
    """``a [M, K] @ b [K, N]`` accumulated in float32."""
    if use_dot:
        return lax.dot_general(
            a, b, (((1,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
    return jnp.sum(a.astype(jnp.float32)[:, :, None] * b.astype(jnp.float32)[None, :, :], axis=1)


def mm_tn(a, b, *, use_dot: bool, precision):
    """``a.T @ b`` for ``a [K, M]``, ``b [K, N]``, accumulated in float32."""
    if use_dot:
        return lax.dot_general(
            a, b, (((0,), (0,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )
    return jnp.sum(a.astype(jnp.float32)[:, :, None] * b.astype(jnp.float32)[:, None, :], axis=0)


def chain_kernel(x_ref, f_ref, g_ref, o_ref, *, width_in, block_in, block_rank, use_dot, precision):
    """``o = sum_i (x_i @ F[i]) @ G[i]`` for one row tile and one output (sub-)block.

    x_ref ``[rows, I*width_in]``, f_ref ``[I, width_in, t]``, g_ref ``[I, t, block_out]``,
    o_ref ``[rows, block_out]``. The ``[rows, block_rank]`` intermediate stays on chip.
    """
    rows, block_out = o_ref.shape
    num_in, _, t = f_ref.shape
    compute_dtype = x_ref.dtype

    def over_input_blocks(i, acc):
        def over_rank_chunks(c, acc):
            rank = multiple_of(c * block_rank, block_rank)

            def over_in_chunks(e, h):
                col = multiple_of(i * width_in + e * block_in, block_in)
                row = multiple_of(e * block_in, block_in)
                xs = x_ref[:, pl.ds(col, block_in)]
                fs = f_ref[i, pl.ds(row, block_in), pl.ds(rank, block_rank)]
                return h + mm(xs, fs, use_dot=use_dot, precision=precision)

            h = lax.fori_loop(
                0, width_in // block_in, over_in_chunks, jnp.zeros((rows, block_rank), jnp.float32)
            )
            gs = g_ref[i, pl.ds(rank, block_rank), :]
            return acc + mm(h.astype(compute_dtype), gs, use_dot=use_dot, precision=precision)

        return lax.fori_loop(0, t // block_rank, over_rank_chunks, acc)

    acc = lax.fori_loop(0, num_in, over_input_blocks, jnp.zeros((rows, block_out), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def outer_kernel(a_ref, m_ref, b_ref, o_ref, *, block_rows, block_in, use_dot, precision):
    """``o = sum_rows b.T @ (a @ M)`` over this program's rows: one factor-gradient tile.

    a_ref ``[rows, width_a]``, m_ref ``[width_a, block_rank]``, b_ref ``[rows, block_out]``,
    o_ref ``[block_out, block_rank]`` (float32). The output is the transposed gradient tile, so
    the dot's M dimension is ``block_out`` (>= 64 lets Triton use Hopper ``wgmma``) instead of
    the rank (<= 32).
    """
    rows, width_a = a_ref.shape
    block_out, block_rank = o_ref.shape
    compute_dtype = a_ref.dtype

    def over_row_tiles(rb, acc):
        r0 = multiple_of(rb * block_rows, block_rows)

        def over_chunks(c, h):
            col = multiple_of(c * block_in, block_in)
            a_tile = a_ref[pl.ds(r0, block_rows), pl.ds(col, block_in)]
            m_tile = m_ref[pl.ds(col, block_in), :]
            return h + mm(a_tile, m_tile, use_dot=use_dot, precision=precision)

        h = lax.fori_loop(
            0, width_a // block_in, over_chunks, jnp.zeros((block_rows, block_rank), jnp.float32)
        )
        b_tile = b_ref[pl.ds(r0, block_rows), :]
        return acc + mm_tn(b_tile, h.astype(compute_dtype), use_dot=use_dot, precision=precision)

    acc = lax.fori_loop(
        0, rows // block_rows, over_row_tiles, jnp.zeros((block_out, block_rank), jnp.float32)
    )
    o_ref[...] = acc


def gemm_kernel(x_ref, w_ref, o_ref, *, block_k, precision):
    """``o = x @ w`` for one row tile of one block: x_ref ``[rows, K]``, w_ref ``[K, N]``."""
    rows, n = o_ref.shape
    width = x_ref.shape[1]

    def body(e, acc):
        col = multiple_of(e * block_k, block_k)
        xs = x_ref[:, pl.ds(col, block_k)]
        ws = w_ref[pl.ds(col, block_k), :]
        return acc + mm(xs, ws, use_dot=True, precision=precision)

    acc = lax.fori_loop(0, width // block_k, body, jnp.zeros((rows, n), jnp.float32))
    o_ref[...] = acc.astype(o_ref.dtype)


def gemm_tn_kernel(a_ref, b_ref, o_ref, *, block_rows, precision):
    """``o = sum_rows a.T @ b``: a_ref ``[rows, M]``, b_ref ``[rows, N]``, o_ref ``[M, N]``."""
    rows = a_ref.shape[0]

    def body(e, acc):
        r0 = multiple_of(e * block_rows, block_rows)
        a_tile = a_ref[pl.ds(r0, block_rows), :]
        b_tile = b_ref[pl.ds(r0, block_rows), :]
        return acc + mm_tn(a_tile, b_tile, use_dot=True, precision=precision)

    o_ref[...] = lax.fori_loop(0, rows // block_rows, body, jnp.zeros(o_ref.shape, jnp.float32))
