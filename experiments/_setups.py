"""Set-ups shared by the experiments: MNIST-1D train states, loaders and evaluation, and several
seeds trained at once.

Several seeds of one configuration train as one program: the per-seed train states are stacked
on a leading axis (the step counter stays shared), the library's train step is ``jax.vmap``-ed
over that axis, and :class:`SeedLoader` stacks the batches of each seed's own ``efflax.data``
loader. ``efflax.training.fit`` runs it unchanged. Seed ``s`` sees exactly the initial weights
and data order it would see alone (the same keys, the same loader); only the floating-point
order of operations may differ. On a CPU the small models of these experiments are bound by
per-step dispatch, so five seeds cost little more than one. Timing is never measured on a
vmapped run.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from efflax import data
from efflax.stats import Estimate
from efflax.training import TrainState

MNIST1D_LENGTH = 40
NUM_CLASSES = 10


def init_params(model: nn.Module, seed: int, example: Any | None = None) -> Any:
    """The unboxed parameters of ``model`` from ``jax.random.key(seed)``.

    ``example``: the input to initialise on (a tuple: several positional inputs); default one
    MNIST-1D signal.
    """
    if example is None:
        example = np.zeros((1, MNIST1D_LENGTH), np.float32)
    args = example if isinstance(example, tuple) else (example,)
    return nn.unbox(model.init(jax.random.key(seed), *args)["params"])


def make_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    seed: int,
    example: Any | None = None,
    extra: Mapping[str, Any] | Callable[[Any], Mapping[str, Any]] | None = None,
) -> TrainState:
    """A train state: parameters from ``key(seed)``, step keys from ``key(seed + 1000)``.

    Args:
      model: a linen module; initialised on ``example`` (default: one MNIST-1D signal).
      tx: the optimizer.
      seed: the run's seed.
      example: an input batch to initialise on.
      extra: ``TrainState.extra``, or a function of the parameters that returns it (an EMA).
    """
    params = init_params(model, seed, example)
    if callable(extra):
        extra = extra(params)
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        rng=jax.random.key(seed + 1000),
        extra=dict(extra or {}),
    )


def mnist1d_loader(batch_size: int, *, seed: int, epochs: int | None = None, **size) -> data.Loader:
    """The MNIST-1D training loader of one seed (``size``: ``num_samples=`` for a larger set)."""
    return data.load("mnist1d", "train", batch_size, seed=seed, epochs=epochs, **size)


# --- several seeds at once ---------------------------------------------------------------------


def stack_states(states: Sequence[TrainState]) -> TrainState:
    """Stacks per-seed states on a leading axis; the (equal) step counter stays a scalar.

    The states must share one ``apply_fn`` and one ``tx`` (build them from one model and one
    optimizer object).
    """
    if any(s.apply_fn != states[0].apply_fn or s.tx is not states[0].tx for s in states):
        raise ValueError("stack_states needs states built from one model and one optimizer")
    steps = {int(s.step) for s in states}
    if len(steps) != 1:
        raise ValueError(f"the states are at different steps {sorted(steps)}")
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[s.replace(step=0) for s in states])
    return stacked.replace(step=states[0].step)


def unstack_state(state: TrainState, index: int) -> TrainState:
    """Seed ``index`` of a stacked state."""
    return jax.tree.map(lambda x: x[index], state.replace(step=0)).replace(step=state.step)


def num_seeds(state: TrainState) -> int:
    return int(jax.tree.leaves(state.params)[0].shape[0])


def _state_axes(state: TrainState) -> TrainState:
    return state.replace(step=None, params=0, opt_state=0, rng=0, extra=0)


def vmap_seeds(step: Callable, state: TrainState, *, donate: bool = True) -> Callable:
    """``step(state, batch) -> (state, metrics)`` over stacked seeds, jitted.

    ``step`` is an unjitted single-seed step (``make_train_step(loss_fn, jit=False)``). Every
    seed gets its own slice of the state and of the batch; ``state.step`` is shared.
    """
    axes = _state_axes(state)
    vmapped = jax.vmap(step, in_axes=(axes, 0), out_axes=(axes, 0))
    return jax.jit(vmapped, donate_argnums=(0,) if donate else ())


class SeedLoader:
    """The batches of several loaders (one per seed) stacked on a leading axis.

    Resumable at any step like the loaders it stacks (``iter_from``), so ``fit`` can use it.
    """

    def __init__(self, loaders: Sequence[data.Loader]):
        if not loaders:
            raise ValueError("SeedLoader needs at least one loader")
        per_epoch = {loader.steps_per_epoch for loader in loaders}
        if len(per_epoch) != 1:
            raise ValueError(f"the loaders have different steps per epoch {sorted(per_epoch)}")
        self.loaders = list(loaders)
        first = self.loaders[0]
        self.batch_size = first.batch_size
        self.steps_per_epoch = first.steps_per_epoch
        self.num_examples = first.num_examples
        self.epochs = first.epochs

    def __len__(self) -> int:
        return len(self.loaders[0])

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        batches = [loader.batch_at(step) for loader in self.loaders]
        return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

    def iter_from(self, step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        end = self.loaders[0].num_steps
        while end is None or step < end:
            yield self.batch_at(step)
            step += 1

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iter_from(0)


def seed_eval_fn(
    arrays: Mapping[str, np.ndarray],
    *,
    prefix: str = "test",
    x_key: str = "x",
    y_key: str = "y",
    params_of: Callable[[TrainState], Any] = lambda state: state.params,
) -> Callable[[TrainState], dict[str, float]]:
    """``eval_fn(state)`` of a stacked state: loss and accuracy of every seed on a whole split.

    Returns ``{prefix/accuracy, prefix/loss}`` (means over seeds) and per seed ``i``
    ``{prefix/accuracy/i, prefix/loss/i}``. ``params_of`` picks what to evaluate (an EMA).
    """
    x, y = jnp.asarray(arrays[x_key]), jnp.asarray(arrays[y_key])
    cache: dict[Any, Callable] = {}

    def evaluate(state: TrainState) -> dict[str, float]:
        fn = cache.get(state.apply_fn)
        if fn is None:

            def one(params):
                logits = state.apply_fn({"params": params}, x).astype(jnp.float32)
                loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
                return loss, jnp.mean(jnp.argmax(logits, -1) == y)

            fn = cache[state.apply_fn] = jax.jit(jax.vmap(one))
        losses, accuracies = jax.device_get(fn(params_of(state)))
        out = {
            f"{prefix}/accuracy": float(np.mean(accuracies)),
            f"{prefix}/loss": float(np.mean(losses)),
        }
        for i, (loss, accuracy) in enumerate(zip(losses, accuracies, strict=True)):
            out[f"{prefix}/accuracy/{i}"] = float(accuracy)
            out[f"{prefix}/loss/{i}"] = float(loss)
        return out

    return evaluate


def per_seed(history: Sequence[Mapping[str, Any]], key: str, step: int | None = None) -> np.ndarray:
    """The per-seed values ``key/0, key/1, ...`` of the last record (at ``step``) that has them."""
    for record in reversed(history):
        if f"{key}/0" in record and (step is None or record["step"] == step):
            count = sum(
                1 for k in record if k.startswith(f"{key}/") and k[len(key) + 1 :].isdigit()
            )
            return np.array([record[f"{key}/{i}"] for i in range(count)])
    raise ValueError(f"no record with per-seed {key!r}" + (f" at step {step}" if step else ""))


def per_seed_curve(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps [points], values [seeds, points])`` of every record with per-seed ``key``."""
    records = [r for r in history if f"{key}/0" in r]
    steps = np.array([r["step"] for r in records])
    values = np.stack([per_seed([r], key) for r in records], axis=1)
    return steps, values


def offset(estimate: Estimate, target: float) -> Estimate:
    """``estimate - target``: ``decide(offset(e, 1.0), 0.1, direction='within')`` decides
    ``|quantity - 1| <= 0.1``."""
    return Estimate(
        estimate.value - target,
        estimate.low - target,
        estimate.high - target,
        estimate.n,
        estimate.confidence,
        tuple(s - target for s in estimate.samples),
    )


def single_seed_eval(eval_fn: Callable[[TrainState], dict[str, float]]):
    """An ``eval_fn`` of stacked seeds (``seed_eval_fn``) applied to one unstacked state."""

    def evaluate(state: TrainState) -> dict[str, float]:
        expand = lambda tree: jax.tree.map(lambda x: x[None], tree)
        return eval_fn(state.replace(params=expand(state.params), extra=expand(state.extra)))

    return evaluate
