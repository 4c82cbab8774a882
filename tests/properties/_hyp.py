"""Shared pieces of the property-based suite: settings, strategies of bad values, checks.

Every test module here draws *valid* inputs (small shapes, seeded values) and compares the
result with a plain float64 numpy formula, and draws *invalid* ones (wrong ranks, dtypes, sizes,
NaN/inf/negative/zero hyperparameters, bools for ints, strings for numbers, wrong keys) and
expects a ``ValueError``/``TypeError`` whose message names the argument.

Settings are deterministic (``derandomize=True``, no example database) so CI sees the same
examples every run, and small: a valid draw computes (and may compile), an invalid one raises
before computing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck
from hypothesis import settings
from hypothesis import strategies as st

NAN, INF = float("nan"), float("inf")


def props(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# A valid draw runs the function (and compiles it for a new shape): a few examples. An invalid
# draw raises before any work: more of them.
VALID = props(5)
FEW = props(3)
INVALID = props(20)

seeds = st.integers(0, 2**16 - 1)


def normal(seed: int, shape: tuple[int, ...], scale: float = 1.0, dtype=np.float32) -> np.ndarray:
    return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(dtype)


def f64(x: Any) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def assert_close(actual: Any, expected: Any, *, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    """``actual`` is finite and equals the float64 ``expected`` within tolerance."""
    actual = f64(actual)
    assert np.all(np.isfinite(actual)), f"non-finite result {actual}"
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)


def refused(fn: Callable[[], Any], *names: str) -> str:
    """``fn()`` raises ValueError or TypeError whose message names one of ``names``."""
    with pytest.raises((ValueError, TypeError)) as info:
        fn()
    message = str(info.value)
    assert any(name in message for name in names), f"{message!r} names none of {names}"
    return message


# Bad values of each kind of argument. Each list mixes the wrong type (bool, str, None, float
# for int), the wrong range and non-finite numbers.
def bad_ints(minimum: int = 1) -> st.SearchStrategy:
    """Not an int >= minimum."""
    return st.sampled_from(
        [minimum - 1, minimum - 5, 2.5, float(minimum + 1), True, "4", None, NAN]
    )


def bad_positive(*, allow_zero: bool = False) -> st.SearchStrategy:
    """Not a finite number > 0 (>= 0 with allow_zero)."""
    values = [-1.0, -1e-9, NAN, INF, -INF, True, "1.0", None]
    return st.sampled_from(values if allow_zero else [0.0, 0, *values])


def bad_probabilities(*, allow_zero: bool = True, allow_one: bool = True) -> st.SearchStrategy:
    """Not in [0, 1] (ends excluded on request)."""
    values = [-0.1, 1.5, NAN, INF, True, "0.5", None]
    values += [] if allow_zero else [0.0]
    values += [] if allow_one else [1.0]
    return st.sampled_from(values)


def bad_floats() -> st.SearchStrategy:
    """Not a finite number."""
    return st.sampled_from([NAN, INF, -INF, True, "1.0", None])


def bad_keys() -> st.SearchStrategy:
    """Not one PRNG key."""
    return st.sampled_from(
        [0, 7, "key", None, np.zeros(3, np.uint32), np.zeros(2, np.float32), "split"]
    ).map(
        lambda v: (
            jax.random.split(jax.random.key(0), 2) if isinstance(v, str) and v == "split" else v
        )
    )


def logsumexp64(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = f64(x)
    m = np.max(x, axis=axis, keepdims=True)
    return np.squeeze(m, axis) + np.log(np.sum(np.exp(x - m), axis=axis))


def softmax64(x: np.ndarray, axis: int = -1) -> np.ndarray:
    x = f64(x)
    e = np.exp(x - np.max(x, axis=axis, keepdims=True))
    return e / np.sum(e, axis=axis, keepdims=True)


def gelu64(x: np.ndarray) -> np.ndarray:
    """flax's ``nn.gelu`` (the tanh approximation), in float64."""
    x = f64(x)
    return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm64(
    x: np.ndarray, scale: np.ndarray, bias: np.ndarray, eps: float = 1e-6
) -> np.ndarray:
    x = f64(x)
    mean = x.mean(-1, keepdims=True)
    var = ((x - mean) ** 2).mean(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * f64(scale) + f64(bias)


def monarch64(x: np.ndarray, w1: np.ndarray, w2: np.ndarray) -> np.ndarray:
    """The Monarch product ``[..., k*p] -> [..., l*s]`` as written in the paper, in float64."""
    k, q, p = w1.shape
    l, s, r = w2.shape
    batch = x.shape[:-1]
    h = np.einsum("bjp,jqp->bjq", f64(x).reshape(-1, k, p), f64(w1))
    z = h.transpose(0, 2, 1).reshape(-1, l, r)
    return np.einsum("blr,lsr->bls", z, f64(w2)).reshape(*batch, l * s)


def random_variables(module: Any, *args: Any, seed: int = 0, scale: float = 0.5) -> dict:
    """Variables of ``module`` with random normal values, without running ``module.init``.

    ``jax.eval_shape`` gives the shapes without compiling anything (an init compiles the whole
    forward pass once more), and the test's own numbers fill them.
    """
    from flax import linen as nn

    shapes = nn.meta.unbox(jax.eval_shape(module.init, jax.random.key(0), *args))
    leaves, treedef = jax.tree.flatten(shapes)
    values = [
        normal(seed + i, leaf.shape, scale).astype(leaf.dtype) for i, leaf in enumerate(leaves)
    ]
    return jax.tree.unflatten(treedef, values)


def attention64(q, k, v, *, causal=False, mask=None, bias=None, segments=None, scale=None):
    """Softmax attention ``[b, t, h, d]`` in float64; GQA by repeating key/value heads.

    A query that sees no key gets zeros.
    """
    q, k, v = f64(q), f64(k), f64(v)
    groups = q.shape[2] // k.shape[2]
    k, v = np.repeat(k, groups, axis=2), np.repeat(v, groups, axis=2)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = np.einsum("bthd,bshd->bhts", q, k) * scale
    if bias is not None:
        scores = scores + f64(bias)
    visible = np.ones(scores.shape, bool)
    t, s = scores.shape[-2:]
    if causal:
        visible &= np.arange(s)[None, :] <= np.arange(t)[:, None]
    if mask is not None:
        visible &= np.asarray(mask, bool)
    if segments is not None:
        q_ids, kv_ids = (np.asarray(x) for x in segments)
        visible &= q_ids[:, None, :, None] == kv_ids[:, None, None, :]
    scores = np.where(visible, scores, -np.inf)
    top = np.max(scores, -1, keepdims=True)
    weights = np.where(visible, np.exp(scores - np.where(np.isfinite(top), top, 0)), 0.0)
    total = weights.sum(-1, keepdims=True)
    weights = np.divide(weights, total, out=np.zeros_like(weights), where=total > 0)
    return np.einsum("bhts,bshd->bthd", weights, v)


def rope64(x, positions, base=10_000.0):
    """Rotary embedding (half-split layout) of ``x [b, t, h, d]`` in float64."""
    x = f64(x)
    d = x.shape[-1]
    positions = np.broadcast_to(f64(positions), x.shape[:2])
    inv_freq = base ** (-np.arange(0, d, 2) / d)
    angles = positions[:, :, None, None] * inv_freq
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return np.concatenate(
        [x1 * np.cos(angles) - x2 * np.sin(angles), x2 * np.cos(angles) + x1 * np.sin(angles)], -1
    )
