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

    def average(leaf):
        mean = jnp.mean(leaf, axis=0, keepdims=True)
        if axis_name is not None:
            mean = to_varying(lax.pmean(mean, axis_name), axis_name)
        return jnp.broadcast_to(mean, leaf.shape)

    return jax.tree.map(average, stacked)


def _check_learning_rate(learning_rate: optax.ScalarOrSchedule) -> None:
    if not callable(learning_rate) and not learning_rate > 0:
        raise ValueError(f"{learning_rate=} must be positive")


def _learning_rate_at(learning_rate: optax.ScalarOrSchedule, count: jax.Array) -> jax.Array:
    return learning_rate(count) if callable(learning_rate) else jnp.asarray(learning_rate)


def _default_communicate(communicate: Communicate | None, axis_name: str | None) -> Communicate:
    if communicate is not None:
        return communicate
    return lambda stacked: consensus_average(stacked, axis_name)


def communication_period(probability: float) -> int:
    """Steps between communications of the derandomised variant: ``max(1, round(1 / p))``."""
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
        (used by the default communication operator; see `make_client_step`).

    Returns:
      An optax transform; ``update(grads, state, params)`` takes client-stacked gradients
      grad f_i(x_i) and parameters x_i (``params`` is required).
    """
    if not 0.0 < probability <= 1.0:
        raise ValueError(f"{probability=} must be in (0, 1]")
    _check_learning_rate(learning_rate)
    communicate_fn = _default_communicate(communicate, axis_name)
    period = communication_period(probability)
    base_key = jax.random.key(key) if isinstance(key, int | np.integer) else key

    def init_fn(params):
        return ProxSkipState(
            count=jnp.zeros([], jnp.int32),
            control_variates=jax.tree.map(jnp.zeros_like, params),
            key=base_key,
            communications=jnp.zeros([], jnp.int32),
        )

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("proxskip needs the client-stacked params in update(..., params)")
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

    update_fn.client_axis_name = axis_name  # checked by make_client_step
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
      axis_name: mesh axis of the clients inside ``shard_map``.

    Returns:
      An optax transform; ``update(grads, state, params)`` as in `proxskip`.
    """
    _check_learning_rate(learning_rate)
    if int(local_steps) != local_steps or local_steps < 1:
        raise ValueError(f"{local_steps=} must be a positive integer")
    communicate_fn = _default_communicate(communicate, axis_name)

    def init_fn(params):
        del params
        return LocalGDState(count=jnp.zeros([], jnp.int32), communications=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("local_gd needs the client-stacked params in update(..., params)")
        gamma = _learning_rate_at(learning_rate, state.count)
        stepped = jax.tree.map(lambda x, g: x - gamma * g, params, updates)
        coin = (state.count + 1) % local_steps == 0
        x_new = lax.cond(coin, communicate_fn, lambda x: x, stepped)
        new_updates = jax.tree.map(lambda xn, x: xn - x, x_new, params)
        return new_updates, LocalGDState(
            count=state.count + 1, communications=state.communications + coin.astype(jnp.int32)
        )

    update_fn.client_axis_name = axis_name  # checked by make_client_step
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
    """Client-stacked fields of the state are split over ``axis_name``; the rest is replicated."""
    if isinstance(state, ProxSkipState):
        return ProxSkipState(P(), P(axis_name), P(), P())
    return jax.tree.map(lambda _: P(), state)


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

    Args:
      tx: a transform from this module. For the sharded step build it with the same
        ``axis_name`` (its default communication then averages across the mesh axis).
      client_grad_fn: ``client_grad_fn(client_params, client_data) -> grads`` for one client
        (unstacked); it is vmapped over the clients.
      mesh: if given, clients are split over ``mesh`` axis ``axis_name`` with ``shard_map``; the
        number of clients must be a multiple of that axis' size (several clients per device are
        fine).
      axis_name: the mesh axis of the clients (required with ``mesh``).

    Returns:
      The jitted step (``step.lower(...)`` works, to inspect the compiled HLO).
    """

    def local_step(params, state, client_data):
        grads = jax.vmap(client_grad_fn)(params, client_data)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    if mesh is None:
        return jax.jit(local_step)
    if axis_name is None or axis_name not in mesh.axis_names:
        raise ValueError(f"{axis_name=} must name an axis of the mesh {mesh.axis_names}")
    tx_axis = getattr(tx.update, "client_axis_name", axis_name)
    if tx_axis != axis_name:
        # Otherwise each device would average only its own clients: a silent wrong answer.
        raise ValueError(
            f"the transform was built with axis_name={tx_axis!r} but the step shards clients "
            f"over {axis_name=}; build it with axis_name={axis_name!r}"
        )
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
