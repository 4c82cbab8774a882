"""Expert-choice vs top-1 / top-2 token-choice routing vs dense FFNs: a masked byte-level LM.

Zhou et al., "Mixture-of-Experts with Expert Choice Routing", arXiv:2202.09368 (2022). Claim:
at equal activated compute, expert-choice routing (capacity factor 2) reaches the quality of
GShard top-2 routing in fewer training steps (more than 2x at 8B/64E scale) and beats Switch top-1.

Task (where routing has something to route): masked-byte prediction on the running Python's
standard-library sources (``efflax.data`` ``stdlib_text``, the first ``seq_len`` bytes of each
example; 15% of the bytes replaced by a mask token, the loss on those). The model is
``efflax.nn.Encoder`` over one-hot bytes with a 256-way output head; every block's FFN is dense
(hidden 2h), expert choice (E experts of hidden h, c = 2), top-2 (E x h, capacity factor 1.25)
or top-1 (E x 2h, capacity factor 1.25), so that every token activates 2h hidden units on
average. One routing group per sequence. Training: ``efflax.training.fit_seeds``, every
variant (an arm) and seed in one vmapped step (seed s has the same initial weights, data order
and masks as alone, in every variant).

Steps-to-quality: every ``eval_every`` steps the masked-byte loss on a fixed validation set
(fixed masks). For two methods A and B and a seed, the target is the worse of their final
validation losses; each method's steps to reach it are read off its curve (linear
interpolation), and the speed-up of B over A is ``steps_A / steps_B``, with a 95% interval
over seeds (paired: same seed, same data, same masks).
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from efflax import data
from efflax.curves import time_to_reach
from efflax.experiment import Claims
from efflax.experiment import Panel
from efflax.experiment import Verdict
from efflax.experiment import cli_main
from efflax.experiment import plot_panels
from efflax.experiment import register
from efflax.nn import Encoder
from efflax.nn import MoEFeedForward
from efflax.nn import moe_aux_loss
from efflax.stats import Estimate
from efflax.stats import ratio_interval
from efflax.training import LossOutput
from efflax.training import SeedRun
from efflax.training import fit_seeds
from efflax.training import seed_state
from efflax.training import seeds_eval

VARIANTS = ("dense", "top1", "top2", "expert_choice")
MASK_ID = 256  # inputs: 256 byte values + the mask token
MIN_SPEEDUP = 1.0  # the claim at this scale: expert choice needs fewer steps than top-2


@dataclasses.dataclass(frozen=True)
class Config:
    steps: int
    seeds: tuple[int, ...]
    seq_len: int = 64
    batch_size: int = 16
    d_model: int = 32
    expert_hidden: int = 32
    num_experts: int = 8
    num_layers: int = 2
    num_heads: int = 4
    learning_rate: float = 3e-3
    mask_rate: float = 0.15
    eval_every: int = 25
    eval_examples: int = 256
    window: int = 5


QUICK = Config(steps=300, seeds=(0, 1, 2), batch_size=8)
FULL = Config(steps=1500, seeds=tuple(range(6)), batch_size=16)


class MaskedByteLM(nn.Module):
    """Bytes (and the mask token) -> embeddings of each byte with its ``window - 1`` neighbours
    -> ``Encoder`` -> logits over the 256 byte values at the masked positions ``[batch, masked]``
    only (the head is the costliest layer).

    The neighbours in every token's input let the FFNs (where the experts are) predict from
    local context from the first steps, instead of waiting for attention to learn to look
    next door: that is where routing has something to route at this scale.
    """

    encoder: Encoder
    d_model: int
    window: int = 5

    @nn.compact
    def __call__(
        self, tokens: jax.Array, positions: jax.Array, *, deterministic: bool = True
    ) -> jax.Array:
        x = nn.Embed(MASK_ID + 1, self.d_model, name="embed")(tokens)
        half = self.window // 2
        padded = jnp.pad(x, ((0, 0), (half, self.window - 1 - half), (0, 0)))
        length = tokens.shape[1]
        x = jnp.concatenate([padded[:, i : i + length] for i in range(self.window)], axis=-1)
        h = self.encoder(x, deterministic=deterministic)
        h = jnp.take_along_axis(h, positions[..., None], axis=1)
        return nn.Dense(MASK_ID, name="head")(h)


def build_model(variant: str, cfg: Config) -> MaskedByteLM:
    moe = None
    if variant != "dense":
        moe = functools.partial(
            MoEFeedForward,
            num_experts=cfg.num_experts,
            hidden=2 * cfg.expert_hidden if variant == "top1" else cfg.expert_hidden,
            router=variant,
            capacity_factor=2.0 if variant == "expert_choice" else 1.25,
        )
    encoder = Encoder(
        num_layers=cfg.num_layers,
        d_model=cfg.d_model,
        num_heads=cfg.num_heads,
        mlp_hidden=2 * cfg.expert_hidden,
        num_classes=None,
        max_len=cfg.seq_len,
        moe=moe,
        moe_every=1,
        implementation="xla",
    )
    return MaskedByteLM(encoder, cfg.d_model, cfg.window)


def _masked(tokens: jax.Array, key: jax.Array, count: int) -> tuple[jax.Array, jax.Array]:
    """``count`` distinct random positions per sequence replaced by the mask token."""
    _, positions = jax.lax.top_k(jax.random.uniform(key, tokens.shape), count)
    rows = jnp.arange(tokens.shape[0])[:, None]
    return tokens.at[rows, positions].set(MASK_ID), positions


def _masked_ce(logits: jax.Array, tokens: jax.Array, positions: jax.Array) -> jax.Array:
    targets = jnp.take_along_axis(tokens, positions, axis=1)
    return optax.softmax_cross_entropy_with_integer_labels(
        logits.astype(jnp.float32), targets
    ).mean()


def num_masked(cfg: Config) -> int:
    return max(1, round(cfg.mask_rate * cfg.seq_len))


def example_inputs(cfg: Config) -> tuple[jax.Array, jax.Array]:
    """Inputs to initialise a model on: tokens and masked positions."""
    return jnp.zeros((1, cfg.seq_len), jnp.int32), jnp.zeros((1, num_masked(cfg)), jnp.int32)


def make_loss_fn(cfg: Config):
    def loss_fn(params, state, batch, rng):
        tokens = batch["tokens"][:, : cfg.seq_len].astype(jnp.int32)
        inputs, positions = _masked(tokens, rng, num_masked(cfg))
        logits, variables = state.apply_fn(
            {"params": params}, inputs, positions, deterministic=False, mutable=["losses"]
        )
        mlm = _masked_ce(logits, tokens, positions)
        return mlm + moe_aux_loss(variables.get("losses", {})), LossOutput(metrics={"mlm": mlm})

    return loss_fn


def make_eval_fn(cfg: Config):
    """Masked-byte loss of every seed on a fixed validation set with fixed masks."""
    tokens = data.load_arrays("stdlib_text", "validation")["tokens"]
    tokens = jnp.asarray(tokens[: cfg.eval_examples, : cfg.seq_len].astype(np.int32))
    inputs, positions = _masked(tokens, jax.random.key(12345), num_masked(cfg))
    return seeds_eval(
        lambda apply_fn, params: {
            "mlm": _masked_ce(apply_fn({"params": params}, inputs, positions), tokens, positions)
        },
        prefix="val",
    )


def train(cfg: Config) -> SeedRun:
    """Every variant (an arm) and seed in one vmapped step; the arms of a seed share data."""
    schedule = optax.warmup_cosine_decay_schedule(
        0.0, cfg.learning_rate, cfg.steps // 20, cfg.steps, cfg.learning_rate / 10
    )
    tx, example = optax.adamw(schedule, weight_decay=1e-4), example_inputs(cfg)
    models = {variant: build_model(variant, cfg) for variant in VARIANTS}
    return fit_seeds(
        {v: lambda s, m=m: seed_state(m, tx, seed=s, example=example) for v, m in models.items()},
        make_loss_fn(cfg),
        lambda seed: data.load("stdlib_text", "train", cfg.batch_size, seed=seed, epochs=None),
        seeds=cfg.seeds,
        num_steps=cfg.steps,
        eval_fn=make_eval_fn(cfg),
        eval_every=cfg.eval_every,
        log_every=cfg.eval_every,
    )


def speedup(curves: dict, slow: str, fast: str) -> Estimate:
    """Steps of ``slow`` over steps of ``fast`` to the worse of their final losses, per seed."""
    steps, slow_steps, fast_steps = curves[slow][0], [], []
    for a, b in zip(curves[slow][1], curves[fast][1], strict=True):
        target = max(a[-2:].mean(), b[-2:].mean())
        slow_steps.append(time_to_reach(steps, a, target, higher_is_better=False))
        fast_steps.append(time_to_reach(steps, b, target, higher_is_better=False))
    return ratio_interval(slow_steps, fast_steps)


@register(
    "moe_routing",
    description="Expert-choice vs top-1/top-2 MoE routing: steps to quality on a masked byte LM",
    timing_sensitive=False,
)
def run(out_dir: pathlib.Path, *, quick: bool) -> Verdict:
    cfg = QUICK if quick else FULL
    trained = train(cfg)
    curves = {variant: trained.curve(f"val/{variant}/mlm") for variant in VARIANTS}
    for variant, (_, values) in curves.items():
        print(f"{variant:13s} final validation loss per seed {np.round(values[:, -1], 3).tolist()}")
    claims = Claims()
    headline = speedup(curves, "top2", "expert_choice")
    claims.check("expert_choice_speedup_over_top2", headline, MIN_SPEEDUP)
    others = {
        "expert_choice_speedup_over_top1": speedup(curves, "top1", "expert_choice"),
        "expert_choice_speedup_over_dense": speedup(curves, "dense", "expert_choice"),
        "top2_speedup_over_top1": speedup(curves, "top1", "top2"),
    }
    for name, estimate in others.items():
        claims.report(name, estimate, MIN_SPEEDUP)
    plot_panels(
        pathlib.Path(out_dir) / "moe_routing_loss.png",
        [Panel("mean of seeds", curves, ylabel="validation masked-byte loss", yscale="log")],
        title=f"masked byte LM, {cfg.num_experts} experts, equal activated compute",
    )
    finals = ", ".join(f"{n} {values[:, -1].mean():.3f}" for n, (_, values) in curves.items())
    return claims.verdict(
        out_dir,
        claim=(
            "expert choice reaches top-2's quality in fewer steps (speed-up > 1; paper: > 2x at "
            "8B/64E)"
        ),
        measured=(
            f"steps-to-quality speed-up of expert choice over top-2 {headline.format('.2f')}x, "
            f"over top-1 {others['expert_choice_speedup_over_top1'].format('.2f')}x, over dense "
            f"{others['expert_choice_speedup_over_dense'].format('.2f')}x; top-2 over top-1 "
            f"{others['top2_speedup_over_top1'].format('.2f')}x; final validation loss {finals} "
            f"({cfg.steps} steps, {len(cfg.seeds)} seeds, {cfg.num_experts} experts, groups of "
            f"{cfg.seq_len} bytes)"
        ),
        metrics={
            "config": cfg,
            "variants": {n: {"steps": x, "validation_loss": y} for n, (x, y) in curves.items()},
        },
    )


if __name__ == "__main__":
    cli_main("moe_routing")
