"""The one timer of efflax, its experiments and benchmarks: round-robin wall and CPU times.

On a shared machine, load from other processes comes and goes. Timing the functions one after
the other, round by round (and rotating which goes first), exposes all of them to the same load,
so per-round ratios stay meaningful even when absolute times drift. Every sample records both
wall time and this process's CPU time (steadier when other processes compete for the cores).

Example:
  >>> times = interleaved_times({"dense": (dense_step, (x,)), "monarch": (mon_step, (x,))},
  ...                           rounds=20)
  >>> statistics.median(times["monarch"]), statistics.median(times["monarch"].cpu)
  >>> ratio_interval(times["dense"], times["monarch"])  # paired by round (efflax.stats)
"""

from __future__ import annotations

import time
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence

import jax

from efflax._src import _validate
from pallas_kernels import _checks


def timed_call(fn: Callable, *args) -> tuple[object, float, float]:
    """``fn(*args)`` finished (``block_until_ready``); returns ``(out, wall s, CPU s)``."""
    _checks.function("fn", fn)
    wall, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - wall, time.process_time() - cpu


class Times(list):
    """Wall seconds per call, one per round (a ``list``), with ``.cpu``: process CPU seconds."""

    def __init__(self, wall=(), cpu=()):
        super().__init__(wall)
        self.cpu: list[float] = list(cpu)


def interleaved_times(
    fns: dict[str, tuple[Callable, tuple]],
    *,
    rounds: int,
    warmup: int = 1,
    repeat: int = 1,
    rotate: bool = True,
    max_seconds: float | None = None,
    min_rounds: int = 3,
) -> dict[str, Times]:
    """Seconds per call of ``fn(*args)`` (blocked until ready) per name, round-robin.

    Args:
      fns: name -> (function, arguments). A stateful step (a train step that donates its
        state) is passed as a closure that keeps its own state.
      rounds: timed rounds; every round calls each function ``repeat`` times.
      warmup: untimed rounds first (compilation, caches).
      repeat: calls per sample; the sample is their mean (for functions of a few microseconds).
      rotate: rotate the order every round, so that no function always runs first.
      max_seconds: stop after the round in which this much time has passed (but not before
        ``min_rounds`` rounds).
      min_rounds: see ``max_seconds``.

    Returns:
      name -> :class:`Times` (wall seconds per call, one per round, with ``.cpu``).
    """
    rounds = _validate.int_at_least("rounds", rounds, 1)
    warmup = _validate.int_at_least("warmup", warmup, 0)
    repeat = _validate.int_at_least("repeat", repeat, 1)
    min_rounds = _validate.int_at_least("min_rounds", min_rounds, 1)
    rotate = _checks.boolean("rotate", rotate)
    if max_seconds is not None:
        max_seconds = _validate.positive_float("max_seconds", max_seconds)
    if not isinstance(fns, Mapping) or not fns:
        raise ValueError(f"fns must be a non-empty dict name -> (fn, args), got {fns!r}")
    for name, entry in fns.items():
        if (
            not isinstance(entry, Sequence)
            or len(entry) != 2
            or not callable(entry[0])
            or not isinstance(entry[1], Sequence)
            or isinstance(entry[1], str | bytes)
        ):
            raise ValueError(f"fns[{name!r}]={entry!r} must be (function, tuple of arguments)")
    names = list(fns)
    times = {name: Times() for name in names}
    start = time.perf_counter()
    for round_ in range(warmup + rounds):
        shift = round_ % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            fn, args = fns[name]
            _, wall, cpu = timed_call(lambda: [fn(*args) for _ in range(repeat)][-1])
            if round_ >= warmup:
                times[name].append(wall / repeat)
                times[name].cpu.append(cpu / repeat)
        done = round_ + 1 - warmup
        if max_seconds is not None and done >= min_rounds:
            if time.perf_counter() - start > max_seconds:
                break
    return times
