"""What distillation still uses of its own multi-run set-up (the rest is efflax.training.fit_seeds).

Several seeds (and several methods) trained in one jitted step: decisive verdicts on a CPU.

A claim such as "USI beats labels-only by 1 point" needs an interval over seeds, and one small
model per process cannot keep two CPU cores busy. Here the parameters of every seed (and every
compared method, "arm") are stacked on a leading axis and trained together: the step's loss is
the *sum* of the per-run losses, so each run's gradient is exactly its own, and an elementwise
optimizer (Adam, AdamW, SGD; not global-norm clipping) updates each run exactly as if it trained
alone. Each seed gets its own initialisation and its own slice of every batch (its own data
order); arms with the same seed share init and data, so their differences are paired.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np


def init_stacked(init: Callable[[jax.Array], Any], seeds: Sequence[int], *, salt: int = 0) -> Any:
    """``init(key)`` for every seed, stacked on a leading axis (boxed metadata removed)."""
    keys = jnp.stack([jax.random.key(1000 * salt + s) for s in seeds])
    return nn.unbox(jax.jit(jax.vmap(init))(keys))


def per_seed_accuracy(
    apply: Callable[[Any, jax.Array], jax.Array],
    arrays: Mapping[str, np.ndarray],
    arms: Sequence[str],
    *,
    prefix: str = "test",
    params_of: Callable[[Any], Any] = lambda params: params,
) -> Callable[[Any], dict[str, float]]:
    """``eval_fn(state)`` for ``fit``: accuracy of every arm and seed on a whole split.

    ``apply(params_of_one_run, x) -> logits``; ``params_of(state.params)[arm]`` is stacked over
    seeds. Returns ``{prefix/arm: mean over seeds, prefix/arm/seed_i: ...}``.
    """
    x, y = jnp.asarray(arrays["x"]), jnp.asarray(arrays["y"])

    @jax.jit
    def accuracies(params):
        def one(p):
            return jnp.mean(jnp.argmax(apply(p, x), -1) == y)

        return {arm: jax.vmap(one)(params[arm]) for arm in arms}

    def eval_fn(state) -> dict[str, float]:
        values = jax.device_get(accuracies(params_of(state.params)))
        out: dict[str, float] = {}
        for arm in arms:
            out[f"{prefix}/{arm}"] = float(np.mean(values[arm]))
            for i, v in enumerate(values[arm]):
                out[f"{prefix}/{arm}/seed_{i}"] = float(v)
        return out

    return eval_fn


def final_per_seed(history: Sequence[Mapping[str, Any]], prefix: str, arm: str) -> list[float]:
    """The per-seed values of ``prefix/arm`` in the last record that has them."""
    for record in reversed(history):
        keys = sorted(
            (k for k in record if k.startswith(f"{prefix}/{arm}/seed_")),
            key=lambda k: int(k.rsplit("_", 1)[1]),
        )
        if keys:
            return [float(record[k]) for k in keys]
    raise ValueError(f"no per-seed values of {prefix}/{arm} in the history")
