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

import contextlib
import dataclasses
import os
import pathlib
import re
import time
import warnings
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from pallas_kernels import _checks

ALONE_DIR_ENV = "EFFLAX_ALONE_DIR"
ALONE_PARENT_ENV = "EFFLAX_ALONE_PARENT"  # the pid of the efflax reproduce that grants turns
_GRANT_TIMEOUT_S = 1800.0
_alone_depth = 0


@contextlib.contextmanager
def alone():
    """While inside, this process has the machine to itself under ``efflax reproduce``.

    ``efflax reproduce --jobs N`` runs experiments side by side; an experiment registered with
    ``timing_sensitive='sections'`` times only inside this context (every timer of
    :mod:`efflax.curves` enters it), and reproduce pauses (``SIGSTOP``) every other experiment
    process while it is inside, resuming them (``SIGCONT``) when it leaves. One process at a
    time holds it; the others wait for their turn. Outside ``efflax reproduce`` (no
    ``$EFFLAX_ALONE_DIR``), in a process an experiment started itself, and when nested, it does
    nothing.

    The handshake is two files in ``$EFFLAX_ALONE_DIR``: this process creates
    ``<pid>.request`` and waits for reproduce to create ``<pid>.granted`` (the others are paused
    by then); on exit it removes the request and waits until the grant is withdrawn.
    """
    global _alone_depth
    directory = os.environ.get(ALONE_DIR_ENV)
    if directory and os.environ.get(ALONE_PARENT_ENV) != str(os.getppid()):
        directory = None  # a process the experiment started: reproduce does not know its pid
    if not directory or _alone_depth:
        _alone_depth += 1
        try:
            yield
        finally:
            _alone_depth -= 1
        return
    request = pathlib.Path(directory) / f"{os.getpid()}.request"
    granted = request.with_suffix(".granted")
    request.touch()
    if not _wait_for(granted.exists):
        warnings.warn(
            f"no grant in {_GRANT_TIMEOUT_S:.0f} s from efflax reproduce ({granted}): timing "
            "beside other processes",
            stacklevel=3,
        )
    _alone_depth = 1
    try:
        yield
    finally:
        _alone_depth = 0
        request.unlink(missing_ok=True)
        _wait_for(lambda: not granted.exists())


def _wait_for(condition: Callable[[], bool]) -> bool:
    deadline = time.monotonic() + _GRANT_TIMEOUT_S
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


def timed_call(fn: Callable, *args) -> tuple[object, float, float]:
    """``fn(*args)`` finished (``block_until_ready``); returns ``(out, wall s, CPU s)``."""
    _checks.function("fn", fn)
    wall, cpu = time.perf_counter(), time.process_time()
    out = jax.block_until_ready(fn(*args))
    return out, time.perf_counter() - wall, time.process_time() - cpu


def decisive_clock() -> str:
    """The clock a timing claim is decided on: ``'cpu'`` (this process's CPU time) on a CPU
    host, where other jobs share the cores and wall time mostly measures their load (a step
    spread over several cores counts all of them: compute, not latency); ``'wall'`` on an
    accelerator."""
    return "cpu" if jax.default_backend() == "cpu" else "wall"


class Times(list):
    """Wall seconds per call, one per round (a ``list``), with ``.cpu``: process CPU seconds."""

    def __init__(self, wall=(), cpu=()):
        super().__init__(wall)
        self.cpu: list[float] = list(cpu)

    def on(self, clock: str) -> list[float]:
        """The seconds by ``clock``: ``'cpu'`` or ``'wall'`` (see :func:`decisive_clock`)."""
        if clock not in ("cpu", "wall"):
            raise ValueError(f"clock={clock!r} must be 'cpu' or 'wall'")
        return list(self.cpu) if clock == "cpu" else list(self)


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
    rounds = _checks.int_at_least("rounds", rounds, 1)
    warmup = _checks.int_at_least("warmup", warmup, 0)
    repeat = _checks.int_at_least("repeat", repeat, 1)
    min_rounds = _checks.int_at_least("min_rounds", min_rounds, 1)
    rotate = _checks.boolean("rotate", rotate)
    if max_seconds is not None:
        max_seconds = _checks.positive_float("max_seconds", max_seconds)
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

    def one_round(round_: int) -> None:
        shift = round_ % len(names) if rotate else 0
        for name in names[shift:] + names[:shift]:
            fn, args = fns[name]
            _, wall, cpu = timed_call(lambda: [fn(*args) for _ in range(repeat)][-1])
            if round_ >= warmup:
                times[name].append(wall / repeat)
                times[name].cpu.append(cpu / repeat)

    if warmup:  # the first warm-up round (compilation) beside the other processes
        one_round(0)
    with alone():
        start = time.perf_counter()
        for round_ in range(min(warmup, 1), warmup + rounds):
            one_round(round_)
            done = round_ + 1 - warmup
            if max_seconds is not None and done >= min_rounds:
                if time.perf_counter() - start > max_seconds:
                    break
    return times


def training_step(fn: Callable[..., jax.Array], *, argnums: int | tuple[int, ...] = 0) -> Callable:
    """The work one training step does with ``fn``: forward and backward of a scalar loss.

    Returns ``jit(value_and_grad(loss, argnums))`` with ``loss(*inputs, cotangent) =
    sum(fn(*inputs) * cotangent)`` (in float32). The loss *value* is returned, so XLA cannot drop
    the forward product (``jax.vjp(fn, ...)[1](dy)`` or ``jax.grad`` of a loss linear in the
    output let XLA skip a dense layer's forward while a layer whose backward needs its forward,
    like Monarch's, keeps it: the two sides would time different work). Time both sides of a
    comparison with steps built here, and check with :func:`program_stats` that they kept their
    forward.

    Example:
      >>> step = training_step(lambda x, w: x @ w, argnums=(0, 1))
      >>> loss, (dx, dw) = step(x, w, cotangent)
    """

    def loss(*args):
        *inputs, cotangent = args
        out = fn(*inputs).astype(jnp.float32)
        return jnp.sum(out * cotangent.astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=argnums))


@dataclasses.dataclass(frozen=True)
class ProgramStats:
    """What XLA compiled for one call: its matrix products and its FLOPs.

    Attributes:
      dots: ``dot`` and ``convolution`` instructions in the optimized HLO, fusions and loop
        bodies included (a loop body counts once).
      flops: XLA's own FLOP count of the program (``cost_analysis``; a loop body counts once),
        or None where the backend gives none.
    """

    dots: int
    flops: float | None


def program_stats(jitted: Callable, *args) -> ProgramStats:
    """Compiles ``jitted(*args)`` and counts what it computes (see :class:`ProgramStats`): the
    check that the programs a benchmark compares do the work it claims."""
    compiled = jitted.lower(*args).compile()
    dots = len(re.findall(r"=\s*\S+\s+(?:dot|convolution)\(", compiled.as_text()))
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per program
        cost = cost[0] if cost else None
    flops = cost.get("flops") if cost else None
    return ProgramStats(dots=dots, flops=None if flops is None else float(flops))
