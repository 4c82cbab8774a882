"""The USI knowledge-distillation loss: soft-target cross-entropy plus a weighted KL to a teacher.

Ridnik, Lawen, Ben-Baruch, Noy, "Solving ImageNet: a Unified Scheme for Training any Backbone to
Top Results", arXiv:2204.03475, 2022. The student is trained on
``CE(student, mixed targets) + alpha_kd * KL(softmax(teacher) || softmax(student))`` where the
teacher (frozen, no gradient) sees exactly the same augmented, mixed batch as the student.

Official code (Alibaba-MIIL/Solving_ImageNet, ``train.py``): ``F.kl_div(log_softmax(student),
softmax(teacher), reduction='batchmean')`` at temperature 1, ``alpha_kd = 5``; the maintainers
report that dropping the label term (KD-only) gives the same accuracy within noise.

Example:
  >>> loss = distillation_loss(student_logits, teacher_logits, soft_targets)   # USI
  >>> loss = distillation_loss(student_logits, teacher_logits)                 # KD-only
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from efflax._src.losses._common import check_logits
from efflax._src.losses._common import nonnegative_if_concrete
from efflax._src.losses._common import positive_if_concrete
from efflax._src.losses._common import targets_as_probabilities

__all__ = ["distillation_loss", "soft_target_cross_entropy"]


def soft_target_cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Batch mean of ``-sum_c y_c log softmax(logits)_c`` (timm's ``SoftTargetCrossEntropy``).

    Args:
      logits: ``[batch, classes]``.
      labels: integer class ids ``[batch]`` or soft (mixed, smoothed) targets
        ``[batch, classes]``.

    Returns:
      A float32 scalar.
    """
    logits = check_logits("logits", logits)
    batch, num_classes = logits.shape
    targets = targets_as_probabilities(labels, num_classes, batch)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    # A target of exactly 0 on a class of log-probability -inf contributes 0, not NaN.
    per_class = jnp.where(targets > 0, targets * log_probs, 0.0)
    return -jnp.mean(jnp.sum(per_class, axis=-1))


def _kl_teacher_student(
    student_logits: jax.Array, teacher_logits: jax.Array, temperature: Any
) -> jax.Array:
    """Batch mean of ``KL(softmax(teacher/T) || softmax(student/T))``; no gradient to the teacher."""
    teacher = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32)) / temperature
    student = student_logits.astype(jnp.float32) / temperature
    log_p = jax.nn.log_softmax(teacher, axis=-1)
    log_q = jax.nn.log_softmax(student, axis=-1)
    p = jnp.exp(log_p)
    # Classes the teacher gives probability 0 (e.g. masked with -inf) contribute 0 (0 log 0 = 0).
    per_class = jnp.where(p > 0, p * (log_p - log_q), 0.0)
    return jnp.mean(jnp.sum(per_class, axis=-1))


def distillation_loss(
    student_logits: jax.Array,
    teacher_logits: jax.Array,
    labels: jax.Array | None = None,
    *,
    alpha_kd: float = 5.0,
    temperature: float = 1.0,
) -> jax.Array:
    """The USI loss: ``CE(student, labels) + alpha_kd * T^2 * KL(teacher_T || student_T)``.

    ``teacher_T = softmax(teacher_logits / T)`` and ``student_T = softmax(student_logits / T)``;
    both terms are batch means (the KL is PyTorch's ``reduction='batchmean'``). The ``T^2``
    factor (Hinton et al. 2015) keeps the gradient scale independent of ``T``; USI uses
    ``T = 1``, where it is 1. The teacher's logits are taken without gradient. Everything is
    computed in float32.

    Args:
      student_logits: ``[batch, classes]``.
      teacher_logits: ``[batch, classes]``, from the teacher run on the *same* (augmented,
        mixed) inputs as the student.
      labels: integer class ids ``[batch]`` or soft targets ``[batch, classes]`` (from
        :func:`mixup` / :func:`cutmix`); ``None`` for KD-only training, which returns the KL
        term alone, ``alpha_kd * T^2 * KL`` (so the full loss minus the KD-only loss is the
        cross-entropy; pass ``alpha_kd=1`` for the bare KL).
      alpha_kd: weight of the KL term, ``>= 0`` (USI: 5, so the teacher carries 5/6 of the
        weight).
      temperature: softmax temperature ``T > 0`` of both distributions in the KL term (the
        cross-entropy always uses ``T = 1``).

    Returns:
      A float32 scalar.

    Raises:
      ValueError: logits that are not ``[batch, classes]`` or whose shapes differ, labels of the
        wrong shape, ``alpha_kd < 0`` or ``temperature <= 0``.
    """
    student_logits = check_logits("student_logits", student_logits)
    teacher_logits = check_logits("teacher_logits", teacher_logits)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits.shape={student_logits.shape} and "
            f"teacher_logits.shape={teacher_logits.shape} must match"
        )
    nonnegative_if_concrete("alpha_kd", alpha_kd)
    positive_if_concrete("temperature", temperature)
    kd = (
        alpha_kd * temperature**2 * _kl_teacher_student(student_logits, teacher_logits, temperature)
    )
    if labels is None:
        return kd
    return soft_target_cross_entropy(student_logits, labels) + kd
