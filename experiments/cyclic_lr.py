"""Cyclic learning rates draw the accuracy-vs-training-time curve in one run (Portes et al. 2022).

Portes, Blalock, Stephenson, Frankle, "Fast Benchmarking of Accuracy vs. Training Time with
Cyclic Learning Rates", arXiv:2206.00832, 2022.

Claim: with cosine cycles whose period doubles, the model at the end of each cycle is nearly as
accurate as a model trained once with a warmup+cosine schedule of that total length, so one run
(cost: the longest budget) replaces one dedicated run per budget (cost: the sum of the budgets,
about twice as much with doubling periods).

Here: the MNIST-1D CNN (``efflax.models.CNN1D``) trained with Adam, once with
``exponential_cyclic_cosine_schedule`` (evaluated at every ``cycle_end_steps`` budget) and once per
budget with a single warmup+cosine schedule of that length (same seed, so the same initial
weights and data order: the first budget is the same run both ways). Training time excludes
compilation (each run compiles before its clock starts) and evaluation.
"""

from __future__ import annotations

import dataclasses
import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from efflax import data
from efflax.experiment import Verdict
from efflax.experiment import register
from efflax.experiment import write_metrics
from efflax.models import CNN1D
from efflax.optim import cycle_end_steps
from efflax.optim import exponential_cyclic_cosine_schedule
from efflax.optim import tradeoff_points
from efflax.training import TrainState
from efflax.training import classification_eval_fn
from efflax.training import cross_entropy_loss_fn
from efflax.training import fit
from efflax.training import make_train_step

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
    batch_size=100, learning_rate=1e-2, warmup_steps=20, first_cycle_steps=40, num_cycles=4,
    seeds=(0, 1),
)  # fmt: skip
FULL = Config(
    batch_size=100, learning_rate=1e-2, warmup_steps=40, first_cycle_steps=80, num_cycles=5,
    seeds=(0, 1, 2, 3, 4, 5, 6, 7),
)  # fmt: skip


class _TimedEval:
    """Wraps an eval_fn; remembers the evaluation time spent up to each evaluated step."""

    def __init__(self, eval_fn):
        self.eval_fn = eval_fn
        self.seconds = 0.0
        self.seconds_until: dict[int, float] = {}

    def __call__(self, state: TrainState) -> dict[str, float]:
        # Training steps still in flight (async dispatch) belong to training time, not eval.
        jax.block_until_ready(state.params)
        start = time.perf_counter()
        metrics = self.eval_fn(state)
        self.seconds += time.perf_counter() - start
        self.seconds_until[int(state.step)] = self.seconds
        return metrics


def train(
    schedule: optax.Schedule,
    *,
    num_steps: int,
    eval_steps: list[int],
    seed: int,
    config: Config,
    metrics_path: pathlib.Path | None = None,
) -> list[dict[str, float]]:
    """One Adam run of the CNN with ``schedule``; the tradeoff points at ``eval_steps``.

    Each point has ``step``, ``examples_seen``, ``wall_time``, ``train_time`` (wall time minus
    evaluation) and ``test/accuracy``.
    """
    model = CNN1D()
    params = model.init(jax.random.key(seed), np.zeros((1, 40), np.float32))["params"]
    state = TrainState.create(
        apply_fn=model.apply,
        params=nn.unbox(params),
        tx=optax.adam(schedule),
        rng=jax.random.key(seed + 1000),
    )
    loader = data.load("mnist1d", "train", config.batch_size, seed=seed, epochs=None)
    eval_fn = _TimedEval(classification_eval_fn(data.load_arrays("mnist1d", "test")))
    train_step = make_train_step(cross_entropy_loss_fn())
    # Compile outside the clock: every run has its own schedule, hence its own executable.
    jax.block_until_ready(train_step(jax.tree.map(jnp.copy, state), loader.batch_at(0)))
    eval_fn.eval_fn(state)
    if metrics_path is not None:
        metrics_path.unlink(missing_ok=True)
    _, history = fit(
        state,
        train_step,
        loader,
        num_steps=num_steps,
        eval_fn=eval_fn,
        eval_steps=eval_steps,
        log_every=num_steps,
        metrics_path=metrics_path,
        progress=False,
    )
    points = tradeoff_points(history, eval_steps, metric=METRIC)
    for point in points:
        point["train_time"] = point["wall_time"] - eval_fn.seconds_until[point["step"]]
    return points


def plot_tradeoff_curve(
    curves: dict[str, dict[str, np.ndarray]],
    png_path: pathlib.Path,
    *,
    schedules: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
    title: str = "",
) -> pathlib.Path:
    """Accuracy vs training time, one line per curve, every seed's points shown faintly.

    Args:
      curves: name -> {'time': [seeds, points], 'accuracy': [seeds, points]}.
      png_path: where to write the PNG.
      schedules: optional name -> (steps, values) drawn in a second panel.
      title: figure title.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = 2 if schedules else 1
    fig, axes = plt.subplots(1, panels, figsize=(5.2 * panels, 3.8), squeeze=False)
    ax = axes[0, 0]
    for (name, curve), color in zip(curves.items(), ("C0", "C1", "C2", "C3"), strict=False):
        times, accuracy = np.asarray(curve["time"]), 100 * np.asarray(curve["accuracy"])
        ax.scatter(times.ravel(), accuracy.ravel(), color=color, alpha=0.25, s=10)
        ax.plot(times.mean(0), accuracy.mean(0), marker="o", color=color, label=name)
    ax.set_xscale("log")
    ax.set_xlabel("training time (s, excluding compile and eval)")
    ax.set_ylabel("test accuracy (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    if schedules:
        ax = axes[0, 1]
        for name, (steps, values) in schedules.items():
            ax.plot(steps, values, label=name, lw=1)
        ax.set_xlabel("step")
        ax.set_ylabel("learning rate")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


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


@register("cyclic_lr", description="one cyclic-LR run vs one dedicated run per budget")
def run(out_dir: pathlib.Path, *, quick: bool) -> Verdict:
    config = QUICK if quick else FULL
    budgets = config.budgets
    print(f"budgets (cycle ends, steps): {budgets}; seeds {list(config.seeds)}", flush=True)
    cyclic: list[list[dict[str, float]]] = []
    dedicated: list[list[dict[str, float]]] = []
    for seed in config.seeds:
        cyclic.append(
            train(
                _cyclic_schedule(config),
                num_steps=budgets[-1],
                eval_steps=budgets,
                seed=seed,
                config=config,
                metrics_path=out_dir / f"cyclic_seed{seed}.jsonl",
            )
        )
        dedicated.append(
            [
                train(
                    _dedicated_schedule(config, budget),
                    num_steps=budget,
                    eval_steps=[budget],
                    seed=seed,
                    config=config,
                )[0]
                for budget in budgets
            ]
        )
        print(
            f"seed {seed}: cyclic "
            + " ".join(f"{100 * p[METRIC]:.1f}" for p in cyclic[-1])
            + f" ({cyclic[-1][-1]['train_time']:.1f} s) | dedicated "
            + " ".join(f"{100 * p[METRIC]:.1f}" for p in dedicated[-1])
            + f" ({sum(p['train_time'] for p in dedicated[-1]):.1f} s)",
            flush=True,
        )

    def table(runs, key):
        return np.array([[p[key] for p in points] for points in runs])

    acc_cyclic, acc_dedicated = table(cyclic, METRIC), table(dedicated, METRIC)
    time_cyclic, time_dedicated = table(cyclic, "train_time"), table(dedicated, "train_time")
    gap_points = 100 * (acc_cyclic.mean(0) - acc_dedicated.mean(0))
    # Cost of the curve: the cyclic run's total time vs all dedicated runs together, per seed.
    wall_ratio = time_cyclic[:, -1] / time_dedicated.sum(1)
    step_ratio = budgets[-1] / sum(budgets)
    passed_accuracy = bool(np.all(np.abs(gap_points) <= TOLERANCE_POINTS))
    not_worse = bool(np.all(gap_points >= -TOLERANCE_POINTS))
    passed_cost = bool(np.mean(wall_ratio) <= MAX_COST_RATIO)

    schedule_steps = np.arange(budgets[-1] + 1)
    plot_tradeoff_curve(
        {
            "cyclic (one run, cycle ends)": {"time": time_cyclic, "accuracy": acc_cyclic},
            "dedicated warmup+cosine runs": {"time": time_dedicated, "accuracy": acc_dedicated},
        },
        out_dir / "accuracy_vs_time.png",
        schedules={
            "cyclic": (schedule_steps, np.asarray(_cyclic_schedule(config)(schedule_steps))),
            **{
                f"dedicated {b}": (
                    schedule_steps[: b + 1],
                    np.asarray(_dedicated_schedule(config, b)(schedule_steps[: b + 1])),
                )
                for b in budgets
            },
        },
        title=f"MNIST-1D CNN, Adam, {len(config.seeds)} seed(s): Portes et al. 2022",
    )
    write_metrics(
        out_dir,
        {
            "config": dataclasses.asdict(config),
            "budgets_steps": budgets,
            "accuracy_cyclic": acc_cyclic,
            "accuracy_dedicated": acc_dedicated,
            "mean_accuracy_cyclic": acc_cyclic.mean(0),
            "mean_accuracy_dedicated": acc_dedicated.mean(0),
            "gap_points_cyclic_minus_dedicated": gap_points,
            "std_over_seeds_points_dedicated": 100 * acc_dedicated.std(0),
            "train_time_cyclic_s": time_cyclic,
            "train_time_dedicated_s": time_dedicated,
            "cost_ratio_wall_per_seed": wall_ratio,
            "cost_ratio_wall_mean": float(np.mean(wall_ratio)),
            "cost_ratio_steps": step_ratio,
            "passed_accuracy": passed_accuracy,
            "cyclic_not_worse_by_more_than_1_point": not_worse,
            "passed_cost": passed_cost,
        },
    )
    measured = (
        f"cyclic - dedicated accuracy at budgets {budgets} steps: "
        + ", ".join(f"{g:+.2f}" for g in gap_points)
        + f" points (mean of {len(config.seeds)} seeds; worst |gap| {np.abs(gap_points).max():.2f},"
        f" cyclic {'never' if not_worse else 'sometimes'} worse by > 1 point);"
        f" one run / all dedicated runs: {np.mean(wall_ratio):.2f} in time,"
        f" {step_ratio:.2f} in steps"
    )
    return Verdict(
        claim=(
            "end-of-cycle accuracy of one cyclic run within 1 point of a dedicated run at every "
            "budget, at about half the cost of all dedicated runs"
        ),
        measured=measured,
        status="PASS" if passed_accuracy and passed_cost else "FAIL",
    )


def main() -> None:
    from efflax.experiment import cli_main

    cli_main("cyclic_lr")


if __name__ == "__main__":
    main()
