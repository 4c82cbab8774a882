"""Properties of ``efflax.optim`` and ``efflax.pruning``: the trajectory term, SAF/MESA/SAM
hyperparameters, sharpness on a quadratic, ProxSkip's period, the cyclic schedule, the
Lagrangian controller and hard-concrete gates."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _hyp import FEW
from _hyp import INVALID
from _hyp import VALID
from _hyp import assert_close
from _hyp import bad_floats
from _hyp import bad_ints
from _hyp import bad_keys
from _hyp import bad_positive
from _hyp import bad_probabilities
from _hyp import f64
from _hyp import normal
from _hyp import refused
from _hyp import seeds
from _hyp import softmax64
from hypothesis import given
from hypothesis import strategies as st

from efflax import optim as O
from efflax import pruning as P


# --- the trajectory term (SAF and MESA) --------------------------------------------------------
@VALID
@given(seeds, st.floats(0.5, 10.0), st.sampled_from([jnp.float32, jnp.bfloat16]))
def test_trajectory_loss_is_the_tempered_kl(seed, temperature, dtype):
    logits = jnp.asarray(normal(seed, (5, 4), 3.0), dtype)
    target = jnp.asarray(normal(seed + 1, (5, 4), 3.0), dtype)
    p = softmax64(f64(target) / temperature)
    q = softmax64(f64(logits) / temperature)
    expected = np.mean(np.sum(p * (np.log(p) - np.log(q)), -1)) * temperature**2
    got = O.trajectory_loss(logits, target, temperature=temperature)
    assert_close(got, expected, rtol=1e-4, atol=1e-6)
    # The gradient flows through the current logits only.
    grad = jax.grad(lambda t: O.trajectory_loss(logits, t, temperature=temperature))(target)
    assert not np.any(np.asarray(grad, np.float32))


@INVALID
@given(st.data())
def test_saf_and_mesa_refuse_bad_hyperparameters(data):
    kind = data.draw(st.sampled_from(["saf", "mesa", "trajectory"]))
    name = data.draw(
        st.sampled_from(
            {
                "saf": ["num_examples", "num_classes", "steps_per_epoch", "lag", "lam",
                        "temperature", "start_epoch"],
                "mesa": ["steps_per_epoch", "decay", "lam", "temperature"],
                "trajectory": ["temperature", "shape"],
            }[kind]
        )
    )  # fmt: skip
    if kind == "trajectory":
        if name == "shape":
            refused(lambda: O.trajectory_loss(jnp.zeros((2, 3)), jnp.zeros((2, 4))), "shape")
            return
        bad = data.draw(bad_positive())
        refused(
            lambda: O.trajectory_loss(jnp.zeros((2, 3)), jnp.zeros((2, 3)), temperature=bad),
            "temperature",
        )
        return
    if name in ("lam",):
        bad = data.draw(bad_positive(allow_zero=True))
    elif name == "temperature":
        bad = data.draw(bad_positive())
    elif name == "decay":
        bad = data.draw(bad_probabilities())
    elif name == "start_epoch":
        bad = data.draw(st.sampled_from([-2, 0, 1, 2.5, True, "5", None]))  # lag=3: >= 2
    else:
        bad = data.draw(bad_ints(1))
    if kind == "saf":
        kwargs = {"num_examples": 100, "num_classes": 10, "steps_per_epoch": 5}
        kwargs[name] = bad
        refused(lambda: O.SAF(**kwargs), name)
    else:
        refused(lambda: O.MESA(**{"steps_per_epoch": 5, name: bad}), name)


@FEW
@given(seeds, st.integers(1, 4), st.integers(0, 3), st.integers(1, 3))
def test_saf_term_is_on_strictly_between_its_epochs(seed, lag, extra_start, length):
    start = lag - 1 + extra_start
    end = start + 1 + length
    saf = O.SAF(8, 3, steps_per_epoch=2, lag=lag, start_epoch=start, end_epoch=end)
    for step in range(2 * (end + 2)):
        epoch = step // 2
        assert bool(saf.term_on(step)) == (start < epoch < end), (step, start, end)


@INVALID
@given(st.data())
def test_sam_refuses_bad_rho_and_sync_period(data):
    name = data.draw(st.sampled_from(["rho", "sync_period"]))
    bad = data.draw(bad_positive() if name == "rho" else bad_ints(1))
    kwargs = {name: bad}
    refused(lambda: O.sam(optax.sgd(0.1), **kwargs), name)


# --- sharpness on a quadratic --------------------------------------------------------------------
@FEW
@given(seeds, st.integers(2, 6))
def test_sharpness_of_a_quadratic_is_its_top_eigenvalue(seed, dim):
    a = normal(seed, (dim, dim))
    h = a @ a.T + np.eye(dim, dtype=np.float32)  # symmetric positive definite

    def loss(p):
        return 0.5 * p["w"] @ jnp.asarray(h) @ p["w"]

    params = {"w": jnp.asarray(normal(seed + 1, (dim,)))}
    got = O.sharpness(loss, params, num_steps=dim, key=jax.random.key(seed))
    assert_close(got, np.linalg.eigvalsh(f64(h))[-1], rtol=1e-3, atol=1e-4)
    vector = {"w": jnp.asarray(normal(seed + 2, (dim,)))}
    assert_close(O.hvp(loss, params, vector)["w"], f64(h) @ f64(vector["w"]), rtol=1e-4)


@INVALID
@given(st.data())
def test_sharpness_refuses_bad_arguments(data):
    params = {"w": jnp.ones(3)}

    def loss(p):
        return jnp.sum(p["w"] ** 2)

    case = data.draw(st.sampled_from(["key", "num_steps", "int_params", "vector", "loss"]))
    if case == "key":
        bad = data.draw(bad_keys())
        refused(lambda: O.sharpness(loss, params, key=bad), "key")
    elif case == "num_steps":
        bad = data.draw(bad_ints(1))
        refused(
            lambda: O.sharpness(loss, params, num_steps=bad, key=jax.random.key(0)), "num_steps"
        )
    elif case == "int_params":
        refused(
            lambda: O.sharpness(
                lambda p: jnp.sum(p["w"]), {"w": jnp.ones(3, jnp.int32)}, key=jax.random.key(0)
            ),
            "params",
        )
    elif case == "vector":
        refused(lambda: O.hvp(loss, params, {"w": jnp.ones(4)}), "vector")
    else:
        refused(lambda: O.hvp(lambda p: p["w"] ** 2, params, params), "loss")


# --- ProxSkip and schedules ---------------------------------------------------------------------
@VALID
@given(st.floats(1e-3, 1.0))
def test_communication_period_is_the_rounded_inverse(probability):
    assert O.communication_period(probability) == max(1, round(1.0 / probability))


@INVALID
@given(bad_probabilities(allow_zero=False))
def test_communication_period_refuses(bad):
    refused(lambda: O.communication_period(bad), "probability")


@VALID
@given(st.floats(1e-3, 1.0), st.integers(2, 20), st.integers(1, 4), st.integers(0, 5))
def test_cyclic_schedule_restarts_at_each_cycle_end(peak, first, cycles, warmup):
    schedule = O.exponential_cyclic_cosine_schedule(
        peak, first, num_cycles=cycles, warmup_steps=warmup
    )
    ends = O.cycle_end_steps(first, num_cycles=cycles, warmup_steps=warmup)
    assert len(ends) == cycles and all(b > a for a, b in zip(ends, ends[1:], strict=False))
    for end in ends[:-1]:  # the step after a cycle ends is a restart at the peak
        assert math.isclose(float(schedule(end)), peak, rel_tol=1e-5)
    values = np.asarray([float(schedule(t)) for t in range(ends[-1] + 1)])
    assert np.all(values >= -1e-7) and np.all(values <= peak * (1 + 1e-6))


@INVALID
@given(st.data())
def test_cyclic_schedule_refuses(data):
    name = data.draw(st.sampled_from(["peak_value", "first_cycle_steps", "num_cycles"]))
    kwargs = {"peak_value": 0.1, "first_cycle_steps": 10, "num_cycles": 3}
    kwargs[name] = data.draw(bad_positive() if name == "peak_value" else bad_ints(1))
    refused(lambda: O.exponential_cyclic_cosine_schedule(**kwargs), name)


# --- the Lagrangian controller ------------------------------------------------------------------
@VALID
@given(
    st.floats(0.05, 0.95), st.integers(0, 50), st.integers(0, 100), st.floats(0.0, 1.0),
    st.floats(-5, 5), st.floats(-5, 5),
)  # fmt: skip
def test_lagrangian_penalty_is_the_signed_quadratic(target, warmup, step, sparsity, l1, l2):
    controller = O.LagrangianSparsity(target, warmup_steps=warmup)
    t = target if warmup == 0 else target * min(1.0, step / warmup)
    loss, got_t = controller.penalty(
        sparsity, {"lambda_1": jnp.float32(l1), "lambda_2": jnp.float32(l2)}, step
    )
    assert_close(got_t, t, rtol=1e-5, atol=1e-6)
    assert_close(loss, l1 * (sparsity - t) + l2 * (sparsity - t) ** 2, rtol=1e-4, atol=1e-5)


@INVALID
@given(st.data())
def test_lagrangian_refuses(data):
    name = data.draw(st.sampled_from(["target", "warmup_steps", "start"]))
    kwargs = {"target": 0.5}
    if name == "target":
        kwargs[name] = data.draw(bad_probabilities(allow_one=False))
    elif name == "warmup_steps":
        kwargs[name] = data.draw(bad_ints(0))
    else:
        kwargs[name] = data.draw(st.sampled_from([0.7, -0.1, 1.0, math.nan, "0.1"]))
    refused(lambda: O.LagrangianSparsity(**kwargs), name)


# --- hard-concrete gates ------------------------------------------------------------------------
@VALID
@given(seeds, st.floats(0.2, 1.5))
def test_hard_concrete_probability_is_the_closed_form(seed, temperature):
    gate = P.HardConcreteMask(shape=(7,), temperature=temperature)
    log_alpha = jnp.asarray(normal(seed, (7,), 3.0))
    expected = 1 / (1 + np.exp(-(f64(log_alpha) - temperature * np.log(0.1 / 1.1))))
    assert_close(gate.prob_nonzero(log_alpha), np.clip(expected, 1e-6, 1 - 1e-6), rtol=1e-5)
    z = gate.sample(log_alpha, jax.random.key(seed))
    assert z.shape == (7,) and np.all((np.asarray(z) >= 0) & (np.asarray(z) <= 1))
    assert_close(gate.expected_l0(log_alpha), np.sum(np.clip(expected, 1e-6, 1 - 1e-6)), rtol=1e-5)


@INVALID
@given(st.data())
def test_hard_concrete_refuses(data):
    name = data.draw(
        st.sampled_from(["shape", "temperature", "limit_low", "limit_high", "init_std", "epsilon"])
    )
    if name == "shape":
        bad = data.draw(st.sampled_from([3, (0,), (2, -1), (2.5,), "x", None]))
    elif name in ("temperature",):
        bad = data.draw(bad_positive())
    elif name == "init_std":
        bad = data.draw(bad_positive(allow_zero=True))
    elif name == "epsilon":
        bad = data.draw(bad_probabilities(allow_zero=False, allow_one=False))
    elif name == "limit_low":
        bad = data.draw(st.sampled_from([0.0, 0.1, *[v for v in (math.nan, math.inf)]]))
    else:
        bad = data.draw(st.sampled_from([1.0, 0.5, math.nan, math.inf]))
    refused(lambda: P.HardConcreteMask(**{name: bad}), name)


@INVALID
@given(st.data())
def test_mask_axis_refuses_bad_axes_and_gate_shapes(data):
    x = jnp.ones((3, 4))
    case = data.draw(st.sampled_from(["axis", "shape", "float_axis"]))
    if case == "axis":
        axis = data.draw(st.sampled_from([2, -3, 5]))
        refused(lambda: P.mask_axis(x, jnp.ones(4), axis), "axis")
    elif case == "shape":
        refused(lambda: P.mask_axis(x, jnp.ones(3), 1), "z", "shape")
    else:
        bad = data.draw(bad_floats())
        refused(lambda: P.mask_axis(x, jnp.ones(4), bad), "axis")
