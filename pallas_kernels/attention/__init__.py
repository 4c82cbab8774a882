"""The attention op family: one signature, implementations registered with ``ATTENTION_OP``.

``base`` (the signature, the checks, the registry), ``reference`` (float32 oracle), ``xla``,
``cudnn`` and ``pallas_triton`` (the FlashAttention kernels). Importing the package registers
every implementation.
"""

from pallas_kernels.attention.base import ATTENTION_OP
from pallas_kernels.attention.base import dot_product_attention
from pallas_kernels.attention.cudnn import CudnnAttention
from pallas_kernels.attention.pallas_triton import BlockSizes
from pallas_kernels.attention.pallas_triton import PallasTritonAttention
from pallas_kernels.attention.pallas_triton import block_mask_from_mask
from pallas_kernels.attention.pallas_triton import causal_block_mask
from pallas_kernels.attention.pallas_triton import flash_attention
from pallas_kernels.attention.pallas_triton import flash_attention_reference
from pallas_kernels.attention.pallas_triton import local_block_mask
from pallas_kernels.attention.reference import ReferenceAttention
from pallas_kernels.attention.xla import XlaAttention

__all__ = [
    "ATTENTION_OP",
    "BlockSizes",
    "CudnnAttention",
    "PallasTritonAttention",
    "ReferenceAttention",
    "XlaAttention",
    "block_mask_from_mask",
    "causal_block_mask",
    "dot_product_attention",
    "flash_attention",
    "flash_attention_reference",
    "local_block_mask",
]
