"""What is left of the experiments' old set-ups: ``init_params`` for ``bench_sharpness``.

Many seeds trained as one program live in the library: ``efflax.training.fit_seeds``.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import linen as nn


def init_params(model: nn.Module, seed: int, example: Any | None = None) -> Any:
    """The unboxed parameters of ``model`` from ``jax.random.key(seed)`` (default input: one
    MNIST-1D signal)."""
    example = np.zeros((1, 40), np.float32) if example is None else example
    args = example if isinstance(example, tuple) else (example,)
    return nn.unbox(model.init(jax.random.key(seed), *args)["params"])
