import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec

from efflax import data
from efflax.models import CNN1D
from efflax.models import MLP
from efflax.sharding import make_mesh
from efflax.sharding import replicated
from efflax.sharding import shard_params
from efflax.training import CheckpointError
from efflax.training import LossOutput
from efflax.training import TrainState
from efflax.training import classification_eval_fn
from efflax.training import cross_entropy_loss_fn
from efflax.training import fit
from efflax.training import make_train_step
from efflax.training import plot_metrics
from efflax.training import read_metrics


def _loss_with_dropout_noise_and_extra(params, state, batch, rng):
    """Uses the step's RNG and updates `extra`, so resume must restore both exactly."""
    logits = state.apply_fn({"params": params}, batch["x"])
    noise = 1e-3 * jax.random.normal(rng, logits.shape)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits + noise, batch["y"]).mean()
    extra = {"seen": state.extra["seen"].at[batch["index"]].add(1)}
    return loss, LossOutput(metrics={"noise": noise.mean()}, extra=extra)


def _state(seed=0):
    model = CNN1D(channels=8)
    params = nn.unbox(model.init(jax.random.key(seed), jnp.zeros((1, 40)))["params"])
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=optax.adamw(3e-3),
        rng=jax.random.key(seed + 1),
        extra={"seen": jnp.zeros(4000, jnp.int32)},
    )


@pytest.fixture(scope="module")
def loader():
    return data.load("mnist1d", "train", 32, seed=5, epochs=None)


def test_fit_trains_logs_and_evaluates(tmp_path, loader):
    step = make_train_step(cross_entropy_loss_fn())
    eval_fn = classification_eval_fn(data.load_arrays("mnist1d", "test"))
    metrics = tmp_path / "m.jsonl"
    before = eval_fn(_state())["test/loss"]
    state, history = fit(
        _state(),
        step,
        loader,
        num_steps=60,
        eval_fn=eval_fn,
        eval_every=30,
        eval_steps=[10],
        log_every=20,
        metrics_path=metrics,
        progress=False,
    )
    assert int(state.step) == 60
    assert [r["step"] for r in history if "test/loss" in r] == [10, 30, 60]
    assert [r["step"] for r in history if "train/loss" in r] == [20, 40, 60]
    assert history[-1]["examples_seen"] == 60 * 32
    assert history[-1]["test/loss"] < before
    assert read_metrics(metrics) == json.loads(json.dumps(history))
    png = plot_metrics(metrics, tmp_path / "m.png", keys=["train/loss", "test/accuracy"])
    assert png.stat().st_size > 1000


def test_resume_is_bit_exact(tmp_path, loader):
    step = make_train_step(_loss_with_dropout_noise_and_extra)
    straight, _ = fit(_state(), step, loader, num_steps=40, progress=False)
    ckpt = tmp_path / "ckpt"
    # Interrupted after step 25 (the checkpoint of a run that stopped there) ...
    first, _ = fit(
        _state(),
        step,
        loader,
        num_steps=25,
        checkpoint_dir=ckpt,
        checkpoint_every=10,
        progress=False,
    )
    assert int(first.step) == 25
    # ... and resumed from a fresh process-like start: a new initial state, same directory.
    resumed, history = fit(
        _state(seed=7),
        step,
        loader,
        num_steps=40,
        checkpoint_dir=ckpt,
        checkpoint_every=10,
        log_every=5,
        progress=False,
    )
    assert history[0]["step"] == 30  # it continued, it did not start over
    for a, b in zip(jax.tree.leaves(straight), jax.tree.leaves(resumed), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert int(resumed.extra["seen"].sum()) == 40 * 32


def test_checkpoint_round_trip_on_a_mesh(tmp_path, loader):
    from efflax.training import open_checkpoints
    from efflax.training import restore_latest

    mesh = make_mesh(data=8)
    state = _state()
    state = state.replace(params=shard_params(state.params, mesh))
    manager = open_checkpoints(tmp_path / "c")
    import orbax.checkpoint as ocp

    manager.save(3, args=ocp.args.StandardSave(state))
    manager.wait_until_finished()
    restored = restore_latest(manager, _state(seed=9))
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(restored), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unreadable_checkpoint_directory_raises(tmp_path, loader):
    step = make_train_step(cross_entropy_loss_fn())
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(CheckpointError, match="refusing to overwrite"):
        fit(_state(), step, loader, num_steps=2, checkpoint_dir=junk, progress=False)
    assert (junk / "notes.txt").read_text() == "not a checkpoint"
    broken = tmp_path / "broken"
    (broken / "10").mkdir(parents=True)
    (broken / "10" / "garbage").write_text("x")
    with pytest.raises(CheckpointError, match="cannot restore step 10"):
        fit(_state(), step, loader, num_steps=20, checkpoint_dir=broken, progress=False)
    afile = tmp_path / "afile"
    afile.write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        fit(_state(), step, loader, num_steps=2, checkpoint_dir=afile, progress=False)


def test_data_parallel_step_matches_single_device(loader):
    step = make_train_step(cross_entropy_loss_fn(), donate=False)
    batch = loader.batch_at(0)
    single, m1 = step(_state(), batch)
    mesh = make_mesh(data=8)
    from efflax.sharding import shard_batch

    state = _state()
    state = state.replace(params=shard_params(state.params, mesh))
    parallel, m2 = step(state, shard_batch(batch, mesh))
    np.testing.assert_allclose(m1["loss"], m2["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(single.params), jax.tree.leaves(parallel.params), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_fit_data_parallel_on_eight_devices_runs_many_steps(loader):
    """Many in-flight steps with a gradient all-reduce over 8 host devices (no deadlock)."""
    mesh = make_mesh(data=8)
    sharded = data.load("mnist1d", "train", 64, seed=1, epochs=None, mesh=mesh)
    state = _state()
    state = state.replace(params=shard_params(state.params, mesh))
    state, history = fit(
        state,
        make_train_step(cross_entropy_loss_fn()),
        sharded,
        num_steps=150,
        log_every=150,
        progress=False,
    )
    assert int(state.step) == 150 and np.isfinite(history[-1]["train/loss"])


# --- resume on a mesh (every placement of the template) --------------------------------------
_TX = optax.adamw(3e-3)  # one transform for every state below: one compilation per placement
_STEP = make_train_step(_loss_with_dropout_noise_and_extra)


_MLP = MLP(features=(16, 16))  # one module: its apply is static metadata of the state
_INIT_MLP = jax.jit(_MLP.init)


def _mlp_state(placement, mesh, seed=0):
    params = _INIT_MLP(jax.random.key(seed), jnp.zeros((1, 40)))["params"]
    params = shard_params(params, mesh) if placement == "sharded" else nn.unbox(params)
    state = TrainState.create(
        apply_fn=_MLP.apply,
        params=params,
        tx=_TX,
        rng=jax.random.key(seed + 1),
        extra={"seen": jnp.zeros(4000, jnp.int32)},
    )
    return jax.device_put(state, replicated(mesh)) if placement == "replicated" else state


def test_fit_resumes_on_a_mesh_bit_exactly(tmp_path):
    """The README loop with `fit(checkpoint_dir=...)` twice on an 8-device mesh, for a template
    left unplaced, replicated on the mesh, and sharded over its model axis (logical names)."""
    mesh = make_mesh(data=4, model=2)
    loader = data.load("mnist1d", "train", 32, seed=5, epochs=None, mesh=mesh)
    straight = {}  # unplaced and replicated templates train in the same (replicated) layout
    for placement in ("unplaced", "replicated", "sharded"):
        layout = placement == "sharded"
        if layout not in straight:
            straight[layout], _ = fit(
                _mlp_state(placement, mesh), _STEP, loader, num_steps=5, progress=False
            )
        ckpt = tmp_path / placement
        fit(_mlp_state(placement, mesh), _STEP, loader, num_steps=3, checkpoint_dir=ckpt,
            checkpoint_every=3, progress=False)  # fmt: skip
        resumed, history = fit(
            _mlp_state(placement, mesh, seed=7), _STEP, loader, num_steps=5,
            checkpoint_dir=ckpt, log_every=1, progress=False,
        )  # fmt: skip
        assert history[0]["step"] == 4, placement  # it continued from step 3
        for a, b in zip(jax.tree.leaves(straight[layout]), jax.tree.leaves(resumed), strict=True):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=placement)
        kernel = resumed.params["Dense_0"]["kernel"]
        assert len(kernel.sharding.device_set) == 8
        if placement == "sharded":
            assert kernel.sharding.spec == PartitionSpec(None, "model")


# --- the user's arrays survive a donated step ---------------------------------------------------
def test_create_copies_the_arrays_it_takes(loader):
    batch = loader.batch_at(0)
    step = make_train_step(_loss_with_dropout_noise_and_extra)  # donates the state
    for key in (jax.random.key(3), jax.random.PRNGKey(3)):
        params = {"w": jax.random.normal(jax.random.key(0), (40, 10))}
        seen = jnp.zeros(4000, jnp.int32)
        state = TrainState.create(
            apply_fn=_linear_apply, params=params, tx=_TX, rng=key, extra={"seen": seen}
        )
        for _ in range(2):
            state, _ = step(state, batch)
        jax.random.normal(key, ())  # the caller's key, params and extra are still alive
        np.asarray(params["w"])
        assert int(seen.sum()) == 0 and int(state.extra["seen"].sum()) == 64


def _linear_apply(variables, x):
    return x @ variables["params"]["w"]


# --- the typed loss contract -------------------------------------------------------------------
def _linear_problem(extra=None):
    w = jax.random.normal(jax.random.key(0), (3,))
    state = TrainState.create(
        apply_fn=lambda variables, x: x @ variables["params"]["w"],
        params={"w": w},
        tx=optax.sgd(0.1),
        rng=jax.random.key(1),
        extra=extra,
    )
    batch = {"x": jax.random.normal(jax.random.key(2), (8, 3)), "y": jnp.arange(8.0)}
    return state, batch


def _mse(params, state, batch, rng):
    del rng
    return jnp.mean((state.apply_fn({"params": params}, batch["x"]) - batch["y"]) ** 2)


def test_loss_output_metrics_and_partial_extra():
    state, batch = _linear_problem(extra={"count": jnp.zeros((), jnp.int32), "kept": jnp.ones(2)})

    def loss_fn(params, state, batch, rng):
        loss = _mse(params, state, batch, rng)
        return loss, LossOutput(
            metrics={"double": 2 * loss}, extra={"count": state.extra["count"] + 1}
        )

    step = make_train_step(loss_fn, donate=False)
    new_state, metrics = step(state, batch)
    new_state, _ = step(new_state, batch)
    np.testing.assert_allclose(metrics["double"], 2 * metrics["loss"], rtol=1e-6)
    assert int(new_state.extra["count"]) == 2
    np.testing.assert_array_equal(
        new_state.extra["kept"], np.ones(2)
    )  # a partial dict drops nothing
    plain, metrics = make_train_step(_mse, donate=False)(state, batch)  # a bare loss is fine
    assert sorted(metrics) == ["loss"] and int(plain.step) == 1


@pytest.mark.parametrize(
    "returned,match",
    [
        (lambda loss, s: (loss, {"metrics": {}, "extra": {}}), "LossOutput\\(metrics=..., extra=...\\)` instead"),
        (lambda loss, s: (loss, {"acc": loss}), "got `\\(loss, dict\\)`"),
        (lambda loss, s: (loss, LossOutput(), 1), "tuple of 3"),
        (lambda loss, s: LossOutput(), "LossOutput alone"),
        (lambda loss, s: jnp.stack([loss, loss]), "float scalar loss, got shape \\(2,\\)"),
        (lambda loss, s: (loss, LossOutput(metrics={"loss": loss})), "must not set 'loss'"),
        (lambda loss, s: (loss, LossOutput(extra={"new": loss})), "key 'new' that state.extra"),
        (lambda loss, s: (loss, LossOutput(extra={"buf": jnp.zeros(4)})), "state.extra\\['buf'\\] has shape \\(3,\\)"),
        (lambda loss, s: (loss, LossOutput(extra={"buf": jnp.zeros(3, jnp.int32)})), "dtype int32"),
        (lambda loss, s: (loss, LossOutput(extra={"buf": {"a": jnp.zeros(3)}})), "different structures"),
        (lambda loss, s: (loss, LossOutput(extra=[1])), "must be a dict"),
    ],
)  # fmt: skip
def test_loss_contract_refuses_what_it_cannot_honour(returned, match):
    state, batch = _linear_problem(extra={"buf": jnp.zeros(3)})
    step = make_train_step(lambda p, s, b, r: returned(_mse(p, s, b, r), s), jit=False)
    with pytest.raises(ValueError, match=match):
        step(state, batch)


def test_pass_grad_fn_gives_optax_sam_its_gradient():
    """`optax.contrib.sam(opaque_mode=True)` through make_train_step equals the hand-written
    step (the same loss, batch and rng at the perturbed parameters)."""

    def noisy_mse(params, state, batch, rng):
        noise = 0.1 * jax.random.normal(rng, batch["y"].shape)
        return _mse(params, state, {**batch, "y": batch["y"] + noise}, None)

    sam = optax.contrib.sam(optax.sgd(0.05), optax.sgd(0.02), opaque_mode=True)
    state, batch = _linear_problem()
    state = TrainState.create(apply_fn=state.apply_fn, params=state.params, tx=sam, rng=state.rng)
    ours = make_train_step(noisy_mse, pass_grad_fn=True, donate=False)

    def by_hand(state, batch):
        loss_of = lambda p: noisy_mse(p, state, batch, state.step_rng())
        grads = jax.grad(loss_of)(state.params)
        return state.apply_gradients(grads, grad_fn=lambda p, _: jax.grad(loss_of)(p))

    a, b = state, state
    for _ in range(3):
        a, _ = ours(a, batch)
        b = by_hand(b, batch)
    np.testing.assert_allclose(a.params["w"], b.params["w"], rtol=1e-6)
    sgd = TrainState.create(
        apply_fn=state.apply_fn, params=state.params, tx=optax.sgd(0.05), rng=state.rng
    )
    for _ in range(3):
        sgd, _ = make_train_step(noisy_mse, donate=False)(sgd, batch)
    assert not np.allclose(a.params["w"], sgd.params["w"], rtol=1e-3)  # SAM did something else
    with pytest.raises(ValueError, match="takes no keyword arguments"):
        plain = optax.GradientTransformation(optax.sgd(0.1).init, optax.sgd(0.1).update)
        plain_state = TrainState.create(
            apply_fn=state.apply_fn, params=state.params, tx=plain, rng=state.rng
        )
        make_train_step(_mse, pass_grad_fn=True, jit=False)(plain_state, batch)


def test_pass_value_reaches_the_transform():
    seen = []

    def update(updates, opt_state, params=None, *, value=None, **extra):
        seen.append(value)
        return updates, opt_state

    tx = optax.GradientTransformationExtraArgs(lambda params: optax.EmptyState(), update)
    state, batch = _linear_problem()
    _, metrics = make_train_step(_mse, pass_value=True, jit=False)(state.replace(tx=tx), batch)
    np.testing.assert_allclose(seen[0], metrics["loss"])


# --- bad input ---------------------------------------------------------------------------------
def test_bad_arguments_are_refused_by_name(tmp_path, loader):
    from efflax.training import open_checkpoints

    step = make_train_step(cross_entropy_loss_fn())
    state, _ = _linear_problem()  # every check fires before the state is used
    cases = [
        (dict(num_steps=-5), "num_steps=-5"),
        (dict(num_steps=3, checkpoint_every=0, checkpoint_dir=tmp_path / "c"), "checkpoint_every=0"),
        (dict(num_steps=3, checkpoint_every=2), "without a checkpoint_dir"),
        (dict(num_steps=3, log_every=0), "log_every=0"),
        (dict(num_steps=3, eval_every=2), "without an eval_fn"),
        (dict(num_steps=3, eval_fn=lambda s: {}, eval_steps=[5]), "eval_steps holds 5"),
    ]  # fmt: skip
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            fit(state, step, loader, progress=False, **kwargs)
    with pytest.raises(ValueError, match="max_to_keep=0"):
        open_checkpoints(tmp_path / "m", max_to_keep=0)
    for rng in (0, jnp.zeros(3, jnp.uint32), jax.random.split(jax.random.key(0), 2)):
        with pytest.raises(ValueError, match="rng"):
            TrainState.create(apply_fn=None, params={}, tx=_TX, rng=rng)
    with pytest.raises(ValueError, match="tx="):
        TrainState.create(apply_fn=None, params={}, tx="adam", rng=jax.random.key(0))
    with pytest.raises(ValueError, match="batch_size=0"):
        classification_eval_fn(data.load_arrays("mnist1d", "test"), batch_size=0)
    with pytest.raises(ValueError, match="x_key='inputs'"):
        classification_eval_fn(data.load_arrays("mnist1d", "test"), x_key="inputs")


def test_corrupt_metrics_file_and_unknown_plot_keys_are_named(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/lo\n')
    with pytest.raises(ValueError, match="m.jsonl' line 2 is not a JSON record"):
        read_metrics(path)
    path.write_text('{"step": 1, "train/loss": 2.0}\n')
    with pytest.raises(ValueError, match="'nope'.*present: \\['step', 'train/loss'\\]"):
        plot_metrics(path, tmp_path / "m.png", keys=["nope"])
    with pytest.raises(ValueError, match="x names 'epoch'"):
        plot_metrics(path, tmp_path / "m.png", x="epoch")


def test_batched_apply_pads_the_last_batch_and_compiles_one_shape():
    from efflax.training import batched_apply

    shapes = []

    @jax.jit
    def fn(w, x):
        shapes.append(x.shape)  # runs once per compiled shape
        return x @ w

    w = jnp.arange(6.0).reshape(3, 2)
    x = np.random.default_rng(0).standard_normal((10, 3)).astype(np.float32)
    out = batched_apply(fn, w, x, batch_size=4)
    np.testing.assert_allclose(out, x @ np.asarray(w), rtol=1e-6)
    assert out.shape == (10, 2) and shapes == [(4, 3)]
    with pytest.raises(ValueError, match="batch_size"):
        batched_apply(fn, w, x, batch_size=0)
    with pytest.raises(ValueError, match="row"):
        batched_apply(fn, w, x[:0], batch_size=4)


def test_repeated_step_advances_its_own_state():
    from efflax.training import repeated_step

    model = MLP(features=(8,))
    params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 4))))["params"]
    state = TrainState.create(
        apply_fn=model.apply, params=params, tx=optax.sgd(0.1), rng=jax.random.key(1)
    )
    batch = {"x": jnp.ones((2, 4)), "y": jnp.array([0, 1])}
    step = make_train_step(cross_entropy_loss_fn())  # donates its state
    call = repeated_step(step, state, batch)
    first = np.asarray(call()[0]["Dense_0"]["kernel"])  # valid until the next call (donated)
    second, metrics = call()
    assert "loss" in metrics
    assert not np.allclose(first, second["Dense_0"]["kernel"])
    # The caller's state is untouched (the step donated copies).
    np.testing.assert_array_equal(state.params["Dense_0"]["kernel"], params["Dense_0"]["kernel"])
    assert int(state.step) == 0


def test_eval_of_equal_models_built_apart_compiles_once():
    # A bound Module.apply compares by its module's identity: keyed by the bound method, two
    # equal models (two MLP(...) calls, as two experiments or two arms build them) compiled twice.
    from efflax._src.training.state import _eval_batch

    arrays = data.load_arrays("mnist1d", "test")
    eval_fn = classification_eval_fn(arrays, batch_size=500)
    results, sizes = [], []
    for _ in range(2):
        model = MLP(features=(16,))
        params = nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 40)))["params"])
        state = TrainState.create(
            apply_fn=model.apply, params=params, tx=_TX, rng=jax.random.key(1)
        )
        results.append(eval_fn(state))
        sizes.append(_eval_batch._cache_size())
    assert results[0] == results[1]
    assert sizes[1] == sizes[0], sizes  # the second model reused the first one's program
    # A model that cannot be hashed is still evaluated (keyed by its bound method).
    unhashable = _Unhashable(sizes=[10])
    params = nn.unbox(unhashable.init(jax.random.key(0), jnp.zeros((1, 40)))["params"])
    state = TrainState.create(
        apply_fn=unhashable.apply, params=params, tx=_TX, rng=jax.random.key(1)
    )
    assert 0.0 <= eval_fn(state)["test/accuracy"] <= 1.0


class _Unhashable(nn.Module):
    sizes: list  # a list attribute: the module cannot be hashed

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.sizes[0])(x)
