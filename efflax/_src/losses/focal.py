"""Cyclical focal loss: a per-epoch blend of a focal loss and a high-confidence loss.

L. N. Smith, "Cyclical Focal Loss", arXiv:2202.08978, 2022. Early and late in training the loss
up-weights confident correct predictions (``(1 + p_y)^gamma_hc``); in between it becomes a
focal loss that down-weights them (``(1 - p_y)^gamma_pos``). The focal loss itself:
Lin et al., "Focal Loss for Dense Object Detection", arXiv:1708.02002, 2017.

Official code (lnsmith54/CFL, ``TIMM/timm/loss/asl_focal_loss.py``, ``Cyclical_FocalLoss``), per
example with ``lp = log_softmax(logits)``, ``p = exp(lp)`` and label-smoothed one-hot targets
``ytilde``::

    w_focal = (1 - p_y)^gamma_pos on the target, p_j^gamma_neg on the other classes
    w_hc    = (1 + p_y)^gamma_hc  on the target, 1 on the other classes
    loss    = -sum_c ytilde_c * lp_c * ((1 - xi) * w_focal_c + xi * w_hc_c)

with ``xi = 1 - f e / (E - 1)`` while ``f e < E``, else ``(f e / (E - 1) - 1) / (f - 1)``
(``0`` for ``f = 1``), for epoch ``e`` of ``E``. The README's commands use
``gamma_pos = gamma_neg = 2, gamma_hc = 3, f = 4, eps = 0.1``.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from efflax._src.losses._common import check_logits
from efflax._src.losses._common import nonnegative_if_concrete
from pallas_kernels import _checks

__all__ = ["cyclical_focal_loss", "cyclical_focal_schedule", "focal_loss"]


def _check_labels(logits: jax.Array, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    logits = check_logits("logits", logits)
    labels = _checks.as_array("labels", labels, layout="[batch]")
    if not jnp.issubdtype(labels.dtype, jnp.integer) or labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels (shape {labels.shape}, dtype {labels.dtype}) must be integer class ids "
            f"of shape {logits.shape[:1]}"
        )
    # Known at trace time only outside jit: an out-of-range id would weigh an all-zero row.
    _checks.indices_in_range("labels", labels, logits.shape[-1])
    return logits, labels


def _check_epoch(epoch: Any) -> None:
    """A known epoch must be a real scalar >= 0 (a traced one passes)."""
    if isinstance(epoch, str | bytes):
        raise ValueError(f"epoch={epoch!r} must be a number")
    value = _checks.concrete(epoch)
    if value is None:
        return
    if value.ndim or value.dtype.kind not in "iuf" or not 0 <= value < float("inf"):
        raise ValueError(f"epoch={epoch!r} must be a finite real scalar >= 0")


def _weighted_nll(
    logits: jax.Array, labels: jax.Array, weights_fn, label_smoothing: float
) -> jax.Array:
    """``-mean_b sum_c ytilde_c lp_c w_c`` with ``w = weights_fn(p, one_hot)``."""
    label_smoothing = _checks.probability("label_smoothing", label_smoothing, allow_one=False)
    num_classes = logits.shape[-1]
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    one_hot = jax.nn.one_hot(labels, num_classes, dtype=jnp.float32)
    weights = weights_fn(jnp.exp(log_probs), one_hot)
    targets = one_hot * (1.0 - label_smoothing) + label_smoothing / num_classes
    return -jnp.mean(jnp.sum(targets * log_probs * weights, axis=-1))


def _power(base: jax.Array, exponent: jax.Array) -> jax.Array:
    """``base ** exponent`` for ``base >= 0`` with a finite gradient where ``base == 0``.

    ``d/dz base(z)^g`` is ``g base^(g-1) base'``; at a saturated softmax (``p`` exactly 0 or 1)
    ``base' = 0`` and the limit is 0, but autodiff of ``**`` evaluates ``0 * inf`` for
    ``g < 1`` (NaN). Here the zero-base entries take a constant branch.
    """
    positive = base > 0
    powered = jnp.where(positive, base, 1.0) ** exponent
    return jnp.where(positive, powered, jnp.where(exponent == 0, 1.0, 0.0))


def _focal_weights(probs, one_hot, gamma_pos, gamma_neg):
    # (1 - p_y)^gamma_pos on the target entry, p_j^gamma_neg on the others.
    base = jnp.where(one_hot > 0, 1.0 - probs, probs)
    return _power(base, jnp.where(one_hot > 0, gamma_pos, gamma_neg))


def focal_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    gamma: float = 2.0,
    label_smoothing: float = 0.0,
) -> jax.Array:
    """Batch mean of ``-sum_c ytilde_c w_c log p_c``, the focal loss of the CFL code.

    ``w = (1 - p_y)^gamma`` on the target class and ``p_j^gamma`` on the others (those only
    matter with label smoothing); without smoothing this is Lin et al.'s
    ``-(1 - p_y)^gamma log p_y``, and ``gamma = 0`` is the (smoothed) cross-entropy.

    Args:
      logits: ``[batch, classes]``.
      labels: integer class ids ``[batch]``.
      gamma: focusing parameter, ``>= 0``.
      label_smoothing: ``eps`` in ``[0, 1)``; targets ``(1 - eps) one_hot + eps / classes``.

    Returns:
      A float32 scalar.
    """
    logits, labels = _check_labels(logits, labels)
    nonnegative_if_concrete("gamma", gamma)
    return _weighted_nll(
        logits,
        labels,
        lambda p, y: _focal_weights(p, y, gamma, gamma),
        label_smoothing,
    )


def cyclical_focal_schedule(epoch: Any, *, num_epochs: int, factor: float = 4.0) -> jax.Array:
    """The blend ``xi`` of the high-confidence loss at ``epoch`` (a traced value is fine).

    ``xi = 1 - f e / (E - 1)`` while ``f e < E``, else ``(f e / (E - 1) - 1) / (f - 1)`` (0 for
    ``f = 1``): from 1 at epoch 0 down to 0 at about ``E / f``, back to 1 at the last epoch
    ``E - 1``. Clipped to ``[0, 1]``, which changes nothing for integer epochs and an integer
    ``factor``; a fractional epoch (``step / steps_per_epoch``) or factor can otherwise dip
    slightly below 0 just before ``E / f``.

    Args:
      epoch: the 0-based epoch ``e`` (int or float, Python or traced).
      num_epochs: ``E >= 2``.
      factor: ``f >= 1`` (official default 2 in the class, 4 in the README's commands).

    Returns:
      A float32 scalar in ``[0, 1]``.
    """
    num_epochs = _checks.int_at_least("num_epochs", num_epochs, 2)
    factor = _checks.finite_float("factor", factor)
    if factor < 1:
        raise ValueError(f"factor={factor!r} must be >= 1")
    _check_epoch(epoch)
    scaled = factor * jnp.asarray(epoch, jnp.float32) / (num_epochs - 1)
    if factor == 1.0:
        rising = jnp.zeros_like(scaled)
    else:
        rising = (scaled - 1.0) / (factor - 1.0)
    falling_phase = factor * jnp.asarray(epoch, jnp.float32) < num_epochs
    return jnp.clip(jnp.where(falling_phase, 1.0 - scaled, rising), 0.0, 1.0)


def cyclical_focal_loss(
    logits: jax.Array,
    labels: jax.Array,
    epoch: Any,
    *,
    num_epochs: int,
    gamma_pos: float = 2.0,
    gamma_neg: float = 2.0,
    gamma_hc: float = 3.0,
    factor: float = 4.0,
    label_smoothing: float = 0.1,
) -> jax.Array:
    """Smith's cyclical focal loss at ``epoch`` (batch mean; see the module docstring).

    ``epoch`` may be traced (e.g. ``state.step // steps_per_epoch`` inside a jitted step), so
    the step compiles once for the whole run.

    Args:
      logits: ``[batch, classes]``.
      labels: integer class ids ``[batch]``.
      epoch: the 0-based epoch.
      num_epochs: the run's length in epochs, ``>= 2``.
      gamma_pos, gamma_neg: focal exponents on the target and the other classes, ``>= 0``.
      gamma_hc: exponent of the high-confidence weight ``(1 + p_y)^gamma_hc``, ``>= 0``.
      factor: the schedule's ``f >= 1``.
      label_smoothing: ``eps`` in ``[0, 1)``.

    Returns:
      A float32 scalar.
    """
    logits, labels = _check_labels(logits, labels)
    for name, value in (("gamma_pos", gamma_pos), ("gamma_neg", gamma_neg), ("gamma_hc", gamma_hc)):
        nonnegative_if_concrete(name, value)
    xi = cyclical_focal_schedule(epoch, num_epochs=num_epochs, factor=factor)

    def weights(probs, one_hot):
        focal = _focal_weights(probs, one_hot, gamma_pos, gamma_neg)
        confident = jnp.where(one_hot > 0, (1.0 + probs) ** gamma_hc, 1.0)
        return (1.0 - xi) * focal + xi * confident

    return _weighted_nll(logits, labels, weights, label_smoothing)
