"""SAM: sharpness-aware minimisation, the baseline SAF and MESA are measured against.

Foret, Kleiner, Mobahi, Neyshabur, "Sharpness-Aware Minimization for Efficiently Improving
Generalization", ICLR 2021, arXiv 2010.01412.
Each update takes the gradient at the adversarially perturbed point
``params + rho * g / ||g||`` (g the gradient at ``params``), at the cost of a second gradient.

This is ``optax.contrib.sam`` in opaque mode (the adversarial step happens inside ``update``), so
it is one optax transform that works with any train step that passes ``grad_fn``:
``efflax.training.make_train_step(loss_fn, pass_grad_fn=True)`` does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import optax

from pallas_kernels import _checks

__all__ = ["sam"]

# Added to the gradient norm, as in the reference PyTorch SAM: a zero gradient gives a zero
# perturbation instead of NaN parameters (optax.contrib.normalize divides by the bare norm).
_NORM_EPS = 1e-12


def _normalize() -> optax.GradientTransformation:
    """``g / (||g|| + 1e-12)`` over the whole tree (the global norm)."""

    def update_fn(updates, state, params=None):
        del params
        norm = optax.tree.norm(updates)
        return jax.tree.map(lambda g: g / (norm + _NORM_EPS).astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def sam(
    optimizer: optax.GradientTransformation,
    rho: float = 0.05,
    *,
    sync_period: int = 2,
    adv_optimizer: optax.GradientTransformation | None = None,
    reset_state: bool = True,
    batch_axis_name: str | None = None,
) -> optax.GradientTransformationExtraArgs:
    """SAM around ``optimizer``: ``optax.contrib.sam`` in opaque mode.

    ``update(grads, state, params, grad_fn=grad_fn)`` ascends ``sync_period - 1`` times with
    ``adv_optimizer`` (default: ``params + rho * g / (||g|| + 1e-12)``), calling
    ``grad_fn(perturbed_params, i)`` for the gradient there, and hands the last one to
    ``optimizer`` at the unperturbed ``params``. The default ``sync_period=2`` is the paper's SAM
    (one ascent step, two gradients per update).

    Args:
      optimizer: the outer optimizer (e.g. ``optax.sgd(lr, momentum=0.9)``).
      rho: the neighbourhood radius, > 0 (paper: 0.05).
      sync_period: ascent steps + 1, >= 1.
      adv_optimizer: the ascent transform; overrides ``rho``. Its updates are *subtracted* from
        the params, as optax's are, so ``chain(normalize, sgd(rho))`` ascends.
      reset_state: reset ``adv_optimizer``'s state after every update.
      batch_axis_name: ``pmean`` the ascent gradients over this axis (pmap / shard_map steps).

    Returns:
      An optax transform whose ``update`` requires the keyword argument ``grad_fn``.

    Example::

        tx = efflax.optim.sam(optax.sgd(0.1, momentum=0.9), rho=0.05)
        state = TrainState.create(apply_fn=model.apply, params=params, tx=tx, rng=key)
        train_step = make_train_step(loss_fn, pass_grad_fn=True)
    """
    _checks.positive_float("rho", rho)
    sync_period = _checks.int_at_least("sync_period", sync_period)
    if adv_optimizer is None:
        adv_optimizer = optax.chain(_normalize(), optax.sgd(rho))
    inner = optax.contrib.sam(
        optimizer,
        adv_optimizer,
        sync_period=sync_period,
        reset_state=reset_state,
        opaque_mode=True,
        batch_axis_name=batch_axis_name,
    )

    def update_fn(
        updates: Any,
        state: Any,
        params: Any = None,
        *,
        grad_fn: Callable[[Any, int], Any] | None = None,
        **extra_args: Any,
    ):
        del extra_args  # other transforms' extra arguments (in a chain) are not SAM's
        if grad_fn is None:
            raise ValueError(
                "sam needs update(..., grad_fn=grad_fn) with grad_fn(params, i) -> gradients "
                "(build the step with make_train_step(loss_fn, pass_grad_fn=True))"
            )
        if params is None:
            raise ValueError("sam needs the params in update(grads, state, params, grad_fn=...)")
        updates, state = inner.update(updates, state, params, grad_fn=grad_fn)
        return updates, state

    return optax.GradientTransformationExtraArgs(inner.init, update_fn)
