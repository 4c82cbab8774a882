"""Properties of ``efflax.models``: the MNIST-1D MLP and CNN against float64 numpy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from _hyp import FEW
from _hyp import INVALID
from _hyp import assert_close
from _hyp import bad_ints
from _hyp import f64
from _hyp import normal
from _hyp import random_variables
from _hyp import refused
from _hyp import seeds
from hypothesis import given
from hypothesis import strategies as st

from efflax import models as M

KEY = jax.random.key(0)


@functools.cache
def _jitted_apply(model):
    return jax.jit(model.apply)


@FEW
@given(seeds, st.sampled_from([(5,), (6, 4)]))
def test_mlp_matches_numpy(seed, features):
    model = M.MLP(features=features, num_classes=3)
    x = jnp.asarray(normal(seed, (2, 4, 2)))  # flattened to [2, 8]
    params = random_variables(model, x, seed=seed)["params"]
    h = f64(x).reshape(2, -1)
    for i in range(len(features)):
        h = np.maximum(
            h @ f64(params[f"Dense_{i}"]["kernel"]) + f64(params[f"Dense_{i}"]["bias"]), 0
        )
    last = params[f"Dense_{len(features)}"]
    assert_close(
        _jitted_apply(model)({"params": params}, x),
        h @ f64(last["kernel"]) + f64(last["bias"]),
        rtol=1e-4,
        atol=1e-5,
    )


def _conv64(x, kernel, bias):
    """Stride-2 'padding 1' 1-D convolution, [b, length, c_in] -> [b, out, c_out], in float64."""
    width = kernel.shape[0]
    padded = np.pad(f64(x), ((0, 0), (1, 1), (0, 0)))
    out_len = (padded.shape[1] - width) // 2 + 1
    windows = np.stack([padded[:, 2 * i : 2 * i + width] for i in range(out_len)], 1)
    return np.einsum("bowc,wcd->bod", windows, f64(kernel)) + f64(bias)


@FEW
@given(seeds, st.sampled_from([(2, 40), (3, 17, 1), (1, 3)]))
def test_cnn1d_matches_numpy(seed, shape):
    model = M.CNN1D(channels=4, num_classes=3)
    x = jnp.asarray(normal(seed, shape))
    params = random_variables(model, x, seed=seed)["params"]
    h = f64(x)[..., None] if x.ndim == 2 else f64(x)
    for i in range(3):
        h = np.maximum(_conv64(h, params[f"conv{i}"]["kernel"], params[f"conv{i}"]["bias"]), 0)
    h = h.reshape(h.shape[0], -1)
    expected = h @ f64(params["Dense_0"]["kernel"]) + f64(params["Dense_0"]["bias"])
    assert_close(_jitted_apply(model)({"params": params}, x), expected, rtol=1e-4, atol=1e-5)


@INVALID
@given(st.data())
def test_models_refuse(data):
    case = data.draw(
        st.sampled_from(["mlp_x", "features", "mlp_classes", "cnn_x", "channels", "cnn_classes"])
    )
    if case == "mlp_x":
        bad = data.draw(st.sampled_from([jnp.ones(8), jnp.float32(1), jnp.ones((0, 8))]))
        refused(lambda: M.MLP().init(KEY, bad), "x")
    elif case == "features":
        bad = data.draw(st.sampled_from([5, (0,), (4, -1), (2.5,), "16", (True,)]))
        refused(lambda: M.MLP(features=bad).init(KEY, jnp.ones((2, 8))), "features")
    elif case == "mlp_classes":
        refused(
            lambda: M.MLP(num_classes=data.draw(bad_ints().filter(lambda v: v is not None))).init(
                KEY, jnp.ones((2, 8))
            ),
            "num_classes",
        )
    elif case == "cnn_x":
        bad = data.draw(
            st.sampled_from(
                [jnp.ones(40), jnp.ones((2, 40, 1, 1)), jnp.ones((2, 2)), jnp.ones((0, 40))]
            )
        )
        refused(lambda: M.CNN1D().init(KEY, bad), "x")
    elif case == "channels":
        refused(
            lambda: M.CNN1D(channels=data.draw(bad_ints().filter(lambda v: v is not None))).init(
                KEY, jnp.ones((2, 40))
            ),
            "channels",
        )
    else:
        refused(
            lambda: M.CNN1D(num_classes=data.draw(bad_ints().filter(lambda v: v is not None))).init(
                KEY, jnp.ones((2, 40))
            ),
            "num_classes",
        )
