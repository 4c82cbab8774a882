import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from efflax import data
from efflax.models import CNN1D
from efflax.sharding import make_mesh
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
