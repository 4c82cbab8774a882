import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from jax.sharding import NamedSharding
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


def test_a_misspelt_logical_axis_raises():
    with pytest.raises(ValueError, match="logical axis 'embd' is not in the logical-axis table"):
        sharding.logical_to_mesh_spec(("batch", "embd"))
    with pytest.raises(ValueError, match="tuple of names"):
        sharding.logical_to_mesh_spec("embed")
    custom = sharding.LOGICAL_AXIS_RULES + (("hidden", "model"),)
    assert sharding.logical_to_mesh_spec(("hidden",), rules=custom) == PartitionSpec("model")
    boxed = {"w": nn.LogicallyPartitioned(np.ones((4, 4)), ("embed", "hiden"))}
    with pytest.raises(ValueError, match="'hiden'"):
        sharding.shard_params(boxed, sharding.make_mesh())


def test_meshes_from_jax_make_mesh_train_like_efflax_meshes():
    """`jax.make_mesh` gives Explicit axes (JAX >= 0.10); shard_params, the Loader and the train
    step must treat it like the equivalent efflax mesh (same numbers), as must a mesh that lacks
    some of the axes (here 'expert')."""
    import optax

    from efflax import data
    from efflax.training import TrainState
    from efflax.training import cross_entropy_loss_fn
    from efflax.training import make_train_step

    model = MLP(features=(16, 16))
    params = jax.jit(model.init)(jax.random.key(0), np.zeros((1, 40), np.float32))["params"]
    arrays = data.load_arrays("mnist1d", "test")
    step = make_train_step(cross_entropy_loss_fn(), donate=False)
    results = []
    for mesh in (sharding.make_mesh(data=4, model=2), jax.make_mesh((4, 2), ("data", "model"))):
        state = TrainState.create(
            apply_fn=model.apply,
            params=sharding.shard_params(params, mesh),
            tx=optax.sgd(0.1),
            rng=jax.random.key(1),
        )
        for batch in data.Loader(arrays, 32, epochs=1, mesh=mesh).iter_from(28):
            state, metrics = step(state, batch)
        assert state.params["Dense_0"]["kernel"].sharding.spec == PartitionSpec(None, "model")
        results.append((state.params, metrics))
    assert jax.make_mesh((4, 2), ("data", "model")).axis_types[0] == jax.sharding.AxisType.Explicit
    np.testing.assert_allclose(results[0][1]["loss"], results[1][1]["loss"], rtol=1e-6)
    for a, b in zip(jax.tree.leaves(results[0][0]), jax.tree.leaves(results[1][0]), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_arrays_on_an_explicit_mesh_next_to_efflax_ones_get_a_clear_error():
    import optax

    from efflax.training import TrainState
    from efflax.training import make_train_step

    explicit = jax.make_mesh((8,), ("data",))
    mine = jax.device_put(
        {"w": np.ones((3,), np.float32)}, NamedSharding(explicit, PartitionSpec())
    )
    state = TrainState.create(apply_fn=None, params=mine, tx=optax.sgd(0.1), rng=jax.random.key(0))
    batch = sharding.shard_batch({"x": np.ones((8, 3), np.float32)}, explicit)  # Auto version
    step = make_train_step(lambda p, s, b, r: jnp.sum(b["x"] @ p["w"]), donate=False)
    with pytest.raises(ValueError, match="two versions of one mesh.*shard_params"):
        step(state, batch)


def test_meshes_refuse_axes_the_table_does_not_use():
    odd = jax.make_mesh((2, 4), ("data", "pipeline"))
    with pytest.raises(ValueError, match="mesh axis 'pipeline'"):
        sharding.data_sharding(odd)
    with pytest.raises(ValueError, match="none of the batch axes"):
        sharding.data_sharding(jax.make_mesh((8,), ("model",)))
    with pytest.raises(ValueError, match="dcn=\\(2, 1, 1\\) needs devices of several processes"):
        sharding.make_mesh(dcn=(2, 1, 1))
    with pytest.raises(ValueError, match="model=0"):
        sharding.make_mesh(model=0)


def test_shard_map_runs_an_explicit_mesh_as_its_auto_twin():
    """The one compat shard_map (MoE and ProxSkip use it) takes a `jax.make_mesh` mesh."""
    mesh = jax.make_mesh((2, 4), ("data", "expert"))
    x = np.arange(32.0, dtype=np.float32).reshape(8, 4)
    fn = sharding.shard_map(
        lambda a: a * (1 + jax.lax.axis_index("expert")),
        mesh=mesh,
        in_specs=PartitionSpec(("data", "expert")),
        out_specs=PartitionSpec(("data", "expert")),
    )
    expected = x * np.tile(np.arange(1, 5), 2)[:, None]
    np.testing.assert_array_equal(jax.jit(fn)(x), expected)
    assert sharding.auto_axes(mesh).axis_types == (jax.sharding.AxisType.Auto,) * 2


# --- bad inputs: a ValueError naming the argument ------------------------------------------------
def _boxed(shape, names):
    return nn.LogicallyPartitioned(jnp.ones(shape), names)


BAD_SHARDING = {
    "make_mesh devices ints": (lambda: sharding.make_mesh(devices=[0, 1]), r"devices\[0\]"),
    "make_mesh devices one": (lambda: sharding.make_mesh(devices=jax.devices()[0]), r"devices"),
    "make_mesh devices str": (lambda: sharding.make_mesh(devices="cpu"), r"devices"),
    "make_mesh devices repeat": (
        lambda: sharding.make_mesh(devices=[jax.devices()[0]] * 2),
        r"devices",
    ),
    "make_mesh devices empty": (lambda: sharding.make_mesh(devices=[]), r"devices"),
    "make_mesh data float": (lambda: sharding.make_mesh(data=2.0), r"data"),
    "make_mesh expert 0": (lambda: sharding.make_mesh(expert=0), r"expert"),
    "make_mesh model bool": (lambda: sharding.make_mesh(model=True), r"model"),
    "make_mesh too many": (lambda: sharding.make_mesh(data=16), r"devices"),
    "make_mesh dcn int": (lambda: sharding.make_mesh(dcn=2), r"dcn"),
    "make_mesh dcn one process": (lambda: sharding.make_mesh(dcn=(2, 1, 1)), r"dcn"),
    "make_mesh dcn floats": (lambda: sharding.make_mesh(dcn=(1.0, 1, 1)), r"dcn"),
    "logical int": (lambda: sharding.logical_to_mesh_spec(3), r"logical"),
    "logical str": (lambda: sharding.logical_to_mesh_spec("embed"), r"logical"),
    "logical entry int": (lambda: sharding.logical_to_mesh_spec(("embed", 3)), r"logical"),
    "logical unknown": (lambda: sharding.logical_to_mesh_spec(("embd",)), r"embd"),
    "logical twice": (lambda: sharding.logical_to_mesh_spec(("mlp", "mlp")), r"logical"),
    "logical rules": (lambda: sharding.logical_to_mesh_spec(("mlp",), rules="x"), r"rules"),
    "logical mesh": (lambda: sharding.logical_to_mesh_spec(("mlp",), mesh="m"), r"mesh"),
    "data_sharding ndim": (lambda: sharding.data_sharding(sharding.make_mesh(), 0), r"ndim"),
    "data_sharding mesh": (lambda: sharding.data_sharding(None), r"mesh"),
    "replicated mesh": (lambda: sharding.replicated([1]), r"mesh"),
    "batch_axes mesh": (lambda: sharding.batch_axes("m"), r"mesh"),
    "auto_axes mesh": (lambda: sharding.auto_axes(None), r"mesh"),
    "shard_params indivisible": (
        lambda: sharding.shard_params(
            {"w": _boxed((3, 6), ("embed", "mlp"))}, sharding.make_mesh(model=4)
        ),
        r"params\['w'\].*\(3, 6\)",
    ),
    "shard_params names rank": (
        lambda: sharding.shard_params(
            {"w": _boxed((8,), ("embed", "mlp"))}, sharding.make_mesh(model=4)
        ),
        r"params\['w'\]",
    ),
    "shard_params unknown name": (
        lambda: sharding.shard_params({"w": _boxed((8,), ("mpl",))}, sharding.make_mesh(model=4)),
        r"mpl",
    ),
    "shard_params str leaf": (
        lambda: sharding.shard_params({"w": "abc"}, sharding.make_mesh()),
        r"params\['w'\]",
    ),
    "shard_params mesh": (lambda: sharding.shard_params({"w": jnp.ones(2)}, "mesh"), r"mesh"),
    "shard_batch indivisible": (
        lambda: sharding.shard_batch({"x": np.ones((3, 2))}, sharding.make_mesh()),
        r"batch\['x'\]",
    ),
    "shard_batch scalar": (
        lambda: sharding.shard_batch({"x": 1.0}, sharding.make_mesh()),
        r"batch\['x'\]",
    ),
    "params_shardings mesh": (lambda: sharding.params_shardings({}, 3), r"mesh"),
}


@pytest.mark.parametrize("name", sorted(BAD_SHARDING))
def test_bad_call_is_refused_naming_the_argument(name):
    call, pattern = BAD_SHARDING[name]
    with pytest.raises(ValueError, match=pattern):
        call()
