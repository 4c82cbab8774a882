"""The reproduction report, progress lines and scheduling of ``efflax reproduce`` (no training)."""

import json
import re

import numpy as np
import pytest

from efflax import experiment
from efflax.experiment import Experiment
from efflax.experiment import Result
from efflax.experiment import Verdict
from efflax.stats import decide
from efflax.stats import mean_interval
from efflax.stats import ratio_interval


def _fake_registry(monkeypatch, runs):
    registry = {
        name: Experiment(name, run, f"fake {name}", "tests", 1, sensitive)
        for name, (run, sensitive) in runs.items()
    }
    monkeypatch.setattr(experiment, "discover", lambda: dict(registry))
    return registry


def _png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1])
    fig.savefig(path, dpi=20)
    plt.close(fig)


def _speedup_experiment(out_dir, *, quick):
    speedup = ratio_interval([2.0, 2.2, 1.9, 2.1], [1.0, 1.0, 1.0, 1.0])
    _png(out_dir / "curve.png")
    return Verdict(
        claim="2x faster",
        measured=f"speed-up {speedup}",
        status=decide(speedup, 1.5),
        estimates={"speedup": speedup, "accuracy": mean_interval([0.91, 0.93, 0.92])},
    )


def _undecided_experiment(out_dir, *, quick):
    gap = mean_interval([0.3, -0.2, 0.1])
    return Verdict("a tie", f"gap {gap}", decide(gap, 0.0), {"gap": gap})


def test_report_shows_intervals_and_embeds_plots_beside_each_verdict(tmp_path, monkeypatch, capsys):
    _fake_registry(
        monkeypatch,
        {"fast": (_speedup_experiment, True), "tie": (_undecided_experiment, False)},
    )
    results = experiment.run_experiments(None, out=tmp_path, quick=True, isolate=False)
    assert [r.name for r in results] == ["fast", "tie"]
    assert [r.verdict.status for r in results] == ["PASS", "INCONCLUSIVE"]
    report = (tmp_path / "REPORT.md").read_text()
    assert re.search(r"Total time: 0:0\d \(\d+ s\) for 2 experiment", report)
    assert "Machine: " in report and "CPU cores" in report
    assert "Verdicts: 1 PASS, 1 INCONCLUSIVE." in report
    # The image sits in the experiment's section, right after its intervals.
    section = report.split("## fast: PASS")[1].split("## tie")[0]
    speedup = results[0].verdict.estimates["speedup"]
    row = f"| speedup | {speedup.value:.4g} | [{speedup.low:.4g}, {speedup.high:.4g}] | 4 |"
    assert row in section
    assert "| accuracy | 0.92 | [" in section
    assert "![fast: curve](fast/curve.png)" in section
    assert "## tie: INCONCLUSIVE" in report
    out = capsys.readouterr().out
    assert re.search(r"=== \[1/2\] fast \(quick\) .*; elapsed 0:00, ETA \?", out)
    assert re.search(
        r"--- \[2/2\] tie: INCONCLUSIVE \(\d+ s, CPU \d+ s\); elapsed 0:0\d, ETA 0:00", out
    )
    assert re.search(r"efflax reproduce: 2 experiment\(s\) in 0:0\d", out)


def test_eta_uses_the_previous_run_times(tmp_path, monkeypatch, capsys):
    _fake_registry(
        monkeypatch,
        {"fast": (_speedup_experiment, True), "tie": (_undecided_experiment, True)},
    )
    (tmp_path / "timings.json").write_text('{"quick": {"fast": 30, "tie": 95}}')
    experiment.run_experiments(None, out=tmp_path, quick=True, isolate=False)
    lines = capsys.readouterr().out.splitlines()
    assert (
        lines[1]
        == "expected time: about 2:05 (from the last run into this directory; more on a busy machine)"
    )
    assert lines[2].startswith("=== [1/2] fast") and lines[2].endswith("ETA 2:05")
    # The times of this run replace the old ones.
    assert '"tie": 95' not in (tmp_path / "timings.json").read_text()


def test_expected_time_line_before_the_first_experiment(monkeypatch, tmp_path):
    reference = tmp_path / "reference.json"
    reference.write_text('{"quick": {"a": 60, "b": 40, "c": 20}}')
    monkeypatch.setattr(experiment, "_REFERENCE_TIMES", reference)
    line = experiment._expected_line(["a", "b", "c"], {"a"}, {}, "quick", 2)
    # "a" (timing-sensitive) alone, "b" and "c" side by side: 60 + (40 + 20) / 2.
    assert line.startswith("expected time: about 1:30 (from experiments/reference_times.json")
    line = experiment._expected_line(["a", "d"], set(), {}, "quick", 1)
    assert "about 1:00" in line and "1 experiment(s) without a time not counted" in line
    assert "unknown" in experiment._expected_line(["d"], set(), {}, "quick", 1)


def test_children_share_one_compilation_cache(tmp_path, monkeypatch):
    monkeypatch.delenv("JAX_COMPILATION_CACHE_DIR", raising=False)
    assert experiment.compilation_cache_dir(tmp_path) == tmp_path / ".jax_cache"
    monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path / "mine"))
    assert experiment.compilation_cache_dir(tmp_path) == tmp_path / "mine"


def test_eta_falls_back_to_the_mean_so_far():
    done = [Result("a", None, 10.0, ""), Result("b", None, 30.0, "")]
    assert experiment._eta(["c", "d"], {}, done, {}, 1) == 40.0
    assert experiment._eta(["c", "d"], {"e": 5.0}, done, {"c": 2.0}, 2) == (2 + 20 + 15) / 2
    assert experiment._eta(["a"], {}, [], {}, 1) is None


def test_only_experiments_that_do_not_time_share_the_machine():
    def exp(name, sensitive):
        return Experiment(name, _undecided_experiment, "", "t", 1, sensitive)

    timed, free1, free2 = exp("timed", True), exp("free1", False), exp("free2", False)
    assert experiment._may_start(timed, [], jobs=2)
    assert experiment._may_start(free2, [free1], jobs=2)
    assert not experiment._may_start(free2, [free1], jobs=1)
    assert not experiment._may_start(timed, [free1], jobs=2)
    assert not experiment._may_start(free1, [timed], jobs=2)
    assert not experiment._may_start(free1, [free2, exp("free3", False)], jobs=2)
    with pytest.raises(ValueError, match="jobs=0"):
        experiment.run_experiments([], out="unused", quick=True, jobs=0)


def test_verdict_estimates_survive_the_json_round_trip():
    verdict = _undecided_experiment(None, quick=True)
    again = Verdict.from_json(verdict.to_json())
    assert again == verdict
    assert again.estimates["gap"].samples == pytest.approx((0.3, -0.2, 0.1))
    assert np.isclose(again.estimates["gap"].value, 0.2 / 3)


def test_clock_format():
    assert experiment._clock(5) == "0:05"
    assert experiment._clock(125.4) == "2:05"
    assert experiment._clock(3723) == "1:02:03"


def test_claims_decide_keep_estimates_and_write_metrics(tmp_path):
    claims = experiment.Claims()
    high = mean_interval([40.0, 41.0, 42.0, 40.5])
    wide = mean_interval([5.0, 25.0, 10.0, 20.0])
    assert claims.check("trains", high, 30.0) == "PASS"
    assert claims.check("near", wide, 14.0, "<=") == "INCONCLUSIVE"
    assert claims.report("better", high, 45.0) == "FAIL"  # reported only: not in the verdict
    assert claims.require("exact", True) == "PASS"
    baseline = mean_interval([1.0, 90.0])  # context: shown, decides nothing
    assert claims.context("baseline", baseline) is baseline
    verdict = claims.verdict(tmp_path, claim="c", measured="m", metrics={"config": {"a": 1}})
    assert verdict.status == "INCONCLUSIVE"
    assert set(verdict.estimates) == {"trains", "near", "better", "baseline"}
    assert "seeds to decide" in verdict.measured
    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written["config"] == {"a": 1}
    assert written["statuses"] == {"trains": "PASS", "near": "INCONCLUSIVE", "exact": "PASS"}
    assert written["reported_statuses"] == {"better": "FAIL"}
    assert written["estimates"]["baseline"]["value"] == baseline.value
    assert written["seeds_to_decide"]["near"] > 4
    assert claims.require("broken", False) == "FAIL"
    assert claims.status == "FAIL"


def test_claims_refuse_a_name_twice_and_an_empty_verdict(tmp_path):
    claims = experiment.Claims()
    with pytest.raises(ValueError, match="no claim checked"):
        claims.verdict(tmp_path, claim="c", measured="m")
    claims.check("x", mean_interval([1.0, 2.0]), 0.0)
    with pytest.raises(ValueError, match="'x' decided twice"):
        claims.report("x", mean_interval([1.0, 2.0]), 0.0)
    claims.context("y", mean_interval([1.0, 2.0]))
    with pytest.raises(ValueError, match="'y' decided twice"):
        claims.check("y", mean_interval([1.0, 2.0]), 0.0)


def test_plot_panels_writes_one_png_and_refuses_nothing_to_plot(tmp_path):
    steps = np.arange(5)
    panels = [
        experiment.Panel("a", {"one": (steps, steps**2), "seeds": (steps, np.ones((3, 5)))}),
        experiment.Panel("b", {"x": (steps + 1, steps + 1)}, xscale="log", hlines=(2.0,)),
    ]
    path = experiment.plot_panels(tmp_path / "p.png", panels, title="t")
    assert path.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(ValueError, match="nothing to plot"):
        experiment.plot_panels(tmp_path / "q.png", [])


def test_plot_panels_draws_intervals_and_base_two_ticks(tmp_path, monkeypatch):
    import matplotlib.axes

    drawn = []
    original = matplotlib.axes.Axes.errorbar

    def spy(self, x, y, yerr=None, **kwargs):
        drawn.append((np.asarray(y), np.asarray(yerr)))
        return original(self, x, y, yerr=yerr, **kwargs)

    monkeypatch.setattr(matplotlib.axes.Axes, "errorbar", spy)
    sizes = np.array([256, 512, 1024])
    seeds = np.array([[1.0, 2.0, 3.0], [3.0, 4.0, 5.0]])  # 2 seeds: intervals around 2, 3, 4
    gaps = [mean_interval([0.5, 1.5]), mean_interval([2.0])]  # the second: one sample
    panels = [
        experiment.Panel("a", {"seeds": (sizes, seeds)}, xscale="log2", intervals=True),
        experiment.Panel("b", {"gap": ([1, 2], gaps)}),
    ]
    experiment.plot_panels(tmp_path / "p.png", panels)
    (values, bars), (gap_values, gap_bars) = drawn
    np.testing.assert_allclose(values, [2.0, 3.0, 4.0])
    expected = mean_interval([1.0, 3.0])
    np.testing.assert_allclose(bars[:, 0], [2.0 - expected.low, expected.high - 2.0])
    np.testing.assert_allclose(gap_values, [1.0, 2.0])
    assert gap_bars[0, 1] == 0.0 and gap_bars[1, 1] == 0.0  # infinite interval: no bar
    with pytest.raises(ValueError, match="xscale='log10'"):
        experiment.Panel("c", {}, xscale="log10")
