"""Routing for mixture-of-experts layers: expert choice, token choice, router losses, X-MoE.

Zhou, Lei, Liu, Du, Huang, Zhao, Dai, Chen, Le, Laudon, "Mixture-of-Experts with Expert Choice
Routing", arXiv:2202.09368 (2022). Each expert picks its top-`capacity` tokens of a group by
router probability, so every expert is exactly full; a token may get zero, one or many experts.

Baselines and companions collected here: Switch top-1 (Fedus et al., arXiv:2101.03961) and
GShard top-2 (Lepikhin et al., arXiv:2006.16668) token-choice routing with capacity and dropping,
their load-balancing loss, the ST-MoE router z-loss (Zoph et al., arXiv:2202.08906) and the X-MoE
cosine router (Chi et al., arXiv:2204.09179).

Every router returns the same `Routing` tuple: a per-expert slot table `[groups, experts,
capacity]` of token indices and gate weights. `dispatch` gathers tokens into the slots and
`combine` scatter-adds the gated expert outputs back onto the tokens (the "embedding bag" way:
each token sums a variable number of expert outputs). `method="einsum"` uses the dense one-hot
`[groups, experts, capacity, tokens]` tensor instead; it is the reference for the gather path.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from pallas_kernels import _checks

__all__ = [
    "Routing",
    "expert_capacity",
    "expert_choice",
    "expert_choice_from_probs",
    "token_choice",
    "token_choice_from_probs",
    "load_balancing_loss",
    "router_z_loss",
    "multiplicative_jitter",
    "dispatch",
    "combine",
    "LinearRouter",
    "XMoERouter",
]

_DISPATCH_METHODS = ("gather", "einsum")


class Routing(NamedTuple):
    """A routing decision for `groups` independent groups of tokens.

    Attributes:
      token_indices: int32 `[groups, experts, capacity]`: which token of the group sits in each
        expert slot (0 in empty slots).
      gates: float32 `[groups, experts, capacity]`: the weight of the expert's output for that
        token (0 in empty slots).
      slot_mask: bool `[groups, experts, capacity]`: whether the slot holds a token. Always true
        for expert choice; token choice leaves slots empty when an expert gets few tokens.
      probs: float32 `[groups, tokens, experts]`: router probabilities (softmax over experts).
      dropped: int32 `[groups]`: token choice: (token, choice) assignments dropped because their
        expert was full; expert choice: tokens that no expert picked.
    """

    token_indices: jax.Array
    gates: jax.Array
    slot_mask: jax.Array
    probs: jax.Array
    dropped: jax.Array


def expert_capacity(
    num_tokens: int, num_experts: int, capacity_factor: float, *, k: int = 1
) -> int:
    """Slots per expert: `ceil(k * num_tokens * capacity_factor / num_experts)`, at most `num_tokens`.

    Rounding up means the layer never has fewer slots than `k * tokens * capacity_factor` in
    total. An expert cannot take a token twice, so the capacity is clipped to the group size.

    Raises:
      ValueError: if `capacity_factor <= 0` or the sizes are not positive.
    """
    capacity_factor = _checks.positive_float("capacity_factor", capacity_factor)
    num_tokens = _checks.int_at_least("num_tokens", num_tokens)
    num_experts = _checks.int_at_least("num_experts", num_experts)
    k = _checks.int_at_least("k", k)
    return min(math.ceil(k * num_tokens * capacity_factor / num_experts), num_tokens)


def _check_logits(logits: jax.Array, name: str = "logits") -> None:
    if not hasattr(logits, "dtype") or getattr(logits, "ndim", None) != 3:
        raise ValueError(
            f"router {name}.shape={getattr(logits, 'shape', None)} must be "
            "[groups, tokens, experts]"
        )
    if not jnp.issubdtype(logits.dtype, jnp.floating):
        raise ValueError(f"router {name} dtype={logits.dtype} must be floating")
    if 0 in logits.shape:
        raise ValueError(f"router {name} shape={logits.shape} has an empty dimension")


def _check_probs(probs: jax.Array) -> None:
    """Probabilities in [0, 1] (checked when known at trace time; a traced softmax always is).

    NaN passes: a NaN token (from a NaN input) stays NaN in its own outputs only.
    """
    _check_logits(probs, "probs")
    values = _checks.concrete(probs)
    outside = None if values is None else (values < 0) | (values > 1)
    if outside is not None and np.any(outside):
        bad = values[outside]
        raise ValueError(
            f"router probs must lie in [0, 1]; got values such as {bad[:4].tolist()} "
            "(pass softmax outputs, or use expert_choice/token_choice on logits)"
        )


def _check_capacity(capacity: int, num_tokens: int) -> None:
    _checks.int_at_least("capacity", capacity)
    if capacity > num_tokens:
        raise ValueError(f"{capacity=} exceeds the {num_tokens} tokens of a group")


def _router_probs(logits: jax.Array) -> jax.Array:
    return jax.nn.softmax(logits.astype(jnp.float32), axis=-1)


def expert_choice(
    logits: jax.Array,
    *,
    capacity_factor: float = 2.0,
    capacity: int | None = None,
    token_mask: jax.Array | None = None,
) -> Routing:
    """Expert-choice routing: every expert takes its top-`capacity` tokens of each group.

    Args:
      logits: router logits `[groups, tokens, experts]`; the softmax runs in float32.
      capacity_factor: average number of experts per token, `c` in the paper (default 2).
      capacity: slots per expert; default `expert_capacity(tokens, experts, capacity_factor)`,
        i.e. `ceil(tokens * capacity_factor / experts)` clipped to `tokens`.

      token_mask: optional bool `[groups, tokens]`, True for real tokens: experts pick only
        real tokens (padding takes no slot and gets no expert), whatever padded logits hold.

    Returns:
      `Routing` whose `slot_mask` is all true without `token_mask`: each expert holds exactly
      `capacity` tokens (with it: at most as many as there are real tokens).

    Example:
      >>> r = expert_choice(jnp.zeros((2, 8, 4)), capacity_factor=2.0)
      >>> r.token_indices.shape
      (2, 4, 4)
    """
    _check_logits(logits)
    _, num_tokens, num_experts = logits.shape
    if capacity is None:
        capacity = expert_capacity(num_tokens, num_experts, capacity_factor)
    _check_capacity(capacity, num_tokens)
    token_mask = _check_token_mask(token_mask, logits.shape[:2])
    if token_mask is not None:
        logits = jnp.where(token_mask[..., None], logits, jnp.zeros((), logits.dtype))
    return expert_choice_from_probs(_router_probs(logits), capacity, token_mask=token_mask)


def _check_token_mask(token_mask: jax.Array | None, shape: tuple[int, ...]) -> jax.Array | None:
    if token_mask is None:
        return None
    if isinstance(token_mask, list | tuple):
        token_mask = jnp.asarray(token_mask)
    got_shape = getattr(token_mask, "shape", None)
    got_dtype = getattr(token_mask, "dtype", type(token_mask).__name__)
    if got_shape is None or tuple(got_shape) != tuple(shape) or got_dtype != jnp.bool_:
        raise ValueError(
            f"token_mask (shape {got_shape}, dtype {got_dtype}) must be a bool "
            f"[groups, tokens] = {tuple(shape)} array"
        )
    return token_mask


def expert_choice_from_probs(
    probs: jax.Array, capacity: int, *, token_mask: jax.Array | None = None
) -> Routing:
    """`expert_choice` on given router probabilities `[groups, tokens, experts]` in [0, 1].

    With `token_mask` (bool `[groups, tokens]`, True for real tokens) padded tokens rank below
    every real one, whatever their probabilities hold (NaN included); a slot an expert fills
    with padding (more slots than real tokens) is empty: `slot_mask` False, gate 0.
    """
    _check_probs(probs)
    groups, num_tokens, _ = probs.shape
    _check_capacity(capacity, num_tokens)
    token_mask = _check_token_mask(token_mask, probs.shape[:2])
    if token_mask is not None:
        # Select, never multiply: a padded NaN probability must not reach the ranking.
        probs = jnp.where(token_mask[..., None], probs, -1.0)
    gates, token_indices = lax.top_k(jnp.swapaxes(probs, 1, 2), capacity)
    # Derived from the data (not a constant) so that it varies over shard_map axes like the rest.
    slot_mask = token_indices >= 0
    if token_mask is not None:
        slot_mask = jnp.take_along_axis(token_mask[:, None, :], token_indices, axis=-1)
        gates = jnp.where(slot_mask, gates, 0.0)
        probs = jnp.where(token_mask[..., None], probs, 0.0)
    picks = jax.vmap(
        lambda idx, m: jnp.zeros(num_tokens, jnp.int32).at[idx.reshape(-1)].add(m.reshape(-1))
    )(token_indices, slot_mask.astype(jnp.int32))
    unpicked = picks == 0
    if token_mask is not None:
        unpicked = unpicked & token_mask
    dropped = jnp.sum(unpicked, axis=-1).astype(jnp.int32)
    return Routing(token_indices.astype(jnp.int32), gates, slot_mask, probs, dropped)


def token_choice(
    logits: jax.Array,
    *,
    k: int = 1,
    capacity_factor: float = 1.25,
    capacity: int | None = None,
    token_mask: jax.Array | None = None,
) -> Routing:
    """Token-choice routing: Switch top-1 (`k=1`) or GShard top-2 (`k=2`) with dropping.

    Each token picks its top-`k` experts. Experts fill their `capacity` slots in order of
    priority: every token's first choice before any second choice, and within one choice rank in
    token order. Assignments to a full expert are dropped (the token's residual path carries it).
    Top-1 gates are the router probability (Switch); top-2 gates are the two probabilities
    renormalised to sum to one (GShard), computed before dropping.

    Args:
      logits: router logits `[groups, tokens, experts]`; the softmax runs in float32.
      k: experts per token, 1 or 2.
      capacity_factor: default 1.25 (training; 2.0 is the usual evaluation value).
      capacity: slots per expert; default `ceil(k * tokens * capacity_factor / experts)`
        clipped to `tokens`.
      token_mask: optional bool `[groups, tokens]`, True for real tokens: padded tokens take
        no slot (and so never push a real token out), whatever their logits hold.

    Returns:
      `Routing`; `dropped` counts the dropped (token, choice) assignments of real tokens per
      group.
    """
    _check_logits(logits)
    groups, num_tokens, num_experts = logits.shape
    if _checks.int_at_least("k", k) > 2:
        raise ValueError(f"{k=} must be 1 or 2")
    if k > num_experts:
        raise ValueError(f"{k=} exceeds {num_experts=}")
    if capacity is None:
        capacity = expert_capacity(num_tokens, num_experts, capacity_factor, k=k)
    _check_capacity(capacity, num_tokens)
    token_mask = _check_token_mask(token_mask, logits.shape[:2])
    if token_mask is not None:
        logits = jnp.where(token_mask[..., None], logits, jnp.zeros((), logits.dtype))
    return token_choice_from_probs(
        _router_probs(logits), k=k, capacity=capacity, token_mask=token_mask
    )


def token_choice_from_probs(
    probs: jax.Array, *, k: int, capacity: int, token_mask: jax.Array | None = None
) -> Routing:
    """`token_choice` on given router probabilities `[groups, tokens, experts]` in [0, 1].

    With `token_mask` (bool `[groups, tokens]`, True for real tokens) padded tokens take no
    slot and get gate 0, whatever their probabilities hold (NaN included).
    """
    _check_probs(probs)
    groups, num_tokens, num_experts = probs.shape
    if _checks.int_at_least("k", k) > 2 or k > num_experts:
        raise ValueError(f"{k=} must be 1 or 2 and at most num_experts={num_experts}")
    _check_capacity(capacity, num_tokens)
    token_mask = _check_token_mask(token_mask, probs.shape[:2])
    if token_mask is not None:
        probs = jnp.where(token_mask[..., None], probs, 0.0)
    top_gates, top_experts = lax.top_k(probs, k)  # [g, t, k]
    if k > 1:
        top_gates = top_gates / jnp.sum(top_gates, axis=-1, keepdims=True)
    # Priority order [g, k, t]: all first choices, then all second choices.
    experts_flat = jnp.swapaxes(top_experts, 1, 2).reshape(groups, k * num_tokens)
    gates_flat = jnp.swapaxes(top_gates, 1, 2).reshape(groups, k * num_tokens)
    tokens_flat = jnp.tile(jnp.arange(num_tokens, dtype=jnp.int32), k)
    one_hot = jax.nn.one_hot(experts_flat, num_experts, dtype=jnp.int32)
    if token_mask is not None:
        real_flat = jnp.tile(token_mask, (1, k))  # [g, k*t], in the priority order
        one_hot = one_hot * real_flat[..., None].astype(jnp.int32)  # int 0/1: no NaN here
    position = jnp.sum((jnp.cumsum(one_hot, axis=1) - 1) * one_hot, axis=-1)  # [g, k*t]
    keep = position < capacity
    if token_mask is not None:
        keep = keep & real_flat
    # Dropped assignments point past the end of the slot table and are discarded by mode="drop".
    slot = jnp.where(keep, experts_flat * capacity + position, num_experts * capacity)

    def scatter(values, fill, slot_row):
        table = jnp.full((num_experts * capacity,), fill, values.dtype)
        return table.at[slot_row].set(values, mode="drop").reshape(num_experts, capacity)

    token_indices = jax.vmap(lambda s: scatter(tokens_flat, 0, s))(slot)
    gates = jax.vmap(lambda v, s: scatter(v, 0.0, s))(gates_flat, slot)
    slot_mask = jax.vmap(lambda s: scatter(jnp.ones_like(tokens_flat, bool), False, s))(slot)
    lost = ~keep if token_mask is None else ~keep & real_flat
    dropped = jnp.sum(lost, axis=-1).astype(jnp.int32)
    return Routing(token_indices, gates, slot_mask, probs, dropped)


def load_balancing_loss(probs: jax.Array, expert_indices: jax.Array | None = None) -> jax.Array:
    """Switch/GShard auxiliary loss `E * sum_e f_e * P_e`, averaged over groups.

    `f_e` is the fraction of a group's tokens whose first choice is expert `e` (Switch and GShard
    both count the top-1 choice only), `P_e` the mean router probability of `e`. Perfect balance
    gives 1. Use with coefficient 1e-2.

    Args:
      probs: router probabilities `[groups, tokens, experts]`.
      expert_indices: chosen experts `[groups, tokens]` or `[groups, tokens, k]` (the first is
        used); default `argmax(probs)`.
    """
    _check_probs(probs)
    num_experts = probs.shape[-1]
    if expert_indices is None:
        expert_indices = jnp.argmax(probs, axis=-1)
    else:
        _checks.array("expert_indices", expert_indices, kind="integer")
        if expert_indices.shape[:2] != probs.shape[:2] or expert_indices.ndim not in (2, 3):
            raise ValueError(
                f"expert_indices.shape={expert_indices.shape} must be [groups, tokens] or "
                f"[groups, tokens, k] matching probs.shape={probs.shape}"
            )
        # An out-of-range expert would count for no expert (a one-hot row of zeros).
        _checks.indices_in_range("expert_indices", expert_indices, num_experts)
        if expert_indices.ndim == probs.ndim:
            expert_indices = expert_indices[..., 0]
    fraction = jnp.mean(jax.nn.one_hot(expert_indices, num_experts, dtype=jnp.float32), axis=-2)
    mean_prob = jnp.mean(probs.astype(jnp.float32), axis=-2)
    return jnp.mean(num_experts * jnp.sum(fraction * mean_prob, axis=-1))


def router_z_loss(logits: jax.Array) -> jax.Array:
    """ST-MoE router z-loss: mean over tokens of `logsumexp(logits)^2` (coefficient 1e-3).

    Args:
      logits: router logits `[..., experts]` (floating; at least one token and one expert).
    """
    _checks.array("logits", logits, min_ndim=1, kind="floating", nonempty=True)
    return jnp.mean(jnp.square(jax.nn.logsumexp(logits.astype(jnp.float32), axis=-1)))


def multiplicative_jitter(x: jax.Array, rng: jax.Array, eps: float = 1e-2) -> jax.Array:
    """Multiply `x` by noise drawn uniformly from `[1 - eps, 1 + eps]` (Switch router input)."""
    _checks.array("x", x, kind="floating")
    _checks.prng_key("rng", rng)
    _checks.probability("eps", eps, allow_one=False)
    noise = jax.random.uniform(rng, x.shape, jnp.float32, 1.0 - eps, 1.0 + eps)
    return (x.astype(jnp.float32) * noise).astype(x.dtype)


def _check_method(method: str) -> None:
    if method not in _DISPATCH_METHODS:
        raise ValueError(f"{method=} must be one of {_DISPATCH_METHODS}")


def _check_slot_table(
    name: str, value: jax.Array, token_indices: jax.Array, *, kind: str | None = None
) -> None:
    """``value`` (gates, slot_mask) must have the ``[groups, experts, capacity]`` shape of
    ``token_indices``."""
    _checks.array(name, value, kind=kind)
    if tuple(value.shape) != tuple(token_indices.shape):
        raise ValueError(
            f"{name}.shape={tuple(value.shape)} must equal token_indices.shape="
            f"{tuple(token_indices.shape)} [groups, experts, capacity]"
        )


def _check_token_indices(token_indices: jax.Array, groups: int | None, num_tokens: int) -> None:
    _checks.array(
        "token_indices", token_indices, ndim=3, kind="integer", layout="[groups, experts, capacity]"
    )
    if groups is not None and token_indices.shape[0] != groups:
        raise ValueError(
            f"token_indices.shape={tuple(token_indices.shape)} has {token_indices.shape[0]} "
            f"groups but the tokens have {groups}"
        )
    # The gather/scatter promise in-bounds indices: an index out of range would read or write
    # another group's token. Checked when the indices are known (the routers' always are).
    _checks.indices_in_range("token_indices", token_indices, num_tokens)


def _dispatch_mask(token_indices, slot_mask, num_tokens, dtype):
    # [g, e, c, t]: the dense one-hot form of the slot table.
    mask = jax.nn.one_hot(token_indices, num_tokens, dtype=dtype)
    return mask * slot_mask[..., None].astype(dtype)


def _flat_token_indices(token_indices: jax.Array, num_tokens: int, expert_major: bool):
    # Rows of the flattened `[groups * tokens, d]` input, in `[g, e, c]` or `[e, g, c]` order.
    groups = token_indices.shape[0]
    offsets = jnp.arange(groups, dtype=jnp.int32)[:, None, None] * num_tokens
    flat = token_indices + offsets
    return jnp.swapaxes(flat, 0, 1) if expert_major else flat


def dispatch(
    x: jax.Array,
    token_indices: jax.Array,
    slot_mask: jax.Array | None,
    *,
    method: str = "gather",
    expert_major: bool = False,
) -> jax.Array:
    """Collect each expert's tokens: `[groups, tokens, d]` -> `[groups, experts, capacity, d]`.

    Args:
      x: tokens `[groups, tokens, d]`.
      token_indices: `Routing.token_indices` `[groups, experts, capacity]`, each in
        `[0, tokens)` (the routers guarantee it; out-of-range indices are not checked).
      slot_mask: `Routing.slot_mask`; empty slots get zeros. `None`: every slot is full (expert
        choice), which saves a select.
      method: `"gather"` indexes the tokens (one gather on the flattened tokens); `"einsum"`
        multiplies by the one-hot dispatch tensor (reference; memory `O(g * e * c * tokens)`).
      expert_major: return `[experts, groups, capacity, d]` instead, the layout the expert
        matmuls and the all-to-all want (no transpose of the activations).
    """
    _check_method(method)
    _checks.array("x", x, ndim=3, layout="[groups, tokens, d]")
    groups, num_tokens, d = x.shape
    _check_token_indices(token_indices, groups, num_tokens)
    if slot_mask is not None:
        _check_slot_table("slot_mask", slot_mask, token_indices)
    if method == "einsum":
        mask_bool = jnp.ones(token_indices.shape, bool) if slot_mask is None else slot_mask
        mask = _dispatch_mask(token_indices, mask_bool, num_tokens, x.dtype)
        # 0 * NaN = NaN: a non-finite token would reach every slot of its group through the
        # zeros of the one-hot. Contract the finite values and mark the slots that hold a
        # non-finite token, as the gather path does.
        finite = jnp.isfinite(x)
        out = jnp.einsum(
            "gect,gtd->egcd" if expert_major else "gect,gtd->gecd",
            mask,
            jnp.where(finite, x, jnp.zeros((), x.dtype)),
        )
        bad_token = (~jnp.all(finite, axis=-1)).astype(mask.dtype)
        bad_slot = jnp.einsum("gect,gt->gec", mask, bad_token) > 0
        if expert_major:
            bad_slot = jnp.swapaxes(bad_slot, 0, 1)
        return jnp.where(bad_slot[..., None], jnp.array(jnp.nan, x.dtype), out)
    flat = _flat_token_indices(token_indices, num_tokens, expert_major)
    # Routers only emit indices in [0, tokens): no bounds handling (fill/drop masks), which on
    # CPU costs a select over every gathered row, here and in the transposed scatter-add.
    gathered = x.reshape(groups * num_tokens, d).at[flat].get(mode="promise_in_bounds")
    if slot_mask is None:
        return gathered
    mask = jnp.swapaxes(slot_mask, 0, 1) if expert_major else slot_mask
    return jnp.where(mask[..., None], gathered, jnp.zeros((), x.dtype))


def combine(
    expert_out: jax.Array,
    token_indices: jax.Array,
    gates: jax.Array,
    num_tokens: int,
    *,
    method: str = "gather",
    expert_major: bool = False,
) -> jax.Array:
    """Sum the gated expert outputs of each token: `[g, e, c, d]` -> `[g, num_tokens, d]`.

    `method="gather"` scatter-adds (`.at[].add`) into a float32 buffer of the flattened tokens;
    `"einsum"` contracts with the dense combine tensor. Empty slots carry gate 0 and add nothing.
    `expert_major=True` takes `expert_out` as `[e, g, c, d]` (see `dispatch`); `token_indices`
    and `gates` stay `[g, e, c]`. As in `dispatch`, `token_indices` must lie in
    `[0, num_tokens)`.
    """
    _check_method(method)
    num_tokens = _checks.int_at_least("num_tokens", num_tokens)
    _checks.array("expert_out", expert_out, ndim=4)
    _check_token_indices(token_indices, None, num_tokens)
    _check_slot_table("gates", gates, token_indices)
    g, e, c = token_indices.shape
    expected = (e, g, c) if expert_major else (g, e, c)
    if tuple(expert_out.shape[:3]) != expected:
        layout = (
            "[experts, groups, capacity, d]" if expert_major else "[groups, experts, capacity, d]"
        )
        raise ValueError(
            f"expert_out.shape={tuple(expert_out.shape)} must be {layout} = {expected + ('d',)} "
            f"for token_indices.shape={tuple(token_indices.shape)}"
        )
    dtype = expert_out.dtype
    groups, d = token_indices.shape[0], expert_out.shape[-1]
    gates = gates.astype(jnp.float32)
    if method == "einsum":
        ones = jnp.ones(token_indices.shape, bool)
        one_hot = _dispatch_mask(token_indices, ones, num_tokens, jnp.float32)
        # As in dispatch: a non-finite slot (or gate) reaches only the token it belongs to.
        finite = jnp.isfinite(expert_out)
        bad_slot = ~jnp.all(finite, axis=-1)
        if expert_major:
            bad_slot = jnp.swapaxes(bad_slot, 0, 1)
        bad_slot = bad_slot | ~jnp.isfinite(gates)
        weights = one_hot * jnp.where(jnp.isfinite(gates), gates, 0.0)[..., None]
        spec = "gect,egcd->gtd" if expert_major else "gect,gecd->gtd"
        clean = jnp.where(finite, expert_out, jnp.zeros((), dtype))
        out = jnp.einsum(spec, weights.astype(dtype), clean).astype(dtype)
        bad_token = jnp.einsum("gect,gec->gt", one_hot, bad_slot.astype(jnp.float32)) > 0
        return jnp.where(bad_token[..., None], jnp.array(jnp.nan, dtype), out)
    if expert_major:
        gates = jnp.swapaxes(gates, 0, 1)
    weighted = expert_out.astype(jnp.float32) * gates[..., None]
    flat = _flat_token_indices(token_indices, num_tokens, expert_major)
    out = jnp.zeros((groups * num_tokens, d), jnp.float32)
    out = out.at[flat.reshape(-1)].add(weighted.reshape(-1, d), mode="promise_in_bounds")
    return out.reshape(groups, num_tokens, d).astype(dtype)


class LinearRouter(nn.Module):
    """Router logits `x @ W` in float32 (Switch's selective precision); no bias."""

    num_experts: int
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(stddev=0.02)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _checks.int_at_least("num_experts", self.num_experts)
        kernel = self.param(
            "kernel",
            nn.with_logical_partitioning(self.kernel_init, ("embed", None)),
            (x.shape[-1], self.num_experts),
            self.param_dtype,
        )
        return jnp.einsum("...d,de->...e", x.astype(jnp.float32), kernel.astype(jnp.float32))


class XMoERouter(nn.Module):
    """X-MoE router: `cos(W x, e_j) / tau` on a low-dimensional space (d -> `dim`).

    Chi et al., "On the Representation Collapse of Sparse Mixture of Experts", arXiv:2204.09179.
    Tokens are projected to `dim` (16), both they and the expert embeddings are L2-normalised,
    and the cosine similarity is divided by a learnable temperature initialised to 0.07.
    """

    num_experts: int
    dim: int = 16
    temperature_init: float = 0.07
    param_dtype: jnp.dtype = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.normal(stddev=0.02)
    embedding_init: nn.initializers.Initializer = nn.initializers.orthogonal()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _checks.int_at_least("num_experts", self.num_experts)
        _checks.int_at_least("dim", self.dim)
        _checks.positive_float("temperature_init", self.temperature_init)
        projection = self.param(
            "projection",
            nn.with_logical_partitioning(self.kernel_init, ("embed", None)),
            (x.shape[-1], self.dim),
            self.param_dtype,
        )
        embeddings = self.param(
            "expert_embeddings",
            nn.with_logical_partitioning(self.embedding_init, (None, None)),
            (self.num_experts, self.dim),
            self.param_dtype,
        )
        temperature = self.param(
            "temperature",
            nn.with_logical_partitioning(nn.initializers.constant(self.temperature_init), ()),
            (),
            jnp.float32,
        )
        h = jnp.einsum("...d,dk->...k", x.astype(jnp.float32), projection.astype(jnp.float32))
        h = _l2_normalize(h)
        e = _l2_normalize(embeddings.astype(jnp.float32))
        return jnp.einsum("...k,ek->...e", h, e) / temperature


def _l2_normalize(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    return x * lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(x), axis=-1, keepdims=True), eps * eps))
