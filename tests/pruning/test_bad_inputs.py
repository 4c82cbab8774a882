"""Bad calls to every public function of efflax.pruning (and the Lagrangian controller): a
ValueError naming the argument, before any work; exact parameter counts at any model size."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efflax.nn import Encoder
from efflax.optim import LagrangianSparsity
from efflax.optim import gradient_ascent
from efflax.optim import project_to_box
from efflax.pruning import CoFiStructure
from efflax.pruning import HardConcreteMask
from efflax.pruning import apply_masks
from efflax.pruning import apply_with_layers
from efflax.pruning import cofi_distillation_loss
from efflax.pruning import cofi_optimizer
from efflax.pruning import cofi_structure
from efflax.pruning import default_teacher_layers
from efflax.pruning import extract
from efflax.pruning import layer_distillation_loss
from efflax.pruning import mask_axis

KEY = jax.random.key(0)
GATE = HardConcreteMask(shape=(3,))
LOG_ALPHA = jnp.zeros(3)
MODEL = Encoder(num_layers=2, d_model=8, num_heads=2, mlp_hidden=16, num_classes=3, max_len=4)
X = jnp.ones((2, 4, 5))
STRUCTURE = cofi_structure(MODEL, X)
LOG_ALPHAS = STRUCTURE.init(KEY)
MASKS = STRUCTURE.deterministic(LOG_ALPHAS)
H = [jnp.ones((2, 4, 8)) for _ in range(3)]
T = [jnp.ones((2, 4, 8)) for _ in range(4)]
CONTROLLER = LagrangianSparsity(0.5, warmup_steps=10)
MULTIPLIERS = CONTROLLER.init()


def _replace(tree, group, value):
    out = dict(tree)
    out[group] = value
    return out


BAD = {
    # HardConcreteMask
    "gate shape int": (lambda: HardConcreteMask(shape=3), r"shape"),
    "gate shape str": (lambda: HardConcreteMask(shape="3"), r"shape"),
    "gate shape float": (lambda: HardConcreteMask(shape=(3.0,)), r"shape"),
    "gate shape bool": (lambda: HardConcreteMask(shape=(True,)), r"shape"),
    "gate shape 0": (lambda: HardConcreteMask(shape=(0,)), r"shape"),
    "gate temperature 0": (lambda: HardConcreteMask(temperature=0.0), r"temperature"),
    "gate temperature str": (lambda: HardConcreteMask(temperature="a"), r"temperature"),
    "gate init_std nan": (lambda: HardConcreteMask(init_std=float("nan")), r"init_std"),
    "gate limit_low 0": (lambda: HardConcreteMask(limit_low=0.0), r"limit_low"),
    "gate limit_high 1": (lambda: HardConcreteMask(limit_high=jnp.float32(1.0)), r"limit_high"),
    "gate log_alpha range": (
        lambda: HardConcreteMask(log_alpha_min=2.0, log_alpha_max=1.0),
        r"log_alpha_min",
    ),
    "gate epsilon 0": (lambda: HardConcreteMask(epsilon=0.0), r"epsilon"),
    "gate eval_scale bool": (lambda: HardConcreteMask(eval_scale=True), r"eval_scale"),
    "droprate 1": (lambda: HardConcreteMask.from_droprate((3,), 1.0), r"droprate"),
    "droprate shape int": (lambda: HardConcreteMask.from_droprate(3), r"shape"),
    "droprate init_mean": (
        lambda: HardConcreteMask.from_droprate((3,), init_mean=1.0),
        r"init_mean",
    ),
    "gate init key int": (lambda: GATE.init(0), r"key"),
    "gate init shape": (lambda: GATE.init(KEY, (4,)), r"shape"),
    "gate init shape int": (lambda: GATE.init(KEY, 3), r"shape"),
    "gate init dtype int": (lambda: GATE.init(KEY, dtype=jnp.int32), r"dtype"),
    "gate init dtype junk": (lambda: GATE.init(KEY, dtype="nope"), r"dtype"),
    "gate sample key int": (lambda: GATE.sample(LOG_ALPHA, 0), r"key=0 must be one PRNG key"),
    "gate sample key split": (lambda: GATE.sample(LOG_ALPHA, jax.random.split(KEY)), r"key"),
    "gate sample shape": (lambda: GATE.sample(jnp.zeros(4), KEY), r"log_alpha"),
    "gate sample str": (lambda: GATE.sample("abc", KEY), r"log_alpha"),
    "gate sample bool": (lambda: GATE.sample(jnp.zeros(3, bool), KEY), r"log_alpha"),
    "gate clamp None": (lambda: GATE.clamp(None), r"log_alpha"),
    "gate prob list": (lambda: GATE.prob_nonzero([0.0, 1.0]), r"log_alpha"),
    "gate call no key": (lambda: GATE(LOG_ALPHA), r"key"),
    "gate call deterministic int": (
        lambda: GATE(LOG_ALPHA, KEY, deterministic=1),
        r"deterministic",
    ),
    "gate expected_l0 2d": (lambda: GATE.expected_l0(jnp.zeros((3, 1))), r"log_alpha"),
    # mask_axis
    "mask_axis axis bool": (lambda: mask_axis(jnp.ones((2, 3)), jnp.ones(3), True), r"axis"),
    "mask_axis axis float": (lambda: mask_axis(jnp.ones((2, 3)), jnp.ones(3), 1.0), r"axis"),
    "mask_axis axis out": (lambda: mask_axis(jnp.ones((2, 3)), jnp.ones(3), 2), r"axis"),
    "mask_axis axis repeat": (
        lambda: mask_axis(jnp.ones((2, 3)), jnp.ones((3, 3)), (1, -1)),
        r"axis",
    ),
    "mask_axis axis str": (lambda: mask_axis(jnp.ones((2, 3)), jnp.ones(3), "1"), r"axis"),
    "mask_axis x int": (lambda: mask_axis(jnp.ones((2, 3), int), jnp.ones(3) / 2, 1), r"x.dtype"),
    "target_at inf": (lambda: CONTROLLER.target_at(float("inf")), r"step"),
    "penalty sparsity nan": (
        lambda: CONTROLLER.penalty(float("nan"), MULTIPLIERS, 0),
        r"expected_sparsity",
    ),
    "cofi_structure groups empty": (lambda: cofi_structure(MODEL, X, groups=()), r"groups"),
    "cofi_structure rngs no params": (
        lambda: cofi_structure(MODEL, X, rngs={"dropout": KEY}),
        r"rngs",
    ),
    "mask_axis z shape": (lambda: mask_axis(jnp.ones((2, 3)), jnp.ones(2), 1), r"z.shape"),
    "mask_axis x str": (lambda: mask_axis("abc", jnp.ones(3), 0), r"\bx\b"),
    "mask_axis z str": (lambda: mask_axis(jnp.ones((2, 3)), "abc", 1), r"\bz\b"),
    # CoFiStructure methods
    "structure init key int": (lambda: STRUCTURE.init(0), r"key=0 must be one PRNG key"),
    "structure sample key int": (
        lambda: STRUCTURE.sample(LOG_ALPHAS, 0),
        r"key=0 must be one PRNG key",
    ),
    "structure sample key None": (lambda: STRUCTURE.sample(LOG_ALPHAS, None), r"key"),
    "structure clamp None": (lambda: STRUCTURE.clamp(None), r"log_alpha"),
    "structure clamp list": (lambda: STRUCTURE.clamp([1.0]), r"log_alpha"),
    "structure clamp missing group": (
        lambda: STRUCTURE.clamp({"head": LOG_ALPHAS["head"]}),
        r"log_alpha",
    ),
    "structure clamp wrong shape": (
        lambda: STRUCTURE.clamp(_replace(LOG_ALPHAS, "hidden", jnp.zeros(3))),
        r"log_alpha\['hidden'\]",
    ),
    "structure clamp str leaf": (
        lambda: STRUCTURE.clamp(
            _replace(LOG_ALPHAS, "head_layer", {k: "a" for k in LOG_ALPHAS["head_layer"]})
        ),
        r"log_alpha\['head_layer'\]",
    ),
    "structure size str leaf": (
        lambda: STRUCTURE.size(_replace(MASKS, "mlp", {k: "a" for k in MASKS["mlp"]})),
        r"masks\['mlp'\]",
    ),
    "structure size None": (lambda: STRUCTURE.size(None), r"masks"),
    "structure sparsity dict": (lambda: STRUCTURE.sparsity({}), r"masks"),
    "structure summary list": (lambda: STRUCTURE.summary([MASKS]), r"masks"),
    "structure layer_exists None": (lambda: STRUCTURE.layer_exists(None), r"masks"),
    "structure expected_size list": (lambda: STRUCTURE.expected_size([0.0]), r"log_alpha"),
    "structure deterministic int": (lambda: STRUCTURE.deterministic(3), r"log_alpha"),
    # cofi_structure
    "cofi_structure model": (lambda: cofi_structure(lambda x: x, X), r"model"),
    "cofi_structure groups unknown": (
        lambda: cofi_structure(MODEL, X, groups=("heads",)),
        r"groups",
    ),
    "cofi_structure groups int": (lambda: cofi_structure(MODEL, X, groups=3), r"groups"),
    "cofi_structure rngs int": (lambda: cofi_structure(MODEL, X, rngs=0), r"rngs"),
    "cofi_structure rngs dict int": (lambda: cofi_structure(MODEL, X, rngs={"params": 0}), r"rngs"),
    "cofi_structure gate_configs list": (
        lambda: cofi_structure(MODEL, X, gate_configs=[1]),
        r"gate_configs",
    ),
    "cofi_structure gate_configs group": (
        lambda: cofi_structure(MODEL, X, gate_configs={"heads": {}}),
        r"gate_configs",
    ),
    "cofi_structure gate_configs field": (
        lambda: cofi_structure(MODEL, X, gate_configs={"head": {"init_men": 1.0}}),
        r"gate_configs\['head'\].*init_men",
    ),
    "cofi_structure gate_configs value": (
        lambda: cofi_structure(MODEL, X, gate_configs={"head": {"temperature": -1.0}}),
        r"temperature",
    ),
    "cofi_structure gate_configs not dict": (
        lambda: cofi_structure(MODEL, X, gate_configs={"head": 3}),
        r"gate_configs\['head'\]",
    ),
    # apply_masks / apply_with_layers / extract
    "apply_masks structure": (lambda: apply_masks(None, MASKS).__enter__(), r"structure"),
    "apply_masks masks": (lambda: apply_masks(STRUCTURE, {"head": 1}).__enter__(), r"masks"),
    "apply_with_layers structure": (lambda: apply_with_layers("s", MODEL, {}, X), r"structure"),
    "apply_with_layers model": (lambda: apply_with_layers(STRUCTURE, "m", {}, X), r"model"),
    "apply_with_layers variables": (
        lambda: apply_with_layers(STRUCTURE, MODEL, [1], X),
        r"variables",
    ),
    "apply_with_layers masks": (
        lambda: apply_with_layers(STRUCTURE, MODEL, {}, X, masks=[1]),
        r"masks",
    ),
    "extract structure": (lambda: extract(MODEL, {}, None, MASKS), r"structure"),
    "extract model": (lambda: extract("m", {}, STRUCTURE, MASKS), r"model"),
    "extract masks None": (lambda: extract(MODEL, {}, STRUCTURE, None), r"masks"),
    "extract params list": (lambda: extract(MODEL, [1], STRUCTURE, MASKS), r"params"),
    "extract params wrong": (
        lambda: extract(MODEL, {"a": jnp.ones(2)}, STRUCTURE, MASKS),
        r"params",
    ),
    "extract attributes": (
        lambda: extract(MODEL, {}, STRUCTURE, MASKS, attributes={"a": 1}),
        r"attributes",
    ),
    # default_teacher_layers / layer_distillation_loss / cofi_distillation_loss
    "teacher layers 0": (lambda: default_teacher_layers(0), r"num_layers"),
    "teacher layers float": (lambda: default_teacher_layers(12.0), r"num_layers"),
    "teacher layers bool": (lambda: default_teacher_layers(True), r"num_layers"),
    "layer loss empty student": (
        lambda: layer_distillation_loss([], T, lambda h: h),
        r"student_layers",
    ),
    "layer loss empty teacher": (
        lambda: layer_distillation_loss(H, [], lambda h: h),
        r"teacher_layers",
    ),
    "layer loss student array": (
        lambda: layer_distillation_loss(jnp.ones((3, 2, 8)), T, lambda h: h),
        r"student_layers",
    ),
    "layer loss student str": (
        lambda: layer_distillation_loss(["a"], T, lambda h: h),
        r"student_layers\[0\]",
    ),
    "layer loss teacher int": (
        lambda: layer_distillation_loss(H, [jnp.ones((2, 4, 8), int)], lambda h: h),
        r"teacher_layers\[0\]",
    ),
    "layer loss teacher empty axis": (
        lambda: layer_distillation_loss(H, [jnp.ones((0, 4, 8))], lambda h: h),
        r"teacher_layers\[0\]",
    ),
    "layer loss transform": (lambda: layer_distillation_loss(H, T, None), r"transform"),
    "layer loss transform shape": (
        lambda: layer_distillation_loss(H, T, lambda h: h[..., :4]),
        r"transform\(student_layers\[0\]\)",
    ),
    "layer loss transform broadcast": (
        lambda: layer_distillation_loss(H, T, lambda h: h[:1]),
        r"transform\(student_layers\[0\]\)",
    ),
    "layer loss transform drops batch": (
        lambda: layer_distillation_loss(H, T, lambda h: h[0]),
        r"transform\(student_layers\[0\]\)",
    ),
    "layer loss transform str": (
        lambda: layer_distillation_loss(H, T, lambda h: "a"),
        r"transform",
    ),
    "layer loss index bool": (
        lambda: layer_distillation_loss(H, T, lambda h: h, teacher_indices=(True, 2)),
        r"teacher_indices",
    ),
    "layer loss index float": (
        lambda: layer_distillation_loss(H, T, lambda h: h, teacher_indices=(1.0,)),
        r"teacher_indices",
    ),
    "layer loss index range": (
        lambda: layer_distillation_loss(H, T, lambda h: h, teacher_indices=(4,)),
        r"teacher_indices",
    ),
    "layer loss index negative": (
        lambda: layer_distillation_loss(H, T, lambda h: h, teacher_indices=(-1,)),
        r"teacher_indices",
    ),
    "layer loss index int": (
        lambda: layer_distillation_loss(H, T, lambda h: h, teacher_indices=2),
        r"teacher_indices",
    ),
    "layer loss index repeat": (
        lambda: layer_distillation_loss(H, T, lambda h: h, teacher_indices=(2, 2)),
        r"teacher_indices",
    ),
    "layer loss index empty": (
        lambda: layer_distillation_loss(H, T, lambda h: h, teacher_indices=()),
        r"teacher_indices",
    ),
    "layer loss exists shape": (
        lambda: layer_distillation_loss(H, T, lambda h: h, student_exists=[True]),
        r"student_exists",
    ),
    "layer loss exists float": (
        lambda: layer_distillation_loss(H, T, lambda h: h, student_exists=[0.5, 1.0, 0.0]),
        r"student_exists",
    ),
    "layer loss exists str": (
        lambda: layer_distillation_loss(H, T, lambda h: h, student_exists="abc"),
        r"student_exists",
    ),
    "layer loss official int": (
        lambda: layer_distillation_loss(H, T, lambda h: h, official_indexing=1),
        r"official_indexing",
    ),
    "cofi loss logit_weight": (
        lambda: cofi_distillation_loss(X[:, 0], X[:, 0], H, T, lambda h: h, logit_weight=-1.0),
        r"logit_weight",
    ),
    "cofi loss layer_weight": (
        lambda: cofi_distillation_loss(X[:, 0], X[:, 0], H, T, lambda h: h, layer_weight="a"),
        r"layer_weight",
    ),
    "cofi loss temperature": (
        lambda: cofi_distillation_loss(X[:, 0], X[:, 0], H, T, lambda h: h, temperature=0.0),
        r"temperature",
    ),
    "cofi loss teacher layers": (
        lambda: cofi_distillation_loss(X[:, 0], X[:, 0], H, None, lambda h: h),
        r"teacher_layers",
    ),
    # cofi_optimizer
    "optimizer model_tx": (lambda: cofi_optimizer(None), r"model_tx"),
    "optimizer reg lr 0": (
        lambda: cofi_optimizer(optax.sgd(1.0), reg_learning_rate=0.0),
        r"reg_learning_rate",
    ),
    "optimizer lag lr nan": (
        lambda: cofi_optimizer(optax.sgd(1.0), lagrangian_learning_rate=float("nan")),
        r"lagrangian_learning_rate",
    ),
    "optimizer b1 1": (lambda: cofi_optimizer(optax.sgd(1.0), b1=1.0), r"b1"),
    "optimizer b2 str": (lambda: cofi_optimizer(optax.sgd(1.0), b2="a"), r"b2"),
    "optimizer eps 0": (lambda: cofi_optimizer(optax.sgd(1.0), eps=0.0), r"eps"),
    "optimizer range float": (
        lambda: cofi_optimizer(optax.sgd(1.0), log_alpha_range=1.0),
        r"log_alpha_range",
    ),
    "optimizer range 3": (
        lambda: cofi_optimizer(optax.sgd(1.0), log_alpha_range=(0, 1, 2)),
        r"log_alpha_range",
    ),
    "optimizer range order": (
        lambda: cofi_optimizer(optax.sgd(1.0), log_alpha_range=(1.0, 0.0)),
        r"log_alpha_range",
    ),
    "optimizer params": (
        lambda: cofi_optimizer(optax.sgd(1.0)).init({"model": jnp.ones(2)}),
        r"log_alpha",
    ),
    # LagrangianSparsity / gradient_ascent / project_to_box
    "lagrangian target 1": (lambda: LagrangianSparsity(1.0), r"target"),
    "lagrangian target vector": (lambda: LagrangianSparsity(jnp.ones(2) / 2), r"target"),
    "lagrangian target str": (lambda: LagrangianSparsity("a"), r"target"),
    "lagrangian warmup float": (
        lambda: LagrangianSparsity(0.5, warmup_steps=10.0),
        r"warmup_steps",
    ),
    "lagrangian warmup negative": (
        lambda: LagrangianSparsity(0.5, warmup_steps=-1),
        r"warmup_steps",
    ),
    "lagrangian start above": (lambda: LagrangianSparsity(0.5, start=0.6), r"start"),
    "target_at negative": (lambda: CONTROLLER.target_at(-10), r"step"),
    "target_at str": (lambda: CONTROLLER.target_at("1"), r"step"),
    "target_at vector": (lambda: CONTROLLER.target_at(jnp.arange(3)), r"step"),
    "target_at nan": (lambda: CONTROLLER.target_at(float("nan")), r"step"),
    "target_at bool": (lambda: CONTROLLER.target_at(True), r"step"),
    "target_at no warmup negative": (lambda: LagrangianSparsity(0.5).target_at(-1), r"step"),
    "penalty vector multipliers": (
        lambda: CONTROLLER.penalty(0.3, {"lambda_1": jnp.ones(3), "lambda_2": jnp.ones(3)}, 0),
        r"multipliers\['lambda_1'\]",
    ),
    "penalty multipliers keys": (
        lambda: CONTROLLER.penalty(0.3, {"lambda_1": 0.0}, 0),
        r"multipliers",
    ),
    "penalty multipliers str": (
        lambda: CONTROLLER.penalty(0.3, {"lambda_1": "a", "lambda_2": 0.0}, 0),
        r"multipliers",
    ),
    "penalty sparsity vector": (
        lambda: CONTROLLER.penalty(jnp.ones(2), MULTIPLIERS, 0),
        r"expected_sparsity",
    ),
    "penalty sparsity str": (lambda: CONTROLLER.penalty("a", MULTIPLIERS, 0), r"expected_sparsity"),
    "penalty step negative": (lambda: CONTROLLER.penalty(0.3, MULTIPLIERS, -1), r"step"),
    "gradient_ascent inner": (lambda: gradient_ascent(None), r"inner"),
    "project_to_box order": (lambda: project_to_box(1.0, 0.0), r"lower"),
    "project_to_box str": (lambda: project_to_box("a", 1.0), r"lower"),
    "project_to_box inf": (lambda: project_to_box(0.0, float("inf")), r"upper"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_call_is_refused_naming_the_argument(name):
    call, pattern = BAD[name]
    with pytest.raises(ValueError, match=pattern):
        call()


def test_size_is_an_exact_integer_at_bert_base_size():
    # BERT-base's encoder (12 layers, d=768, 12 heads, 3072 units): 84,908,482 prunable
    # parameters under these masks; float32 accumulation gave 84,908,528.
    model = Encoder(
        num_layers=12, d_model=768, num_heads=12, mlp_hidden=3072, num_classes=2, max_len=8
    )
    structure = cofi_structure(model, jnp.ones((1, 8, 768)))
    assert isinstance(structure, CoFiStructure)
    all_on = jax.tree.map(
        lambda g: np.ones(g.shape, np.float32),
        structure.gates(),
        is_leaf=lambda g: isinstance(g, HardConcreteMask),
    )
    size = structure.size(all_on)
    assert type(size) is int and size == structure.prunable_size
    assert structure.summary(all_on)["remaining_params"] == structure.prunable_size
    assert structure.sparsity(all_on) == 0.0
    rng = np.random.default_rng(0)
    masks = jax.tree.map(lambda z: (rng.random(z.shape) < 0.9).astype(np.float32), all_on)
    masks["hidden"][:] = 1.0
    exact = structure.size(masks)
    # The same formula in float64 (exact below 2**53), and the int32 count under jit.
    as_float64 = structure._remaining(
        jax.tree.map(lambda z: (z != 0).astype(np.float64), masks), np, np.float64
    )
    assert exact == int(as_float64)
    assert int(jax.jit(structure.size)(masks)) == exact
    assert structure.summary(masks)["remaining_params"] == exact


def test_zero_dim_arrays_count_as_numbers():
    gate = HardConcreteMask(shape=(3,), temperature=jnp.float32(0.5), init_mean=np.float64(1.0))
    assert gate == HardConcreteMask(shape=(jnp.int32(3),), temperature=0.5, init_mean=1.0)
    hash(gate)
    controller = LagrangianSparsity(
        jnp.float32(0.5), warmup_steps=jnp.int32(10), start=np.float32(0.1)
    )
    assert np.isclose(controller.target_at(jnp.int32(5)), 0.3)
    cofi_optimizer(optax.sgd(1.0), reg_learning_rate=jnp.float32(0.1), b1=np.float32(0.9))
    project_to_box(jnp.float32(-1.0), np.float64(1.0))


def test_target_is_clipped_before_the_warmup_even_when_traced():
    controller = LagrangianSparsity(0.5, warmup_steps=10)
    assert float(controller.target_at(0)) == 0.0
    assert float(jax.jit(controller.target_at)(jnp.int32(-10))) == 0.0
    assert float(controller.target_at(100)) == 0.5
    loss, target = jax.jit(controller.penalty)(0.3, MULTIPLIERS, 5)
    assert loss.shape == () and target.shape == ()


def test_layer_distillation_lists_and_int_exists_are_accepted():
    loss, matched = layer_distillation_loss(
        [np.asarray(h).tolist() for h in H], T, lambda h: h, student_exists=np.array([1, 0, 1])
    )
    assert loss.shape == () and matched.shape == (len(default_teacher_layers(4)),)
