"""Adam at the edge of stability (Cohen et al. 2022, arXiv 2207.14484) on MNIST-1D.

Claim: full-batch Adam trains with the preconditioned sharpness (top eigenvalue of
P^-1/2 H P^-1/2, P = sqrt(v_hat) + eps) rising to and hovering at (2 + 2 b1) / ((1 - b1) lr),
38 / lr for b1 = 0.9, while the raw sharpness need not; full-batch GD hovers at 2 / lr.

Set-up (PAPERS.md): ``efflax.models.MLP`` 40-200-200-10 with tanh, MSE on one-hot targets, the
first 1,000 MNIST-1D training examples as one full batch (an ``efflax.data.Loader`` that yields
the whole set every step), Adam b1 0.9, b2 0.999, eps 1e-7, trained with ``efflax.training.fit``;
``efflax.optim.SharpnessProbe`` measures the preconditioned and raw sharpness as a ``fit`` hook.
Every learning rate runs with several initialisation seeds; the quantity per run is the mean of
the probes in the second half of training divided by 38 / lr, and the claim holds when its 95%
interval over seeds lies within 10% of 1 for every learning rate.
"""

from __future__ import annotations

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from efflax import data
from efflax.experiment import Claims
from efflax.experiment import Panel
from efflax.experiment import Verdict
from efflax.experiment import cli_main
from efflax.experiment import plot_panels
from efflax.experiment import register
from efflax.models import MLP
from efflax.optim import SharpnessProbe
from efflax.optim import adam_stability_threshold
from efflax.optim import gd_stability_threshold
from efflax.optim import sharpness
from efflax.stats import Estimate
from efflax.stats import mean_interval
from efflax.stats import offset
from efflax.training import fit
from efflax.training import make_train_step
from efflax.training import seed_state

HIDDEN = (200, 200)
NUM_EXAMPLES = 1000
B1, B2, EPS = 0.9, 0.999, 1e-7
LANCZOS_STEPS = 20
TOLERANCE = 0.10  # verdict: second-half mean within 10% of 38 / lr
GD_LR = 0.1  # the initial sharpness (~23) is above 2/lr = 20: GD sits at the edge at once

# raw: also probe the raw sharpness of the Adam runs (context for the plot; doubles probe cost).
# The GD run is context for the plot (not part of the verdict): one seed at quick size.
QUICK = dict(
    adam_lrs=(2e-3, 4e-3),
    steps=800,
    gd_steps=400,
    seeds=(0, 1, 2),
    gd_seeds=(0,),
    probe_every=100,
    raw=False,
)
FULL = dict(
    adam_lrs=(3e-4, 1e-3, 2e-3),
    steps=6000,
    gd_steps=3000,
    seeds=(0, 1, 2, 3, 4),
    gd_seeds=(0, 1, 2, 3, 4),
    probe_every=50,
    raw=True,
)


def make_model() -> MLP:
    """The tanh MLP 40-200-200-10."""
    return MLP(features=HIDDEN, activation=jnp.tanh)


def load_data(num_examples: int = NUM_EXAMPLES) -> dict[str, np.ndarray]:
    """The first ``num_examples`` MNIST-1D training examples: x [N, 40], one-hot y [N, 10]."""
    arrays = data.load_arrays("mnist1d", "train")
    x = np.asarray(arrays["x"][:num_examples], np.float32)
    y = np.eye(10, dtype=np.float32)[arrays["y"][:num_examples]]
    return {"x": x, "y": y}


def mse(apply_fn, params, batch) -> jax.Array:
    """0.5 * mean over examples of the squared error summed over classes."""
    prediction = apply_fn({"params": params}, batch["x"])
    return 0.5 * jnp.mean(jnp.sum((prediction - batch["y"]) ** 2, axis=-1))


def full_batch_loader(arrays: dict[str, np.ndarray]) -> data.Loader:
    """Every step sees the whole set, in order (full-batch training)."""
    return data.Loader(arrays, len(arrays["x"]), shuffle=False, epochs=None)


class _RawSharpness:
    """A ``fit`` hook for GD: the top Hessian eigenvalue (``SharpnessProbe`` needs Adam's state)."""

    def __init__(self, loss_fn, batch, every: int):
        self.every = every
        self._measure = jax.jit(
            lambda params, key: sharpness(
                lambda p: loss_fn(p, batch), params, num_steps=LANCZOS_STEPS, key=key
            )
        )

    def __call__(self, state) -> dict[str, float]:
        key = jax.random.fold_in(jax.random.key(1), int(state.step))
        return {"sharpness": float(self._measure(state.params, key))}


def train(model, tx, probe, *, seed: int, steps: int, arrays, step_fn) -> list[dict]:
    """One full-batch run with ``fit``; returns its records (the probe's values among them)."""
    state = seed_state(model, tx, seed=seed, example=np.zeros((1, 40), np.float32))
    _, history = fit(
        state,
        step_fn,
        full_batch_loader(arrays),
        num_steps=steps,
        hooks=[probe],
        log_every=probe.every,
        progress=False,
    )
    return history


def second_half(history: list[dict], key: str) -> np.ndarray:
    values = np.array([r[key] for r in history if key in r])
    return values[len(values) // 2 :]


def plot(runs: dict, out_dir: pathlib.Path) -> pathlib.Path:
    """Preconditioned sharpness (Adam), raw sharpness and training loss of every run."""
    precond, raw, loss, hlines = {}, {}, {}, ([], [])
    for name, run in runs.items():
        adam = run["optimizer"] == "adam"
        for i, history in enumerate(run["histories"]):
            label = f"{name} seed {i}"
            if adam:
                precond[label] = _curve(history, "preconditioned_sharpness")
            if any("sharpness" in r for r in history):  # the raw sharpness (full size, and GD)
                raw[label] = _curve(history, "sharpness")
            loss[label] = _curve(history, "train/loss")
        hlines[0 if adam else 1].append(run["threshold"])
    return plot_panels(
        out_dir / "adam_eos.png",
        [
            Panel("Adam: preconditioned sharpness vs 38/lr (dotted)", precond,
                  yscale="log", hlines=tuple(hlines[0])),
            Panel("raw sharpness (GD: vs 2/lr, dotted)", raw, yscale="log", hlines=tuple(hlines[1])),
            Panel("training loss (full batch)", loss, yscale="log"),
        ],
    )  # fmt: skip


def _curve(history: list[dict], key: str) -> tuple[list, list]:
    return [r["step"] for r in history if key in r], [r[key] for r in history if key in r]


@register(
    "adam_eos",
    description="Adam's preconditioned sharpness hovers at 38/lr (MNIST-1D)",
    timing_sensitive=False,
)
def run(out_dir: pathlib.Path, *, quick: bool) -> Verdict:
    out_dir = pathlib.Path(out_dir)
    cfg = QUICK if quick else FULL
    arrays = load_data()
    batch = jax.tree.map(jnp.asarray, arrays)
    model = make_model()
    loss_fn = lambda params, batch: mse(model.apply, params, batch)
    step_fn = make_train_step(lambda params, state, batch, rng: loss_fn(params, batch))
    runs: dict[str, dict] = {}
    ratios_by_lr: dict[float, Estimate] = {}
    claims = Claims()
    start = time.perf_counter()
    for lr in cfg["adam_lrs"]:
        name = f"adam lr={lr:g}"
        tx = optax.adam(lr, b1=B1, b2=B2, eps=EPS)
        probe = SharpnessProbe(
            loss_fn,
            cfg["probe_every"],
            learning_rate=lr,
            b1=B1,
            eps=EPS,
            b2=B2,
            num_steps=LANCZOS_STEPS,
            batch=batch,
            raw=cfg["raw"],
        )
        histories = [
            train(model, tx, probe, seed=s, steps=cfg["steps"], arrays=arrays, step_fn=step_fn)
            for s in cfg["seeds"]
        ]
        ratios = [second_half(h, "preconditioned_sharpness_ratio").mean() for h in histories]
        raw = [second_half(h, "sharpness").mean() for h in histories] if cfg["raw"] else []
        ratio = mean_interval(ratios)
        ratios_by_lr[lr] = claims.context(f"precond_sharpness_over_38_lr_at_lr_{lr:g}", ratio)
        claims.check(
            f"precond_sharpness_over_38_lr_minus_1_at_lr_{lr:g}",
            offset(ratio, 1.0),
            TOLERANCE,
            "within",
        )
        runs[name] = {
            "optimizer": "adam",
            "learning_rate": lr,
            "threshold": adam_stability_threshold(lr, B1),
            "ratio_per_seed": ratios,
            "raw_second_half_mean_per_seed": raw,
            "histories": histories,
        }
        print(
            f"{name}: preconditioned sharpness / (38/lr) = {ratio.format('.3f')}"
            + (f"; raw {np.mean(raw):.3g}" if raw else "")
            + f" ({time.perf_counter() - start:.0f} s)",
            flush=True,
        )
    name = f"gd lr={GD_LR:g}"
    gd_probe = _RawSharpness(loss_fn, batch, cfg["probe_every"])
    gd_tx = optax.sgd(GD_LR)
    histories = [
        train(model, gd_tx, gd_probe, seed=s, steps=cfg["gd_steps"], arrays=arrays, step_fn=step_fn)
        for s in cfg["gd_seeds"]
    ]
    gd_threshold = gd_stability_threshold(GD_LR)
    gd_ratio = mean_interval([second_half(h, "sharpness").mean() / gd_threshold for h in histories])
    claims.context(f"gd_sharpness_over_2_lr_at_lr_{GD_LR:g}", gd_ratio)
    runs[name] = {
        "optimizer": "gd",
        "learning_rate": GD_LR,
        "threshold": gd_threshold,
        "ratio_per_seed": list(gd_ratio.samples),
        "histories": histories,
    }
    print(f"{name}: sharpness / (2/lr) = {gd_ratio.format('.3f')}", flush=True)
    plot(runs, out_dir)
    parts = [f"lr {lr:g}: {e.format('.3f')} x 38/lr" for lr, e in ratios_by_lr.items()]
    measured = (
        "; ".join(parts)
        + f"; GD lr {GD_LR:g}: raw sharpness {gd_ratio.format('.3f')} x 2/lr (context, not "
        f"part of the verdict); second-half means of probes every {cfg['probe_every']} steps "
        f"over {cfg['steps']} Adam / {cfg['gd_steps']} GD steps, {len(cfg['seeds'])} seeds"
    )
    return claims.verdict(
        out_dir,
        claim="full-batch Adam's preconditioned sharpness hovers at 38/lr (within 10%)",
        measured=measured,
        metrics={
            "config": cfg,
            "lanczos_steps": LANCZOS_STEPS,
            "tolerance": TOLERANCE,
            "seconds": time.perf_counter() - start,
            "runs": runs,
        },
    )


if __name__ == "__main__":
    cli_main("adam_eos")
