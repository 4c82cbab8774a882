"""Tests for efflax.nn (moe) (MoEFeedForward, expert parallelism, pruning) and the encoder."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh

from efflax._src.nn import routing
from efflax.nn import Encoder
from efflax.nn import MoEFeedForward
from efflax.nn import moe_aux_loss
from efflax.nn import prune_experts

COLLECTIONS = ["losses", "intermediates"]


def _mesh(data, expert):
    devices = np.asarray(jax.devices()[: data * expert]).reshape(data, expert)
    return Mesh(devices, ("data", "expert"))


def _init(module, x, seed):
    return jax.jit(module.init)(jax.random.key(seed), x)


def _loss_fn(module, x, deterministic=True, rngs=None):
    def loss(params):
        y, state = module.apply(
            {"params": params}, x, deterministic=deterministic, rngs=rngs, mutable=COLLECTIONS
        )
        return jnp.sum(jnp.sin(3 * y)) + moe_aux_loss(state["losses"]), (y, state)

    return loss


def test_gather_dispatch_matches_einsum():
    # Expert choice with gather dispatch is checked against an einsum reference below.
    router, activation, router_type = "top2", "geglu", "xmoe"
    x = jax.random.normal(jax.random.key(0), (3, 10, 8))
    kwargs = dict(router=router, activation=activation, router_type=router_type)
    gather = MoEFeedForward(4, 16, dispatch="gather", **kwargs)
    einsum = MoEFeedForward(4, 16, dispatch="einsum", **kwargs)
    params = _init(gather, x, 1)["params"]
    (loss_g, (y_g, state)), grads_g = jax.jit(
        jax.value_and_grad(_loss_fn(gather, x), has_aux=True)
    )(params)
    (loss_e, (y_e, _)), grads_e = jax.jit(jax.value_and_grad(_loss_fn(einsum, x), has_aux=True))(
        params
    )
    chex.assert_trees_all_close(y_g, y_e, atol=1e-5)
    chex.assert_trees_all_close(grads_g, grads_e, atol=1e-5)
    assert float(jnp.abs(y_g).max()) > 1e-2
    stats = {name: value[0] for name, value in state["intermediates"].items()}
    if router == "expert_choice":
        capacity = routing.expert_capacity(10, 4, 2.0)
        np.testing.assert_array_equal(stats["tokens_per_expert"], np.full(4, capacity))
        np.testing.assert_allclose(stats["experts_per_token"], 4 * capacity / 10, rtol=1e-6)
    else:
        assert float(stats["tokens_per_expert"].sum()) <= 10 * int(router[-1])
    balance = 0.0 if router == "expert_choice" else 1e-2 * stats["load_balancing_loss"]
    expected_aux = 1e-3 * stats["router_z_loss"] + balance
    np.testing.assert_allclose(moe_aux_loss(state["losses"]), expected_aux, rtol=1e-6)
    assert float(stats["router_z_loss"]) > 0 and float(stats["load_balancing_loss"]) > 0.5


def _reference_moe(params, x, router, group_size, capacity_factor):
    """Unsharded reference written from the routing functions."""
    p = nn.meta.unbox(params)
    d = x.shape[-1]
    xg = x.reshape(-1, group_size, d)
    logits = jnp.einsum("gtd,de->gte", xg, p["router"]["kernel"])
    if router == "expert_choice":
        r = routing.expert_choice(logits, capacity_factor=capacity_factor)
    else:
        r = routing.token_choice(logits, k=2, capacity_factor=capacity_factor)
    expert_in = routing.dispatch(xg, r.token_indices, r.slot_mask, method="einsum")
    h = jax.nn.gelu(jnp.einsum("gecd,edh->gech", expert_in, p["wi"]))
    out = jnp.einsum("gech,ehd->gecd", h, p["wo"])
    return routing.combine(out, r.token_indices, r.gates, group_size, method="einsum").reshape(
        x.shape
    )


@pytest.mark.parametrize("router,group_size", [("expert_choice", None), ("top2", 6)])
def test_layer_matches_reference_values_and_grads(router, group_size):
    # The layer's expert matmuls run on `[experts, tokens, d]` and its gather/scatter skip bounds
    # checks; the reference uses per-group einsums and the one-hot dispatch.
    x = jax.random.normal(jax.random.key(9), (4, 12, 8))
    layer = MoEFeedForward(
        4, 16, router=router, capacity_factor=2.0, group_size=group_size, z_loss_coef=0.0
    )
    params = nn.meta.unbox(_init(layer, x, 10)["params"])

    def loss(params):
        return jnp.sum(jnp.sin(3 * layer.apply({"params": params}, x)))

    def reference_loss(params):
        y = _reference_moe(params, x, router, group_size or 12, 2.0)
        return jnp.sum(jnp.sin(3 * y))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    reference_value, reference_grads = jax.jit(jax.value_and_grad(reference_loss))(params)
    chex.assert_trees_all_close(value, reference_value, atol=1e-5)
    chex.assert_trees_all_close(grads, reference_grads, atol=1e-5)
    assert float(jnp.abs(grads["router"]["kernel"]).max()) > 1e-4


@pytest.mark.parametrize(
    "data,expert,router,group_size",
    [(2, 4, "expert_choice", None), (1, 8, "top2", 16)],
)
def test_expert_parallel_matches_single_device(data, expert, router, group_size):
    mesh = _mesh(data, expert)
    x = jax.random.normal(jax.random.key(2), (16, 8, 8))
    kwargs = dict(router=router, capacity_factor=2.0, group_size=group_size)
    single = MoEFeedForward(8, 16, **kwargs)
    sharded = MoEFeedForward(8, 16, mesh=mesh, **kwargs)
    params = _init(single, x, 3)["params"]

    (loss_1, (y_1, _)), grads_1 = jax.jit(jax.value_and_grad(_loss_fn(single, x), has_aux=True))(
        params
    )
    step = jax.jit(jax.value_and_grad(_loss_fn(sharded, x), has_aux=True))
    compiled = step.lower(params).compile()
    (loss_8, (y_8, state_8)), grads_8 = compiled(params)

    assert "all-to-all" in compiled.as_text()
    chex.assert_trees_all_close(y_8, y_1, atol=1e-5)
    chex.assert_trees_all_close(loss_8, loss_1, rtol=1e-5)
    chex.assert_trees_all_close(grads_8, grads_1, atol=1e-5)
    y_ref = jax.jit(_reference_moe, static_argnums=(2, 3, 4))(
        params, x, router, group_size or 8, 2.0
    )
    chex.assert_trees_all_close(y_1, y_ref, atol=1e-5)
    if router == "expert_choice":
        tokens_per_expert = state_8["intermediates"]["tokens_per_expert"][0]
        capacity = routing.expert_capacity(group_size or 8, 8, 2.0)
        np.testing.assert_array_equal(tokens_per_expert, np.full(8, capacity))


def test_gating_dropout_keeps_tokens_on_their_device():
    mesh = _mesh(1, 4)
    x = jax.random.normal(jax.random.key(4), (4, 8, 8))  # one sequence (group) per device
    kwargs = dict(router="expert_choice", capacity_factor=1.0, mesh=mesh)
    always_local = MoEFeedForward(8, 16, gating_dropout=1.0, **kwargs)
    never_local = MoEFeedForward(8, 16, gating_dropout=0.0, **kwargs)
    params = _init(always_local, x, 5)["params"]
    rngs = {"gating_dropout": jax.random.key(6)}
    apply = functools.partial(jax.jit, static_argnums=0)(
        lambda module, p: module.apply(
            {"params": p}, x, deterministic=False, rngs=rngs, mutable=COLLECTIONS
        )
    )
    y_local, state = apply(always_local, params)
    y_global, _ = apply(never_local, params)
    # Reference: device j's experts 2j, 2j+1 pick top-(capacity * 4) tokens of sequence j.
    p = nn.meta.unbox(params)
    probs = jax.nn.softmax(x @ p["router"]["kernel"], axis=-1)
    capacity = routing.expert_capacity(8, 8, 1.0) * 4
    for j in range(4):
        experts = slice(2 * j, 2 * j + 2)
        r = routing.expert_choice_from_probs(probs[j : j + 1, :, experts], capacity)
        expert_in = routing.dispatch(x[j : j + 1], r.token_indices, r.slot_mask)
        h = jax.nn.gelu(jnp.einsum("gecd,edh->gech", expert_in, p["wi"][experts]))
        out = jnp.einsum("gech,ehd->gecd", h, p["wo"][experts])
        expected = routing.combine(out, r.token_indices, r.gates, 8)
        chex.assert_trees_all_close(y_local[j : j + 1], expected, atol=1e-5)
    assert float(jnp.abs(y_local - y_global).max()) > 1e-3
    # Per group on average, each expert still takes `capacity / 4` tokens (all from one group).
    tokens_per_expert = state["intermediates"]["tokens_per_expert"][0]
    np.testing.assert_array_equal(tokens_per_expert, np.full(8, capacity / 4))


def test_prune_experts_keeps_above_average_and_runs():
    x = jax.random.normal(jax.random.key(7), (2, 12, 8))
    layer = MoEFeedForward(6, 16, router="top2", activation="geglu")
    params = _init(layer, x, 8)["params"]
    scores = jnp.array([5.0, 0.5, 3.0, 0.1, 4.0, 0.2])  # mean 2.13: experts 0, 2, 4 survive
    new_params, num_experts, kept = prune_experts(params, scores, target_num_experts=2)
    assert num_experts == 3
    np.testing.assert_array_equal(kept, [0, 2, 4])
    np.testing.assert_array_equal(
        new_params["router"]["kernel"].unbox(),
        np.asarray(params["router"]["kernel"].unbox())[:, [0, 2, 4]],
    )
    np.testing.assert_array_equal(
        new_params["wo"].unbox(), np.asarray(params["wo"].unbox())[[0, 2, 4]]
    )
    pruned = layer.clone(num_experts=num_experts)
    y = jax.jit(pruned.apply)({"params": new_params}, x)
    assert y.shape == x.shape and bool(jnp.all(jnp.isfinite(y)))
    _, two, kept_two = prune_experts(params, scores, target_num_experts=4)
    assert two == 4 and list(kept_two) == [0, 1, 2, 4]
    with pytest.raises(ValueError, match="target_num_experts"):
        prune_experts(params, scores, target_num_experts=0)


def test_bad_configuration_raises():
    x = jnp.ones((8, 4, 8))
    with pytest.raises(ValueError, match="not divisible"):
        jax.eval_shape(MoEFeedForward(6, 8, mesh=_mesh(2, 4)).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="causal"):
        jax.eval_shape(MoEFeedForward(4, 8, causal=True).init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="router='top3'"):
        jax.eval_shape(MoEFeedForward(4, 8, router="top3").init, jax.random.key(0), x)
    with pytest.raises(ValueError, match="capacity_factor"):
        jax.eval_shape(MoEFeedForward(4, 8, capacity_factor=0.0).init, jax.random.key(0), x)
    jax.eval_shape(
        MoEFeedForward(4, 8, router="top2", causal=True).init, jax.random.key(0), x
    )  # allowed


def test_encoder_dense_and_moe():
    x = jax.random.normal(jax.random.key(9), (4, 10, 3))
    moe = functools.partial(MoEFeedForward, num_experts=4, hidden=16, router="expert_choice")
    model = Encoder(num_layers=2, d_model=16, num_heads=2, mlp_hidden=32, num_classes=5, moe=moe)
    variables = _init(model, x, 10)
    assert "ffn" in variables["params"]["block_1"] and "wi" in variables["params"]["block_1"]["ffn"]
    assert "wi_0" in variables["params"]["block_0"]["ffn"]
    names = variables["params"]["block_1"]["ffn"]["wi"].names
    assert names == ("expert", "embed", "expert_mlp")
    logits, state = jax.jit(functools.partial(model.apply, mutable=COLLECTIONS))(variables, x)
    assert logits.shape == (4, 5) and bool(jnp.all(jnp.isfinite(logits)))
    assert float(moe_aux_loss(state["losses"])) > 0
    with pytest.raises(ValueError, match="x must be"):
        model.apply(variables, x[0])


@pytest.mark.parametrize("router", ["expert_choice", "top2"])
def test_bfloat16_traces_with_float32_router(router):
    x = jax.ShapeDtypeStruct((8, 6, 8), jnp.bfloat16)
    layer = MoEFeedForward(
        4, 8, router=router, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, mesh=_mesh(2, 4)
    )
    variables = jax.eval_shape(layer.init, jax.random.key(0), x)
    assert variables["params"]["wi"].value.dtype == jnp.bfloat16
    y, state = jax.eval_shape(
        functools.partial(layer.apply, mutable=COLLECTIONS, deterministic=False), variables, x
    )
    assert y.dtype == jnp.bfloat16 and y.shape == x.shape
    assert state["losses"]["aux_loss"][0].dtype == jnp.float32


def test_expert_parallel_on_a_jax_make_mesh():
    """`jax.make_mesh` (Explicit axes in JAX >= 0.10) works like an efflax mesh."""
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    x = jax.random.normal(jax.random.key(2), (8, 4, 8))
    single = MoEFeedForward(8, 16, capacity_factor=2.0)
    sharded = MoEFeedForward(8, 16, capacity_factor=2.0, mesh=mesh)
    shapes = jax.eval_shape(single.init, jax.random.key(0), x)["params"]
    rng = np.random.default_rng(3)
    params = jax.tree.map(lambda s: rng.normal(size=s.shape).astype(np.float32), shapes)
    compiled = jax.jit(sharded.apply).lower({"params": params}, x).compile()
    assert "all-to-all" in compiled.as_text()
    y_single = jax.jit(single.apply)({"params": params}, x)
    chex.assert_trees_all_close(compiled({"params": params}, x), y_single, atol=1e-5)


def test_bad_inputs_and_meshes_raise():
    layer = MoEFeedForward(4, 8)
    params = jax.eval_shape(layer.init, jax.random.key(0), jnp.ones((2, 4, 8)))
    with pytest.raises(ValueError, match="at least one token"):
        layer.apply(params, jnp.ones((2, 0, 8)))
    no_expert_axis = jax.make_mesh((8,), ("data",))
    with pytest.raises(ValueError, match="expert_axis='expert' is not an axis of the mesh"):
        jax.eval_shape(
            MoEFeedForward(4, 8, mesh=no_expert_axis).init, jax.random.key(0), jnp.ones((8, 4, 8))
        )


def test_moe_refuses_bad_jitter_and_pruning_scores():
    x = jnp.ones((2, 8, 4))
    with pytest.raises(ValueError, match="jitter=-3"):
        MoEFeedForward(num_experts=4, hidden=8, jitter=-3).init(jax.random.key(0), x)
    params = MoEFeedForward(num_experts=4, hidden=8).init(jax.random.key(0), x)["params"]
    with pytest.raises(ValueError, match=r"gate_weight of shape \(3,\) must be a finite \[4\]"):
        prune_experts(params, np.ones(3), target_num_experts=2)
    with pytest.raises(ValueError, match="target_num_experts=0"):
        prune_experts(params, np.ones(4), target_num_experts=0)


def test_encoder_padding_mask_hides_padded_tokens():
    x = jax.random.normal(jax.random.key(1), (2, 10, 3))
    mask = jnp.arange(10)[None, :] < jnp.array([[10], [6]])
    model = Encoder(num_layers=1, d_model=16, num_heads=2, mlp_hidden=32, num_classes=4)
    variables = model.init(jax.random.key(0), x)
    apply = jax.jit(lambda v, x: model.apply(v, x, padding_mask=mask))
    out = apply(variables, x)
    np.testing.assert_array_equal(out[1], apply(variables, x.at[1, 6:].set(-50.0))[1])
    np.testing.assert_allclose(out[1], model.apply(variables, x[1:, :6])[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="padding_mask"):
        model.apply(variables, x, padding_mask=mask[:, :5])
