import re
import subprocess
import sys

import pytest

from efflax import cli
from efflax import experiment


def test_efflax_list_shows_registered_experiments():
    out = subprocess.run(
        [sys.executable, "-m", "efflax.cli", "list"], capture_output=True, text=True, check=True
    ).stdout
    assert "mnist1d_baselines" in out
    assert set(experiment.discover()) >= {"mnist1d_baselines"}


def test_reproduce_quick_writes_report_metrics_and_plots(tmp_path, capsys):
    code = cli.main(["reproduce", "mnist1d_baselines", "--quick", "--out", str(tmp_path)])
    assert code == 0
    report = (tmp_path / "REPORT.md").read_text()
    assert "| mnist1d_baselines |" in report and "PASS" in report
    assert "(mnist1d_baselines/cnn_curves.png)" in report
    assert (tmp_path / "mnist1d_baselines" / "metrics.json").exists()
    assert "claim:" in capsys.readouterr().out


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


def test_a_crashing_experiment_process_is_reported(tmp_path, monkeypatch):
    monkeypatch.setenv("EFFLAX_DATA_DIR", "/dev/null/not-a-dir")  # the child cannot load data
    assert cli.main(["reproduce", "mnist1d_baselines", "--quick", "--out", str(tmp_path)]) == 1
    assert "exited with code 1" in (tmp_path / "REPORT.md").read_text()


def test_verdict_line():
    v = experiment.Verdict(claim="2x faster", measured="2.1x", status="PASS")
    assert v.line() == "claim: 2x faster | measured: 2.1x | PASS"
    with pytest.raises(ValueError, match="registered twice"):
        experiment.register("mnist1d_baselines")(lambda out_dir, *, quick: v)


def test_experiments_get_their_own_host_device_count(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_foo=1")
    env = experiment._env_with_host_devices(8)
    assert env["XLA_FLAGS"] == "--xla_cpu_foo=1 --xla_force_host_platform_device_count=8"
    assert "device_count" not in experiment._env_with_host_devices(1)["XLA_FLAGS"]
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    assert experiment._env_with_host_devices(8)["XLA_FLAGS"].endswith("count=2")
    registry = experiment.discover()
    assert registry["moe_routing"].cpu_devices == 8
    assert registry["mnist1d_baselines"].cpu_devices == 1
    with pytest.raises(ValueError, match="cpu_devices=0"):
        experiment.register("x", cpu_devices=0)


def test_report_cells_escape_pipes(tmp_path):
    verdict = experiment.Verdict(claim="a | b", measured="worst |gap| 0.4\nok", status="PASS")
    experiment._write_report(tmp_path, [("x", verdict, 1.0, "")], quick=True)
    row = (tmp_path / "REPORT.md").read_text().splitlines()[-1]
    cells = re.split(r"(?<!\\)\|", row)[1:-1]
    assert len(cells) == 6 and cells[2].strip() == "worst \\|gap\\| 0.4 ok"
