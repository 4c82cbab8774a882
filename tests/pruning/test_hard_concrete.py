"""Hard-concrete gates against their closed forms and the official CoFi code's formulas."""

import math

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflax.pruning import HardConcreteMask
from efflax.pruning import mask_axis

BETA = 2.0 / 3.0


def _official_prob_nonzero(log_alpha):
    """``1 - cdf_qz(0, loga)`` as written in CoFiPruning/models/l0_module.py."""
    xn = (0 - (-0.1)) / (1.1 - (-0.1))
    logits = math.log(xn) - math.log(1 - xn)
    cdf = np.clip(1 / (1 + np.exp(-(logits * BETA - log_alpha))), 1e-6, 1 - 1e-6)
    return 1 - cdf


def test_sampling_statistics_match_closed_form():
    values = np.array([-4.0, -2.0, -1.0, 0.0, 1.0, 2.0, 4.0], np.float32)
    samples = 20_000
    gate = HardConcreteMask(shape=(values.size, samples))
    log_alpha = jnp.broadcast_to(jnp.asarray(values)[:, None], gate.shape)
    z = np.asarray(gate.sample(log_alpha, jax.random.key(0)))
    assert z.min() >= 0.0 and z.max() <= 1.0
    nonzero = (z != 0).mean(axis=1)
    p = np.asarray(gate.prob_nonzero(log_alpha))[:, 0]
    np.testing.assert_allclose(p, _official_prob_nonzero(values), rtol=1e-5)
    # P(z != 0) = sigmoid(log_alpha - beta log(-l / r)); P(z == 1) = sigmoid(log_alpha - beta log((1 - l) / (r - 1)))
    np.testing.assert_allclose(
        p, 1 / (1 + np.exp(-(values - BETA * math.log(0.1 / 1.1)))), rtol=1e-5
    )
    p_one = 1 / (1 + np.exp(-(values - BETA * math.log(1.1 / 0.1))))
    tolerance = 4.5 * np.sqrt(p * (1 - p) / samples) + 1e-4
    np.testing.assert_array_less(np.abs(nonzero - p), tolerance)
    one = (z == 1).mean(axis=1)
    np.testing.assert_array_less(
        np.abs(one - p_one), 4.5 * np.sqrt(p_one * (1 - p_one) / samples) + 1e-4
    )
    assert gate.expected_l0(log_alpha[:, :1].repeat(samples, 1)) == pytest.approx(
        p.sum() * samples, rel=1e-5
    )


def test_expected_l0_gradient_is_p_times_one_minus_p():
    gate = HardConcreteMask(shape=(5,))
    log_alpha = jnp.array([-3.0, -1.0, 0.0, 1.5, 3.0])
    p = gate.prob_nonzero(log_alpha)
    chex.assert_trees_all_close(jax.grad(gate.expected_l0)(log_alpha), p * (1 - p), rtol=1e-5)


def test_init_clamp_and_flax_initializer():
    gate = HardConcreteMask(shape=(4000,))
    log_alpha = gate.init(jax.random.key(1))
    assert abs(float(log_alpha.mean()) - 10.0) < 1e-3 and abs(float(log_alpha.std()) - 0.01) < 1e-3
    # CoFi clamps after every step, so the 10 becomes log(100) after the first one.
    assert float(gate.clamp(log_alpha).max()) == pytest.approx(math.log(100.0))
    assert float(gate.clamp(-log_alpha).min()) == pytest.approx(math.log(0.01))
    units = HardConcreteMask.from_droprate((4000,), 0.5)
    assert abs(float(units.init(jax.random.key(2)).mean())) < 1e-3

    class Gated(nn.Module):  # a gate inside a user's module, on axis 0 of its own parameter
        @nn.compact
        def __call__(self, x, key):
            kernel = self.param("kernel", nn.initializers.normal(), (3, 2))
            gate = HardConcreteMask(shape=(3,))
            z = gate.sample(self.param("log_alpha", gate.init), key)
            return x @ mask_axis(kernel, z, axis=0)

    variables = jax.jit(Gated().init)(jax.random.key(0), jnp.ones((1, 3)), jax.random.key(1))
    assert variables["params"]["log_alpha"].shape == (3,)


def _official_deterministic(log_alpha):
    size = log_alpha.size
    zeros = round(size - float(_official_prob_nonzero(log_alpha).sum()))
    soft = 1 / (1 + np.exp(-(log_alpha / BETA * 0.8)))
    if zeros > 0:
        if soft.ndim == 0:
            return np.zeros(())
        soft = soft.copy()
        soft[np.argsort(soft, kind="stable")[:zeros]] = 0.0
    return soft


@pytest.mark.parametrize("shape", [(), (7,), (33,)])
def test_deterministic_mask_matches_official(shape):
    gate = HardConcreteMask(shape=shape)
    for seed in range(4):
        log_alpha = np.asarray(jax.random.normal(jax.random.key(seed), shape)) * 3 - 0.5
        z = np.asarray(gate.deterministic(jnp.asarray(log_alpha)))
        np.testing.assert_allclose(z, _official_deterministic(log_alpha), rtol=1e-5, atol=1e-7)
    # Under jit too (the number of zeros is traced).
    log_alpha = jnp.linspace(-4, 4, math.prod(shape) or 1).reshape(shape)
    chex.assert_trees_all_close(
        jax.jit(gate.deterministic)(log_alpha), gate.deterministic(log_alpha)
    )


def test_mask_axis_scales_the_named_axes():
    x = jax.random.normal(jax.random.key(0), (2, 3, 4))
    z = jnp.array([0.0, 0.5, 1.0])
    chex.assert_trees_all_close(mask_axis(x, z, 1), x * z[None, :, None])
    chex.assert_trees_all_close(mask_axis(x, z, -2), x * z[None, :, None])
    zz = jax.random.uniform(jax.random.key(1), (4, 2))
    chex.assert_trees_all_close(mask_axis(x, zz, (2, 0)), x * zz.T[:, None, :])


def test_bad_input_names_the_value():
    with pytest.raises(ValueError, match="axis=3"):
        mask_axis(jnp.ones((2, 3)), jnp.ones(3), 3)
    with pytest.raises(ValueError, match=r"z.shape=\(2,\)"):
        mask_axis(jnp.ones((2, 3)), jnp.ones(2), 1)
    with pytest.raises(ValueError, match="temperature=0"):
        HardConcreteMask(shape=(2,), temperature=0)
    with pytest.raises(ValueError, match="limit_low=0.1"):
        HardConcreteMask(limit_low=0.1)
    with pytest.raises(ValueError, match="droprate=1.0"):
        HardConcreteMask.from_droprate((2,), 1.0)
    with pytest.raises(ValueError, match="shape=0"):
        HardConcreteMask(shape=(0,))
    with pytest.raises(ValueError, match=r"log_alpha.shape=\(3,\)"):
        HardConcreteMask(shape=(2,)).sample(jnp.zeros(3), jax.random.key(0))
    with pytest.raises(ValueError, match="key=None"):
        HardConcreteMask(shape=(2,))(jnp.zeros(2))
