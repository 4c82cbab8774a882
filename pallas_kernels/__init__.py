"""Pallas kernels (GPU-compiled, interpret mode on CPU): FlashAttention and Monarch matmuls."""

from pallas_kernels.flash_attention import BlockSizes
from pallas_kernels.flash_attention import block_mask_from_mask
from pallas_kernels.flash_attention import causal_block_mask
from pallas_kernels.flash_attention import flash_attention
from pallas_kernels.flash_attention import flash_attention_reference
from pallas_kernels.flash_attention import local_block_mask
from pallas_kernels.monarch import BlockSizes as MonarchBlockSizes
from pallas_kernels.monarch import PallasTritonMonarch
from pallas_kernels.monarch import ReferenceMonarch
from pallas_kernels.monarch import XlaMonarch
from pallas_kernels.monarch import dense_to_monarch
from pallas_kernels.monarch import monarch_matmul
from pallas_kernels.monarch import monarch_matmul_reference
from pallas_kernels.monarch import monarch_to_dense
