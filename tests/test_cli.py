import re
import subprocess
import sys

import pytest

from efflax import cli
from efflax import experiment
from efflax.stats import mean_interval


def test_efflax_list_shows_registered_experiments():
    out = subprocess.run(
        [sys.executable, "-m", "efflax.cli", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert "mnist1d_baselines" in out
    assert set(experiment.discover()) >= {"mnist1d_baselines"}


FAKE_EXPERIMENTS = """
import pathlib, sys
from efflax.experiment import Verdict, register, write_metrics
from efflax.stats import decide, mean_interval

def _run(out_dir, *, quick, name):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1])
    fig.savefig(pathlib.Path(out_dir) / "plot.png", dpi=20)
    plt.close(fig)
    accuracy = mean_interval([0.95, 0.96, 0.955] if quick else [0.5])
    write_metrics(out_dir, {"accuracy": accuracy})
    return Verdict("accuracy >= 0.9", f"accuracy {accuracy}", decide(accuracy, 0.9),
                   {"accuracy": accuracy})

@register("fake_a", timing_sensitive=False)
def run_a(out_dir, *, quick):
    return _run(out_dir, quick=quick, name="a")

@register("fake_b", timing_sensitive=False)
def run_b(out_dir, *, quick):
    return _run(out_dir, quick=quick, name="b")

@register("fake_timer", timing_sensitive="sections")
def run_timer(out_dir, *, quick):
    import json, time
    from efflax.curves import alone
    time.sleep(0.6)  # the ticker runs meanwhile
    with alone():
        t0 = time.time()
        time.sleep(1.0)
        t1 = time.time()
    (pathlib.Path(out_dir) / "window.json").write_text(json.dumps([t0, t1]))
    return _run(out_dir, quick=quick, name="timer")

@register("fake_ticker", timing_sensitive=False)
def run_ticker(out_dir, *, quick):
    import json, time
    ticks = []
    for _ in range(500):
        ticks.append(time.time())
        time.sleep(0.004)
    (pathlib.Path(out_dir) / "ticks.json").write_text(json.dumps(ticks))
    return _run(out_dir, quick=quick, name="ticker")

@register("fake_devices", cpu_devices=3, timing_sensitive=False)
def run_devices(out_dir, *, quick):
    import json, os, jax
    seen = {"devices": jax.device_count(), "parent": os.getppid()}
    (pathlib.Path(out_dir) / "seen.json").write_text(json.dumps(seen))
    return _run(out_dir, quick=quick, name="devices")

@register("fake_orphan", timing_sensitive=False)
def run_orphan(out_dir, *, quick):
    import os, signal, time
    parent = pathlib.Path(f"/proc/{os.getppid()}/cmdline").read_bytes()
    if b"--zygote" in parent:  # never the test process itself
        os.kill(os.getppid(), signal.SIGKILL)
    time.sleep(0.5)
    return _run(out_dir, quick=quick, name="orphan")

@register("fake_crash")
def run_crash(out_dir, *, quick):
    sys.exit(3)
"""


@pytest.fixture
def fake_experiments(tmp_path, monkeypatch):
    """Experiments of a user's own module, found through $EFFLAX_EXPERIMENT_MODULES."""
    import os

    modules = tmp_path / "modules"
    modules.mkdir()
    (modules / "efflax_fake_experiments.py").write_text(FAKE_EXPERIMENTS)
    monkeypatch.syspath_prepend(str(modules))
    path = os.environ.get("PYTHONPATH", "")
    monkeypatch.setenv("PYTHONPATH", f"{modules}{os.pathsep}{path}" if path else str(modules))
    # The built-in experiments registered first: imported under the copy below, they would be
    # missing from the registry after this test (their modules stay imported).
    experiment.discover()
    monkeypatch.setenv("EFFLAX_EXPERIMENT_MODULES", "efflax_fake_experiments")
    monkeypatch.setattr(experiment, "_REGISTRY", dict(experiment._REGISTRY))
    monkeypatch.delitem(sys.modules, "efflax_fake_experiments", raising=False)
    return tmp_path / "out"


def test_reproduce_runs_each_experiment_in_its_own_process_two_at_a_time(fake_experiments, capsys):
    out = fake_experiments
    code = cli.main(["reproduce", "fake_a", "fake_b", "--quick", "--jobs", "2", "--out", str(out)])
    assert code == 0
    report = (out / "REPORT.md").read_text()
    assert "## fake_a: PASS" in report and "## fake_b: PASS" in report
    assert "![fake_a: plot](fake_a/plot.png)" in report
    assert "| accuracy | 0.955 | [" in report
    assert "accuracy >= 0.9" in (out / "fake_a" / "log.txt").read_text()
    printed = capsys.readouterr().out
    # Both started before either finished (neither measures time, so they share the machine).
    assert printed.index("=== [2/2] fake_b") < printed.index("--- [1/2]")
    assert "[fake_a] claim: accuracy >= 0.9" in printed
    assert re.search(r"--- \[\d/2\] fake_b: PASS \(\d+ s, CPU \d+ s\)", printed)


def test_other_experiments_are_paused_while_one_times(fake_experiments):
    import json

    out = fake_experiments
    argv = ["reproduce", "fake_timer", "fake_ticker", "--quick", "--jobs", "2", "--out", str(out)]
    assert cli.main(argv) == 0
    t0, t1 = json.loads((out / "fake_timer" / "window.json").read_text())
    ticks = json.loads((out / "fake_ticker" / "ticks.json").read_text())
    # The ticker ran before and after the timed second, and not inside it.
    assert any(t < t0 for t in ticks) and any(t > t1 for t in ticks)
    assert not [t for t in ticks if t0 + 0.05 < t < t1 - 0.05]
    assert not list((out / ".alone").iterdir())  # the handshake files are gone


def test_experiment_processes_fork_from_a_preloaded_zygote_with_their_own_devices(
    fake_experiments, capsys, monkeypatch
):
    import json
    import os

    monkeypatch.setenv("XLA_FLAGS", "")  # the experiment's own count, not the test session's
    out = fake_experiments
    assert cli.main(["reproduce", "fake_devices", "fake_a", "--quick", "--out", str(out)]) == 0
    seen = json.loads((out / "fake_devices" / "seen.json").read_text())
    assert seen["devices"] == 3  # XLA_FLAGS of its own, read after the fork
    assert seen["parent"] != os.getpid()  # a child of the zygote, not of reproduce
    assert "fresh processes" not in capsys.readouterr().out


def test_a_module_that_starts_jax_on_import_gets_fresh_processes(
    fake_experiments, capsys, monkeypatch
):
    import json
    import os
    import pathlib

    modules = pathlib.Path(sys.path[0])
    (modules / "efflax_fake_eager.py").write_text(
        "import jax\n"
        "jax.devices()  # starts JAX's backend on import\n"
        "from efflax_fake_experiments import run_devices\n"
    )
    monkeypatch.setenv("EFFLAX_EXPERIMENT_MODULES", "efflax_fake_experiments,efflax_fake_eager")
    monkeypatch.setenv("XLA_FLAGS", "")
    out = fake_experiments
    assert cli.main(["reproduce", "fake_devices", "--quick", "--out", str(out)]) == 0
    assert "experiments start as fresh processes: importing the modules started JAX" in (
        capsys.readouterr().out
    )
    seen = json.loads((out / "fake_devices" / "seen.json").read_text())
    assert seen == {"devices": 3, "parent": os.getpid()}


def test_alone_outside_reproduce_does_nothing(monkeypatch):
    from efflax.curves import alone

    monkeypatch.delenv("EFFLAX_ALONE_DIR", raising=False)
    with alone(), alone():
        pass


def test_register_refuses_an_unknown_timing_mode():
    with pytest.raises(ValueError, match="timing_sensitive='yes'"):
        experiment.register("x", timing_sensitive="yes")


def test_an_experiment_outliving_its_zygote_is_reported_not_waited_for(fake_experiments):
    out = fake_experiments
    assert cli.main(["reproduce", "fake_orphan", "--quick", "--out", str(out)]) == 1
    assert "## fake_orphan: ERROR" in (out / "REPORT.md").read_text()


def test_a_crashing_experiment_process_is_reported(fake_experiments):
    out = fake_experiments
    assert cli.main(["reproduce", "fake_crash", "--out", str(out)]) == 1
    report = (out / "REPORT.md").read_text()
    assert "## fake_crash: ERROR" in report and "exited with code 3" in report


def test_reproduce_unknown_name_is_an_error(tmp_path):
    assert cli.main(["reproduce", "no_such_experiment", "--out", str(tmp_path)]) == 2


def test_a_failing_experiment_is_reported_not_hidden(tmp_path, monkeypatch):
    def broken(out_dir, *, quick):
        raise RuntimeError("boom")

    monkeypatch.setitem(
        experiment._REGISTRY, "broken", experiment.Experiment("broken", broken, "", "t")
    )
    monkeypatch.setattr(experiment, "discover", lambda: dict(experiment._REGISTRY))
    results = experiment.run_experiments(["broken"], out=tmp_path, quick=True, isolate=False)
    assert results[0][1] is None
    assert "RuntimeError: boom" in (tmp_path / "REPORT.md").read_text()


def test_verdict_line():
    v = experiment.Verdict(claim="2x faster", measured="2.1x", status="PASS")
    assert v.line() == "claim: 2x faster | measured: 2.1x | PASS"
    experiment.discover()
    with pytest.raises(ValueError, match="registered twice"):
        experiment.register("mnist1d_baselines")(lambda out_dir, *, quick: v)


def test_experiments_get_their_own_host_device_count(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    env = experiment._env_with_host_devices(8)
    assert env["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"
    assert "device_count" not in experiment._env_with_host_devices(1)["XLA_FLAGS"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert experiment._env_with_host_devices(8)["XLA_FLAGS"].endswith("count=2")
    assert experiment.discover()["mnist1d_baselines"].cpu_devices == 1
    monkeypatch.setattr(experiment, "_REGISTRY", dict(experiment._REGISTRY))
    experiment.register("sharded", cpu_devices=8)(lambda out_dir, *, quick: None)
    assert experiment._REGISTRY["sharded"].cpu_devices == 8
    with pytest.raises(ValueError, match="cpu_devices=0"):
        experiment.register("x", cpu_devices=0)


def test_report_cells_escape_pipes(tmp_path):
    estimate = mean_interval([0.1, 0.2])
    verdict = experiment.Verdict(
        claim="a | b", measured="worst |gap| 0.4", status="PASS", estimates={"|gap|": estimate}
    )
    experiment._write_report(tmp_path, [experiment.Result("x", verdict, 1.0, "")], quick=True)
    rows = [r for r in (tmp_path / "REPORT.md").read_text().splitlines() if "gap" in r]
    row = next(r for r in rows if r.startswith("|"))
    cells = re.split(r"(?<!\\)\|", row)[1:-1]
    assert len(cells) == 5 and cells[0].strip() == "\\|gap\\|"


def test_every_experiment_module_imports_without_starting_jax():
    """Else the zygote refuses and every experiment pays for importing JAX again."""
    code = (
        "import importlib\n"
        "from efflax.experiment import _experiment_modules\n"
        "from pallas_kernels._compat import backends_initialized\n"
        "for module in _experiment_modules():\n"
        "    importlib.import_module(module)\n"
        "print(backends_initialized())\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True
    )
    assert done.stdout.strip().splitlines()[-1] == "False"
