"""Mixed-chunk (FLASH) attention compile-check cases: the Mosaic TPU kernels at FLASH sizes.

FLASH at model width 768 (expansion 2: e = 1536; shared q/k width s = 128 for both terms),
chunk C = 256 with a relative-position bias, T = 8192 tokens, batch 2, bfloat16; causal and
not, forward (one kernel) and forward + backward (``jax.grad`` of a scalar loss: one forward,
one backward kernel). The XLA path compiles beside them as the memory baseline.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.mixed_chunk import PallasMosaicTpuMixedChunk
from pallas_kernels.mixed_chunk import mixed_chunk_attention
from tools.tpu_cases import Case

BATCH, SEQ, S, E, CHUNK = 2, 8192, 128, 1536, 256
DTYPE = jnp.bfloat16
KERNEL = PallasMosaicTpuMixedChunk(interpret=False)  # compiled for the TPU even on a CPU host


def _build(causal: bool, *, backward: bool, xla: bool = False):
    def build():
        z = jax.ShapeDtypeStruct((BATCH, SEQ, S), DTYPE)
        v = jax.ShapeDtypeStruct((BATCH, SEQ, E), DTYPE)
        bias = jax.ShapeDtypeStruct((CHUNK, CHUNK), jnp.float32)

        def attention(qq, kq, v, ql, kl, bias):
            return mixed_chunk_attention(
                qq,
                kq,
                v,
                ql,
                kl,
                chunk_size=CHUNK,
                causal=causal,
                quad_scale=1.0 / CHUNK,
                lin_scale=1.0 / SEQ,
                bias=bias,
                implementation="xla" if xla else KERNEL,
            )

        args = (z, z, v, z, z, bias)
        if not backward:
            return attention, args

        def loss(*args):
            return jnp.sum(attention(*args).astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=tuple(range(6))), args

    return build


def _build_awkward():
    """Chunk 200 (padded to 208 rows), widths 96 and 320 (padded to 128 and 384 lanes), a key
    mask, no bias, the quadratic term only, float32, forward and backward."""
    batch, seq, chunk = 1, 1000, 200
    z = jax.ShapeDtypeStruct((batch, seq, 96), jnp.float32)
    v = jax.ShapeDtypeStruct((batch, seq, 320), jnp.float32)
    mask = jax.ShapeDtypeStruct((batch, seq), jnp.bool_)

    def loss(qq, kq, v, key_mask):
        out = mixed_chunk_attention(
            qq,
            kq,
            v,
            chunk_size=chunk,
            causal=True,
            quad_scale=1.0 / chunk,
            key_mask=key_mask,
            implementation=KERNEL,
        )
        return jnp.sum(out**2)

    return jax.grad(loss, argnums=(0, 1, 2)), (z, z, v, mask)


def _cases() -> list[Case]:
    cases = []
    shape = f"B={BATCH} T={SEQ} C={CHUNK} s={S} e={E} bf16"
    for causal in (True, False):
        tag = "causal" if causal else "full"
        cases.append(Case("mixed_chunk", f"fwd {tag} {shape}", _build(causal, backward=False), 1))
        cases.append(
            Case("mixed_chunk", f"fwd+bwd {tag} {shape}", _build(causal, backward=True), 2)
        )
        cases.append(
            Case(
                "mixed_chunk",
                f"fwd+bwd {tag} {shape} (xla)",
                _build(causal, backward=True, xla=True),
                min_kernels=0,
                baseline=True,
            )
        )
    cases.append(
        Case(
            "mixed_chunk",
            "fwd+bwd causal quadratic-only C=200 T=1000 masked f32",
            _build_awkward,
            2,
        )
    )
    return cases


CASES: list[Case] = _cases()
