"""Argument checks shared by the losses (on top of ``pallas_kernels._checks``)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from pallas_kernels import _checks


def nonnegative_if_concrete(name: str, value: Any) -> None:
    """Raises for a negative or non-finite ``value`` known at trace time; a traced one passes."""
    array = _checks.concrete(value)
    if array is None:
        return
    if array.ndim != 0:
        raise ValueError(f"{name}={value!r} must be a scalar")
    _checks.positive_float(name, float(array), allow_zero=True)


def positive_if_concrete(name: str, value: Any) -> None:
    """Raises for a non-positive or non-finite ``value`` known at trace time."""
    array = _checks.concrete(value)
    if array is None:
        return
    if array.ndim != 0:
        raise ValueError(f"{name}={value!r} must be a scalar")
    _checks.positive_float(name, float(array))


def check_logits(name: str, logits: jax.Array) -> None:
    """``logits`` must be a floating ``[batch, classes]`` array."""
    if logits.ndim != 2:
        raise ValueError(f"{name}.shape={logits.shape} must be [batch, classes]")
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"{name}.dtype={logits.dtype} must be a floating type")


def targets_as_probabilities(labels: jax.Array, num_classes: int, batch: int) -> jax.Array:
    """Integer class ids ``[batch]`` or soft targets ``[batch, classes]`` as float32 ``[b, c]``.

    Out-of-range class ids cannot be checked on traced values; they give an all-zero row.
    """
    labels = jnp.asarray(labels)
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != (batch,):
            raise ValueError(f"integer labels.shape={labels.shape} must be {(batch,)}")
        return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if labels.shape != (batch, num_classes):
        raise ValueError(
            f"soft labels.shape={labels.shape} must be {(batch, num_classes)} "
            "(or pass integer class ids of shape [batch])"
        )
    return labels.astype(jnp.float32)
