"""Tests for efflax.nn (routing) against NumPy references and hand-checked examples."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflax.nn import LinearRouter
from efflax.nn import Routing
from efflax.nn import XMoERouter
from efflax.nn import combine
from efflax.nn import dispatch
from efflax.nn import expert_capacity
from efflax.nn import expert_choice
from efflax.nn import expert_choice_from_probs
from efflax.nn import load_balancing_loss
from efflax.nn import multiplicative_jitter
from efflax.nn import router_z_loss
from efflax.nn import token_choice


def _softmax(x):
    x = np.asarray(x, np.float64)
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _token_choice_numpy(logits, k, capacity):
    """Loop reference: first choices in token order, then second choices."""
    probs = _softmax(logits)
    groups, tokens, experts = probs.shape
    slots = [[[] for _ in range(experts)] for _ in range(groups)]
    dropped = np.zeros(groups, int)
    for g in range(groups):
        order = np.argsort(-probs[g], axis=-1, kind="stable")[:, :k]
        gate = np.take_along_axis(probs[g], order, axis=-1)
        if k > 1:
            gate = gate / gate.sum(-1, keepdims=True)
        for choice in range(k):
            for t in range(tokens):
                e = order[t, choice]
                if len(slots[g][e]) < capacity:
                    slots[g][e].append((t, gate[t, choice]))
                else:
                    dropped[g] += 1
    return slots, dropped


@pytest.mark.parametrize(
    "tokens,experts,factor,k,expected",
    [
        (8, 4, 2.0, 1, 4),
        (10, 4, 2.0, 1, 5),
        (10, 3, 1.0, 1, 4),
        (6, 4, 1.25, 2, 4),
        (4, 2, 4.0, 1, 4),
    ],
)
def test_expert_capacity_rounds_up_and_clips(tokens, experts, factor, k, expected):
    assert expert_capacity(tokens, experts, factor, k=k) == expected


@pytest.mark.parametrize("groups,tokens,experts,factor", [(2, 12, 4, 2.0), (3, 5, 8, 1.0)])
def test_expert_choice_fills_every_expert_with_its_top_tokens(groups, tokens, experts, factor):
    logits = jax.random.normal(jax.random.key(0), (groups, tokens, experts)) * 3
    routing = jax.jit(expert_choice, static_argnames="capacity_factor")(
        logits, capacity_factor=factor
    )
    capacity = expert_capacity(tokens, experts, factor)
    assert isinstance(routing, Routing)
    assert routing.token_indices.shape == (groups, experts, capacity)
    assert bool(jnp.all(routing.slot_mask))
    probs = _softmax(logits)
    idx = np.asarray(routing.token_indices)
    for g in range(groups):
        for e in range(experts):
            assert len(set(idx[g, e])) == capacity  # exactly `capacity` distinct tokens
            expected = np.sort(probs[g, :, e])[::-1][:capacity]
            np.testing.assert_allclose(np.asarray(routing.gates[g, e]), expected, rtol=1e-5)
            np.testing.assert_allclose(probs[g, idx[g, e], e], expected, rtol=1e-5)
    picked = np.zeros((groups, tokens), int)
    for g in range(groups):
        np.add.at(picked[g], idx[g].reshape(-1), 1)
    np.testing.assert_array_equal(np.asarray(routing.dropped), (picked == 0).sum(-1))


def test_top1_dropping_hand_checked():
    # probs argmax: tokens 0,1,2 -> expert 0, token 3 -> expert 1; capacity 2.
    logits = jnp.log(jnp.array([[[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.4, 0.6]]], jnp.float32))
    routing = jax.jit(token_choice, static_argnames=("k", "capacity"))(logits, k=1, capacity=2)
    np.testing.assert_array_equal(routing.token_indices[0], [[0, 1], [3, 0]])
    np.testing.assert_array_equal(routing.slot_mask[0], [[True, True], [True, False]])
    np.testing.assert_allclose(routing.gates[0], [[0.9, 0.8], [0.6, 0.0]], rtol=1e-6)
    assert int(routing.dropped[0]) == 1  # token 2 overflowed expert 0


def test_top2_dropping_hand_checked():
    # 3 experts, capacity 2. First choices: t0->e0, t1->e0, t2->e1; second: t0->e1, t1->e2,
    # t2->e0 (dropped: e0 is full after the first choices).
    probs = jnp.array([[[0.6, 0.3, 0.1], [0.5, 0.1, 0.4], [0.3, 0.6, 0.1]]], jnp.float32)
    routing = jax.jit(token_choice, static_argnames=("k", "capacity"))(
        jnp.log(probs), k=2, capacity=2
    )
    np.testing.assert_array_equal(routing.token_indices[0], [[0, 1], [2, 0], [1, 0]])
    np.testing.assert_array_equal(routing.slot_mask[0], [[True, True], [True, True], [True, False]])
    expected = [[0.6 / 0.9, 0.5 / 0.9], [0.6 / 0.9, 0.3 / 0.9], [0.4 / 0.9, 0.0]]
    np.testing.assert_allclose(routing.gates[0], expected, rtol=1e-5)
    assert int(routing.dropped[0]) == 1


@pytest.mark.parametrize("k,capacity", [(1, 3), (2, 4)])
def test_token_choice_matches_loop_reference(k, capacity):
    logits = jax.random.normal(jax.random.key(k + capacity), (3, 10, 4)) * 2
    routing = jax.jit(token_choice, static_argnames=("k", "capacity"))(
        logits, k=k, capacity=capacity
    )
    slots, dropped = _token_choice_numpy(logits, k, capacity)
    np.testing.assert_array_equal(np.asarray(routing.dropped), dropped)
    for g in range(3):
        for e in range(4):
            filled = len(slots[g][e])
            assert int(routing.slot_mask[g, e].sum()) == filled
            np.testing.assert_array_equal(
                routing.token_indices[g, e, :filled], [t for t, _ in slots[g][e]]
            )
            np.testing.assert_allclose(
                routing.gates[g, e, :filled], [w for _, w in slots[g][e]], rtol=1e-5
            )
            np.testing.assert_array_equal(routing.gates[g, e, filled:], 0.0)


@pytest.mark.parametrize("router", ["expert_choice", "top1", "top2"])
def test_gather_scatter_matches_einsum_values_and_grads(router):
    key_logits, key_x, key_w = jax.random.split(jax.random.key(3), 3)
    groups, tokens, experts, d = 2, 9, 4, 5
    logits = jax.random.normal(key_logits, (groups, tokens, experts))
    x = jax.random.normal(key_x, (groups, tokens, d))
    w = jax.random.normal(key_w, (experts, d, d)) / np.sqrt(d)

    def layer(x, logits, method):
        if router == "expert_choice":
            r = expert_choice(logits, capacity_factor=2.0)
        else:
            r = token_choice(logits, k=1 if router == "top1" else 2, capacity_factor=1.0)
        expert_in = dispatch(x, r.token_indices, r.slot_mask, method=method)
        expert_out = jnp.tanh(jnp.einsum("gecd,edf->gecf", expert_in, w))
        return combine(expert_out, r.token_indices, r.gates, tokens, method=method), expert_in

    def expert_major(x, logits, method):
        r = expert_choice(logits) if router == "expert_choice" else token_choice(logits, k=2)
        expert_in = dispatch(x, r.token_indices, r.slot_mask, method=method, expert_major=True)
        out = combine(
            jnp.tanh(expert_in), r.token_indices, r.gates, tokens, method=method, expert_major=True
        )
        reference_in = dispatch(x, r.token_indices, r.slot_mask, method="einsum")
        reference = combine(jnp.tanh(reference_in), r.token_indices, r.gates, tokens)
        return out, jnp.swapaxes(expert_in, 0, 1), reference, reference_in

    out, expert_in, reference, reference_in = jax.jit(expert_major, static_argnums=2)(
        x, logits, "gather" if router == "top2" else "einsum"
    )
    chex.assert_trees_all_close((out, expert_in), (reference, reference_in), atol=1e-6)

    layer = jax.jit(layer, static_argnums=2)
    out_g, in_g = layer(x, logits, "gather")
    out_e, in_e = layer(x, logits, "einsum")
    chex.assert_trees_all_close(out_g, out_e, atol=1e-6)
    chex.assert_trees_all_close(in_g, in_e, atol=1e-6)
    assert float(jnp.abs(out_g).max()) > 0.1

    def scalar(args, method):
        return jnp.sum(jnp.sin(layer(*args, method)[0]))

    grad = jax.jit(jax.grad(scalar), static_argnums=1)
    grads_g = grad((x, logits), "gather")
    grads_e = grad((x, logits), "einsum")
    chex.assert_trees_all_close(grads_g, grads_e, atol=1e-5)
    assert float(jnp.abs(grads_g[1]).max()) > 1e-4  # gates carry gradient to the router


def test_load_balancing_loss_formula():
    probs = jnp.asarray(_softmax(np.random.default_rng(0).normal(size=(3, 16, 4))), jnp.float32)
    first = jnp.argmax(probs, -1)
    f = np.stack([np.bincount(np.asarray(first[g]), minlength=4) / 16 for g in range(3)])
    p = np.asarray(probs).mean(1)
    expected = np.mean(4 * (f * p).sum(-1))
    np.testing.assert_allclose(load_balancing_loss(probs), expected, rtol=1e-6)
    top2 = jax.lax.top_k(probs, 2)[1]
    np.testing.assert_allclose(load_balancing_loss(probs, top2), expected, rtol=1e-6)
    uniform = jnp.full((1, 8, 4), 0.25)
    np.testing.assert_allclose(load_balancing_loss(uniform, jnp.arange(8)[None] % 4), 1.0)


def test_router_z_loss_formula():
    logits = jax.random.normal(jax.random.key(1), (2, 6, 5)) * 4
    lse = np.log(np.exp(np.asarray(logits, np.float64)).sum(-1))
    np.testing.assert_allclose(router_z_loss(logits), np.mean(lse**2), rtol=1e-5)
    np.testing.assert_allclose(
        router_z_loss(logits.astype(jnp.bfloat16)), np.mean(lse**2), rtol=2e-2
    )


def test_multiplicative_jitter_range():
    x = jax.random.normal(jax.random.key(0), (64, 8))
    y = multiplicative_jitter(x, jax.random.key(1), eps=0.1)
    ratio = np.asarray(y / x)
    assert ratio.min() >= 0.9 - 1e-6 and ratio.max() <= 1.1 + 1e-6 and ratio.std() > 0.01
    with pytest.raises(ValueError, match="eps"):
        multiplicative_jitter(x, jax.random.key(1), eps=1.5)


def test_routers():
    x = jax.random.normal(jax.random.key(0), (2, 5, 12))
    xmoe = XMoERouter(6)
    params = jax.jit(xmoe.init)(jax.random.key(1), x)["params"]
    logits = jax.jit(xmoe.apply)({"params": params}, x)
    w = np.asarray(params["projection"].unbox(), np.float64)
    emb = np.asarray(params["expert_embeddings"].unbox(), np.float64)
    h = np.asarray(x, np.float64) @ w
    h /= np.linalg.norm(h, axis=-1, keepdims=True)
    emb /= np.linalg.norm(emb, axis=-1, keepdims=True)
    np.testing.assert_allclose(logits, h @ emb.T / 0.07, rtol=1e-4, atol=1e-4)
    assert float(jnp.abs(logits).max()) <= 1 / 0.07 + 1e-3
    linear = LinearRouter(6, param_dtype=jnp.bfloat16)
    lp = jax.eval_shape(linear.init, jax.random.key(2), x)
    assert jax.eval_shape(linear.apply, lp, x.astype(jnp.bfloat16)).dtype == jnp.float32


def test_bad_arguments_raise():
    logits = jnp.ones((1, 4, 2))
    with pytest.raises(ValueError, match="capacity=0"):
        expert_choice(logits, capacity=0)
    with pytest.raises(ValueError, match="capacity=5"):
        expert_choice(logits, capacity=5)
    with pytest.raises(ValueError, match="capacity_factor"):
        expert_choice(logits, capacity_factor=0.0)
    with pytest.raises(ValueError, match="k=3"):
        token_choice(logits, k=3)
    with pytest.raises(ValueError, match="logits.shape"):
        token_choice(jnp.ones((4, 2)))
    r = expert_choice(logits)
    with pytest.raises(ValueError, match="method"):
        dispatch(jnp.ones((1, 4, 3)), r.token_indices, r.slot_mask, method="dense")


def test_routing_refuses_bad_values_instead_of_computing_garbage():
    with pytest.raises(ValueError, match="capacity_factor=nan"):
        expert_capacity(16, 4, float("nan"))
    with pytest.raises(ValueError, match="num_tokens=2.5"):
        expert_capacity(2.5, 4, 1.0)
    negative = -jax.nn.softmax(jax.random.normal(jax.random.key(0), (1, 6, 3)))
    with pytest.raises(ValueError, match=r"probs must lie in \[0, 1\]"):
        expert_choice_from_probs(negative, 2)
    with pytest.raises(ValueError, match=r"probs must lie in \[0, 1\]"):
        load_balancing_loss(negative)
    with pytest.raises(ValueError, match="capacity=7 exceeds"):
        expert_choice_from_probs(-negative, 7)
    with pytest.raises(ValueError, match="expert_indices.shape"):
        load_balancing_loss(-negative, jnp.zeros((1, 5), jnp.int32))
    with pytest.raises(ValueError, match="eps=-0.5"):
        multiplicative_jitter(jnp.ones(3), jax.random.key(0), -0.5)
