"""Mixed-chunk attention (FLASH) family: the public function and the table of implementations.

Hua, Dai, Liu, Le, "Transformer Quality in Linear Time", ICML 2022, arXiv:2202.10447.

``mixed_chunk_attention`` checks its arguments once
(:func:`~pallas_kernels.mixed_chunk.base.check_arguments`) into one
:class:`~pallas_kernels.mixed_chunk.base.MixedChunkCall`; ``MIXED_CHUNK_OP`` hands it to the
requested implementation or, for ``'auto'``, to the first one in ``AUTO_ORDER`` for the platform
the program is compiled for that accepts it (``Unsupported`` falls through; a refused explicit
request is a ``ValueError`` saying why).

To add an implementation (e.g. ``'pallas_mosaic_tpu'``): one frozen dataclass subclassing
:class:`~pallas_kernels.mixed_chunk.base.MixedChunkImplementation` (``name``, ``platforms``,
``supports_forward_mode``; ``__call__(self, call: MixedChunkCall) -> [batch, seq, e]``) in its
own module, one line in ``IMPLEMENTATIONS`` and its name in ``AUTO_ORDER['tpu']``. Nothing
registers itself by being imported.
"""

from __future__ import annotations

import jax

from pallas_kernels.mixed_chunk.base import check_arguments
from pallas_kernels.mixed_chunk.pallas_mosaic_tpu import PallasMosaicTpuMixedChunk
from pallas_kernels.mixed_chunk.pallas_triton import PallasTritonMixedChunk
from pallas_kernels.mixed_chunk.reference import ReferenceMixedChunk
from pallas_kernels.mixed_chunk.xla import XlaMixedChunk
from pallas_kernels.op import Implementation
from pallas_kernels.op import Op

__all__ = ["AUTO_ORDER", "IMPLEMENTATIONS", "MIXED_CHUNK_OP", "mixed_chunk_attention"]

# The table: every implementation of the op, default-configured, by its `name`.
IMPLEMENTATIONS: tuple[Implementation, ...] = (
    XlaMixedChunk(),
    PallasTritonMixedChunk(),
    PallasMosaicTpuMixedChunk(),
    ReferenceMixedChunk(),
)
# What 'auto' tries, in order, per platform compiled for ('*': any other platform).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "gpu": ("pallas_triton", "xla"),
    "tpu": ("pallas_mosaic_tpu", "xla"),
    "*": ("xla",),
}
MIXED_CHUNK_OP = Op(
    "mixed_chunk_attention",
    implementations=IMPLEMENTATIONS,
    auto_order=AUTO_ORDER,
    aliases={"pallas": "pallas_triton"},
)


def mixed_chunk_attention(
    quad_q: jax.Array,
    quad_k: jax.Array,
    value: jax.Array,
    lin_q: jax.Array | None = None,
    lin_k: jax.Array | None = None,
    *,
    chunk_size: int,
    causal: bool,
    quad_scale: float = 1.0,
    lin_scale: float = 1.0,
    bias: jax.Array | None = None,
    key_mask: jax.Array | None = None,
    implementation: str | Implementation = "auto",
) -> jax.Array:
    """FLASH's mixed-chunk attention: ``relu^2`` inside chunks, linear attention across them.

    Args:
      quad_q, quad_k: ``[batch, seq, s]`` queries and keys of the quadratic (in-chunk) term.
      value: ``[batch, seq, e]``.
      lin_q, lin_k: ``[batch, seq, s_lin]`` queries and keys of the linear (cross-chunk) term;
        both None: no linear term (with ``chunk_size >= seq``, plain GAU attention).
      chunk_size: tokens per chunk (``>= 1``); longer than ``seq`` means one chunk.
      causal: token ``i`` sees only keys ``j <= i`` (in-chunk mask; earlier chunks only in the
        linear term, an exclusive prefix sum over chunks).
      quad_scale: multiplies ``q.k`` inside ``relu^2`` (e.g. ``1 / chunk_size``).
      lin_scale: multiplies the linear term (e.g. ``1 / chunk_size`` or ``1 / seq``).
      bias: ``[chunk_size, chunk_size]`` float, added to the scaled scores inside ``relu^2``
        (a relative-position bias, the same for every chunk); differentiable.
      key_mask: ``[batch, seq]`` bool, True for real tokens; masked positions are padding:
        masked keys get zero weight in both terms, and nothing a masked position holds (NaN and
        inf included) reaches a real output or gradient. Outputs at masked positions are
        computed from zeroed inputs (not meaningful) and their gradients are zero.
      implementation: ``'auto'`` (the Pallas Triton kernel on a GPU, the Mosaic TPU kernel on
        a TPU, each falling through to XLA; XLA elsewhere), ``'pallas_triton'`` (alias
        ``'pallas'``), ``'pallas_mosaic_tpu'``, ``'xla'``, ``'reference'``, or a configured
        instance such as ``PallasTritonMixedChunk(interpret=True)``.

    Returns:
      ``[batch, seq, e]`` in the inputs' dtype; products accumulate in float32.

    Raises:
      ValueError: inconsistent shapes or dtypes, ``chunk_size < 1``, a bias or mask of the wrong
        shape, or an implementation that cannot honour the call.

    Example:
      >>> z = jax.random.normal(jax.random.key(0), (2, 1000, 64))
      >>> v = jax.random.normal(jax.random.key(1), (2, 1000, 128))
      >>> out = mixed_chunk_attention(z, z, v, z, z, chunk_size=256, causal=True,
      ...                             quad_scale=1 / 256, lin_scale=1 / 256)
    """
    call = check_arguments(
        quad_q,
        quad_k,
        value,
        lin_q,
        lin_k,
        chunk_size=chunk_size,
        causal=causal,
        quad_scale=quad_scale,
        lin_scale=lin_scale,
        bias=bias,
        key_mask=key_mask,
    )
    return MIXED_CHUNK_OP(call, implementation)
