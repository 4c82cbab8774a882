"""The workloads of tests/test_distributed.py, run in 2 processes and (as reference) in 1.

Run as a script by ``efflax.distributed.launch`` (``python tests/_multiprocess_worker.py OUT
CKPT_DIR RESUME_DIR``), every process writes ``OUT/process<i>.npz`` with every number it
computed; the test runs the same functions in its own process on 4 of its 8 CPU devices and
compares. Kept small: a few steps of each.
"""

from __future__ import annotations

import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

DEVICES = 4  # the global mesh size of every workload
NUM_SAMPLES = 600  # mnist1d: 480 train / 120 test examples
BATCH = 16
FIT_STEPS, INTERRUPT = 6, 4


@functools.cache
def _model():
    from efflax.models import MLP

    return MLP(features=(16, 16))


@functools.cache
def _tx():
    return optax.adamw(3e-3)  # one transform: a new one would be new static metadata (recompile)


@functools.cache
def _train_step():
    from efflax.training import make_train_step

    return make_train_step(_loss_fn)  # one function: every fit call reuses its compilation


def _loss_fn(params, state, batch, rng):
    """Uses the step's rng and updates state.extra, so resume must restore both exactly."""
    from efflax.training import LossOutput

    logits = state.apply_fn({"params": params}, batch["x"])
    noise = 1e-3 * jax.random.normal(rng, logits.shape)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits + noise, batch["y"]).mean()
    seen = state.extra["seen"].at[batch["index"]].add(1)
    return loss, LossOutput(metrics={"noise": noise.mean()}, extra={"seen": seen})


def random_params(module, *inputs, seed):
    """Parameters of ``module`` drawn with numpy (logical boxes kept): no init to compile."""
    shapes = jax.eval_shape(module.init, jax.random.key(0), *inputs)["params"]
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (0.3 * rng.normal(size=s.shape)).astype(s.dtype), shapes)


def fit_state(mesh):
    """A fresh state with params sharded over the mesh's model axis (logical names)."""
    from efflax.sharding import shard_params
    from efflax.training import TrainState

    model = _model()
    params = random_params(model, jnp.zeros((1, 40)), seed=0)
    return TrainState.create(
        apply_fn=model.apply,
        params=shard_params(params, mesh),
        tx=_tx(),
        rng=jax.random.key(1),
        extra={"seen": jnp.zeros(480, jnp.int32)},
    )


def fit_mesh(devices):
    from efflax.sharding import make_mesh

    return make_mesh(data=2, model=2, devices=devices)


def run_fit(devices, directory, num_steps, metrics_path=None):
    """``fit`` on a streamed or in-memory mnist1d, resuming from ``directory`` if it holds a
    checkpoint. Returns the final state and the history."""
    from efflax import data
    from efflax.training import classification_eval_fn
    from efflax.training import fit

    mesh = fit_mesh(devices)
    loader = data.load("mnist1d", "train", BATCH, seed=3, epochs=None, mesh=mesh, num_samples=600)
    eval_fn = classification_eval_fn(data.load_arrays("mnist1d", "test", num_samples=600))
    return fit(
        fit_state(mesh),
        _train_step(),
        loader,
        num_steps=num_steps,
        eval_fn=eval_fn,
        eval_every=3,
        log_every=2,
        checkpoint_dir=directory,
        checkpoint_every=2,
        metrics_path=metrics_path,
        progress=True,
    )


def state_numbers(state, prefix):
    from efflax.distributed import to_host

    leaves = jax.tree_util.tree_leaves_with_path(
        {"params": state.params, "extra": state.extra, "step": state.step, "opt": state.opt_state}
    )
    return {f"{prefix}{jax.tree_util.keystr(path)}": to_host(leaf) for path, leaf in leaves}


def history_numbers(history, prefix):
    out = {}
    for record in history:
        for key, value in record.items():
            if key not in ("wall_time",):
                out[f"{prefix}/{record['step']}/{key}"] = np.asarray(value)
    return out


def loader_numbers(devices):
    """Global batches on a mesh whose devices alternate between the processes, so each
    process holds rows 0-3 and 8-11 (or 4-7 and 12-15): reads that are not contiguous."""
    from efflax import data
    from efflax.distributed import to_host

    position = {d: i for i, d in enumerate(sorted(devices, key=lambda d: d.id))}
    per_process = {}
    for d in devices:
        per_process.setdefault(d.process_index, []).append(d)
    rank = {d: i for group in per_process.values() for i, d in enumerate(group)}
    order = sorted(devices, key=lambda d: (rank[d], d.process_index, position[d]))
    mesh = Mesh(np.asarray(order), ("data",))
    loader = data.load("mnist1d", "train", BATCH, seed=7, epochs=2, mesh=mesh, num_samples=600)
    if jax.process_count() > 1:
        from efflax.distributed import process_local_rows
        from efflax.sharding import data_sharding

        rows = process_local_rows(data_sharding(mesh), (BATCH,))
        assert len(rows) == BATCH // 2 and np.any(np.diff(rows) > 1), rows  # not contiguous
    out = {}
    for step in (0, 1, loader.num_steps - 1):
        for key, value in loader.batch_at(step).items():
            out[f"loader/{step}/{key}"] = to_host(value)
    return out


def moe_numbers(devices):
    """Forward and gradient of MoE with the expert axis over all 4 devices (2 per process)."""
    from efflax.distributed import put_global
    from efflax.distributed import to_host
    from efflax.nn import MoEFeedForward
    from efflax.nn import moe_aux_loss
    from efflax.sharding import make_mesh

    mesh = make_mesh(data=1, expert=4, devices=devices)
    x_host = np.asarray(jax.random.normal(jax.random.key(2), (8, 8, 8)))
    layer = MoEFeedForward(8, 16, router="expert_choice", capacity_factor=2.0, mesh=mesh)
    params = nn.unbox(random_params(layer, x_host, seed=3))
    rep = NamedSharding(mesh, P())
    params = put_global(params, jax.tree.map(lambda _: rep, params))
    x = put_global(x_host, NamedSharding(mesh, P(("data", "expert"))))

    def loss(params, x):
        y, state = layer.apply({"params": params}, x, mutable=["losses"])
        return jnp.sum(jnp.sin(3 * y)) + moe_aux_loss(state["losses"]), y

    (value, y), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, x)
    out = {"moe/loss": to_host(value), "moe/y": to_host(y)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
        out[f"moe/grad{jax.tree_util.keystr(path)}"] = to_host(leaf)
    return out


def proxskip_numbers(devices):
    """ProxSkip's sharded client step with the clients over all 4 devices (2 per process)."""
    from efflax.distributed import put_global
    from efflax.distributed import to_host
    from efflax.optim import make_client_step
    from efflax.optim import proxskip

    num_clients, dim = 8, 5
    rng = np.random.default_rng(4)
    shift = rng.normal(size=(num_clients, 1, dim))
    data = {
        "a": (rng.normal(size=(num_clients, 9, dim)) + shift).astype(np.float32),
        "y": np.sign(rng.normal(size=(num_clients, 9))).astype(np.float32),
    }

    def client_loss(w, d):
        return jnp.mean(jax.nn.softplus(-d["y"] * (d["a"] @ w))) + 0.025 * jnp.sum(w**2)

    mesh = Mesh(np.asarray(devices), ("clients",))
    clients = NamedSharding(mesh, P("clients"))
    x0 = np.broadcast_to(rng.normal(size=dim), (num_clients, dim)).astype(np.float32)
    params = put_global(x0, clients)
    data = put_global(data, jax.tree.map(lambda _: clients, data))
    tx = proxskip(0.3, 0.35, key=jax.random.key(9), axis_name="clients")
    step = make_client_step(tx, jax.grad(client_loss), mesh=mesh, axis_name="clients")
    state = tx.init(params)
    out = {}
    for i in range(6):
        params, state = step(params, state, data)
        out[f"proxskip/{i}/params"] = to_host(params)
        out[f"proxskip/{i}/communications"] = to_host(state.communications)
    return out


def main(out: str, checkpoint_dir: str, resume_dir: str) -> None:
    import efflax

    efflax.distributed.initialize(
        initialization_timeout=20, heartbeat_timeout=10, shutdown_timeout=10
    )
    assert jax.process_count() == 2 and jax.device_count() == DEVICES, jax.devices()
    devices = jax.devices()
    out_dir = pathlib.Path(out)
    numbers = {}
    # Interrupted and resumed within this 2-process run ...
    _, first = run_fit(devices, checkpoint_dir, INTERRUPT, out_dir / "metrics.jsonl")
    state, second = run_fit(devices, checkpoint_dir, FIT_STEPS, out_dir / "metrics.jsonl")
    numbers.update(state_numbers(state, "fit"))
    numbers.update(history_numbers(first + second, "history"))
    # ... and resumed from a checkpoint the 1-process run wrote.
    state, _ = run_fit(devices, resume_dir, FIT_STEPS)
    numbers.update(state_numbers(state, "resumed"))
    numbers.update(loader_numbers(devices))
    numbers.update(moe_numbers(devices))
    numbers.update(proxskip_numbers(devices))

    index = jax.process_index()
    np.savez(out_dir / f"process{index}.npz", **numbers)
    (out_dir / f"process{index}.json").write_text(
        json.dumps({"primary": efflax.distributed.is_primary(), "records": len(first + second)})
    )


if __name__ == "__main__":
    main(*sys.argv[1:])
