"""Tests for efflax.optim (schedules) (exponential-period cyclic cosine learning rates)."""

import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efflax.optim import cycle_end_steps
from efflax.optim import cycle_lengths
from efflax.optim import exponential_cyclic_cosine_schedule
from efflax.optim import tradeoff_points

# (first_cycle_steps, cycle_multiplier, num_cycles, warmup_steps): odd lengths, multiplier 1
# (plain SGDR), non-integer multipliers that need rounding, one cycle, no warmup.
CONFIGS = [
    (8, 2.0, 4, 8),
    (5, 2, 5, 0),
    (7, 1.5, 4, 3),
    (10, 1.3, 5, 1),
    (6, 1.0, 3, 2),
    (1, 3.0, 4, 0),
    (13, 2.0, 1, 4),
]


def _draw_values(seed):
    rng = np.random.default_rng(int(1000 * seed))
    peak = float(rng.uniform(0.05, 2.0))
    end = float(rng.uniform(0.0, 0.3)) * peak
    return peak, end


def _reference(peak, end, first, mult, num_cycles, warmup, steps):
    """Closed form, written independently of optax: float64, one step at a time."""
    lengths = [math.floor(first * mult**i + 0.5) for i in range(num_cycles)]
    out = []
    for t in steps:
        if t < warmup:
            out.append(peak * t / warmup)
            continue
        start = warmup
        for length in lengths:
            if t < start + length:
                out.append(
                    end + 0.5 * (peak - end) * (1 + math.cos(math.pi * (t - start) / length))
                )
                break
            start += length
        else:
            out.append(end)
    return np.array(out)


def _values(schedule, steps):
    return np.asarray(jax.jit(schedule)(jnp.asarray(steps, jnp.int32)), np.float64)


@pytest.mark.parametrize("config", CONFIGS)
def test_matches_closed_form_everywhere(config):
    first, mult, num_cycles, warmup = config
    peak, end = _draw_values(sum(config))
    schedule = exponential_cyclic_cosine_schedule(
        peak,
        first,
        cycle_multiplier=mult,
        num_cycles=num_cycles,
        warmup_steps=warmup,
        end_value=end,
    )
    total = cycle_end_steps(
        first, cycle_multiplier=mult, num_cycles=num_cycles, warmup_steps=warmup
    )
    steps = np.arange(total[-1] + 7)
    np.testing.assert_allclose(
        _values(schedule, steps),
        _reference(peak, end, first, mult, num_cycles, warmup, steps),
        rtol=2e-6,
        atol=2e-6 * peak,
    )


@pytest.mark.parametrize("config", CONFIGS)
def test_starts_midpoints_and_ends(config):
    first, mult, num_cycles, warmup = config
    peak, end = _draw_values(sum(config) + 1)
    schedule = exponential_cyclic_cosine_schedule(
        peak,
        first,
        cycle_multiplier=mult,
        num_cycles=num_cycles,
        warmup_steps=warmup,
        end_value=end,
    )
    lengths = cycle_lengths(first, cycle_multiplier=mult, num_cycles=num_cycles)
    ends = cycle_end_steps(first, cycle_multiplier=mult, num_cycles=num_cycles, warmup_steps=warmup)
    starts = [warmup] + ends[:-1]
    np.testing.assert_allclose(_values(schedule, starts), peak, rtol=1e-6)
    # Midpoint of every cycle (half-integer steps for odd lengths: schedules take float counts).
    mids = np.array([s + length / 2 for s, length in zip(starts, lengths, strict=True)], np.float32)
    np.testing.assert_allclose(
        np.asarray(jax.jit(schedule)(jnp.asarray(mids))), (peak + end) / 2, rtol=1e-5
    )
    # Just before each cycle end the value approaches end_value (left limit of the cosine).
    before_ends = np.array(ends, np.float32) - 1e-3
    np.testing.assert_allclose(
        np.asarray(jax.jit(schedule)(jnp.asarray(before_ends))), end, rtol=1e-5, atol=1e-5 * peak
    )
    # After the last cycle the value stays at end_value.
    after = np.arange(ends[-1], ends[-1] + 50)
    np.testing.assert_allclose(_values(schedule, after), end, rtol=1e-6, atol=1e-7)
    if warmup:
        halfway = np.asarray(jax.jit(schedule)(jnp.asarray([0.0, warmup / 2], jnp.float32)))
        np.testing.assert_allclose(halfway, [0.0, peak / 2], rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("config", CONFIGS)
def test_continuous_and_decreasing_within_each_cycle(config):
    first, mult, num_cycles, warmup = config
    peak, end = _draw_values(sum(config) + 2)
    schedule = exponential_cyclic_cosine_schedule(
        peak,
        first,
        cycle_multiplier=mult,
        num_cycles=num_cycles,
        warmup_steps=warmup,
        end_value=end,
    )
    lengths = cycle_lengths(first, cycle_multiplier=mult, num_cycles=num_cycles)
    ends = cycle_end_steps(first, cycle_multiplier=mult, num_cycles=num_cycles, warmup_steps=warmup)
    starts = [warmup] + ends[:-1]
    # A fine float grid inside every cycle, evaluated in one jitted call.
    grids = [
        np.linspace(start, start + length, 20 * length, endpoint=False, dtype=np.float32)
        for start, length in zip(starts, lengths, strict=True)
    ]
    all_values = np.asarray(jax.jit(schedule)(jnp.asarray(np.concatenate(grids))), np.float64)
    offsets = np.cumsum([0] + [len(g) for g in grids])
    for i, (grid, length) in enumerate(zip(grids, lengths, strict=True)):
        values = all_values[offsets[i] : offsets[i + 1]]
        steps_apart = np.diff(grid.astype(np.float64))
        # The cosine's slope is at most pi (P - E) / (2 L).
        max_slope = math.pi * (peak - end) / (2 * length)
        assert np.all(np.abs(np.diff(values)) <= max_slope * steps_apart + 1e-6 * peak)
        assert np.all(np.diff(values) <= 1e-6 * peak), "not monotone within a cycle"
        assert values[0] == pytest.approx(peak, rel=1e-6)
    if warmup:
        assert np.all(np.diff(_values(schedule, np.arange(warmup + 1))) > 0)


@pytest.mark.parametrize("config", CONFIGS)
def test_cycle_end_steps_are_the_minima(config):
    first, mult, num_cycles, warmup = config
    peak, end = _draw_values(sum(config) + 3)
    schedule = exponential_cyclic_cosine_schedule(
        peak,
        first,
        cycle_multiplier=mult,
        num_cycles=num_cycles,
        warmup_steps=warmup,
        end_value=end,
    )
    ends = cycle_end_steps(first, cycle_multiplier=mult, num_cycles=num_cycles, warmup_steps=warmup)
    lengths = cycle_lengths(first, cycle_multiplier=mult, num_cycles=num_cycles)
    assert np.diff([warmup] + ends).tolist() == lengths
    steps = np.arange(ends[-1] + 3)
    values = _values(schedule, steps)
    # The last update of every cycle (step e - 1) uses that cycle's minimum, and the value rises
    # (restarts) exactly at the cycle ends and nowhere else after the warmup.
    for start, stop in zip([warmup] + ends[:-1], ends, strict=True):
        assert start + int(np.argmin(values[start:stop])) == stop - 1
    rises = [int(t) for t in steps[warmup:-1] if values[t + 1] > values[t] + 1e-7 * peak]
    # (A one-step cycle is a single update at the peak, so it has no rise.)
    assert rises == [e - 1 for e, length in zip(ends[:-1], lengths[:-1], strict=True) if length > 1]
    assert values[ends[-1]] == pytest.approx(end, abs=1e-7)


def test_single_cycle_equals_optax_warmup_cosine():
    peak, end = _draw_values(11)
    ours = exponential_cyclic_cosine_schedule(peak, 37, num_cycles=1, warmup_steps=9, end_value=end)
    theirs = optax.warmup_cosine_decay_schedule(0.0, peak, 9, 46, end_value=end)
    steps = np.arange(60)
    np.testing.assert_allclose(_values(ours, steps), _values(theirs, steps), rtol=1e-6, atol=1e-7)


def test_jit_and_vmap_match_eager():
    schedule = exponential_cyclic_cosine_schedule(
        0.3, 6, cycle_multiplier=1.5, num_cycles=4, warmup_steps=2, end_value=0.01
    )
    steps = jnp.arange(50, dtype=jnp.int32)
    eager = jnp.stack([schedule(int(t)) for t in range(50)])
    chex.assert_trees_all_close(jax.jit(schedule)(steps), eager, rtol=1e-6)
    chex.assert_trees_all_close(jax.jit(jax.vmap(schedule))(steps), eager, rtol=1e-6)


def test_inject_hyperparams_uses_schedule_value_each_step():
    schedule = exponential_cyclic_cosine_schedule(
        0.5, 4, num_cycles=3, warmup_steps=3, end_value=0.02
    )
    total = cycle_end_steps(4, num_cycles=3, warmup_steps=3)[-1]
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
    key = jax.random.key(0)
    params = {"w": jax.random.normal(key, (5, 3))}
    grads = jax.random.normal(jax.random.fold_in(key, 1), (total, 5, 3))

    @jax.jit
    def run(params):
        def body(carry, grad):
            params, opt_state = carry
            updates, opt_state = tx.update({"w": grad}, opt_state, params)
            lr_used = opt_state.hyperparams["learning_rate"]
            return (optax.apply_updates(params, updates), opt_state), (lr_used, updates["w"])

        return jax.lax.scan(body, (params, tx.init(params)), grads)

    _, (lrs, updates) = run(params)
    expected = _values(schedule, np.arange(total))
    np.testing.assert_allclose(np.asarray(lrs), expected, rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(updates), -expected[:, None, None] * np.asarray(grads), rtol=1e-5, atol=1e-7
    )


def test_cycle_lengths_rounding_is_documented_half_up():
    assert cycle_lengths(10, cycle_multiplier=1.5, num_cycles=4) == [10, 15, 23, 34]  # 22.5 -> 23
    assert cycle_lengths(3, cycle_multiplier=2, num_cycles=4) == [3, 6, 12, 24]
    assert cycle_lengths(4, cycle_multiplier=1.0, num_cycles=3) == [4, 4, 4]
    assert cycle_end_steps(8, num_cycles=4, warmup_steps=8) == [16, 32, 64, 128]
    # Large integer multipliers stay exact.
    assert cycle_end_steps(3, cycle_multiplier=2, num_cycles=60)[-1] == 3 * (2**60 - 1)


def test_tradeoff_points_picks_the_cycle_end_records():
    history = [
        {"step": 10, "examples_seen": 320, "wall_time": 1.0, "loss": 0.5},
        {"step": 16, "examples_seen": 512, "wall_time": 1.5, "accuracy": 0.7},
        {"step": 20, "examples_seen": 640, "wall_time": 2.0, "loss": 0.4},
        {"step": 32, "examples_seen": 1024, "wall_time": 3.0, "accuracy": 0.8},
    ]
    points = tradeoff_points(history, [16, 32])
    assert points == [
        {"step": 16, "examples_seen": 512.0, "wall_time": 1.5, "accuracy": 0.7},
        {"step": 32, "examples_seen": 1024.0, "wall_time": 3.0, "accuracy": 0.8},
    ]
    with pytest.raises(ValueError, match="step=20"):
        tradeoff_points(history, [16, 20])
    with pytest.raises(ValueError, match="steps holds 16.5"):
        tradeoff_points(history, [16.5])  # not silently truncated to step 16


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"first_cycle_steps": 0}, "first_cycle_steps"),
        ({"first_cycle_steps": -3}, "first_cycle_steps"),
        ({"first_cycle_steps": 2.5}, "first_cycle_steps=2.5"),
        ({"first_cycle_steps": True}, "first_cycle_steps=True"),
        ({"num_cycles": 0}, "num_cycles"),
        ({"num_cycles": 2.0}, "num_cycles"),
        ({"cycle_multiplier": 0.9}, "cycle_multiplier"),
        ({"cycle_multiplier": float("inf")}, "cycle_multiplier"),
        ({"cycle_multiplier": float("nan")}, "cycle_multiplier"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup_steps": 8 + 16 + 1}, "warmup_steps"),  # longer than the 2 cycles
        ({"peak_value": 0.0}, "peak_value"),
        ({"peak_value": float("nan")}, "peak_value=nan"),
        ({"peak_value": float("inf")}, "peak_value=inf"),
        ({"end_value": -0.1}, "end_value"),
        ({"end_value": 2.0}, "end_value"),
    ],
)
def test_bad_arguments_raise_naming_the_value(kwargs, name):
    args = {"peak_value": 1.0, "first_cycle_steps": 8, "num_cycles": 2, "warmup_steps": 0}
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        exponential_cyclic_cosine_schedule(
            args.pop("peak_value"), args.pop("first_cycle_steps"), **args
        )
    if not name.startswith(("peak_value", "end_value")):
        args = {"first_cycle_steps": 8, "num_cycles": 2, "warmup_steps": 0}
        args.update({k: v for k, v in kwargs.items()})
        with pytest.raises(ValueError, match=name):
            cycle_end_steps(args.pop("first_cycle_steps"), **args)


def test_warmup_as_long_as_the_cycles_is_allowed():
    assert cycle_end_steps(8, num_cycles=2, warmup_steps=24) == [32, 48]
