"""FLOP accounting of the benchmarks (multiply-adds counted as 2 FLOPs)."""

from __future__ import annotations

import math


def monarch_flops(w1_shape: tuple[int, ...], w2_shape: tuple[int, ...], rows: int) -> int:
    """FLOPs of one forward Monarch product of ``rows`` rows (two block-diagonal matmuls)."""
    return 2 * rows * (math.prod(w1_shape) + math.prod(w2_shape))
