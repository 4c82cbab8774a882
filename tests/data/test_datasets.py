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
