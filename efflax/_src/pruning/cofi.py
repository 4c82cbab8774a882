"""CoFi: coarse- and fine-grained structured pruning of a transformer, then extraction.

Xia, Zhong, Chen, "Structured Pruning Learns Compact and Accurate Models", ACL 2022,
arXiv:2204.00408 (official code: princeton-nlp/CoFiPruning). Hard-concrete gates on whole
attention layers, attention heads, whole FFN layers, FFN units and the hidden dimension are
learned together with the weights, a Lagrangian drives the expected sparsity to a target, and
layer distillation keeps the pruned model close to its teacher; the final masks are folded into
a smaller dense model.

How the masks reach a model without rewriting it. :func:`cofi_structure` traces the user's
model once and finds its attention layers (modules with ``query``/``key``/``value``/``out``
projections, e.g. ``efflax.nn.MultiHeadAttention``), FFNs (modules made of Dense layers: one
down projection ``[units, embed]`` - logical axes ``('mlp', 'embed')``, or named ``wo`` /
``down`` - fed by up projections ``[embed, units]``, e.g. ``DenseFeedForward``, GLU variants) and
norms (``nn.LayerNorm`` / ``nn.RMSNorm``). :func:`apply_masks` is a context manager that runs the
model under ``nn.intercept_methods`` and

- scales the input of an attention layer's ``out`` projection by the head gates (the same as
  scaling that head's slice of the output kernel) and the layer's output by its layer gate;
- scales the input of an FFN's down projection by the unit gates (the same as scaling its rows)
  and the FFN's output by its layer gate;
- for the hidden dimension, computes every norm's statistics over the kept features only
  (``mask=`` of the Flax norms) and scales its output by the hidden gates.

The hidden-dimension masking is exact for models whose hidden-size activations are read only
through norms (pre-LN transformers such as ``efflax.nn.Encoder``, where attention, FFN and head
read ``norm(x)``; post-LN models, whose residual stream is itself a norm output): the residual
stream's pruned features are then never read, so they can be deleted, and a kept feature's soft
gate folds into the norm's scale and bias. Residual additions, embeddings and output projections
that *write* pruned features need no mask. With gates in ``{0} U (0, 1]`` (training samples or
the deterministic eval mask) the masked model and the extracted model compute the same function.

:func:`extract` folds the soft gate values into the weights (head gates and the attention layer
gate into ``out``, unit gates and the FFN gate into the down projection, hidden gates into the
norms) and deletes the pruned heads, units, features and whole sublayers; :class:`ExtractedModel`
runs the user's model with the smaller shapes (it clones each attention layer with its own head
count, each FFN with its own width, and the model with the new width; a dropped sublayer returns
zeros).

Example:
  >>> structure = cofi_structure(model, x)                         # finds heads, FFNs, norms
  >>> log_alpha = structure.init(jax.random.key(0))
  >>> z = structure.sample(log_alpha, rng)                         # training masks
  >>> with apply_masks(structure, z):
  ...     logits = model.apply({"params": params}, x)
  >>> sparsity = structure.expected_sparsity(log_alpha)            # for the Lagrangian
  >>> small, small_params = extract(model, params, structure, structure.deterministic(log_alpha))
  >>> small.apply({"params": small_params}, x)                     # same logits, fewer FLOPs
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from efflax._src.losses._common import nonnegative_if_concrete
from efflax._src.models.lm import GluFeedForward
from efflax._src.models.lm import TransformerLM
from efflax._src.nn.attention import MultiHeadAttention
from efflax._src.nn.encoder import DenseFeedForward
from efflax._src.nn.encoder import Encoder
from efflax._src.pruning.hard_concrete import HardConcreteMask
from pallas_kernels import _checks

Array = jax.Array
Path = tuple[str, ...]

__all__ = [
    "GROUPS",
    "CoFiStructure",
    "ExtractedModel",
    "apply_masks",
    "apply_with_layers",
    "cofi_distillation_loss",
    "cofi_optimizer",
    "cofi_pruning_loss",
    "cofi_pruning_state",
    "cofi_structure",
    "default_teacher_layers",
    "extract",
    "layer_distillation_loss",
]

GROUPS = ("head", "head_layer", "intermediate", "mlp", "hidden")
# The logical axis names efflax's layers give the dimensions CoFi prunes.
_ROLES = ("embed", "heads", "kv_heads", "mlp")
_ATTENTION_PROJECTIONS = ("query", "key", "value", "out")
_ATTENTION_OUT = "out"
_FFN_DOWN_NAMES = ("wo", "down")
_NORM_TYPES = (nn.LayerNorm, nn.RMSNorm)

# How ExtractedModel resizes a module class: its attribute for each size it infers.
DEFAULT_ATTRIBUTES: dict[type, dict[str, str]] = {
    MultiHeadAttention: {
        "num_heads": "num_heads",
        "num_kv_heads": "num_kv_heads",
        "head_dim": "head_dim",
    },
    DenseFeedForward: {"units": "hidden"},
    Encoder: {"hidden": "d_model"},
    GluFeedForward: {"units": "hidden"},
    TransformerLM: {"hidden": "d_model"},
}


def _key(path: Path) -> str:
    return "/".join(path)


def _is_box(x: Any) -> bool:
    return isinstance(x, nn.meta.AxisMetadata)


def _leaves(params: Any) -> list[tuple[Path, Any]]:
    """(path, leaf) of a nested param dict; boxed leaves (``nn.Partitioned``) stay boxed."""
    flat = jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_box)[0]
    out = []
    for key_path, leaf in flat:
        out.append((tuple(str(getattr(k, "key", k)) for k in key_path), leaf))
    return out


def _subtree(params: Mapping, path: Path) -> Any:
    node = params
    for name in path:
        if not isinstance(node, Mapping) or name not in node:
            return None
        node = node[name]
    return node


@dataclasses.dataclass(frozen=True)
class _Param:
    path: Path
    shape: tuple[int, ...]
    roles: tuple[str | None, ...]  # per axis: 'embed', 'heads', 'kv_heads', 'mlp' or None
    site: Path | None  # the attention / FFN site it belongs to
    kind: str  # 'attention', 'ffn', 'norm' or 'other'


@dataclasses.dataclass(frozen=True)
class AttentionSite:
    """An attention layer CoFi can prune: its path, head counts and size."""

    path: Path
    module_type: type
    num_heads: int
    num_kv_heads: int
    head_dim: int
    in_features: int
    out_features: int

    @property
    def heads_per_group(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclasses.dataclass(frozen=True)
class FeedForwardSite:
    """An FFN CoFi can prune: its path and number of intermediate units."""

    path: Path
    module_type: type
    units: int
    in_features: int
    out_features: int
    down: str = "wo"  # the name of the down projection


@dataclasses.dataclass(frozen=True)
class NormSite:
    """A LayerNorm / RMSNorm on the hidden dimension."""

    path: Path
    module_type: type
    features: int


@dataclasses.dataclass(frozen=True, eq=False)
class CoFiStructure:
    """What CoFi can prune in a model, found by :func:`cofi_structure`, and its gates.

    Gates are a dict ``{'head': {site: [kv_heads]}, 'head_layer': {site: []}, 'intermediate':
    {site: [units]}, 'mlp': {site: []}, 'hidden': [d]}`` (sites named ``'block_0/attention'``),
    with only the requested groups present. With grouped-query attention a head gate covers one
    key/value head and the query heads that share it, so an extracted layer keeps a valid GQA
    layout.

    Attributes:
      groups: the pruned groups (a subset of ``GROUPS``).
      attention, feed_forward, norms: the sites found, in call order.
      layers: paths of the modules that hold the sites (transformer blocks), in call order; their
        outputs are the hidden states of layer distillation.
      hidden_size: the model width ``d`` (None when there are no norms).
      gate_configs: per group, the ``HardConcreteMask`` fields (CoFi's initialisation by default).
    """

    groups: tuple[str, ...]
    attention: tuple[AttentionSite, ...]
    feed_forward: tuple[FeedForwardSite, ...]
    norms: tuple[NormSite, ...]
    layers: tuple[Path, ...]
    hidden_size: int | None
    params: tuple[_Param, ...]
    gate_configs: Mapping[str, Mapping[str, Any]]

    # --- gates -------------------------------------------------------------------------------
    def gates(self) -> dict[str, Any]:
        """The ``HardConcreteMask`` of every gate array, in the layout of the masks."""
        out: dict[str, Any] = {}

        def make(group: str, shape: tuple[int, ...]) -> HardConcreteMask:
            return HardConcreteMask(shape=shape, **self.gate_configs[group])

        if "head" in self.groups:
            out["head"] = {_key(s.path): make("head", (s.num_kv_heads,)) for s in self.attention}
        if "head_layer" in self.groups:
            out["head_layer"] = {_key(s.path): make("head_layer", ()) for s in self.attention}
        if "intermediate" in self.groups:
            out["intermediate"] = {
                _key(s.path): make("intermediate", (s.units,)) for s in self.feed_forward
            }
        if "mlp" in self.groups:
            out["mlp"] = {_key(s.path): make("mlp", ()) for s in self.feed_forward}
        if "hidden" in self.groups:
            out["hidden"] = make("hidden", (self.hidden_size,))
        return out

    def _map(self, fn: Callable[..., Array], *trees: Any) -> Any:
        return jax.tree.map(
            fn, self.gates(), *trees, is_leaf=lambda x: isinstance(x, HardConcreteMask)
        )

    def check(self, masks: Any, name: str = "masks") -> Any:
        """``masks`` if it has the gates' layout and shapes, else ``ValueError`` naming it."""
        if masks is None:
            raise ValueError(f"{name}=None: expected gate arrays for the groups {self.groups}")
        expected = jax.tree.map(
            lambda g: jax.ShapeDtypeStruct(g.shape, jnp.float32),
            self.gates(),
            is_leaf=lambda x: isinstance(x, HardConcreteMask),
        )
        if not isinstance(masks, Mapping) or set(masks) != set(expected):
            got = sorted(masks) if isinstance(masks, Mapping) else type(masks).__name__
            raise ValueError(f"{name} has groups {got}, expected {sorted(expected)}")
        for group in expected:
            if isinstance(expected[group], Mapping):
                if not isinstance(masks[group], Mapping) or set(masks[group]) != set(
                    expected[group]
                ):
                    got = (
                        sorted(masks[group]) if isinstance(masks[group], Mapping) else masks[group]
                    )
                    raise ValueError(
                        f"{name}[{group!r}] has sites {got}, expected {sorted(expected[group])}"
                    )
        _checks.same_structure("expected gates", expected, name, masks)
        for path, leaf in jax.tree_util.tree_leaves_with_path(masks):
            where = f"{name}{jax.tree_util.keystr(path)}"
            dtype = getattr(leaf, "dtype", None)
            if dtype is None:
                dtype = np.asarray(leaf).dtype  # numbers; a string has kind 'U'
            if np.dtype(dtype).kind not in "biuf" and not jnp.issubdtype(dtype, jnp.floating):
                raise ValueError(f"{where} has dtype {dtype}; gates must be real numbers")
        return masks

    @functools.cached_property
    def _jitted(self) -> dict[str, Callable[..., Any]]:
        # One compiled program per method, instead of one small one per gate array and op.
        return {
            "init": jax.jit(self._init),
            "clamp": jax.jit(lambda a: self._map(lambda g, x: g.clamp(x), a)),
            "sample": jax.jit(self._sample),
            "deterministic": jax.jit(lambda a: self._map(lambda g, x: g.deterministic(x), a)),
            "prob_nonzero": jax.jit(lambda a: self._map(lambda g, x: g.prob_nonzero(x), a)),
            "remaining": jax.jit(self._remaining),
            # Counts in int32: exact, as no partial sum exceeds prunable_size (checked < 2^31).
            "size": jax.jit(
                lambda m: self._remaining(
                    jax.tree.map(lambda z: (z != 0).astype(jnp.int32), m), jnp, jnp.int32
                )
            ),
        }

    def _init(self, key: Array) -> Any:
        gates = self.gates()
        leaves, treedef = jax.tree.flatten(gates, is_leaf=lambda x: isinstance(x, HardConcreteMask))
        keys = jax.random.split(key, len(leaves))
        return jax.tree.unflatten(treedef, [g.init(k) for g, k in zip(leaves, keys, strict=True)])

    def _sample(self, log_alpha: Any, key: Array) -> Any:
        leaves = jax.tree.leaves(log_alpha)
        keys = iter(jax.random.split(key, len(leaves)))
        return self._map(lambda g, a: g.sample(a, next(keys)), log_alpha)

    def init(self, key: Array) -> dict[str, Any]:
        """``log_alpha`` of every gate, initialised as in CoFi (10, or 0 for FFN units)."""
        _checks.prng_key("key", key)
        return self._jitted["init"](key)

    def clamp(self, log_alpha: Any) -> Any:
        """Every ``log_alpha`` clipped to its range (CoFi does this after each step)."""
        self.check(log_alpha, "log_alpha")
        return self._jitted["clamp"](log_alpha)

    def sample(self, log_alpha: Any, key: Array) -> Any:
        """Training-time masks: an independent hard-concrete sample of every gate."""
        self.check(log_alpha, "log_alpha")
        _checks.prng_key("key", key)
        return self._jitted["sample"](log_alpha, key)

    def deterministic(self, log_alpha: Any) -> Any:
        """CoFi's eval-time masks (per gate array: the expected number of zeros, soft values)."""
        self.check(log_alpha, "log_alpha")
        return self._jitted["deterministic"](log_alpha)

    def prob_nonzero(self, log_alpha: Any) -> Any:
        """``P(z != 0)`` of every gate."""
        self.check(log_alpha, "log_alpha")
        return self._jitted["prob_nonzero"](log_alpha)

    # --- sizes -------------------------------------------------------------------------------
    @functools.cached_property
    def prunable_size(self) -> int:
        """Parameters of the attention layers, FFNs and norms (embeddings and heads excluded)."""
        return int(sum(math.prod(p.shape) for p in self.params if p.kind != "other"))

    def _remaining(self, keep: Any, xp: Any = jnp, dtype: Any = jnp.float32) -> Array:
        """E[parameters left in the attention layers, FFNs and norms] for independent gates that
        are non-zero with probabilities ``keep`` (0/1 indicators give the exact count).

        ``xp`` and ``dtype``: ``jnp`` and float32 for the (differentiable) expectation; 0/1
        integer indicators in an integer dtype (``jnp``/int32, ``np``/int64) count exactly.
        """
        hidden = keep.get("hidden")
        if hidden is not None:
            hidden_1 = xp.sum(hidden)
            hidden_2 = hidden_1**2 + xp.sum(hidden * (1 - hidden))  # E[d'^2]
        site_terms: dict[Path, tuple[Array, Array, int]] = {}
        for site in self.attention:
            k = _key(site.path)
            p = keep["head"][k] if "head" in keep else xp.ones(site.num_kv_heads, dtype)
            layer = keep["head_layer"][k] if "head_layer" in keep else xp.ones((), dtype)
            alive = layer * (1 - xp.prod(1 - p))
            site_terms[site.path] = (layer * xp.sum(p), alive, site.heads_per_group)
        for site in self.feed_forward:
            k = _key(site.path)
            p = keep["intermediate"][k] if "intermediate" in keep else xp.ones(site.units, dtype)
            layer = keep["mlp"][k] if "mlp" in keep else xp.ones((), dtype)
            alive = layer * (1 - xp.prod(1 - p))
            site_terms[site.path] = (layer * xp.sum(p), alive, 1)
        total = xp.zeros((), dtype)
        for param in self.params:
            if param.kind == "other":
                continue
            count = xp.ones((), dtype)
            num_embed = 0
            kept_axis = None
            for size, role in zip(param.shape, param.roles, strict=True):
                if role == "embed" and hidden is not None:
                    num_embed += 1
                elif role in ("heads", "kv_heads", "mlp") and param.site is not None:
                    kept_axis = role
                else:
                    count = count * size
            if num_embed == 1:
                count = count * hidden_1
            elif num_embed == 2:
                count = count * hidden_2
            elif num_embed > 2:
                raise ValueError(f"parameter {_key(param.path)} has {num_embed} hidden axes")
            if param.site is not None:
                kept_groups, alive, per_group = site_terms[param.site]
                if kept_axis == "heads":
                    count = count * kept_groups * per_group
                elif kept_axis in ("kv_heads", "mlp"):
                    count = count * kept_groups
                else:
                    count = count * alive
            total = total + count
        return total

    def expected_size(self, log_alpha: Any) -> Array:
        """The expected number of parameters left, from ``P(z != 0)`` (differentiable).

        Exact in expectation for independent gates: a head's parameters count when its gate,
        its layer's gate and (per hidden feature) the hidden gate are non-zero; an output bias
        counts when the layer keeps any head or unit. Embeddings and task heads are excluded
        (CoFi's ``prunable_model_size``); norms are included.
        """
        return self._jitted["remaining"](self.prob_nonzero(log_alpha))

    def size(self, masks: Any) -> int | Array:
        """The number of parameters left under ``masks`` (a gate counts when it is non-zero);
        equals the parameter count of the attention layers, FFNs and norms of
        ``extract(...)``'s model.

        Exact at any model size: a Python ``int`` for concrete masks; for traced masks (inside
        ``jit``/``vmap``) an int32 scalar, which needs ``prunable_size < 2**31`` (or
        ``jax_enable_x64``).
        """
        self.check(masks)
        leaves = jax.tree.leaves(masks)
        values = [_checks.concrete(leaf) for leaf in leaves]
        if all(v is not None for v in values):
            indicators = jax.tree.unflatten(
                jax.tree.structure(masks), [(v != 0).astype(np.int64) for v in values]
            )
            return int(self._remaining(indicators, np, np.int64))
        if self.prunable_size >= 2**31:
            raise ValueError(
                f"size of traced masks counts in int32, but the model has prunable_size="
                f"{self.prunable_size} >= 2**31 parameters; call it outside jit (concrete masks "
                "give an exact Python int)"
            )
        return self._jitted["size"](masks)

    def expected_sparsity(self, log_alpha: Any) -> Array:
        """``1 - expected_size / prunable_size``: what the Lagrangian drives to the target."""
        return 1.0 - self.expected_size(log_alpha) / self.prunable_size

    def sparsity(self, masks: Any) -> float | Array:
        """The real sparsity of ``masks`` (e.g. the deterministic ones), ``1 - size / prunable``
        (a Python float for concrete masks)."""
        size = self.size(masks)
        if isinstance(size, int):
            return 1.0 - size / self.prunable_size
        return 1.0 - size.astype(jnp.float32) / self.prunable_size

    def layer_exists(self, masks: Any) -> Array:
        """Per layer (``self.layers``), whether its attention layer gate is non-zero (CoFi's
        ``existing_layers`` of layer distillation); all True without a ``head_layer`` group."""
        self.check(masks)
        exists = []
        for layer in self.layers:
            flag = jnp.array(True)
            if "head_layer" in masks:
                for site in self.attention:
                    if site.path[:-1] == layer:
                        flag = flag & (masks["head_layer"][_key(site.path)] != 0)
            exists.append(flag)
        return jnp.stack(exists) if exists else jnp.zeros((0,), bool)

    def summary(self, masks: Any) -> dict[str, Any]:
        """Kept heads, units and features per site under ``masks`` (host numbers)."""
        masks = jax.device_get(self.check(masks))
        out: dict[str, Any] = {}
        for site in self.attention:
            k = _key(site.path)
            groups = int(np.sum(masks["head"][k] != 0)) if "head" in masks else site.num_kv_heads
            layer = bool(masks["head_layer"][k] != 0) if "head_layer" in masks else True
            out[k] = {"heads": groups * site.heads_per_group if layer else 0}
        for site in self.feed_forward:
            k = _key(site.path)
            units = (
                int(np.sum(masks["intermediate"][k] != 0))
                if "intermediate" in masks
                else site.units
            )
            layer = bool(masks["mlp"][k] != 0) if "mlp" in masks else True
            out[k] = {"units": units if layer else 0}
        if "hidden" in masks:
            out["hidden"] = int(np.sum(masks["hidden"] != 0))
        out["remaining_params"] = int(self.size(masks))
        out["prunable_params"] = self.prunable_size
        out["sparsity"] = 1.0 - out["remaining_params"] / self.prunable_size
        return out


# --- discovery -----------------------------------------------------------------------------------
def _kernel(params: Mapping, name: str) -> Any:
    child = params.get(name) if isinstance(params, Mapping) else None
    if not isinstance(child, Mapping) or "kernel" not in child:
        return None
    return child["kernel"]


def _shape(leaf: Any) -> tuple[int, ...]:
    return tuple((leaf.value if _is_box(leaf) else leaf).shape)


def _attention_site(path: Path, module: nn.Module, params: Mapping) -> AttentionSite | None:
    kernels = {n: _kernel(params, n) for n in _ATTENTION_PROJECTIONS}
    if any(k is None for k in kernels.values()):
        return None
    q, k, v, o = (_shape(kernels[n]) for n in _ATTENTION_PROJECTIONS)
    if len(q) != 3 or len(k) != 3 or k != v or len(o) != 3:
        return None
    heads, head_dim = q[1], q[2]
    if k[1] < 1 or heads % k[1] or k[2] != head_dim or o[:2] != (heads, head_dim):
        return None
    return AttentionSite(path, type(module), heads, k[1], head_dim, q[0], o[2])


def _feed_forward_site(path: Path, module: nn.Module, params: Mapping) -> FeedForwardSite | None:
    """An FFN: Dense children only, one down projection ``[units, d]`` (logical names
    ``('mlp', 'embed')``, or named ``wo`` / ``down``) fed by up projections ``[d, units]``."""
    if not isinstance(params, Mapping) or len(params) < 2:
        return None
    kernels = {name: _kernel(params, name) for name in params}
    if any(k is None or len(_shape(k)) != 2 for k in kernels.values()):
        return None
    downs = [
        n
        for n, k in kernels.items()
        if isinstance(k, nn.Partitioned) and tuple(k.names) == ("mlp", "embed")
    ]
    if not downs:
        downs = [n for n in kernels if n in _FFN_DOWN_NAMES]
    if len(downs) != 1:
        return None
    (down,) = downs
    units, out_features = _shape(kernels[down])
    in_features = {_shape(k)[0] for n, k in kernels.items() if n != down}
    if len(in_features) != 1 or any(_shape(k)[1] != units for n, k in kernels.items() if n != down):
        return None
    return FeedForwardSite(path, type(module), units, in_features.pop(), out_features, down)


def _roles(
    names: tuple[Any, ...] | None, shape: tuple[int, ...], path: Path, kind: str, site: Any
) -> tuple[str | None, ...]:
    """Per axis, the pruned dimension it indexes; from logical names, else from the layout."""
    if names is not None:
        if len(names) != len(shape):
            raise ValueError(f"parameter {_key(path)} has names {names} for shape {shape}")
        return tuple(n if n in _ROLES else None for n in names)
    leaf = path[-1]
    if kind == "norm":
        return ("embed",)
    if kind == "attention":
        projection = path[len(site.path)] if len(path) > len(site.path) else None
        heads = "heads" if projection in ("query", "out") else "kv_heads"
        if projection == _ATTENTION_OUT:
            return ("heads", None, "embed") if leaf == "kernel" else ("embed",)
        if projection in _ATTENTION_PROJECTIONS:
            return ("embed", heads, None) if leaf == "kernel" else (heads, None)
    if kind == "ffn":
        projection = path[len(site.path)] if len(path) > len(site.path) else None
        if projection == site.down:
            return ("mlp", "embed") if leaf == "kernel" else ("embed",)
        if projection is not None:
            return ("embed", "mlp") if leaf == "kernel" else ("mlp",)
    return (None,) * len(shape)


def cofi_structure(
    model: nn.Module,
    *example_args: Any,
    groups: Sequence[str] | None = None,
    rngs: Any = None,
    gate_configs: Mapping[str, Mapping[str, Any]] | None = None,
    **example_kwargs: Any,
) -> CoFiStructure:
    """Traces ``model.init(rngs, *example_args, **example_kwargs)`` (abstractly) and finds what
    CoFi can prune.

    Args:
      model: the user's Flax module (e.g. an ``efflax.nn.Encoder`` or a model that contains one).
      *example_args, **example_kwargs: arguments of the model's ``__call__`` (shapes matter).
      groups: which of ``GROUPS`` to prune; default all that the model has (heads and attention
        layers if it has attention, units and FFN layers if it has FFNs, the hidden dimension if
        it has norms).
      rngs: the ``init`` rngs (default ``jax.random.key(0)``).
      gate_configs: per group, ``HardConcreteMask`` fields that replace CoFi's defaults, e.g.
        ``{'intermediate': {'init_mean': 3.0}}``.

    Returns:
      A :class:`CoFiStructure`.

    Raises:
      ValueError: an unknown group, a group the model has nothing for, a hidden dimension that
        is not the same everywhere, or a parameter whose hidden axis cannot be told.
    """
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={_short(model)} must be a flax.linen Module")
    if rngs is not None and not isinstance(rngs, Mapping):
        _checks.prng_key("rngs", rngs)
    elif isinstance(rngs, Mapping):
        if "params" not in rngs:
            raise ValueError(f"rngs={rngs!r} needs a 'params' key (or pass one PRNG key)")
        for name, key in rngs.items():
            _checks.prng_key(f"rngs[{name!r}]", key)
    if gate_configs is not None and not isinstance(gate_configs, Mapping):
        raise ValueError(
            f"gate_configs={gate_configs!r} must be a dict {{group: {{field: value}}}}, e.g. "
            "{'intermediate': {'init_mean': 3.0}}"
        )
    if groups is not None and not isinstance(groups, str | Sequence):
        raise ValueError(f"groups={groups!r} must be a sequence of names from {GROUPS}")
    calls: list[tuple[Path, nn.Module]] = []

    def record(next_fun, args, kwargs, context):
        if context.method_name == "__call__" and context.module.scope is not None:
            calls.append((tuple(context.module.scope.path), context.module))
        return next_fun(*args, **kwargs)

    rngs = jax.random.key(0) if rngs is None else rngs
    with nn.intercept_methods(record):
        variables = jax.eval_shape(lambda: model.init(rngs, *example_args, **example_kwargs))
    if "params" not in variables:
        raise ValueError(f"model={type(model).__name__} has no 'params' to prune")
    params = variables["params"]

    attention: dict[Path, AttentionSite] = {}
    feed_forward: dict[Path, FeedForwardSite] = {}
    norms: dict[Path, NormSite] = {}
    for path, module in calls:
        if path in attention or path in feed_forward or path in norms:
            continue
        if any(path[: len(p)] == p for p in (*attention, *feed_forward)):
            continue
        sub = _subtree(params, path)
        if not isinstance(sub, Mapping):
            continue
        if isinstance(module, _NORM_TYPES):
            scale = sub.get("scale")
            if scale is not None and len(_shape(scale)) == 1:
                norms[path] = NormSite(path, type(module), _shape(scale)[0])
            continue
        site = _attention_site(path, module, sub)
        if site is not None:
            attention[path] = site
            continue
        site = _feed_forward_site(path, module, sub)
        if site is not None:
            feed_forward[path] = site

    available = []
    if attention:
        available += ["head", "head_layer"]
    if feed_forward:
        available += ["intermediate", "mlp"]
    if norms:
        available += ["hidden"]
    if groups is None:
        groups = tuple(available)
    else:
        if isinstance(groups, str):
            groups = (groups,)
        groups = tuple(groups)
        if not groups:
            raise ValueError(f"groups={groups!r} is empty: name at least one of {GROUPS}")
        for group in groups:
            _checks.one_of("groups", group, GROUPS)
            if group not in available:
                raise ValueError(
                    f"groups={groups!r}: the model has nothing for {group!r} "
                    f"(attention layers: {len(attention)}, FFNs: {len(feed_forward)}, "
                    f"norms: {len(norms)})"
                )
    if not groups:
        raise ValueError(
            f"model={type(model).__name__} has no attention layer, FFN or norm to prune"
        )
    groups = tuple(g for g in GROUPS if g in groups)

    hidden_size = None
    if norms:
        sizes = {n.features for n in norms.values()}
        if len(sizes) > 1 and "hidden" in groups:
            raise ValueError(
                f"the norms have different sizes {sorted(sizes)}: no single hidden dim"
            )
        hidden_size = sizes.pop() if len(sizes) == 1 else None
    if "hidden" in groups:
        for site in (*attention.values(), *feed_forward.values()):
            if (site.in_features, site.out_features) != (hidden_size, hidden_size):
                raise ValueError(
                    f"{_key(site.path)} maps {site.in_features} -> {site.out_features} features, "
                    f"but the hidden dimension (norm size) is {hidden_size}"
                )

    infos = []
    for path, leaf in _leaves(params):
        shape = _shape(leaf)
        names = tuple(leaf.names) if isinstance(leaf, nn.Partitioned) else None
        owner = next((p for p in (*attention, *feed_forward) if path[: len(p)] == p), None)
        if owner in attention:
            kind, site = "attention", attention[owner]
        elif owner in feed_forward:
            kind, site = "ffn", feed_forward[owner]
        elif path[:-1] in norms:
            kind, site = "norm", None
        else:
            kind, site = "other", None
        roles = _roles(names, shape, path, kind, site)
        if "hidden" in groups and names is None and kind == "other" and hidden_size in shape:
            raise ValueError(
                f"parameter {_key(path)} (shape {shape}) has no logical axis names, so its hidden "
                "axis cannot be told; create it with nn.with_logical_partitioning (axis 'embed')"
            )
        if "hidden" in groups:
            for size, role in zip(shape, roles, strict=True):
                if role == "embed" and size != hidden_size:
                    raise ValueError(
                        f"parameter {_key(path)} has an 'embed' axis of size {size}, but the "
                        f"hidden dimension is {hidden_size}"
                    )
        infos.append(_Param(path, shape, roles, owner, kind))

    layers: list[Path] = []
    for path, _ in calls:
        if path in attention or path in feed_forward:
            parent = path[:-1]
            if parent and parent not in layers:
                layers.append(parent)

    configs: dict[str, dict[str, Any]] = {
        "head": {},
        "head_layer": {},
        "intermediate": {"init_mean": 0.0},  # droprate 0.5: log(1 - p) - log(p)
        "mlp": {},
        "hidden": {},
    }
    fields = {f.name for f in dataclasses.fields(HardConcreteMask)} - {"shape"}
    for group, overrides in dict(gate_configs or {}).items():
        _checks.one_of("gate_configs", group, GROUPS)
        if not isinstance(overrides, Mapping):
            raise ValueError(f"gate_configs[{group!r}]={overrides!r} must be a dict of fields")
        if "shape" in overrides:
            raise ValueError(f"gate_configs[{group!r}] cannot set 'shape'")
        unknown = sorted(str(k) for k in overrides if k not in fields)
        if unknown:
            raise ValueError(
                f"gate_configs[{group!r}] sets {unknown[0]!r}, which is not a HardConcreteMask "
                f"field (fields: {sorted(fields)})"
            )
        configs[group] = {**configs[group], **dict(overrides)}
        HardConcreteMask(**configs[group])  # check the fields now
    return CoFiStructure(
        groups=groups,
        attention=tuple(attention.values()),
        feed_forward=tuple(feed_forward.values()),
        norms=tuple(norms.values()),
        layers=tuple(layers),
        hidden_size=hidden_size,
        params=tuple(infos),
        gate_configs={g: configs[g] for g in groups},
    )


# --- the masked model ----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class _MaskPlan:
    scale_input: dict[Path, tuple[Array, int]]  # module path -> (gates, axis of its first input)
    scale_output: dict[Path, Array]
    norm_gates: Array | None
    norm_paths: frozenset


def _check_structure(structure: Any) -> CoFiStructure:
    if not isinstance(structure, CoFiStructure):
        raise ValueError(
            f"structure={_short(structure)} must be a CoFiStructure (from cofi_structure)"
        )
    return structure


def _short(value: Any) -> str:
    text = " ".join(repr(value).split())
    return text if len(text) <= 60 else text[:57] + "..."


def _plan(structure: CoFiStructure, masks: Any) -> _MaskPlan:
    _check_structure(structure).check(masks)
    scale_input: dict[Path, tuple[Array, int]] = {}
    scale_output: dict[Path, Array] = {}
    for site in structure.attention:
        k = _key(site.path)
        if "head" in masks:
            heads = jnp.repeat(masks["head"][k], site.heads_per_group)
            scale_input[site.path + (_ATTENTION_OUT,)] = (heads, -2)
        if "head_layer" in masks:
            scale_output[site.path] = masks["head_layer"][k]
    for site in structure.feed_forward:
        k = _key(site.path)
        if "intermediate" in masks:
            scale_input[site.path + (site.down,)] = (masks["intermediate"][k], -1)
        if "mlp" in masks:
            scale_output[site.path] = masks["mlp"][k]
    hidden = masks.get("hidden")
    return _MaskPlan(scale_input, scale_output, hidden, frozenset(n.path for n in structure.norms))


def _masking_interceptor(next_fun, args, kwargs, context, *, plan: _MaskPlan):
    module = context.module
    if context.method_name != "__call__" or module.scope is None:
        return next_fun(*args, **kwargs)
    path = tuple(module.scope.path)
    if path in plan.scale_input:
        gates, axis = plan.scale_input[path]
        x = args[0]
        shape = [1] * x.ndim
        shape[axis] = gates.shape[0]
        args = (x * gates.reshape(shape).astype(x.dtype), *args[1:])
    if path in plan.norm_paths and plan.norm_gates is not None:
        keep = plan.norm_gates != 0
        # An all-zero sample would give 0/0 statistics; any statistics do, as the output is 0.
        keep = jnp.where(jnp.any(keep), keep, True)
        if kwargs.get("mask") is not None:
            keep = jnp.logical_and(kwargs["mask"], keep)
        y = next_fun(*args, **{**kwargs, "mask": keep})
        return y * plan.norm_gates.astype(y.dtype)
    y = next_fun(*args, **kwargs)
    if path in plan.scale_output:
        y = y * plan.scale_output[path].astype(y.dtype)
    return y


@contextlib.contextmanager
def apply_masks(structure: CoFiStructure, masks: Any) -> Iterator[None]:
    """Within this context, applying the model (by ``structure``'s root) uses the masks.

    Works inside ``jit``/``grad`` (the masks may be traced); the user's apply function and
    parameters are unchanged. See the module docstring for where each gate enters.

    Example:
      >>> with apply_masks(structure, structure.sample(log_alpha, rng)):
      ...     logits = model.apply({"params": params}, x)
    """
    plan = _plan(structure, masks)
    with nn.intercept_methods(functools.partial(_masking_interceptor, plan=plan)):
        yield


def apply_with_layers(
    structure: CoFiStructure,
    model: nn.Module,
    variables: Mapping[str, Any],
    *args: Any,
    masks: Any = None,
    **kwargs: Any,
) -> tuple[Any, list[Array]]:
    """``model.apply(variables, *args, **kwargs)`` that also returns each layer's output.

    Args:
      structure: from :func:`cofi_structure` (its ``layers`` are captured).
      model: the model, or an :class:`ExtractedModel` of it (same layer paths).
      variables: ``{'params': ...}``.
      masks: optional gates; the model then runs under :func:`apply_masks`, and the hidden
        states are multiplied by the hidden keep-indicator (``hidden != 0``), so they are what
        the extracted model's layers output, padded with zeros.

    Returns:
      ``(output, [hidden state of each layer])``.
    """
    _check_structure(structure)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={_short(model)} must be a flax.linen Module")
    if not isinstance(variables, Mapping):
        raise ValueError(
            f"variables must be a dict such as {{'params': params}}, got {type(variables).__name__}"
        )
    if masks is not None:
        structure.check(masks)
    wanted = frozenset(structure.layers)

    def capture(module: nn.Module, method_name: str) -> bool:
        return method_name == "__call__" and tuple(module.scope.path) in wanted

    context = apply_masks(structure, masks) if masks is not None else contextlib.nullcontext()
    with context:
        output, state = model.apply(
            variables, *args, capture_intermediates=capture, mutable=["intermediates"], **kwargs
        )
    layers = []
    for path in structure.layers:
        node = _subtree(state["intermediates"], path)
        if node is None or "__call__" not in node:
            raise ValueError(f"layer {_key(path)} was not called by the model")
        hidden = node["__call__"][0]
        if masks is not None and "hidden" in masks:
            hidden = hidden * (masks["hidden"] != 0).astype(hidden.dtype)
        layers.append(hidden)
    return output, layers


# --- layer distillation --------------------------------------------------------------------------
def default_teacher_layers(num_layers: int) -> tuple[int, ...]:
    """CoFi's distilled teacher layers: ``(2, 5, 8, 11)`` of 12, i.e. every quarter's last."""
    num_layers = _checks.int_at_least("num_layers", num_layers, 1)
    if num_layers <= 4:
        return tuple(range(num_layers))
    return tuple(sorted({round((k + 1) * num_layers / 4) - 1 for k in range(4)}))


def layer_distillation_loss(
    student_layers: Sequence[Array],
    teacher_layers: Sequence[Array],
    transform: Callable[[Array], Array],
    *,
    teacher_indices: Sequence[int] | None = None,
    student_exists: Array | None = None,
    official_indexing: bool = False,
) -> tuple[Array, Array]:
    """CoFi's layer distillation with dynamic layer matching (``layer_distill_version`` 4).

    ``L[i, j] = MSE(teacher_layers[t_i], transform(student_layers[j]))``. Searching from the top
    distilled teacher layer down, teacher layer ``t_i`` is matched to the existing student layer
    ``m(i) < m(i + 1)`` with the smallest ``L[i, j]`` (the top one to any existing layer); if
    none is left it takes ``m(i + 1)`` again. The loss is ``sum_i L[i, m(i)]``; the matching
    carries no gradient.

    Args:
      student_layers: the student's layer outputs, each ``[..., d_s]``.
      teacher_layers: the teacher's layer outputs, each ``[..., d_t]``.
      transform: the learned map from student to teacher features (CoFi: one ``d x d`` linear
        layer shared by all layers).
      teacher_indices: the distilled teacher layers; default :func:`default_teacher_layers`.
      student_exists: bool per student layer; CoFi passes ``head_layer != 0``
        (:meth:`CoFiStructure.layer_exists`). Default: all exist.
      official_indexing: reproduce the official code's indexing, which applies
        ``existing_layers[k]`` to the ``k``-th *closest* student layer rather than to layer ``k``
        (``indexes[(indexes < last) & existing_layers]``). Off by default.

    Returns:
      ``(loss, matched student layer per distilled teacher layer)``; a teacher layer with no
      student layer to match (none exists) adds 0 and reports ``len(student_layers)``.
    """
    student_layers = _layer_list("student_layers", student_layers)
    teacher_layers = _layer_list("teacher_layers", teacher_layers)
    num_student, num_teacher = len(student_layers), len(teacher_layers)
    _checks.function("transform", transform)
    _checks.boolean("official_indexing", official_indexing)
    if teacher_indices is None:
        teacher_indices = default_teacher_layers(num_teacher)
    if not isinstance(teacher_indices, Sequence) or isinstance(teacher_indices, str | bytes):
        raise ValueError(f"teacher_indices={teacher_indices!r} must be a sequence of layer indices")
    teacher_indices = tuple(
        _checks.index("teacher_indices", i, num_teacher) for i in teacher_indices
    )
    if not teacher_indices or any(
        a >= b for a, b in zip(teacher_indices, teacher_indices[1:], strict=False)
    ):
        raise ValueError(
            f"teacher_indices={teacher_indices} must be increasing indices of the "
            f"{num_teacher} teacher layers (at least one)"
        )
    if student_exists is None:
        exists = jnp.ones((num_student,), bool)
    else:
        exists = _checks.as_array("student_exists", student_exists, ndim=1)
        if exists.dtype != jnp.bool_ and not jnp.issubdtype(exists.dtype, jnp.integer):
            raise ValueError(
                f"student_exists.dtype={exists.dtype} must be bool (e.g. head_layer != 0)"
            )
        if exists.shape != (num_student,):
            raise ValueError(f"student_exists.shape={exists.shape} must be ({num_student},)")
        exists = exists.astype(bool)
    mapped = [transform(h) for h in student_layers]
    for j, h in enumerate(mapped):
        h = _checks.as_array(f"transform(student_layers[{j}])", h, kind="floating")
        for t in teacher_indices:
            if h.shape != teacher_layers[t].shape:
                raise ValueError(
                    f"transform(student_layers[{j}]).shape={h.shape} must be "
                    f"teacher_layers[{t}].shape={teacher_layers[t].shape} (the MSE compares "
                    "them element by element, without broadcasting)"
                )
    losses = jnp.stack(
        [
            jnp.stack(
                [
                    jnp.mean(
                        jnp.square(teacher_layers[t].astype(jnp.float32) - s.astype(jnp.float32))
                    )
                    for s in mapped
                ]
            )
            for t in teacher_indices
        ]
    )  # [num distilled teacher layers, num student layers]
    positions = jnp.arange(num_student)
    last = jnp.asarray(num_student)
    matched = []
    costs = jax.lax.stop_gradient(losses)
    for i in reversed(range(len(teacher_indices))):
        if official_indexing:
            order = jnp.argsort(costs[i], stable=True)
            valid = (order < last) & exists  # exists applied by rank, as in the official code
            first = jnp.argmax(valid)
            choice = jnp.where(jnp.any(valid), order[first], last)
        else:
            valid = (positions < last) & exists
            choice = jnp.where(
                jnp.any(valid), jnp.argmin(jnp.where(valid, costs[i], jnp.inf)), last
            )
        matched.append(choice)
        last = choice
    matched = jnp.stack(matched[::-1]).astype(jnp.int32)
    picked = jnp.take_along_axis(losses, jnp.minimum(matched, num_student - 1)[:, None], axis=1)[
        :, 0
    ]
    loss = jnp.sum(jnp.where(matched < num_student, picked, 0.0))
    return loss, matched


def _layer_list(name: str, layers: Any) -> list[Array]:
    """A non-empty list of floating arrays with at least one axis."""
    if not isinstance(layers, Sequence) or isinstance(layers, str | bytes):
        raise ValueError(f"{name} must be a list of per-layer arrays, got {type(layers).__name__}")
    if not layers:
        raise ValueError(f"{name} is empty: need at least one layer")
    return [
        _checks.as_array(f"{name}[{i}]", h, min_ndim=1, kind="floating", nonempty=True)
        for i, h in enumerate(layers)
    ]


def cofi_distillation_loss(
    student_logits: Array,
    teacher_logits: Array,
    student_layers: Sequence[Array],
    teacher_layers: Sequence[Array],
    transform: Callable[[Array], Array],
    *,
    temperature: float = 2.0,
    logit_weight: float = 0.1,
    layer_weight: float = 0.9,
    teacher_indices: Sequence[int] | None = None,
    student_exists: Array | None = None,
) -> tuple[Array, dict[str, Array]]:
    """CoFi's distillation objective: ``logit_weight * T^2 KL(teacher_T || student_T) +
    layer_weight * layer_distillation_loss``.

    The logit term is ``efflax.losses.distillation_loss`` in its KD-only form (batch-mean KL, the
    teacher without gradient); defaults are the official ``distill_temp=2``,
    ``distill_ce_loss_alpha=0.1``, ``distill_loss_alpha=0.9``. Add the Lagrangian penalty
    (``efflax.optim.LagrangianSparsity``) for the pruning loss.

    Returns:
      ``(loss, {'logit': ..., 'layer': ..., 'matched': matched student layers})``.
    """
    from efflax._src.losses.distillation import distillation_loss

    nonnegative_if_concrete("logit_weight", logit_weight)
    nonnegative_if_concrete("layer_weight", layer_weight)
    teacher_layers = _layer_list("teacher_layers", teacher_layers)
    logit = distillation_loss(
        student_logits, teacher_logits, alpha_kd=logit_weight, temperature=temperature
    )
    teacher_layers = [jax.lax.stop_gradient(h) for h in teacher_layers]
    layer, matched = layer_distillation_loss(
        student_layers,
        teacher_layers,
        transform,
        teacher_indices=teacher_indices,
        student_exists=student_exists,
    )
    return logit + layer_weight * layer, {"logit": logit, "layer": layer, "matched": matched}


# --- optimizer -----------------------------------------------------------------------------------
def cofi_optimizer(
    model_tx: optax.GradientTransformation,
    *,
    reg_learning_rate: float = 0.01,
    lagrangian_learning_rate: float | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    log_alpha_range: tuple[float, float] = (math.log(1e-2), math.log(1e2)),
) -> optax.GradientTransformation:
    """CoFi's three optimizers as one optax transform over ``{'log_alpha', 'lagrangian', ...}``.

    ``params['log_alpha']``: AdamW(``reg_learning_rate``, no weight decay), then clipped to
    ``log_alpha_range`` (CoFi's ``constrain_parameters``); ``params['lagrangian']``: the same
    Adam run as gradient *ascent* (the official AdamW with ``lr = -reg_learning_rate``); every
    other top-level key (the model, the layer-distillation map) gets ``model_tx``.

    CoFi's 0.01 assumes ~1e5 steps; shorter runs need a larger ``reg_learning_rate``.
    """
    from efflax._src.optim.lagrangian import gradient_ascent
    from efflax._src.optim.lagrangian import project_to_box

    if not (
        callable(getattr(model_tx, "init", None)) and callable(getattr(model_tx, "update", None))
    ):
        raise ValueError(f"model_tx={_short(model_tx)} must be an optax GradientTransformation")
    reg = _checks.positive_float("reg_learning_rate", reg_learning_rate)
    lag = reg if lagrangian_learning_rate is None else lagrangian_learning_rate
    lag = _checks.positive_float("lagrangian_learning_rate", lag)
    b1 = _checks.probability("b1", b1, allow_one=False)
    b2 = _checks.probability("b2", b2, allow_one=False)
    eps = _checks.positive_float("eps", eps)
    if (
        not isinstance(log_alpha_range, Sequence)
        or isinstance(log_alpha_range, str | bytes)
        or len(log_alpha_range) != 2
    ):
        raise ValueError(f"log_alpha_range={log_alpha_range!r} must be (low, high) with low < high")
    low = _checks.finite_float("log_alpha_range[0]", log_alpha_range[0])
    high = _checks.finite_float("log_alpha_range[1]", log_alpha_range[1])
    if not low < high:
        raise ValueError(f"log_alpha_range={log_alpha_range!r} must be (low, high) with low < high")
    transforms = {
        "model": model_tx,
        "log_alpha": optax.chain(
            optax.adamw(reg, b1=b1, b2=b2, eps=eps, weight_decay=0.0), project_to_box(low, high)
        ),
        "lagrangian": gradient_ascent(optax.adamw(lag, b1=b1, b2=b2, eps=eps, weight_decay=0.0)),
    }

    def labels(params):
        if (
            not isinstance(params, Mapping)
            or "log_alpha" not in params
            or "lagrangian" not in params
        ):
            got = sorted(params) if isinstance(params, Mapping) else type(params).__name__
            raise ValueError(
                f"cofi_optimizer needs params with 'log_alpha' and 'lagrangian', got {got}"
            )
        return {k: k if k in ("log_alpha", "lagrangian") else "model" for k in params}

    return optax.multi_transform(transforms, labels)


# --- the pruning run ----------------------------------------------------------------------------
def cofi_pruning_state(
    structure: CoFiStructure,
    model: nn.Module,
    teacher_params: Any,
    target: float,
    tx: optax.GradientTransformation,
    *,
    rng: Array,
    gate_key: Array,
    map_key: Array,
) -> Any:
    """The ``TrainState`` of a CoFi pruning run that starts from the teacher's weights.

    ``params`` holds ``'model'`` (a copy of ``teacher_params``), ``'log_alpha'``
    (``structure.init(gate_key)``), ``'lagrangian'`` (both multipliers 0) and ``'layer_map'``
    (CoFi's ``layer_transformation``: one ``d x d`` linear map, ``N(0, 0.02)`` kernel from
    ``map_key``, zero bias); ``extra`` holds ``'teacher'`` (``teacher_params``) and ``'target'``
    (the final target sparsity, float32), so one step from :func:`cofi_pruning_loss` serves every
    teacher and target. ``tx``: :func:`cofi_optimizer`; ``rng``: the run's step keys.
    """
    from efflax._src.optim.lagrangian import LagrangianSparsity
    from efflax._src.training.state import TrainState

    structure = _check_structure(structure)
    if structure.hidden_size is None:
        raise ValueError("cofi_pruning_state needs a structure with norms (a hidden size)")
    d = structure.hidden_size
    params = {
        "model": teacher_params,
        "log_alpha": structure.init(gate_key),
        "lagrangian": LagrangianSparsity(target).init(),
        "layer_map": {
            "kernel": 0.02 * jax.random.normal(map_key, (d, d)),
            "bias": jnp.zeros(d),
        },
    }
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        rng=rng,
        extra={"teacher": teacher_params, "target": jnp.asarray(target, jnp.float32)},
    )


def cofi_pruning_loss(
    structure: CoFiStructure,
    model: nn.Module,
    *,
    warmup_steps: int,
    temperature: float = 2.0,
    logit_weight: float = 0.1,
    layer_weight: float = 0.9,
    x_key: str = "x",
) -> Callable[..., Any]:
    """CoFi's pruning loss, a ``loss_fn`` for ``efflax.training.make_train_step``.

    On a state from :func:`cofi_pruning_state`: the teacher (``state.extra['teacher']``, no
    gradient) and the student under sampled masks (:func:`apply_with_layers`) read
    ``batch[x_key]``; the loss is :func:`cofi_distillation_loss` (``logit_weight`` KD at
    ``temperature`` + ``layer_weight`` layer distillation through ``params['layer_map']``) plus
    ``efflax.optim.LagrangianSparsity``'s penalty, its target rising to ``state.extra['target']``
    over ``warmup_steps``. Metrics: ``kd``, ``layer``, ``expected_sparsity``, ``target``,
    ``lambda_1``, ``lambda_2``.
    """
    from efflax._src.optim.lagrangian import LagrangianSparsity
    from efflax._src.training.state import LossOutput

    structure = _check_structure(structure)
    warmup_steps = _checks.int_at_least("warmup_steps", warmup_steps, 0)

    def loss_fn(params, state, batch, rng):
        x = batch[x_key]
        teacher_logits, teacher_layers = apply_with_layers(
            structure, model, {"params": state.extra["teacher"]}, x
        )
        teacher_logits = jax.lax.stop_gradient(teacher_logits)
        teacher_layers = jax.lax.stop_gradient(teacher_layers)
        masks = structure.sample(params["log_alpha"], rng)
        logits, layers = apply_with_layers(
            structure, model, {"params": params["model"]}, x, masks=masks
        )
        layer_map = params["layer_map"]
        distill, parts = cofi_distillation_loss(
            logits,
            teacher_logits,
            layers,
            teacher_layers,
            lambda h: h @ layer_map["kernel"] + layer_map["bias"],
            temperature=temperature,
            logit_weight=logit_weight,
            layer_weight=layer_weight,
            student_exists=structure.layer_exists(masks),
        )
        controller = LagrangianSparsity(state.extra["target"], warmup_steps=warmup_steps)
        expected = structure.expected_sparsity(params["log_alpha"])
        penalty, target = controller(expected, params["lagrangian"], state.step)
        metrics = {
            "kd": parts["logit"],
            "layer": parts["layer"],
            "expected_sparsity": expected,
            "target": target,
            "lambda_1": params["lagrangian"]["lambda_1"],
            "lambda_2": params["lagrangian"]["lambda_2"],
        }
        return distill + penalty, LossOutput(metrics=metrics)

    return loss_fn


# --- extraction ----------------------------------------------------------------------------------
class ExtractedModel(nn.Module):
    """The user's model run at the extracted (smaller) sizes; made by :func:`extract`.

    Its parameter tree is the original one with pruned heads, units, hidden features and whole
    sublayers removed. Each attention layer and FFN is cloned with its own size; a dropped
    sublayer returns zeros (its residual branch vanishes); modules listed with a ``'hidden'``
    attribute (``Encoder.d_model``) are cloned with the new width.

    Attributes:
      module: the original model.
      hidden_size: the original and the new width ``(d, d')``, or None if it is unchanged.
      attention: ``(path, num_heads, num_kv_heads, head_dim)`` of every kept attention layer.
      feed_forward: ``(path, units)`` of every kept FFN.
      dropped: ``(path, output features)`` of every removed sublayer.
      attributes: per module class, its attribute for each size (see ``DEFAULT_ATTRIBUTES``).
    """

    module: nn.Module
    hidden_size: tuple[int, int] | None
    attention: tuple[tuple[Path, int, int, int], ...]
    feed_forward: tuple[tuple[Path, int], ...]
    dropped: tuple[tuple[Path, int], ...]
    attributes: tuple[tuple[type, tuple[tuple[str, str], ...]], ...]

    def setup(self):
        nn.share_scope(self, self.module)

    def __call__(self, *args, **kwargs):
        interceptor = functools.partial(
            _resizing_interceptor,
            hidden_size=self.hidden_size,
            attention={p: (h, g, d) for p, h, g, d in self.attention},
            feed_forward=dict(self.feed_forward),
            dropped=dict(self.dropped),
            attributes={cls: dict(names) for cls, names in self.attributes},
        )
        with nn.intercept_methods(interceptor):
            return self.module(*args, **kwargs)


def _attribute_names(attributes: Mapping[type, Mapping[str, str]], module: nn.Module) -> Mapping:
    for cls in type(module).__mro__:
        if cls in attributes:
            return attributes[cls]
    return {}


def _resizing_interceptor(
    next_fun, args, kwargs, context, *, hidden_size, attention, feed_forward, dropped, attributes
):
    module = context.module
    if context.method_name != "__call__" or module.scope is None:
        return next_fun(*args, **kwargs)
    path = tuple(module.scope.path)
    names = _attribute_names(attributes, module)
    if path in dropped:
        x = args[0]
        dtype = getattr(module, "dtype", None) or jnp.result_type(x)
        return jnp.zeros((*x.shape[:-1], dropped[path]), dtype)
    changes: dict[str, Any] = {}
    if path in attention:
        heads, kv_heads, head_dim = attention[path]
        wanted = {"num_heads": heads, "num_kv_heads": kv_heads, "head_dim": head_dim}
        for role, value in wanted.items():
            if role not in names:
                raise ValueError(
                    f"cannot resize {type(module).__name__} at {_key(path)}: no attribute for "
                    f"{role!r}; pass attributes={{{type(module).__name__}: {{{role!r}: ...}}}}"
                )
            changes[names[role]] = value
    elif path in feed_forward:
        if "units" not in names:
            raise ValueError(
                f"cannot resize {type(module).__name__} at {_key(path)}: no attribute for "
                f"'units'; pass attributes={{{type(module).__name__}: {{'units': ...}}}}"
            )
        changes[names["units"]] = feed_forward[path]
    if hidden_size is not None and "hidden" in names:
        old, new = hidden_size
        if getattr(module, names["hidden"]) == old:
            changes[names["hidden"]] = new
    changes = {k: v for k, v in changes.items() if getattr(module, k) != v}
    if not changes:
        return next_fun(*args, **kwargs)
    # The same scope: the clone reads this module's (smaller) parameters.
    resized = module.clone(parent=module.scope, **changes)
    return getattr(resized, context.method_name)(*args, **kwargs)


def extract(
    model: nn.Module,
    params: Any,
    structure: CoFiStructure,
    masks: Any,
    *,
    attributes: Mapping[type, Mapping[str, str]] | None = None,
) -> tuple[ExtractedModel, dict[str, Any]]:
    """Folds the final masks into a smaller dense model with the same outputs.

    Soft gate values are multiplied into the weights (head and attention-layer gates into the
    ``out`` projection, unit and FFN-layer gates into the FFN's down projection, hidden gates into
    every norm's scale and bias); heads, units and hidden features whose gate is 0 are deleted,
    and so are whole attention layers / FFNs with a zero layer gate or no head / unit left.

    Args:
      model: the model ``structure`` was found on.
      params: its parameters (boxed or not).
      structure: from :func:`cofi_structure`.
      masks: concrete gates, normally ``structure.deterministic(log_alpha)``.
      attributes: extra ``{module class: {'num_heads' | 'num_kv_heads' | 'head_dim' | 'units' |
        'hidden': attribute name}}`` for user classes (efflax's are known).

    Returns:
      ``(extracted_model, extracted_params)``; ``extracted_model.apply({'params': ...}, ...)``
      equals the masked model's output.

    Raises:
      ValueError: masks that are missing, traced or of the wrong layout, parameters that do not
        match the structure, or masks that remove every hidden feature.
    """
    _check_structure(structure)
    if not isinstance(model, nn.Module):
        raise ValueError(f"model={_short(model)} must be a flax.linen Module")
    if masks is None:
        raise ValueError("masks=None: extraction needs the final gates (structure.deterministic)")
    structure.check(masks)
    if attributes is not None and not (
        isinstance(attributes, Mapping)
        and all(isinstance(c, type) and isinstance(n, Mapping) for c, n in attributes.items())
    ):
        raise ValueError(
            f"attributes={attributes!r} must be a dict {{module class: {{size: attribute name}}}}"
        )
    if not isinstance(params, Mapping):
        raise ValueError(f"params must be a dict of parameters, got {type(params).__name__}")
    concrete = jax.tree.map(_checks.concrete, masks)
    if any(v is None for v in jax.tree.leaves(concrete, is_leaf=lambda x: x is None)):
        raise ValueError("masks are traced: extract outside jit, from concrete gates")
    masks = jax.tree.map(lambda z: np.asarray(z, np.float32), concrete)
    params = nn.meta.unbox(params)
    if isinstance(params, Mapping) and set(params) == {"params"}:
        params = params["params"]
    got = {path: np.shape(leaf) for path, leaf in _leaves(params)}
    want = {p.path: p.shape for p in structure.params}
    if got != want:
        diff = sorted(set(got.items()) ^ set(want.items()))[:4]
        raise ValueError(f"params do not match the structure (first differences: {diff})")

    hidden_keep = None
    if "hidden" in masks:
        hidden_keep = np.flatnonzero(masks["hidden"] != 0)
        if hidden_keep.size == 0:
            raise ValueError("masks['hidden'] is all zero: nothing of the model would be left")
    keep: dict[Path, dict[str, np.ndarray]] = {}
    scale_down: dict[Path, tuple[np.ndarray, float]] = {}  # site -> (per-index gate, layer gate)
    kept_attention, kept_ffn, dropped = [], [], []
    for site in structure.attention:
        k = _key(site.path)
        group_gates = (
            masks["head"][k] if "head" in masks else np.ones(site.num_kv_heads, np.float32)
        )
        layer_gate = float(masks["head_layer"][k]) if "head_layer" in masks else 1.0
        groups = np.flatnonzero(group_gates != 0)
        if layer_gate == 0 or groups.size == 0:
            dropped.append((site.path, site.out_features))
            continue
        r = site.heads_per_group
        heads = (groups[:, None] * r + np.arange(r)[None, :]).reshape(-1)
        keep[site.path] = {"heads": heads, "kv_heads": groups}
        scale_down[site.path] = (np.repeat(group_gates, r), layer_gate)
        kept_attention.append((site.path, int(heads.size), int(groups.size), site.head_dim))
    for site in structure.feed_forward:
        k = _key(site.path)
        unit_gates = (
            masks["intermediate"][k] if "intermediate" in masks else np.ones(site.units, np.float32)
        )
        layer_gate = float(masks["mlp"][k]) if "mlp" in masks else 1.0
        units = np.flatnonzero(unit_gates != 0)
        if layer_gate == 0 or units.size == 0:
            dropped.append((site.path, site.out_features))
            continue
        keep[site.path] = {"mlp": units}
        scale_down[site.path] = (unit_gates, layer_gate)
        kept_ffn.append((site.path, int(units.size)))
    dropped_paths = {path for path, _ in dropped}
    if hidden_keep is not None:
        dropped = [(path, int(hidden_keep.size)) for path, _ in dropped]

    down_name = {s.path: _ATTENTION_OUT for s in structure.attention}
    down_name.update({s.path: s.down for s in structure.feed_forward})
    new_leaves: dict[Path, np.ndarray] = {}
    for info in structure.params:
        if info.site in dropped_paths:
            continue
        value = np.asarray(_subtree(params, info.path))
        down = info.site is not None and info.path[len(info.site)] == down_name[info.site]
        if down:
            gates, layer_gate = scale_down[info.site]
            for axis, role in enumerate(info.roles):
                if role in ("heads", "mlp"):
                    shape = [1] * value.ndim
                    shape[axis] = -1
                    value = value * gates.reshape(shape).astype(value.dtype)
            value = value * np.asarray(layer_gate, value.dtype)
        if info.kind == "norm" and hidden_keep is not None:
            value = value * masks["hidden"].astype(value.dtype)
        for axis, role in enumerate(info.roles):
            if role == "embed" and hidden_keep is not None:
                value = np.take(value, hidden_keep, axis=axis)
            elif role in ("heads", "kv_heads", "mlp") and info.site in keep:
                value = np.take(value, keep[info.site][role], axis=axis)
        new_leaves[info.path] = value

    new_params: dict[str, Any] = {}
    for path, value in new_leaves.items():
        node = new_params
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = jnp.asarray(value)

    merged = {cls: dict(names) for cls, names in DEFAULT_ATTRIBUTES.items()}
    for cls, names in dict(attributes or {}).items():
        merged[cls] = {**merged.get(cls, {}), **dict(names)}
    hidden_size = None
    if hidden_keep is not None and hidden_keep.size != structure.hidden_size:
        hidden_size = (structure.hidden_size, int(hidden_keep.size))
    extracted = ExtractedModel(
        module=model,
        hidden_size=hidden_size,
        attention=tuple(kept_attention),
        feed_forward=tuple(kept_ffn),
        dropped=tuple(dropped),
        attributes=tuple((cls, tuple(sorted(names.items()))) for cls, names in merged.items()),
    )
    return extracted, new_params
