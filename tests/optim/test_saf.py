"""Tests for SAF / MESA (efflax._src.optim.saf)."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec

from efflax.data import Loader
from efflax.models import MLP
from efflax.optim import LogitsBuffer
from efflax.optim import check_indices
from efflax.optim import ema_update
from efflax.optim import init_ema
from efflax.optim import init_logits_buffer
from efflax.optim import logits_buffer_bytes
from efflax.optim import mesa_loss
from efflax.optim import read_logits
from efflax.optim import saf_loss
from efflax.optim import trajectory_loss
from efflax.optim import with_index_check
from efflax.optim import write_logits
from efflax.sharding import make_mesh
from efflax.sharding import replicated
from efflax.training import LossOutput
from efflax.training import TrainState
from efflax.training import fit
from efflax.training import make_train_step


def _kl_reference(logits, target, temperature):
    """Hand-written KL(softmax(target/T) || softmax(logits/T)) * T^2, mean over rows."""
    logits = np.asarray(logits, np.float64) / temperature
    target = np.asarray(target, np.float64) / temperature
    p = np.exp(target - target.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(logits - logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    kl = np.sum(p * (np.log(p) - np.log(q)), axis=-1)
    return kl.mean() * temperature**2


@pytest.mark.parametrize(
    "shape,temperature", [((7, 10), 5.0), ((1, 3), 1.0), ((4, 5, 13), 2.5), ((16, 1000), 0.7)]
)
def test_trajectory_loss_matches_kl_formula(shape, temperature):
    k1, k2 = jax.random.split(jax.random.key(shape[-1]))
    logits = 3.0 * jax.random.normal(k1, shape)
    target = 3.0 * jax.random.normal(k2, shape)
    got = trajectory_loss(logits, target, temperature=temperature)
    np.testing.assert_allclose(got, _kl_reference(logits, target, temperature), rtol=1e-5)
    # KL >= 0, and 0 at the target.
    np.testing.assert_allclose(
        trajectory_loss(target, target, temperature=temperature), 0, atol=1e-5
    )

    grad_target = jax.grad(trajectory_loss, argnums=1)(logits, target, temperature=temperature)
    chex.assert_trees_all_equal(grad_target, jnp.zeros_like(target))
    # d/dz [T^2 KL(p || softmax(z/T))] = T (softmax(z/T) - p) / rows.
    grad_logits = jax.grad(trajectory_loss)(logits, target, temperature=temperature)
    rows = int(np.prod(shape[:-1]))
    expected = (
        temperature
        * (jax.nn.softmax(logits / temperature) - jax.nn.softmax(target / temperature))
        / rows
    )
    chex.assert_trees_all_close(grad_logits, expected, atol=1e-6, rtol=1e-4)


def test_trajectory_loss_bfloat16_inputs_run_in_float32():
    k1, k2 = jax.random.split(jax.random.key(1))
    logits = jax.random.normal(k1, (8, 10)).astype(jnp.bfloat16)
    target = jax.random.normal(k2, (8, 10)).astype(jnp.bfloat16)
    got = trajectory_loss(logits, target)
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(
        got, _kl_reference(logits.astype(jnp.float32), target, 5.0), rtol=1e-5
    )


def test_traced_hyperparameters():
    k1, k2 = jax.random.split(jax.random.key(2))
    logits, target = jax.random.normal(k1, (5, 4)), jax.random.normal(k2, (5, 4))
    got = jax.jit(lambda t: trajectory_loss(logits, target, temperature=t))(2.0)
    np.testing.assert_allclose(got, _kl_reference(logits, target, 2.0), rtol=1e-5)
    ema = jax.jit(ema_update)({"w": jnp.ones(3)}, {"w": jnp.zeros(3)}, 0.25)
    np.testing.assert_allclose(ema["w"], np.full(3, 0.25), rtol=1e-6)


def test_buffer_bytes_and_dtypes():
    # ImageNet-1k, lag 3: 1.28M x 4 slots x 1000 classes x 4 B ~ 20.5 GB.
    assert logits_buffer_bytes(1_281_167, 1000, 3) == 1_281_167 * 4 * 1000 * 4
    assert 20e9 < logits_buffer_bytes(1_281_167, 1000, 3) < 21e9
    assert logits_buffer_bytes(1_281_167, 1000, 3, jnp.bfloat16) * 2 == logits_buffer_bytes(
        1_281_167, 1000, 3
    )
    for dtype in (jnp.float32, jnp.bfloat16):
        buffer = init_logits_buffer(50, 7, lag=2, dtype=dtype)
        assert isinstance(buffer, LogitsBuffer)
        assert buffer.logits.shape == (50, 3, 7) and buffer.logits.dtype == dtype
        assert (buffer.num_examples, buffer.lag, buffer.num_classes) == (50, 2, 7)
        assert buffer.logits.nbytes == logits_buffer_bytes(50, 7, 2, dtype)


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="lag=0"):
        init_logits_buffer(10, 3, lag=0)
    with pytest.raises(ValueError, match="dtype=int32"):
        init_logits_buffer(10, 3, dtype=jnp.int32)
    logits = jax.random.normal(jax.random.key(0), (4, 3))
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="temperature"):
            trajectory_loss(logits, logits, temperature=temperature)
    with pytest.raises(ValueError, match="differ"):
        trajectory_loss(logits, logits[:, :2])
    buffer = init_logits_buffer(10, 5, lag=2)
    indices = jnp.arange(4)
    with pytest.raises(ValueError, match="3 classes but the buffer stores 5"):
        write_logits(buffer, indices, logits, 0)
    with pytest.raises(ValueError, match="3 classes but the buffer stores 5"):
        saf_loss(jnp.float32(1.0), logits, buffer, indices, 0)
    with pytest.raises(ValueError, match="lag=3 differs"):
        saf_loss(jnp.float32(1.0), jnp.zeros((4, 5)), buffer, indices, 0, lag=3)
    with pytest.raises(ValueError, match="temperature"):
        saf_loss(jnp.float32(1.0), jnp.zeros((4, 5)), buffer, indices, 0, temperature=0.0)
    with pytest.raises(ValueError, match="decay"):
        ema_update({"w": jnp.ones(2)}, {"w": jnp.ones(2)}, decay=1.5)
    # Indices outside the buffer: concrete ones raise, host-side check raises, no clipping.
    bad = jnp.array([0, 3, 10, 2])
    with pytest.raises(ValueError, match=r"\[10\] are outside the logits buffer \[0, 10\)"):
        write_logits(buffer, bad, jnp.zeros((4, 5)), 0)
    with pytest.raises(ValueError, match=r"\[-1\] are outside"):
        read_logits(buffer, jnp.array([-1, 2]), 3)
    with pytest.raises(ValueError, match="outside"):
        check_indices(np.array([9, 10]), 10)
    check_indices(np.array([0, 9]), 10)
    calls = []
    step = with_index_check(lambda state, batch: calls.append(1), 10)
    step(None, {"index": np.array([1, 2])})
    with pytest.raises(ValueError, match="outside"):
        step(None, {"index": np.array([1, 12])})
    assert calls == [1]


def test_traced_out_of_range_reads_nan_and_write_is_dropped():
    buffer = write_logits(init_logits_buffer(6, 3, lag=1), jnp.arange(6), jnp.ones((6, 3)), 0)
    read = jax.jit(lambda b, i: read_logits(b, i, 1))(buffer, jnp.array([1, 6, -1]))
    np.testing.assert_array_equal(read[0], np.ones(3))
    assert np.isnan(read[1:]).all()
    written = jax.jit(lambda b, i: write_logits(b, i, jnp.full((2, 3), 7.0), 0))(
        buffer, jnp.array([6, -1])
    )
    chex.assert_trees_all_equal(written, buffer)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("lag", [1, 3])
def test_ring_buffer_reads_what_was_written_lag_epochs_ago(lag, dtype):
    num_examples, num_classes, batch, epochs, start_epoch = 12, 5, 4, 8, 2
    buffer = init_logits_buffer(num_examples, num_classes, lag=lag, dtype=dtype)
    rng = np.random.default_rng(lag)
    history = {}  # epoch -> [num_examples, num_classes] logits written in that epoch
    step_fn = jax.jit(
        lambda b, logits, idx, epoch, task: saf_loss(
            task, logits, b, idx, epoch, lam=0.3, temperature=2.0, start_epoch=start_epoch
        )
    )
    for epoch in range(epochs):
        history[epoch] = np.zeros((num_examples, num_classes), np.float32)
        for rows in rng.permutation(num_examples).reshape(-1, batch):
            logits = rng.normal(size=(batch, num_classes)).astype(np.float32) * 3
            task = np.float32(rng.uniform())
            target = read_logits(buffer, jnp.asarray(rows), epoch)
            loss, buffer, metrics = step_fn(buffer, logits, jnp.asarray(rows), epoch, task)
            active = epoch >= max(lag, start_epoch)
            assert float(metrics["sharpness_term_on"]) == float(active)
            if epoch >= lag:
                expected = history[epoch - lag][rows].astype(dtype).astype(np.float32)
                np.testing.assert_array_equal(target, expected)
            if active:
                expected = task + 0.3 * _kl_reference(logits, target, 2.0)
                np.testing.assert_allclose(loss, expected, rtol=1e-5)
            else:
                assert float(loss) == task
            history[epoch][rows] = logits


def test_no_retracing_across_epochs():
    buffer = init_logits_buffer(8, 4, lag=2)
    params = jax.random.normal(jax.random.key(0), (3, 4))
    x = jax.random.normal(jax.random.key(1), (8, 3))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, buffer, epoch):
        def loss_fn(p):
            logits = x @ p
            loss, new_buffer, _ = saf_loss(
                jnp.mean(logits**2), logits, buffer, jnp.arange(8), epoch
            )
            return loss, new_buffer

        (loss, buffer), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return params - 0.1 * grads, buffer, loss

    for epoch in range(8):
        params, buffer, _ = step(params, buffer, jnp.int32(epoch))


def test_ema_update_and_mesa_loss():
    k = jax.random.split(jax.random.key(3), 4)
    ema = {"params": {"w": jax.random.normal(k[0], (3, 2))}, "batch_stats": {"mean": jnp.ones(2)}}
    params = {
        "params": {"w": jax.random.normal(k[1], (3, 2))},
        "batch_stats": {"mean": jnp.zeros(2)},
    }
    new = ema_update(ema, params, decay=0.9)
    chex.assert_trees_all_close(
        new, jax.tree.map(lambda e, p: 0.9 * e + 0.1 * p, ema, params), rtol=1e-6
    )
    # Default decay is the paper's 0.9998; the EMA keeps its dtype; params get no gradient.
    half = jax.tree.map(lambda e: e.astype(jnp.bfloat16), ema)
    assert jax.tree.map(lambda e: e.dtype, ema_update(half, params)) == jax.tree.map(
        lambda e: e.dtype, half
    )
    grad = jax.grad(lambda p: jnp.sum(ema_update(ema, p)["params"]["w"]))(params)
    chex.assert_trees_all_equal(grad, jax.tree.map(jnp.zeros_like, params))

    logits = jax.random.normal(k[2], (6, 10))
    ema_logits = jax.random.normal(k[3], (6, 10))
    task = jnp.float32(0.7)
    loss_off, metrics = mesa_loss(task, logits, ema_logits, 4, start_epoch=5)
    assert float(loss_off) == pytest.approx(0.7) and float(metrics["sharpness_term_on"]) == 0.0
    loss_on, _ = mesa_loss(task, logits, ema_logits, 5, start_epoch=5)
    np.testing.assert_allclose(
        loss_on, 0.7 + 0.8 * _kl_reference(logits, ema_logits, 5.0), rtol=1e-5
    )
    grad_ema = jax.grad(lambda e: mesa_loss(task, logits, e, 9)[0])(ema_logits)
    chex.assert_trees_all_equal(grad_ema, jnp.zeros_like(ema_logits))


# --- the full step: data parallel and checkpoint / resume through efflax.training ------------

NUM_EXAMPLES, NUM_FEATURES, NUM_CLASSES, BATCH = 64, 6, 5, 16  # 4 steps per epoch


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(NUM_EXAMPLES, NUM_FEATURES)).astype(np.float32),
        "y": rng.integers(0, NUM_CLASSES, NUM_EXAMPLES).astype(np.int32),
        "index": np.arange(NUM_EXAMPLES, dtype=np.int32),
    }


def _loss_fn(steps_per_epoch, *, start_epoch=1):
    """SAF and MESA together, so one run exercises both the buffer and the EMA."""

    def loss_fn(params, state, batch, rng):
        del rng
        logits = state.apply_fn({"params": params}, batch["x"])
        task = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
        epoch = state.step // steps_per_epoch
        loss, buffer, saf_metrics = saf_loss(
            task, logits, state.extra["saf"], batch["index"], epoch, lag=1, start_epoch=start_epoch
        )
        ema_logits = state.apply_fn({"params": state.extra["ema"]}, batch["x"])
        loss, _ = mesa_loss(loss, logits, ema_logits, epoch, start_epoch=start_epoch)
        extra = {"saf": buffer, "ema": ema_update(state.extra["ema"], params, decay=0.9)}
        return loss, LossOutput(metrics=saf_metrics, extra=extra)

    return loss_fn


def _state(buffer_sharding=None):
    model = MLP(features=(8,), num_classes=NUM_CLASSES)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, NUM_FEATURES)))["params"])
    buffer = init_logits_buffer(NUM_EXAMPLES, NUM_CLASSES, lag=1)
    if buffer_sharding is not None:
        buffer = jax.device_put(buffer, buffer_sharding)
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=optax.sgd(0.3, momentum=0.9),
        rng=jax.random.key(1),
        extra={"saf": buffer, "ema": init_ema(params)},
    )


@functools.lru_cache(maxsize=1)
def _run_single_device(num_steps):
    return _run(num_steps)


def _run(num_steps, mesh=None, buffer_sharding=None):
    loader = Loader(_arrays(), BATCH, seed=0, epochs=None, mesh=mesh)
    state = _state(buffer_sharding)
    if mesh is not None:
        state = jax.device_put(state, replicated(mesh))
        if buffer_sharding is not None:
            state.extra["saf"] = jax.device_put(state.extra["saf"], buffer_sharding)
    step = make_train_step(_loss_fn(loader.steps_per_epoch))
    metrics = []
    for batch in loader.iter_from(0):
        if int(state.step) == num_steps:
            break
        state, m = step(state, batch)
        metrics.append(m)
    return state, metrics


@pytest.mark.parametrize("buffer_axes", ["replicated", "examples_over_data"])
def test_sharded_step_matches_single_device(buffer_axes):
    assert jax.device_count() == 8
    num_steps = 12  # 3 epochs: buffer written, then read with the term on
    single, single_metrics = _run_single_device(num_steps)
    mesh = make_mesh(data=8)
    spec = PartitionSpec() if buffer_axes == "replicated" else PartitionSpec("data")
    sharded, sharded_metrics = _run(num_steps, mesh, NamedSharding(mesh, spec))
    assert float(single_metrics[-1]["sharpness_term_on"]) == 1.0
    assert float(single_metrics[-1]["trajectory_loss"]) > 0
    chex.assert_trees_all_close(sharded_metrics, single_metrics, atol=1e-5, rtol=1e-5)
    chex.assert_trees_all_close(
        jax.device_get(sharded.extra), jax.device_get(single.extra), atol=1e-5, rtol=1e-5
    )
    chex.assert_trees_all_close(sharded.params, single.params, atol=1e-5, rtol=1e-5)


def test_checkpoint_restores_buffer_and_ema_and_resume_is_exact(tmp_path):
    loader = Loader(_arrays(1), BATCH, seed=3, epochs=4)
    step = with_index_check(
        make_train_step(_loss_fn(loader.steps_per_epoch), donate=False), NUM_EXAMPLES
    )
    total, interrupt = 14, 9  # interrupt mid-epoch, after the SAF/MESA terms switched on
    straight, _ = fit(_state(), step, loader, num_steps=total, progress=False)

    ckpt = tmp_path / "ckpt"
    partial, _ = fit(
        _state(),
        step,
        loader,
        num_steps=interrupt,
        checkpoint_dir=ckpt,
        checkpoint_every=3,
        progress=False,
    )
    assert int(partial.step) == interrupt
    assert np.abs(np.asarray(partial.extra["saf"].logits)).sum() > 0
    # A fresh template: everything (step, params, opt state, buffer, EMA) comes from the checkpoint.
    resumed, history = fit(
        _state(), step, loader, num_steps=total, checkpoint_dir=ckpt, progress=False, log_every=1
    )
    assert history[0]["step"] == interrupt + 1
    assert isinstance(resumed.extra["saf"], LogitsBuffer)
    fields = lambda s: jax.device_get((s.step, s.params, s.opt_state, s.rng, s.extra))
    chex.assert_trees_all_equal(fields(resumed), fields(straight))
