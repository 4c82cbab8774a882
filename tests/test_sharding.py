import jax
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import PartitionSpec

from efflax import sharding
from efflax.models import MLP


def test_eight_cpu_devices_are_forced():
    assert jax.device_count() == 8


def test_make_mesh_shapes_and_errors():
    mesh = sharding.make_mesh(expert=4)
    assert dict(mesh.shape) == {"data": 2, "expert": 4, "model": 1}
    assert dict(sharding.make_mesh(data=2, model=2).shape) == {"data": 2, "expert": 1, "model": 2}
    with pytest.raises(ValueError, match="expert\\*model=3"):
        sharding.make_mesh(expert=3)
    with pytest.raises(ValueError, match="needs 16 devices"):
        sharding.make_mesh(data=4, expert=4)


def test_logical_rules_map_names_to_mesh_axes():
    assert sharding.logical_to_mesh_spec(("batch", "embed")) == PartitionSpec(
        ("data", "expert"), None
    )
    assert sharding.logical_to_mesh_spec(("expert", "embed", "expert_mlp")) == PartitionSpec(
        "expert", None, "model"
    )


def test_shard_params_and_batch_keep_values():
    model = MLP(features=(16, 16))
    x = np.random.default_rng(0).normal(size=(16, 40)).astype(np.float32)
    params = model.init(jax.random.key(0), x)["params"]
    mesh = sharding.make_mesh(data=4, model=2)
    placed = sharding.shard_params(params, mesh)
    kernel = placed["Dense_0"]["kernel"]
    assert kernel.sharding.spec == PartitionSpec(None, "model")
    batch = sharding.shard_batch({"x": x}, mesh)
    out = jax.jit(model.apply)({"params": placed}, batch["x"])
    expected = model.apply({"params": nn.unbox(params)}, x)
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="divide over 4"):
        sharding.shard_batch({"x": x[:6]}, mesh)
