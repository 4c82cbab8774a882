"""Accuracy-vs-training-time curves for every method family, one cyclic run per method.

Portes, Blalock, Stephenson, Frankle, "Fast Benchmarking of Accuracy vs. Training Time with
Cyclic Learning Rates", arXiv:2206.00832, 2022: an efficiency claim is a curve, not a point, and
one run with an exponential cyclic learning rate draws the whole curve (``efflax.curves``).

Families (each on one figure, Pareto front marked):
  1. MLP on MNIST-1D: dense vs Monarch hidden layers (Dao et al. 2022: about dense quality in
     about half the time);
  2. CNN on MNIST-1D: SGD vs SAM vs SAF vs MESA (Du et al. 2022: SAF/MESA reach SAM's quality at
     SGD's cost);
  3. masked byte LM: dense vs top-1 vs top-2 vs expert-choice MoE (Zhou et al. 2022: expert
     choice reaches top-2's quality in less than half the steps).

Per method and seed: one cyclic run (``exponential_cyclic_cosine_schedule``; points at
``cycle_end_steps``). The runs of a family train in lockstep, one step of each in turn, every
step timed alone (``efflax.curves.interleaved_cyclic_points``): on a shared machine, runs trained
one after the other would see different load. A point's time is its run's training time up to
that budget (compilation and evaluation excluded; process CPU time on a CPU host, wall time on an
accelerator); quality and time get 95% intervals over seeds.

Claim per family, from its paper, in wall time: the proposed method reaches the baseline's
quality in less time (speed-up >= 1, a bootstrap interval over seeds of the ratio of
times-to-quality). The report also says which method wins at which budget.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax

from efflax import curves
from efflax import data
from efflax._src.plotting import pyplot
from efflax._src.plotting import save_figure
from efflax.experiment import Claims
from efflax.experiment import Verdict
from efflax.experiment import cli_main
from efflax.experiment import register
from efflax.models import MLP
from efflax.nn import monarchify
from efflax.optim import cycle_end_steps
from efflax.optim import exponential_cyclic_cosine_schedule
from efflax.stats import mean_interval
from efflax.training import cross_entropy_loss_fn
from efflax.training import make_train_step
from efflax.training import seed_state
from efflax.training import seeds_eval_fn
from efflax.training import stack_states
from experiments import moe_routing
from experiments import saf


@dataclasses.dataclass(frozen=True)
class Cycles:
    """The exponential cyclic schedule of a family: its budgets are the curve's points."""

    peak: float
    first_cycle_steps: int
    num_cycles: int
    warmup_steps: int

    def schedule(self) -> optax.Schedule:
        return exponential_cyclic_cosine_schedule(
            self.peak,
            self.first_cycle_steps,
            num_cycles=self.num_cycles,
            warmup_steps=self.warmup_steps,
        )

    @property
    def budgets(self) -> list[int]:
        return cycle_end_steps(
            self.first_cycle_steps, num_cycles=self.num_cycles, warmup_steps=self.warmup_steps
        )


@dataclasses.dataclass
class Method:
    """How to train one method: a state per seed, an unjitted step, loaders, an evaluation.

    ``make_state(seed, schedule)`` must build every seed's state from one model and one
    optimizer object per schedule (so the states stack).
    """

    name: str
    make_state: Callable[[int, optax.Schedule], Any]
    make_step: Callable[[], Callable]
    make_loader: Callable[[int], Any]


@dataclasses.dataclass
class Family:
    name: str
    title: str
    methods: list[Method]
    cycles: Cycles
    eval_fn: Callable
    metric: str
    higher_is_better: bool
    baseline: str
    proposed: str
    claim: str


def run_family(family: Family, seeds: tuple[int, ...]) -> dict[str, list[list[dict]]]:
    """Every method x seed trained in lockstep; the points of each run, by method."""
    schedule = family.cycles.schedule()
    evaluate = lambda state: family.eval_fn(stack_states([state]))
    runs = {}
    for method in family.methods:
        step = jax.jit(method.make_step(), donate_argnums=(0,))  # one compilation per method
        for seed in seeds:
            state = method.make_state(seed, schedule)
            runs[f"{method.name}/{seed}"] = (state, step, method.make_loader(seed), evaluate)
    points = curves.interleaved_cyclic_points(
        runs, budgets=family.cycles.budgets, metric=family.metric
    )
    return {m.name: [points[f"{m.name}/{s}"] for s in seeds] for m in family.methods}


# --- the families ---------------------------------------------------------------------------


def monarch_family(quick: bool) -> Family:
    # Width 1024: at 512 a Monarch step is no faster than a dense one on a CPU.
    width, nblocks, batch_size = 1024, 4, 128
    dense = MLP(features=(width, width, width))
    hidden = lambda layer, in_features: in_features == width and layer.features == width
    models = {"dense": dense, "monarch": monarchify(dense, nblocks=nblocks, include=hidden)}
    txs: dict[tuple[str, int], optax.GradientTransformation] = {}

    def method(name: str) -> Method:
        def make_state(seed: int, schedule: optax.Schedule):
            tx = txs.setdefault((name, id(schedule)), optax.adam(schedule))
            return seed_state(models[name], tx, seed=seed, example=np.zeros((1, 40), np.float32))

        return Method(
            name,
            make_state,
            lambda: make_train_step(cross_entropy_loss_fn(), jit=False),
            lambda seed: data.load("mnist1d", "train", batch_size, seed=seed, epochs=None),
        )

    cycles = Cycles(2e-3, 40, 2, 20) if quick else Cycles(2e-3, 100, 5, 50)
    return Family(
        "monarch",
        f"MNIST-1D MLP 40-{width}x3-10: dense vs Monarch (nblocks {nblocks})",
        [method("dense"), method("monarch")],
        cycles,
        seeds_eval_fn(data.load_arrays("mnist1d", "test")),
        "test/accuracy",
        True,
        "dense",
        "monarch",
        "Monarch reaches dense's accuracy in less training time (paper: ~2x)",
    )


def moe_family(quick: bool) -> Family:
    cfg = dataclasses.replace(moe_routing.QUICK if quick else moe_routing.FULL, seeds=())
    txs: dict[tuple[str, int], optax.GradientTransformation] = {}
    models = {v: moe_routing.build_model(v, cfg) for v in moe_routing.VARIANTS}
    example = moe_routing.example_inputs(cfg)

    def method(name: str) -> Method:
        def make_state(seed: int, schedule: optax.Schedule):
            tx = txs.setdefault((name, id(schedule)), optax.adamw(schedule, weight_decay=1e-4))
            return seed_state(models[name], tx, seed=seed, example=example)

        return Method(
            name,
            make_state,
            lambda: make_train_step(moe_routing.make_loss_fn(cfg), jit=False),
            lambda seed: data.load("stdlib_text", "train", cfg.batch_size, seed=seed, epochs=None),
        )

    cycles = Cycles(3e-3, 50, 2, 25) if quick else Cycles(3e-3, 100, 5, 50)
    return Family(
        "moe",
        f"masked byte LM: FFN routing, {cfg.num_experts} experts, equal activated compute",
        [method(v) for v in moe_routing.VARIANTS],
        cycles,
        moe_routing.make_eval_fn(cfg),
        "val/mlm",
        False,
        "top2",
        "expert_choice",
        "expert choice reaches top-2's validation loss in less training time (paper: > 2x "
        "fewer steps)",
    )


def saf_family(quick: bool) -> Family:
    # The trajectory term as early as it can be (epochs > lag - 1), so that every point of the
    # curve after the first epochs has it; the rest as in the saf experiment.
    cfg = dataclasses.replace(saf.QUICK if quick else saf.FULL, start_fraction=0.0)
    train = data.load_arrays("mnist1d", "train")
    steps_per_epoch = len(train["y"]) // cfg.batch_size

    def method(name: str) -> Method:
        make_state, make_step = saf.make_method(name, cfg, len(train["y"]), steps_per_epoch)
        return Method(
            name,
            make_state,
            make_step,
            lambda seed: data.Loader(train, cfg.batch_size, seed=seed, epochs=None),
        )

    cycles = Cycles(0.1, 80, 2, 40) if quick else Cycles(0.1, 80, 5, 40)
    test = data.load_arrays("mnist1d", "test")
    return Family(
        "saf",
        "MNIST-1D CNN: SGD vs SAM vs SAF vs MESA (EMA evaluation)",
        [method(m) for m in saf.METHODS],
        cycles,
        seeds_eval_fn(test, params_of=saf.ema_params),
        "test/accuracy",
        True,
        "sgd",
        "saf",
        "SAF reaches SGD's accuracy in no more training time (paper: SAM's gains at SGD's cost)",
    )


FAMILIES: dict[str, Callable[[bool], Family]] = {
    "monarch": monarch_family,
    "saf": saf_family,
    "moe": moe_family,
}


def _plot(results: dict[str, dict], path: pathlib.Path) -> None:
    fig, axes = pyplot().subplots(1, len(results), figsize=(6 * len(results), 4.3), squeeze=False)
    for ax, r in zip(axes[0], results.values(), strict=True):
        family = r["family"]
        scale = 100.0 if family.higher_is_better else 1.0
        label = "test accuracy (%)" if family.higher_is_better else family.metric
        curves.plot(r["curves"], ax=ax, title=family.title, metric_scale=scale, metric_label=label)
    save_figure(fig, path)


@register(
    "tradeoff_curves",
    description="accuracy-vs-time curves per family (Monarch, SAF/MESA/SAM, MoE routing)",
    timing_sensitive="sections",  # times only through efflax.curves.interleaved_cyclic_points
)
def run(out_dir: pathlib.Path, *, quick: bool) -> Verdict:
    seeds = (0, 1, 2) if quick else tuple(range(6))
    claims, results, ms_per_step, time_key = (
        Claims(),
        {},
        {},
        {"cpu": "train_cpu_time", "wall": "train_time"}[curves.decisive_clock()],
    )
    for name, build in FAMILIES.items():
        family = build(quick)
        runs = run_family(family, seeds)
        family_curves = [
            curves.Curve.from_runs(
                m,
                points,
                metric=family.metric,
                time_key=time_key,
                higher_is_better=family.higher_is_better,
            )
            for m, points in runs.items()
        ]
        values = {
            m: np.array([[p[family.metric] for p in run] for run in r]) for m, r in runs.items()
        }
        speedup = curves.time_speedup(
            runs,
            family.baseline,
            family.proposed,
            metric=family.metric,
            time_key=time_key,
            higher_is_better=family.higher_is_better,
        )
        claims.check(f"{name}_{family.proposed}_time_speedup_over_{family.baseline}", speedup, 1.0)
        budget = family.cycles.budgets[-1]
        for m, r in runs.items():
            ms_per_step[f"{name}_{m}"] = mean_interval(
                [1e3 * run[-1][time_key] / budget for run in r]
            )
        results[name] = {
            "family": family,
            "speedup": speedup,
            "curves": family_curves,
            "values": values,
            "summary": curves.summary(family_curves),
            "front": curves.pareto_front(family_curves),
        }
        print(
            f"{name}: ms per step "
            + ", ".join(f"{m} {ms_per_step[f'{name}_{m}'].value:.2f}" for m in runs)
            + f"; {family.proposed} vs {family.baseline} time speed-up {speedup.format('.2f')}; "
            f"best by budget: {results[name]['summary']}",
            flush=True,
        )
    _plot(results, pathlib.Path(out_dir) / "tradeoff_curves.png")
    measured = " | ".join(
        f"{name}: {r['family'].proposed} / {r['family'].baseline} time-to-quality speed-up "
        f"{r['speedup'].format('.2f')}x; best by budget: {r['summary']}"
        for name, r in results.items()
    )
    return claims.verdict(
        out_dir,
        claim="; ".join(r["family"].claim for r in results.values())
        + " (one cyclic run per method, intervals over seeds)",
        measured=measured + f" ({len(seeds)} seeds)",
        metrics={
            "seeds": seeds,
            "ms_per_step": ms_per_step,
            "families": {
                name: {
                    "budgets": r["family"].cycles.budgets,
                    "metric": r["family"].metric,
                    "values_per_seed": r["values"],
                    "curves": [dataclasses.asdict(c) for c in r["curves"]],
                    "pareto_front": r["front"],
                    "winners": r["summary"],
                }
                for name, r in results.items()
            },
        },
    )


if __name__ == "__main__":
    cli_main("tradeoff_curves")
