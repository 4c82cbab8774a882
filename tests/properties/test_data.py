"""Properties of ``efflax.data``: the Loader's order, resumption and refusals; dataset options."""

from __future__ import annotations

import math

import numpy as np
from _hyp import INVALID
from _hyp import bad_ints
from _hyp import props
from _hyp import refused
from hypothesis import given
from hypothesis import strategies as st

from efflax import data as D
from efflax import sharding as S
from efflax.data import builders as B

FAST = props(20)  # numpy only


@st.composite
def loaders(draw):
    n = draw(st.integers(1, 30))
    return dict(
        n=n,
        batch_size=draw(st.integers(1, n)),
        epochs=draw(st.integers(1, 3)),
        drop_remainder=draw(st.booleans()),
        shuffle=draw(st.booleans()),
        seed=draw(st.integers(0, 2**16)),
    )


def _arrays(n):
    return {"x": np.arange(n, dtype=np.float32)[:, None] * 10, "y": np.arange(n, dtype=np.int32)}


@FAST
@given(loaders(), st.booleans())
def test_loader_visits_each_epoch_in_its_documented_order(config, records):
    n, batch, epochs = config["n"], config["batch_size"], config["epochs"]
    arrays = _arrays(n)
    source = [{k: v[i] for k, v in arrays.items()} for i in range(n)] if records else arrays
    kwargs = {k: config[k] for k in ("epochs", "drop_remainder", "shuffle", "seed")}
    loader = D.Loader(source, batch, **kwargs)
    per_epoch = math.floor(n / batch) if config["drop_remainder"] else math.ceil(n / batch)
    assert loader.steps_per_epoch == per_epoch and len(loader) == epochs * per_epoch
    batches = list(loader)
    assert len(batches) == len(loader)
    for epoch in range(epochs):
        order = (
            np.random.default_rng((config["seed"], epoch)).permutation(n)
            if config["shuffle"]
            else np.arange(n)
        )
        np.testing.assert_array_equal(loader.epoch_order(epoch), order)
        seen = np.concatenate(
            [b["y"] for b in batches[epoch * per_epoch : (epoch + 1) * per_epoch]]
        )
        want = order[: per_epoch * batch] if config["drop_remainder"] else order
        np.testing.assert_array_equal(seen, want)
    for b in batches:
        np.testing.assert_array_equal(b["x"][:, 0], b["y"] * 10)  # rows stay together
    # Resuming at any step gives the same batches as running from the start.
    start = len(loader) // 2
    resumed = list(loader.iter_from(start))
    assert len(resumed) == len(loader) - start
    for a, b in zip(resumed, batches[start:], strict=True):
        np.testing.assert_array_equal(a["y"], b["y"])


@props(3)
@given(st.integers(0, 100), st.sampled_from([(8, 1, 1), (4, 2, 1), (2, 2, 2)]))
def test_loader_on_a_mesh_gives_the_same_batches(seed, shape):
    mesh = S.make_mesh(data=shape[0], expert=shape[1], model=shape[2])
    arrays = _arrays(24)
    plain = D.Loader(arrays, 8, seed=seed)
    placed = D.Loader(arrays, 8, seed=seed, mesh=mesh)
    for step in range(len(plain)):
        batch = placed.batch_at(step)
        np.testing.assert_array_equal(np.asarray(batch["y"]), plain.batch_at(step)["y"])
        assert batch["y"].sharding.spec[0] == ("data", "expert")


@INVALID
@given(st.data())
def test_loader_refuses(data):
    arrays = _arrays(10)
    loader = D.Loader(arrays, 2, epochs=1)
    case = data.draw(
        st.sampled_from(
            ["source", "lengths", "batch_size", "too_big", "seed", "epochs", "flags", "step",
             "past_end", "epoch", "mesh", "mesh_batch"]
        )
    )  # fmt: skip
    if case == "source":
        bad = data.draw(st.sampled_from([{}, np.arange(4), "abcd", 5, [1, 2, 3], None]))
        refused(lambda: D.Loader(bad, 1).batch_at(0), "source", "arrays")
    elif case == "lengths":
        bad = data.draw(st.sampled_from([{"x": np.ones(4), "y": np.ones(5)}, {"x": np.float32(1)}]))
        refused(lambda: D.Loader(bad, 1), "length")
    elif case == "batch_size":
        refused(lambda: D.Loader(arrays, data.draw(bad_ints())), "batch_size")
    elif case == "too_big":
        refused(lambda: D.Loader(arrays, 11), "batch_size")
    elif case == "seed":
        refused(lambda: D.Loader(arrays, 2, seed=data.draw(bad_ints(0))), "seed")
    elif case == "epochs":
        refused(
            lambda: D.Loader(
                arrays, 2, epochs=data.draw(bad_ints().filter(lambda v: v is not None))
            ),
            "epochs",
        )
    elif case == "flags":
        arg = data.draw(st.sampled_from(["drop_remainder", "shuffle"]))
        bad = data.draw(st.sampled_from(["no", None, 1, 0]))
        refused(lambda: D.Loader(arrays, 3, **{arg: bad}), arg)
    elif case == "step":
        bad = data.draw(st.sampled_from([-1, 1.0, True, "0", None]))
        fn = data.draw(
            st.sampled_from(
                [loader.batch_at, loader.positions_at, lambda s: next(loader.iter_from(s))]
            )
        )
        refused(lambda: fn(bad), "step")
    elif case == "past_end":
        bad = data.draw(st.integers(5, 10_000))
        refused(lambda: loader.batch_at(bad), "step")
    elif case == "epoch":
        refused(lambda: loader.epoch_order(data.draw(bad_ints(0))), "epoch")
    elif case == "mesh":
        refused(lambda: D.Loader(arrays, 8, mesh=data.draw(st.sampled_from(["mesh", 8]))), "mesh")
    else:
        refused(lambda: D.Loader(_arrays(16), 3, mesh=S.make_mesh()), "batch_size")


@INVALID
@given(st.data())
def test_datasets_refuse(data):
    case = data.draw(st.sampled_from(["name", "num_samples", "seq_len", "path"]))
    if case == "name":
        bad = data.draw(st.sampled_from(["nope", "MNIST1D", "", 5]))
        fn = data.draw(
            st.sampled_from(
                [lambda n: D.load(n, "train", 2), lambda n: D.load_arrays(n, "train"),
                 lambda n: D.data_source(n, "train")]
            )
        )  # fmt: skip
        refused(lambda: fn(bad), repr(bad))
    elif case == "num_samples":
        bad = data.draw(st.sampled_from([9, 0, -5, 2.5, "100", True]))
        refused(lambda: B.Mnist1d.config_for(bad), "num_samples")
    elif case == "seq_len":
        bad = data.draw(st.sampled_from([0, -1, 2.5, "64", True]))
        refused(lambda: B.StdlibText.config_for(bad), "seq_len")
    else:
        refused(
            lambda: B.stdlib_split_of(data.draw(st.sampled_from([5, None, b"x.py"]))),
            "relative_path",
        )


@FAST
@given(st.text(alphabet="abcdefxyz_/.", min_size=1, max_size=30))
def test_stdlib_split_is_a_stable_function_of_the_path(path):
    split = B.stdlib_split_of(path)
    assert split in ("train", "validation", "test") and split == B.stdlib_split_of(path)


@props(1)
@given(st.just(None))
def test_dataset_names_and_directory(_):
    assert set(D.AVAILABLE) >= {"mnist1d", "stdlib_text"}
    assert D.data_dir().is_absolute()
    files = B.stdlib_source_files()
    assert files and all(f.suffix == ".py" for f in files)
