"""Attention compile-check cases: efflax's FlashAttention Mosaic TPU kernels, and XLA beside them.

``CASES`` (compiled for every chip): head_dim 64 / 128 / 256, causal and not, GQA, segment ids,
a block-sparse (sliding-window) mask, a ragged length, float32, and a decoding step (a traced
``q_offset``, forward only), at 8 heads, batch 1, S = 2k-8k; forward and backward (``jax.grad``
of a scalar loss: the forward kernel and the dQ and dK/dV kernels). One XLA-attention baseline.

``MEMORY_CASES`` (compiled for v5e only, the memory table): forward + backward, batch 1, 8 heads,
head_dim 128, bf16, causal, S = 4k, 8k, 16k, 32k, the kernels beside XLA attention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.attention import dot_product_attention
from tools.tpu_cases import Case

BATCH, HEADS = 1, 8
MEMORY_LENGTHS = (4096, 8192, 16384, 32768)


def _build(
    *,
    seq: int,
    head_dim: int,
    dtype=jnp.bfloat16,
    kv_heads: int = HEADS,
    causal: bool = False,
    segments: bool = False,
    window: int | None = None,
    q_len: int | None = None,
    q_offset: int | None = None,
    backward: bool = True,
    xla: bool = False,
):
    def build():
        queries = seq if q_len is None else q_len
        q = jax.ShapeDtypeStruct((BATCH, queries, HEADS, head_dim), dtype)
        kv = jax.ShapeDtypeStruct((BATCH, seq, kv_heads, head_dim), dtype)
        args = [q, kv, kv]
        if segments:
            args += [jax.ShapeDtypeStruct((BATCH, seq), jnp.int32)] * 2
        # By name: compiled for the chip of the mesh the check traces under.
        implementation = "xla" if xla else "pallas_mosaic_tpu"

        def attention(q, k, v, *segment_ids):
            kwargs = dict(causal=causal)
            if segment_ids:
                kwargs["segment_ids"] = tuple(segment_ids)
            if q_offset is not None:
                kwargs["q_offset"] = jnp.int32(q_offset)
            if window is not None:
                from pallas_kernels import local_block_mask

                tile = (512, 512)
                kwargs["block_mask"] = local_block_mask(seq, seq, tile, window_left=window)
                kwargs["block_shape"] = tile
            return dot_product_attention(q, k, v, implementation=implementation, **kwargs)

        if not backward:
            return attention, tuple(args)

        def loss(q, k, v, *segment_ids):
            out = attention(q, k, v, *segment_ids)
            return jnp.sum(out.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2)), tuple(args)

    return build


def _name(prefix: str, **kw) -> str:
    parts = [prefix, f"d{kw['head_dim']}", f"S={kw['seq']}"]
    if kw.get("q_len"):
        parts[2] = f"q={kw['q_len']} kv={kw['seq']}"
    parts.append("causal" if kw.get("causal") else "full")
    if kw.get("kv_heads", HEADS) != HEADS:
        parts.append(f"GQA {HEADS}/{kw['kv_heads']}")
    if kw.get("segments"):
        parts.append("segments")
    if kw.get("window"):
        parts.append(f"window {kw['window']} (block-sparse)")
    if kw.get("q_offset") is not None:
        parts.append("q_offset")
    parts.append("f32" if kw.get("dtype") == jnp.float32 else "bf16")
    return " ".join(parts)


def _case(**kw) -> Case:
    backward = kw.get("backward", True)
    xla = kw.get("xla", False)
    prefix = ("xla " if xla else "") + ("fwd+bwd" if backward else "fwd")
    return Case(
        family="attention",
        name=_name(prefix, **kw),
        build=_build(**kw),
        min_kernels=0 if xla else (3 if backward else 1),
        baseline=xla,
    )


CASES = [
    _case(seq=8192, head_dim=64, causal=True),
    _case(seq=8192, head_dim=128, causal=True, kv_heads=2, segments=True),
    _case(seq=4096, head_dim=256, kv_heads=4),
    _case(seq=4096, head_dim=128, causal=True, window=1024),
    _case(seq=3000, head_dim=128, causal=True, segments=True),
    _case(seq=2048, head_dim=128, causal=True, dtype=jnp.float32),
    _case(
        seq=16384, q_len=512, head_dim=128, causal=True, kv_heads=2, q_offset=15872, backward=False
    ),
    _case(seq=8192, head_dim=128, causal=True, xla=True),
]

MEMORY_CASES = [
    _case(seq=seq, head_dim=128, causal=True, xla=xla)
    for seq in MEMORY_LENGTHS
    for xla in (False, True)
]
