"""The FlashAttention backward kernel bodies (Pallas Triton): dQ per query block, dK/dV per
key/value block, recomputing the scores tile by tile from Q, K, V, O, lse and dO
(delta = rowsum(dO * O)); and :func:`backward`, the custom VJP's backward rule.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._compat import multiple_of
from pallas_kernels.attention.pallas_triton_kernel import LOG2E
from pallas_kernels.attention.pallas_triton_kernel import dot
from pallas_kernels.attention.pallas_triton_kernel import fori
from pallas_kernels.attention.pallas_triton_kernel import loop_over_kv
from pallas_kernels.attention.pallas_triton_kernel import loop_over_q
from pallas_kernels.attention.pallas_triton_kernel import offset_spec
from pallas_kernels.attention.pallas_triton_kernel import pallas_call
from pallas_kernels.attention.pallas_triton_kernel import read_offset
from pallas_kernels.attention.pallas_triton_kernel import row_list_spec
from pallas_kernels.attention.pallas_triton_kernel import tile_mask


def _dq_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    q_seg_ref,
    kv_seg_ref,
    offset_ref,
    list_ref,
    dq_ref,
    *,
    cfg,
):
    block_q, block_k = cfg.block_q_dq, cfg.block_k_dq
    q_start = pl.program_id(0) * block_q
    q_pos = q_start + read_offset(cfg, offset_ref)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]
    scale = cfg.sm_scale * LOG2E
    mask_tail = cfg.kv_len % block_k != 0

    def tile(kv_block, dq, masked):
        k_start = multiple_of(kv_block * block_k, block_k)
        keys = pl.ds(k_start, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        mask = None
        if masked:
            kv_seg = None if kv_seg_ref is None else kv_seg_ref[keys]
            mask = tile_mask(
                cfg, q_pos, k_start, block_q, block_k, q_seg, kv_seg, mask_tail=mask_tail
            )
        # Rows that saw a non-finite key/value have lse = NaN (from the forward's flags).
        p = jnp.exp2(dot(q, k, transpose_b=True) * scale - lse[:, None])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = dot(do, v, transpose_b=True)
        ds = p * (dp - delta[:, None])
        return dq + dot(ds.astype(k.dtype), k)

    read_list = None if list_ref is None else (lambda t: list_ref[t])
    dq = jnp.zeros(q.shape, jnp.float32)
    sub = cfg.block_k // block_k  # dQ tiles per block-mask column
    dq = loop_over_kv(cfg, tile, dq, q_pos, block_q, block_k, read_list, sub)
    dq_ref[...] = (dq * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    q_seg_ref,
    kv_seg_ref,
    offset_ref,
    list_ref,
    dk_ref,
    dv_ref,
    *,
    cfg,
    group,
):
    block_q, block_k = cfg.block_q_dkv, cfg.block_k_dkv
    k_start = pl.program_id(0) * block_k
    offset = read_offset(cfg, offset_ref)
    k, v = k_ref[...], v_ref[...]
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
    scale = cfg.sm_scale * LOG2E

    def tile(q_block, carry, masked, head):
        dk, dv = carry
        q_start = multiple_of(q_block * block_q, block_q)
        rows = pl.ds(q_start, block_q)
        q, do = q_ref[rows, head, :], do_ref[rows, head, :]
        lse, delta = lse_ref[head, rows], delta_ref[head, rows]
        mask = None
        if masked:
            # Padded keys need no mask here: their dK/dV rows are cut off by the caller. Padded
            # queries add nothing: zero q and dO, lse = inf and delta = 0 (see backward).
            q_seg = None if q_seg_ref is None else q_seg_ref[rows]
            mask = tile_mask(
                cfg, q_start + offset, k_start, block_q, block_k, q_seg, kv_seg, mask_tail=False
            )
        p = jnp.exp2(dot(q, k, transpose_b=True) * scale - lse[:, None])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dv = dv + dot(p.astype(do.dtype), do, transpose_a=True)
        dp = dot(do, v, transpose_b=True)
        ds = p * (dp - delta[:, None])
        dk = dk + dot(ds.astype(q.dtype), q, transpose_a=True)
        return dk, dv

    def one_head(head, carry):
        # The q heads that share this K/V head (GQA) are summed here, not in a second pass.
        if list_ref is None:
            read_list = None
        elif cfg.mask_heads == 1:
            read_list = lambda t: list_ref[t]
        else:
            read_list = lambda t: list_ref[head, t]
        body = lambda i, c, masked: tile(i, c, masked, head)
        sub = cfg.block_q // block_q  # dK/dV tiles per block-mask row
        return loop_over_q(cfg, body, carry, k_start, offset, block_q, block_k, read_list, sub)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = fori(0, group, one_head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def backward(cfg, residuals, do):
    q, k, v, q_seg, kv_seg, offset, lists, out, lse = residuals
    kv_lists, q_lists = (None, None) if lists is None else lists
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    # delta_i = rowsum(dO_i * O_i): one O(N) pass, shared by both kernels.
    delta = jnp.einsum(
        "bqhd,bqhd->bhq",
        out.astype(jnp.float32),
        do.astype(jnp.float32),
        precision=lax.Precision.HIGHEST,
    )
    if q_len != cfg.q_len:
        # Padding rows (zero q and dO) add nothing to dK/dV: p = 0 (keys are finite or flagged).
        real = jnp.arange(q_len) < cfg.q_len
        lse = jnp.where(real, lse, jnp.inf)
        delta = jnp.where(real, delta, 0.0)
    do = do.astype(q.dtype)
    if cfg.has_flags:
        # A masked query's non-finite q, dO or delta must not reach a key through 0 * NaN in
        # ds^T q, p^T dO or p * (dp - delta): zero them. A row that saw a non-finite key or value
        # keeps lse = NaN, so p and its own gradients stay NaN where it sees.
        q = jnp.where(jnp.isfinite(q), q, jnp.zeros((), q.dtype))
        do = jnp.where(jnp.isfinite(do), do, jnp.zeros((), do.dtype))
        delta = jnp.where(jnp.isfinite(delta), delta, 0.0)

    block_q, block_k = cfg.block_q_dq, cfg.block_k_dq
    q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
    kv_spec = pl.BlockSpec(
        (None, kv_len, None, head_dim), lambda i, b, h: (b, 0, lax.div(h, group), 0)
    )
    row_spec = pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))
    segment_specs = [None, None]
    if q_seg is not None:
        segment_specs = [
            pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
        ]
    dq = pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        cfg,
        head_dim,
        "flash_attention_dq",
        grid=(q_len // block_q, batch, num_heads),
        in_specs=[
            q_spec,
            kv_spec,
            kv_spec,
            q_spec,
            row_spec,
            row_spec,
            *segment_specs,
            offset_spec(offset),
            row_list_spec(cfg, kv_lists, None, cfg.block_q // block_q),
        ],
        out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
    )(q, k, v, do, lse, delta, q_seg, kv_seg, offset, kv_lists)

    block_q, block_k = cfg.block_q_dkv, cfg.block_k_dkv
    # One program per (K/V block, batch, K/V head); it loops over the `group` query heads.
    q_spec = pl.BlockSpec((None, q_len, group, head_dim), lambda j, b, h: (b, 0, h, 0))
    kv_spec = pl.BlockSpec((None, block_k, None, head_dim), lambda j, b, h: (b, j, h, 0))
    row_spec = pl.BlockSpec((None, group, q_len), lambda j, b, h: (b, h, 0))
    segment_specs = [None, None]
    if q_seg is not None:
        segment_specs = [
            pl.BlockSpec((None, q_len), lambda j, b, h: (b, 0)),
            pl.BlockSpec((None, block_k), lambda j, b, h: (b, j)),
        ]
    dk, dv = pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, group=group),
        cfg,
        head_dim,
        "flash_attention_dkv",
        grid=(kv_len // block_k, batch, num_kv_heads),
        in_specs=[
            q_spec,
            kv_spec,
            kv_spec,
            q_spec,
            row_spec,
            row_spec,
            *segment_specs,
            offset_spec(offset),
            row_list_spec(cfg, q_lists, group, cfg.block_k // block_k),
        ],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    )(q, k, v, do, lse, delta, q_seg, kv_seg, offset, q_lists)
    return dq, dk, dv, None, None, None, None, None
