"""The train state, the loss contract (``LossOutput``) and the jitted, data-parallel train step."""

from __future__ import annotations

import dataclasses
import functools
import types
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import linen as nn
from flax import struct

from pallas_kernels import _checks

_EMPTY: Mapping[str, Any] = types.MappingProxyType({})


class LossOutput(NamedTuple):
    """What a loss function returns beside the loss: ``return loss, LossOutput(metrics=...)``.

    Attributes:
      metrics: named scalars to log (the step adds ``'loss'`` itself; do not set it).
      extra: new values for entries of ``state.extra``, key by key: a key left out keeps its
        value. Every key must already exist in ``state.extra`` (declared in
        ``TrainState.create(extra=...)``) with the same pytree structure, shapes and dtypes,
        so that the state keeps one structure for jit, donation and checkpoints.

    Example:
      >>> def loss_fn(params, state, batch, rng):
      ...     logits = state.apply_fn({"params": params}, batch["x"])
      ...     loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
      ...     seen = state.extra["seen"].at[batch["index"]].add(1)
      ...     return loss, LossOutput(metrics={"logit_norm": jnp.abs(logits).mean()},
      ...                             extra={"seen": seen})
    """

    metrics: Mapping[str, Any] = _EMPTY
    extra: Mapping[str, Any] = _EMPTY


LossFn = Callable[..., "jax.Array | tuple[jax.Array, LossOutput]"]


# Programs that run once (initialisation) are compiled without XLA's backend optimisations: on
# a CPU they cost a quarter of the compile time, and a one-off run saves less than that.
_RUN_ONCE_OPTIONS = {"xla_backend_optimization_level": 0}

_TRACING_ERRORS = (jax.errors.JAXTypeError, jax.errors.JAXIndexError, TypeError)


def _compile_once(fn: Callable) -> Callable:
    """``jax.jit(fn)`` for a program that runs once (initialisation): on a CPU without XLA's
    backend optimisations, which take most of its compile time (results agree to float rounding:
    the unoptimised program may round a fused multiply-add differently)."""
    options = _RUN_ONCE_OPTIONS if jax.default_backend() == "cpu" else None
    return jax.jit(fn, compiler_options=options)


def _on_one_device(tree: Any) -> bool:
    """Every leaf is a concrete ``jax.Array`` on one device (no tracer, no multi-device sharding:
    a compiled program there could place its outputs differently from the eager ops)."""
    return all(
        _is_local_array(x) and len(x.sharding.device_set) == 1 for x in jax.tree.leaves(tree)
    )


@functools.lru_cache(maxsize=32)
def _compiled_opt_init(tx: optax.GradientTransformation) -> Callable:
    return _compile_once(tx.init)


def _opt_init(tx: optax.GradientTransformation, params: Any) -> Any:
    """``tx.init(params)``, as one compiled program for parameters on one device: run eagerly,
    every leaf's ``zeros_like`` compiles on its own (tens of small programs for a model). An
    unhashable ``tx``, or one whose ``init`` needs concrete values, runs eagerly."""
    if not _on_one_device(params):
        return tx.init(params)
    try:
        return _compiled_opt_init(tx)(params)
    except _TRACING_ERRORS:  # unhashable tx, or an init that needs concrete values
        return tx.init(params)


def _own(tree: Any) -> Any:
    """A copy of every ``jax.Array`` in ``tree``: the state owns its buffers (a donated step
    deletes them), so the caller's arrays stay valid. This process's arrays are copied by one
    ``device_put`` (no compiled program per shape); tracers and arrays that span processes by
    ``copy``."""
    leaves, treedef = jax.tree.flatten(tree)
    local = {i: x for i, x in enumerate(leaves) if _is_local_array(x)}
    copies = dict(zip(local, jax.device_put(list(local.values()), may_alias=False), strict=True))
    leaves = [
        copies[i] if i in copies else x.copy() if isinstance(x, jax.Array) else x
        for i, x in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, leaves)


def _is_local_array(x: Any) -> bool:
    return (
        isinstance(x, jax.Array) and not isinstance(x, jax.core.Tracer) and x.is_fully_addressable
    )


def _as_raw_key(rng: Any) -> jax.Array:
    default_shape = jax.random.key_data(jax.random.key(0)).shape
    if isinstance(rng, jax.Array) and jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
        if rng.shape != ():
            raise ValueError(f"rng must be one PRNG key, got a key array of shape {rng.shape}")
        rng = jax.random.key_data(rng)
    elif not (
        hasattr(rng, "dtype") and np.dtype(rng.dtype) == np.uint32 and rng.shape == default_shape
    ):
        shape = getattr(rng, "shape", None)
        raise ValueError(
            f"rng={rng!r} must be a PRNG key: jax.random.key(seed) (or a raw uint32{list(default_shape)} "
            f"from jax.random.PRNGKey(seed)); got {type(rng).__name__}"
            + (f" of shape {shape}" if shape is not None else "")
        )
    return rng.copy() if isinstance(rng, jax.Array) else jnp.asarray(rng)


def _dtype(x: Any) -> np.dtype:
    if hasattr(x, "dtype"):
        return np.dtype(x.dtype)
    try:
        return np.dtype(jnp.result_type(x))
    except TypeError:  # a string or another object that is not a number
        return np.dtype(object)


def _merge_extra(current: Mapping[str, Any], update: Any, *, source: str) -> dict[str, Any]:
    """``current`` with the entries of ``update`` replaced, after checking they fit."""
    if update is None:
        return dict(current)
    if not isinstance(update, Mapping):
        raise ValueError(
            f"{source} must be a dict of state.extra entries, got {type(update).__name__}"
        )
    unknown = sorted(str(k) for k in update if k not in current)
    if unknown:
        raise ValueError(
            f"{source} has key {unknown[0]!r} that state.extra does not have (its keys: "
            f"{sorted(current)}); declare every entry in TrainState.create(extra=...), so the "
            f"state keeps one structure for jit, donation and checkpoints"
        )
    for key, value in update.items():
        old_name, new_name = f"state.extra[{key!r}]", f"{source}[{key!r}]"
        _checks.same_structure(old_name, current[key], new_name, value)
        for (path, old), new in zip(
            jax.tree_util.tree_leaves_with_path(current[key]), jax.tree.leaves(value), strict=True
        ):
            if _dtype(old) != _dtype(new):
                where = jax.tree_util.keystr(path)
                raise ValueError(
                    f"{new_name}{where} has dtype {_dtype(new)} but {old_name}{where} has dtype "
                    f"{_dtype(old)}; cast it (a state entry keeps its dtype)"
                )
    return {**current, **update}


class TrainState(struct.PyTreeNode):
    """Everything a training run carries from step to step, and checkpoints.

    Attributes:
      step: int32 scalar, the number of optimizer steps taken.
      params: the model parameters (a pytree).
      opt_state: the optax state.
      rng: a raw ``uint32[2]`` PRNG key; step ``t`` uses ``fold_in(rng, t)``, so a resumed
        run draws the same numbers as an uninterrupted one.
      extra: a dict for any further state: a SAF logits buffer, EMA weights, batch statistics.
        Its keys are fixed at ``create``; a loss function updates entries with
        ``LossOutput(extra=...)``.
      apply_fn: the model's apply function (static, not saved).
      tx: the optax transform (static, not saved).
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array
    extra: dict[str, Any]
    apply_fn: Callable[..., Any] = struct.field(pytree_node=False)
    tx: optax.GradientTransformation = struct.field(pytree_node=False)

    @classmethod
    def create(
        cls,
        *,
        apply_fn: Callable[..., Any],
        params: Any,
        tx: optax.GradientTransformation,
        rng: jax.Array,
        extra: Mapping[str, Any] | None = None,
    ) -> TrainState:
        """A state at step 0 with ``tx.init(params)``.

        The state copies the arrays it takes (``params``, ``rng``, ``extra``): a donated train
        step deletes the state's buffers, never the caller's.

        Raises:
          ValueError: ``rng`` is not a PRNG key, ``extra`` is not a dict, or ``tx`` is not an
            optax transform.
        """
        if not (callable(getattr(tx, "init", None)) and callable(getattr(tx, "update", None))):
            raise ValueError(f"tx={tx!r} must be an optax GradientTransformation")
        if extra is not None and not isinstance(extra, Mapping):
            raise ValueError(f"extra must be a dict (or None), got {type(extra).__name__}")
        _checks.function("apply_fn", apply_fn, optional=True)
        for path, leaf in jax.tree_util.tree_leaves_with_path(params):
            if not jnp.issubdtype(_dtype(leaf), jnp.inexact):
                raise ValueError(
                    f"params{jax.tree_util.keystr(path)} has dtype {_dtype(leaf)}; parameters "
                    "must be floating (gradients are taken of them); keep integer state in "
                    "extra="
                )
        rng = _as_raw_key(rng)
        params = _own(params)
        extra = {k: jax.tree.map(jnp.asarray, _own(v)) for k, v in (extra or {}).items()}
        return cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=_opt_init(tx, params),
            rng=rng,
            extra=extra,
            apply_fn=apply_fn,
            tx=tx,
        )

    def apply_gradients(
        self, grads: Any, *, extra: Mapping[str, Any] | None = None, **update_kwargs: Any
    ) -> TrainState:
        """One optax update; ``update_kwargs`` reach ``tx.update`` (e.g. ``grad_fn`` for SAM).

        Args:
          grads: gradients with the structure of ``params``.
          extra: new values for some entries of ``state.extra`` (the others are kept).
        """
        new_extra = _merge_extra(self.extra, extra, source="extra")
        _checks.same_structure("state.params", self.params, "grads", grads)
        updates, opt_state = self.tx.update(grads, self.opt_state, self.params, **update_kwargs)
        return self.replace(
            step=self.step + 1,
            params=optax.apply_updates(self.params, updates),
            opt_state=opt_state,
            extra=new_extra,
        )

    def step_rng(self) -> jax.Array:
        """The PRNG key of the current step."""
        return jax.random.fold_in(self.rng, self.step)


_OLD_AUX_MESSAGE = (
    "loss_fn returned the old aux dict {{'metrics': ..., 'extra': ...}} (keys {keys}); return "
    "`loss, efflax.training.LossOutput(metrics=..., extra=...)` instead (both fields optional; "
    "extra now updates state.extra key by key)"
)


def _split_loss_output(out: Any) -> tuple[jax.Array, LossOutput]:
    """``loss`` or ``(loss, LossOutput)`` -> ``(loss, LossOutput)``, refusing anything else."""
    if isinstance(out, LossOutput):
        raise ValueError("loss_fn returned a LossOutput alone; return `loss, LossOutput(...)`")
    if isinstance(out, tuple):
        if len(out) != 2:
            raise ValueError(
                f"loss_fn must return `loss` or `(loss, LossOutput(...))`, got a tuple of {len(out)}"
            )
        loss, output = out
        if isinstance(output, Mapping) and {"metrics", "extra"} & set(output):
            raise ValueError(_OLD_AUX_MESSAGE.format(keys=sorted(output)))
        if not isinstance(output, LossOutput):
            raise ValueError(
                f"loss_fn must return `loss` or `(loss, LossOutput(...))`, got `(loss, "
                f"{type(output).__name__})`; wrap what you return in efflax.training.LossOutput"
            )
    else:
        loss, output = out, LossOutput()
    if jnp.ndim(loss) != 0 or not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
        raise ValueError(
            f"loss_fn must return a float scalar loss, got shape {jnp.shape(loss)} dtype "
            f"{jnp.result_type(loss)} (reduce it with .mean())"
        )
    if not isinstance(output.metrics, Mapping):
        raise ValueError(f"LossOutput.metrics must be a dict, got {type(output.metrics).__name__}")
    if "loss" in output.metrics:
        raise ValueError("LossOutput.metrics must not set 'loss': the step records the loss itself")
    if not isinstance(output.extra, Mapping):
        raise ValueError(f"LossOutput.extra must be a dict, got {type(output.extra).__name__}")
    return loss, output


def make_train_step(
    loss_fn: LossFn,
    *,
    pass_grad_fn: bool = False,
    pass_value: bool = False,
    donate: bool = True,
    jit: bool = True,
) -> Callable[[TrainState, Any], tuple[TrainState, dict[str, jax.Array]]]:
    """A jitted ``step(state, batch) -> (state, metrics)`` from a loss function.

    Args:
      loss_fn: ``loss_fn(params, state, batch, rng)`` returning ``loss`` or
        ``(loss, LossOutput(metrics=..., extra=...))``: ``metrics`` are logged, ``extra``
        updates entries of ``state.extra`` (e.g. a logits buffer). ``rng`` is this step's key.
      pass_grad_fn: pass ``grad_fn=lambda params, count: <gradient of the same loss, on the
        same batch and rng, at params>`` to ``tx.update``: what
        ``optax.contrib.sam(..., opaque_mode=True)`` (and ``efflax.optim.sam``) needs.
      pass_value: pass ``value=loss`` to ``tx.update`` (``optax.contrib.reduce_on_plateau``,
        ``optax.polyak_sgd``).
      donate: donate the old state's buffers to the new one (the caller's arrays that
        ``TrainState.create`` took are copies, so they stay valid).
      jit: wrap in ``jax.jit``.

    Data parallelism comes from the arguments: with params replicated (or sharded with
    ``efflax.sharding.shard_params``) and the batch split over the mesh's data axes
    (``efflax.sharding.shard_batch`` or ``efflax.data.load(..., mesh=mesh)``), XLA partitions
    the step and inserts the gradient all-reduce.

    Returns:
      The step function; ``metrics`` always holds ``'loss'``.

    Raises (when the step is first traced):
      ValueError: ``loss_fn`` returns something else than the contract above (the old
        ``{'metrics': ..., 'extra': ...}`` dict gets a message saying how to migrate),
        ``LossOutput.extra`` has a key ``state.extra`` lacks or an entry of another structure,
        shape or dtype, or ``pass_grad_fn``/``pass_value`` with a ``tx`` that takes no keyword
        arguments.
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn={loss_fn!r} must be callable")
    for name, flag in (
        ("pass_grad_fn", pass_grad_fn),
        ("pass_value", pass_value),
        ("donate", donate),
        ("jit", jit),
    ):
        _checks.boolean(name, flag)

    def loss_and_aux(params, state, batch, rng):
        loss, output = _split_loss_output(loss_fn(params, state, batch, rng))
        return loss, (dict(output.metrics), dict(output.extra))

    def step(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        rng = state.step_rng()
        (loss, (metrics, extra)), grads = jax.value_and_grad(loss_and_aux, has_aux=True)(
            state.params, state, batch, rng
        )
        update_kwargs: dict[str, Any] = {}
        if pass_grad_fn:

            def grad_fn(params, count):
                del count  # the step's batch and rng are fixed; optax's SAM passes its count
                return jax.grad(lambda p: loss_and_aux(p, state, batch, rng)[0])(params)

            update_kwargs["grad_fn"] = grad_fn
        if pass_value:
            update_kwargs["value"] = loss
        if update_kwargs and not isinstance(state.tx, optax.GradientTransformationExtraArgs):
            raise ValueError(
                f"make_train_step(pass_grad_fn={pass_grad_fn}, pass_value={pass_value}) passes "
                f"{sorted(update_kwargs)} to tx.update, but tx is a plain GradientTransformation "
                f"that takes no keyword arguments; use one that reads them (e.g. "
                f"optax.contrib.sam(..., opaque_mode=True)) or leave the flag off"
            )
        new_state = state.apply_gradients(
            grads,
            extra=_merge_extra(state.extra, extra, source="LossOutput.extra"),
            **update_kwargs,
        )
        return new_state, {"loss": loss, **metrics}

    if not jit:
        return step
    jitted = jax.jit(step, donate_argnums=(0,) if donate else ())

    @functools.wraps(step)
    def run(state: TrainState, batch: Any) -> tuple[TrainState, dict[str, jax.Array]]:
        try:
            return jitted(state, batch)
        except ValueError:
            _explain_mixed_meshes(state, batch)  # raises a clearer error when that is the cause
            raise

    run.lower = jitted.lower  # type: ignore[attr-defined]
    return run


def _explain_mixed_meshes(*trees: Any) -> None:
    """Raises a ValueError saying what to change if the arrays sit on meshes that differ only
    in axis types (an ``Explicit`` mesh from ``jax.make_mesh`` next to efflax's ``Auto`` one)."""
    seen: dict[tuple, tuple[str, Any]] = {}
    for tree in trees:
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
            sharding = getattr(leaf, "sharding", None)
            mesh = getattr(sharding, "mesh", None)
            if mesh is None or not hasattr(mesh, "axis_types"):
                continue
            key = (tuple(mesh.axis_names), tuple(mesh.devices.shape))
            types_ = tuple(mesh.axis_types)
            if key in seen and seen[key][1] != types_:
                raise ValueError(
                    f"the state and batch sit on two versions of one mesh {key[0]}: "
                    f"{seen[key][0]} with axis types {seen[key][1]} and "
                    f"{jax.tree_util.keystr(path)} with {types_}. efflax places arrays on the "
                    f"Auto version (efflax.sharding.auto_axes(mesh)); place yours with "
                    f"efflax.sharding.shard_params / replicated(mesh) / shard_batch, or build the "
                    f"mesh with axis_types=(jax.sharding.AxisType.Auto,) * ndim"
                ) from None
            seen.setdefault(key, (jax.tree_util.keystr(path), types_))


def cross_entropy_loss_fn(*, x_key: str = "x", y_key: str = "y") -> LossFn:
    """A classification ``loss_fn`` for :func:`make_train_step`: mean softmax cross-entropy.

    The model is called as ``state.apply_fn({'params': params}, batch[x_key])``; the accuracy
    is logged as a metric.
    """

    for name, key in (("x_key", x_key), ("y_key", y_key)):
        if not isinstance(key, str):
            raise ValueError(f"{name}={key!r} must be a string (a key of the batch dict)")

    def loss_fn(params, state, batch, rng):
        del rng
        if not isinstance(batch, Mapping):
            raise ValueError(
                f"the batch must be a dict with {x_key!r} and {y_key!r}, got {type(batch).__name__}"
            )
        for name, key in (("x_key", x_key), ("y_key", y_key)):
            if key not in batch:
                raise ValueError(f"{name}={key!r} is not a key of the batch ({sorted(batch)})")
        logits = state.apply_fn({"params": params}, batch[x_key])
        _checks.array(
            "the model's output", logits, min_ndim=1, kind="floating", layout="[..., classes]"
        )
        labels = batch[y_key]
        _checks.array(f"batch[{y_key!r}]", labels, kind="integer", layout="class ids")
        if tuple(labels.shape) != tuple(logits.shape[:-1]):
            raise ValueError(
                f"batch[{y_key!r}].shape={tuple(labels.shape)} must be the logits' shape without "
                f"the class axis, {tuple(logits.shape[:-1])} (logits {tuple(logits.shape)})"
            )
        # Known only outside jit; inside, an out-of-range label gives a NaN loss.
        _checks.indices_in_range(f"batch[{y_key!r}]", labels, logits.shape[-1])
        loss = optax.softmax_cross_entropy_with_integer_labels(
            logits.astype(jnp.float32), labels
        ).mean()
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return loss, LossOutput(metrics={"accuracy": accuracy})

    return loss_fn


def repeated_step(
    step: Callable[[TrainState, Any], tuple[TrainState, Any]], state: TrainState, batch: Any
) -> Callable[[], tuple[Any, Any]]:
    """A function of no arguments that advances its own copy of ``state`` by ``step(state,
    batch)`` at every call and returns ``(params, metrics)`` (valid until the next call, which
    may donate them): a train step for ``efflax.curves.interleaved_times``, e.g.
    ``{"dense": (repeated_step(step, state, batch), ())}``.
    """
    _checks.function("step", step)
    if not isinstance(state, TrainState):
        raise ValueError(f"state must be a TrainState, got {type(state).__name__}")
    holder = [_own(state)]  # a donating step deletes the buffers it is given, not the caller's

    def call() -> tuple[Any, Any]:
        holder[0], metrics = step(holder[0], batch)
        return holder[0].params, metrics

    return call


def batched_apply(
    fn: Callable[[Any, Any], Any], params: Any, x: Any, *, batch_size: int
) -> np.ndarray:
    """``fn(params, x)`` over the rows of ``x`` in batches of ``batch_size``, as one numpy array.

    The last batch is padded with zeros to ``batch_size`` rows (and its padding cut off again),
    so a jitted ``fn`` compiles one shape whatever the length of ``x``: the program that
    evaluates a model can be the one that is timed.

    Raises:
      ValueError: ``batch_size`` < 1, ``fn`` not callable, or ``x`` with no rows.
    """
    _checks.function("fn", fn)
    batch_size = _checks.int_at_least("batch_size", batch_size)
    x = np.asarray(x)
    if x.ndim == 0 or len(x) == 0:
        raise ValueError(f"x has shape {x.shape}; it must have at least one row")
    out = []
    for start in range(0, len(x), batch_size):
        chunk = x[start : start + batch_size]
        pad = np.zeros((batch_size - len(chunk), *chunk.shape[1:]), chunk.dtype)
        out.append(np.asarray(fn(params, np.concatenate([chunk, pad])))[: len(chunk)])
    return np.concatenate(out)


@dataclasses.dataclass(frozen=True)
class _ModuleApply:
    """``module.apply`` as a static argument that equal modules share: a bound method compares
    by its module's identity, so two equal models built apart would compile twice."""

    module: nn.Module

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module.apply(*args, **kwargs)


def _static_apply(apply_fn: Callable) -> Callable:
    """``apply_fn`` as a jit static argument: a linen ``Module.apply`` keyed by its (hashable)
    module, anything else as it is."""
    module = getattr(apply_fn, "__self__", None)
    if not (isinstance(module, nn.Module) and apply_fn.__func__ is nn.Module.apply):
        return apply_fn
    try:
        hash(module)
    except TypeError:  # unhashable attributes: keyed by the bound method (its identity)
        return apply_fn
    return _ModuleApply(module)


@functools.partial(jax.jit, static_argnames=("apply_fn",))
def _eval_batch(apply_fn, params, x, y):
    logits = apply_fn({"params": params}, x).astype(jnp.float32)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).sum()
    correct = jnp.sum(jnp.argmax(logits, -1) == y)
    return loss, correct


def classification_eval_fn(
    arrays: Mapping[str, Any],
    *,
    batch_size: int = 1000,
    x_key: str = "x",
    y_key: str = "y",
    prefix: str = "test",
) -> Callable[[TrainState], dict[str, float]]:
    """``eval_fn(state) -> {prefix/loss, prefix/accuracy}`` over a whole split (every example).

    In a multi-process run every process evaluates the whole split (the same numbers).

    Raises:
      ValueError: ``batch_size`` < 1, a missing key, an empty split, or ``x`` and ``y`` of
        different lengths.
    """
    _checks.int_at_least("batch_size", batch_size)
    if not isinstance(prefix, str):
        raise ValueError(f"prefix={prefix!r} must be a string, e.g. 'test'")
    if not isinstance(arrays, Mapping):
        raise ValueError(f"arrays must be a dict of arrays, got {type(arrays).__name__}")
    for name, key in (("x_key", x_key), ("y_key", y_key)):
        if not isinstance(key, str):
            raise ValueError(f"{name}={key!r} must be a string (a key of arrays)")
        if key not in arrays:
            raise ValueError(f"{name}={key!r} is not a key of arrays (keys: {sorted(arrays)})")
    x, y = arrays[x_key], arrays[y_key]
    for key, value in ((x_key, x), (y_key, y)):
        if not hasattr(value, "shape"):
            value = np.asarray(value)
        if len(value.shape) == 0:
            raise ValueError(f"arrays[{key!r}] must be an array with one row per example")
    if np.ndim(y) != 1:
        raise ValueError(f"arrays[{y_key!r}] has shape {np.shape(y)}; it must be 1-d class ids")
    if len(x) == 0 or len(x) != len(y):
        raise ValueError(
            f"arrays[{x_key!r}] and arrays[{y_key!r}] must be non-empty and of one length, got "
            f"{len(x)} and {len(y)}"
        )
    labels = np.asarray(y)
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"arrays[{y_key!r}].dtype={labels.dtype} must be integer class ids")
    checked = []

    def eval_fn(state: TrainState) -> dict[str, float]:
        if not checked:  # the number of classes is known once there is a model
            logits = jax.eval_shape(
                lambda p: state.apply_fn({"params": p}, x[:batch_size]), state.params
            )
            _checks.indices_in_range(f"arrays[{y_key!r}]", labels, logits.shape[-1])
            checked.append(True)
        total_loss, total_correct = 0.0, 0
        apply_fn = _static_apply(state.apply_fn)
        for start in range(0, len(x), batch_size):
            loss, correct = _eval_batch(
                apply_fn,
                state.params,
                x[start : start + batch_size],
                y[start : start + batch_size],
            )
            total_loss += float(loss)
            total_correct += int(correct)
        return {f"{prefix}/loss": total_loss / len(x), f"{prefix}/accuracy": total_correct / len(x)}

    return eval_fn
