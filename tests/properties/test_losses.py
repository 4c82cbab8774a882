"""Properties of ``efflax.losses``: soft-target cross-entropy, distillation, mixup and CutMix."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from _hyp import INVALID
from _hyp import VALID
from _hyp import assert_close
from _hyp import bad_ints
from _hyp import bad_keys
from _hyp import bad_positive
from _hyp import bad_probabilities
from _hyp import f64
from _hyp import normal
from _hyp import refused
from _hyp import seeds
from _hyp import softmax64
from hypothesis import given
from hypothesis import strategies as st

from efflax import losses as L

BATCH, CLASSES = 4, 3
KEY = jax.random.key(0)
dtypes = st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16])


def _labels(seed: int, soft: bool) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if soft:
        return softmax64(rng.standard_normal((BATCH, CLASSES))).astype(np.float32)
    return rng.integers(0, CLASSES, BATCH).astype(np.int32)


def _targets64(labels: np.ndarray) -> np.ndarray:
    return np.eye(CLASSES)[labels] if labels.ndim == 1 else f64(labels)


def _log_softmax64(x):
    return np.log(softmax64(x))


@VALID
@given(seeds, dtypes, st.booleans(), st.floats(0.1, 10.0))
def test_soft_target_cross_entropy_matches_numpy(seed, dtype, soft, scale):
    logits = jnp.asarray(normal(seed, (BATCH, CLASSES), scale), dtype)
    labels = _labels(seed, soft)
    expected = -np.mean(np.sum(_targets64(labels) * _log_softmax64(f64(logits)), -1))
    assert_close(L.soft_target_cross_entropy(logits, jnp.asarray(labels)), expected, rtol=1e-5)


@VALID
@given(seeds, dtypes, st.booleans(), st.floats(0.0, 10.0), st.floats(0.25, 8.0))
def test_distillation_loss_matches_numpy(seed, dtype, with_labels, alpha, temperature):
    student = jnp.asarray(normal(seed, (BATCH, CLASSES), 2.0), dtype)
    teacher = jnp.asarray(normal(seed + 1, (BATCH, CLASSES), 2.0), dtype)
    p = softmax64(f64(teacher) / temperature)
    kl = np.mean(np.sum(p * (np.log(p) - _log_softmax64(f64(student) / temperature)), -1))
    expected = alpha * temperature**2 * kl
    labels = None
    if with_labels:
        labels = _labels(seed, soft=False)
        expected += -np.mean(np.sum(_targets64(labels) * _log_softmax64(f64(student)), -1))
    got = L.distillation_loss(
        student, teacher, None if labels is None else jnp.asarray(labels), alpha_kd=alpha,
        temperature=temperature,
    )  # fmt: skip
    assert_close(got, expected, rtol=1e-4, atol=1e-5)


@INVALID
@given(st.data())
def test_losses_refuse(data):
    logits = jnp.asarray(normal(0, (BATCH, CLASSES)))
    labels = jnp.asarray(_labels(0, soft=False))
    case = data.draw(
        st.sampled_from(
            ["rank", "dtype", "empty", "labels_range", "labels_shape", "soft_negative",
             "labels_type", "teacher", "temperature", "alpha"]
        )
    )  # fmt: skip
    ce = L.soft_target_cross_entropy
    if case == "rank":
        bad = data.draw(st.sampled_from([jnp.ones(3), jnp.ones((2, 3, 4)), jnp.float32(1)]))
        refused(lambda: ce(bad, labels), "logits")
    elif case == "dtype":
        dtype = data.draw(st.sampled_from([jnp.int32, jnp.bool_, jnp.complex64]))
        refused(lambda: ce(jnp.ones((BATCH, CLASSES), dtype), labels), "logits")
    elif case == "empty":
        shape = data.draw(st.sampled_from([(0, CLASSES), (BATCH, 0)]))
        refused(lambda: ce(jnp.ones(shape), jnp.zeros(shape[0], jnp.int32)), "logits")
    elif case == "labels_range":
        bad = data.draw(st.sampled_from([-1, CLASSES, 100]))
        refused(lambda: ce(logits, labels.at[0].set(bad)), "labels")
    elif case == "labels_shape":
        bad = data.draw(
            st.sampled_from([jnp.zeros(BATCH - 1, jnp.int32), jnp.zeros((BATCH, CLASSES + 1))])
        )
        refused(lambda: ce(logits, bad), "labels")
    elif case == "soft_negative":
        refused(lambda: ce(logits, jnp.full((BATCH, CLASSES), -0.5)), "labels")
    elif case == "labels_type":
        bad = data.draw(st.sampled_from(["abc", jnp.ones(BATCH, bool)]))
        refused(lambda: ce(logits, bad), "labels")
    elif case == "teacher":
        refused(
            lambda: L.distillation_loss(logits, jnp.ones((BATCH, CLASSES + 1))), "teacher_logits"
        )
    elif case == "temperature":
        bad = data.draw(bad_positive().filter(lambda v: v is not None))
        refused(lambda: L.distillation_loss(logits, logits, temperature=bad), "temperature")
    else:
        bad = data.draw(bad_positive(allow_zero=True).filter(lambda v: v is not None))
        refused(lambda: L.distillation_loss(logits, logits, alpha_kd=bad), "alpha_kd")


def _smoothed(labels, smoothing):
    return _targets64(labels) * (1 - smoothing) + smoothing / CLASSES


@VALID
@given(seeds, st.floats(0.1, 4.0), st.floats(0.0, 0.5), st.booleans())
def test_mixup_is_one_convex_combination(seed, alpha, smoothing, soft):
    x = normal(seed, (BATCH, 5))
    labels = _labels(seed, soft)
    mixed, targets = L.mixup(
        jax.random.key(seed), jnp.asarray(x), jnp.asarray(labels), num_classes=CLASSES,
        alpha=alpha, label_smoothing=smoothing,
    )  # fmt: skip
    flipped = f64(x)[::-1]
    diff = f64(x) - flipped
    lam = np.sum((f64(mixed) - flipped) * diff) / np.sum(diff**2)
    assert 0.0 <= lam <= 1.0 + 1e-6
    assert_close(mixed, lam * f64(x) + (1 - lam) * flipped, atol=1e-4)
    t = _smoothed(labels, smoothing)
    assert_close(targets, lam * t + (1 - lam) * t[::-1], atol=1e-4)
    assert_close(np.sum(f64(targets), -1), np.ones(BATCH))


@VALID
@given(seeds, st.floats(0.1, 4.0), st.sampled_from([(BATCH, 8), (BATCH, 6, 5, 2)]))
def test_cutmix_pastes_one_box_and_mixes_by_its_area(seed, alpha, shape):
    x = normal(seed, shape)
    labels = _labels(seed, soft=False)
    mixed, targets = L.cutmix(
        jax.random.key(seed), jnp.asarray(x), jnp.asarray(labels), num_classes=CLASSES, alpha=alpha
    )
    mixed = np.asarray(mixed)
    from_flipped = mixed == x[::-1]
    assert np.all(from_flipped | (mixed == x))
    # The box is the same for every example and every channel.
    box = from_flipped[0] if len(shape) == 2 else from_flipped[0, ..., 0]
    assert np.all(from_flipped == (box if len(shape) == 2 else box[..., None])[None])
    kept = 1.0 - box.mean()
    t = _targets64(labels)
    assert_close(targets, kept * t + (1 - kept) * t[::-1], atol=1e-6)


@VALID
@given(seeds, st.sampled_from([0.0, 1.0]))
def test_mix_batch_is_cutmix_or_mixup(seed, switch_prob):
    x = jnp.asarray(normal(seed, (BATCH, 6)))
    labels = jnp.asarray(_labels(seed, soft=False))
    key = jax.random.key(seed)
    out, targets = L.mix_batch(key, x, labels, num_classes=CLASSES, switch_prob=switch_prob)
    _, mixup_key, cutmix_key = jax.random.split(key, 3)
    if switch_prob == 1.0:
        want = L.cutmix(cutmix_key, x, labels, num_classes=CLASSES)
    else:
        want = L.mixup(mixup_key, x, labels, num_classes=CLASSES)
    assert_close(out, f64(want[0]))
    assert_close(targets, f64(want[1]))


@INVALID
@given(st.data())
def test_mixing_refuses(data):
    x = jnp.ones((BATCH, 6))
    labels = jnp.asarray(_labels(0, soft=False))
    fn = data.draw(st.sampled_from([L.mixup, L.cutmix, L.mix_batch]))
    arg = data.draw(
        st.sampled_from(["key", "num_classes", "label_smoothing", "alpha", "x", "labels"])
    )
    kwargs = dict(num_classes=CLASSES)
    args = [KEY, x, labels]
    name = arg
    if arg == "key":
        args[0] = data.draw(bad_keys())
    elif arg == "num_classes":
        kwargs[arg] = data.draw(bad_ints())
    elif arg == "label_smoothing":
        kwargs[arg] = data.draw(bad_probabilities(allow_one=False))
    elif arg == "alpha":
        key = {L.mixup: "alpha", L.cutmix: "alpha", L.mix_batch: "mixup_alpha"}[fn]
        kwargs[key] = data.draw(bad_positive())
    elif arg == "x":
        args[1] = data.draw(st.sampled_from([jnp.ones(BATCH), "x"]))
    else:
        args[2] = labels.at[0].set(data.draw(st.sampled_from([-1, CLASSES])))
    refused(lambda: fn(*args, **kwargs), name)


@INVALID
@given(st.data())
def test_cutmix_and_mix_batch_refuse_their_own_arguments(data):
    x = jnp.ones((BATCH, 6))
    labels = jnp.asarray(_labels(0, soft=False))
    if data.draw(st.booleans()):
        bad = data.draw(st.sampled_from([(0,), (2,), (1, 1), 1, (1.0,), (True,), ()]))
        refused(
            lambda: L.cutmix(KEY, x, labels, num_classes=CLASSES, spatial_axes=bad), "spatial_axes"
        )
    else:
        bad = data.draw(bad_probabilities())
        refused(
            lambda: L.mix_batch(KEY, x, labels, num_classes=CLASSES, switch_prob=bad), "switch_prob"
        )


@INVALID
@given(st.sampled_from([jnp.int32, jnp.uint8]))
def test_mixup_refuses_integer_inputs(dtype):
    # An integer x would round the mixing weight: mixup refuses instead of returning x[::-1].
    refused(
        lambda: L.mixup(
            KEY, jnp.ones((BATCH, 6), dtype), jnp.zeros(BATCH, jnp.int32), num_classes=2
        ),
        "x",
    )
