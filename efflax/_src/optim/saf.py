"""SAF and MESA: sharpness-aware training for free.

Du, Zhou, Feng, Tan, Zhou, "Sharpness-Aware Training for Free", NeurIPS 2022, arXiv 2205.14083.
SAF adds ``lam * KL(softmax(z_past / T) || softmax(z / T)) * T^2`` to the task loss, where
``z_past`` are the logits the model produced for the same example ``lag`` epochs ago (kept in a
ring buffer); MESA uses the forward pass of an EMA of the weights as the target instead.

Two objects, one per method, each with ONE pytree of state that lives in ``TrainState.extra``
(and so is checkpointed and restored with the rest of the state):

- :class:`SAF`: the state is a :class:`LogitsBuffer` ``[num_examples, lag + 1, num_classes]``;
  ``saf.loss(task_loss, logits, buffer, indices, step)`` returns the new buffer.
- :class:`MESA`: the state is an ``optax.EmaState`` whose ``ema`` is the averaged model variables
  (parameters *and* batch statistics); ``mesa.update_ema`` advances it, ``mesa.loss`` adds the term.

Epoch semantics follow the official code (AngusDujw/SAF, ``SAF_train.py`` / ``MESA_train.py``):
epoch ``e = step // steps_per_epoch`` (0-based); the trajectory term is on while
``start_epoch < e < end_epoch`` (strict; ``end_epoch=None`` never ends); SAF writes the current
logits to slot ``e % (lag + 1)`` and reads slot ``(e - lag) % (lag + 1)``. The epoch is a traced
value and the switch a ``jnp.where``, so a train step is traced once for the whole run.

Defaults: ``temperature=5``, ``lag=3`` (code default ``--minus_epoch 3``), ``start_epoch=5``,
MESA ``decay=0.9998``; ``lam`` follows the README and ``run.sh`` of the official repository
(the commands behind the paper's ImageNet numbers): 0.3 for SAF, 0.8 for MESA (the scripts'
argparse defaults are 0.16 and 0.3).

The loose building blocks stay public for users who assemble their own objective:
:func:`trajectory_loss` (the KL term) and the buffer (:func:`init_logits_buffer`,
:func:`write_logits`, :func:`read_logits`, :func:`logits_buffer_bytes`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax

from efflax._src.distributed import addressable_values
from pallas_kernels import _checks

__all__ = [
    "MESA",
    "SAF",
    "LogitsBuffer",
    "init_logits_buffer",
    "logits_buffer_bytes",
    "read_logits",
    "trajectory_loss",
    "write_logits",
]

_BUFFER_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class LogitsBuffer(flax.struct.PyTreeNode):
    """Ring buffer of past logits, one row per training example.

    ``logits[i, s]`` holds the logits of example ``i`` written during an epoch ``e`` with
    ``e % (lag + 1) == s``. The buffer is a pytree with a single array leaf, so it can sit in
    ``TrainState.extra`` and is checkpointed with the rest of the state.

    Attributes:
      logits: ``[num_examples, lag + 1, num_classes]`` array (float32, bfloat16 or float16).
    """

    logits: jax.Array

    @property
    def num_examples(self) -> int:
        return self.logits.shape[0]

    @property
    def lag(self) -> int:
        return self.logits.shape[1] - 1

    @property
    def num_classes(self) -> int:
        return self.logits.shape[2]


# --- argument checks ---------------------------------------------------------------------------
def _check_dtype(dtype: Any) -> jnp.dtype:
    try:
        dtype = jnp.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype={dtype!r} is not a dtype") from None
    if dtype not in _BUFFER_DTYPES:
        raise ValueError(f"dtype={dtype} must be one of {[str(d) for d in _BUFFER_DTYPES]}")
    return dtype


def _check_temperature(temperature: Any) -> None:
    """A traced temperature is accepted as is; a concrete one must be finite and > 0."""
    number = _checks.scalar_if_concrete("temperature", temperature)
    if number is not None:
        _checks.positive_float("temperature", number)


def _check_epochs(start_epoch: Any, end_epoch: Any, *, minimum: int) -> None:
    _checks.int_at_least("start_epoch", start_epoch, minimum)
    if end_epoch is not None:
        _checks.int_at_least("end_epoch", end_epoch, start_epoch + 2)


def _host_values(array: Any) -> tuple[list[np.ndarray], bool] | None:
    """The values of ``array`` this process can read, and whether that is all of it; ``None``
    when ``array`` is traced.

    A ``jax.Array`` that spans several processes (a global batch in a multi-controller job)
    cannot be fetched whole; each process then reads only its addressable shards.
    """
    if isinstance(array, jax.Array):
        try:
            whole = array.is_fully_addressable
        except jax.errors.ConcretizationTypeError:
            return None  # a tracer
        return addressable_values(array), whole
    value = _checks.concrete(array)
    return None if value is None else ([value], True)


def _check_indices(indices: Any, num_examples: int, name: str = "indices") -> None:
    """Host-side check of example indices; skips tracers.

    On an array spread over several processes every process checks the shards it holds, and the
    processes then agree (one small all-gather) so that all of them raise, not only the one
    holding the bad index, which would leave the others waiting in the next collective.
    """
    host = _host_values(indices)
    if host is None:
        return
    values, whole = host
    dtype = values[0].dtype if values else np.dtype(np.int32)
    if not np.issubdtype(dtype, np.integer):
        raise ValueError(f"{name} dtype={dtype} must be an integer type")
    bad = np.unique(
        np.concatenate([v[(v < 0) | (v >= num_examples)].ravel() for v in values] or [[]])
    )
    if not whole:
        from jax.experimental import multihost_utils

        bad_per_process = np.asarray(multihost_utils.process_allgather(np.int32(bad.size)))
        if bad_per_process.any() and not bad.size:
            holders = np.flatnonzero(bad_per_process).tolist()
            raise ValueError(
                f"{name}: process(es) {holders} hold indices outside the logits buffer "
                f"[0, {num_examples})"
            )
    if bad.size:
        raise ValueError(
            f"{name} {bad[:8].astype(np.int64).tolist()} are outside the logits buffer "
            f"[0, {num_examples})"
        )


# --- the buffer --------------------------------------------------------------------------------
def logits_buffer_bytes(
    num_examples: int, num_classes: int, lag: int = 3, dtype: Any = jnp.float32
) -> int:
    """Memory of a :class:`LogitsBuffer` in bytes (``num_examples * (lag+1) * num_classes``).

    Example: ImageNet-1k, lag 3, float32: ``1_281_167 * 4 * 1000 * 4`` B = 20.5 GB; bfloat16
    halves it.
    """
    num_examples = _checks.int_at_least("num_examples", num_examples)
    num_classes = _checks.int_at_least("num_classes", num_classes)
    lag = _checks.int_at_least("lag", lag)
    return num_examples * (lag + 1) * num_classes * _check_dtype(dtype).itemsize


def init_logits_buffer(
    num_examples: int, num_classes: int, *, lag: int = 3, dtype: Any = jnp.float32
) -> LogitsBuffer:
    """An all-zero :class:`LogitsBuffer` (a slot is read only after it was written, see
    :class:`SAF`).

    Args:
      num_examples: number of training examples (the largest index + 1).
      num_classes: size of the logits' last axis.
      lag: how many epochs back the target is read (``E~`` in the paper, default 3).
      dtype: ``float32`` (default), ``bfloat16`` or ``float16`` (half the memory).

    Returns:
      The buffer; its size is :func:`logits_buffer_bytes`.
    """
    logits_buffer_bytes(num_examples, num_classes, lag, dtype)  # validates the arguments
    return LogitsBuffer(jnp.zeros((num_examples, lag + 1, num_classes), _check_dtype(dtype)))


def _validate_access(buffer: Any, indices: jax.Array, num_classes: int | None) -> None:
    if not isinstance(buffer, LogitsBuffer):
        raise ValueError(f"buffer must be a LogitsBuffer, got {type(buffer).__name__}")
    if indices.ndim != 1:
        raise ValueError(f"indices shape={indices.shape} must be 1-D [batch]")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices dtype={indices.dtype} must be an integer type")
    if num_classes is not None and num_classes != buffer.num_classes:
        raise ValueError(
            f"logits have {num_classes} classes but the buffer stores {buffer.num_classes}"
        )
    _check_indices(indices, buffer.num_examples)


def _as_array(indices: Any) -> jax.Array:
    # A global jax.Array stays as it is (jnp.asarray would keep it too, but a numpy array or a
    # list becomes a jax.Array here, so that the dtype and shape checks see one type).
    return indices if isinstance(indices, jax.Array) else jnp.asarray(indices)


def write_logits(
    buffer: LogitsBuffer, indices: jax.Array, logits: jax.Array, epoch: jax.Array | int
) -> LogitsBuffer:
    """Stores ``logits[b]`` for example ``indices[b]`` in slot ``epoch % (lag + 1)``.

    Args:
      buffer: the ring buffer.
      indices: int ``[batch]`` example indices (distinct within a batch).
      logits: ``[batch, num_classes]``; stored without gradient, cast to the buffer's dtype.
      epoch: current epoch, a Python int or traced int scalar.

    Returns:
      The updated buffer. Out-of-range indices raise when they can be read on the host (on a
      batch spread over several processes, each process checks the shards it holds); traced ones
      are dropped (guard them with :meth:`SAF.with_index_check`).
    """
    indices = _as_array(indices)
    _validate_access(buffer, indices, logits.shape[-1])
    if logits.shape != (indices.shape[0], buffer.num_classes):
        raise ValueError(
            f"logits shape={logits.shape} must be [batch={indices.shape[0]}, "
            f"num_classes={buffer.num_classes}]"
        )
    slot = jnp.asarray(epoch) % (buffer.lag + 1)
    values = jax.lax.stop_gradient(logits).astype(buffer.logits.dtype)
    new = buffer.logits.at[indices, slot].set(values, mode="drop", wrap_negative_indices=False)
    return buffer.replace(logits=new)


def read_logits(buffer: LogitsBuffer, indices: jax.Array, epoch: jax.Array | int) -> jax.Array:
    """The logits written ``lag`` epochs before ``epoch``: slot ``(epoch - lag) % (lag + 1)``.

    Returns:
      float32 ``[batch, num_classes]``, without gradient. A traced out-of-range index reads NaN,
      so it poisons the loss instead of silently reading another example's row.
    """
    indices = _as_array(indices)
    _validate_access(buffer, indices, None)
    slot = (jnp.asarray(epoch) - buffer.lag) % (buffer.lag + 1)
    values = buffer.logits.at[indices, slot].get(
        mode="fill", fill_value=jnp.nan, wrap_negative_indices=False
    )
    return jax.lax.stop_gradient(values.astype(jnp.float32))


# --- the KL term -------------------------------------------------------------------------------
def trajectory_loss(
    logits: jax.Array, target_logits: jax.Array, *, temperature: float = 5.0
) -> jax.Array:
    """``KL(softmax(target / T) || softmax(logits / T)) * T^2``, averaged over the batch.

    Computed in float32; the gradient flows only through ``logits``.

    Args:
      logits: ``[..., num_classes]`` current logits.
      target_logits: same shape; past (SAF) or EMA-model (MESA) logits.
      temperature: ``T`` (paper default 5); finite and > 0.

    Returns:
      A float32 scalar.
    """
    _check_temperature(temperature)
    # The batch mean over an empty batch (or the softmax over no classes) would be NaN.
    logits = _checks.as_array(
        "logits", logits, min_ndim=1, kind="floating", nonempty=True, layout="[..., classes]"
    )
    target_logits = _checks.as_array(
        "target_logits", target_logits, min_ndim=1, kind="floating", nonempty=True
    )
    if jnp.shape(logits) != jnp.shape(target_logits):
        raise ValueError(
            f"logits shape={jnp.shape(logits)} and target_logits "
            f"shape={jnp.shape(target_logits)} differ"
        )
    target = jax.lax.stop_gradient(target_logits).astype(jnp.float32) / temperature
    log_p = jax.nn.log_softmax(target, axis=-1)
    log_q = jax.nn.log_softmax(jnp.asarray(logits).astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return jnp.mean(kl) * temperature**2


def _term_on(epoch: jax.Array, start_epoch: int, end_epoch: int | None) -> jax.Array:
    on = epoch > start_epoch
    if end_epoch is not None:
        on = on & (epoch < end_epoch)
    return on


def _add_term(task_loss, logits, target, on, lam, temperature):
    task_loss = jnp.asarray(task_loss)
    if task_loss.ndim != 0:
        raise ValueError(f"task_loss shape={task_loss.shape} must be a scalar")
    trajectory = trajectory_loss(logits, target, temperature=temperature)
    term = jnp.where(on, lam * trajectory, 0.0)
    loss = task_loss + term.astype(jnp.result_type(task_loss, jnp.float32))
    metrics = {"trajectory_loss": trajectory, "sharpness_term_on": on.astype(jnp.float32)}
    return loss, metrics


def _epoch(step: Any, steps_per_epoch: int) -> jax.Array:
    step = jnp.asarray(step)
    if step.ndim != 0 or not jnp.issubdtype(step.dtype, jnp.integer):
        raise ValueError(f"step (shape {step.shape}, dtype {step.dtype}) must be an int scalar")
    return step // steps_per_epoch


# --- SAF ---------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SAF:
    """Sharpness-Aware training for Free: the trajectory loss against stored past logits.

    The state is one :class:`LogitsBuffer` (``saf.init()``); keep it in ``TrainState.extra``.
    Each step writes the batch's logits to the buffer and, while
    ``start_epoch < epoch < end_epoch``, adds ``lam * trajectory_loss(logits, logits of the same
    examples lag epochs ago)``. The data must carry each example's index (``efflax.data``
    batches have ``'index'``).

    Args:
      num_examples: training examples (indices lie in ``[0, num_examples)``).
      num_classes: size of the logits' last axis.
      steps_per_epoch: optimizer steps per epoch (``loader.steps_per_epoch``): the epoch is
        ``step // steps_per_epoch``.
      lag: epochs between writing and reading a slot (``E~``; official default 3, the ImageNet
        command uses 2).
      lam: weight of the trajectory term, >= 0 (README/run.sh: 0.3).
      temperature: softmax temperature, > 0 (5).
      start_epoch: the term is on for epochs ``> start_epoch`` (5); must be ``>= lag - 1`` so
        that the first slot read holds logits written ``lag`` epochs before.
      end_epoch: the term is on for epochs ``< end_epoch``; ``None`` (default): never ends.
      dtype: buffer dtype (``float32``; ``bfloat16`` halves the memory).

    Example (a ``make_train_step`` loss function)::

        saf = SAF(loader.num_examples, 10, steps_per_epoch=loader.steps_per_epoch)
        state = TrainState.create(..., extra={"saf": saf.init()})

        def loss_fn(params, state, batch, rng):
            logits = state.apply_fn({"params": params}, batch["x"])
            task = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
            loss, buffer, metrics = saf.loss(
                task, logits, state.extra["saf"], batch["index"], state.step
            )
            return loss, LossOutput(metrics=metrics, extra={"saf": buffer})

        train_step = saf.with_index_check(make_train_step(loss_fn))
    """

    num_examples: int
    num_classes: int
    steps_per_epoch: int
    lag: int = 3
    lam: float = 0.3
    temperature: float = 5.0
    start_epoch: int = 5
    end_epoch: int | None = None
    dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        logits_buffer_bytes(self.num_examples, self.num_classes, self.lag, self.dtype)
        _checks.int_at_least("steps_per_epoch", self.steps_per_epoch)
        _checks.positive_float("lam", self.lam, allow_zero=True)
        _checks.positive_float("temperature", self.temperature)
        _check_epochs(self.start_epoch, self.end_epoch, minimum=0)
        if self.start_epoch < self.lag - 1:
            raise ValueError(
                f"start_epoch={self.start_epoch} must be >= lag - 1 = {self.lag - 1}: the term "
                f"is on from epoch start_epoch + 1, which must be >= lag={self.lag} so that the "
                "slot it reads holds logits written lag epochs before"
            )
        object.__setattr__(self, "dtype", _check_dtype(self.dtype))

    @property
    def buffer_bytes(self) -> int:
        """Memory of the buffer in bytes."""
        return logits_buffer_bytes(self.num_examples, self.num_classes, self.lag, self.dtype)

    def init(self) -> LogitsBuffer:
        """The state: an all-zero buffer (put it in ``TrainState.extra``)."""
        return init_logits_buffer(
            self.num_examples, self.num_classes, lag=self.lag, dtype=self.dtype
        )

    def epoch(self, step: jax.Array | int) -> jax.Array:
        """The (0-based) epoch of optimizer step ``step``."""
        return _epoch(step, self.steps_per_epoch)

    def term_on(self, step: jax.Array | int) -> jax.Array:
        """Whether the trajectory term is on at ``step``: ``start_epoch < epoch < end_epoch``."""
        return _term_on(self.epoch(step), self.start_epoch, self.end_epoch)

    def loss(
        self,
        task_loss: jax.Array,
        logits: jax.Array,
        buffer: LogitsBuffer,
        indices: jax.Array,
        step: jax.Array | int,
    ) -> tuple[jax.Array, LogitsBuffer, dict[str, jax.Array]]:
        """``task_loss + lam * trajectory_loss(logits, logits of lag epochs ago)`` when on.

        Args:
          task_loss: scalar task loss (e.g. mean cross-entropy).
          logits: ``[batch, num_classes]`` current logits (with gradient).
          buffer: the state, from ``TrainState.extra``.
          indices: int ``[batch]`` example indices of the batch (distinct).
          step: the optimizer step (``state.step``; traced).

        Returns:
          ``(loss, new_buffer, metrics)``: metrics ``trajectory_loss`` (the KL term, also while
          off) and ``sharpness_term_on`` (1.0 while on).
        """
        self._check_buffer(buffer)
        if jnp.shape(logits)[-1:] != (self.num_classes,):
            raise ValueError(
                f"logits shape={jnp.shape(logits)} must end in num_classes={self.num_classes}"
            )
        epoch = self.epoch(step)
        # Official order: write slot epoch % (lag+1), read slot (epoch - lag) % (lag+1) (distinct).
        new_buffer = write_logits(buffer, indices, logits, epoch)
        target = read_logits(buffer, indices, epoch)
        on = _term_on(epoch, self.start_epoch, self.end_epoch)
        loss, metrics = _add_term(task_loss, logits, target, on, self.lam, self.temperature)
        return loss, new_buffer, metrics

    def check_indices(self, indices: Any) -> None:
        """Host-side guard: raises if an example index is outside ``[0, num_examples)``.

        Inside ``jit`` an index cannot raise (reads give NaN, writes are dropped), so call this
        in the data path, before the jitted step. On a batch spread over several processes each
        process checks the shards it can address.

        Raises:
          ValueError: naming the offending indices.
        """
        _check_indices(indices, self.num_examples)

    def with_index_check(
        self, train_step: Callable[[Any, Mapping[str, Any]], Any], *, key: str = "index"
    ) -> Callable[[Any, Mapping[str, Any]], Any]:
        """Wraps ``step(state, batch)`` so that ``batch[key]`` goes through :meth:`check_indices`."""

        @functools.wraps(train_step)
        def checked_step(state, batch):
            if key not in batch:
                raise ValueError(f"the batch has no {key!r} (example indices); keys: {list(batch)}")
            _check_indices(batch[key], self.num_examples, name=f"batch[{key!r}]")
            return train_step(state, batch)

        return checked_step

    def _check_buffer(self, buffer: Any) -> None:
        if not isinstance(buffer, LogitsBuffer):
            raise ValueError(f"buffer must be the LogitsBuffer of saf.init(), got {type(buffer)}")
        want = (self.num_examples, self.lag + 1, self.num_classes)
        if buffer.logits.shape != want:
            raise ValueError(
                f"buffer shape={buffer.logits.shape} does not match this SAF's "
                f"[num_examples, lag + 1, num_classes]={list(want)}"
            )


# --- MESA --------------------------------------------------------------------------------------
def _floating_leaves(name: str, tree: Any) -> None:
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise ValueError(
                f"{name}{jax.tree_util.keystr(path)} has dtype {jnp.result_type(leaf)}; the EMA "
                "averages floating-point variables only (leave integer collections out)"
            )


@dataclasses.dataclass(frozen=True)
class MESA:
    """Memory-Efficient Sharpness-Aware training: the trajectory loss against an EMA teacher.

    The state is one ``optax.EmaState(count, ema)`` (``mesa.init(variables)``; keep it in
    ``TrainState.extra``), where ``ema`` is an exponential moving average of the model's
    variables, parameters *and* batch statistics (timm ``ModelEmaV2``, which the official code
    uses: ``ema = decay * ema + (1 - decay) * variables`` after every optimizer step, started from
    a copy of the initial variables, no bias correction).

    The EMA is ``optax.ema(decay, debias=False)`` fed the model variables instead of gradient
    updates (``optax.ema`` averages whatever tree it is given; fed gradients it would be a
    momentum, fed variables it is the weight average). It is not placed in the optimizer chain:
    a transform there sees only the parameters, not the batch statistics, and the state would
    then live in ``opt_state`` instead of the one pytree in ``extra``.

    Timing: call :meth:`update_ema` inside the loss function with the variables entering the
    step and use the result as the teacher. The variables entering step ``s`` are the ones the
    official code averages right after step ``s - 1``, so the teacher of every step is exactly the
    official one (step 0: the initial copy). The stored EMA after the last step lacks that step's
    update; :meth:`update_ema` once more with the final variables gives the official final EMA.

    Args:
      steps_per_epoch: optimizer steps per epoch: the epoch is ``step // steps_per_epoch``.
      decay: EMA decay in [0, 1] (0.9998 in the official code).
      lam: weight of the trajectory term, >= 0 (README/run.sh: 0.8).
      temperature: softmax temperature, > 0 (5).
      start_epoch: the term is on for epochs ``> start_epoch`` (5; -1 = from the first epoch).
      end_epoch: the term is on for epochs ``< end_epoch``; ``None``: never ends.
      ema_dtype: dtype of the average (``float32``; a bfloat16 average with decay 0.9998 would not
        move at all: ``(1 - decay) * theta`` is below its resolution).

    Example::

        mesa = MESA(steps_per_epoch=loader.steps_per_epoch)
        state = TrainState.create(..., extra={"mesa": mesa.init({"params": params})})

        def loss_fn(params, state, batch, rng):
            mesa_state = mesa.update_ema(state.extra["mesa"], {"params": params})
            logits = state.apply_fn({"params": params}, batch["x"])
            teacher = state.apply_fn(mesa_state.ema, batch["x"])  # the EMA model's forward
            task = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
            loss, metrics = mesa.loss(task, logits, teacher, state.step)
            return loss, LossOutput(metrics=metrics, extra={"mesa": mesa_state})
    """

    steps_per_epoch: int
    decay: float = 0.9998
    lam: float = 0.8
    temperature: float = 5.0
    start_epoch: int = 5
    end_epoch: int | None = None
    ema_dtype: Any = jnp.float32

    def __post_init__(self) -> None:
        _checks.int_at_least("steps_per_epoch", self.steps_per_epoch)
        _checks.probability("decay", self.decay)
        _checks.positive_float("lam", self.lam, allow_zero=True)
        _checks.positive_float("temperature", self.temperature)
        _check_epochs(self.start_epoch, self.end_epoch, minimum=-1)
        try:
            ema_dtype = jnp.dtype(self.ema_dtype)
        except TypeError:
            raise ValueError(f"ema_dtype={self.ema_dtype!r} is not a dtype") from None
        if not jnp.issubdtype(ema_dtype, jnp.floating):
            raise ValueError(f"ema_dtype={ema_dtype} must be a floating-point dtype")
        object.__setattr__(self, "ema_dtype", ema_dtype)

    @property
    def ema(self) -> optax.GradientTransformation:
        """The averaging transform: ``optax.ema(decay, debias=False)`` in ``ema_dtype``."""
        return optax.ema(self.decay, debias=False, accumulator_dtype=self.ema_dtype)

    def init(self, variables: Any) -> optax.EmaState:
        """The state: the EMA started at a copy of ``variables`` (``{'params': ..., ...}``).

        A copy, not the same buffers: a train step that donates its state would otherwise get
        the same buffer twice.
        """
        _floating_leaves("variables", variables)
        ema = jax.tree.map(lambda v: jnp.array(v, dtype=self.ema_dtype, copy=True), variables)
        return optax.EmaState(count=jnp.zeros([], jnp.int32), ema=ema)

    def update_ema(self, mesa_state: optax.EmaState, variables: Any) -> optax.EmaState:
        """One EMA step: ``ema = decay * ema + (1 - decay) * variables`` (no gradient flows).

        Args:
          mesa_state: the state from ``TrainState.extra``.
          variables: the model variables entering this step, with the structure given to
            :meth:`init` (e.g. ``{'params': params, 'batch_stats': state.extra['batch_stats']}``).

        Returns:
          The new state; ``new_state.ema`` is the teacher's variables for this step.
        """
        if not isinstance(mesa_state, optax.EmaState):
            raise ValueError(
                f"mesa_state must be the optax.EmaState of mesa.init(), got {type(mesa_state)}"
            )
        _checks.same_structure("mesa_state.ema", mesa_state.ema, "variables", variables)
        _floating_leaves("variables", variables)
        _, new_state = self.ema.update(jax.lax.stop_gradient(variables), mesa_state)
        return new_state

    def epoch(self, step: jax.Array | int) -> jax.Array:
        """The (0-based) epoch of optimizer step ``step``."""
        return _epoch(step, self.steps_per_epoch)

    def term_on(self, step: jax.Array | int) -> jax.Array:
        """Whether the trajectory term is on at ``step``: ``start_epoch < epoch < end_epoch``."""
        return _term_on(self.epoch(step), self.start_epoch, self.end_epoch)

    def loss(
        self,
        task_loss: jax.Array,
        logits: jax.Array,
        teacher_logits: jax.Array,
        step: jax.Array | int,
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``task_loss + lam * trajectory_loss(logits, teacher_logits)`` while the term is on.

        Args:
          task_loss: scalar task loss.
          logits: ``[batch, num_classes]`` current logits (with gradient).
          teacher_logits: the EMA model's logits on the same batch (no gradient flows into them).
          step: the optimizer step (``state.step``).

        Returns:
          ``(loss, metrics)``: metrics ``trajectory_loss`` and ``sharpness_term_on``.
        """
        if jnp.shape(logits) != jnp.shape(teacher_logits):
            raise ValueError(
                f"logits shape={jnp.shape(logits)} and teacher_logits "
                f"shape={jnp.shape(teacher_logits)} differ"
            )
        on = self.term_on(step)
        return _add_term(task_loss, logits, teacher_logits, on, self.lam, self.temperature)
