"""Mixed-chunk attention (FLASH, arXiv:2202.10447) behind one op: reference, XLA, Pallas kernel."""

from pallas_kernels.mixed_chunk import pallas_triton as _pallas_triton  # registers the kernels
from pallas_kernels.mixed_chunk import reference as _reference  # registers 'reference'
from pallas_kernels.mixed_chunk import xla as _xla  # registers 'xla'
from pallas_kernels.mixed_chunk.base import MIXED_CHUNK_ATTENTION
from pallas_kernels.mixed_chunk.base import mixed_chunk_attention
from pallas_kernels.mixed_chunk.pallas_triton import BlockSizes
from pallas_kernels.mixed_chunk.pallas_triton import PallasTritonMixedChunk
from pallas_kernels.mixed_chunk.pallas_triton import gpu_check_cases
from pallas_kernels.mixed_chunk.reference import ReferenceMixedChunk
from pallas_kernels.mixed_chunk.reference import mixed_chunk_attention_reference
from pallas_kernels.mixed_chunk.xla import XlaMixedChunk

__all__ = [
    "MIXED_CHUNK_ATTENTION",
    "BlockSizes",
    "PallasTritonMixedChunk",
    "ReferenceMixedChunk",
    "XlaMixedChunk",
    "gpu_check_cases",
    "mixed_chunk_attention",
    "mixed_chunk_attention_reference",
]
