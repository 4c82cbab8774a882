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


# --------------------------------------------------------------------------- focal losses


def _focal64(logits, labels, weights_fn, smoothing):
    p = softmax64(f64(logits))
    one_hot = np.eye(CLASSES)[labels]
    targets = one_hot * (1 - smoothing) + smoothing / CLASSES
    return -np.mean(np.sum(targets * np.log(p) * weights_fn(p, one_hot), -1))


def _schedule64(epoch, num_epochs, factor):
    scaled = factor * epoch / (num_epochs - 1)
    if factor * epoch < num_epochs:
        xi = 1 - scaled
    else:
        xi = 0.0 if factor == 1 else (scaled - 1) / (factor - 1)
    return min(max(xi, 0.0), 1.0)


@VALID
@given(
    seeds,
    st.floats(0.0, 4.0),
    st.floats(0.0, 0.3),
    st.integers(0, 9),
    st.sampled_from([1.0, 2.0, 4.0]),
)
def test_focal_losses_match_numpy(seed, gamma, smoothing, epoch, factor):
    logits = normal(seed, (BATCH, CLASSES), 2.0)
    labels = _labels(seed, soft=False)

    def focal(p, y, g_pos=gamma, g_neg=gamma):
        return np.where(y > 0, (1 - p) ** g_pos, p**g_neg)

    got = L.focal_loss(
        jnp.asarray(logits), jnp.asarray(labels), gamma=gamma, label_smoothing=smoothing
    )
    assert_close(got, _focal64(logits, labels, focal, smoothing), rtol=1e-4, atol=1e-6)
    xi = _schedule64(epoch, 10, factor)
    assert_close(L.cyclical_focal_schedule(epoch, num_epochs=10, factor=factor), xi, atol=1e-6)

    def cyclical(p, y):
        return (1 - xi) * focal(p, y, 2.0, 1.0) + xi * np.where(y > 0, (1 + p) ** 3.0, 1.0)

    got = L.cyclical_focal_loss(
        jnp.asarray(logits), jnp.asarray(labels), epoch, num_epochs=10, gamma_pos=2.0,
        gamma_neg=1.0, gamma_hc=3.0, factor=factor, label_smoothing=smoothing,
    )  # fmt: skip
    assert_close(got, _focal64(logits, labels, cyclical, smoothing), rtol=1e-4, atol=1e-6)


@INVALID
@given(st.data())
def test_focal_losses_refuse(data):
    logits = jnp.asarray(normal(0, (BATCH, CLASSES)))
    labels = jnp.asarray(_labels(0, soft=False))
    case = data.draw(
        st.sampled_from(
            ["gamma", "labels", "logits", "smoothing", "epochs", "epoch", "factor", "gammas"]
        )
    )
    if case == "gamma":
        refused(
            lambda: L.focal_loss(
                logits,
                labels,
                gamma=data.draw(bad_positive(allow_zero=True).filter(lambda v: v is not None)),
            ),
            "gamma",
        )
    elif case == "labels":
        bad = data.draw(
            st.sampled_from(
                [labels.at[0].set(CLASSES), labels.at[0].set(-1), labels * 1.0, labels[:2]]
            )
        )
        refused(lambda: L.focal_loss(logits, bad), "labels")
    elif case == "logits":
        bad = data.draw(st.sampled_from([logits[0], logits.astype(jnp.int32), logits[:0]]))
        refused(
            lambda: L.focal_loss(bad, labels[: bad.shape[0]] if bad.ndim == 2 else labels), "logits"
        )
    elif case == "smoothing":
        refused(
            lambda: L.focal_loss(
                logits, labels, label_smoothing=data.draw(bad_probabilities(allow_one=False))
            ),
            "label_smoothing",
        )
    elif case == "epochs":
        refused(
            lambda: L.cyclical_focal_schedule(0, num_epochs=data.draw(bad_ints(2))), "num_epochs"
        )
    elif case == "epoch":
        bad = data.draw(st.sampled_from([-1, float("nan"), "3", jnp.ones(2)]))
        refused(lambda: L.cyclical_focal_loss(logits, labels, bad, num_epochs=10), "epoch")
    elif case == "factor":
        refused(
            lambda: L.cyclical_focal_schedule(
                0, num_epochs=10, factor=data.draw(st.sampled_from([0.5, float("nan"), True]))
            ),
            "factor",
        )
    else:
        arg = data.draw(st.sampled_from(["gamma_pos", "gamma_neg", "gamma_hc"]))
        refused(lambda: L.cyclical_focal_loss(logits, labels, 0, num_epochs=10, **{arg: -1.0}), arg)


# --------------------------------------------------------------------------- layerwise batch entropy


@VALID
@given(seeds, st.sampled_from([(4, 3), (5, 2, 3)]), st.floats(0.01, 10.0))
def test_batch_entropy_and_lbe_match_numpy(seed, shape, scale):
    a = normal(seed, shape, scale)
    x = f64(a).reshape(shape[0], -1)
    entropy = np.mean(0.5 * np.log1p(np.pi * np.e * x.var(0, ddof=1)))
    assert_close(L.batch_entropy(jnp.asarray(a)), entropy, rtol=1e-4)
    entropies = [jnp.float32(entropy), jnp.float32(0.3)]
    alphas = np.array([0.1, -2.0])
    targets = np.maximum(0.5, np.abs(alphas))
    penalty = np.mean((np.array([entropy, 0.3]) - targets) ** 2)
    assert_close(L.lbe_penalty(entropies, jnp.asarray(alphas), alpha_min=0.5), penalty, rtol=1e-4)
    got = L.lbe_loss(jnp.float32(2.0), entropies, jnp.asarray(alphas), beta=0.1, alpha_min=0.5)
    assert_close(got, 2.0 * (1 + 0.1 * penalty), rtol=1e-4)


@VALID
@given(seeds, st.sampled_from(["inputs", "outputs"]))
def test_capture_activations_records_the_hidden_layers(seed, where):
    import flax.linen as nn

    from efflax.models import MLP

    model = MLP(features=(5, 4), num_classes=3)
    x = jnp.asarray(normal(seed, (2, 6)))
    variables = model.init(jax.random.key(0), x)
    out, captured = L.capture_activations(model.apply, variables, x, select=nn.Dense, where=where)
    np.testing.assert_array_equal(out, model.apply(variables, x))
    assert list(captured) == ["Dense_0", "Dense_1", "Dense_2"]
    if where == "inputs":
        np.testing.assert_array_equal(captured["Dense_0"], x)
    else:
        np.testing.assert_array_equal(captured["Dense_2"], out)


@INVALID
@given(st.data())
def test_batch_entropy_refuses(data):
    case = data.draw(
        st.sampled_from(
            [
                "activations",
                "alpha_min",
                "alphas",
                "empty",
                "beta",
                "task_loss",
                "select",
                "where",
                "fn",
            ]
        )
    )
    h = [jnp.float32(1.0)]
    if case == "activations":
        bad = data.draw(st.sampled_from([jnp.ones((1, 4)), jnp.float32(1), "x"]))
        refused(lambda: L.batch_entropy(bad), "activations")
    elif case == "alpha_min":
        refused(
            lambda: L.lbe_penalty(
                h,
                jnp.ones(1),
                alpha_min=data.draw(bad_positive(allow_zero=True).filter(lambda v: v is not None)),
            ),
            "alpha_min",
        )
    elif case == "alphas":
        refused(lambda: L.lbe_penalty(h * 2, jnp.ones(3), alpha_min=0.1), "alphas")
    elif case == "empty":
        refused(lambda: L.lbe_penalty([], jnp.ones(0), alpha_min=0.1), "entropies")
    elif case == "beta":
        refused(
            lambda: L.lbe_loss(
                jnp.float32(1.0),
                h,
                jnp.ones(1),
                beta=data.draw(st.sampled_from([-1.0, float("nan"), "0.1"])),
                alpha_min=0.1,
            ),
            "beta",
        )
    elif case == "task_loss":
        refused(
            lambda: L.lbe_loss(jnp.ones(3), h, jnp.ones(1), beta=0.1, alpha_min=0.1), "task_loss"
        )
    elif case == "select":
        refused(
            lambda: L.capture_activations(
                lambda: None, select=data.draw(st.sampled_from(["Dense", 3]))
            ),
            "select",
        )
    elif case == "where":
        import flax.linen as nn

        refused(
            lambda: L.capture_activations(lambda: None, select=nn.Dense, where="middle"), "where"
        )
    else:
        import flax.linen as nn

        refused(lambda: L.capture_activations(5, select=nn.Dense), "fn")


@VALID
@given(
    seeds, st.floats(0.25, 8.0), st.sampled_from([np.float32, np.float64, jnp.float32, jnp.asarray])
)
def test_zero_dim_array_hyperparameters_equal_python_numbers(seed, temperature, wrap):
    student = jnp.asarray(normal(seed, (BATCH, CLASSES), 2.0))
    teacher = jnp.asarray(normal(seed + 1, (BATCH, CLASSES), 2.0))
    labels = jnp.asarray(_labels(seed, False))
    as_array = wrap(temperature)
    assert_close(
        L.distillation_loss(student, teacher, temperature=as_array),
        L.distillation_loss(student, teacher, temperature=temperature),
    )
    assert_close(
        L.focal_loss(student, labels, gamma=as_array, label_smoothing=wrap(0.1)),
        L.focal_loss(student, labels, gamma=temperature, label_smoothing=0.1),
    )
    x = jnp.asarray(normal(seed, (BATCH, 5, 2)))
    a = L.mixup(KEY, x, labels, num_classes=np.int64(3), alpha=as_array)
    b = L.mixup(KEY, x, labels, num_classes=3, alpha=temperature)
    assert_close(a[1], b[1])


@INVALID
@given(st.sampled_from([(0, 3), (BATCH, 0), (BATCH, 3, 0)]))
def test_batch_entropy_refuses_empty_axes(shape):
    refused(lambda: L.batch_entropy(jnp.ones(shape)), "activations")
