"""Layerwise batch entropy against hand-written float64 NumPy formulas (values and gradients)."""

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflax.losses import batch_entropy
from efflax.losses import capture_activations
from efflax.losses import lbe_loss
from efflax.losses import lbe_penalty
from efflax.models import MLP

PI_E = np.pi * np.e


def _entropy_and_grad(x):
    x = np.asarray(x, np.float64).reshape(x.shape[0], -1)
    batch, units = x.shape
    var = x.var(axis=0, ddof=1)
    value = np.mean(0.5 * np.log(PI_E * var + 1.0))
    # d/dx_bk of 0.5 log(pi e var_k + 1) / K, with d var_k / d x_bk = 2 (x_bk - mean_k) / (B-1).
    grad = (0.5 * PI_E / (PI_E * var + 1.0)) * 2.0 * (x - x.mean(0)) / (batch - 1) / units
    return value, grad


def test_batch_entropy_matches_float64_reference_with_dead_units():
    x = np.random.default_rng(0).standard_normal((6, 3, 4)).astype(np.float32) * 1.7
    # Dead units (constant over the batch, as a ReLU that never fires) add 0 and get finite
    # gradients; with jnp.std they would get NaN.
    x[:, 0, :2] = 0.0
    x[:, 2, 3] = 0.4
    value, grad = jax.jit(jax.value_and_grad(batch_entropy))(x)
    want_value, want_grad = _entropy_and_grad(x)
    chex.assert_trees_all_close(float(value), want_value, rtol=1e-5)
    chex.assert_trees_all_close(np.asarray(grad).reshape(6, -1), want_grad, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(grad)))

    def std_version(a):  # the literal port the module avoids
        return jnp.mean(0.5 * jnp.log(PI_E * jnp.std(a, axis=0, ddof=1) ** 2 + 1))

    assert np.isnan(np.asarray(jax.jit(jax.grad(std_version))(x.reshape(6, -1)))).any()
    assert float(batch_entropy(jnp.ones((5, 7)))) == 0.0


def test_batch_entropy_needs_two_examples():
    with pytest.raises(ValueError, match=r"activations.shape=\(1, 8\)"):
        batch_entropy(jnp.ones((1, 8)))


def test_lbe_loss_values_and_gradients():
    task, beta, alpha_min = 1.3, 0.1, 0.5
    entropies = jnp.array([0.0, 0.9, 2.5])
    alphas = jnp.array([2.0, -0.3, 1.1])  # |alpha| below alpha_min is lifted to alpha_min

    def fn(t, h, a):
        return lbe_loss(t, list(h), a, beta=beta, alpha_min=alpha_min)

    value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2)))(task, entropies, alphas)
    h, a = np.asarray(entropies, np.float64), np.asarray(alphas, np.float64)
    target = np.maximum(alpha_min, np.abs(a))
    penalty = np.mean((h - target) ** 2)
    chex.assert_trees_all_close(float(value), task * (1 + beta * penalty), rtol=1e-6)
    dh = task * beta * 2 * (h - target) / 3
    da = -dh * np.sign(a) * (np.abs(a) > alpha_min)
    chex.assert_trees_all_close(
        tuple(np.asarray(g) for g in grads), (1 + beta * penalty, dh, da), rtol=1e-5, atol=1e-7
    )
    chex.assert_trees_all_close(
        float(lbe_penalty(entropies, alphas, alpha_min=alpha_min)), penalty, rtol=1e-6
    )
    with pytest.raises(ValueError, match=r"alphas.shape=\(2,\)"):
        lbe_loss(task, entropies, alphas[:2], beta=beta, alpha_min=alpha_min)
    with pytest.raises(ValueError, match="beta=-0.1"):
        lbe_loss(task, entropies, alphas, beta=-0.1, alpha_min=alpha_min)


def test_capture_activations_collects_relu_outputs_with_gradients():
    model = MLP(features=(16, 16, 16), num_classes=3)
    x = np.random.default_rng(1).standard_normal((8, 5)).astype(np.float32)
    params = nn.unbox(jax.jit(model.init)(jax.random.key(2), x)["params"])
    # A negative bias kills some units of the first layer: gradients stay finite.
    params = jax.tree_util.tree_map_with_path(
        lambda p, v: v - 0.7 if jax.tree_util.keystr(p) == "['Dense_0']['bias']" else v, params
    )

    def entropies(p):
        logits, acts = capture_activations(
            model.apply, {"params": p}, x, select=nn.Dense, where="inputs"
        )
        return logits, acts

    logits, acts = jax.jit(entropies)(params)
    assert list(acts) == ["Dense_0", "Dense_1", "Dense_2", "Dense_3"]
    np.testing.assert_allclose(np.asarray(acts["Dense_0"]), np.asarray(x))
    # The input of Dense_{l+1} is relu(Dense_l(.)): the hidden activation of layer l.
    h1 = np.maximum(x @ np.asarray(params["Dense_0"]["kernel"]) + params["Dense_0"]["bias"], 0)
    np.testing.assert_allclose(np.asarray(acts["Dense_1"]), np.asarray(h1), atol=1e-6)
    dead = np.all(np.asarray(h1) == 0, axis=0)
    assert 0 < dead.sum() < dead.size
    np.testing.assert_allclose(
        np.asarray(logits), np.asarray(jax.jit(model.apply)({"params": params}, x)), atol=1e-6
    )

    def regularised(p):
        _, acts = entropies(p)
        hs = [batch_entropy(a) for name, a in acts.items() if name != "Dense_0"]
        return lbe_loss(1.0, hs, jnp.full((3,), 2.0), beta=0.1, alpha_min=0.2)

    grads = jax.jit(jax.grad(regularised))(params)
    leaves = jax.tree.leaves(grads)
    assert all(np.all(np.isfinite(np.asarray(g))) for g in leaves)
    assert float(jnp.abs(grads["Dense_1"]["kernel"]).sum()) > 0

    _, outputs = jax.jit(
        lambda p: capture_activations(
            model.apply, {"params": p}, x, select=lambda m: m.name == "Dense_3"
        )
    )(params)
    np.testing.assert_allclose(np.asarray(outputs["Dense_3"]), np.asarray(logits))
    with pytest.raises(ValueError, match="where='middle'"):
        capture_activations(model.apply, {"params": params}, x, select=nn.Dense, where="middle")
