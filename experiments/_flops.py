"""FLOP accounting of the benchmarks (multiply-adds counted as 2 FLOPs)."""

from __future__ import annotations

import math


def monarch_flops(w1_shape: tuple[int, ...], w2_shape: tuple[int, ...], rows: int) -> int:
    """FLOPs of one forward Monarch product of ``rows`` rows (two block-diagonal matmuls)."""
    return 2 * rows * (math.prod(w1_shape) + math.prod(w2_shape))


def monarch_step_flops(
    w1_shape: tuple[int, ...], w2_shape: tuple[int, ...], rows: int, *, recompute: bool
) -> dict[str, int]:
    """FLOPs of the forward and of a training step (forward + backward) as the XLA path runs it.

    The step is 2 forward products, 4 backward ones (dx and dW of each factor), plus the first
    product again where the backward recomputes it per row chunk (``recompute``).
    """
    k, q, p = w1_shape
    first = 2 * rows * k * q * p
    forward = monarch_flops(w1_shape, w2_shape, rows)
    return {"fwd": forward, "step": 3 * forward + (first if recompute else 0)}
