"""Exponential-period cyclic cosine learning rates.

Portes, Blalock, Stephenson, Frankle, "Fast Benchmarking of Accuracy vs. Training Time with
Cyclic Learning Rates", arXiv:2206.00832, 2022.

Cosine annealing with warm restarts (SGDR) whose period grows geometrically, after an optional
linear warmup: the model at the end of each cycle is nearly as good as one trained with a single
cosine schedule of that total length, so one run draws the whole accuracy-vs-training-time curve.

Step convention (optax's): ``schedule(t)`` is the value used by the update that moves the step
count from ``t`` to ``t + 1``. A cycle of length ``L`` starting at step ``s`` is used by the
updates ``s, ..., s + L - 1``; its cosine would reach ``end_value`` at ``s + L`` (exactly as
``optax.warmup_cosine_decay_schedule(..., decay_steps=N)`` reaches ``end_value`` at ``N``), and
the schedule restarts at ``peak_value`` there. ``cycle_end_steps`` returns these ``s + L``: the
step counts after which the model has finished a cycle and should be evaluated.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import optax

from pallas_kernels import _checks

__all__ = [
    "cycle_end_steps",
    "cycle_lengths",
    "exponential_cyclic_cosine_schedule",
    "tradeoff_points",
]


def cycle_lengths(
    first_cycle_steps: int, *, cycle_multiplier: float = 2.0, num_cycles: int
) -> list[int]:
    """Lengths in steps of the cycles of an exponential cyclic schedule.

    Cycle ``i`` lasts ``first_cycle_steps * cycle_multiplier**i`` steps, rounded to the nearest
    integer with halves rounded up (``floor(x + 0.5)``), so a non-integer multiplier gives the
    same lengths in :func:`exponential_cyclic_cosine_schedule` and :func:`cycle_end_steps`.

    Args:
      first_cycle_steps: length of the first cycle, a positive integer.
      cycle_multiplier: growth factor of the period, a finite number >= 1.
      num_cycles: number of cycles, a positive integer.

    Returns:
      A list of ``num_cycles`` positive integers.

    Example:
      >>> cycle_lengths(10, cycle_multiplier=1.5, num_cycles=4)
      [10, 15, 23, 34]
    """
    first_cycle_steps = _checks.int_at_least("first_cycle_steps", first_cycle_steps, 1)
    num_cycles = _checks.int_at_least("num_cycles", num_cycles, 1)
    # A 0-d JAX/NumPy scalar counts as the number it holds.
    cycle_multiplier = _checks.as_number(cycle_multiplier)
    if _checks.finite_float("cycle_multiplier", cycle_multiplier) < 1:
        raise ValueError(f"{cycle_multiplier=} must be >= 1")
    # Exact integer arithmetic when possible, so that 2**40 * T0 has no float error.
    if float(cycle_multiplier).is_integer():
        return [first_cycle_steps * int(cycle_multiplier) ** i for i in range(num_cycles)]
    return [
        math.floor(first_cycle_steps * float(cycle_multiplier) ** i + 0.5)
        for i in range(num_cycles)
    ]


def _check_warmup(warmup_steps: int, lengths: Sequence[int]) -> int:
    warmup_steps = _checks.int_at_least("warmup_steps", warmup_steps, 0)
    if warmup_steps > sum(lengths):
        raise ValueError(
            f"{warmup_steps=} is longer than the {sum(lengths)} annealing steps of the "
            f"{len(lengths)} cycles it precedes"
        )
    return warmup_steps


def cycle_end_steps(
    first_cycle_steps: int,
    *,
    cycle_multiplier: float = 2.0,
    num_cycles: int,
    warmup_steps: int = 0,
) -> list[int]:
    """Step counts at which the cycles of :func:`exponential_cyclic_cosine_schedule` end.

    Entry ``i`` is ``warmup_steps + sum(cycle_lengths(...)[: i + 1])``: the number of updates
    after which cycle ``i`` is complete (the learning rate of its last update is its minimum, and
    the next update restarts at the peak). These are the budgets at which the model is evaluated
    to draw one point of the accuracy-vs-training-time curve each. The last entry is the length
    of the whole run.

    Args:
      first_cycle_steps: length of the first cycle (after the warmup), a positive integer.
      cycle_multiplier: growth factor of the period, >= 1; lengths are rounded as in
        :func:`cycle_lengths`.
      num_cycles: number of cycles, a positive integer.
      warmup_steps: length of the linear warmup before the first cycle, >= 0 and not longer
        than all the cycles together.

    Returns:
      A strictly increasing list of ``num_cycles`` integers.

    Example:
      >>> cycle_end_steps(8, num_cycles=4, warmup_steps=8)
      [16, 32, 64, 128]
    """
    lengths = cycle_lengths(
        first_cycle_steps, cycle_multiplier=cycle_multiplier, num_cycles=num_cycles
    )
    step = _check_warmup(warmup_steps, lengths)
    ends = []
    for length in lengths:
        step += length
        ends.append(step)
    return ends


def exponential_cyclic_cosine_schedule(
    peak_value: float,
    first_cycle_steps: int,
    *,
    cycle_multiplier: float = 2.0,
    num_cycles: int,
    warmup_steps: int = 0,
    end_value: float = 0.0,
) -> optax.Schedule:
    r"""Cosine annealing with warm restarts whose period grows geometrically.

    With ``W = warmup_steps``, cycle lengths ``L_i`` (:func:`cycle_lengths`) and cycle starts
    ``s_0 = W``, ``s_{i+1} = s_i + L_i``, the value at step ``t`` is

    .. math::
        \eta(t) = \begin{cases}
          P\,t / W & t < W \\
          E + \tfrac12 (P - E) \left(1 + \cos\left(\pi \tfrac{t - s_i}{L_i}\right)\right)
            & s_i \le t < s_i + L_i \\
          E & t \ge s_{n}
        \end{cases}

    where ``P = peak_value`` and ``E = end_value``: every cycle restarts at the peak and anneals
    to ``end_value``, and after the last cycle the value stays at ``end_value``. Built from
    ``optax.linear_schedule``, ``optax.cosine_decay_schedule`` and ``optax.join_schedules``, so it
    is jit-compatible and works with ``optax.inject_hyperparams``. With ``num_cycles=1`` it equals
    ``optax.warmup_cosine_decay_schedule(0, P, W, W + first_cycle_steps, E)``.

    Args:
      peak_value: value at the start of every cycle (and at the end of the warmup), > 0.
      first_cycle_steps: length of the first cycle, a positive integer.
      cycle_multiplier: cycle ``i`` lasts ``first_cycle_steps * cycle_multiplier**i`` steps,
        rounded to the nearest integer (halves up); must be >= 1 (1 gives plain SGDR).
      num_cycles: number of cycles, a positive integer.
      warmup_steps: steps of linear warmup from 0 to ``peak_value`` before the first cycle; >= 0
        and not longer than all the cycles together.
      end_value: value at the end of every cycle, in ``[0, peak_value]``.

    Returns:
      An ``optax.Schedule`` mapping a step count to a value.

    Example:
      >>> schedule = exponential_cyclic_cosine_schedule(0.1, 10, num_cycles=3, warmup_steps=5)
      >>> ends = cycle_end_steps(10, num_cycles=3, warmup_steps=5)  # [15, 35, 75]
      >>> optimizer = optax.inject_hyperparams(optax.sgd)(learning_rate=schedule)
    """
    lengths = cycle_lengths(
        first_cycle_steps, cycle_multiplier=cycle_multiplier, num_cycles=num_cycles
    )
    warmup_steps = _check_warmup(warmup_steps, lengths)
    peak_value = _checks.positive_float("peak_value", peak_value)
    end_value = _checks.finite_float("end_value", end_value)
    if not 0 <= end_value <= peak_value:
        raise ValueError(f"{end_value=} must be in [0, peak_value={peak_value}]")

    peak_value, end_value = float(peak_value), float(end_value)
    schedules: list[optax.Schedule] = []
    boundaries: list[int] = []
    step = 0
    if warmup_steps:
        schedules.append(optax.linear_schedule(0.0, peak_value, warmup_steps))
        step = warmup_steps
        boundaries.append(step)
    for length in lengths:
        # The last cosine piece clamps its count, so it holds end_value after the final cycle.
        schedules.append(
            optax.cosine_decay_schedule(peak_value, length, alpha=end_value / peak_value)
        )
        step += length
        boundaries.append(step)
    return optax.join_schedules(schedules, boundaries[:-1])


def tradeoff_points(
    history: Iterable[Mapping[str, Any]],
    steps: Iterable[int],
    *,
    metric: str = "accuracy",
) -> list[dict[str, float]]:
    """Points of the accuracy-vs-training-time curve from a training history.

    Picks, for each budget in ``steps`` (usually :func:`cycle_end_steps`), the last record of
    ``history`` (as returned or written by ``efflax.training.fit``) with that ``step`` and the
    ``metric`` key, and returns its step, examples seen, wall time and metric value.

    Args:
      history: records with at least ``'step'`` and, for evaluated steps, ``metric``; optional
        ``'examples_seen'`` and ``'wall_time'``.
      steps: the budgets to pick.
      metric: the name of the metric to read.

    Returns:
      One dict per budget, in the order of ``steps``, with keys ``'step'``, ``'examples_seen'``,
      ``'wall_time'`` (``nan`` where the record lacks them) and ``metric``.

    Raises:
      ValueError: if some step of ``steps`` has no record with ``metric``.
    """
    by_step: dict[int, Mapping[str, Any]] = {}
    for record in history:
        if metric in record and "step" in record:
            by_step[int(record["step"])] = record
    points = []
    for step in steps:
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise ValueError(f"steps holds {step!r}; the budgets must be integer step counts")
        step = int(step)
        if step not in by_step:
            raise ValueError(f"{step=} has no record with {metric=} in the history")
        record = by_step[step]
        points.append(
            {
                "step": step,
                "examples_seen": float(record.get("examples_seen", math.nan)),
                "wall_time": float(record.get("wall_time", math.nan)),
                metric: float(record[metric]),
            }
        )
    return points
