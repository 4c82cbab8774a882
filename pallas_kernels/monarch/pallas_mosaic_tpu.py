"""The Monarch op's Pallas Mosaic TPU implementation (``implementation='pallas_mosaic_tpu'``).

Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate Training",
arXiv 2204.00595 (ICML 2022).

Op glue only: the kernels (a fused forward and backward per row tile, the permutation as strided
VMEM stores) are in ``pallas_mosaic_tpu_kernel.py``. ``'auto'`` tries this implementation first
on a TPU and falls through to ``'xla'`` where it refuses (feature blocks not multiples of 8, or
factor blocks too large for VMEM even in groups).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from pallas_kernels._compat import auto_partitioned_axes
from pallas_kernels._compat import check_interpret
from pallas_kernels._compat import has_explicit_axes
from pallas_kernels._compat import resolve_interpret
from pallas_kernels._compat import shard_map_on
from pallas_kernels.monarch.base import MonarchCall
from pallas_kernels.monarch.base import MonarchImplementation
from pallas_kernels.monarch.pallas_mosaic_tpu_kernel import BlockSizes
from pallas_kernels.monarch.pallas_mosaic_tpu_kernel import monarch_matmul_tpu

__all__ = ["PallasMosaicTpuMonarch"]


@dataclasses.dataclass(frozen=True)
class PallasMosaicTpuMonarch(MonarchImplementation):
    """The Pallas Mosaic TPU kernels.

    Attributes:
      block_sizes: a :class:`~pallas_kernels.monarch.pallas_mosaic_tpu_kernel.BlockSizes`
        (row tile, weight-gradient splits, output-block groups); None: chosen per shape
        against VMEM.
      interpret: TPU interpret mode (runs on a CPU); None: compiled on a TPU, interpreted
        elsewhere.

    Under a mesh (``jax.set_mesh``) the kernels run in ``shard_map`` with the rows split over
    the mesh's automatic axes (XLA cannot partition a Mosaic kernel); inside a ``shard_map``
    over every axis they run as they are. Reverse-mode only (custom VJP with Pallas backward
    kernels): inside
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

    def __call__(self, call: MonarchCall) -> jax.Array:
        interpret = resolve_interpret(self.interpret, "tpu")  # at the call, not at construction
        mesh, axes = auto_partitioned_axes()

        def product(x2d, w1, w2):
            return monarch_matmul_tpu(
                x2d, w1, w2, block_sizes=self.block_sizes, interpret=interpret
            )

        if not axes:
            return product(call.x2d, call.w1, call.w2)
        # XLA cannot partition a Mosaic kernel: under a mesh the rows are split over its
        # automatic axes (padded to a multiple), the factors replicated; shard_map's transpose
        # sums the factor gradients over the devices.
        devices = math.prod(mesh.shape[a] for a in axes)
        rows = call.x2d.shape[0]
        pad = -rows % devices
        x2d = jnp.pad(call.x2d, ((0, pad), (0, 0))) if pad else call.x2d
        spec = PartitionSpec(axes)
        sharded = shard_map_on(mesh, product, (spec, PartitionSpec(), PartitionSpec()), spec)
        y = sharded(x2d, call.w1, call.w2)
        if not pad:
            return y
        if has_explicit_axes(mesh):  # a sharded dim cannot be cut to a length it does not divide
            y = jax.sharding.reshard(y, PartitionSpec())
        return y[:rows]
