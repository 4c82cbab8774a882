"""Cyclic learning rates draw the accuracy-vs-training-time curve in one run (Portes et al. 2022).

Portes, Blalock, Stephenson, Frankle, "Fast Benchmarking of Accuracy vs. Training Time with
Cyclic Learning Rates", arXiv:2206.00832, 2022.

Claim: with cosine cycles whose period doubles, the model at the end of each cycle is nearly as
accurate as a model trained once with a warmup+cosine schedule of that total length, so one run
(cost: the longest budget) replaces one dedicated run per budget (cost: the sum of the budgets,
about twice as much with doubling periods).

Here: the MNIST-1D CNN (``efflax.models.CNN1D``) trained with Adam, once with
``exponential_cyclic_cosine_schedule`` (evaluated at every ``cycle_end_steps`` budget) and once per
budget with a single warmup+cosine schedule of that length, for several seeds at once (a vmapped
step; seed s has the same initial weights and data order in every run, so the first budget is the
same run both ways and the gaps are paired by seed).

Verdict: "nearly as good" is one-sided: at every budget the 95% interval of
cyclic - dedicated must be above -1 point; the cost is the longest budget alone against the sum of
all budgets (in steps: exact). Whether the two differ at all is reported beside it, and at the
longest budget the experiment says what a difference is: noise (the interval holds 0), or real;
and, with one more dedicated run of twice the longest budget, whether the dedicated runs are
converged and whether undertraining explains the gap.
"""

from __future__ import annotations

import dataclasses
import pathlib

import numpy as np
import optax

from efflax import data
from efflax.curves import cyclic_points
from efflax.experiment import Claims
from efflax.experiment import Panel
from efflax.experiment import Verdict
from efflax.experiment import cli_main
from efflax.experiment import plot_panels
from efflax.experiment import register
from efflax.models import CNN1D
from efflax.optim import cycle_end_steps
from efflax.optim import exponential_cyclic_cosine_schedule
from efflax.stats import mean_interval
from efflax.stats import paired_difference
from efflax.training import SeedLoader
from efflax.training import cross_entropy_loss_fn
from efflax.training import make_train_step
from efflax.training import per_seed
from efflax.training import read_metrics
from efflax.training import seed_state
from efflax.training import seeds_eval_fn
from efflax.training import seeds_step
from efflax.training import stack_states

METRIC = "test/accuracy"
TOLERANCE_POINTS = 1.0  # the claim: within 1 accuracy point at every budget
MAX_COST_RATIO = 0.7  # "about half": the one run must cost clearly less than all the others


@dataclasses.dataclass(frozen=True)
class Config:
    batch_size: int
    learning_rate: float
    warmup_steps: int
    first_cycle_steps: int
    num_cycles: int
    seeds: tuple[int, ...]
    cycle_multiplier: float = 2.0

    @property
    def budgets(self) -> list[int]:
        return cycle_end_steps(
            self.first_cycle_steps,
            cycle_multiplier=self.cycle_multiplier,
            num_cycles=self.num_cycles,
            warmup_steps=self.warmup_steps,
        )


# 4,000 training examples / 100 = 40 steps per epoch.
QUICK = Config(
    batch_size=100, learning_rate=1e-2, warmup_steps=20, first_cycle_steps=40, num_cycles=3,
    seeds=tuple(range(8)),
)  # fmt: skip
FULL = Config(
    batch_size=100, learning_rate=1e-2, warmup_steps=40, first_cycle_steps=80, num_cycles=5,
    seeds=tuple(range(16)),
)  # fmt: skip


def train(
    schedule: optax.Schedule,
    *,
    eval_steps: list[int],
    config: Config,
    metrics_path: pathlib.Path | None = None,
) -> dict[str, np.ndarray]:
    """One Adam run of the CNN with ``schedule`` for every seed at once (a vmapped step).

    Returns:
      ``accuracy`` [seeds, points] at ``eval_steps``, ``train_loss`` [points] (mean over seeds
      of the last ``log_every`` steps) and ``train_time`` [points]: seconds of training up to
      each point for all seeds together, compilation and evaluation excluded.
    """
    model, tx = CNN1D(), optax.adam(schedule)
    example = np.zeros((1, 40), np.float32)
    state = stack_states([seed_state(model, tx, seed=s, example=example) for s in config.seeds])
    step = seeds_step(make_train_step(cross_entropy_loss_fn(), jit=False))
    loaders = [
        data.load("mnist1d", "train", config.batch_size, seed=s, epochs=None) for s in config.seeds
    ]
    eval_fn = seeds_eval_fn(data.load_arrays("mnist1d", "test"))
    if metrics_path is not None:
        metrics_path.unlink(missing_ok=True)
    points = cyclic_points(
        state,
        step,
        SeedLoader(loaders),
        eval_fn,
        budgets=eval_steps,
        metric=METRIC,
        metrics_path=metrics_path,
        log_every=min(eval_steps[0], 20),
    )
    history = read_metrics(metrics_path) if metrics_path is not None else []
    train_loss = []
    for budget in eval_steps:
        losses = [r["train/loss"] for r in history if "train/loss" in r and r["step"] <= budget]
        train_loss.append(losses[-1] if losses else np.nan)
    return {
        "accuracy": np.stack([per_seed([p], METRIC) for p in points], axis=1),
        "train_loss": np.array(train_loss),
        "train_time": np.array([p["train_time"] for p in points]),
    }


def _plot(budgets, acc_cyclic, acc_dedicated, gaps, schedules, png_path, *, title: str) -> None:
    """Mean accuracy per budget both ways, the paired gap (value), the schedules."""
    accuracy = {
        "cyclic (one run, cycle ends)": (budgets, 100 * acc_cyclic),
        "dedicated warmup+cosine runs": (budgets, 100 * acc_dedicated),
    }
    gap = {"cyclic - dedicated": (budgets, gaps)}
    plot_panels(
        png_path,
        [
            Panel("test accuracy, mean of seeds", accuracy, xlabel="training budget (steps)",
                  ylabel="test accuracy (%)", xscale="log", intervals=True),
            Panel("paired by seed (claim: >= -1)", gap, xlabel="training budget (steps)",
                  ylabel="cyclic - dedicated (points)", xscale="log",
                  hlines=(-TOLERANCE_POINTS, 0.0, TOLERANCE_POINTS)),
            Panel("schedules", schedules, ylabel="learning rate", style=dict.fromkeys(schedules, "-")),
        ],
        title=title,
    )  # fmt: skip


def _cyclic_schedule(config: Config) -> optax.Schedule:
    return exponential_cyclic_cosine_schedule(
        config.learning_rate,
        config.first_cycle_steps,
        cycle_multiplier=config.cycle_multiplier,
        num_cycles=config.num_cycles,
        warmup_steps=config.warmup_steps,
    )


def _dedicated_schedule(config: Config, budget: int) -> optax.Schedule:
    # One warmup + one cosine over the whole budget (= optax.warmup_cosine_decay_schedule).
    return exponential_cyclic_cosine_schedule(
        config.learning_rate,
        budget - config.warmup_steps,
        num_cycles=1,
        warmup_steps=config.warmup_steps,
    )


@register(
    "cyclic_lr",
    description="one cyclic-LR run vs one dedicated run per budget",
    timing_sensitive=False,
)
def run(out_dir: pathlib.Path, *, quick: bool) -> Verdict:
    config = QUICK if quick else FULL
    out_dir = pathlib.Path(out_dir)
    budgets = config.budgets
    longest = budgets[-1]
    print(f"budgets (cycle ends, steps): {budgets}; seeds {list(config.seeds)}", flush=True)
    cyclic = train(
        _cyclic_schedule(config),
        eval_steps=budgets,
        config=config,
        metrics_path=out_dir / "cyclic.jsonl",
    )
    dedicated = [
        train(_dedicated_schedule(config, b), eval_steps=[b], config=config) for b in budgets
    ]
    # Are the dedicated runs converged at the longest budget? A dedicated run twice as long.
    longer = train(
        _dedicated_schedule(config, 2 * longest), eval_steps=[2 * longest], config=config
    )
    acc_cyclic = cyclic["accuracy"]  # [seeds, budgets]
    acc_dedicated = np.concatenate([d["accuracy"] for d in dedicated], axis=1)
    for name, acc in (("cyclic", acc_cyclic), ("dedicated", acc_dedicated)):
        print(f"{name:9s} mean test accuracy: {np.round(100 * acc.mean(0), 2).tolist()}")

    gaps = [
        paired_difference(100 * acc_cyclic[:, i], 100 * acc_dedicated[:, i])
        for i in range(len(budgets))
    ]
    # The claim is one-sided ("nearly as good"): not worse by more than 1 point. Whether the
    # two differ at all (either way) is reported beside it.
    claims = Claims()
    for b, g in zip(budgets, gaps, strict=True):
        claims.check(f"gap_points_at_{b}_steps", g, -TOLERANCE_POINTS)
    within = [
        claims.report(f"within_1_point_at_{b}_steps", g, TOLERANCE_POINTS, "within")
        for b, g in zip(budgets, gaps, strict=True)
    ]
    gap = gaps[-1]
    longer_gain = paired_difference(100 * longer["accuracy"][:, 0], 100 * acc_dedicated[:, -1])
    cyclic_vs_longer = paired_difference(100 * acc_cyclic[:, -1], 100 * longer["accuracy"][:, 0])
    step_ratio = longest / sum(budgets)
    time_ratio = cyclic["train_time"][-1] / sum(d["train_time"][0] for d in dedicated)
    claims.context(f"dedicated_gain_points_{2 * longest}_vs_{longest}_steps", longer_gain)
    claims.context(f"cyclic_{longest}_minus_dedicated_{2 * longest}_points", cyclic_vs_longer)
    claims.context(f"cyclic_accuracy_at_{longest}_steps", mean_interval(100 * acc_cyclic[:, -1]))
    claims.context(
        f"dedicated_accuracy_at_{longest}_steps", mean_interval(100 * acc_dedicated[:, -1])
    )

    # What the gap at the longest budget is: noise, a real effect, or undertrained baselines.
    if longer_gain.low > 0:
        converged = (
            f"dedicated runs are NOT converged at {longest} steps ({2 * longest} steps gain "
            f"{longer_gain.format('+.2f')} points)"
        )
    elif longer_gain.high < 0:
        converged = (
            f"dedicated runs lose from {2 * longest} steps ({longer_gain.format('+.2f')} "
            "points: the single long cosine overfits)"
        )
    else:
        converged = (
            f"dedicated runs are converged ({2 * longest} steps change accuracy by "
            f"{longer_gain.format('+.2f')} points)"
        )
    if gap.low <= 0 <= gap.high:
        nature = f"not distinguishable from 0 (noise); {converged}"
    elif gap.value < 0:
        nature = f"a real effect, cyclic worse (the interval excludes 0); {converged}"
    elif cyclic_vs_longer.high < 0:
        nature = (
            f"a real effect, cyclic better (the interval excludes 0); {converged}, and a "
            f"dedicated run of twice the budget beats the cyclic run "
            f"({cyclic_vs_longer.format('+.2f')} points): consistent with undertrained "
            "dedicated runs"
        )
    else:
        nature = (
            f"a real effect, cyclic better (the interval excludes 0); {converged}, but even a "
            f"dedicated run of twice the budget does not beat the cyclic run "
            f"({cyclic_vs_longer.format('+.2f')} points): not explained by undertrained "
            "dedicated runs (the restarts help at this budget)"
        )
    better = [b for b, g in zip(budgets, gaps, strict=True) if g.low > 0]
    far_better = [
        b for b, g, w in zip(budgets, gaps, within, strict=True) if w == "FAIL" and g.value > 0
    ]
    better_text = ""
    if better:
        better_text = (
            f"Cyclic is significantly better at {better} steps"
            + (f", by more than 1 point at {far_better}" if far_better else "")
            + " (the claim is one-sided: this does not count against it). "
        )
    measured = (
        "cyclic - dedicated test accuracy (points, paired by seed) at budgets "
        + ", ".join(f"{b}: {g.format('+.2f')}" for b, g in zip(budgets, gaps, strict=True))
        + f". At {longest} steps the gap is {nature}. "
        + better_text
        + f"Cost of the one run / all dedicated runs: {step_ratio:.2f} in steps "
        f"(the claim's cost; {time_ratio:.2f} in measured time of these seed-batched runs)"
    )
    schedule_steps = np.arange(longest + 1)
    _plot(
        budgets,
        acc_cyclic,
        acc_dedicated,
        gaps,
        {
            "cyclic": (schedule_steps, np.asarray(_cyclic_schedule(config)(schedule_steps))),
            **{
                f"dedicated {b}": (
                    schedule_steps[: b + 1],
                    np.asarray(_dedicated_schedule(config, b)(schedule_steps[: b + 1])),
                )
                for b in budgets
            },
        },
        out_dir / "accuracy_vs_budget.png",
        title=f"MNIST-1D CNN, Adam, {len(config.seeds)} seeds: Portes et al. 2022",
    )
    claims.require("cost_ratio_steps", step_ratio <= MAX_COST_RATIO)
    return claims.verdict(
        out_dir,
        claim=(
            "one cyclic run's end-of-cycle accuracy is nearly as good as a dedicated run's "
            "(not worse by more than 1 point, 95% interval, paired by seed) at every budget, at "
            "the cost of the longest budget alone (about half of all runs)"
        ),
        measured=measured,
        metrics={
            "config": config,
            "budgets_steps": budgets,
            "accuracy_cyclic": acc_cyclic,
            "accuracy_dedicated": acc_dedicated,
            "accuracy_dedicated_2x_longest": longer["accuracy"][:, 0],
            "train_loss_cyclic": cyclic["train_loss"],
            "train_loss_dedicated": [d["train_loss"][0] for d in dedicated],
            "train_loss_dedicated_2x_longest": longer["train_loss"][0],
            "train_time_cyclic_s": cyclic["train_time"],
            "train_time_dedicated_s": [d["train_time"][0] for d in dedicated],
            "cost_ratio_steps": step_ratio,
            "cost_ratio_time_seed_batched": time_ratio,
        },
    )


if __name__ == "__main__":
    cli_main("cyclic_lr")
