"""Tests for SAF / MESA (efflax._src.optim.saf) and SAM (efflax._src.optim.sam)."""

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
from efflax.optim import MESA
from efflax.optim import SAF
from efflax.optim import LogitsBuffer
from efflax.optim import init_logits_buffer
from efflax.optim import logits_buffer_bytes
from efflax.optim import read_logits
from efflax.optim import sam
from efflax.optim import trajectory_loss
from efflax.optim import write_logits
from efflax.sharding import make_mesh
from efflax.sharding import replicated
from efflax.training import LossOutput
from efflax.training import TrainState
from efflax.training import fit
from efflax.training import make_train_step


def _kl_reference(logits, target, temperature):
    """Hand-written KL(softmax(target/T) || softmax(logits/T)) * T^2, mean over rows, float64."""
    logits = np.asarray(logits, np.float64) / temperature
    target = np.asarray(target, np.float64) / temperature
    p = np.exp(target - target.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    q = np.exp(logits - logits.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    kl = np.sum(p * (np.log(p) - np.log(q)), axis=-1)
    return kl.mean() * temperature**2


@pytest.mark.parametrize("shape,temperature", [((7, 10), 5.0), ((1, 3), 1.0), ((4, 5, 13), 0.7)])
def test_trajectory_loss_matches_kl_formula(shape, temperature):
    k1, k2 = jax.random.split(jax.random.key(shape[-1]))
    logits = 3.0 * jax.random.normal(k1, shape)
    target = 3.0 * jax.random.normal(k2, shape)
    loss = jax.jit(functools.partial(trajectory_loss, temperature=temperature))
    np.testing.assert_allclose(
        loss(logits, target), _kl_reference(logits, target, temperature), rtol=1e-5
    )
    np.testing.assert_allclose(loss(target, target), 0, atol=1e-5)  # KL >= 0, 0 at the target

    grad_target = jax.jit(jax.grad(loss, argnums=1))(logits, target)
    chex.assert_trees_all_equal(grad_target, jnp.zeros_like(target))
    # d/dz [T^2 KL(p || softmax(z/T))] = T (softmax(z/T) - p) / rows.
    grad_logits = jax.jit(jax.grad(loss))(logits, target)
    rows = int(np.prod(shape[:-1]))
    expected = (
        temperature
        * (jax.nn.softmax(logits / temperature) - jax.nn.softmax(target / temperature))
        / rows
    )
    chex.assert_trees_all_close(grad_logits, expected, atol=1e-6, rtol=1e-4)


def test_trajectory_loss_low_precision_inputs_and_traced_temperature():
    k1, k2 = jax.random.split(jax.random.key(1))
    logits = jax.random.normal(k1, (8, 10)).astype(jnp.bfloat16)
    target = jax.random.normal(k2, (8, 10)).astype(jnp.bfloat16)
    got = trajectory_loss(logits, target)
    assert got.dtype == jnp.float32
    want = _kl_reference(logits.astype(jnp.float32), target, 5.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    traced = jax.jit(lambda t: trajectory_loss(logits, target, temperature=t))(5.0)
    np.testing.assert_allclose(traced, want, rtol=1e-5)


def test_buffer_bytes_and_dtypes():
    # ImageNet-1k, lag 3: 1.28M x 4 slots x 1000 classes x 4 B ~ 20.5 GB.
    assert logits_buffer_bytes(1_281_167, 1000, 3) == 1_281_167 * 4 * 1000 * 4
    assert logits_buffer_bytes(1_281_167, 1000, 3, jnp.bfloat16) * 2 == logits_buffer_bytes(
        1_281_167, 1000, 3
    )
    for dtype in (jnp.float32, jnp.bfloat16):
        saf = SAF(50, 7, steps_per_epoch=2, lag=2, dtype=dtype)
        buffer = saf.init()
        assert isinstance(buffer, LogitsBuffer)
        assert buffer.logits.shape == (50, 3, 7) and buffer.logits.dtype == dtype
        assert (buffer.num_examples, buffer.lag, buffer.num_classes) == (50, 2, 7)
        assert buffer.logits.nbytes == saf.buffer_bytes == logits_buffer_bytes(50, 7, 2, dtype)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"lam": -1.0}, "lam=-1.0"),
        ({"lam": float("nan")}, "lam=nan"),
        ({"temperature": 0.0}, "temperature=0.0"),
        ({"temperature": float("inf")}, "temperature=inf"),
        ({"lag": 0}, "lag=0"),
        ({"lag": True}, "lag=True"),
        ({"steps_per_epoch": 0}, "steps_per_epoch=0"),
        ({"num_examples": 10.5}, "num_examples=10.5"),
        ({"dtype": jnp.int32}, "dtype=int32"),
        ({"start_epoch": 1, "lag": 3}, "start_epoch=1 must be >= lag - 1 = 2"),
        ({"start_epoch": 5, "end_epoch": 6}, "end_epoch=6"),
        ({"start_epoch": -1}, "start_epoch=-1"),
    ],
)
def test_saf_refuses_bad_hyperparameters(kwargs, message):
    args = {"num_examples": 10, "num_classes": 3, "steps_per_epoch": 2, **kwargs}
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SAF(**args)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"decay": 1.5}, "decay=1.5"),
        ({"decay": float("nan")}, "decay=nan"),
        ({"lam": -0.8}, "lam=-0.8"),
        ({"temperature": -5.0}, "temperature=-5.0"),
        ({"start_epoch": -2}, "start_epoch=-2"),
        ({"ema_dtype": jnp.int32}, "ema_dtype=int32"),
    ],
)
def test_mesa_refuses_bad_hyperparameters(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MESA(steps_per_epoch=3, **kwargs)


def test_bad_inputs_raise_naming_the_value():
    saf = SAF(10, 5, steps_per_epoch=2, lag=2, start_epoch=1)
    buffer = saf.init()
    logits = jax.random.normal(jax.random.key(0), (4, 3))
    with pytest.raises(ValueError, match="temperature"):
        trajectory_loss(logits, logits, temperature=-1.0)
    with pytest.raises(ValueError, match="differ"):
        trajectory_loss(logits, logits[:, :2])
    with pytest.raises(ValueError, match="must end in num_classes=5"):
        saf.loss(1.0, logits, buffer, jnp.arange(4), 0)
    five = jnp.zeros((4, 5))
    with pytest.raises(ValueError, match=r"indices dtype=float32"):
        saf.loss(1.0, five, buffer, jnp.arange(4.0), 0)
    with pytest.raises(ValueError, match=r"buffer shape=\(10, 4, 5\) does not match"):
        saf.loss(1.0, five, init_logits_buffer(10, 5, lag=3), jnp.arange(4), 0)
    with pytest.raises(ValueError, match="must be an int scalar"):
        saf.loss(1.0, five, buffer, jnp.arange(4), 1.5)
    with pytest.raises(ValueError, match="task_loss shape"):
        saf.loss(jnp.ones(4), five, buffer, jnp.arange(4), 0)
    # Indices outside the buffer: concrete ones raise, the host-side guard raises, no clipping.
    with pytest.raises(ValueError, match=r"\[10\] are outside the logits buffer \[0, 10\)"):
        saf.loss(1.0, five, buffer, jnp.array([0, 3, 10, 2]), 0)
    with pytest.raises(ValueError, match=r"\[-1\] are outside"):
        read_logits(buffer, jnp.array([-1, 2]), 3)
    with pytest.raises(ValueError, match="outside"):
        saf.check_indices(np.array([9, 10]))
    saf.check_indices(np.array([0, 9]))
    calls = []
    step = saf.with_index_check(lambda state, batch: calls.append(1))
    step(None, {"index": np.array([1, 2])})
    with pytest.raises(ValueError, match=r"batch\['index'\] \[12\] are outside"):
        step(None, {"index": np.array([1, 12])})
    with pytest.raises(ValueError, match="no 'index'"):
        step(None, {"x": np.array([1, 2])})
    assert calls == [1]
    # MESA: the state and the variables must have one structure; integer leaves are named.
    mesa = MESA(steps_per_epoch=2)
    state = mesa.init({"params": {"w": jnp.ones(2)}})
    with pytest.raises(ValueError, match="mesa_state.ema and variables have different structures"):
        mesa.update_ema(state, {"params": {"w": jnp.ones(2), "b": jnp.ones(1)}})
    with pytest.raises(ValueError, match=r"mesa_state.ema\['params'\]\['w'\] has shape \(2,\)"):
        mesa.update_ema(state, {"params": {"w": jnp.ones(3)}})
    with pytest.raises(ValueError, match=r"variables\['step'\] has dtype int32"):
        mesa.init({"step": jnp.int32(0)})
    with pytest.raises(ValueError, match="optax.EmaState"):
        mesa.update_ema({"params": {"w": jnp.ones(2)}}, {"params": {"w": jnp.ones(2)}})
    with pytest.raises(ValueError, match="teacher_logits shape"):
        mesa.loss(1.0, logits, five, 0)


def test_traced_out_of_range_reads_nan_and_write_is_dropped():
    buffer = write_logits(init_logits_buffer(6, 3, lag=1), jnp.arange(6), jnp.ones((6, 3)), 0)
    read = jax.jit(lambda b, i: read_logits(b, i, 1))(buffer, jnp.array([1, 6, -1]))
    np.testing.assert_array_equal(read[0], np.ones(3))
    assert np.isnan(read[1:]).all()
    written = jax.jit(lambda b, i: write_logits(b, i, jnp.full((2, 3), 7.0), 0))(
        buffer, jnp.array([6, -1])
    )
    chex.assert_trees_all_equal(written, buffer)


@pytest.mark.parametrize(
    "lag,start_epoch,end_epoch,dtype",
    [(1, 0, None, jnp.float32), (3, 2, 6, jnp.bfloat16), (2, 3, 5, jnp.float32)],
)
def test_saf_follows_the_official_loop(lag, start_epoch, end_epoch, dtype):
    """Against a numpy transcription of SAF_train.py's train_one_epoch: write slot
    epoch % (lag+1), then, while start < epoch < end, KL against slot (epoch - lag) % (lag+1)."""
    num_examples, num_classes, batch, epochs, lam, temperature = 12, 5, 4, 8, 0.3, 2.0
    steps_per_epoch = num_examples // batch
    saf = SAF(
        num_examples,
        num_classes,
        steps_per_epoch=steps_per_epoch,
        lag=lag,
        lam=lam,
        temperature=temperature,
        start_epoch=start_epoch,
        end_epoch=end_epoch,
        dtype=dtype,
    )
    train_logits = np.zeros((num_examples, lag + 1, num_classes), np.float32)  # the official one
    buffer = saf.init()
    step_fn = jax.jit(saf.loss)
    rng = np.random.default_rng(lag)
    step, seen_on = 0, set()
    for epoch in range(epochs):
        for rows in rng.permutation(num_examples).reshape(-1, batch):
            logits = (rng.normal(size=(batch, num_classes)) * 3).astype(np.float32)
            task = np.float32(rng.uniform())
            loss, buffer, metrics = step_fn(task, logits, buffer, jnp.asarray(rows), step)
            # The official loop (stored at the buffer's precision).
            train_logits[rows, epoch % (lag + 1)] = np.asarray(
                jnp.asarray(logits).astype(dtype).astype(jnp.float32)
            )
            want = task
            on = epoch > start_epoch and (end_epoch is None or epoch < end_epoch)
            if on:
                past = train_logits[rows, (epoch - lag) % (lag + 1)]
                assert np.abs(past).sum() > 0  # a slot written lag epochs ago, never zeros
                want = task + lam * _kl_reference(logits, past, temperature)
                seen_on.add(epoch)
            assert float(metrics["sharpness_term_on"]) == float(on), (epoch, on)
            np.testing.assert_allclose(loss, want, rtol=1e-5)
            step += 1
    np.testing.assert_array_equal(np.asarray(buffer.logits, np.float32), train_logits)
    first = start_epoch + 1
    last = epochs - 1 if end_epoch is None else end_epoch - 1
    assert seen_on == set(range(first, last + 1))


def test_no_retracing_across_epochs():
    saf = SAF(8, 4, steps_per_epoch=1, lag=2, start_epoch=1)
    x = jax.random.normal(jax.random.key(1), (8, 3))

    @jax.jit
    @chex.assert_max_traces(n=1)
    def step(params, buffer, step):
        def loss_fn(p):
            logits = x @ p
            loss, new_buffer, _ = saf.loss(jnp.mean(logits**2), logits, buffer, jnp.arange(8), step)
            return loss, new_buffer

        (loss, buffer), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        return params - 0.1 * grads, buffer, loss

    params, buffer = jax.random.normal(jax.random.key(0), (3, 4)), saf.init()
    for t in range(5):
        params, buffer, _ = step(params, buffer, jnp.int32(t))


class _BatchNormNet(nn.Module):
    @nn.compact
    def __call__(self, x, train: bool):
        x = nn.Dense(6)(x)
        x = nn.BatchNorm(use_running_average=not train, momentum=0.5)(x)
        return nn.Dense(4)(nn.tanh(x))


def test_mesa_teacher_is_the_official_ema_of_params_and_batch_stats():
    """timm ModelEmaV2 as MESA_train.py uses it: ema_0 = a copy of the model; after every
    optimizer step ema = d ema + (1 - d) model (parameters and BatchNorm statistics); the teacher
    of step s is the EMA model in eval mode (its own running statistics)."""
    decay, lam, temperature, steps = 0.7, 0.8, 5.0, 6
    mesa = MESA(steps_per_epoch=1, decay=decay, lam=lam, start_epoch=1, end_epoch=4)
    model = _BatchNormNet()
    x = jax.random.normal(jax.random.key(0), (16, 3))
    y = jnp.arange(16) % 4
    variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), x)
    params, stats = variables["params"], variables["batch_stats"]
    mesa_state = mesa.init({"params": params, "batch_stats": stats})
    tx = optax.sgd(0.5)
    opt_state = tx.init(params)

    @jax.jit
    def train_step(params, stats, opt_state, mesa_state, step):
        def loss_fn(params):
            new_mesa = mesa.update_ema(mesa_state, {"params": params, "batch_stats": stats})
            logits, updates = model.apply(
                {"params": params, "batch_stats": stats}, x, train=True, mutable=["batch_stats"]
            )
            teacher = model.apply(new_mesa.ema, x, train=False)
            task = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
            loss, metrics = mesa.loss(task, logits, teacher, step)
            return loss, (task, logits, teacher, updates["batch_stats"], new_mesa, metrics)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss, aux

    to_np = lambda tree: jax.tree.map(lambda a: np.asarray(a, np.float64), tree)
    eval_apply = jax.jit(lambda v: model.apply(jax.tree.map(jnp.float32, v), x, train=False))
    reference = to_np({"params": params, "batch_stats": stats})  # timm: deepcopy at creation
    for step in range(steps):
        params, opt_state, loss, aux = train_step(params, stats, opt_state, mesa_state, step)
        task, logits, teacher, stats, mesa_state, metrics = aux
        # The teacher: the reference EMA model in eval mode.
        want_teacher = eval_apply(reference)
        np.testing.assert_allclose(teacher, want_teacher, rtol=1e-5, atol=1e-6)
        on = 1 < step < 4
        assert float(metrics["sharpness_term_on"]) == float(on)
        want = float(task) + (lam * _kl_reference(logits, teacher, temperature) if on else 0.0)
        np.testing.assert_allclose(loss, want, rtol=1e-5)
        # timm's update after the optimizer step, with the model's new params and statistics.
        model_now = to_np({"params": params, "batch_stats": stats})
        reference = jax.tree.map(lambda e, m: decay * e + (1 - decay) * m, reference, model_now)
    assert int(mesa_state.count) == steps
    # The stored state lags the official one by the last step's update; one more update_ema
    # with the final variables gives it exactly.
    final = mesa.update_ema(mesa_state, {"params": params, "batch_stats": stats})
    chex.assert_trees_all_close(to_np(final.ema), reference, rtol=1e-5, atol=1e-7)
    assert jax.tree.leaves(final.ema)[0].dtype == jnp.float32
    # The EMA is not stuck at its start: the statistics moved.
    moved = jax.tree.map(lambda a, b: np.abs(a - b).max(), to_np(final.ema), to_np(variables))
    assert max(jax.tree.leaves(moved["batch_stats"])) > 1e-3


# --- SAM -----------------------------------------------------------------------------------


def _quadratic_problem():
    k1, k2 = jax.random.split(jax.random.key(4))
    a = jax.random.normal(k1, (6, 6))
    hessian = a @ a.T / 6 + 0.1 * jnp.eye(6)
    target = jax.random.normal(k2, (6,))
    loss = lambda p: 0.5 * (p["w"] - target) @ hessian @ (p["w"] - target) + jnp.sum(p["b"] ** 4)
    return loss, {"w": jnp.zeros(6), "b": jnp.full(2, 0.3)}


def test_sam_is_the_papers_update():
    loss, params = _quadratic_problem()
    grad = jax.jit(jax.grad(loss))
    lr, rho = 0.1, 0.05
    tx = sam(optax.sgd(lr), rho=rho)
    state = tx.init(params)
    update = jax.jit(lambda g, s, p: tx.update(g, s, p, grad_fn=lambda q, _: grad(q)))
    for _ in range(3):
        updates, state = update(grad(params), state, params)
        g = grad(params)
        norm = optax.tree.norm(g)
        perturbed = jax.tree.map(lambda p, gi: p + rho * gi / norm, params, g)
        want = jax.tree.map(lambda p, ga: p - lr * ga, params, grad(perturbed))
        params = optax.apply_updates(params, updates)
        chex.assert_trees_all_close(params, want, rtol=1e-6, atol=1e-7)
    # Same as optax's own recipe (which divides by the bare norm).
    reference = optax.contrib.sam(
        optax.sgd(lr), optax.chain(optax.contrib.normalize(), optax.sgd(rho)), opaque_mode=True
    )
    g = grad(params)
    ours, _ = update(g, state, params)
    theirs, _ = reference.update(g, reference.init(params), params, grad_fn=lambda p, _: grad(p))
    chex.assert_trees_all_close(ours, theirs, rtol=1e-6)
    # A zero gradient is a zero perturbation, not NaN; extra arguments of a chain pass through.
    zero = jax.tree.map(jnp.zeros_like, params)
    chained = optax.chain(optax.identity(), tx)
    updates, _ = chained.update(
        zero, chained.init(params), params, grad_fn=lambda p, _: zero, other=1
    )
    chex.assert_trees_all_equal(updates, zero)


def test_sam_refuses_bad_input():
    for rho in (0.0, -0.1, float("nan")):
        with pytest.raises(ValueError, match=f"rho={rho}"):
            sam(optax.sgd(0.1), rho=rho)
    with pytest.raises(ValueError, match="sync_period=0"):
        sam(optax.sgd(0.1), sync_period=0)
    tx = sam(optax.sgd(0.1))
    params = {"w": jnp.ones(2)}
    with pytest.raises(ValueError, match="pass_grad_fn=True"):
        tx.update(params, tx.init(params), params)


# --- the full step: data parallel and checkpoint / resume through efflax.training ------------

NUM_EXAMPLES, NUM_FEATURES, NUM_CLASSES, BATCH = 64, 6, 5, 16  # 4 steps per epoch


def _arrays(seed=0):
    rng = np.random.default_rng(seed)
    return {
        "x": rng.normal(size=(NUM_EXAMPLES, NUM_FEATURES)).astype(np.float32),
        "y": rng.integers(0, NUM_CLASSES, NUM_EXAMPLES).astype(np.int32),
        "index": np.arange(NUM_EXAMPLES, dtype=np.int32),
    }


STEPS_PER_EPOCH = NUM_EXAMPLES // BATCH
_SAF = SAF(NUM_EXAMPLES, NUM_CLASSES, steps_per_epoch=STEPS_PER_EPOCH, lag=1, start_epoch=0)
_MESA = MESA(steps_per_epoch=STEPS_PER_EPOCH, decay=0.9, start_epoch=0)


def _loss_fn(params, state, batch, rng):
    """SAF and MESA together, so one run exercises both the buffer and the EMA."""
    del rng
    mesa_state = _MESA.update_ema(state.extra["mesa"], {"params": params})
    logits = state.apply_fn({"params": params}, batch["x"])
    teacher = state.apply_fn(mesa_state.ema, batch["x"])
    task = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    loss, buffer, metrics = _SAF.loss(task, logits, state.extra["saf"], batch["index"], state.step)
    loss, mesa_metrics = _MESA.loss(loss, logits, teacher, state.step)
    metrics = {**metrics, "mesa_trajectory_loss": mesa_metrics["trajectory_loss"]}
    return loss, LossOutput(metrics=metrics, extra={"saf": buffer, "mesa": mesa_state})


def _state(buffer_sharding=None):
    model = MLP(features=(8,), num_classes=NUM_CLASSES)
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, NUM_FEATURES)))["params"])
    buffer = _SAF.init()
    if buffer_sharding is not None:
        buffer = jax.device_put(buffer, buffer_sharding)
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=optax.sgd(0.3, momentum=0.9),
        rng=jax.random.key(1),
        extra={"saf": buffer, "mesa": _MESA.init({"params": params})},
    )


@functools.lru_cache(maxsize=1)
def _run_single_device(num_steps):
    return _run(num_steps)


def _run(num_steps, mesh=None, buffer_sharding=None):
    loader = Loader(_arrays(), BATCH, seed=0, epochs=None, mesh=mesh)
    state = _state()
    if mesh is not None:
        state = jax.device_put(state, replicated(mesh))
        if buffer_sharding is not None:
            state.extra["saf"] = jax.device_put(state.extra["saf"], buffer_sharding)
    step = _SAF.with_index_check(make_train_step(_loss_fn))
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
    step = _SAF.with_index_check(make_train_step(_loss_fn, donate=False))
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
    assert isinstance(resumed.extra["mesa"], optax.EmaState)
    fields = lambda s: jax.device_get((s.step, s.params, s.opt_state, s.rng, s.extra))
    chex.assert_trees_all_equal(fields(resumed), fields(straight))


# --- a batch spread over two processes (jax.distributed on CPU) ------------------------------

_WORKER = r"""
import os

import jax

# The runtime from the environment efflax.distributed.launch sets, before efflax is imported
# (importing pallas_kernels asks for the default backend, which must come after this).
jax.config.update("jax_num_cpu_devices", int(os.environ["EFFLAX_CPU_DEVICES"]))
jax.distributed.initialize(
    os.environ["EFFLAX_COORDINATOR_ADDRESS"],
    int(os.environ["EFFLAX_NUM_PROCESSES"]),
    int(os.environ["EFFLAX_PROCESS_ID"]),
)
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from efflax.optim import SAF, read_logits, write_logits

process = jax.process_index()
mesh = Mesh(np.array(jax.devices()), ("data",))
rows, by_row = NamedSharding(mesh, P("data")), NamedSharding(mesh, P("data", None))
saf = SAF(16, 3, steps_per_epoch=2, lag=1, start_epoch=0)
local = np.arange(4, dtype=np.int32) + 4 * process  # a global batch of 8: rows 0..7
indices = jax.make_array_from_process_local_data(rows, local)
assert not indices.is_fully_addressable
step = saf.with_index_check(lambda state, batch: "ran")
assert step(None, {"index": indices}) == "ran"
# Eager buffer access with indices that span both processes.
logits = jax.make_array_from_process_local_data(by_row, np.full((4, 3), process + 1.0, np.float32))
buffer = write_logits(jax.device_put(saf.init(), NamedSharding(mesh, P())), indices, logits, 0)
for shard in read_logits(buffer, indices, 1).addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), process + 1.0)
# Only process 1 holds the bad index; both must refuse the batch (or process 0 would wait for
# process 1 in the next collective).
local[2] = 16 if process == 1 else local[2]
try:
    step(None, {"index": jax.make_array_from_process_local_data(rows, local)})
    print("accepted", flush=True)
except ValueError as e:
    print("ValueError:", e, flush=True)
"""


def test_index_check_and_buffer_access_on_a_batch_spanning_two_processes(tmp_path):
    import pathlib
    import sys

    from efflax.distributed import launch

    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    logs = [tmp_path / f"process{i}.log" for i in range(2)]
    root = str(pathlib.Path(__file__).resolve().parents[2])
    codes = launch(
        [sys.executable, str(script)],
        num_processes=2,
        cpu_devices=2,
        timeout=240,
        env={"PYTHONPATH": root, "XLA_FLAGS": ""},
        output=lambda i: open(logs[i], "w"),  # noqa: SIM115 - the child owns it
    )
    outputs = [log.read_text() for log in logs]
    assert codes == [0, 0], outputs
    assert "process(es) [1] hold indices outside the logits buffer [0, 16)" in outputs[0]
    assert "batch['index'] [16] are outside the logits buffer [0, 16)" in outputs[1]


# --- the README's SAF and MESA snippets, in the README's quickstart loop ---------------------


def _readme_script(snippet_index):
    """The quickstart with the snippet in place of its ``train_step = ...`` line, one epoch."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[2] / "README.md").read_text()
    quickstart = re.findall(r"```python\n(.*?)```", readme, flags=re.S)[0]
    section = readme[readme.index("### SAM, SAF or MESA in the quickstart") :].split("\n## ")[0]
    snippet = re.findall(r"```python\n(.*?)```", section, flags=re.S)[snippet_index]
    line = next(l for l in quickstart.splitlines() if l.startswith("train_step = "))
    assert "epochs=20" in quickstart
    return quickstart.replace(line, snippet).replace("epochs=20", "epochs=1")


def test_readme_saf_snippet_runs_in_the_quickstart_loop():
    from efflax.data import load_arrays

    assert len(load_arrays("mnist1d", "train")["y"]) == 4000  # the snippet's num_examples
    scope = {}
    exec(compile(_readme_script(1), "README.md", "exec"), scope)
    state, metrics = scope["state"], scope["metrics"]
    # One epoch of 31 batches of 128 wrote 3968 examples' logits into slot 0, nothing else.
    written = np.abs(np.asarray(state.extra["saf"].logits)).sum(-1) > 0
    assert written[:, 0].sum() == 31 * 128 and not written[:, 1:].any()
    assert int(state.step) == 31 and float(metrics["sharpness_term_on"]) == 0.0


def test_readme_mesa_snippet_runs_in_the_quickstart_loop():
    scope = {}
    exec(compile(_readme_script(2), "README.md", "exec"), scope)
    state, metrics = scope["state"], scope["metrics"]
    mesa_state = state.extra["mesa"]
    assert int(mesa_state.count) == 31 and "trajectory_loss" in metrics
    moved = jax.tree.map(
        lambda e, p: float(jnp.abs(e - p).max()), mesa_state.ema["params"], state.params
    )
    assert 0 < max(jax.tree.leaves(moved))  # the EMA trails the weights
