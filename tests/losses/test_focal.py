"""Focal and cyclical focal losses against the official formula written out in float64 NumPy."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflax.losses import cyclical_focal_loss
from efflax.losses import cyclical_focal_schedule
from efflax.losses import focal_loss


def _official_xi(epoch, num_epochs, factor):
    # Cyclical_FocalLoss.forward, lnsmith54/CFL.
    if factor * epoch < num_epochs:
        return 1 - factor * epoch / (num_epochs - 1)
    if factor == 1.0:
        return 0.0
    return (factor * epoch / (num_epochs - 1) - 1.0) / (factor - 1.0)


def _reference(logits, labels, xi, gamma_pos, gamma_neg, gamma_hc, eps):
    z = np.asarray(logits, np.float64)
    lp = z - z.max(-1, keepdims=True)
    lp = lp - np.log(np.exp(lp).sum(-1, keepdims=True))
    p = np.exp(lp)
    rows = np.arange(len(labels))
    y = np.zeros_like(z)
    y[rows, np.asarray(labels)] = 1.0
    w_focal = np.where(y > 0, (1 - p) ** gamma_pos, p**gamma_neg)
    w_hc = np.where(y > 0, (1 + p) ** gamma_hc, 1.0)
    ytilde = y * (1 - eps) + eps / z.shape[1]
    return -np.mean(np.sum(ytilde * lp * ((1 - xi) * w_focal + xi * w_hc), -1))


def _numeric_grad(f, x, h=1e-6):
    x = np.asarray(x, np.float64)
    grad = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
        step = np.zeros_like(x)
        step[idx] = h
        grad[idx] = (f(x + step) - f(x - step)) / (2 * h)
    return grad


@pytest.mark.parametrize(
    "num_epochs, factor", [(200, 4.0), (200, 2.0), (10, 1.0), (11, 4.0), (7, 3.0)]
)
def test_schedule_matches_the_official_formula(num_epochs, factor):
    epochs = np.arange(num_epochs)
    got = jax.jit(lambda e: cyclical_focal_schedule(e, num_epochs=num_epochs, factor=factor))(
        jnp.asarray(epochs)
    )
    want = [_official_xi(e, num_epochs, factor) for e in epochs]
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-6)
    if factor > 1:
        assert float(got[0]) == 1.0 and abs(float(got[-1]) - 1.0) < 1e-6


def test_cyclical_focal_loss_values_gradients_and_one_compilation():
    rng = np.random.default_rng(0)
    logits = 3.0 * rng.standard_normal((6, 5)).astype(np.float32)
    labels = rng.integers(0, 5, 6).astype(np.int32)
    num_epochs, hyper = 12, dict(gamma_pos=2.0, gamma_neg=1.5, gamma_hc=3.0)
    traces = []

    @jax.jit
    def value_and_grad(z, epoch):
        traces.append(None)
        return jax.value_and_grad(cyclical_focal_loss)(
            z, labels, epoch, num_epochs=num_epochs, factor=4.0, label_smoothing=0.1, **hyper
        )

    for epoch in (0, 2, 5, 11):
        xi = _official_xi(epoch, num_epochs, 4.0)
        value, grad = value_and_grad(logits, epoch)
        ref = _reference(logits, labels, xi, 2.0, 1.5, 3.0, 0.1)
        chex.assert_trees_all_close(float(value), ref, rtol=1e-5)
        want_grad = _numeric_grad(lambda z: _reference(z, labels, xi, 2.0, 1.5, 3.0, 0.1), logits)
        chex.assert_trees_all_close(np.asarray(grad), want_grad, atol=1e-5)
    assert len(traces) == 1  # the epoch is traced: no recompilation per epoch


def test_focal_loss_reduces_to_lin_et_al_and_cross_entropy():
    logits = np.random.default_rng(3).standard_normal((5, 4)).astype(np.float32) * 2
    labels = np.array([0, 3, 1, 1, 2], np.int32)
    z = logits.astype(np.float64)
    p_y = (np.exp(z) / np.exp(z).sum(-1, keepdims=True))[np.arange(5), labels]
    lin = -np.mean((1 - p_y) ** 2 * np.log(p_y))
    focal = jax.jit(focal_loss, static_argnames=("gamma", "label_smoothing"))
    chex.assert_trees_all_close(float(focal(logits, labels, gamma=2.0)), lin, rtol=1e-5)
    ce = -np.mean(np.log(p_y))
    chex.assert_trees_all_close(float(focal(logits, labels, gamma=0.0)), ce, rtol=1e-5)
    # With smoothing, focal is the cyclical loss at xi = 0 with gamma_pos = gamma_neg.
    ref = _reference(logits, labels, 0.0, 2.0, 2.0, 3.0, 0.1)
    chex.assert_trees_all_close(
        float(focal(logits, labels, gamma=2.0, label_smoothing=0.1)), ref, rtol=1e-5
    )
    # A saturated softmax (p exactly 0 or 1) keeps finite gradients for gamma < 1 too.
    saturated = np.array([[100.0, 0.0, -100.0, 0.0]], np.float32)
    grad_fn = jax.jit(jax.grad(focal_loss), static_argnames=("gamma", "label_smoothing"))
    for gamma in (0.0, 0.5):
        grad = grad_fn(saturated, np.array([0]), gamma=gamma, label_smoothing=0.1)
        assert np.all(np.isfinite(np.asarray(grad)))


def test_focal_losses_reject_bad_input():
    logits, labels = jnp.zeros((3, 4)), jnp.array([0, 1, 2])
    with pytest.raises(ValueError, match="num_epochs=1"):
        cyclical_focal_loss(logits, labels, 0, num_epochs=1)
    with pytest.raises(ValueError, match="factor=0.5"):
        cyclical_focal_schedule(0, num_epochs=10, factor=0.5)
    with pytest.raises(ValueError, match="gamma_hc=-1"):
        cyclical_focal_loss(logits, labels, 0, num_epochs=10, gamma_hc=-1)
    with pytest.raises(ValueError, match="gamma=-2"):
        focal_loss(logits, labels, gamma=-2)
    with pytest.raises(ValueError, match=r"labels \(shape \(3, 4\)"):
        focal_loss(logits, jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="label_smoothing=1.0"):
        focal_loss(logits, labels, label_smoothing=1.0)
