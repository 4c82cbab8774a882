"""Small reference models for MNIST-1D (Greydanus 2020), used by the experiments.

``MLP`` and ``CNN1D`` follow the ``mnist1d`` baselines (MLP about 68%, CNN about 94% test
accuracy with 4,000 training examples).
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import linen as nn

from pallas_kernels import _checks

Dtype = jnp.dtype | type


def _dense(features: int, axes: tuple[str | None, str | None], dtype, param_dtype, name=None):
    return nn.Dense(
        features,
        dtype=dtype,
        param_dtype=param_dtype,
        kernel_init=nn.with_logical_partitioning(nn.initializers.lecun_normal(), axes),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
        name=name,
    )


class MLP(nn.Module):
    """MLP: ``[batch, in] -> [batch, num_classes]`` logits.

    Attributes:
      features: hidden widths.
      num_classes: output width.
      activation: the hidden nonlinearity (``nn.relu``; ``jnp.tanh`` for the edge-of-stability
        MLP of Cohen et al.).
      dtype / param_dtype: computation / parameter dtypes.
    """

    features: Sequence[int] = (100, 100)
    num_classes: int = 10
    activation: Callable[[jax.Array], jax.Array] = nn.relu
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        # A 1-D x would be read as a batch of one-feature examples: refuse it.
        _checks.array("x", x, min_ndim=2, nonempty=True, layout="[batch, features...]")
        if isinstance(self.features, str) or not isinstance(self.features, Sequence):
            raise ValueError(f"features={self.features!r} must be a sequence of widths")
        for width in self.features:
            _checks.int_at_least("features", width)
        _checks.int_at_least("num_classes", self.num_classes)
        x = x.reshape(x.shape[0], -1).astype(self.dtype)
        # Alternate the logical names so that no kernel maps both of its axes to one mesh axis.
        in_axis = "embed"
        for width in self.features:
            out_axis = "mlp" if in_axis == "embed" else "embed"
            x = self.activation(_dense(width, (in_axis, out_axis), self.dtype, self.param_dtype)(x))
            in_axis = out_axis
        return _dense(self.num_classes, (in_axis, "classes"), self.dtype, self.param_dtype)(x)


class CNN1D(nn.Module):
    """The MNIST-1D baseline CNN: three stride-2 convolutions and a linear head.

    ``[batch, length]`` (or ``[batch, length, 1]``) -> ``[batch, num_classes]`` logits.
    """

    channels: int = 25
    num_classes: int = 10
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        _checks.array("x", x, nonempty=True, layout="[batch, length] or [batch, length, 1]")
        if x.ndim not in (2, 3):
            raise ValueError(
                f"x.shape={tuple(x.shape)} must be [batch, length] or [batch, length, 1]"
            )
        _checks.int_at_least("channels", self.channels)
        _checks.int_at_least("num_classes", self.num_classes)
        length = x.shape[1]
        for width in (5, 3, 3):  # the output length of each padded stride-2 convolution
            length = (length + 2 - width) // 2 + 1
        if length < 1:
            raise ValueError(
                f"x.shape={tuple(x.shape)}: length {x.shape[1]} < 3 is too short for the three stride-2 convolutions"
            )
        if x.ndim == 2:
            x = x[..., None]
        x = x.astype(self.dtype)
        for i, width in enumerate((5, 3, 3)):
            x = nn.Conv(
                self.channels,
                kernel_size=(width,),
                strides=(2,),
                padding=((1, 1),),
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=nn.with_logical_partitioning(
                    nn.initializers.lecun_normal(), ("conv_window", None, "channels")
                ),
                bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("channels",)),
                name=f"conv{i}",
            )(x)
            x = nn.relu(x)
        x = x.reshape(x.shape[0], -1)
        return _dense(self.num_classes, ("embed", "classes"), self.dtype, self.param_dtype)(x)
