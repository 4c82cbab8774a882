"""Layerwise batch-entropy regularisation (LBE): keeps information flowing through deep nets.

Peer, Keulen, Stabinger, Piater, Rodriguez-Sanchez, "Improving the Trainability of Deep Neural
Networks through Layerwise Batch-Entropy Regularization", TMLR 2022, arXiv:2208.01134. Each hidden
layer's batch entropy (a Gaussian entropy estimate from the per-unit variance over the batch) is
pulled towards a learnable per-layer target; the penalty multiplies the task loss.

Official code (peerdavid/layerwise-batch-entropy, ``batch_entropy.py``):
``H = mean_k 0.5 * log(pi * e * std_k^2 + 1)`` over flattened units ``k`` with the unbiased
``torch.std`` over the batch, and ``loss = CE * (1 + beta * mean_l (H_l - max(alpha_min,
|alpha_l|))^2)`` with the ``alpha_l`` trained by the same optimiser as the network.

Example:
  >>> logits, acts = capture_activations(
  ...     model.apply, {"params": params["model"]}, x, select=nn.Dense, where="inputs")
  >>> entropies = [batch_entropy(a) for a in list(acts.values())[1:]]  # skip the data
  >>> loss = lbe_loss(ce, entropies, params["lbe_alpha"], beta=0.1, alpha_min=0.2)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from collections.abc import Sequence
from typing import Any
from typing import Literal

import flax.linen as nn
import jax
import jax.numpy as jnp

from efflax._src.losses._common import nonnegative_if_concrete
from pallas_kernels import _checks

__all__ = ["batch_entropy", "capture_activations", "lbe_loss", "lbe_penalty"]


def batch_entropy(activations: jax.Array) -> jax.Array:
    """Mean over units of ``0.5 * log(pi * e * var + 1)``, ``var`` unbiased over the batch.

    Computed from the variance, not the standard deviation: the gradient of ``std`` is NaN
    where the variance is exactly 0 (dead ReLU units), the gradient of ``var`` is 0 there.

    Args:
      activations: ``[batch, ...]``; everything after the batch axis is flattened into units.

    Returns:
      A float32 scalar ``>= 0``; 0 exactly when every unit is constant over the batch.

    Raises:
      ValueError: a batch of fewer than 2 examples (the variance is undefined).
    """
    activations = _checks.as_array(
        "activations", activations, min_ndim=1, kind="real", layout="[batch, ...]"
    )
    if activations.shape[0] < 2:
        raise ValueError(
            f"activations.shape={activations.shape} needs a batch of at least 2 examples "
            "(batch entropy is a variance over the batch)"
        )
    if 0 in activations.shape[1:]:  # the mean over zero units would be NaN
        raise ValueError(
            f"activations.shape={activations.shape} has no units (a zero-length axis after "
            "the batch axis)"
        )
    x = activations.reshape(activations.shape[0], -1).astype(jnp.float32)
    variance = jnp.var(x, axis=0, ddof=1)
    return jnp.mean(0.5 * jnp.log1p(math.pi * math.e * variance))


def _entropies(entropies: Sequence[jax.Array] | jax.Array) -> jax.Array:
    """A sequence of scalars or an ``[L]`` array as a float32 ``[L]`` array."""
    if not hasattr(entropies, "shape"):
        if not isinstance(entropies, Sequence) or isinstance(entropies, str | bytes):
            raise ValueError(
                f"entropies={entropies!r} must be a sequence of scalars or an [L] array"
            )
        if len(entropies) == 0:
            raise ValueError("entropies is empty: regularise at least one layer")
        for i, h in enumerate(entropies):
            h = _checks.as_array(f"entropies[{i}]", h, kind="real")
            if h.ndim != 0:
                raise ValueError(f"entropies[{i}].shape={h.shape} must be a scalar")
        entropies = jnp.stack([jnp.asarray(h) for h in entropies])
    entropies = _checks.as_array(
        "entropies", entropies, ndim=1, kind="real", nonempty=True, layout="[layers]"
    )
    return entropies.astype(jnp.float32)


def lbe_penalty(
    entropies: Sequence[jax.Array] | jax.Array, alphas: jax.Array, *, alpha_min: float
) -> jax.Array:
    """``mean_l (H_l - max(alpha_min, |alpha_l|))^2``, the LBE term before ``beta``.

    Args:
      entropies: the batch entropies ``H_l`` of the regularised layers (a sequence of scalars
        or an ``[L]`` array).
      alphas: the learnable targets ``[L]`` (official deep-FNN sweep: initialised to 2.0).
      alpha_min: the lower bound of the targets, ``>= 0`` (official: 0.2 FNN, 0.5 default).

    Returns:
      A float32 scalar.
    """
    entropies = _entropies(entropies)
    alphas = _checks.as_array("alphas", alphas, ndim=1, kind="real", layout="[layers]")
    if alphas.shape != entropies.shape:
        raise ValueError(
            f"alphas.shape={alphas.shape} must be ({entropies.shape[0]},): one target per "
            "regularised layer"
        )
    if entropies.shape[0] == 0:
        raise ValueError("entropies is empty: regularise at least one layer")
    nonnegative_if_concrete("alpha_min", alpha_min)
    targets = jnp.maximum(alpha_min, jnp.abs(alphas.astype(jnp.float32)))
    return jnp.mean((entropies - targets) ** 2)


def lbe_loss(
    task_loss: jax.Array,
    entropies: Sequence[jax.Array] | jax.Array,
    alphas: jax.Array,
    *,
    beta: float,
    alpha_min: float,
) -> jax.Array:
    """``task_loss * (1 + beta * mean_l (H_l - max(alpha_min, |alpha_l|))^2)``.

    The task loss is not detached: the product's gradient reaches the network through both
    factors, as in the official code. The ``alphas`` are parameters: put them in the optimised
    pytree next to the network's parameters.

    Args:
      task_loss: the scalar task loss (cross-entropy).
      entropies: :func:`batch_entropy` of each regularised layer.
      alphas: the learnable per-layer targets ``[L]``.
      beta: weight of the penalty, ``>= 0`` (official deep FNN: 0.1).
      alpha_min: lower bound of the targets, ``>= 0``.

    Returns:
      A float32 scalar.
    """
    nonnegative_if_concrete("beta", beta)
    task_loss = _checks.as_array("task_loss", task_loss, kind="real")
    if task_loss.ndim != 0:
        raise ValueError(f"task_loss.shape={task_loss.shape} must be a scalar (reduce it)")
    penalty = lbe_penalty(entropies, alphas, alpha_min=alpha_min)
    return jnp.asarray(task_loss, jnp.float32) * (1.0 + beta * penalty)


Selector = Callable[[nn.Module], bool] | type | tuple[type, ...]


def _module_key(module: nn.Module) -> str:
    return "/".join(str(part) for part in module.path) or type(module).__name__


def capture_activations(
    fn: Callable[..., Any],
    *args: Any,
    select: Selector,
    where: Literal["outputs", "inputs"] = "outputs",
    **kwargs: Any,
) -> tuple[Any, dict[str, jax.Array]]:
    """Calls ``fn(*args, **kwargs)`` and records what selected submodules receive or return.

    ``fn`` is typically ``model.apply``; no change to the model is needed. Every ``__call__``
    of a module that ``select`` accepts is intercepted (``flax.linen.intercept_methods``) and
    its first positional input (``where='inputs'``) or its output (``'outputs'``) recorded, inputs in
    call order, outputs in completion order. Inputs matter for models that apply their activation as a function: in
    ``efflax.models.MLP`` the input of ``Dense_{l+1}`` is the ReLU output of hidden layer ``l``.

    Why interception and not ``capture_intermediates``: that records only outputs of
    ``__call__``, needs ``mutable=['intermediates']`` threaded through ``apply``, and its nested
    dict loses the call order once flattened (``jax.tree`` sorts ``Dense_10`` before
    ``Dense_2``). The recorded values are traced in the same trace as the output, so they carry
    gradients; they must not be recorded inside a lifted transform (``nn.scan``, ``nn.remat``,
    ``nn.vmap``) of the model, where JAX would report a leaked tracer.

    Args:
      fn: the function to call, e.g. ``model.apply``.
      *args, **kwargs: its arguments.
      select: a module class (or tuple of classes) or a predicate ``module -> bool``.
      where: ``'outputs'`` or ``'inputs'``.

    Returns:
      ``(fn's result, {module path: activation})``; a module called more than once gets
      ``path#1``, ``path#2``, ... for the later calls.
    """
    _checks.function("fn", fn)
    _checks.one_of("where", where, ("outputs", "inputs"))
    if isinstance(select, type | tuple):
        if isinstance(select, tuple) and not (select and all(isinstance(c, type) for c in select)):
            raise ValueError(f"select={select!r} must be a module class or a tuple of classes")
        classes = select

        def predicate(module: nn.Module) -> bool:
            return isinstance(module, classes)

    elif callable(select):
        predicate = select
    else:
        raise ValueError(f"select={select!r} must be a module class, tuple of classes or callable")

    captured: dict[str, jax.Array] = {}

    def record(module: nn.Module, value: Any) -> None:
        key = base = _module_key(module)
        count = 1
        while key in captured:
            key, count = f"{base}#{count}", count + 1
        captured[key] = value

    def interceptor(next_fun, call_args, call_kwargs, context):
        chosen = context.method_name == "__call__" and predicate(context.module)
        if chosen and where == "inputs":
            if not call_args:
                raise ValueError(f"module {_module_key(context.module)!r} got no positional input")
            record(context.module, call_args[0])
        output = next_fun(*call_args, **call_kwargs)
        if chosen and where == "outputs":
            record(context.module, output)
        return output

    with nn.intercept_methods(interceptor):
        result = fn(*args, **kwargs)
    return result, captured
