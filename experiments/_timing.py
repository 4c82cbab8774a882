"""Timing shared by the benchmarks: round-robin wall times after a warm-up."""

from __future__ import annotations

import time
from collections.abc import Callable

import jax


def interleaved_times(
    fns: dict[str, tuple[Callable, tuple]], *, rounds: int
) -> dict[str, list[float]]:
    """Wall seconds of ``fn(*args)`` (blocked until ready) per name, over ``rounds`` rounds.

    Each function is called once to warm up; then every round calls each of them once, so that
    load from other processes on a shared machine hits all of them alike and ratios stay
    meaningful.
    """
    for fn, args in fns.values():
        jax.block_until_ready(fn(*args))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, (fn, args) in fns.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            times[name].append(time.perf_counter() - start)
    return times
