"""The Lagrangian sparsity controller: target warm-up, penalty, ascent on the multipliers."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from efflax.optim import LagrangianSparsity
from efflax.optim import gradient_ascent
from efflax.optim import project_to_box


def test_target_warms_up_linearly():
    controller = LagrangianSparsity(target=0.8, warmup_steps=100, start=0.2)
    targets = [float(controller.target_at(s)) for s in (0, 50, 100, 500)]
    np.testing.assert_allclose(targets, [0.2, 0.5, 0.8, 0.8], rtol=1e-6)
    assert float(LagrangianSparsity(target=0.8).target_at(0)) == pytest.approx(0.8)


def test_penalty_and_ascent_close_the_gap():
    controller = LagrangianSparsity(target=0.5)
    multipliers = {"lambda_1": jnp.asarray(0.3), "lambda_2": jnp.asarray(2.0)}
    loss, target = controller(jnp.asarray(0.2), multipliers, step=7)
    assert float(target) == pytest.approx(0.5)
    assert float(loss) == pytest.approx(0.3 * -0.3 + 2.0 * 0.09, rel=1e-6)
    # d/d lambda = (s - t, (s - t)^2); ascent moves lambda_1 down while s < t, so the penalty's
    # slope in s (lambda_1 + 2 lambda_2 (s - t)) turns negative and descent raises s.
    grads = jax.grad(lambda m: controller(jnp.asarray(0.2), m, 0)[0])(multipliers)
    tx = gradient_ascent(optax.sgd(0.1))
    updates, _ = tx.update(grads, tx.init(multipliers), multipliers)
    new = optax.apply_updates(multipliers, updates)
    assert float(new["lambda_1"]) == pytest.approx(0.3 + 0.1 * -0.3, rel=1e-6)
    assert float(new["lambda_2"]) == pytest.approx(2.0 + 0.1 * 0.09, rel=1e-6)

    # A scalar "sparsity" descending on the penalty while the multipliers ascend reaches t.
    descent, ascent = optax.adam(0.05), gradient_ascent(optax.adam(0.05))

    def body(carry, step):
        s, lam, s_state, lam_state = carry
        gs, gl = jax.grad(lambda s, m: controller(s, m, step)[0], argnums=(0, 1))(s, lam)
        u, s_state = descent.update(gs, s_state, s)
        v, lam_state = ascent.update(gl, lam_state, lam)
        return (optax.apply_updates(s, u), optax.apply_updates(lam, v), s_state, lam_state), None

    s, lam = jnp.asarray(0.0), controller.init()
    carry = (s, lam, descent.init(s), ascent.init(lam))
    (s, *_), _ = jax.jit(lambda c: jax.lax.scan(body, c, jnp.arange(600)))(carry)
    assert abs(float(s) - 0.5) < 0.02


def test_project_to_box_lands_inside():
    tx = project_to_box(-1.0, 2.0)
    params = {"a": jnp.array([0.0, 1.5, -0.5])}
    updates = {"a": jnp.array([-3.0, 1.0, 0.25])}
    new_updates, state = tx.update(updates, tx.init(params), params)
    np.testing.assert_allclose(optax.apply_updates(params, new_updates)["a"], [-1.0, 2.0, -0.25])
    assert int(state.count) == 1
    with pytest.raises(ValueError, match="needs params"):
        tx.update(updates, tx.init(params))


def test_traced_targets_vmap():
    sweep = jax.vmap(lambda t: LagrangianSparsity(t, warmup_steps=10).target_at(5))
    np.testing.assert_allclose(sweep(jnp.array([0.5, 0.9])), [0.25, 0.45], rtol=1e-6)


def test_bad_input_names_the_value():
    for target in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match=f"target={target}"):
            LagrangianSparsity(target=target)
    with pytest.raises(ValueError, match="warmup_steps=-1"):
        LagrangianSparsity(target=0.5, warmup_steps=-1)
    with pytest.raises(ValueError, match="start=0.7"):
        LagrangianSparsity(target=0.5, start=0.7)
    with pytest.raises(ValueError, match="lower=2.0"):
        project_to_box(2.0, 1.0)
    with pytest.raises(ValueError, match="multipliers="):
        LagrangianSparsity(target=0.5).penalty(0.1, {"lambda": 0.0}, 0)
