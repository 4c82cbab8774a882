import pathlib

import numpy as np
import pytest

from efflax import data


def test_mnist1d_is_deterministic_and_indexed(fresh_data_dir):
    train = data.load_arrays("mnist1d", "train")
    test = data.load_arrays("mnist1d", "test")
    assert train["x"].shape == (4000, 40) and train["x"].dtype == np.float32
    assert test["x"].shape == (1000, 40)
    np.testing.assert_array_equal(train["index"], np.arange(4000))
    assert set(np.unique(train["y"])) == set(range(10))
    # The records are what the mnist1d package's procedure generates (same seed, same split).
    from mnist1d.data import get_dataset_args
    from mnist1d.data import make_dataset

    reference = make_dataset(get_dataset_args())
    np.testing.assert_allclose(train["x"], reference["x"].astype(np.float32))
    np.testing.assert_array_equal(test["y"], reference["y_test"])
    assert (fresh_data_dir / "mnist1d").is_dir()
    assert list((fresh_data_dir / "mnist1d").rglob("*.array_record*"))


def test_mnist1d_size_option(fresh_data_dir):
    big = data.load_arrays("mnist1d", "train", num_samples=600)
    assert big["x"].shape == (480, 40)
    np.testing.assert_array_equal(big["index"], np.arange(480))


def test_stdlib_text_split_by_file_and_bytes(fresh_data_dir):
    from efflax._src.data.builders import stdlib_source_files
    from efflax._src.data.builders import stdlib_split_of

    splits = {s: data.load_arrays("stdlib_text", s, seq_len=64) for s in ("train", "validation")}
    assert splits["train"]["tokens"].shape[1] == 65
    assert splits["train"]["tokens"].dtype == np.uint8
    assert len(splits["train"]["tokens"]) > 10 * len(splits["validation"]["tokens"])
    # The split is a pure function of the path, so it is the same on every machine.
    assert stdlib_split_of("json/decoder.py") == stdlib_split_of("json/decoder.py")
    names = [stdlib_split_of(str(p)) for p in stdlib_source_files()[:200]]
    assert {"train", "validation", "test"} >= set(names)
    text = bytes(splits["train"]["tokens"][:50].reshape(-1)).decode("utf-8", errors="replace")
    assert "def " in text or "import " in text


def test_unknown_names_list_the_available_ones():
    with pytest.raises(ValueError, match="mnist1d"):
        data.load("imagenet22k", "train", 8)
    with pytest.raises(ValueError, match="split"):
        data.load_arrays("mnist1d", "validation")
    with pytest.raises(ValueError, match="colour"):
        data.load_arrays("mnist1d", "train", colour=3)


def test_standard_tfds_dataset_not_prepared_says_how(tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(ValueError, match="tfds build mnist"):
        data.load_arrays("mnist", "train")


def _fake_arrays(n=10):
    return {"x": np.arange(n, dtype=np.float32)[:, None], "index": np.arange(n, dtype=np.int32)}


def test_loader_epochs_cover_all_examples_with_fresh_shuffles():
    loader = data.Loader(_fake_arrays(10), 5, seed=3, epochs=3)
    assert loader.steps_per_epoch == 2 and len(loader) == 6
    batches = list(loader)
    epochs = [np.concatenate([b["index"] for b in batches[i : i + 2]]) for i in (0, 2, 4)]
    for order in epochs:
        np.testing.assert_array_equal(np.sort(order), np.arange(10))
    assert not np.array_equal(epochs[0], epochs[1])
    again = list(data.Loader(_fake_arrays(10), 5, seed=3, epochs=3))
    for a, b in zip(batches, again, strict=True):
        np.testing.assert_array_equal(a["index"], b["index"])
    other_seed = list(data.Loader(_fake_arrays(10), 5, seed=4, epochs=1))
    assert not np.array_equal(other_seed[0]["index"], batches[0]["index"])


def test_loader_resumes_at_any_step_and_handles_remainders():
    loader = data.Loader(_fake_arrays(10), 4, seed=0, epochs=2)
    assert loader.steps_per_epoch == 2  # the partial batch is dropped
    full = list(loader)
    resumed = list(loader.iter_from(3))
    assert len(resumed) == 1
    np.testing.assert_array_equal(resumed[0]["x"], full[3]["x"])
    keep = data.Loader(_fake_arrays(10), 4, epochs=1, drop_remainder=False, shuffle=False)
    assert [len(b["index"]) for b in keep] == [4, 4, 2]
    with pytest.raises(ValueError, match="batch_size=11"):
        data.Loader(_fake_arrays(10), 11)
    with pytest.raises(ValueError, match="epochs=0"):
        data.Loader(_fake_arrays(10), 2, epochs=0)


def test_load_shards_batches_over_the_data_axis():
    import jax

    from efflax.sharding import make_mesh

    mesh = make_mesh(data=8)
    loader = data.load("mnist1d", "train", batch_size=64, mesh=mesh)
    batch = next(iter(loader))
    assert isinstance(batch["x"], jax.Array)
    assert len(batch["x"].sharding.device_set) == 8
    assert batch["x"].addressable_shards[0].data.shape == (8, 40)
    host = next(iter(data.load("mnist1d", "train", batch_size=64)))
    np.testing.assert_array_equal(np.asarray(batch["index"]), host["index"])


def test_two_processes_preparing_a_dataset_for_the_first_time(tmp_path):
    """Like `pytest -n 2` on an empty $EFFLAX_DATA_DIR: both processes start at once, one
    prepares under the lock, the other waits and then reads the prepared splits."""
    import os
    import sys

    from efflax import distributed

    script = tmp_path / "prepare.py"
    script.write_text(
        "import sys\n"
        "from efflax import data\n"
        "x = data.load_arrays('mnist1d', 'train', num_samples=200)['x']\n"
        "print('rows', len(x), float(x.sum()))\n"
    )
    root = pathlib.Path(__file__).parent.parent.parent
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["EFFLAX_DATA_DIR"] = str(tmp_path / "data")
    env["PYTHONPATH"] = os.pathsep.join([str(root), env.get("PYTHONPATH", "")])
    logs = [open(tmp_path / f"log{i}.txt", "w") for i in range(2)]  # noqa: SIM115
    try:
        codes = distributed.launch(
            [sys.executable, str(script)],
            num_processes=2,
            timeout=90,
            env=env,
            output=lambda i: logs[i],
        )
    finally:
        for log in logs:
            log.close()
    texts = [(tmp_path / f"log{i}.txt").read_text() for i in range(2)]
    assert codes == [0, 0], "\n".join(t[-2000:] for t in texts)
    rows = [line for t in texts for line in t.splitlines() if line.startswith("rows")]
    assert len(rows) == 2 and rows[0] == rows[1] and rows[0].startswith("rows 160 ")
    assert sum("efflax: preparing" in t for t in texts) == 1


def test_loader_refuses_steps_outside_the_run():
    loader = data.Loader(_fake_arrays(10), 5, epochs=1)
    with pytest.raises(ValueError, match="step=-1"):
        loader.batch_at(-1)
    with pytest.raises(ValueError, match="step=1000 is past the end of the loader: it has 2"):
        loader.batch_at(1000)
    with pytest.raises(ValueError, match="step=2 is past the end"):
        loader.batch_at(2)
    assert list(loader.iter_from(2)) == []  # resuming at the end yields nothing
    with pytest.raises(ValueError, match="step=3"):
        next(loader.iter_from(3))
    endless = data.Loader(_fake_arrays(10), 5, epochs=None)
    np.testing.assert_array_equal(
        np.sort(endless.batch_at(1000)["index"]), np.sort(endless.batch_at(1000)["index"])
    )
    with pytest.raises(ValueError, match="seed=-1"):
        data.Loader(_fake_arrays(10), 5, seed=-1)
    with pytest.raises(ValueError, match="batch_size=0"):
        data.Loader(_fake_arrays(10), 0)
    with pytest.raises(ValueError, match="one leading length"):
        data.Loader({"x": np.zeros(3), "y": np.zeros(4)}, 1)
    with pytest.raises(ValueError, match="source must be"):
        data.Loader(42, 1)


def test_loader_on_a_mesh_checks_the_batch_when_built():
    from efflax.sharding import make_mesh

    mesh = make_mesh(data=8)
    with pytest.raises(ValueError, match="batch_size=12 must divide over the mesh's 8"):
        data.Loader(_fake_arrays(40), 12, mesh=mesh)
    with pytest.raises(ValueError, match="last partial batch has 4 examples"):
        data.Loader(_fake_arrays(20), 16, mesh=mesh, drop_remainder=False)


def test_streaming_from_the_files_gives_the_in_memory_batches():
    import jax

    from efflax.sharding import make_mesh

    memory = data.load("mnist1d", "train", 64, seed=2, epochs=2, in_memory=True)
    files = data.load("mnist1d", "train", 64, seed=2, epochs=2, in_memory=False)
    assert files.arrays is None  # nothing materialised
    on_mesh = data.load("mnist1d", "train", 64, seed=2, epochs=2, in_memory=False, mesh=make_mesh())
    for step in (0, 61, len(memory) - 1):
        expected = memory.batch_at(step)
        for got in (files.batch_at(step), jax.device_get(on_mesh.batch_at(step))):
            assert sorted(got) == sorted(expected)
            for key in expected:
                np.testing.assert_array_equal(got[key], expected[key])
                assert got[key].dtype == expected[key].dtype


def test_loader_reads_any_random_access_source():
    records = [{"x": np.full(3, i, np.float32), "label": i % 2} for i in range(12)]
    loader = data.Loader(records, 4, seed=1, epochs=1)
    batch = loader.batch_at(1)
    np.testing.assert_array_equal(batch["x"][:, 0], batch["index"])  # index = position
    assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
    np.testing.assert_array_equal(batch["index"], loader.positions_at(1))
