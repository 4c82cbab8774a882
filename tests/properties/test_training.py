"""Properties of ``efflax.training``: one step against numpy, evaluation, fit and resume, files."""

from __future__ import annotations

import functools
import json
import pathlib
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _hyp import FEW
from _hyp import INVALID
from _hyp import bad_ints
from _hyp import bad_keys
from _hyp import f64
from _hyp import normal
from _hyp import props
from _hyp import refused
from _hyp import seeds
from _hyp import softmax64
from hypothesis import given
from hypothesis import strategies as st

from efflax import data as D
from efflax import sharding as S
from efflax import training as T

N, DIM, CLASSES = 8, 3, 4
TMP = pathlib.Path(tempfile.mkdtemp(prefix="efflax_props_"))


def _apply(variables, x):
    return x @ variables["params"]["w"]


def _regression_loss(params, state, batch, rng):
    del rng
    residual = _apply({"params": params}, batch["x"]) - batch["y"]
    seen = state.extra["seen"] + batch["x"].shape[0]
    return jnp.mean(residual**2), T.LossOutput(
        metrics={"abs": jnp.mean(jnp.abs(residual))}, extra={"seen": seen}
    )


_STEP = T.make_train_step(_regression_loss)
_STEP_NO_DONATE = T.make_train_step(_regression_loss, donate=False)


def _state(w, lr=0.1):
    return T.TrainState.create(
        apply_fn=_apply, params={"w": jnp.asarray(w)}, tx=optax.sgd(lr), rng=jax.random.key(0),
        extra={"seen": jnp.zeros((), jnp.int32)},
    )  # fmt: skip


@props(4)
@given(seeds, st.floats(1e-3, 0.5))
def test_one_train_step_is_one_sgd_step(seed, lr):
    x, y, w = normal(seed, (N, DIM)), normal(seed + 1, (N,)), normal(seed + 2, (DIM,))
    state = _state(w, lr)
    new, metrics = _STEP(state, {"x": jnp.asarray(x), "y": jnp.asarray(y)})
    residual = f64(x) @ f64(w) - f64(y)
    grad = 2 / N * f64(x).T @ residual
    np.testing.assert_allclose(
        np.asarray(new.params["w"]), f64(w) - lr * grad, rtol=1e-5, atol=1e-6
    )
    np.testing.assert_allclose(float(metrics["loss"]), np.mean(residual**2), rtol=1e-5)
    np.testing.assert_allclose(float(metrics["abs"]), np.mean(np.abs(residual)), rtol=1e-5)
    assert int(new.step) == 1 and int(new.extra["seen"]) == N


def _classifier_state(w):
    return T.TrainState.create(
        apply_fn=_apply, params={"w": jnp.asarray(w)}, tx=optax.sgd(0.1), rng=jax.random.key(0)
    )


@props(4)
@given(seeds, st.sampled_from([3, N]))
def test_classification_loss_and_eval_match_numpy(seed, batch_size):
    x, w = normal(seed, (N, DIM)), normal(seed + 1, (DIM, CLASSES))
    y = np.random.default_rng(seed).integers(0, CLASSES, N).astype(np.int32)
    state = _classifier_state(w)
    logits = f64(x) @ f64(w)
    nll = -np.log(softmax64(logits)[np.arange(N), y])
    accuracy = np.mean(np.argmax(logits, -1) == y)
    loss, output = T.cross_entropy_loss_fn()(
        state.params, state, {"x": jnp.asarray(x), "y": jnp.asarray(y)}, None
    )
    np.testing.assert_allclose(float(loss), nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(float(output.metrics["accuracy"]), accuracy)
    # Evaluation over the split does not depend on how it is batched.
    metrics = T.classification_eval_fn({"x": x, "y": y}, batch_size=batch_size, prefix="val")(state)
    np.testing.assert_allclose(metrics["val/loss"], nll.mean(), rtol=1e-5)
    np.testing.assert_allclose(metrics["val/accuracy"], accuracy)


@props(1)
@given(seeds)
def test_fit_resumes_exactly_and_writes_its_records(seed):
    arrays = {"x": normal(seed, (4 * N, DIM)), "y": normal(seed + 1, (4 * N,))}
    loader = D.Loader(arrays, N, epochs=2, seed=seed)
    w = normal(seed + 2, (DIM,))
    # By hand: the step applied to every batch in order.
    by_hand = _state(w)
    for batch in loader:
        by_hand, _ = _STEP_NO_DONATE(by_hand, batch)
    directory, metrics_path = TMP / f"ckpt{seed}", TMP / f"metrics{seed}.jsonl"
    fit = functools.partial(T.fit, progress=False, checkpoint_dir=directory, log_every=2)
    half, _ = fit(_state(w), _STEP, loader, num_steps=len(loader) // 2, metrics_path=metrics_path)
    full, history = fit(_state(w), _STEP, loader, metrics_path=metrics_path)  # resumes
    np.testing.assert_allclose(
        np.asarray(full.params["w"]), np.asarray(by_hand.params["w"]), rtol=1e-6
    )
    assert int(full.step) == len(loader) and int(full.extra["seen"]) == len(loader) * N
    records = T.read_metrics(metrics_path)
    assert [r["step"] for r in records] == list(range(2, len(loader) + 1, 2))
    assert records[-1] == json.loads(json.dumps(history[-1]))
    png = T.plot_metrics(metrics_path, TMP / f"plot{seed}.png", keys=["train/loss"])
    assert png.stat().st_size > 0
    restored = T.restore_latest(T.open_checkpoints(directory), _state(w))
    np.testing.assert_array_equal(np.asarray(restored.params["w"]), np.asarray(full.params["w"]))


@FEW
@given(seeds, st.sampled_from([(8, 1, 1), (2, 2, 2)]))
def test_place_on_mesh_keeps_values(seed, shape):
    mesh = S.make_mesh(data=shape[0], expert=shape[1], model=shape[2])
    tree = {"a": jnp.asarray(normal(seed, (4, 3))), "b": np.arange(5)}
    placed = T.place_on_mesh(tree, mesh)
    np.testing.assert_array_equal(np.asarray(placed["a"]), np.asarray(tree["a"]))
    np.testing.assert_array_equal(np.asarray(placed["b"]), tree["b"])
    assert placed["a"].sharding.is_fully_replicated


@INVALID
@given(st.data())
def test_train_state_and_step_refuse(data):
    good = dict(
        apply_fn=_apply, params={"w": jnp.ones(DIM)}, tx=optax.sgd(0.1), rng=jax.random.key(0)
    )
    case = data.draw(
        st.sampled_from(["rng", "tx", "extra", "params", "apply_fn", "loss_fn", "flag", "contract"])
    )
    if case == "rng":
        refused(lambda: T.TrainState.create(**{**good, "rng": data.draw(bad_keys())}), "rng")
    elif case == "tx":
        refused(
            lambda: T.TrainState.create(
                **{**good, "tx": data.draw(st.sampled_from(["adam", None, 0.1]))}
            ),
            "tx",
        )
    elif case == "extra":
        refused(
            lambda: T.TrainState.create(
                **{**good, "extra": data.draw(st.sampled_from([[1], "x", 3]))}
            ),
            "extra",
        )
    elif case == "params":
        dtype = data.draw(st.sampled_from([jnp.int32, jnp.bool_, jnp.uint8]))
        refused(
            lambda: T.TrainState.create(**{**good, "params": {"w": jnp.ones(DIM, dtype)}}), "params"
        )
    elif case == "apply_fn":
        refused(lambda: T.TrainState.create(**{**good, "apply_fn": "model"}), "apply_fn")
    elif case == "loss_fn":
        refused(lambda: T.make_train_step(data.draw(st.sampled_from(["loss", None, 3]))), "loss_fn")
    elif case == "flag":
        arg = data.draw(st.sampled_from(["pass_grad_fn", "pass_value", "donate", "jit"]))
        refused(
            lambda: T.make_train_step(
                _regression_loss, **{arg: data.draw(st.sampled_from(["yes", 1, None]))}
            ),
            arg,
        )
    else:
        out = data.draw(
            st.sampled_from(
                [
                    jnp.ones(3),
                    jnp.int32(1),
                    (jnp.float32(1.0), {"metrics": {}, "extra": {}}),
                    (jnp.float32(1.0), T.LossOutput(metrics=[1])),
                    (jnp.float32(1.0), T.LossOutput(extra={"nope": 1})),
                    (jnp.float32(1.0), T.LossOutput(metrics={"loss": 1.0})),
                    (jnp.float32(1.0), 2.0),
                ]
            )
        )
        step = T.make_train_step(lambda *args: out, jit=False)
        refused(lambda: step(T.TrainState.create(**good), {}), "loss_fn", "LossOutput", "nope")


@INVALID
@given(st.data())
def test_fit_refuses(data):
    state = _state(np.ones(DIM))
    loader = D.Loader({"x": np.ones((N, DIM)), "y": np.ones(N)}, 2)
    arg = data.draw(
        st.sampled_from(
            ["num_steps", "log_every", "eval_every", "eval_steps", "eval_fn", "checkpoint_every",
             "hooks", "batch_size", "train_step", "state", "loader", "runs_out", "results"]
        )
    )  # fmt: skip
    fit = functools.partial(T.fit, progress=False)
    if arg in ("num_steps", "log_every", "batch_size"):
        refused(
            lambda: fit(
                state, _STEP, loader, **{arg: data.draw(bad_ints().filter(lambda v: v is not None))}
            ),
            arg,
        )
    elif arg == "eval_every":
        refused(
            lambda: fit(
                state,
                _STEP,
                loader,
                eval_fn=lambda s: {},
                eval_every=data.draw(bad_ints().filter(lambda v: v is not None)),
            ),
            arg,
        )
    elif arg == "eval_steps":
        bad = data.draw(st.sampled_from([[0], [5], [1.5], [-1], ["1"]]))
        refused(lambda: fit(state, _STEP, loader, eval_fn=lambda s: {}, eval_steps=bad), arg)
    elif arg == "eval_fn":
        refused(lambda: fit(state, _STEP, loader, eval_every=1), arg)
    elif arg == "checkpoint_every":
        refused(
            lambda: fit(
                state,
                _STEP,
                loader,
                checkpoint_every=data.draw(st.sampled_from([0, -1, 2.5, True])),
            ),
            arg,
        )
    elif arg == "hooks":
        refused(
            lambda: fit(
                state, _STEP, loader, hooks=[data.draw(st.sampled_from([lambda s: {}, "hook"]))]
            ),
            "every",
        )
    elif arg == "train_step":
        refused(lambda: fit(state, "step", loader), arg)
    elif arg == "state":
        refused(lambda: fit(data.draw(st.sampled_from(["state", None, {}])), _STEP, loader), arg)
    elif arg == "loader":
        refused(lambda: fit(state, _STEP, data.draw(st.sampled_from([5, None])), num_steps=1), arg)
    elif arg == "runs_out":
        refused(lambda: fit(state, _STEP_NO_DONATE, loader, num_steps=len(loader) + 1), "loader")
    else:
        which = data.draw(st.sampled_from(["eval_fn", "hook"]))
        if which == "eval_fn":
            refused(lambda: fit(state, _STEP_NO_DONATE, loader, eval_fn=lambda s: [1.0]), "eval_fn")
        else:
            refused(lambda: fit(state, _STEP_NO_DONATE, loader, hooks=[_ListHook()]), "hook")


class _ListHook:
    every = 1

    def __call__(self, state):
        return [1.0]


@INVALID
@given(st.data())
def test_files_and_evaluation_refuse(data):
    (TMP / "afile").write_text("x")
    (TMP / "junk").mkdir(exist_ok=True)
    (TMP / "junk" / "notes.txt").write_text("x")
    (TMP / "bad.jsonl").write_text('{"step": 1}\nnot json\n')
    (TMP / "good.jsonl").write_text('{"step": 1, "loss": 1.0, "note": "text"}\n')
    case = data.draw(
        st.sampled_from(
            ["max_to_keep", "save_every", "directory", "not_checkpoints", "manager", "corrupt",
             "keys", "keys_str", "x", "text", "eval_batch", "eval_keys", "eval_lengths",
             "eval_labels", "eval_arrays", "ce_key", "mesh"]
        )
    )  # fmt: skip
    x, y = normal(0, (N, DIM)), np.arange(N) % CLASSES
    if case in ("max_to_keep", "save_every"):
        refused(
            lambda: T.open_checkpoints(
                TMP / "c", **{case: data.draw(st.sampled_from([0, -1, 2.5, True]))}
            ),
            case,
        )
    elif case == "directory":
        refused(
            lambda: T.open_checkpoints(data.draw(st.sampled_from([TMP / "afile", 5, None]))),
            "directory",
            "afile",
        )
    elif case == "not_checkpoints":
        refused(lambda: T.open_checkpoints(TMP / "junk"), "junk")
    elif case == "manager":
        refused(
            lambda: T.restore_latest(data.draw(st.sampled_from(["x", None])), _state(np.ones(DIM))),
            "manager",
        )
    elif case == "corrupt":
        refused(lambda: T.read_metrics(TMP / "bad.jsonl"), "bad.jsonl")
    elif case == "keys":
        refused(lambda: T.plot_metrics(TMP / "good.jsonl", TMP / "p.png", keys=["nope"]), "nope")
    elif case == "keys_str":
        refused(lambda: T.plot_metrics(TMP / "good.jsonl", TMP / "p.png", keys="loss"), "keys")
    elif case == "x":
        refused(lambda: T.plot_metrics(TMP / "good.jsonl", TMP / "p.png", x="time"), "time")
    elif case == "text":
        refused(lambda: T.plot_metrics(TMP / "good.jsonl", TMP / "p.png", keys=["note"]), "note")
    elif case == "eval_batch":
        refused(
            lambda: T.classification_eval_fn({"x": x, "y": y}, batch_size=data.draw(bad_ints())),
            "batch_size",
        )
    elif case == "eval_keys":
        refused(lambda: T.classification_eval_fn({"x": x, "y": y}, y_key="label"), "y_key")
    elif case == "eval_lengths":
        refused(lambda: T.classification_eval_fn({"x": x, "y": y[:3]}), "arrays")
    elif case == "eval_labels":
        bad = data.draw(st.sampled_from([y * 1.0, y + CLASSES, y - 1]))
        refused(
            lambda: T.classification_eval_fn({"x": x, "y": bad})(
                _classifier_state(normal(0, (DIM, CLASSES)))
            ),
            "arrays['y']",
        )
    elif case == "eval_arrays":
        refused(lambda: T.classification_eval_fn(data.draw(st.sampled_from([5, [x, y]]))), "arrays")
    elif case == "ce_key":
        state = _classifier_state(normal(0, (DIM, CLASSES)))
        refused(
            lambda: T.cross_entropy_loss_fn(x_key="inputs")(
                state.params, state, {"x": x, "y": y}, None
            ),
            "x_key",
        )
    else:
        refused(
            lambda: T.place_on_mesh({"a": jnp.ones(2)}, data.draw(st.sampled_from(["mesh", None]))),
            "mesh",
        )
