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

This file is the op glue: ``BlockSizes`` (the tuning), padding, the custom VJP tying
``pallas_triton_kernel.forward`` to ``pallas_triton_backward.backward``, and
``PallasTritonMixedChunk``, the implementation the op's table lists (``api.py``).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels._compat import cdiv
from pallas_kernels._compat import check_interpret
from pallas_kernels._compat import resolve_interpret
from pallas_kernels.mixed_chunk.base import MixedChunkCall
from pallas_kernels.mixed_chunk.base import MixedChunkImplementation
from pallas_kernels.mixed_chunk.base import mask_values
from pallas_kernels.mixed_chunk.pallas_triton_backward import backward
from pallas_kernels.mixed_chunk.pallas_triton_kernel import Config
from pallas_kernels.mixed_chunk.pallas_triton_kernel import forward
from pallas_kernels.op import Unsupported

__all__ = ["BlockSizes", "PallasTritonMixedChunk", "mixed_chunk_attention_pallas"]

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


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _mixed_chunk_padded(qq, kq, ql, kl, v, bias, cfg):
    return forward(qq, kq, ql, kl, v, bias, cfg)


def _mixed_chunk_padded_fwd(qq, kq, ql, kl, v, bias, cfg):
    return forward(qq, kq, ql, kl, v, bias, cfg), (qq, kq, ql, kl, v, bias)


_mixed_chunk_padded.defvjp(_mixed_chunk_padded_fwd, backward)


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
    call: MixedChunkCall,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """The kernels on a checked call (see ``base.check_arguments``)."""
    quad_q, quad_k, value, lin_q, lin_k = call.inputs
    bias, chunk_size = call.bias, call.chunk_size
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

    value = mask_values(value, call.key_mask)
    padded = [pad(x) for x in (quad_q, quad_k, lin_q, lin_k)]
    padded_value = pad(value)
    if bias is not None:
        bias = jnp.pad(bias, ((0, chunk - chunk_size), (0, chunk - chunk_size)))
    cfg = Config(
        num_chunks=num_chunks,
        chunk=chunk,
        block=block,
        block_e=block_e,
        value_blocks=e_padded // block_e,
        causal=call.causal,
        quad_scale=call.quad_scale,
        lin_scale=call.lin_scale,
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
class PallasTritonMixedChunk(MixedChunkImplementation):
    """The Pallas kernels (``implementation='pallas_triton'``, alias ``'pallas'``).

    Attributes:
      block_sizes: tiles and launch parameters; default ``BlockSizes.get_default()`` for the
        mode it runs in.
      interpret: Pallas interpret mode; None: interpret unless on a GPU.
    """

    name = "pallas_triton"
    supports_forward_mode = False

    block_sizes: BlockSizes | None = None
    interpret: bool | None = None

    def __post_init__(self):
        # Refused when configured, not at the first call (as PallasTritonAttention does).
        if self.block_sizes is not None and not isinstance(self.block_sizes, BlockSizes):
            raise ValueError(f"block_sizes={self.block_sizes!r} must be a BlockSizes or None")
        check_interpret(self.interpret)  # validates without asking JAX for a backend

    def __call__(self, call: MixedChunkCall) -> jax.Array:
        if not isinstance(call.quad_scale, float) or not isinstance(call.lin_scale, float):
            raise Unsupported("the kernel needs quad_scale and lin_scale known at trace time")
        interpret = resolve_interpret(self.interpret)
        if not interpret:
            widths = {"quad_q": call.quad_q.shape[-1]}
            if call.lin_q is not None:
                widths["lin_q"] = call.lin_q.shape[-1]
            for name, width in widths.items():
                if _pad_features(width) > _MAX_FEATURES:
                    raise Unsupported(
                        f"{name} has {width} features; the compiled kernel takes at most "
                        f"{_MAX_FEATURES}"
                    )
        return mixed_chunk_attention_pallas(call, self.block_sizes, interpret)
