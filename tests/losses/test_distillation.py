"""USI distillation loss and mixup/cutmix against hand-written float64 NumPy formulas."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflax.losses import cutmix
from efflax.losses import distillation_loss
from efflax.losses import mix_batch
from efflax.losses import mixup
from efflax.losses import soft_target_cross_entropy


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _reference(student, teacher, targets, alpha, temperature):
    """(loss, d loss / d student) in float64; targets None is KD-only."""
    s, t = np.asarray(student, np.float64), np.asarray(teacher, np.float64)
    batch = s.shape[0]
    p = _softmax(t / temperature)
    q = _softmax(s / temperature)
    kl = np.sum(p * (np.log(p) - np.log(q))) / batch
    loss = alpha * temperature**2 * kl
    # d/ds of alpha T^2 KL(p_T || q_T) is alpha T (q_T - p_T) per example.
    grad = alpha * temperature * (q - p) / batch
    if targets is not None:
        probs = _softmax(s)
        loss += -np.sum(targets * np.log(probs)) / batch
        grad += (probs - targets) / batch
    return loss, grad


@pytest.mark.parametrize(
    "label_kind, alpha, temperature",
    [("int", 5.0, 1.0), ("soft", 5.0, 1.0), ("soft", 0.7, 3.0), ("none", 5.0, 1.0)],
)
def test_distillation_loss_matches_float64_reference(label_kind, alpha, temperature):
    rng = np.random.default_rng(0)
    student = 2.0 * rng.standard_normal((7, 5), np.float32)
    teacher = 2.0 * rng.standard_normal((7, 5), np.float32)
    int_labels = rng.integers(0, 5, 7).astype(np.int32)
    soft = _softmax(rng.standard_normal((7, 5))).astype(np.float32)
    labels = {"int": int_labels, "soft": soft, "none": None}[label_kind]
    targets = {
        "int": np.eye(5)[np.asarray(int_labels)],
        "soft": np.asarray(soft, np.float64),
        "none": None,
    }[label_kind]

    def loss_fn(s, t):
        return distillation_loss(s, t, labels, alpha_kd=alpha, temperature=temperature)

    loss, (grad_s, grad_t) = jax.jit(jax.value_and_grad(loss_fn, argnums=(0, 1)))(student, teacher)
    want_loss, want_grad = _reference(student, teacher, targets, alpha, temperature)
    chex.assert_trees_all_close(float(loss), want_loss, rtol=1e-5)
    chex.assert_trees_all_close(np.asarray(grad_s), want_grad, atol=1e-6)
    # The teacher is frozen: no gradient reaches its logits.
    np.testing.assert_array_equal(np.asarray(grad_t), 0.0)


def test_kd_only_is_the_kl_term_alone():
    rng = np.random.default_rng(1)
    student, teacher = rng.standard_normal((2, 6, 4), np.float32)
    labels = rng.integers(0, 4, 6).astype(np.int32)
    full = distillation_loss(student, teacher, labels, alpha_kd=5.0)
    kd_only = distillation_loss(student, teacher, alpha_kd=5.0)
    p, q = _softmax(teacher), _softmax(student)
    bare_kl = np.sum(p * np.log(p / q)) / 6
    np.testing.assert_allclose(float(kd_only), 5.0 * bare_kl, rtol=1e-5)
    np.testing.assert_allclose(
        float(distillation_loss(student, teacher, alpha_kd=1.0)), bare_kl, rtol=1e-5
    )
    np.testing.assert_allclose(
        float(full - kd_only), float(soft_target_cross_entropy(student, labels)), rtol=1e-5
    )
    # A student equal to its teacher has zero KD loss.
    assert abs(float(distillation_loss(teacher, teacher))) < 1e-6


def test_low_precision_logits_and_masked_teacher_classes():
    rng = np.random.default_rng(2)
    student = jnp.asarray(rng.standard_normal((4, 6)), jnp.bfloat16)
    teacher = rng.standard_normal((4, 6)).astype(np.float32)
    teacher[:, 0] = -np.inf
    labels = np.arange(4, dtype=np.int32) + 1
    loss = jax.jit(distillation_loss)(student, teacher, labels)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    grad = jax.jit(jax.grad(lambda s: distillation_loss(s, teacher, labels)))(
        student.astype(jnp.float32)
    )
    assert np.all(np.isfinite(np.asarray(grad)))


def test_distillation_rejects_bad_input():
    s = jnp.zeros((4, 3))
    with pytest.raises(ValueError, match=r"teacher_logits.shape=\(4, 5\)"):
        distillation_loss(s, jnp.zeros((4, 5)))
    with pytest.raises(ValueError, match="alpha_kd=-1.0"):
        distillation_loss(s, s, alpha_kd=-1.0)
    with pytest.raises(ValueError, match="temperature=0"):
        distillation_loss(s, s, temperature=0)
    with pytest.raises(ValueError, match=r"labels.shape=\(5,\)"):
        distillation_loss(s, s, jnp.zeros((5,), jnp.int32))
    with pytest.raises(ValueError, match=r"student_logits.shape=\(4,\)"):
        distillation_loss(jnp.zeros(4), jnp.zeros(4))


def _pasted_fraction(mixed, x):
    """Per example, the fraction of elements taken from the mirrored partner."""
    pasted = np.asarray(mixed == x[::-1]).reshape(len(x), -1).mean(-1)
    pasted[len(x) // 2] = pasted[0]  # the middle example of an odd batch is its own partner
    return pasted


def test_cutmix_targets_match_the_pasted_area():
    # Distinct values everywhere, so a pasted element is recognisable.
    x = np.arange(5 * 8 * 6 * 2, dtype=np.float32).reshape(5, 8, 6, 2)
    labels = np.arange(5, dtype=np.int32)
    keys = jax.random.split(jax.random.key(0), 4)
    mixed, targets = jax.jit(jax.vmap(lambda k: cutmix(k, x, labels, num_classes=5)))(keys)
    for m, t in zip(np.asarray(mixed), np.asarray(targets), strict=True):
        pasted = _pasted_fraction(m, x)
        np.testing.assert_allclose(pasted, pasted[0])
        np.testing.assert_allclose(t[0, 0], 1.0 - pasted[0], atol=1e-6)
        np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
        # The box spans both spatial axes and all channels.
        box = np.asarray(m != x)[0]
        np.testing.assert_array_equal(box[..., 0], box[..., 1])


def test_mix_batch_on_sequences_is_mixup_or_cutmix():
    # Each draw is either mixup (lam x + (1 - lam) x[::-1], targets mixed by lam) or a cutmix
    # segment whose length matches the targets' coefficient.
    x = np.arange(5 * 40, dtype=np.float32).reshape(5, 40) + 1.0
    labels = np.arange(5, dtype=np.int32)
    keys = jax.random.split(jax.random.key(7), 6)
    mixed, targets = jax.jit(
        jax.vmap(lambda k: mix_batch(k, x, labels, num_classes=5, label_smoothing=0.1))
    )(keys)
    kinds = set()
    for m, t in zip(np.asarray(mixed), np.asarray(targets), strict=True):
        np.testing.assert_allclose(t.sum(-1), 1.0, rtol=1e-6)
        assert t.min() >= 0.1 / 5 - 1e-7
        lam = (t[0, 0] - 0.1 / 5) / (1 - 0.1)  # undo the smoothing
        pasted = _pasted_fraction(m, x)
        if np.allclose(pasted, pasted[0]) and abs(lam - (1 - pasted[0])) < 1e-5:
            kinds.add("cutmix")
        else:
            np.testing.assert_allclose(m, lam * x + (1 - lam) * x[::-1], rtol=1e-5)
            kinds.add("mixup")
    assert kinds == {"cutmix", "mixup"}
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="alpha=0"):
        mixup(key, x, labels, num_classes=5, alpha=0)
    with pytest.raises(ValueError, match="switch_prob=1.5"):
        mix_batch(key, x, labels, num_classes=5, switch_prob=1.5)
    with pytest.raises(ValueError, match="spatial_axes"):
        cutmix(key, x, labels, num_classes=5, spatial_axes=(0,))
