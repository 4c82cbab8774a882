"""The one timer of efflax, its experiments and benchmarks: round-robin wall and CPU times.

On a shared machine, load from other processes comes and goes. Timing the functions one after
the other, round by round (and rotating which goes first), exposes all of them to the same load,
so per-round ratios stay meaningful even when absolute times drift. Every sample records both
wall time and this process's CPU time (steadier when other processes compete for the cores).
Beside the timer, what a benchmark needs around it: the check before timing
(:func:`relative_error`, :func:`program_stats`) and the table after (:func:`markdown_table`).

Example:
  >>> times = interleaved_times({"dense": (dense_step, (x,)), "monarch": (mon_step, (x,))},
  ...                           rounds=20)
  >>> times["monarch"].median(), times["monarch"].median("cpu"), times["monarch"].min()
  >>> ratio_interval(times["dense"], times["monarch"])  # paired by round (efflax.stats)
  >>> print(markdown_table(["layer", "ms"], [["monarch", times["monarch"].median() * 1e3]]))
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import pathlib
import re
import statistics
import time
import warnings
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

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

    def median(self, clock: str = "wall") -> float:
        """The median seconds per call by ``clock``: what a benchmark reports."""
        return statistics.median(self._samples(clock))

    def min(self, clock: str = "wall") -> float:
        """The fastest call by ``clock``: the one least disturbed by other load."""
        return min(self._samples(clock))

    def _samples(self, clock: str) -> list[float]:
        samples = self.on(clock)
        if not samples:
            raise ValueError(f"no {clock} times recorded")
        return samples


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


def relative_error(
    x: jax.typing.ArrayLike, reference: jax.typing.ArrayLike, *, norm: str = "l2"
) -> float:
    """How far ``x`` is from ``reference``, relative to the reference's size (in float64).

    Args:
      x: an array (or a scalar) of the same shape as ``reference``.
      reference: what ``x`` should equal.
      norm: ``'l2'``: ``||x - reference|| / ||reference||`` over all entries; ``'max'``: the
        largest absolute difference over the largest absolute reference entry.

    Returns:
      The relative error: 0.0 where both are zero, ``inf`` where only the reference is.

    Example:
      >>> relative_error(jnp.array([1.0, 2.01]), jnp.array([1.0, 2.0]), norm="max")  # 0.005
    """
    if norm not in ("l2", "max"):
        raise ValueError(f"norm={norm!r} must be 'l2' or 'max'")
    x, reference = np.asarray(x, np.float64), np.asarray(reference, np.float64)
    if x.shape != reference.shape:
        raise ValueError(f"x.shape={x.shape} must equal reference.shape={reference.shape}")
    order = np.inf if norm == "max" else None
    error = np.linalg.norm((x - reference).ravel(), order)
    size = np.linalg.norm(reference.ravel(), order)
    if size == 0:
        return 0.0 if error == 0 else float("inf")
    return float(error / size)


def markdown_table(
    header: Sequence[str],
    rows: Iterable[Sequence[object]],
    formats: Sequence[str | None] | None = None,
) -> str:
    """A markdown table: the header, then one line per row.

    Args:
      header: the column titles.
      rows: the rows, each with one cell per column. ``None`` is written ``-`` and a string as
        it is (``'OOM'`` in a column of numbers); a ``|`` inside a cell is escaped.
      formats: per column, a ``str.format`` pattern for its other cells (``'{:.2f}x'``), or
        None for ``str(cell)``; by default ``str`` everywhere.

    Returns:
      The table's lines joined by newlines (no trailing newline).

    Example:
      >>> print(markdown_table(["n", "x"], [[1024, 2.0], [4096, None]], [None, "{:.2f}x"]))
      | n | x |
      |---|---|
      | 1024 | 2.00x |
      | 4096 | - |
    """
    formats = [None] * len(header) if formats is None else list(formats)
    if len(formats) != len(header):
        raise ValueError(f"formats has {len(formats)} entries, the header {len(header)}")

    def text(cell: object, pattern: str | None) -> str:
        if cell is None:
            return "-"
        written = str(cell) if pattern is None or isinstance(cell, str) else pattern.format(cell)
        return written.replace("|", "\\|")

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise ValueError(f"rows[{i}] has {len(row)} cells, the header {len(header)}: {row!r}")
        lines.append("| " + " | ".join(map(text, row, formats)) + " |")
    return "\n".join(lines)


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
    """What XLA compiled for one call: its matrix products, and XLA's own cost estimates.

    Attributes:
      dots: ``dot`` and ``convolution`` instructions in the optimized HLO, fusions and loop
        bodies included (a loop body counts once).
      flops: XLA's own FLOP count of the program (``cost_analysis``; a loop body counts once),
        or None where the backend gives none.
      bytes_accessed: XLA's count of the bytes the program reads and writes, or None.
      optimal_seconds: XLA's time estimate (TPU), or None where the backend gives none. An
        estimate, not a measurement: libtpu adds -1 s for each fusion it cannot estimate.
      temp_bytes: the temporary buffers the program allocates, or None.
    """

    dots: int
    flops: float | None
    bytes_accessed: float | None = None
    optimal_seconds: float | None = None
    temp_bytes: int | None = None


def program_stats(jitted: Callable, *args) -> ProgramStats:
    """Compiles ``jitted(*args)`` and counts what it computes (see :class:`ProgramStats`): the
    check that the programs a benchmark compares do the work it claims.

    ``args`` may be ``jax.ShapeDtypeStruct`` values, with a sharding onto a compile-only device
    (``jax.experimental.topologies``) to ask XLA what the program would cost on that chip.
    """
    compiled = jitted.lower(*args).compile()
    dots = len(re.findall(r"=\s*\S+\s+(?:dot|convolution)\(", compiled.as_text()))
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):  # older JAX: one dict per program
        cost = cost[0] if cost else None
    cost = cost or {}
    memory = compiled.memory_analysis()

    def number(key: str) -> float | None:
        return None if cost.get(key) is None else float(cost[key])

    return ProgramStats(
        dots=dots,
        flops=number("flops"),
        bytes_accessed=number("bytes accessed"),
        optimal_seconds=number("optimal_seconds"),
        temp_bytes=None if memory is None else int(memory.temp_size_in_bytes),
    )
