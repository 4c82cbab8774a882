"""The mixed-chunk (FLASH) forward kernel body (Pallas Triton), its helpers and ``pallas_call``.

Hua, Dai, Liu, Le, "Transformer Quality in Linear Time", ICML 2022, arXiv:2202.10447. One program
per (batch element, block of value columns) walks the chunks in order, keeping the running
linear state ``S`` on chip. The backward kernels are in ``pallas_triton_backward.py``; block
sizes, padding, the custom VJP and the implementation (the op glue) in ``pallas_triton.py``.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from pallas_kernels._compat import compiler_params_kwargs
from pallas_kernels._compat import multiple_of


@dataclasses.dataclass(frozen=True)
class Config:
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


def dot(a, b, *, transpose_a=False, transpose_b=False):
    """a @ b with float32 accumulation (full float32 precision for float32 inputs)."""
    dims = (((0,) if transpose_a else (1,), (1,) if transpose_b else (0,)), ((), ()))
    # The Triton lowering maps DEFAULT precision to tf32 for float32; HIGHEST keeps IEEE.
    precision = lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def fori(lower, upper, body, carry):
    if isinstance(lower, int) and isinstance(upper, int) and upper <= lower:
        return carry
    return lax.fori_loop(lower, upper, body, carry)


def rows_of(start, size):
    if not isinstance(start, int):
        start = multiple_of(start, size)
    return pl.ds(start, size)


def relu_scores(cfg, q, k, bias_ref, tile_i, tile_j, *, mask):
    """relu(quad_scale q k^T + bias) of one tile; ``mask``: 'none', 'diagonal' or 'element'.

    'diagonal' is a tile on the chunk's diagonal (row >= col inside the tile); 'element'
    compares the tiles' chunk-local positions (for a tile of any place).
    """
    scores = dot(q, k, transpose_b=True) * cfg.quad_scale
    if cfg.has_bias:
        b = bias_ref[rows_of(tile_i * cfg.block, cfg.block), rows_of(tile_j * cfg.block, cfg.block)]
        scores = scores + b.astype(jnp.float32)
    r = jnp.maximum(scores, 0.0)
    if mask != "none":
        rows = lax.broadcasted_iota(jnp.int32, r.shape, 0)
        cols = lax.broadcasted_iota(jnp.int32, r.shape, 1)
        if mask == "element":
            rows, cols = rows + tile_i * cfg.block, cols + tile_j * cfg.block
        r = jnp.where(rows >= cols, r, 0.0)
    return r


def chunk_outer(cfg, a_ref, b_ref, chunk):
    """sum over the chunk's rows of a_i^T b_i: ``[a features, b features]`` float32."""

    def body(t, acc):
        rows = rows_of(chunk * cfg.chunk + t * cfg.block, cfg.block)
        return acc + dot(a_ref[rows, :], b_ref[rows, :], transpose_a=True)

    zeros = jnp.zeros((a_ref.shape[-1], b_ref.shape[-1]), jnp.float32)
    return fori(0, cfg.tiles, body, zeros)


def total_outer(cfg, a_ref, b_ref):
    """sum over the whole sequence of a_i^T b_i (the non-causal linear state)."""
    zeros = jnp.zeros((a_ref.shape[-1], b_ref.shape[-1]), jnp.float32)
    return fori(0, cfg.num_chunks, lambda g, acc: acc + chunk_outer(cfg, a_ref, b_ref, g), zeros)


def _fwd_kernel(qq_ref, kq_ref, ql_ref, kl_ref, v_ref, bias_ref, o_ref, *, cfg):
    block, tiles, wdt = cfg.block, cfg.tiles, cfg.weight_dtype

    def row_tile(chunk, i, state):
        rows = rows_of(chunk * cfg.chunk + i * block, block)
        q = qq_ref[rows, :]

        def key_tile(j, acc, mask):
            cols = rows_of(chunk * cfg.chunk + j * block, block)
            r = relu_scores(cfg, q, kq_ref[cols, :], bias_ref, i, j, mask=mask)
            return acc + dot((r * r).astype(wdt), v_ref[cols, :].astype(wdt))

        acc = jnp.zeros((block, v_ref.shape[-1]), jnp.float32)
        if cfg.causal:
            acc = fori(0, i, lambda j, a: key_tile(j, a, "none"), acc)
            acc = key_tile(i, acc, "diagonal")
        else:
            acc = fori(0, tiles, lambda j, a: key_tile(j, a, "none"), acc)
        if cfg.has_lin:
            ql = ql_ref[rows, :].astype(wdt)
            acc = acc + dot(ql, state.astype(wdt)) * cfg.lin_scale
        o_ref[rows, :] = acc.astype(o_ref.dtype)

    def chunk_body(chunk, state):
        fori(0, tiles, lambda i, c: (row_tile(chunk, i, state), c)[1], None)
        if cfg.has_lin and cfg.causal:
            # After the chunk's rows are written: the state stays exclusive of its own chunk.
            state = state + chunk_outer(cfg, kl_ref, v_ref, chunk)
        return state

    if not cfg.has_lin:
        state = None
    elif cfg.causal:
        state = jnp.zeros((kl_ref.shape[-1], v_ref.shape[-1]), jnp.float32)
    else:
        state = total_outer(cfg, kl_ref, v_ref)
    fori(0, cfg.num_chunks, chunk_body, state)


def pallas_call(kernel, cfg, name, **kwargs):
    return pl.pallas_call(
        functools.partial(kernel, cfg=cfg),
        interpret=cfg.interpret,
        name=name,
        **compiler_params_kwargs(
            interpret=cfg.interpret, num_warps=cfg.num_warps, num_stages=cfg.num_stages
        ),
        **kwargs,
    )


def block_specs(cfg, qq, ql, v, bias):
    """BlockSpecs over the grid (batch, value block): whole sequences, one value block."""
    seq = qq.shape[1]

    def whole(x):
        return None if x is None else pl.BlockSpec((None, seq, x.shape[-1]), lambda b, e: (b, 0, 0))

    value = pl.BlockSpec((None, seq, cfg.block_e), lambda b, e: (b, 0, e))
    bias_spec = None if bias is None else pl.BlockSpec(bias.shape, lambda b, e: (0, 0))
    return whole(qq), whole(ql), value, bias_spec


def forward(qq, kq, ql, kl, v, bias, cfg):
    batch, seq, e = v.shape
    q_spec, l_spec, v_spec, b_spec = block_specs(cfg, qq, ql, v, bias)
    return pallas_call(
        _fwd_kernel,
        cfg,
        "mixed_chunk_fwd",
        grid=(batch, e // cfg.block_e),
        in_specs=[q_spec, q_spec, l_spec, l_spec, v_spec, b_spec],
        out_specs=v_spec,
        out_shape=jax.ShapeDtypeStruct(v.shape, v.dtype),
    )(qq, kq, ql, kl, v, bias)
