"""Sharpness probes for Adam: Hessian-vector products, Lanczos and preconditioned sharpness.

Cohen, Ghorbani, Krishnan, Agarwal, Medapati, Badura, Suo, Cardoze, Nado, Dahl, Gilmer,
"Adaptive Gradient Methods at the Edge of Stability", arXiv 2207.14484, 2022.
Full-batch Adam trains with the top eigenvalue of P^-1/2 H P^-1/2 (P = sqrt(v_hat) + eps, the
frozen preconditioner) hovering at (2 + 2 b1) / ((1 - b1) lr), as GD's sharpness hovers at 2 / lr.

Everything here is a pure function of a params pytree (and an optax state), so it can be jitted.
Hessian-vector products are traced inside ``pallas_kernels.op.forward_mode_autodiff()``: every
efflax op (attention, Monarch matmul, ...) then runs an implementation that ``jax.jvp`` can
differentiate (the XLA path: the same numbers; Pallas kernels carry a ``custom_vjp``, which
forward mode cannot cross), so the probes measure models built from efflax's own layers:

    loss = lambda p: mse(model.apply(p, x), y)
    top = sharpness(loss, params, key=jax.random.key(0))
    pre = preconditioned_sharpness(loss, params, opt_state, eps=1e-7, key=jax.random.key(0))
    pre / adam_stability_threshold(1e-3, 0.9)  # ~1.0 at the edge of stability
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from pallas_kernels import _checks
from pallas_kernels.op import forward_mode_autodiff

PyTree = Any
MatVec = Callable[[PyTree], PyTree]

__all__ = [
    "SharpnessProbe",
    "adam_preconditioner",
    "adam_stability_threshold",
    "gd_stability_threshold",
    "hvp",
    "lanczos",
    "power_iteration",
    "preconditioned_sharpness",
    "sharpness",
]

_OPTAX_DEFAULT_B2 = 0.999


def _check_floating(name: str, tree: PyTree) -> None:
    """The Hessian is taken in floating-point leaves only (an integer leaf has no tangent)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    if not leaves:
        raise ValueError(f"{name} has no leaves")
    for path, leaf in leaves:
        dtype = jnp.result_type(leaf)
        if not jnp.issubdtype(dtype, jnp.floating):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} has dtype {dtype}: the Hessian needs "
                "floating-point parameters (close over integer or boolean leaves in loss_fn)"
            )


def _check_key(key: Any) -> None:
    dtype = getattr(key, "dtype", None)
    typed = dtype is not None and jnp.issubdtype(dtype, jax.dtypes.prng_key) and key.shape == ()
    raw = dtype == jnp.uint32 and jnp.shape(key) == (2,)
    if not (typed or raw):
        raise ValueError(f"key={key!r} must be a single PRNG key, e.g. jax.random.key(0)")


def _check_scalar_loss(loss_fn: Callable[[PyTree], jax.Array], params: PyTree) -> None:
    out = jax.eval_shape(loss_fn, params)
    shape, dtype = getattr(out, "shape", None), getattr(out, "dtype", None)
    if shape != () or dtype is None or not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(
            f"loss_fn must return a float scalar; it returned shape {shape}, dtype {dtype}"
        )


_FORWARD_MODE_HINT = (
    "loss_fn reaches a Pallas kernel that JAX cannot differentiate in forward mode (its JVP "
    "rule failed): use efflax layers or the pallas_kernels ops "
    "(dot_product_attention, monarch_matmul), which switch to their XLA path inside the probes"
)


def _raised_in_pallas(error: BaseException) -> bool:
    traceback = error.__traceback__
    while traceback is not None:
        if "pallas" in traceback.tb_frame.f_code.co_filename:
            return True
        traceback = traceback.tb_next
    return False


def _reaches_pallas_call(loss_fn: Callable[[PyTree], jax.Array], params: PyTree) -> bool:
    """Whether ``loss_fn`` traces to a ``pallas_call`` (searched through every sub-jaxpr)."""

    def search(jaxpr: Any) -> bool:
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                return True
            for value in eqn.params.values():
                for item in value if isinstance(value, tuple | list) else (value,):
                    inner = getattr(item, "jaxpr", item)  # ClosedJaxpr -> Jaxpr
                    if hasattr(inner, "eqns") and search(inner):
                        return True
        return False

    return search(jax.make_jaxpr(loss_fn)(params).jaxpr)


def hvp(loss_fn: Callable[[PyTree], jax.Array], params: PyTree, vector: PyTree) -> PyTree:
    """Hessian-vector product H(params) @ vector, forward-over-reverse.

    Traced inside ``pallas_kernels.op.forward_mode_autodiff()``, so models built from efflax
    layers use their forward-mode-capable (XLA) implementations here, whatever implementation
    they were configured with; and with ``jax.disable_jit()``, so that a ``jax.jit``-compiled
    function inside ``loss_fn`` (traced before, with the Pallas kernels, and cached) is traced
    again here. Called outside ``jit`` this runs op by op: jit the caller (the probes do).

    Args:
      loss_fn: scalar function of ``params`` (close over the batch).
      params: point at which the Hessian is taken (floating-point leaves).
      vector: pytree with the structure and leaf shapes of ``params`` (cast to their dtypes).

    Returns:
      A pytree like ``params``: the directional derivative of ``grad(loss_fn)`` along ``vector``.

    Raises:
      ValueError: ``vector`` and ``params`` differ in structure or shapes, a leaf of ``params``
        is not floating-point, or ``loss_fn`` does not return a scalar.
    """
    _checks.same_structure("params", params, "vector", vector)
    _check_floating("params", params)
    vector = jax.tree.map(lambda v, p: jnp.asarray(v).astype(jnp.result_type(p)), vector, params)
    with forward_mode_autodiff(), jax.disable_jit():
        _check_scalar_loss(loss_fn, params)
        try:
            return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]
        except AssertionError as e:  # what Pallas' JVP rule raises (JAX < 0.12.1)
            if not _raised_in_pallas(e):
                raise
            raise ValueError(_FORWARD_MODE_HINT) from e
        except ValueError as e:  # JAX >= 0.12.1: "Linearization failed to produce known values"
            if "Linearization failed" not in str(e) or not _reaches_pallas_call(loss_fn, params):
                raise
            raise ValueError(_FORWARD_MODE_HINT) from e


def _flat_operator(matvec: MatVec, params_like: PyTree):
    """Returns (flat matvec in the compute dtype, unravel, size, compute dtype)."""
    _check_floating("params_like", params_like)
    flat, unravel = ravel_pytree(params_like)
    if flat.size == 0:
        raise ValueError("params_like has no elements")
    dtype = jnp.promote_types(flat.dtype, jnp.float32)

    def flat_matvec(v: jax.Array) -> jax.Array:
        out, _ = ravel_pytree(matvec(unravel(v.astype(flat.dtype))))
        return out.astype(dtype)

    return flat_matvec, unravel, flat.size, dtype


def _unroll(unroll: bool | int | None) -> bool | int:
    """``None``: unroll fully on CPU (XLA CPU runs convolutions in loops slowly), else loop."""
    if unroll is None:
        return True if jax.default_backend() == "cpu" else 1
    return unroll


def _check_steps(num_steps: int, name: str = "num_steps") -> None:
    _checks.int_at_least(name, num_steps, 1)


def lanczos(
    matvec: MatVec,
    params_like: PyTree,
    *,
    num_steps: int,
    key: jax.Array,
    num_eigenvalues: int = 1,
    return_eigenvectors: bool = False,
    unroll: bool | int | None = None,
):
    """Top eigenvalues of a symmetric linear operator by Lanczos with full reorthogonalisation.

    The operator acts on pytrees shaped like ``params_like`` (flattened with
    ``jax.flatten_util.ravel_pytree``). Each Lanczos vector is orthogonalised twice against all
    previous ones, so the Ritz values do not suffer from ghost copies; an exhausted Krylov space
    (an invariant subspace) restarts from a fresh random orthogonal vector. Works under ``jit``.
    Memory: ``num_steps`` vectors of the flattened size, in float32 (or wider).

    Args:
      matvec: symmetric linear map pytree -> pytree (e.g. ``lambda v: hvp(loss, params, v)``).
      params_like: pytree whose structure, shapes and dtypes the vectors take.
      num_steps: Krylov dimension (matvec calls); clipped to the number of elements.
      key: PRNG key for the starting vector.
      num_eigenvalues: how many of the largest (algebraic) eigenvalues to return.
      return_eigenvectors: also return the Ritz vectors.
      unroll: unrolling of the loop over matvecs (``lax.fori_loop``'s); ``None`` unrolls fully
        on CPU, where XLA runs convolutions inside a while loop about 10x slower, and keeps
        the loop elsewhere (shorter compiles).

    Returns:
      Eigenvalues ``[num_eigenvalues]`` in descending order; with ``return_eigenvectors`` a pair
      ``(eigenvalues, eigenvectors)`` where ``eigenvectors`` is a pytree like ``params_like`` with a
      leading axis of size ``num_eigenvalues`` (unit norm in the flattened space).

    Example:
      >>> top = lanczos(lambda v: hvp(loss, params, v), params, num_steps=20, key=key)[0]
    """
    _check_steps(num_steps)
    _check_steps(num_eigenvalues, "num_eigenvalues")
    _check_key(key)
    flat_matvec, unravel, size, dtype = _flat_operator(matvec, params_like)
    steps = min(int(num_steps), size)
    if num_eigenvalues > steps:
        raise ValueError(
            f"num_eigenvalues={num_eigenvalues} must be <= min(num_steps, size)={steps}"
        )
    tol = 100.0 * jnp.finfo(dtype).eps

    def project_out(basis: jax.Array, w: jax.Array) -> jax.Array:
        # One classical Gram-Schmidt pass; rows of the basis not yet filled are zero.
        return w - basis.T @ (basis @ w)

    start_key, restart_key = jax.random.split(key)
    v0 = jax.random.normal(start_key, (size,), dtype)
    v0 = v0 / jnp.linalg.norm(v0)
    restart = jax.random.normal(restart_key, (size,), dtype)

    def body(j, carry):
        basis, alphas, betas, v = carry
        basis = basis.at[j].set(v)
        av = flat_matvec(v)
        alpha = jnp.vdot(v, av)
        w = project_out(basis, av)
        # An (almost) invariant subspace: go on from a fresh direction with beta = 0. A shifted
        # copy of one random vector serves (no lax.cond, which makes XLA copy the basis, and no
        # new random numbers per step).
        broke_down = jnp.linalg.norm(w) <= tol * jnp.linalg.norm(av)
        w = jnp.where(broke_down, jnp.roll(restart, j + 1), w)
        w = project_out(basis, w)  # the second pass of "twice is enough"
        beta = jnp.linalg.norm(w)
        v_next = w / beta
        beta = jnp.where(broke_down, 0.0, beta)
        return basis, alphas.at[j].set(alpha), betas.at[j].set(beta), v_next

    init = (
        jnp.zeros((steps, size), dtype),
        jnp.zeros((steps,), dtype),
        jnp.zeros((steps,), dtype),
        v0,
    )
    basis, alphas, betas, _ = jax.lax.fori_loop(0, steps, body, init, unroll=_unroll(unroll))
    off = betas[:-1]
    tridiagonal = jnp.diag(alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)
    ritz_values, ritz_coords = jnp.linalg.eigh(tridiagonal)
    eigenvalues = ritz_values[::-1][:num_eigenvalues]
    if not return_eigenvectors:
        return eigenvalues
    vectors = (basis.T @ ritz_coords[:, ::-1][:, :num_eigenvalues]).T
    return eigenvalues, jax.vmap(unravel)(vectors.astype(ravel_pytree(params_like)[0].dtype))


def power_iteration(
    matvec: MatVec,
    params_like: PyTree,
    *,
    num_steps: int,
    key: jax.Array,
    unroll: bool | int | None = None,
) -> tuple[jax.Array, PyTree]:
    """Dominant eigenpair of a symmetric linear operator by power iteration.

    Converges to the eigenvalue of largest *magnitude* at rate |lambda_2 / lambda_1| per step
    (Lanczos is much faster; this is the simple cross-check). Works under ``jit``.

    Args:
      matvec: symmetric linear map pytree -> pytree.
      params_like: pytree whose structure the vectors take.
      num_steps: number of matvec calls.
      key: PRNG key for the starting vector.
      unroll: as in ``lanczos``.

    Returns:
      ``(eigenvalue, eigenvector)``: the Rayleigh quotient of the last iterate and that iterate
      (unit norm, a pytree like ``params_like``).
    """
    _check_steps(num_steps)
    _check_key(key)
    flat_matvec, unravel, size, dtype = _flat_operator(matvec, params_like)
    v0 = jax.random.normal(key, (size,), dtype)
    v0 = v0 / jnp.linalg.norm(v0)

    def body(_, carry):
        v, _ = carry
        av = flat_matvec(v)
        eigenvalue = jnp.vdot(v, av)
        norm = jnp.linalg.norm(av)
        return jnp.where(norm > 0, av / jnp.where(norm > 0, norm, 1.0), v), eigenvalue

    v, _ = jax.lax.fori_loop(0, num_steps, body, (v0, jnp.zeros((), dtype)), unroll=_unroll(unroll))
    # One more product so the returned value is the Rayleigh quotient of the returned vector.
    eigenvalue = jnp.vdot(v, flat_matvec(v))
    return eigenvalue, unravel(v.astype(ravel_pytree(params_like)[0].dtype))


def sharpness(
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    *,
    num_steps: int = 20,
    key: jax.Array,
    unroll: bool | int | None = None,
) -> jax.Array:
    """Top eigenvalue of the loss Hessian at ``params`` (Lanczos, ``num_steps`` HVPs).

    Args:
      loss_fn: scalar function of ``params``.
      params: the point.
      num_steps: Lanczos steps.
      key: PRNG key.
      unroll: as in ``lanczos``.

    Returns:
      Scalar: the largest (algebraic) Hessian eigenvalue.
    """
    _check_floating("params", params)
    matvec = lambda v: hvp(loss_fn, params, v)
    return lanczos(matvec, params, num_steps=num_steps, key=key, unroll=unroll)[0]


class _Found:
    """What a walk of an optimizer state found."""

    def __init__(self) -> None:
        self.adam_states: list[tuple[optax.ScaleByAdamState, dict | None]] = []
        self.type_names: list[str] = []


def _walk_state(node: Any, hyperparams: dict | None, found: _Found) -> None:
    if isinstance(node, optax.ScaleByAdamState):
        found.adam_states.append((node, hyperparams))
        return
    if node is None or isinstance(node, jax.Array | np.ndarray | np.generic | float | int):
        return
    name = type(node).__name__
    if type(node) not in (tuple, list, dict) and name not in found.type_names:
        found.type_names.append(name)
    # inject_hyperparams states keep the (possibly scheduled) values next to the inner state.
    if hasattr(node, "inner_state") and isinstance(getattr(node, "hyperparams", None), dict):
        hyperparams = node.hyperparams
    children, treedef = jax.tree_util.tree_flatten(node, is_leaf=lambda x: x is not node)
    if jax.tree_util.treedef_is_leaf(treedef):
        return
    for child in children:
        _walk_state(child, hyperparams, found)


def _find_adam_state(opt_state: PyTree) -> tuple[optax.ScaleByAdamState, dict | None]:
    found = _Found()
    _walk_state(opt_state, None, found)
    if not found.adam_states:
        raise ValueError(
            "no optax ScaleByAdamState (Adam second moment) in opt_state; state types found: "
            f"{found.type_names or ['(none)']}"
        )
    if len(found.adam_states) > 1:
        raise ValueError(
            f"opt_state holds {len(found.adam_states)} ScaleByAdamState entries; "
            "the preconditioner is ambiguous - pass the one to use"
        )
    return found.adam_states[0]


def adam_preconditioner(
    opt_state: PyTree,
    *,
    eps: float,
    bias_correction: bool = True,
    b2: float | None = None,
) -> PyTree:
    """Adam's diagonal preconditioner P = sqrt(v_hat) + eps, found anywhere in an optax state.

    Works with ``optax.adam``, ``adamw``, ``nadam``, chains and ``inject_hyperparams`` (the
    state is walked as a pytree; exactly one ``ScaleByAdamState`` must be found). Not for
    ``optax.adamax``: it keeps an infinity norm, not a second moment, in the same state type.

    Args:
      opt_state: any optax state containing exactly one ``ScaleByAdamState``.
      eps: Adam's eps (added outside the square root, as in optax).
      bias_correction: divide the second moment by ``1 - b2**count`` (as optax's update does).
      b2: second-moment decay for the bias correction. ``None`` reads it from an enclosing
        ``inject_hyperparams`` state when there is one, else uses optax's default 0.999.

    Returns:
      A pytree like the params: P = sqrt(v_hat) + eps (float32 or wider).

    Raises:
      ValueError: no (or several) Adam states in ``opt_state``, or bad ``eps`` / ``b2``.
    """
    _checks.positive_float("eps", eps, allow_zero=True)
    adam_state, hyperparams = _find_adam_state(opt_state)
    if b2 is None:
        b2 = (hyperparams or {}).get("b2", _OPTAX_DEFAULT_B2)
    host_b2 = _checks.concrete(b2)
    if host_b2 is not None:
        if host_b2.ndim != 0:
            raise ValueError(f"b2={b2!r} must be a scalar")
        _checks.probability("b2", float(host_b2), allow_one=False)
    count = jnp.asarray(adam_state.count)
    if bias_correction:
        # Before the first update nu is zero; treat v_hat as zero then (P = eps).
        correction = 1.0 - jnp.asarray(b2, jnp.float32) ** count.astype(jnp.float32)
        correction = jnp.where(count > 0, correction, 1.0)
    else:
        correction = 1.0

    def precondition(nu: jax.Array) -> jax.Array:
        nu = jnp.asarray(nu)
        nu = nu.astype(jnp.promote_types(nu.dtype, jnp.float32))
        return jnp.sqrt(nu / correction) + eps

    return jax.tree_util.tree_map(precondition, adam_state.nu)


def preconditioned_sharpness(
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    opt_state: PyTree,
    *,
    eps: float,
    num_steps: int = 20,
    key: jax.Array,
    bias_correction: bool = True,
    b2: float | None = None,
    unroll: bool | int | None = None,
) -> jax.Array:
    """Top eigenvalue of P^-1/2 H P^-1/2 (= of P^-1 H), with P Adam's current preconditioner.

    Args:
      loss_fn: scalar function of ``params``.
      params: the point.
      opt_state: optax state holding Adam's second moment (see ``adam_preconditioner``).
      eps: Adam's eps.
      num_steps: Lanczos steps.
      key: PRNG key.
      bias_correction: see ``adam_preconditioner``.
      b2: see ``adam_preconditioner``.
      unroll: as in ``lanczos``.

    Returns:
      Scalar: the largest eigenvalue of the preconditioned Hessian. Compare with
      ``adam_stability_threshold(lr, b1)``.
    """
    _check_floating("params", params)
    precond = adam_preconditioner(opt_state, eps=eps, bias_correction=bias_correction, b2=b2)
    _checks.same_structure("params", params, "the Adam state's nu", precond)
    inv_sqrt = jax.tree_util.tree_map(lambda p: jax.lax.rsqrt(p), precond)

    def scale(tree: PyTree) -> PyTree:
        return jax.tree_util.tree_map(lambda d, t: (d * t).astype(t.dtype), inv_sqrt, tree)

    def matvec(v: PyTree) -> PyTree:
        return scale(hvp(loss_fn, params, scale(v)))

    return lanczos(matvec, params, num_steps=num_steps, key=key, unroll=unroll)[0]


def _check_learning_rate(learning_rate: float) -> None:
    _checks.positive_float("learning_rate", learning_rate)


def adam_stability_threshold(learning_rate: float, b1: float) -> float:
    """(2 + 2 b1) / ((1 - b1) lr): the preconditioned-sharpness limit of Adam (38 / lr at b1=0.9).

    Derivation: on a quadratic with the preconditioner frozen, EMA momentum
    ``m = b1 m + (1 - b1) g`` with step ``-lr P^-1 m`` is stable iff every eigenvalue of
    P^-1 H is below this value.
    """
    _check_learning_rate(learning_rate)
    _checks.probability("b1", b1, allow_one=False)
    return (2.0 + 2.0 * b1) / ((1.0 - b1) * learning_rate)


def gd_stability_threshold(learning_rate: float, momentum: float = 0.0) -> float:
    """(2 + 2 momentum) / lr: the sharpness limit of GD with heavy-ball momentum (2 / lr plain)."""
    _check_learning_rate(learning_rate)
    _checks.probability("momentum", momentum, allow_one=False)
    return (2.0 + 2.0 * momentum) / learning_rate


class SharpnessProbe:
    """Measures raw and preconditioned sharpness and the stability thresholds.

    A hook for ``efflax.training.fit`` (``.every`` steps, ``probe(state) -> dict``), or usable on
    its own through ``probe.measure(params, opt_state)``. The measurement is jitted once.

    Args:
      loss_fn: ``loss_fn(params) -> scalar`` or, when ``batch`` is given,
        ``loss_fn(params, batch) -> scalar``. Use the full batch for edge-of-stability work.
      every: call period in steps when used as a hook.
      learning_rate: Adam's learning rate (a float or an optax schedule of the step).
      b1: Adam's b1 (for the threshold).
      eps: Adam's eps (for the preconditioner).
      num_steps: Lanczos steps per eigenvalue.
      batch: fixed batch passed to ``loss_fn``.
      b2: see ``adam_preconditioner``.
      gd_momentum: heavy-ball momentum for ``gd_threshold``.
      raw: also measure the raw sharpness (doubles the cost).
      seed: key for ``measure`` when no key is given.
      unroll: as in ``lanczos`` (``None``: fully unrolled on CPU, where it runs fastest; 1
        compiles one Hessian-vector product per eigenvalue, the shortest compile).

    Example:
      >>> probe = SharpnessProbe(loss, every=50, learning_rate=1e-3, b1=0.9, eps=1e-7)
      >>> fit(state, step, loader, num_steps=2000, hooks=[probe])
    """

    def __init__(
        self,
        loss_fn: Callable[..., jax.Array],
        every: int,
        *,
        learning_rate: float | optax.Schedule,
        b1: float,
        eps: float,
        num_steps: int = 20,
        batch: Any = None,
        b2: float | None = None,
        gd_momentum: float = 0.0,
        raw: bool = True,
        seed: int = 0,
        unroll: bool | int | None = None,
    ) -> None:
        _check_steps(every, "every")
        _check_steps(num_steps)
        if not callable(learning_rate):
            _check_learning_rate(learning_rate)
        _checks.probability("b1", b1, allow_one=False)
        _checks.probability("gd_momentum", gd_momentum, allow_one=False)
        _checks.positive_float("eps", eps, allow_zero=True)
        _checks.int_at_least("seed", seed, 0)
        if not callable(loss_fn):
            raise ValueError(f"loss_fn={loss_fn!r} must be callable")
        self.every = int(every)
        self.learning_rate = learning_rate
        self.b1 = b1
        self.gd_momentum = gd_momentum
        self.seed = seed

        def measure(params, opt_state, batch, key):
            loss = (lambda p: loss_fn(p, batch)) if batch is not None else loss_fn
            raw_key, pre_key = jax.random.split(key)
            out = {
                "preconditioned_sharpness": preconditioned_sharpness(
                    loss,
                    params,
                    opt_state,
                    eps=eps,
                    num_steps=num_steps,
                    key=pre_key,
                    b2=b2,
                    unroll=unroll,
                )
            }
            if raw:
                out["sharpness"] = sharpness(
                    loss, params, num_steps=num_steps, key=raw_key, unroll=unroll
                )
            return out

        self._batch = batch
        self._measure = jax.jit(measure)

    def _learning_rate_at(self, step) -> float:
        if callable(self.learning_rate):
            return float(self.learning_rate(step))
        return float(self.learning_rate)

    def measure(self, params: PyTree, opt_state: PyTree, *, key=None, step: int = 0) -> dict:
        """Measures at ``params`` with the preconditioner in ``opt_state``.

        Returns:
          Floats: ``sharpness`` (if ``raw``), ``preconditioned_sharpness``, ``adam_threshold``,
          ``gd_threshold`` and the two ratios to their thresholds (thresholds are ``inf`` and
          ratios 0 where a learning-rate schedule has reached 0).
        """
        if key is None:
            key = jax.random.fold_in(jax.random.key(self.seed), step)
        out = {k: float(v) for k, v in self._measure(params, opt_state, self._batch, key).items()}
        lr = self._learning_rate_at(step)
        if lr == 0.0:  # a schedule that has decayed to zero: nothing is unstable
            out["adam_threshold"] = out["gd_threshold"] = float("inf")
        else:
            out["adam_threshold"] = adam_stability_threshold(lr, self.b1)
            out["gd_threshold"] = gd_stability_threshold(lr, self.gd_momentum)
        out["preconditioned_sharpness_ratio"] = (
            out["preconditioned_sharpness"] / out["adam_threshold"]
        )
        if "sharpness" in out:
            out["sharpness_ratio"] = out["sharpness"] / out["gd_threshold"]
        return out

    def __call__(self, state: Any) -> dict:
        """Hook entry: reads ``state.params``, ``state.opt_state``, ``state.step``, ``state.rng``."""
        step = int(state.step)
        rng = getattr(state, "rng", None)
        # The extra fold keeps the probe's draws apart from the training step's fold_in(rng, step).
        key = None if rng is None else jax.random.fold_in(jax.random.fold_in(rng, step), 1)
        return self.measure(state.params, state.opt_state, key=key, step=step)
