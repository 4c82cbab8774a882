"""Dataset access: prepare on first use, read with ``tfds.data_source``, batch with numpy.

``load`` returns a :class:`Loader`: deterministic batches (a fresh shuffle per epoch drawn from
``seed`` and the epoch number), resumable at any global step, optionally placed on a mesh.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import pathlib
from collections.abc import Iterator
from collections.abc import Mapping
from typing import Any

import numpy as np

# Local datasets efflax generates itself, and the standard TFDS datasets it can read when the
# user already prepared them (they cannot be downloaded here).
LOCAL_DATASETS = ("mnist1d", "stdlib_text")
TFDS_DATASETS = ("mnist", "cifar10", "tiny_shakespeare")
AVAILABLE = LOCAL_DATASETS + TFDS_DATASETS

_CACHE: dict[tuple, dict[str, np.ndarray]] = {}


def data_dir() -> pathlib.Path:
    """``$EFFLAX_DATA_DIR``, default ``~/.cache/efflax``."""
    return pathlib.Path(os.environ.get("EFFLAX_DATA_DIR", "~/.cache/efflax")).expanduser()


def _check_name(name: str) -> None:
    if name not in AVAILABLE:
        raise ValueError(f"unknown dataset {name!r}; available: {', '.join(AVAILABLE)}")


@contextlib.contextmanager
def _lock(path: pathlib.Path):
    """An exclusive file lock, so parallel processes prepare a dataset once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _local_builder(name: str, builder_kwargs: Mapping[str, Any]):
    from efflax._src.data import builders  # imports TFDS: only when a dataset is used

    kwargs = dict(builder_kwargs)
    if name == "mnist1d":
        config = builders.Mnist1d.config_for(kwargs.pop("num_samples", None))
        cls = builders.Mnist1d
    else:
        config = builders.StdlibText.config_for(kwargs.pop("seq_len", None))
        cls = builders.StdlibText
    if kwargs:
        raise ValueError(f"unknown option(s) {sorted(kwargs)} for dataset {name!r}")
    root = data_dir()
    builder = cls(config=config, data_dir=str(root), file_format="array_record")
    with _lock(root / f".{name}-{config.name}.lock"):
        if not builder.is_prepared():
            print(f"efflax: preparing {name}/{config.name} in {root} (first use)", flush=True)
            builder.download_and_prepare()
    return builder


def data_source(name: str, split: str, **builder_kwargs):
    """The random-access ``tfds`` data source of a split (prepared on first use).

    Raises:
      ValueError: unknown dataset, split or option; or a standard TFDS dataset that is not
        prepared in the user's TFDS data dir (it cannot be downloaded here).
    """
    import tensorflow_datasets as tfds

    _check_name(name)
    if name in LOCAL_DATASETS:
        builder = _local_builder(name, builder_kwargs)
        sources = builder.as_data_source()
    else:
        if builder_kwargs:
            raise ValueError(f"dataset {name!r} takes no options, got {sorted(builder_kwargs)}")
        tfds_dir = os.environ.get("TFDS_DATA_DIR") or str(
            pathlib.Path("~/tensorflow_datasets").expanduser()
        )
        try:
            builder = tfds.builder(name, data_dir=tfds_dir, file_format="array_record")
            prepared = builder.is_prepared()
        except Exception as e:  # noqa: BLE001 - TFDS raises several types here
            prepared, builder = False, e
        if not prepared:
            raise ValueError(
                f"dataset {name!r} is not prepared in the TFDS data dir {tfds_dir!r} and cannot "
                f"be downloaded here. Prepare it on a machine with network access with "
                f"`tfds build {name} --file_format=array_record --data_dir DIR` and set "
                f"TFDS_DATA_DIR=DIR, or use one of the local datasets {LOCAL_DATASETS}."
            )
        sources = builder.as_data_source()
    if split not in sources:
        raise ValueError(f"unknown split {split!r} for {name!r}; available: {sorted(sources)}")
    return sources[split]


def load_arrays(name: str, split: str, **builder_kwargs) -> dict[str, np.ndarray]:
    """A whole split as numpy arrays, row ``i`` being the example with ``index == i``.

    Every dataset gets an int32 ``index`` (per-example identity, used by SAF).
    Results are cached in memory per process; do not modify them in place.
    """
    key = (name, split, tuple(sorted(builder_kwargs.items())), str(data_dir()))
    if key not in _CACHE:
        source = data_source(name, split, **builder_kwargs)
        records = source.__getitems__(list(range(len(source))))
        arrays = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
        if "index" in arrays:
            order = np.argsort(arrays["index"], kind="stable")
            arrays = {k: v[order] for k, v in arrays.items()}
        else:
            arrays["index"] = np.arange(len(source), dtype=np.int32)
        for k, v in arrays.items():
            if v.dtype == np.int64:
                arrays[k] = v.astype(np.int32)
        _CACHE[key] = arrays
    return _CACHE[key]


class Loader:
    """Deterministic, resumable batches over in-memory arrays.

    Epoch ``e`` visits the examples in ``np.random.default_rng((seed, e)).permutation``
    order, so any global step can be reproduced without replaying the ones before it.

    Attributes:
      steps_per_epoch: batches per epoch.
      num_examples: examples in the split.
      num_steps: batches over all epochs (``len(loader)``).
    """

    def __init__(
        self,
        arrays: Mapping[str, np.ndarray],
        batch_size: int,
        *,
        seed: int = 0,
        epochs: int | None = 1,
        drop_remainder: bool = True,
        shuffle: bool = True,
        mesh=None,
    ):
        sizes = {k: len(v) for k, v in arrays.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"arrays have different lengths: {sizes}")
        self.arrays = dict(arrays)
        self.num_examples = next(iter(sizes.values()))
        if batch_size < 1 or (drop_remainder and batch_size > self.num_examples):
            raise ValueError(
                f"batch_size={batch_size} must be in [1, {self.num_examples}] "
                f"(examples in the split)"
            )
        if epochs is not None and epochs < 1:
            raise ValueError(f"epochs={epochs} must be >= 1 or None (forever)")
        self.batch_size = batch_size
        self.seed = seed
        self.epochs = epochs
        self.drop_remainder = drop_remainder
        self.shuffle = shuffle
        self.mesh = mesh
        per_epoch = self.num_examples / batch_size
        self.steps_per_epoch = math.floor(per_epoch) if drop_remainder else math.ceil(per_epoch)

    @property
    def num_steps(self) -> int | None:
        return None if self.epochs is None else self.epochs * self.steps_per_epoch

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless loader (epochs=None) has no length")
        return self.num_steps

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the examples."""
        if not self.shuffle:
            return np.arange(self.num_examples)
        return np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)

    def batch_at(self, step: int) -> dict[str, Any]:
        """The batch of global step ``step``."""
        epoch, within = divmod(step, self.steps_per_epoch)
        rows = self.epoch_order(epoch)[within * self.batch_size : (within + 1) * self.batch_size]
        batch = {k: v[rows] for k, v in self.arrays.items()}
        if self.mesh is not None:
            from efflax._src.sharding import shard_batch

            batch = shard_batch(batch, self.mesh)
        return batch

    def iter_from(self, step: int = 0) -> Iterator[dict[str, Any]]:
        """Batches from global step ``step`` to the end (exact resume)."""
        end = self.num_steps
        while end is None or step < end:
            yield self.batch_at(step)
            step += 1

    def __iter__(self) -> Iterator[dict[str, Any]]:
        return self.iter_from(0)


def load(
    name: str,
    split: str,
    batch_size: int,
    *,
    seed: int = 0,
    epochs: int | None = 1,
    drop_remainder: bool = True,
    shuffle: bool = True,
    mesh=None,
    **builder_kwargs,
) -> Loader:
    """Batches of a dataset split as numpy dicts (or sharded ``jax.Array`` with ``mesh``).

    Args:
      name: one of ``efflax.data.AVAILABLE`` (``mnist1d``, ``stdlib_text`` are generated locally;
        ``mnist``, ``cifar10``, ``tiny_shakespeare`` are read if already prepared).
      split: e.g. ``'train'``, ``'test'`` (``'validation'`` for ``stdlib_text``).
      batch_size: examples per batch (the global batch when ``mesh`` is given).
      seed: shuffling seed; epoch ``e`` uses a permutation drawn from ``(seed, e)``.
      epochs: passes over the data; ``None`` repeats forever.
      drop_remainder: drop the last partial batch of each epoch.
      shuffle: shuffle per epoch (set False for evaluation).
      mesh: if given, each batch is split over the mesh's data axes.
      **builder_kwargs: dataset options (``num_samples`` for mnist1d, ``seq_len`` for stdlib_text).

    Example:
      >>> loader = efflax.data.load("mnist1d", "train", batch_size=100, epochs=2)
      >>> batch = next(iter(loader))  # {'x': [100, 40] float32, 'y': [100], 'index': [100]}
    """
    arrays = load_arrays(name, split, **builder_kwargs)
    return Loader(
        arrays,
        batch_size,
        seed=seed,
        epochs=epochs,
        drop_remainder=drop_remainder,
        shuffle=shuffle,
        mesh=mesh,
    )
