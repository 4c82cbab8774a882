"""Bad calls to efflax.training's public functions: a ValueError naming the argument (or the
batch entry), never an error from inside optax or JAX."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen as nn

from efflax.sharding import make_mesh
from efflax.training import TrainState
from efflax.training import classification_eval_fn
from efflax.training import cross_entropy_loss_fn
from efflax.training import fit
from efflax.training import make_train_step
from efflax.training import open_checkpoints
from efflax.training import place_on_mesh
from efflax.training import plot_metrics
from efflax.training import read_metrics
from efflax.training import restore_latest

MODEL = nn.Dense(3)
PARAMS = MODEL.init(jax.random.key(0), jnp.ones((1, 4)))["params"]


def _state():
    return TrainState.create(
        apply_fn=MODEL.apply, params=PARAMS, tx=optax.sgd(0.1), rng=jax.random.key(1)
    )


X = np.ones((4, 4), np.float32)
Y = np.array([0, 1, 2, 0], np.int32)
LOSS = cross_entropy_loss_fn()
BATCHES = [{"x": X, "y": Y}] * 3


class _Hook:
    def __init__(self, every):
        self.every = every

    def __call__(self, state):
        return {}


BAD = {
    "create params str": (
        lambda: TrainState.create(
            apply_fn=None, params={"a": "abc"}, tx=optax.sgd(1.0), rng=jax.random.key(0)
        ),
        r"params\['a'\]",
    ),
    "create params int": (
        lambda: TrainState.create(
            apply_fn=None, params={"a": jnp.ones(2, int)}, tx=optax.sgd(1.0), rng=jax.random.key(0)
        ),
        r"params\['a'\]",
    ),
    "create rng int": (
        lambda: TrainState.create(apply_fn=None, params=PARAMS, tx=optax.sgd(1.0), rng=0),
        r"rng",
    ),
    "create tx": (
        lambda: TrainState.create(apply_fn=None, params=PARAMS, tx=None, rng=jax.random.key(0)),
        r"tx",
    ),
    "create extra": (
        lambda: TrainState.create(
            apply_fn=None, params=PARAMS, tx=optax.sgd(1.0), rng=jax.random.key(0), extra=[1]
        ),
        r"extra",
    ),
    "apply_gradients structure": (
        lambda: _state().apply_gradients({"kernel": jnp.ones((4, 3))}),
        r"grads",
    ),
    "apply_gradients shape": (
        lambda: _state().apply_gradients(jax.tree.map(lambda p: jnp.ones(p.shape + (1,)), PARAMS)),
        r"grads\['(bias|kernel)'\]",
    ),
    "loss x_key": (lambda: cross_entropy_loss_fn(x_key=0), r"x_key"),
    "loss batch list": (lambda: LOSS(PARAMS, _state(), [X, Y], None), r"batch"),
    "loss batch missing": (lambda: LOSS(PARAMS, _state(), {"x": X}, None), r"y_key"),
    "loss labels float": (
        lambda: LOSS(PARAMS, _state(), {"x": X, "y": Y.astype(np.float32)}, None),
        r"batch\['y'\]",
    ),
    "loss labels shape": (
        lambda: LOSS(PARAMS, _state(), {"x": X, "y": Y[:3]}, None),
        r"batch\['y'\]",
    ),
    "loss labels 2d": (
        lambda: LOSS(PARAMS, _state(), {"x": X, "y": Y[:, None]}, None),
        r"batch\['y'\]",
    ),
    "loss labels range": (
        lambda: LOSS(PARAMS, _state(), {"x": X, "y": Y + 1}, None),
        r"batch\['y'\]",
    ),
    "loss labels list": (
        lambda: LOSS(PARAMS, _state(), {"x": X, "y": [0, 1, 2, 0]}, None),
        r"batch\['y'\]",
    ),
    "step labels float": (
        lambda: make_train_step(LOSS)(_state(), {"x": X, "y": Y.astype(np.float32)}),
        r"batch\['y'\]",
    ),
    "make_train_step fn": (lambda: make_train_step(None), r"loss_fn"),
    "make_train_step donate": (lambda: make_train_step(LOSS, donate=1), r"donate"),
    "eval_fn batch_size": (
        lambda: classification_eval_fn({"x": X, "y": Y}, batch_size=0),
        r"batch_size",
    ),
    "eval_fn arrays": (lambda: classification_eval_fn([X, Y]), r"arrays"),
    "eval_fn key": (lambda: classification_eval_fn({"x": X, "y": Y}, y_key="labels"), r"y_key"),
    "eval_fn key int": (lambda: classification_eval_fn({"x": X, "y": Y}, x_key=0), r"x_key"),
    "eval_fn scalar x": (lambda: classification_eval_fn({"x": 1.0, "y": Y}), r"arrays\['x'\]"),
    "eval_fn y 2d": (lambda: classification_eval_fn({"x": X, "y": Y[:, None]}), r"arrays\['y'\]"),
    "eval_fn y float": (lambda: classification_eval_fn({"x": X, "y": Y * 1.0}), r"arrays\['y'\]"),
    "eval_fn lengths": (lambda: classification_eval_fn({"x": X, "y": Y[:3]}), r"arrays"),
    "eval_fn prefix": (lambda: classification_eval_fn({"x": X, "y": Y}, prefix=None), r"prefix"),
    "eval_fn labels range": (
        lambda: classification_eval_fn({"x": X, "y": Y + 1})(_state()),
        r"arrays\['y'\]",
    ),
    "fit state": (lambda: fit(None, make_train_step(LOSS), BATCHES, num_steps=1), r"state"),
    "fit step": (lambda: fit(_state(), None, BATCHES, num_steps=1), r"train_step"),
    "fit loader": (lambda: fit(_state(), make_train_step(LOSS), 3, num_steps=1), r"loader"),
    "fit num_steps 0": (
        lambda: fit(_state(), make_train_step(LOSS), BATCHES, num_steps=0),
        r"num_steps",
    ),
    "fit num_steps float": (
        lambda: fit(_state(), make_train_step(LOSS), BATCHES, num_steps=2.0),
        r"num_steps",
    ),
    "fit eval_fn": (
        lambda: fit(_state(), make_train_step(LOSS), BATCHES, num_steps=1, eval_fn=3),
        r"eval_fn",
    ),
    "fit eval_steps int": (
        lambda: fit(
            _state(),
            make_train_step(LOSS),
            BATCHES,
            num_steps=1,
            eval_fn=lambda s: {},
            eval_steps=1,
        ),
        r"eval_steps",
    ),
    "fit eval_steps bool": (
        lambda: fit(
            _state(),
            make_train_step(LOSS),
            BATCHES,
            num_steps=1,
            eval_fn=lambda s: {},
            eval_steps=[True],
        ),
        r"eval_steps",
    ),
    "fit eval_steps float": (
        lambda: fit(
            _state(),
            make_train_step(LOSS),
            BATCHES,
            num_steps=2,
            eval_fn=lambda s: {},
            eval_steps=[1.5],
        ),
        r"eval_steps",
    ),
    "fit hooks every bool": (
        lambda: fit(_state(), make_train_step(LOSS), BATCHES, num_steps=1, hooks=[_Hook(True)]),
        r"hook",
    ),
    "fit hooks not list": (
        lambda: fit(_state(), make_train_step(LOSS), BATCHES, num_steps=1, hooks=_Hook(1)),
        r"hooks",
    ),
    "fit hooks entry": (
        lambda: fit(_state(), make_train_step(LOSS), BATCHES, num_steps=1, hooks=[1]),
        r"hooks\[0\]",
    ),
    "fit loader str": (lambda: fit(_state(), make_train_step(LOSS), "abc", num_steps=1), r"loader"),
    "fit log_every 0": (
        lambda: fit(_state(), make_train_step(LOSS), BATCHES, num_steps=1, log_every=0),
        r"log_every",
    ),
    "fit progress": (
        lambda: fit(_state(), make_train_step(LOSS), BATCHES, num_steps=1, progress="no"),
        r"progress",
    ),
    "fit metrics_path": (
        lambda: fit(_state(), make_train_step(LOSS), BATCHES, num_steps=1, metrics_path=3),
        r"metrics_path",
    ),
    "fit checkpoint_dir": (
        lambda: fit(_state(), make_train_step(LOSS), BATCHES, num_steps=1, checkpoint_dir=3),
        r"checkpoint_dir",
    ),
    "fit checkpoint_every": (
        lambda: fit(_state(), make_train_step(LOSS), BATCHES, num_steps=1, checkpoint_every=0),
        r"checkpoint_every",
    ),
    "fit batch_size": (
        lambda: fit(_state(), make_train_step(LOSS), BATCHES, num_steps=1, batch_size=-1),
        r"batch_size",
    ),
    "fit short loader": (
        lambda: fit(_state(), make_train_step(LOSS), BATCHES, num_steps=5, progress=False),
        r"ran out",
    ),
    "fit eval returns": (
        lambda: fit(
            _state(),
            make_train_step(LOSS),
            BATCHES,
            num_steps=1,
            eval_fn=lambda s: 1.0,
            progress=False,
        ),
        r"eval_fn",
    ),
    "open_checkpoints save_every": (
        lambda: open_checkpoints("/tmp/x", save_every=0),
        r"save_every",
    ),
    "open_checkpoints max_to_keep": (
        lambda: open_checkpoints("/tmp/x", max_to_keep=0),
        r"max_to_keep",
    ),
    "open_checkpoints directory": (lambda: open_checkpoints(3), r"directory"),
    "restore_latest manager": (lambda: restore_latest(None, _state()), r"manager"),
    "place_on_mesh mesh": (lambda: place_on_mesh({"a": jnp.ones(2)}, "mesh"), r"mesh"),
    "place_on_mesh str leaf": (lambda: place_on_mesh({"a": "abc"}, make_mesh()), r"tree\['a'\]"),
    "read_metrics type": (lambda: read_metrics(3), r"metrics_path"),
    "read_metrics missing": (lambda: read_metrics("/nonexistent/efflax.jsonl"), r"metrics_path"),
    "plot_metrics missing": (
        lambda: plot_metrics("/nonexistent/m.jsonl", "/tmp/p.png"),
        r"metrics_path",
    ),
    "plot_metrics png_path": (lambda: plot_metrics("/nonexistent/m.jsonl", 3), r"png_path"),
    "plot_metrics x": (lambda: plot_metrics("/nonexistent/m.jsonl", "/tmp/p.png", x=1), r"\bx="),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_bad_call_is_refused_naming_the_argument(name):
    call, pattern = BAD[name]
    with pytest.raises(ValueError, match=pattern):
        call()


def test_plot_metrics_refuses_bad_keys(tmp_path):
    path = tmp_path / "m.jsonl"
    path.write_text('{"step": 1, "loss": 0.5}\n')
    for keys, pattern in (("loss", r"keys"), ([1], r"keys"), (["nope"], r"nope")):
        with pytest.raises(ValueError, match=pattern):
            plot_metrics(path, tmp_path / "p.png", keys=keys)
