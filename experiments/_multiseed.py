"""Several seeds (and several methods) trained in one jitted step: decisive verdicts on a CPU.

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
from collections.abc import Iterator
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


class SeedBatches:
    """Splits each batch of ``loader`` into ``num_seeds`` slices: arrays ``[seeds, b, ...]``.

    Keeps ``iter_from`` (exact resume in ``fit``) and ``batch_size`` of the wrapped loader.
    """

    def __init__(self, loader: Any, num_seeds: int, transform: Callable | None = None):
        if loader.batch_size % num_seeds:
            raise ValueError(f"batch_size={loader.batch_size} must divide into {num_seeds} seeds")
        self.loader = loader
        self.num_seeds = num_seeds
        self.batch_size = loader.batch_size
        self.transform = transform

    def _split(self, batch: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        batch = dict(self.transform(batch) if self.transform else batch)
        return {k: v.reshape(self.num_seeds, -1, *v.shape[1:]) for k, v in batch.items()}

    def iter_from(self, step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        for batch in self.loader.iter_from(step):
            yield self._split(batch)

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iter_from(0)


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


def curves(history: Sequence[Mapping[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` over the records that have it."""
    points = [(r["step"], r[key]) for r in history if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot_arms(
    path: Any,
    history: Sequence[Mapping[str, Any]],
    finals: Mapping[str, Sequence[float]],
    *,
    prefix: str = "test",
    ylabel: str = "test accuracy (%)",
    title: str = "",
    scale: float = 100.0,
) -> None:
    """Two panels: the seed-mean curve of every arm, and every arm's final per-seed values."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    for arm in finals:
        steps, values = curves(history, f"{prefix}/{arm}")
        left.plot(steps, [scale * v for v in values], marker=".", label=arm)
    left.set_xlabel("step")
    left.set_ylabel(ylabel)
    left.grid(alpha=0.3)
    left.legend(fontsize=8)
    for i, values in enumerate(finals.values()):
        values = scale * np.asarray(values)
        right.scatter(np.full(len(values), i), values, alpha=0.6, s=18)
        right.errorbar(
            i + 0.15,
            values.mean(),
            yerr=values.std(ddof=1) if len(values) > 1 else 0,
            fmt="o",
            color="black",
            capsize=4,
        )
    right.set_xticks(range(len(finals)), list(finals), rotation=15, fontsize=8)
    right.set_ylabel(ylabel)
    right.set_title("final, per seed (black: mean +- sd)", fontsize=9)
    right.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
