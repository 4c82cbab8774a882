"""MonarchDense, conversion to and from dense, monarchify and the reverse-sparsification schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from efflax.models import MLP
from efflax.nn import MonarchDense
from efflax.nn import ReverseSparsification
from efflax.nn import monarch_params_to_dense
from efflax.nn import monarch_shapes
from efflax.nn import monarchify
from efflax.nn import project_dense_params
from pallas_kernels import MonarchBlockSizes
from pallas_kernels import PallasTritonMonarch
from pallas_kernels import XlaMonarch
from pallas_kernels.op import forward_mode_autodiff


def _x(shape, seed=0):
    return jax.random.normal(jax.random.key(seed), shape)


@pytest.mark.parametrize("in_features, features, nblocks", [(64, 64, 8), (96, 32, 2)])
def test_converts_to_identical_dense(in_features, features, nblocks):
    x = _x((3, 5, in_features))
    layer = MonarchDense(features, nblocks=nblocks, implementation="xla")
    variables = layer.init(jax.random.key(1), x)
    params = nn.meta.unbox(variables["params"])
    w1_shape, w2_shape = monarch_shapes(in_features, features, nblocks)
    assert params["w1"].shape == w1_shape and params["w2"].shape == w2_shape
    assert variables["params"]["w1"].names == ("monarch_blocks", None, None)
    # a nonzero bias so that it is checked too
    params = {**params, "bias": jax.random.normal(jax.random.key(2), (features,))}
    y = jax.jit(layer.apply)({"params": params}, x)
    dense = jax.jit(nn.Dense(features).apply)({"params": monarch_params_to_dense(params)}, x)
    np.testing.assert_allclose(dense, y, rtol=1e-5, atol=1e-5)


def test_pallas_and_xla_implementations_agree():
    x = _x((10, 32))
    xla = MonarchDense(32, nblocks=4, implementation="xla")
    tiles = MonarchBlockSizes(block_rows=8, staged=False)
    pallas = MonarchDense(32, nblocks=4, implementation=PallasTritonMonarch(block_sizes=tiles))
    variables = xla.init(jax.random.key(0), x)
    np.testing.assert_allclose(
        pallas.apply(variables, x), xla.apply(variables, x), rtol=1e-5, atol=1e-5
    )


class _TwoMonarchLayers(nn.Module):
    implementation: object = "reference"

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(MonarchDense(32, nblocks=4, implementation=self.implementation)(x))
        return MonarchDense(16, nblocks=2, implementation=self.implementation)(h)


def test_hessian_vector_products_inside_forward_mode_context():
    """jax.jvp over jax.grad (the sharpness probes' HVP) through every implementation and
    row-chunk setting gives the reference's Hessian-vector product."""
    x = _x((12, 16), seed=1)
    target = _x((12, 16), seed=2)
    params = nn.meta.unbox(_TwoMonarchLayers().init(jax.random.key(0), x)["params"])
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(5), len(leaves))
    tangent = treedef.unflatten(
        [jax.random.normal(k, a.shape) for k, a in zip(keys, leaves, strict=True)]
    )

    def hvp(implementation):
        model = _TwoMonarchLayers(implementation)

        def loss(p):
            return jnp.mean((model.apply({"params": p}, x) - target) ** 2)

        with forward_mode_autodiff():
            return jax.jit(lambda p, v: jax.jvp(jax.grad(loss), (p,), (v,))[1])(params, tangent)

    want = hvp("reference")
    scale = max(float(jnp.max(jnp.abs(leaf))) for leaf in jax.tree.leaves(want))
    for implementation in (
        XlaMonarch(row_chunk=5),  # 12 rows: padded to 15, three chunks
        # the kernels' custom VJP has no jvp: the op substitutes the XLA path ('auto' on CPU)
        PallasTritonMonarch(block_sizes=MonarchBlockSizes(block_rows=8, staged=True)),
    ):
        got = hvp(implementation)
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            np.testing.assert_allclose(
                g, w, rtol=1e-4, atol=1e-5 * scale, err_msg=str(implementation)
            )


def test_pallas_layer_refuses_jvp_outside_the_context():
    layer = MonarchDense(32, nblocks=4, implementation="pallas_triton")
    x = _x((4, 32))
    variables = layer.init(jax.random.key(0), x)
    # The error says what to do (JAX's own says only "custom_vjp function").
    with pytest.raises(TypeError, match="forward_mode_autodiff"):
        jax.jvp(lambda v: layer.apply(variables, v), (x,), (x,))
    with forward_mode_autodiff():
        _, tangent = jax.jvp(lambda v: layer.apply(variables, v), (x,), (x,))
    assert bool(jnp.all(jnp.isfinite(tangent)))


def test_init_scale_matches_dense():
    """The composed matrix has the entry variance of nn.Dense's LeCun-normal kernel."""
    n, nblocks = 256, 16
    x = _x((4, n))
    params = nn.meta.unbox(MonarchDense(n, nblocks=nblocks).init(jax.random.key(3), x)["params"])
    kernel = monarch_params_to_dense(params)["kernel"]
    dense_kernel = nn.Dense(n).init(jax.random.key(3), x)["params"]["kernel"]
    ratio = float(jnp.var(kernel) / jnp.var(dense_kernel))
    assert 0.8 < ratio < 1.25, ratio
    assert abs(float(jnp.var(kernel)) * n - 1.0) < 0.2


def test_dtype_and_param_dtype():
    x = _x((4, 32))
    layer = MonarchDense(32, nblocks=4, dtype=jnp.bfloat16, param_dtype=jnp.float32)
    variables = layer.init(jax.random.key(0), x)
    assert nn.meta.unbox(variables["params"])["w1"].dtype == jnp.float32
    assert layer.apply(variables, x).dtype == jnp.bfloat16


def test_monarchify_and_back():
    mlp = MLP(features=(64, 64), num_classes=10)
    x = _x((6, 40))
    sparse = monarchify(mlp, nblocks=4, implementation="xla")
    # by default every Dense whose sizes nblocks divides becomes Monarch: 40 -> 64 and 64 -> 64,
    # not 64 -> 10
    shapes = jax.eval_shape(sparse.init, jax.random.key(0), x)["params"]
    assert set(shapes["Dense_0"]) == {"w1", "w2", "bias"}
    assert set(shapes["Dense_1"]) == {"w1", "w2", "bias"}
    assert set(shapes["Dense_2"]) == {"kernel", "bias"}
    # convert only the hidden layer below (fewer compilations)
    sparse = monarchify(mlp, nblocks=4, include=lambda dense, n_in: n_in == 64 == dense.features)
    params = nn.meta.unbox(jax.jit(sparse.init)(jax.random.key(0), x)["params"])
    assert set(params["Dense_0"]) == {"kernel", "bias"}
    sparse_apply = jax.jit(sparse.apply)
    y = sparse_apply({"params": params}, x)
    dense_params = monarch_params_to_dense(params)
    np.testing.assert_allclose(
        jax.jit(mlp.apply)({"params": dense_params}, x), y, rtol=1e-5, atol=1e-5
    )
    # projecting the dense params back recovers the same function
    reprojected = project_dense_params(
        dense_params, 4, include=lambda path, k: path == ("Dense_1",)
    )
    assert set(reprojected["Dense_1"]) == {"w1", "w2", "bias"}
    np.testing.assert_allclose(sparse_apply({"params": reprojected}, x), y, rtol=1e-4, atol=1e-4)


def test_project_dense_params_of_trained_like_weights():
    mlp = MLP(features=(64,), num_classes=10)
    x = _x((6, 40))
    dense_params = nn.meta.unbox(mlp.init(jax.random.key(1), x)["params"])
    projected = project_dense_params(dense_params, 8, include=lambda path, k: k.shape[1] == 64)
    assert set(projected["Dense_0"]) == {"w1", "w2", "bias"}
    assert set(projected["Dense_1"]) == {"kernel", "bias"}
    sparse = monarchify(mlp, nblocks=8, include=lambda dense, n_in: dense.features == 64)
    y = sparse.apply({"params": projected}, x)
    assert y.shape == (6, 10) and bool(jnp.all(jnp.isfinite(y)))


def test_reverse_sparsification_schedule():
    schedule = ReverseSparsification(total_steps=1000, dense_fraction=0.1)
    assert schedule.switch_step == 900
    assert not schedule.is_dense(899) and schedule.is_dense(900)
    assert schedule.should_switch(900) and not schedule.should_switch(901)
    assert ReverseSparsification(10, dense_fraction=0.0).switch_step == 10


def test_errors():
    x = _x((2, 30))
    with pytest.raises(ValueError, match="nblocks"):
        MonarchDense(32, nblocks=4).init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="implementation"):
        MonarchDense(32, nblocks=2, implementation="cuda").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="dense_fraction"):
        ReverseSparsification(100, dense_fraction=1.5)
    with pytest.raises(ValueError, match="total_steps"):
        ReverseSparsification(0)
    with pytest.raises(ValueError, match="implementation"):
        monarchify(MLP(), implementation="triton")
