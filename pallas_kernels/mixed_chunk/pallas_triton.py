"""Mixed-chunk attention (FLASH) as Pallas kernels: forward and backward, linear in length.

Hua, Dai, Liu, Le, "Transformer Quality in Linear Time", ICML 2022, arXiv:2202.10447.
One program per (batch element, block of value columns) walks the chunks in order. For each
chunk it computes the quadratic ``relu^2`` part tile by tile and adds ``Q_lin @ S``, where ``S``
(``[s_lin, block_e]``, float32) is the running sum of ``K_lin^T V`` over earlier chunks, kept
on chip and updated after the chunk (an exclusive prefix sum by construction; non-causal: the
total over all chunks, from a first pass). No ``[T, T]`` or per-chunk state array reaches memory.

The backward pass has three kernels. ``dq`` walks the chunks forward (``dQ_lin`` needs ``S``),
``dkv`` walks them backward with the reverse running sum ``R = sum_{later chunks} Q_lin^T dO``
(``dK_lin = V R^T``, ``dV += K_lin R``); both recompute the ``relu^2`` tiles. Gradients that sum
over the value features (``dQ``, ``dK``, ``dQ_lin``, ``dK_lin``) come out per block of value
columns and are added afterwards. ``dbias`` (only with a bias) runs one program per tile of the
``[C, C]`` bias and sums over chunks.

Lengths: the sequence is padded to whole chunks, each chunk to a multiple of the tile (at its
end) and the feature dimensions to powers of two >= 16; padded keys have zero values and padded
queries are cut off, so the result is exact. ``interpret=None`` runs in interpret mode unless on
a GPU.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._compat import cdiv
from pallas_kernels._compat import check_interpret
from pallas_kernels._compat import compiler_params_kwargs
from pallas_kernels._compat import multiple_of
from pallas_kernels._compat import resolve_interpret
from pallas_kernels.mixed_chunk.base import MIXED_CHUNK_ATTENTION
from pallas_kernels.mixed_chunk.base import mask_values
from pallas_kernels.op import Implementation
from pallas_kernels.op import Unsupported

__all__ = [
    "BlockSizes",
    "PallasTritonMixedChunk",
    "gpu_check_cases",
    "mixed_chunk_attention_pallas",
]

_MIN_BLOCK = 16  # Triton's dot needs tiles of at least 16 x 16.
_MAX_BLOCK = 256
_MAX_FEATURES = 256  # q/k feature width of one tile on a GPU (registers)


def _is_power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _next_power_of_two(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tiles and GPU launch parameters of the mixed-chunk kernels.

    Attributes:
      block: query/key rows per tile inside a chunk. The chunk is padded to a multiple of 16
        and the tile is the largest power of two ``<= block`` that divides it.
      block_e: value columns per program (programs run in parallel over batch x value blocks).
      num_warps: Triton warps per program (GPU only).
      num_stages: Triton software-pipelining depth (GPU only).

    ``block`` and ``block_e`` are powers of two in [16, 256].
    """

    block: int = 32
    block_e: int = 64
    num_warps: int | None = 8
    num_stages: int = 2

    def __post_init__(self):
        for name in ("block", "block_e"):
            value = getattr(self, name)
            if (
                not isinstance(value, int | np.integer)
                or isinstance(value, bool)
                or not _MIN_BLOCK <= value <= _MAX_BLOCK
                or not _is_power_of_two(int(value))
            ):
                raise ValueError(
                    f"{name}={value!r} must be a power of two in [{_MIN_BLOCK}, {_MAX_BLOCK}]"
                )
        if self.num_warps is not None and self.num_warps not in (1, 2, 4, 8, 16):
            raise ValueError(f"num_warps={self.num_warps!r} must be None or one of 1, 2, 4, 8, 16")
        if not isinstance(self.num_stages, int) or not 1 <= self.num_stages <= 8:
            raise ValueError(f"num_stages={self.num_stages!r} must be an int in [1, 8]")

    @classmethod
    def get_default(cls, backend: str = "gpu") -> BlockSizes:
        """GPU: 32-row tiles, 64 value columns per program, 8 warps (no register spills at
        s = 128, sm_80 and sm_90a; 4 warps spill in the backward kernels). CPU (interpret
        mode pays per loop iteration): the largest tiles."""
        if backend == "gpu":
            return cls()
        if backend == "cpu":
            return cls(block=128, block_e=256)
        raise ValueError(f"{backend=} must be 'gpu' or 'cpu'")


@dataclasses.dataclass(frozen=True)
class _Config:
    """Static description of one padded call, shared by the kernels."""

    num_chunks: int
    chunk: int  # padded chunk length (a multiple of `block`)
    block: int
    block_e: int
    causal: bool
    quad_scale: float
    lin_scale: float
    has_lin: bool
    has_bias: bool
    weight_dtype: Any  # dtype of the relu^2 weights fed to matmuls (float32 for float16 inputs)
    interpret: bool
    num_warps: int | None
    num_stages: int

    value_blocks: int  # padded value features // block_e

    @property
    def tiles(self) -> int:
        return self.chunk // self.block


def _dot(a, b, *, transpose_a=False, transpose_b=False):
    """a @ b with float32 accumulation (full float32 precision for float32 inputs)."""
    dims = (((0,) if transpose_a else (1,), (1,) if transpose_b else (0,)), ((), ()))
    # The Triton lowering maps DEFAULT precision to tf32 for float32; HIGHEST keeps IEEE.
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _fori(lower, upper, body, carry):
    if isinstance(lower, int) and isinstance(upper, int) and upper <= lower:
        return carry
    return lax.fori_loop(lower, upper, body, carry)


def _rows(start, size):
    if not isinstance(start, int):
        start = multiple_of(start, size)
    return pl.ds(start, size)


def _relu_scores(cfg, q, k, bias_ref, tile_i, tile_j, *, mask):
    """relu(quad_scale q k^T + bias) of one tile; ``mask``: 'none', 'diagonal' or 'element'.

    'diagonal' is a tile on the chunk's diagonal (row >= col inside the tile); 'element'
    compares the tiles' chunk-local positions (for a tile of any place).
    """
    scores = _dot(q, k, transpose_b=True) * cfg.quad_scale
    if cfg.has_bias:
        b = bias_ref[_rows(tile_i * cfg.block, cfg.block), _rows(tile_j * cfg.block, cfg.block)]
        scores = scores + b.astype(jnp.float32)
    r = jnp.maximum(scores, 0.0)
    if mask != "none":
        rows = lax.broadcasted_iota(jnp.int32, r.shape, 0)
        cols = lax.broadcasted_iota(jnp.int32, r.shape, 1)
        if mask == "element":
            rows, cols = rows + tile_i * cfg.block, cols + tile_j * cfg.block
        r = jnp.where(rows >= cols, r, 0.0)
    return r


def _chunk_outer(cfg, a_ref, b_ref, chunk):
    """sum over the chunk's rows of a_i^T b_i: ``[a features, b features]`` float32."""

    def body(t, acc):
        rows = _rows(chunk * cfg.chunk + t * cfg.block, cfg.block)
        return acc + _dot(a_ref[rows, :], b_ref[rows, :], transpose_a=True)

    zeros = jnp.zeros((a_ref.shape[-1], b_ref.shape[-1]), jnp.float32)
    return _fori(0, cfg.tiles, body, zeros)


def _total_outer(cfg, a_ref, b_ref):
    """sum over the whole sequence of a_i^T b_i (the non-causal linear state)."""
    zeros = jnp.zeros((a_ref.shape[-1], b_ref.shape[-1]), jnp.float32)
    return _fori(0, cfg.num_chunks, lambda g, acc: acc + _chunk_outer(cfg, a_ref, b_ref, g), zeros)


# --------------------------------------------------------------------------------------------
# Forward
# --------------------------------------------------------------------------------------------


def _fwd_kernel(qq_ref, kq_ref, ql_ref, kl_ref, v_ref, bias_ref, o_ref, *, cfg):
    block, tiles, wdt = cfg.block, cfg.tiles, cfg.weight_dtype

    def row_tile(chunk, i, state):
        rows = _rows(chunk * cfg.chunk + i * block, block)
        q = qq_ref[rows, :]

        def key_tile(j, acc, mask):
            cols = _rows(chunk * cfg.chunk + j * block, block)
            r = _relu_scores(cfg, q, kq_ref[cols, :], bias_ref, i, j, mask=mask)
            return acc + _dot((r * r).astype(wdt), v_ref[cols, :].astype(wdt))

        acc = jnp.zeros((block, v_ref.shape[-1]), jnp.float32)
        if cfg.causal:
            acc = _fori(0, i, lambda j, a: key_tile(j, a, "none"), acc)
            acc = key_tile(i, acc, "diagonal")
        else:
            acc = _fori(0, tiles, lambda j, a: key_tile(j, a, "none"), acc)
        if cfg.has_lin:
            ql = ql_ref[rows, :].astype(wdt)
            acc = acc + _dot(ql, state.astype(wdt)) * cfg.lin_scale
        o_ref[rows, :] = acc.astype(o_ref.dtype)

    def chunk_body(chunk, state):
        _fori(0, tiles, lambda i, c: (row_tile(chunk, i, state), c)[1], None)
        if cfg.has_lin and cfg.causal:
            # After the chunk's rows are written: the state stays exclusive of its own chunk.
            state = state + _chunk_outer(cfg, kl_ref, v_ref, chunk)
        return state

    if not cfg.has_lin:
        state = None
    elif cfg.causal:
        state = jnp.zeros((kl_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
    else:
        state = _total_outer(cfg, kl_ref, v_ref)
    _fori(0, cfg.num_chunks, chunk_body, state)


# --------------------------------------------------------------------------------------------
# Backward
# --------------------------------------------------------------------------------------------


def _dq_kernel(qq_ref, kq_ref, ql_ref, kl_ref, v_ref, bias_ref, do_ref, dq_ref, dql_ref, *, cfg):
    """dQ (quadratic) and dQ_lin of one block of value columns, walking the chunks forward."""
    block, tiles, wdt = cfg.block, cfg.tiles, cfg.weight_dtype

    def row_tile(chunk, i, state):
        rows = _rows(chunk * cfg.chunk + i * block, block)
        q, do = qq_ref[rows, :], do_ref[rows, :]

        def key_tile(j, dq, mask):
            cols = _rows(chunk * cfg.chunk + j * block, block)
            k = kq_ref[cols, :]
            r = _relu_scores(cfg, q, k, bias_ref, i, j, mask=mask)
            d_weights = _dot(do, v_ref[cols, :], transpose_b=True)
            d_scores = 2.0 * r * d_weights
            return dq + _dot(d_scores.astype(wdt), k.astype(wdt))

        dq = jnp.zeros((block, qq_ref.shape[-1]), jnp.float32)
        if cfg.causal:
            dq = _fori(0, i, lambda j, a: key_tile(j, a, "none"), dq)
            dq = key_tile(i, dq, "diagonal")
        else:
            dq = _fori(0, tiles, lambda j, a: key_tile(j, a, "none"), dq)
        dq_ref[rows, :] = dq * cfg.quad_scale
        if cfg.has_lin:
            dql = _dot(do.astype(wdt), state.astype(wdt), transpose_b=True)
            dql_ref[rows, :] = dql * cfg.lin_scale

    def chunk_body(chunk, state):
        _fori(0, tiles, lambda i, c: (row_tile(chunk, i, state), c)[1], None)
        if cfg.has_lin and cfg.causal:
            state = state + _chunk_outer(cfg, kl_ref, v_ref, chunk)
        return state

    if not cfg.has_lin:
        state = None
    elif cfg.causal:
        state = jnp.zeros((kl_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
    else:
        state = _total_outer(cfg, kl_ref, v_ref)
    _fori(0, cfg.num_chunks, chunk_body, state)


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
        cols = _rows(chunk * cfg.chunk + j * block, block)
        k, v = kq_ref[cols, :], v_ref[cols, :]

        def row_tile(i, carry, mask):
            dk, dv = carry
            rows = _rows(chunk * cfg.chunk + i * block, block)
            q, do = qq_ref[rows, :], do_ref[rows, :]
            r = _relu_scores(cfg, q, k, bias_ref, i, j, mask=mask)
            dv = dv + _dot((r * r).astype(wdt), do.astype(wdt), transpose_a=True)
            d_scores = 2.0 * r * _dot(do, v, transpose_b=True)
            dk = dk + _dot(d_scores.astype(wdt), q.astype(wdt), transpose_a=True)
            return dk, dv

        carry = (
            jnp.zeros((block, kq_ref.shape[-1]), jnp.float32),
            jnp.zeros((block, v_ref.shape[-1]), jnp.float32),
        )
        if cfg.causal:
            carry = row_tile(j, carry, "diagonal")
            carry = _fori(j + 1, tiles, lambda i, c: row_tile(i, c, "none"), carry)
        else:
            carry = _fori(0, tiles, lambda i, c: row_tile(i, c, "none"), carry)
        dk, dv = carry
        dk_ref[cols, :] = dk * cfg.quad_scale
        if cfg.has_lin:
            state = reverse_state.astype(wdt)
            dv = dv + _dot(kl_ref[cols, :].astype(wdt), state) * cfg.lin_scale
            dkl = _dot(v.astype(wdt), state, transpose_b=True)
            dkl_ref[cols, :] = dkl * cfg.lin_scale
        dv_ref[cols, :] = dv.astype(dv_ref.dtype)

    def chunk_body(step, reverse_state):
        chunk = cfg.num_chunks - 1 - step
        _fori(0, tiles, lambda j, c: (key_tile(chunk, j, reverse_state), c)[1], None)
        if cfg.has_lin and cfg.causal:
            reverse_state = reverse_state + _chunk_outer(cfg, ql_ref, do_ref, chunk)
        return reverse_state

    if not cfg.has_lin:
        reverse_state = None
    elif cfg.causal:
        reverse_state = jnp.zeros((ql_ref.shape[-1], do_ref.shape[-1]), jnp.float32)
    else:
        reverse_state = _total_outer(cfg, ql_ref, do_ref)
    _fori(0, cfg.num_chunks, chunk_body, reverse_state)


def _dbias_kernel(qq_ref, kq_ref, v_ref, bias_ref, do_ref, db_ref, *, cfg):
    """One ``[block, block]`` tile of dbias for one batch element, summed over the chunks."""
    tile_i, tile_j = pl.program_id(0), pl.program_id(1)
    block = cfg.block

    def body(chunk, acc):
        rows = _rows(chunk * cfg.chunk + tile_i * block, block)
        cols = _rows(chunk * cfg.chunk + tile_j * block, block)
        mask = "element" if cfg.causal else "none"
        r = _relu_scores(cfg, qq_ref[rows, :], kq_ref[cols, :], bias_ref, tile_i, tile_j, mask=mask)

        def value_block(e, d_weights):
            # dO_i . v_j over the value features, one block at a time (a wide e stays in
            # registers only block_e columns wide).
            features = _rows(e * cfg.block_e, cfg.block_e)
            do, v = do_ref[rows, features], v_ref[cols, features]
            return d_weights + _dot(do, v, transpose_b=True)

        d_weights = _fori(0, cfg.value_blocks, value_block, jnp.zeros_like(r))
        return acc + 2.0 * r * d_weights

    # Causal tiles above the diagonal see nothing: no chunk is visited.
    if cfg.causal:
        # (Both bounds int32 values: Triton's loop needs one index type.)
        lower = jnp.zeros((), jnp.int32)
        upper = jnp.where(tile_j > tile_i, lower, jnp.int32(cfg.num_chunks))
    else:
        lower, upper = 0, cfg.num_chunks
    acc = _fori(lower, upper, body, jnp.zeros((block, block), jnp.float32))
    db_ref[...] = acc


# --------------------------------------------------------------------------------------------
# pallas_call wrappers
# --------------------------------------------------------------------------------------------


def _call(kernel, cfg, name, **kwargs):
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        interpret=cfg.interpret,
        name=name,
        **compiler_params_kwargs(
            interpret=cfg.interpret, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        ),
        **kwargs,
    )


def _specs(cfg, qq, ql, v, bias):
    """BlockSpecs over the grid (batch, value block): whole sequences, one value block."""
    seq = qq.shape[1]

    def whole(x):
        return None if x is None else pl.BlockSpec((None, seq, x.shape[-1]), lambda b, e: (b, 0, 0))

    value = pl.BlockSpec((None, seq, cfg.block_e), lambda b, e: (b, 0, e))
    bias_spec = None if bias is None else pl.BlockSpec(bias.shape, lambda b, e: (0, 0))
    return whole(qq), whole(ql), value, bias_spec


def _forward(qq, kq, ql, kl, v, bias, cfg):
    batch, seq, e = v.shape
    q_spec, l_spec, v_spec, b_spec = _specs(cfg, qq, ql, v, bias)
    return _call(
        _fwd_kernel,
        cfg,
        "mixed_chunk_fwd",
        grid=(batch, e // cfg.block_e),
        in_specs=[q_spec, q_spec, l_spec, l_spec, v_spec, b_spec],
        out_specs=v_spec,
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
    )(qq, kq, ql, kl, v, bias)


def _backward(cfg, residuals, do):
    qq, kq, ql, kl, v, bias = residuals
    batch, seq, e = v.shape
    value_blocks = e // cfg.block_e
    do = do.astype(v.dtype)
    q_spec, l_spec, v_spec, b_spec = _specs(cfg, qq, ql, v, bias)
    grid = (batch, value_blocks)

    def per_value_block(x):
        """Per-value-block partial gradients `[value_blocks, batch, seq, features]`."""
        if x is None:
            return None, None
        spec = pl.BlockSpec((None, None, seq, x.shape[-1]), lambda b, e: (e, b, 0, 0))
        return spec, jax.ShapeDtypeStruct((value_blocks, *x.shape), jnp.float32)

    (dq_spec, dq_shape), (dql_spec, dql_shape) = per_value_block(qq), per_value_block(ql)
    dq, dql = _call(
        _dq_kernel,
        cfg,
        "mixed_chunk_dq",
        grid=grid,
        in_specs=[q_spec, q_spec, l_spec, l_spec, v_spec, b_spec, v_spec],
        out_specs=[dq_spec, dql_spec],
        out_shape=[dq_shape, dql_shape],
    )(qq, kq, ql, kl, v, bias, do)
    dk, dkl, dv = _call(
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
        dbias_per_batch = _call(
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


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _mixed_chunk_padded(qq, kq, ql, kl, v, bias, cfg):
    return _forward(qq, kq, ql, kl, v, bias, cfg)


def _mixed_chunk_padded_fwd(qq, kq, ql, kl, v, bias, cfg):
    return _forward(qq, kq, ql, kl, v, bias, cfg), (qq, kq, ql, kl, v, bias)


_mixed_chunk_padded.defvjp(_mixed_chunk_padded_fwd, _backward)


# --------------------------------------------------------------------------------------------
# Padding and the implementation
# --------------------------------------------------------------------------------------------


def _tile_for(chunk_size: int, block: int) -> tuple[int, int]:
    """(padded chunk length, tile): the chunk rounded up to 16, the largest power-of-two tile
    ``<= block`` that divides it."""
    padded = _round_up(chunk_size, _MIN_BLOCK)
    tile = block
    while padded % tile:
        tile //= 2
    return padded, tile


def _pad_features(n: int) -> int:
    return max(_MIN_BLOCK, _next_power_of_two(n))


def mixed_chunk_attention_pallas(
    quad_q,
    quad_k,
    value,
    lin_q,
    lin_k,
    *,
    bias,
    key_mask,
    chunk_size,
    causal,
    quad_scale,
    lin_scale,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """The kernels on already checked arguments (see ``base.check_arguments``)."""
    interpret = resolve_interpret(interpret)
    if block_sizes is None:
        block_sizes = BlockSizes.get_default("cpu" if interpret else "gpu")
    batch, seq_len, e = value.shape
    num_chunks = cdiv(seq_len, chunk_size)
    chunk, block = _tile_for(chunk_size, block_sizes.block)
    e_padded = _pad_features(e)
    block_e = min(block_sizes.block_e, e_padded)

    def pad(x):
        """[b, T, d] -> [b, G * chunk, d_pad]: each chunk padded at its end."""
        if x is None:
            return None
        d = x.shape[-1]
        d_padded = e_padded if x is value else _pad_features(d)
        x = jnp.pad(x, ((0, 0), (0, num_chunks * chunk_size - seq_len), (0, 0)))
        x = x.reshape(batch, num_chunks, chunk_size, d)
        x = jnp.pad(x, ((0, 0), (0, 0), (0, chunk - chunk_size), (0, d_padded - d)))
        return x.reshape(batch, num_chunks * chunk, d_padded)

    value = mask_values(value, key_mask)
    padded = [pad(x) for x in (quad_q, quad_k, lin_q, lin_k)]
    padded_value = pad(value)
    if bias is not None:
        bias = jnp.pad(bias, ((0, chunk - chunk_size), (0, chunk - chunk_size)))
    cfg = _Config(
        num_chunks=num_chunks,
        chunk=chunk,
        block=block,
        block_e=block_e,
        value_blocks=e_padded // block_e,
        causal=causal,
        quad_scale=quad_scale,
        lin_scale=lin_scale,
        has_lin=lin_q is not None,
        has_bias=bias is not None,
        weight_dtype=jnp.float32 if value.dtype == jnp.float16 else value.dtype,
        interpret=interpret,
        num_warps=block_sizes.num_warps,
        num_stages=block_sizes.num_stages,
    )
    out = _mixed_chunk_padded(*padded, padded_value, bias, cfg)
    out = out.reshape(batch, num_chunks, chunk, e_padded)[:, :, :chunk_size, :e]
    return out.reshape(batch, num_chunks * chunk_size, e)[:, :seq_len]


@dataclasses.dataclass(frozen=True)
class PallasTritonMixedChunk(Implementation):
    """The Pallas kernels (``implementation='pallas_triton'``, alias ``'pallas'``).

    Attributes:
      block_sizes: tiles and launch parameters; default ``BlockSizes.get_default()`` for the
        mode it runs in.
      interpret: Pallas interpret mode; None: interpret unless on a GPU.
    """

    name: ClassVar[str] = "pallas_triton"
    supports_forward_mode: ClassVar[bool] = False

    block_sizes: BlockSizes | None = None
    interpret: bool | None = None

    def __post_init__(self):
        # Refused when configured, not at the first call (as PallasTritonAttention does).
        if self.block_sizes is not None and not isinstance(self.block_sizes, BlockSizes):
            raise ValueError(f"block_sizes={self.block_sizes!r} must be a BlockSizes or None")
        check_interpret(self.interpret)  # validates without asking JAX for a backend

    def __call__(self, **kwargs) -> jax.Array:
        interpret = resolve_interpret(self.interpret)
        if not interpret:
            widths = {"quad_q": kwargs["quad_q"].shape[-1]}
            if kwargs["lin_q"] is not None:
                widths["lin_q"] = kwargs["lin_q"].shape[-1]
            for name, width in widths.items():
                if _pad_features(width) > _MAX_FEATURES:
                    raise Unsupported(
                        f"{name} has {width} features; the compiled kernel takes at most "
                        f"{_MAX_FEATURES}"
                    )
        return mixed_chunk_attention_pallas(
            **kwargs, block_sizes=self.block_sizes, interpret=interpret
        )


MIXED_CHUNK_ATTENTION.register(PallasTritonMixedChunk())


def gpu_check_cases(block_sizes: BlockSizes | None = None) -> list[dict[str, Any]]:
    """Compile cases for a GPU compile check: forward and backward at FLASH's paper sizes.

    Each case names a function of abstract inputs (``fn``, ``args`` as ShapeDtypeStructs) that
    runs the forward kernel or the forward and all backward kernels (causal and non-causal,
    with a relative-position bias) in bfloat16: s = 128, e = 512 (model width 256, expansion 2),
    C = 256, T = 2048, batch 2.
    """
    batch, seq, s, e, chunk = 2, 2048, 128, 512, 256
    dtype = jnp.bfloat16
    impl = PallasTritonMixedChunk(block_sizes=block_sizes, interpret=False)
    z = jax.ShapeDtypeStruct((batch, seq, s), dtype)
    v = jax.ShapeDtypeStruct((batch, seq, e), dtype)
    b = jax.ShapeDtypeStruct((chunk, chunk), jnp.float32)

    def call(causal):
        def fn(qq, kq, ql, kl, v, bias):
            return MIXED_CHUNK_ATTENTION.dispatch(
                impl,
                quad_q=qq,
                quad_k=kq,
                value=v,
                lin_q=ql,
                lin_k=kl,
                bias=bias,
                key_mask=None,
                chunk_size=chunk,
                causal=causal,
                quad_scale=1.0 / chunk,
                lin_scale=1.0 / chunk,
            )

        return fn

    cases = []
    for causal in (True, False):
        fwd = call(causal)

        def fwd_bwd(*args, fwd=fwd):
            out, vjp = jax.vjp(fwd, *args)
            return out, vjp(jnp.ones_like(out))

        tag = "causal" if causal else "full"
        args = (z, z, z, z, v, b)
        cases.append({"name": f"mixed_chunk_fwd_{tag}", "fn": fwd, "args": args})
        cases.append({"name": f"mixed_chunk_fwd_bwd_{tag}", "fn": fwd_bwd, "args": args})
    return cases
