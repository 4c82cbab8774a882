"""Registry of paper-reproduction experiments, run by ``efflax reproduce``.

An experiment is a module in ``experiments/`` that decorates a ``run(out_dir, *, quick)``
function with :func:`register`. ``run`` writes ``metrics.json`` and at least one PNG into
``out_dir`` and returns a :class:`Verdict`: the paper's claim next to what this run measured.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import os
import pathlib
import pkgutil
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import Protocol

import numpy as np

from efflax._src.stats import STATUSES
from efflax._src.stats import Estimate
from efflax._src.stats import Status


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


_REGISTRY: dict[str, Experiment] = {}


def register(name: str, *, description: str = "", cpu_devices: int = 1) -> Callable[[RunFn], RunFn]:
    """Registers ``run`` as the experiment ``name`` (a decorator).

    Args:
      name: the name ``efflax reproduce`` knows it by.
      description: one line for ``efflax list`` (default: the first docstring line).
      cpu_devices: host devices the experiment runs on when the backend is a CPU (a sharded
        experiment asks for 8). Each experiment runs in its own process, so the others keep
        one device: XLA splits a CPU's threads between simulated devices, which slows and
        distorts the timings of single-device experiments.
    """
    if cpu_devices < 1:
        raise ValueError(f"{cpu_devices=} must be >= 1")

    def decorator(run: RunFn) -> RunFn:
        existing = _REGISTRY.get(name)
        # `python -m experiments.x` registers once as __main__ and once on discovery.
        modules = {getattr(existing, "module", None), run.__module__}
        if existing is not None and len(modules) > 1 and "__main__" not in modules:
            raise ValueError(f"experiment {name!r} registered twice ({existing.module})")
        doc = description or (run.__doc__ or "").strip().split("\n")[0]
        _REGISTRY[name] = Experiment(name, run, doc, run.__module__, cpu_devices)
        return run

    return decorator


def discover() -> dict[str, Experiment]:
    """Imports every experiment module in the ``experiments`` package; returns the registry."""
    import experiments

    for info in pkgutil.iter_modules(experiments.__path__):
        if info.name.startswith(("_", "bench_")):
            continue
        importlib.import_module(f"experiments.{info.name}")
    return dict(sorted(_REGISTRY.items()))


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
    return value


def write_metrics(out_dir: pathlib.Path | str, metrics: Mapping[str, Any]) -> pathlib.Path:
    """Writes ``metrics`` (numpy and JAX values allowed) to ``out_dir/metrics.json``."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "metrics.json"
    path.write_text(json.dumps(_to_jsonable(metrics), indent=2, sort_keys=True) + "\n")
    return path


def _env_with_host_devices(count: int) -> dict[str, str]:
    """The environment with XLA's host device count set, unless the user already set one."""
    env = dict(os.environ)
    flags = env.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags and count > 1:
        env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    return env


def _run_isolated(experiment: Experiment, exp_dir: pathlib.Path, *, quick: bool) -> Verdict:
    """Runs one experiment in a fresh Python process and reads back its verdict."""
    verdict_path = exp_dir / "verdict.json"
    verdict_path.unlink(missing_ok=True)
    command = [sys.executable, "-m", "efflax.experiment", experiment.name, "--out", str(exp_dir)]
    if quick:
        command.append("--quick")
    env = _env_with_host_devices(experiment.cpu_devices)
    env.setdefault("MPLBACKEND", "Agg")
    code = subprocess.run(command, env=env, check=False).returncode
    if code != 0 or not verdict_path.exists():
        raise RuntimeError(f"experiment process exited with code {code} (its output is above)")
    return Verdict.from_json(json.loads(verdict_path.read_text()))


def run_experiments(
    names: list[str] | None, *, out: pathlib.Path | str, quick: bool, isolate: bool = True
) -> list[tuple[str, Verdict | None, float, str]]:
    """Runs experiments by name (all when ``names`` is empty) and writes ``out/REPORT.md``.

    Args:
      names: experiments to run; empty or None runs all.
      out: the output directory (one sub-directory per experiment).
      quick: the CPU-minute sizes.
      isolate: run each experiment in its own process (with its ``cpu_devices``); ``False``
        runs them in this process, on whatever devices it has.

    Returns:
      ``(name, verdict or None on error, seconds, error message)`` per experiment.
    """
    registry = discover()
    names = list(names or registry)
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown experiment(s) {unknown}; available: {sorted(registry)}")
    out = pathlib.Path(out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for name in names:
        exp_dir = out / name
        exp_dir.mkdir(parents=True, exist_ok=True)
        print(f"=== {name} ({'quick' if quick else 'full'}) -> {exp_dir}", flush=True)
        start = time.perf_counter()
        try:
            if isolate:
                verdict = _run_isolated(registry[name], exp_dir, quick=quick)
            else:
                verdict = registry[name].run(exp_dir, quick=quick)
            error = ""
        except Exception as e:  # noqa: BLE001 - one failing experiment must not hide the others
            verdict, error = None, f"{type(e).__name__}: {e}"
            traceback.print_exc()
        seconds = time.perf_counter() - start
        print(f"--- {name}: {verdict.line() if verdict else 'ERROR ' + error} ({seconds:.0f} s)")
        results.append((name, verdict, seconds, error))
    _write_report(out, results, quick=quick)
    return results


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _write_report(out: pathlib.Path, results, *, quick: bool) -> None:
    lines = [
        "# efflax reproduction report",
        "",
        f"Mode: {'quick' if quick else 'full'}; generated {time.strftime('%Y-%m-%d %H:%M')}"
        f" by `efflax reproduce`.",
        "",
        "| experiment | claim | measured | verdict | time | plots |",
        "|---|---|---|---|---|---|",
    ]
    for name, verdict, seconds, error in results:
        plots = ", ".join(
            f"[{p.name}]({name}/{p.name})" for p in sorted((out / name).glob("*.png"))
        )
        if verdict is None:
            row = f"| {name} | | {_cell(error)} | ERROR | {seconds:.0f} s | {plots} |"
        else:
            status = verdict.status
            row = (
                f"| {name} | {_cell(verdict.claim)} | {_cell(verdict.measured)} | {status} | "
                f"{seconds:.0f} s | {plots} |"
            )
        lines.append(row.replace("\n", " "))
    (out / "REPORT.md").write_text("\n".join(lines) + "\n")


def _run_one(name: str, exp_dir: pathlib.Path, *, quick: bool) -> Verdict:
    """Runs a registered experiment here and writes its verdict to ``exp_dir/verdict.json``."""
    exp_dir.mkdir(parents=True, exist_ok=True)
    verdict = discover()[name].run(exp_dir, quick=quick)
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
    if results[0][1] is None:
        raise SystemExit(1)


def _child_main(argv: list[str] | None = None) -> None:
    """The process that ``run_experiments`` starts for one experiment."""
    parser = argparse.ArgumentParser(description="Run one experiment in this process.")
    parser.add_argument("name")
    parser.add_argument("--out", required=True, help="the experiment's own output directory")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args(argv)
    _run_one(args.name, pathlib.Path(args.out), quick=args.quick)


if __name__ == "__main__":
    # Run as `python -m efflax.experiment`: experiments register into the imported module, not
    # into this `__main__` copy of it.
    from efflax.experiment import _child_main as child_main

    child_main()
