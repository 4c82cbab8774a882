"""The Monarch matmul op family: the public function and the table of implementations.

Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate Training",
arXiv 2204.00595 (ICML 2022).

``monarch_matmul`` checks its arguments once (:func:`~pallas_kernels.monarch.base.check_arguments`)
into one :class:`~pallas_kernels.monarch.base.MonarchCall` and ``MONARCH_OP`` hands it to the
requested implementation or, for ``'auto'``, to the first one in ``AUTO_ORDER`` for the platform
the program is compiled for that accepts it (``Unsupported`` falls through; an explicit request
that is refused is a ``ValueError`` saying why).

To add an implementation (e.g. ``'pallas_mosaic_tpu'``): one frozen dataclass subclassing
:class:`~pallas_kernels.monarch.base.MonarchImplementation` (``name``, ``platforms``,
``supports_forward_mode``; ``__call__(self, call: MonarchCall) -> [rows, l*s]``) in its own
module, one line in ``IMPLEMENTATIONS`` and its name in ``AUTO_ORDER['tpu']``. Nothing registers
itself by being imported.
"""

from __future__ import annotations

import jax

from pallas_kernels.monarch.base import check_arguments
from pallas_kernels.monarch.pallas_mosaic_tpu import PallasMosaicTpuMonarch
from pallas_kernels.monarch.pallas_triton import PallasTritonMonarch
from pallas_kernels.monarch.reference import ReferenceMonarch
from pallas_kernels.monarch.xla import XlaMonarch
from pallas_kernels.op import Implementation
from pallas_kernels.op import Op

__all__ = ["AUTO_ORDER", "IMPLEMENTATIONS", "MONARCH_OP", "monarch_matmul"]

# The table: every implementation of the op, default-configured, by its `name`.
IMPLEMENTATIONS: tuple[Implementation, ...] = (
    XlaMonarch(),
    PallasTritonMonarch(),
    PallasMosaicTpuMonarch(),
    ReferenceMonarch(),
)
# What 'auto' tries, in order, per platform compiled for ('*': any other platform).
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    "gpu": ("pallas_triton", "xla"),
    "tpu": ("pallas_mosaic_tpu", "xla"),
    "*": ("xla",),
}
MONARCH_OP = Op(
    "monarch_matmul",
    implementations=IMPLEMENTATIONS,
    auto_order=AUTO_ORDER,
    aliases={"pallas": "pallas_triton"},
)


def monarch_matmul(
    x: jax.Array,
    w1: jax.Array,
    w2: jax.Array,
    *,
    implementation: str | Implementation = "auto",
) -> jax.Array:
    """Monarch product ``x -> blockdiag(w2) P blockdiag(w1) x``.

    Args:
      x: ``[..., k*p]``, any number of leading dims (including none).
      w1: ``[k, q, p]``, first block-diagonal factor.
      w2: ``[l, s, r]`` with ``l*r == k*q``, second block-diagonal factor.
      implementation: ``'auto'`` (``pallas_triton`` then ``xla`` on a GPU,
        ``pallas_mosaic_tpu`` then ``xla`` on a TPU, ``xla`` elsewhere), ``'reference'``,
        ``'xla'``, ``'pallas_triton'`` (or ``'pallas'``), ``'pallas_mosaic_tpu'``, or a
        configured instance (``PallasTritonMonarch(block_sizes=...,
        interpret=True)``, ``XlaMonarch(row_chunk=None)``). An explicitly named implementation
        that cannot run the call raises ``ValueError`` saying why; ``'auto'`` falls through.

    Returns:
      ``[..., l*s]`` in the promoted dtype of the inputs (float32 accumulation); every
      implementation gives the same numbers up to rounding and is differentiable.

    Example:
      >>> w1, w2 = jnp.ones((8, 6, 5)), jnp.ones((12, 3, 4))
      >>> monarch_matmul(jnp.ones((2, 40)), w1, w2).shape
      (2, 36)
    """
    call, batch = check_arguments(x, w1, w2)
    return MONARCH_OP(call, implementation).reshape(*batch, -1)
