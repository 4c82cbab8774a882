"""FlashAttention as Pallas (Triton) kernels: exact attention in O(N) memory, forward and backward.

Tri Dao, Daniel Y. Fu, Stefano Ermon, Atri Rudra, Christopher Re, "FlashAttention: Fast and
Memory-Efficient Exact Attention with IO-Awareness", arXiv:2205.14135 (2022); Tri Dao,
"FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning",
arXiv:2307.08691 (2023).

Q is cut into row blocks; each block streams the K/V blocks it may see, keeping a running row
max and row sum (online softmax), and writes O and the log-sum-exp, never an S x S array. The
backward pass recomputes the scores tile by tile from Q, K, V, O, lse and dO
(delta = rowsum(dO * O)): one kernel accumulates dQ per Q block, one dK/dV per K/V block.

Layout is `[batch, seq, heads, head_dim]`, as in `jax.nn.dot_product_attention`. Causal masking
is aligned at the top left (query i sees keys j <= i), also as there, optionally shifted by a
traced `q_offset` (decoding with a cache). Tiles that cannot contribute (above the causal
diagonal, or off in a `block_mask`) are skipped through the loop bounds, not computed and zeroed.
In tiles that are partly masked, non-finite inputs are zeroed before they meet a masked (zero)
weight, and the rows that do see them are made NaN, so a masked key never influences an output
or a gradient. Rows that see no key at all give zeros and zero gradients.

`PallasTritonAttention` is the kernel's implementation of the attention op
(`pallas_kernels.attention.base`); `flash_attention` calls it directly.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._compat import check_interpret
from pallas_kernels._compat import compiler_params_kwargs
from pallas_kernels._compat import default_interpret
from pallas_kernels._compat import has_triton_backend
from pallas_kernels._compat import multiple_of
from pallas_kernels._compat import resolve_interpret
from pallas_kernels.attention.base import ATTENTION_OP
from pallas_kernels.attention.base import AttentionImplementation
from pallas_kernels.attention.base import dot_product_attention
from pallas_kernels.op import Unsupported

# A finite "minus infinity": masked scores must not turn max/exp arithmetic into inf - inf.
_MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)
_LOG2E = math.log2(math.e)
_MAX_HEAD_DIM = 256
_MIN_BLOCK = 16  # Triton's dot needs tiles of at least 16 x 16.
_MAX_BLOCK = 1024


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


# --------------------------------------------------------------------------------------------
# Block sizes
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (and GPU launch parameters) of the three kernels.

    Attributes:
      block_q, block_k: query / key rows per tile in the forward kernel. With a `block_mask`
        they are the mask's granularity; the backward tiles must then divide them (unset ones
        take the backend defaults, capped at the mask tile).
      block_q_dkv, block_k_dkv: tile of the dK/dV kernel (None: block_q, block_k).
      block_q_dq, block_k_dq: tile of the dQ kernel (None: block_q, block_k).
      num_warps: Triton warps per program (None: 4 for head_dim <= 64, else 8). GPU only.
      num_stages: Triton software-pipelining depth. GPU only.

    Every block size is a power of two in [16, 1024]. Without a `block_mask`,
    `flash_attention` shrinks a block that is longer than the (power-of-two rounded) sequence,
    so short sequences are not padded to a full default block.
    """

    block_q: int = 128
    block_k: int = 64
    block_q_dkv: int | None = None
    block_k_dkv: int | None = None
    block_q_dq: int | None = None
    block_k_dq: int | None = None
    num_warps: int | None = None
    num_stages: int = 2

    def __post_init__(self):
        for name in (
            "block_q",
            "block_k",
            "block_q_dkv",
            "block_k_dkv",
            "block_q_dq",
            "block_k_dq",
        ):
            value = getattr(self, name)
            if value is None and name not in ("block_q", "block_k"):
                continue
            if (
                not isinstance(value, int | np.integer)
                or isinstance(value, bool)
                or not _MIN_BLOCK <= value <= _MAX_BLOCK
                or not _is_power_of_two(int(value))
            ):
                raise ValueError(
                    f"{name}={value!r} must be a power of two in [{_MIN_BLOCK}, {_MAX_BLOCK}]"
                )
        if self.num_warps is not None and not (
            isinstance(self.num_warps, int) and self.num_warps in (1, 2, 4, 8, 16)
        ):
            raise ValueError(f"num_warps={self.num_warps!r} must be None or one of 1, 2, 4, 8, 16")
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages={self.num_stages!r} must be an int in [1, 8]")

    @classmethod
    def get_default(cls, backend: str | None = None, *, head_dim: int = 128) -> BlockSizes:
        """Defaults per backend: 'gpu' (compiled Triton) or 'cpu' (interpret mode).

        `backend=None` picks 'cpu' when Pallas would run in interpret mode here, else 'gpu'.
        The GPU sizes follow FlashAttention-2's Triton kernels (128 x 64 forward tiles, narrower
        backward tiles), chosen so that no kernel spills registers on sm_80 or sm_90a in the
        deviceless compile check (`make gpu-check`); not yet timed on a GPU. head_dim <= 64 uses
        a 64 x 32 dK/dV tile: 32 x 64 spilled on sm_80 with GQA.
        """
        if backend is None:
            backend = "cpu" if default_interpret() else "gpu"
        if backend == "gpu":
            if head_dim <= 64:
                return cls(128, 64, 64, 32, 64, 32, num_stages=2)
            if head_dim <= 128:
                return cls(128, 64, 32, 64, 64, 32, num_stages=2)
            return cls(64, 32, 16, 32, 32, 16, num_stages=2)
        if backend == "cpu":
            # Interpret mode pays per grid step and per loop iteration: use large tiles.
            return cls(128, 128)
        raise ValueError(f"{backend=} must be 'gpu', 'cpu' or None")

    @property
    def dkv(self) -> tuple[int, int]:
        """(block_q, block_k) of the dK/dV kernel."""
        return (self.block_q_dkv or self.block_q, self.block_k_dkv or self.block_k)

    @property
    def dq(self) -> tuple[int, int]:
        """(block_q, block_k) of the dQ kernel."""
        return (self.block_q_dq or self.block_q, self.block_k_dq or self.block_k)


def _tile_shape(block_sizes: BlockSizes | tuple[int, int]) -> tuple[int, int]:
    if isinstance(block_sizes, BlockSizes):
        return block_sizes.block_q, block_sizes.block_k
    try:
        block_q, block_k = block_sizes
    except (TypeError, ValueError):
        raise ValueError(
            f"{block_sizes=} must be a BlockSizes or a (block_q, block_k) pair"
        ) from None
    checked = BlockSizes(block_q, block_k)  # validates both sizes
    return checked.block_q, checked.block_k


# --------------------------------------------------------------------------------------------
# Block-mask helpers
# --------------------------------------------------------------------------------------------


def causal_block_mask(
    q_len: int, kv_len: int, block_sizes: BlockSizes | tuple[int, int]
) -> jax.Array:
    """Block mask `[1, q_blocks, kv_blocks]` of the tiles that causal attention touches.

    A tile is on when some query i in it may see some key j <= i in it (top-left alignment).
    """
    return local_block_mask(q_len, kv_len, block_sizes, window_left=None, window_right=0)


def local_block_mask(
    q_len: int,
    kv_len: int,
    block_sizes: BlockSizes | tuple[int, int],
    *,
    window_left: int | None,
    window_right: int | None = 0,
) -> jax.Array:
    """Block mask `[1, q_blocks, kv_blocks]` for sliding-window (local) attention.

    Query i may see keys j with `i - window_left <= j <= i + window_right` (`None`: unbounded
    on that side). A tile is on when any of its (query, key) pairs is in the window. Pair the
    mask with `causal=True` (and `window_right=0`) for causal sliding-window attention; the
    kernel then masks inside the diagonal tiles, but the window edges are only resolved to
    whole tiles, so the result equals dense attention under the block-expanded mask.

    Example:
      >>> mask = local_block_mask(256, 256, (64, 64), window_left=64, window_right=0)
      >>> mask.shape
      (1, 4, 4)
    """
    block_q, block_k = _tile_shape(block_sizes)
    for name, value in (("q_len", q_len), ("kv_len", kv_len)):
        if not isinstance(value, int | np.integer) or value <= 0:
            raise ValueError(f"{name}={value!r} must be a positive int")
    for name, value in (("window_left", window_left), ("window_right", window_right)):
        if value is not None and (not isinstance(value, int | np.integer) or value < 0):
            raise ValueError(f"{name}={value!r} must be None or a non-negative int")
    q_first = np.arange(0, q_len, block_q)
    q_last = np.minimum(q_first + block_q, q_len) - 1
    k_first = np.arange(0, kv_len, block_k)
    k_last = np.minimum(k_first + block_k, kv_len) - 1
    # Offsets j - i inside a tile span [k_first - q_last, k_last - q_first]; the tile is on
    # when that interval meets [-window_left, window_right].
    on = np.ones((len(q_first), len(k_first)), dtype=bool)
    if window_right is not None:
        on &= (k_first[None, :] - q_last[:, None]) <= window_right
    if window_left is not None:
        on &= (k_last[None, :] - q_first[:, None]) >= -window_left
    return jnp.asarray(on[None])


def block_mask_from_mask(
    element_mask: jax.Array, block_sizes: BlockSizes | tuple[int, int]
) -> jax.Array:
    """Block mask `[heads or 1, q_blocks, kv_blocks]`: a tile is on if any element is on.

    Args:
      element_mask: bool `[q_len, kv_len]` or `[heads or 1, q_len, kv_len]`, True = attend.
      block_sizes: the tiles (BlockSizes or (block_q, block_k)) passed to `flash_attention`.

    Returns:
      The block mask. Attention with it equals dense attention under the block-expanded mask,
      which contains `element_mask`; pass the element mask's structure through `causal=` or
      `segment_ids=` as well when exact element masking is needed.
    """
    block_q, block_k = _tile_shape(block_sizes)
    mask = jnp.asarray(element_mask)
    if mask.dtype != jnp.bool_ or mask.ndim not in (2, 3):
        raise ValueError(
            f"element_mask of shape {mask.shape} and dtype {mask.dtype} must be bool "
            "[q_len, kv_len] or [heads or 1, q_len, kv_len]"
        )
    if mask.ndim == 2:
        mask = mask[None]
    heads, q_len, kv_len = mask.shape
    q_blocks, kv_blocks = -(-q_len // block_q), -(-kv_len // block_k)
    mask = jnp.pad(
        mask, ((0, 0), (0, q_blocks * block_q - q_len), (0, kv_blocks * block_k - kv_len))
    )
    mask = mask.reshape(heads, q_blocks, block_q, kv_blocks, block_k)
    return jnp.any(mask, axis=(2, 4))


# --------------------------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Config:
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


def _dot(a, b, *, transpose_a=False, transpose_b=False):
    """a @ b with float32 accumulation (full float32 precision for float32 inputs)."""
    dims = (((0,) if transpose_a else (1,), (1,) if transpose_b else (0,)), ((), ()))
    # The Triton lowering maps DEFAULT precision to tf32 for float32; HIGHEST keeps IEEE.
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _tile_mask(cfg, q_pos, k_start, block_q, block_k, q_seg, kv_seg, *, mask_tail):
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


def _fori(lower, upper, body, carry):
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

    return _fori(0, read_list(0), one, carry)


def _loop_over_kv(cfg, tile, carry, q_pos, block_q, block_k, read_list, sub=1):
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
    carry = _fori(0, split, lambda j, c: tile(j, c, False), carry)
    return _fori(split, upper, lambda j, c: tile(j, c, True), carry)


def _loop_over_q(cfg, tile, carry, k_start, offset, block_q, block_k, read_list, sub=1):
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
    carry = _fori(lower, split, lambda i, c: tile(i, c, True), carry)
    return _fori(split, num_q_blocks, lambda i, c: tile(i, c, False), carry)


def _read_offset(cfg, offset_ref):
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
    q_pos = q_start + _read_offset(cfg, offset_ref)
    q = q_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]
    scale = cfg.sm_scale * _LOG2E  # scores in base 2: exp2 is the native instruction
    mask_tail = cfg.kv_len % block_k != 0

    def tile(kv_block, carry, masked):
        acc, m_prev, l_prev = carry
        k_start = multiple_of(kv_block * block_k, block_k)
        keys = pl.ds(k_start, block_k)
        s = _dot(q, k_ref[keys, :], transpose_b=True) * scale
        if flag_ref is not None:
            # K/V arrive with non-finite entries zeroed (so a masked one cannot leak 0 * NaN
            # into p @ v); the rows that see such a key become NaN through its flag instead.
            s = s + flag_ref[keys][None, :]
        mask = None
        if masked:
            kv_seg = None if kv_seg_ref is None else kv_seg_ref[keys]
            mask = _tile_mask(
                cfg, q_pos, k_start, block_q, block_k, q_seg, kv_seg, mask_tail=mask_tail
            )
        if mask is not None:
            s = jnp.where(mask, s, _MASK_VALUE)
        m_next = jnp.maximum(m_prev, jnp.max(s, axis=1))
        correction = jnp.exp2(m_prev - m_next)
        p = jnp.exp2(s - m_next[:, None])
        if mask is not None:
            # A row with no visible key in this tile must add nothing (its max is _MASK_VALUE).
            p = jnp.where(mask, p, 0.0)
        l_next = correction * l_prev + jnp.sum(p, axis=1)
        v = v_ref[keys, :]
        acc = correction[:, None] * acc + _dot(p.astype(v.dtype), v)
        return acc, m_next, l_next

    carry = (
        jnp.zeros(q.shape, jnp.float32),
        jnp.full((block_q,), _MASK_VALUE, jnp.float32),
        jnp.zeros((block_q,), jnp.float32),
    )
    read_list = None if list_ref is None else (lambda t: list_ref[t])
    acc, m, l = _loop_over_kv(cfg, tile, carry, q_pos, block_q, block_k, read_list)
    empty = l == 0.0  # a row that saw no key: output 0, lse +inf (so p = 0 in the backward)
    l_safe = jnp.where(empty, 1.0, l)
    o_ref[...] = (acc / l_safe[:, None]).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(empty, jnp.inf, m + jnp.log2(l_safe))


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
    q_pos = q_start + _read_offset(cfg, offset_ref)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    q_seg = None if q_seg_ref is None else q_seg_ref[...]
    scale = cfg.sm_scale * _LOG2E
    mask_tail = cfg.kv_len % block_k != 0

    def tile(kv_block, dq, masked):
        k_start = multiple_of(kv_block * block_k, block_k)
        keys = pl.ds(k_start, block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        mask = None
        if masked:
            kv_seg = None if kv_seg_ref is None else kv_seg_ref[keys]
            mask = _tile_mask(
                cfg, q_pos, k_start, block_q, block_k, q_seg, kv_seg, mask_tail=mask_tail
            )
        # Rows that saw a non-finite key/value have lse = NaN (from the forward's flags).
        p = jnp.exp2(_dot(q, k, transpose_b=True) * scale - lse[:, None])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = _dot(do, v, transpose_b=True)
        ds = p * (dp - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    read_list = None if list_ref is None else (lambda t: list_ref[t])
    dq = jnp.zeros(q.shape, jnp.float32)
    sub = cfg.block_k // block_k  # dQ tiles per block-mask column
    dq = _loop_over_kv(cfg, tile, dq, q_pos, block_q, block_k, read_list, sub)
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
    offset = _read_offset(cfg, offset_ref)
    k, v = k_ref[...], v_ref[...]
    kv_seg = None if kv_seg_ref is None else kv_seg_ref[...]
    scale = cfg.sm_scale * _LOG2E

    def tile(q_block, carry, masked, head):
        dk, dv = carry
        q_start = multiple_of(q_block * block_q, block_q)
        rows = pl.ds(q_start, block_q)
        q, do = q_ref[rows, head, :], do_ref[rows, head, :]
        lse, delta = lse_ref[head, rows], delta_ref[head, rows]
        mask = None
        if masked:
            # Padded keys need no mask here: their dK/dV rows are cut off by the caller. Padded
            # queries add nothing: zero q and dO, lse = inf and delta = 0 (see _backward).
            q_seg = None if q_seg_ref is None else q_seg_ref[rows]
            mask = _tile_mask(
                cfg, q_start + offset, k_start, block_q, block_k, q_seg, kv_seg, mask_tail=False
            )
        p = jnp.exp2(_dot(q, k, transpose_b=True) * scale - lse[:, None])
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dv = dv + _dot(p.astype(do.dtype), do, transpose_a=True)
        dp = _dot(do, v, transpose_b=True)
        ds = p * (dp - delta[:, None])
        dk = dk + _dot(ds.astype(q.dtype), q, transpose_a=True)
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
        return _loop_over_q(cfg, body, carry, k_start, offset, block_q, block_k, read_list, sub)

    zeros = jnp.zeros(k.shape, jnp.float32)
    dk, dv = _fori(0, group, one_head, (zeros, zeros))
    dk_ref[...] = (dk * cfg.sm_scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


# --------------------------------------------------------------------------------------------
# pallas_call wrappers
# --------------------------------------------------------------------------------------------


def _num_warps(cfg, head_dim):
    if cfg.num_warps is not None:
        return cfg.num_warps
    return 4 if head_dim <= 64 else 8


def _call(kernel, cfg, head_dim, name, **kwargs):
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


def _row_list_spec(cfg, lists, heads_per_program, per_mask_tile=1):
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


def _offset_spec(offset):
    return None if offset is None else pl.BlockSpec((1,), lambda r, b, h: (0,))


def _flag_spec(flags, group, kv_len):
    if flags is None:
        return None
    return pl.BlockSpec((None, None, kv_len), lambda i, b, h: (b, lax.div(h, group), 0))


def _forward(q, k, v, q_seg, kv_seg, offset, flags, kv_lists, cfg):
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
    out, lse = _call(
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
            _offset_spec(offset),
            _flag_spec(flags, group, kv_len),
            _row_list_spec(cfg, kv_lists, None),
        ],
        out_specs=[q_spec, pl.BlockSpec((None, None, block_q), lambda i, b, h: (b, h, i))],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((batch, num_heads, q_len), jnp.float32),
        ],
    )(q, k, v, q_seg, kv_seg, offset, flags, kv_lists)
    return out, lse


def _backward(cfg, residuals, do):
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
    dq = _call(
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
            _offset_spec(offset),
            _row_list_spec(cfg, kv_lists, None, cfg.block_q // block_q),
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
    dk, dv = _call(
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
            _offset_spec(offset),
            _row_list_spec(cfg, q_lists, group, cfg.block_k // block_k),
        ],
        out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
    )(q, k, v, do, lse, delta, q_seg, kv_seg, offset, q_lists)
    return dq, dk, dv, None, None, None, None, None


@functools.partial(jax.custom_vjp, nondiff_argnums=(8,))
def _flash_attention_padded(q, k, v, q_seg, kv_seg, offset, flags, lists, cfg):
    kv_lists = None if lists is None else lists[0]
    return _forward(q, k, v, q_seg, kv_seg, offset, flags, kv_lists, cfg)[0]


def _flash_attention_padded_fwd(q, k, v, q_seg, kv_seg, offset, flags, lists, cfg):
    kv_lists = None if lists is None else lists[0]
    out, lse = _forward(q, k, v, q_seg, kv_seg, offset, flags, kv_lists, cfg)
    return out, (q, k, v, q_seg, kv_seg, offset, lists, out, lse)


_flash_attention_padded.defvjp(_flash_attention_padded_fwd, _backward)


def _tile_lists(block_mask: jax.Array) -> jax.Array:
    """`[h, rows, cols]` bool -> int32 `[h, rows, 1 + cols]`: count, then the on columns in order."""
    count = jnp.sum(block_mask, axis=-1, dtype=jnp.int32)
    order = jnp.argsort(jnp.logical_not(block_mask), axis=-1, stable=True).astype(jnp.int32)
    return jnp.concatenate([count[..., None], order], axis=-1)


def _resolve_block_sizes(block_sizes, q_len, kv_len, has_block_mask):
    """Concrete tiles: backward defaults filled in, and (without a block mask) blocks shrunk to
    the sequence so a short sequence is not padded to a long default block."""
    tiles = [
        (block_sizes.block_q, block_sizes.block_k),
        block_sizes.dkv,
        block_sizes.dq,
    ]
    if not has_block_mask:
        q_cap = max(_MIN_BLOCK, _next_power_of_two(q_len))
        kv_cap = max(_MIN_BLOCK, _next_power_of_two(kv_len))
        tiles = [(min(bq, q_cap), min(bk, kv_cap)) for bq, bk in tiles]
    return tiles


@functools.partial(
    jax.jit,
    static_argnames=("causal", "sm_scale", "block_sizes", "interpret"),
)
def _flash_attention_impl(
    q, k, v, segment_ids, q_offset, block_mask, *, causal, sm_scale, block_sizes, interpret
):
    batch, q_len, num_heads, head_dim = q.shape
    kv_len = k.shape[1]
    (bq, bk), (bq_dkv, bk_dkv), (bq_dq, bk_dq) = _resolve_block_sizes(
        block_sizes, q_len, kv_len, block_mask is not None
    )
    q_len_padded = _round_up(q_len, max(bq, bq_dkv, bq_dq))
    kv_len_padded = _round_up(kv_len, max(bk, bk_dkv, bk_dq))
    head_dim_padded = max(_MIN_BLOCK, _next_power_of_two(head_dim))

    def pad(x, length):
        widths = ((0, 0), (0, length - x.shape[1]), (0, 0), (0, head_dim_padded - head_dim))
        return jnp.pad(x, widths) if any(w[1] for w in widths) else x

    has_flags = causal or segment_ids is not None
    flags = None
    if has_flags:
        # Element masking: a masked key's non-finite entry must meet no zero weight (0 * NaN).
        k_finite, v_finite = jnp.isfinite(k), jnp.isfinite(v)
        bad = ~(jnp.all(k_finite, axis=-1) & jnp.all(v_finite, axis=-1))  # [b, kv, kv_heads]
        flags = jnp.where(bad, jnp.nan, 0.0).astype(jnp.float32).transpose(0, 2, 1)
        flags = jnp.pad(flags, ((0, 0), (0, 0), (0, kv_len_padded - kv_len)))
        k = jnp.where(k_finite, k, jnp.zeros((), k.dtype))
        v = jnp.where(v_finite, v, jnp.zeros((), v.dtype))
    q_p, k_p, v_p = pad(q, q_len_padded), pad(k, kv_len_padded), pad(v, kv_len_padded)
    q_seg = kv_seg = None
    if segment_ids is not None:
        q_seg = jnp.pad(segment_ids[0], ((0, 0), (0, q_len_padded - q_len)))
        kv_seg = jnp.pad(segment_ids[1], ((0, 0), (0, kv_len_padded - kv_len)))
    offset = None if q_offset is None else jnp.reshape(q_offset.astype(jnp.int32), (1,))
    lists = None
    if block_mask is not None:
        if causal:
            block_mask = block_mask & causal_block_mask(q_len, kv_len, (bq, bk))
        lists = (_tile_lists(block_mask), _tile_lists(jnp.swapaxes(block_mask, 1, 2)))
    cfg = _Config(
        q_len=q_len,
        kv_len=kv_len,
        block_q=bq,
        block_k=bk,
        block_q_dkv=bq_dkv,
        block_k_dkv=bk_dkv,
        block_q_dq=bq_dq,
        block_k_dq=bk_dq,
        causal=causal,
        has_offset=offset is not None,
        sm_scale=sm_scale,
        has_segments=segment_ids is not None,
        has_flags=has_flags,
        mask_heads=0 if block_mask is None else block_mask.shape[0],
        interpret=interpret,
        num_warps=block_sizes.num_warps,
        num_stages=block_sizes.num_stages,
    )
    out = _flash_attention_padded(q_p, k_p, v_p, q_seg, kv_seg, offset, flags, lists, cfg)
    return out[:, :q_len, :, :head_dim]


# --------------------------------------------------------------------------------------------
# The implementation of the attention op, and the kernel's own entry points
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class PallasTritonAttention(AttentionImplementation):
    """FlashAttention Pallas kernels (``implementation='pallas_triton'``, alias ``'pallas'``).

    Expresses causal masks (with ``q_offset``), segment ids (so padding) and block-sparse masks,
    with GQA; refuses a dense boolean ``mask``, a ``bias`` and dropout, so ``'auto'`` falls
    through. Differentiable by ``jax.grad`` (backward kernels), not by ``jax.jvp``.

    Attributes:
      block_sizes: tiles and GPU launch parameters; default ``BlockSizes.get_default()`` (with
        a block mask: its ``block_shape``). With a block mask, the forward tile must equal the
        mask's ``block_shape`` and the backward tiles must divide it.
      interpret: Pallas interpret mode; ``None``: interpret unless on a GPU.
    """

    name = "pallas_triton"
    supports_forward_mode = False
    block_sizes: BlockSizes | None = None
    interpret: bool | None = None

    def __post_init__(self):
        if self.block_sizes is not None and not isinstance(self.block_sizes, BlockSizes):
            raise ValueError(f"block_sizes={self.block_sizes!r} must be a BlockSizes or None")
        check_interpret(self.interpret)  # validates without asking JAX for a backend

    def __call__(
        self,
        query: jax.Array,
        key: jax.Array,
        value: jax.Array,
        *,
        bias: jax.Array | None,
        mask: jax.Array | None,
        causal: bool,
        q_offset: jax.Array | None,
        segment_ids: tuple[jax.Array, jax.Array] | None,
        block_mask: jax.Array | None,
        block_shape: tuple[int, int] | None,
        sm_scale: float,
        dropout_rate: float,
        dropout_rng: jax.Array | None,
        broadcast_dropout: bool,
        precision: Any,
    ) -> jax.Array:
        del dropout_rng, broadcast_dropout, precision  # float32 dots run at HIGHEST precision
        if mask is not None:
            raise Unsupported(
                "a dense boolean mask cannot be tiled; pass causal=, segment_ids= or a block_mask"
            )
        if bias is not None:
            raise Unsupported("an additive bias is not supported by the kernel")
        if dropout_rate > 0.0:
            raise Unsupported("dropout is not supported by the kernel")
        head_dim = query.shape[-1]
        if head_dim > _MAX_HEAD_DIM:
            raise Unsupported(f"head_dim={head_dim} > {_MAX_HEAD_DIM}")
        interpret = resolve_interpret(self.interpret)
        if not interpret and not has_triton_backend():
            raise Unsupported("this JAX has no Pallas Triton backend (removed after 0.12?)")
        block_sizes = self.block_sizes
        if block_mask is not None:
            if q_offset is not None:
                raise Unsupported("a block_mask with q_offset is not supported by the kernel")
            block_sizes = _block_mask_tiles(block_sizes, tuple(block_shape), interpret, head_dim)
        if block_sizes is None:
            block_sizes = BlockSizes.get_default("cpu" if interpret else "gpu", head_dim=head_dim)
        return _flash_attention_impl(
            query,
            key,
            value,
            segment_ids,
            q_offset,
            block_mask,
            causal=causal,
            sm_scale=sm_scale,
            block_sizes=block_sizes,
            interpret=interpret,
        )


ATTENTION_OP.register(PallasTritonAttention())


def _block_mask_tiles(block_sizes, block_shape, interpret, head_dim):
    """The tiles of a block-sparse call: the forward tile is the mask's; backward tiles divide
    it (unset ones: the backend's defaults, capped at the mask tile), so the backward kernels
    keep their register-friendly tiles under a coarse mask."""
    if block_sizes is None:
        block_sizes = BlockSizes(*block_shape)
    tile = (block_sizes.block_q, block_sizes.block_k)
    if tile != block_shape:
        raise Unsupported(
            f"block_shape={block_shape} differs from the kernel's forward tile {tile} (block_sizes)"
        )
    default = BlockSizes.get_default("cpu" if interpret else "gpu", head_dim=head_dim)
    filled = {}
    for name, fallback, mask_side in (
        ("block_q_dkv", default.dkv[0], tile[0]),
        ("block_k_dkv", default.dkv[1], tile[1]),
        ("block_q_dq", default.dq[0], tile[0]),
        ("block_k_dq", default.dq[1], tile[1]),
    ):
        value = getattr(block_sizes, name)
        if value is None:
            value = min(fallback, mask_side)
        if mask_side % value:
            raise Unsupported(
                f"with a block_mask the backward tiles must divide the mask tile {tile}, got "
                f"{name}={value}"
            )
        filled[name] = value
    return dataclasses.replace(block_sizes, **filled)


def _kernel_block_mask(block_mask, block_sizes):
    if block_mask is None:
        return None
    if block_sizes is None:
        raise ValueError("block_mask needs the block_sizes it was built with (block_sizes=None)")
    if not isinstance(block_sizes, BlockSizes):
        raise ValueError(f"block_sizes={block_sizes!r} must be a BlockSizes or None")
    return (block_sizes.block_q, block_sizes.block_k)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    sm_scale: float | None = None,
    block_mask: jax.Array | None = None,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """Exact softmax attention in O(seq) memory, differentiable through Pallas kernels.

    The kernel itself; :func:`pallas_kernels.dot_product_attention` is the op that chooses it.

    Args:
      q: `[batch, q_len, num_heads, head_dim]`, float32, bfloat16 or float16.
      k, v: `[batch, kv_len, num_kv_heads, head_dim]`, same dtype; `num_kv_heads` divides
        `num_heads` (GQA / MQA: query head h uses K/V head `h // (num_heads // num_kv_heads)`).
      causal: query i sees keys j <= i (top-left aligned, as `jax.nn.dot_product_attention`).
      segment_ids: `(q_segment_ids [batch, q_len], kv_segment_ids [batch, kv_len])` ints;
        a query sees only keys with the same id (packed sequences).
      sm_scale: score scale, default `1 / sqrt(head_dim)`.
      block_mask: bool `[num_heads or 1, ceil(q_len / block_q), ceil(kv_len / block_k)]`;
        tiles that are off are skipped. Build it with `causal_block_mask`, `local_block_mask` or
        `block_mask_from_mask`, and pass the same `block_sizes`.
      block_sizes: tiles and GPU launch parameters; default `BlockSizes.get_default()`
        (required with `block_mask`).
      interpret: run the kernels in Pallas interpret mode; None: interpret unless on a GPU.

    Returns:
      `[batch, q_len, num_heads, head_dim]` in q's dtype (float32 accumulation). A query that
      sees no key gets zeros, and zero gradients; a key a query does not see never influences
      it, even when it holds NaN.

    Example:
      >>> q = k = v = jnp.ones((2, 100, 4, 64), jnp.bfloat16)
      >>> flash_attention(q, k, v, causal=True).shape
      (2, 100, 4, 64)
    """
    implementation = PallasTritonAttention(block_sizes=block_sizes, interpret=interpret)
    return dot_product_attention(
        q,
        k,
        v,
        causal=causal,
        segment_ids=segment_ids,
        sm_scale=sm_scale,
        block_mask=block_mask,
        block_shape=_kernel_block_mask(block_mask, block_sizes),
        implementation=implementation,
    )


def flash_attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = False,
    segment_ids: tuple[jax.Array, jax.Array] | None = None,
    sm_scale: float | None = None,
    block_mask: jax.Array | None = None,
    block_sizes: BlockSizes | None = None,
) -> jax.Array:
    """Plain-jnp attention with the same arguments and semantics as `flash_attention`.

    The op's float32 oracle (`implementation='reference'`): it materialises the scores (and the
    keys/values each query sees), so it is for tests, not a fast path. `block_mask` is expanded
    to elements with `block_sizes`. Fully masked rows give zeros (and zero gradients).
    """
    return dot_product_attention(
        q,
        k,
        v,
        causal=causal,
        segment_ids=segment_ids,
        sm_scale=sm_scale,
        block_mask=block_mask,
        block_shape=_kernel_block_mask(block_mask, block_sizes),
        implementation="reference",
    )


__all__ = [
    "BlockSizes",
    "PallasTritonAttention",
    "block_mask_from_mask",
    "causal_block_mask",
    "flash_attention",
    "flash_attention_reference",
    "local_block_mask",
]
