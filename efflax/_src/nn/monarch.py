"""Monarch layers: a drop-in ``nn.Dense`` replacement and reverse sparsification.

Dao, Chen, Sohoni, Desai, Poli, Grogan, Liu, Rao, Rudra, Re: "Monarch: Expressive Structured
Matrices for Efficient and Accurate Training", arXiv 2204.00595 (ICML 2022).

``MonarchDense`` replaces the dense kernel by two block-diagonal factors with a transpose
between them (O(n^1.5) FLOPs and parameters at nblocks = sqrt(n)). Reverse sparsification trains
the Monarch model and converts it exactly to dense (``monarch_params_to_dense``) for the last
part of training; ``project_dense_params`` goes the other way (closed-form projection of
pretrained dense weights); ``monarchify`` swaps the ``nn.Dense`` layers of an existing module.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from pallas_kernels import _checks
from pallas_kernels.monarch import MONARCH_OP
from pallas_kernels.monarch import dense_to_monarch
from pallas_kernels.monarch import monarch_matmul
from pallas_kernels.monarch import monarch_to_dense
from pallas_kernels.op import Implementation

Dtype = Any
MONARCH_AXES = ("monarch_blocks", None, None)

# Each factor is LeCun-normal over its own fan-in (p for w1, r for w2): the composed matrix then
# has entry variance 1 / in_features, the scale of nn.Dense's default kernel init.
factor_init = nn.initializers.variance_scaling(
    1.0, "fan_in", "truncated_normal", in_axis=-1, out_axis=-2, batch_axis=(0,)
)


def monarch_shapes(
    in_features: int, out_features: int, nblocks: int
) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Factor shapes ``(w1 [nb, q, in/nb], w2 [nb, out/nb, q])`` with ``q = min(in, out) / nb``."""
    _checks.int_at_least("in_features", in_features)
    _checks.int_at_least("out_features", out_features)
    _checks.int_at_least("nblocks", nblocks)
    if in_features % nblocks or out_features % nblocks:
        raise ValueError(
            f"{nblocks=} must divide in_features={in_features} and out_features={out_features}"
        )
    p, s = in_features // nblocks, out_features // nblocks
    q = min(p, s)
    return (nblocks, q, p), (nblocks, s, q)


def _check_implementation(implementation: str | Implementation) -> str | Implementation:
    """``implementation`` if the Monarch op knows it (raises ``ValueError`` naming it if not)."""
    if not (isinstance(implementation, str) and implementation == "auto"):
        MONARCH_OP.get(implementation)
    return implementation


def _monarch_forward(
    module: nn.Module,
    x: jax.Array,
    *,
    features: int,
    nblocks: int,
    use_bias: bool,
    implementation: str | Implementation,
    dtype: Dtype | None,
    param_dtype: Dtype,
    bias_init: Callable,
) -> jax.Array:
    """Creates ``w1``, ``w2`` (and ``bias``) in ``module``'s scope and applies them to ``x``."""
    _checks.array("x", x, min_ndim=1, layout="[..., in_features]")
    if x.shape[-1] < 1:
        raise ValueError(f"x.shape={tuple(x.shape)} has no input features (last axis is 0)")
    _checks.int_at_least("features", features)
    w1_shape, w2_shape = monarch_shapes(x.shape[-1], features, nblocks)
    init = nn.with_logical_partitioning(factor_init, MONARCH_AXES)
    w1 = module.param("w1", init, w1_shape, param_dtype)
    w2 = module.param("w2", init, w2_shape, param_dtype)
    bias = module.param("bias", bias_init, (features,), param_dtype) if use_bias else None
    x, w1, w2, bias = nn.dtypes.promote_dtype(x, w1, w2, bias, dtype=dtype)
    y = monarch_matmul(x, w1, w2, implementation=implementation)
    if bias is not None:
        y = y + bias
    return y


class MonarchDense(nn.Module):
    """A Monarch-structured linear layer, a drop-in for ``nn.Dense``.

    Parameters ``w1 [nblocks, q, in/nblocks]`` and ``w2 [nblocks, features/nblocks, q]``,
    ``q = min(in, features) / nblocks``, logical axes ``('monarch_blocks', None, None)``; bias
    ``[features]`` with logical axis ``bias_axis``.

    Attributes:
      features: output size; nblocks must divide it and the input size.
      nblocks: number of diagonal blocks (4 in the paper's GPT-2/ViT MLPs; sqrt(n) is the
        cheapest).
      use_bias: add a bias.
      implementation: how the product runs (``pallas_kernels.monarch_matmul``): ``'auto'``
        (the Pallas kernels on a GPU where they support the shapes, else the XLA path),
        ``'xla'``, ``'pallas_triton'`` (alias ``'pallas'``; interpret mode on CPU),
        ``'reference'``, or a configured instance such as
        ``PallasTritonMonarch(block_sizes=...)`` or ``XlaMonarch(row_chunk=None)``. Inside
        ``pallas_kernels.op.forward_mode_autodiff()`` every choice is differentiable with
        ``jax.jvp`` (Hessian-vector products).
      dtype: computation dtype (None: promote inputs and params).
      param_dtype: parameter dtype.
      bias_axis: logical axis name of the bias (e.g. 'mlp'); None leaves it replicated.

    Example:
      >>> layer = MonarchDense(256, nblocks=16)
      >>> params = layer.init(jax.random.key(0), jnp.ones((2, 256)))
    """

    features: int
    nblocks: int = 4
    use_bias: bool = True
    implementation: str | Implementation = "auto"
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    bias_axis: str | None = None

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        return _monarch_forward(
            self,
            x,
            features=self.features,
            nblocks=self.nblocks,
            use_bias=self.use_bias,
            implementation=_check_implementation(self.implementation),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.bias_axis,)),
        )


def _default_include(dense: nn.Dense, in_features: int, nblocks: int) -> bool:
    return in_features % nblocks == 0 and dense.features % nblocks == 0


class Monarchified(nn.Module):
    """Runs ``module`` with its ``nn.Dense`` layers computed as Monarch layers (see monarchify)."""

    module: nn.Module
    nblocks: int = 4
    implementation: str | Implementation = "auto"
    include: Callable[[nn.Dense, int], bool] | None = None

    def setup(self):
        # Same parameter tree as the wrapped module: no extra 'module' level.
        nn.share_scope(self, self.module)

    def __call__(self, *args, **kwargs):
        _checks.int_at_least("nblocks", self.nblocks)
        # A plain function, not a method: module methods are themselves intercepted.
        intercept = functools.partial(
            _intercept_dense,
            nblocks=self.nblocks,
            implementation=self.implementation,
            include=self.include,
        )
        with nn.intercept_methods(intercept):
            return self.module(*args, **kwargs)


def _intercept_dense(next_fun, args, kwargs, context, *, nblocks, implementation, include):
    dense = context.module
    if type(dense) is not nn.Dense or context.method_name != "__call__" or len(args) != 1:
        return next_fun(*args, **kwargs)
    (x,) = args
    if include is None:
        selected = _default_include(dense, x.shape[-1], nblocks)
    else:
        selected = include(dense, x.shape[-1])
    if not selected:
        return next_fun(*args, **kwargs)
    return _monarch_forward(
        dense,
        x,
        features=dense.features,
        nblocks=nblocks,
        use_bias=dense.use_bias,
        implementation=implementation,
        dtype=dense.dtype,
        param_dtype=dense.param_dtype,
        bias_init=dense.bias_init,
    )


def monarchify(
    module: nn.Module,
    *,
    nblocks: int = 4,
    implementation: str | Implementation = "auto",
    include: Callable[[nn.Dense, int], bool] | None = None,
) -> Monarchified:
    """Wraps ``module`` so that its ``nn.Dense`` layers become Monarch layers.

    The wrapped module has the same parameter tree as ``module`` except that every converted
    Dense holds ``w1``, ``w2`` (and its own ``bias``) instead of ``kernel``; so
    ``monarch_params_to_dense`` turns its params into params of the plain ``module``, and
    ``project_dense_params`` goes the other way.

    Args:
      module: any linen module (e.g. an MLP block or a whole model).
      nblocks: Monarch blocks per layer.
      implementation: see ``MonarchDense``.
      include: ``include(dense, in_features) -> bool`` picks the layers to convert (default: all
        whose sizes nblocks divides).

    Returns:
      A module to ``init``/``apply`` like ``module``.
    """
    _check_implementation(implementation)
    _checks.int_at_least("nblocks", nblocks)
    _checks.function("include", include, optional=True)
    if not isinstance(module, nn.Module):
        raise ValueError(f"module={module!r} must be a flax.linen Module")
    return Monarchified(
        module=module, nblocks=nblocks, implementation=implementation, include=include
    )


def _map_layers(params: Any, fn: Callable[[tuple[str, ...], dict], dict | None], path=()) -> Any:
    if not isinstance(params, Mapping):
        return params
    converted = fn(path, dict(params))
    if converted is not None:
        return converted
    return {key: _map_layers(value, fn, (*path, key)) for key, value in params.items()}


def monarch_params_to_dense(params: Any) -> dict:
    """Params of Monarch layers -> params of the equivalent ``nn.Dense`` layers (same function).

    Every sub-dict holding ``w1`` and ``w2`` (a ``MonarchDense`` or a monarchified Dense)
    becomes ``{'kernel': monarch_to_dense(w1, w2), 'bias': ...}``; everything else is kept.
    Logical-partitioning boxes are removed (``nn.meta.unbox``).

    Args:
      params: a params tree (e.g. ``variables['params']``).

    Returns:
      The converted params tree (plain dicts), to apply with the dense model.
    """

    def convert(path, layer):
        if "w1" not in layer or "w2" not in layer:
            return None
        out = {k: v for k, v in layer.items() if k not in ("w1", "w2")}
        w1, w2 = layer["w1"], layer["w2"]
        out["kernel"] = monarch_to_dense(w1, w2).astype(w1.dtype)
        return out

    return _map_layers(nn.meta.unbox(params), convert)


def project_dense_params(
    params: Any,
    nblocks: int,
    *,
    include: Callable[[tuple[str, ...], jax.Array], bool] | None = None,
) -> dict:
    """Params of ``nn.Dense`` layers -> Monarch factors by closed-form projection.

    Every sub-dict with a 2-D ``kernel`` whose sizes nblocks divides (and that ``include(path,
    kernel)`` accepts) becomes ``{'w1', 'w2', 'bias'}``: the Frobenius-closest Monarch matrix
    (``dense_to_monarch``). Boxes are removed.

    Args:
      params: a params tree of a dense model.
      nblocks: Monarch blocks per layer.
      include: optional filter on the (path, kernel) of each candidate layer.

    Returns:
      A params tree for the monarchified model (or ``MonarchDense`` layers of the same names).
    """
    _checks.int_at_least("nblocks", nblocks)
    _checks.function("include", include, optional=True)

    def convert(path, layer):
        kernel = layer.get("kernel")
        if kernel is None or getattr(kernel, "ndim", 0) != 2:
            return None
        if kernel.shape[0] % nblocks or kernel.shape[1] % nblocks:
            return None
        if include is not None and not include(path, kernel):
            return None
        w1, w2 = dense_to_monarch(kernel, nblocks)
        out = {k: v for k, v in layer.items() if k != "kernel"}
        out["w1"], out["w2"] = w1.astype(kernel.dtype), w2.astype(kernel.dtype)
        return out

    return _map_layers(nn.meta.unbox(params), convert)


@dataclasses.dataclass(frozen=True)
class ReverseSparsification:
    """Schedule: train Monarch, switch to the equivalent dense model for the last fraction.

    Attributes:
      total_steps: length of training.
      dense_fraction: fraction of steps trained dense at the end (the paper uses ~10%).

    Example:
      >>> schedule = ReverseSparsification(total_steps=1000, dense_fraction=0.1)
      >>> schedule.switch_step, schedule.is_dense(950)
      (900, True)
    """

    total_steps: int
    dense_fraction: float = 0.1

    def __post_init__(self):
        _checks.int_at_least("total_steps", self.total_steps)
        _checks.probability("dense_fraction", self.dense_fraction)

    @property
    def switch_step(self) -> int:
        """First step trained dense."""
        return self.total_steps - round(self.dense_fraction * self.total_steps)

    def is_dense(self, step: int) -> bool:
        """Whether ``step`` (0-based) belongs to the dense phase."""
        return step >= self.switch_step

    def should_switch(self, step: int) -> bool:
        """True exactly at the step where params must be converted with
        ``monarch_params_to_dense``."""
        return step == self.switch_step
