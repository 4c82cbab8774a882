"""Mixed-chunk attention (FLASH, arXiv:2202.10447): one call value, an explicit table (``api``).

``api`` (``mixed_chunk_attention``, the table), ``base`` (checks, ``MixedChunkCall``),
``reference`` (the ``[T, T]`` oracle), ``xla`` (chunked XLA), ``pallas_triton`` (op glue and
tuning of the Pallas kernels), ``pallas_triton_kernel`` / ``pallas_triton_backward`` (their
bodies), ``pallas_mosaic_tpu`` / ``pallas_mosaic_tpu_kernel`` (the TPU kernels: glue, bodies).
"""

from pallas_kernels.mixed_chunk.api import MIXED_CHUNK_OP
from pallas_kernels.mixed_chunk.api import mixed_chunk_attention
from pallas_kernels.mixed_chunk.base import MixedChunkCall
from pallas_kernels.mixed_chunk.pallas_mosaic_tpu import PallasMosaicTpuMixedChunk
from pallas_kernels.mixed_chunk.pallas_triton import BlockSizes
from pallas_kernels.mixed_chunk.pallas_triton import PallasTritonMixedChunk
from pallas_kernels.mixed_chunk.reference import ReferenceMixedChunk
from pallas_kernels.mixed_chunk.reference import mixed_chunk_attention_reference
from pallas_kernels.mixed_chunk.xla import XlaMixedChunk

__all__ = [
    "MIXED_CHUNK_OP",
    "BlockSizes",
    "MixedChunkCall",
    "PallasMosaicTpuMixedChunk",
    "PallasTritonMixedChunk",
    "ReferenceMixedChunk",
    "XlaMixedChunk",
    "mixed_chunk_attention",
    "mixed_chunk_attention_reference",
]
