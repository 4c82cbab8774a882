"""Properties of ``efflax.sharding`` and ``efflax.distributed`` (one process, 8 CPU devices)."""

from __future__ import annotations

import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from _hyp import FEW
from _hyp import INVALID
from _hyp import VALID
from _hyp import bad_ints
from _hyp import normal
from _hyp import props
from _hyp import refused
from _hyp import seeds
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec as P

from efflax import distributed as D
from efflax import sharding as S

NAMES = [name for name, _ in S.LOGICAL_AXIS_RULES]
RULES = dict(S.LOGICAL_AXIS_RULES)
MESH_SHAPES = [(8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 8, 1), (2, 1, 4)]


def _spec64(logical, mesh_axes=S.MESH_AXES):
    """The rule table applied by hand: rules in table order, each mesh axis used at most once,
    a logical name's first position only, mesh axes the mesh lacks dropped."""
    result = ["?"] * len(logical)
    used = set()
    for name, target in S.LOGICAL_AXIS_RULES:
        if name not in logical:
            continue
        position = logical.index(name)
        axes = () if target is None else ((target,) if isinstance(target, str) else tuple(target))
        if result[position] == "?" and not used & set(axes):
            result[position] = target
            used |= set(axes)
    spec = []
    for entry in result:
        axes = () if entry in ("?", None) else ((entry,) if isinstance(entry, str) else entry)
        kept = tuple(a for a in axes if a in mesh_axes)
        spec.append(None if not kept else (kept[0] if len(kept) == 1 else kept))
    return P(*spec)


@props(25)
@given(
    st.lists(st.sampled_from(NAMES), max_size=4, unique=True).flatmap(
        lambda names: st.permutations([*names, None, None])
    ),
    st.booleans(),
)
def test_logical_to_mesh_spec_follows_the_table(logical, lacks_model):
    mesh = jax.make_mesh((8,), ("data",)) if lacks_model else None
    got = S.logical_to_mesh_spec(tuple(logical), mesh=mesh)
    want = _spec64(tuple(logical), ("data",) if lacks_model else S.MESH_AXES)
    assert tuple(got) == tuple(want)


@VALID
@given(st.sampled_from(MESH_SHAPES))
def test_make_mesh_lays_devices_out_in_order(shape):
    data, expert, model = shape
    mesh = S.make_mesh(data=data, expert=expert, model=model)
    assert mesh.axis_names == S.MESH_AXES and mesh.devices.shape == shape
    assert [d.id for d in mesh.devices.flat] == [
        d.id for d in jax.devices()[: data * expert * model]
    ]
    assert S.batch_axes(mesh) == ("data", "expert")
    assert S.auto_axes(mesh) == mesh
    assert S.replicated(mesh).spec == P()


@FEW
@given(st.sampled_from(MESH_SHAPES), seeds, st.integers(1, 3))
def test_shard_batch_splits_rows_and_keeps_values(shape, seed, ndim):
    mesh = S.make_mesh(data=shape[0], expert=shape[1], model=shape[2])
    ways = shape[0] * shape[1]
    x = normal(seed, (2 * ways, *([3] * (ndim - 1))))
    out = S.shard_batch({"x": x}, mesh)["x"]
    np.testing.assert_array_equal(np.asarray(out), x)
    assert out.sharding.spec == S.data_sharding(mesh, ndim).spec
    assert out.sharding.spec[0] == ("data", "expert")
    # Each device holds the rows of its position along (data, expert).
    for shard in out.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])


@FEW
@given(st.sampled_from(MESH_SHAPES), seeds)
def test_shard_params_follows_the_logical_names(shape, seed):
    mesh = S.make_mesh(data=shape[0], expert=shape[1], model=shape[2])
    w = normal(seed, (8, 8))
    params = {"dense": nn.LogicallyPartitioned(jnp.asarray(w), ("embed", "mlp")), "b": jnp.ones(8)}
    placed = S.shard_params(params, mesh)
    np.testing.assert_array_equal(np.asarray(placed["dense"]), w)
    assert placed["dense"].sharding.spec == _spec64(("embed", "mlp"))
    assert placed["b"].sharding.spec == P()
    specs = S.params_shardings(params, mesh)
    assert specs["dense"].spec == placed["dense"].sharding.spec


@FEW
@given(seeds)
def test_shard_map_sums_over_the_mesh(seed):
    mesh = S.make_mesh()
    x = normal(seed, (8, 3))
    total = S.shard_map(
        lambda block: jax.lax.psum(block.sum(0), "data"), mesh=mesh, in_specs=(P("data"),),
        out_specs=P(),
    )(jnp.asarray(x))  # fmt: skip
    np.testing.assert_allclose(np.asarray(total), x.astype(np.float64).sum(0), rtol=1e-5)


@INVALID
@given(st.data())
def test_sharding_refuses(data):
    mesh = S.make_mesh()
    case = data.draw(
        st.sampled_from(
            ["axis_size", "too_many", "devices", "dcn", "logical", "logical_str", "mesh", "ndim",
             "rows", "rules", "batch_axes"]
        )
    )  # fmt: skip
    if case == "axis_size":
        arg = data.draw(st.sampled_from(["data", "expert", "model"]))
        refused(
            lambda: S.make_mesh(**{arg: data.draw(bad_ints().filter(lambda v: v is not None))}), arg
        )
    elif case == "too_many":
        refused(lambda: S.make_mesh(data=16), "devices")
    elif case == "devices":
        refused(lambda: S.make_mesh(devices=[]), "devices")
    elif case == "dcn":
        refused(lambda: S.make_mesh(dcn=(2, 1, 1)), "dcn")
    elif case == "logical":
        bad = data.draw(st.sampled_from(["embedd", "Batch", "", 1]))
        refused(lambda: S.logical_to_mesh_spec((bad,)), repr(bad))
    elif case == "logical_str":
        bad = data.draw(st.sampled_from(["embed", ("mlp", "mlp"), ("batch", None, "batch")]))
        refused(lambda: S.logical_to_mesh_spec(bad), "logical")
    elif case == "mesh":
        fn = data.draw(
            st.sampled_from(
                [S.replicated, S.batch_axes, S.auto_axes, S.data_sharding,
                 lambda m: S.shard_batch({"x": np.ones(8)}, m),
                 lambda m: S.logical_to_mesh_spec(("embed",), mesh=m)]
            )
        )  # fmt: skip
        bad = data.draw(st.sampled_from(["mesh", None, 8, jax.devices()]))
        refused(lambda: fn(bad), "mesh")
    elif case == "ndim":
        refused(lambda: S.data_sharding(mesh, data.draw(bad_ints())), "ndim")
    elif case == "rows":
        bad = data.draw(st.sampled_from([np.ones((5, 2)), np.float32(1), np.ones((0,))]))
        if bad.ndim and bad.shape[0] == 0:
            bad = np.ones((12, 2))
        refused(lambda: S.shard_batch({"x": bad}, mesh), "batch")
    elif case == "rules":
        bad = data.draw(st.sampled_from(["x", [("embed",)], [(1, "model")], [("embed", 3)]]))
        boxed = {"w": nn.LogicallyPartitioned(jnp.ones((8, 8)), ("embed", "mlp"))}
        refused(lambda: S.params_shardings(boxed, mesh, rules=bad), "rules")
    else:
        refused(lambda: S.batch_axes(jax.make_mesh((8,), ("model",))), "data")


# --------------------------------------------------------------------------- efflax.distributed


@VALID
@given(st.sampled_from(MESH_SHAPES), st.integers(1, 4), seeds)
def test_one_process_holds_every_row(shape, multiple, seed):
    mesh = S.make_mesh(data=shape[0], expert=shape[1], model=shape[2])
    n = shape[0] * shape[1] * multiple
    np.testing.assert_array_equal(D.process_local_rows(S.data_sharding(mesh), (n,)), np.arange(n))
    x = normal(seed, (n, 2))
    placed = D.put_global({"x": x}, {"x": S.data_sharding(mesh, 2)})["x"]
    np.testing.assert_array_equal(D.to_host(placed), x)
    assert [v.tolist() for v in D.addressable_values(placed)] == [x.tolist()]
    D.agree("test", {"x": x})  # one process: nothing to disagree with
    D.barrier("test")
    assert D.is_primary()
    assert D.initialize() is False  # nothing to join


@props(1)
@given(st.sampled_from([0, 3]))
def test_launch_reports_every_exit_code(code):
    command = [sys.executable, "-c", f"import sys; sys.exit({code})"]
    assert D.launch(command, num_processes=2, timeout=60.0) == [code] * 2


@INVALID
@given(st.data())
def test_distributed_refuses(data):
    mesh = S.make_mesh()
    case = data.draw(
        st.sampled_from(
            ["num_processes", "address", "process_id", "timeouts", "command", "launch_sizes",
             "sharding", "global_shape", "indivisible", "shardings", "values", "host", "value",
             "name"]
        )
    )  # fmt: skip
    if case == "num_processes":
        refused(
            lambda: D.initialize(
                "h:1234", data.draw(bad_ints().filter(lambda v: v is not None)), 0
            ),
            "num_processes",
        )
    elif case == "address":
        bad = data.draw(st.sampled_from(["host", "h:", ":1234", "h:0", "h:99999", "h:port"]))
        refused(lambda: D.initialize(bad, 2, 0), "coordinator_address")
    elif case == "process_id":
        bad = data.draw(st.sampled_from([-1, 2, 5, 1.0, True]))
        refused(lambda: D.initialize("h:1234", 2, bad), "process_id")
    elif case == "timeouts":
        arg = data.draw(
            st.sampled_from(["initialization_timeout", "heartbeat_timeout", "shutdown_timeout"])
        )
        refused(lambda: D.initialize("h:1234", 2, 0, **{arg: data.draw(bad_ints())}), arg)
    elif case == "command":
        bad = data.draw(st.sampled_from([[], "echo hi", ""]))
        refused(lambda: D.launch(bad, num_processes=1), "command")
    elif case == "launch_sizes":
        arg = data.draw(st.sampled_from(["num_processes", "cpu_devices", "timeout"]))
        kwargs = dict(num_processes=1)
        kwargs[arg] = data.draw(st.sampled_from([0, -1, True, "2"]))
        refused(lambda: D.launch(["true"], **kwargs), arg)
    elif case == "sharding":
        refused(
            lambda: D.process_local_rows(data.draw(st.sampled_from(["x", None, mesh])), (8,)),
            "sharding",
        )
    elif case == "global_shape":
        bad = data.draw(st.sampled_from([(), (-1,), 8, ("8",), (2.5,)]))
        refused(lambda: D.process_local_rows(S.data_sharding(mesh), bad), "global_shape")
    elif case == "indivisible":
        refused(lambda: D.process_local_rows(S.data_sharding(mesh), (5,)), "global_shape")
    elif case == "shardings":
        bad = data.draw(st.sampled_from(["x", {"a": "x"}, {"b": S.replicated(mesh)}]))
        refused(lambda: D.put_global({"a": np.ones(8)}, bad), "shardings")
    elif case == "values":
        refused(lambda: D.agree("x", data.draw(st.sampled_from([5, [1, 2], "abc"]))), "values")
    elif case == "host":
        refused(
            lambda: D.free_port(data.draw(st.sampled_from(["not a host", "256.1.1.1", 5]))), "host"
        )
    elif case == "value":
        refused(lambda: D.to_host({"a": 1}), "value")
    else:
        refused(lambda: D.barrier(data.draw(st.sampled_from([5, None, b"x"]))), "name")
