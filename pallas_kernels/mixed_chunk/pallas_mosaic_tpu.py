"""The mixed-chunk attention op's Pallas Mosaic TPU implementation
(``implementation='pallas_mosaic_tpu'``).

Hua, Dai, Liu, Le, "Transformer Quality in Linear Time", ICML 2022, arXiv:2202.10447.

Op glue only: the kernels (one chunk per grid step, the linear state in VMEM, a two-pass
backward) are in ``pallas_mosaic_tpu_kernel.py``. ``'auto'`` tries this implementation first on a
TPU and falls through to ``'xla'`` where it refuses (a chunk too large for VMEM).
"""

from __future__ import annotations

import dataclasses

import jax

from pallas_kernels._compat import backend_kind
from pallas_kernels._compat import check_interpret
from pallas_kernels.mixed_chunk.base import MixedChunkCall
from pallas_kernels.mixed_chunk.base import MixedChunkImplementation
from pallas_kernels.mixed_chunk.pallas_mosaic_tpu_kernel import BlockSizes
from pallas_kernels.mixed_chunk.pallas_mosaic_tpu_kernel import mixed_chunk_attention_tpu

__all__ = ["PallasMosaicTpuMixedChunk"]


@dataclasses.dataclass(frozen=True)
class PallasMosaicTpuMixedChunk(MixedChunkImplementation):
    """The Pallas Mosaic TPU kernels.

    Attributes:
      block_sizes: a :class:`~pallas_kernels.mixed_chunk.pallas_mosaic_tpu_kernel.BlockSizes`
        (how far each chunk is padded); None: to a multiple of 16 rows.
      interpret: TPU interpret mode (runs on a CPU); None: compiled on a TPU, interpreted
        elsewhere.

    Reverse-mode only (custom VJP with a Pallas backward kernel): inside
    :func:`~pallas_kernels.op.forward_mode_autodiff` the op substitutes the XLA path.
    """

    name = "pallas_mosaic_tpu"
    supports_forward_mode = False
    block_sizes: BlockSizes | None = None
    interpret: bool | None = None

    def __post_init__(self):
        if self.block_sizes is not None and not isinstance(self.block_sizes, BlockSizes):
            raise ValueError(
                f"block_sizes={self.block_sizes!r} must be a pallas_mosaic_tpu_kernel.BlockSizes"
            )
        check_interpret(self.interpret)

    def __call__(self, call: MixedChunkCall) -> jax.Array:
        interpret = self.interpret
        if interpret is None:  # resolved at the call, not at import or construction
            interpret = backend_kind() != "tpu"
        return mixed_chunk_attention_tpu(call, block_sizes=self.block_sizes, interpret=interpret)
