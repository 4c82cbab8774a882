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
    ks = jax.random.split(jax.random.key(0), 4)
    student = 2.0 * jax.random.normal(ks[0], (7, 5))
    teacher = 2.0 * jax.random.normal(ks[1], (7, 5))
    int_labels = jax.random.randint(ks[2], (7,), 0, 5)
    soft = jax.nn.softmax(jax.random.normal(ks[3], (7, 5)))
    labels = {"int": int_labels, "soft": soft, "none": None}[label_kind]
    targets = {
        "int": np.eye(5)[np.asarray(int_labels)],
        "soft": np.asarray(soft, np.float64),
        "none": None,
    }[label_kind]

    def loss_fn(s, t):
        return distillation_loss(s, t, labels, alpha_kd=alpha, temperature=temperature)

    loss, (grad_s, grad_t) = jax.value_and_grad(loss_fn, argnums=(0, 1))(student, teacher)
    want_loss, want_grad = _reference(student, teacher, targets, alpha, temperature)
    chex.assert_trees_all_close(float(loss), want_loss, rtol=1e-5)
    chex.assert_trees_all_close(np.asarray(grad_s), want_grad, atol=1e-6)
    # The teacher is frozen: no gradient reaches its logits.
    np.testing.assert_array_equal(np.asarray(grad_t), 0.0)


def test_kd_only_is_the_kl_term_alone():
    ks = jax.random.split(jax.random.key(1), 3)
    student, teacher = jax.random.normal(ks[0], (6, 4)), jax.random.normal(ks[1], (6, 4))
    labels = jax.random.randint(ks[2], (6,), 0, 4)
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
    student = jax.random.normal(jax.random.key(2), (4, 6)).astype(jnp.bfloat16)
    teacher = jax.random.normal(jax.random.key(3), (4, 6)).at[:, 0].set(-jnp.inf)
    loss = distillation_loss(student, teacher, jnp.arange(4) + 1)
    assert loss.dtype == jnp.float32 and np.isfinite(float(loss))
    grad = jax.grad(lambda s: distillation_loss(s, teacher, jnp.arange(4) + 1))(
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


def test_mixup_mixes_inputs_and_targets_with_one_coefficient():
    x = jax.random.normal(jax.random.key(4), (6, 3, 2))
    labels = jnp.array([0, 1, 2, 3, 4, 5])  # distinct from their mirrored partners
    mixed, targets = jax.jit(lambda k: mixup(k, x, labels, num_classes=7))(jax.random.key(5))
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)
    lam = float(targets[0, 0])
    assert 0.0 < lam < 1.0
    want = lam * np.asarray(x) + (1 - lam) * np.asarray(x)[::-1]
    np.testing.assert_allclose(np.asarray(mixed), want, atol=1e-6)
    np.testing.assert_allclose(np.asarray(targets[0, 5]), 1 - lam, rtol=1e-6)


@pytest.mark.parametrize("shape", [(5, 8, 6, 2), (5, 40)])
def test_cutmix_targets_match_the_pasted_area(shape):
    # Distinct values everywhere, so a pasted element is recognisable.
    x = jnp.arange(np.prod(shape), dtype=jnp.float32).reshape(shape)
    labels = jnp.array([0, 1, 2, 3, 4])
    for seed in range(4):
        mixed, targets = cutmix(jax.random.key(seed), x, labels, num_classes=5)
        pasted = np.asarray(mixed == x[::-1]).reshape(5, -1).mean(-1)
        pasted[2] = pasted[0]  # the middle example is its own partner
        np.testing.assert_allclose(np.asarray(targets[0, 0]), 1.0 - pasted[0], atol=1e-6)
        np.testing.assert_allclose(pasted, pasted[0])
        np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)


def test_mix_batch_smoothing_and_bad_arguments():
    x = jax.random.normal(jax.random.key(6), (4, 8, 8, 1))
    labels = jnp.array([0, 1, 2, 3])
    _, targets = mix_batch(jax.random.key(7), x, labels, num_classes=4, label_smoothing=0.1)
    np.testing.assert_allclose(np.asarray(targets).sum(-1), 1.0, rtol=1e-6)
    assert float(targets.min()) >= 0.1 / 4 - 1e-7
    with pytest.raises(ValueError, match="alpha=0"):
        mixup(jax.random.key(0), x, labels, num_classes=4, alpha=0)
    with pytest.raises(ValueError, match="switch_prob=1.5"):
        mix_batch(jax.random.key(0), x, labels, num_classes=4, switch_prob=1.5)
    with pytest.raises(ValueError, match="spatial_axes"):
        cutmix(jax.random.key(0), x, labels, num_classes=4, spatial_axes=(0,))
