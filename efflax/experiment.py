"""Registry of paper-reproduction experiments, run by ``efflax reproduce``.

An experiment is a module in ``experiments/`` (or a user's module named in
``$EFFLAX_EXPERIMENT_MODULES``) that decorates a ``run(out_dir, *, quick)`` function with
:func:`register`. ``run`` writes ``metrics.json`` and at least one PNG into ``out_dir`` and
returns a :class:`Verdict`: the paper's claim next to what this run measured. The pieces an
experiment is made of live in the library: :func:`efflax.training.fit_seeds` trains every seed
and arm as one program, :class:`Claims` turns its estimates into the verdict (and writes
``metrics.json``), :func:`plot_panels` draws the curves, and :mod:`efflax.curves`' timers measure
time (under ``efflax reproduce`` alone on the machine: see :func:`efflax.curves.alone`)::

    @register("my_claim", timing_sensitive=False)
    def run(out_dir, *, quick):
        seeds = fit_seeds(make_state, loss_fn, loader, seeds=range(4), num_steps=300,
                          eval_fn=seeds_eval_fn(test_arrays), eval_every=100)
        claims = Claims()
        accuracy = seeds.estimate("test/accuracy", scale=100)
        claims.check("accuracy", accuracy, 90.0)  # PASS / FAIL / INCONCLUSIVE
        return claims.verdict(out_dir, claim="accuracy >= 90%", measured=accuracy.format(".1f"))
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import dataclasses
import importlib
import json
import math
import os
import pathlib
import pkgutil
import platform
import queue
import select
import signal
import subprocess
import sys
import textwrap
import threading
import time
import traceback
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple
from typing import Protocol

import numpy as np

from efflax._src.plotting import pyplot
from efflax._src.plotting import save_figure
from efflax._src.stats import STATUSES
from efflax._src.stats import Direction
from efflax._src.stats import Estimate
from efflax._src.stats import Status
from efflax._src.stats import combine_statuses
from efflax._src.stats import decide
from efflax._src.stats import mean_interval
from efflax._src.stats import seeds_to_decide
from efflax._src.timing import ALONE_DIR_ENV
from efflax._src.timing import ALONE_PARENT_ENV


@dataclasses.dataclass(frozen=True)
class Verdict:
    """The result of an experiment: the paper's claim, what this run measured, and the decision.

    Attributes:
      claim: the paper's claim, in a few words.
      measured: what this run measured, with intervals.
      status: ``'PASS'`` (the interval supports the claim), ``'FAIL'`` (it contradicts it) or
        ``'INCONCLUSIVE'`` (it straddles the threshold; ``measured`` says how many seeds would
        decide). Use :func:`efflax.stats.decide` to get it from an estimate.
      estimates: the claimed quantities by name (see :class:`efflax.stats.Estimate`).
    """

    claim: str
    measured: str
    status: Status
    estimates: Mapping[str, Estimate] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status={self.status!r} must be one of {STATUSES}")

    @property
    def passed(self) -> bool:
        return self.status == "PASS"

    def line(self) -> str:
        """One line: ``claim: ... | measured: ... | PASS``."""
        return f"claim: {self.claim} | measured: {self.measured} | {self.status}"

    def to_json(self) -> dict[str, Any]:
        return _to_jsonable(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Verdict:
        estimates = {
            name: Estimate(**{**e, "samples": tuple(e.get("samples", ()))})
            for name, e in dict(data.get("estimates", {})).items()
        }
        return cls(data["claim"], data["measured"], data["status"], estimates)


class RunFn(Protocol):
    def __call__(self, out_dir: pathlib.Path, *, quick: bool) -> Verdict: ...


@dataclasses.dataclass(frozen=True)
class Experiment:
    name: str
    run: RunFn
    description: str
    module: str
    cpu_devices: int = 1
    timing_sensitive: bool | str = True


_REGISTRY: dict[str, Experiment] = {}


def register(
    name: str,
    *,
    description: str = "",
    cpu_devices: int = 1,
    timing_sensitive: bool = True,
) -> Callable[[RunFn], RunFn]:
    """Registers ``run`` as the experiment ``name`` (a decorator).

    Args:
      name: the name ``efflax reproduce`` knows it by.
      description: one line for ``efflax list`` (default: the first docstring line).
      cpu_devices: host devices the experiment runs on when the backend is a CPU (a sharded
        experiment asks for 8). Each experiment runs in its own process, so the others keep
        one device: XLA splits a CPU's threads between simulated devices, which slows and
        distorts the timings of single-device experiments.
      timing_sensitive: whether the verdict depends on measured time. ``True``: ``efflax
        reproduce --jobs N`` runs the experiment alone. ``'sections'``: it measures time only
        through :mod:`efflax.curves`' timers (or inside :func:`efflax.curves.alone`), so it
        shares the machine and reproduce pauses the other experiments while it times.
        ``False``: the verdict depends only on steps, losses, accuracies or memory analysis.
    """
    if cpu_devices < 1:
        raise ValueError(f"{cpu_devices=} must be >= 1")
    if timing_sensitive not in (True, False, "sections"):
        raise ValueError(f"{timing_sensitive=} must be True, False or 'sections'")

    def decorator(run: RunFn) -> RunFn:
        existing = _REGISTRY.get(name)
        # `python -m experiments.x` registers once as __main__ and once on discovery.
        modules = {getattr(existing, "module", None), run.__module__}
        if existing is not None and len(modules) > 1 and "__main__" not in modules:
            raise ValueError(f"experiment {name!r} registered twice ({existing.module})")
        doc = description or (run.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = Experiment(name, run, doc, run.__module__, cpu_devices, timing_sensitive)
        return run

    return decorator


def discover() -> dict[str, Experiment]:
    """Imports every experiment module; returns the registry.

    The modules are those of the ``experiments`` package and those named (comma-separated) in
    ``$EFFLAX_EXPERIMENT_MODULES``: a user's own experiments, registered with :func:`register`,
    run and reported by ``efflax reproduce`` like the built-in ones.
    """
    for module in _experiment_modules():
        importlib.import_module(module)
    return dict(sorted(_REGISTRY.items()))


def _experiment_modules() -> list[str]:
    """The modules :func:`discover` imports (found without importing them)."""
    import experiments

    modules = [
        f"experiments.{info.name}"
        for info in pkgutil.iter_modules(experiments.__path__)
        if not info.name.startswith(("_", "bench_"))
    ]
    extra = os.environ.get("EFFLAX_EXPERIMENT_MODULES", "").split(",")
    return modules + [m.strip() for m in extra if m.strip()]


def _to_jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, pathlib.Path):
        return str(value)
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        array = np.asarray(value)
        return array.item() if array.ndim == 0 else array.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _to_jsonable(dataclasses.asdict(value))
    return value


def write_metrics(out_dir: pathlib.Path | str, metrics: Mapping[str, Any]) -> pathlib.Path:
    """Writes ``metrics`` (numpy and JAX values allowed) to ``out_dir/metrics.json``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(_to_jsonable(metrics), indent=2, sort_keys=True) + "\n")
    return path


class Claims:
    """The claims one experiment decides, and the :class:`Verdict` they add up to.

    Each :meth:`check` decides ``estimate <direction> threshold`` with
    :func:`efflax.stats.decide`, keeps the estimate and, when the interval cannot decide, how many
    seeds would (:func:`efflax.stats.seeds_to_decide`). :meth:`require` records a yes/no check
    (an exactness bound, a finite loss). :meth:`report` decides a comparison that is shown but
    not part of the verdict (e.g. "better", where the claim is "at least as good").
    :meth:`verdict` writes ``metrics.json`` (the caller's metrics plus every status, estimate and
    seeds-to-decide) and returns the combined verdict::

        claims = Claims()
        claims.check("lbe_trains", run.estimate("test/lbe/accuracy", scale=100), 30.0)
        return claims.verdict(out_dir, claim="LBE trains", measured="...", metrics={...})
    """

    def __init__(self):
        self.statuses: dict[str, Status] = {}
        self.estimates: dict[str, Estimate] = {}
        self.seeds_to_decide: dict[str, int | None] = {}
        self.reported: dict[str, Status] = {}

    def _name(self, name: str) -> str:
        if not isinstance(name, str) or not name:
            raise ValueError(f"name={name!r} must be a non-empty string")
        if name in self.statuses or name in self.reported or name in self.estimates:
            raise ValueError(f"claim {name!r} decided twice")
        return name

    def check(
        self, name: str, estimate: Estimate, threshold: float, direction: Direction = ">="
    ) -> Status:
        """Decides ``estimate <direction> threshold`` as part of the verdict; returns the status."""
        name = self._name(name)
        status = decide(estimate, threshold, direction=direction)
        self.statuses[name], self.estimates[name] = status, estimate
        if status == "INCONCLUSIVE":
            self.seeds_to_decide[name] = seeds_to_decide(estimate, threshold, direction=direction)
        return status

    def require(self, name: str, ok: bool, estimate: Estimate | None = None) -> Status:
        """A yes/no part of the verdict: PASS if ``ok`` else FAIL (``estimate`` is kept)."""
        name = self._name(name)
        self.statuses[name] = "PASS" if bool(ok) else "FAIL"
        if estimate is not None:
            self.estimates[name] = estimate
        return self.statuses[name]

    def report(
        self, name: str, estimate: Estimate, threshold: float, direction: Direction = ">="
    ) -> Status:
        """Decides a comparison that is reported (``metrics.json``) but not part of the verdict."""
        name = self._name(name)
        self.reported[name] = decide(estimate, threshold, direction=direction)
        self.estimates[name] = estimate
        return self.reported[name]

    def context(self, name: str, estimate: Estimate) -> Estimate:
        """An estimate shown beside the verdict (``metrics.json``, the report's table) that
        decides nothing: what the decided numbers are measured against (a baseline's
        accuracy, an effect in another unit, a deterministic reference)."""
        self.estimates[self._name(name)] = estimate
        return estimate

    @property
    def status(self) -> Status:
        return combine_statuses(list(self.statuses.values()))

    def verdict(
        self,
        out_dir: pathlib.Path | str,
        *,
        claim: str,
        measured: str,
        metrics: Mapping[str, Any] | None = None,
    ) -> Verdict:
        """Writes ``out_dir/metrics.json`` and returns the verdict of every :meth:`check`."""
        if not self.statuses:
            raise ValueError("no claim checked: call check() or require() before verdict()")
        undecided = {k: v for k, v in self.seeds_to_decide.items() if v is not None}
        if undecided:
            measured += f"; seeds to decide: {undecided}"
        write_metrics(
            out_dir,
            {
                **dict(metrics or {}),
                "statuses": self.statuses,
                "reported_statuses": self.reported,
                "seeds_to_decide": self.seeds_to_decide,
                "estimates": self.estimates,
            },
        )
        return Verdict(claim, measured, self.status, dict(self.estimates))


@dataclasses.dataclass(frozen=True)
class Panel:
    """One panel of :func:`plot_panels`: labelled ``(x, y)`` series, axis labels and scales.

    Attributes:
      title: the panel's title.
      series: ``{label: (x, y)}``; a 2-D ``y`` ``[seeds, points]`` plots its seed mean, a ``y``
        of :class:`~efflax.stats.Estimate` their values with their intervals as error bars.
      xlabel, ylabel: axis labels.
      xscale, yscale: ``'linear'``, ``'log'`` or (x only) ``'log2'``: base 2, the x values
        as tick labels.
      hlines: horizontal reference lines (thresholds).
      style: ``{label: matplotlib format string}`` (e.g. ``'--'``); default ``'.-'``.
      intervals: a 2-D ``y`` also shows the 95% interval over seeds of each point
        (:func:`efflax.stats.mean_interval`) as error bars.
    """

    title: str
    series: Mapping[str, tuple[Any, Any]]
    xlabel: str = "step"
    ylabel: str = ""
    xscale: str = "linear"
    yscale: str = "linear"
    hlines: tuple[float, ...] = ()
    style: Mapping[str, str] = dataclasses.field(default_factory=dict)
    intervals: bool = False

    def __post_init__(self):
        if self.xscale not in ("linear", "log", "log2"):
            raise ValueError(f"xscale={self.xscale!r} must be 'linear', 'log' or 'log2'")
        if self.yscale not in ("linear", "log"):
            raise ValueError(f"yscale={self.yscale!r} must be 'linear' or 'log'")


def _plot_series(ax: Any, x: Any, y: Any, fmt: str, label: str, intervals: bool) -> None:
    """One series of a :class:`Panel` (see its ``series`` and ``intervals``)."""
    x = np.asarray(x)
    if len(y) and all(isinstance(e, Estimate) for e in y):
        estimates = list(y)
    else:
        y = np.asarray(y, dtype=np.float64)
        if y.ndim != 2 or not intervals:
            ax.plot(x, y.mean(axis=0) if y.ndim == 2 else y, fmt, label=label)
            return
        estimates = [mean_interval(column) for column in y.T]
    values = np.array([e.value for e in estimates])
    # An interval of one sample is infinite: no bar.
    below = np.array([e.value - e.low if math.isfinite(e.low) else 0.0 for e in estimates])
    above = np.array([e.high - e.value if math.isfinite(e.high) else 0.0 for e in estimates])
    ax.errorbar(x, values, yerr=np.stack([below, above]), fmt=fmt, capsize=3, label=label)


def plot_panels(path: pathlib.Path | str, panels: list[Panel], *, title: str = "") -> pathlib.Path:
    """Saves the panels side by side as one PNG at ``path``; returns ``path``."""
    if not panels:
        raise ValueError("panels=[] : nothing to plot")
    fig, axes = pyplot().subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for label, (x, y) in panel.series.items():
            _plot_series(ax, x, y, panel.style.get(label, ".-"), label, panel.intervals)
        for value in panel.hlines:
            ax.axhline(value, color="gray", lw=0.8, ls=":")
        ax.set_title(textwrap.fill(panel.title, 48), fontsize=10)  # a panel is 4.4 inches wide
        ax.set(xlabel=panel.xlabel, ylabel=panel.ylabel, yscale=panel.yscale)
        if panel.xscale == "log2":
            ticks = sorted({float(v) for x, _ in panel.series.values() for v in np.ravel(x)})
            ax.set_xscale("log", base=2)
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.minorticks_off()
        else:
            ax.set_xscale(panel.xscale)
        ax.grid(alpha=0.3)
        if len(panel.series) > 1:
            ax.legend(fontsize=8)
    return save_figure(fig, path, title=title)


def compilation_cache_dir(out: pathlib.Path | str) -> pathlib.Path:
    """Where ``run_experiments`` keeps JAX's persistent compilation cache: ``$JAX_COMPILATION_CACHE_DIR``
    if set, else ``<out>/.jax_cache`` (shared by every experiment of the run and by later runs
    into the same directory: a program compiled once is loaded, not compiled, the next time)."""
    return pathlib.Path(
        os.environ.get("JAX_COMPILATION_CACHE_DIR") or pathlib.Path(out) / ".jax_cache"
    )


def _use_compilation_cache(cache_dir: pathlib.Path) -> None:
    """This process caches every compiled program in ``cache_dir`` (numerics are unchanged)."""
    import jax

    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def _env_with_host_devices(count: int) -> dict[str, str]:
    """The environment with XLA's host device count set, unless the user already set one."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags and count > 1:
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return env


def _process_env(env: dict[str, str]) -> dict[str, str]:
    """``env`` for an experiment process: plots without a display, and (unless the user set
    glibc tunables) transparent huge pages for large allocations. XLA's CPU runtime allocates
    each execution's temporary buffer afresh; glibc maps one of over 32 MiB from the kernel
    every time, and first touching it in 4 KiB pages costs a page fault each: 28% of
    moe_routing's CPU time in the kernel, 13% with 2 MiB pages. Numerics are unchanged."""
    env.setdefault("MPLBACKEND", "Agg")
    env.setdefault("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
    return env


class Result(NamedTuple):
    """One experiment's outcome in ``run_experiments``: ``verdict`` is None on an error."""

    name: str
    verdict: Verdict | None
    seconds: float
    error: str
    cpu_seconds: float = math.nan  # user + system CPU time of the experiment's process


class _Zygote:
    """A process that has imported JAX, efflax and the experiments' modules, without starting
    JAX's backends, and forks one child per experiment (``efflax.experiment --zygote``).

    A child starts with everything imported: about 2 s of CPU saved per experiment, which is
    what a fresh interpreter spends importing JAX, flax, optax and efflax. It is otherwise the
    process ``python -m efflax.experiment`` would be: its own environment (``XLA_FLAGS`` with
    its ``cpu_devices``, read when its JAX backend starts, after the fork), output and log.
    The zygote is single-threaded when it forks, and reports each child's exit status and CPU
    time (it is their parent; ``wait4``). If importing a module started JAX's backends there,
    it refuses (:meth:`wait_ready` is False) and experiments start as fresh interpreters. It
    starts importing at once, while reproduce gets ready beside it.
    """

    def __init__(self, modules: list[str], env: dict[str, str]):
        self.process = subprocess.Popen(
            [sys.executable, "-m", "efflax.experiment", "--zygote", *modules],
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._forked: queue.Queue[int] = queue.Queue()
        self._exits: dict[int, tuple[int, float]] = {}
        self._lock = threading.Lock()
        self._ready: bool | None = None
        self._ended = threading.Event()  # the zygote's replies have ended
        self.why = ""

    def wait_ready(self) -> bool:
        """Whether it has imported its modules and forks (waits for it the first time)."""
        if self._ready is None:
            first = self.process.stdout.readline().strip()
            self._ready = first == "ready"
            if self._ready:
                threading.Thread(target=self._read, daemon=True).start()
            else:
                self.why = first or "the zygote process exited"
                self.close()
        return self._ready

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                reply = json.loads(line)
            except ValueError:  # not a reply: something the zygote printed
                print(f"[zygote] {line}", end="", flush=True)
                continue
            if "forked" in reply:
                self._forked.put(reply["forked"])
            else:
                with self._lock:
                    self._exits[reply["exited"]] = (reply["code"], reply["cpu"])
        self._ended.set()
        self._forked.put(-1)  # the zygote ended

    def fork(self, argv: list[str], env: dict[str, str], log: pathlib.Path) -> int:
        """Starts ``efflax.experiment <argv>`` as a child with ``env``, output to ``log``."""
        request = {"argv": argv, "env": env, "log": str(log)}
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        pid = self._forked.get(timeout=60)
        if pid < 0:
            raise RuntimeError("the zygote process ended before starting the experiment")
        return pid

    def exit_status(self, pid: int) -> tuple[int, float] | None:
        """``(exit code, CPU seconds)`` of child ``pid`` once it has ended, else None; if the
        zygote itself ended first, a child that is gone counts as failed (its status is lost)."""
        with self._lock:
            status = self._exits.pop(pid, None)
        if status is None and self._ended.is_set():
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return (-1, math.nan)
        return status

    def close(self) -> None:
        """Ends the zygote (after the children it is waiting for)."""
        with contextlib.suppress(OSError):
            self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _zygote_main(modules: list[str]) -> None:
    """The zygote (see :class:`_Zygote`): imports ``modules``, then forks on requests on stdin."""
    from pallas_kernels._compat import backends_initialized

    for module in ["efflax", "efflax.training", "matplotlib.pyplot", *modules]:
        importlib.import_module(module)
    if backends_initialized():
        print("importing the modules started JAX's backends: the children cannot fork", flush=True)
        return
    reply = os.fdopen(os.dup(1), "w", buffering=1)
    print("ready", flush=True)
    children: set[int] = set()
    pending, stdin_open = b"", True
    while stdin_open or children:
        if stdin_open and select.select([0], [], [], 0.02)[0]:
            chunk = os.read(0, 1 << 16)
            stdin_open = bool(chunk)
            pending += chunk
            while b"\n" in pending:
                line, pending = pending.split(b"\n", 1)
                pid = os.fork()
                if pid == 0:
                    reply.close()  # the zygote's channel to reproduce is not the child's
                    _forked_child(json.loads(line))  # never returns
                children.add(pid)
                reply.write(json.dumps({"forked": pid}) + "\n")
        elif not stdin_open:
            time.sleep(0.02)
        for pid in list(children):
            done, status, usage = os.wait4(pid, os.WNOHANG)
            if done:
                children.discard(pid)
                cpu = usage.ru_utime + usage.ru_stime
                code = os.waitstatus_to_exitcode(status)
                reply.write(json.dumps({"exited": pid, "code": code, "cpu": cpu}) + "\n")


def _forked_child(request: dict) -> None:
    """A zygote's child: becomes ``python -m efflax.experiment <argv>``, then exits."""
    code = 1
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdout.reconfigure(line_buffering=True)
        sys.stderr.reconfigure(line_buffering=True)
        os.environ.clear()
        os.environ.update(request["env"])
        _child_main(request["argv"])
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    except BaseException:  # noqa: BLE001 - reported in the log, the exit code says it failed
        traceback.print_exc()
    finally:
        try:
            atexit._run_exitfuncs()  # what a normal interpreter exit runs; os._exit skips it
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


class _Child:
    """One experiment running in its own Python process (forked by a :class:`_Zygote`, or a
    fresh interpreter); output prefixed and kept in ``log.txt``."""

    def __init__(
        self,
        experiment: Experiment,
        exp_dir: pathlib.Path,
        *,
        quick: bool,
        alone_dir: pathlib.Path,
        zygote: _Zygote | None = None,
    ):
        self.experiment = experiment
        self.exp_dir = exp_dir
        self.log = exp_dir / "log.txt"
        self.verdict_path = exp_dir / "verdict.json"
        self.verdict_path.unlink(missing_ok=True)
        argv = [experiment.name, "--out", str(exp_dir)] + (["--quick"] if quick else [])
        argv += ["--cache", str(compilation_cache_dir(exp_dir.parent))]
        argv += ["--module", experiment.module]
        env = _process_env(_env_with_host_devices(experiment.cpu_devices))
        env["PYTHONUNBUFFERED"] = "1"
        env[ALONE_DIR_ENV] = str(alone_dir)
        # Only the direct children of the process that grants turns take part in them.
        parent = zygote.process.pid if zygote is not None else os.getpid()
        env[ALONE_PARENT_ENV] = str(parent)
        self.zygote = zygote
        self.ended = threading.Event()
        self.start = time.perf_counter()
        if zygote is not None:
            self.log.touch()
            self.pid = zygote.fork(argv, env, self.log)
            self.process = None
            self._reader = threading.Thread(target=self._tail, daemon=True)
        else:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "efflax.experiment", *argv],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                errors="replace",
            )
            self.pid = self.process.pid
            self._reader = threading.Thread(target=self._relay, daemon=True)
        self._reader.start()

    def _show(self, line: str) -> None:
        print(f"[{self.experiment.name}] {line}", end="", flush=True)

    def _relay(self) -> None:
        with open(self.log, "w") as log:
            for line in self.process.stdout:
                log.write(line)
                log.flush()
                self._show(line)

    def _tail(self) -> None:
        """Shows the lines the forked child writes to its log, until it has ended."""
        with open(self.log, errors="replace") as log:
            partial = ""
            while True:
                ended = self.ended.is_set()
                partial += log.read()
                *lines, partial = partial.split("\n")
                for line in lines:
                    self._show(line + "\n")
                if ended:
                    if partial:
                        self._show(partial + "\n")
                    return
                time.sleep(0.05)

    def terminate(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, signal.SIGTERM)

    def poll(self) -> Result | None:
        """The result once the process has ended, else None."""
        if self.zygote is not None:
            status = self.zygote.exit_status(self.pid)
            if status is None:
                return None
            code, cpu = status
        else:
            # wait4 rather than Popen.poll: it also reports the CPU time the process used, a
            # cost that other load on a shared machine barely changes (unlike wall time).
            pid, wait_status, usage = os.wait4(self.pid, os.WNOHANG)
            if pid == 0:
                return None
            code = os.waitstatus_to_exitcode(wait_status)
            self.process.returncode = code
            cpu = usage.ru_utime + usage.ru_stime
        self.ended.set()
        self._reader.join()
        seconds = time.perf_counter() - self.start
        if code != 0 or not self.verdict_path.exists():
            error = f"RuntimeError: experiment process exited with code {code} (see log.txt)"
            return Result(self.experiment.name, None, seconds, error, cpu)
        verdict = Verdict.from_json(json.loads(self.verdict_path.read_text()))
        return Result(self.experiment.name, verdict, seconds, "", cpu)


class _Arbiter:
    """Gives one experiment process at a time the machine while it times (see
    :func:`efflax.curves.alone`): the other processes are paused with ``SIGSTOP`` until it is
    done, then resumed with ``SIGCONT``. Requests are served in the order they were made."""

    def __init__(self, directory: pathlib.Path):
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        for stale in self.dir.glob("*.*"):
            stale.unlink()
        self.holder: int | None = None
        self.paused: set[int] = set()

    def update(self, pids: set[int]) -> None:
        """Ends a finished turn and starts the next; ``pids``: the running experiment processes."""
        if self.holder is not None:
            if self.holder in pids and (self.dir / f"{self.holder}.request").exists():
                self._pause(pids - {self.holder})  # a process started since
                return
            (self.dir / f"{self.holder}.request").unlink(missing_ok=True)
            self.resume_all()
            (self.dir / f"{self.holder}.granted").unlink(missing_ok=True)
            self.holder = None
        requests = sorted(self.dir.glob("*.request"), key=lambda p: p.stat().st_mtime_ns)
        for request in requests:
            pid = int(request.stem)
            if pid not in pids:
                request.unlink(missing_ok=True)
                continue
            self._pause(pids - {pid})
            self.holder = pid
            (self.dir / f"{pid}.granted").touch()
            return

    def _pause(self, pids: set[int]) -> None:
        for pid in pids - self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            self.paused.add(pid)

    def resume_all(self) -> None:
        for pid in self.paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
        self.paused.clear()


def _run_in_process(experiment: Experiment, exp_dir: pathlib.Path, *, quick: bool) -> Result:
    start, cpu = time.perf_counter(), time.process_time()
    try:
        verdict, error = experiment.run(exp_dir, quick=quick), ""
    except Exception as e:  # noqa: BLE001 - one failing experiment must not hide the others
        verdict, error = None, f"{type(e).__name__}: {e}"
        traceback.print_exc()
    seconds = time.perf_counter() - start
    return Result(experiment.name, verdict, seconds, error, time.process_time() - cpu)


def _clock(seconds: float) -> str:
    """``'1:05'`` or ``'1:02:03'``."""
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    text = f"{rest // 60}:{rest % 60:02d}"
    return f"{hours}:{text:0>5}" if hours else text


def _timings_path(out: pathlib.Path) -> pathlib.Path:
    return out / "timings.json"


# Seconds per experiment of a `make demo` (see its _note), for the first ETA of a run
# into a fresh directory; a run into a directory with timings.json uses its own last times.
_REFERENCE_TIMES = (
    pathlib.Path(__file__).resolve().parent.parent / "experiments" / "reference_times.json"
)


def _previous_times(out: pathlib.Path, mode: str) -> dict[str, float]:
    """Seconds per experiment of the last run of this mode in ``out`` (for the ETA)."""
    try:
        return {k: float(v) for k, v in json.loads(_timings_path(out).read_text())[mode].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _reference_times(mode: str) -> dict[str, float]:
    """Seconds per experiment of experiments/reference_times.json, by mode."""
    try:
        return {k: float(v) for k, v in json.loads(_REFERENCE_TIMES.read_text())[mode].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _expected_line(
    names: list[str], alone: set[str], previous: dict[str, float], mode: str, jobs: int
) -> str:
    """One line: how long the run should take, and where that number comes from."""
    known, source = previous, "the last run into this directory"
    if not all(n in known for n in names):
        known, source = _reference_times(mode), "experiments/reference_times.json"
    missing = [n for n in names if n not in known]
    if len(missing) == len(names):
        return "expected time: unknown (no earlier run of these experiments)"
    # Timing-sensitive experiments run alone; the others share the machine `jobs` at a time.
    total = sum(known.get(n, 0.0) for n in names if n in alone)
    total += sum(known.get(n, 0.0) for n in names if n not in alone) / max(jobs, 1)
    more = f"; {len(missing)} experiment(s) without a time not counted" if missing else ""
    return f"expected time: about {_clock(total)} (from {source}; more on a busy machine{more})"


def _save_times(out: pathlib.Path, mode: str, results: list[Result]) -> None:
    try:
        data = json.loads(_timings_path(out).read_text())
        if not isinstance(data, dict):
            data = {}
    except (OSError, ValueError):
        data = {}
    data.setdefault(mode, {}).update({r.name: round(r.seconds, 1) for r in results})
    _timings_path(out).write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _eta(pending: list[str], running: dict[str, float], done: list[Result], previous, jobs):
    """Seconds left: each experiment's last recorded time (else the mean so far), over jobs."""
    known = [r.seconds for r in done] or list(previous.values())
    if not known and (pending or running):
        return None
    default = float(np.mean(known)) if known else 0.0
    left = sum(previous.get(n, default) for n in pending)
    left += sum(max(previous.get(n, default) - elapsed, 0.0) for n, elapsed in running.items())
    return left / max(jobs, 1)


def machine_description() -> str:
    """The machine in a few words: CPU model and count, accelerator, JAX version.

    The one description of efflax: reports, experiments and the GPU benchmark tables use it.
    """
    cpu = platform.processor() or platform.machine()
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import jax

    backend = jax.default_backend()
    kinds = sorted({d.device_kind for d in jax.devices()})
    count = jax.device_count()
    accelerator = (
        "no accelerator" if backend == "cpu" else f"{backend}: {count} x {', '.join(kinds)}"
    )
    return (
        f"{os.cpu_count()} CPU cores ({cpu}), {accelerator}; {platform.system()} "
        f"{platform.machine()}, Python {platform.python_version()}, JAX {jax.__version__}"
    )


def _load_average() -> str:
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "n/a"


def _runs_alone(experiment: Experiment) -> bool:
    return experiment.timing_sensitive is True


def _may_start(candidate: Experiment, running: list[Experiment], jobs: int) -> bool:
    """Whether ``candidate`` may start beside ``running``: ``timing_sensitive=True`` ones run
    alone (``'sections'`` ones share the machine: the others are paused while they time)."""
    if not running:
        return True
    if len(running) >= jobs or _runs_alone(candidate):
        return False
    return not any(_runs_alone(e) for e in running)


def run_experiments(
    names: list[str] | None,
    *,
    out: pathlib.Path | str,
    quick: bool,
    isolate: bool = True,
    jobs: int = 1,
) -> list[Result]:
    """Runs experiments by name (all when ``names`` is empty) and writes ``out/REPORT.md``.

    Prints a progress line per experiment (index/total, elapsed time, estimated time left: from
    the times of the last run in ``out`` when there was one, else from the mean so far) and the
    total time at the end.

    Args:
      names: experiments to run; empty or None runs all.
      out: the output directory (one sub-directory per experiment).
      quick: the CPU-minute sizes.
      isolate: run each experiment in its own process (with its ``cpu_devices``); ``False``
        runs them in this process, on whatever devices it has.
      jobs: with ``isolate``, how many experiments may run at once. Experiments registered
        with ``timing_sensitive=True`` run alone; ``'sections'`` ones share the machine, and the
        others are paused while they time (:func:`efflax.curves.alone`).

    Returns:
      A :class:`Result` ``(name, verdict or None on error, seconds, error message)`` per
      experiment, in the order of ``names``.
    """
    if jobs < 1:
        raise ValueError(f"{jobs=} must be >= 1")
    # The zygote imports the experiments' modules while this process does the same.
    zygote = _Zygote(_experiment_modules(), _process_env(dict(os.environ))) if isolate else None
    try:
        registry = discover()
    except BaseException:
        if zygote is not None:
            zygote.close()
        raise
    names = list(names or registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        if zygote is not None:
            zygote.close()
        raise ValueError(f"unknown experiment(s) {unknown}; available: {sorted(registry)}")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    mode = "quick" if quick else "full"
    previous = _previous_times(out, mode)
    machine = machine_description()
    load_before = _load_average()
    total = len(names)
    index = {name: i + 1 for i, name in enumerate(names)}
    print(f"efflax reproduce ({mode}): {total} experiment(s) on {machine}", flush=True)
    alone = {n for n in names if _runs_alone(registry[n])}
    print(_expected_line(names, alone, previous, mode, jobs if isolate else 1), flush=True)
    start = time.perf_counter()
    done: list[Result] = []
    running: dict[str, _Child] = {}
    pending = list(names)
    # Seconds per experiment for the ETA and the order: the last run into `out`, else the
    # reference times (a fresh directory).
    expected = {n: t for n, t in {**_reference_times(mode), **previous}.items() if n in names}
    if isolate and jobs > 1:
        # The experiments that may share the machine first, longest first (fewer idle slots at
        # the end), the ones that run alone after them: no slot waits on one in between.
        pending.sort(key=lambda n: (_runs_alone(registry[n]), -expected.get(n, 0.0)))
    arbiter = _Arbiter(out / ".alone") if isolate else None
    if zygote is not None and not zygote.wait_ready():
        print(f"experiments start as fresh processes: {zygote.why}", flush=True)
        zygote = None

    def progress(text: str, starting: str | None = None) -> None:
        now = time.perf_counter()
        in_flight = {n: now - c.start for n, c in running.items()}
        if starting is not None:
            in_flight[starting] = 0.0
        eta = _eta(pending, in_flight, done, expected, jobs if isolate else 1)
        left = "?" if eta is None else _clock(eta)
        print(f"{text}; elapsed {_clock(now - start)}, ETA {left}", flush=True)

    def finished(result: Result) -> None:
        done.append(result)
        status = result.verdict.status if result.verdict else "ERROR " + result.error
        progress(
            f"--- [{len(done)}/{total}] {result.name}: {status} ({result.seconds:.0f} s, "
            f"CPU {result.cpu_seconds:.0f} s)"
        )

    try:
        while pending or running:
            if isolate:
                while (
                    pending
                    and arbiter.holder is None
                    and _may_start(
                        registry[pending[0]], [c.experiment for c in running.values()], jobs
                    )
                ):
                    name = pending.pop(0)
                    exp_dir = out / name
                    exp_dir.mkdir(parents=True, exist_ok=True)
                    progress(f"=== [{index[name]}/{total}] {name} ({mode}) -> {exp_dir}", name)
                    running[name] = _Child(
                        registry[name], exp_dir, quick=quick, alone_dir=arbiter.dir, zygote=zygote
                    )
                for name, child in list(running.items()):
                    result = child.poll()
                    if result is not None:
                        del running[name]
                        finished(result)
                arbiter.update({c.pid for c in running.values()})
                if running:
                    time.sleep(0.02)
            else:
                name = pending.pop(0)
                exp_dir = out / name
                exp_dir.mkdir(parents=True, exist_ok=True)
                progress(f"=== [{index[name]}/{total}] {name} ({mode}) -> {exp_dir}", name)
                finished(_run_in_process(registry[name], exp_dir, quick=quick))
    finally:  # never leave a paused process behind (an interrupt, an error here)
        if arbiter is not None:
            arbiter.resume_all()
        for child in running.values():
            child.terminate()
        if zygote is not None:
            zygote.close()
    total_seconds = time.perf_counter() - start
    results = sorted(done, key=lambda r: index[r.name])
    print(f"efflax reproduce: {total} experiment(s) in {_clock(total_seconds)}", flush=True)
    _save_times(out, mode, results)
    _write_report(
        out,
        results,
        quick=quick,
        total_seconds=total_seconds,
        machine=machine,
        load=f"{load_before} before, {_load_average()} after",
        jobs=jobs if isolate else 1,
    )
    return results


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _number(x: float) -> str:
    return f"{x:.4g}"


def _estimates_table(estimates: Mapping[str, Estimate]) -> list[str]:
    lines = [
        "| quantity | estimate | 95% interval | n | per seed |",
        "|---|---|---|---|---|",
    ]
    for key, e in estimates.items():
        per_seed = ", ".join(_number(s) for s in e.samples[:12])
        per_seed += ", ..." if len(e.samples) > 12 else ""
        coverage = "" if e.confidence == 0.95 else f" ({100 * e.confidence:g}%)"
        lines.append(
            f"| {_cell(key)} | {_number(e.value)} | [{_number(e.low)}, {_number(e.high)}]"
            f"{coverage} | {e.n} | {per_seed} |"
        )
    return lines


def _write_report(
    out: pathlib.Path,
    results: list[Result],
    *,
    quick: bool,
    total_seconds: float | None = None,
    machine: str | None = None,
    load: str | None = None,
    jobs: int = 1,
) -> pathlib.Path:
    """``out/REPORT.md``: a summary table, then per experiment its verdict, intervals and plots."""
    counts = {
        s: sum(r.verdict is not None and r.verdict.status == s for r in results) for s in STATUSES
    }
    errors = sum(r.verdict is None for r in results)
    summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    summary += f", {errors} ERROR" if errors else ""
    lines = [
        "# efflax reproduction report",
        "",
        f"Mode: {'quick' if quick else 'full'}; generated {time.strftime('%Y-%m-%d %H:%M')}"
        f" by `efflax reproduce{f' --jobs {jobs}' if jobs > 1 else ''}`.",
    ]
    if total_seconds is not None:
        cpu = sum(r.cpu_seconds for r in results if math.isfinite(r.cpu_seconds))  # nan: lost
        lines.append(
            f"Total time: {_clock(total_seconds)} ({total_seconds:.0f} s) for "
            f"{len(results)} experiment(s); CPU time of their processes {_clock(cpu)} "
            f"({cpu:.0f} s)."
        )
    if machine:
        lines.append(f"Machine: {machine}.")
    if load:
        lines.append(f"Load average (1/5/15 min): {load}.")
    lines += [
        f"Verdicts: {summary or 'none'}. PASS: the 95% interval supports the claim; FAIL: it "
        "contradicts it; INCONCLUSIVE: it straddles the threshold.",
        "",
        "| experiment | verdict | time | CPU time | plots |",
        "|---|---|---|---|---|",
    ]
    plots = {r.name: sorted((out / r.name).glob("*.png")) for r in results}
    for r in results:
        status = r.verdict.status if r.verdict else "ERROR"
        links = ", ".join(f"[{p.name}]({r.name}/{p.name})" for p in plots[r.name])
        lines.append(
            f"| [{r.name}](#{r.name}) | {status} | {r.seconds:.0f} s | {r.cpu_seconds:.0f} s "
            f"| {links} |"
        )
    for r in results:
        lines += ["", f'<a id="{r.name}"></a>', ""]
        if r.verdict is None:
            lines += [f"## {r.name}: ERROR ({r.seconds:.0f} s)", "", f"`{_cell(r.error)}`"]
        else:
            v = r.verdict
            lines += [
                f"## {r.name}: {v.status} ({r.seconds:.0f} s)",
                "",
                f"**Claim:** {v.claim}",
                "",
                f"**Measured:** {v.measured}",
            ]
            if v.estimates:
                lines += [""] + _estimates_table(v.estimates)
        for p in plots[r.name]:
            lines += ["", f"![{r.name}: {p.stem}]({r.name}/{p.name})"]
    path = out / "REPORT.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _run_one(
    name: str, exp_dir: pathlib.Path, *, quick: bool, module: str | None = None
) -> Verdict:
    """Runs a registered experiment here and writes its verdict to ``exp_dir/verdict.json``
    (importing only ``module`` when given, else every experiment module)."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    if module and module != "__main__":
        importlib.import_module(module)
    registry = _REGISTRY if name in _REGISTRY else discover()
    verdict = registry[name].run(exp_dir, quick=quick)
    (exp_dir / "verdict.json").write_text(json.dumps(verdict.to_json()) + "\n")
    return verdict


def cli_main(name: str, argv: list[str] | None = None) -> None:
    """``python -m experiments.<name> [--quick] [--out DIR]``: one experiment, like reproduce."""
    parser = argparse.ArgumentParser(description=f"Run the {name} experiment.")
    parser.add_argument("--quick", action="store_true", help="small, CPU-minute size")
    parser.add_argument("--out", default="results", help="output directory")
    args = parser.parse_args(argv)
    os.environ.setdefault("MPLBACKEND", "Agg")
    results = run_experiments([name], out=args.out, quick=args.quick)
    if results[0].verdict is None:
        raise SystemExit(1)


def _child_main(argv: list[str] | None = None) -> None:
    """The process that ``run_experiments`` starts for one experiment."""
    parser = argparse.ArgumentParser(description="Run one experiment in this process.")
    parser.add_argument("name")
    parser.add_argument("--out", required=True, help="the experiment's own output directory")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--cache", help="JAX's persistent compilation cache directory")
    parser.add_argument("--module", help="the module that registers it (else all are imported)")
    args = parser.parse_args(argv)
    if args.cache:
        _use_compilation_cache(pathlib.Path(args.cache))
    verdict = _run_one(args.name, pathlib.Path(args.out), quick=args.quick, module=args.module)
    print(verdict.line(), flush=True)


if __name__ == "__main__":
    # Run as `python -m efflax.experiment`: experiments register into the imported module, not
    # into this `__main__` copy of it.
    from efflax.experiment import _child_main as child_main
    from efflax.experiment import _zygote_main as zygote_main

    if sys.argv[1:2] == ["--zygote"]:
        zygote_main(sys.argv[2:])
    else:
        child_main()
