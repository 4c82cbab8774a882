"""efflax.curves: points at cycle ends, aggregation over seeds, Pareto front, winners by budget."""

import math
import re

import jax.numpy as jnp
import numpy as np
import pytest

from efflax import curves
from efflax.curves import Curve
from efflax.stats import Estimate
from efflax.stats import mean_interval


def _curve(name, times, accuracies, spread=0.0):
    """A curve whose points have the given means; ``spread`` sets the interval half-width."""
    return Curve(
        name,
        tuple(range(1, len(times) + 1)),
        tuple(Estimate(t, t, t, 3) for t in times),
        tuple(Estimate(a, a - spread, a + spread, 3) for a in accuracies),
    )


def test_pareto_front_keeps_only_undominated_points():
    fast = _curve("fast", [1.0, 2.0, 4.0], [0.70, 0.80, 0.85])
    slow = _curve("slow", [2.0, 4.0, 8.0], [0.75, 0.88, 0.90])
    assert curves.pareto_front([fast, slow]) == [
        ("fast", 0),
        ("fast", 1),
        ("slow", 1),
        ("slow", 2),
    ]


def test_winners_by_budget_and_clear_only_when_intervals_separate():
    fast = _curve("fast", [1.0, 2.0, 4.0], [0.70, 0.80, 0.85], spread=0.01)
    slow = _curve("slow", [2.0, 4.0, 8.0], [0.75, 0.88, 0.90], spread=0.01)
    segments = curves.winners([fast, slow])
    assert [(s.start, s.end, s.winner, s.clear) for s in segments] == [
        (1.0, 4.0, "fast", True),
        (4.0, math.inf, "slow", True),
    ]
    text = curves.summary([fast, slow])
    assert text == "1-4 s: fast (clear); from 4 s: slow (clear)"
    # Overlapping intervals: the better mean still leads, but the win is not clear.
    wide = _curve("slow", [2.0, 4.0, 8.0], [0.75, 0.88, 0.90], spread=0.1)
    last = curves.winners([fast, wide])[-1]
    assert last.winner == "slow" and not last.clear and last.tied_with == ("fast",)
    assert "slow ~ fast (tied)" in curves.summary([fast, wide])


def test_a_loss_curve_prefers_lower_values():
    a = Curve(
        "a", (1,), (Estimate(1.0, 1.0, 1.0, 1),), (Estimate(0.5, 0.5, 0.5, 1),), "loss", False
    )
    b = Curve(
        "b", (1,), (Estimate(1.0, 1.0, 1.0, 1),), (Estimate(0.4, 0.4, 0.4, 1),), "loss", False
    )
    assert curves.winners([a, b])[0].winner == "b"
    with pytest.raises(ValueError, match="share one metric"):
        curves.winners([a, _curve("c", [1.0], [0.9])])


def test_curve_from_runs_aggregates_seeds_and_checks_its_input():
    runs = [[{"step": 10, "train_time": 1.0 + s, "test/accuracy": 0.5 + 0.1 * s}] for s in range(3)]
    curve = Curve.from_runs("m", runs)
    assert curve.steps == (10,)
    assert curve.metric[0] == mean_interval([0.5, 0.6, 0.7])
    assert curve.seconds[0].value == pytest.approx(2.0)
    with pytest.raises(ValueError, match="different budgets"):
        Curve.from_runs("m", [runs[0], [{**runs[1][0], "step": 11}]])
    with pytest.raises(ValueError, match="one entry per point"):
        Curve("m", (1, 2), curve.seconds, curve.metric)
    with pytest.raises(ValueError, match="unique"):
        curves.pareto_front([curve, curve])


def test_the_module_docstring_example_runs_and_draws_the_family(tmp_path, monkeypatch):
    """The example of efflax.curves, at a tiny size (budgets of a few steps), as written."""
    from efflax._src import curves as module

    code = module.__doc__.split("::\n", 1)[1]
    code = "\n".join(line[4:] for line in code.splitlines())
    small = code.replace(
        "cycle_end_steps(40, num_cycles=4, warmup_steps=20)",
        "cycle_end_steps(3, num_cycles=2, warmup_steps=2)",
    ).replace(
        "exponential_cyclic_cosine_schedule(1e-2, 40, num_cycles=4, warmup_steps=20)",
        "exponential_cyclic_cosine_schedule(1e-2, 3, num_cycles=2, warmup_steps=2)",
    )
    assert small.count("num_cycles=2") == 2, "the docstring example changed; update this test"
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(small, "curves_example", "exec"), namespace)  # noqa: S102 - our own docstring
    family = namespace["family"]
    assert [c.name for c in family] == ["adam", "sgd"]
    assert all(c.steps == (5, 11) for c in family)
    for c in family:
        assert all(t.value > 0 and t.n == 3 for t in c.seconds)
        assert all(0.0 <= m.low <= m.value <= m.high <= 1.0 for m in c.metric)
        assert np.all(np.diff([t.value for t in c.seconds]) > 0)
    assert (tmp_path / "tradeoff.png").stat().st_size > 0
    assert re.match(r"[\d.]+-[\d.]+ s: |from [\d.]+ s: ", curves.summary(family))


def test_interleaved_runs_advance_in_lockstep_and_time_only_their_steps():
    import jax
    import optax
    from flax import linen as nn

    from efflax.data import Loader
    from efflax.training import TrainState
    from efflax.training import make_train_step

    rng = np.random.default_rng(0)
    arrays = {"x": rng.normal(size=(64, 3)).astype(np.float32)}
    arrays["y"] = arrays["x"] @ np.array([1.0, -2.0, 0.5], np.float32)
    model = nn.Dense(1)

    def loss_fn(params, state, batch, rng):
        prediction = state.apply_fn({"params": params}, batch["x"])[:, 0]
        return jnp.mean((prediction - batch["y"]) ** 2)

    step = make_train_step(loss_fn)
    calls = []

    def make_run(lr, name):
        params = model.init(jax.random.key(0), arrays["x"][:1])["params"]
        state = TrainState.create(
            apply_fn=model.apply, params=params, tx=optax.sgd(lr), rng=jax.random.key(1)
        )

        def eval_fn(state):
            calls.append((name, int(state.step)))
            prediction = state.apply_fn({"params": state.params}, arrays["x"])[:, 0]
            return {"loss": float(jnp.mean((prediction - arrays["y"]) ** 2))}

        return state, step, Loader(arrays, 16, seed=0, epochs=None), eval_fn

    runs = {"slow": make_run(0.01, "slow"), "fast": make_run(0.1, "fast")}
    points = curves.interleaved_cyclic_points(runs, budgets=[3, 8], metric="loss")
    assert calls == [("slow", 3), ("fast", 3), ("slow", 8), ("fast", 8)]
    for name in runs:
        assert [p["step"] for p in points[name]] == [3, 8]
        assert 0 < points[name][0]["train_time"] < points[name][1]["train_time"]
    assert points["fast"][1]["loss"] < points["slow"][1]["loss"]
    family = [
        Curve.from_runs(n, [points[n]], metric="loss", higher_is_better=False) for n in points
    ]
    assert curves.winners(family)[-1].winner == "fast"


def test_interleaved_times_warms_up_rotates_and_repeats():
    calls = []
    fns = {name: (lambda name=name: calls.append(name) or 0, ()) for name in ("a", "b")}
    times = curves.interleaved_times(fns, rounds=3, warmup=1, repeat=2)
    assert "".join(calls) == "aabb" + "bbaa" + "aabb" + "bbaa"
    assert all(len(t) == 3 and len(t.cpu) == 3 and min(t) >= 0 for t in times.values())
    with pytest.raises(ValueError, match="repeat=0"):
        curves.interleaved_times(fns, rounds=1, repeat=0)


# --- bad inputs: a ValueError naming the argument ------------------------------------------------
_FAST = _curve("fast", [1.0, 2.0], [0.7, 0.8])
_POINTS = [{"step": 1, "train_time": 1.0, "test/accuracy": 0.5}]
_RUN = (None, lambda s, b: (s, {}), [1, 2], lambda s: {"test/accuracy": 0.5})

BAD_CURVES = {
    "curve name": (
        lambda: Curve(3, (1,), (Estimate(1, 1, 1, 1),), (Estimate(1, 1, 1, 1),)),
        r"name",
    ),
    "curve steps float": (
        lambda: Curve("a", (1.5,), (Estimate(1, 1, 1, 1),), (Estimate(1, 1, 1, 1),)),
        r"steps",
    ),
    "curve steps str": (
        lambda: Curve("a", "1", (Estimate(1, 1, 1, 1),), (Estimate(1, 1, 1, 1),)),
        r"steps",
    ),
    "curve seconds float": (
        lambda: Curve("a", (1,), (1.0,), (Estimate(1, 1, 1, 1),)),
        r"seconds\[0\]",
    ),
    "curve lengths": (
        lambda: Curve("a", (1, 2), (Estimate(1, 1, 1, 1),), (Estimate(1, 1, 1, 1),)),
        r"steps",
    ),
    "curve higher_is_better": (
        lambda: Curve(
            "a", (1,), (Estimate(1, 1, 1, 1),), (Estimate(1, 1, 1, 1),), higher_is_better=1
        ),
        r"higher_is_better",
    ),
    "from_runs empty": (lambda: Curve.from_runs("a", []), r"run"),
    "from_runs dict": (lambda: Curve.from_runs("a", {"a": _POINTS}), r"runs"),
    "from_runs run empty": (lambda: Curve.from_runs("a", [[]]), r"runs\[0\]"),
    "from_runs point list": (lambda: Curve.from_runs("a", [[[1, 2]]]), r"runs\[0\]\[0\]"),
    "from_runs no metric": (
        lambda: Curve.from_runs("a", [_POINTS], metric="loss"),
        r"runs\[0\]\[0\].*'loss'",
    ),
    "from_runs no time": (lambda: Curve.from_runs("a", [_POINTS], time_key="wall"), r"'wall'"),
    "from_runs no step": (
        lambda: Curve.from_runs("a", [[{"train_time": 1.0, "test/accuracy": 0.5}]]),
        r"'step'",
    ),
    "from_runs step float": (
        lambda: Curve.from_runs("a", [[{**_POINTS[0], "step": 1.5}]]),
        r"step",
    ),
    "from_runs metric str": (
        lambda: Curve.from_runs("a", [[{**_POINTS[0], "test/accuracy": "a"}]]),
        r"test/accuracy",
    ),
    "from_runs budgets differ": (
        lambda: Curve.from_runs("a", [_POINTS, [{**_POINTS[0], "step": 2}]]),
        r"budgets",
    ),
    "best_by str": (lambda: _FAST.best_by("1"), r"seconds"),
    "best_by nan": (lambda: _FAST.best_by(math.nan), r"seconds"),
    "pareto one curve": (lambda: curves.pareto_front(_FAST), r"curves"),
    "pareto empty": (lambda: curves.pareto_front([]), r"curves"),
    "pareto not curves": (lambda: curves.pareto_front([1, 2]), r"curves\[0\]"),
    "pareto duplicate": (lambda: curves.pareto_front([_FAST, _FAST]), r"unique"),
    "winners int": (lambda: curves.winners(3), r"curves"),
    "summary str": (lambda: curves.summary("ab"), r"curves"),
    "plot scale nan": (lambda: curves.plot([_FAST], metric_scale=math.nan), r"metric_scale"),
    "plot scale 0": (lambda: curves.plot([_FAST], metric_scale=0), r"metric_scale"),
    "plot title": (lambda: curves.plot([_FAST], title=3), r"title"),
    "plot path": (lambda: curves.plot([_FAST], path=3), r"path"),
    "cyclic budgets float": (
        lambda: curves.cyclic_points(None, _RUN[1], [1], _RUN[3], budgets=[1.5]),
        r"budgets",
    ),
    "cyclic budgets str": (
        lambda: curves.cyclic_points(None, _RUN[1], [1], _RUN[3], budgets="12"),
        r"budgets",
    ),
    "cyclic budgets int": (
        lambda: curves.cyclic_points(None, _RUN[1], [1], _RUN[3], budgets=3),
        r"budgets",
    ),
    "cyclic budgets bool": (
        lambda: curves.cyclic_points(None, _RUN[1], [1], _RUN[3], budgets=[True]),
        r"budgets",
    ),
    "cyclic budgets order": (
        lambda: curves.cyclic_points(None, _RUN[1], [1], _RUN[3], budgets=[3, 2]),
        r"budgets",
    ),
    "cyclic budgets empty": (
        lambda: curves.cyclic_points(None, _RUN[1], [1], _RUN[3], budgets=[]),
        r"budgets",
    ),
    "cyclic eval_fn": (
        lambda: curves.cyclic_points(None, _RUN[1], [1], None, budgets=[1]),
        r"eval_fn",
    ),
    "cyclic train_step": (
        lambda: curves.cyclic_points(None, None, [1], _RUN[3], budgets=[1]),
        r"train_step",
    ),
    "cyclic loader int": (
        lambda: curves.cyclic_points(None, _RUN[1], 3, _RUN[3], budgets=[1]),
        r"loader",
    ),
    "cyclic loader empty": (
        lambda: curves.cyclic_points(None, _RUN[1], [], _RUN[3], budgets=[1]),
        r"loader",
    ),
    "cyclic metric": (
        lambda: curves.cyclic_points(None, _RUN[1], [1], _RUN[3], budgets=[1], metric=1),
        r"metric",
    ),
    "interleaved runs list": (
        lambda: curves.interleaved_cyclic_points([_RUN], budgets=[1]),
        r"runs",
    ),
    "interleaved runs empty": (lambda: curves.interleaved_cyclic_points({}, budgets=[1]), r"runs"),
    "interleaved run 3": (
        lambda: curves.interleaved_cyclic_points({"a": _RUN[:3]}, budgets=[1]),
        r"runs\['a'\]",
    ),
    "interleaved step": (
        lambda: curves.interleaved_cyclic_points({"a": (None, 1, [1], _RUN[3])}, budgets=[1]),
        r"train_step",
    ),
    "interleaved eval": (
        lambda: curves.interleaved_cyclic_points({"a": (*_RUN[:3], None)}, budgets=[1]),
        r"eval_fn",
    ),
    "interleaved loader int": (
        lambda: curves.interleaved_cyclic_points({"a": (None, _RUN[1], 3, _RUN[3])}, budgets=[1]),
        r"loader",
    ),
    "interleaved loader short": (
        lambda: curves.interleaved_cyclic_points({"a": _RUN}, budgets=[3]),
        r"ran out",
    ),
    "interleaved loader empty": (
        lambda: curves.interleaved_cyclic_points({"a": (None, _RUN[1], [], _RUN[3])}, budgets=[1]),
        r"ran out",
    ),
    "interleaved eval returns": (
        lambda: curves.interleaved_cyclic_points({"a": (*_RUN[:3], lambda s: 1.0)}, budgets=[1]),
        r"eval_fn",
    ),
    "interleaved budgets float": (
        lambda: curves.interleaved_cyclic_points({"a": _RUN}, budgets=[1.9]),
        r"budgets",
    ),
    "timed_call fn": (lambda: curves.timed_call(None), r"fn"),
    "times rounds float": (
        lambda: curves.interleaved_times({"a": (len, ((),))}, rounds=2.5),
        r"rounds",
    ),
    "times rounds 0": (lambda: curves.interleaved_times({"a": (len, ((),))}, rounds=0), r"rounds"),
    "times warmup negative": (
        lambda: curves.interleaved_times({"a": (len, ((),))}, rounds=1, warmup=-1),
        r"warmup",
    ),
    "times repeat str": (
        lambda: curves.interleaved_times({"a": (len, ((),))}, rounds=1, repeat="2"),
        r"repeat",
    ),
    "times rotate int": (
        lambda: curves.interleaved_times({"a": (len, ((),))}, rounds=1, rotate=1),
        r"rotate",
    ),
    "times max_seconds 0": (
        lambda: curves.interleaved_times({"a": (len, ((),))}, rounds=1, max_seconds=0),
        r"max_seconds",
    ),
    "times min_rounds 0": (
        lambda: curves.interleaved_times({"a": (len, ((),))}, rounds=1, min_rounds=0),
        r"min_rounds",
    ),
    "times fns list": (lambda: curves.interleaved_times([len], rounds=1), r"fns"),
    "times fns entry": (lambda: curves.interleaved_times({"a": len}, rounds=1), r"fns\['a'\]"),
    "times fns args": (
        lambda: curves.interleaved_times({"a": (len, "ab")}, rounds=1),
        r"fns\['a'\]",
    ),
    "TimedEval": (lambda: curves.TimedEval(None), r"eval_fn"),
}


@pytest.mark.parametrize("name", sorted(BAD_CURVES))
def test_bad_call_is_refused_naming_the_argument(name):
    call, pattern = BAD_CURVES[name]
    with pytest.raises(ValueError, match=pattern):
        call()


def test_budgets_are_not_truncated():
    with pytest.raises(ValueError, match=r"budgets=99.9 must be an int"):
        curves.interleaved_cyclic_points({"a": _RUN}, budgets=[99.9])
    # Integer-valued numpy and 0-d JAX ints are steps.
    points = curves.interleaved_cyclic_points(
        {"a": (None, _RUN[1], [1, 2], _RUN[3])}, budgets=[np.int64(1), jnp.int32(2)]
    )
    assert [p["step"] for p in points["a"]] == [1, 2]


def _timed_runs(times, qualities, seeds=3, noise=0.0):
    return [
        [
            {"train_time": t, "test/accuracy": q + noise * s}
            for t, q in zip(times, qualities, strict=True)
        ]
        for s in range(seeds)
    ]


def test_time_speedup_is_the_time_ratio_to_the_worse_final_quality():
    slow = _timed_runs([1.0, 2.0, 3.0, 4.0], [0.5, 0.6, 0.7, 0.8])
    fast = _timed_runs([0.5, 1.0, 1.5, 2.0], [0.5, 0.6, 0.7, 0.8])
    estimate = curves.time_speedup({"slow": slow, "fast": fast}, "slow", "fast")
    assert estimate.n == 3
    assert estimate.value == pytest.approx(2.0) and estimate.low == pytest.approx(2.0)
    # The target is the worse final quality (0.75 here), interpolated between budgets: slow
    # reaches it at 3.5 s, fast (ending at 0.75) at its last point, 2 s.
    fast = _timed_runs([0.5, 1.0, 1.5, 2.0], [0.5, 0.6, 0.7, 0.75])
    estimate = curves.time_speedup({"slow": slow, "fast": fast}, "slow", "fast")
    assert estimate.value == pytest.approx(3.5 / 2.0)
    # A loss: lower is better.
    loss = lambda runs: [[{**p, "loss": 1 - p["test/accuracy"]} for p in r] for r in runs]
    estimate = curves.time_speedup(
        {"slow": loss(slow), "fast": loss(fast)},
        "slow",
        "fast",
        metric="loss",
        higher_is_better=False,
    )
    assert estimate.value == pytest.approx(3.5 / 2.0)


def test_time_speedup_interval_resamples_seeds_and_refuses_bad_runs():
    slow = _timed_runs([1.0, 2.0], [0.5, 0.8], seeds=4, noise=0.02)
    fast = _timed_runs([0.6, 1.1], [0.5, 0.8], seeds=4, noise=-0.01)
    estimate = curves.time_speedup({"slow": slow, "fast": fast}, "slow", "fast")
    assert estimate.low < estimate.value < estimate.high and estimate.n == 4
    with pytest.raises(ValueError, match="'medium' is not in runs"):
        curves.time_speedup({"slow": slow, "fast": fast}, "medium", "fast")
    with pytest.raises(ValueError, match="same seeds and budgets"):
        curves.time_speedup({"slow": slow, "fast": fast[:3]}, "slow", "fast")
    with pytest.raises(ValueError, match="has no 'loss'"):
        curves.time_speedup({"slow": slow, "fast": fast}, "slow", "fast", metric="loss")


def test_time_to_reach_interpolates_and_refuses_mismatched_curves():
    assert curves.time_to_reach([1, 2, 3], [0.1, 0.5, 0.9], 0.7) == pytest.approx(2.5)
    assert curves.time_to_reach([1, 2, 3], [0.8, 0.9, 0.95], 0.5) == 1.0
    assert curves.time_to_reach([1, 2, 3], [0.1, 0.2, 0.3], 0.5) == math.inf
    loss = [2.0, 1.0, 0.5]
    assert curves.time_to_reach([10, 20, 30], loss, 0.75, higher_is_better=False) == 25.0
    with pytest.raises(ValueError, match="one equal length"):
        curves.time_to_reach([1, 2], [0.1, 0.2, 0.3], 0.2)


def test_times_on_the_decisive_clock():
    times = curves.Times([0.2, 0.3], [0.4, 0.5])
    assert curves.decisive_clock() == "cpu"  # this suite runs on a CPU host
    assert times.on("cpu") == [0.4, 0.5] and times.on("wall") == [0.2, 0.3]
    with pytest.raises(ValueError, match="clock='gpu'"):
        times.on("gpu")


# --- what a benchmark reports around the timer -------------------------------------------------
def test_times_median_and_min_by_clock():
    times = curves.Times([0.3, 0.1, 0.2, 0.9], [0.6, 0.5, 0.4, 0.7])
    assert times.median() == pytest.approx(0.25) and times.min() == 0.1
    assert times.median("cpu") == pytest.approx(0.55) and times.min("cpu") == 0.4
    with pytest.raises(ValueError, match="no wall times"):
        curves.Times().median()
    with pytest.raises(ValueError, match="clock='gpu'"):
        times.min("gpu")


def test_relative_error_by_norm():
    reference = jnp.array([[3.0, -4.0], [0.0, 0.0]], jnp.bfloat16)
    x = np.array([[3.0, -4.0], [0.0, 1.0]])
    assert curves.relative_error(x, reference) == pytest.approx(1 / 5)  # ||(0,0,0,1)|| / 5
    assert curves.relative_error(x, reference, norm="max") == pytest.approx(1 / 4)
    assert curves.relative_error(2.02, 2.0) == pytest.approx(0.01)
    assert curves.relative_error(np.zeros(3), np.zeros(3)) == 0.0
    assert curves.relative_error(np.ones(3), np.zeros(3)) == math.inf
    with pytest.raises(ValueError, match=r"x.shape=\(3,\)"):
        curves.relative_error(np.ones(3), np.ones(4))
    with pytest.raises(ValueError, match="norm='l1'"):
        curves.relative_error(x, reference, norm="l1")


def test_markdown_table_formats_cells_dashes_and_escapes():
    rows = [[1024, 2.0], [4096, None], ["a|b", "OOM"], [0.5, 1.234]]
    table = curves.markdown_table(["n", "x"], rows, [None, "{:.2f}x"])
    lines = ["| n | x |", "|---|---|", "| 1024 | 2.00x |", "| 4096 | - |", "| a\\|b | OOM |"]
    assert table == "\n".join([*lines, "| 0.5 | 1.23x |"])
    assert curves.markdown_table(["n"], [[0.5]]) == "| n |\n|---|\n| 0.5 |"
    with pytest.raises(ValueError, match=r"rows\[1\] has 1 cells, the header 2"):
        curves.markdown_table(["n", "x"], [[1, 2], [3]])
    with pytest.raises(ValueError, match="formats has 1 entries, the header 2"):
        curves.markdown_table(["n", "x"], [[1, 2]], ["{}"])


def test_program_stats_reports_xla_costs():
    import jax

    x, w = jnp.ones((8, 16)), jnp.ones((16, 4))
    stats = curves.program_stats(jax.jit(lambda x, w: x @ w), x, w)
    assert stats.dots == 1 and stats.flops == 2 * 8 * 16 * 4
    assert stats.bytes_accessed == 4 * (8 * 16 + 16 * 4 + 8 * 4)  # both inputs read, output written
    assert isinstance(stats.temp_bytes, int) and stats.temp_bytes >= 0
    assert stats.optimal_seconds is None  # XLA's CPU backend gives no time estimate
