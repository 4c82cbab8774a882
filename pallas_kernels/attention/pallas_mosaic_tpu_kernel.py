"""FlashAttention as Pallas Mosaic TPU kernels: exact attention in O(N) memory, forward and backward.

Tri Dao, Daniel Y. Fu, Stefano Ermon, Atri Rudra, Christopher Re, "FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness", arXiv:2205.14135 (2022); Tri Dao,
"FlashAttention-2", arXiv:2307.08691 (2023).

The TPU twin of ``pallas_triton.py`` (same semantics, same masking rules), written for Mosaic:
the kernels run over a grid whose last axis walks the K/V blocks (forward, dQ) or the query
blocks (dK/dV) as a sequential ("arbitrary") reduction, with the running max / sum / accumulators
in VMEM scratch. Inputs are laid out ``[batch, heads, seq, head_dim]`` inside (the last two block
dims are then (rows, head_dim), what the MXU wants); the wrapper transposes and pads.

- Tiles that cannot contribute (above the causal diagonal, off in a block mask) are skipped with
  ``pl.when``; for causal masks the index maps also clamp the block index to the last (first)
  visible block so that Pallas does not copy the skipped blocks from HBM at all.
- ``q_offset`` (a traced int) and the block mask are scalar-prefetched into SMEM.
- NaN safety, as in the Triton kernels: under element masking the non-finite K/V entries are
  zeroed outside the kernel and each key's flag (0, or NaN for a key that had one) is added to its
  scores, so a masked key cannot leak ``0 * NaN`` while a query that sees it becomes NaN. A query
  that sees no key gets zeros (lse = +inf: p = 0 in the backward).
- Any length: q and K/V are padded to whole blocks (padding keys masked, padding queries cut off);
  head_dim is padded to a multiple of 128 lanes unless it is 64 or a multiple of 128.
- GQA/MQA: the K/V head is chosen by the index map (no repeat in memory); dK/dV sum the group's
  query heads in the grid.

Why not JAX's splash attention: it needs static (numpy) masks, so no traced ``q_offset`` or traced
block mask; it gives the mean of V (not zeros) to a query that sees no key; a masked NaN/inf value
reaches the output through ``0 * inf``; and lengths must be multiples of its blocks. Each of these
is a documented efflax semantic, so the kernels here are efflax's own.
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
from jax.experimental.pallas import tpu as pltpu

__all__ = ["BlockSizes", "flash_attention_tpu", "tile_config_problem"]

# A finite "minus infinity": masked scores must not turn max/exp arithmetic into inf - inf.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LANES = 128
_MAX_BLOCK = 4096


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the three TPU kernels (rows of Q x rows of K/V).

    Attributes:
      block_q, block_k: the forward tile.
      block_q_dkv, block_k_dkv: the dK/dV tile (None: block_q, block_k).
      block_q_dq, block_k_dq: the dQ tile (None: block_q, block_k).

    Every size is a multiple of 8 in [8, 4096]; compiled for a TPU, ``block_k`` sizes must be
    multiples of 128 (they are the lane dimension of the score tile) and ``block_q`` sizes
    multiples of 16 (bf16 sublane packing). A block longer than the padded sequence is shrunk to
    it, so short sequences are not padded to a long default block.
    """

    block_q: int = 512
    block_k: int = 512
    block_q_dkv: int | None = None
    block_k_dkv: int | None = None
    block_q_dq: int | None = None
    block_k_dq: int | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if value is None and field.name not in ("block_q", "block_k"):
                continue
            if (
                not isinstance(value, int | np.integer)
                or isinstance(value, bool)
                or not 8 <= value <= _MAX_BLOCK
                or value % 8
            ):
                raise ValueError(
                    f"{field.name}={value!r} must be a multiple of 8 in [8, {_MAX_BLOCK}]"
                )

    @classmethod
    def get_default(cls, *, head_dim: int = 128) -> BlockSizes:
        """512 x 512 forward tiles (VMEM: ~1 MiB of f32 scores), 512 x 256 backward tiles for
        head_dim <= 128 and 256 x 256 above (the backward keeps four (rows, d) f32 values live)."""
        if head_dim <= 128:
            return cls(512, 512, 512, 256, 512, 256)
        return cls(512, 512, 256, 256, 256, 256)

    @property
    def fwd(self) -> tuple[int, int]:
        return self.block_q, self.block_k

    @property
    def dkv(self) -> tuple[int, int]:
        return (self.block_q_dkv or self.block_q, self.block_k_dkv or self.block_k)

    @property
    def dq(self) -> tuple[int, int]:
        return (self.block_q_dq or self.block_q, self.block_k_dq or self.block_k)


def tile_config_problem(block_sizes: BlockSizes, *, interpret: bool) -> str | None:
    """Why these tiles cannot compile for Mosaic (None when they can, or in interpret mode)."""
    if interpret:
        return None
    for name, (bq, bk) in (
        ("forward", block_sizes.fwd),
        ("dK/dV", block_sizes.dkv),
        ("dQ", block_sizes.dq),
    ):
        if bk % _LANES or bq % 16:
            return (
                f"the {name} tile ({bq}, {bk}) must be (multiple of 16, multiple of 128) to "
                "compile for a TPU"
            )
    return None


# --------------------------------------------------------------------------------------------
# Static description of a call
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
    q_len: int  # unpadded lengths
    kv_len: int
    fwd: tuple[int, int]
    dkv: tuple[int, int]
    dq: tuple[int, int]
    causal: bool
    sm_scale: float
    has_segments: bool
    has_flags: bool
    # Block mask: 0 for none, else its leading dim (1 or num_heads); its tile and grid.
    mask_heads: int
    mask_tile: tuple[int, int]
    mask_grid: tuple[int, int]
    group: int  # query heads per K/V head
    interpret: bool


def _dot(a, b, dims, interpret):
    """Matmul with float32 accumulation (float32 inputs at full precision)."""
    if interpret and a.dtype != jnp.float32:
        # XLA:CPU (JAX 0.12) cannot run a 16-bit dot with a float32 result inside the loop of
        # interpret mode; the widened products are exact in float32.
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(
        a, b, (dims, ((), ())), precision=precision, preferred_element_type=jnp.float32
    )


_NT = ((1,), (1,))  # a @ b.T
_NN = ((1,), (0,))  # a @ b
_TN = ((0,), (0,))  # a.T @ b


def _tile_visible(cfg, offset_ref, mask_ref, head, q_block, kv_block, block_q, block_k):
    """Whether tile (q_block, kv_block) of a (block_q, block_k) grid may hold a visible pair."""
    visible = True
    if cfg.causal:
        last_row = offset_ref[0] + (q_block + 1) * block_q - 1
        visible = kv_block * block_k <= last_row
    if cfg.mask_heads:
        mask_q, mask_k = cfg.mask_tile
        rows, cols = cfg.mask_grid
        h = head if cfg.mask_heads > 1 else 0
        index = (h * rows + (q_block * block_q) // mask_q) * cols + (kv_block * block_k) // mask_k
        # One bit per tile, 32 tiles per SMEM word (SMEM is 1 MiB on v5e).
        word = mask_ref[lax.div(index, 32)]
        on = lax.bitwise_and(lax.shift_right_logical(word, lax.rem(index, 32)), 1) != 0
        visible = on if visible is True else jnp.logical_and(visible, on)
    return visible


def _element_mask(
    cfg, offset_ref, q_start, k_start, block_q, block_k, q_seg_ref, kv_seg_ref, *, tail
):
    """Element mask of one tile (True = attend), or None when nothing needs masking."""
    mask = None
    if cfg.causal or tail:
        cols = k_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 1)
    if cfg.causal:
        rows = offset_ref[0] + q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
        mask = rows >= cols
    if tail:
        in_range = cols < cfg.kv_len
        mask = in_range if mask is None else jnp.logical_and(mask, in_range)
    if cfg.has_segments:
        same = q_seg_ref[...] == kv_seg_ref[...]  # (block_q, 1) == (1, block_k)
        mask = same if mask is None else jnp.logical_and(mask, same)
    return mask


def _when(condition):
    if condition is True:
        return lambda f: f()
    return pl.when(condition)


def _run_tile(cfg, offset_ref, visible, q_start, k_start, block_q, block_k, *, tail, body):
    """Runs ``body(masked)`` on a visible tile: ``masked=False`` (no element-mask arithmetic)
    for tiles that are entirely visible (below the causal diagonal, not the ragged last block),
    ``masked=True`` for the others. Segment ids mask every tile."""
    if cfg.has_segments:
        _when(visible)(lambda: body(True))
        return
    if not (cfg.causal or tail):
        _when(visible)(lambda: body(False))
        return
    full = True
    if cfg.causal:
        full = offset_ref[0] + q_start >= k_start + block_k - 1
    if tail:
        inside = k_start + block_k <= cfg.kv_len
        full = inside if full is True else jnp.logical_and(full, inside)
    both = (lambda c: c) if visible is True else (lambda c: jnp.logical_and(visible, c))
    pl.when(both(full))(lambda: body(False))
    pl.when(both(jnp.logical_not(full)))(lambda: body(True))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


def _fwd_kernel(
    offset_ref,
    mask_ref,
    q_ref,
    k_ref,
    v_ref,
    q_seg_ref,
    kv_seg_ref,
    flag_ref,
    o_ref,
    lse_ref,
    m_scratch,
    l_scratch,
    acc_scratch,
    *,
    cfg,
):
    block_q, block_k = cfg.fwd
    head, q_block, kv_block = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(kv_block == 0)
    def _init():
        m_scratch[...] = jnp.full(m_scratch.shape, _MASK_VALUE, jnp.float32)
        l_scratch[...] = jnp.zeros(l_scratch.shape, jnp.float32)
        acc_scratch[...] = jnp.zeros(acc_scratch.shape, jnp.float32)

    visible = _tile_visible(cfg, offset_ref, mask_ref, head, q_block, kv_block, block_q, block_k)

    q_start, k_start = q_block * block_q, kv_block * block_k
    tail = cfg.kv_len % block_k != 0

    def _compute(masked):
        s = _dot(q_ref[...], k_ref[...], _NT, cfg.interpret) * cfg.sm_scale
        if flag_ref is not None:
            s = s + flag_ref[...]  # (1, block_k): 0, or NaN for a key with a non-finite entry
        mask = None
        if masked:
            mask = _element_mask(
                cfg,
                offset_ref,
                q_start,
                k_start,
                block_q,
                block_k,
                q_seg_ref,
                kv_seg_ref,
                tail=tail,
            )
        if mask is not None:
            s = jnp.where(mask, s, _MASK_VALUE)
        m_prev = m_scratch[...]
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        correction = jnp.exp(m_prev - m_next)
        p = jnp.exp(s - m_next)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)  # a row that sees nothing here adds nothing
        l_scratch[...] = correction * l_scratch[...] + jnp.sum(p, axis=1, keepdims=True)
        v = v_ref[...]
        acc_scratch[...] = correction * acc_scratch[...] + _dot(
            p.astype(v.dtype), v, _NN, cfg.interpret
        )
        m_scratch[...] = m_next

    _run_tile(
        cfg, offset_ref, visible, q_start, k_start, block_q, block_k, tail=tail, body=_compute
    )

    @pl.when(kv_block == pl.num_programs(3) - 1)
    def _finish():
        l = l_scratch[...]
        empty = l == 0.0  # a row that saw no key: output 0, lse +inf (p = 0 in the backward)
        l_safe = jnp.where(empty, 1.0, l)
        o_ref[...] = (acc_scratch[...] / l_safe).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(empty, jnp.inf, m_scratch[...] + jnp.log(l_safe))


def _probabilities(
    cfg, offset_ref, q, k, lse, q_start, k_start, block_q, block_k, q_seg_ref, kv_seg_ref, *, tail
):
    """exp(s - lse), zero where masked (``tail=None``: an entirely visible tile, no mask)."""
    s = _dot(q, k, _NT, cfg.interpret) * cfg.sm_scale
    # Rows that saw a non-finite key/value have lse = NaN (from the forward's flags).
    p = jnp.exp(s - lse)
    if tail is None:
        return p
    mask = _element_mask(
        cfg, offset_ref, q_start, k_start, block_q, block_k, q_seg_ref, kv_seg_ref, tail=tail
    )
    if mask is not None:
        p = jnp.where(mask, p, 0.0)
    return p


def _dq_kernel(
    offset_ref,
    mask_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    q_seg_ref,
    kv_seg_ref,
    dq_ref,
    dq_scratch,
    *,
    cfg,
):
    block_q, block_k = cfg.dq
    head, q_block, kv_block = pl.program_id(1), pl.program_id(2), pl.program_id(3)

    @pl.when(kv_block == 0)
    def _init():
        dq_scratch[...] = jnp.zeros(dq_scratch.shape, jnp.float32)

    visible = _tile_visible(cfg, offset_ref, mask_ref, head, q_block, kv_block, block_q, block_k)

    q_start, k_start = q_block * block_q, kv_block * block_k
    tail = cfg.kv_len % block_k != 0

    def _compute(masked):
        k, v = k_ref[...], v_ref[...]
        p = _probabilities(
            cfg,
            offset_ref,
            q_ref[...],
            k,
            lse_ref[...],
            q_start,
            k_start,
            block_q,
            block_k,
            q_seg_ref,
            kv_seg_ref,
            tail=tail if masked else None,
        )
        dp = _dot(do_ref[...], v, _NT, cfg.interpret)
        ds = p * (dp - delta_ref[...])
        dq_scratch[...] += _dot(ds.astype(k.dtype), k, _NN, cfg.interpret)

    _run_tile(
        cfg, offset_ref, visible, q_start, k_start, block_q, block_k, tail=tail, body=_compute
    )

    @pl.when(kv_block == pl.num_programs(3) - 1)
    def _finish():
        dq_ref[...] = (dq_scratch[...] * cfg.sm_scale).astype(dq_ref.dtype)


def _dkv_kernel(
    offset_ref,
    mask_ref,
    q_ref,
    k_ref,
    v_ref,
    do_ref,
    lse_ref,
    delta_ref,
    q_seg_ref,
    kv_seg_ref,
    dk_ref,
    dv_ref,
    dk_scratch,
    dv_scratch,
    *,
    cfg,
):
    block_q, block_k = cfg.dkv
    kv_head, kv_block = pl.program_id(1), pl.program_id(2)
    member, q_block = pl.program_id(3), pl.program_id(4)
    first = jnp.logical_and(member == 0, q_block == 0)
    last = jnp.logical_and(member == pl.num_programs(3) - 1, q_block == pl.num_programs(4) - 1)

    @pl.when(first)
    def _init():
        dk_scratch[...] = jnp.zeros(dk_scratch.shape, jnp.float32)
        dv_scratch[...] = jnp.zeros(dv_scratch.shape, jnp.float32)

    head = kv_head * cfg.group + member
    visible = _tile_visible(cfg, offset_ref, mask_ref, head, q_block, kv_block, block_q, block_k)

    q_start, k_start = q_block * block_q, kv_block * block_k

    def _compute(masked):
        q, do = q_ref[...], do_ref[...]
        k, v = k_ref[...], v_ref[...]
        # Padded keys need no mask: their dK/dV rows are cut off. Padded queries add nothing:
        # zero q and dO, lse = inf and delta = 0.
        p = _probabilities(
            cfg,
            offset_ref,
            q,
            k,
            lse_ref[...],
            q_start,
            k_start,
            block_q,
            block_k,
            q_seg_ref,
            kv_seg_ref,
            tail=False if masked else None,
        )
        dv_scratch[...] += _dot(p.astype(do.dtype), do, _TN, cfg.interpret)
        dp = _dot(do, v, _NT, cfg.interpret)
        ds = p * (dp - delta_ref[...])
        dk_scratch[...] += _dot(ds.astype(q.dtype), q, _TN, cfg.interpret)

    _run_tile(
        cfg, offset_ref, visible, q_start, k_start, block_q, block_k, tail=False, body=_compute
    )

    @pl.when(last)
    def _finish():
        dk_ref[...] = (dk_scratch[...] * cfg.sm_scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scratch[...].astype(dv_ref.dtype)


# --------------------------------------------------------------------------------------------
# pallas_call wrappers
# --------------------------------------------------------------------------------------------


def _last_kv_block(cfg, offset_ref, q_block, block_q, block_k, num_kv_blocks):
    """The last K/V block a causal query block sees (index maps clamp to it: no copy)."""
    last_row = offset_ref[0] + (q_block + 1) * block_q - 1
    return jnp.minimum(lax.div(last_row, block_k), num_kv_blocks - 1)


def _first_q_block(cfg, offset_ref, kv_block, block_q, block_k, num_q_blocks):
    """The first query block that sees a causal K/V block."""
    first_row = jnp.maximum(kv_block * block_k - offset_ref[0], 0)
    return jnp.minimum(lax.div(first_row, block_q), num_q_blocks - 1)


def _out(shape, dtype, like):
    """An output type varying over the same manual mesh axes as ``like`` (inside ``shard_map``
    with ``check_vma``, a pallas_call's outputs must say so)."""
    mat = getattr(jax.typeof(like), "mat", None)
    if mat is None:
        return jax.ShapeDtypeStruct(shape, dtype)
    return jax.ShapeDtypeStruct(shape, dtype, manual_axis_type=mat)


def _cost(cfg, q, k, matmuls, exps, *arrays):
    """What the kernel declares to XLA's scheduler (and to ``cost_analysis``): ``matmuls``
    (rows x keys x head_dim) products per score, ``exps`` exponentials per score, causal tiles
    counted as half."""
    batch, num_heads, q_len, head_dim = q.shape
    scores = batch * num_heads * q_len * k.shape[2] * (0.5 if cfg.causal else 1.0)
    nbytes = sum(a.size * a.dtype.itemsize for a in arrays if a is not None)
    return pl.CostEstimate(
        flops=int(2 * matmuls * scores * head_dim),
        transcendentals=int(exps * scores),
        bytes_accessed=int(nbytes),
    )


def _params(cfg, semantics, name):
    kwargs = dict(name=name)
    if cfg.interpret:
        kwargs["interpret"] = True
    else:
        kwargs["compiler_params"] = pltpu.CompilerParams(dimension_semantics=semantics)
    return kwargs


def _forward(q, k, v, q_seg, kv_seg, offset, flags, block_mask, cfg):
    batch, num_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    block_q, block_k = cfg.fwd
    num_kv_blocks = kv_len // block_k
    group = cfg.group

    def kv_block(b, h, i, j, offset_ref, mask_ref):
        if cfg.causal:
            return jnp.minimum(
                j, _last_kv_block(cfg, offset_ref, i, block_q, block_k, num_kv_blocks)
            )
        return j

    q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec(
        (None, None, block_k, head_dim),
        lambda b, h, i, j, *s: (b, lax.div(h, group), kv_block(b, h, i, j, *s), 0),
    )
    row_spec = pl.BlockSpec((None, None, block_q, 1), lambda b, h, i, j, *_: (b, h, i, 0))
    q_seg_spec = kv_seg_spec = flag_spec = None
    if q_seg is not None:
        q_seg_spec = pl.BlockSpec((None, block_q, 1), lambda b, h, i, j, *_: (b, i, 0))
        kv_seg_spec = pl.BlockSpec(
            (None, 1, block_k), lambda b, h, i, j, *s: (b, 0, kv_block(b, h, i, j, *s))
        )
    if flags is not None:
        flag_spec = pl.BlockSpec(
            (None, None, 1, block_k),
            lambda b, h, i, j, *s: (b, lax.div(h, group), 0, kv_block(b, h, i, j, *s)),
        )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, num_heads, q_len // block_q, num_kv_blocks),
        in_specs=[q_spec, kv_spec, kv_spec, q_seg_spec, kv_seg_spec, flag_spec],
        out_specs=[q_spec, row_spec],
        scratch_shapes=[
            pltpu.VMEM((block_q, 1), jnp.float32),
            pltpu.VMEM((block_q, 1), jnp.float32),
            pltpu.VMEM((block_q, head_dim), jnp.float32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=[
            _out(q.shape, q.dtype, q),
            _out((batch, num_heads, q_len, 1), jnp.float32, q),
        ],
        cost_estimate=_cost(cfg, q, k, 2, 1, q, k, v, q, flags),
        **_params(
            cfg, ("parallel", "parallel", "parallel", "arbitrary"), "flash_attention_tpu_fwd"
        ),
    )(offset, block_mask, q, k, v, q_seg, kv_seg, flags)


def _backward_dq(q, k, v, do, lse, delta, q_seg, kv_seg, offset, block_mask, cfg):
    batch, num_heads, q_len, head_dim = q.shape
    kv_len = k.shape[2]
    block_q, block_k = cfg.dq
    num_kv_blocks = kv_len // block_k
    group = cfg.group

    def kv_block(b, h, i, j, offset_ref, mask_ref):
        if cfg.causal:
            return jnp.minimum(
                j, _last_kv_block(cfg, offset_ref, i, block_q, block_k, num_kv_blocks)
            )
        return j

    q_spec = pl.BlockSpec((None, None, block_q, head_dim), lambda b, h, i, j, *_: (b, h, i, 0))
    kv_spec = pl.BlockSpec(
        (None, None, block_k, head_dim),
        lambda b, h, i, j, *s: (b, lax.div(h, group), kv_block(b, h, i, j, *s), 0),
    )
    row_spec = pl.BlockSpec((None, None, block_q, 1), lambda b, h, i, j, *_: (b, h, i, 0))
    q_seg_spec = kv_seg_spec = None
    if q_seg is not None:
        q_seg_spec = pl.BlockSpec((None, block_q, 1), lambda b, h, i, j, *_: (b, i, 0))
        kv_seg_spec = pl.BlockSpec(
            (None, 1, block_k), lambda b, h, i, j, *s: (b, 0, kv_block(b, h, i, j, *s))
        )
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, num_heads, q_len // block_q, num_kv_blocks),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, q_seg_spec, kv_seg_spec],
        out_specs=q_spec,
        scratch_shapes=[pltpu.VMEM((block_q, head_dim), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=_out(q.shape, q.dtype, q),
        cost_estimate=_cost(cfg, q, k, 3, 1, q, k, v, do, q),
        **_params(cfg, ("parallel", "parallel", "parallel", "arbitrary"), "flash_attention_tpu_dq"),
    )(offset, block_mask, q, k, v, do, lse, delta, q_seg, kv_seg)


def _backward_dkv(q, k, v, do, lse, delta, q_seg, kv_seg, offset, block_mask, cfg):
    batch, num_heads, q_len, head_dim = q.shape
    num_kv_heads, kv_len = k.shape[1], k.shape[2]
    block_q, block_k = cfg.dkv
    num_q_blocks = q_len // block_q
    group = cfg.group

    def q_block(b, g, j, m, i, offset_ref, mask_ref):
        if cfg.causal:
            return jnp.maximum(
                i, _first_q_block(cfg, offset_ref, j, block_q, block_k, num_q_blocks)
            )
        return i

    q_spec = pl.BlockSpec(
        (None, None, block_q, head_dim),
        lambda b, g, j, m, i, *s: (b, g * group + m, q_block(b, g, j, m, i, *s), 0),
    )
    kv_spec = pl.BlockSpec((None, None, block_k, head_dim), lambda b, g, j, m, i, *_: (b, g, j, 0))
    row_spec = pl.BlockSpec(
        (None, None, block_q, 1),
        lambda b, g, j, m, i, *s: (b, g * group + m, q_block(b, g, j, m, i, *s), 0),
    )
    q_seg_spec = kv_seg_spec = None
    if q_seg is not None:
        q_seg_spec = pl.BlockSpec(
            (None, block_q, 1), lambda b, g, j, m, i, *s: (b, q_block(b, g, j, m, i, *s), 0)
        )
        kv_seg_spec = pl.BlockSpec((None, 1, block_k), lambda b, g, j, m, i, *_: (b, 0, j))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(batch, num_kv_heads, kv_len // block_k, group, num_q_blocks),
        in_specs=[q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec, q_seg_spec, kv_seg_spec],
        out_specs=[kv_spec, kv_spec],
        scratch_shapes=[
            pltpu.VMEM((block_k, head_dim), jnp.float32),
            pltpu.VMEM((block_k, head_dim), jnp.float32),
        ],
    )
    return pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg),
        grid_spec=grid_spec,
        out_shape=[_out(k.shape, k.dtype, q), _out(v.shape, v.dtype, q)],
        cost_estimate=_cost(cfg, q, k, 4, 1, q, k, v, do, k, v),
        **_params(
            cfg,
            ("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
            "flash_attention_tpu_dkv",
        ),
    )(offset, block_mask, q, k, v, do, lse, delta, q_seg, kv_seg)


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _attention(q, k, v, q_seg, kv_seg, offset, flags, block_mask, cfg):
    return _forward(q, k, v, q_seg, kv_seg, offset, flags, block_mask, cfg)[0]


def _attention_fwd(q, k, v, q_seg, kv_seg, offset, flags, block_mask, cfg):
    out, lse = _forward(q, k, v, q_seg, kv_seg, offset, flags, block_mask, cfg)
    return out, (q, k, v, q_seg, kv_seg, offset, block_mask, out, lse)


def _attention_bwd(cfg, residuals, do):
    q, k, v, q_seg, kv_seg, offset, block_mask, out, lse = residuals
    q_len = q.shape[2]
    # delta_i = rowsum(dO_i * O_i): one O(N) pass, shared by both kernels.
    delta = jnp.sum(out.astype(jnp.float32) * do.astype(jnp.float32), axis=-1, keepdims=True)
    if q_len != cfg.q_len:
        # Padding rows (zero q and dO) add nothing to dK/dV: p = 0.
        real = (jnp.arange(q_len) < cfg.q_len)[:, None]
        lse = jnp.where(real, lse, jnp.inf)
        delta = jnp.where(real, delta, 0.0)
    do = do.astype(q.dtype)
    if cfg.has_flags:
        # A masked query's non-finite q, dO or delta must not reach a key through 0 * NaN: zero
        # them. A row that saw a non-finite key or value keeps lse = NaN, so it stays NaN.
        q = jnp.where(jnp.isfinite(q), q, jnp.zeros((), q.dtype))
        do = jnp.where(jnp.isfinite(do), do, jnp.zeros((), do.dtype))
        delta = jnp.where(jnp.isfinite(delta), delta, 0.0)
    args = (q, k, v, do, lse, delta, q_seg, kv_seg, offset, block_mask, cfg)
    dq = _backward_dq(*args)
    dk, dv = _backward_dkv(*args)
    return dq, dk, dv, None, None, None, None, None


_attention.defvjp(_attention_fwd, _attention_bwd)


def _fit(block: int, length: int, multiple: int) -> int:
    """``block`` shrunk to the length rounded up to ``multiple`` (no long padding)."""
    return min(block, _round_up(length, multiple))


@functools.partial(
    jax.jit,
    static_argnames=("causal", "sm_scale", "block_sizes", "block_shape", "interpret"),
)
def flash_attention_tpu(
    query,
    key,
    value,
    segment_ids,
    q_offset,
    block_mask,
    *,
    causal: bool,
    sm_scale: float,
    block_sizes: BlockSizes,
    block_shape: tuple[int, int] | None,
    interpret: bool,
):
    """The TPU kernels on normalised arguments (``[batch, seq, heads, head_dim]`` layout).

    ``segment_ids`` is an int32 pair or None, ``q_offset`` an int32 scalar or None,
    ``block_mask`` bool ``[1 or heads, q_tiles, kv_tiles]`` of ``block_shape`` tiles or None
    (every kernel tile must then divide the mask tile: see :func:`resolve_block_sizes`).
    """
    batch, q_len, num_heads, head_dim = query.shape
    kv_len, num_kv_heads = key.shape[1], key.shape[2]
    q_multiple, k_multiple = (8, 8) if interpret else (16, _LANES)
    if block_mask is None:
        tiles = [
            (_fit(bq, q_len, q_multiple), _fit(bk, kv_len, k_multiple))
            for bq, bk in (block_sizes.fwd, block_sizes.dkv, block_sizes.dq)
        ]
    else:
        tiles = [block_sizes.fwd, block_sizes.dkv, block_sizes.dq]
    q_len_p = _round_up(q_len, math.lcm(*(t[0] for t in tiles)))
    kv_len_p = _round_up(kv_len, math.lcm(*(t[1] for t in tiles)))
    if block_mask is not None:
        q_len_p = _round_up(q_len_p, block_shape[0])
        kv_len_p = _round_up(kv_len_p, block_shape[1])
    head_dim_p = (
        head_dim if head_dim == 64 or head_dim % _LANES == 0 else _round_up(head_dim, _LANES)
    )

    has_flags = causal or segment_ids is not None or block_mask is not None
    flags = None
    if has_flags:
        # Element masking: a masked key's non-finite entry must meet no zero weight (0 * NaN).
        k_finite, v_finite = jnp.isfinite(key), jnp.isfinite(value)
        bad = ~(jnp.all(k_finite, axis=-1) & jnp.all(v_finite, axis=-1))  # [b, kv, kv_heads]
        flags = jnp.where(bad, jnp.nan, 0.0).astype(jnp.float32).transpose(0, 2, 1)
        flags = jnp.pad(flags, ((0, 0), (0, 0), (0, kv_len_p - kv_len)))[:, :, None, :]
        key = jnp.where(k_finite, key, jnp.zeros((), key.dtype))
        value = jnp.where(v_finite, value, jnp.zeros((), value.dtype))

    def layout(x, length):  # [b, s, h, d] -> [b, h, s_padded, d_padded]
        x = jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, head_dim_p - head_dim)))
        return x.transpose(0, 2, 1, 3)

    q, k, v = layout(query, q_len_p), layout(key, kv_len_p), layout(value, kv_len_p)
    q_seg = kv_seg = None
    if segment_ids is not None:
        q_seg = jnp.pad(segment_ids[0], ((0, 0), (0, q_len_p - q_len)))[:, :, None]
        kv_seg = jnp.pad(segment_ids[1], ((0, 0), (0, kv_len_p - kv_len)))[:, None, :]
    offset = jnp.zeros((1,), jnp.int32) if q_offset is None else jnp.reshape(q_offset, (1,))
    offset = offset.astype(jnp.int32)
    if block_mask is None:
        mask_words = jnp.zeros((1,), jnp.int32)
        mask_heads, mask_grid = 0, (1, 1)
    else:
        mask_heads, rows, cols = block_mask.shape
        rows_p, cols_p = q_len_p // block_shape[0], kv_len_p // block_shape[1]
        padded = jnp.pad(block_mask, ((0, 0), (0, rows_p - rows), (0, cols_p - cols)))
        bits = padded.reshape(-1)
        bits = jnp.pad(bits, (0, -bits.shape[0] % 32)).reshape(-1, 32).astype(jnp.uint32)
        words = jnp.sum(bits << jnp.arange(32, dtype=jnp.uint32), axis=1, dtype=jnp.uint32)
        mask_words = lax.bitcast_convert_type(words, jnp.int32)
        mask_grid = (rows_p, cols_p)
    cfg = _Config(
        q_len=q_len,
        kv_len=kv_len,
        fwd=tiles[0],
        dkv=tiles[1],
        dq=tiles[2],
        causal=causal,
        sm_scale=sm_scale,
        has_segments=segment_ids is not None,
        has_flags=has_flags,
        mask_heads=mask_heads,
        mask_tile=block_shape or (1, 1),
        mask_grid=mask_grid,
        group=num_heads // num_kv_heads,
        interpret=interpret,
    )
    out = _attention(q, k, v, q_seg, kv_seg, offset, flags, mask_words, cfg)
    return out.transpose(0, 2, 1, 3)[:, :q_len, :, :head_dim]


def resolve_block_sizes(
    block_sizes: BlockSizes | None, block_shape: tuple[int, int] | None, head_dim: int
) -> BlockSizes:
    """The tiles of one call: the defaults, or with a block mask every tile capped at and
    dividing the mask tile (raises ValueError when a configured tile does not divide it)."""
    if block_sizes is None:
        block_sizes = BlockSizes.get_default(head_dim=head_dim)
        explicit = False
    else:
        explicit = True
    if block_shape is None:
        return block_sizes
    filled = {}
    for name in ("block_q", "block_k", "block_q_dkv", "block_k_dkv", "block_q_dq", "block_k_dq"):
        side = block_shape[0] if "_q" in name else block_shape[1]
        value = getattr(block_sizes, name)
        if value is None:
            value = getattr(block_sizes, "block_q" if "_q" in name else "block_k")
        if not explicit:
            value = min(value, side)
            while side % value:
                value //= 2
        if side % value or value % 8:
            raise ValueError(
                f"with a block_mask every tile must divide the mask tile {block_shape}: "
                f"{name}={value}"
            )
        filled[name] = value
    return BlockSizes(**filled)
