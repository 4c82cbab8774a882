"""Bad calls to every public function of efflax.losses: a ValueError naming the argument."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efflax import losses as L

KEY = jax.random.key(0)
LOGITS = jax.random.normal(jax.random.key(1), (4, 3))
LABELS = jnp.array([0, 1, 2, 0])
X = jax.random.normal(jax.random.key(2), (4, 6, 5, 2))
ACTS = jax.random.normal(jax.random.key(3), (4, 5))

BAD = {
    # soft_target_cross_entropy
    "ce logits str": (lambda: L.soft_target_cross_entropy("abc", LABELS), r"logits"),
    "ce logits None": (lambda: L.soft_target_cross_entropy(None, LABELS), r"logits"),
    "ce logits ragged": (lambda: L.soft_target_cross_entropy([[1.0], [1.0, 2]], LABELS), r"logits"),
    "ce logits int": (
        lambda: L.soft_target_cross_entropy(jnp.ones((4, 3), int), LABELS),
        r"logits",
    ),
    "ce logits 1d": (lambda: L.soft_target_cross_entropy(jnp.ones(3), LABELS), r"logits"),
    "ce empty batch": (
        lambda: L.soft_target_cross_entropy(jnp.ones((0, 3)), LABELS[:0]),
        r"logits",
    ),
    "ce labels str": (lambda: L.soft_target_cross_entropy(LOGITS, "abc"), r"labels"),
    "ce labels bool": (lambda: L.soft_target_cross_entropy(LOGITS, jnp.ones(4, bool)), r"labels"),
    "ce labels range": (
        lambda: L.soft_target_cross_entropy(LOGITS, jnp.array([0, 1, 3, 0])),
        r"labels",
    ),
    "ce labels shape": (lambda: L.soft_target_cross_entropy(LOGITS, LABELS[:3]), r"labels"),
    "ce soft negative": (lambda: L.soft_target_cross_entropy(LOGITS, -jnp.ones((4, 3))), r"labels"),
    # distillation_loss
    "kd shapes": (lambda: L.distillation_loss(LOGITS, LOGITS[:3]), r"teacher_logits"),
    "kd temperature 0": (
        lambda: L.distillation_loss(LOGITS, LOGITS, temperature=0),
        r"temperature",
    ),
    "kd temperature nan": (
        lambda: L.distillation_loss(LOGITS, LOGITS, temperature=jnp.nan),
        r"temperature",
    ),
    "kd temperature bool": (
        lambda: L.distillation_loss(LOGITS, LOGITS, temperature=True),
        r"temperature",
    ),
    "kd temperature str": (
        lambda: L.distillation_loss(LOGITS, LOGITS, temperature="2"),
        r"temperature",
    ),
    "kd temperature vector": (
        lambda: L.distillation_loss(LOGITS, LOGITS, temperature=jnp.ones(2)),
        r"temperature",
    ),
    "kd alpha negative": (lambda: L.distillation_loss(LOGITS, LOGITS, alpha_kd=-1.0), r"alpha_kd"),
    "kd alpha None": (lambda: L.distillation_loss(LOGITS, LOGITS, alpha_kd=None), r"alpha_kd"),
    "kd teacher list of str": (lambda: L.distillation_loss(LOGITS, [["a"]]), r"teacher_logits"),
    # focal_loss / cyclical_focal_loss / schedule
    "focal labels float": (lambda: L.focal_loss(LOGITS, LABELS.astype(float)), r"labels"),
    "focal labels str": (lambda: L.focal_loss(LOGITS, "abcd"), r"labels"),
    "focal labels range": (lambda: L.focal_loss(LOGITS, jnp.array([0, 1, 2, 7])), r"labels"),
    "focal gamma negative": (lambda: L.focal_loss(LOGITS, LABELS, gamma=-1.0), r"gamma"),
    "focal gamma nan": (lambda: L.focal_loss(LOGITS, LABELS, gamma=float("nan")), r"gamma"),
    "focal gamma str": (lambda: L.focal_loss(LOGITS, LABELS, gamma="2"), r"gamma"),
    "focal smoothing 1": (
        lambda: L.focal_loss(LOGITS, LABELS, label_smoothing=1.0),
        r"label_smoothing",
    ),
    "focal smoothing bool": (
        lambda: L.focal_loss(LOGITS, LABELS, label_smoothing=True),
        r"label_smoothing",
    ),
    "focal empty": (lambda: L.focal_loss(jnp.ones((0, 3)), jnp.zeros(0, int)), r"logits"),
    "cfl epochs 1": (lambda: L.cyclical_focal_loss(LOGITS, LABELS, 0, num_epochs=1), r"num_epochs"),
    "cfl epochs float": (
        lambda: L.cyclical_focal_loss(LOGITS, LABELS, 0, num_epochs=10.0),
        r"num_epochs",
    ),
    "cfl epochs bool": (
        lambda: L.cyclical_focal_loss(LOGITS, LABELS, 0, num_epochs=True),
        r"num_epochs",
    ),
    "cfl epoch negative": (
        lambda: L.cyclical_focal_loss(LOGITS, LABELS, -1, num_epochs=10),
        r"epoch",
    ),
    "cfl epoch str": (lambda: L.cyclical_focal_loss(LOGITS, LABELS, "1", num_epochs=10), r"epoch"),
    "cfl epoch None": (
        lambda: L.cyclical_focal_loss(LOGITS, LABELS, None, num_epochs=10),
        r"epoch",
    ),
    "cfl epoch vector": (
        lambda: L.cyclical_focal_loss(LOGITS, LABELS, [1, 2], num_epochs=10),
        r"epoch",
    ),
    "cfl epoch inf": (
        lambda: L.cyclical_focal_loss(LOGITS, LABELS, float("inf"), num_epochs=10),
        r"epoch",
    ),
    "mix_batch cutmix_alpha 0": (
        lambda: L.mix_batch(KEY, X, LABELS, num_classes=3, cutmix_alpha=0.0),
        r"cutmix_alpha",
    ),
    "mixup labels vs x": (
        lambda: L.mixup(KEY, X[:2], LABELS, num_classes=3),
        r"labels.*batch of x",
    ),
    "penalty empty array": (
        lambda: L.lbe_penalty(jnp.ones(0), jnp.ones(0), alpha_min=0.2),
        r"entropies",
    ),
    "cfl gamma_hc negative": (
        lambda: L.cyclical_focal_loss(LOGITS, LABELS, 0, num_epochs=10, gamma_hc=-1),
        r"gamma_hc",
    ),
    "cfl gamma_pos str": (
        lambda: L.cyclical_focal_loss(LOGITS, LABELS, 0, num_epochs=10, gamma_pos="a"),
        r"gamma_pos",
    ),
    "cfl factor 0.5": (
        lambda: L.cyclical_focal_loss(LOGITS, LABELS, 0, num_epochs=10, factor=0.5),
        r"factor",
    ),
    "schedule factor inf": (
        lambda: L.cyclical_focal_schedule(1, num_epochs=10, factor=float("inf")),
        r"factor",
    ),
    "schedule factor bool": (
        lambda: L.cyclical_focal_schedule(1, num_epochs=10, factor=True),
        r"factor",
    ),
    "schedule epochs None": (lambda: L.cyclical_focal_schedule(1, num_epochs=None), r"num_epochs"),
    # mixup / cutmix / mix_batch
    "mixup key int": (lambda: L.mixup(0, X, LABELS, num_classes=3), r"key"),
    "mixup x int": (lambda: L.mixup(KEY, X.astype(jnp.uint8), LABELS, num_classes=3), r"x"),
    "mixup x 1d": (lambda: L.mixup(KEY, X[:, 0, 0, 0], LABELS, num_classes=3), r"x"),
    "mixup x empty": (lambda: L.mixup(KEY, X[:0], LABELS[:0], num_classes=3), r"x"),
    "mixup x str": (lambda: L.mixup(KEY, "x", LABELS, num_classes=3), r"x"),
    "mixup x bool": (lambda: L.mixup(KEY, X > 0, LABELS, num_classes=3), r"x"),
    "mixup alpha 0": (lambda: L.mixup(KEY, X, LABELS, num_classes=3, alpha=0.0), r"alpha"),
    "mixup alpha vector": (
        lambda: L.mixup(KEY, X, LABELS, num_classes=3, alpha=jnp.ones(2)),
        r"alpha",
    ),
    "mixup classes 0": (lambda: L.mixup(KEY, X, LABELS, num_classes=0), r"num_classes"),
    "mixup classes float": (lambda: L.mixup(KEY, X, LABELS, num_classes=3.0), r"num_classes"),
    "mixup classes bool": (lambda: L.mixup(KEY, X, LABELS, num_classes=True), r"num_classes"),
    "mixup labels range": (lambda: L.mixup(KEY, X, LABELS, num_classes=2), r"labels"),
    "mixup labels batch": (lambda: L.mixup(KEY, X, LABELS[:2], num_classes=3), r"labels"),
    "mixup smoothing -0.1": (
        lambda: L.mixup(KEY, X, LABELS, num_classes=3, label_smoothing=-0.1),
        r"label_smoothing",
    ),
    "cutmix axes 0": (
        lambda: L.cutmix(KEY, X, LABELS, num_classes=3, spatial_axes=(0,)),
        r"spatial_axes",
    ),
    "cutmix axes repeat": (
        lambda: L.cutmix(KEY, X, LABELS, num_classes=3, spatial_axes=(1, 1)),
        r"spatial_axes",
    ),
    "cutmix axes int": (
        lambda: L.cutmix(KEY, X, LABELS, num_classes=3, spatial_axes=1),
        r"spatial_axes",
    ),
    "cutmix axes bool": (
        lambda: L.cutmix(KEY, X, LABELS, num_classes=3, spatial_axes=(True,)),
        r"spatial_axes",
    ),
    "cutmix axes empty": (
        lambda: L.cutmix(KEY, X, LABELS, num_classes=3, spatial_axes=()),
        r"spatial_axes",
    ),
    "cutmix zero width": (lambda: L.cutmix(KEY, X[:, :0], LABELS, num_classes=3), r"x"),
    "cutmix key None": (lambda: L.cutmix(None, X, LABELS, num_classes=3), r"key"),
    "cutmix alpha nan": (
        lambda: L.cutmix(KEY, X, LABELS, num_classes=3, alpha=float("nan")),
        r"alpha",
    ),
    "mix_batch switch 2": (
        lambda: L.mix_batch(KEY, X, LABELS, num_classes=3, switch_prob=2.0),
        r"switch_prob",
    ),
    "mix_batch switch str": (
        lambda: L.mix_batch(KEY, X, LABELS, num_classes=3, switch_prob="a"),
        r"switch_prob",
    ),
    "mix_batch key array": (
        lambda: L.mix_batch(jax.random.split(KEY), X, LABELS, num_classes=3),
        r"key",
    ),
    "mix_batch mixup_alpha -1": (
        lambda: L.mix_batch(KEY, X, LABELS, num_classes=3, mixup_alpha=-1.0),
        r"alpha",
    ),
    # batch_entropy / lbe_penalty / lbe_loss / capture_activations
    "entropy batch 1": (lambda: L.batch_entropy(ACTS[:1]), r"activations"),
    "entropy zero width": (lambda: L.batch_entropy(jnp.ones((4, 0))), r"activations"),
    "entropy zero width 3d": (lambda: L.batch_entropy(jnp.ones((4, 3, 0))), r"activations"),
    "entropy scalar": (lambda: L.batch_entropy(jnp.ones(())), r"activations"),
    "entropy str": (lambda: L.batch_entropy("abc"), r"activations"),
    "entropy None": (lambda: L.batch_entropy(None), r"activations"),
    "entropy bool": (lambda: L.batch_entropy(jnp.ones((4, 2), bool)), r"activations"),
    "entropy complex": (lambda: L.batch_entropy(jnp.ones((4, 2), jnp.complex64)), r"activations"),
    "penalty empty": (lambda: L.lbe_penalty([], jnp.ones(0), alpha_min=0.2), r"entropies"),
    "penalty float": (lambda: L.lbe_penalty(1.0, jnp.ones(1), alpha_min=0.2), r"entropies"),
    "penalty str": (lambda: L.lbe_penalty("ab", jnp.ones(2), alpha_min=0.2), r"entropies"),
    "penalty 2d": (
        lambda: L.lbe_penalty(jnp.ones((2, 2)), jnp.ones(2), alpha_min=0.2),
        r"entropies",
    ),
    "penalty vector entry": (
        lambda: L.lbe_penalty([jnp.ones(2)], jnp.ones(1), alpha_min=0.2),
        r"entropies\[0\]",
    ),
    "penalty alphas shape": (
        lambda: L.lbe_penalty([1.0, 2.0], jnp.ones(3), alpha_min=0.2),
        r"alphas",
    ),
    "penalty alphas None": (lambda: L.lbe_penalty([1.0, 2.0], None, alpha_min=0.2), r"alphas"),
    "penalty alpha_min negative": (
        lambda: L.lbe_penalty([1.0], jnp.ones(1), alpha_min=-0.1),
        r"alpha_min",
    ),
    "penalty alpha_min str": (
        lambda: L.lbe_penalty([1.0], jnp.ones(1), alpha_min="a"),
        r"alpha_min",
    ),
    "lbe task vector": (
        lambda: L.lbe_loss(jnp.ones(2), [1.0], jnp.ones(1), beta=0.1, alpha_min=0.2),
        r"task_loss",
    ),
    "lbe task str": (
        lambda: L.lbe_loss("a", [1.0], jnp.ones(1), beta=0.1, alpha_min=0.2),
        r"task_loss",
    ),
    "lbe beta negative": (
        lambda: L.lbe_loss(1.0, [1.0], jnp.ones(1), beta=-0.1, alpha_min=0.2),
        r"beta",
    ),
    "lbe beta bool": (
        lambda: L.lbe_loss(1.0, [1.0], jnp.ones(1), beta=True, alpha_min=0.2),
        r"beta",
    ),
    "capture fn": (lambda: L.capture_activations(None, select=nn.Dense), r"fn"),
    "capture where": (
        lambda: L.capture_activations(lambda: 0, select=nn.Dense, where="in"),
        r"where",
    ),
    "capture select tuple": (lambda: L.capture_activations(lambda: 0, select=(1,)), r"select"),
    "capture select empty": (lambda: L.capture_activations(lambda: 0, select=()), r"select"),
    "capture select": (lambda: L.capture_activations(lambda: 0, select=3), r"select"),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_call_is_refused_naming_the_argument(name):
    call, pattern = BAD[name]
    with pytest.raises(ValueError, match=pattern):
        call()


def test_zero_dim_jax_and_numpy_scalars_count_as_numbers():
    for number in (0.5, np.float32(0.5), np.array(0.5), jnp.float32(0.5), jnp.asarray(0.5)):
        chex_value = L.distillation_loss(LOGITS, 2 * LOGITS, temperature=number)
        assert np.isclose(chex_value, L.distillation_loss(LOGITS, 2 * LOGITS, temperature=0.5))
        assert np.isclose(
            L.focal_loss(LOGITS, LABELS, gamma=number, label_smoothing=number / 5),
            L.focal_loss(LOGITS, LABELS, gamma=0.5, label_smoothing=0.1),
        )
        assert np.isclose(
            L.cyclical_focal_schedule(1, num_epochs=jnp.int32(10), factor=4 * number),
            L.cyclical_focal_schedule(1, num_epochs=10, factor=2.0),
        )
        L.mixup(KEY, X, LABELS, num_classes=np.int64(3), alpha=number, label_smoothing=number / 5)
        L.mix_batch(KEY, X, LABELS, num_classes=jnp.int32(3), switch_prob=number)


def test_lists_are_converted():
    logits, labels = LOGITS.tolist(), LABELS.tolist()
    assert np.isclose(
        L.soft_target_cross_entropy(logits, labels), L.soft_target_cross_entropy(LOGITS, LABELS)
    )
    assert np.isclose(L.focal_loss(logits, labels), L.focal_loss(LOGITS, LABELS))
    assert np.isclose(L.batch_entropy(ACTS.tolist()), L.batch_entropy(ACTS))
    assert np.isclose(
        L.lbe_loss(1.0, [0.5, 1.0], [1.0, 2.0], beta=0.1, alpha_min=0.2),
        L.lbe_loss(1.0, jnp.array([0.5, 1.0]), jnp.array([1.0, 2.0]), beta=0.1, alpha_min=0.2),
    )


def test_batch_entropy_of_zero_width_array_is_refused_not_nan():
    with pytest.raises(ValueError, match=r"activations.shape=\(4, 0\)"):
        L.batch_entropy(jnp.ones((4, 0)))
