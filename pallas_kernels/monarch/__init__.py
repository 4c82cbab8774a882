"""The Monarch matmul op family: one signature (``monarch_matmul``), implementations
``reference`` (the oracle), ``xla`` (the fast XLA path) and ``pallas_triton`` (fused / staged
Pallas kernels), and the dense <-> Monarch conversions."""

from pallas_kernels.monarch.base import MONARCH_OP
from pallas_kernels.monarch.base import monarch_matmul
from pallas_kernels.monarch.pallas_triton import BlockSizes
from pallas_kernels.monarch.pallas_triton import PallasTritonMonarch
from pallas_kernels.monarch.pallas_triton import default_block_sizes
from pallas_kernels.monarch.reference import ReferenceMonarch
from pallas_kernels.monarch.reference import dense_to_monarch
from pallas_kernels.monarch.reference import monarch_matmul_reference
from pallas_kernels.monarch.reference import monarch_to_dense
from pallas_kernels.monarch.xla import XlaMonarch
