"""SAF and MESA: sharpness-aware training for free.

Du, Zhou, Feng, Tan, Zhou, "Sharpness-Aware Training for Free", NeurIPS 2022, arXiv 2205.14083.
SAF adds ``lam * KL(softmax(z_past / T) || softmax(z / T)) * T^2`` to the task loss, where
``z_past`` are the logits the model produced for the same example ``lag`` epochs ago (kept in a
ring buffer); MESA uses the forward pass of an EMA of the weights as the target instead.

Pieces, all pure functions that live inside a jitted train step:

- :class:`LogitsBuffer` (``[num_examples, lag + 1, num_classes]``), :func:`init_logits_buffer`,
  :func:`write_logits`, :func:`read_logits`, :func:`logits_buffer_bytes`;
- :func:`trajectory_loss` (the KL term), :func:`saf_loss` (task loss + the switched-on term);
- :func:`init_ema`, :func:`ema_update`, :func:`mesa_loss` for MESA;
- :func:`check_indices` / :func:`with_index_check`: the host-side guard on example indices.

The epoch is a traced value: the term is switched on with ``jnp.where``, so a train step is traced
once for the whole run.

Example::

    buffer = init_logits_buffer(loader.num_examples, 10, lag=3)
    # inside loss_fn(params, state, batch, rng):
    logits = apply_fn(params, batch["x"])
    task = optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()
    epoch = state.step // steps_per_epoch
    loss, buffer, metrics = saf_loss(task, logits, state.extra["saf"], batch["index"], epoch)
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "LogitsBuffer",
    "check_indices",
    "ema_update",
    "init_ema",
    "init_logits_buffer",
    "logits_buffer_bytes",
    "mesa_loss",
    "read_logits",
    "saf_loss",
    "trajectory_loss",
    "with_index_check",
    "write_logits",
]

_BUFFER_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


class LogitsBuffer(flax.struct.PyTreeNode):
    """Ring buffer of past logits, one row per training example.

    ``logits[i, s]`` holds the logits of example ``i`` written during an epoch ``e`` with
    ``e % (lag + 1) == s``. The buffer is a pytree with a single array leaf, so it can sit in
    ``TrainState.extra`` and is checkpointed with the rest of the state.

    Attributes:
      logits: ``[num_examples, lag + 1, num_classes]`` array (float32 or bfloat16).
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


def _check_dtype(dtype: Any) -> jnp.dtype:
    dtype = jnp.dtype(dtype)
    if dtype not in _BUFFER_DTYPES:
        raise ValueError(f"dtype={dtype} must be one of {[str(d) for d in _BUFFER_DTYPES]}")
    return dtype


def _check_lag(lag: int) -> None:
    if not isinstance(lag, int | np.integer) or lag < 1:
        raise ValueError(f"lag={lag!r} must be an integer >= 1")


def _concrete(value: Any) -> np.ndarray | None:
    """``value`` as numpy when it is known at trace time, else ``None`` (a traced value).

    Public-API test for concreteness (``jax.core.Tracer`` is internal and moves between
    JAX releases).
    """
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _check_temperature(temperature: float) -> None:
    value = _concrete(temperature)
    if value is not None and not float(value) > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")


def logits_buffer_bytes(
    num_examples: int, num_classes: int, lag: int = 3, dtype: Any = jnp.float32
) -> int:
    """Memory of a :class:`LogitsBuffer` in bytes (``num_examples * (lag+1) * num_classes``).

    Example: ImageNet-1k, lag 3, float32: ``1_281_167 * 4 * 1000 * 4`` B = 20.5 GB; bfloat16
    halves it.
    """
    _check_lag(lag)
    if num_examples < 1 or num_classes < 1:
        raise ValueError(f"num_examples={num_examples} and num_classes={num_classes} must be >= 1")
    return int(num_examples) * (lag + 1) * int(num_classes) * _check_dtype(dtype).itemsize


def init_logits_buffer(
    num_examples: int, num_classes: int, *, lag: int = 3, dtype: Any = jnp.float32
) -> LogitsBuffer:
    """An all-zero :class:`LogitsBuffer` (zero logits = a uniform target, never used: see
    :func:`saf_loss`, which is off until ``lag`` epochs have been written).

    Args:
      num_examples: number of training examples (the largest index + 1).
      num_classes: size of the logits' last axis.
      lag: how many epochs back the target is read (``E~`` in the paper, default 3).
      dtype: ``float32`` (default) or ``bfloat16`` (half the memory).

    Returns:
      The buffer; its size is :func:`logits_buffer_bytes`.
    """
    logits_buffer_bytes(num_examples, num_classes, lag, dtype)  # validates the arguments
    return LogitsBuffer(jnp.zeros((num_examples, lag + 1, num_classes), _check_dtype(dtype)))


def check_indices(indices: Any, num_examples: int) -> None:
    """Host-side guard: raises if any example index falls outside ``[0, num_examples)``.

    Call it in the data path, on the numpy indices of each batch, before the jitted step (inside
    jit an index cannot raise: reads then return NaN and writes are dropped, see
    :func:`read_logits`).

    Raises:
      ValueError: naming the offending indices.
    """
    indices = np.asarray(indices)
    if not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices dtype={indices.dtype} must be an integer type")
    bad = (indices < 0) | (indices >= num_examples)
    if bad.any():
        raise ValueError(
            f"indices {np.unique(indices[bad])[:8].tolist()} are outside the logits buffer "
            f"[0, {num_examples})"
        )


def with_index_check(
    train_step: Callable[[Any, Mapping[str, Any]], Any], num_examples: int, *, key: str = "index"
) -> Callable[[Any, Mapping[str, Any]], Any]:
    """Wraps a train step so that ``batch[key]`` goes through :func:`check_indices` first."""

    def checked_step(state, batch):
        check_indices(np.asarray(batch[key]), num_examples)
        return train_step(state, batch)

    return checked_step


def _validate_access(buffer: LogitsBuffer, indices: jax.Array, num_classes: int | None) -> None:
    if indices.ndim != 1:
        raise ValueError(f"indices shape={indices.shape} must be 1-D [batch]")
    if not jnp.issubdtype(indices.dtype, jnp.integer):
        raise ValueError(f"indices dtype={indices.dtype} must be an integer type")
    if num_classes is not None and num_classes != buffer.num_classes:
        raise ValueError(
            f"logits have {num_classes} classes but the buffer stores {buffer.num_classes}"
        )
    host = _concrete(indices)
    if host is not None:
        check_indices(host, buffer.num_examples)


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
      The updated buffer. Out-of-range indices raise when concrete; traced ones are dropped
      (guard them with :func:`check_indices`).
    """
    indices = jnp.asarray(indices)
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
    indices = jnp.asarray(indices)
    _validate_access(buffer, indices, None)
    slot = (jnp.asarray(epoch) - buffer.lag) % (buffer.lag + 1)
    values = buffer.logits.at[indices, slot].get(
        mode="fill", fill_value=jnp.nan, wrap_negative_indices=False
    )
    return jax.lax.stop_gradient(values.astype(jnp.float32))


def trajectory_loss(
    logits: jax.Array, target_logits: jax.Array, *, temperature: float = 5.0
) -> jax.Array:
    """``KL(softmax(target / T) || softmax(logits / T)) * T^2``, averaged over the batch.

    Computed in float32; the gradient flows only through ``logits``.

    Args:
      logits: ``[..., num_classes]`` current logits.
      target_logits: same shape; past (SAF) or EMA-model (MESA) logits.
      temperature: ``T`` (paper default 5).

    Returns:
      A float32 scalar.
    """
    _check_temperature(temperature)
    if logits.shape != target_logits.shape:
        raise ValueError(
            f"logits shape={logits.shape} and target_logits shape={target_logits.shape} differ"
        )
    target = jax.lax.stop_gradient(target_logits).astype(jnp.float32) / temperature
    log_p = jax.nn.log_softmax(target, axis=-1)
    log_q = jax.nn.log_softmax(logits.astype(jnp.float32) / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)
    return jnp.mean(kl) * temperature**2


def _switch(task_loss, logits, target, active, lam, temperature):
    traj = trajectory_loss(logits, target, temperature=temperature)
    loss = task_loss + jnp.where(active, lam * traj, 0.0).astype(jnp.result_type(task_loss))
    metrics = {"trajectory_loss": traj, "sharpness_term_on": active.astype(jnp.float32)}
    return loss, metrics


def saf_loss(
    task_loss: jax.Array,
    logits: jax.Array,
    buffer: LogitsBuffer,
    indices: jax.Array,
    epoch: jax.Array | int,
    *,
    lam: float = 0.3,
    temperature: float = 5.0,
    start_epoch: int = 5,
    lag: int | None = None,
) -> tuple[jax.Array, LogitsBuffer, dict[str, jax.Array]]:
    """SAF objective ``task_loss + lam * trajectory_loss(logits, logits from lag epochs ago)``.

    The trajectory term is on when ``epoch >= start_epoch`` and ``epoch >= lag`` (before that the
    read slot holds nothing written yet); the switch is a ``jnp.where`` on the traced epoch.
    The current logits are written into the buffer at every step.

    Args:
      task_loss: scalar task loss (e.g. mean cross-entropy).
      logits: ``[batch, num_classes]`` current logits (with gradient).
      buffer: the :class:`LogitsBuffer` from the train state.
      indices: int ``[batch]`` example indices of the batch.
      epoch: current epoch (traced int scalar, e.g. ``state.step // steps_per_epoch``).
      lam: weight of the trajectory term (paper: 0.3).
      temperature: softmax temperature (paper: 5).
      start_epoch: first epoch with the term on (paper: 5, or ~30% of training).
      lag: must equal ``buffer.lag`` if given (the buffer's shape fixes it).

    Returns:
      ``(loss, new_buffer, metrics)``; metrics has ``trajectory_loss`` and ``sharpness_term_on``.
    """
    if lag is not None:
        _check_lag(lag)
        if lag != buffer.lag:
            raise ValueError(f"lag={lag} differs from the buffer's lag={buffer.lag}")
    _check_temperature(temperature)
    if logits.shape[-1] != buffer.num_classes:
        raise ValueError(
            f"logits have {logits.shape[-1]} classes but the buffer stores {buffer.num_classes}"
        )
    epoch = jnp.asarray(epoch)
    target = read_logits(buffer, indices, epoch)
    active = (epoch >= start_epoch) & (epoch >= buffer.lag)
    loss, metrics = _switch(task_loss, logits, target, active, lam, temperature)
    return loss, write_logits(buffer, indices, logits, epoch), metrics


def init_ema(params: Any, dtype: Any = None) -> Any:
    """A fresh copy of ``params`` (and/or batch stats) to start an EMA from.

    A copy, not the same arrays: a train step that donates its state would otherwise receive the
    same buffer twice. ``dtype`` optionally stores the EMA in another float type.
    """
    return jax.tree.map(lambda p: jnp.array(p, dtype=dtype or p.dtype, copy=True), params)


def ema_update(ema_params: Any, params: Any, decay: float = 0.9998) -> Any:
    """``ema = decay * ema + (1 - decay) * params`` leaf by leaf (params, batch stats, ...).

    Call it once per optimizer step. ``params`` are taken without gradient; the EMA keeps its
    own dtype (the average itself runs in float32). Called inside a ``make_train_step`` loss
    function it averages the params entering the step, one step behind the official code's
    update-after-the-step; with a decay near 1 the difference is negligible.

    Example::

        extra = {"ema": ema_update(state.extra["ema"], params, decay=0.9998)}
    """
    value = _concrete(decay)
    if value is not None and not 0.0 <= float(value) <= 1.0:
        raise ValueError(f"decay={decay!r} must be in [0, 1]")
    params = jax.lax.stop_gradient(params)
    return jax.tree.map(
        lambda e, p: (decay * e.astype(jnp.float32) + (1.0 - decay) * p.astype(jnp.float32)).astype(
            e.dtype
        ),
        ema_params,
        params,
    )


def mesa_loss(
    task_loss: jax.Array,
    logits: jax.Array,
    ema_logits: jax.Array,
    epoch: jax.Array | int,
    *,
    lam: float = 0.8,
    temperature: float = 5.0,
    start_epoch: int = 5,
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """MESA objective ``task_loss + lam * trajectory_loss(logits, ema_logits)``.

    Args:
      task_loss: scalar task loss.
      logits: ``[batch, num_classes]`` current logits (with gradient).
      ema_logits: the EMA model's logits on the same batch (gradient is stopped here).
      epoch: current epoch (traced); the term is on for ``epoch >= start_epoch``.
      lam: weight of the trajectory term (paper: 0.8).
      temperature: softmax temperature (paper: 5).
      start_epoch: first epoch with the term on.

    Returns:
      ``(loss, metrics)``; metrics has ``trajectory_loss`` and ``sharpness_term_on``.
    """
    _check_temperature(temperature)
    if logits.shape != ema_logits.shape:
        raise ValueError(
            f"logits shape={logits.shape} and ema_logits shape={ema_logits.shape} differ"
        )
    active = jnp.asarray(epoch) >= start_epoch
    return _switch(task_loss, logits, ema_logits, active, lam, temperature)
