"""The FlashAttention forward kernel body (Pallas Triton), its tile helpers and ``pallas_call``.

Dao et al., "FlashAttention", arXiv:2205.14135 (2022); Dao, "FlashAttention-2",
arXiv:2307.08691 (2023). Shared with the backward kernels (``pallas_triton_backward``): the
static :class:`Config` of a call, the element mask of a tile and the loops that visit only the
tiles a block can see. The op glue (block sizes, padding, the custom VJP, the implementation)
is ``pallas_triton.py``.
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
from pallas_kernels._compat import multiple_of

# A finite "minus infinity": masked scores must not turn max/exp arithmetic into inf - inf.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
LOG2E = math.log2(math.e)


@dataclasses.dataclass(frozen=True)
class Config:
    """Static description of one call, shared by the three kernels."""

    q_len: int  # unpadded lengths
    kv_len: int
    block_q: int
    block_k: int
    block_q_dkv: int
    block_k_dkv: int
    block_q_dq: int
    block_k_dq: int
    causal: bool
    has_offset: bool  # causal rows start at a traced position (decoding with a cache)
    sm_scale: float
    has_segments: bool
    # Element masking with non-finite inputs zeroed outside the kernels; the forward adds each
    # key's flag (0, or NaN for a key/value that had a non-finite entry) to its scores.
    has_flags: bool
    mask_heads: int  # 0: no block mask; else its leading dimension (1 or num_heads)
    interpret: bool
    num_warps: int | None
    num_stages: int


def dot(a, b, *, transpose_a=False, transpose_b=False):
    """a @ b with float32 accumulation (full float32 precision for float32 inputs)."""
    dims = (((0,) if transpose_a else (1,), (1,) if transpose_b else (0,)), ((), ()))
    # The Triton lowering maps DEFAULT precision to tf32 for float32; HIGHEST keeps IEEE.
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def tile_mask(cfg, q_pos, k_start, block_q, block_k, q_seg, kv_seg, *, mask_tail):
    """Element mask of one tile (True = attend), or None when nothing needs masking.

    `q_pos` is the causal position of the tile's first query row.
    """
    mask = None
    if cfg.causal or mask_tail:
        cols = k_start + jnp.arange(block_k, dtype=jnp.int32)[None, :]
    if cfg.causal:
        rows = q_pos + jnp.arange(block_q, dtype=jnp.int32)[:, None]
        mask = rows >= cols
    if mask_tail:
        in_range = cols < cfg.kv_len
        mask = in_range if mask is None else mask & in_range
    if q_seg is not None:
        same = q_seg[:, None] == kv_seg[None, :]
        mask = same if mask is None else mask & same
    return mask


def fori(lower, upper, body, carry):
    if isinstance(lower, int) and isinstance(upper, int) and upper <= lower:
        return carry
    return lax.fori_loop(lower, upper, body, carry)


def _listed(read_list, tile, carry, needs_mask, sub):
    """Runs `tile` over the blocks of a block-mask row/column list; a listed mask tile spans
    `sub` kernel tiles (backward tiles may divide the mask's)."""

    def one(t, c):
        first = read_list(t + 1) * sub
        if sub == 1:
            return tile(first, c, needs_mask)
        return lax.fori_loop(0, sub, lambda u, c: tile(first + u, c, needs_mask), c)

    return fori(0, read_list(0), one, carry)


def loop_over_kv(cfg, tile, carry, q_pos, block_q, block_k, read_list, sub=1):
    """Runs `tile(kv_block, carry, masked)` over the K/V blocks a query block can see.

    `q_pos` is the causal position of the block's first row. Tiles above the causal diagonal or
    off in the block mask are never visited; tiles that are entirely visible run without the
    element-mask arithmetic.
    """
    num_kv_blocks = -(-cfg.kv_len // block_k)  # padding-only blocks are never visited
    full_kv_blocks = cfg.kv_len // block_k
    needs_mask = cfg.causal or cfg.has_segments or full_kv_blocks != num_kv_blocks
    if read_list is not None:
        return _listed(read_list, tile, carry, needs_mask, sub)
    if cfg.causal:
        upper = jnp.minimum(lax.div(q_pos + block_q + block_k - 1, block_k), num_kv_blocks)
        split = jnp.minimum(lax.div(q_pos + 1, block_k), full_kv_blocks)
    else:
        upper, split = num_kv_blocks, full_kv_blocks
    if cfg.has_segments:
        split = 0
    carry = fori(0, split, lambda j, c: tile(j, c, False), carry)
    return fori(split, upper, lambda j, c: tile(j, c, True), carry)


def loop_over_q(cfg, tile, carry, k_start, offset, block_q, block_k, read_list, sub=1):
    """Runs `tile(q_block, carry, masked)` over the query blocks that can see a K/V block.

    Query row `i` has causal position `offset + i`.
    """
    num_q_blocks = -(-cfg.q_len // block_q)
    needs_mask = cfg.causal or cfg.has_segments
    if read_list is not None:
        return _listed(read_list, tile, carry, needs_mask, sub)
    if cfg.causal:
        # The first row that sees the tile's first key, and the first block from which every
        # row sees the tile's last key.
        lower = lax.div(jnp.maximum(k_start - offset, 0), block_q)
        split = lax.div(jnp.maximum(k_start + block_k - 1 - offset, 0) + block_q - 1, block_q)
        split = jnp.maximum(jnp.minimum(split, num_q_blocks), lower)
    else:
        lower, split = 0, 0
    if cfg.has_segments:
        split = num_q_blocks
    carry = fori(lower, split, lambda i, c: tile(i, c, True), carry)
    return fori(split, num_q_blocks, lambda i, c: tile(i, c, False), carry)


def read_offset(cfg, offset_ref):
    return offset_ref[0] if cfg.has_offset else 0


def _fwd_kernel(
    q_ref,
    k_ref,
    v_ref,
    q_seg_ref,
    kv_seg_ref,
    offset_ref,
    flag_ref,
    list_ref,
    o_ref,
    lse_ref,
    *,
    cfg,
):
    block_q, block_k = cfg.block_q, cfg.block_k
    q_start = pl.program_id(0) * block_q
    q_pos = q_start + read_offset(cfg, offset_ref)
    q = q_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]
    scale = cfg.sm_scale * LOG2E  # scores in base 2: exp2 is the native instruction
    mask_tail = cfg.kv_len % block_k != 0

    def tile(kv_block, carry, masked):
        acc, m_prev, l_prev = carry
        k_start = multiple_of(kv_block * block_k, block_k)
        keys = pl.ds(k_start, block_k)
        s = dot(q, k_ref[keys, :], transpose_b=True) * scale
        if flag_ref is not None:
            # K/V arrive with non-finite entries zeroed (so a masked one cannot leak 0 * NaN
            # into p @ v); the rows that see such a key become NaN through its flag instead.
            s = s + flag_ref[keys][None, :]
        mask = None
        if masked:
            kv_seg = None if kv_seg_ref is None else kv_seg_ref[keys]
            mask = tile_mask(
                cfg, q_pos, k_start, block_q, block_k, q_seg, kv_seg, mask_tail=mask_tail
            )
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        correction = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        if mask is not None:
            # A row with no visible key in this tile must add nothing (its max is MASK_VALUE).
            p = jnp.where(mask, p, 0.0)
        l_next = correction * l_prev + jnp.sum(p, axis=1)
        v = v_ref[keys, :]
        acc = correction[:, None] * acc + dot(p.astype(v.dtype), v)
        return acc, m_next, l_next

    carry = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((block_q,), MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    read_list = None if list_ref is None else (lambda t: list_ref[t])
    acc, m, l = loop_over_kv(cfg, tile, carry, q_pos, block_q, block_k, read_list)
    empty = l == 0.0  # a row that saw no key: output 0, lse +inf (so p = 0 in the backward)
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(l_safe))


# --------------------------------------------------------------------------------------------
# pallas_call wrappers
# --------------------------------------------------------------------------------------------


def _num_warps(cfg, head_dim):
    if cfg.num_warps is not None:
        return cfg.num_warps
    return 4 if head_dim <= 64 else 8


def pallas_call(kernel, cfg, head_dim, name, **kwargs):
    return pl.pallas_call(
        kernel,
        interpret=cfg.interpret,
        name=name,
        **compiler_params_kwargs(
            interpret=cfg.interpret,
            num_warps=_num_warps(cfg, head_dim),
            num_stages=cfg.num_stages,
        ),
        **kwargs,
    )


def row_list_spec(cfg, lists, heads_per_program, per_mask_tile=1):
    """BlockSpec of one row of a `[mask_heads, rows, 1 + cols]` tile list, grid (row, b, h).

    `heads_per_program=None`: one query head per program (forward, dQ), a 1-D ref. Otherwise
    (dK/dV) the program's `heads_per_program` query heads, a `[heads, 1 + cols]` ref, unless the
    mask is shared by all heads. `per_mask_tile` programs share one mask row (backward tiles
    smaller than the mask's).
    """
    if lists is None:
        return None
    width = lists.shape[-1]
    row = lambda r: lax.div(r, per_mask_tile)
    if cfg.mask_heads == 1:
        return pl.BlockSpec((None, None, width), lambda r, b, h: (0, row(r), 0))
    if heads_per_program is None:
        return pl.BlockSpec((None, None, width), lambda r, b, h: (h, row(r), 0))
    return pl.BlockSpec((heads_per_program, None, width), lambda r, b, h: (h, row(r), 0))


def offset_spec(offset):
    return None if offset is None else pl.BlockSpec((1,), lambda r, b, h: (0,))


def _flag_spec(flags, group, kv_len):
    if flags is None:
        return None
    return pl.BlockSpec((None, None, kv_len), lambda i, b, h: (b, lax.div(h, group), 0))


def forward(q, k, v, q_seg, kv_seg, offset, flags, kv_lists, cfg):
    batch, q_len, num_heads, head_dim = q.shape
    kv_len, num_kv_heads = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    block_q = cfg.block_q
    q_spec = pl.BlockSpec((None, block_q, None, head_dim), lambda i, b, h: (b, i, h, 0))
    # GQA: the K/V head is chosen by the index map, so K/V are never repeated in memory.
    kv_spec = pl.BlockSpec(
        (None, kv_len, None, head_dim), lambda i, b, h: (b, 0, lax.div(h, group), 0)
    )
    segment_specs = [None, None]
    if q_seg is not None:
        segment_specs = [
            pl.BlockSpec((None, block_q), lambda i, b, h: (b, i)),
            pl.BlockSpec((None, kv_len), lambda i, b, h: (b, 0)),
        ]
    out, lse = pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        cfg,
        head_dim,
        "flash_attention_fwd",
        grid=(q_len // block_q, batch, num_heads),
        in_specs=[
            q_spec,
            kv_spec,
            kv_spec,
            *segment_specs,
            offset_spec(offset),
            _flag_spec(flags, group, kv_len),
            row_list_spec(cfg, kv_lists, None),
        ],
        out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32),
        ],
    )(q, k, v, q_seg, kv_seg, offset, flags, kv_lists)
    return out, lse
