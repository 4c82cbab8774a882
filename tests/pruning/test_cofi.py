"""CoFi: masks on efflax's layers, expected size, controller, layer distillation, extraction."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efflax.losses import distillation_loss
from efflax.models import TransformerLM
from efflax.nn import DenseFeedForward
from efflax.nn import Encoder
from efflax.nn import MultiHeadAttention
from efflax.optim import LagrangianSparsity
from efflax.pruning import apply_masks
from efflax.pruning import apply_with_layers
from efflax.pruning import cofi_distillation_loss
from efflax.pruning import cofi_optimizer
from efflax.pruning import cofi_structure
from efflax.pruning import default_teacher_layers
from efflax.pruning import extract
from efflax.pruning import layer_distillation_loss


def _named(axes, init=None):
    return nn.with_logical_partitioning(init or nn.initializers.lecun_normal(), axes)


class _Glu(nn.Module):
    """A user's SwiGLU FFN (``gate``/``up``/``down``, no biases), not an efflax class."""

    hidden: int

    @nn.compact
    def __call__(self, x):
        def dense(features, axes, name):
            return nn.Dense(features, use_bias=False, kernel_init=_named(axes), name=name)

        gate = dense(self.hidden, ("embed", "mlp"), "gate")(x)
        up = dense(self.hidden, ("embed", "mlp"), "up")(x)
        return dense(x.shape[-1], ("mlp", "embed"), "down")(nn.silu(gate) * up)


class _Block(nn.Module):
    """A user's pre-norm block: GQA attention with biases and rotary, a SwiGLU FFN, RMSNorm."""

    @nn.compact
    def __call__(self, x):
        h = nn.RMSNorm(name="attn_norm")(x)
        x = x + MultiHeadAttention(
            4, num_kv_heads=2, use_bias=True, causal=True, rope=True, name="attn"
        )(h)
        h = nn.LayerNorm(name="mlp_norm")(x)
        return x + _Glu(24, name="mlp")(h)


class _UserLM(nn.Module):
    """A user's own token model built from efflax layers (not an efflax model)."""

    width: int = 16
    num_blocks: int = 2

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(
            11, self.width, embedding_init=_named(("vocab", "embed"), nn.initializers.normal(1.0))
        )(tokens)
        for i in range(self.num_blocks):
            x = _Block(name=f"block_{i}")(x)
        x = nn.LayerNorm(name="final_norm")(x)
        return nn.Dense(11, kernel_init=_named(("embed", "vocab")), name="unembed")(x)


def _encoder_case():
    model = Encoder(num_layers=3, d_model=16, num_heads=4, mlp_hidden=32, num_classes=3, max_len=8)
    x = jax.random.normal(jax.random.key(1), (2, 8, 5))
    return model, x, {}


def _user_case(num_blocks=2):
    model = _UserLM(num_blocks=num_blocks)
    x = jax.random.randint(jax.random.key(1), (2, 7), 0, 11)
    return model, x, {_UserLM: {"hidden": "width"}, _Glu: {"units": "hidden"}}


def _lm_case():
    model = TransformerLM(
        num_layers=2, d_model=16, num_heads=4, num_kv_heads=2, mlp_hidden=24, implementation="xla"
    )
    x = jax.random.randint(jax.random.key(1), (2, 7), 0, 256)
    return model, x, {}


CASES = {"encoder": _encoder_case, "user_gqa": _user_case, "transformer_lm": _lm_case}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    model, x, attributes = CASES[request.param]()
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), x))["params"]
    structure = cofi_structure(model, x)
    # Gates spread over both sides of the threshold, one whole attention layer and one FFN off.
    spread = jax.jit(
        lambda t, k: jax.tree.map(
            lambda a, kk: 2.5 * jax.random.normal(kk, a.shape) + 0.5, t, _keys_like(t, k)
        )
    )
    log_alpha = spread(structure.init(jax.random.key(2)), jax.random.key(3))
    first_attention = sorted(log_alpha["head_layer"])[0]
    last_ffn = sorted(log_alpha["mlp"])[-1]
    log_alpha["head_layer"] = {
        k: jnp.asarray(-4.0 if k == first_attention else 4.0) for k in log_alpha["head_layer"]
    }
    log_alpha["mlp"][last_ffn] = jnp.asarray(-4.0)
    return model, x, attributes, params, structure, log_alpha


def _keys_like(tree, key):
    leaves, treedef = jax.tree.flatten(tree)
    return jax.tree.unflatten(treedef, list(jax.random.split(key, len(leaves))))


def _count(params, keep_prefixes):
    total = 0
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = tuple(str(k.key) for k in path)
        if any(names[: len(p)] == p for p in keep_prefixes):
            total += leaf.size
    return total


def _prunable_prefixes(structure):
    return [s.path for s in (*structure.attention, *structure.feed_forward, *structure.norms)]


@pytest.mark.parametrize("case", ["encoder"], indirect=True)
def test_structure_of_the_encoder(case):
    _, _, _, _, structure, _ = case
    assert structure.groups == ("head", "head_layer", "intermediate", "mlp", "hidden")
    assert [s.path for s in structure.attention] == [(f"block_{i}", "attention") for i in range(3)]
    assert [s.path for s in structure.feed_forward] == [(f"block_{i}", "ffn") for i in range(3)]
    assert structure.layers == (("block_0",), ("block_1",), ("block_2",))
    assert structure.hidden_size == 16 and len(structure.norms) == 7
    gates = structure.init(jax.random.key(0))
    assert gates["head"]["block_0/attention"].shape == (4,)
    assert gates["intermediate"]["block_2/ffn"].shape == (32,)
    assert gates["hidden"].shape == (16,) and gates["mlp"]["block_1/ffn"].shape == ()
    # CoFi's init: 10 for heads, layers and hidden; droprate 0.5 (log-odds 0) for FFN units.
    assert abs(float(gates["head"]["block_0/attention"].mean()) - 10) < 0.05
    assert abs(float(gates["intermediate"]["block_0/ffn"].mean())) < 0.05


def test_extraction_is_exact_and_smaller(case):
    model, x, attributes, params, structure, log_alpha = case
    masks = structure.deterministic(log_alpha)
    small, small_params = extract(model, params, structure, masks, attributes=attributes)

    @jax.jit
    def outputs(params, small_params, masks):
        masked = apply_with_layers(structure, model, {"params": params}, x, masks=masks)
        return masked, apply_with_layers(structure, small, {"params": small_params}, x)

    (masked, masked_layers), (out, small_layers) = outputs(params, small_params, masks)
    scale = float(jnp.max(jnp.abs(masked)))
    chex.assert_trees_all_close(out, masked, rtol=1e-5, atol=1e-5 * scale)
    summary = structure.summary(masks)
    assert 0 < summary["hidden"] < structure.hidden_size
    assert sum(v.size for v in jax.tree.leaves(small_params)) < sum(
        v.size for v in jax.tree.leaves(params)
    )
    # The parameter count of the extracted attention layers, FFNs and norms is the size formula.
    assert _count(small_params, _prunable_prefixes(structure)) == int(structure.size(masks))
    assert _count(params, _prunable_prefixes(structure)) == structure.prunable_size
    # The layers' outputs agree too (the masked model's pruned features are zero).
    assert len(masked_layers) == len(structure.layers) == (3 if isinstance(model, Encoder) else 2)
    assert len(structure.attention) == len(structure.feed_forward) == len(structure.layers)
    kept = np.flatnonzero(np.asarray(masks["hidden"]) != 0)
    for a, b in zip(masked_layers, small_layers, strict=True):
        a = np.asarray(a)
        chex.assert_trees_all_close(a[..., kept], b, rtol=1e-5, atol=1e-5 * np.abs(a).max())
        assert np.abs(np.delete(a, kept, axis=-1)).max() == 0.0


@pytest.mark.parametrize("case", ["user_gqa"], indirect=True)  # biases: the "layer alive" terms
def test_expected_size_is_the_mean_size_of_sampled_masks(case):
    _, _, _, _, structure, log_alpha = case
    keys = jax.random.split(jax.random.key(7), 4000)
    sizes = jax.jit(jax.vmap(lambda k: structure.size(structure.sample(log_alpha, k))))(keys)
    expected = float(structure.expected_size(log_alpha))
    standard_error = float(jnp.std(sizes)) / np.sqrt(keys.shape[0])
    assert abs(float(jnp.mean(sizes)) - expected) < 4.5 * standard_error
    all_on = jax.tree.map(jnp.ones_like, log_alpha)
    assert int(structure.size(all_on)) == structure.prunable_size
    assert float(structure.sparsity(all_on)) == 0.0


def test_gradients_reach_every_mask():
    model, x, _ = _user_case(num_blocks=1)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), x))["params"]
    structure = cofi_structure(model, x)
    log_alpha = jax.tree.map(lambda a: jnp.zeros_like(a), structure.init(jax.random.key(0)))

    def task(log_alpha, key):
        with apply_masks(structure, structure.sample(log_alpha, key)):
            out = model.apply({"params": params}, x)
        return jnp.sum(jnp.square(out.astype(jnp.float32)))

    grads = jax.jit(jax.vmap(jax.grad(task), in_axes=(None, 0)))(
        log_alpha, jax.random.split(jax.random.key(1), 8)
    )
    for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
        assert float(jnp.abs(g).sum()) > 0, f"no task gradient reaches {jax.tree_util.keystr(path)}"
    size_grads = jax.grad(structure.expected_sparsity)(log_alpha)
    for path, g in jax.tree_util.tree_flatten_with_path(size_grads)[0]:
        assert bool(jnp.all(g < 0)), (
            f"expected sparsity does not fall with {jax.tree_util.keystr(path)}"
        )


class _ResidualMLP(nn.Module):
    width: int = 64
    units: int = 256

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.width, use_bias=False, kernel_init=_named((None, "embed")), name="embed")(
            x
        )
        for i in range(2):
            h = h + DenseFeedForward(self.units, name=f"ffn_{i}")(nn.LayerNorm(name=f"norm_{i}")(h))
        h = nn.LayerNorm(name="final_norm")(h)
        return nn.Dense(4, kernel_init=_named(("embed", "classes")), name="head")(h)


def test_controller_drives_real_sparsity_to_targets():
    model = _ResidualMLP()
    x = jax.random.normal(jax.random.key(1), (32, 16))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), x))["params"]
    # Neuron-level gates, as in the pilot: at this toy scale a whole-FFN gate of a 2-layer model
    # is half the model, and an undecided one makes the rounded (real) size jump.
    structure = cofi_structure(model, x, groups=("intermediate", "hidden"))
    teacher = model.apply({"params": params}, x)
    steps = 1200
    # CoFi's reg lr 0.01 assumes ~1e5 steps; 0.1 reaches the target in ~1e3 here.
    tx = cofi_optimizer(optax.set_to_zero(), reg_learning_rate=0.1)

    def run(target):
        controller = LagrangianSparsity(target, warmup_steps=steps // 3)
        p = {
            "model": params,
            "log_alpha": structure.init(jax.random.key(3)),
            "lagrangian": controller.init(),
        }

        def loss_fn(p, step):
            key = jax.random.fold_in(jax.random.key(5), step)
            with apply_masks(structure, structure.sample(p["log_alpha"], key)):
                out = model.apply({"params": p["model"]}, x)
            penalty, _ = controller(
                structure.expected_sparsity(p["log_alpha"]), p["lagrangian"], step
            )
            return jnp.mean(jnp.square(out - teacher)) + penalty

        def body(carry, step):
            p, state = carry
            updates, state = tx.update(jax.grad(loss_fn)(p, step), state, p)
            return (optax.apply_updates(p, updates), state), None

        (p, _), _ = jax.lax.scan(body, (p, tx.init(p)), jnp.arange(steps))
        return structure.sparsity(structure.deterministic(p["log_alpha"])), p["lagrangian"][
            "lambda_2"
        ]

    targets = jnp.array([0.5, 0.75, 0.9])
    real, lambda_2 = jax.jit(jax.vmap(run))(targets)
    np.testing.assert_array_less(np.abs(np.asarray(real - targets)), 0.02)
    assert bool(jnp.all(lambda_2 > 0))  # ascent: lambda_2 only grows


def _official_alignment(losses, exists, official_indexing):
    """The layer_distill_version 4 search of CoFiPruning/trainer/trainer.py, in numpy."""
    num_teacher, num_student = losses.shape
    last, alignment = num_student, []
    for i in range(num_teacher - 1, -1, -1):
        indexes = np.argsort(losses[i], kind="stable")
        usable = exists if official_indexing else exists[indexes]
        align = indexes[(indexes < last) & usable]
        align = align[0] if len(align) else last
        alignment.append(align)
        last = align
    return np.array(alignment[::-1])


@pytest.mark.parametrize("official_indexing", [False, True])
def test_layer_distillation_matching_follows_the_official_search(official_indexing):
    rng = np.random.default_rng(0)
    for trial in range(20):
        num_student, num_teacher = 6, 8
        student = [jnp.asarray(rng.normal(size=(1,)), jnp.float32) for _ in range(num_student)]
        teacher = [jnp.asarray(rng.normal(size=(1,)), jnp.float32) for _ in range(num_teacher)]
        exists = rng.random(num_student) < (0.4 if trial % 2 else 0.9)
        exists[rng.integers(num_student)] = True
        indices = default_teacher_layers(num_teacher)
        loss, matched = layer_distillation_loss(
            student,
            teacher,
            lambda h: h,
            teacher_indices=indices,
            student_exists=exists,
            official_indexing=official_indexing,
        )
        table = np.array([[float((teacher[t] - s)[0] ** 2) for s in student] for t in indices])
        want = _official_alignment(table, exists, official_indexing)
        np.testing.assert_array_equal(np.asarray(matched), want)
        picked = [table[i, m] for i, m in enumerate(want) if m < num_student]
        assert float(loss) == pytest.approx(sum(picked), rel=1e-5)
    assert default_teacher_layers(12) == (2, 5, 8, 11)


def test_layer_distillation_trains_the_map():
    keys = jax.random.split(jax.random.key(0), 3)
    student = [jax.random.normal(k, (2, 5, 4)) for k in keys]
    teacher = [2.0 * s + 1.0 for s in student]
    kernel, bias = jnp.eye(4) * 0.5, jnp.zeros(4)

    def loss(params):
        return layer_distillation_loss(student, teacher, lambda h: h @ params[0] + params[1])[0]

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    _, grads = value_and_grad((kernel, bias))
    assert float(jnp.abs(grads[0]).sum()) > 0 and float(jnp.abs(grads[1]).sum()) > 0
    assert float(value_and_grad((2.0 * jnp.eye(4), jnp.ones(4)))[0]) == pytest.approx(
        0.0, abs=1e-10
    )

    # The CoFi objective = 0.1 T^2 KL (efflax.losses, KD-only) + 0.9 layer loss, T = 2.
    logits_s, logits_t = jax.random.normal(keys[0], (2, 4, 6))

    @jax.jit
    def both(logits_s, logits_t, student, teacher):
        transform = lambda h: h @ kernel + bias  # noqa: E731
        total, parts = cofi_distillation_loss(logits_s, logits_t, student, teacher, transform)
        layer, matched = layer_distillation_loss(student, teacher, transform)
        kd = distillation_loss(logits_s, logits_t, alpha_kd=0.1, temperature=2.0)
        return total, kd + 0.9 * layer, parts["matched"], matched

    total, want, matched_a, matched_b = both(logits_s, logits_t, student, teacher)
    assert float(total) == pytest.approx(float(want), rel=1e-6)
    np.testing.assert_array_equal(matched_a, matched_b)


def test_cofi_optimizer_descends_masks_ascends_multipliers_and_clamps():
    tx = cofi_optimizer(optax.sgd(1.0), reg_learning_rate=0.5)
    params = {
        "model": jnp.ones(2),
        "log_alpha": jnp.array([4.5, 0.0]),
        "lagrangian": {"lambda_1": jnp.zeros(()), "lambda_2": jnp.zeros(())},
    }
    grads = {
        "model": jnp.ones(2),
        "log_alpha": jnp.array([-1.0, 1.0]),
        "lagrangian": {"lambda_1": jnp.ones(()), "lambda_2": -jnp.ones(())},
    }
    updates, _ = tx.update(grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    chex.assert_trees_all_close(new["model"], jnp.zeros(2))
    assert float(new["log_alpha"][0]) == pytest.approx(np.log(100.0))  # clamped
    assert float(new["log_alpha"][1]) == pytest.approx(-0.5, rel=1e-4)  # Adam's first step: lr
    assert float(new["lagrangian"]["lambda_1"]) == pytest.approx(0.5, rel=1e-4)  # ascent
    assert float(new["lagrangian"]["lambda_2"]) == pytest.approx(-0.5, rel=1e-4)
    with pytest.raises(ValueError, match="'log_alpha' and 'lagrangian'"):
        tx.init({"model": jnp.ones(2)})


@pytest.mark.parametrize("case", ["encoder"], indirect=True)
def test_bad_input_names_the_value(case):
    model, x, _, params, structure, log_alpha = case
    with pytest.raises(ValueError, match="groups='heads'"):
        cofi_structure(model, x, groups=("heads",))
    mlp = _ResidualMLP(width=8, units=8)
    with pytest.raises(ValueError, match="nothing for 'head'"):
        cofi_structure(mlp, jnp.ones((1, 3)), groups=("head", "hidden"))
    with pytest.raises(ValueError, match="gate_configs='heads'"):
        cofi_structure(model, x, gate_configs={"heads": {}})

    class Unnamed(nn.Module):  # a width-sized parameter without logical names
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(8, name="embed")(x)
            h = h + DenseFeedForward(8, name="ffn")(nn.LayerNorm(name="norm")(h))
            return h

    with pytest.raises(ValueError, match="parameter embed/.* has no logical axis names"):
        cofi_structure(Unnamed(), jnp.ones((1, 3)))
    with pytest.raises(ValueError, match="masks=None"):
        extract(model, params, structure, None)
    masks = structure.deterministic(log_alpha)
    with pytest.raises(ValueError, match="masks has groups"):
        extract(model, params, structure, {"head": masks["head"]})
    with pytest.raises(ValueError, match="traced"):
        jax.jit(lambda m: extract(model, params, structure, m)[1])(masks)
    bad = dict(masks, hidden=jnp.zeros(16))
    with pytest.raises(ValueError, match="all zero"):
        extract(model, params, structure, bad)
    with pytest.raises(ValueError, match="target=1.0"):
        LagrangianSparsity(target=1.0)
    with pytest.raises(ValueError, match="target=-0.1"):
        LagrangianSparsity(target=-0.1)
    with pytest.raises(ValueError, match="student_exists.shape"):
        layer_distillation_loss(
            [jnp.ones(2)], [jnp.ones(2)], lambda h: h, student_exists=jnp.ones(3, bool)
        )


def test_pruning_state_and_loss_train_towards_the_target():
    from efflax.pruning import cofi_pruning_loss
    from efflax.pruning import cofi_pruning_state
    from efflax.training import fit
    from efflax.training import make_train_step

    model, x, _ = _encoder_case()
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), x))["params"]
    structure = cofi_structure(model, x)
    tx = cofi_optimizer(optax.adam(1e-3), reg_learning_rate=0.1)
    state = cofi_pruning_state(
        structure, model, params, 0.5, tx, rng=jax.random.key(3), gate_key=jax.random.key(1),
        map_key=jax.random.key(2),
    )  # fmt: skip
    assert set(state.params) == {"model", "log_alpha", "lagrangian", "layer_map"}
    assert state.params["layer_map"]["kernel"].shape == (16, 16)
    assert float(state.extra["target"]) == 0.5
    chex.assert_trees_all_equal(state.extra["teacher"], params)
    step = make_train_step(cofi_pruning_loss(structure, model, warmup_steps=20))
    state, history = fit(state, step, [{"x": x}] * 200, num_steps=200, log_every=50, progress=False)
    metrics = history[-1]
    assert {"train/kd", "train/layer", "train/lambda_1", "train/lambda_2"} <= set(metrics)
    assert metrics["train/target"] == pytest.approx(0.5)
    assert history[0]["train/expected_sparsity"] < metrics["train/expected_sparsity"]
    assert 0.3 < metrics["train/expected_sparsity"] < 0.7  # near 0.5, still oscillating
    with pytest.raises(ValueError, match="structure"):
        cofi_pruning_loss("not a structure", model, warmup_steps=0)
