"""Properties of ``efflax.stats``: intervals against scipy/numpy formulas, decisions, refusals."""

from __future__ import annotations

import math

import numpy as np
from _hyp import INVALID
from _hyp import NAN
from _hyp import bad_floats
from _hyp import bad_ints
from _hyp import props
from _hyp import refused
from hypothesis import given
from hypothesis import strategies as st
from scipy import stats as scipy_stats

from efflax import stats as S

FAST = props(25)  # pure numpy: many examples cost little
samples = st.lists(st.floats(-1e3, 1e3, allow_nan=False), min_size=2, max_size=8)
positive = st.lists(st.floats(1e-3, 1e3), min_size=2, max_size=8)
confidences = st.floats(0.5, 0.99)


def _t_interval(x: np.ndarray, confidence: float) -> tuple[float, float, float]:
    mean = float(np.mean(x))
    half = (
        scipy_stats.t.ppf(0.5 + confidence / 2, len(x) - 1) * np.std(x, ddof=1) / math.sqrt(len(x))
    )
    return mean, mean - half, mean + half


@FAST
@given(samples, confidences)
def test_mean_interval_is_the_student_t_interval(values, confidence):
    estimate = S.mean_interval(values, confidence=confidence)
    mean, low, high = _t_interval(np.asarray(values, np.float64), confidence)
    np.testing.assert_allclose(
        [estimate.value, estimate.low, estimate.high], [mean, low, high], rtol=1e-9, atol=1e-9
    )
    assert estimate.n == len(values) and estimate.samples == tuple(values)


@FAST
@given(st.data(), confidences)
def test_paired_difference_is_the_interval_of_differences(data, confidence):
    a = data.draw(samples)
    b = data.draw(st.lists(st.floats(-1e3, 1e3), min_size=len(a), max_size=len(a)))
    estimate = S.paired_difference(a, b, confidence=confidence)
    mean, low, high = _t_interval(np.subtract(a, b, dtype=np.float64), confidence)
    np.testing.assert_allclose(
        [estimate.value, estimate.low, estimate.high], [mean, low, high], rtol=1e-9, atol=1e-9
    )


@FAST
@given(st.data(), st.booleans())
def test_ratio_interval_is_a_log_scale_interval(data, paired):
    num = data.draw(positive)
    den = data.draw(st.lists(st.floats(1e-3, 1e3), min_size=len(num), max_size=len(num)))
    estimate = S.ratio_interval(num, den, paired=paired)
    log_num, log_den = np.log(num), np.log(den)
    if paired:
        mean, low, high = _t_interval(log_num - log_den, 0.95)
        np.testing.assert_allclose(
            [estimate.value, estimate.low, estimate.high], np.exp([mean, low, high]), rtol=1e-9
        )
    else:
        np.testing.assert_allclose(
            estimate.value, math.exp(log_num.mean() - log_den.mean()), rtol=1e-9
        )
        assert estimate.low <= estimate.value <= estimate.high


@props(10)
@given(samples, st.integers(0, 100), st.integers(10, 200))
def test_bootstrap_interval_is_deterministic_and_covers_the_value(values, seed, resamples):
    first = S.bootstrap_interval(values, num_resamples=resamples, seed=seed)
    again = S.bootstrap_interval(values, num_resamples=resamples, seed=seed)
    assert first == again
    assert first.value == np.mean(values)
    assert min(values) - 1e-9 <= first.low <= first.value <= first.high <= max(values) + 1e-9


@FAST
@given(
    st.floats(-10, 10),
    st.floats(0, 5),
    st.floats(0, 5),
    st.floats(-10, 10),
    st.sampled_from([">=", "<=", "within"]),
)
def test_decide_follows_the_interval(value, below, above, threshold, direction):
    estimate = S.Estimate(value, value - below, value + above, 3)
    low, high = estimate.low, estimate.high
    if direction == ">=":
        want = "PASS" if low >= threshold else ("FAIL" if high < threshold else "INCONCLUSIVE")
    elif direction == "<=":
        want = "PASS" if high <= threshold else ("FAIL" if low > threshold else "INCONCLUSIVE")
    else:
        threshold = abs(threshold)
        if -threshold <= low and high <= threshold:
            want = "PASS"
        elif low > threshold or high < -threshold:
            want = "FAIL"
        else:
            want = "INCONCLUSIVE"
    assert S.decide(estimate, threshold, direction=direction) == want


@FAST
@given(st.lists(st.sampled_from(S.STATUSES), min_size=1, max_size=5))
def test_combine_statuses(statuses):
    want = (
        "FAIL" if "FAIL" in statuses else ("PASS" if set(statuses) == {"PASS"} else "INCONCLUSIVE")
    )
    assert S.combine_statuses(statuses) == want


@props(10)
@given(samples, st.floats(-1e3, 1e3))
def test_seeds_to_decide_would_decide(values, threshold):
    estimate = S.mean_interval(values)
    n = S.seeds_to_decide(estimate, threshold)
    x = np.asarray(values, np.float64)
    if n is None:
        return
    # With n seeds of the same mean and spread, the interval no longer straddles the threshold.
    half = scipy_stats.t.ppf(0.975, n - 1) * x.std(ddof=1) / math.sqrt(n) if n > 1 else 0.0
    assert abs(x.mean() - threshold) > half or x.std(ddof=1) == 0


@INVALID
@given(st.data())
def test_stats_refuse(data):
    case = data.draw(
        st.sampled_from(
            ["samples", "confidence", "paired", "ratio", "ratio_len", "resamples", "seed",
             "statistic", "threshold", "direction", "estimate", "max_seeds", "status", "fields"]
        )
    )  # fmt: skip
    good = [1.0, 2.0, 3.0]
    est = S.mean_interval(good)
    if case == "samples":
        bad = data.draw(st.sampled_from([[], [1.0, NAN], [float("inf")], "abc", [["a"]], None]))
        refused(lambda: S.mean_interval(bad), "samples")
    elif case == "confidence":
        bad = data.draw(st.sampled_from([0.0, 1.0, 1.5, -0.5, NAN, True, "0.9"]))
        fn = data.draw(st.sampled_from([S.mean_interval, S.bootstrap_interval]))
        refused(lambda: fn(good, confidence=bad), "confidence")
    elif case == "paired":
        refused(lambda: S.paired_difference(good, good[:2]), "a and b")
    elif case == "ratio":
        bad = data.draw(st.sampled_from([[1.0, -2.0], [0.0, 1.0]]))
        which = data.draw(st.sampled_from(["numerator", "denominator"]))
        args = (bad, [1.0, 1.0]) if which == "numerator" else ([1.0, 1.0], bad)
        refused(lambda: S.ratio_interval(*args), which)
    elif case == "ratio_len":
        refused(lambda: S.ratio_interval([1.0, 2.0, 3.0], [1.0, 2.0]), "numerator")
    elif case == "resamples":
        refused(
            lambda: S.bootstrap_interval(good, num_resamples=data.draw(bad_ints())), "num_resamples"
        )
    elif case == "seed":
        refused(lambda: S.bootstrap_interval(good, seed=data.draw(bad_ints(0))), "seed")
    elif case == "statistic":
        bad = data.draw(st.sampled_from(["mean", None, lambda x: NAN]))
        refused(lambda: S.bootstrap_interval(good, bad, num_resamples=10), "statistic")
    elif case == "threshold":
        fn = data.draw(st.sampled_from([S.decide, S.seeds_to_decide]))
        refused(lambda: fn(est, data.draw(bad_floats())), "threshold")
    elif case == "direction":
        fn = data.draw(st.sampled_from([S.decide, S.seeds_to_decide]))
        bad = data.draw(st.sampled_from([">", "=>", "", None]))
        refused(lambda: fn(est, 1.0, direction=bad), "direction")
    elif case == "estimate":
        fn = data.draw(st.sampled_from([S.decide, S.seeds_to_decide]))
        refused(lambda: fn(data.draw(st.sampled_from([2.0, None, (1, 2, 3)])), 1.0), "estimate")
    elif case == "max_seeds":
        refused(lambda: S.seeds_to_decide(est, 2.5, max_seeds=data.draw(bad_ints(2))), "max_seeds")
    elif case == "status":
        bad = data.draw(st.sampled_from([["MAYBE"], "PASS", [], [None]]))
        refused(lambda: S.combine_statuses(bad), "status")
    else:
        field, bad = data.draw(
            st.sampled_from(
                [
                    ("n", 0),
                    ("n", 1.5),
                    ("n", True),
                    ("confidence", 2.0),
                    ("value", NAN),
                    ("low", "a"),
                ]
            )
        )
        kwargs = dict(value=1.0, low=0.0, high=2.0, n=3)
        kwargs[field] = bad
        refused(lambda: S.Estimate(**kwargs), field)


@INVALID
@given(st.sampled_from([(2, 3), (3, 1), (1, 1, 2)]))
def test_samples_of_more_than_one_axis_are_refused_not_flattened(shape):
    table = np.arange(1, 1 + int(np.prod(shape)), dtype=np.float64).reshape(shape)
    refused(lambda: S.paired_difference(table, table), "a")
    refused(lambda: S.mean_interval(table), "samples")
