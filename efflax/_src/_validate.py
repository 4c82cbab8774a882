"""Argument checks for efflax's losses, pruning, stats, curves and training helpers.

On top of ``pallas_kernels._checks`` (one wording for every bad value), two things those checks
do not do yet:

- a concrete 0-d JAX or NumPy array (``jnp.float32(0.5)``, ``np.array(2)``) counts as the number
  it holds wherever a Python number is accepted (a bool array never does);
- lists, tuples and Python numbers given for an array are converted (``as_array``), and anything
  that cannot be (a string, a ragged list, ``None``) is refused naming the argument, instead of
  reaching ``.shape`` and raising ``AttributeError``.

A traced value (inside ``jit``/``vmap``) is not a number here: hyperparameters that may be traced
go through ``_checks.scalar_if_concrete`` instead.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from pallas_kernels import _checks

__all__ = [
    "as_array",
    "as_number",
    "finite_float",
    "index",
    "int_at_least",
    "positive_float",
    "probability",
]


def as_number(value: Any) -> Any:
    """The Python number a concrete 0-d real (not bool) JAX/NumPy array holds; else ``value``."""
    if isinstance(value, jax.Array | np.ndarray | np.generic) and np.ndim(value) == 0:
        array = _checks.concrete(value)
        if array is not None and array.dtype.kind in "iuf":
            return array.item()
    return value


def finite_float(name: str, value: Any) -> float:
    """``value`` as a float, if it is a finite real number (not a bool) or a 0-d array of one."""
    number = as_number(value)
    if (
        isinstance(number, bool)
        or not isinstance(number, numbers.Real)
        or not math.isfinite(float(number))
    ):
        raise ValueError(f"{name}={value!r} must be a finite number")
    return float(number)


def positive_float(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a float, if it is finite and ``> 0`` (``>= 0`` with ``allow_zero``)."""
    number = finite_float(name, value)
    if number < 0 or (number == 0 and not allow_zero):
        raise ValueError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")
    return number


def probability(name: str, value: Any, *, allow_zero: bool = True, allow_one: bool = True) -> float:
    """``value`` as a float, if it lies in [0, 1] (ends excluded on request)."""
    return _checks.probability(
        name, finite_float(name, value), allow_zero=allow_zero, allow_one=allow_one
    )


def int_at_least(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int, if it is an integer (not a bool, not a float) ``>= minimum``; a
    0-d integer array counts."""
    number = as_number(value)
    if isinstance(number, float):  # 2.0 from a float array is not an int either
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    try:
        return _checks.int_at_least(name, number, minimum)
    except ValueError:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}") from None


def index(name: str, value: Any, size: int) -> int:
    """``value`` as an int in ``[0, size)`` (a bool is not an index)."""
    number = as_number(value)
    if (
        isinstance(number, bool)
        or not isinstance(number, numbers.Integral)
        or not 0 <= number < size
    ):
        raise ValueError(f"{name}={value!r} must be an int in [0, {size})")
    return int(number)


def as_array(name: str, value: Any, **array_checks: Any) -> Any:
    """``value`` as an array (lists, tuples and numbers converted), then ``_checks.array``.

    Keyword arguments are those of ``_checks.array`` (``ndim``, ``min_ndim``, ``kind``,
    ``nonempty``, ``layout``). A string, ``None``, a dict or a ragged list is refused.
    """
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        if isinstance(value, str | bytes) or value is None or isinstance(value, dict):
            raise ValueError(f"{name} must be an array, got {type(value).__name__}")
        try:
            # numpy first: it tells strings and objects apart without JAX's dtype warnings.
            kind = np.asarray(value).dtype.kind
        except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
            kind = "f"  # a list of traced values: JAX converts it below
        except (TypeError, ValueError):
            kind = "O"
        try:
            if kind not in "biufc":
                raise TypeError
            value = jnp.asarray(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"{name} must be an array, got a {type(value).__name__} that is not one "
                "(ragged, or not numbers)"
            ) from None
    return _checks.array(name, value, **array_checks)
