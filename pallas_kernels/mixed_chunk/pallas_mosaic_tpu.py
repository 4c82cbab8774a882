"""The mixed-chunk attention op's Pallas Mosaic TPU implementation
(``implementation='pallas_mosaic_tpu'``).

Hua, Dai, Liu, Le, "Transformer Quality in Linear Time", ICML 2022, arXiv:2202.10447.

Op glue only: the kernels (one chunk per grid step, the linear state in VMEM, a two-pass
backward) are in ``pallas_mosaic_tpu_kernel.py``. ``'auto'`` tries this implementation first on a
TPU and falls through to ``'xla'`` where it refuses (a chunk too large for VMEM).
"""

from __future__ import annotations

import dataclasses
import math

import jax
from jax.sharding import PartitionSpec

from pallas_kernels._compat import auto_partitioned_axes
from pallas_kernels._compat import check_interpret
from pallas_kernels._compat import resolve_interpret
from pallas_kernels._compat import shard_map_on
from pallas_kernels.mixed_chunk.base import MixedChunkCall
from pallas_kernels.mixed_chunk.base import MixedChunkImplementation
from pallas_kernels.mixed_chunk.pallas_mosaic_tpu_kernel import BlockSizes
from pallas_kernels.mixed_chunk.pallas_mosaic_tpu_kernel import mixed_chunk_attention_tpu
from pallas_kernels.op import Unsupported

__all__ = ["PallasMosaicTpuMixedChunk"]


@dataclasses.dataclass(frozen=True)
class PallasMosaicTpuMixedChunk(MixedChunkImplementation):
    """The Pallas Mosaic TPU kernels.

    Attributes:
      block_sizes: a :class:`~pallas_kernels.mixed_chunk.pallas_mosaic_tpu_kernel.BlockSizes`
        (how far each chunk is padded); None: to a multiple of 16 rows.
      interpret: TPU interpret mode (runs on a CPU); None: compiled on a TPU, interpreted
        elsewhere.

    Under a mesh (``jax.set_mesh``) the kernels run in ``shard_map`` with the batch split over
    the mesh's automatic axes (XLA cannot partition a Mosaic kernel; a batch that does not
    divide is refused); inside a ``shard_map`` over every axis they run as they are.
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
        interpret = resolve_interpret(self.interpret, "tpu")  # at the call, not at construction
        mesh, axes = auto_partitioned_axes()
        if not axes:
            return mixed_chunk_attention_tpu(
                call, block_sizes=self.block_sizes, interpret=interpret
            )
        # XLA cannot partition a Mosaic kernel: under a mesh the batch is split over its
        # automatic axes (the bias replicated; shard_map's transpose sums its gradient).
        devices = math.prod(mesh.shape[a] for a in axes)
        batch = call.value.shape[0]
        if batch % devices:
            raise Unsupported(
                f"under a mesh of {devices} devices (axes {axes}) the kernel splits the batch; "
                f"batch={batch} does not divide: call it inside shard_map, or use "
                "implementation='xla'"
            )
        names = [n for n in _ARRAYS if getattr(call, n) is not None]
        spec = PartitionSpec(axes)
        specs = tuple(PartitionSpec() if n == "bias" else spec for n in names)

        def local(*arrays):
            local_call = dataclasses.replace(call, **dict(zip(names, arrays, strict=True)))
            return mixed_chunk_attention_tpu(
                local_call, block_sizes=self.block_sizes, interpret=interpret
            )

        return shard_map_on(mesh, local, specs, spec)(*[getattr(call, n) for n in names])


_ARRAYS = ("quad_q", "quad_k", "value", "lin_q", "lin_k", "bias", "key_mask")
