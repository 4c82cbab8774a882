"""Learned token merging (PatchMerger, TokenLearner v1.1) and the small ViT, against float64 NumPy."""

import functools

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflax.models import ViT
from efflax.models import patchify
from efflax.nn import LearnedTokenMerger
from efflax.nn import TokenLearner
from efflax.nn import merge_tokens


def _layer_norm(x, scale, bias, eps=1e-6):
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def _softmax(z, axis=-1):
    e = np.exp(z - z.max(axis, keepdims=True))
    return e / e.sum(axis, keepdims=True)


def _merger_reference(params, x, scale):
    x = np.asarray(x, np.float64)
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    normed = _layer_norm(x, p["norm"]["scale"], p["norm"]["bias"])
    scores = np.einsum("md,bnd->bmn", p["queries"], normed)
    if scale:
        scores = scores / np.sqrt(x.shape[-1])
    weights = _softmax(scores)
    return np.einsum("bmn,bnd->bmd", weights, normed), weights


def _gelu_tanh(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _token_learner_reference(params, x):
    x = np.asarray(x, np.float64)
    p = jax.tree.map(lambda v: np.asarray(v, np.float64), params)
    h = _layer_norm(x, p["norm"]["scale"], p["norm"]["bias"])
    h = _gelu_tanh(h @ p["hidden"]["kernel"] + p["hidden"]["bias"])
    scores = h @ p["scores"]["kernel"] + p["scores"]["bias"]  # [b, n, m]
    weights = _softmax(np.swapaxes(scores, 1, 2))
    return np.einsum("bmn,bnd->bmd", weights, x)


def _randomised(params, rng):
    # Random LayerNorm scale/bias too, so the reference checks them.
    return jax.tree.map(lambda v: v + 0.3 * rng.standard_normal(v.shape).astype(v.dtype), params)


def _numeric_grad(f, x, h=1e-6):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = h
        grad[idx] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


@pytest.mark.parametrize("scale", [False, True])
def test_learned_token_merger_matches_float64_reference(scale):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 5, 4)).astype(np.float32)
    cotangent = rng.standard_normal((2, 3, 4))
    merger = LearnedTokenMerger(num_tokens=3, scale=scale)
    params = _randomised(nn.unbox(jax.jit(merger.init)(jax.random.key(0), x)["params"]), rng)

    @jax.jit
    def run(p, x):
        (y, state) = merger.apply({"params": p}, x, mutable=["intermediates"])
        return y, state["intermediates"]["merge_weights"][0]

    y, weights = run(params, x)
    want_y, want_weights = _merger_reference(params, x, scale)
    chex.assert_trees_all_close(np.asarray(y), want_y, atol=1e-5)
    chex.assert_trees_all_close(np.asarray(weights), want_weights, atol=1e-6)
    np.testing.assert_allclose(np.asarray(weights).sum(-1), 1.0, rtol=1e-6)

    def scalar(p, x):
        return jnp.sum(run(p, x)[0] * cotangent)

    grad_p, grad_x = jax.jit(jax.grad(scalar, argnums=(0, 1)))(params, x)
    want_x = _numeric_grad(lambda v: np.sum(_merger_reference(params, v, scale)[0] * cotangent), x)
    queries = np.asarray(params["queries"], np.float64)
    want_q = _numeric_grad(
        lambda q: np.sum(_merger_reference({**params, "queries": q}, x, scale)[0] * cotangent),
        queries,
    )
    chex.assert_trees_all_close(np.asarray(grad_x), want_x, atol=2e-4)
    chex.assert_trees_all_close(np.asarray(grad_p["queries"]), want_q, atol=2e-4)


def test_token_learner_matches_float64_reference_and_is_permutation_invariant():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((2, 6, 8)).astype(np.float32)
    learner = TokenLearner(num_tokens=3, bottleneck_dim=5)
    params = _randomised(nn.unbox(jax.jit(learner.init)(jax.random.key(1), x)["params"]), rng)
    apply = jax.jit(lambda p, x: learner.apply({"params": p}, x))
    y = apply(params, x)
    assert y.shape == (2, 3, 8)
    chex.assert_trees_all_close(np.asarray(y), _token_learner_reference(params, x), atol=1e-5)
    order = rng.permutation(6)
    chex.assert_trees_all_close(np.asarray(apply(params, x[:, order])), np.asarray(y), atol=1e-5)


def test_merger_is_permutation_invariant_and_ignores_masked_tokens():
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 7, 4)).astype(np.float32)
    mask = np.ones((3, 7), bool)
    mask[0, 4:] = False
    mask[1, 0] = False
    mask[2, :] = False  # nothing to merge: zero weights, zero output
    merger = LearnedTokenMerger(num_tokens=2)
    variables = jax.jit(merger.init)(jax.random.key(3), x)

    @jax.jit
    def run(x, mask):
        y, state = merger.apply(variables, x, mask=mask, mutable=["intermediates"])
        return y, state["intermediates"]["merge_weights"][0]

    y, weights = run(x, mask)
    weights = np.asarray(weights)
    np.testing.assert_array_equal(weights[~np.broadcast_to(mask[:, None], weights.shape)], 0.0)
    np.testing.assert_allclose(weights[:2].sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(y[2]), 0.0)
    # Padded tokens change nothing: the first example equals the merge of its 4 real tokens.
    y_short, _ = run(x[:1, :4], mask[:1, :4])
    np.testing.assert_allclose(np.asarray(y[0]), np.asarray(y_short[0]), atol=1e-6)
    # Permuting the tokens (and the mask with them) gives the same output.
    order = rng.permutation(7)
    y_perm, _ = run(x[:, order], mask[:, order])
    np.testing.assert_allclose(np.asarray(y_perm), np.asarray(y), atol=1e-5)
    # No gradient reaches padded tokens, and none is NaN.
    grad = jax.jit(jax.grad(lambda v: jnp.sum(run(v, mask)[0] ** 2)))(x)
    assert np.all(np.isfinite(np.asarray(grad)))
    np.testing.assert_array_equal(np.asarray(grad)[~mask], 0.0)


def test_merge_tokens_and_modules_reject_bad_input():
    x = jnp.ones((2, 5, 4))
    with pytest.raises(ValueError, match="num_tokens=0"):
        LearnedTokenMerger(num_tokens=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="num_tokens=0"):
        TokenLearner(num_tokens=0).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match=r"tokens.shape=\(5, 4\)"):
        LearnedTokenMerger(num_tokens=2).init(jax.random.key(0), x[0])
    with pytest.raises(ValueError, match=r"mask \(shape \(2, 4\)"):
        merge_tokens(jnp.ones((2, 3, 5)), x, jnp.ones((2, 4), bool))
    with pytest.raises(ValueError, match=r"scores.shape=\(2, 3, 4\)"):
        merge_tokens(jnp.ones((2, 3, 4)), x)


def test_vit_with_a_merger_mid_network():
    rng = np.random.default_rng(4)
    images = rng.standard_normal((3, 8, 8)).astype(np.float32)
    patches = np.asarray(patchify(images, 2))
    assert patches.shape == (3, 16, 4)
    np.testing.assert_array_equal(patches[1, 5], images[1, 2:4, 2:4].reshape(-1))  # row 1, col 1
    model = ViT(
        patch_size=2,
        num_layers=2,
        d_model=16,
        num_heads=2,
        mlp_hidden=32,
        num_classes=10,
        merger=functools.partial(LearnedTokenMerger, num_tokens=4),
        merge_after=1,
    )

    @jax.jit
    def run(images):
        variables = model.init(jax.random.key(0), images)
        logits, state = model.apply(variables, images, mutable=["intermediates"])
        return logits, state["intermediates"]["merger"]["merge_weights"][0], variables

    logits, weights, variables = run(images)
    assert logits.shape == (3, 10) and weights.shape == (3, 4, 16)
    assert set(variables["params"]) >= {"block_0", "merger", "block_1", "head"}
    with pytest.raises(ValueError, match="patch_size=3"):
        patchify(images, 3)
    with pytest.raises(ValueError, match="merge_after=3"):
        model.clone(merge_after=3).init(jax.random.key(0), images)
