"""A Lagrangian sparsity controller: multipliers trained by gradient ascent.

Wang, Wohlwend, Lei, "Structured Pruning of Large Language Models", EMNLP 2020, arXiv:1910.04732;
as used by CoFi (Xia, Zhong, Chen, arXiv:2204.00408, 2022). The loss gets
``lambda_1 (s - t) + lambda_2 (s - t)^2`` for the expected sparsity ``s`` and a target ``t``
warmed up linearly; the model (and the mask logits) minimise it while the multipliers maximise
it, so any persistent gap ``s - t`` grows the penalty until ``s`` reaches ``t``.

Example:
  >>> controller = LagrangianSparsity(target=0.9, warmup_steps=1000)
  >>> params = {"model": ..., "log_alpha": ..., "lagrangian": controller.init()}
  >>> tx = optax.multi_transform(
  ...     {"model": optax.adamw(1e-3), "log_alpha": optax.adam(0.1),
  ...      "lagrangian": gradient_ascent(optax.adam(0.1))},
  ...     lambda p: {k: k for k in p})
  >>> # in the loss: penalty, target = controller(expected_sparsity, params["lagrangian"], step)
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from pallas_kernels import _checks

Array = jax.Array

__all__ = ["LagrangianSparsity", "ProjectToBoxState", "gradient_ascent", "project_to_box"]


@dataclasses.dataclass(frozen=True)
class LagrangianSparsity:
    """The target schedule and the penalty ``lambda_1 (s - t) + lambda_2 (s - t)^2``.

    Attributes:
      target: the final target sparsity, in ``[0, 1)`` (a float, or a scalar array that may be
        traced, e.g. to ``vmap`` over several targets).
      warmup_steps: steps over which the target rises linearly from ``start`` (0: the target
        applies from the first step, as in the official code).
      start: the target at step 0, in ``[0, target]``.
    """

    target: float | Array
    warmup_steps: int = 0
    start: float = 0.0

    def __post_init__(self):
        # A traced target (e.g. vmapped over a sweep of targets) is checked where it is concrete.
        target = _checks.concrete(self.target)
        if target is not None:
            if target.shape != ():
                raise ValueError(f"target={self.target!r} must be a scalar")
            target = _checks.probability("target", target.item(), allow_one=False)
        object.__setattr__(
            self, "warmup_steps", _checks.int_at_least("warmup_steps", self.warmup_steps, 0)
        )
        start = _checks.probability("start", self.start, allow_one=False)
        object.__setattr__(self, "start", start)
        if target is not None and start > target:
            raise ValueError(f"start={self.start!r} must be <= target={self.target!r}")

    def init(self) -> dict[str, Array]:
        """The multipliers, both 0 (float32 scalars); train them with :func:`gradient_ascent`."""
        return {"lambda_1": jnp.zeros((), jnp.float32), "lambda_2": jnp.zeros((), jnp.float32)}

    def target_at(self, step: Array | int) -> Array:
        """``start + (target - start) * min(1, step / warmup_steps)``.

        Raises:
          ValueError: a known ``step`` that is not one real number ``>= 0`` (a traced one
            passes; the warm-up fraction is clipped to ``[0, 1]`` either way).
        """
        step = _check_step(step)
        if self.warmup_steps == 0:
            return jnp.asarray(self.target, jnp.float32)
        fraction = jnp.clip(step.astype(jnp.float32) / self.warmup_steps, 0.0, 1.0)
        return self.start + (self.target - self.start) * fraction

    def penalty(
        self, expected_sparsity: Array, multipliers: dict[str, Array], step: Array | int
    ) -> tuple[Array, Array]:
        """``(lambda_1 (s - t) + lambda_2 (s - t)^2, t)`` at ``step``.

        The signed form of the official code (not ``|s - t|``: the maintainers keep it,
        princeton-nlp/CoFiPruning#55).
        """
        if not isinstance(multipliers, Mapping) or set(multipliers) != {"lambda_1", "lambda_2"}:
            raise ValueError(
                f"multipliers={multipliers!r} must be {{'lambda_1': ..., 'lambda_2': ...}}"
            )
        lambdas = {}
        for name in ("lambda_1", "lambda_2"):
            value = _checks.as_array(f"multipliers[{name!r}]", multipliers[name], kind="real")
            if value.ndim != 0:
                raise ValueError(
                    f"multipliers[{name!r}].shape={value.shape} must be a scalar (from init())"
                )
            lambdas[name] = value
        sparsity = _checks.as_array("expected_sparsity", expected_sparsity, kind="real")
        if sparsity.ndim != 0:
            raise ValueError(f"expected_sparsity.shape={sparsity.shape} must be a scalar")
        known = _checks.concrete(sparsity)
        if known is not None and not np.isfinite(known):
            raise ValueError(f"expected_sparsity={expected_sparsity!r} must be finite")
        target = self.target_at(step)
        gap = sparsity.astype(jnp.float32) - target
        loss = lambdas["lambda_1"] * gap + lambdas["lambda_2"] * jnp.square(gap)
        return loss, target

    __call__ = penalty


def _check_step(step: Array | int) -> Array:
    """``step`` as an array; a known one must be a real (not bool) scalar ``>= 0``."""
    if isinstance(step, str | bytes) or step is None:
        raise ValueError(f"step={step!r} must be a number >= 0")
    value = _checks.concrete(step)
    if value is not None and (
        value.ndim != 0 or value.dtype.kind not in "iuf" or not 0 <= value < float("inf")
    ):
        raise ValueError(f"step={step!r} must be a finite real scalar >= 0")
    step = jnp.asarray(step)
    if step.ndim != 0:
        raise ValueError(f"step.shape={step.shape} must be a scalar")
    return step


def gradient_ascent(inner: optax.GradientTransformation) -> optax.GradientTransformation:
    """``inner`` turned into an ascent: its updates negated.

    ``gradient_ascent(optax.adamw(lr))`` is the official Lagrangian optimizer, PyTorch AdamW with
    ``lr = -reg_learning_rate`` (with no weight decay: decay is not negated here, so keep it 0).
    """
    if not (callable(getattr(inner, "init", None)) and callable(getattr(inner, "update", None))):
        raise ValueError(f"inner={inner!r} must be an optax GradientTransformation")

    def init_fn(params):
        return inner.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        updates, state = inner.update(updates, state, params, **extra_args)
        return jax.tree.map(jnp.negative, updates), state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


class ProjectToBoxState(NamedTuple):
    """State of :func:`project_to_box` (a step counter)."""

    count: jax.Array


def project_to_box(lower: float, upper: float) -> optax.GradientTransformation:
    """Updates that land the parameters in ``[lower, upper]`` (put last in a chain).

    ``params + update`` is clipped, so ``optax.apply_updates`` gives the projected point: the
    ``clamp_`` after each step of CoFi's mask logits.

    Raises:
      ValueError: ``lower >= upper`` or a bound that is not finite.
    """
    low = _checks.finite_float("lower", lower)
    high = _checks.finite_float("upper", upper)
    if not low < high:
        raise ValueError(f"lower={lower!r} must be < upper={upper!r}")

    def init_fn(params):
        del params
        return ProjectToBoxState(count=jnp.zeros((), jnp.int32))

    def update_fn(updates, state, params=None, **extra_args):
        del extra_args
        if params is None:
            raise ValueError("project_to_box needs params (call tx.update(grads, state, params))")
        updates = jax.tree.map(
            lambda u, p: (jnp.clip(p + u, low, high) - p).astype(u.dtype), updates, params
        )
        return updates, ProjectToBoxState(count=optax.safe_increment(state.count))

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
