"""Mixup and CutMix: mixed inputs with matching soft targets, for the USI distillation recipe.

Zhang et al., "mixup: Beyond Empirical Risk Minimization", arXiv:1710.09412 (2017); Yun et al.,
"CutMix: Regularization Strategy to Train Strong Classifiers with Localizable Features",
arXiv:1905.04899 (2019). As in timm's ``Mixup`` (batch mode), which the USI recipe
(arXiv:2204.03475) uses with ``mixup_alpha=0.8, cutmix_alpha=1.0, switch_prob=0.5``: one mixing
coefficient per batch, each example mixed with the example at the mirrored batch position
(``x[::-1]``). The teacher of :func:`distillation_loss` must see the *returned* mixed batch.

Example:
  >>> x_mixed, targets = mix_batch(key, x, labels, num_classes=10)
  >>> loss = distillation_loss(model(x_mixed), teacher(x_mixed), targets)
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from efflax._src.losses._common import targets_as_probabilities
from pallas_kernels import _checks

__all__ = ["cutmix", "mix_batch", "mixup"]


def _prepare(
    x: jax.Array, labels: jax.Array, num_classes: int, label_smoothing: float
) -> tuple[jax.Array, jax.Array]:
    """``(x as an array, smoothed float32 targets [batch, num_classes])``."""
    num_classes = _checks.int_at_least("num_classes", num_classes, 1)
    label_smoothing = _checks.probability("label_smoothing", label_smoothing, allow_one=False)
    # An empty batch or a zero-length axis has nothing to mix (and CutMix no box to draw).
    x = _checks.as_array("x", x, min_ndim=2, kind="real", nonempty=True, layout="[batch, ...]")
    targets = targets_as_probabilities(labels, num_classes, x.shape[0], batch_of="x")
    return x, targets * (1.0 - label_smoothing) + label_smoothing / num_classes


def _mix_targets(targets: jax.Array, lam: jax.Array) -> jax.Array:
    return lam * targets + (1.0 - lam) * targets[::-1]


def mixup(
    key: jax.Array,
    x: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    alpha: float = 0.8,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """``lam * x + (1 - lam) * x[::-1]`` with ``lam ~ Beta(alpha, alpha)`` (one per batch).

    Args:
      key: a PRNG key.
      x: inputs ``[batch, ...]``, floating (cast integer images to float first).
      labels: integer class ids ``[batch]`` or soft targets ``[batch, num_classes]``.
      num_classes: number of classes.
      alpha: the Beta distribution's parameter, ``> 0``.
      label_smoothing: smoothing applied to the targets before mixing (USI: 0).

    Returns:
      ``(mixed inputs, float32 soft targets [batch, num_classes])``; target rows sum to 1.
    """
    _checks.prng_key("key", key)
    alpha = _checks.positive_float("alpha", alpha)
    x, targets = _prepare(x, labels, num_classes, label_smoothing)
    # An integer x would round the mixing weight to 0 or 1: mix in floating point.
    _checks.array("x", x, kind="floating")
    lam = jax.random.beta(key, alpha, alpha)
    mixed = lam.astype(x.dtype) * x + (1 - lam).astype(x.dtype) * x[::-1]
    return mixed, _mix_targets(targets, lam)


def _default_spatial_axes(x: jax.Array) -> tuple[int, ...]:
    # [b, h, w, c] images; [b, length] or [b, length, channels] sequences.
    return (1, 2) if x.ndim == 4 else (1,)


def _cutmix_box(
    key: jax.Array, shape: Sequence[int], spatial_axes: Sequence[int], lam: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The boolean box mask (broadcastable to ``shape``) and the kept fraction ``1 - area``."""
    # Each side is cut to (1 - lam)^(1/d) of its length, so the box covers 1 - lam before
    # clipping at the border (timm: cut_rat = sqrt(1 - lam) for images).
    ratio = (1.0 - lam) ** (1.0 / len(spatial_axes))
    mask = jnp.ones((1,) * len(shape), bool)
    area = jnp.ones((), jnp.float32)
    for axis, axis_key in zip(spatial_axes, jax.random.split(key, len(spatial_axes)), strict=True):
        size = shape[axis]
        cut = jnp.floor(size * ratio).astype(jnp.int32)
        center = jax.random.randint(axis_key, (), 0, size)
        low = jnp.clip(center - cut // 2, 0, size)
        high = jnp.clip(center + cut // 2, 0, size)
        index = jax.lax.broadcasted_iota(
            jnp.int32, [size if a == axis else 1 for a in range(len(shape))], axis
        )
        mask = mask & (index >= low) & (index < high)
        area = area * (high - low).astype(jnp.float32) / size
    return mask, 1.0 - area


def cutmix(
    key: jax.Array,
    x: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    alpha: float = 1.0,
    spatial_axes: Sequence[int] | None = None,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """Pastes a box of ``x[::-1]`` into ``x``; targets are mixed by the box's actual area.

    ``lam ~ Beta(alpha, alpha)``; the box has sides ``(1 - lam)^(1/d)`` of each spatial axis
    (``d`` axes) around a uniform centre, clipped at the border, and the targets use
    ``lam = 1 - area`` after clipping (timm's ``correct_lam``).

    Args:
      key: a PRNG key.
      x: inputs ``[batch, ...]``.
      labels: integer class ids ``[batch]`` or soft targets ``[batch, num_classes]``.
      num_classes: number of classes.
      alpha: the Beta distribution's parameter, ``> 0``.
      spatial_axes: the axes the box spans; default ``(1, 2)`` for ``[b, h, w, c]`` inputs and
        ``(1,)`` otherwise (``[b, length]`` or ``[b, length, channels]``).
      label_smoothing: smoothing applied to the targets before mixing.

    Returns:
      ``(mixed inputs, float32 soft targets [batch, num_classes])``.
    """
    _checks.prng_key("key", key)
    alpha = _checks.positive_float("alpha", alpha)
    x, targets = _prepare(x, labels, num_classes, label_smoothing)
    if spatial_axes is not None and not isinstance(spatial_axes, Sequence):
        raise ValueError(f"spatial_axes={spatial_axes!r} must be a sequence of axes, e.g. (1,)")
    axes = tuple(_default_spatial_axes(x) if spatial_axes is None else spatial_axes)
    if (
        not axes
        or any(
            isinstance(a, bool) or not isinstance(a, numbers.Integral) or not 1 <= a < x.ndim
            for a in axes
        )
        or len(set(axes)) != len(axes)
    ):
        raise ValueError(f"spatial_axes={spatial_axes!r} must be distinct axes in [1, {x.ndim})")
    lam_key, box_key = jax.random.split(key)
    lam = jax.random.beta(lam_key, alpha, alpha)
    mask, kept = _cutmix_box(box_key, x.shape, axes, lam)
    return jnp.where(mask, x[::-1], x), _mix_targets(targets, kept)


def mix_batch(
    key: jax.Array,
    x: jax.Array,
    labels: jax.Array,
    *,
    num_classes: int,
    mixup_alpha: float = 0.8,
    cutmix_alpha: float = 1.0,
    switch_prob: float = 0.5,
    spatial_axes: Sequence[int] | None = None,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, jax.Array]:
    """CutMix with probability ``switch_prob``, else mixup (timm's ``Mixup``; USI's defaults).

    Args: as :func:`mixup` and :func:`cutmix`; ``switch_prob`` in ``[0, 1]``.

    Returns:
      ``(mixed inputs, float32 soft targets [batch, num_classes])``.
    """
    _checks.prng_key("key", key)
    switch_prob = _checks.probability("switch_prob", switch_prob)
    _checks.positive_float("mixup_alpha", mixup_alpha)
    _checks.positive_float("cutmix_alpha", cutmix_alpha)
    switch_key, mixup_key, cutmix_key = jax.random.split(key, 3)
    common = dict(num_classes=num_classes, label_smoothing=label_smoothing)
    x_mixup, t_mixup = mixup(mixup_key, x, labels, alpha=mixup_alpha, **common)
    x_cut, t_cut = cutmix(
        cutmix_key, x, labels, alpha=cutmix_alpha, spatial_axes=spatial_axes, **common
    )
    use_cutmix = jax.random.uniform(switch_key) < switch_prob
    return jnp.where(use_cutmix, x_cut, x_mixup), jnp.where(use_cutmix, t_cut, t_mixup)
