"""Properties of ``efflax.nn``: routing, mixture of experts, Monarch layers, the encoder."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _hyp import FEW
from _hyp import INVALID
from _hyp import NAN
from _hyp import VALID
from _hyp import assert_close
from _hyp import attention64
from _hyp import bad_ints
from _hyp import bad_keys
from _hyp import bad_positive
from _hyp import bad_probabilities
from _hyp import f64
from _hyp import gelu64
from _hyp import logsumexp64
from _hyp import monarch64
from _hyp import normal
from _hyp import props
from _hyp import random_variables
from _hyp import refused
from _hyp import rope64
from _hyp import seeds
from _hyp import softmax64
from hypothesis import given
from hypothesis import strategies as st

from efflax import nn as enn
from efflax.models import MLP

KEY = jax.random.key(0)

# One shape per property (hypothesis varies values and hyperparameters): every new shape would
# compile again, and the suite must stay fast.
ROUTER_SHAPE = (2, 8, 4)  # groups, tokens, experts


@functools.cache
def _jitted(fn, **static):
    return jax.jit(functools.partial(fn, **static))


# --------------------------------------------------------------------------- routing


@VALID
@given(st.integers(1, 64), st.integers(1, 16), st.floats(0.05, 8.0), st.integers(1, 2))
def test_expert_capacity_formula(tokens, experts, factor, k):
    assert enn.expert_capacity(tokens, experts, factor, k=k) == min(
        math.ceil(k * tokens * factor / experts), tokens
    )


@INVALID
@given(st.data())
def test_expert_capacity_refuses(data):
    arg = data.draw(st.sampled_from(["num_tokens", "num_experts", "capacity_factor", "k"]))
    kwargs = dict(num_tokens=16, num_experts=4, capacity_factor=1.0, k=1)
    kwargs[arg] = data.draw(bad_positive() if arg == "capacity_factor" else bad_ints())
    refused(lambda: enn.expert_capacity(**kwargs), arg)


def _expert_choice64(probs, capacity):
    groups, tokens, experts = probs.shape
    indices = np.zeros((groups, experts, capacity), np.int64)
    gates = np.zeros((groups, experts, capacity))
    for g in range(groups):
        for e in range(experts):
            order = np.argsort(-probs[g, :, e], kind="stable")[:capacity]
            indices[g, e], gates[g, e] = order, probs[g, order, e]
    picked = np.zeros((groups, tokens), bool)
    for g in range(groups):
        picked[g, indices[g].reshape(-1)] = True
    return indices, gates, (~picked).sum(-1)


@VALID
@given(seeds, st.sampled_from([3, 8]))
def test_expert_choice_matches_numpy(seed, capacity):
    logits = normal(seed, ROUTER_SHAPE, 2.0)
    routing = _jitted(enn.expert_choice, capacity=capacity)(jnp.asarray(logits))
    indices, gates, dropped = _expert_choice64(softmax64(logits), capacity)
    np.testing.assert_array_equal(routing.token_indices, indices)
    assert_close(routing.gates, gates)
    assert bool(jnp.all(routing.slot_mask))
    np.testing.assert_array_equal(routing.dropped, dropped)
    assert_close(routing.probs, softmax64(logits))


def _token_choice64(probs, k, capacity):
    groups, tokens, experts = probs.shape
    indices = np.zeros((groups, experts, capacity), np.int64)
    gates = np.zeros((groups, experts, capacity))
    mask = np.zeros((groups, experts, capacity), bool)
    dropped = np.zeros(groups, np.int64)
    for g in range(groups):
        top = np.argsort(-probs[g], axis=-1, kind="stable")[:, :k]  # [t, k]
        top_gates = np.take_along_axis(probs[g], top, -1)
        if k > 1:
            top_gates = top_gates / top_gates.sum(-1, keepdims=True)
        filled = np.zeros(experts, np.int64)
        for choice in range(k):  # every first choice before any second choice
            for t in range(tokens):
                e = top[t, choice]
                if filled[e] < capacity:
                    slot = filled[e]
                    indices[g, e, slot], gates[g, e, slot] = t, top_gates[t, choice]
                    mask[g, e, slot] = True
                    filled[e] += 1
                else:
                    dropped[g] += 1
    return indices, gates, mask, dropped


@VALID
@given(seeds, st.integers(1, 2))
def test_token_choice_matches_numpy(seed, k):
    logits = normal(seed, ROUTER_SHAPE, 2.0)
    capacity = 3  # 8 tokens * k choices over 4 experts of 3 slots: some are dropped
    routing = _jitted(enn.token_choice, k=k, capacity=capacity)(jnp.asarray(logits))
    indices, gates, mask, dropped = _token_choice64(softmax64(logits), k, capacity)
    np.testing.assert_array_equal(routing.slot_mask, mask)
    np.testing.assert_array_equal(np.where(mask, routing.token_indices, 0), indices)
    assert_close(routing.gates, gates)
    np.testing.assert_array_equal(routing.dropped, dropped)


@INVALID
@given(st.data())
def test_routers_refuse(data):
    logits = jnp.asarray(normal(0, (2, 8, 4)))
    probs = jax.nn.softmax(logits)
    case = data.draw(
        st.sampled_from(
            ["rank", "dtype", "empty", "capacity", "k", "factor", "probs", "probs_nan_free"]
        )
    )
    if case == "rank":
        shape = data.draw(st.sampled_from([(8,), (8, 4), (1, 2, 8, 4)]))
        refused(lambda: enn.expert_choice(jnp.zeros(shape)), "logits")
    elif case == "dtype":
        dtype = data.draw(st.sampled_from([jnp.int32, jnp.bool_, jnp.complex64]))
        refused(lambda: enn.token_choice(jnp.zeros((2, 8, 4), dtype)), "logits")
    elif case == "empty":
        shape = data.draw(st.sampled_from([(0, 8, 4), (2, 0, 4), (2, 8, 0)]))
        refused(lambda: enn.expert_choice(jnp.zeros(shape)), "logits")
    elif case == "capacity":
        bad = data.draw(st.sampled_from([0, -1, 9, 2.5, True, "2"]))
        refused(lambda: enn.expert_choice_from_probs(probs, bad), "capacity")
    elif case == "k":
        bad = data.draw(st.sampled_from([0, 3, 1.0, True, "1", None]))
        refused(lambda: enn.token_choice(logits, k=bad), "k=")
    elif case == "factor":
        bad = data.draw(bad_positive())
        refused(lambda: enn.token_choice(logits, capacity_factor=bad), "capacity_factor")
    else:
        scale = data.draw(st.sampled_from([-1.0, 3.0]))
        refused(lambda: enn.expert_choice_from_probs(probs * scale, 2), "probs")


@VALID
@given(seeds, st.booleans())
def test_router_losses_match_numpy(seed, given_indices):
    shape = ROUTER_SHAPE
    logits = normal(seed, shape, 2.0)
    probs = softmax64(logits)
    indices = np.argmax(probs, -1)
    if given_indices:
        indices = np.random.default_rng(seed).integers(0, shape[2], shape[:2])
    fraction = np.eye(shape[2])[indices].mean(-2)
    expected = np.mean(shape[2] * np.sum(fraction * probs.mean(-2), -1))
    probs32 = jnp.asarray(probs, jnp.float32)
    if given_indices:
        got = _jitted(enn.load_balancing_loss)(probs32, jnp.asarray(indices, jnp.int32))
    else:
        got = _jitted(enn.load_balancing_loss)(probs32)
    assert_close(got, expected)
    z_loss = _jitted(enn.router_z_loss)(jnp.asarray(logits))
    assert_close(z_loss, np.mean(logsumexp64(logits) ** 2))


@INVALID
@given(st.data())
def test_router_losses_refuse(data):
    probs = jax.nn.softmax(jnp.asarray(normal(0, (2, 8, 4))))
    case = data.draw(st.sampled_from(["range", "dtype", "shape", "negative", "z_empty", "z_str"]))
    if case == "range":
        bad = data.draw(st.sampled_from([-1, 4, 100]))
        refused(
            lambda: enn.load_balancing_loss(probs, jnp.full((2, 8), bad, jnp.int32)),
            "expert_indices",
        )
    elif case == "dtype":
        refused(lambda: enn.load_balancing_loss(probs, jnp.zeros((2, 8))), "expert_indices")
    elif case == "shape":
        refused(
            lambda: enn.load_balancing_loss(probs, jnp.zeros((2, 3), jnp.int32)), "expert_indices"
        )
    elif case == "negative":
        refused(lambda: enn.load_balancing_loss(-probs), "probs")
    elif case == "z_empty":
        shape = data.draw(st.sampled_from([(2, 8, 0), (2, 0, 4), ()]))
        refused(lambda: enn.router_z_loss(jnp.zeros(shape)), "logits")
    else:
        refused(lambda: enn.router_z_loss("abc"), "logits")


@VALID
@given(seeds, st.floats(0.0, 0.9))
def test_multiplicative_jitter_stays_in_its_band(seed, eps):
    x = jnp.asarray(normal(seed, (3, 5)) + 3.0)  # away from 0: the ratio is the noise
    y = enn.multiplicative_jitter(x, jax.random.key(seed), eps)
    ratio = f64(y) / f64(x)
    assert y.dtype == x.dtype and np.all(np.isfinite(ratio))
    assert np.all(ratio >= 1 - eps - 1e-6) and np.all(ratio <= 1 + eps + 1e-6)


@INVALID
@given(st.data())
def test_multiplicative_jitter_refuses(data):
    x = jnp.ones((2, 3))
    case = data.draw(st.sampled_from(["eps", "rng", "x"]))
    if case == "eps":
        bad = data.draw(bad_probabilities(allow_one=False))
        refused(lambda: enn.multiplicative_jitter(x, KEY, bad), "eps")
    elif case == "rng":
        bad = data.draw(bad_keys())
        refused(lambda: enn.multiplicative_jitter(x, bad), "rng")
    else:
        refused(lambda: enn.multiplicative_jitter(jnp.ones((2, 3), jnp.int32), KEY), "x")


@VALID
@given(seeds, st.sampled_from(["gather", "einsum"]), st.booleans())
def test_dispatch_and_combine_match_numpy(seed, method, expert_major):
    groups, tokens, experts, capacity = 2, 6, 3, 2
    rng = np.random.default_rng(seed)
    x = normal(seed, (groups, tokens, 3))
    indices = rng.integers(0, tokens, (groups, experts, capacity)).astype(np.int32)
    mask = rng.random((groups, experts, capacity)) < 0.7
    gates = rng.random((groups, experts, capacity)).astype(np.float32)
    static = dict(method=method, expert_major=expert_major)
    out = _jitted(enn.dispatch, **static)(jnp.asarray(x), jnp.asarray(indices), jnp.asarray(mask))
    expected = np.take_along_axis(f64(x)[:, None], indices[..., None].astype(np.int64), 2)
    expected = expected * mask[..., None]
    assert_close(out, np.swapaxes(expected, 0, 1) if expert_major else expected)
    expert_out = normal(seed + 1, (groups, experts, capacity, 3))
    combined = _jitted(enn.combine, num_tokens=tokens, **static)(
        jnp.asarray(np.swapaxes(expert_out, 0, 1) if expert_major else expert_out),
        jnp.asarray(indices),
        jnp.asarray(gates),
    )
    want = np.zeros((groups, tokens, 3))
    for g, e, c in np.ndindex(groups, experts, capacity):
        want[g, indices[g, e, c]] += gates[g, e, c] * f64(expert_out[g, e, c])
    assert_close(combined, want)


@INVALID
@given(st.data())
def test_dispatch_and_combine_refuse(data):
    x = jnp.asarray(normal(0, (2, 6, 3)))
    indices = jnp.zeros((2, 3, 2), jnp.int32)
    gates = jnp.ones((2, 3, 2))
    out = jnp.ones((2, 3, 2, 3))
    case = data.draw(
        st.sampled_from(["x", "range", "groups", "float", "mask", "method", "gates", "n", "out"])
    )
    if case == "x":
        refused(lambda: enn.dispatch(x[0], indices, None), "x")
    elif case == "range":
        bad = data.draw(st.sampled_from([-1, 6, 50]))
        refused(lambda: enn.dispatch(x, indices + bad, None), "token_indices")
    elif case == "groups":
        refused(lambda: enn.dispatch(x[:1], indices, None), "token_indices")
    elif case == "float":
        refused(lambda: enn.dispatch(x, indices * 1.0, None), "token_indices")
    elif case == "mask":
        refused(lambda: enn.dispatch(x, indices, jnp.ones((2, 3), bool)), "slot_mask")
    elif case == "method":
        bad = data.draw(st.sampled_from(["Gather", "dense", None]))
        refused(lambda: enn.combine(out, indices, gates, 6, method=bad), "method")
    elif case == "gates":
        refused(lambda: enn.combine(out, indices, gates[..., :1], 6), "gates")
    elif case == "n":
        bad = data.draw(bad_ints())
        refused(lambda: enn.combine(out, indices, gates, bad), "num_tokens")
    else:
        refused(lambda: enn.combine(out[:, :2], indices, gates, 6), "expert_out")


@VALID
@given(seeds, st.sampled_from(["linear", "xmoe"]))
def test_routers_logits_match_numpy(seed, kind):
    x = normal(seed, (2, 5, 6))
    router = enn.LinearRouter(4) if kind == "linear" else enn.XMoERouter(4, dim=3)
    variables = random_variables(router, jnp.asarray(x), seed=seed)
    params = variables["params"]
    got = router.apply(variables, jnp.asarray(x))
    if kind == "linear":
        expected = f64(x) @ f64(params["kernel"])
    else:
        h = f64(x) @ f64(params["projection"])
        h = h / np.linalg.norm(h, axis=-1, keepdims=True)
        e = f64(params["expert_embeddings"])
        e = e / np.linalg.norm(e, axis=-1, keepdims=True)
        expected = h @ e.T / f64(params["temperature"])
    assert_close(got, expected, rtol=1e-4, atol=1e-4)


@INVALID
@given(st.data())
def test_router_modules_refuse(data):
    x = jnp.ones((2, 4))
    case = data.draw(st.sampled_from(["experts", "dim", "temperature"]))
    if case == "experts":
        bad = data.draw(bad_ints())
        cls = data.draw(st.sampled_from([enn.LinearRouter, enn.XMoERouter]))
        refused(lambda: cls(bad).init(KEY, x), "num_experts")
    elif case == "dim":
        refused(lambda: enn.XMoERouter(4, dim=data.draw(bad_ints())).init(KEY, x), "dim")
    else:
        bad = data.draw(bad_positive())
        refused(lambda: enn.XMoERouter(4, temperature_init=bad).init(KEY, x), "temperature_init")


# --------------------------------------------------------------------------- mixture of experts


@functools.cache
def _moe_apply(router: str, dispatch: str, activation: str, experts: int, factor: float):
    layer = enn.MoEFeedForward(
        experts, 5, router=router, dispatch=dispatch, activation=activation,
        capacity_factor=factor,
    )  # fmt: skip
    return layer, jax.jit(layer.apply)


def _moe64(params, x, router, activation):
    """Every expert sees every token (capacity = tokens): the dense mixture, in float64."""
    probs = softmax64(f64(x) @ f64(params["router"]["kernel"]))  # [b, t, E]
    experts = probs.shape[-1]
    outs = []
    for e in range(experts):
        if activation == "geglu":
            h = gelu64(f64(x) @ f64(params["wi_0"][e])) * (f64(x) @ f64(params["wi_1"][e]))
        else:
            h = gelu64(f64(x) @ f64(params["wi"][e]))
        outs.append(h @ f64(params["wo"][e]))
    outs = np.stack(outs, -2)  # [b, t, E, d]
    if router == "expert_choice":
        weights = probs
    else:
        k = 1 if router == "top1" else 2
        top = np.argsort(-probs, -1, kind="stable")[..., :k]
        top_probs = np.take_along_axis(probs, top, -1)
        if k > 1:
            top_probs = top_probs / top_probs.sum(-1, keepdims=True)
        weights = np.zeros_like(probs)
        np.put_along_axis(weights, top, top_probs, -1)
    return np.einsum("bte,bted->btd", weights, outs)


@props(2)
@given(
    st.sampled_from(
        [
            ("expert_choice", "gather", "gelu"),
            ("top1", "einsum", "geglu"),
            ("top2", "gather", "geglu"),
            ("expert_choice", "einsum", "gelu"),
            ("top2", "einsum", "gelu"),
        ]
    ),
    seeds,
)
def test_moe_without_dropping_is_the_dense_mixture(config, seed):
    router, dispatch, activation = config
    experts = 2
    # capacity_factor = experts: every expert has a slot for every token, nothing is dropped.
    layer, apply = _moe_apply(router, dispatch, activation, experts, float(experts))
    x = jnp.asarray(normal(seed, (2, 4, 3)))
    variables = random_variables(layer, x, seed=seed)
    out = apply(variables, x)
    expected = _moe64(variables["params"], x, router, activation)
    assert_close(out, expected, rtol=1e-4, atol=1e-5)
    # A NaN token makes its own output NaN and nothing else (the same compiled function).
    poisoned = np.asarray(apply(variables, x.at[0, 1].set(NAN)))
    bad = np.isnan(poisoned).any(-1)
    assert bad[0, 1] and bad.sum() == 1
    np.testing.assert_array_equal(poisoned[1], out[1])


@INVALID
@given(st.data())
def test_moe_refuses(data):
    x = jnp.ones((2, 4, 3))
    attr = data.draw(
        st.sampled_from(
            [
                "num_experts", "hidden", "group_size", "capacity_factor", "eval_capacity_factor",
                "jitter", "gating_dropout", "load_balancing_coef", "z_loss_coef", "router",
                "dispatch", "activation", "router_type", "mesh", "causal", "x", "padding_mask",
                "token_mask",
            ]
        )
    )  # fmt: skip
    kwargs = dict(num_experts=2, hidden=4)
    if attr in ("num_experts", "hidden", "group_size"):
        kwargs[attr] = data.draw(bad_ints().filter(lambda v: v is not None))
    elif attr in ("capacity_factor", "eval_capacity_factor"):
        kwargs[attr] = data.draw(bad_positive().filter(lambda v: v is not None))
    elif attr in ("jitter", "gating_dropout"):
        kwargs[attr] = data.draw(bad_probabilities(allow_one=attr != "jitter"))
    elif attr in ("load_balancing_coef", "z_loss_coef"):
        kwargs[attr] = data.draw(bad_positive(allow_zero=True))
    elif attr == "mesh":
        kwargs[attr] = "mesh"
    elif attr == "causal":
        kwargs[attr] = data.draw(st.sampled_from([1, "yes"]))
    elif attr == "x":
        bad_x = data.draw(
            st.sampled_from(
                [
                    jnp.ones(3),
                    jnp.ones((2, 0, 3)),
                    jnp.ones((0, 4, 3)),
                    jnp.ones((2, 4, 3), bool),
                    jnp.ones((2, 4, 3), jnp.complex64),
                    [[[1.0, 2.0, 3.0]]],
                ]
            )
        )
        refused(lambda: enn.MoEFeedForward(2, 4).init(KEY, bad_x), "x")
        return
    elif attr == "padding_mask":
        bad = data.draw(
            st.sampled_from([jnp.ones((2, 4)), jnp.ones((2, 3), bool), jnp.ones((2, 4, 3), bool)])
        )
        refused(lambda: enn.MoEFeedForward(2, 4).init(KEY, x, padding_mask=bad), "padding_mask")
        return
    elif attr == "token_mask":
        route = data.draw(st.sampled_from([enn.expert_choice, enn.token_choice]))
        bad = data.draw(st.sampled_from([jnp.ones((2, 4)), jnp.ones((2, 3), bool), "all"]))
        refused(lambda: route(jnp.ones((2, 4, 2)), capacity=2, token_mask=bad), "token_mask")
        return
    else:
        kwargs[attr] = data.draw(st.sampled_from(["nope", "", None]))
    refused(lambda: enn.MoEFeedForward(**kwargs).init(KEY, x), attr)


@VALID
@given(seeds, st.integers(1, 4))
def test_prune_experts_keeps_the_best_above_average(seed, target):
    scores = np.random.default_rng(seed).random(4)
    params = {
        "router": {"kernel": normal(seed, (3, 4))},
        "wi": normal(seed, (4, 3, 5)),
        "wo": normal(seed, (4, 5, 3)),
    }
    new, count, kept = enn.prune_experts(params, scores, target_num_experts=target)
    keep = max(int(np.sum(scores >= scores.mean())), target)
    want = np.sort(np.argsort(-scores, kind="stable")[:keep])
    assert count == keep
    np.testing.assert_array_equal(kept, want)
    np.testing.assert_array_equal(new["wi"], params["wi"][want])
    np.testing.assert_array_equal(new["router"]["kernel"], params["router"]["kernel"][:, want])


@INVALID
@given(st.data())
def test_prune_experts_and_aux_loss_refuse(data):
    params = {
        "router": {"kernel": np.ones((3, 4))},
        "wi": np.ones((4, 3, 5)),
        "wo": np.ones((4, 5, 3)),
    }
    case = data.draw(st.sampled_from(["scores", "target", "params", "aux"]))
    if case == "scores":
        bad = data.draw(st.sampled_from([np.ones(3), np.ones((4, 1)), np.array([1, NAN, 1, 1])]))
        refused(lambda: enn.prune_experts(params, bad, target_num_experts=2), "gate_weight")
    elif case == "target":
        bad = data.draw(st.sampled_from([0, 5, True, 2.0, None]))
        refused(
            lambda: enn.prune_experts(params, np.ones(4), target_num_experts=bad),
            "target_num_experts",
        )
    elif case == "params":
        bad = data.draw(st.sampled_from([[1, 2], {"a": 1}]))
        refused(lambda: enn.prune_experts(bad, np.ones(4), target_num_experts=2), "params")
    else:
        bad = data.draw(st.sampled_from(["x", True, object()]))
        refused(lambda: enn.moe_aux_loss({"aux_loss": bad}), "losses")


@VALID
@given(st.lists(st.floats(-10, 10), max_size=4))
def test_moe_aux_loss_sums_every_leaf(values):
    losses = {f"layer_{i}": {"aux_loss": (jnp.float32(v),)} for i, v in enumerate(values)}
    assert_close(enn.moe_aux_loss(losses), sum(np.float32(v) for v in values), atol=1e-4)


# --------------------------------------------------------------------------- Monarch


# (in, out, nblocks): square, wide, narrow.
monarch_sizes = st.sampled_from([(8, 8, 2), (4, 8, 4), (8, 4, 1)])


@VALID
@given(monarch_sizes, seeds, st.booleans())
def test_monarch_dense_is_x_times_its_dense_matrix(sizes, seed, use_bias):
    d_in, d_out, nblocks = sizes
    layer = enn.MonarchDense(d_out, nblocks=nblocks, use_bias=use_bias, implementation="xla")
    x = jnp.asarray(normal(seed, (3, d_in)))
    params = random_variables(layer, x, seed=seed)["params"]
    got = layer.apply({"params": params}, x)
    expected = monarch64(x, params["w1"], params["w2"])
    if use_bias:
        expected = expected + f64(params["bias"])
    assert_close(got, expected, rtol=1e-4, atol=1e-4)
    assert (params["w1"].shape, params["w2"].shape) == enn.monarch_shapes(d_in, d_out, nblocks)
    # Reverse sparsification's conversion gives the same function as a dense layer.
    dense = enn.monarch_params_to_dense({"layer": params})["layer"]
    assert_close(
        f64(x) @ f64(dense["kernel"]) + (f64(params["bias"]) if use_bias else 0),
        expected,
        rtol=1e-4,
        atol=1e-4,
    )


@FEW
@given(seeds, st.sampled_from([2, 4]))
def test_monarchify_and_projection_round_trip(seed, nblocks):
    mlp = MLP(features=(8,), num_classes=4)
    model = enn.monarchify(mlp, nblocks=nblocks, implementation="xla")
    x = jnp.asarray(normal(seed, (2, 8)))
    params = random_variables(model, x, seed=seed)["params"]
    dense_params = enn.monarch_params_to_dense(params)
    assert_close(
        model.apply({"params": params}, x),
        mlp.apply({"params": dense_params}, x),
        rtol=1e-4,
        atol=1e-4,
    )
    # A Monarch matrix projects onto itself.
    projected = enn.project_dense_params(dense_params, nblocks)
    assert_close(
        enn.monarch_params_to_dense(projected)["Dense_0"]["kernel"],
        f64(dense_params["Dense_0"]["kernel"]),
        rtol=1e-3,
        atol=1e-4,
    )


@VALID
@given(st.integers(1, 10_000), st.floats(0.0, 1.0))
def test_reverse_sparsification_switch_step(total, fraction):
    schedule = enn.ReverseSparsification(total, fraction)
    switch = total - round(fraction * total)
    assert schedule.switch_step == switch
    assert schedule.is_dense(switch) and not schedule.is_dense(switch - 1)
    assert schedule.should_switch(switch)


@INVALID
@given(st.data())
def test_monarch_layers_refuse(data):
    x = jnp.ones((2, 8))
    case = data.draw(
        st.sampled_from(
            ["features", "nblocks", "divide", "implementation", "x", "shapes", "monarchify",
             "include", "project", "schedule", "fraction"]
        )
    )  # fmt: skip
    if case == "features":
        bad = data.draw(bad_ints().filter(lambda v: v is not None))
        refused(lambda: enn.MonarchDense(bad).init(KEY, x), "features")
    elif case == "nblocks":
        bad = data.draw(bad_ints().filter(lambda v: v is not None))
        refused(lambda: enn.MonarchDense(8, nblocks=bad).init(KEY, x), "nblocks")
    elif case == "divide":
        refused(lambda: enn.MonarchDense(8, nblocks=3).init(KEY, x), "nblocks")
    elif case == "implementation":
        bad = data.draw(st.sampled_from(["nope", "XLA", 3]))
        refused(lambda: enn.MonarchDense(8, implementation=bad).init(KEY, x), "implementation")
    elif case == "x":
        bad = data.draw(st.sampled_from([jnp.float32(1), jnp.ones((2, 0))]))
        refused(lambda: enn.MonarchDense(8).init(KEY, bad), "x")
    elif case == "shapes":
        arg = data.draw(st.sampled_from(["in_features", "out_features", "nblocks"]))
        kwargs = dict(in_features=8, out_features=8, nblocks=2)
        kwargs[arg] = data.draw(bad_ints().filter(lambda v: v is not None))
        refused(lambda: enn.monarch_shapes(**kwargs), arg)
    elif case == "monarchify":
        bad = data.draw(bad_ints().filter(lambda v: v is not None))
        refused(lambda: enn.monarchify(MLP(), nblocks=bad), "nblocks")
    elif case == "include":
        refused(lambda: enn.monarchify(MLP(), include="all"), "include")
    elif case == "project":
        bad = data.draw(bad_ints().filter(lambda v: v is not None))
        refused(
            lambda: enn.project_dense_params({"d": {"kernel": jnp.ones((8, 8))}}, bad), "nblocks"
        )
    elif case == "schedule":
        refused(lambda: enn.ReverseSparsification(data.draw(bad_ints())), "total_steps")
    else:
        bad = data.draw(bad_probabilities())
        refused(lambda: enn.ReverseSparsification(10, bad), "dense_fraction")


# --------------------------------------------------------------------------- encoder


@FEW
@given(seeds, st.sampled_from(["gelu", "geglu"]))
def test_dense_feed_forward_matches_numpy(seed, activation):
    ffn = enn.DenseFeedForward(6, activation=activation)
    x = jnp.asarray(normal(seed, (2, 3, 4)))
    params = random_variables(ffn, x, seed=seed)["params"]
    h = gelu64(f64(x) @ f64(params["wi_0"]["kernel"]) + f64(params["wi_0"]["bias"]))
    if activation == "geglu":
        h = h * (f64(x) @ f64(params["wi_1"]["kernel"]) + f64(params["wi_1"]["bias"]))
    expected = h @ f64(params["wo"]["kernel"]) + f64(params["wo"]["bias"])
    assert_close(ffn.apply({"params": params}, x), expected, rtol=1e-4, atol=1e-5)


@functools.cache
def _encoder():
    model = enn.Encoder(
        num_layers=1, d_model=8, num_heads=2, mlp_hidden=16, num_classes=3, max_len=8
    )
    return model, jax.jit(model.apply)


@FEW
@given(seeds)
def test_encoder_examples_are_independent(seed):
    model, apply = _encoder()
    x = jnp.asarray(normal(seed, (3, 5, 2)))
    variables = random_variables(model, x, seed=seed)
    logits = apply(variables, x)
    changed = apply(variables, x.at[1:].set(jnp.asarray(normal(seed + 1, (2, 5, 2)))))
    assert logits.shape == (3, 3) and bool(jnp.all(jnp.isfinite(logits)))
    np.testing.assert_allclose(changed[0], logits[0], rtol=1e-5, atol=1e-6)


@INVALID
@given(st.data())
def test_encoder_refuses(data):
    x = jnp.ones((2, 4, 3))
    arg = data.draw(
        st.sampled_from(
            [
                "num_layers",
                "d_model",
                "num_heads",
                "mlp_hidden",
                "max_len",
                "num_classes",
                "x",
                "hidden",
            ]
        )
    )
    kwargs = dict(num_layers=1, d_model=8, num_heads=2, mlp_hidden=16, num_classes=3)
    if arg == "x":
        bad = data.draw(st.sampled_from([jnp.ones((4, 3)), jnp.ones((2, 0, 3))]))
        refused(lambda: enn.Encoder(**kwargs).init(KEY, bad), "x")
        return
    if arg == "hidden":
        bad = data.draw(bad_ints().filter(lambda v: v is not None))
        refused(lambda: enn.DenseFeedForward(bad).init(KEY, x), "hidden")
        return
    kwargs[arg] = data.draw(
        bad_ints(0 if arg == "num_layers" else 1).filter(lambda v: v is not None)
    )
    refused(lambda: enn.Encoder(**kwargs).init(KEY, x), arg)


# --------------------------------------------------------------------------- attention


@VALID
@given(seeds, st.sampled_from([10.0, 10_000.0]), st.booleans())
def test_apply_rotary_embedding_matches_numpy(seed, base, batch_positions):
    x = normal(seed, (2, 5, 2, 4))
    positions = np.random.default_rng(seed).integers(0, 100, (2, 5) if batch_positions else (5,))
    got = enn.apply_rotary_embedding(jnp.asarray(x), jnp.asarray(positions), base=base)
    assert_close(got, rope64(x, positions, base), rtol=1e-4, atol=1e-4)


@functools.cache
def _nn_attention(causal):
    return jax.jit(functools.partial(enn.dot_product_attention, causal=causal))


@VALID
@given(seeds, st.booleans(), st.booleans())
def test_flax_style_attention_matches_numpy(seed, causal, with_mask):
    q, k, v = (normal(seed + i, (2, 6, 2, 4)) for i in range(3))
    mask = np.random.default_rng(seed).random((2, 1, 6, 6)) < 0.7 if with_mask else None
    got = _nn_attention(causal)(
        jnp.asarray(q),
        jnp.asarray(k),
        jnp.asarray(v),
        mask=None if mask is None else jnp.asarray(mask),
    )
    want = attention64(q, k, v, causal=causal, mask=mask)
    # Flax's numbers for a query that sees no key: uniform weights, the mean of the values.
    visible = np.ones((2, 2, 6, 6), bool) if mask is None else np.broadcast_to(mask, (2, 2, 6, 6))
    if causal:
        visible = visible & np.tril(np.ones((6, 6), bool))
    blind = ~visible.any(-1).transpose(0, 2, 1)[..., None]  # [b, t, h, 1]
    want = np.where(blind, np.asarray(v, np.float64).mean(1, keepdims=True), want)
    assert_close(got, want, rtol=2e-4, atol=2e-5)


@functools.cache
def _mha(rope, num_kv_heads):
    layer = enn.MultiHeadAttention(2, num_kv_heads=num_kv_heads, causal=True, rope=rope)
    return layer, jax.jit(layer.apply)


@FEW
@given(seeds, st.sampled_from([(False, None), (True, 1)]))
def test_multi_head_attention_matches_numpy(seed, config):
    rope, kv_heads = config
    layer, apply = _mha(rope, kv_heads)
    x = normal(seed, (2, 5, 8))
    params = random_variables(layer, jnp.asarray(x), seed=seed)["params"]
    proj = lambda name: np.einsum("btd,dhk->bthk", f64(x), f64(params[name]["kernel"]))  # noqa: E731
    q, k, v = proj("query"), proj("key"), proj("value")
    if rope:
        q, k = rope64(q, np.arange(5)), rope64(k, np.arange(5))
    encoded = attention64(q, k, v, causal=True)
    expected = np.einsum("bthk,hkd->btd", encoded, f64(params["out"]["kernel"]))
    assert_close(apply({"params": params}, jnp.asarray(x)), expected, rtol=2e-4, atol=2e-4)


@FEW
@given(seeds, st.integers(1, 5))
def test_segment_ids_with_padding_hides_the_padded_keys(seed, real):
    padding = np.arange(6)[None, :] < np.array([[real], [6]])
    q_ids, kv_ids = enn.segment_ids_with_padding(jnp.asarray(padding), 4)
    assert q_ids.shape == (2, 4) and kv_ids.shape == (2, 6)
    seen = np.asarray(q_ids)[:, :, None] == np.asarray(kv_ids)[:, None, :]
    np.testing.assert_array_equal(seen, np.broadcast_to(padding[:, None, :], seen.shape))


@INVALID
@given(st.data())
def test_attention_layers_refuse(data):
    x = jnp.ones((1, 8, 8))
    q = jnp.ones((1, 8, 2, 4))
    case = data.draw(
        st.sampled_from(
            ["rope_x", "rope_base", "positions", "q_len", "padding", "heads", "kv_heads",
             "head_dim", "rope_dim", "sm_scale", "implementation", "out", "dropout", "x",
             "dtype", "hooks"]
        )
    )  # fmt: skip
    MHA = enn.MultiHeadAttention
    if case == "rope_x":
        bad = data.draw(st.sampled_from([q.astype(jnp.int32), q.astype(jnp.complex64), q[0]]))
        refused(lambda: enn.apply_rotary_embedding(bad, jnp.arange(8)), "x")
    elif case == "rope_base":
        refused(
            lambda: enn.apply_rotary_embedding(q, jnp.arange(8), base=data.draw(bad_positive())),
            "base",
        )
    elif case == "positions":
        bad = data.draw(st.sampled_from([jnp.arange(5), jnp.zeros((3, 8)), jnp.ones(8, bool)]))
        refused(lambda: enn.apply_rotary_embedding(q, bad), "positions")
    elif case == "q_len":
        refused(
            lambda: enn.segment_ids_with_padding(jnp.ones((1, 8), bool), data.draw(bad_ints())),
            "q_len",
        )
    elif case == "padding":
        bad = data.draw(st.sampled_from([jnp.ones(8, bool), jnp.ones((1, 8)) * 0.5]))
        refused(lambda: enn.segment_ids_with_padding(bad, 8), "padding_mask")
    elif case in ("heads", "kv_heads", "head_dim", "out"):
        arg = {
            "heads": "num_heads",
            "kv_heads": "num_kv_heads",
            "head_dim": "head_dim",
            "out": "out_features",
        }[case]
        # 3 heads do not divide 8 features, 3 kv heads do not divide 2 heads.
        bad = data.draw(
            st.sampled_from([0, -1, 2.5] + ([3] if case in ("heads", "kv_heads") else []))
        )
        kwargs = {"num_heads": 2, arg: bad}
        refused(lambda: MHA(**kwargs).init(KEY, x), arg)
    elif case == "rope_dim":
        refused(lambda: MHA(2, head_dim=3, rope=True).init(KEY, x), "head_dim")
    elif case == "sm_scale":
        refused(
            lambda: MHA(2, sm_scale=data.draw(bad_positive().filter(lambda v: v is not None))).init(
                KEY, x
            ),
            "sm_scale",
        )
    elif case == "implementation":
        refused(
            lambda: MHA(2, implementation=data.draw(st.sampled_from(["nope", 3]))).init(KEY, x),
            "implementation",
        )
    elif case == "dropout":
        refused(
            lambda: MHA(2, dropout_rate=data.draw(bad_probabilities(allow_one=False))).init(KEY, x),
            "dropout_rate",
        )
    elif case == "x":
        refused(lambda: MHA(2).init(KEY, jnp.ones((8, 8))), "inputs_q")
    elif case == "dtype":
        refused(lambda: enn.dot_product_attention(q, q, q, dtype="nope"), "dtype")
    else:
        refused(
            lambda: enn.dot_product_attention(q, q, q, einsum_dot_general=jnp.einsum),
            "einsum_dot_general",
        )


# --------------------------------------------------------------------------- GAU / FLASH


def _buckets64(rel, bidirectional, num_buckets, max_distance):
    out = np.zeros_like(rel)
    for idx, r in np.ndenumerate(rel):
        n, d, bucket = num_buckets, -r, 0
        if bidirectional:
            n //= 2
            bucket = n if d < 0 else 0
            d = abs(d)
        else:
            d = max(d, 0)
        exact = n // 2
        if d < exact:
            out[idx] = bucket + d
        else:
            large = exact + int(np.log(d / exact) / np.log(max_distance / exact) * (n - exact))
            out[idx] = bucket + min(large, n - 1)
    return out


@VALID
@given(st.booleans(), st.sampled_from([(8, 16), (32, 128), (6, 50)]))
def test_relative_position_buckets_match_t5(bidirectional, sizes):
    num_buckets, max_distance = sizes
    rel = np.arange(-150, 151, dtype=np.int32)
    got = enn.relative_position_buckets(
        jnp.asarray(rel), bidirectional=bidirectional, num_buckets=num_buckets,
        max_distance=max_distance,
    )  # fmt: skip
    np.testing.assert_array_equal(
        np.asarray(got), _buckets64(rel, bidirectional, num_buckets, max_distance)
    )


@functools.cache
def _gau(kind):
    cls = {"gau": enn.GatedAttentionUnit, "quad": enn.FLASHQuad, "flash": enn.FLASH}[kind]
    extra = {"chunk_size": 4} if kind == "flash" else {}
    layer = cls(qk_dim=4, causal=True, num_buckets=8, max_distance=16, **extra)
    return layer, jax.jit(layer.apply)


@FEW
@given(seeds, st.sampled_from(["gau", "quad", "flash"]))
def test_causal_gau_layers_do_not_see_the_future(seed, kind):
    layer, apply = _gau(kind)
    x = jnp.asarray(normal(seed, (2, 10, 6)))
    variables = random_variables(layer, x, seed=seed, scale=0.3)
    out = apply(variables, x)
    changed = apply(variables, x.at[:, 6:].set(jnp.asarray(normal(seed + 1, (2, 4, 6)))))
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_allclose(
        np.asarray(changed[:, :6]), np.asarray(out[:, :6]), rtol=1e-5, atol=1e-5
    )


@INVALID
@given(st.data())
def test_gau_layers_refuse(data):
    x = jnp.ones((2, 8, 6))
    cls = data.draw(st.sampled_from([enn.GatedAttentionUnit, enn.FLASHQuad, enn.FLASH]))
    arg = data.draw(
        st.sampled_from(
            [
                "qk_dim",
                "expansion",
                "normalization",
                "dropout_rate",
                "causal",
                "num_buckets",
                "x",
                "padding_mask",
                "decode",
                "buckets_fn",
            ]
        )
    )
    kwargs = dict(qk_dim=4)
    if arg == "qk_dim":
        kwargs[arg] = data.draw(st.sampled_from([0, -2, 2.5]))
    elif arg == "expansion":
        kwargs[arg] = data.draw(bad_positive().filter(lambda v: v is not None))
    elif arg == "normalization":
        kwargs[arg] = data.draw(st.sampled_from(["batch", None]))
    elif arg == "dropout_rate":
        kwargs[arg] = data.draw(bad_probabilities(allow_one=False))
    elif arg == "causal":
        kwargs[arg] = data.draw(st.sampled_from([1, "yes"]))
    elif arg == "num_buckets":
        kwargs[arg] = data.draw(st.sampled_from([0, 1, 3]))  # non-causal needs 4
    elif arg == "x":
        bad = data.draw(
            st.sampled_from([jnp.ones((8, 6)), jnp.ones((2, 0, 6)), jnp.ones((2, 8, 6), jnp.int32)])
        )
        refused(lambda: cls(**kwargs).init(KEY, bad), "x")
        return
    elif arg == "padding_mask":
        bad = data.draw(st.sampled_from([jnp.ones((2, 8)), jnp.ones((2, 7), bool), "all", 1]))
        refused(lambda: cls(**kwargs).init(KEY, x, padding_mask=bad), "padding_mask")
        return
    elif arg == "decode":
        bad = data.draw(st.sampled_from([1, "yes", None]))
        refused(lambda: cls(**kwargs, causal=True).init(KEY, x, decode=bad), "decode")
        return
    else:
        bad = data.draw(
            st.sampled_from(
                [{"relative_position": jnp.arange(4.0)}, {"bidirectional": 1}, {"max_distance": 2}]
            )
        )
        name = next(iter(bad))
        call = {
            "relative_position": jnp.arange(4),
            "bidirectional": True,
            "num_buckets": 8,
            "max_distance": 16,
            **bad,
        }
        refused(lambda: enn.relative_position_buckets(call.pop("relative_position"), **call), name)
        return
    refused(lambda: cls(**kwargs).init(KEY, x), arg)


# --------------------------------------------------------------------------- token merging


@VALID
@given(seeds, st.booleans())
def test_merge_tokens_matches_numpy(seed, with_mask):
    scores, tokens = normal(seed, (2, 3, 6), 2.0), normal(seed + 1, (2, 6, 4))
    mask = np.arange(6)[None, :] < np.array([[4], [6]]) if with_mask else np.ones((2, 6), bool)
    merged, weights = enn.merge_tokens(
        jnp.asarray(scores), jnp.asarray(tokens), jnp.asarray(mask) if with_mask else None
    )
    expected_w = np.where(
        mask[:, None, :], np.exp(f64(scores) - f64(scores).max(-1, keepdims=True)), 0
    )
    expected_w = expected_w / expected_w.sum(-1, keepdims=True)
    assert_close(weights, expected_w, rtol=1e-5, atol=1e-6)
    assert_close(merged, np.einsum("bmn,bnd->bmd", expected_w, f64(tokens)), rtol=1e-5, atol=1e-5)


@FEW
@given(seeds, st.sampled_from(["merger", "learner"]))
def test_token_mergers_ignore_masked_tokens(seed, kind):
    module = (
        enn.LearnedTokenMerger(2) if kind == "merger" else enn.TokenLearner(2, bottleneck_dim=4)
    )
    tokens = jnp.asarray(normal(seed, (2, 6, 4)))
    mask = jnp.asarray(np.arange(6)[None, :] < 4).repeat(2, 0)
    variables = random_variables(module, tokens, seed=seed)
    out = module.apply(variables, tokens, mask=mask)
    changed = module.apply(variables, tokens.at[:, 4:].set(99.0), mask=mask)
    assert out.shape == (2, 2, 4)
    assert_close(changed, f64(out), rtol=1e-5, atol=1e-5)


@INVALID
@given(st.data())
def test_token_merging_refuses(data):
    tokens = jnp.ones((2, 6, 4))
    cls = data.draw(st.sampled_from([enn.LearnedTokenMerger, enn.TokenLearner]))
    case = data.draw(
        st.sampled_from(["num_tokens", "tokens", "mask", "scores", "bottleneck", "dtypes"])
    )
    if case == "num_tokens":
        refused(
            lambda: cls(data.draw(bad_ints().filter(lambda v: v is not None))).init(KEY, tokens),
            "num_tokens",
        )
    elif case == "tokens":
        refused(lambda: cls(2).init(KEY, tokens[0]), "tokens")
    elif case == "mask":
        bad = data.draw(st.sampled_from([jnp.ones((2, 6)), jnp.ones((2, 5), bool)]))
        refused(lambda: cls(2).init(KEY, tokens, mask=bad), "mask")
    elif case == "scores":
        refused(lambda: enn.merge_tokens(jnp.ones((2, 3, 5)), tokens), "scores")
    elif case == "dtypes":
        name, bad = data.draw(
            st.sampled_from(
                [
                    ("tokens", jnp.ones((2, 6, 4), bool)),
                    ("tokens", jnp.ones((2, 6, 4), jnp.complex64)),
                    ("tokens", [[1.0, 2.0], [3.0]]),
                    ("tokens", "tokens"),
                    ("scores", jnp.ones((2, 3, 6), bool)),
                    ("tokens", jnp.ones((2, 0, 4))),
                ]
            )
        )
        args = {"scores": jnp.ones((2, 3, 6)), "tokens": tokens, name: bad}
        refused(lambda: enn.merge_tokens(args["scores"], args["tokens"]), name)
        if name == "tokens" and not isinstance(bad, str):
            refused(lambda: cls(2).init(KEY, bad), "tokens")
    else:
        refused(
            lambda: enn.TokenLearner(
                2, bottleneck_dim=data.draw(st.sampled_from([0, -1, 2.5]))
            ).init(KEY, tokens),
            "bottleneck_dim",
        )


# --------------------------------------------------------------------------- masked positions
# Every module that takes a mask: outputs and gradients (w.r.t. the parameters and the inputs)
# at real positions do not depend on what masked positions hold, NaN and inf included.

MASK_FILLS = st.sampled_from([NAN, float("inf"), -float("inf"), 3e38, -1e30])


def _masked_module(kind):
    if kind in ("gau", "quad", "flash", "flash_causal"):
        cls = {"gau": enn.GatedAttentionUnit, "quad": enn.FLASHQuad}.get(kind, enn.FLASH)
        extra = {"chunk_size": 3} if kind in ("gau", "flash", "flash_causal") else {}
        module = cls(
            qk_dim=4,
            expansion=1.0,
            scale_init="one",
            causal=kind == "flash_causal",
            num_buckets=8,
            max_distance=16,
            **extra,
        )
        return module, lambda v, x, m: module.apply(v, x, padding_mask=m), "positions"
    if kind in ("merger", "learner"):
        module = (
            enn.LearnedTokenMerger(2) if kind == "merger" else enn.TokenLearner(2, bottleneck_dim=4)
        )
        return module, lambda v, x, m: module.apply(v, x, mask=m), "all"
    if kind.startswith("moe_"):
        router, dispatch = kind.split("_", 1)[1].rsplit("_", 1)
        module = enn.MoEFeedForward(num_experts=3, hidden=4, router=router, dispatch=dispatch)
        return module, lambda v, x, m: module.apply(v, x, padding_mask=m), "positions"
    if kind in ("encoder_pool", "encoder_tokens", "encoder_moe", "encoder_flash"):
        extra = {}
        if kind == "encoder_moe":
            extra["moe"] = functools.partial(enn.MoEFeedForward, num_experts=2, hidden=4)
            extra["moe_every"] = 1
        if kind == "encoder_flash":
            extra["block"] = functools.partial(
                enn.FLASH, chunk_size=3, qk_dim=4, num_buckets=8, max_distance=16
            )
        module = enn.Encoder(
            num_layers=1,
            d_model=6,
            num_heads=2,
            mlp_hidden=8,
            num_classes=None if kind == "encoder_tokens" else 3,
            max_len=8,
            **extra,
        )
        where = "positions" if kind == "encoder_tokens" else "all"
        return module, lambda v, x, m: module.apply(v, x, padding_mask=m), where
    raise AssertionError(kind)


@functools.cache
def _masked_run(kind):
    module, apply, where = _masked_module(kind)

    def loss_and_grads(variables, x, mask):
        def loss(variables, x):
            out = apply(variables, x, mask)
            if where == "positions":
                out = jnp.where(mask[:, :, None], out, 0.0)
            return jnp.sum(jnp.sin(out)), out

        (_, out), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(variables, x)
        return out, grads

    return module, jax.jit(loss_and_grads)


@pytest.mark.parametrize(
    "kind",
    [
        "gau",
        "quad",
        "flash",
        "flash_causal",
        "merger",
        "learner",
        "encoder_pool",
        "encoder_tokens",
        "encoder_moe",
        "encoder_flash",
        "moe_expert_choice_gather",
        "moe_expert_choice_einsum",
        "moe_top1_gather",
        "moe_top2_einsum",
    ],
)
@FEW
@given(seeds, MASK_FILLS)
def test_masked_positions_have_no_influence(kind, seed, fill):
    module, run = _masked_run(kind)
    x = jnp.asarray(normal(seed, (2, 7, 4)))
    # A full row, a padded row, and the padding in the middle of the first chunk.
    mask = jnp.asarray([[True] * 7, [True, True, False, True, False, False, False]])
    variables = random_variables(module, x, seed=seed, scale=0.3)
    zeros = jnp.where(mask[:, :, None], x, 0.0)
    poisoned = jnp.where(mask[:, :, None], x, fill)
    out, (grad_params, grad_x) = run(variables, zeros, mask)
    out_p, (grad_params_p, grad_x_p) = run(variables, poisoned, mask)
    real = np.asarray(mask)[:, :, None]
    if out.ndim == 3 and out.shape[1] == x.shape[1]:
        out, out_p = np.where(real, out, 0.0), np.where(real, out_p, 0.0)
    assert_close(out_p, f64(out), rtol=1e-6, atol=1e-6)
    for actual, expected in zip(
        jax.tree.leaves(grad_params_p), jax.tree.leaves(grad_params), strict=True
    ):
        assert_close(actual, f64(expected), rtol=1e-6, atol=1e-6)
    assert_close(np.where(real, grad_x_p, 0.0), np.where(real, grad_x, 0.0), rtol=1e-6, atol=1e-6)


@FEW
@given(seeds, MASK_FILLS)
def test_merge_tokens_ignores_what_masked_tokens_hold(seed, fill):
    scores, tokens = normal(seed, (2, 3, 6), 2.0), normal(seed + 1, (2, 6, 4))
    mask = jnp.asarray(np.arange(6)[None, :] < np.array([[6], [3]]))

    def run(scores, tokens):
        def loss(scores, tokens):
            merged, weights = enn.merge_tokens(scores, tokens, mask)
            return jnp.sum(jnp.sin(merged)) + jnp.sum(jnp.cos(weights)), (merged, weights)

        return jax.grad(loss, argnums=(0, 1), has_aux=True)(scores, tokens)

    m = np.asarray(mask)
    base = run(jnp.where(m[:, None], scores, 0.0), jnp.where(m[..., None], tokens, 0.0))
    poisoned = run(jnp.where(m[:, None], scores, fill), jnp.where(m[..., None], tokens, fill))
    (g_scores, g_tokens), outs = base
    (g_scores_p, g_tokens_p), outs_p = poisoned
    for actual, expected in zip(outs_p, outs, strict=True):
        assert_close(actual, f64(expected), rtol=1e-6, atol=1e-6)
    assert_close(np.where(m[:, None], g_scores_p, 0), np.where(m[:, None], g_scores, 0))
    assert_close(np.where(m[..., None], g_tokens_p, 0), np.where(m[..., None], g_tokens, 0))


def test_merge_tokens_averages_integer_tokens_in_float():
    merged, _ = enn.merge_tokens(jnp.zeros((1, 1, 2)), jnp.asarray([[[2], [4]]]))
    assert merged.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(merged), [[[3.0]]])
    merged, _ = enn.merge_tokens([[[0.0, 0.0]]], [[[2], [4]]], [[True, True]])
    np.testing.assert_allclose(np.asarray(merged), [[[3.0]]])
    for module in (enn.LearnedTokenMerger(1), enn.TokenLearner(1, bottleneck_dim=2)):
        tokens = np.random.default_rng(0).integers(-3, 3, (2, 5, 4))
        variables = module.init(KEY, jnp.asarray(tokens, jnp.float32))
        np.testing.assert_array_equal(
            module.apply(variables, tokens.tolist()),
            module.apply(variables, jnp.asarray(tokens, jnp.float32)),
        )


@FEW
@given(seeds, MASK_FILLS, st.sampled_from(["expert_choice", "top1", "top2"]))
def test_routers_with_a_token_mask_never_route_padding(seed, fill, router):
    logits = normal(seed, ROUTER_SHAPE, 2.0)
    mask = np.random.default_rng(seed).random(ROUTER_SHAPE[:2]) < 0.6
    mask[:, 0] = True

    def route(logits):
        if router == "expert_choice":
            return enn.expert_choice(jnp.asarray(logits), capacity=3, token_mask=jnp.asarray(mask))
        k = 1 if router == "top1" else 2
        return enn.token_choice(jnp.asarray(logits), k=k, capacity=3, token_mask=jnp.asarray(mask))

    base = route(np.where(mask[..., None], logits, 0.0))
    poisoned = route(np.where(mask[..., None], logits, fill))
    for name in ("token_indices", "gates", "slot_mask", "dropped"):
        a, b = np.asarray(getattr(poisoned, name)), np.asarray(getattr(base, name))
        a = np.where(np.asarray(base.slot_mask), a, 0) if name != "dropped" else a
        b = np.where(np.asarray(base.slot_mask), b, 0) if name != "dropped" else b
        np.testing.assert_array_equal(a, b, err_msg=name)
    # No slot holds a padded token; every real token an expert could take is taken first.
    slot_mask, tokens = np.asarray(poisoned.slot_mask), np.asarray(poisoned.token_indices)
    real_of_slot = np.take_along_axis(mask[:, None, :], tokens, axis=-1)
    assert not np.any(slot_mask & ~real_of_slot)
    assert np.all(np.isfinite(np.asarray(poisoned.gates)))
    if router == "expert_choice":
        taken = slot_mask.sum(-1)  # [groups, experts]
        expected = np.broadcast_to(np.minimum(3, mask.sum(-1))[:, None], taken.shape)
        np.testing.assert_array_equal(taken, expected)
