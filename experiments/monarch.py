"""Monarch MLPs on MNIST-1D: dense vs Monarch vs Monarch-then-dense (reverse sparsification).

Dao et al., "Monarch: Expressive Structured Matrices for Efficient and Accurate Training",
arXiv 2204.00595 (2022). Claim: replacing the dense matrices of MLP blocks by Monarch matrices
keeps about the same quality for about 2x less training time, and converting the Monarch model
to dense for the last ~10% of training ("reverse sparsification") recovers dense quality.

Here: a wide ReLU MLP 40 -> W -> W -> W -> 10 (``efflax.models.MLP``) trained with Adam on
MNIST-1D; the two W -> W layers are dense, Monarch (``monarchify``, nblocks 4 as in the paper's
GPT-2/ViT MLPs), or Monarch switched exactly to dense (``monarch_params_to_dense``) for the last
10% of the steps. Several seeds train at once (a vmapped step). Claims decided:

1. quality: Monarch and Monarch-then-dense test accuracy minus dense, paired by seed, >= -2
   points (95% interval);
2. speed: dense step time / Monarch step time >= 1 (paper ~2x), from single-seed train steps
   timed round-robin (``efflax.curves.interleaved_times``), in process CPU time on a CPU host (steadier
   than wall time on a shared machine), with an interval over rounds.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from efflax import data
from efflax.curves import interleaved_times
from efflax.experiment import Verdict
from efflax.experiment import register
from efflax.experiment import write_metrics
from efflax.models import MLP
from efflax.nn import ReverseSparsification
from efflax.nn import monarch_params_to_dense
from efflax.nn import monarch_shapes
from efflax.nn import monarchify
from efflax.stats import combine_statuses
from efflax.stats import decide
from efflax.stats import mean_interval
from efflax.stats import paired_difference
from efflax.stats import ratio_interval
from efflax.training import SeedLoader
from efflax.training import cross_entropy_loss_fn
from efflax.training import fit
from efflax.training import make_train_step
from efflax.training import per_seed
from efflax.training import per_seed_curve
from efflax.training import seed_state
from efflax.training import seeds_eval_fn
from efflax.training import seeds_step
from efflax.training import stack_states

EXAMPLE = np.zeros((1, 40), np.float32)  # one MNIST-1D signal, to initialise on
VARIANTS = ("dense", "monarch", "monarch_then_dense")
ACCURACY_TOLERANCE = 2.0  # points below dense that still count as "about dense quality"


@dataclasses.dataclass(frozen=True)
class Config:
    width: int
    steps: int
    seeds: tuple[int, ...]
    num_samples: int | None = None  # MNIST-1D size (None: the standard 5,000)
    nblocks: int = 4
    batch_size: int = 128
    learning_rate: float = 2e-3
    dense_fraction: float = 0.1
    timing_rounds: int = 20
    timing_repeat: int = 5


# With the standard 4k training set a 2M-parameter MLP memorises it long before the switch to
# dense: both sizes use a 50k-sample MNIST-1D (40k train). Width 1024: at 512 a Monarch step is
# no faster than a dense one on a CPU.
QUICK = Config(width=1024, steps=400, seeds=(0, 1, 2), num_samples=50_000)
FULL = Config(width=1024, steps=3000, seeds=tuple(range(6)), num_samples=50_000, timing_rounds=40)


def _hidden_only(width: int):
    return lambda dense, in_features: in_features == width and dense.features == width


def _flops_per_example(width: int, nblocks: int | None, depth: int = 3) -> int:
    """Forward multiply-adds x 2 of the MLP 40 -> width (x depth) -> 10."""
    macs = 40 * width + width * 10
    for _ in range(depth - 1):
        if nblocks is None:
            macs += width * width
        else:
            w1, w2 = monarch_shapes(width, width, nblocks)
            macs += math.prod(w1) + math.prod(w2)
    return 2 * macs


def _schedule(cfg: Config, offset: int = 0):
    base = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.steps // 20, cfg.steps, 0.0
    )
    return lambda count: base(count + offset)


def _models(cfg: Config):
    dense = MLP(features=(cfg.width,) * 3)
    return dense, monarchify(dense, nblocks=cfg.nblocks, include=_hidden_only(cfg.width))


def _size(cfg: Config) -> dict:
    return {} if cfg.num_samples is None else {"num_samples": cfg.num_samples}


def _loader(cfg: Config, seed: int) -> data.Loader:
    return data.load("mnist1d", "train", cfg.batch_size, seed=seed, epochs=None, **_size(cfg))


def _result(history: list[dict], state) -> dict:
    return {
        "params": sum(x[0].size for x in jax.tree.leaves(state.params)),
        "test_accuracy": 100 * per_seed(history, "test/accuracy"),
        "curve": per_seed_curve(history, "test/accuracy"),
    }


def train_variants(cfg: Config) -> dict[str, dict]:
    """Dense; Monarch; and Monarch-then-dense, branched from the Monarch run at the switch (the
    same run up to there), all seeds at once. Returns per-seed accuracies and curves."""
    dense_model, sparse_model = _models(cfg)
    loader = SeedLoader([_loader(cfg, s) for s in cfg.seeds])
    eval_fn = seeds_eval_fn(data.load_arrays("mnist1d", "test", **_size(cfg)))
    fit_kwargs = dict(eval_fn=eval_fn, eval_every=max(cfg.steps // 20, 1), progress=False)
    switch = ReverseSparsification(cfg.steps, cfg.dense_fraction).switch_step

    def start(model, tx):
        state = stack_states([seed_state(model, tx, seed=s, example=EXAMPLE) for s in cfg.seeds])
        step = seeds_step(make_train_step(cross_entropy_loss_fn(), jit=False))
        return state, step

    results = {}
    state, step = start(dense_model, optax.adam(_schedule(cfg)))
    state, history = fit(
        state, step, loader, num_steps=cfg.steps, log_every=cfg.steps, **fit_kwargs
    )
    results["dense"] = _result(history, state)

    state, step = start(sparse_model, optax.adam(_schedule(cfg)))
    state, head = fit(state, step, loader, num_steps=switch, log_every=switch, **fit_kwargs)
    # The branch: the Monarch params made dense (exactly the same function); the Adam moments
    # restart for the new kernels, the learning-rate schedule continues.
    before = eval_fn(state)
    dense_tx = optax.adam(_schedule(cfg, offset=switch))
    dense_state, dense_step = start(dense_model, dense_tx)
    dense_params = jax.vmap(monarch_params_to_dense)(jax.tree.map(jnp.copy, state.params))
    dense_state = dense_state.replace(
        params=dense_params,
        opt_state=jax.vmap(dense_tx.init)(dense_params),
        rng=jnp.copy(state.rng),
        step=jnp.copy(state.step),  # the Monarch run's step donates its own buffers
    )
    after = eval_fn(dense_state)
    last = cfg.steps - switch
    state, tail = fit(state, step, loader, num_steps=cfg.steps, log_every=last, **fit_kwargs)
    results["monarch"] = _result(head + tail, state)
    dense_state, tail = fit(
        dense_state, dense_step, loader, num_steps=cfg.steps, log_every=last, **fit_kwargs
    )
    results["monarch_then_dense"] = _result(head + tail, dense_state)
    results["monarch_then_dense"]["switch_step"] = switch
    results["monarch_then_dense"]["test_loss_change_at_switch"] = [
        after[f"test/loss/seed_{i}"] - before[f"test/loss/seed_{i}"] for i in range(len(cfg.seeds))
    ]
    return results


def step_times(cfg: Config) -> dict:
    """Single-seed train steps of dense and Monarch, timed round-robin (wall and CPU)."""
    fns = {}
    for name, model in zip(("dense", "monarch"), _models(cfg), strict=True):
        tx = optax.adam(_schedule(cfg))
        holder = {"state": seed_state(model, tx, seed=0, example=EXAMPLE)}
        step = make_train_step(cross_entropy_loss_fn())
        batch = jax.tree.map(jnp.asarray, _loader(cfg, 0).batch_at(0))

        def call(step=step, holder=holder, batch=batch):
            holder["state"], metrics = step(holder["state"], batch)
            return holder["state"].params, metrics

        fns[name] = (call, ())
    return interleaved_times(fns, rounds=cfg.timing_rounds, warmup=2, repeat=cfg.timing_repeat)


def _plot(results: dict, speedup, out_dir: pathlib.Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_acc, ax_time) = plt.subplots(1, 2, figsize=(11, 4))
    for k, variant in enumerate(VARIANTS):
        steps, acc = results[variant]["curve"]
        for row in acc:
            ax_acc.plot(steps, 100 * row, color=f"C{k}", alpha=0.25, lw=0.8)
        ax_acc.plot(steps, 100 * acc.mean(0), color=f"C{k}", label=variant)
    switch = results["monarch_then_dense"].get("switch_step")
    if switch:
        ax_acc.axvline(switch, color="gray", linestyle=":", label="switch to dense")
    ax_acc.set(xlabel="step", ylabel="test accuracy (%)", title=title)
    ax_acc.legend()
    ax_acc.grid(alpha=0.3)
    ax_time.bar(["dense / monarch"], [speedup.value], color="C1", alpha=0.6)
    ax_time.errorbar(
        [0], [speedup.value], yerr=[[speedup.value - speedup.low], [speedup.high - speedup.value]],
        color="k", capsize=6,
    )  # fmt: skip
    ax_time.axhline(2.0, color="r", ls="--", label="paper ~2x")
    ax_time.axhline(1.0, color="gray", lw=0.8)
    ax_time.set(ylabel="train step time ratio (95% interval)", title="speed-up of a train step")
    ax_time.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "monarch.png", dpi=100)
    plt.close(fig)


@register(
    "monarch",
    description="Monarch vs dense vs Monarch-then-dense MLP on MNIST-1D",
    timing_sensitive="sections",  # times only through efflax.curves.interleaved_times
)
def run(out_dir: pathlib.Path, *, quick: bool) -> Verdict:
    cfg = QUICK if quick else FULL
    out_dir = pathlib.Path(out_dir)
    results = train_variants(cfg)
    for variant in VARIANTS:
        print(
            f"{variant}: test accuracy per seed {np.round(results[variant]['test_accuracy'], 2)}",
            flush=True,
        )
    times = step_times(cfg)
    clock = "cpu" if jax.default_backend() == "cpu" else "wall"
    dense_t = times["dense"].cpu if clock == "cpu" else list(times["dense"])
    monarch_t = times["monarch"].cpu if clock == "cpu" else list(times["monarch"])
    speedup = ratio_interval(dense_t, monarch_t)  # paired by round
    dense_acc = results["dense"]["test_accuracy"]
    estimates = {
        "monarch_minus_dense_accuracy_points": paired_difference(
            results["monarch"]["test_accuracy"], dense_acc
        ),
        "monarch_then_dense_minus_dense_accuracy_points": paired_difference(
            results["monarch_then_dense"]["test_accuracy"], dense_acc
        ),
        f"train_step_speedup_{clock}": speedup,
        "dense_test_accuracy": mean_interval(dense_acc),
        "dense_step_ms": mean_interval([1e3 * t for t in dense_t]),
        "monarch_step_ms": mean_interval([1e3 * t for t in monarch_t]),
    }
    statuses = {
        "monarch quality": decide(
            estimates["monarch_minus_dense_accuracy_points"], -ACCURACY_TOLERANCE
        ),
        "monarch->dense quality": decide(
            estimates["monarch_then_dense_minus_dense_accuracy_points"], -ACCURACY_TOLERANCE
        ),
        "faster step": decide(speedup, 1.0),
    }
    flops = {
        v: _flops_per_example(cfg.width, None if v == "dense" else cfg.nblocks) for v in VARIANTS
    }
    _plot(results, speedup, out_dir, f"MNIST-1D MLP width {cfg.width}, nblocks {cfg.nblocks}")
    write_metrics(
        out_dir,
        {
            "config": dataclasses.asdict(cfg),
            "estimates": estimates,
            "statuses": statuses,
            "flops_per_example_fwd": flops,
            "params": {v: results[v]["params"] for v in VARIANTS},
            "test_loss_change_at_switch": results["monarch_then_dense"][
                "test_loss_change_at_switch"
            ],
            "step_seconds": {k: {"wall": list(t), "cpu": t.cpu} for k, t in times.items()},
            "runs": {v: {"test_accuracy": r["test_accuracy"]} for v, r in results.items()},
        },
    )
    e = estimates
    jump = np.abs(results["monarch_then_dense"]["test_loss_change_at_switch"]).max()
    measured = (
        f"dense test accuracy {e['dense_test_accuracy'].format('.1f')}%; Monarch - dense "
        f"{e['monarch_minus_dense_accuracy_points'].format('+.2f')} points "
        f"({statuses['monarch quality']} at >= -2), Monarch->dense - dense "
        f"{e['monarch_then_dense_minus_dense_accuracy_points'].format('+.2f')} points "
        f"({statuses['monarch->dense quality']}); train step {speedup.format('.2f')}x faster "
        f"({clock} time, {statuses['faster step']} at >= 1; paper ~2x); "
        f"{flops['dense'] / flops['monarch']:.1f}x fewer FLOPs, params "
        f"{results['dense']['params']} vs {results['monarch']['params']}; the switch to dense "
        f"changes test loss by at most {jump:.1e} (exact); {len(cfg.seeds)} seeds, {cfg.steps} "
        f"steps, width {cfg.width}"
    )
    return Verdict(
        claim="Monarch MLPs: about dense quality (>= dense - 2 points) with a faster train step "
        "(paper ~2x); Monarch-then-dense recovers dense quality",
        measured=measured,
        status=combine_statuses(list(statuses.values())),
        estimates=estimates,
    )


def main() -> None:
    from efflax.experiment import cli_main

    cli_main("monarch")


if __name__ == "__main__":
    main()
