"""The attention op family (FlashAttention and friends): one call value, an explicit table.

- ``api``: ``dot_product_attention``, ``flash_attention``, ``flash_attention_reference`` and
  the table of implementations with the default order per platform (``ATTENTION_OP``).
- ``base``: the one set of checks and the call value (``Mask``, ``AttentionCall``).
- ``reference`` (float32 oracle), ``xla``, ``cudnn``, ``pallas_triton`` (op glue and tuning of
  the FlashAttention kernels), ``pallas_triton_kernel`` / ``pallas_triton_backward`` (the
  kernel bodies).
"""

from pallas_kernels.attention.api import ATTENTION_OP
from pallas_kernels.attention.api import dot_product_attention
from pallas_kernels.attention.api import flash_attention
from pallas_kernels.attention.api import flash_attention_reference
from pallas_kernels.attention.base import AttentionCall
from pallas_kernels.attention.base import Mask
from pallas_kernels.attention.cudnn import CudnnAttention
from pallas_kernels.attention.pallas_triton import BlockSizes
from pallas_kernels.attention.pallas_triton import PallasTritonAttention
from pallas_kernels.attention.pallas_triton import block_mask_from_mask
from pallas_kernels.attention.pallas_triton import causal_block_mask
from pallas_kernels.attention.pallas_triton import local_block_mask
from pallas_kernels.attention.reference import ReferenceAttention
from pallas_kernels.attention.xla import XlaAttention

__all__ = [
    "ATTENTION_OP",
    "AttentionCall",
    "BlockSizes",
    "CudnnAttention",
    "Mask",
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
