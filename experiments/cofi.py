"""CoFi structured pruning of a pretrained byte-level encoder, against small models trained alone.

Xia, Zhong, Chen, "Structured Pruning Learns Compact and Accurate Models", ACL 2022,
arXiv:2204.00408. Claims: CoFi prunes a fine-tuned BERT to >10x speed-ups at a small accuracy
drop (MNLI 85.3 at 60% sparsity, 80.6 at 95%), better than training the small model.

Here, at CPU scale: a byte-level ``efflax.nn.Encoder`` is pretrained with masked-byte modelling
on ``stdlib_text`` (the standard library's sources), then fine-tuned on a small labelled task
built deterministically from the same sources - which standard-library package a byte snippet
comes from (6 packages; a few hundred training snippets from the 'train' files, test snippets
from the held-out 'validation'/'test' files that pretraining never saw). The fine-tuned model
(the teacher) is CoFi-pruned to 60% and 90% sparsity on the same labelled inputs (all five
gate groups, CoFi's gate initialisation and eval-time masks, target warmed up over the first 30%
of the steps, 0.1 KD(T=2) + 0.9 layer distillation with v4 matching + Lagrangian), extracted into
a smaller dense model and fine-tuned with CE + KD(T=2). Baselines: a model of exactly the
extracted shape, randomly initialised (no pretraining), trained on the labels only, and one
trained with the same CE + KD loss, for as many steps as pruning plus fine-tuning took.

Departures forced by the scale: the mask/multiplier learning rate is 0.1 (full, 2000 pruning
steps) or 0.2 (quick, 1000 steps) instead of CoFi's 0.01, which assumes ~1e5 steps (at 400 steps
even 0.3 still oscillates around the target); no 100-step pre-pruning fine-tuning (the student
starts as the fine-tuned teacher); the final fine-tuning distils logits only.

Measured per seed: accuracy; the real sparsity of the deterministic masks; extraction exactness;
parameters and XLA-counted FLOPs; and the extracted models' forward time against the teacher's
(``efflax.curves.interleaved_times``, interleaved, batch 128, ratio with an interval over rounds). The
quick run (one seed, tiny model and pretraining) decides only what it can: the controller's
real sparsity (+-0.02), exact extraction (1e-5) and a speed-up > 1; the full run (3 seeds)
decides the accuracy claims and the paper's >10x.
"""

from __future__ import annotations

import dataclasses
import functools
import pathlib
import sysconfig
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import matplotlib
import numpy as np
import optax

from efflax import data
from efflax.curves import interleaved_times
from efflax.experiment import Verdict
from efflax.experiment import register
from efflax.experiment import write_metrics
from efflax.losses import distillation_loss
from efflax.nn import Encoder
from efflax.optim import LagrangianSparsity
from efflax.pruning import apply_with_layers
from efflax.pruning import cofi_distillation_loss
from efflax.pruning import cofi_optimizer
from efflax.pruning import cofi_structure
from efflax.pruning import extract
from efflax.stats import combine_statuses
from efflax.stats import decide
from efflax.stats import mean_interval
from efflax.stats import paired_difference
from efflax.stats import ratio_interval
from efflax.stats import seeds_to_decide
from efflax.training import LossOutput
from efflax.training import TrainState
from efflax.training import fit
from efflax.training import make_train_step

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

PACKAGES = ("asyncio", "distutils", "email", "idlelib", "lib2to3", "multiprocessing")
MASK_ID = 256  # bytes are 0..255; the masked-byte token
VOCAB = 257
KD_TEMPERATURE = 2.0  # CoFi's run scripts
KD_WEIGHT, LAYER_WEIGHT = 0.1, 0.9  # CoFi: distill_ce_loss_alpha, distill_loss_alpha
FINETUNE_ALPHA_KD = 1.0  # CE + 1 * T^2 KL after extraction (and for the distilled baseline)
EVAL_BATCH = 128  # every forward (evaluation, teacher logits, exactness, timing) uses this batch


@dataclasses.dataclass(frozen=True)
class Config:
    seq_len: int
    num_layers: int
    d_model: int
    num_heads: int
    mlp_hidden: int
    batch: int
    pretrain_steps: int
    finetune_steps: int
    prune_steps: int
    final_steps: int
    train_per_class: int
    test_per_class: int
    seeds: tuple[int, ...]
    targets: tuple[float, ...] = (0.6, 0.9)
    lr: float = 1e-3
    prune_lr: float = 3e-4
    # CoFi's 0.01 assumes ~1e5 steps; at a few hundred steps the multipliers need more.
    reg_lr: float = 0.1
    lagrangian_lr: float | None = None  # default: reg_lr, as in the official code
    scratch_steps: int | None = None  # default: prune_steps + final_steps (the same budget)
    warmup_fraction: float = 0.3
    timing_rounds: int = 20


QUICK = Config(
    seq_len=32,
    num_layers=4,
    d_model=32,
    num_heads=4,
    mlp_hidden=64,
    batch=16,
    pretrain_steps=200,
    finetune_steps=100,
    prune_steps=1000,
    final_steps=60,
    train_per_class=32,
    test_per_class=40,
    seeds=(0,),
    scratch_steps=100,  # the quick run decides no accuracy claim
    reg_lr=0.2,
    timing_rounds=10,
)
FULL = Config(
    seq_len=64,
    num_layers=4,
    d_model=64,
    num_heads=4,
    mlp_hidden=256,
    batch=32,
    pretrain_steps=3000,
    finetune_steps=300,
    prune_steps=2000,
    final_steps=300,
    train_per_class=64,
    test_per_class=150,
    seeds=(0, 1, 2),
    timing_rounds=30,
)


# --- data ----------------------------------------------------------------------------------------
def package_task(config: Config) -> dict[str, dict[str, np.ndarray]]:
    """Which standard-library package a snippet of ``seq_len`` bytes comes from.

    Train snippets: ``train_per_class`` random windows (fixed seed) of the package's files that
    ``stdlib_text`` puts in its 'train' split. Test snippets: non-overlapping windows of its
    'validation' and 'test' files (never seen in pretraining), at most ``test_per_class`` evenly
    spaced ones per package.
    """
    # Imported here: efflax.data.builders imports TFDS, too slow for `efflax list`.
    from efflax.data.builders import stdlib_source_files
    from efflax.data.builders import stdlib_split_of

    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    texts: dict[tuple[str, str], list[bytes]] = {}
    for path in stdlib_source_files():
        rel = path.relative_to(root)
        if len(rel.parts) < 2 or rel.parts[0] not in PACKAGES:
            continue
        split = "train" if stdlib_split_of(str(rel)) == "train" else "test"
        texts.setdefault((rel.parts[0], split), []).append(path.read_bytes())
    rng = np.random.default_rng(1234)
    out: dict[str, dict[str, list]] = {"train": {"x": [], "y": []}, "test": {"x": [], "y": []}}
    length = config.seq_len
    for label, package in enumerate(PACKAGES):
        train = np.frombuffer(b"\0".join(texts[(package, "train")]), np.uint8)
        starts = rng.integers(0, train.size - length, config.train_per_class)
        out["train"]["x"] += [train[s : s + length] for s in starts]
        out["train"]["y"] += [label] * config.train_per_class
        windows = [
            np.frombuffer(t, np.uint8)[i * length : (i + 1) * length]
            for t in texts[(package, "test")]
            for i in range(len(t) // length)
        ]
        pick = np.linspace(0, len(windows) - 1, min(config.test_per_class, len(windows)))
        out["test"]["x"] += [windows[int(round(i))] for i in pick]
        out["test"]["y"] += [label] * len(pick)
    return {
        split: {"x": np.stack(v["x"]).astype(np.int32), "y": np.asarray(v["y"], np.int32)}
        for split, v in out.items()
    }


# --- models --------------------------------------------------------------------------------------
class ByteEncoder(nn.Module):
    """One-hot bytes -> ``efflax.nn.Encoder``; package logits, or per-byte logits (MLM)."""

    num_layers: int
    d_model: int
    num_heads: int
    mlp_hidden: int
    num_classes: int | None
    max_len: int

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = jax.nn.one_hot(tokens, VOCAB)
        h = Encoder(
            num_layers=self.num_layers,
            d_model=self.d_model,
            num_heads=self.num_heads,
            mlp_hidden=self.mlp_hidden,
            num_classes=self.num_classes,
            max_len=self.max_len,
            name="encoder",
        )(x)
        if self.num_classes is not None:
            return h
        kernel_init = nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "vocab")
        )
        return nn.Dense(256, kernel_init=kernel_init, name="mlm")(h)


def _model(config: Config, num_classes: int | None) -> ByteEncoder:
    return ByteEncoder(
        config.num_layers,
        config.d_model,
        config.num_heads,
        config.mlp_hidden,
        num_classes,
        config.seq_len,
    )


def _count(params) -> int:
    return int(sum(np.size(v) for v in jax.tree.leaves(params)))


def _apply_fn(model):
    return jax.jit(lambda params, x: model.apply({"params": params}, x))


def _logits(forward, params, x: np.ndarray) -> np.ndarray:
    """Logits in batches of ``EVAL_BATCH`` (the last one padded): one compiled shape per model."""
    out = []
    for start in range(0, len(x), EVAL_BATCH):
        chunk = x[start : start + EVAL_BATCH]
        padded = np.concatenate(
            [chunk, np.zeros((EVAL_BATCH - len(chunk), *chunk.shape[1:]), chunk.dtype)]
        )
        out.append(np.asarray(forward(params, padded))[: len(chunk)])
    return np.concatenate(out)


def _accuracy(forward, params, arrays) -> float:
    return float(np.mean(np.argmax(_logits(forward, params, arrays["x"]), -1) == arrays["y"]))


def _flops_per_example(forward, params, x: np.ndarray) -> float:
    """XLA's count for a forward pass over ``EVAL_BATCH`` examples, per example."""
    return float(forward.lower(params, x[:EVAL_BATCH]).cost_analysis()["flops"]) / EVAL_BATCH


# --- training ------------------------------------------------------------------------------------
def pretrain(config: Config, seed: int = 0):
    """Masked-byte modelling (15% of bytes replaced by a mask token) on stdlib_text 'train'."""
    model = _model(config, None)
    loader = data.load("stdlib_text", "train", config.batch, seed=seed, epochs=None)

    def loss_fn(params, state, batch, rng):
        crop_key, mask_key = jax.random.split(rng)
        tokens = batch["tokens"].astype(jnp.int32)
        starts = jax.random.randint(
            crop_key, (tokens.shape[0],), 0, tokens.shape[1] - config.seq_len
        )
        tokens = jax.vmap(lambda t, s: jax.lax.dynamic_slice(t, (s,), (config.seq_len,)))(
            tokens, starts
        )
        masked = jax.random.bernoulli(mask_key, 0.15, tokens.shape)
        logits = state.apply_fn({"params": params}, jnp.where(masked, MASK_ID, tokens))
        losses = optax.softmax_cross_entropy_with_integer_labels(logits, tokens)
        loss = jnp.sum(losses * masked) / jnp.maximum(jnp.sum(masked), 1)
        return loss

    x = jnp.zeros((1, config.seq_len), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(seed), x))["params"]
    state = TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=optax.adamw(optax.warmup_cosine_decay_schedule(0, config.lr, 50, config.pretrain_steps)),
        rng=jax.random.key(seed + 100),
    )
    state, history = fit(
        state,
        make_train_step(loss_fn),
        loader,
        num_steps=config.pretrain_steps,
        log_every=max(1, config.pretrain_steps // 5),
        progress=False,
    )
    return state.params, [h["train/loss"] for h in history]


def classification_step(model):
    """A train step for ``CE + alpha_kd T^2 KL(teacher || student)``; ``alpha_kd`` (0: labels
    only) and the teacher's logits come in with the batch, so one compiled step serves all."""

    def loss_fn(params, state, batch, rng):
        del rng
        logits = state.apply_fn({"params": params}, batch["x"])
        loss = distillation_loss(
            logits,
            batch["teacher_logits"],
            batch["y"],
            alpha_kd=batch["alpha_kd"][0],
            temperature=KD_TEMPERATURE,
        )
        accuracy = jnp.mean(jnp.argmax(logits, -1) == batch["y"])
        return loss, LossOutput(metrics={"accuracy": accuracy})

    return make_train_step(loss_fn)


# One optax object per setting: the transform is a static part of the TrainState, so a new
# (equal but not identical) one per run would recompile the train step every time.
@functools.cache
def _finetune_tx(lr: float, steps: int) -> optax.GradientTransformation:
    return optax.adamw(optax.cosine_decay_schedule(lr, steps))


@functools.cache
def _prune_tx(lr: float, reg_lr: float, lagrangian_lr: float | None):
    return cofi_optimizer(
        optax.adamw(lr, weight_decay=0.0),
        reg_learning_rate=reg_lr,
        lagrangian_learning_rate=lagrangian_lr,
    )


def train_classifier(model, params, step, arrays, teacher_logits, alpha_kd, steps, seed, lr):
    loader = data.Loader(
        {
            "x": arrays["x"],
            "y": arrays["y"],
            "teacher_logits": teacher_logits,
            "alpha_kd": np.full(len(arrays["x"]), alpha_kd, np.float32),
        },
        min(32, len(arrays["x"])),
        seed=seed,
        epochs=None,
    )
    state = TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=_finetune_tx(lr, steps),
        rng=jax.random.key(seed),
    )
    state, _ = fit(state, step, loader, num_steps=steps, log_every=steps, progress=False)
    return state.params


def prune_step(model, structure, teacher_apply, warmup_steps: int):
    """CoFi's loss: 0.1 KD(T=2) + 0.9 layer distillation + Lagrangian; the target sparsity and the
    teacher's parameters live in ``state.extra``, so one compiled step serves every run."""

    def loss_fn(params, state, batch, rng):
        teacher_logits, teacher_layers = teacher_apply(state.extra["teacher"], batch["x"])
        teacher_logits = jax.lax.stop_gradient(teacher_logits)
        teacher_layers = jax.lax.stop_gradient(teacher_layers)
        masks = structure.sample(params["log_alpha"], rng)
        logits, layers = apply_with_layers(
            structure, model, {"params": params["model"]}, batch["x"], masks=masks
        )
        layer_map = params["layer_map"]
        distill, parts = cofi_distillation_loss(
            logits,
            teacher_logits,
            layers,
            teacher_layers,
            lambda h: h @ layer_map["kernel"] + layer_map["bias"],
            temperature=KD_TEMPERATURE,
            logit_weight=KD_WEIGHT,
            layer_weight=LAYER_WEIGHT,
            student_exists=structure.layer_exists(masks),
        )
        controller = LagrangianSparsity(state.extra["target"], warmup_steps=warmup_steps)
        expected = structure.expected_sparsity(params["log_alpha"])
        penalty, target = controller(expected, params["lagrangian"], state.step)
        loss = distill + penalty
        metrics = {
            "kd": parts["logit"],
            "layer": parts["layer"],
            "expected_sparsity": expected,
            "target": target,
            "lambda_1": params["lagrangian"]["lambda_1"],
            "lambda_2": params["lagrangian"]["lambda_2"],
        }
        return loss, LossOutput(metrics=metrics)

    return make_train_step(loss_fn, donate=False)


def cofi_prune(config, model, structure, step, teacher_params, arrays, target, seed):
    d = config.d_model
    params = {
        "model": teacher_params,
        "log_alpha": structure.init(jax.random.key(seed + 10)),
        "lagrangian": LagrangianSparsity(target).init(),
        # CoFi's layer_transformation: one d x d linear map, BERT init N(0, 0.02), bias 0.
        "layer_map": {
            "kernel": 0.02 * jax.random.normal(jax.random.key(seed + 20), (d, d)),
            "bias": jnp.zeros(d),
        },
    }
    tx = _prune_tx(config.prune_lr, config.reg_lr, config.lagrangian_lr)
    loader = data.Loader(
        {"x": arrays["x"]}, min(config.batch, len(arrays["x"])), seed=seed, epochs=None
    )
    state = TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        rng=jax.random.key(seed + 30),
        extra={
            "teacher": teacher_params,
            "target": jnp.asarray(target, jnp.float32),
        },
    )
    state, history = fit(
        state,
        step,
        loader,
        num_steps=config.prune_steps,
        log_every=max(1, config.prune_steps // 20),
        progress=False,
    )
    return state.params, history


# --- the experiment ------------------------------------------------------------------------------
class _Clock:
    """Progress lines with wall and process CPU seconds (the CPU time shows the cost on a
    shared machine, where wall time mostly measures the others' load)."""

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def __call__(self, message: str) -> None:
        wall, cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        print(f"[{wall:6.1f} s wall, {cpu:6.1f} s cpu] {message}", flush=True)


def _timing(forwards: dict, x, rounds: int) -> dict[str, list[float]]:
    fns = {name: (fn, (params, x)) for name, (fn, params) in forwards.items()}
    return interleaved_times(fns, rounds=rounds)


@register(
    "cofi",
    description="CoFi pruning of a pretrained byte-level encoder vs small models",
    timing_sensitive="sections",  # times only through efflax.curves.interleaved_times
)
def run(out_dir: pathlib.Path, *, quick: bool) -> Verdict:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = QUICK if quick else FULL
    start_time = time.perf_counter()
    clock = _Clock()
    task = package_task(config)
    num_classes = len(PACKAGES)
    clock(
        f"task: {len(task['train']['x'])} train / {len(task['test']['x'])} test snippets of "
        f"{config.seq_len} bytes, {num_classes} packages"
    )

    pretrained, mlm_curve = pretrain(config)
    clock(f"pretrained: masked-byte loss {mlm_curve[0]:.3f} -> {mlm_curve[-1]:.3f}")

    model = _model(config, num_classes)
    x0 = task["train"]["x"][:2]
    structure = cofi_structure(model, x0)
    forward = _apply_fn(model)
    teacher_apply = jax.jit(lambda p, x: apply_with_layers(structure, model, {"params": p}, x))
    full_step = classification_step(model)
    model_init = jax.jit(model.init)
    masked_apply = jax.jit(
        lambda p, m, x: apply_with_layers(structure, model, {"params": p}, x, masks=m)[0]
    )
    prune = prune_step(
        model, structure, teacher_apply, int(config.warmup_fraction * config.prune_steps)
    )
    zeros_logits = np.zeros((len(task["train"]["x"]), num_classes), np.float32)

    runs: list[dict] = []
    small_steps: dict = {}
    timing_models: dict = {}
    for seed in config.seeds:
        # Fine-tune the pretrained encoder (a fresh classification head) = the teacher.
        init = nn.unbox(model_init(jax.random.key(seed), x0))["params"]
        init["encoder"] = {**init["encoder"], **pretrained["encoder"]}
        teacher = train_classifier(
            model,
            init,
            full_step,
            task["train"],
            zeros_logits,
            0.0,
            config.finetune_steps,
            seed,
            config.lr,
        )
        teacher_acc = _accuracy(forward, teacher, task["test"])
        teacher_train_logits = _logits(forward, teacher, task["train"]["x"])
        record = {
            "seed": seed,
            "teacher_accuracy": teacher_acc,
            "params_teacher": _count(teacher),
            "flops_teacher": _flops_per_example(forward, teacher, task["test"]["x"]),
        }
        clock(f"seed {seed}: teacher accuracy {teacher_acc:.3f}")
        for target in config.targets:
            key = f"{int(round(100 * target))}"
            pruned, history = cofi_prune(
                config, model, structure, prune, teacher, task["train"], target, seed
            )
            clock(f"seed {seed} target {target}: pruned")
            masks = structure.deterministic(pruned["log_alpha"])
            summary = structure.summary(masks)
            small, small_params = extract(model, pruned["model"], structure, masks)
            small_forward = _apply_fn(small)
            # Exactness: the masked model (deterministic masks) vs the extracted model.
            probe = task["test"]["x"][:EVAL_BATCH]
            masked_logits = masked_apply(pruned["model"], masks, probe)
            small_logits = small_forward(small_params, probe)
            exact = float(
                jnp.max(jnp.abs(masked_logits - small_logits))
                / jnp.maximum(jnp.max(jnp.abs(masked_logits)), 1e-30)
            )
            pruned_acc = _accuracy(small_forward, small_params, task["test"])
            # One compiled fine-tuning step per extracted shape, shared with its baselines.
            shape = tuple(
                (k, np.shape(v)) for k, v in jax.tree_util.tree_leaves_with_path(small_params)
            )
            if shape not in small_steps:
                small_steps[shape] = classification_step(small)
            small_step = small_steps[shape]
            finetuned = train_classifier(
                small,
                small_params,
                small_step,
                task["train"],
                teacher_train_logits,
                FINETUNE_ALPHA_KD,
                config.final_steps,
                seed,
                config.prune_lr,
            )
            cofi_acc = _accuracy(small_forward, finetuned, task["test"])
            clock(f"seed {seed} target {target}: extracted and fine-tuned")
            scratch, small_init = {}, jax.jit(small.init)
            for name, alpha in (("scratch_ce", 0.0), ("scratch_kd", FINETUNE_ALPHA_KD)):
                fresh = nn.unbox(small_init(jax.random.key(seed + 1000), x0))["params"]
                trained = train_classifier(
                    small,
                    fresh,
                    small_step,
                    task["train"],
                    teacher_train_logits,
                    alpha,
                    config.scratch_steps or config.prune_steps + config.final_steps,
                    seed,
                    config.lr,
                )
                scratch[name] = _accuracy(small_forward, trained, task["test"])
            record[key] = {
                "target": target,
                "real_sparsity": float(summary["sparsity"]),
                "expected_sparsity": float(history[-1]["train/expected_sparsity"]),
                "structure": summary,
                "extraction_max_rel_diff": exact,
                "accuracy_pruned_before_finetune": pruned_acc,
                "accuracy_cofi": cofi_acc,
                "accuracy_scratch_ce": scratch["scratch_ce"],
                "accuracy_scratch_kd": scratch["scratch_kd"],
                "params": _count(finetuned),
                "flops": _flops_per_example(small_forward, finetuned, task["test"]["x"]),
                "sparsity_curve": [
                    (h["step"], h["train/expected_sparsity"], h["train/target"]) for h in history
                ],
            }
            clock(
                f"seed {seed} target {target}: real sparsity {summary['sparsity']:.3f} "
                f"(expected {record[key]['expected_sparsity']:.3f}), exact {exact:.1e}, "
                f"acc cofi {cofi_acc:.3f} (before FT {pruned_acc:.3f}) vs scratch CE "
                f"{scratch['scratch_ce']:.3f} / KD {scratch['scratch_kd']:.3f}, params "
                f"{record[key]['params']} vs {record['params_teacher']}"
            )
            if seed == config.seeds[0]:
                timing_models[key] = (small_forward, finetuned)
        if seed == config.seeds[0]:
            timing_models["teacher"] = (forward, teacher)
        runs.append(record)

    clock("timing")
    times = _timing(timing_models, task["test"]["x"][:EVAL_BATCH], config.timing_rounds)
    return _report(out_dir, config, quick, runs, times, time.perf_counter() - start_time)


def _report(out_dir, config, quick, runs, times, seconds) -> Verdict:
    keys = [f"{int(round(100 * t))}" for t in config.targets]
    estimates, statuses, lines = {}, {}, []
    for key, target in zip(keys, config.targets, strict=True):
        gaps = [r[key]["real_sparsity"] - target for r in runs]
        gap = mean_interval(gaps)
        estimates[f"sparsity_gap_{key}"] = gap
        # The claim is about every run the controller drives (where it ends), not about a mean
        # over seeds: PASS when each run ends within 0.02 of its target.
        statuses[f"controller_{key}"] = "PASS" if max(map(abs, gaps)) <= 0.02 else "FAIL"
        speedup = ratio_interval(times["teacher"], times[key])
        estimates[f"speedup_{key}"] = speedup
        drop = paired_difference(
            [r["teacher_accuracy"] for r in runs], [r[key]["accuracy_cofi"] for r in runs]
        )
        estimates[f"accuracy_drop_{key}"] = drop
        for baseline in ("scratch_ce", "scratch_kd"):
            estimates[f"cofi_minus_{baseline}_{key}"] = paired_difference(
                [r[key]["accuracy_cofi"] for r in runs],
                [r[key][f"accuracy_{baseline}"] for r in runs],
            )
        flops = np.mean([r["flops_teacher"] / r[key]["flops"] for r in runs])
        params = np.mean([r["params_teacher"] / r[key]["params"] for r in runs])
        lines.append(
            f"{key}%: real sparsity - target {gap.format('+.3f')}, speed-up "
            f"{speedup.format('.2f')}x ({flops:.1f}x fewer FLOPs, {params:.1f}x fewer params), "
            f"accuracy drop {drop.format('+.3f')}, CoFi - scratch CE "
            f"{estimates[f'cofi_minus_scratch_ce_{key}'].format('+.3f')}, - scratch KD "
            f"{estimates[f'cofi_minus_scratch_kd_{key}'].format('+.3f')}"
        )
    exact = max(r[key]["extraction_max_rel_diff"] for r in runs for key in keys)
    statuses["exact"] = "PASS" if exact <= 1e-5 else "FAIL"
    top = keys[-1]
    if quick:
        statuses["faster"] = decide(estimates[f"speedup_{top}"], 1.0)
        decided = ["controller_" + k for k in keys] + ["exact", "faster"]
        claim = (
            f"(quick) CoFi's controller ends each run at {', '.join(keys)}% sparsity (+-0.02), the "
            f"extracted model is exact (1e-5) and faster than the teacher"
        )
    else:
        statuses["speedup_10x"] = decide(estimates[f"speedup_{top}"], 10.0)
        statuses["small_drop"] = decide(estimates[f"accuracy_drop_{keys[0]}"], 0.03, direction="<=")
        for baseline in ("scratch_ce", "scratch_kd"):
            for key in keys:
                statuses[f"beats_{baseline}_{key}"] = decide(
                    estimates[f"cofi_minus_{baseline}_{key}"], 0.0
                )
        decided = list(statuses)
        claim = (
            "CoFi: >10x speed-up at a small accuracy drop (<= 3 points at 60%), better than "
            "same-shape models trained alone (labels or distillation); controller within 0.02, "
            "exact extraction"
        )
    status = combine_statuses([statuses[k] for k in decided])
    undecided = []
    for name in decided:
        if statuses[name] == "INCONCLUSIVE":
            estimate_name = {
                "faster": f"speedup_{top}",
                "speedup_10x": f"speedup_{top}",
                "small_drop": f"accuracy_drop_{keys[0]}",
            }.get(name)
            if name.startswith("controller_"):
                estimate_name = f"sparsity_gap_{name.split('_')[1]}"
            if name.startswith("beats_"):
                estimate_name = "cofi_minus_" + name[len("beats_") :]
            threshold = {"faster": 1.0, "speedup_10x": 10.0, "small_drop": 0.03}.get(name, 0.0)
            direction = "<=" if name == "small_drop" else ">="
            if name.startswith("controller_"):
                threshold, direction = 0.02, "within"
            need = (
                seeds_to_decide(estimates[estimate_name], threshold, direction=direction)
                if estimate_name
                else None
            )
            undecided.append(f"{name} (seeds to decide: {need})")
    teacher_acc = mean_interval([r["teacher_accuracy"] for r in runs])
    measured = (
        f"teacher acc {teacher_acc.format('.3f')}; "
        + "; ".join(lines)
        + f"; extraction max rel diff {exact:.1e}; "
        + ", ".join(f"{k}: {v}" for k, v in statuses.items())
        + (f"; undecided: {', '.join(undecided)}" if undecided else "")
        + f" ({len(runs)} seeds, {seconds:.0f} s)"
    )
    write_metrics(
        out_dir,
        {
            "config": dataclasses.asdict(config),
            "quick": quick,
            "runs": runs,
            "timing_seconds": times,
            "statuses": statuses,
            "estimates": {k: dataclasses.asdict(v) for k, v in estimates.items()},
        },
    )
    _plot(out_dir, runs, keys, {k: estimates[f"speedup_{k}"].value for k in keys})
    print(measured, flush=True)
    return Verdict(claim=claim, measured=measured, status=status, estimates=estimates)


def _plot(out_dir, runs, keys, speedups) -> None:
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    teacher = [r["teacher_accuracy"] for r in runs]
    left.errorbar(
        [np.mean([r["params_teacher"] for r in runs])],
        [np.mean(teacher)],
        yerr=[np.std(teacher)],
        fmt="k*",
        markersize=10,
        label="teacher (fine-tuned)",
    )
    styles = {
        "accuracy_cofi": ("C0o", "CoFi + FT"),
        "accuracy_scratch_ce": ("C1s", "scratch, labels"),
        "accuracy_scratch_kd": ("C2^", "scratch, distillation"),
    }
    for name, (fmt, label) in styles.items():
        xs = [np.mean([r[k]["params"] for r in runs]) for k in keys]
        ys = [np.mean([r[k][name] for r in runs]) for k in keys]
        es = [np.std([r[k][name] for r in runs]) for k in keys]
        left.errorbar(xs, ys, yerr=es, fmt=fmt + "-", label=label, alpha=0.8)
    left.set_xscale("log")
    left.set_xlabel("parameters")
    left.set_ylabel("test accuracy")
    left.set_title("package of a byte snippet")
    left.legend(fontsize=8)
    for i, key in enumerate(keys):
        for r in runs:
            steps, expected, target = zip(*r[key]["sparsity_curve"], strict=True)
            right.plot(steps, expected, color=f"C{i}", alpha=0.6)
            right.plot(steps, target, color=f"C{i}", linestyle=":")
        right.axhline(
            np.mean([r[key]["real_sparsity"] for r in runs]),
            color=f"C{i}",
            linestyle="--",
            label=f"target {key}%: real sparsity (dashed)",
        )
    right.set_xlabel("pruning step")
    right.set_ylabel("expected sparsity (solid), target (dotted)")
    right.legend(fontsize=8)
    right.set_title("speed-up " + ", ".join(f"{k}%: {v:.1f}x" for k, v in speedups.items()))
    fig.tight_layout()
    fig.savefig(out_dir / "cofi.png", dpi=110)
    plt.close(fig)


def main() -> None:
    from efflax.experiment import cli_main

    cli_main("cofi")


if __name__ == "__main__":
    main()
