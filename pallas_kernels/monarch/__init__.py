"""The Monarch matmul op family: one call value (``MonarchCall``), an explicit table (``api``).

``api`` (``monarch_matmul``, the table), ``base`` (checks, ``MonarchCall``), ``reference`` (the
oracle, dense <-> Monarch), ``xla`` (the fast XLA path), ``pallas_triton`` (op glue and tuning of
the fused / staged Pallas kernels) and ``pallas_triton_kernel`` (their bodies),
``pallas_mosaic_tpu`` / ``pallas_mosaic_tpu_kernel`` (the TPU kernels: glue, bodies).
"""

from pallas_kernels.monarch.api import MONARCH_OP
from pallas_kernels.monarch.api import monarch_matmul
from pallas_kernels.monarch.base import MonarchCall
from pallas_kernels.monarch.pallas_mosaic_tpu import PallasMosaicTpuMonarch
from pallas_kernels.monarch.pallas_triton import BlockSizes
from pallas_kernels.monarch.pallas_triton import PallasTritonMonarch
from pallas_kernels.monarch.pallas_triton import default_block_sizes
from pallas_kernels.monarch.reference import ReferenceMonarch
from pallas_kernels.monarch.reference import dense_to_monarch
from pallas_kernels.monarch.reference import monarch_matmul_reference
from pallas_kernels.monarch.reference import monarch_to_dense
from pallas_kernels.monarch.xla import XlaMonarch

__all__ = [
    "MONARCH_OP",
    "BlockSizes",
    "MonarchCall",
    "PallasMosaicTpuMonarch",
    "PallasTritonMonarch",
    "ReferenceMonarch",
    "XlaMonarch",
    "default_block_sizes",
    "dense_to_monarch",
    "monarch_matmul",
    "monarch_matmul_reference",
    "monarch_to_dense",
]
