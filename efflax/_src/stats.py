"""Estimates with uncertainty and the three-way verdict an experiment reports.

A claim such as "expert choice reaches the baseline's loss at least 1.1x faster" is decided from
runs over several seeds: the quantity gets a 95% interval (Student-t over seeds, a paired t
interval for paired runs, a log-scale interval for ratios), and the verdict is

- ``PASS`` when the whole interval supports the claim,
- ``FAIL`` when the whole interval contradicts it,
- ``INCONCLUSIVE`` when it straddles the threshold; :func:`seeds_to_decide` says how many seeds
  would decide it if the mean and spread stayed as measured.

Example:
  >>> speedup = ratio_interval(top2_steps, expert_choice_steps)      # paired by seed
  >>> decide(speedup, 1.1, direction=">=")
  'PASS'
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Literal

import numpy as np
from scipy import stats as _scipy_stats

from pallas_kernels import _checks

Status = Literal["PASS", "FAIL", "INCONCLUSIVE"]
Direction = Literal[">=", "<=", "within"]
STATUSES: tuple[Status, ...] = ("PASS", "FAIL", "INCONCLUSIVE")

__all__ = [
    "Estimate",
    "STATUSES",
    "bootstrap_interval",
    "combine_statuses",
    "decide",
    "mean_interval",
    "offset",
    "paired_difference",
    "ratio_interval",
    "seeds_to_decide",
]


@dataclasses.dataclass(frozen=True)
class Estimate:
    """A measured quantity: point estimate and a two-sided interval.

    Attributes:
      value: the point estimate (a mean, a mean difference, a geometric-mean ratio).
      low, high: the interval's ends.
      n: the number of runs (seeds) it comes from.
      confidence: the interval's coverage (0.95 by default).
      samples: the per-run values it was computed from (for reports and re-analysis).
    """

    value: float
    low: float
    high: float
    n: int
    confidence: float = 0.95
    samples: tuple[float, ...] = ()

    def __post_init__(self):
        # Fields are stored as Python numbers (a 0-d JAX/NumPy array is converted), so an
        # Estimate formats, compares and serialises the same whatever it was built from.
        for name in ("value", "low", "high"):
            number = _checks.as_number(getattr(self, name))
            if isinstance(number, bool) or not isinstance(number, numbers.Real):
                raise ValueError(f"{name}={getattr(self, name)!r} must be a number")
            number = float(number)
            if math.isnan(number):
                raise ValueError(f"{name}={number!r}: an estimate cannot be NaN")
            object.__setattr__(self, name, number)
        object.__setattr__(self, "n", _checks.int_at_least("n", self.n))
        object.__setattr__(self, "confidence", _check_confidence(self.confidence))
        if isinstance(self.samples, str | bytes) or not isinstance(self.samples, Sequence):
            raise ValueError(f"samples={self.samples!r} must be a sequence of numbers")
        object.__setattr__(
            self,
            "samples",
            tuple(_checks.finite_float(f"samples[{i}]", s) for i, s in enumerate(self.samples)),
        )
        if not self.low <= self.value <= self.high:
            raise ValueError(
                f"value={self.value} must lie in the interval [low={self.low}, high={self.high}]"
            )

    def format(self, spec: str = ".3g", unit: str = "") -> str:
        """``'1.35 [1.12, 1.58] (n=5)'``."""
        return (
            f"{self.value:{spec}}{unit} [{self.low:{spec}}, {self.high:{spec}}]{unit} (n={self.n})"
        )

    def __str__(self) -> str:
        return self.format()


def _samples(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """One number per run: a 1-d sequence or array of real numbers (not bools), finite."""
    if isinstance(values, str | bytes | Mapping):
        raise ValueError(f"{name}={values!r} must be a sequence of numbers")
    try:
        raw = np.asarray(values)
        array = raw.astype(np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"{name}={values!r} must be a sequence of numbers") from None
    if raw.dtype.kind not in "iuf":
        raise ValueError(f"{name}={values!r} must be a sequence of numbers (got dtype {raw.dtype})")
    if array.ndim != 1:
        # A [seeds, k] table flattened would pair (or average) the wrong runs.
        raise ValueError(
            f"{name} has shape {array.shape}; pass one number per run (a 1-d sequence)"
        )
    if array.size == 0:
        raise ValueError(f"{name} is empty")
    if not np.all(np.isfinite(array)):
        raise ValueError(f"{name}={array.tolist()} must be finite")
    return array


def _check_confidence(confidence: float) -> float:
    number = _checks.finite_float("confidence", confidence)
    if not 0.0 < number < 1.0:
        raise ValueError(f"confidence={confidence!r} must be in (0, 1)")
    return number


def mean_interval(samples: Sequence[float], *, confidence: float = 0.95) -> Estimate:
    """Mean of independent runs with a Student-t interval (one run: an unbounded interval).

    A single run says nothing about the spread over seeds, so its interval is ``(-inf, inf)``
    and no claim is decided from it (:func:`decide` says INCONCLUSIVE). A quantity that does not
    depend on a seed at all (a deterministic algorithm) is exact: build
    ``Estimate(v, v, v, n=1)`` for it.
    """
    _check_confidence(confidence)
    x = _samples(samples, "samples")
    mean = float(np.mean(x))
    if x.size == 1:
        return Estimate(mean, -math.inf, math.inf, 1, confidence, tuple(x.tolist()))
    half = float(
        _scipy_stats.t.ppf(0.5 + confidence / 2, df=x.size - 1)
        * np.std(x, ddof=1)
        / math.sqrt(x.size)
    )
    return Estimate(mean, mean - half, mean + half, x.size, confidence, tuple(x.tolist()))


def paired_difference(
    a: Sequence[float], b: Sequence[float], *, confidence: float = 0.95
) -> Estimate:
    """Mean of ``a_i - b_i`` over paired runs (same seed, data order) with a t interval."""
    _check_confidence(confidence)
    a, b = _samples(a, "a"), _samples(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"paired samples a and b need equal lengths, got {a.size} and {b.size}")
    return mean_interval(a - b, confidence=confidence)


def ratio_interval(
    numerator: Sequence[float],
    denominator: Sequence[float],
    *,
    paired: bool = True,
    confidence: float = 0.95,
) -> Estimate:
    """Geometric-mean ratio ``numerator / denominator`` with an interval on the log scale.

    For speed-ups and cost ratios (positive quantities whose spread is multiplicative). Paired:
    the t interval of ``log(num_i / den_i)``; unpaired: Welch's interval of the difference of the
    mean logs.
    """
    _check_confidence(confidence)
    paired = _checks.boolean("paired", paired)
    num, den = _samples(numerator, "numerator"), _samples(denominator, "denominator")
    for name, values in (("numerator", num), ("denominator", den)):
        if np.any(values <= 0):
            raise ValueError(f"{name}={values.tolist()} must be positive (a ratio of log values)")
    if paired and num.shape != den.shape:
        raise ValueError(
            f"paired numerator and denominator need equal lengths, got {num.size} and {den.size} "
            "(pass paired=False for independent runs)"
        )
    if paired:
        log_ratio = mean_interval(np.log(num) - np.log(den), confidence=confidence)
        samples = tuple((num / den).tolist())
        return Estimate(
            math.exp(log_ratio.value),
            math.exp(log_ratio.low),
            math.exp(log_ratio.high),
            log_ratio.n,
            confidence,
            samples,
        )
    ln, ld = np.log(num), np.log(den)
    diff = float(ln.mean() - ld.mean())
    if ln.size < 2 or ld.size < 2:  # one run on a side: no spread, no interval (see mean_interval)
        return Estimate(math.exp(diff), 0.0, math.inf, min(ln.size, ld.size), confidence)
    vn, vd = ln.var(ddof=1) / ln.size, ld.var(ddof=1) / ld.size
    se = math.sqrt(vn + vd)
    if se == 0:
        half = 0.0
    else:
        dof = (vn + vd) ** 2 / (vn**2 / (ln.size - 1) + vd**2 / (ld.size - 1))
        half = float(_scipy_stats.t.ppf(0.5 + confidence / 2, df=dof) * se)
    return Estimate(
        math.exp(diff),
        math.exp(diff - half),
        math.exp(diff + half),
        min(ln.size, ld.size),
        confidence,
    )


def bootstrap_interval(
    samples: Sequence[float],
    statistic: Callable[[np.ndarray], float] = np.mean,
    *,
    confidence: float = 0.95,
    num_resamples: int = 10_000,
    seed: int = 0,
) -> Estimate:
    """Percentile-bootstrap interval of ``statistic`` (deterministic for a given seed)."""
    _check_confidence(confidence)
    _checks.function("statistic", statistic)
    num_resamples = _checks.int_at_least("num_resamples", num_resamples)
    seed = _checks.int_at_least("seed", seed, 0)
    x = _samples(samples, "samples")

    def apply(values: np.ndarray) -> float:
        result = _checks.as_number(np.asarray(statistic(values)))
        if isinstance(result, bool) or not isinstance(result, numbers.Real):
            raise ValueError(
                f"statistic={statistic!r} must return one real number, got {_short(result)}"
            )
        return float(result)

    value = apply(x)
    if math.isnan(value):
        raise ValueError(f"statistic={statistic!r} returned NaN on the samples")
    if x.size == 1:  # no spread to resample (see mean_interval)
        return Estimate(value, -math.inf, math.inf, 1, confidence, tuple(x.tolist()))
    rng = np.random.default_rng(seed)
    draws = np.array([apply(x[rng.integers(0, x.size, x.size)]) for _ in range(int(num_resamples))])
    if np.any(np.isnan(draws)):
        raise ValueError(f"statistic={statistic!r} returned NaN on a resample of the samples")
    alpha = (1 - confidence) / 2
    low, high = np.quantile(draws, [alpha, 1 - alpha])
    return Estimate(
        value,
        min(float(low), value),
        max(float(high), value),
        x.size,
        confidence,
        tuple(x.tolist()),
    )


def decide(estimate: Estimate, threshold: float, *, direction: Direction = ">=") -> Status:
    """PASS / FAIL / INCONCLUSIVE for the claim ``quantity <direction> threshold``.

    Args:
      estimate: the measured quantity.
      threshold: the claim's bound; for ``'within'`` the tolerance ``t`` of ``|quantity| <= t``.
      direction: ``'>='``, ``'<='`` or ``'within'``.
    """
    _check_estimate(estimate)
    threshold = _checks.finite_float("threshold", threshold)
    _check_direction(direction)
    if direction == ">=":
        if estimate.low >= threshold:
            return "PASS"
        return "FAIL" if estimate.high < threshold else "INCONCLUSIVE"
    if direction == "<=":
        if estimate.high <= threshold:
            return "PASS"
        return "FAIL" if estimate.low > threshold else "INCONCLUSIVE"
    if direction == "within":
        if threshold < 0:
            raise ValueError(f"threshold={threshold!r} must be >= 0 for direction='within'")
        if -threshold <= estimate.low and estimate.high <= threshold:
            return "PASS"
        if estimate.low > threshold or estimate.high < -threshold:
            return "FAIL"
        return "INCONCLUSIVE"
    raise AssertionError(direction)  # unreachable: checked above


def _check_estimate(estimate: Estimate) -> None:
    if not isinstance(estimate, Estimate):
        raise ValueError(
            f"estimate={estimate!r} must be an efflax.stats.Estimate (e.g. from mean_interval)"
        )


def _check_direction(direction: str) -> None:
    if not isinstance(direction, str):
        raise ValueError(f"direction={direction!r} must be one of '>=', '<=', 'within'")
    _checks.one_of("direction", direction, (">=", "<=", "within"))


def _short(value: object) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def seeds_to_decide(
    estimate: Estimate,
    threshold: float,
    *,
    direction: Direction = ">=",
    max_seeds: int = 1000,
) -> int | None:
    """Seeds that would decide an INCONCLUSIVE claim if the mean and spread stayed as measured.

    Returns ``None`` when the estimate sits on the threshold (no finite number decides it) or
    there are too few samples to estimate the spread.
    """
    _check_estimate(estimate)
    threshold = _checks.finite_float("threshold", threshold)
    _check_direction(direction)
    if direction == "within" and threshold < 0:
        raise ValueError(f"threshold={threshold!r} must be >= 0 for direction='within'")
    max_seeds = _checks.int_at_least("max_seeds", max_seeds, 2)
    x = np.asarray(estimate.samples, dtype=np.float64)
    if x.size < 2:
        return None
    mean, sd = float(x.mean()), float(x.std(ddof=1))
    bounds = (-threshold, threshold) if direction == "within" else (threshold,)
    gap = min(abs(mean - b) for b in bounds)
    if gap == 0:
        return None
    if sd == 0:
        return x.size
    for n in range(2, max_seeds + 1):
        t = _scipy_stats.t.ppf(0.5 + estimate.confidence / 2, df=n - 1)
        if t * sd / math.sqrt(n) < gap:
            return max(n, x.size)
    return None


def combine_statuses(statuses: Sequence[Status]) -> Status:
    """All of several claims: FAIL if any fails, PASS if all pass, else INCONCLUSIVE."""
    if isinstance(statuses, str):
        raise ValueError(f"statuses={statuses!r} must be a list of statuses, e.g. [{statuses!r}]")
    if not isinstance(statuses, Iterable) or isinstance(statuses, Mapping):
        raise ValueError(f"statuses={statuses!r} must be a list of statuses")
    statuses = list(statuses)
    for i, status in enumerate(statuses):
        if not isinstance(status, str) or status not in STATUSES:
            raise ValueError(f"statuses[{i}]: status={status!r} must be one of {STATUSES}")
    if not statuses:
        raise ValueError("no statuses to combine")
    if "FAIL" in statuses:
        return "FAIL"
    return "PASS" if all(s == "PASS" for s in statuses) else "INCONCLUSIVE"


def offset(estimate: Estimate, target: float) -> Estimate:
    """``estimate - target`` (value, interval and samples shifted).

    ``decide(offset(ratio, 1.0), 0.1, direction='within')`` decides ``|ratio - 1| <= 0.1``.
    """
    return dataclasses.replace(
        estimate,
        value=estimate.value - target,
        low=estimate.low - target,
        high=estimate.high - target,
        samples=tuple(s - target for s in estimate.samples),
    )
