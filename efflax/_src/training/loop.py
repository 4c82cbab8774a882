"""``fit``: the training loop with evaluation, JSON-lines metrics and exact resume."""

from __future__ import annotations

import itertools
import json
import math
import os
import pathlib
import time
from collections.abc import Callable
from collections.abc import Iterable
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any
from typing import Protocol

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding
from tqdm.auto import tqdm

from efflax._src import distributed
from efflax._src.training.state import TrainState
from pallas_kernels import _checks


class Hook(Protocol):
    """Called every ``every`` steps with the state; returns metrics to log (or None)."""

    every: int

    def __call__(self, state: TrainState) -> dict[str, float] | None: ...


class CheckpointError(ValueError):
    """A checkpoint directory exists but cannot be read as an efflax checkpoint."""


def _scalar(value: Any) -> Any:
    array = distributed.to_host(value)
    return array.item() if array.ndim == 0 else array.tolist()


def place_on_mesh(tree: Any, mesh: Any) -> Any:
    """Every array of ``tree`` on ``mesh``: sharded leaves keep their spec, others are replicated.

    Leaves already on ``mesh`` (or on its ``Explicit`` twin from ``jax.make_mesh``) keep their
    partitioning; single-device and host arrays get a full copy on every device. Works in a
    multi-process run (each process copies the shards its devices hold).

    Raises:
      ValueError: a leaf sharded over a mesh of other devices (it cannot be moved silently).
    """
    from efflax._src.sharding import auto_axes
    from efflax._src.sharding import replicated

    mesh = auto_axes(mesh)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    if isinstance(tree, TrainState):
        name = "state"
    else:
        name = "tree"
    shardings = []
    for path, leaf in leaves:
        sharding = getattr(leaf, "sharding", None)
        if (
            isinstance(sharding, NamedSharding)
            and sharding.mesh.axis_names == mesh.axis_names
            and (np.array_equal(sharding.mesh.device_ids, mesh.device_ids))
        ):
            shardings.append(NamedSharding(mesh, sharding.spec))
        elif (
            isinstance(leaf, jax.Array)
            and len(leaf.sharding.device_set) > 1
            and not leaf.is_fully_replicated
        ):
            raise ValueError(
                f"state{jax.tree_util.keystr(path)} is sharded over devices "
                f"{sorted(d.id for d in leaf.sharding.device_set)}, not over the loader's mesh "
                f"{dict(mesh.shape)}; shard it on that mesh (efflax.sharding.shard_params)"
            )
        else:
            shardings.append(replicated(mesh))
    return distributed._put_global(
        jax.tree.unflatten(treedef, [leaf for _, leaf in leaves]),
        jax.tree.unflatten(treedef, shardings),
        name,
    )


def open_checkpoints(
    directory: str | pathlib.Path, *, save_every: int | None = None, max_to_keep: int | None = 2
) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` on ``directory``; refuses a directory it cannot read.

    In a multi-process run every process opens it on the same (shared) directory and takes
    part in every save and restore, as orbax requires.

    Args:
      directory: where the checkpoints live (``<directory>/<step>/``).
      save_every: steps between kept saves (``manager.save`` skips the others).
      max_to_keep: checkpoints kept on disk (``None``: all).

    Raises:
      CheckpointError: ``directory`` is a file, or holds entries but no readable checkpoint.
      ValueError: ``save_every`` or ``max_to_keep`` < 1.
    """
    if save_every is not None:
        _checks.int_at_least("save_every", save_every)
    if max_to_keep is not None:
        _checks.int_at_least("max_to_keep", max_to_keep)
    if not isinstance(directory, str | os.PathLike):
        raise ValueError(f"directory={directory!r} must be a path (str or pathlib.Path)")
    directory = pathlib.Path(directory).absolute()
    if directory.exists() and not directory.is_dir():
        raise CheckpointError(f"checkpoint_dir={str(directory)!r} exists and is not a directory")
    if directory.is_dir():
        entries = [p for p in directory.iterdir() if not p.name.startswith(".")]
        steps = [p for p in entries if p.is_dir() and p.name.isdigit()]
        if entries and not steps:
            raise CheckpointError(
                f"checkpoint_dir={str(directory)!r} is not empty but holds no checkpoint "
                f"(found {sorted(p.name for p in entries)[:5]}); refusing to overwrite it"
            )
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, save_interval_steps=save_every or 1, create=True
    )
    return ocp.CheckpointManager(directory, options=options)


def restore_latest(manager: ocp.CheckpointManager, state: TrainState) -> TrainState:
    """The latest checkpoint restored into the structure (and shardings) of ``state``.

    Place ``state`` as it will be used first (``fit`` puts it on the loader's mesh): the
    restored arrays get exactly its shardings, whatever the mesh or the number of processes
    that wrote the checkpoint. Returns ``state`` unchanged when the directory has no checkpoint.

    Raises:
      CheckpointError: the latest checkpoint cannot be read or does not match ``state``.
    """
    if not isinstance(manager, ocp.CheckpointManager):
        raise ValueError(
            f"manager={manager!r} must be an orbax CheckpointManager (open_checkpoints)"
        )
    step = manager.latest_step()
    if step is None:
        return state
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
    try:
        return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    # What orbax raises for a checkpoint that does not match or cannot be read (other structure,
    # shape, corrupt or missing files: ValueError and its JSONDecodeError, KeyError, OSError);
    # anything else is a bug and propagates as it is.
    except (ValueError, KeyError, OSError) as e:
        raise CheckpointError(
            f"cannot restore step {step} from {str(manager.directory)!r}: {type(e).__name__}: {e}"
        ) from e


def fit(
    state: TrainState,
    train_step: Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]],
    loader: Iterable[Any],
    *,
    num_steps: int | None = None,
    eval_fn: Callable[[TrainState], dict[str, float]] | None = None,
    eval_every: int | None = None,
    eval_steps: Iterable[int] = (),
    hooks: Sequence[Hook] = (),
    log_every: int = 50,
    checkpoint_dir: str | pathlib.Path | None = None,
    checkpoint_every: int | None = None,
    metrics_path: str | pathlib.Path | None = None,
    batch_size: int | None = None,
    progress: bool = True,
) -> tuple[TrainState, list[dict[str, Any]]]:
    """Trains ``state`` for ``num_steps`` steps, resuming from ``checkpoint_dir`` if it has one.

    With a loader on a mesh (``efflax.data.load(..., mesh=mesh)``) the state is first placed on
    that mesh (sharded leaves keep their partitioning, the rest is replicated), then restored
    into that placement, so a run resumes on the mesh it trains on. In a multi-process run every
    process calls ``fit`` alike; only the primary process (``efflax.distributed.is_primary``)
    shows progress, prints evaluations and writes ``metrics_path``, every process checkpoints
    (orbax needs all of them) and returns the same history.

    Args:
      state: the initial state (also the template a checkpoint is restored into).
      train_step: ``step(state, batch) -> (state, metrics)``, e.g. from ``make_train_step``.
      loader: the batches; an ``efflax.data.Loader`` resumes in O(1) at any step, any other
        iterable is replayed from its start (the same order, so still exact if deterministic).
      num_steps: total steps of the run (default: ``len(loader)``).
      eval_fn: ``eval_fn(state) -> metrics``, run every ``eval_every`` steps, at each step in
        ``eval_steps`` and at the end.
      hooks: objects with ``every`` and ``__call__(state) -> metrics`` (a sharpness probe).
      log_every: steps between training-metric records (mean over those steps).
      checkpoint_dir: where an orbax ``CheckpointManager`` saves; resumes from its latest step.
      checkpoint_every: steps between checkpoints (the final step is always saved).
      metrics_path: a JSON-lines file that records are appended to.
      batch_size: examples per step for ``examples_seen`` (default: the loader's).
      progress: show a tqdm progress bar.

    Returns:
      The final state and the list of records (dicts with ``step``, ``examples_seen``,
      ``wall_time`` and metrics) written during this call.

    Raises:
      ValueError: a bad argument (named), a checkpoint past ``num_steps``, a loader that runs
        out of batches.
      CheckpointError: ``checkpoint_dir`` cannot be read as a checkpoint directory.
    """
    if not isinstance(state, TrainState):
        raise ValueError(f"state must be an efflax.training.TrainState, got {type(state).__name__}")
    if not callable(train_step):
        raise ValueError(f"train_step={train_step!r} must be callable (see make_train_step)")
    _checks.function("eval_fn", eval_fn, optional=True)
    _checks.boolean("progress", progress)
    if metrics_path is not None and (
        not isinstance(metrics_path, str | os.PathLike) or pathlib.Path(metrics_path).is_dir()
    ):
        raise ValueError(f"metrics_path={metrics_path!r} must be a file path (str or pathlib.Path)")
    if checkpoint_dir is not None and not isinstance(checkpoint_dir, str | os.PathLike):
        raise ValueError(f"checkpoint_dir={checkpoint_dir!r} must be a path (str or pathlib.Path)")
    if isinstance(eval_steps, str | bytes) or not isinstance(eval_steps, Iterable):
        raise ValueError(f"eval_steps={eval_steps!r} must be a list of steps")
    if isinstance(hooks, str | bytes) or not isinstance(hooks, Iterable):
        raise ValueError(f"hooks={hooks!r} must be a list of hooks")
    hooks = list(hooks)
    if isinstance(loader, str | bytes | Mapping) or not (
        hasattr(loader, "__iter__") or hasattr(loader, "iter_from")
    ):
        raise ValueError(f"loader={loader!r} must be an iterable of batches (efflax.data.Loader)")
    if num_steps is None:
        if not hasattr(loader, "__len__"):
            raise ValueError("num_steps is required for a loader without a length")
        num_steps = len(loader)  # type: ignore[arg-type]
    num_steps = _checks.int_at_least("num_steps", num_steps)
    log_every = _checks.int_at_least("log_every", log_every)
    if eval_every is not None:
        eval_every = _checks.int_at_least("eval_every", eval_every)
    eval_at = set()
    for s in eval_steps:
        if not (
            isinstance(s, int | np.integer) and not isinstance(s, bool) and 1 <= s <= num_steps
        ):
            raise ValueError(
                f"eval_steps holds {s!r}; every entry must be a step in [1, {num_steps}]"
            )
        eval_at.add(int(s))
    if eval_fn is None and (eval_every is not None or eval_at):
        raise ValueError("eval_every / eval_steps were given without an eval_fn")
    if checkpoint_every is not None:
        checkpoint_every = _checks.int_at_least("checkpoint_every", checkpoint_every)
        if checkpoint_dir is None:
            raise ValueError(f"{checkpoint_every=} was given without a checkpoint_dir")
    for i, hook in enumerate(hooks):
        every = getattr(hook, "every", None)
        if not callable(hook) or not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(
                f"hooks[{i}]={hook!r} must be callable with an int `every` >= 1, got "
                f"every={every!r}"
            )
    if batch_size is not None:
        batch_size = _checks.int_at_least("batch_size", batch_size)
    batch_size = batch_size or getattr(loader, "batch_size", None) or 0
    primary = distributed.is_primary()

    mesh = getattr(loader, "mesh", None)
    if mesh is not None:
        state = place_on_mesh(state, mesh)
    manager = None
    if checkpoint_dir is not None:
        manager = open_checkpoints(checkpoint_dir, save_every=checkpoint_every)
        state = restore_latest(manager, state)
    start = int(state.step)
    if start > num_steps:
        if manager is not None:
            manager.close()
        raise ValueError(
            f"the state is at step {start} (restored from checkpoint_dir={str(checkpoint_dir)!r})"
            f" past num_steps={num_steps}"
            if checkpoint_dir is not None
            else f"the state is at step {start}, past num_steps={num_steps}"
        )

    if hasattr(loader, "iter_from"):
        batches = loader.iter_from(start)
    else:
        batches = itertools.islice(iter(loader), start, None)

    metrics_file = None
    if metrics_path is not None and primary:
        metrics_path = pathlib.Path(metrics_path)
        metrics_path.parent.mkdir(parents=True, exist_ok=True)
        metrics_file = open(metrics_path, "a")  # noqa: SIM115 - closed in finally

    # XLA's CPU runtime can deadlock (an all-reduce rendezvous timeout) when several
    # collective programs over many host devices are in flight at once; finishing each step
    # first costs little on CPU. GPUs keep asynchronous dispatch.
    sync_each_step = jax.default_backend() == "cpu" and jax.device_count() > 1
    history: list[dict[str, Any]] = []
    pending: list[dict[str, jax.Array]] = []
    t0 = time.perf_counter()

    def record(step: int, values: dict[str, Any]) -> None:
        entry = {
            "step": step,
            "examples_seen": step * batch_size,
            "wall_time": time.perf_counter() - t0,
            **{k: _scalar(v) for k, v in values.items()},
        }
        history.append(entry)
        if metrics_file is not None:
            metrics_file.write(json.dumps(entry) + "\n")
            metrics_file.flush()

    bar = tqdm(
        total=num_steps,
        initial=start,
        disable=not (progress and primary),
        desc="train",
        leave=False,
    )

    def say(line: str) -> None:
        if primary:
            bar.write(line)

    try:
        step = start
        while step < num_steps:
            try:
                batch = next(batches)
            except StopIteration:
                raise ValueError(
                    f"the loader ran out of batches at step {step} < num_steps={num_steps}"
                ) from None
            state, metrics = train_step(state, batch)
            if sync_each_step:
                jax.block_until_ready(metrics)
            step += 1
            pending.append(metrics)
            bar.update(1)
            values: dict[str, Any] = {}
            if step % log_every == 0 or step == num_steps:
                stacked = jax.tree.map(distributed.to_host, pending)
                values.update(
                    {f"train/{k}": float(np.mean([m[k] for m in stacked])) for k in stacked[0]}
                )
                pending = []
                if not math.isfinite(values.get("train/loss", 0.0)):
                    say(f"step {step}: non-finite training loss {values['train/loss']}")
                bar.set_postfix({k[6:]: f"{v:.4g}" for k, v in values.items()})
            for hook in hooks:
                if step % hook.every == 0:
                    values.update(_metrics_of(f"hook {hook!r}", hook(state) or {}))
            if eval_fn is not None and (
                step in eval_at or step == num_steps or (eval_every and step % eval_every == 0)
            ):
                eval_values = _metrics_of("eval_fn", eval_fn(state))
                values.update(eval_values)
                say(
                    f"step {step}: "
                    + ", ".join(f"{k}={_scalar(v):.4g}" for k, v in eval_values.items())
                )
            if values:
                record(step, values)
            if manager is not None and (
                step == num_steps or (checkpoint_every and step % checkpoint_every == 0)
            ):
                manager.save(step, args=ocp.args.StandardSave(state), force=step == num_steps)
    finally:
        bar.close()
        if metrics_file is not None:
            metrics_file.close()
        if manager is not None:
            manager.wait_until_finished()
            manager.close()
    return state, history


def _metrics_of(source: str, metrics: Any) -> Mapping[str, Any]:
    """``metrics`` if it is a dict of named values (what an eval_fn or a hook returns)."""
    if not isinstance(metrics, Mapping):
        raise ValueError(
            f"{source} returned {type(metrics).__name__}; it must return a dict of named metrics"
        )
    return metrics


def read_metrics(metrics_path: str | pathlib.Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines metrics file.

    Raises:
      ValueError: a line that is not a JSON object, naming the file and the line number.
    """
    if not isinstance(metrics_path, str | os.PathLike):
        raise ValueError(f"metrics_path={metrics_path!r} must be a path (str or pathlib.Path)")
    path = pathlib.Path(metrics_path)
    if not path.is_file():
        raise ValueError(f"metrics_path={str(path)!r} is not a file")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{str(path)!r} line {number} is not a JSON record ({e.msg}): {line[:80]!r}"
            ) from None
        if not isinstance(record, dict):
            raise ValueError(f"{str(path)!r} line {number} is not a JSON object: {line[:80]!r}")
        records.append(record)
    return records


def plot_metrics(
    metrics_path: str | pathlib.Path,
    png_path: str | pathlib.Path,
    *,
    keys: Sequence[str] | None = None,
    x: str = "step",
    title: str | None = None,
) -> pathlib.Path:
    """Plots metrics of a JSON-lines file against ``x`` (one panel per key) into a PNG.

    Raises:
      ValueError: no metrics, or a key (or ``x``) that no record has.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not isinstance(png_path, str | os.PathLike):
        raise ValueError(f"png_path={png_path!r} must be a path (str or pathlib.Path)")
    if not isinstance(x, str):
        raise ValueError(f"x={x!r} must be the name of a record field, e.g. 'step'")
    if title is not None and not isinstance(title, str):
        raise ValueError(f"title={title!r} must be a string or None")
    records = read_metrics(metrics_path)
    present = sorted({k for r in records for k in r})
    if keys is None:
        skip = {"step", "examples_seen", "wall_time"}
        keys = [k for k in present if k not in skip]
    if isinstance(keys, str):
        raise ValueError(f"keys={keys!r} must be a list of metric names, e.g. [{keys!r}]")
    if not isinstance(keys, Sequence) or not all(isinstance(k, str) for k in keys):
        raise ValueError(f"keys={keys!r} must be a list of metric names")
    if not keys:
        raise ValueError(f"keys={keys!r}: no metrics to plot in {str(metrics_path)!r}")
    for name, wanted in [("keys", k) for k in keys] + [("x", x)]:
        if not any(wanted in r for r in records):
            raise ValueError(
                f"{name} names {wanted!r}, which no record of {str(metrics_path)!r} has "
                f"(present: {present})"
            )
    for key in keys:
        text = next((r[key] for r in records if isinstance(r.get(key), str)), None)
        if text is not None:
            raise ValueError(
                f"keys names {key!r}, whose values in {str(metrics_path)!r} are text such as "
                f"{text!r}, not numbers"
            )
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        points = [(r[x], r[key]) for r in records if key in r and x in r]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="." if len(xs) < 50 else None)
        ax.set_xlabel(x)
        ax.set_title(key)
        ax.grid(alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    png_path = pathlib.Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
