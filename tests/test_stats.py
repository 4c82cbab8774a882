"""Intervals and verdicts on known distributions: a clear win, a clear loss, a tie."""

import math

import numpy as np
import pytest
from scipy import stats as scipy_stats

from efflax.experiment import Verdict
from efflax.stats import Estimate
from efflax.stats import bootstrap_interval
from efflax.stats import combine_statuses
from efflax.stats import decide
from efflax.stats import mean_interval
from efflax.stats import paired_difference
from efflax.stats import ratio_interval
from efflax.stats import seeds_to_decide


def test_mean_interval_matches_the_t_formula():
    x = np.array([1.0, 2.0, 4.0, 3.5, 2.5])
    est = mean_interval(x)
    half = scipy_stats.t.ppf(0.975, 4) * x.std(ddof=1) / np.sqrt(5)
    np.testing.assert_allclose(
        [est.value, est.low, est.high], [x.mean(), x.mean() - half, x.mean() + half]
    )
    assert est.n == 5 and est.samples == tuple(x)


def test_interval_covers_the_true_mean_about_95_percent_of_the_time():
    rng = np.random.default_rng(0)
    covered = [
        (e := mean_interval(rng.normal(3.0, 2.0, size=5))).low <= 3.0 <= e.high for _ in range(2000)
    ]
    assert 0.93 < np.mean(covered) < 0.97


@pytest.mark.parametrize(
    ("shift", "expected"), [(2.0, "PASS"), (-2.0, "FAIL"), (0.0, "INCONCLUSIVE")]
)
def test_decide_win_loss_tie(shift, expected):
    rng = np.random.default_rng(1)
    a = rng.normal(10.0, 1.0, size=8)
    b = a - shift + rng.normal(0.0, 0.3, size=8)  # paired runs
    est = paired_difference(a, b)
    assert decide(est, 0.0, direction=">=") == expected


def test_decide_directions_and_within():
    est = Estimate(1.0, 0.5, 1.5, 5)
    assert decide(est, 0.4) == "PASS" and decide(est, 1.6) == "FAIL"
    assert decide(est, 1.0) == "INCONCLUSIVE"
    assert decide(est, 1.6, direction="<=") == "PASS" and decide(est, 0.4, direction="<=") == "FAIL"
    assert decide(Estimate(0.1, -0.2, 0.3, 4), 0.5, direction="within") == "PASS"
    assert decide(Estimate(0.9, 0.7, 1.1, 4), 0.5, direction="within") == "FAIL"
    assert decide(Estimate(0.4, 0.2, 0.6, 4), 0.5, direction="within") == "INCONCLUSIVE"
    with pytest.raises(ValueError, match="direction='>'"):
        decide(est, 0.0, direction=">")


def test_ratio_interval_is_symmetric_on_the_log_scale():
    num = np.array([2.0, 2.2, 1.8, 2.1])
    den = np.ones(4)
    est = ratio_interval(num, den)
    assert est.low < est.value < est.high
    np.testing.assert_allclose(est.value, np.exp(np.mean(np.log(num))))
    np.testing.assert_allclose(
        np.log(est.high) - np.log(est.value), np.log(est.value) - np.log(est.low)
    )
    unpaired = ratio_interval(num, [1.0, 1.1, 0.9], paired=False)
    assert unpaired.low < unpaired.value < unpaired.high
    with pytest.raises(ValueError, match="positive"):
        ratio_interval([1.0, -1.0], [1.0, 1.0])


def test_seeds_to_decide_grows_as_the_gap_shrinks():
    rng = np.random.default_rng(2)
    noise = rng.normal(0, 1, size=4)
    noise -= noise.mean()
    far = seeds_to_decide(mean_interval(1.0 + noise), 0.0)
    near = seeds_to_decide(mean_interval(0.3 + noise), 0.0)
    assert far is not None and near is not None and near > far
    assert seeds_to_decide(mean_interval([1.0]), 0.0) is None


def test_bootstrap_and_bad_inputs():
    est = bootstrap_interval([1.0, 2.0, 3.0, 4.0], seed=0)
    assert est.low <= 2.5 <= est.high
    for bad in ([], [1.0, float("nan")]):
        with pytest.raises(ValueError):
            mean_interval(bad)
    with pytest.raises(ValueError, match="confidence"):
        mean_interval([1.0, 2.0], confidence=1.0)
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1.0], [1.0, 2.0])


def test_combine_and_verdict_round_trip():
    assert combine_statuses(["PASS", "PASS"]) == "PASS"
    assert combine_statuses(["PASS", "INCONCLUSIVE"]) == "INCONCLUSIVE"
    assert combine_statuses(["INCONCLUSIVE", "FAIL"]) == "FAIL"
    verdict = Verdict("c", "m", "INCONCLUSIVE", {"speedup": ratio_interval([2.0, 1.5], [1.0, 1.0])})
    assert Verdict.from_json(verdict.to_json()) == verdict
    assert not verdict.passed
    with pytest.raises(ValueError, match="status='OK'"):
        Verdict("c", "m", "OK")


def test_one_run_decides_nothing_unless_the_quantity_is_exact():
    # One seed carries no spread: every interval built from it is unbounded, so however far the
    # value is from the threshold the verdict is INCONCLUSIVE.
    for est in (
        mean_interval([5.0]),
        paired_difference([5.0], [0.0]),
        bootstrap_interval([5.0]),
        ratio_interval([10.0], [1.0]),
        ratio_interval([10.0], [1.0, 2.0], paired=False),
    ):
        assert est.n == 1 and not np.isfinite(est.high), est
        assert decide(est, 1.0) == "INCONCLUSIVE"
        assert decide(est, 1.0, direction="<=") == "INCONCLUSIVE"
    assert "inf" in mean_interval([5.0]).format()
    # A deterministic quantity is exact and is decided.
    assert decide(Estimate(5.0, 5.0, 5.0, 1), 1.0) == "PASS"


# --- bad inputs: a ValueError naming the argument ------------------------------------------------
_E = Estimate(1.0, 0.5, 1.5, 3, samples=(0.5, 1.0, 1.5))

BAD_STATS = {
    "estimate value str": (lambda: Estimate("1", 0, 2, 3), r"value"),
    "estimate value bool": (lambda: Estimate(True, 0, 2, 3), r"value"),
    "estimate low nan": (lambda: Estimate(1.0, float("nan"), 2, 3), r"low"),
    "estimate high None": (lambda: Estimate(1.0, 0.0, None, 3), r"high"),
    "estimate n 0": (lambda: Estimate(1.0, 0.0, 2.0, 0), r"\bn=0"),
    "estimate n float": (lambda: Estimate(1.0, 0.0, 2.0, 3.0), r"\bn=3.0"),
    "estimate n bool": (lambda: Estimate(1.0, 0.0, 2.0, True), r"\bn=True"),
    "estimate confidence 1": (lambda: Estimate(1.0, 0.0, 2.0, 3, 1.0), r"confidence"),
    "estimate outside": (lambda: Estimate(3.0, 0.0, 2.0, 3), r"interval"),
    "estimate samples str": (lambda: Estimate(1.0, 0.0, 2.0, 3, samples="abc"), r"samples"),
    "estimate samples nan": (
        lambda: Estimate(1.0, 0.0, 2.0, 3, samples=(1.0, math.nan)),
        r"samples\[1\]",
    ),
    "mean samples empty": (lambda: mean_interval([]), r"samples"),
    "mean samples str": (lambda: mean_interval("123"), r"samples"),
    "mean samples None": (lambda: mean_interval(None), r"samples"),
    "mean samples dict": (lambda: mean_interval({"a": 1.0}), r"samples"),
    "mean samples ragged": (lambda: mean_interval([[1.0], [1.0, 2.0]]), r"samples"),
    "mean samples 2d": (lambda: mean_interval([[1.0, 2.0], [3.0, 4.0]]), r"samples"),
    "mean samples scalar": (lambda: mean_interval(3.0), r"samples"),
    "mean samples bool": (lambda: mean_interval([True, False]), r"samples"),
    "mean samples inf": (lambda: mean_interval([1.0, math.inf]), r"samples"),
    "mean confidence 0": (lambda: mean_interval([1.0, 2.0], confidence=0.0), r"confidence"),
    "mean confidence str": (lambda: mean_interval([1.0, 2.0], confidence="0.9"), r"confidence"),
    "paired lengths": (lambda: paired_difference([1.0, 2.0], [1.0]), r"\ba and b\b"),
    "paired shapes": (lambda: paired_difference(np.ones((2, 3)), np.ones((3, 2))), r"\ba\b"),
    "paired b str": (lambda: paired_difference([1.0], "b"), r"\bb="),
    "paired confidence": (lambda: paired_difference([1.0], [2.0], confidence=2), r"confidence"),
    "ratio negative": (lambda: ratio_interval([1.0, -1.0], [1.0, 1.0]), r"numerator"),
    "ratio zero den": (lambda: ratio_interval([1.0, 1.0], [1.0, 0.0]), r"denominator"),
    "ratio lengths": (lambda: ratio_interval([1.0, 2.0], [1.0]), r"paired"),
    "ratio paired int": (lambda: ratio_interval([1.0], [1.0], paired=1), r"paired"),
    "bootstrap statistic": (lambda: bootstrap_interval([1.0, 2.0], statistic=None), r"statistic"),
    "bootstrap statistic vector": (
        lambda: bootstrap_interval([1.0, 2.0], statistic=lambda x: x),
        r"statistic",
    ),
    "bootstrap statistic str": (
        lambda: bootstrap_interval([1.0, 2.0], statistic=lambda x: "a"),
        r"statistic",
    ),
    "bootstrap resamples 0": (
        lambda: bootstrap_interval([1.0, 2.0], num_resamples=0),
        r"num_resamples",
    ),
    "bootstrap resamples float": (
        lambda: bootstrap_interval([1.0, 2.0], num_resamples=10.5),
        r"num_resamples",
    ),
    "bootstrap seed negative": (lambda: bootstrap_interval([1.0, 2.0], seed=-1), r"seed"),
    "decide estimate": (lambda: decide((1.0, 0.5, 1.5), 1.0), r"estimate"),
    "decide threshold nan": (lambda: decide(_E, math.nan), r"threshold"),
    "decide threshold str": (lambda: decide(_E, "1"), r"threshold"),
    "decide direction": (lambda: decide(_E, 1.0, direction=">"), r"direction"),
    "decide direction list": (lambda: decide(_E, 1.0, direction=[">="]), r"direction"),
    "decide within negative": (lambda: decide(_E, -1.0, direction="within"), r"threshold"),
    "seeds estimate": (lambda: seeds_to_decide(None, 1.0), r"estimate"),
    "seeds max 1": (lambda: seeds_to_decide(_E, 1.0, max_seeds=1), r"max_seeds"),
    "seeds within negative": (lambda: seeds_to_decide(_E, -1.0, direction="within"), r"threshold"),
    "combine str": (lambda: combine_statuses("PASS"), r"statuses"),
    "combine int": (lambda: combine_statuses(3), r"statuses"),
    "combine empty": (lambda: combine_statuses([]), r"statuses"),
    "combine unknown": (lambda: combine_statuses(["PASS", "pass"]), r"status"),
    "combine numbers": (lambda: combine_statuses([1, 2]), r"statuses\[0\]"),
    "estimate value outside": (lambda: Estimate(-1.0, 0.0, 2.0, 3), r"value=-1.0"),
    "combine unhashable": (lambda: combine_statuses([["PASS"]]), r"status"),
}


@pytest.mark.parametrize("name", sorted(BAD_STATS))
def test_bad_call_is_refused_naming_the_argument(name):
    call, pattern = BAD_STATS[name]
    with pytest.raises(ValueError, match=pattern):
        call()


def test_paired_difference_refuses_tables_instead_of_flattening_them():
    with pytest.raises(ValueError, match=r"a has shape \(2, 3\)"):
        paired_difference(np.ones((2, 3)), np.ones((3, 2)))


def test_zero_dim_arrays_count_as_numbers():
    import jax.numpy as jnp

    estimate = Estimate(jnp.float32(1.0), np.float64(0.5), jnp.asarray(1.5), jnp.int32(3))
    assert estimate == Estimate(1.0, 0.5, 1.5, 3)
    assert str(estimate) == "1 [0.5, 1.5] (n=3)"
    assert decide(estimate, jnp.float32(0.4)) == "PASS"
    assert mean_interval(jnp.arange(3.0), confidence=jnp.float32(0.9)).n == 3
    assert seeds_to_decide(_E, np.float32(0.5), max_seeds=jnp.int32(500)) == seeds_to_decide(
        _E, 0.5
    )
