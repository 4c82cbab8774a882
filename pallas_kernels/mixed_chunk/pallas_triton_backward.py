"""The mixed-chunk (FLASH) backward kernel bodies (Pallas Triton) and the custom VJP's rule.

``dq`` walks the chunks forward (``dQ_lin`` needs the running state ``S``), ``dkv`` walks them
backward with the reverse running sum ``R = sum_{later chunks} Q_lin^T dO``; both recompute the
``relu^2`` tiles. ``dbias`` (only with a bias) runs one program per tile of the ``[C, C]`` bias.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.mixed_chunk.pallas_triton_kernel import block_specs
from pallas_kernels.mixed_chunk.pallas_triton_kernel import chunk_outer
from pallas_kernels.mixed_chunk.pallas_triton_kernel import dot
from pallas_kernels.mixed_chunk.pallas_triton_kernel import fori
from pallas_kernels.mixed_chunk.pallas_triton_kernel import pallas_call
from pallas_kernels.mixed_chunk.pallas_triton_kernel import relu_scores
from pallas_kernels.mixed_chunk.pallas_triton_kernel import rows_of
from pallas_kernels.mixed_chunk.pallas_triton_kernel import total_outer


def _dq_kernel(qq_ref, kq_ref, ql_ref, kl_ref, v_ref, bias_ref, do_ref, dq_ref, dql_ref, *, cfg):
    """dQ (quadratic) and dQ_lin of one block of value columns, walking the chunks forward."""
    block, tiles, wdt = cfg.block, cfg.tiles, cfg.weight_dtype

    def row_tile(chunk, i, state):
        rows = rows_of(chunk * cfg.chunk + i * block, block)
        q, do = qq_ref[rows, :], do_ref[rows, :]

        def key_tile(j, dq, mask):
            cols = rows_of(chunk * cfg.chunk + j * block, block)
            k = kq_ref[cols, :]
            r = relu_scores(cfg, q, k, bias_ref, i, j, mask=mask)
            d_weights = dot(do, v_ref[cols, :], transpose_b=True)
            d_scores = 2.0 * r * d_weights
            return dq + dot(d_scores.astype(wdt), k.astype(wdt))

        dq = jnp.zeros((block, qq_ref.shape[-1]), jnp.float32)
        if cfg.causal:
            dq = fori(0, i, lambda j, a: key_tile(j, a, "none"), dq)
            dq = key_tile(i, dq, "diagonal")
        else:
            dq = fori(0, tiles, lambda j, a: key_tile(j, a, "none"), dq)
        dq_ref[rows, :] = dq * cfg.quad_scale
        if cfg.has_lin:
            dql = dot(do.astype(wdt), state.astype(wdt), transpose_b=True)
            dql_ref[rows, :] = dql * cfg.lin_scale

    def chunk_body(chunk, state):
        fori(0, tiles, lambda i, c: (row_tile(chunk, i, state), c)[1], None)
        if cfg.has_lin and cfg.causal:
            state = state + chunk_outer(cfg, kl_ref, v_ref, chunk)
        return state

    if not cfg.has_lin:
        state = None
    elif cfg.causal:
        state = jnp.zeros((kl_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
    else:
        state = total_outer(cfg, kl_ref, v_ref)
    fori(0, cfg.num_chunks, chunk_body, state)


def _dkv_kernel(
    qq_ref,
    kq_ref,
    ql_ref,
    kl_ref,
    v_ref,
    bias_ref,
    do_ref,
    dk_ref,
    dkl_ref,
    dv_ref,
    *,
    cfg,
):
    """dK, dK_lin (partial over value blocks) and dV, walking the chunks backward."""
    block, tiles, wdt = cfg.block, cfg.tiles, cfg.weight_dtype

    def key_tile(chunk, j, reverse_state):
        cols = rows_of(chunk * cfg.chunk + j * block, block)
        k, v = kq_ref[cols, :], v_ref[cols, :]

        def row_tile(i, carry, mask):
            dk, dv = carry
            rows = rows_of(chunk * cfg.chunk + i * block, block)
            q, do = qq_ref[rows, :], do_ref[rows, :]
            r = relu_scores(cfg, q, k, bias_ref, i, j, mask=mask)
            dv = dv + dot((r * r).astype(wdt), do.astype(wdt), transpose_a=True)
            d_scores = 2.0 * r * dot(do, v, transpose_b=True)
            dk = dk + dot(d_scores.astype(wdt), q.astype(wdt), transpose_a=True)
            return dk, dv

        carry = (
            jnp.zeros((block, kq_ref.shape[-1]), jnp.float32),
            jnp.zeros((block, v_ref.shape[-1]), jnp.float32),
        )
        if cfg.causal:
            carry = row_tile(j, carry, "diagonal")
            carry = fori(j + 1, tiles, lambda i, c: row_tile(i, c, "none"), carry)
        else:
            carry = fori(0, tiles, lambda i, c: row_tile(i, c, "none"), carry)
        dk, dv = carry
        dk_ref[cols, :] = dk * cfg.quad_scale
        if cfg.has_lin:
            state = reverse_state.astype(wdt)
            dv = dv + dot(kl_ref[cols, :].astype(wdt), state) * cfg.lin_scale
            dkl = dot(v.astype(wdt), state, transpose_b=True)
            dkl_ref[cols, :] = dkl * cfg.lin_scale
        dv_ref[cols, :] = dv.astype(dv_ref.dtype)

    def chunk_body(step, reverse_state):
        chunk = cfg.num_chunks - 1 - step
        fori(0, tiles, lambda j, c: (key_tile(chunk, j, reverse_state), c)[1], None)
        if cfg.has_lin and cfg.causal:
            reverse_state = reverse_state + chunk_outer(cfg, ql_ref, do_ref, chunk)
        return reverse_state

    if not cfg.has_lin:
        reverse_state = None
    elif cfg.causal:
        reverse_state = jnp.zeros((ql_ref.shape[-1], do_ref.shape[-1]), jnp.float32)
    else:
        reverse_state = total_outer(cfg, ql_ref, do_ref)
    fori(0, cfg.num_chunks, chunk_body, reverse_state)


def _dbias_kernel(qq_ref, kq_ref, v_ref, bias_ref, do_ref, db_ref, *, cfg):
    """One ``[block, block]`` tile of dbias for one batch element, summed over the chunks."""
    tile_i, tile_j = pl.program_id(0), pl.program_id(1)
    block = cfg.block

    def body(chunk, acc):
        rows = rows_of(chunk * cfg.chunk + tile_i * block, block)
        cols = rows_of(chunk * cfg.chunk + tile_j * block, block)
        mask = "element" if cfg.causal else "none"
        r = relu_scores(cfg, qq_ref[rows, :], kq_ref[cols, :], bias_ref, tile_i, tile_j, mask=mask)

        def value_block(e, d_weights):
            # dO_i . v_j over the value features, one block at a time (a wide e stays in
            # registers only block_e columns wide).
            features = rows_of(e * cfg.block_e, cfg.block_e)
            do, v = do_ref[rows, features], v_ref[cols, features]
            return d_weights + dot(do, v, transpose_b=True)

        d_weights = fori(0, cfg.value_blocks, value_block, jnp.zeros_like(r))
        return acc + 2.0 * r * d_weights

    # Causal tiles above the diagonal see nothing: no chunk is visited.
    if cfg.causal:
        # (Both bounds int32 values: Triton's loop needs one index type.)
        lower = jnp.zeros((), jnp.int32)
        upper = jnp.where(tile_j > tile_i, lower, jnp.int32(cfg.num_chunks))
    else:
        lower, upper = 0, cfg.num_chunks
    acc = fori(lower, upper, body, jnp.zeros((block, block), jnp.float32))
    db_ref[...] = acc


def backward(cfg, residuals, do):
    qq, kq, ql, kl, v, bias = residuals
    batch, seq, e = v.shape
    value_blocks = e // cfg.block_e
    do = do.astype(v.dtype)
    q_spec, l_spec, v_spec, b_spec = block_specs(cfg, qq, ql, v, bias)
    grid = (batch, value_blocks)

    def per_value_block(x):
        """Per-value-block partial gradients `[value_blocks, batch, seq, features]`."""
        if x is None:
            return None, None
        spec = pl.BlockSpec((None, None, seq, x.shape[-1]), lambda b, e: (e, b, 0, 0))
        return spec, jax.ShapeDtypeStruct((value_blocks, *x.shape), jnp.float32)

    (dq_spec, dq_shape), (dql_spec, dql_shape) = per_value_block(qq), per_value_block(ql)
    dq, dql = pallas_call(
        _dq_kernel,
        cfg,
        "mixed_chunk_dq",
        grid=grid,
        in_specs=[q_spec, q_spec, l_spec, l_spec, v_spec, b_spec, v_spec],
        out_specs=[dq_spec, dql_spec],
        out_shape=[dq_shape, dql_shape],
    )(qq, kq, ql, kl, v, bias, do)
    dk, dkl, dv = pallas_call(
        _dkv_kernel,
        cfg,
        "mixed_chunk_dkv",
        grid=grid,
        in_specs=[q_spec, q_spec, l_spec, l_spec, v_spec, b_spec, v_spec],
        out_specs=[dq_spec, dql_spec, v_spec],
        out_shape=[dq_shape, dql_shape, jax.ShapeDtypeStruct(v.shape, v.dtype)],
    )(qq, kq, ql, kl, v, bias, do)

    def total(x, like):
        return None if x is None else jnp.sum(x, axis=0).astype(like.dtype)

    dbias = None
    if bias is not None:
        tiles = cfg.tiles
        whole_q = pl.BlockSpec((None, seq, qq.shape[-1]), lambda i, j, b: (b, 0, 0))
        whole_v = pl.BlockSpec((None, seq, e), lambda i, j, b: (b, 0, 0))
        dbias_per_batch = pallas_call(
            _dbias_kernel,
            cfg,
            "mixed_chunk_dbias",
            grid=(tiles, tiles, batch),
            in_specs=[
                whole_q,
                whole_q,
                whole_v,
                pl.BlockSpec(bias.shape, lambda i, j, b: (0, 0)),
                whole_v,
            ],
            out_specs=pl.BlockSpec((None, cfg.block, cfg.block), lambda i, j, b: (b, i, j)),
            out_shape=jax.ShapeDtypeStruct((batch, *bias.shape), jnp.float32),
        )(qq, kq, v, bias, do)
        dbias = jnp.sum(dbias_per_batch, axis=0).astype(bias.dtype)
    return total(dq, qq), total(dk, kq), total(dql, ql), total(dkl, kl), dv, dbias
