"""Argument checks shared by the losses (on top of ``pallas_kernels._checks``)."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _checks


def nonnegative_if_concrete(name: str, value: Any) -> None:
    """Raises for a negative or non-finite ``value`` known at trace time; a traced one passes."""
    number = _checks.scalar_if_concrete(name, value)
    if number is not None:
        _checks.positive_float(name, number, allow_zero=True)


def positive_if_concrete(name: str, value: Any) -> None:
    """Raises for a non-positive or non-finite ``value`` known at trace time."""
    number = _checks.scalar_if_concrete(name, value)
    if number is not None:
        _checks.positive_float(name, number)


def check_logits(name: str, logits: jax.Array) -> jax.Array:
    """``logits`` (a list is converted) as a floating ``[batch, classes]`` array with at least
    one row and class (the mean over an empty batch is NaN)."""
    return _checks.as_array(
        name, logits, ndim=2, kind="floating", nonempty=True, layout="[batch, classes]"
    )


def targets_as_probabilities(
    labels: jax.Array, num_classes: int, batch: int, batch_of: str = "logits"
) -> jax.Array:
    """Integer class ids ``[batch]`` or soft targets ``[batch, classes]`` as float32 ``[b, c]``.

    Out-of-range class ids and negative soft targets are refused when the labels are known at
    trace time; traced ones cannot be checked (an out-of-range id gives an all-zero row).
    """
    labels = _checks.as_array("labels", labels, kind="real", layout="[batch] or [batch, classes]")
    if jnp.issubdtype(labels.dtype, jnp.integer):
        if labels.shape != (batch,):
            raise ValueError(
                f"integer labels.shape={labels.shape} must be {(batch,)} (the batch of {batch_of})"
            )
        _checks.indices_in_range("labels", labels, num_classes)
        return jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    if labels.shape != (batch, num_classes):
        raise ValueError(
            f"soft labels.shape={labels.shape} must be {(batch, num_classes)}, [batch of "
            f"{batch_of}, classes] (or pass integer class ids of shape [batch])"
        )
    values = _checks.concrete(labels)
    if values is not None and not np.all(values >= 0):
        raise ValueError(
            f"soft labels must be >= 0 (probabilities); got values such as "
            f"{values[~(values >= 0)][:4].tolist()}"
        )
    return labels.astype(jnp.float32)
