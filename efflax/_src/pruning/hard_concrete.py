"""Hard-concrete gates: masks whose expected L0 norm is differentiable.

Louizos, Welling, Kingma, "Learning Sparse Neural Networks through L0 Regularization",
arXiv:1712.01312, 2018; with the defaults, initialisation, clamping and eval-time mask of CoFi
(Xia, Zhong, Chen, "Structured Pruning Learns Compact and Accurate Models", arXiv:2204.00408, 2022).
A gate is a binary-concrete sample stretched to ``(l, r) = (-0.1, 1.1)`` and clipped to
``[0, 1]``, so it is exactly 0 (or 1) with positive probability and ``P(z != 0)`` is a smooth
function of ``log_alpha``.

Example:
  >>> gate = HardConcreteMask(shape=(12,))              # one gate per attention head
  >>> log_alpha = gate.init(jax.random.key(0))           # N(10, 0.01), CoFi's head init
  >>> z = gate.sample(log_alpha, jax.random.key(1))      # training: a random mask in [0, 1]
  >>> heads = mask_axis(heads, z, axis=-2)               # scale axis -2 of any array by z
  >>> gate.expected_l0(log_alpha)                        # sum of P(z != 0), differentiable
  >>> gate.deterministic(log_alpha)                      # evaluation: CoFi's fixed mask
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _checks

Array = jax.Array

__all__ = ["HardConcreteMask", "mask_axis"]


@dataclasses.dataclass(frozen=True)
class HardConcreteMask:
    """A group of hard-concrete gates of a fixed shape (the official CoFi constants by default).

    Attributes:
      shape: the gates' shape (``()`` for one gate, e.g. a whole layer).
      init_mean: mean of the normal ``log_alpha`` initialisation. CoFi uses 10 for heads, whole
        layers and the hidden dimension, and ``log(1 - p) - log(p) = 0`` (droprate ``p = 0.5``,
        see :meth:`from_droprate`) for FFN units.
      init_std: standard deviation of the initialisation (0.01).
      temperature: the concrete temperature ``beta`` (2/3).
      limit_low, limit_high: the stretch interval ``(l, r)`` (-0.1, 1.1); ``l < 0 < 1 < r``.
      log_alpha_min, log_alpha_max: the range :meth:`clamp` projects ``log_alpha`` into after
        every optimizer step (``log 1e-2``, ``log 1e2``).
      eval_scale: the factor of the eval-time soft mask ``sigmoid(log_alpha / beta * 0.8)``
        (the "magical number" 0.8 of CoFi, from Wang et al. 2020).
      epsilon: uniform noise is drawn from ``[epsilon, 1 - epsilon]`` and ``P(z != 0)`` is
        clipped to the same range, as in the official code.
    """

    shape: tuple[int, ...] = ()
    init_mean: float = 10.0
    init_std: float = 0.01
    temperature: float = 2.0 / 3.0
    limit_low: float = -0.1
    limit_high: float = 1.1
    log_alpha_min: float = math.log(1e-2)
    log_alpha_max: float = math.log(1e2)
    eval_scale: float = 0.8
    epsilon: float = 1e-6

    def __post_init__(self):
        if not isinstance(self.shape, Sequence) or isinstance(self.shape, str | bytes):
            raise ValueError(f"shape={self.shape!r} must be a tuple of ints >= 1")
        object.__setattr__(
            self, "shape", tuple(_checks.int_at_least("shape", s, 1) for s in self.shape)
        )

        # Every field is stored as a Python float (a 0-d array is accepted and converted), so
        # the frozen dataclass stays hashable and comparable.
        def store(name: str, number: float) -> float:
            object.__setattr__(self, name, number)
            return number

        store("init_mean", _checks.finite_float("init_mean", self.init_mean))
        store("init_std", _checks.positive_float("init_std", self.init_std, allow_zero=True))
        store("temperature", _checks.positive_float("temperature", self.temperature))
        if not store("limit_low", _checks.finite_float("limit_low", self.limit_low)) < 0:
            raise ValueError(f"limit_low={self.limit_low!r} must be < 0")
        if not store("limit_high", _checks.finite_float("limit_high", self.limit_high)) > 1:
            raise ValueError(f"limit_high={self.limit_high!r} must be > 1")
        low = _checks.finite_float("log_alpha_min", self.log_alpha_min)
        high = _checks.finite_float("log_alpha_max", self.log_alpha_max)
        if not low < high:
            raise ValueError(
                f"log_alpha_min={self.log_alpha_min!r} must be < log_alpha_max="
                f"{self.log_alpha_max!r}"
            )
        store("log_alpha_min", low)
        store("log_alpha_max", high)
        store("eval_scale", _checks.positive_float("eval_scale", self.eval_scale))
        store(
            "epsilon",
            _checks.probability("epsilon", self.epsilon, allow_zero=False, allow_one=False),
        )

    @classmethod
    def from_droprate(cls, shape: Sequence[int], droprate: float = 0.5, **kwargs: Any):
        """Gates initialised at ``log_alpha ~ N(log(1 - p) - log(p), 0.01)`` (CoFi's FFN units)."""
        p = _checks.probability("droprate", droprate, allow_zero=False, allow_one=False)
        if "init_mean" in kwargs:
            raise ValueError("from_droprate sets init_mean from droprate; pass one of them")
        return cls(shape=shape, init_mean=math.log(1 - p) - math.log(p), **kwargs)

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    def _check(self, log_alpha: Array) -> Array:
        log_alpha = _checks.as_array("log_alpha", log_alpha, kind="real")
        if log_alpha.shape != self.shape:
            raise ValueError(f"log_alpha.shape={log_alpha.shape} must be {self.shape}")
        return log_alpha

    def init(self, key: Array, shape: Sequence[int] | None = None, dtype: Any = jnp.float32):
        """``log_alpha ~ N(init_mean, init_std)``; a Flax initializer (``self.param(name, gate.init)``).

        Raises:
          ValueError: ``shape`` is given and is not the gates' shape.
        """
        _checks.prng_key("key", key)
        if shape is not None and (
            not isinstance(shape, Sequence)
            or isinstance(shape, str | bytes)
            or tuple(shape) != self.shape
        ):
            raise ValueError(f"shape={shape!r} must be the gates' shape {self.shape}")
        try:
            floating = jnp.issubdtype(dtype, jnp.floating)
        except TypeError:
            floating = False
        if not floating:
            raise ValueError(f"dtype={dtype!r} must be a floating-point dtype")
        noise = jax.random.normal(key, self.shape, dtype)
        return (self.init_mean + self.init_std * noise).astype(dtype)

    def clamp(self, log_alpha: Array) -> Array:
        """``log_alpha`` clipped to ``[log_alpha_min, log_alpha_max]`` (after every step)."""
        return jnp.clip(self._check(log_alpha), self.log_alpha_min, self.log_alpha_max)

    def sample(self, log_alpha: Array, key: Array) -> Array:
        """A training-time mask: ``clip(sigmoid((logit(u) + log_alpha) / beta) (r - l) + l, 0, 1)``.

        Differentiable in ``log_alpha`` (the gradient is zero where the gate is clipped).
        """
        log_alpha = self._check(log_alpha)
        _checks.prng_key("key", key)
        dtype = jnp.promote_types(log_alpha.dtype, jnp.float32)
        u = jax.random.uniform(
            key, self.shape, dtype, minval=self.epsilon, maxval=1.0 - self.epsilon
        )
        s = jax.nn.sigmoid((jnp.log(u) - jnp.log1p(-u) + log_alpha) / self.temperature)
        return jnp.clip(s * (self.limit_high - self.limit_low) + self.limit_low, 0.0, 1.0)

    def prob_nonzero(self, log_alpha: Array) -> Array:
        """``P(z != 0) = 1 - Q(0) = sigmoid(log_alpha - beta log(-l / r))``, per gate.

        Clipped to ``[epsilon, 1 - epsilon]`` like the official ``1 - cdf_qz(0, log_alpha)``.
        """
        log_alpha = self._check(log_alpha)
        shift = self.temperature * math.log(-self.limit_low / self.limit_high)
        p = jax.nn.sigmoid(
            log_alpha.astype(jnp.promote_types(log_alpha.dtype, jnp.float32)) - shift
        )
        return jnp.clip(p, self.epsilon, 1.0 - self.epsilon)

    def expected_l0(self, log_alpha: Array) -> Array:
        """The expected number of non-zero gates, ``sum P(z != 0)``."""
        return jnp.sum(self.prob_nonzero(log_alpha))

    def deterministic(self, log_alpha: Array) -> Array:
        """CoFi's eval-time mask: soft values with the expected number of gates set to zero.

        ``soft = sigmoid(log_alpha / beta * eval_scale)``; the ``round(size - sum P(z != 0))``
        gates with the smallest soft value become 0 (round half to even, as Python's ``round``),
        the others keep their soft value (to be folded into the weights). Jit-compatible.
        """
        log_alpha = self._check(log_alpha)
        soft = jax.nn.sigmoid(log_alpha / self.temperature * self.eval_scale)
        num_zeros = jnp.round(self.size - self.expected_l0(log_alpha))
        flat = soft.reshape(-1)
        rank = (
            jnp.zeros(flat.shape, jnp.int32)
            .at[jnp.argsort(flat, stable=True)]
            .set(jnp.arange(flat.size, dtype=jnp.int32))
        )
        return jnp.where(rank < num_zeros, 0.0, flat).astype(soft.dtype).reshape(self.shape)

    def __call__(
        self, log_alpha: Array, key: Array | None = None, *, deterministic: bool = False
    ) -> Array:
        """:meth:`sample` with ``key``, or :meth:`deterministic` when ``deterministic=True``."""
        if _checks.boolean("deterministic", deterministic):
            return self.deterministic(log_alpha)
        if key is None:
            raise ValueError("key=None: a training-time mask needs a PRNG key")
        return self.sample(log_alpha, key)


def mask_axis(x: Array, z: Array, axis: int | Sequence[int]) -> Array:
    """``x`` with its slices along ``axis`` scaled by the gates ``z``.

    Args:
      x: any array (a parameter or an activation).
      z: gates of shape ``tuple(x.shape[a] for a in axis)``.
      axis: one axis or several (``z`` then covers them jointly, e.g. ``[layers, heads]``).

    Returns:
      ``x * z`` broadcast along the other axes, in ``x``'s dtype.

    Raises:
      ValueError: an axis that ``x`` does not have, a repeated axis, or ``z`` of the wrong shape.
    """
    # Soft gates in (0, 1) would be truncated to 0 in an integer array.
    x = _checks.as_array("x", x, kind="floating")
    z = _checks.as_array("z", z, kind="real")
    if isinstance(axis, int | np.integer) and not isinstance(axis, bool):
        axes = (axis,)
    elif isinstance(axis, Sequence) and not isinstance(axis, str | bytes):
        axes = tuple(axis)
    else:
        raise ValueError(f"axis={axis!r} must be an int or a sequence of ints")
    for a in axes:
        if not isinstance(a, int | np.integer) or isinstance(a, bool) or not -x.ndim <= a < x.ndim:
            raise ValueError(f"axis={axis!r} does not exist in an array of shape {x.shape}")
    axes_norm = tuple(int(a) % x.ndim for a in axes)
    if len(set(axes_norm)) != len(axes_norm):
        raise ValueError(f"axis={axis!r} repeats an axis")
    expected = tuple(x.shape[a] for a in axes_norm)
    if z.shape != expected:
        raise ValueError(f"z.shape={z.shape} must be {expected} (x.shape={x.shape}, axis={axis!r})")
    order = sorted(range(len(axes_norm)), key=lambda i: axes_norm[i])
    z = jnp.transpose(z, order) if len(axes_norm) > 1 else z
    shape = [1] * x.ndim
    for a in axes_norm:
        shape[a] = x.shape[a]
    return x * z.reshape(shape).astype(x.dtype)
