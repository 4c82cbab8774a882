"""Dataset access: prepare on first use, read with ``tfds.data_source``, batch with numpy.

``load`` returns a :class:`Loader`: deterministic batches (a fresh shuffle per epoch drawn from
``seed`` and the epoch number), resumable at any global step, optionally placed on a mesh. On a
mesh that spans several processes (one per host), each process reads only the examples its own
devices hold and the global batch is assembled with ``jax.make_array_from_callback``; nothing
is sent between hosts.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import pathlib
from collections.abc import Iterator
from collections.abc import Mapping
from collections.abc import Sequence
from typing import Any

import numpy as np

from pallas_kernels import _checks

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


def _process_count() -> int:
    import jax

    return jax.process_count()


@contextlib.contextmanager
def _quiet_tfds():
    """Silences TFDS while it generates a local dataset: nothing is downloaded, so its
    "Downloading and preparing dataset ..." line, its progress bars and absl's warning about a
    missing ``dataset_info.json`` (the normal state of a first use) would only mislead."""
    import logging

    from tensorflow_datasets.core.utils import tqdm_utils

    absl_logger = logging.getLogger("absl")
    level, active = absl_logger.level, tqdm_utils._active
    absl_logger.setLevel(logging.ERROR)
    tqdm_utils.display_progress_bar(False)
    try:
        yield
    finally:
        absl_logger.setLevel(level)
        tqdm_utils.display_progress_bar(active)


def _prepared_builder(cls, config, root: pathlib.Path, name: str):
    """The builder, created and (if needed) prepared while holding the dataset's lock.

    The lock is taken before the builder exists: a builder created while another process
    prepares the data reads an incomplete directory and reports no splits.
    """
    with _lock(root / f".{name}-{config.name}.lock"), _quiet_tfds():
        builder = cls(config=config, data_dir=str(root), file_format="array_record")
        if not builder.is_prepared():
            print(
                f"efflax: preparing {name}/{config.name} in {root} "
                "(first use; generated locally, nothing is downloaded) ...",
                end="",
                flush=True,
            )
            # TFDS prints its download banner unconditionally: this builder downloads nothing.
            builder._log_download_bytes = builder._log_download_done = lambda: None
            builder.download_and_prepare()
            print(" done", flush=True)
    return builder


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
    if _process_count() == 1:
        return _prepared_builder(cls, config, root, name)
    # Several processes (hosts): process 0 prepares, the others wait for it, then open the
    # prepared data (or, on a host that does not share process 0's disk, prepare their own
    # copy, deterministic and under the same lock).
    from efflax._src import distributed

    builder = _prepared_builder(cls, config, root, name) if distributed.is_primary() else None
    distributed.barrier(f"efflax-data-{name}-{config.name}")
    return builder or _prepared_builder(cls, config, root, name)


def data_source(name: str, split: str, **builder_kwargs):
    """The random-access ``tfds`` data source of a split (prepared on first use).

    In a multi-process run every process must call it (process 0 prepares the data first).

    Raises:
      ValueError: unknown dataset, split or option; or a standard TFDS dataset that is not
        prepared in the user's TFDS data dir (it cannot be downloaded here).
    """
    _check_name(name)  # before importing TFDS, which takes seconds
    import tensorflow_datasets as tfds

    if name in LOCAL_DATASETS:
        builder = _local_builder(name, builder_kwargs)
        sources = builder.as_data_source()
    else:
        if builder_kwargs:
            raise ValueError(f"dataset {name!r} takes no options, got {sorted(builder_kwargs)}")
        tfds_dir = os.environ.get("TFDS_DATA_DIR") or str(
            pathlib.Path("~/tensorflow_datasets").expanduser()
        )
        from google.protobuf import json_format

        try:
            builder = tfds.builder(name, data_dir=tfds_dir, file_format="array_record")
        except (json_format.Error, OSError) as e:  # a corrupt or unreadable dataset_info.json
            raise ValueError(
                f"dataset {name!r} in the TFDS data dir {tfds_dir!r} cannot be read "
                f"({type(e).__name__}: {e}); prepare it again"
            ) from e
        if not builder.is_prepared():
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


def _stack_records(records: Sequence[Mapping[str, Any]]) -> dict[str, np.ndarray]:
    arrays = {k: np.stack([np.asarray(r[k]) for r in records]) for k in records[0]}
    for k, v in arrays.items():
        if v.dtype == np.int64:
            arrays[k] = v.astype(np.int32)
    return arrays


def load_arrays(name: str, split: str, **builder_kwargs) -> dict[str, np.ndarray]:
    """A whole split as numpy arrays, row ``i`` being the example with ``index == i``.

    Every dataset gets an int32 ``index`` (per-example identity, used by SAF).
    Results are cached in memory per process; do not modify them in place.
    """
    key = (name, split, tuple(sorted(builder_kwargs.items())), str(data_dir()))
    if key not in _CACHE:
        source = data_source(name, split, **builder_kwargs)
        arrays = _stack_records(source.__getitems__(list(range(len(source)))))
        if "index" in arrays:
            order = np.argsort(arrays["index"], kind="stable")
            arrays = {k: v[order] for k, v in arrays.items()}
        else:
            arrays["index"] = np.arange(len(source), dtype=np.int32)
        _CACHE[key] = arrays
    return _CACHE[key]


class _ArrayRows:
    """Rows of in-memory arrays."""

    def __init__(self, arrays: Mapping[str, Any]):
        if not arrays:
            raise ValueError("arrays must hold at least one array")
        arrays = {k: np.asarray(v) for k, v in arrays.items()}
        sizes = {k: (len(v) if v.ndim else None) for k, v in arrays.items()}
        if None in sizes.values() or len(set(sizes.values())) != 1:
            raise ValueError(f"arrays must have one leading length, got lengths {sizes}")
        self.arrays = arrays
        self.size = next(iter(sizes.values()))

    def rows(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        return {k: v[positions] for k, v in self.arrays.items()}


class _RecordRows:
    """Rows read on demand from a random-access source of records (a TFDS data source)."""

    def __init__(self, source: Any):
        self.source = source
        self.size = len(source)
        self._many = getattr(source, "__getitems__", None)

    def rows(self, positions: np.ndarray) -> dict[str, np.ndarray]:
        order = np.argsort(positions, kind="stable")  # read in file order, then put back
        wanted = positions[order].tolist()
        records = self._many(wanted) if self._many else [self.source[i] for i in wanted]
        arrays = _stack_records(records)
        if "index" not in arrays:
            arrays["index"] = positions[order].astype(np.int32)
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return {k: v[inverse] for k, v in arrays.items()}


class Loader:
    """Deterministic, resumable batches, from in-memory arrays or a random-access source.

    Epoch ``e`` visits the examples in ``np.random.default_rng((seed, e)).permutation``
    order, so any global step can be reproduced without replaying the ones before it, and every
    process of a multi-process run computes the same order by itself (checked once, when the
    loader is built).

    With ``mesh``, a batch is a dict of global ``jax.Array`` split over the mesh's data axes;
    each process reads only the examples its own devices hold (rows need not be contiguous).

    Args:
      source: a dict of equal-length arrays, or a random-access source of examples (a
        sequence of dicts with ``__len__`` and ``__getitems__`` or ``__getitem__``, such as
        ``efflax.data.data_source(...)``), read row by row as batches are asked for.
      batch_size: examples per batch (the global batch with a mesh).
      seed: shuffling seed (an int >= 0).
      epochs: passes over the data (``None``: forever).
      drop_remainder: drop each epoch's last partial batch.
      shuffle: shuffle per epoch.
      mesh: split each batch over this mesh's data axes (any mesh with a ``'data'`` and/or
        ``'expert'`` axis, ``jax.make_mesh`` ones included).

    Attributes:
      steps_per_epoch: batches per epoch.
      num_examples: examples in the split.
      num_steps: batches over all epochs (``len(loader)``).
      mesh: the mesh batches are placed on (its ``Auto``-axes version), or ``None``.
    """

    def __init__(
        self,
        source: Mapping[str, Any] | Sequence[Mapping[str, Any]],
        batch_size: int,
        *,
        seed: int = 0,
        epochs: int | None = 1,
        drop_remainder: bool = True,
        shuffle: bool = True,
        mesh=None,
    ):
        if isinstance(source, Mapping):
            self._rows = _ArrayRows(source)
            self.arrays: dict[str, np.ndarray] | None = self._rows.arrays
        elif (
            not isinstance(source, str | bytes | np.ndarray)
            and hasattr(source, "__len__")
            and (hasattr(source, "__getitems__") or hasattr(source, "__getitem__"))
        ):
            self._rows = _RecordRows(source)
            self.arrays = None
        else:
            raise ValueError(
                f"source must be a dict of arrays or a random-access source of examples, got "
                f"{type(source).__name__}"
            )
        self.num_examples = self._rows.size
        if self.num_examples == 0:
            raise ValueError("source has no examples")
        if self.arrays is None:
            first = source[0]
            if not isinstance(first, Mapping):
                raise ValueError(
                    f"source must hold examples as dicts of arrays; source[0] is "
                    f"{type(first).__name__} (pass a dict of arrays for in-memory data)"
                )
        _checks.int_at_least("batch_size", batch_size)
        if drop_remainder and batch_size > self.num_examples:
            raise ValueError(
                f"batch_size={batch_size} must be in [1, {self.num_examples}] "
                f"(examples in the split)"
            )
        _checks.int_at_least("seed", seed, 0)
        if epochs is not None:
            _checks.int_at_least("epochs", epochs)  # or None: forever
        self.batch_size = batch_size
        self.seed = seed
        self.epochs = epochs
        self.drop_remainder = _checks.boolean("drop_remainder", drop_remainder)
        self.shuffle = _checks.boolean("shuffle", shuffle)
        per_epoch = self.num_examples / batch_size
        self.steps_per_epoch = math.floor(per_epoch) if drop_remainder else math.ceil(per_epoch)
        self._order: tuple[int, np.ndarray] | None = None
        self._plans: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self.mesh = None if mesh is None else self._check_mesh(mesh)
        self._check_processes_agree()

    def _check_mesh(self, mesh):
        import jax

        from efflax._src.sharding import batch_axes
        from efflax._src.sharding import check_mesh

        mesh = check_mesh(mesh)
        ways = math.prod(mesh.shape[a] for a in batch_axes(mesh))
        last = self.num_examples % self.batch_size
        if self.batch_size % ways:
            raise ValueError(
                f"batch_size={self.batch_size} must divide over the mesh's {ways} data-parallel "
                f"devices"
            )
        if not self.drop_remainder and last % ways:
            raise ValueError(
                f"the last partial batch has {last} examples (drop_remainder=False), which do "
                f"not divide over the mesh's {ways} data-parallel devices; use "
                f"drop_remainder=True"
            )
        local = {d.id for d in jax.local_devices()}
        if not local & set(mesh.device_ids.flat):
            raise ValueError("the mesh has none of this process's devices")
        return mesh

    def _check_processes_agree(self) -> None:
        import jax

        if jax.process_count() == 1:
            return
        from efflax._src import distributed

        mesh = self.mesh
        distributed.agree(
            "Loader",
            {
                "num_examples": self.num_examples,
                "batch_size": self.batch_size,
                "seed": self.seed,
                "epochs": self.epochs,
                "drop_remainder": self.drop_remainder,
                "shuffle": self.shuffle,
                "mesh": None if mesh is None else (dict(mesh.shape), mesh.device_ids.tolist()),
                "the order of epoch 0": self.epoch_order(0),
            },
        )

    @property
    def num_steps(self) -> int | None:
        return None if self.epochs is None else self.epochs * self.steps_per_epoch

    def __len__(self) -> int:
        if self.epochs is None:
            raise TypeError("an endless loader (epochs=None) has no length")
        return self.num_steps

    def epoch_order(self, epoch: int) -> np.ndarray:
        """The order in which epoch ``epoch`` visits the examples."""
        _checks.int_at_least("epoch", epoch, 0)
        if not self.shuffle:
            return np.arange(self.num_examples)
        if self._order is None or self._order[0] != epoch:
            order = np.random.default_rng((self.seed, epoch)).permutation(self.num_examples)
            self._order = (epoch, order)
        return self._order[1]

    def _check_step(self, step: Any, *, allow_end: bool) -> int:
        step = _checks.int_at_least("step", step, 0)
        end = self.num_steps
        if end is not None and (step > end or (step == end and not allow_end)):
            raise ValueError(
                f"step={step} is past the end of the loader: it has {end} batches "
                f"(epochs={self.epochs} x {self.steps_per_epoch}); use epochs=None to repeat"
            )
        return step

    def positions_at(self, step: int) -> np.ndarray:
        """The examples (positions in the source) of the global batch of step ``step``."""
        step = self._check_step(step, allow_end=False)
        epoch, within = divmod(step, self.steps_per_epoch)
        order = self.epoch_order(epoch)
        return order[within * self.batch_size : (within + 1) * self.batch_size]

    def batch_at(self, step: int) -> dict[str, Any]:
        """The batch of global step ``step`` (numpy, or global ``jax.Array`` with a mesh).

        Raises:
          ValueError: ``step`` < 0, or past the last batch of a finite loader.
        """
        positions = self.positions_at(step)
        if self.mesh is None:
            return self._rows.rows(positions)
        return self._global_batch(positions)

    def _plan(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        """For a global batch of ``n``: the batch rows this process holds, and for every batch
        row its place among them (-1 where another process holds it)."""
        if n not in self._plans:
            from efflax._src.distributed import process_local_rows
            from efflax._src.sharding import data_sharding

            local = process_local_rows(data_sharding(self.mesh, 1), (n,))
            where = np.full(n, -1, np.int64)
            where[local] = np.arange(len(local))
            self._plans[n] = (local, where)
        return self._plans[n]

    def _global_batch(self, positions: np.ndarray) -> dict[str, Any]:
        import jax

        from efflax._src.sharding import data_sharding

        n = len(positions)
        local, where = self._plan(n)
        rows = self._rows.rows(positions[local])  # only what this process's devices hold
        batch = {}
        for key, values in rows.items():

            def shard(index, values=values):
                picked = where[np.arange(n)[index[0]]]
                if len(picked) and np.array_equal(picked, np.arange(picked[0], picked[-1] + 1)):
                    part = values[picked[0] : picked[-1] + 1]  # a view: no second copy
                else:
                    part = values[picked]
                return part[(slice(None), *index[1:])]

            shape = (n, *values.shape[1:])
            batch[key] = jax.make_array_from_callback(
                shape, data_sharding(self.mesh, len(shape)), shard
            )
        return batch

    def iter_from(self, step: int = 0) -> Iterator[dict[str, Any]]:
        """Batches from global step ``step`` to the end (exact resume)."""
        step = self._check_step(step, allow_end=True)
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
    in_memory: bool | None = None,
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
      mesh: if given, each batch is split over the mesh's data axes; in a multi-process run
        each process reads only the examples its devices hold.
      in_memory: read the whole split into memory once (fast batches; every process holds all
        of it) or read each batch's examples from the ``array_record`` files. Default: in
        memory for one process, from the files with several. Both give the same batches.
      **builder_kwargs: dataset options (``num_samples`` for mnist1d, ``seq_len`` for stdlib_text).

    Example:
      >>> loader = efflax.data.load("mnist1d", "train", batch_size=100, epochs=2)
      >>> batch = next(iter(loader))  # {'x': [100, 40] float32, 'y': [100], 'index': [100]}
    """
    if in_memory is None:
        in_memory = _process_count() == 1
    if in_memory:
        source: Any = load_arrays(name, split, **builder_kwargs)
    else:
        source = data_source(name, split, **builder_kwargs)
        _check_index_order(name, source)
    return Loader(
        source,
        batch_size,
        seed=seed,
        epochs=epochs,
        drop_remainder=drop_remainder,
        shuffle=shuffle,
        mesh=mesh,
    )


def _check_index_order(name: str, source: Any) -> None:
    """Streaming must visit the examples in the same order as the in-memory arrays (sorted by
    ``index``): efflax's builders store example ``i`` at position ``i``."""
    if name not in LOCAL_DATASETS or len(source) == 0:
        return
    last = len(source) - 1
    first_and_last = [int(r["index"]) for r in source.__getitems__([0, last])]
    if first_and_last != [0, last]:
        raise ValueError(
            f"dataset {name!r} in {data_dir()} stores its examples out of index order (positions "
            f"0 and {last} hold {first_and_last}); it was prepared by an older efflax: delete "
            f"{data_dir() / name} to prepare it again"
        )
