"""ProxSkip / Scaffnew: local gradient steps with randomly skipped communication.

Paper: K. Mishchenko, G. Malinovsky, S. Stich, P. Richtarik, "ProxSkip: Yes! Local Gradient Steps
Provably Lead to Communication Acceleration! Finally!", ICML 2022, arXiv:2202.09357.

Every client takes a gradient step corrected by its control variate h_i; with probability p (one
coin shared by all clients) the clients average their iterates, and h_i absorbs the drift. With
gamma = 1/L and p = 1/sqrt(kappa) it needs O(sqrt(kappa) log 1/eps) communications instead of
gradient descent's O(kappa log 1/eps).

Parameters are *client-stacked*: every leaf has a leading axis of length ``num_clients``.
The transforms below are optax ``GradientTransformationExtraArgs`` whose ``update`` receives the
per-client gradients (stacked) and the stacked parameters, and returns the updates that move the
parameters to the new iterates. ``make_client_step`` wraps a transform and a per-client gradient
function into a jitted step, either vectorised with ``vmap`` on one device or with the clients
spread over a mesh axis by ``shard_map``; there the average is a ``lax.pmean`` inside the
``lax.cond`` branch taken on communication rounds only, so a skipped round sends nothing.

Example::

    tx = proxskip(learning_rate=1 / L, probability=0.1, key=jax.random.key(0))
    step = make_client_step(tx, lambda w, data: jax.grad(loss)(w, data))
    state = tx.init(params)                       # params: [num_clients, ...] leaves
    params, state = step(params, state, client_data)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from pallas_kernels import _checks
from pallas_kernels._compat import shard_map
from pallas_kernels._compat import to_varying

Communicate = Callable[[Any], Any]


# --- states ------------------------------------------------------------------------------------
class ProxSkipState(NamedTuple):
    """State of `proxskip`.

    Attributes:
      count: int32 number of steps taken.
      control_variates: the h_i, client-stacked like the parameters (they sum to zero over clients).
      key: PRNG key the communication coins are drawn from (coin t uses ``fold_in(key, t)``).
      communications: int32 number of communication rounds so far.
    """

    count: jax.Array
    control_variates: Any
    key: jax.Array
    communications: jax.Array


class LocalGDState(NamedTuple):
    """State of `local_gd` / `distributed_gd`: step and communication counters (int32)."""

    count: jax.Array
    communications: jax.Array


# --- communication operators -------------------------------------------------------------------
def consensus_average(stacked: Any, axis_name: str | None = None) -> Any:
    """Replaces every client's value by the average over all clients.

    Args:
      stacked: pytree whose leaves have a leading client axis.
      axis_name: a mesh axis the clients are also spread over (inside ``shard_map``); the average
        is then the local average followed by ``lax.pmean`` over that axis (every device holds the
        same number of clients, so this is the average over all clients).

    Returns:
      A pytree like ``stacked`` with every client holding the average.
    """

    for path, leaf in jax.tree_util.tree_leaves_with_path(stacked):
        if jnp.ndim(leaf) == 0:
            raise ValueError(
                f"stacked{jax.tree_util.keystr(path)} is a scalar; every leaf needs a leading "
                "client axis"
            )

    def average(leaf):
        mean = jnp.mean(leaf, axis=0, keepdims=True)
        if axis_name is not None:
            mean = to_varying(lax.pmean(mean, axis_name), axis_name)
        return jnp.broadcast_to(mean, leaf.shape)

    return jax.tree.map(average, stacked)


def _check_scalar(name: str, value: Any, check: Callable[[str, float], float]) -> None:
    """Checks a hyperparameter that is known now; a traced one (``optax.inject_hyperparams``
    turns numbers into arrays) or a schedule is checked where it is used, if at all."""
    if callable(value):
        return
    number = _checks.scalar_if_concrete(name, value)
    if number is not None:
        check(name, number)


def _check_learning_rate(learning_rate: optax.ScalarOrSchedule) -> None:
    _check_scalar("learning_rate", learning_rate, _checks.positive_float)


def _check_probability(probability: Any) -> None:
    _check_scalar(
        "probability",
        probability,
        lambda name, value: _checks.probability(name, value, allow_zero=False),
    )


def _learning_rate_at(learning_rate: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
    return learning_rate(count) if callable(learning_rate) else jnp.asarray(learning_rate)


def _as_key(key: Any) -> jax.Array:
    """A typed PRNG key from an int seed, an int scalar array, a typed key or raw key data."""
    if isinstance(key, bool):
        raise ValueError(f"key={key!r} must be a PRNG key or an int seed")
    if isinstance(key, int | np.integer):
        return jax.random.key(key)
    dtype = getattr(key, "dtype", None)
    if dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key):
        if key.shape != ():
            raise ValueError(f"key shape={key.shape} must be a single key (shape ())")
        return key
    if dtype is not None and jnp.issubdtype(dtype, jnp.integer) and jnp.ndim(key) == 0:
        return jax.random.key(key)
    if dtype == jnp.uint32 and jnp.shape(key) == (2,):
        return jax.random.wrap_key_data(key)
    raise ValueError(f"key={key!r} must be a PRNG key or an int seed")


# The step's client axis, passed by make_client_step as ``update(..., client_axis_name=...)``;
# absent when a user calls ``update`` themselves.
_ABSENT = object()


def _client_axis(built: str | None, passed: Any, transform: str) -> str | None:
    """The mesh axis to average over: the step's (passed) one, which a transform built with an
    explicit ``axis_name`` must agree with."""
    if passed is _ABSENT:
        return built
    if built is not None and built != passed:
        where = f"over mesh axis {passed!r}" if passed is not None else "without a mesh (vmap)"
        # Otherwise each device would average only its own clients: a silent wrong answer.
        raise ValueError(
            f"{transform} was built with axis_name={built!r} but the step runs its clients "
            f"{where}; build it with axis_name={passed!r} or leave axis_name unset (the step "
            "passes its axis)"
        )
    return passed


def _check_communicate(communicate: Any) -> None:
    if communicate is not None and not callable(communicate):
        raise ValueError(f"communicate={communicate!r} must be callable or None")


def _communicate_fn(communicate: Communicate | None, axis_name: str | None) -> Communicate:
    if communicate is not None:
        return communicate
    return lambda stacked: consensus_average(stacked, axis_name)


def communication_period(probability: float) -> int:
    """Steps between communications of the derandomised variant: ``max(1, round(1 / p))``.

    Raises:
      ValueError: ``probability`` is not in (0, 1].
    """
    probability = _checks.probability("probability", probability, allow_zero=False)
    return max(1, round(1.0 / probability))


# --- ProxSkip ----------------------------------------------------------------------------------
def proxskip(
    learning_rate: optax.ScalarOrSchedule,
    probability: float,
    *,
    key: jax.Array | int = 0,
    derandomized: bool = False,
    communicate: Communicate | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """ProxSkip (Scaffnew) on client-stacked parameters.

    One step, for every client i, with gamma the learning rate and p the probability::

        x_hat_i = x_i - gamma * (grad f_i(x_i) - h_i)
        if coin:  x_new_i = communicate(x_hat - (gamma / p) * h)_i      # the average by default
        else:     x_new_i = x_hat_i
        h_i     = h_i + (p / gamma) * (x_new_i - x_hat_i)

    The coin is shared by all clients (``bernoulli(fold_in(key, count), p)``), so a step either
    communicates everywhere or nowhere; the branch is a ``lax.cond``.

    Args:
      learning_rate: the local step size gamma (theory: 1/L), or an optax schedule of the count.
      probability: the communication probability p in (0, 1] (theory: 1/sqrt(kappa)).
      key: PRNG key (or int seed) for the coins.
      derandomized: communicate deterministically every ``round(1/p)`` steps instead of by coin
        (the update formulas keep using p).
      communicate: operator on the client-stacked tree ``x_hat - (gamma/p) h`` returning the new
        client-stacked iterates; default `consensus_average`.
      axis_name: mesh axis the clients are spread over when the update runs inside ``shard_map``
        (used by the default communication operator). Leave it ``None`` with
        `make_client_step`: the step passes its axis to ``update`` as the keyword argument
        ``client_axis_name``, through any optax wrapper (``chain``, ``inject_hyperparams``,
        ``multi_transform``); an explicit value must agree with the step's axis.

    Returns:
      An optax transform; ``update(grads, state, params, *, client_axis_name=...)`` takes
      client-stacked gradients grad f_i(x_i) and parameters x_i (``params`` is required).
    """
    _check_probability(probability)
    _check_learning_rate(learning_rate)
    _check_communicate(communicate)
    if derandomized:
        if _checks.concrete(probability) is None:
            raise ValueError(
                "derandomized=True needs a concrete probability to fix the period (with "
                "optax.inject_hyperparams, list 'probability' in static_args)"
            )
        period = communication_period(float(_checks.concrete(probability)))
    base_key = _as_key(key)

    def init_fn(params):
        return ProxSkipState(
            count=jnp.zeros([], jnp.int32),
            control_variates=jax.tree.map(jnp.zeros_like, params),
            key=base_key,
            communications=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, *, client_axis_name=_ABSENT, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("proxskip needs the client-stacked params in update(..., params)")
        communicate_fn = _communicate_fn(
            communicate, _client_axis(axis_name, client_axis_name, "proxskip")
        )
        gamma = _learning_rate_at(learning_rate, state.count)
        h = state.control_variates
        x_hat = jax.tree.map(lambda x, g, h_i: x - gamma * (g - h_i), params, updates, h)
        if derandomized:
            coin = (state.count + 1) % period == 0
        else:
            coin = jax.random.bernoulli(jax.random.fold_in(state.key, state.count), probability)

        def communicate_branch(x_hat, h):
            shifted = jax.tree.map(lambda x, h_i: x - (gamma / probability) * h_i, x_hat, h)
            x_new = communicate_fn(shifted)
            h_new = jax.tree.map(
                lambda h_i, xn, xh: h_i + (probability / gamma) * (xn - xh), h, x_new, x_hat
            )
            return x_new, h_new

        x_new, h_new = lax.cond(coin, communicate_branch, lambda x, h: (x, h), x_hat, h)
        new_updates = jax.tree.map(lambda xn, x: xn - x, x_new, params)
        new_state = ProxSkipState(
            count=state.count + 1,
            control_variates=h_new,
            key=state.key,
            communications=state.communications + coin.astype(jnp.int32),
        )
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


# --- baselines ---------------------------------------------------------------------------------
def local_gd(
    learning_rate: optax.ScalarOrSchedule,
    local_steps: int,
    *,
    communicate: Communicate | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Local GD / FedAvg with full local gradients: every client steps x_i -= gamma grad f_i(x_i),
    and every ``local_steps``-th step the iterates are averaged (inside a ``lax.cond``).

    With heterogeneous clients and a constant step it converges only to a neighbourhood of x*
    (client drift), which is what ProxSkip's control variates remove.

    Args:
      learning_rate: step size gamma or schedule.
      local_steps: K >= 1, steps between communications (K = 1 is `distributed_gd`).
      communicate: as in `proxskip`; default `consensus_average`.
      axis_name: mesh axis of the clients inside ``shard_map``; as in `proxskip`, leave it
        ``None`` with `make_client_step`.

    Returns:
      An optax transform; ``update(grads, state, params, *, client_axis_name=...)`` as in
      `proxskip`.
    """
    _check_learning_rate(learning_rate)
    local_steps = _checks.int_at_least("local_steps", local_steps)
    _check_communicate(communicate)

    def init_fn(params):
        del params
        return LocalGDState(count=jnp.zeros([], jnp.int32), communications=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, *, client_axis_name=_ABSENT, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("local_gd needs the client-stacked params in update(..., params)")
        communicate_fn = _communicate_fn(
            communicate, _client_axis(axis_name, client_axis_name, "local_gd")
        )
        gamma = _learning_rate_at(learning_rate, state.count)
        stepped = jax.tree.map(lambda x, g: x - gamma * g, params, updates)
        coin = (state.count + 1) % local_steps == 0
        x_new = lax.cond(coin, communicate_fn, lambda x: x, stepped)
        new_updates = jax.tree.map(lambda xn, x: xn - x, x_new, params)
        return new_updates, LocalGDState(
            count=state.count + 1, communications=state.communications + coin.astype(jnp.int32)
        )

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def distributed_gd(
    learning_rate: optax.ScalarOrSchedule,
    *,
    communicate: Communicate | None = None,
    axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """Gradient descent on the average loss (1/n) sum_i f_i: the clients' steps are averaged every
    step, i.e. one communication per step. Same as ``local_gd(learning_rate, 1)``."""
    return local_gd(learning_rate, 1, communicate=communicate, axis_name=axis_name)


# --- steps -------------------------------------------------------------------------------------
def _state_specs(state: Any, axis_name: str) -> Any:
    """Client-stacked fields of the state are split over ``axis_name``; the rest is replicated.

    The ProxSkip states are found anywhere in the tree (inside ``chain``, ``inject_hyperparams``,
    ``multi_transform`` states).
    """

    def spec(node):
        if isinstance(node, ProxSkipState):
            return ProxSkipState(
                count=P(),
                control_variates=jax.tree.map(lambda _: P(axis_name), node.control_variates),
                key=P(),
                communications=P(),
            )
        return P()

    return jax.tree.map(spec, state, is_leaf=lambda node: isinstance(node, ProxSkipState))


def _num_clients(params: Any) -> int:
    sizes = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(params)}
    if len(sizes) != 1 or None in sizes:
        raise ValueError(
            f"every parameter leaf needs the same leading client axis; got leading sizes {sizes}"
        )
    return sizes.pop()


def make_client_step(
    tx: optax.GradientTransformationExtraArgs,
    client_grad_fn: Callable[[Any, Any], Any],
    *,
    mesh: Mesh | None = None,
    axis_name: str | None = None,
) -> Callable[[Any, Any, Any], tuple[Any, Any]]:
    """Builds ``step(params, state, client_data) -> (params, state)``, jitted.

    The step passes its client axis to ``tx.update`` as the keyword argument
    ``client_axis_name`` (the mesh axis, or ``None`` for the vmapped step). optax's wrappers
    forward keyword arguments to the transforms that take them, so `proxskip` and `local_gd`
    average over every client even inside ``optax.chain``, ``optax.inject_hyperparams`` or
    ``optax.multi_transform``; one built with a different explicit ``axis_name`` raises. A custom
    ``communicate`` operator receives this device's clients only and must do its own collective.

    Args:
      tx: a transform from this module, possibly wrapped (any optax transform works; those
        that take no extra arguments never see the axis).
      client_grad_fn: ``client_grad_fn(client_params, client_data) -> grads`` for one client
        (unstacked); it is vmapped over the clients.
      mesh: if given, clients are split over ``mesh`` axis ``axis_name`` with ``shard_map``; the
        number of clients must be a multiple of that axis' size (several clients per device are
        fine).
      axis_name: the mesh axis of the clients (required with ``mesh``).

    Returns:
      The jitted step (``step.lower(...)`` works, to inspect the compiled HLO).
    """

    if not callable(client_grad_fn):
        raise ValueError(f"client_grad_fn={client_grad_fn!r} must be callable")
    if mesh is None and axis_name is not None:
        raise ValueError(f"{axis_name=} needs a mesh (the clients are vmapped without one)")
    if mesh is not None and (axis_name is None or axis_name not in mesh.axis_names):
        raise ValueError(f"{axis_name=} must name an axis of the mesh {mesh.axis_names}")
    tx = optax.with_extra_args_support(tx)

    def local_step(params, state, client_data):
        grads = jax.vmap(client_grad_fn)(params, client_data)
        try:
            updates, state = tx.update(grads, state, params, client_axis_name=axis_name)
        except TypeError as e:
            if "client_axis_name" not in str(e):
                raise
            raise ValueError(
                "a transform in tx takes extra arguments but not client_axis_name (its update "
                "lacks **extra_args); make_client_step passes the client axis that way: "
                f"{e}"
            ) from e
        return optax.apply_updates(params, updates), state

    if mesh is None:
        return jax.jit(local_step)
    axis_size = mesh.shape[axis_name]

    @jax.jit
    def sharded_step(params, state, client_data):
        num_clients = _num_clients(params)
        if num_clients % axis_size:
            raise ValueError(
                f"{num_clients=} must be a multiple of the size {axis_size} of mesh axis "
                f"{axis_name!r}"
            )
        state_specs = _state_specs(state, axis_name)
        fn = shard_map(
            local_step,
            mesh=mesh,
            in_specs=(P(axis_name), state_specs, P(axis_name)),
            out_specs=(P(axis_name), state_specs),
        )
        return fn(params, state, client_data)

    return sharded_step
