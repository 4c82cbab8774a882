"""Pallas kernels (compiled for GPUs and TPUs, interpret mode on CPU) behind one op interface
per family: attention (FlashAttention), Monarch matmuls and mixed-chunk (FLASH) attention."""

from pallas_kernels.attention import ATTENTION_OP
from pallas_kernels.attention import BlockSizes
from pallas_kernels.attention import CudnnAttention
from pallas_kernels.attention import MosaicTpuAttention
from pallas_kernels.attention import PallasTritonAttention
from pallas_kernels.attention import ReferenceAttention
from pallas_kernels.attention import XlaAttention
from pallas_kernels.attention import block_mask_from_mask
from pallas_kernels.attention import causal_block_mask
from pallas_kernels.attention import dot_product_attention
from pallas_kernels.attention import flash_attention
from pallas_kernels.attention import flash_attention_reference
from pallas_kernels.attention import local_block_mask
from pallas_kernels.mixed_chunk import BlockSizes as MixedChunkBlockSizes
from pallas_kernels.mixed_chunk import PallasMosaicTpuMixedChunk
from pallas_kernels.mixed_chunk import mixed_chunk_attention
from pallas_kernels.mixed_chunk import mixed_chunk_attention_reference
from pallas_kernels.monarch import BlockSizes as MonarchBlockSizes
from pallas_kernels.monarch import PallasMosaicTpuMonarch
from pallas_kernels.monarch import PallasTritonMonarch
from pallas_kernels.monarch import ReferenceMonarch
from pallas_kernels.monarch import XlaMonarch
from pallas_kernels.monarch import dense_to_monarch
from pallas_kernels.monarch import monarch_matmul
from pallas_kernels.monarch import monarch_matmul_reference
from pallas_kernels.monarch import monarch_to_dense
