"""Monarch matrix products as Pallas Mosaic TPU kernels: forward and backward, both stages and
the permutation fused in one kernel per row tile.

Dao, Chen, Sohoni, Desai, Poli, Grogan, Liu, Rao, Rudra, Re: "Monarch: Expressive Structured
Matrices for Efficient and Accurate Training", arXiv 2204.00595 (ICML 2022).

Layout. Inside the kernel a row tile is held *transposed*, features on sublanes and the tile's
``block_rows`` tokens on the 128 lanes. Block ``j`` of the input is then a sublane slice
(aligned to 8 whatever the block width, where the natural layout would need 128-lane
alignment), every product is a plain MXU matmul ``w[j] @ x_j^T`` with the tokens as the wide
N dimension, and the Monarch permutation (channel ``(j, i)`` of the first stage is channel
``i*k + j`` of the second) is a **strided store**: row ``i`` of ``h_j`` goes to row
``i*k + j`` of a VMEM scratch, which the second stage reads back in contiguous slices of ``r``
rows. Only the token tile is transposed (in VMEM, on the XLU), never anything in HBM.

- Forward, one kernel (``monarch_tpu_fwd``): x tile -> transposed in VMEM -> stage 1 per input
  block -> permuted by strided stores into the intermediate -> stage 2 per output block ->
  transposed back -> y tile. The ``[rows, k*q]`` intermediate never reaches HBM; the factors
  stay resident in VMEM (their block index does not change with the row tile: copied once).
- Backward, one kernel (``monarch_tpu_bwd``): recomputes the intermediate, then ``dw2`` and
  ``dz = w2^T dy`` per output block, ``dz`` back through the inverse permutation (strided
  loads), then ``dw1`` and ``dx`` per input block. ``dw1``/``dw2`` are float32 accumulators
  resident in VMEM across the row tiles of a split; a leading parallel grid axis of two splits
  keeps both TensorCores of a megacore chip busy, the partial sums are added outside.
- Factors too large for VMEM: the output blocks are computed in ``groups``. Group ``g`` of
  ``l/G`` output blocks is fed by channels ``[g*q/G, (g+1)*q/G)`` of every input block (rows
  ``[g*k*q/G, (g+1)*k*q/G)`` of the permuted intermediate), so it needs ``w1[:, g-th slice]``
  and its own ``w2`` blocks only: no recomputation, the same kernel bodies with ``q`` and ``l``
  per group, groups as the outer grid axis. The backward is then two kernels: ``dx`` (grid row
  tile x group, summed over the groups in VMEM) and the weight gradients (grid split x group x
  row tile, a group's gradients resident).

Every shape with ``l*r == k*q`` works (also ``r % k != 0``): rows are zero-padded to the tile.
Compiled for a TPU, feature blocks must be multiples of 8 (sublane-aligned slices) and one
group's factors plus the working set must fit VMEM (:func:`vmem_bytes`); other calls raise
:class:`~pallas_kernels.op.Unsupported` naming ``implementation='xla'`` (n = 8192 with 4
blocks of 2048: one block pair alone is too large). In interpret mode (``interpret=True``, CPU)
every shape runs.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels._compat import cdiv
from pallas_kernels._compat import multiple_of
from pallas_kernels.op import Unsupported

__all__ = ["BlockSizes", "monarch_matmul_tpu", "vmem_bytes"]

_LANES = 128  # TPU vector lanes: the strided store/load works on 128-lane memrefs
_SUBLANES = 8  # float32 sublanes: feature slices start at multiples of this
_VMEM_LIMIT = 64 * 2**20  # scoped VMEM asked of Mosaic (v5e/v6e: 128 MiB, v5p: 95 MiB)
_VMEM_BUDGET = 48 * 2**20  # what the working-set estimate may use of it (Mosaic's own slack)
_ROW_TILES = (512, 256, 128)  # candidate block_rows, largest first


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles of the Monarch TPU kernels.

    Attributes:
      block_rows: tokens per grid step (the lane dimension inside the kernel): a positive
        multiple of 128. None: the largest of 512, 256, 128 whose working set fits VMEM (128
        in interpret mode, where every grid step costs).
      splits: parallel partial sums of the weight gradients (one per TensorCore of a megacore
        chip); None: 2 when there are at least two row tiles, else 1.
      groups: the output blocks are computed in this many groups, each from its own slice of
        the factors (so large factors need not fit VMEM at once); must divide ``q`` and ``l``.
        None: the fewest that fit VMEM (1 in interpret mode).
    """

    block_rows: int | None = None
    splits: int | None = None
    groups: int | None = None

    def __post_init__(self):
        if self.block_rows is not None and (
            not isinstance(self.block_rows, int)
            or isinstance(self.block_rows, bool)
            or self.block_rows < _LANES
            or self.block_rows % _LANES
        ):
            raise ValueError(f"block_rows={self.block_rows!r} must be a positive multiple of 128")
        if self.splits is not None and (
            not isinstance(self.splits, int) or isinstance(self.splits, bool) or self.splits < 1
        ):
            raise ValueError(f"splits={self.splits!r} must be an int >= 1")
        if self.groups is not None and (
            not isinstance(self.groups, int) or isinstance(self.groups, bool) or self.groups < 1
        ):
            raise ValueError(f"groups={self.groups!r} must be an int >= 1")


def vmem_bytes(w1_shape, w2_shape, dtype, block_rows: int, groups: int = 1) -> int:
    """Estimated VMEM working set of the largest kernel of a call (forward or backward):
    double-buffered blocks, scratch and temporaries, with the factors split into ``groups``."""
    k, q, p = w1_shape
    l, s, r = w2_shape
    n_in, n_mid, n_out = k * p, k * q // groups, l * s // groups
    size = jnp.dtype(dtype).itemsize
    weights = (k * q * p + l * s * r) // groups
    scratch = 4 * block_rows * (n_in + n_mid + n_out)
    temporaries = 2 * 4 * block_rows * max(n_in, n_out)  # a transposed tile and its cast
    fwd = 2 * weights * size + 2 * block_rows * (n_in + n_out) * size
    # backward: x, dy, dx tiles and float32 weight-gradient accumulators (in one kernel
    # without groups, in two kernels with them: dx, then the weight gradients)
    bwd = 2 * weights * (size + 4) + 2 * block_rows * (2 * n_in + n_out) * size
    return max(fwd, bwd) + scratch + temporaries


@dataclasses.dataclass(frozen=True)
class _Config:
    """One call's static shape. ``q`` and ``l`` are per group: a group of ``l`` output blocks
    is fed by ``q`` consecutive channels of every input block (rows ``[g*k*q, (g+1)*k*q)`` of
    the permuted intermediate), so a group needs ``w1[:, g-th q slice]`` and its own ``w2``
    blocks only."""

    k: int
    q: int
    p: int
    l: int
    s: int
    r: int
    block_rows: int
    splits: int
    tiles_per_split: int
    groups: int
    interpret: bool

    @property
    def grid_bwd_dw(self) -> tuple[int, ...]:
        """Grid of the kernel holding the weight-gradient accumulators (its last axis is the
        row tile: they are zeroed at its first step)."""
        if self.groups == 1:
            return (self.splits, self.tiles_per_split)
        return (self.splits, self.groups, self.tiles_per_split)

    @property
    def chunks(self) -> int:
        """128-lane chunks of a row tile (the strided store/load works chunk by chunk)."""
        return self.block_rows // _LANES


def _dot(a, b, contract=(1, 0), *, interpret: bool):
    """``a . b`` contracting ``a``'s dim ``contract[0]`` with ``b``'s ``contract[1]``; float32
    accumulation, full float32 precision for float32 operands."""
    if interpret and a.dtype != jnp.float32:
        # XLA:CPU cannot run a 16-bit dot with a float32 result inside a loop (JAX 0.12);
        # widening is exact (the products of 16-bit floats fit float32).
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    dims = (((contract[0],), (contract[1],)), ((), ()))
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _fori(n: int, body):
    lax.fori_loop(0, n, lambda i, c: (body(i), c)[1], 0)


def _rows(start, size: int):
    """``pl.ds`` over ``size`` sublanes from ``start`` (a multiple of ``size``'s alignment)."""
    if not isinstance(start, int):
        start = multiple_of(start, math.gcd(size, _SUBLANES))
    return pl.ds(start, size)


def _scatter_permuted(z_ref, h, j, cfg: _Config):
    """Rows ``i`` of ``h_j`` ``[q, block_rows]`` -> rows ``i*k + j`` of the intermediate."""
    for c in range(cfg.chunks):
        z_ref[c, pl.ds(j, cfg.q, stride=cfg.k), :] = h[:, c * _LANES : (c + 1) * _LANES]


def _gather_permuted(z_ref, j, cfg: _Config):
    """The inverse: rows ``i*k + j`` of the intermediate as ``[q, block_rows]``."""
    parts = [z_ref[c, pl.ds(j, cfg.q, stride=cfg.k), :] for c in range(cfg.chunks)]
    return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def _mid_rows(z_ref, start, size: int, cfg: _Config):
    """Contiguous rows ``[start, start + size)`` of the intermediate as ``[size, block_rows]``."""
    parts = [z_ref[c, _rows(start, size), :] for c in range(cfg.chunks)]
    return jnp.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def _set_mid_rows(z_ref, start, size: int, value, cfg: _Config):
    for c in range(cfg.chunks):
        z_ref[c, _rows(start, size), :] = value[:, c * _LANES : (c + 1) * _LANES]


def _stage1(x_t_ref, w1_ref, z_ref, cfg: _Config, compute_dtype):
    """``h_j = w1[j] @ x_j^T`` for every input block, rounded to the compute dtype (as the
    reference rounds its intermediate), scattered through the permutation."""

    def block(j):
        x_j = x_t_ref[_rows(j * cfg.p, cfg.p), :].astype(compute_dtype)
        h = _dot(w1_ref[j], x_j, interpret=cfg.interpret)
        _scatter_permuted(z_ref, h.astype(compute_dtype).astype(jnp.float32), j, cfg)

    _fori(cfg.k, block)


def _fwd_kernel(x_ref, w1_ref, w2_ref, y_ref, x_t_ref, z_ref, y_t_ref, *, cfg: _Config):
    compute_dtype = x_ref.dtype
    x_t_ref[...] = x_ref[...].astype(jnp.float32).T
    _stage1(x_t_ref, w1_ref, z_ref, cfg, compute_dtype)

    def out_block(a):
        z_a = _mid_rows(z_ref, a * cfg.r, cfg.r, cfg).astype(compute_dtype)
        y_t_ref[_rows(a * cfg.s, cfg.s), :] = _dot(w2_ref[a], z_a, interpret=cfg.interpret)

    _fori(cfg.l, out_block)
    y_ref[...] = y_t_ref[...].T.astype(y_ref.dtype)


def _bwd_kernel(*refs, cfg: _Config, want_dx: bool, want_dw: bool, group_axis: int | None):
    """Backward of one row tile and one group of output blocks.

    Refs: inputs ``[x] dy w1 w2``, outputs ``[dx] [dw1 dw2]``, scratch ``x_t z dy_t``. With
    ``want_dw`` the intermediate is recomputed from x (stage 1) for ``dw2``; ``dx`` is
    accumulated over the groups (grid axis ``group_axis``, innermost) in ``x_t`` (without
    groups it is written over ``x``'s transposed blocks once they are used).
    """
    refs = list(refs)
    x_ref = refs.pop(0) if want_dw else None
    dy_ref, w1_ref, w2_ref = refs[:3]
    refs = refs[3:]
    dx_ref = refs.pop(0) if want_dx else None
    dw1_ref, dw2_ref = (refs.pop(0), refs.pop(0)) if want_dw else (None, None)
    x_t_ref, z_ref, dy_t_ref = refs
    compute_dtype = dy_ref.dtype
    accumulate_dx = want_dx and cfg.groups > 1

    if want_dw:

        @pl.when(pl.program_id(len(cfg.grid_bwd_dw) - 1) == 0)
        def _():
            dw1_ref[...] = jnp.zeros_like(dw1_ref)
            dw2_ref[...] = jnp.zeros_like(dw2_ref)

        x_t_ref[...] = x_ref[...].astype(jnp.float32).T
        _stage1(x_t_ref, w1_ref, z_ref, cfg, compute_dtype)

    if accumulate_dx:

        @pl.when(pl.program_id(group_axis) == 0)
        def _():
            x_t_ref[...] = jnp.zeros_like(x_t_ref)

    dy_t_ref[...] = dy_ref[...].astype(jnp.float32).T

    def out_block(a):
        dy_a = dy_t_ref[_rows(a * cfg.s, cfg.s), :].astype(compute_dtype)
        if want_dw:
            z_a = _mid_rows(z_ref, a * cfg.r, cfg.r, cfg).astype(compute_dtype)
            # dw2[a] += dy_a^T z_a (tokens are the contracted lanes)
            dw2_ref[a] += _dot(dy_a, z_a, (1, 1), interpret=cfg.interpret)
        # dz_a = w2[a]^T dy_a, written over z_a (this block's rows only, already read)
        dz_a = _dot(w2_ref[a], dy_a, (0, 0), interpret=cfg.interpret)
        _set_mid_rows(z_ref, a * cfg.r, cfg.r, dz_a.astype(compute_dtype).astype(jnp.float32), cfg)

    _fori(cfg.l, out_block)

    def in_block(j):
        dh_j = _gather_permuted(z_ref, j, cfg).astype(compute_dtype)  # [q, rows]
        rows = _rows(j * cfg.p, cfg.p)
        if want_dw:
            x_j = x_t_ref[rows, :].astype(compute_dtype)
            dw1_ref[j] += _dot(dh_j, x_j, (1, 1), interpret=cfg.interpret)
        if want_dx:
            dx_j = _dot(w1_ref[j], dh_j, (0, 0), interpret=cfg.interpret)
            if accumulate_dx:
                dx_j = dx_j + x_t_ref[rows, :]
            x_t_ref[rows, :] = dx_j

    _fori(cfg.k, in_block)

    if accumulate_dx:

        @pl.when(pl.program_id(group_axis) == cfg.groups - 1)
        def _():
            dx_ref[...] = x_t_ref[...].T.astype(dx_ref.dtype)

    elif want_dx:
        dx_ref[...] = x_t_ref[...].T.astype(dx_ref.dtype)


def _params(cfg: _Config, semantics):
    if cfg.interpret:
        return {"interpret": pltpu.InterpretParams()}
    return {
        "compiler_params": pltpu.CompilerParams(
            dimension_semantics=semantics, vmem_limit_bytes=_VMEM_LIMIT
        )
    }


def _cost(cfg: _Config, rows: int, dtype, *, dx: bool, dw: bool, fwd: bool = False):
    """Declared cost for XLA's scheduler and ``cost_analysis``: matmul FLOPs and HBM bytes."""
    g = cfg.groups
    w1_size, w2_size = cfg.k * g * cfg.q * cfg.p, g * cfg.l * cfg.s * cfg.r
    size = jnp.dtype(dtype).itemsize
    n_in, n_out = cfg.k * cfg.p, g * cfg.l * cfg.s
    if fwd:
        flops = 2 * rows * (w1_size + w2_size)
        moved = rows * (g * n_in + n_out) * size + (w1_size + w2_size) * size
    else:
        flops = 2 * rows * (w2_size + w1_size * dx + (w1_size + w2_size + w1_size) * dw)
        moved = rows * (g * n_in * (dw + dx) + n_out) * size
        moved += (w1_size + w2_size) * (size * (rows // cfg.block_rows if dx and g > 1 else 1))
        moved += (w1_size + w2_size) * 4 * cfg.splits * dw
    return pl.CostEstimate(flops=int(flops), transcendentals=0, bytes_accessed=int(moved))


def _scratch(cfg: _Config):
    return [
        pltpu.VMEM((cfg.k * cfg.p, cfg.block_rows), jnp.float32),
        pltpu.VMEM((cfg.chunks, cfg.k * cfg.q, _LANES), jnp.float32),
        pltpu.VMEM((cfg.l * cfg.s, cfg.block_rows), jnp.float32),
    ]


def _weight_specs(cfg: _Config, group_of):
    """w1's q-slice and w2's blocks of the group ``group_of(*grid indices)``."""
    return [
        pl.BlockSpec((cfg.k, cfg.q, cfg.p), lambda *ix: (0, group_of(*ix), 0)),
        pl.BlockSpec((cfg.l, cfg.s, cfg.r), lambda *ix: (group_of(*ix), 0, 0)),
    ]


def _forward(x2d, w1, w2, cfg: _Config):
    rows = x2d.shape[0]
    bm = cfg.block_rows
    n_in, n_out = cfg.k * cfg.p, cfg.l * cfg.s  # n_out: one group's
    # Groups outermost: a group's factors are copied in once for all row tiles.
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg),
        grid=(cfg.groups, rows // bm),
        in_specs=[
            pl.BlockSpec((bm, n_in), lambda g, i: (i, 0)),
            *_weight_specs(cfg, lambda g, i: g),
        ],
        out_specs=pl.BlockSpec((bm, n_out), lambda g, i: (i, g)),
        out_shape=jax.ShapeDtypeStruct((rows, cfg.groups * n_out), x2d.dtype),
        scratch_shapes=_scratch(cfg),
        cost_estimate=_cost(cfg, rows, x2d.dtype, dx=False, dw=False, fwd=True),
        name="monarch_tpu_fwd",
        **_params(cfg, ("parallel", "parallel")),
    )(x2d, w1, w2)


def _backward(x2d, dy, w1, w2, cfg: _Config):
    rows = x2d.shape[0]
    bm, per, groups = cfg.block_rows, cfg.tiles_per_split, cfg.groups
    n_in, n_out = cfg.k * cfg.p, cfg.l * cfg.s
    dw_shapes = [
        jax.ShapeDtypeStruct((cfg.splits, *w1.shape), jnp.float32),
        jax.ShapeDtypeStruct((cfg.splits, *w2.shape), jnp.float32),
    ]
    dx_shape = jax.ShapeDtypeStruct((rows, n_in), x2d.dtype)
    if groups == 1:
        # One kernel: grid (split, row tile); the weight gradients stay resident per split.
        tile = lambda sp, i: (sp * per + i, 0)  # noqa: E731
        dx, dw1, dw2 = pl.pallas_call(
            functools.partial(_bwd_kernel, cfg=cfg, want_dx=True, want_dw=True, group_axis=None),
            grid=cfg.grid_bwd_dw,
            in_specs=[
                pl.BlockSpec((bm, n_in), tile),
                pl.BlockSpec((bm, n_out), tile),
                *_weight_specs(cfg, lambda sp, i: 0),
            ],
            out_specs=[
                pl.BlockSpec((bm, n_in), tile),
                pl.BlockSpec((None, *w1.shape), lambda sp, i: (sp, 0, 0, 0)),
                pl.BlockSpec((None, *w2.shape), lambda sp, i: (sp, 0, 0, 0)),
            ],
            out_shape=[dx_shape, *dw_shapes],
            scratch_shapes=_scratch(cfg),
            cost_estimate=_cost(cfg, rows, x2d.dtype, dx=True, dw=True),
            name="monarch_tpu_bwd",
            **_params(cfg, ("parallel", "arbitrary")),
        )(x2d, dy, w1, w2)
        return dx, dw1.sum(axis=0), dw2.sum(axis=0)

    # dx: grid (row tile, group), summed over the groups in VMEM.
    dx = pl.pallas_call(
        functools.partial(_bwd_kernel, cfg=cfg, want_dx=True, want_dw=False, group_axis=1),
        grid=(rows // bm, groups),
        in_specs=[
            pl.BlockSpec((bm, n_out), lambda i, g: (i, g)),
            *_weight_specs(cfg, lambda i, g: g),
        ],
        out_specs=pl.BlockSpec((bm, n_in), lambda i, g: (i, 0)),
        out_shape=dx_shape,
        scratch_shapes=_scratch(cfg),
        cost_estimate=_cost(cfg, rows, x2d.dtype, dx=True, dw=False),
        name="monarch_tpu_bwd_dx",
        **_params(cfg, ("parallel", "arbitrary")),
    )(dy, w1, w2)
    # weight gradients: grid (split, group, row tile); a group's gradients stay resident.
    tile = lambda sp, g, i: (sp * per + i, 0)  # noqa: E731
    dw1_blocks = (None, cfg.k, cfg.q, cfg.p)
    dw2_blocks = (None, cfg.l, cfg.s, cfg.r)
    dw1, dw2 = pl.pallas_call(
        functools.partial(_bwd_kernel, cfg=cfg, want_dx=False, want_dw=True, group_axis=None),
        grid=(cfg.splits, groups, per),
        in_specs=[
            pl.BlockSpec((bm, n_in), tile),
            pl.BlockSpec((bm, n_out), lambda sp, g, i: (sp * per + i, g)),
            *_weight_specs(cfg, lambda sp, g, i: g),
        ],
        out_specs=[
            pl.BlockSpec(dw1_blocks, lambda sp, g, i: (sp, 0, g, 0)),
            pl.BlockSpec(dw2_blocks, lambda sp, g, i: (sp, g, 0, 0)),
        ],
        out_shape=dw_shapes,
        scratch_shapes=_scratch(cfg),
        cost_estimate=_cost(cfg, rows, x2d.dtype, dx=False, dw=True),
        name="monarch_tpu_bwd_dw",
        **_params(cfg, ("parallel", "arbitrary", "arbitrary")),
    )(x2d, dy, w1, w2)
    return dx, dw1.sum(axis=0), dw2.sum(axis=0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _monarch(x2d, w1, w2, cfg: _Config):
    return _forward(x2d, w1, w2, cfg)


def _monarch_fwd(x2d, w1, w2, cfg):
    return _forward(x2d, w1, w2, cfg), (x2d, w1, w2)


def _monarch_bwd(cfg, residuals, dy):
    x2d, w1, w2 = residuals
    dx, dw1, dw2 = _backward(x2d, dy.astype(x2d.dtype), w1, w2, cfg)
    return dx, dw1.astype(w1.dtype), dw2.astype(w2.dtype)


_monarch.defvjp(_monarch_fwd, _monarch_bwd)


def _group_options(w1_shape, w2_shape, dtype, interpret: bool) -> list[int]:
    """Group counts that split ``q`` and ``l`` into tiles Mosaic takes, fewest first."""
    _, q, _ = w1_shape
    l, s, _ = w2_shape
    sublanes = _SUBLANES * 4 // jnp.dtype(dtype).itemsize  # packed rows of a 16-bit tile
    options = []
    for g in range(1, min(q, l) + 1):
        if q % g or l % g:
            continue
        if g > 1 and not interpret and ((q // g) % sublanes or (l // g * s) % _LANES):
            continue
        options.append(g)
    return options


def _choose_tiles(block_sizes: BlockSizes, w1_shape, w2_shape, dtype, rows, interpret):
    """(block_rows, groups): fewest groups first, then the largest row tile that fits VMEM."""
    groups_options = _group_options(w1_shape, w2_shape, dtype, interpret)
    if block_sizes.groups is not None:
        if block_sizes.groups not in groups_options:
            raise Unsupported(
                f"groups={block_sizes.groups} must divide q={w1_shape[1]} and l={w2_shape[0]}"
                + ("" if interpret else " into sublane/lane-aligned tiles")
            )
        groups_options = [block_sizes.groups]
    if block_sizes.block_rows is not None:
        tiles = (block_sizes.block_rows,)
    elif interpret:
        tiles = (_LANES,)  # every grid step costs in interpret mode
    else:
        tiles = tuple(bm for bm in _ROW_TILES if bm == _LANES or rows > bm // 2)
    if interpret:
        return tiles[0], groups_options[0]
    for groups in groups_options:
        for bm in tiles:
            if vmem_bytes(w1_shape, w2_shape, dtype, bm, groups) <= _VMEM_BUDGET:
                return bm, groups
    bm, groups = tiles[-1], groups_options[-1]
    need = vmem_bytes(w1_shape, w2_shape, dtype, bm, groups)
    raise Unsupported(
        f"the Mosaic TPU Monarch kernels keep a group of factor blocks in VMEM; w1.shape="
        f"{tuple(w1_shape)}, w2.shape={tuple(w2_shape)} need about {need / 2**20:.0f} MiB "
        f"at block_rows={bm}, groups={groups} (budget {_VMEM_BUDGET / 2**20:.0f} MiB): use "
        "implementation='xla'"
    )


def monarch_matmul_tpu(
    x2d: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool = False,
) -> jax.Array:
    """The Monarch product of ``x2d [rows, k*p]`` by ``w1 [k, q, p]`` and ``w2 [l, s, r]``.

    Arguments are already checked and of one dtype (``monarch.base.check_shapes``); returns
    ``[rows, l*s]`` in that dtype, differentiable in reverse mode (custom VJP).

    Raises:
      Unsupported: compiled (``interpret=False``) with feature blocks that are not multiples of
        8 or factor blocks too large for VMEM even in groups; ``implementation='xla'`` runs
        those. Also explicit ``groups`` that do not divide the factors.
    """
    block_sizes = BlockSizes() if block_sizes is None else block_sizes
    k, q, p = w1.shape
    l, s, r = w2.shape
    rows = x2d.shape[0]
    if not interpret:
        odd = {name: v for name, v in dict(p=p, r=r, s=s).items() if v % _SUBLANES}
        if odd:
            raise Unsupported(
                f"the Mosaic TPU Monarch kernel needs feature blocks that are multiples of 8; "
                f"got {odd} for w1.shape={tuple(w1.shape)}, w2.shape={tuple(w2.shape)}: use "
                "implementation='xla'"
            )
    bm, groups = _choose_tiles(block_sizes, w1.shape, w2.shape, x2d.dtype, rows, interpret)
    tiles = cdiv(rows, bm)
    splits = block_sizes.splits
    if splits is None:
        splits = 2 if tiles >= 2 else 1
    per = cdiv(tiles, splits)
    padded = splits * per * bm
    if padded != rows:  # zero rows: zero outputs, nothing added to the weight gradients
        x2d = jnp.pad(x2d, ((0, padded - rows), (0, 0)))
    cfg = _Config(
        k=k,
        q=q // groups,
        p=p,
        l=l // groups,
        s=s,
        r=r,
        block_rows=bm,
        splits=splits,
        tiles_per_split=per,
        groups=groups,
        interpret=interpret,
    )
    return _monarch(x2d, w1, w2, cfg)[:rows]
