"""Monarch matrix products as Pallas (Triton) kernels, compiled on NVIDIA GPUs.

Dao, Chen, Sohoni, Desai, Poli, Grogan, Liu, Rao, Rudra, Re: "Monarch: Expressive Structured
Matrices for Efficient and Accurate Training", arXiv 2204.00595 (ICML 2022).

Two paths, chosen per shape (t = r // k when ``r % k == 0``: the number of intermediate
channels linking one input block to one output block; other shapes take the staged path):

- **fused** (small blocks, t <= 32 and blocks narrower than 512): output block ``a`` receives from
  input block ``j`` exactly the t channels ``w1[j, a*t:(a+1)*t]``, so
  ``y_a = sum_j (x_j @ F[a, j]) @ G[a, j]`` with ``F[a, j] = w1[j, a*t:(a+1)*t].T`` (``[p, t]``)
  and ``G[a, j][v] = w2[a, :, v*k + j]`` (``[t, s]``). One program owns a tile of rows and a tile
  of one output block; the ``[rows, t]`` intermediate lives in registers and never goes to
  device memory (small blocks are memory-bound: the saved round trip is the win). The input
  gradient is the same kernel with the factors transposed; the factor gradients are per-(a, j)
  outer products reduced over rows (a second kernel, partial sums over row splits added outside).
  With t < 16 Triton's ``dot`` cannot run (every dimension must be >= 16): t in {4, 8} is
  zero-padded to 16 (tensor cores at <= 4x the FLOPs), t in {1, 2} (nblocks near sqrt(n): an
  inner rank of 1 or 2) multiplies and reduces on the CUDA cores.
- **staged** (large blocks): the paper's own formulation, two block-diagonal GEMM kernels with
  the permutation (an XLA transpose) between them; large blocks are compute-bound, so the
  intermediate's round trip through memory costs little, while fusing would recompute the first
  product once per output tile or keep a ``[rows, s]`` accumulator that spills. The factor
  gradients are block-diagonal ``A^T @ B`` kernels reduced over rows.

This file is the op glue and tuning (tiles, ``pallas_call``s, custom VJPs, the implementation);
the kernel bodies are in ``pallas_triton_kernel.py``. Tile sizes come from a per-shape chooser (:func:`default_block_sizes`) sized against the
resource figures of ``tools/gpu_check.py`` (no register spills on H100/A100; 64-row tiles and
one warpgroup where the shapes allow, so Triton emits Hopper ``wgmma``); an explicit
:class:`BlockSizes` overrides it for every kernel of a call.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import _checks
from pallas_kernels._compat import cdiv
from pallas_kernels._compat import check_interpret
from pallas_kernels._compat import compiler_params_kwargs
from pallas_kernels._compat import has_triton_backend
from pallas_kernels._compat import resolve_interpret
from pallas_kernels.monarch.base import MonarchCall
from pallas_kernels.monarch.base import MonarchImplementation
from pallas_kernels.monarch.pallas_triton_kernel import chain_kernel
from pallas_kernels.monarch.pallas_triton_kernel import gemm_kernel
from pallas_kernels.monarch.pallas_triton_kernel import gemm_tn_kernel
from pallas_kernels.monarch.pallas_triton_kernel import outer_kernel
from pallas_kernels.monarch.reference import precision_for
from pallas_kernels.op import Unsupported

__all__ = ["BlockSizes", "PallasTritonMonarch", "default_block_sizes"]

# Triton's dot needs every dimension >= 16; smaller tiles use a multiply-and-reduce instead.
_MIN_DOT_DIM = 16
# Per-thread register budget (of 255) the chooser allows the float32 accumulators and
# on-chip intermediates; the rest is for addresses, loaded tiles and the pipeline.
_ACC_REGISTERS = 64
# The same budget for the CUDA-core (multiply-and-reduce, rank < 16) kernels. ptxas holds these
# 128-thread kernels to 64 registers on sm_90a (its occupancy target: 65,536 / (128 * 8)) and
# spills rather than exceed it: with the full budget, jax 0.12.1's Triton spilled 4 B in
# monarch_weight_grad at 8192 -> 8192, nblocks 64 (64 registers; 0 B with jax 0.12.0.1), and
# monarch_chain sat at exactly 64. Half the budget halves the largest product tile
# ([rows, rank, out] float32): measured with jax 0.12.1 (tools/gpu_check.py, which records the
# registers of every kernel), the CUDA-core kernels then use at most 56 registers on H100 (8192
# -> 8192, nblocks 64; 32-48 elsewhere) and spill nothing on H100 or A100: 8 registers, one
# more 2-row product tile's worth, below the 64 where ptxas starts to spill.
_CUDA_CORE_REGISTERS = 32


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes of the Monarch kernels (one set for every kernel of a call).

    Attributes:
      block_rows: rows per program (rows are zero-padded up to a multiple); the M tile.
      block_in: chunk of the reduction over an input block's width per step (None: all).
      block_rank: fused path: chunk of the t channels linking an (output, input) block pair
        (None: all t); the on-chip intermediate is ``[block_rows, block_rank]``. Staged path:
        the M tile of the factor-gradient kernels.
      block_out: tile of an output block's width per program (None: the whole block).
      weight_grad_block_out: N tile of the factor-gradient kernels (None: whole block).
      weight_grad_row_splits: partial sums over rows for the factor gradients (None: enough
        splits for about 256 programs).
      num_warps, num_stages: Triton compiler parameters (None: Triton's defaults).
      staged: True: two block-diagonal GEMM kernels with the permutation between them;
        False: the fused kernel; None: chosen by shape.

    Every tile must divide the size it tiles (a tile larger than the size means the size).
    With explicit block sizes the fused path does not pad a rank t < 16 (the chooser does).
    """

    block_rows: int = 64
    block_in: int | None = 64
    block_rank: int | None = 32
    block_out: int | None = 128
    weight_grad_block_out: int | None = 128
    weight_grad_row_splits: int | None = None
    num_warps: int | None = 4
    num_stages: int | None = 3
    staged: bool | None = None

    def __post_init__(self):
        _checks.int_at_least("block_rows", self.block_rows)
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
            if value is not None:
                _checks.int_at_least(name, value)
        if self.staged is not None and not isinstance(self.staged, bool):
            raise ValueError(f"staged={self.staged!r} must be None, True or False")
        if self.num_warps is not None and self.num_warps & (self.num_warps - 1):
            raise ValueError(f"num_warps={self.num_warps!r} must be a power of two (Triton)")


def _tile(block: int | None, dim: int, name: str) -> int:
    """The tile for a dimension: the whole dimension if the block is None or larger."""
    if block is None or block >= dim:
        return dim
    if dim % block:
        raise ValueError(
            f"{name}={block} must divide the size it tiles, {dim}: pass block sizes that divide "
            "the factor widths, or block_sizes=None (tiles chosen per shape)"
        )
    return block


def _pow2_at_most(n: int, cap: int) -> int:
    """A tile for a width ``n`` that divides it: ``n`` itself when ``n <= cap``, else the
    largest power of two ``<= cap`` dividing ``n`` (for a power-of-two ``n``: ``min(n, cap)``).

    Widths that are not powers of two (48, 96, 24, ...) thus get dividing tiles; they run in
    interpret mode (the compiled Triton path refuses them, and ``'auto'`` runs XLA there).
    """
    if n <= cap:
        return n
    return math.gcd(n, 1 << (cap.bit_length() - 1))


def use_staged(w1_shape, w2_shape) -> bool:
    """Whether the staged (two GEMM) path serves these factor shapes by default: large blocks,
    or ``r % k != 0`` (the fused kernel pairs each output block with ``r / k`` channels of every
    input block; the staged path's permutation takes any ``l * r == k * q``)."""
    k, _, p = w1_shape
    _, s, r = w2_shape
    return r % k != 0 or r // k > 32 or max(p, s) >= 512


def default_block_sizes(
    kind: str, *, rows: int, width_in: int, rank: int, width_out: int
) -> BlockSizes:
    """Tiles for one kernel call, sized for the H100/A100 register and shared-memory budget.

    Args:
      kind: ``'chain'`` (fused forward / input gradient), ``'outer'`` (fused factor
        gradients), ``'gemm'`` (staged block-diagonal GEMM) or ``'gemm_tn'`` (staged factor
        gradients, ``A^T @ B`` reduced over rows).
      rows: rows of the call.
      width_in: the reduction width per block (``p``; ``K`` of a GEMM; ``M`` of ``gemm_tn``).
      rank: fused: the t channels per block pair (after padding to 16); GEMMs: unused.
      width_out: the output block width (``s``; ``N`` of a GEMM).

    The rules: float32 accumulators and on-chip intermediates get <= 64 registers per thread
    (``tile elements / threads``), so nothing spills; 64-row tiles with 4 warps (one Hopper
    warpgroup) where the rows allow, which is the shape Triton lowers to ``wgmma`` on sm_90a
    (``mma.sync`` on sm_80); 3 pipeline stages (shared memory stays under A100's 163 KB).
    """
    # 64-row tiles; fewer rows fit in one tile (a power of two, >= 16 for Triton's dot)
    rows_tile = 64 if rows >= 64 else max(16, 1 << (max(rows, 1) - 1).bit_length())
    if kind == "gemm":  # [rows, K=width_in] @ [K, N=width_out]
        n_tile = _pow2_at_most(width_out, 128)
        m_tile = 128 if rows >= 128 and n_tile >= 128 else rows_tile
        return BlockSizes(
            block_rows=m_tile,
            block_in=_pow2_at_most(width_in, 64),
            block_out=n_tile,
            num_warps=8 if m_tile * n_tile >= 128 * 128 else 4,
            num_stages=3,
            staged=True,
        )
    if kind == "gemm_tn":  # [M=width_in, rows] @ [rows, N=width_out], reduced over rows
        # 64 x 128 with one warpgroup: at 128 x 128 and 8 warps ptxas caps sm_80 at 128
        # registers and spills (the transposed operand's layout conversion).
        return BlockSizes(
            block_rows=rows_tile,
            block_rank=_pow2_at_most(width_in, 64),
            weight_grad_block_out=_pow2_at_most(width_out, 128),
            num_warps=4,
            num_stages=3,
            staged=True,
        )
    use_dot = rank >= _MIN_DOT_DIM
    if not use_dot:
        # the multiply-and-reduce path keeps [rows, chunk, rank] products in registers:
        # 32-row tiles (64 rows hit ptxas's 64-register target and spill on sm_90a)
        rows_tile = min(rows_tile, 32)
    warps = 4
    threads = 32 * warps
    block_in = _pow2_at_most(width_in, 64 if use_dot else 32)
    if kind == "chain":
        block_rank = _pow2_at_most(rank, 32)
        # accumulator [rows, block_out] (+ [rows, block_rank, block_out] products off the dot)
        per_out = rows_tile * (1 if use_dot else 1 + block_rank)
        budget = _ACC_REGISTERS if use_dot else _CUDA_CORE_REGISTERS
        block_out = _pow2_at_most(width_out, max(16, budget * threads // per_out))
        return BlockSizes(
            block_rows=rows_tile,
            block_in=block_in,
            block_rank=block_rank,
            block_out=block_out,
            weight_grad_block_out=block_out,
            num_warps=warps,
            num_stages=3,
            staged=False,
        )
    # 'outer': accumulator [wg_block_out, block_rank], intermediate [block_rows, block_rank];
    # 64-row tiles so that both dots have an M of >= 64 (wgmma) where the rows allow
    block_rank = _pow2_at_most(rank, 32)
    # CUDA-core: 8-row tiles. With 16, jax 0.12.0.1 put monarch_weight_grad at ptxas's
    # 64-register cap on H100 (8192 -> 8192, nblocks 64; 0.12.1 spilled 4 B there before the
    # halved budget); with 8 both versions measure 55 (A100: 56), no spill.
    rows_tile = rows_tile if use_dot else 8
    per_out = block_rank * (1 if use_dot else 1 + rows_tile)
    budget = _ACC_REGISTERS if use_dot else _CUDA_CORE_REGISTERS
    wg_out = _pow2_at_most(width_out, max(16, budget * threads // per_out))
    return BlockSizes(
        block_rows=rows_tile,
        block_in=block_in,
        block_rank=block_rank,
        block_out=wg_out,
        weight_grad_block_out=wg_out,
        num_warps=warps,
        num_stages=3,
        staged=False,
    )


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _params(block_sizes: BlockSizes, interpret: bool) -> dict:
    return compiler_params_kwargs(
        interpret=interpret, num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages
    )


def _pad_rows(a: jax.Array, multiple: int) -> jax.Array:
    rows = a.shape[0]
    padded = cdiv(rows, multiple) * multiple
    return a if padded == rows else jnp.pad(a, ((0, padded - rows), (0, 0)))


# --------------------------------------------------------------------------------------------
# Fused path
# --------------------------------------------------------------------------------------------


def _chain(x2d, f, g, block_sizes: BlockSizes | None, interpret: bool):
    """``y[:, o-th block] = sum_i (x[:, i-th block] @ f[o, i]) @ g[o, i]`` as one pallas_call."""
    num_out, num_in, width_in, t = f.shape
    width_out = g.shape[-1]
    rows = x2d.shape[0]
    if block_sizes is None:
        block_sizes = default_block_sizes(
            "chain", rows=rows, width_in=width_in, rank=t, width_out=width_out
        )
    block_rows = block_sizes.block_rows
    x2d = _pad_rows(x2d, block_rows)
    padded = x2d.shape[0]
    block_in = _tile(block_sizes.block_in, width_in, "block_in")
    block_rank = _tile(block_sizes.block_rank, t, "block_rank")
    block_out = _tile(block_sizes.block_out, width_out, "block_out")
    tiles_out = width_out // block_out
    use_dot = min(block_rows, block_in, block_rank, block_out) >= _MIN_DOT_DIM
    kernel = functools.partial(
        chain_kernel,
        width_in=width_in,
        block_in=block_in,
        block_rank=block_rank,
        use_dot=use_dot,
        precision=precision_for(x2d.dtype),
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
        **_params(block_sizes, interpret),
    )(x2d, f, g)
    return y[:rows]


def _splits_for(block_sizes: BlockSizes, programs: int, rows: int, block_rows: int) -> int:
    splits = block_sizes.weight_grad_row_splits
    if splits is None:
        splits = max(1, min(cdiv(256, programs), cdiv(rows, block_rows)))
    return splits


def _outer(a2d, m, b2d, *, a_by_out: bool, block_sizes: BlockSizes | None, interpret: bool):
    """``out[o, i] = (a_blk @ m[o, i]).T @ b_blk`` summed over rows; float32 ``[O, I, t, wb]``.

    ``a_blk`` is a's o-th block if ``a_by_out`` else its i-th block; ``b_blk`` is the other one.
    """
    num_out, num_in, width_a, t = m.shape
    num_b_blocks = num_in if a_by_out else num_out
    width_b = b2d.shape[1] // num_b_blocks
    rows = a2d.shape[0]
    if block_sizes is None:
        block_sizes = default_block_sizes(
            "outer", rows=rows, width_in=width_a, rank=t, width_out=width_b
        )
    block_rows = block_sizes.block_rows
    block_in = _tile(block_sizes.block_in, width_a, "block_in")
    block_rank = _tile(block_sizes.block_rank, t, "block_rank")
    block_out = _tile(block_sizes.weight_grad_block_out, width_b, "weight_grad_block_out")
    tiles_rank, tiles_out = t // block_rank, width_b // block_out
    splits = _splits_for(block_sizes, num_out * num_in * tiles_rank * tiles_out, rows, block_rows)
    a2d = _pad_rows(a2d, splits * block_rows)  # zero rows add nothing to the sums
    b2d = _pad_rows(b2d, splits * block_rows)
    rows_per_split = a2d.shape[0] // splits
    use_dot = min(block_rows, block_in, block_rank, block_out) >= _MIN_DOT_DIM

    def a_index(o, i, c, n, sp):
        return (sp, o if a_by_out else i)

    def b_index(o, i, c, n, sp):
        return (sp, (i if a_by_out else o) * tiles_out + n)

    kernel = functools.partial(
        outer_kernel,
        block_rows=block_rows,
        block_in=block_in,
        use_dot=use_dot,
        precision=precision_for(a2d.dtype),
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
            (None, None, None, block_out, block_rank), lambda o, i, c, n, sp: (sp, o, i, n, c)
        ),
        out_shape=jax.ShapeDtypeStruct((splits, num_out, num_in, width_b, t), jnp.float32),
        interpret=interpret,
        name="monarch_weight_grad",
        **_params(block_sizes, interpret),
    )(a2d, m, b2d)
    return partial_sums.sum(axis=0).transpose(0, 1, 3, 2)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _fused(x2d, f, g, block_sizes: BlockSizes | None, interpret: bool):
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


def _fused_monarch(x2d, w1, w2, block_sizes, interpret):
    k, q, p = w1.shape
    l, s, r = w2.shape
    t = r // k
    # Fold the permutation into the factor layout (cheap: size of the weights, not the batch).
    f = w1.reshape(k, l, t, p).transpose(1, 0, 3, 2)  # [l, k, p, t]
    g = w2.reshape(l, s, t, k).transpose(0, 3, 2, 1)  # [l, k, t, s]
    if block_sizes is None and 4 <= t < _MIN_DOT_DIM:
        # Zero channels make the rank a tensor-core size; exact, at 16/t times the FLOPs.
        f = jnp.pad(f, ((0, 0), (0, 0), (0, 0), (0, _MIN_DOT_DIM - t)))
        g = jnp.pad(g, ((0, 0), (0, 0), (0, _MIN_DOT_DIM - t), (0, 0)))
    return _fused(x2d, f, g, block_sizes, interpret)


# --------------------------------------------------------------------------------------------
# Staged path
# --------------------------------------------------------------------------------------------


def _block_gemm(x2d, w, block_sizes: BlockSizes | None, interpret: bool, name: str):
    """Block-diagonal product: ``y[:, b-th block] = x[:, b-th block] @ w[b]``, w ``[B, K, N]``."""
    num_blocks, width_k, width_n = w.shape
    rows = x2d.shape[0]
    if block_sizes is None:
        block_sizes = default_block_sizes(
            "gemm", rows=rows, width_in=width_k, rank=0, width_out=width_n
        )
    block_rows = block_sizes.block_rows
    x2d = _pad_rows(x2d, block_rows)
    padded = x2d.shape[0]
    block_k = _tile(block_sizes.block_in, width_k, "block_in")
    block_n = _tile(block_sizes.block_out, width_n, "block_out")
    tiles_n = width_n // block_n
    kernel = functools.partial(gemm_kernel, block_k=block_k, precision=precision_for(x2d.dtype))
    y = pl.pallas_call(
        kernel,
        grid=(padded // block_rows, num_blocks, tiles_n),
        in_specs=[
            pl.BlockSpec((block_rows, width_k), lambda r, b, n: (r, b)),
            pl.BlockSpec((None, width_k, block_n), lambda r, b, n: (b, 0, n)),
        ],
        out_specs=pl.BlockSpec((block_rows, block_n), lambda r, b, n: (r, b * tiles_n + n)),
        out_shape=jax.ShapeDtypeStruct((padded, num_blocks * width_n), x2d.dtype),
        interpret=interpret,
        name=name,
        **_params(block_sizes, interpret),
    )(x2d, w)
    return y[:rows]


def _block_gemm_tn(a2d, b2d, num_blocks: int, block_sizes, interpret: bool):
    """``out[b] = a[:, b-th block].T @ b[:, b-th block]`` summed over rows, float32 ``[B, M, N]``."""
    width_m = a2d.shape[1] // num_blocks
    width_n = b2d.shape[1] // num_blocks
    rows = a2d.shape[0]
    if block_sizes is None:
        block_sizes = default_block_sizes(
            "gemm_tn", rows=rows, width_in=width_m, rank=0, width_out=width_n
        )
    block_rows = block_sizes.block_rows
    block_m = _tile(block_sizes.block_rank, width_m, "block_rank")
    block_n = _tile(block_sizes.weight_grad_block_out, width_n, "weight_grad_block_out")
    tiles_m, tiles_n = width_m // block_m, width_n // block_n
    splits = _splits_for(block_sizes, num_blocks * tiles_m * tiles_n, rows, block_rows)
    a2d = _pad_rows(a2d, splits * block_rows)
    b2d = _pad_rows(b2d, splits * block_rows)
    rows_per_split = a2d.shape[0] // splits
    kernel = functools.partial(
        gemm_tn_kernel, block_rows=block_rows, precision=precision_for(a2d.dtype)
    )
    partial_sums = pl.pallas_call(
        kernel,
        grid=(num_blocks, tiles_m, tiles_n, splits),
        in_specs=[
            pl.BlockSpec((rows_per_split, block_m), lambda b, m, n, sp: (sp, b * tiles_m + m)),
            pl.BlockSpec((rows_per_split, block_n), lambda b, m, n, sp: (sp, b * tiles_n + n)),
        ],
        out_specs=pl.BlockSpec((None, None, block_m, block_n), lambda b, m, n, sp: (sp, b, m, n)),
        out_shape=jax.ShapeDtypeStruct((splits, num_blocks, width_m, width_n), jnp.float32),
        interpret=interpret,
        name="monarch_block_gemm_tn",
        **_params(block_sizes, interpret),
    )(a2d, b2d)
    return partial_sums.sum(axis=0)


def _permute(h2d, k: int, q: int):
    """``[rows, k*q]`` (block j, channel i) -> ``[rows, q*k]`` (channel m = i*k + j)."""
    return h2d.reshape(-1, k, q).transpose(0, 2, 1).reshape(-1, k * q)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _staged(x2d, w1, w2, block_sizes, interpret):
    return _staged_fwd(x2d, w1, w2, block_sizes, interpret)[0]


def _staged_fwd(x2d, w1, w2, block_sizes, interpret):
    k, q, _ = w1.shape
    h = _block_gemm(x2d, w1.transpose(0, 2, 1), block_sizes, interpret, "monarch_block_gemm_1")
    z = _permute(h, k, q)  # [rows, l*r]
    y = _block_gemm(z, w2.transpose(0, 2, 1), block_sizes, interpret, "monarch_block_gemm_2")
    return y, (x2d, z, w1, w2)


def _staged_bwd(block_sizes, interpret, residuals, dy):
    x2d, z, w1, w2 = residuals
    k, q, _ = w1.shape
    l = w2.shape[0]
    dy = dy.astype(x2d.dtype)
    dz = _block_gemm(dy, w2, block_sizes, interpret, "monarch_block_gemm_dz")  # [rows, l*r]
    dw2 = _block_gemm_tn(dy, z, l, block_sizes, interpret)  # [l, s, r]
    dh = _permute(dz, q, k)  # channel m = i*k + j back to (block j, channel i)
    dx = _block_gemm(dh, w1, block_sizes, interpret, "monarch_block_gemm_dx")
    dw1 = _block_gemm_tn(dh, x2d, k, block_sizes, interpret)  # [k, q, p]
    return dx, dw1.astype(w1.dtype), dw2.astype(w2.dtype)


_staged.defvjp(_staged_fwd, _staged_bwd)


# --------------------------------------------------------------------------------------------
# The implementation
# --------------------------------------------------------------------------------------------


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


@dataclasses.dataclass(frozen=True)
class PallasTritonMonarch(MonarchImplementation):
    """The Pallas Triton kernels (fused for small blocks, staged GEMMs for large ones).

    Attributes:
      block_sizes: tiles for every kernel of a call (None: :func:`default_block_sizes` per
        kernel and shape).
      interpret: Pallas interpret mode (None: interpret on CPU, compiled on GPU).

    Takes every factor shape the op accepts in interpret mode (``r % k != 0`` runs the staged
    path); compiled, it refuses (:class:`~pallas_kernels.op.Unsupported`) factor widths that
    are not powers of two (Triton tiles), and ``'auto'`` then runs the XLA path. Reverse-mode only (custom VJP with Pallas backward kernels): inside
    :func:`~pallas_kernels.op.forward_mode_autodiff` the op substitutes the XLA path.
    """

    name = "pallas_triton"
    supports_forward_mode = False
    block_sizes: BlockSizes | None = None
    interpret: bool | None = None

    def __post_init__(self):
        if self.block_sizes is not None and not isinstance(self.block_sizes, BlockSizes):
            raise ValueError(f"block_sizes={self.block_sizes!r} must be a MonarchBlockSizes")
        check_interpret(self.interpret)

    def __call__(self, call: MonarchCall) -> jax.Array:
        x2d, w1, w2 = call.x2d, call.w1, call.w2
        k, q, p = w1.shape
        l, s, r = w2.shape
        interpret = resolve_interpret(self.interpret)
        if not interpret and not has_triton_backend():
            raise Unsupported("this JAX has no Pallas Triton backend (removed after 0.12?)")
        if not interpret and not all(_is_pow2(d) for d in (p, q, s, r)):
            raise Unsupported(
                "compiled Triton tiles need power-of-two factor widths; got "
                f"w1.shape={tuple(w1.shape)}, w2.shape={tuple(w2.shape)} (use "
                "implementation='xla', or interpret=True)"
            )
        staged = self.block_sizes.staged if self.block_sizes is not None else None
        if staged is None:
            staged = use_staged(w1.shape, w2.shape)
        if not staged and r % k:
            raise Unsupported(
                f"the fused kernel needs r % k == 0; got w1.shape={tuple(w1.shape)}, "
                f"w2.shape={tuple(w2.shape)} (r={r}, k={k}): use BlockSizes(staged=None or True)"
            )
        if staged:
            return _staged(x2d, w1, w2, self.block_sizes, interpret)
        return _fused_monarch(x2d, w1, w2, self.block_sizes, interpret)
