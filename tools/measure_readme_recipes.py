"""Measures the README's method recipes at the quickstart's scale (CNN1D on MNIST-1D, Adam 1e-2,
batch 128, 20 epochs = 620 steps), over seeds: test accuracy and test loss per recipe.

    python tools/measure_readme_recipes.py --seeds 3 > recipes.txt

The numbers quoted in README.md ("Recipes") and docs/methods/ come from this script.
"""

from __future__ import annotations

import argparse
import platform
import time

import jax
import numpy as np
import optax
from flax import linen as nn

import efflax
from efflax.training import LossOutput
from efflax.training import TrainState
from efflax.training import cross_entropy_loss_fn
from efflax.training import make_train_step

STEPS_PER_EPOCH = 4000 // 128


def _state(seed: int, tx) -> TrainState:
    model = efflax.models.CNN1D()
    params = nn.unbox(model.init(jax.random.key(seed), np.zeros((1, 40), np.float32))["params"])
    return TrainState.create(
        apply_fn=model.apply, params=params, tx=tx, rng=jax.random.key(seed + 1)
    )


def _baseline(seed):
    return _state(seed, optax.adam(1e-2)), make_train_step(cross_entropy_loss_fn())


def _sam(seed):
    state = _state(seed, efflax.optim.sam(optax.adam(1e-2), rho=0.05))
    return state, make_train_step(cross_entropy_loss_fn(), pass_grad_fn=True)


def _saf(seed):
    state = _state(seed, optax.adam(1e-2))
    saf = efflax.optim.SAF(num_examples=4000, num_classes=10, steps_per_epoch=STEPS_PER_EPOCH)
    state = state.replace(extra={"saf": saf.init()})

    def loss_fn(params, state, batch, rng):
        logits = state.apply_fn({"params": params}, batch["x"])
        task = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        loss, buffer, metrics = saf.loss(
            task, logits, state.extra["saf"], batch["index"], state.step
        )
        return loss, LossOutput(metrics=metrics, extra={"saf": buffer})

    return state, saf.with_index_check(make_train_step(loss_fn))


def _mesa(decay):
    def build(seed):
        state = _state(seed, optax.adam(1e-2))
        mesa = efflax.optim.MESA(steps_per_epoch=STEPS_PER_EPOCH, decay=decay)
        state = state.replace(extra={"mesa": mesa.init({"params": state.params})})

        def loss_fn(params, state, batch, rng):
            mesa_state = mesa.update_ema(state.extra["mesa"], {"params": params})
            logits = state.apply_fn({"params": params}, batch["x"])
            teacher = state.apply_fn(mesa_state.ema, batch["x"])
            task = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
            loss, metrics = mesa.loss(task, logits, teacher, state.step)
            return loss, LossOutput(metrics=metrics, extra={"mesa": mesa_state})

        return state, make_train_step(loss_fn)

    return build


RECIPES = {
    "adam": _baseline,
    "sam": _sam,
    "saf": _saf,
    "mesa_0.9998": _mesa(0.9998),
    "mesa_0.99": _mesa(0.99),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES))
    args = parser.parse_args()
    test = efflax.data.load_arrays("mnist1d", "test")
    evaluate = jax.jit(
        lambda state: (
            (state.apply_fn({"params": state.params}, test["x"]).argmax(-1) == test["y"]).mean(),
            optax.softmax_cross_entropy_with_integer_labels(
                state.apply_fn({"params": state.params}, test["x"]), test["y"]
            ).mean(),
        )
    )
    print(f"# {time.strftime('%Y-%m-%d')} {platform.node()} jax {jax.__version__}, 620 steps")
    for name in args.recipes:
        accs, losses = [], []
        start = time.time()
        for seed in range(args.seeds):
            state, step = RECIPES[name](seed)
            loader = efflax.data.load("mnist1d", "train", batch_size=128, epochs=20, seed=seed)
            for batch in loader:
                state, _ = step(state, batch)
            acc, loss = evaluate(state)
            accs.append(float(acc))
            losses.append(float(loss))
        estimate = efflax.stats.mean_interval(accs)
        lo, hi = estimate.low, estimate.high
        print(
            f"{name:12s} accuracy {np.mean(accs):.3f} [{lo:.3f}, {hi:.3f}] "
            f"test loss {np.mean(losses):.3f}  per seed {[round(a, 3) for a in accs]} "
            f"({(time.time() - start) / args.seeds:.0f} s/seed)",
            flush=True,
        )


if __name__ == "__main__":
    main()
