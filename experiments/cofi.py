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

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from efflax import data
from efflax.curves import interleaved_times
from efflax.experiment import Claims
from efflax.experiment import Panel
from efflax.experiment import Verdict
from efflax.experiment import cli_main
from efflax.experiment import plot_panels
from efflax.experiment import register
from efflax.losses import distillation_loss
from efflax.nn import Encoder
from efflax.pruning import apply_with_layers
from efflax.pruning import cofi_optimizer
from efflax.pruning import cofi_pruning_loss
from efflax.pruning import cofi_pruning_state
from efflax.pruning import cofi_structure
from efflax.pruning import extract
from efflax.stats import mean_interval
from efflax.stats import paired_difference
from efflax.stats import ratio_interval
from efflax.training import LossOutput
from efflax.training import TrainState
from efflax.training import batched_apply
from efflax.training import fit
from efflax.training import init_params
from efflax.training import make_train_step

PACKAGES = ("asyncio", "distutils", "email", "idlelib", "lib2to3", "multiprocessing")
MASK_ID = 256  # bytes are 0..255; the masked-byte token
VOCAB = 257
KD_TEMPERATURE = 2.0  # CoFi's run scripts
KD_WEIGHT, LAYER_WEIGHT = 0.1, 0.9  # CoFi: distill_ce_loss_alpha, distill_loss_alpha
FINETUNE_ALPHA_KD = 1.0  # CE + 1 * T^2 KL after extraction (and for the distilled baseline)
# Same-shape models trained alone, by their distillation weight: labels only, distillation.
BASELINES = {"scratch_ce": 0.0, "scratch_kd": FINETUNE_ALPHA_KD}
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
    scratch_steps: int | None = (
        None  # default: prune_steps + final_steps (the same budget); 0: none
    )
    warmup_fraction: float = 0.3
    timing_rounds: int = 20

    @property
    def baselines(self) -> tuple[str, ...]:
        """The :data:`BASELINES` this run trains (none when ``scratch_steps == 0``)."""
        return tuple(BASELINES) if self.scratch_steps != 0 else ()


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
    scratch_steps=0,  # the quick run decides no accuracy claim: no baselines to compare with
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


def _forward(model):
    return jax.jit(lambda params, x: model.apply({"params": params}, x))


def _accuracy(forward, params, arrays) -> float:
    logits = batched_apply(forward, params, arrays["x"], batch_size=EVAL_BATCH)
    return float(np.mean(np.argmax(logits, -1) == arrays["y"]))


def _flops_per_example(forward, params, x: np.ndarray) -> float:
    """XLA's count for a forward pass over ``EVAL_BATCH`` examples, per example."""
    return float(forward.lower(params, x[:EVAL_BATCH]).cost_analysis()["flops"]) / EVAL_BATCH


# --- training ------------------------------------------------------------------------------------
def pretrain(config: Config, seed: int = 0):
    """Masked-byte modelling (15% of bytes replaced by a mask token) on stdlib_text 'train'."""
    model = _model(config, None)

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
        return jnp.sum(losses * masked) / jnp.maximum(jnp.sum(masked), 1)

    x = jnp.zeros((1, config.seq_len), jnp.int32)
    schedule = optax.warmup_cosine_decay_schedule(0, config.lr, 50, config.pretrain_steps)
    state = TrainState.create(
        apply_fn=model.apply,
        params=init_params(model, seed, x),
        tx=optax.adamw(schedule),
        rng=jax.random.key(seed + 100),
    )
    state, history = fit(
        state,
        make_train_step(loss_fn),
        data.load("stdlib_text", "train", config.batch, seed=seed, epochs=None),
        num_steps=config.pretrain_steps,
        log_every=max(1, config.pretrain_steps // 5),
        progress=False,
    )
    return state.params, [h["train/loss"] for h in history]


def classification_step(model):
    """A train step for ``CE + alpha_kd T^2 KL(teacher || student)``; ``alpha_kd`` (0: labels
    only) and the teacher's logits come in with the batch, so one compiled step serves all."""

    def loss_fn(params, state, batch, rng):
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
    """``steps`` of ``step`` (:func:`classification_step`) from ``params``; the final params."""
    batches = {
        "x": arrays["x"],
        "y": arrays["y"],
        "teacher_logits": teacher_logits,
        "alpha_kd": np.full(len(arrays["x"]), alpha_kd, np.float32),
    }
    loader = data.Loader(batches, min(32, len(arrays["x"])), seed=seed, epochs=None)
    tx, rng = _finetune_tx(lr, steps), jax.random.key(seed)
    state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=rng)
    state, _ = fit(state, step, loader, num_steps=steps, log_every=steps, progress=False)
    return state.params


# --- the experiment ------------------------------------------------------------------------------
@functools.cache
def _setup(config: Config):
    """The model, its CoFi structure and the programs every seed and target shares."""
    model = _model(config, len(PACKAGES))
    structure = cofi_structure(model, np.zeros((2, config.seq_len), np.int32))
    loss_fn = cofi_pruning_loss(
        structure,
        model,
        warmup_steps=int(config.warmup_fraction * config.prune_steps),
        temperature=KD_TEMPERATURE,
        logit_weight=KD_WEIGHT,
        layer_weight=LAYER_WEIGHT,
    )
    masked_apply = jax.jit(
        lambda p, m, x: apply_with_layers(structure, model, {"params": p}, x, masks=m)[0]
    )
    prune = make_train_step(loss_fn, donate=False)
    return model, structure, _forward(model), classification_step(model), prune, masked_apply


def run_seed(config, task, pretrained, seed: int) -> tuple[dict, dict]:
    """Teacher, then per target: CoFi pruning, extraction, fine-tuning and the two baselines.
    Returns the seed's record and ``{name: (forward, params)}`` of the models to time."""
    model, structure, forward, full_step, prune, masked_apply = _setup(config)
    x0, train, test = task["train"]["x"][:2], task["train"], task["test"]
    # Fine-tune the pretrained encoder (a fresh classification head) = the teacher.
    init = init_params(model, seed, x0)
    init["encoder"] = {**init["encoder"], **pretrained["encoder"]}
    zeros = np.zeros((len(train["x"]), len(PACKAGES)), np.float32)
    teacher = train_classifier(
        model, init, full_step, train, zeros, 0.0, config.finetune_steps, seed, config.lr
    )
    teacher_logits = batched_apply(forward, teacher, train["x"], batch_size=EVAL_BATCH)
    record = {
        "seed": seed,
        "teacher_accuracy": _accuracy(forward, teacher, test),
        "params_teacher": _count(teacher),
        "flops_teacher": _flops_per_example(forward, teacher, test["x"]),
    }
    print(f"seed {seed}: teacher accuracy {record['teacher_accuracy']:.3f}", flush=True)
    timed = {"teacher": (forward, teacher)}
    for target in config.targets:
        key = f"{int(round(100 * target))}"
        state = cofi_pruning_state(
            structure,
            model,
            teacher,
            target,
            _prune_tx(config.prune_lr, config.reg_lr, config.lagrangian_lr),
            rng=jax.random.key(seed + 30),
            gate_key=jax.random.key(seed + 10),
            map_key=jax.random.key(seed + 20),
        )
        loader = data.Loader(
            {"x": train["x"]}, min(config.batch, len(train["x"])), seed=seed, epochs=None
        )
        state, history = fit(
            state,
            prune,
            loader,
            num_steps=config.prune_steps,
            log_every=max(1, config.prune_steps // 20),
            progress=False,
        )
        pruned = state.params
        masks = structure.deterministic(pruned["log_alpha"])
        summary = structure.summary(masks)
        small, small_params = extract(model, pruned["model"], structure, masks)
        small_forward, small_step = _forward(small), classification_step(small)
        # Exactness: the masked model (deterministic masks) vs the extracted model.
        probe = test["x"][:EVAL_BATCH]
        masked_logits = masked_apply(pruned["model"], masks, probe)
        exact = float(
            jnp.max(jnp.abs(masked_logits - small_forward(small_params, probe)))
            / jnp.maximum(jnp.max(jnp.abs(masked_logits)), 1e-30)
        )
        finetuned = train_classifier(
            small,
            small_params,
            small_step,
            train,
            teacher_logits,
            FINETUNE_ALPHA_KD,
            config.final_steps,
            seed,
            config.prune_lr,
        )
        scratch = {}
        fresh = init_params(small, seed + 1000, x0) if config.baselines else None
        for name in config.baselines:
            trained = train_classifier(
                small,
                fresh,
                small_step,
                train,
                teacher_logits,
                BASELINES[name],
                config.scratch_steps or config.prune_steps + config.final_steps,
                seed,
                config.lr,
            )
            scratch[name] = _accuracy(small_forward, trained, test)
        record[key] = r = {
            "target": target,
            "real_sparsity": float(summary["sparsity"]),
            "expected_sparsity": float(history[-1]["train/expected_sparsity"]),
            "structure": summary,
            "extraction_max_rel_diff": exact,
            "accuracy_pruned_before_finetune": _accuracy(small_forward, small_params, test),
            "accuracy_cofi": _accuracy(small_forward, finetuned, test),
            **{f"accuracy_{name}": accuracy for name, accuracy in scratch.items()},
            "params": _count(finetuned),
            "flops": _flops_per_example(small_forward, finetuned, test["x"]),
            "sparsity_curve": [
                (h["step"], h["train/expected_sparsity"], h["train/target"]) for h in history
            ],
        }
        print(
            f"seed {seed} target {target}: real sparsity {r['real_sparsity']:.3f} (expected "
            f"{r['expected_sparsity']:.3f}), exact {exact:.1e}, acc cofi {r['accuracy_cofi']:.3f} "
            f"(before FT {r['accuracy_pruned_before_finetune']:.3f})"
            + "".join(f" vs {name} {acc:.3f}" for name, acc in scratch.items())
            + f", params {r['params']} vs {record['params_teacher']}",
            flush=True,
        )
        timed[key] = (small_forward, finetuned)
    return record, timed


@register(
    "cofi",
    description="CoFi pruning of a pretrained byte-level encoder vs small models",
    timing_sensitive="sections",  # times only through efflax.curves.interleaved_times
)
def run(out_dir: pathlib.Path, *, quick: bool) -> Verdict:
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = QUICK if quick else FULL
    task = package_task(config)
    print(
        f"task: {len(task['train']['x'])} train / {len(task['test']['x'])} test snippets of "
        f"{config.seq_len} bytes, {len(PACKAGES)} packages",
        flush=True,
    )
    pretrained, mlm_curve = pretrain(config)
    print(f"pretrained: masked-byte loss {mlm_curve[0]:.3f} -> {mlm_curve[-1]:.3f}", flush=True)
    runs, timed = [], {}
    for seed in config.seeds:
        record, models = run_seed(config, task, pretrained, seed)
        runs.append(record)
        timed = timed or models  # the first seed's models are timed
    probe = task["test"]["x"][:EVAL_BATCH]
    fns = {name: (fn, (params, probe)) for name, (fn, params) in timed.items()}
    times = interleaved_times(fns, rounds=config.timing_rounds)
    return _report(out_dir, config, quick, runs, times)


def _report(out_dir, config, quick, runs, times) -> Verdict:
    keys = [f"{int(round(100 * t))}" for t in config.targets]
    claims, lines = Claims(), []
    per = {}  # estimates by name
    for key, target in zip(keys, config.targets, strict=True):
        gaps = [r[key]["real_sparsity"] - target for r in runs]
        # The claim is about every run the controller drives (where it ends), not about a mean
        # over seeds: PASS when each run ends within 0.02 of its target.
        claims.require(f"controller_{key}", max(map(abs, gaps)) <= 0.02, mean_interval(gaps))
        cofi = [r[key]["accuracy_cofi"] for r in runs]
        per[f"speedup_{key}"] = ratio_interval(times["teacher"], times[key])
        per[f"accuracy_drop_{key}"] = paired_difference([r["teacher_accuracy"] for r in runs], cofi)
        for baseline in config.baselines:
            per[f"cofi_minus_{baseline}_{key}"] = paired_difference(
                cofi, [r[key][f"accuracy_{baseline}"] for r in runs]
            )
        flops = np.mean([r["flops_teacher"] / r[key]["flops"] for r in runs])
        params = np.mean([r["params_teacher"] / r[key]["params"] for r in runs])
        lines.append(
            f"{key}%: real sparsity - target {claims.estimates[f'controller_{key}'].format('+.3f')}"
            f", speed-up {per[f'speedup_{key}'].format('.2f')}x ({flops:.1f}x fewer FLOPs, "
            f"{params:.1f}x fewer params), accuracy drop {per[f'accuracy_drop_{key}'].format('+.3f')}"
            + "".join(
                f", CoFi - {b} {per[f'cofi_minus_{b}_{key}'].format('+.3f')}"
                for b in config.baselines
            )
        )
    exact = max(r[key]["extraction_max_rel_diff"] for r in runs for key in keys)
    claims.require("exact", exact <= 1e-5)
    top = keys[-1]
    # Decided in the full run only (the quick run has one seed); reported in both.
    decided = {f"speedup_{top}": (10.0, ">="), f"accuracy_drop_{keys[0]}": (0.03, "<=")}
    decided.update({f"cofi_minus_{b}_{k}": (0.0, ">=") for b in BASELINES for k in keys})
    if quick:
        claims.check(f"faster_{top}", per[f"speedup_{top}"], 1.0)
        claim = (
            f"(quick) CoFi's controller ends each run at {', '.join(keys)}% sparsity (+-0.02), the "
            f"extracted model is exact (1e-5) and faster than the teacher"
        )
    else:
        claim = (
            "CoFi: >10x speed-up at a small accuracy drop (<= 3 points at 60%), better than "
            "same-shape models trained alone (labels or distillation); controller within 0.02, "
            "exact extraction"
        )
    for name, estimate in per.items():
        threshold, direction = decided.get(name, (1.0 if "speedup" in name else 0.0, ">="))
        (claims.report if quick or name not in decided else claims.check)(
            name, estimate, threshold, direction
        )
    teacher_acc = mean_interval([r["teacher_accuracy"] for r in runs])
    measured = (
        f"teacher acc {teacher_acc.format('.3f')}; "
        + "; ".join(lines)
        + f"; extraction max rel diff {exact:.1e}; "
        + ", ".join(f"{k}: {v}" for k, v in claims.statuses.items())
        + f" ({len(runs)} seeds)"
    )
    _plot(out_dir / "cofi.png", runs, keys, per, config.baselines)
    print(measured, flush=True)
    return claims.verdict(
        out_dir,
        claim=claim,
        measured=measured,
        metrics={"config": config, "quick": quick, "runs": runs, "timing_seconds": times},
    )


def _plot(path, runs, keys, estimates, baselines) -> None:
    def mean(values):
        return np.mean(values, axis=0)

    accuracy = {
        "teacher (fine-tuned)": (
            [mean([r["params_teacher"] for r in runs])],
            [[r["teacher_accuracy"]] for r in runs],
        )
    }
    for name, label in (
        ("cofi", "CoFi + FT"),
        ("scratch_ce", "scratch, labels"),
        ("scratch_kd", "scratch, distillation"),
    ):
        if name != "cofi" and name not in baselines:
            continue
        accuracy[label] = (
            [mean([r[k]["params"] for r in runs]) for k in keys],
            [[r[k][f"accuracy_{name}"] for k in keys] for r in runs],
        )
    sparsity = {}
    for key in keys:
        curves = np.array([r[key]["sparsity_curve"] for r in runs])  # [seeds, points, 3]
        sparsity[f"{key}%: expected"] = (curves[0, :, 0], curves[:, :, 1])
        sparsity[f"{key}%: target"] = (curves[0, :, 0], curves[:, :, 2])
    real = tuple(float(mean([r[k]["real_sparsity"] for r in runs])) for k in keys)
    speedups = ", ".join(f"{k}%: {estimates[f'speedup_{k}'].value:.1f}x" for k in keys)
    plot_panels(
        path,
        [
            Panel(
                "package of a byte snippet",
                accuracy,
                xlabel="parameters",
                ylabel="test accuracy",
                xscale="log",
                style={"teacher (fine-tuned)": "k*"},
            ),
            Panel(
                f"speed-up {speedups}",
                sparsity,
                xlabel="pruning step",
                hlines=real,
                ylabel="sparsity (dotted: real, final)",
                style={f"{k}%: target": ":" for k in keys},
            ),
        ],
        title="CoFi pruning of a pretrained byte-level encoder",
    )


if __name__ == "__main__":
    cli_main("cofi")
