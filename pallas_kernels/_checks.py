"""Argument checks shared by pallas_kernels and efflax: one wording for every bad value.

Each check returns the (normalised) value or raises ``ValueError`` naming the argument and the
value it got, e.g. ``ValueError("num_heads=0 must be an int >= 1")``. Checks on arrays only look
at what is known at trace time (shapes, dtypes); :func:`concrete` tells whether a value can be
inspected on the host, for checks that run only when it can.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "array",
    "boolean",
    "concrete",
    "finite_float",
    "function",
    "indices_in_range",
    "int_at_least",
    "one_of",
    "positive_float",
    "prng_key",
    "probability",
    "same_structure",
    "scalar_if_concrete",
    "traced_scalar",
]


def concrete(value: Any) -> np.ndarray | None:
    """``value`` as numpy when it is known at trace time, else ``None`` (a traced value)."""
    try:
        return np.asarray(value)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def scalar_if_concrete(name: str, value: Any) -> float | None:
    """``value`` as a float when it is known at trace time, ``None`` when it is traced.

    For hyperparameters that may arrive as arrays (``optax.inject_hyperparams``, ``vmap`` over a
    sweep): anything known now must be one real number - a bool, a string or an array of several
    values is refused. Range checks (``positive_float``, ...) then apply to the result.
    """
    array = concrete(value)
    if array is None:
        return None
    if array.ndim != 0 or array.dtype.kind not in "iuf":
        raise ValueError(f"{name}={value!r} must be a real scalar")
    return float(array)


def traced_scalar(name: str, value: Any) -> jax.Array:
    """A traced ``value`` as a float32 scalar, if it is a 0-d real (integer or floating) tracer;
    for hyperparameters an op can take at run time (checks on its value cannot run)."""
    dtype = getattr(value, "dtype", None)
    if (
        getattr(value, "ndim", None) != 0
        or dtype is None
        or not (jnp.issubdtype(dtype, jnp.floating) or jnp.issubdtype(dtype, jnp.integer))
    ):
        raise ValueError(f"{name}={value!r} must be a real scalar")
    return jnp.asarray(value, jnp.float32)


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def int_at_least(name: str, value: Any, minimum: int = 1) -> int:
    """``value`` as an int, if it is an integer (not a bool, not a float) ``>= minimum``; a
    concrete 0-d integer array counts."""
    number = as_number(value)
    if not _is_int(number) or number < minimum:
        raise ValueError(f"{name}={value!r} must be an int >= {minimum}")
    return int(number)


def _real_scalar(value: Any) -> float | None:
    """``value`` as a float if it is one real number known now: a Python/NumPy number or a
    concrete 0-d NumPy/JAX array of an integer or floating dtype (not a bool); else None."""
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, numbers.Real):
        return float(value)
    if not hasattr(value, "dtype") or getattr(value, "ndim", None) != 0:
        return None
    array = concrete(value)
    if array is None or array.dtype.kind not in "iuf":
        return None
    return float(array)


def finite_float(name: str, value: Any) -> float:
    """``value`` as a float, if it is a finite real number (not a bool): a Python or NumPy
    number, or a concrete 0-d NumPy/JAX array such as ``jnp.float32(0.3)``."""
    number = _real_scalar(value)
    if number is None or not math.isfinite(number):
        raise ValueError(f"{name}={value!r} must be a finite number")
    return number


def positive_float(name: str, value: Any, *, allow_zero: bool = False) -> float:
    """``value`` as a float, if it is finite and ``> 0`` (``>= 0`` with ``allow_zero``)."""
    number = finite_float(name, value)
    if number < 0 or (number == 0 and not allow_zero):
        raise ValueError(f"{name}={value!r} must be {'>= 0' if allow_zero else '> 0'}")
    return number


def probability(name: str, value: Any, *, allow_zero: bool = True, allow_one: bool = True) -> float:
    """``value`` as a float, if it lies in [0, 1] (ends excluded on request)."""
    number = finite_float(name, value)
    low_ok = number > 0 or (allow_zero and number == 0)
    high_ok = number < 1 or (allow_one and number == 1)
    if not (low_ok and high_ok):
        interval = f"{'[' if allow_zero else '('}0, 1{']' if allow_one else ')'}"
        raise ValueError(f"{name}={value!r} must be in {interval}")
    return number


def boolean(name: str, value: Any) -> bool:
    """``value``, if it is a Python (or numpy) bool; an int or an array is refused."""
    if not isinstance(value, bool | np.bool_):
        raise ValueError(f"{name}={value!r} must be True or False")
    return bool(value)


def one_of(name: str, value: Any, choices: Iterable[Any]) -> Any:
    """``value``, if it is one of ``choices``."""
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name}={value!r} must be one of {', '.join(map(repr, choices))}")
    return value


def same_structure(name_a: str, a: Any, name_b: str, b: Any, *, shapes: bool = True) -> None:
    """Raises unless pytrees ``a`` and ``b`` have the same structure (and leaf shapes)."""
    tree_a, tree_b = jax.tree.structure(a), jax.tree.structure(b)
    if tree_a != tree_b:
        raise ValueError(f"{name_a} and {name_b} have different structures: {tree_a} vs {tree_b}")
    if shapes:
        for path_leaf_a, leaf_b in zip(
            jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b), strict=True
        ):
            path, leaf_a = path_leaf_a
            shape_a, shape_b = np.shape(leaf_a), np.shape(leaf_b)
            if shape_a != shape_b:
                raise ValueError(
                    f"{name_a}{jax.tree_util.keystr(path)} has shape {shape_a} but "
                    f"{name_b}{jax.tree_util.keystr(path)} has shape {shape_b}"
                )


_KINDS = {
    "floating": ("a floating-point", lambda d: jnp.issubdtype(d, jnp.floating)),
    "integer": ("an integer", lambda d: jnp.issubdtype(d, jnp.integer)),
    "real": (
        "a real (integer or floating-point)",
        lambda d: jnp.issubdtype(d, jnp.integer) or jnp.issubdtype(d, jnp.floating),
    ),
}


def _dtype_of(value: Any) -> Any:
    # jnp.issubdtype knows the ml_dtypes extension types (bfloat16, float8) np.issubdtype lacks.
    return value.dtype


def array(
    name: str,
    value: Any,
    *,
    ndim: int | None = None,
    min_ndim: int | None = None,
    kind: str | None = None,
    nonempty: bool = False,
    layout: str = "",
) -> Any:
    """``value``, if it is an array (it has ``shape`` and ``dtype``; numpy, JAX or a tracer)
    with ``ndim`` dimensions (or at least ``min_ndim``), a dtype of ``kind`` (``'floating'``,
    ``'integer'``: not bool, ``'real'``: either) and, with ``nonempty``, no zero-length axis.

    ``layout`` names the axes for the message, e.g. ``'[batch, tokens, d]'``.
    """
    where = f" {layout}" if layout else ""
    if not (hasattr(value, "shape") and hasattr(value, "dtype")):
        raise ValueError(f"{name} must be an array{where}, got {type(value).__name__}")
    shape = tuple(value.shape)
    if (ndim is not None and len(shape) != ndim) or (
        min_ndim is not None and len(shape) < min_ndim
    ):
        rank = f"{ndim}" if ndim is not None else f"at least {min_ndim}"
        raise ValueError(f"{name}.shape={shape} must have {rank} dimensions{where}")
    if kind is not None:
        description, accepts = _KINDS[kind]
        if not accepts(_dtype_of(value)):
            raise ValueError(f"{name}.dtype={value.dtype} must be {description} type")
    if nonempty and 0 in shape:
        raise ValueError(f"{name}.shape={shape} has a zero-length axis{where}")
    return value


def indices_in_range(name: str, value: Any, size: int) -> None:
    """Raises if integer ``value`` known at trace time has an entry outside ``[0, size)``.

    A traced value passes (it cannot be inspected; inside ``jit`` an out-of-range gather is
    clamped or filled, so check on the host where it matters).
    """
    values = concrete(value)
    if values is None or values.size == 0:
        return
    bad = values[(values < 0) | (values >= size)]
    if bad.size:
        raise ValueError(
            f"{name} must lie in [0, {size}); got {bad.size} entries outside, such as "
            f"{bad.reshape(-1)[:4].tolist()}"
        )


def function(name: str, value: Any, *, optional: bool = False) -> Any:
    """``value``, if it is callable (or ``None`` with ``optional``)."""
    if (value is None and optional) or callable(value):
        return value
    raise ValueError(f"{name}={value!r} must be callable{' or None' if optional else ''}")


def prng_key(name: str, value: Any) -> Any:
    """``value``, if it is one PRNG key: ``jax.random.key(seed)`` or a raw ``uint32[2]`` key
    from ``jax.random.PRNGKey(seed)`` (a tracer of either passes too)."""
    dtype = getattr(value, "dtype", None)
    shape = tuple(getattr(value, "shape", (None,)))
    if dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
        if shape == ():
            return value
    elif dtype is not None and np.dtype(dtype) == np.uint32 and shape == _raw_key_shape():
        return value
    got = f"{type(value).__name__}" + (f" of shape {shape}" if dtype is not None else "")
    raise ValueError(
        f"{name}={_short(value)} must be one PRNG key, e.g. jax.random.key(0); got {got}"
    )


def _raw_key_shape() -> tuple[int, ...]:
    return tuple(jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0))).shape)


def _short(value: Any) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def as_number(value: Any) -> Any:
    """The Python number a concrete 0-d real (not bool) JAX/NumPy array holds; else ``value``."""
    if isinstance(value, jax.Array | np.ndarray | np.generic) and np.ndim(value) == 0:
        array = concrete(value)
        if array is not None and array.dtype.kind in "iuf":
            return array.item()
    return value


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
    """``value`` as an array (lists, tuples and numbers converted), then ``array``.

    Keyword arguments are those of ``array`` (``ndim``, ``min_ndim``, ``kind``,
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
    return array(name, value, **array_checks)
