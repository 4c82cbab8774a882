"""Tests for efflax.optim (sharpness) against explicitly built matrices (numpy eigh)."""

from __future__ import annotations

from typing import Any
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.flatten_util import ravel_pytree

from efflax.nn import MoEFeedForward
from efflax.nn import MonarchDense
from efflax.nn import MultiHeadAttention
from efflax.optim import SharpnessProbe
from efflax.optim import adam_preconditioner
from efflax.optim import adam_stability_threshold
from efflax.optim import gd_stability_threshold
from efflax.optim import hvp
from efflax.optim import lanczos
from efflax.optim import power_iteration
from efflax.optim import preconditioned_sharpness
from efflax.optim import sharpness
from efflax.training import TrainState
from efflax.training import fit
from efflax.training import make_train_step
from pallas_kernels.attention import ATTENTION_OP
from pallas_kernels.attention import PallasTritonAttention
from pallas_kernels.monarch import MONARCH_OP
from pallas_kernels.monarch import XlaMonarch

RTOL = 1e-4


def _symmetric_with_spectrum(rng: np.random.Generator, spectrum: np.ndarray) -> np.ndarray:
    q, _ = np.linalg.qr(rng.normal(size=(spectrum.size, spectrum.size)))
    matrix = (q * spectrum) @ q.T
    return (matrix + matrix.T) / 2


def _params_like(rng: np.random.Generator) -> dict:
    # An awkward pytree: a vector, a matrix and a scalar (31 elements in all).
    return {
        "bias": jnp.asarray(rng.normal(size=(6,)), jnp.float32),
        "kernel": jnp.asarray(rng.normal(size=(4, 6)), jnp.float32),
        "scale": jnp.asarray(rng.normal(), jnp.float32),
    }


def _matrix_operator(matrix: np.ndarray, params_like: Any):
    _, unravel = ravel_pytree(params_like)
    operator = jnp.asarray(matrix, jnp.float32)
    return lambda v: unravel(operator @ ravel_pytree(v)[0])


# A tiny MLP whose full Hessian is cheap to build with jax.hessian.
def _mlp_params(key: jax.Array, sizes=(3, 5, 2)) -> dict:
    params = {}
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        key, k1, k2 = jax.random.split(key, 3)
        params[f"layer{i}"] = {
            "w": jax.random.normal(k1, (fan_in, fan_out)) / np.sqrt(fan_in),
            "b": 0.1 * jax.random.normal(k2, (fan_out,)),
        }
    return params


def _mlp_loss(params: dict, x: jax.Array, y: jax.Array) -> jax.Array:
    h = x
    for i in range(len(params)):
        h = h @ params[f"layer{i}"]["w"] + params[f"layer{i}"]["b"]
        if i < len(params) - 1:
            h = jnp.tanh(h)
    return 0.5 * jnp.mean(jnp.sum((h - y) ** 2, axis=-1))


def _full_hessian(loss, params) -> np.ndarray:
    """Dense Hessian of ``loss`` in the flattened parameters, float64, symmetrised."""
    flat, unravel = ravel_pytree(params)
    # jit: the eager jax.hessian of even this tiny MLP takes seconds of op-by-op dispatch.
    hessian = np.asarray(jax.jit(jax.hessian(lambda f: loss(unravel(f))))(flat), np.float64)
    return (hessian + hessian.T) / 2


@pytest.fixture(scope="module")
def mlp_problem():
    key = jax.random.key(42)
    kp, kx, ky = jax.random.split(key, 3)
    params = _mlp_params(kp)
    x = jax.random.normal(kx, (16, 3))
    y = jax.nn.one_hot(jax.random.randint(ky, (16,), 0, 2), 2)
    loss = lambda p: _mlp_loss(p, x, y)
    return params, loss, _full_hessian(loss, params)


def test_hvp_matches_full_hessian(mlp_problem):
    params, loss, hessian = mlp_problem
    vector = jax.tree_util.tree_map(
        lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params
    )
    got = ravel_pytree(hvp(loss, params, vector))[0]
    want = hessian @ np.asarray(ravel_pytree(vector)[0], np.float64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("unroll", [None, 1])  # unrolled on CPU by default, and as a loop
@pytest.mark.parametrize("num_steps", [12, 31, 50])
def test_lanczos_known_spectrum(num_steps, unroll):
    rng = np.random.default_rng(num_steps)
    params = _params_like(rng)
    spectrum = rng.uniform(-4.0, 6.0, size=31)
    spectrum[:3] = [10.0, 8.5, 7.0]  # a clear top three, a negative tail
    matrix = _symmetric_with_spectrum(rng, spectrum)
    want = np.sort(np.linalg.eigvalsh(matrix))[::-1]
    num_eigenvalues = 3 if num_steps >= 31 else 1
    got = jax.jit(
        lambda key: lanczos(
            _matrix_operator(matrix, params),
            params,
            num_steps=num_steps,
            key=key,
            num_eigenvalues=num_eigenvalues,
            unroll=unroll,
        )
    )(jax.random.key(0))
    assert got.shape == (num_eigenvalues,)
    np.testing.assert_allclose(got, want[:num_eigenvalues], rtol=RTOL)


def test_lanczos_eigenvectors_and_invariant_subspace():
    rng = np.random.default_rng(1)
    size = 31
    # Rank 3: the Krylov space is exhausted after 4 steps and Lanczos must restart cleanly.
    spectrum = np.zeros(size)
    spectrum[:3] = [5.0, 2.0, -1.0]
    matrix = _symmetric_with_spectrum(rng, spectrum)
    params = _params_like(rng)
    values, vectors = lanczos(
        _matrix_operator(matrix, params),
        params,
        num_steps=10,
        key=jax.random.key(3),
        num_eigenvalues=2,
        return_eigenvectors=True,
    )
    np.testing.assert_allclose(values, [5.0, 2.0], rtol=RTOL)
    chex.assert_trees_all_equal_shapes(
        vectors, jax.tree_util.tree_map(lambda p: jnp.stack([p, p]), params)
    )
    flat = np.asarray(jax.vmap(lambda t: ravel_pytree(t)[0])(vectors), np.float64)
    _, eigvecs = np.linalg.eigh(matrix)
    top = eigvecs[:, np.argsort(np.linalg.eigvalsh(matrix))[::-1][:2]]
    np.testing.assert_allclose(np.abs(np.sum(flat * top.T, axis=1)), [1.0, 1.0], atol=1e-4)
    assert np.all(np.isfinite(flat))


def test_power_iteration_known_spectrum():
    rng = np.random.default_rng(2)
    params = _params_like(rng)
    spectrum = rng.uniform(-3.0, 4.0, size=31)
    spectrum[0] = 9.0
    matrix = _symmetric_with_spectrum(rng, spectrum)
    value, vector = power_iteration(
        _matrix_operator(matrix, params), params, num_steps=100, key=jax.random.key(0)
    )
    np.testing.assert_allclose(value, 9.0, rtol=RTOL)
    flat = np.asarray(ravel_pytree(vector)[0], np.float64)
    np.testing.assert_allclose(abs(flat @ np.linalg.eigh(matrix)[1][:, -1]), 1.0, atol=1e-4)


def test_lanczos_and_power_iteration_on_mlp_hessian(mlp_problem):
    params, loss, hessian = mlp_problem
    eigenvalues = np.linalg.eigvalsh(hessian)
    matvec = lambda v: hvp(loss, params, v)
    top = lanczos(matvec, params, num_steps=hessian.shape[0], key=jax.random.key(1))
    np.testing.assert_allclose(top[0], eigenvalues[-1], rtol=RTOL)
    np.testing.assert_allclose(
        sharpness(loss, params, num_steps=20, key=jax.random.key(2)), eigenvalues[-1], rtol=RTOL
    )
    dominant = eigenvalues[np.argmax(np.abs(eigenvalues))]
    value, _ = power_iteration(matvec, params, num_steps=300, key=jax.random.key(3))
    np.testing.assert_allclose(value, dominant, rtol=RTOL)


def _train(tx: optax.GradientTransformation, params, loss, steps: int = 5):
    def step(carry, _):
        params, state = carry
        updates, state = tx.update(jax.grad(loss)(params), state, params)
        return (optax.apply_updates(params, updates), state), None

    run = jax.jit(lambda p: jax.lax.scan(step, (p, tx.init(p)), length=steps)[0])
    return run(params)


# (optimizer, path to its ScaleByAdamState, b2) for the explicit reference.
_OPTIMIZERS = {
    "adam": (lambda: optax.adam(1e-2, b2=0.999, eps=1e-7), lambda s: s[0], 0.999),
    "adamw": (lambda: optax.adamw(1e-2, b2=0.99, eps=1e-7), lambda s: s[0], 0.99),
    "chain_clip_adam": (
        lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2, b2=0.95, eps=1e-7)),
        lambda s: s[1][0],
        0.95,
    ),
    "inject_hyperparams_adam": (
        lambda: optax.inject_hyperparams(optax.adam)(learning_rate=1e-2, b2=0.9, eps=1e-7),
        lambda s: s.inner_state[0],
        0.9,
    ),
}


@pytest.mark.parametrize("name", sorted(_OPTIMIZERS))
def test_preconditioned_sharpness_matches_explicit(mlp_problem, name):
    params, loss, _ = mlp_problem
    make_tx, adam_path, b2 = _OPTIMIZERS[name]
    eps = 1e-7
    params, state = _train(make_tx(), params, loss)
    adam_state = adam_path(state)
    flat_nu = np.asarray(ravel_pytree(adam_state.nu)[0], np.float64)
    precond = np.sqrt(flat_nu / (1.0 - b2 ** int(adam_state.count))) + eps
    flat, _ = ravel_pytree(params)
    hessian = _full_hessian(loss, params)
    scaled = hessian / np.sqrt(precond)[:, None] / np.sqrt(precond)[None, :]
    want = np.linalg.eigvalsh((scaled + scaled.T) / 2)[-1]

    # inject_hyperparams: b2 is read from the state; the others pass it.
    kwargs = {} if name == "inject_hyperparams_adam" else {"b2": b2}
    got_precond = adam_preconditioner(state, eps=eps, **kwargs)
    np.testing.assert_allclose(ravel_pytree(got_precond)[0], precond, rtol=1e-5)
    got = preconditioned_sharpness(
        loss, params, state, eps=eps, num_steps=flat.size, key=jax.random.key(0), **kwargs
    )
    np.testing.assert_allclose(got, want, rtol=RTOL)


def test_adam_preconditioner_without_bias_correction_and_before_first_step(mlp_problem):
    params, loss, _ = mlp_problem
    tx = optax.adam(1e-2)
    fresh = adam_preconditioner(tx.init(params), eps=1e-3)
    chex.assert_trees_all_close(
        fresh, jax.tree_util.tree_map(lambda p: jnp.full_like(p, 1e-3), params)
    )
    _, state = _train(tx, params, loss, steps=3)
    raw = adam_preconditioner(state, eps=1e-3, bias_correction=False)
    chex.assert_trees_all_close(
        raw, jax.tree_util.tree_map(lambda v: jnp.sqrt(v) + 1e-3, state[0].nu)
    )


def test_no_adam_state_raises_and_lists_types(mlp_problem):
    params, _, _ = mlp_problem
    state = optax.sgd(0.1, momentum=0.9).init(params)
    with pytest.raises(ValueError, match="TraceState"):
        adam_preconditioner(state, eps=1e-8)
    two = (optax.adam(1e-3).init(params), optax.adam(1e-3).init(params))
    with pytest.raises(ValueError, match="2 ScaleByAdamState"):
        adam_preconditioner(two, eps=1e-8)


def test_thresholds_and_validation():
    assert adam_stability_threshold(1e-3, 0.9) == pytest.approx(38_000.0)
    assert adam_stability_threshold(2e-3, 0.0) == pytest.approx(1_000.0)
    assert gd_stability_threshold(0.01) == pytest.approx(200.0)
    assert gd_stability_threshold(0.01, momentum=0.9) == pytest.approx(380.0)
    with pytest.raises(ValueError, match="learning_rate"):
        adam_stability_threshold(0.0, 0.9)
    with pytest.raises(ValueError, match="b1"):
        adam_stability_threshold(1e-3, 1.0)
    with pytest.raises(ValueError, match="momentum"):
        gd_stability_threshold(1e-3, momentum=-0.1)
    with pytest.raises(ValueError, match="num_steps"):
        lanczos(lambda v: v, jnp.ones(3), num_steps=0, key=jax.random.key(0))
    with pytest.raises(ValueError, match="num_eigenvalues"):
        lanczos(lambda v: v, jnp.ones(3), num_steps=5, key=jax.random.key(0), num_eigenvalues=4)
    with pytest.raises(ValueError, match="eps"):
        adam_preconditioner(optax.adam(1e-3).init(jnp.ones(3)), eps=-1.0)
    with pytest.raises(ValueError, match="every"):
        SharpnessProbe(lambda p: jnp.sum(p**2), 0, learning_rate=1e-3, b1=0.9, eps=1e-8)


@pytest.fixture(scope="module")
def frozen_adam_quadratic():
    """A quadratic, an Adam state after 10 steps, its P and top eigenvalue of P^-1/2 H P^-1/2."""
    rng = np.random.default_rng(7)
    size, b1, eps = 12, 0.9, 1e-7
    hessian = jnp.asarray(
        _symmetric_with_spectrum(rng, rng.uniform(0.1, 5.0, size=size)), jnp.float32
    )
    loss = lambda x: 0.5 * x @ hessian @ x
    x0 = jnp.asarray(rng.normal(size=size), jnp.float32)
    _, state = _train(optax.adam(1e-2, b1=b1, eps=eps), x0, loss, steps=10)
    precond = adam_preconditioner(state, eps=eps)
    top = float(
        preconditioned_sharpness(loss, x0, state, eps=eps, num_steps=size, key=jax.random.key(0))
    )
    scaled = np.asarray(hessian, np.float64) / np.sqrt(np.outer(precond, precond))
    np.testing.assert_allclose(top, np.linalg.eigvalsh(scaled)[-1], rtol=RTOL)

    @jax.jit
    def run_momentum(lr):
        def step(carry, _):
            x, m = carry
            m = b1 * m + (1 - b1) * (hessian @ x)
            return (x - lr * m / precond, m), None

        (x, _), _ = jax.lax.scan(step, (x0, jnp.zeros_like(x0)), length=300)
        return jnp.linalg.norm(x) / jnp.linalg.norm(x0)

    return top, b1, run_momentum


@pytest.mark.parametrize("factor, stable", [(0.95, True), (1.05, False)])
def test_adam_momentum_with_frozen_preconditioner_threshold(frozen_adam_quadratic, factor, stable):
    """Quadratic: EMA momentum + frozen P is stable iff max eig(P^-1 H) < (2+2 b1)/((1-b1) lr)."""
    top, b1, run_momentum = frozen_adam_quadratic
    # Learning rate at which the threshold equals the top preconditioned eigenvalue.
    critical_lr = (2 + 2 * b1) / ((1 - b1) * top)
    lr = factor * critical_lr
    assert (top < adam_stability_threshold(lr, b1)) == stable
    ratio = float(run_momentum(jnp.float32(lr)))
    if stable:
        assert ratio < 1.0
    else:
        assert not np.isfinite(ratio) or ratio > 1e6


class _State(NamedTuple):  # the fields of efflax.training.TrainState the probe reads
    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array


def test_sharpness_probe_as_hook_and_standalone(mlp_problem):
    params, _, _ = mlp_problem
    key = jax.random.key(5)
    x = jax.random.normal(key, (16, 3))
    y = jax.nn.one_hot(jax.random.randint(key, (16,), 0, 2), 2)
    batch = {"x": x, "y": y}
    loss_on_batch = lambda p, b: _mlp_loss(p, b["x"], b["y"])
    schedule = optax.linear_schedule(1e-2, 5e-3, transition_steps=10)
    params, opt_state = _train(
        optax.adam(1e-2, eps=1e-7), params, lambda p: loss_on_batch(p, batch)
    )
    probe = SharpnessProbe(
        loss_on_batch, 5, learning_rate=schedule, b1=0.9, eps=1e-7, num_steps=31, batch=batch
    )
    assert probe.every == 5
    state = _State(jnp.asarray(10), params, opt_state, jax.random.key(0))
    record = probe(state)
    for name in ("sharpness", "preconditioned_sharpness", "adam_threshold", "gd_threshold"):
        assert isinstance(record[name], float)
    assert record["adam_threshold"] == pytest.approx(38 / 5e-3, rel=1e-5)
    assert record["gd_threshold"] == pytest.approx(2 / 5e-3, rel=1e-5)
    loss = lambda p: loss_on_batch(p, batch)
    want_raw = np.linalg.eigvalsh(_full_hessian(loss, params))[-1]
    np.testing.assert_allclose(record["sharpness"], want_raw, rtol=RTOL)
    precond = np.asarray(ravel_pytree(adam_preconditioner(opt_state, eps=1e-7))[0], np.float64)
    scaled = _full_hessian(loss, params) / np.sqrt(np.outer(precond, precond))
    want_pre = np.linalg.eigvalsh(scaled)[-1]
    np.testing.assert_allclose(record["preconditioned_sharpness"], want_pre, rtol=RTOL)
    alone = probe.measure(params, opt_state)
    np.testing.assert_allclose(alone["preconditioned_sharpness"], want_pre, rtol=RTOL)
    assert alone["adam_threshold"] == pytest.approx(38 / 1e-2, rel=1e-5)


def test_bad_inputs_raise_naming_the_value():
    loss = lambda p: jnp.sum(p["w"] ** 2) * p["n"]
    with_int = {"w": jnp.ones(3), "n": jnp.int32(2)}  # an integer leaf has a float0 tangent
    key = jax.random.key(0)
    with pytest.raises(ValueError, match=r"params\['n'\] has dtype int32"):
        sharpness(loss, with_int, key=key)
    with pytest.raises(ValueError, match=r"params\['n'\] has dtype int32"):
        hvp(loss, with_int, with_int)
    state = optax.adam(1e-3).init({"w": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"params\['n'\] has dtype int32"):
        preconditioned_sharpness(loss, with_int, state, eps=1e-8, key=key)
    square = lambda p: jnp.sum(p["w"] ** 2)
    with pytest.raises(ValueError, match="params and vector have different structures"):
        hvp(square, {"w": jnp.ones(3)}, {"v": jnp.ones(3)})
    with pytest.raises(ValueError, match=r"params\['w'\] has shape \(3,\) but vector\['w'\]"):
        hvp(square, {"w": jnp.ones(3)}, {"w": jnp.ones(4)})
    with pytest.raises(ValueError, match=r"loss_fn must return a float scalar; .* shape \(3,\)"):
        hvp(lambda p: p["w"] ** 2, {"w": jnp.ones(3)}, {"w": jnp.ones(3)})
    with pytest.raises(ValueError, match="key=0 must be a single PRNG key"):
        sharpness(square, {"w": jnp.ones(3)}, key=0)
    with pytest.raises(ValueError, match="num_steps=True"):
        sharpness(square, {"w": jnp.ones(3)}, key=key, num_steps=True)
    with pytest.raises(ValueError, match=r"params and the Adam state's nu"):
        preconditioned_sharpness(
            square, {"w": jnp.ones(3), "b": jnp.ones(1)}, state, eps=1e-8, key=key
        )
    for kwargs, name in [({"eps": float("inf")}, "eps=inf"), ({"b1": float("nan")}, "b1=nan")]:
        with pytest.raises(ValueError, match=name):
            SharpnessProbe(square, 2, **{"learning_rate": 1e-3, "b1": 0.9, "eps": 1e-8, **kwargs})
    with pytest.raises(ValueError, match="learning_rate=inf"):
        adam_stability_threshold(float("inf"), 0.9)
    # A float vector for bfloat16 params is cast to their dtype.
    out = hvp(lambda p: jnp.sum(p["w"] ** 3), {"w": jnp.ones(3, jnp.bfloat16)}, {"w": jnp.ones(3)})
    assert out["w"].dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out["w"], np.float32), 6.0)


# --- probes through efflax's own layers ------------------------------------------------------

_VOCAB, _SEQ, _WIDTH = 11, 16, 16

# The registered implementations of both ops other than the Pallas kernels (which the fit test
# below trains with) and a chunked XLA Monarch path (8 < the 32 rows here), each in its own layer
# of one model, so that one compilation covers them all. The reference is the all-XLA model
# (unchunked Monarch).
_XLA_MONARCH = XlaMonarch(row_chunk=None)
_ATTENTION = (
    "auto",
    *(n for n in ATTENTION_OP.implementations if n not in ("xla", "pallas_triton")),
)
_MONARCH = ("auto", "reference", XlaMonarch(row_chunk=8))


class _Stack(nn.Module):
    """Residual attention layers, then residual Monarch layers, one per implementation."""

    attention: tuple = ("xla",) * len(_ATTENTION)
    monarch: tuple = (_XLA_MONARCH,) * len(_MONARCH)

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(_VOCAB, _WIDTH)(tokens)
        for implementation in self.attention:
            layer = MultiHeadAttention(num_heads=2, causal=True, implementation=implementation)
            x = x + layer(x)
        for implementation in self.monarch:
            x = x + MonarchDense(_WIDTH, nblocks=2, implementation=implementation)(nn.gelu(x))
        return nn.Dense(_VOCAB)(x)


class _TinyLM(nn.Module):
    """A pre-norm block of efflax layers: causal attention, a Monarch MLP, an MoE FFN."""

    attention: Any = "xla"
    monarch: Any = "xla"

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(_VOCAB, _WIDTH)(tokens)
        attention = MultiHeadAttention(num_heads=2, causal=True, implementation=self.attention)
        x = x + attention(nn.LayerNorm()(x))
        h = nn.gelu(MonarchDense(2 * _WIDTH, nblocks=2, implementation=self.monarch)(x))
        x = x + MonarchDense(_WIDTH, nblocks=2, implementation=self.monarch)(h)
        x = x + MoEFeedForward(num_experts=2, hidden=_WIDTH)(nn.LayerNorm()(x))
        return nn.Dense(_VOCAB)(x)


def _lm_batch():
    tokens = jax.random.randint(jax.random.key(3), (2, _SEQ + 1), 0, _VOCAB)
    return {"x": tokens[:, :-1], "y": tokens[:, 1:]}


def _lm_loss(model):
    def loss(params, batch):
        logits = model.apply({"params": params}, batch["x"]).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

    return loss


def test_hvp_through_every_implementation_matches_the_xla_model():
    """Inside the probes' forward_mode_autodiff() every op picks an implementation that jax.jvp
    can cross (cuDNN attention is a custom_vjp; a chunked XLA Monarch call too, outside it), with
    the same numbers as the XLA path."""
    assert set(ATTENTION_OP.implementations) == {
        "xla",
        "pallas_triton",
        "cudnn",
        "pallas_mosaic_tpu",
        "reference",
    }
    assert set(MONARCH_OP.implementations) == {
        "xla",
        "pallas_triton",
        "pallas_mosaic_tpu",
        "reference",
    }
    batch = _lm_batch()
    params = nn.unbox(jax.jit(_Stack().init)(jax.random.key(4), batch["x"])["params"])
    vector = jax.tree.map(lambda p: jax.random.normal(jax.random.key(p.size), p.shape), params)

    @jax.jit
    def products(params, vector):
        every = _lm_loss(_Stack(attention=_ATTENTION, monarch=_MONARCH))
        xla = _lm_loss(_Stack())
        return [hvp(lambda q, f=f: f(q, batch), params, vector) for f in (every, xla)]

    got, want = (ravel_pytree(tree)[0] for tree in products(params, vector))
    assert float(jnp.abs(want).max()) > 1e-3
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))


def test_sharpness_probe_in_fit_on_pallas_attention_monarch_and_moe():
    """The probe as a fit hook on a model whose train step runs the Pallas kernels (interpret
    mode on CPU; jax.jvp through Pallas attention raises a bare AssertionError): the same
    eigenvalue as the same model built on the XLA path."""
    batch = _lm_batch()
    kernels = _TinyLM(attention=PallasTritonAttention(interpret=True), monarch="pallas_triton")
    params = nn.unbox(jax.jit(kernels.init)(jax.random.key(4), batch["x"])["params"])
    # One jitted loss for the step and the probe: the step traces it with the Pallas kernels
    # first, and the probe must not reuse that trace from the jit cache.
    loss = jax.jit(_lm_loss(kernels))
    settings = dict(learning_rate=1e-2, b1=0.9, eps=1e-7, num_steps=8, batch=batch, unroll=1)
    probe = SharpnessProbe(loss, 2, raw=False, **settings)
    state = TrainState.create(
        apply_fn=kernels.apply, params=params, tx=optax.adam(1e-2, eps=1e-7), rng=jax.random.key(0)
    )
    step = make_train_step(lambda params, state, batch, rng: loss(params, batch))
    state, history = fit(state, step, [batch] * 2, num_steps=2, hooks=[probe], progress=False)
    [record] = [r for r in history if "preconditioned_sharpness" in r]
    assert record["step"] == 2 and np.isfinite(record["preconditioned_sharpness"])
    assert record["adam_threshold"] == pytest.approx(3800.0)
    xla = SharpnessProbe(_lm_loss(_TinyLM()), 2, raw=False, **settings)(state)
    np.testing.assert_allclose(
        record["preconditioned_sharpness"], xla["preconditioned_sharpness"], rtol=1e-4
    )


def test_a_pallas_kernel_that_cannot_be_differentiated_gets_a_value_error():
    """Not a bare AssertionError from inside Pallas' JVP rule (here: program_id in a kernel)."""
    from jax.experimental import pallas as pl

    def kernel(x_ref, o_ref):
        o_ref[...] = x_ref[...] ** 2 * (pl.program_id(0) + 1)

    block = pl.BlockSpec((4,), lambda i: (i,))
    square = pl.pallas_call(
        kernel,
        out_shape=jax.ShapeDtypeStruct((8,), jnp.float32),
        grid=(2,),
        in_specs=[block],
        out_specs=block,
        interpret=True,
    )
    x = jnp.arange(8.0)
    with pytest.raises(ValueError, match="cannot differentiate in forward mode") as raised:
        hvp(lambda x: jnp.sum(square(x)), x, x)
    # JAX < 0.12.1 fails inside Pallas' JVP rule, later versions in its linearization check.
    assert isinstance(raised.value.__cause__, AssertionError | ValueError)
