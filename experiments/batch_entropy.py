"""Layerwise batch-entropy regularisation (Peer et al., TMLR 2022, arXiv 2208.01134) on MNIST-1D.

Deep "vanilla" ReLU MLPs (``efflax.models.MLP``: no residuals, no normalisation, no dropout) with
PyTorch's default initialisation (``U(+-1/sqrt(fan_in))`` for weights and biases, as in the
official code) collapse: the batch entropy of the deep layers is 0, every input gives the same
logits, and cross-entropy training stays at chance. With the LBE loss,
``CE * (1 + beta * mean_l (H_l - max(alpha_min, |alpha_l|))^2)`` over the hidden ReLU outputs
(collected with ``capture_activations``, the model unchanged), the same nets train.

Claim (paper: 500-layer vanilla nets become trainable; PAPERS.md pilot at CPU size): the plain
net stays <= 12% test accuracy and the LBE net reaches >= 30%, at every depth, over seeds.
Hyperparameters from the official deep-FNN sweep: beta 0.1, alpha init 2.0, alpha_min 0.2, Adam,
batch 128; the learnable alphas are trained by the same optimizer.
"""

from __future__ import annotations

import dataclasses
import pathlib

import flax.linen as nn
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
from efflax.losses import batch_entropy
from efflax.losses import capture_activations
from efflax.losses import lbe_loss
from efflax.losses import soft_target_cross_entropy
from efflax.models import MLP
from efflax.training import LossOutput
from efflax.training import SplitLoader
from efflax.training import TrainState
from efflax.training import fit_seeds
from efflax.training import init_params
from efflax.training import seeds_eval_fn

ARMS = ("ce", "lbe")


@dataclasses.dataclass(frozen=True)
class Config:
    depths: tuple[int, ...]
    seeds: tuple[int, ...]
    steps: int
    width: int = 128
    batch_size: int = 128  # per seed
    learning_rate: float = 1e-4
    beta: float = 0.1
    alpha_init: float = 2.0
    alpha_min: float = 0.2
    chance_bar: float = 12.0  # points
    trained_bar: float = 30.0


QUICK = Config(
    depths=(30,), seeds=(0, 1, 2, 3), steps=1200, width=64, batch_size=64, learning_rate=5e-4
)
FULL = Config(depths=(30, 50), seeds=(0, 1, 2, 3, 4), steps=3000)


def torch_default_init(params, key: jax.Array):
    """Redraws every Dense kernel and bias from ``U(+-1/sqrt(fan_in))`` (``torch.nn.Linear``)."""
    layers = sorted(params)
    keys = jax.random.split(key, 2 * len(layers))
    out = {}
    for i, name in enumerate(layers):
        kernel = params[name]["kernel"]
        bound = 1.0 / np.sqrt(kernel.shape[0])
        out[name] = {
            "kernel": jax.random.uniform(keys[2 * i], kernel.shape, kernel.dtype, -bound, bound),
            "bias": jax.random.uniform(
                keys[2 * i + 1], params[name]["bias"].shape, kernel.dtype, -bound, bound
            ),
        }
    return out


def _is_hidden_input(module: nn.Module) -> bool:
    # The input of Dense_{l+1} is the ReLU output of hidden layer l; Dense_0's is the data.
    return isinstance(module, nn.Dense) and module.name != "Dense_0"


def train_depth(cfg: Config, depth: int, out_dir: pathlib.Path):
    """Both arms, every seed, one vmapped step; the arms of a seed share init and data."""
    model, tx = MLP(features=(cfg.width,) * depth), optax.adam(cfg.learning_rate)

    def make_state(arm):
        def state_of(seed):
            key = jax.random.key(1000 * depth + seed)
            params = init_params(model, key, jnp.zeros((1, 40)))
            params = {"model": torch_default_init(params, jax.random.fold_in(key, 1))}
            if arm == "lbe":
                params["alpha"] = jnp.full((depth,), cfg.alpha_init, jnp.float32)
            return TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=key)

        return state_of

    def make_loss(arm):
        def loss_fn(params, state, batch, rng):
            logits, acts = capture_activations(
                model.apply, {"params": params["model"]}, batch["x"], select=_is_hidden_input,
                where="inputs",
            )  # fmt: skip
            entropies = [batch_entropy(a) for a in acts.values()]
            loss = ce = soft_target_cross_entropy(logits, batch["y"])
            if arm == "lbe":
                loss = lbe_loss(
                    ce, entropies, params["alpha"], beta=cfg.beta, alpha_min=cfg.alpha_min
                )
            metrics = {
                "ce": ce,
                "entropy_last": entropies[-1],
                "entropy_mean": jnp.mean(jnp.stack(entropies)),
            }
            if arm == "lbe":
                metrics["alpha_mean"] = jnp.mean(jnp.abs(params["alpha"]))
            return loss, LossOutput(metrics=metrics)

        return loss_fn

    loader = data.load("mnist1d", "train", cfg.batch_size * len(cfg.seeds), seed=depth, epochs=None)
    metrics_path = out_dir / f"depth{depth}.jsonl"
    metrics_path.unlink(missing_ok=True)
    run = fit_seeds(
        {arm: make_state(arm) for arm in ARMS},
        {arm: make_loss(arm) for arm in ARMS},
        SplitLoader(loader, len(cfg.seeds)),
        seeds=cfg.seeds,
        num_steps=cfg.steps,
        eval_fn=seeds_eval_fn(
            data.load_arrays("mnist1d", "test"), params_of=lambda s: s.params["model"]
        ),
        eval_every=max(cfg.steps // 6, 1),
        log_every=max(cfg.steps // 30, 1),
        metrics_path=metrics_path,
    )
    return run


def _plot(path: pathlib.Path, runs: dict, cfg: Config) -> None:
    def series(key, scale=1.0):
        curves = {
            (d, arm): run.curve(key.format(arm=arm)) for d, run in runs.items() for arm in ARMS
        }
        return {f"depth {d} {arm.upper()}": (x, scale * y) for (d, arm), (x, y) in curves.items()}

    style = {f"depth {d} {arm.upper()}": "--" if arm == "ce" else "-" for d in runs for arm in ARMS}
    plot_panels(
        path,
        [
            Panel(
                "test accuracy (%), mean of seeds",
                series("test/{arm}/accuracy", 100.0),
                hlines=(cfg.trained_bar, cfg.chance_bar),
                style=style,
            ),  # fmt: skip
            Panel("train cross-entropy", series("train/{arm}/ce"), style=style),
            Panel("batch entropy, last hidden", series("train/{arm}/entropy_last"), style=style),
        ],
        title=f"Vanilla ReLU MLPs (width {cfg.width}) on MNIST-1D, with and without LBE",
    )


@register(
    "batch_entropy",
    description="LBE makes deep vanilla ReLU MLPs trainable (MNIST-1D)",
    timing_sensitive=False,  # decides from accuracies and counts, times nothing
)
def run(out_dir: pathlib.Path, *, quick: bool) -> Verdict:
    cfg = QUICK if quick else FULL
    runs = {depth: train_depth(cfg, depth, pathlib.Path(out_dir)) for depth in cfg.depths}
    claims, parts, last = Claims(), [], {}
    for depth, trained in runs.items():
        for arm in ARMS:
            values = 100 * trained.per_seed(f"test/{arm}/accuracy")
            print(f"depth {depth} {arm}: test accuracy {np.round(values, 1).tolist()}", flush=True)
            last[f"depth{depth}_{arm}"] = trained.curve(f"train/{arm}/entropy_last")[1][
                :, -1
            ].mean()
        plain = trained.estimate("test/ce/accuracy", scale=100)
        lbe = trained.estimate("test/lbe/accuracy", scale=100)
        claims.check(f"depth{depth}_ce_at_chance", plain, cfg.chance_bar, "<=")
        claims.check(f"depth{depth}_lbe_trains", lbe, cfg.trained_bar, ">=")
        parts.append(
            f"depth {depth}: CE {plain.format('.1f')}% (last-layer batch entropy "
            f"{last[f'depth{depth}_ce']:.3f}), LBE {lbe.format('.1f')}% "
            f"(entropy {last[f'depth{depth}_lbe']:.3f})"
        )
    _plot(pathlib.Path(out_dir) / "batch_entropy.png", runs, cfg)
    return claims.verdict(
        out_dir,
        claim=(
            f"vanilla deep ReLU MLPs stay at chance (<= {cfg.chance_bar:.0f}%) with CE and train "
            f"(>= {cfg.trained_bar:.0f}%) with LBE"
        ),
        measured=f"width {cfg.width}, {cfg.steps} steps: " + "; ".join(parts),
        metrics={"config": cfg, "final_batch_entropy_last_hidden": last},
    )


if __name__ == "__main__":
    cli_main("batch_entropy")
