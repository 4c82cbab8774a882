"""Tests of efflax.optim (proxskip): invariants, equivalences, sharding (HLO) and the theory's rate."""

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh

from efflax.optim import LocalGDState
from efflax.optim import ProxSkipState
from efflax.optim import communication_period
from efflax.optim import consensus_average
from efflax.optim import distributed_gd
from efflax.optim import local_gd
from efflax.optim import make_client_step
from efflax.optim import proxskip

NUM_DEVICES = 8
needs_8_devices = pytest.mark.skipif(
    jax.device_count() < NUM_DEVICES,
    reason="needs 8 devices (tests/conftest.py forces 8 CPU devices)",
)


def test_public_names():
    assert callable(proxskip) and callable(local_gd) and callable(distributed_gd)
    assert callable(make_client_step) and callable(consensus_average)
    assert ProxSkipState._fields == ("count", "control_variates", "key", "communications")
    assert LocalGDState._fields == ("count", "communications")


def logistic_problem(seed, num_clients, dim=5, examples=9, lam=0.05):
    """Heterogeneous l2-regularised logistic regression: client i has its own data."""
    k_a, k_y, k_shift, k_x = jax.random.split(jax.random.key(seed), 4)
    shift = jax.random.normal(k_shift, (num_clients, 1, dim))  # clients see different inputs
    a = jax.random.normal(k_a, (num_clients, examples, dim)) + shift
    y = jnp.sign(jax.random.normal(k_y, (num_clients, examples)))
    data = {"a": a, "y": y}

    def client_loss(w, d):
        return jnp.mean(jax.nn.softplus(-d["y"] * (d["a"] @ w))) + 0.5 * lam * jnp.sum(w**2)

    x0 = jnp.broadcast_to(jax.random.normal(k_x, (dim,)), (num_clients, dim))
    return client_loss, data, x0


def run(tx, step, params, data, steps):
    state = tx.init(params)
    history = []
    for _ in range(steps):
        params, state = step(params, state, data)
        history.append((params, state))
    return history


@pytest.mark.parametrize("derandomized", [False, True])
def test_control_variates_sum_to_zero(derandomized):
    client_loss, data, x0 = logistic_problem(0, num_clients=6)
    tx = proxskip(0.3, 0.25, key=jax.random.key(7), derandomized=derandomized)
    step = make_client_step(tx, jax.grad(client_loss))
    history = run(tx, step, x0, data, 40)
    assert int(history[-1][1].communications) > 0
    for _, state in history:
        h = state.control_variates
        chex.assert_trees_all_close(jnp.sum(h, axis=0), jnp.zeros(h.shape[1:]), atol=1e-5)
    # h is not trivially zero: after a communication it holds the client drift.
    assert float(jnp.abs(history[-1][1].control_variates).max()) > 1e-2


def test_probability_one_is_gradient_descent_on_average_loss():
    client_loss, data, x0 = logistic_problem(1, num_clients=5)
    gamma = 0.4
    tx = proxskip(gamma, 1.0, key=3)
    step = make_client_step(tx, jax.grad(client_loss))
    history = run(tx, step, x0, data, 30)

    def average_loss(w):
        return jnp.mean(jax.vmap(client_loss, in_axes=(None, 0))(w, data))

    gd_step = jax.jit(lambda w: w - gamma * jax.grad(average_loss)(w))
    w = x0[0]
    for params, _ in history:
        w = gd_step(w)
        chex.assert_trees_all_close(params, jnp.broadcast_to(w, params.shape), atol=2e-6)
    assert int(history[-1][1].communications) == 30
    # The distributed_gd baseline is the same method.
    tx_gd = distributed_gd(gamma)
    gd_params = run(tx_gd, make_client_step(tx_gd, jax.grad(client_loss)), x0, data, 30)[-1][0]
    chex.assert_trees_all_close(gd_params, history[-1][0], atol=2e-6)


def test_derandomized_and_local_gd_communicate_on_schedule():
    client_loss, data, x0 = logistic_problem(2, num_clients=4)
    probability = 0.3
    period = communication_period(probability)
    assert period == 3
    tx = proxskip(0.2, probability, derandomized=True)
    history = run(tx, make_client_step(tx, jax.grad(client_loss)), x0, data, 10)
    counts = [int(s.communications) for _, s in history]
    assert counts == [(t + 1) // period for t in range(10)]
    tx = local_gd(0.2, 4)
    history = run(tx, make_client_step(tx, jax.grad(client_loss)), x0, data, 8)
    for t, (params, state) in enumerate(history, start=1):
        assert int(state.communications) == t // 4
        spread = float(jnp.abs(params - params.mean(0)).max())
        assert (spread < 1e-6) == (t % 4 == 0), (t, spread)


def test_random_coins_follow_probability():
    client_loss, data, x0 = logistic_problem(3, num_clients=2, dim=2)
    probability, steps = 0.2, 400
    tx = proxskip(0.1, probability, key=11)
    step = make_client_step(tx, jax.grad(client_loss))
    params, state = x0, tx.init(x0)
    for _ in range(steps):
        params, state = step(params, state, data)
    mean, std = probability * steps, np.sqrt(steps * probability * (1 - probability))
    assert abs(int(state.communications) - mean) < 4 * std


def test_optimum_is_a_fixed_point():
    client_loss, data, x0 = logistic_problem(4, num_clients=3)
    grad_fn = jax.grad(client_loss)
    average_grad = lambda w: jnp.mean(jax.vmap(grad_fn, in_axes=(None, 0))(w, data), axis=0)
    w = jax.jit(lambda w: jax.lax.fori_loop(0, 300, lambda _, w: w - 0.5 * average_grad(w), w))(
        x0[0]
    )
    params = jnp.broadcast_to(w, x0.shape)
    tx = proxskip(0.5, 0.5, key=5)
    step = make_client_step(tx, grad_fn)
    h_star = jax.vmap(grad_fn, in_axes=(None, 0))(w, data)
    state = tx.init(params)._replace(control_variates=h_star - h_star.mean(0))
    for _ in range(6):  # both branches of the coin get taken
        params, state = step(params, state, data)
    assert 0 < int(state.communications) < 6
    chex.assert_trees_all_close(params, jnp.broadcast_to(w, x0.shape), atol=1e-5)


@needs_8_devices
@pytest.mark.parametrize(
    "make_tx",
    [
        lambda axis: proxskip(0.3, 0.35, key=jax.random.key(9), axis_name=axis),
        lambda axis: proxskip(0.3, 0.35, derandomized=True, axis_name=axis),
        lambda axis: local_gd(0.3, 3, axis_name=axis),
    ],
    ids=["proxskip", "derandomized", "local_gd"],
)
def test_vmap_and_shard_map_give_the_same_iterates(make_tx):
    num_clients = 16  # two clients per device
    client_loss, data, x0 = logistic_problem(5, num_clients=num_clients)
    mesh = Mesh(np.array(jax.devices()[:NUM_DEVICES]), ("clients",))
    tx_vmap, tx_mesh = make_tx(None), make_tx("clients")
    step_vmap = make_client_step(tx_vmap, jax.grad(client_loss))
    step_mesh = make_client_step(tx_mesh, jax.grad(client_loss), mesh=mesh, axis_name="clients")
    history_vmap = run(tx_vmap, step_vmap, x0, data, 20)
    history_mesh = run(tx_mesh, step_mesh, x0, data, 20)
    assert int(history_vmap[-1][1].communications) > 1
    for (p_vmap, s_vmap), (p_mesh, s_mesh) in zip(history_vmap, history_mesh, strict=True):
        assert int(s_vmap.communications) == int(s_mesh.communications)
        chex.assert_trees_all_close(p_mesh, p_vmap, atol=1e-6, rtol=1e-6)
        if isinstance(s_vmap, ProxSkipState):
            chex.assert_trees_all_close(
                s_mesh.control_variates, s_vmap.control_variates, atol=1e-5, rtol=1e-5
            )
    assert len(history_mesh[-1][0].sharding.device_set) == NUM_DEVICES


def _computations(hlo_text):
    """Maps computation name -> body text, and returns the name of the entry computation."""
    bodies, entry, name = {}, None, None
    for line in hlo_text.splitlines():
        header = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{$", line)
        if header and not line.startswith(" "):
            name = header.group(2)
            bodies[name] = []
            if header.group(1):
                entry = name
        elif name is not None:
            bodies[name].append(line)
    return {k: "\n".join(v) for k, v in bodies.items()}, entry


@needs_8_devices
@pytest.mark.parametrize(
    "make_tx", [lambda: proxskip(0.1, 0.2, axis_name="c"), lambda: local_gd(0.1, 5, axis_name="c")]
)
def test_sharded_step_all_reduces_only_inside_the_conditional(make_tx):
    client_loss, data, x0 = logistic_problem(6, num_clients=8)
    mesh = Mesh(np.array(jax.devices()[:NUM_DEVICES]), ("c",))
    tx = make_tx()
    step = make_client_step(tx, jax.grad(client_loss), mesh=mesh, axis_name="c")
    hlo = step.lower(x0, tx.init(x0), data).compile().as_text()
    bodies, entry = _computations(hlo)
    all_reduce = re.compile(r"\ball-reduce(-start)?\(")
    with_all_reduce = {name for name, body in bodies.items() if all_reduce.search(body)}
    assert with_all_reduce, "the sharded step should average across devices somewhere"
    assert entry not in with_all_reduce

    # Everything reachable from the branches of a conditional.
    called = re.compile(r"(?:branch_computations=\{([^}]*)\}|(?:calls|to_apply)=%?([\w.\-]+))")
    branches = set()
    for body in bodies.values():
        for match in re.finditer(r"branch_computations=\{([^}]*)\}", body):
            branches |= {b.strip().lstrip("%") for b in match.group(1).split(",")}
    assert branches, "the sharded step should contain a conditional"
    reachable, frontier = set(), list(branches)
    while frontier:
        name = frontier.pop()
        if name in reachable or name not in bodies:
            continue
        reachable.add(name)
        for match in called.finditer(bodies[name]):
            names = match.group(1).split(",") if match.group(1) else [match.group(2)]
            frontier.extend(n.strip().lstrip("%") for n in names)
    assert with_all_reduce <= reachable, (with_all_reduce, reachable)


def quadratic_problem(seed, num_clients, dim, mu, smoothness):
    """f_i(x) = 1/2 (x - c_i)^T Q_i (x - c_i) with the spectrum of every Q_i in [mu, L]."""
    keys = jax.random.split(jax.random.key(seed), 4)
    rotations = jnp.linalg.qr(jax.random.normal(keys[0], (num_clients, dim, dim)))[0]
    eigs = jnp.exp(
        jax.random.uniform(
            keys[1], (num_clients, dim), minval=np.log(mu), maxval=np.log(smoothness)
        )
    )
    eigs = eigs.at[:, 0].set(mu).at[:, 1].set(smoothness)
    q = jnp.einsum("nij,nj,nkj->nik", rotations, eigs, rotations)
    centers = 3.0 * jax.random.normal(keys[2], (num_clients, dim))
    x_star = jnp.linalg.solve(q.sum(0), jnp.einsum("nij,nj->i", q, centers))
    x0 = jnp.broadcast_to(jax.random.normal(keys[3], (dim,)), (num_clients, dim))
    grad_fn = lambda x, d: d["q"] @ (x - d["c"])
    return grad_fn, {"q": q, "c": centers}, x_star, x0


def test_contracts_at_least_as_fast_as_theorem():
    """Theorem 3.6 (applied to the consensus reformulation, Sec. 4): with gamma <= 1/L,
    E[Psi_t] <= (1 - zeta)^t Psi_0, zeta = min(gamma mu, p^2),
    Psi_t = sum_i ||x_i,t - x*||^2 + (gamma/p)^2 sum_i ||h_i,t - grad f_i(x*)||^2."""
    mu, smoothness, num_clients, steps, num_runs = 1.0, 100.0, 4, 400, 64
    kappa = smoothness / mu
    gamma, probability = 1.0 / smoothness, 1.0 / np.sqrt(kappa)
    grad_fn, data, x_star, x0 = quadratic_problem(8, num_clients, 6, mu, smoothness)
    h_star = jax.vmap(grad_fn, in_axes=(None, 0))(x_star, data)
    tx = proxskip(gamma, probability)

    def lyapunov(params, state):
        return jnp.sum((params - x_star) ** 2) + (gamma / probability) ** 2 * jnp.sum(
            (state.control_variates - h_star) ** 2
        )

    def trajectory(key):
        def body(carry, _):
            params, state = carry
            grads = jax.vmap(grad_fn)(params, data)
            updates, state = tx.update(grads, state, params)
            params = params + updates
            return (params, state), lyapunov(params, state)

        state = tx.init(x0)._replace(key=key)
        return jax.lax.scan(body, (x0, state), length=steps)[1]

    keys = jax.random.split(jax.random.key(0), num_runs)
    psi_runs = np.asarray(jax.jit(jax.vmap(trajectory))(keys))
    psi, standard_error = psi_runs.mean(0), psi_runs.std(0) / np.sqrt(num_runs)
    psi0 = float(lyapunov(x0, tx.init(x0)))
    zeta = min(gamma * mu, probability**2)
    bound = psi0 * (1 - zeta) ** np.arange(1, steps + 1)
    # The theorem bounds the expectation; allow 3 standard errors of the Monte-Carlo mean (the
    # first steps come within a few percent of the bound, later ones are far below it).
    assert np.all(psi <= bound + 3 * standard_error), np.max((psi - bound) / standard_error)
    assert psi[-1] < 0.05 * bound[-1]


@pytest.mark.parametrize(
    "build,message",
    [
        (lambda: proxskip(0.1, 0.0), "probability=0.0"),
        (lambda: proxskip(0.1, -0.1), "probability=-0.1"),
        (lambda: proxskip(0.1, 1.5), "probability=1.5"),
        (lambda: proxskip(0.1, float("nan")), "probability=nan"),
        (lambda: proxskip(0.0, 0.5), "learning_rate=0.0"),
        (lambda: proxskip(float("inf"), 0.5), "learning_rate=inf"),
        (lambda: proxskip(0.1, 0.5, key="seed"), "key='seed'"),
        (lambda: local_gd(-1.0, 2), "learning_rate=-1.0"),
        (lambda: local_gd(0.1, 0), "local_steps=0"),
        (lambda: local_gd(0.1, 2.5), "local_steps=2.5"),
        (lambda: local_gd(0.1, float("nan")), "local_steps=nan"),
        (lambda: distributed_gd(float("nan")), "learning_rate=nan"),
        (lambda: communication_period(0.0), "probability=0.0"),
        (lambda: communication_period(float("nan")), "probability=nan"),
        (lambda: make_client_step(local_gd(0.1, 2), lambda w, d: w, axis_name="c"), "needs a mesh"),
        (lambda: make_client_step(local_gd(0.1, 2), None), "client_grad_fn=None"),
        (lambda: proxskip(0.1, 0.5, communicate="mean"), "communicate='mean'"),
        (
            lambda: consensus_average({"w": jnp.ones(3), "count": jnp.int32(0)}),
            r"stacked\['count'\]",
        ),
    ],
)
def test_bad_arguments_raise_naming_the_value(build, message):
    with pytest.raises(ValueError, match=message):
        build()


def test_bad_use_raises():
    tx = proxskip(0.1, 0.5)
    with pytest.raises(ValueError, match="params"):
        tx.update(jnp.ones((2, 3)), tx.init(jnp.ones((2, 3))))
    mesh = Mesh(np.array(jax.devices()[:1]), ("clients",))
    with pytest.raises(ValueError, match="axis_name='data' must name an axis"):
        make_client_step(tx, lambda w, d: w, mesh=mesh, axis_name="data")
    x0, data = jnp.ones((2, 3)), jnp.ones((2, 3))
    # An explicit axis that differs from the step's would average only each device's clients.
    other = optax.chain(local_gd(0.1, 2, axis_name="other"))
    step = make_client_step(other, lambda w, d: w, mesh=mesh, axis_name="clients")
    with pytest.raises(ValueError, match="built with axis_name='other' but the step runs"):
        step(x0, other.init(x0), data)
    # ... and so would one used without a mesh (an unbound axis name deep inside JAX).
    named = proxskip(0.1, 0.5, axis_name="clients")
    with pytest.raises(ValueError, match="without a mesh"):
        make_client_step(named, lambda w, d: w)(x0, named.init(x0), data)
    # A transform whose update takes extra arguments but not client_axis_name.
    strict = optax.GradientTransformationExtraArgs(
        lambda p: optax.EmptyState(), lambda u, s, p=None, *, value=None: (u, s)
    )
    with pytest.raises(ValueError, match="client_axis_name"):
        make_client_step(strict, lambda w, d: w)(x0, strict.init(x0), data)


def _mask_all(label):
    return lambda params: jax.tree.map(lambda _: label, params)


@needs_8_devices
@pytest.mark.parametrize(
    "make_tx",
    [
        lambda: optax.chain(optax.identity(), local_gd(0.3, 1)),
        lambda: optax.inject_hyperparams(local_gd, static_args=("local_steps",))(
            learning_rate=0.3, local_steps=1
        ),
        lambda: optax.multi_transform({"clients": proxskip(0.3, 1.0)}, _mask_all("clients")),
    ],
    ids=["chain", "inject_hyperparams", "multi_transform"],
)
def test_wrapped_transforms_average_over_all_clients(make_tx):
    """The step's axis reaches the transform through optax's wrappers: one averaging step on
    8 devices (two clients each) leaves every client at the average over all 16."""
    client_loss, data, x0 = logistic_problem(9, num_clients=16)
    x0 = x0 + jnp.arange(16.0)[:, None]  # clients start apart
    mesh = Mesh(np.array(jax.devices()[:NUM_DEVICES]), ("clients",))
    tx = make_tx()
    sharded = make_client_step(tx, jax.grad(client_loss), mesh=mesh, axis_name="clients")
    params, _ = sharded(x0, tx.init(x0), data)
    stepped = x0 - 0.3 * jax.vmap(jax.grad(client_loss))(x0, data)
    want = jnp.broadcast_to(stepped.mean(0), x0.shape)
    chex.assert_trees_all_close(params, want, atol=1e-5, rtol=1e-5)
    assert float(jnp.abs(params - params[0]).max()) < 1e-5
    vmapped = make_client_step(tx, jax.grad(client_loss))(x0, tx.init(x0), data)[0]
    chex.assert_trees_all_close(params, vmapped, atol=1e-5, rtol=1e-5)


@needs_8_devices
def test_client_count_must_match_mesh_axis():
    client_loss, data, x0 = logistic_problem(7, num_clients=12)
    mesh = Mesh(np.array(jax.devices()[:NUM_DEVICES]), ("clients",))
    tx = proxskip(0.1, 0.5, axis_name="clients")
    step = make_client_step(tx, jax.grad(client_loss), mesh=mesh, axis_name="clients")
    with pytest.raises(ValueError, match="num_clients=12"):
        step(x0, tx.init(x0), data)
