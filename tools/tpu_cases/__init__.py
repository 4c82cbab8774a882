"""Compile-check cases for ``make tpu-check`` (tools/tpu_check.py), one module per kernel family.

Each family module (``attention.py``, ``monarch.py``, ``mixed_chunk.py``) exports ``CASES``, a
list of :class:`Case`. tools/tpu_check.py compiles every case for every TPU generation it checks
(compile-only devices from libtpu, ``shared/TPU-WITHOUT-TPU.md``), asserts the kernel (not XLA)
ran, and records memory, compile time and XLA's cost estimate.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any


@dataclasses.dataclass(frozen=True)
class Case:
    """One program to compile for a TPU chip.

    Attributes:
      family: ``'attention'``, ``'monarch'`` or ``'mixed_chunk'``.
      name: what is compiled, for the table (``'fwd+bwd d128 S=8192 causal bf16'``).
      build: returns ``(fn, args)``: a function to ``jax.jit`` and its arguments as
        ``jax.ShapeDtypeStruct`` (no sharding: the check puts them on one chip). ``fn`` should
        run forward and backward (e.g. ``jax.grad`` of a scalar loss) where the case says so.
      min_kernels: the compiled HLO must hold at least this many ``tpu_custom_call``s (the
        Pallas Mosaic TPU kernels; 0 for an XLA baseline case).
      baseline: the case is an XLA baseline shown beside the kernels (memory tables).
    """

    family: str
    name: str
    build: Callable[[], tuple[Callable[..., Any], tuple[Any, ...]]]
    min_kernels: int = 1
    baseline: bool = False
