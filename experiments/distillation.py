"""USI knowledge distillation (Ridnik et al., "Solving ImageNet", arXiv 2204.03475) on MNIST-1D.

A 1-D CNN teacher (about 94% test) is trained first; MLP students (40-100-100-10) are then trained
four ways on the same augmented batches (random circular shift of +-3 samples and N(0, 0.1)
noise; the teacher sees exactly the student's augmented batch):

- ``labels``: cross-entropy on the labels only (``distillation_loss`` with ``alpha_kd = 0``);
- ``usi``: the USI loss, ``CE + 5 KL(teacher || student)`` at temperature 1;
- ``kd_only``: ``5 KL`` without labels (the maintainers: "the same result within noise");
- ``usi_t4``: ``CE + 5 T^2 KL`` at ``T = 4`` (the newsletter: temperature does not matter).

Claims (PAPERS.md pass criteria): USI >= labels-only + 1.0 point; |KD-only - USI| <= 1.0 point;
T = 4 not better than T = 1 by more than 0.5 point. All students of one seed share their
initialisation and data order, so the differences are paired over seeds.
"""

from __future__ import annotations

import dataclasses
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn

from efflax import data
from efflax.experiment import Claims
from efflax.experiment import Verdict
from efflax.experiment import cli_main
from efflax.experiment import register
from efflax.losses import distillation_loss
from efflax.losses import soft_target_cross_entropy
from efflax.models import CNN1D
from efflax.models import MLP
from efflax.training import LossOutput
from efflax.training import SeedRun
from efflax.training import SplitLoader
from efflax.training import TrainState
from efflax.training import classification_eval_fn
from efflax.training import fit
from efflax.training import fit_seeds
from efflax.training import init_params
from efflax.training import make_train_step
from efflax.training import plot_arms
from efflax.training import seeds_eval

# arm -> (use the labels, alpha_kd, temperature)
ARMS = {
    "labels": (True, 0.0, 1.0),
    "usi": (True, 5.0, 1.0),
    "kd_only": (False, 5.0, 1.0),
    "usi_t4": (True, 5.0, 4.0),
}


@dataclasses.dataclass(frozen=True)
class Config:
    seeds: tuple[int, ...]
    teacher_steps: int
    student_steps: int
    batch_size: int = 100  # per seed
    teacher_lr: float = 1e-2
    student_lr: float = 1e-2
    max_shift: int = 3
    noise: float = 0.1


QUICK = Config(seeds=tuple(range(16)), teacher_steps=1500, student_steps=1500)
FULL = Config(seeds=tuple(range(32)), teacher_steps=6000, student_steps=6000)


def augment(key: jax.Array, x: jax.Array, *, max_shift: int, noise: float) -> jax.Array:
    """Random circular shift in ``[-max_shift, max_shift]`` per example plus Gaussian noise."""
    shift_key, noise_key = jax.random.split(key)
    shifts = jax.random.randint(shift_key, (x.shape[0], 1), -max_shift, max_shift + 1)
    index = (jnp.arange(x.shape[1])[None, :] - shifts) % x.shape[1]
    shifted = jnp.take_along_axis(x, index, axis=1)
    return shifted + noise * jax.random.normal(noise_key, x.shape, x.dtype)


def _schedule(lr: float, steps: int) -> optax.Schedule:
    return optax.cosine_decay_schedule(lr, steps)


def train_teacher(cfg: Config, out_dir: pathlib.Path) -> tuple[CNN1D, dict, float]:
    """The CNN teacher, trained with cross-entropy on augmented batches."""
    teacher = CNN1D()
    params = init_params(teacher, 99, jnp.zeros((1, 40)))
    state = TrainState.create(
        apply_fn=teacher.apply,
        params=params,
        tx=optax.adam(_schedule(cfg.teacher_lr, cfg.teacher_steps)),
        rng=jax.random.key(99),
    )

    def loss_fn(params, state, batch, rng):
        x = augment(rng, jnp.asarray(batch["x"]), max_shift=cfg.max_shift, noise=cfg.noise)
        logits = state.apply_fn({"params": params}, x)
        return soft_target_cross_entropy(logits, batch["y"])

    loader = data.load("mnist1d", "train", cfg.batch_size, seed=99, epochs=None)
    state, history = fit(
        state,
        make_train_step(loss_fn),
        loader,
        num_steps=cfg.teacher_steps,
        eval_fn=classification_eval_fn(data.load_arrays("mnist1d", "test")),
        log_every=max(cfg.teacher_steps // 10, 1),
        metrics_path=out_dir / "teacher.jsonl",
        progress=False,
    )
    return teacher, state.params, float(history[-1]["test/accuracy"])


def train_students(cfg: Config, teacher, teacher_params, out_dir: pathlib.Path) -> SeedRun:
    """Every seed in one vmapped step; a seed's state holds its four students stacked by arm
    (one initialisation, one augmented batch, one teacher forward pass for all four).

    The step's loss is the sum of the students' losses, so each student gets exactly its own
    gradient (and Adam, elementwise, its own update). The augmentation key of seed ``i`` at a
    step is the ``i``-th of ``split(fold_in(key(7), step), seeds)``.
    """
    student, num_seeds = MLP(features=(100, 100)), len(cfg.seeds)
    tx = optax.adam(_schedule(cfg.student_lr, cfg.student_steps))
    use_labels, alpha_kd, temperature = (
        jnp.asarray(column, jnp.float32) for column in zip(*ARMS.values(), strict=True)
    )
    init = jax.jit(jax.vmap(lambda key: student.init(key, jnp.zeros((1, 40)))["params"]))
    keys = jnp.stack([jax.random.key(s) for s in cfg.seeds])
    seed_params = jax.tree.map(np.asarray, nn.unbox(init(keys)))

    def make_state(seed: int) -> TrainState:
        i = cfg.seeds.index(seed)
        params = jax.tree.map(lambda v: np.stack([v[i]] * len(ARMS)), seed_params)
        return TrainState.create(
            apply_fn=student.apply, params=params, tx=tx, rng=jax.random.key(7), extra={"i": i}
        )

    def one_student(p, x, teacher_logits, y, use_labels, alpha_kd, temperature):
        logits = student.apply({"params": p}, x)
        # The KD term from distillation_loss's KD-only mode, plus the label term where the arm
        # uses labels: exactly distillation_loss(logits, teacher_logits, y, ...) for those arms.
        kd = distillation_loss(logits, teacher_logits, alpha_kd=alpha_kd, temperature=temperature)
        return use_labels * soft_target_cross_entropy(logits, y) + kd

    def loss_fn(params, state, batch, rng):
        key = jax.random.split(state.step_rng(), num_seeds)[state.extra["i"]]
        x = augment(key, jnp.asarray(batch["x"]), max_shift=cfg.max_shift, noise=cfg.noise)
        teacher_logits = teacher.apply({"params": teacher_params}, x)  # on the students' batch
        losses = jax.vmap(one_student, in_axes=(0, None, None, None, 0, 0, 0))(
            params, x, teacher_logits, jnp.asarray(batch["y"]), use_labels, alpha_kd, temperature
        )
        metrics = {f"loss_{arm}": losses[i] for i, arm in enumerate(ARMS)}
        return jnp.sum(losses), LossOutput(metrics=metrics)

    test = data.load_arrays("mnist1d", "test")
    x_test, y_test = jnp.asarray(test["x"]), jnp.asarray(test["y"])

    def accuracies(apply_fn, params):
        logits = jax.vmap(lambda p: apply_fn({"params": p}, x_test))(params)
        correct = jnp.mean(jnp.argmax(logits, -1) == y_test, axis=-1)
        return {f"{arm}/accuracy": correct[i] for i, arm in enumerate(ARMS)}

    loader = data.load("mnist1d", "train", cfg.batch_size * num_seeds, seed=1, epochs=None)
    return fit_seeds(
        make_state,
        loss_fn,
        SplitLoader(loader, num_seeds),
        seeds=cfg.seeds,
        num_steps=cfg.student_steps,
        eval_fn=seeds_eval(accuracies),
        eval_every=max(cfg.student_steps // 8, 1),
        log_every=max(cfg.student_steps // 20, 1),
        metrics_path=out_dir / "students.jsonl",
    )


@register(
    "distillation",
    description="USI distillation: labels vs USI vs KD-only on MNIST-1D",
    timing_sensitive=False,  # decides from accuracies and counts, times nothing
)
def run(out_dir: pathlib.Path, *, quick: bool) -> Verdict:
    cfg = QUICK if quick else FULL
    out_dir = pathlib.Path(out_dir)
    for name in ("teacher.jsonl", "students.jsonl"):
        (out_dir / name).unlink(missing_ok=True)
    teacher, teacher_params, teacher_acc = train_teacher(cfg, out_dir)
    print(f"teacher CNN: test accuracy {100 * teacher_acc:.1f}%", flush=True)
    trained = train_students(cfg, teacher, teacher_params, out_dir)
    finals = {arm: trained.per_seed(f"test/{arm}/accuracy") for arm in ARMS}
    for arm, v in finals.items():
        print(f"{arm}: {100 * v.mean():.2f}% (per seed {np.round(100 * v, 1).tolist()})")
    estimates = {
        "usi_minus_labels": trained.paired("test/usi/accuracy", "test/labels/accuracy", scale=100),
        "kd_only_minus_usi": trained.paired(
            "test/kd_only/accuracy", "test/usi/accuracy", scale=100
        ),
        "t4_minus_t1": trained.paired("test/usi_t4/accuracy", "test/usi/accuracy", scale=100),
    }
    claims = Claims()
    for (name, estimate), (threshold, direction) in zip(
        estimates.items(), ((1.0, ">="), (1.0, "within"), (0.5, "<=")), strict=True
    ):
        claims.check(name, estimate, threshold, direction)
    plot_arms(
        out_dir / "distillation.png",
        trained.history,
        finals,
        title=f"MNIST-1D MLP students of a CNN teacher ({100 * teacher_acc:.1f}%)",
    )
    means = {arm: f"{100 * v.mean():.1f}%" for arm, v in finals.items()}
    gain, kd_gap, t4_gain = estimates.values()
    statuses = claims.statuses
    return claims.verdict(
        out_dir,
        claim=(
            "USI (CE + 5 KL, T=1) >= labels-only + 1 point; KD-only within 1 point of USI; "
            "T=4 not better than T=1 by > 0.5 point"
        ),
        measured=(
            f"teacher {100 * teacher_acc:.1f}%; students (n={len(cfg.seeds)} seeds, "
            f"{cfg.student_steps} steps): labels {means['labels']}, USI {means['usi']}, "
            f"KD-only {means['kd_only']}, USI T=4 {means['usi_t4']}; USI - labels "
            f"{gain.format('.2f')} pt [{statuses['usi_minus_labels']}], KD-only - USI "
            f"{kd_gap.format('.2f')} pt [{statuses['kd_only_minus_usi']}], T=4 - T=1 "
            f"{t4_gain.format('.2f')} pt [{statuses['t4_minus_t1']}]"
        ),
        metrics={"config": cfg, "teacher_test_accuracy": teacher_acc, "test_accuracy": finals},
    )


if __name__ == "__main__":
    cli_main("distillation")
