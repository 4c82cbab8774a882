"""Accuracy-vs-training-time curves from one cyclic run per method, and who wins at which budget.

Portes, Blalock, Stephenson, Frankle, "Fast Benchmarking of Accuracy vs. Training Time with
Cyclic Learning Rates", arXiv:2206.00832, 2022: an efficiency claim is a curve, not a point, and
one run with an exponential-period cyclic learning rate
(:func:`efflax.optim.exponential_cyclic_cosine_schedule`) draws the whole curve, because the
model at the end of each cycle (:func:`efflax.optim.cycle_end_steps`) is nearly as good as one
trained with a single schedule of that length.

Here: :func:`cyclic_points` evaluates one ``fit`` run at the cycle ends and measures its training
time (compilation and evaluation excluded); :func:`interleaved_cyclic_points` trains several runs
in lockstep so that they share a busy machine's load alike; :class:`Curve` aggregates the runs of several seeds
into points with 95% intervals; :func:`pareto_front`, :func:`winners` and :func:`summary` say
which method is best at which time budget (a win counts as clear only when the intervals
separate); :func:`plot` draws a family of curves on one figure with the Pareto front marked.

Example (two optimizers on MNIST-1D; any ``fit``-compatible set-up works the same way)::

    import jax, numpy as np, optax
    from flax import linen as nn
    import efflax
    from efflax import curves
    from efflax.optim import cycle_end_steps, exponential_cyclic_cosine_schedule
    from efflax.training import TrainState, classification_eval_fn, cross_entropy_loss_fn
    from efflax.training import make_train_step

    budgets = cycle_end_steps(40, num_cycles=4, warmup_steps=20)  # [60, 140, 300, 620]
    schedule = exponential_cyclic_cosine_schedule(1e-2, 40, num_cycles=4, warmup_steps=20)
    eval_fn = classification_eval_fn(efflax.data.load_arrays("mnist1d", "test"))
    methods = {"adam": optax.adam(schedule), "sgd": optax.sgd(schedule, momentum=0.9)}
    family = []
    model = efflax.models.CNN1D()
    for name, tx in methods.items():
        step = make_train_step(cross_entropy_loss_fn())  # compiled once per method
        runs = []
        for seed in (0, 1, 2):
            params = nn.unbox(model.init(jax.random.key(seed), np.zeros((1, 40)))["params"])
            state = TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                                      rng=jax.random.key(seed))
            loader = efflax.data.load("mnist1d", "train", 100, seed=seed, epochs=None)
            runs.append(curves.cyclic_points(state, step, loader, eval_fn, budgets=budgets))
        family.append(curves.Curve.from_runs(name, runs))
    curves.plot(family, "tradeoff.png", title="MNIST-1D CNN")
    print(curves.summary(family))  # e.g. "up to 1.3 s: adam (clear); ..."
"""

from __future__ import annotations

import dataclasses
import math
import pathlib
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from efflax._src.stats import Estimate
from efflax._src.stats import bootstrap_interval
from efflax._src.stats import mean_interval
from efflax._src.timing import alone
from efflax._src.timing import timed_call
from pallas_kernels import _checks

__all__ = [
    "Curve",
    "Segment",
    "TimedEval",
    "cyclic_points",
    "interleaved_cyclic_points",
    "pareto_front",
    "plot",
    "summary",
    "winners",
]


class TimedEval:
    """Wraps ``eval_fn(state)``; keeps the evaluation seconds spent up to each evaluated step.

    Training steps still in flight (asynchronous dispatch) are finished before the evaluation's
    clock starts, so they count as training time, not evaluation time.
    """

    def __init__(self, eval_fn: Callable[[Any], Mapping[str, float]]):
        if not callable(eval_fn):
            raise ValueError(f"eval_fn={eval_fn!r} must be callable")
        self.eval_fn = eval_fn
        self.seconds = 0.0
        self.seconds_until: dict[int, float] = {}

    def __call__(self, state: Any) -> Mapping[str, float]:
        jax.block_until_ready(state.params)
        metrics, wall, _ = timed_call(self.eval_fn, state)
        self.seconds += wall
        self.seconds_until[int(state.step)] = self.seconds
        return metrics


def _check_budgets(budgets: Iterable[int]) -> list[int]:
    if isinstance(budgets, str | bytes | Mapping) or not isinstance(budgets, Iterable):
        raise ValueError(f"budgets={budgets!r} must be a list of steps, e.g. [60, 140, 300]")
    budgets = list(budgets)
    for b in budgets:
        # A float budget is refused, not truncated (int(99.9) would evaluate at step 99).
        _checks.int_at_least("budgets", b, 1)
    budgets = [int(_checks.as_number(b)) for b in budgets]
    if (
        not budgets
        or budgets[0] < 1
        or any(b >= c for b, c in zip(budgets, budgets[1:], strict=False))
    ):
        raise ValueError(f"budgets={budgets} must be a non-empty increasing list of steps >= 1")
    return budgets


def cyclic_points(
    state: Any,
    train_step: Callable[[Any, Any], tuple[Any, Mapping[str, jax.Array]]],
    loader: Any,
    eval_fn: Callable[[Any], Mapping[str, float]],
    *,
    budgets: Iterable[int],
    metric: str = "test/accuracy",
    **fit_kwargs: Any,
) -> list[dict[str, float]]:
    """Trains with ``efflax.training.fit`` to the last budget; the curve's points at ``budgets``.

    Use it with a cyclic schedule whose cycles end at ``budgets``
    (:func:`efflax.optim.cycle_end_steps`). The train step is compiled before the clock starts
    (on a copy of the state), and evaluation time is subtracted, so ``train_time`` is the time
    of the training steps alone.

    Args:
      state: the initial train state.
      train_step: ``step(state, batch) -> (state, metrics)``.
      loader: the batches (at least ``budgets[-1]`` of them).
      eval_fn: ``eval_fn(state) -> metrics``, run at each budget; it must return ``metric``.
      budgets: increasing step counts (the cycle ends).
      metric: the key of ``eval_fn``'s result that the curve follows.
      **fit_kwargs: further arguments of ``fit`` (``metrics_path``, ``hooks``, ...).

    Returns:
      One dict per budget: the record ``fit`` wrote at that step (``metric`` and whatever else
      ``eval_fn`` returned; ``wall_time`` includes evaluation) and ``train_time`` (seconds).
    """
    from efflax.training import fit

    budgets = _check_budgets(budgets)
    _check_metric(metric)
    if not callable(train_step):
        raise ValueError(f"train_step={train_step!r} must be callable (see make_train_step)")
    timed = TimedEval(eval_fn)
    batches = _iterate("loader", loader)
    try:
        first = next(batches)
    except StopIteration:
        raise ValueError("loader has no batches") from None
    jax.block_until_ready(train_step(jax.tree.map(jnp.copy, state), first))
    fit_kwargs.setdefault("progress", False)
    fit_kwargs.setdefault("log_every", budgets[-1])
    _, history = fit(
        state,
        train_step,
        loader,
        num_steps=budgets[-1],
        eval_fn=timed,
        eval_steps=budgets,
        **fit_kwargs,
    )
    by_step = {int(r["step"]): r for r in history if metric in r}
    points = []
    for budget in budgets:
        if budget not in by_step:
            raise ValueError(f"eval_fn did not return {metric=} at step {budget}")
        record = by_step[budget]
        train_time = float(record["wall_time"]) - timed.seconds_until[budget]
        points.append({**record, "step": budget, "train_time": train_time})
    return points


def _check_metric(metric: Any) -> None:
    if not isinstance(metric, str):
        raise ValueError(f"metric={metric!r} must be the name of a metric, e.g. 'test/accuracy'")


def _iterate(name: str, loader: Any) -> Any:
    """``loader.iter_from(0)`` for an ``efflax.data.Loader``, else ``iter(loader)``."""
    if hasattr(loader, "iter_from"):
        return loader.iter_from(0)
    if isinstance(loader, str | bytes | Mapping) or not isinstance(loader, Iterable):
        raise ValueError(f"{name}={loader!r} must be an iterable of batches (efflax.data.Loader)")
    return iter(loader)


def interleaved_cyclic_points(
    runs: Mapping[str, tuple[Any, Callable, Any, Callable[[Any], Mapping[str, float]]]],
    *,
    budgets: Iterable[int],
    metric: str = "test/accuracy",
) -> dict[str, list[dict[str, float]]]:
    """Several runs trained in lockstep, one step of each in turn; their points at ``budgets``.

    On a shared machine, runs trained one after the other see different load. Here every run
    advances one step per round (the order rotating each round), and each step is timed alone
    (finished with ``block_until_ready``), so all runs share whatever load there is and their
    times stay comparable. Compilation (a first step on a copy of each state) and evaluation are
    not timed.

    Args:
      runs: name -> ``(state, train_step, loader, eval_fn)``; ``loader.batch_at(step)`` (an
        ``efflax.data.Loader``) or an iterable of batches.
      budgets: increasing step counts (the cycle ends) at which each run is evaluated.
      metric: the key of ``eval_fn``'s result that the curve follows.

    Returns:
      name -> one dict per budget: ``step``, ``train_time`` (wall seconds of that run's steps so
      far), ``train_cpu_time`` (this process's CPU seconds during them: on a CPU host shared
      with other jobs, steadier than wall time) and everything its ``eval_fn`` returned.
    """
    budgets = _check_budgets(budgets)
    _check_metric(metric)
    if not isinstance(runs, Mapping) or not runs:
        raise ValueError(
            f"runs must be a non-empty dict name -> (state, train_step, loader, eval_fn), got "
            f"{type(runs).__name__}"
        )
    for n, run in runs.items():
        if not isinstance(run, Sequence) or isinstance(run, str | bytes) or len(run) != 4:
            raise ValueError(f"runs[{n!r}] must be a tuple (state, train_step, loader, eval_fn)")
        for position, what in ((1, "train_step"), (3, "eval_fn")):
            if not callable(run[position]):
                raise ValueError(f"runs[{n!r}]: {what}={run[position]!r} must be callable")
    names = list(runs)
    states = {n: runs[n][0] for n in names}

    def source(n: str) -> Callable[[int], Any]:
        loader = runs[n][2]
        if hasattr(loader, "batch_at"):
            return loader.batch_at
        batches = _iterate(f"runs[{n!r}] loader", loader)

        def next_batch(step: int) -> Any:
            try:
                return next(batches)
            except StopIteration:
                raise ValueError(
                    f"the loader of run {n!r} ran out of batches at step {step} < "
                    f"budgets[-1]={budgets[-1]}"
                ) from None

        return next_batch

    batches = {n: source(n) for n in names}
    firsts = {n: batches[n](0) for n in names}
    for n in names:  # compile outside the clock
        jax.block_until_ready(runs[n][1](jax.tree.map(jnp.copy, states[n]), firsts[n]))
    with alone():  # the timed training: the other processes of efflax reproduce paused
        seconds = dict.fromkeys(names, 0.0)
        cpu_seconds = dict.fromkeys(names, 0.0)
        points: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        ends = set(budgets)
        for step in range(budgets[-1]):
            shift = step % len(names)
            for n in names[shift:] + names[:shift]:
                batch = firsts.pop(n) if step == 0 else batches[n](step)
                (states[n], _), wall, cpu = timed_call(runs[n][1], states[n], batch)
                seconds[n] += wall
                cpu_seconds[n] += cpu
            if step + 1 in ends:
                for n in names:
                    values = runs[n][3](states[n])
                    if not isinstance(values, Mapping):
                        raise ValueError(
                            f"eval_fn of {n!r} returned {type(values).__name__}; it must return a "
                            "dict of named metrics"
                        )
                    values = dict(values)
                    if metric not in values:
                        raise ValueError(f"eval_fn of {n!r} did not return {metric=}")
                    points[n].append(
                        {
                            **values,
                            "step": step + 1,
                            "train_time": seconds[n],
                            "train_cpu_time": cpu_seconds[n],
                        }
                    )
        return points


@dataclasses.dataclass(frozen=True)
class Curve:
    """One method's metric-vs-training-time curve: points with 95% intervals over seeds.

    Attributes:
      name: the method.
      steps: the budget (in steps) of each point.
      seconds: the training time of each point.
      metric: the metric at each point.
      metric_name: what ``metric`` measures.
      higher_is_better: ``False`` for a loss.
    """

    name: str
    steps: tuple[int, ...]
    seconds: tuple[Estimate, ...]
    metric: tuple[Estimate, ...]
    metric_name: str = "test/accuracy"
    higher_is_better: bool = True

    def __post_init__(self):
        if not isinstance(self.name, str):
            raise ValueError(f"name={self.name!r} must be a string")
        for field in ("steps", "seconds", "metric"):
            value = getattr(self, field)
            if isinstance(value, str | bytes) or not isinstance(value, Sequence):
                raise ValueError(f"curve {self.name!r}: {field}={value!r} must be a sequence")
            object.__setattr__(self, field, tuple(value))
        for field in ("seconds", "metric"):
            for i, e in enumerate(getattr(self, field)):
                if not isinstance(e, Estimate):
                    raise ValueError(
                        f"curve {self.name!r}: {field}[{i}]={e!r} must be an efflax.stats.Estimate"
                    )
        object.__setattr__(
            self, "steps", tuple(_checks.int_at_least("steps", s, 1) for s in self.steps)
        )
        if not isinstance(self.metric_name, str):
            raise ValueError(f"metric_name={self.metric_name!r} must be a string")
        if not isinstance(self.higher_is_better, bool | np.bool_):
            raise ValueError(f"higher_is_better={self.higher_is_better!r} must be True or False")
        if not len(self.steps) == len(self.seconds) == len(self.metric) >= 1:
            raise ValueError(
                f"curve {self.name!r}: steps, seconds and metric need one entry per point, got "
                f"{len(self.steps)}, {len(self.seconds)}, {len(self.metric)}"
            )

    @classmethod
    def from_runs(
        cls,
        name: str,
        runs: Sequence[Sequence[Mapping[str, float]]],
        *,
        metric: str = "test/accuracy",
        time_key: str = "train_time",
        higher_is_better: bool = True,
    ) -> Curve:
        """Aggregates runs (one per seed, each a list of points from :func:`cyclic_points`).

        Raises:
          ValueError: no runs, a point that lacks ``step``, ``time_key`` or ``metric`` (naming
            the run and the point), a step that is not an int, or runs of different budgets.
        """
        for arg, value in (("name", name), ("metric", metric), ("time_key", time_key)):
            if not isinstance(value, str):
                raise ValueError(f"{arg}={value!r} must be a string")
        if isinstance(runs, str | bytes | Mapping) or not isinstance(runs, Sequence):
            raise ValueError(f"runs={_short(runs)} must be a list of runs (lists of points)")
        if not runs:
            raise ValueError(f"runs=[]: curve {name!r} needs at least one run")
        for r, run in enumerate(runs):
            if isinstance(run, str | bytes | Mapping) or not isinstance(run, Sequence) or not run:
                raise ValueError(
                    f"runs[{r}]={_short(run)} must be a non-empty list of points (dicts)"
                )
            for i, point in enumerate(run):
                if not isinstance(point, Mapping):
                    raise ValueError(f"runs[{r}][{i}]={_short(point)} must be a dict")
                for key, what in (("step", "step"), (time_key, "time_key"), (metric, "metric")):
                    if key not in point:
                        raise ValueError(
                            f"runs[{r}][{i}] has no {key!r} ({what}); its keys: {sorted(point)}"
                        )
        steps = [
            tuple(_checks.int_at_least(f"runs[{r}] step", p["step"], 1) for p in run)
            for r, run in enumerate(runs)
        ]
        if len(set(steps)) != 1:
            raise ValueError(f"curve {name!r}: the runs have different budgets {set(steps)}")
        seconds = tuple(
            _interval(f"{time_key} at step {s}", [run[i][time_key] for run in runs])
            for i, s in enumerate(steps[0])
        )
        values = tuple(
            _interval(f"{metric} at step {s}", [run[i][metric] for run in runs])
            for i, s in enumerate(steps[0])
        )
        return cls(name, steps[0], seconds, values, metric, higher_is_better)

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.higher_is_better else a < b

    def best_by(self, seconds: float) -> int | None:
        """Index of the best point reached within ``seconds`` of training (mean times)."""
        number = _checks.as_number(seconds)
        if isinstance(number, bool) or not isinstance(number, int | float) or math.isnan(number):
            raise ValueError(f"seconds={seconds!r} must be a number (inf for no limit)")
        seconds = float(number)
        best = None
        for i, (t, m) in enumerate(zip(self.seconds, self.metric, strict=True)):
            if t.value <= seconds and (
                best is None or self._better(m.value, self.metric[best].value)
            ):
                best = i
        return best


def time_to_reach(
    times: Sequence[float], curve: Sequence[float], target: float, *, higher_is_better: bool = True
) -> float:
    """When ``curve`` (its values at ``times``: seconds or steps) first reaches ``target``,
    interpolated linearly between the two points around it; ``inf`` if it never does."""
    times, curve = np.asarray(times, float), np.asarray(curve, float)
    if times.shape != curve.shape or times.ndim != 1 or not times.size:
        raise ValueError(
            f"times and curve must be two lists of one equal length, got shapes {times.shape} "
            f"and {curve.shape}"
        )
    seconds, higher = times, higher_is_better
    hits = np.nonzero(curve >= target if higher else curve <= target)[0]
    if not hits.size:
        return math.inf
    i = int(hits[0])
    if i == 0:
        return float(seconds[0])
    (t0, t1), (c0, c1) = seconds[i - 1 : i + 1], curve[i - 1 : i + 1]
    return float(t0 + (t1 - t0) * (target - c0) / (c1 - c0)) if c1 != c0 else float(t1)


def time_speedup(
    runs: Mapping[str, Sequence[Sequence[Mapping[str, float]]]],
    slow: str,
    fast: str,
    *,
    metric: str = "test/accuracy",
    time_key: str = "train_time",
    higher_is_better: bool = True,
    num_resamples: int = 2000,
) -> Estimate:
    """How many times less training time ``fast`` needs than ``slow`` to reach the worse of
    their two final mean qualities, with a 95% bootstrap interval over seeds.

    Each method's curve is the mean over seeds of ``metric`` against the mean of ``time_key``
    at each budget; the time to the target is interpolated between budgets. Seed ``s`` of both
    methods is resampled together (paired: the same data order); the times are taken as
    measured.

    Args:
      runs: by method, one run per seed, each a list of points (dicts with ``time_key`` and
        ``metric``), as :func:`interleaved_cyclic_points` returns them.
      slow: the baseline method; ``fast``: the one claimed to be faster.
      metric: the quality; ``higher_is_better=False`` for a loss.
      time_key: the training time of a point (``train_time``, ``train_cpu_time``).
      num_resamples: bootstrap resamples.

    Raises:
      ValueError: a method not in ``runs``, different numbers of seeds or points, a point
        without ``metric`` or ``time_key``.
    """
    for name in (slow, fast):
        if name not in runs:
            raise ValueError(f"method {name!r} is not in runs (methods: {sorted(runs)})")
    values, seconds = {}, {}
    for name in (slow, fast):
        try:
            points = np.array([[[p[time_key], p[metric]] for p in run] for run in runs[name]])
        except KeyError as e:
            raise ValueError(f"a point of {name!r} has no {e.args[0]!r}") from None
        except ValueError:
            raise ValueError(f"the runs of {name!r} have different numbers of points") from None
        if points.ndim != 3 or not points.size:
            raise ValueError(f"runs[{name!r}] must be one non-empty list of points per seed")
        seconds[name], values[name] = points[..., 0].mean(0), points[..., 1]
    if values[slow].shape != values[fast].shape:
        raise ValueError(
            f"{slow!r} and {fast!r} need the same seeds and budgets (paired), got "
            f"{values[slow].shape} and {values[fast].shape} (seeds, points)"
        )

    def log_ratio(index: np.ndarray) -> float:
        index = index.astype(int)
        a, b = values[slow][index].mean(0), values[fast][index].mean(0)
        target = min(a[-1], b[-1]) if higher_is_better else max(a[-1], b[-1])
        time_a = time_to_reach(seconds[slow], a, target, higher_is_better=higher_is_better)
        time_b = time_to_reach(seconds[fast], b, target, higher_is_better=higher_is_better)
        return float(np.log(time_a / time_b))

    count = len(values[slow])
    estimate = bootstrap_interval(
        np.arange(count, dtype=float), log_ratio, num_resamples=num_resamples
    )
    value, low, high = (float(np.exp(x)) for x in (estimate.value, estimate.low, estimate.high))
    return Estimate(value, low, high, count)


def _short(value: Any) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _interval(what: str, values: list[Any]) -> Estimate:
    try:
        return mean_interval(values)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None


def _check_family(curves: Sequence[Curve]) -> list[Curve]:
    if isinstance(curves, Curve):
        raise ValueError(f"curves must be a list of Curve, got the one Curve {curves.name!r}")
    if isinstance(curves, str | bytes | Mapping) or not isinstance(curves, Iterable):
        raise ValueError(f"curves={_short(curves)} must be a list of Curve")
    curves = list(curves)
    if not curves:
        raise ValueError("no curves")
    for i, c in enumerate(curves):
        if not isinstance(c, Curve):
            raise ValueError(f"curves[{i}]={_short(c)} must be a Curve (Curve.from_runs)")
    names = [c.name for c in curves]
    if len(set(names)) != len(names):
        raise ValueError(f"curve names must be unique, got {names}")
    if len({(c.metric_name, c.higher_is_better) for c in curves}) != 1:
        raise ValueError("the curves of a family must share one metric")
    return curves


def pareto_front(curves: Sequence[Curve]) -> list[tuple[str, int]]:
    """The points no other point beats in both time and metric (mean values), by time.

    Returns:
      ``(curve name, point index)`` pairs, fastest first; each is strictly better in the metric
      than every faster point of the front.
    """
    curves = _check_family(curves)
    points = sorted(
        (t.value, -m.value if c.higher_is_better else m.value, c.name, i)
        for c in curves
        for i, (t, m) in enumerate(zip(c.seconds, c.metric, strict=True))
    )
    front, best = [], math.inf
    for _, score, name, i in points:
        if score < best:
            front.append((name, i))
            best = score
    return front


@dataclasses.dataclass(frozen=True)
class Segment:
    """A range of time budgets with one best method.

    Attributes:
      start, end: the budget range in seconds (``end`` is ``inf`` for the last one).
      winner: the method with the best metric reachable within the budget.
      clear: the winner's interval is above (below, for a loss) every other method's.
      tied_with: the methods whose intervals overlap the winner's.
    """

    start: float
    end: float
    winner: str
    clear: bool
    tied_with: tuple[str, ...] = ()


def winners(curves: Sequence[Curve]) -> list[Segment]:
    """Which method is best at each training-time budget.

    At a budget of ``t`` seconds a method offers the best of its points whose mean time is at
    most ``t``. The winner is the best of these (mean metric); the win is clear when its 95%
    interval does not overlap that of any other method with a point within ``t``. Budgets
    below the fastest point have no winner and are not listed.
    """
    curves = _check_family(curves)
    times = sorted({t.value for c in curves for t in c.seconds})
    segments: list[Segment] = []
    for k, t in enumerate(times):
        offers = {c.name: (c, c.best_by(t)) for c in curves}
        offers = {n: c.metric[i] for n, (c, i) in offers.items() if i is not None}
        higher = curves[0].higher_is_better
        winner = max(offers, key=lambda n: offers[n].value if higher else -offers[n].value)
        w = offers[winner]
        tied = tuple(
            sorted(
                n
                for n, e in offers.items()
                if n != winner and (e.high >= w.low if higher else e.low <= w.high)
            )
        )
        end = times[k + 1] if k + 1 < len(times) else math.inf
        segment = Segment(t, end, winner, not tied, tied)
        if segments and (segments[-1].winner, segments[-1].tied_with) == (winner, tied):
            segments[-1] = dataclasses.replace(segments[-1], end=end)
        else:
            segments.append(segment)
    return segments


def summary(curves: Sequence[Curve]) -> str:
    """Who wins at which budget, in one line: ``'0.5-1.2 s: a (clear); from 1.2 s: b ~ a'``."""
    parts = []
    for s in winners(curves):
        span = f"from {s.start:.3g} s" if math.isinf(s.end) else f"{s.start:.3g}-{s.end:.3g} s"
        who = f"{s.winner} (clear)" if s.clear else " ~ ".join((s.winner, *s.tied_with)) + " (tied)"
        parts.append(f"{span}: {who}")
    return "; ".join(parts)


def plot(
    curves: Sequence[Curve],
    path: str | pathlib.Path | None = None,
    *,
    title: str = "",
    ax: Any = None,
    metric_scale: float = 100.0,
    metric_label: str | None = None,
) -> Any:
    """Draws a family of curves on one axis, with error bars and the Pareto front marked.

    Args:
      curves: the family (one metric).
      path: where to save a PNG (a new figure); None to draw only.
      title: the axis title.
      ax: a matplotlib axis to draw on (default: a new figure).
      metric_scale: multiplies the metric (100: accuracy in %).
      metric_label: the y-axis label.

    Returns:
      The axis.
    """
    import matplotlib

    if ax is None and path is not None:
        matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = _check_family(curves)
    if not isinstance(title, str):
        raise ValueError(f"title={title!r} must be a string")
    metric_scale = _checks.finite_float("metric_scale", metric_scale)
    if metric_scale == 0:
        raise ValueError("metric_scale=0 would draw every point at 0")
    if metric_label is not None and not isinstance(metric_label, str):
        raise ValueError(f"metric_label={metric_label!r} must be a string or None")
    if path is not None and not isinstance(path, str | pathlib.Path):
        raise ValueError(f"path={path!r} must be a file path (str or pathlib.Path) or None")
    fig = None
    if ax is None:
        fig, ax = plt.subplots(figsize=(6, 4))
    for k, c in enumerate(curves):
        x = np.array([t.value for t in c.seconds])
        y = metric_scale * np.array([m.value for m in c.metric])
        xerr = np.array([[t.value - t.low, t.high - t.value] for t in c.seconds]).T
        yerr = metric_scale * np.array([[m.value - m.low, m.high - m.value] for m in c.metric]).T
        # One seed has no interval (unbounded): draw the points without bars.
        xerr, yerr = (np.where(np.isfinite(e), e, 0.0) for e in (xerr, yerr))
        ax.errorbar(
            x, y, xerr=xerr, yerr=yerr, marker="o", ms=4, capsize=2, color=f"C{k}", label=c.name
        )
    front = pareto_front(curves)
    by_name = {c.name: c for c in curves}
    fx = [by_name[n].seconds[i].value for n, i in front]
    fy = [metric_scale * by_name[n].metric[i].value for n, i in front]
    ax.step(fx, fy, where="post", color="k", lw=1, ls="--", alpha=0.6, label="Pareto front")
    ax.scatter(fx, fy, s=90, facecolors="none", edgecolors="k", zorder=3)
    ax.set_xscale("log")
    ax.set_xlabel("training time (s)")
    ax.set_ylabel(metric_label or (curves[0].metric_name + (" (%)" if metric_scale == 100 else "")))
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if fig is not None:
        fig.tight_layout()
        if path is not None:
            pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
            fig.savefig(path, dpi=110)
            plt.close(fig)
    return ax
