"""The train state and the jitted, data-parallel train step."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

LossFn = Callable[[Any, "TrainState", Any, jax.Array], tuple[jax.Array, dict[str, Any]]]


class TrainState(struct.PyTreeNode):
    """Everything a training run carries from step to step, and checkpoints.

    Attributes:
      step: int32 scalar, the number of optimizer steps taken.
      params: the model parameters (a pytree).
      opt_state: the optax state.
      rng: a raw ``uint32[2]`` PRNG key; step ``t`` uses ``fold_in(rng, t)``, so a resumed
        run draws the same numbers as an uninterrupted one.
      extra: a dict for any further state: a SAF logits buffer, EMA weights, batch statistics.
      apply_fn: the model's apply function (static, not saved).
      tx: the optax transform (static, not saved).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    extra: dict[str, Any]
    apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable[..., Any],
        params: Any,
        tx: optax.GradientTransformation,
        rng: jax.Array,
        extra: dict[str, Any] | None = None,
    ) -> TrainState:
        """A state at step 0 with ``tx.init(params)``."""
        if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
            rng = jax.random.key_data(rng)
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=rng,
            extra=dict(extra or {}),
            apply_fn=apply_fn,
            tx=tx,
        )

    def apply_gradients(
        self, grads: Any, *, extra: dict[str, Any] | None = None, **update_kwargs: Any
    ) -> TrainState:
        """One optax update; ``update_kwargs`` reach ``tx.update`` (e.g. ``grad_fn`` for SAM)."""
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **update_kwargs)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            opt_state=opt_state,
            extra=self.extra if extra is None else extra,
        )

    def step_rng(self) -> jax.Array:
        """The PRNG key of the current step."""
        return jax.random.fold_in(self.rng, self.step)


def make_train_step(
    loss_fn: LossFn, *, donate: bool = True, jit: bool = True
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted ``step(state, batch) -> (state, metrics)`` from a loss function.

    Args:
      loss_fn: ``loss_fn(params, state, batch, rng) -> (loss, aux)`` where ``aux`` is a dict
        with ``'metrics'`` (a dict of scalars) and optionally ``'extra'`` (the new
        ``state.extra``, e.g. an updated logits buffer).
      donate: donate the old state's buffers to the new one.
      jit: wrap in ``jax.jit``.

    Data parallelism comes from the arguments: with params replicated (or sharded with
    ``efflax.sharding.shard_params``) and the batch split over the mesh's data axes
    (``efflax.sharding.shard_batch`` or ``efflax.data.load(..., mesh=mesh)``), XLA partitions
    the step and inserts the gradient all-reduce.

    Returns:
      The step function; ``metrics`` always holds ``'loss'``.
    """

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
        (loss, aux), grads = grad_fn(state.params, state, batch, state.step_rng())
        aux = dict(aux or {})
        new_state = state.apply_gradients(grads, extra=aux.get("extra"))
        metrics = {"loss": loss, **aux.get("metrics", {})}
        return new_state, metrics

    if jit:
        return jax.jit(step, donate_argnums=(0,) if donate else ())
    return step


def cross_entropy_loss_fn(*, x_key: str = "x", y_key: str = "y") -> LossFn:
    """A classification ``loss_fn`` for :func:`make_train_step`: mean softmax cross-entropy.

    The model is called as ``state.apply_fn({'params': params}, batch[x_key])``.
    """

    def loss_fn(params, state, batch, rng):
        del rng
        logits = state.apply_fn({"params": params}, batch[x_key])
        labels = batch[y_key]
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels
        ).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return loss, {"metrics": {"accuracy": accuracy}}

    return loss_fn


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _eval_batch(apply_fn, params, x, y):
    logits = apply_fn({"params": params}, x).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
    correct = jnp.sum(jnp.argmax(logits, -1) == y)
    return loss, correct


def classification_eval_fn(
    arrays: dict[str, Any],
    *,
    batch_size: int = 1000,
    x_key: str = "x",
    y_key: str = "y",
    prefix: str = "test",
) -> Callable[[TrainState], dict[str, float]]:
    """``eval_fn(state) -> {prefix/loss, prefix/accuracy}`` over a whole split (every example)."""
    x, y = arrays[x_key], arrays[y_key]

    def eval_fn(state: TrainState) -> dict[str, float]:
        total_loss, total_correct = 0.0, 0
        for start in range(0, len(x), batch_size):
            loss, correct = _eval_batch(
                state.apply_fn,
                state.params,
                x[start : start + batch_size],
                y[start : start + batch_size],
            )
            total_loss += float(loss)
            total_correct += int(correct)
        return {f"{prefix}/loss": total_loss / len(x), f"{prefix}/accuracy": total_correct / len(x)}

    return eval_fn
