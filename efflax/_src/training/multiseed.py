"""Many seeds (and several arms of one experiment) trained as one vmapped, jitted program.

A claim decided over seeds needs N runs of one configuration; on a CPU (and on an accelerator
with a small model) N separate runs mostly pay per-step dispatch N times. Here the per-seed train
states are stacked on a leading axis (the step counter stays one shared scalar), the library's
train step is ``jax.vmap``-ed over that axis and jitted once, and every seed reads its own
batches (its own data order). ``fit`` runs the stacked state unchanged, so evaluation,
JSON-lines metrics, orbax checkpoints and exact resume come from it.

Arms are the compared variants of one experiment (losses, optimizers, models): each arm has its
own stacked state and step, and all arms advance in the same jitted step. Arm ``a`` of seed
``s`` gets the state ``make_state[a](s)`` and seed ``s``'s batches, so the arms of one seed are
paired (same initialisation when the model is the same, same data).

Exactness: seed ``s`` of an N-seed run is bit-identical on a CPU to the same program run with
that seed alone (``fit_seeds(..., seeds=[s])``); a plain unvmapped ``fit`` of that seed agrees to
float rounding (XLA reduces over the batch in another order under ``vmap``).

Metric keys, one format everywhere: ``<name>/seed_<i>`` per seed (``i`` indexes ``seeds``) next
to ``<name>``, the mean over seeds; with arms ``<name>`` is ``<split>/<arm>/<metric>``
(``train/ce/loss/seed_0``, ``test/ce/accuracy``), without arms ``<split>/<metric>``.

Example: :func:`fit_seeds`.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from efflax._src import stats
from efflax._src.plotting import pyplot
from efflax._src.plotting import save_figure
from efflax._src.training.loop import fit
from efflax._src.training.state import _TRACING_ERRORS
from efflax._src.training.state import TrainState
from efflax._src.training.state import _compile_once
from efflax._src.training.state import _on_one_device
from efflax._src.training.state import make_train_step


def seed_key(name: str, index: int) -> str:
    """The metric key of seed ``index`` (its position in ``seeds``): ``'<name>/seed_<index>'``."""
    return f"{name}/seed_{index}"


@functools.lru_cache(maxsize=32)
def _compiled_init(model: nn.Module) -> Callable:
    return _compile_once(model.init)


def init_params(model: nn.Module, seed: int | jax.Array, *example: Any) -> Any:
    """The unboxed ``"params"`` of ``model.init(jax.random.key(seed), *example)``.

    One compiled program per model and input shapes (:func:`_compile_once`): run eagerly, every
    initializer op and shape compiles on its own, hundreds of small programs for a model. A
    model with unhashable attributes, or whose ``init`` needs concrete values, runs eagerly;
    inside a traced function the init is part of the caller's program.

    Args:
      model: a linen module.
      seed: an int (or a traced int32) for ``jax.random.key``, or a key.
      *example: the inputs to initialise on.
    """
    key = seed if _is_key(seed) else jax.random.key(seed)
    if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves((key, example))):
        return nn.unbox(model.init(key, *example)["params"])  # part of the caller's program
    try:
        init = _compiled_init(model)
    except TypeError:  # unhashable module attributes
        init = model.init
    try:
        variables = init(key, *example)
    except (*_TRACING_ERRORS, ValueError):  # concrete values needed, or inside another jit
        variables = model.init(key, *example)
    return nn.unbox(variables["params"])


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def seed_state(
    model: nn.Module,
    tx: optax.GradientTransformation,
    *,
    seed: int,
    example: Any,
    extra: Mapping[str, Any] | Callable[[Any], Mapping[str, Any]] | None = None,
) -> TrainState:
    """The train state of one seed: parameters from ``key(seed)``, step keys from ``key(seed + 1000)``.

    Args:
      model: a linen module, initialised on ``example`` (a tuple: several positional inputs).
      tx: the optimizer (pass one object for every seed: the stacked states share it).
      seed: the run's seed.
      example: an input batch to initialise on.
      extra: ``TrainState.extra``, or a function of the parameters that returns it (an EMA).
    """
    args = example if isinstance(example, tuple) else (example,)
    params = init_params(model, seed, *args)
    if callable(extra):
        extra = extra(params)
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        rng=jax.random.key(seed + 1000),
        extra=dict(extra or {}),
    )


# --- stacked states ------------------------------------------------------------------------------


def stack_states(states: Sequence[TrainState]) -> TrainState:
    """Per-seed states stacked on a leading axis; the (equal) step counter stays a scalar.

    Raises:
      ValueError: no states, states of different models or optimizers (build them from one
        model and one optimizer object), or at different steps.
    """
    states = list(states)
    if not states:
        raise ValueError("stack_states needs at least one state")
    if any(s.apply_fn != states[0].apply_fn or s.tx is not states[0].tx for s in states):
        raise ValueError("stack_states needs states built from one model and one optimizer")
    steps = {int(s.step) for s in states}
    if len(steps) != 1:
        raise ValueError(f"the states are at different steps {sorted(steps)}")
    trees = [s.replace(step=None) for s in states]
    stack = _stack_trees() if _on_one_device(trees) else _stack_leaves
    return stack(*trees).replace(step=states[0].step)


def _stack_leaves(*trees: Any) -> Any:
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


@functools.cache
def _stack_trees() -> Callable:
    """:func:`_stack_leaves` as one compiled program per structure (eagerly, one per leaf shape)."""
    return _compile_once(_stack_leaves)


def unstack_state(state: TrainState, index: int) -> TrainState:
    """Seed ``index`` of a stacked state (of one arm: see :func:`arm_state`)."""
    if isinstance(state.apply_fn, _PerArm):
        raise ValueError("unstack_state takes one arm's state: unstack_state(arm_state(s, arm), i)")
    return jax.tree.map(lambda x: x[index], state.replace(step=None)).replace(step=state.step)


def num_seeds(state: TrainState) -> int:
    """How many seeds a stacked state (or an arms state) holds."""
    return int(jax.tree.leaves(state.params)[0].shape[0])


@dataclasses.dataclass(frozen=True)
class _PerArm:
    """The static per-arm fields (``apply_fn``, ``tx``) of an arms state, by arm name."""

    names: tuple[str, ...]
    values: tuple[Any, ...]

    def __getitem__(self, arm: str) -> Any:
        return self.values[self.names.index(arm)]


def stack_arms(arms: Mapping[str, TrainState]) -> TrainState:
    """One state holding several arms' stacked states (``{arm: stack_states(...)}``).

    Its ``params``, ``opt_state``, ``rng`` and ``extra`` are dicts by arm; ``step`` is shared.
    ``fit`` checkpoints and resumes it like any state; :func:`arm_state` takes an arm back out.
    """
    names = tuple(arms)
    if not names:
        raise ValueError("stack_arms needs at least one arm")
    states = [arms[n] for n in names]
    if len({int(s.step) for s in states}) != 1 or len({num_seeds(s) for s in states}) != 1:
        raise ValueError("the arms must be at one step and hold the same number of seeds")
    return _join_arms(names, states)


def _join_arms(names: tuple[str, ...], states: Sequence[TrainState]) -> TrainState:
    return TrainState(
        step=states[0].step,
        params={n: s.params for n, s in zip(names, states, strict=True)},
        opt_state={n: s.opt_state for n, s in zip(names, states, strict=True)},
        rng={n: s.rng for n, s in zip(names, states, strict=True)},
        extra={n: s.extra for n, s in zip(names, states, strict=True)},
        apply_fn=_PerArm(names, tuple(s.apply_fn for s in states)),
        tx=_PerArm(names, tuple(s.tx for s in states)),
    )


def arm_names(state: TrainState) -> tuple[str, ...] | None:
    """The arms of an arms state (:func:`stack_arms`), None for a plain stacked state."""
    return state.apply_fn.names if isinstance(state.apply_fn, _PerArm) else None


def arm_state(state: TrainState, arm: str) -> TrainState:
    """The stacked state of one arm of an arms state."""
    return TrainState(
        step=state.step,
        params=state.params[arm],
        opt_state=state.opt_state[arm],
        rng=state.rng[arm],
        extra=state.extra[arm],
        apply_fn=state.apply_fn[arm],
        tx=state.tx[arm],
    )


def _arms(state: TrainState) -> list[tuple[str | None, TrainState]]:
    names = arm_names(state)
    return [(None, state)] if names is None else [(n, arm_state(state, n)) for n in names]


def _axes(state: TrainState) -> TrainState:
    return state.replace(step=None, params=0, opt_state=0, rng=0, extra=0)


def _expand(metrics: Mapping[str, jax.Array], prefix: str = "") -> dict[str, jax.Array]:
    """``{k: [seeds]}`` -> ``{prefix+k: mean, prefix+k/seed_i: value i}``."""
    out = {}
    for key, values in metrics.items():
        out[prefix + key] = jnp.mean(values)
        for i in range(values.shape[0]):
            out[seed_key(prefix + key, i)] = values[i]
    return out


def seeds_step(
    step: Callable | Mapping[str, Callable], *, donate: bool = True, jit: bool = True
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """``step(state, batch) -> (state, metrics)`` over stacked seeds (and arms), jitted once.

    Args:
      step: an unjitted single-seed step (``make_train_step(loss_fn, jit=False)``), or a dict
        of them by arm for an arms state (:func:`stack_arms`). Every seed gets its own slice of
        the state and of the batch (``[seeds, ...]`` leaves: :class:`SeedLoader`); arms share
        the batch.
      donate: donate the old state's buffers.
      jit: wrap in ``jax.jit``.

    Returns:
      The step; its metrics hold every metric of ``step`` per seed (``loss/seed_0``) and as the
      mean over seeds (``loss``); with arms, under the arm's name (``ce/loss/seed_0``).
    """
    steps = dict(step) if isinstance(step, Mapping) else None

    def one_arm(fn: Callable, state: TrainState, batch: Any):
        axes = _axes(state)
        return jax.vmap(fn, in_axes=(axes, 0), out_axes=(axes, 0))(state, batch)

    def run(state: TrainState, batch: Any):
        names = arm_names(state)
        if names is None:
            if steps is not None:
                raise ValueError("seeds_step got a dict of steps but a state without arms")
            new, metrics = one_arm(step, state, batch)
            return new, _expand(metrics)
        if steps is None or set(steps) != set(names):
            raise ValueError(f"seeds_step needs one step per arm {names}, got {step!r}")
        new_arms, metrics = {}, {}
        for name in names:
            new_arms[name], m = one_arm(steps[name], arm_state(state, name), batch)
            metrics.update(_expand(m, f"{name}/"))
        return _join_arms(names, [new_arms[n] for n in names]), metrics

    return jax.jit(run, donate_argnums=(0,) if donate else ()) if jit else run


# --- data ----------------------------------------------------------------------------------------


class SeedLoader:
    """One loader per seed, their batches stacked: leaves ``[seeds, batch, ...]``.

    Seed ``i`` reads exactly the batches its own loader yields alone. Resumable at any step
    (``iter_from``) like the loaders it stacks, so ``fit`` resumes it exactly.
    """

    def __init__(self, loaders: Sequence[Any]):
        loaders = list(loaders)
        if not loaders:
            raise ValueError("SeedLoader needs at least one loader")
        if any(not hasattr(loader, "batch_at") for loader in loaders):
            raise ValueError("SeedLoader needs loaders with batch_at (efflax.data.Loader)")
        per_epoch = {loader.steps_per_epoch for loader in loaders}
        if len(per_epoch) != 1:
            raise ValueError(f"the loaders have different steps per epoch {sorted(per_epoch)}")
        self.loaders = loaders
        first = loaders[0]
        self.batch_size = first.batch_size
        self.steps_per_epoch = first.steps_per_epoch
        self.num_examples = first.num_examples
        self.epochs = first.epochs
        self.num_steps = first.num_steps

    def __len__(self) -> int:
        return len(self.loaders[0])

    def batch_at(self, step: int) -> dict[str, np.ndarray]:
        batches = [loader.batch_at(step) for loader in self.loaders]
        return {k: np.stack([b[k] for b in batches]) for k in batches[0]}

    def iter_from(self, step: int = 0) -> Iterator[dict[str, np.ndarray]]:
        while self.num_steps is None or step < self.num_steps:
            yield self.batch_at(step)
            step += 1

    def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
        return self.iter_from(0)


class SplitLoader:
    """One loader's batches split between seeds: seed ``i`` takes the ``i``-th slice.

    ``loader.batch_size`` must divide into ``num_seeds``; ``transform(batch)`` (optional) runs
    on each whole batch first. Keeps ``iter_from`` (exact resume) and ``batch_size``.
    """

    def __init__(self, loader: Any, num_seeds: int, transform: Callable | None = None):
        if num_seeds < 1 or loader.batch_size % num_seeds:
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


# --- evaluation and results ----------------------------------------------------------------------


def seeds_eval(
    metrics_fn: Callable[[Callable, Any], Mapping[str, jax.Array]],
    *,
    prefix: str = "test",
    params_of: Callable[[TrainState], Any] | None = None,
) -> Callable[[TrainState], dict[str, float]]:
    """``eval_fn(state)`` of a stacked (or arms) state from a one-seed ``metrics_fn``.

    ``metrics_fn(apply_fn, params) -> {name: scalar}`` is vmapped over the seeds and jitted
    once per model. Returns ``{prefix/name: mean over seeds, prefix/name/seed_i: ...}``; with
    arms, ``prefix/<arm>/name/seed_i``. ``params_of`` picks what to evaluate of one arm's
    stacked state (default its ``params``; an EMA: ``lambda s: s.extra['ema']``).
    """
    cache: dict[Any, Callable] = {}

    def evaluate(state: TrainState) -> dict[str, float]:
        out: dict[str, float] = {}
        for arm, one_arm in _arms(state):
            fn = cache.get(one_arm.apply_fn)
            if fn is None:
                fn = cache[one_arm.apply_fn] = jax.jit(
                    jax.vmap(lambda p, apply_fn=one_arm.apply_fn: metrics_fn(apply_fn, p))
                )
            params = params_of(one_arm) if params_of else one_arm.params
            values = jax.device_get(fn(params))
            base = prefix if arm is None else f"{prefix}/{arm}"
            for metric in sorted(values):
                out[f"{base}/{metric}"] = float(np.mean(values[metric]))
                for i, value in enumerate(values[metric]):
                    out[seed_key(f"{base}/{metric}", i)] = float(value)
        return out

    return evaluate


def seeds_eval_fn(
    arrays: Mapping[str, Any],
    *,
    prefix: str = "test",
    x_key: str = "x",
    y_key: str = "y",
    params_of: Callable[[TrainState], Any] | None = None,
) -> Callable[[TrainState], dict[str, float]]:
    """Every seed's classification ``accuracy`` and ``loss`` on a whole split (:func:`seeds_eval`).

    One vmapped forward ``apply_fn({'params': p}, arrays[x_key])`` over the split per arm.
    """
    for name, key in (("x_key", x_key), ("y_key", y_key)):
        if key not in arrays:
            raise ValueError(f"{name}={key!r} is not a key of arrays (keys: {sorted(arrays)})")
    x, y = jnp.asarray(arrays[x_key]), jnp.asarray(arrays[y_key])

    def metrics_fn(apply_fn, params):
        logits = apply_fn({"params": params}, x).astype(jnp.float32)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return {"accuracy": jnp.mean(jnp.argmax(logits, -1) == y), "loss": loss}

    return seeds_eval(metrics_fn, prefix=prefix, params_of=params_of)


def _count(record: Mapping[str, Any], key: str) -> int:
    count = 0
    while seed_key(key, count) in record:
        count += 1
    return count


def per_seed(history: Sequence[Mapping[str, Any]], key: str, step: int | None = None) -> np.ndarray:
    """The per-seed values of ``key`` (``key/seed_0, ...``) in the last record that has them
    (the one at ``step`` if given)."""
    for record in reversed(history):
        if seed_key(key, 0) in record and (step is None or record["step"] == step):
            return np.array([record[seed_key(key, i)] for i in range(_count(record, key))])
    where = f" at step {step}" if step is not None else ""
    raise ValueError(f"no record with per-seed values of {key!r}{where}")


def per_seed_curve(history: Sequence[Mapping[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    """``(steps [points], values [seeds, points])`` of every record with per-seed ``key``."""
    records = [r for r in history if seed_key(key, 0) in r]
    if not records:
        raise ValueError(f"no record with per-seed values of {key!r}")
    steps = np.array([r["step"] for r in records])
    return steps, np.stack([per_seed([r], key) for r in records], axis=1)


@dataclasses.dataclass
class SeedRun:
    """What :func:`fit_seeds` returns: the final stacked state, the history and the seeds.

    The per-seed results feed ``efflax.stats`` directly: :meth:`estimate` (mean with a 95%
    interval over seeds), :meth:`paired` (paired difference of two keys, e.g. two arms).
    """

    state: TrainState
    history: list[dict[str, Any]]
    seeds: tuple[int, ...]

    def per_seed(self, key: str, step: int | None = None) -> np.ndarray:
        return per_seed(self.history, key, step)

    def curve(self, key: str) -> tuple[np.ndarray, np.ndarray]:
        return per_seed_curve(self.history, key)

    def estimate(self, key: str, *, scale: float = 1.0, confidence: float = 0.95):
        """``efflax.stats.mean_interval`` of ``scale * per_seed(key)``."""
        return stats.mean_interval(scale * self.per_seed(key), confidence=confidence)

    def estimates(self, *keys: str, scale: float = 1.0) -> dict[str, stats.Estimate]:
        """An :meth:`estimate` per key: what ``efflax.experiment.Verdict(estimates=...)`` takes."""
        return {key: self.estimate(key, scale=scale) for key in keys}

    def paired(self, key: str, baseline: str, *, scale: float = 1.0, confidence: float = 0.95):
        """``efflax.stats.paired_difference`` of ``key`` minus ``baseline``, paired by seed."""
        return stats.paired_difference(
            scale * self.per_seed(key), scale * self.per_seed(baseline), confidence=confidence
        )

    def arm(self, name: str) -> TrainState:
        return arm_state(self.state, name)

    def seed(self, index: int, arm: str | None = None) -> TrainState:
        """The unstacked state of seed ``index`` (of ``arm``)."""
        return unstack_state(self.state if arm is None else self.arm(arm), index)


def _states_of(factory: Callable[[int], TrainState], seeds: Sequence[int]) -> list[TrainState]:
    """``[factory(s) for s in seeds]``, built by one compiled program where ``factory`` traces
    with the seed as a value (one compilation instead of one per initializer op and shape);
    factories that need a Python int seed (``np.random.default_rng(seed)``) run eagerly."""
    try:
        jitted = _compile_once(factory)
        jax.eval_shape(jitted, jnp.int32(seeds[0]))
    except _TRACING_ERRORS:
        return [factory(s) for s in seeds]
    return [jitted(jnp.int32(s)) for s in seeds]


def fit_seeds(
    make_state: Callable[[int], TrainState] | Mapping[str, Callable[[int], TrainState]],
    loss_fn: Callable | Mapping[str, Callable],
    loader: Callable[[int], Any] | Any,
    *,
    seeds: Iterable[int],
    step_options: Mapping[str, Any] | None = None,
    **fit_kwargs: Any,
) -> SeedRun:
    """Trains every seed (and arm) at once with one vmapped, jitted step through ``fit``.

    Args:
      make_state: ``make_state(seed) -> TrainState`` (e.g. :func:`seed_state`), or a dict of
        them by arm. Every seed's state must come from the same model and optimizer objects.
      loss_fn: the single-seed loss (``make_train_step``'s contract), or a dict by arm.
      loader: ``loader(seed) -> efflax.data.Loader``, each seed its own data order
        (:class:`SeedLoader`), or an iterable of already stacked batches (:class:`SplitLoader`).
      seeds: the seeds; per-seed metric ``i`` belongs to the ``i``-th.
      step_options: keyword arguments of ``make_train_step`` (``pass_grad_fn=True``...).
      **fit_kwargs: passed to ``fit``: ``num_steps``, ``eval_fn`` (:func:`seeds_eval_fn`),
        ``eval_every``, ``checkpoint_dir`` (exact resume), ``metrics_path``, ``log_every``...

    Returns:
      A :class:`SeedRun`.

    Example (any linen classifier, any ``efflax.data`` loader; arms: dicts by arm name):
      >>> import numpy as np, optax
      >>> from efflax import data, models, training
      >>> model, tx = models.MLP(features=(100, 100)), optax.adam(1e-2)
      >>> run = training.fit_seeds(
      ...     lambda seed: training.seed_state(model, tx, seed=seed, example=np.zeros((1, 40))),
      ...     training.cross_entropy_loss_fn(),
      ...     lambda seed: data.load("mnist1d", "train", 100, seed=seed, epochs=None),
      ...     seeds=range(5), num_steps=1000,
      ...     eval_fn=training.seeds_eval_fn(data.load_arrays("mnist1d", "test")),
      ...     checkpoint_dir="/tmp/mlp_seeds")          # resumes exactly if interrupted
      >>> run.estimate("test/accuracy")                  # efflax.stats.Estimate over the 5 seeds
      >>> run.per_seed("test/accuracy")                  # np.array of 5 values
    """
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise ValueError("fit_seeds needs at least one seed")
    options = dict(step_options or {})

    def stacked(factory):
        return stack_states(_states_of(factory, seeds))

    def step_of(fn):
        return make_train_step(fn, jit=False, **options)

    if isinstance(make_state, Mapping):
        names = tuple(make_state)
        losses = loss_fn if isinstance(loss_fn, Mapping) else dict.fromkeys(names, loss_fn)
        if set(losses) != set(names):
            raise ValueError(f"loss_fn names arms {sorted(losses)}, make_state {sorted(names)}")
        state = stack_arms({n: stacked(make_state[n]) for n in names})
        step = seeds_step({n: step_of(losses[n]) for n in names})
    else:
        if isinstance(loss_fn, Mapping):
            raise ValueError("a dict of loss functions needs a dict of make_state (one per arm)")
        state = stacked(make_state)
        step = seeds_step(step_of(loss_fn))
    batches = SeedLoader([loader(s) for s in seeds]) if callable(loader) else loader
    fit_kwargs.setdefault("progress", False)
    state, history = fit(state, step, batches, **fit_kwargs)
    return SeedRun(state, history, seeds)


def plot_arms(
    path: Any,
    history: Sequence[Mapping[str, Any]],
    finals: Mapping[str, Sequence[float]],
    *,
    key: str = "test/{arm}/accuracy",
    ylabel: str = "test accuracy (%)",
    title: str = "",
    scale: float = 100.0,
) -> None:
    """Two panels: every arm's seed-mean curve of ``key`` and its final per-seed values."""
    fig, (left, right) = pyplot().subplots(1, 2, figsize=(10, 3.6))
    for arm in finals:
        points = [(r["step"], r[key.format(arm=arm)]) for r in history if key.format(arm=arm) in r]
        left.plot([p[0] for p in points], [scale * p[1] for p in points], marker=".", label=arm)
    left.set(xlabel="step", ylabel=ylabel)
    left.legend(fontsize=8)
    for i, values in enumerate(finals.values()):
        values = scale * np.asarray(values)
        right.scatter(np.full(len(values), i), values, alpha=0.6, s=18)
        sd = values.std(ddof=1) if len(values) > 1 else 0
        right.errorbar(i + 0.15, values.mean(), yerr=sd, fmt="o", color="black", capsize=4)
    right.set_xticks(range(len(finals)), list(finals), rotation=15, fontsize=8)
    right.set(ylabel=ylabel, title="final, per seed (black: mean +- sd)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
    save_figure(fig, path, title=title)
