"""Monarch matmul compile-check cases: the fused Mosaic TPU kernels at MonarchDense sizes.

Square Monarch matrices of width n = 1024, 4096, 8192 with nblocks 4, 16 and about sqrt(n)
(32, 64, 64: 8192 has no integer root), bfloat16, 8192 rows (a batch of tokens), forward and
backward (``jax.grad`` of a scalar loss). Factors that fit VMEM whole run one forward and one
backward kernel; larger ones (nblocks 4 at n = 4096, 16 at 8192) are split into groups of
output blocks, and their backward is two kernels (dx, then the weight gradients). At n = 8192,
nblocks = 4 one 2048 x 2048 block pair is already too large for VMEM: the kernel refuses it
(``Unsupported``, 'xla') and that size is compiled as the XLA path's baseline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.monarch import PallasMosaicTpuMonarch
from pallas_kernels.monarch import XlaMonarch
from pallas_kernels.monarch import monarch_matmul
from tools.tpu_cases import Case

KERNEL = PallasMosaicTpuMonarch(interpret=False)  # compiled for the TPU even on a CPU host
ROWS = 8192
DTYPE = jnp.bfloat16
SIZES = ((1024, (4, 16, 32)), (4096, (4, 16, 64)), (8192, (4, 16, 64)))
GROUPED = {(4096, 4), (8192, 16), (8192, 64)}  # two backward kernels
TOO_LARGE_FOR_VMEM = {(8192, 4)}


def _build(n: int, nblocks: int, *, backward: bool, xla: bool = False):
    def build():
        block = n // nblocks
        x = jax.ShapeDtypeStruct((ROWS, n), DTYPE)
        w = jax.ShapeDtypeStruct((nblocks, block, block), DTYPE)

        def product(x, w1, w2):
            impl = XlaMonarch(row_chunk=None) if xla else KERNEL
            return monarch_matmul(x, w1, w2, implementation=impl)

        if not backward:
            return product, (x, w, w)

        def loss(x, w1, w2):
            return jnp.sum(product(x, w1, w2).astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2)), (x, w, w)

    return build


def _build_rect():
    x = jax.ShapeDtypeStruct((1000, 1024), jnp.float32)
    w1 = jax.ShapeDtypeStruct((16, 64, 64), jnp.float32)
    w2 = jax.ShapeDtypeStruct((16, 256, 64), jnp.float32)

    def loss(x, w1, w2):
        return jnp.sum(monarch_matmul(x, w1, w2, implementation=KERNEL) ** 2)

    return jax.grad(loss, argnums=(0, 1, 2)), (x, w1, w2)


def _cases() -> list[Case]:
    cases = []
    for n, nblocks_list in SIZES:
        for nblocks in nblocks_list:
            if (n, nblocks) in TOO_LARGE_FOR_VMEM:
                cases.append(
                    Case(
                        "monarch",
                        f"fwd+bwd n={n} nblocks={nblocks} rows={ROWS} bf16 (xla)",
                        _build(n, nblocks, backward=True, xla=True),
                        min_kernels=0,
                        baseline=True,
                    )
                )
                continue
            for backward in (False, True):
                what = "fwd+bwd" if backward else "fwd"
                cases.append(
                    Case(
                        "monarch",
                        f"{what} n={n} nblocks={nblocks} rows={ROWS} bf16",
                        _build(n, nblocks, backward=backward),
                        min_kernels=(3 if (n, nblocks) in GROUPED else 2) if backward else 1,
                    )
                )
    # rectangular (MonarchDense 1024 -> 4096, nblocks 16) in float32, and an odd row count (padded to the tile)
    cases.append(
        Case(
            "monarch",
            "fwd+bwd 1024->4096 nblocks=16 rows=1000 f32",
            _build_rect,
            min_kernels=2,
        )
    )
    # the XLA path beside the kernel at one size, for the memory table
    cases.append(
        Case(
            "monarch",
            f"fwd+bwd n=4096 nblocks=64 rows={ROWS} bf16 (xla)",
            _build(4096, 64, backward=True, xla=True),
            min_kernels=0,
            baseline=True,
        )
    )
    return cases


CASES: list[Case] = _cases()
