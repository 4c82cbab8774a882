"""Mixture-of-experts feed-forward layer with expert-choice routing and expert parallelism.

Zhou et al., "Mixture-of-Experts with Expert Choice Routing", arXiv:2202.09368 (2022). The FFN
of a transformer block is replaced by `num_experts` FFNs; experts pick their top tokens (or, with
`router='top1'|'top2'`, tokens pick experts as in Switch/GShard) and each token sums the gated
outputs of the experts that took it.

Also here: expert parallelism (experts split over a mesh axis `'expert'`, tokens exchanged with
`jax.lax.all_to_all` inside `shard_map`; expert choice makes the exchange fixed-size), gating
dropout (Liu et al., "Gating Dropout", arXiv:2205.14336: some steps keep tokens on their device)
and task-specific expert pruning (Chen et al., arXiv:2206.00277: drop experts whose accumulated
gate weight is below average).
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import Mesh
from jax.sharding import PartitionSpec

from efflax._src.nn import routing as R
from pallas_kernels import _checks
from pallas_kernels._compat import shard_map

__all__ = ["MoEFeedForward", "prune_experts", "moe_aux_loss", "ROUTERS"]

ROUTERS = ("expert_choice", "top1", "top2")
_ROUTER_TYPES = ("linear", "xmoe")
_ACTIVATIONS = ("gelu", "geglu")
_DEFAULT_CAPACITY_FACTOR = {"expert_choice": 2.0, "top1": 1.25, "top2": 1.25}
_TOP_K = {"top1": 1, "top2": 2}


def moe_aux_loss(losses: Mapping[str, Any]) -> jax.Array:
    """Sum of every auxiliary loss sown into the `'losses'` collection (already weighted).

    Example:
      >>> y, state = model.apply(variables, x, mutable=["losses"])
      >>> loss = task_loss + moe_aux_loss(state["losses"])
    """
    leaves = jax.tree.leaves(losses)
    for leaf in leaves:
        dtype = getattr(leaf, "dtype", None)
        is_number = isinstance(leaf, int | float) or (
            dtype is not None and jnp.issubdtype(dtype, jnp.number)
        )
        if isinstance(leaf, bool) or not is_number:
            raise ValueError(
                f"losses holds {leaf!r}; pass the 'losses' collection of model.apply(..., "
                "mutable=['losses']), whose leaves are numbers"
            )
    return sum((jnp.sum(leaf) for leaf in leaves), jnp.zeros((), jnp.float32))


class MoEFeedForward(nn.Module):
    """A mixture-of-experts FFN: `[..., tokens, d] -> [..., tokens, d]`.

    Tokens are routed in groups: by default each sequence (the second-to-last axis) is a group;
    `group_size` regroups the flattened tokens into groups of that size instead.

    Attributes:
      num_experts: number of experts `E`.
      hidden: hidden width of each expert.
      router: `'expert_choice'`, `'top1'` (Switch) or `'top2'` (GShard).
      capacity_factor: expert choice: experts per token on average (default 2.0); token choice:
        slack over an even split (default 1.25). See `routing.expert_capacity` for rounding.
      eval_capacity_factor: used when `deterministic=True`; defaults to `capacity_factor`.
      activation: `'gelu'` (`gelu(x W_i) W_o`) or `'geglu'` (`(gelu(x W_0) * x W_1) W_o`).
      dispatch: `'gather'` (gather + scatter-add) or `'einsum'` (dense one-hot reference).
      router_type: `'linear'` or `'xmoe'` (cosine router on a 16-dim space, learnable temperature).
      jitter: multiplicative jitter `eps` on the router input during training (0 = off).
      load_balancing_coef: weight of the Switch/GShard balancing loss; applied to token choice
        only (expert choice is balanced by construction; its value is still sown as a statistic).
      z_loss_coef: weight of the ST-MoE router z-loss.
      group_size: tokens per routing group; `None` = one group per sequence.
      gating_dropout: probability per training step of routing tokens only to the experts on
        their own device, skipping the all-to-all (needs a mesh with an expert axis > 1 and the
        `'gating_dropout'` rng).
      causal: set in a decoder; expert choice then raises, because it looks at future tokens.
      mesh: a mesh with axis `expert_axis` (and optionally `data_axis`) for expert parallelism;
        `efflax.sharding.make_mesh` or `jax.make_mesh` (Explicit axes are run as Auto).
      dtype / param_dtype: computation / parameter dtypes; the router always runs in float32.

    Sown values: `'losses'/'aux_loss'` (weighted sum, add it to the task loss, see
    `moe_aux_loss`) and in `'intermediates'`: `load_balancing_loss`, `router_z_loss`,
    `tokens_per_expert` `[E]` (mean over groups), `experts_per_token` (mean),
    `unrouted_fraction` (tokens with no expert), `dropped_tokens` (token choice: dropped
    assignments; expert choice: unrouted tokens, summed over groups), `gate_weight_per_expert`
    `[E]` (summed; the score of `prune_experts`).
    """

    num_experts: int
    hidden: int
    router: str = "expert_choice"
    capacity_factor: float | None = None
    eval_capacity_factor: float | None = None
    activation: str = "gelu"
    dispatch: str = "gather"
    router_type: str = "linear"
    jitter: float = 0.0
    load_balancing_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    group_size: int | None = None
    gating_dropout: float = 0.0
    causal: bool = False
    mesh: Mesh | None = None
    expert_axis: str = "expert"
    data_axis: str = "data"
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32
    kernel_init: nn.initializers.Initializer = nn.initializers.lecun_normal()

    def _check_config(self) -> None:
        if self.router not in ROUTERS:
            raise ValueError(f"router={self.router!r} must be one of {ROUTERS}")
        if self.router_type not in _ROUTER_TYPES:
            raise ValueError(f"router_type={self.router_type!r} must be one of {_ROUTER_TYPES}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"activation={self.activation!r} must be one of {_ACTIVATIONS}")
        if self.dispatch not in ("gather", "einsum"):
            raise ValueError(f"dispatch={self.dispatch!r} must be 'gather' or 'einsum'")
        _checks.int_at_least("num_experts", self.num_experts)
        _checks.int_at_least("hidden", self.hidden)
        if self.group_size is not None:
            _checks.int_at_least("group_size", self.group_size)
        for name in ("capacity_factor", "eval_capacity_factor"):
            if getattr(self, name) is not None:
                _checks.positive_float(name, getattr(self, name))
        if self.router in _TOP_K and _TOP_K[self.router] > self.num_experts:
            raise ValueError(f"router={self.router!r} needs more than {self.num_experts=}")
        if _checks.boolean("causal", self.causal) and self.router == "expert_choice":
            raise ValueError(
                "router='expert_choice' with causal=True: expert choice ranks every token of a "
                "group, including future ones, so it cannot be used in a causal (decoder) block"
            )
        _checks.probability("gating_dropout", self.gating_dropout)
        # The same range multiplicative_jitter enforces: a negative eps must not mean "off".
        _checks.probability("jitter", self.jitter, allow_one=False)
        for name in ("load_balancing_coef", "z_loss_coef"):
            _checks.positive_float(name, getattr(self, name), allow_zero=True)
        if self.mesh is not None:
            if not isinstance(self.mesh, Mesh):
                raise ValueError(f"mesh={self.mesh!r} must be a jax.sharding.Mesh")
            if self.expert_axis not in self.mesh.axis_names:
                raise ValueError(
                    f"expert_axis={self.expert_axis!r} is not an axis of the mesh "
                    f"{tuple(self.mesh.axis_names)}; name the mesh's expert axis "
                    f"{self.expert_axis!r} or pass expert_axis= (mesh= is for expert parallelism)"
                )
        num_shards = self._expert_shards()
        if self.num_experts % num_shards:
            raise ValueError(
                f"{self.num_experts=} is not divisible by the mesh's "
                f"'{self.expert_axis}' axis of size {num_shards}"
            )

    def _expert_shards(self) -> int:
        if self.mesh is None or self.expert_axis not in self.mesh.axis_names:
            return 1
        return self.mesh.shape[self.expert_axis]

    def _capacity(self, group_size: int, deterministic: bool) -> int:
        factor = self.capacity_factor
        if deterministic and self.eval_capacity_factor is not None:
            factor = self.eval_capacity_factor
        if factor is None:
            factor = _DEFAULT_CAPACITY_FACTOR[self.router]
        return R.expert_capacity(group_size, self.num_experts, factor, k=_TOP_K.get(self.router, 1))

    @nn.compact
    def __call__(
        self,
        x: jax.Array,
        *,
        deterministic: bool = True,
        padding_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Applies the layer to `x` `[..., tokens, d]`; `deterministic=False` while training.

        `padding_mask` (bool `x.shape[:-1]`, True for real tokens): padded tokens are routed
        to no expert and take no slot (expert choice: experts pick among the real tokens of
        their group; token choice: they push no real token out), and what they hold (NaN and
        inf included) reaches no real output and no gradient; their own output is zero. The
        router statistics and losses still average over every token of a group.
        """
        self._check_config()
        _checks.boolean("deterministic", deterministic)
        if isinstance(x, list | tuple):
            raise ValueError("x must be an array [..., tokens, d], got a list")
        _checks.array("x", x, min_ndim=2, kind="real", layout="[..., tokens, d]")
        if 0 in x.shape:
            raise ValueError(f"x must have at least one token of size >= 1, got {x.shape=}")
        shape, d = x.shape, x.shape[-1]
        x = x.reshape(-1, shape[-2], d).astype(self.dtype)  # [batch, tokens, d]
        if padding_mask is not None:
            if isinstance(padding_mask, list | tuple):
                padding_mask = jnp.asarray(padding_mask)
            got_shape = getattr(padding_mask, "shape", None)
            got_dtype = getattr(padding_mask, "dtype", type(padding_mask).__name__)
            if got_shape is None or tuple(got_shape) != shape[:-1] or got_dtype != jnp.bool_:
                raise ValueError(
                    f"padding_mask (shape {got_shape}, dtype {got_dtype}) must be a bool array "
                    f"of shape x.shape[:-1] = {shape[:-1]}"
                )
            padding_mask = padding_mask.reshape(x.shape[:2])
            # Select, never multiply (0 * NaN is NaN): padded tokens hold zeros from here on.
            x = jnp.where(padding_mask[..., None], x, jnp.zeros((), x.dtype))

        router_in = x
        if self.jitter > 0 and not deterministic:
            router_in = R.multiplicative_jitter(x, self.make_rng("jitter"), self.jitter)
        if self.router_type == "xmoe":
            router = R.XMoERouter(self.num_experts, param_dtype=self.param_dtype, name="router")
        else:
            router = R.LinearRouter(self.num_experts, param_dtype=self.param_dtype, name="router")
        logits = router(router_in)  # float32 [batch, tokens, E]

        weights = self._expert_weights(d)
        num_shards = self._expert_shards()
        batch, tokens = x.shape[:2]
        per_device_batch = batch // max(self._batch_shards(), 1)
        group_size = self.group_size or tokens
        if (per_device_batch * tokens) % group_size or batch % max(self._batch_shards(), 1):
            raise ValueError(
                f"group_size={group_size} must divide the {per_device_batch * tokens} tokens per "
                f"device and batch={batch} must divide over {self._batch_shards()} devices"
            )
        capacity = self._capacity(group_size, deterministic)
        use_gating_dropout = self.gating_dropout > 0 and num_shards > 1 and not deterministic
        local_only = jnp.zeros((), bool)
        if use_gating_dropout:
            local_only = jax.random.bernoulli(self.make_rng("gating_dropout"), self.gating_dropout)

        token_mask = jnp.ones(x.shape[:2], bool) if padding_mask is None else padding_mask
        run = functools.partial(
            self._local_moe,
            masked=padding_mask is not None,
            group_size=group_size,
            capacity=capacity,
            num_shards=num_shards,
            use_gating_dropout=use_gating_dropout,
        )
        if num_shards > 1:
            batch_spec = PartitionSpec(self._batch_axes())
            expert_spec = PartitionSpec(self.expert_axis)
            # The compat shard_map runs an Explicit mesh (jax.make_mesh) as its Auto twin.
            run = shard_map(
                run,
                mesh=self.mesh,
                in_specs=(batch_spec, batch_spec, batch_spec, expert_spec, PartitionSpec()),
                out_specs=(batch_spec, batch_spec),
            )
        out, stats = run(x, logits, token_mask, weights, local_only)
        if padding_mask is not None:
            out = jnp.where(padding_mask[..., None], out, jnp.zeros((), out.dtype))
        self._sow_statistics(logits, stats)
        return out.reshape(shape).astype(self.dtype)

    def _batch_axes(self) -> tuple[str, ...]:
        names = self.mesh.axis_names if self.mesh is not None else ()
        return tuple(a for a in (self.data_axis, self.expert_axis) if a in names)

    def _batch_shards(self) -> int:
        if self._expert_shards() == 1:
            return 1  # no shard_map: XLA partitions the batch however it likes.
        return int(np.prod([self.mesh.shape[a] for a in self._batch_axes()]))

    def _expert_weights(self, d: int) -> dict[str, jax.Array]:
        e, h = self.num_experts, self.hidden

        def param(name, shape, axes):
            init = nn.with_logical_partitioning(self.kernel_init, axes)
            return self.param(name, init, shape, self.param_dtype)

        up_axes = ("expert", "embed", "expert_mlp")
        weights = {}
        if self.activation == "geglu":
            weights["wi_0"] = param("wi_0", (e, d, h), up_axes)
            weights["wi_1"] = param("wi_1", (e, d, h), up_axes)
        else:
            weights["wi"] = param("wi", (e, d, h), up_axes)
        weights["wo"] = param("wo", (e, h, d), ("expert", "expert_mlp", "embed"))
        return weights

    def _experts(self, x: jax.Array, weights: dict[str, jax.Array]) -> jax.Array:
        """Applies expert `e` to `x[e]`: `[e, g, c, d] -> [e, g, c, d]`."""
        w = {k: v.astype(self.dtype) for k, v in weights.items()}
        # One token axis per expert: contracting two axes (g, c) makes the weight-gradient dots
        # of the backward pass transpose their operands first (XLA CPU: a ~1.2x slower step).
        shape = x.shape
        x = x.reshape(shape[0], -1, shape[-1])
        if self.activation == "geglu":
            h = nn.gelu(jnp.einsum("end,edh->enh", x, w["wi_0"]))
            h = h * jnp.einsum("end,edh->enh", x, w["wi_1"])
        else:
            h = nn.gelu(jnp.einsum("end,edh->enh", x, w["wi"]))
        return jnp.einsum("enh,ehd->end", h, w["wo"]).reshape(shape)

    def _route(self, probs: jax.Array, capacity: int, token_mask) -> R.Routing:
        if self.router == "expert_choice":
            return R.expert_choice_from_probs(probs, capacity, token_mask=token_mask)
        return R.token_choice_from_probs(
            probs, k=_TOP_K[self.router], capacity=capacity, token_mask=token_mask
        )

    def _local_moe(
        self, x, logits, token_mask, weights, local_only, *, masked, group_size, capacity,
        num_shards, use_gating_dropout,
    ):  # fmt: skip
        """Everything after the router on one device's tokens (or all tokens, unsharded)."""
        batch, tokens, d = x.shape
        x = x.reshape(-1, group_size, d)
        probs = jax.nn.softmax(logits.reshape(-1, group_size, self.num_experts), axis=-1)
        token_mask = token_mask.reshape(-1, group_size) if masked else None

        def apply_experts(routing, exchange):
            # Expert-major layout [E, g, c, d]: the expert matmuls batch over the leading axis
            # and the all-to-all splits it, with no transpose of the activations.
            full = self.router == "expert_choice" and not masked
            slot_mask = None if full else routing.slot_mask
            expert_in = R.dispatch(
                x, routing.token_indices, slot_mask, method=self.dispatch, expert_major=True
            )
            if exchange:
                # Send expert block j of every group to device j; receive the groups of all
                # peers for the local experts: [E, g, c, d] -> [E / shards, g * shards, c, d].
                expert_in = lax.all_to_all(expert_in, self.expert_axis, 0, 1, tiled=True)
            expert_out = self._experts(expert_in, weights)
            if exchange:
                expert_out = lax.all_to_all(expert_out, self.expert_axis, 1, 0, tiled=True)
            return R.combine(
                expert_out,
                routing.token_indices,
                routing.gates,
                group_size,
                method=self.dispatch,
                expert_major=True,
            )

        def all_experts(_):
            routing = self._route(probs, capacity, token_mask)
            out = apply_experts(routing, exchange=num_shards > 1)
            return out, _routing_stats(routing, group_size, self.num_experts, 0)

        def local_experts(_):
            # Gating dropout: the device's own experts take its tokens, with the same total
            # number of slots (capacity * shards per expert), and no all-to-all.
            local = self.num_experts // num_shards
            offset = lax.axis_index(self.expert_axis) * local
            local_probs = lax.dynamic_slice_in_dim(probs, offset, local, axis=-1)
            local_capacity = min(capacity * num_shards, group_size)
            if self.router == "expert_choice":
                routing = R.expert_choice_from_probs(
                    local_probs, local_capacity, token_mask=token_mask
                )
            else:
                k = min(_TOP_K[self.router], local)
                routing = R.token_choice_from_probs(
                    local_probs, k=k, capacity=local_capacity, token_mask=token_mask
                )
            out = apply_experts(routing, exchange=False)
            return out, _routing_stats(routing, group_size, self.num_experts, offset)

        if use_gating_dropout:
            out, stats = lax.cond(local_only, local_experts, all_experts, None)
        else:
            out, stats = all_experts(None)
        return out.reshape(batch, tokens, d), stats

    def _sow_statistics(self, logits: jax.Array, stats: dict[str, jax.Array]) -> None:
        probs = jax.nn.softmax(logits, axis=-1)
        balance = R.load_balancing_loss(probs)
        z_loss = R.router_z_loss(logits)
        aux = self.z_loss_coef * z_loss
        if self.router != "expert_choice":
            aux = aux + self.load_balancing_coef * balance
        self.sow("losses", "aux_loss", aux)
        values = {
            "load_balancing_loss": balance,
            "router_z_loss": z_loss,
            "tokens_per_expert": jnp.mean(stats["tokens_per_expert"], axis=0),
            "experts_per_token": jnp.mean(stats["experts_per_token"]),
            "unrouted_fraction": jnp.mean(stats["experts_per_token"] == 0),
            "dropped_tokens": jnp.sum(stats["dropped"]),
            "gate_weight_per_expert": jnp.sum(stats["gate_weight_per_expert"], axis=0),
        }
        for name, value in values.items():
            self.sow("intermediates", name, value)


def _routing_stats(routing: R.Routing, group_size: int, num_experts: int, offset) -> dict:
    """Per-group statistics with a fixed shape whatever the routing path (stacked over groups)."""
    slots = routing.slot_mask.astype(jnp.float32)
    groups = slots.shape[0]

    def place(per_expert):  # [g, e_routed] -> [g, num_experts] at the routed experts' offset
        full = jnp.zeros((groups, num_experts), jnp.float32)
        return lax.dynamic_update_slice_in_dim(full, per_expert, offset, axis=1)

    experts_per_token = jax.vmap(
        lambda idx, m: jnp.zeros(group_size, jnp.float32).at[idx.reshape(-1)].add(m.reshape(-1))
    )(routing.token_indices, slots)
    return {
        "tokens_per_expert": place(jnp.sum(slots, axis=-1)),
        "gate_weight_per_expert": place(jnp.sum(routing.gates * slots, axis=-1)),
        "experts_per_token": experts_per_token,
        "dropped": routing.dropped,
    }


def prune_experts(
    params: Mapping[str, Any],
    gate_weight: jax.Array | np.ndarray,
    *,
    target_num_experts: int,
) -> tuple[dict[str, Any], int, np.ndarray]:
    """One pruning step: drop experts whose accumulated gate weight is below the average.

    Chen et al., "Task-Specific Expert Pruning for Sparse Mixture-of-Experts", arXiv:2206.00277.
    Accumulate `gate_weight_per_expert` (sown by `MoEFeedForward`) over a window of steps, call
    this, rebuild the layer with the returned number of experts and continue; repeat until the
    target is reached. Never keeps fewer than `target_num_experts` (the best-scored ones).

    Args:
      params: the `MoEFeedForward` parameters (`{'router': ..., 'wi'|'wi_0','wi_1': ..., 'wo'}`),
        plain or boxed with logical partitioning.
      gate_weight: `[E]` accumulated gate weight per expert.
      target_num_experts: lower bound on the experts kept.

    Returns:
      `(new_params, new_num_experts, kept)`: `kept` are the surviving experts' old indices,
      in their old order.
    """
    if not isinstance(params, Mapping):
        raise ValueError(
            f"params must be the MoEFeedForward params dict, got {type(params).__name__}"
        )
    scores = np.asarray(gate_weight, np.float64)
    expert_axes = {"wi": 0, "wi_0": 0, "wi_1": 0, "wo": 0}
    sizes = {
        name: np.shape(nn.meta.unbox(value))[expert_axes[name]]
        for name, value in params.items()
        if name in expert_axes
    }
    if not sizes:
        raise ValueError(
            f"params with keys {sorted(params)} are not MoEFeedForward params (no 'wi'/'wo')"
        )
    num_experts = next(iter(sizes.values()))
    if scores.shape != (num_experts,) or not np.all(np.isfinite(scores)):
        raise ValueError(
            f"gate_weight of shape {scores.shape} must be a finite [{num_experts}] vector, one "
            "score per expert of params"
        )
    if (
        isinstance(target_num_experts, bool)
        or not isinstance(target_num_experts, int | np.integer)
        or not 1 <= target_num_experts <= num_experts
    ):
        raise ValueError(f"{target_num_experts=} must be an int in [1, {num_experts}]")
    above = int(np.sum(scores >= scores.mean()))
    keep_count = max(above, target_num_experts)
    kept = np.sort(np.argsort(-scores, kind="stable")[:keep_count])
    index = jnp.asarray(kept)

    def take(value, axis):
        if isinstance(value, nn.meta.AxisMetadata):
            return value.replace_boxed(jnp.take(value.unbox(), index, axis=axis))
        return jnp.take(value, index, axis=axis)

    new_params: dict[str, Any] = {}
    for name, value in params.items():
        if name == "router":
            router = dict(value)
            if "kernel" in router:
                router["kernel"] = take(router["kernel"], 1)
            if "expert_embeddings" in router:
                router["expert_embeddings"] = take(router["expert_embeddings"], 0)
            new_params[name] = router
        elif name in ("wi", "wi_0", "wi_1", "wo"):
            new_params[name] = take(value, 0)
        else:
            new_params[name] = value
    return new_params, keep_count, kept
