"""TFDS builders for the offline datasets, stored as ``array_record``.

Both are generated locally, never downloaded: MNIST-1D from the ``mnist1d`` package's procedure
(Greydanus 2020) and a byte-level corpus from the running Python's standard-library sources.
Examples are stored in ``index`` order (``disable_shuffling``), so reading position ``i`` of a
split gives example ``i``: a loader that streams from the files and one that holds the split in
memory visit the same examples (version 1.1.0; 1.0.0 stored them in TFDS's hashed order).
"""

from __future__ import annotations

import dataclasses
import hashlib
import pathlib
import sysconfig

import numpy as np
import tensorflow_datasets as tfds

from pallas_kernels import _checks

MNIST1D_SPLITS = ("train", "test")
STDLIB_TEXT_SPLITS = ("train", "validation", "test")


@dataclasses.dataclass
class Mnist1dConfig(tfds.core.BuilderConfig):
    num_samples: int = 5000
    train_fraction: float = 0.8
    seed: int = 42


class Mnist1d(tfds.core.GeneratorBasedBuilder):
    """MNIST-1D: 40-sample 1-D signals of 10 classes, generated procedurally.

    The default config is the standard dataset (5,000 samples, 4,000 train / 1,000 test,
    seed 42); ``num_samples`` makes larger versions with the same procedure.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "Examples stored in index order.", "1.0.0": "First version."}
    BUILDER_CONFIGS = [Mnist1dConfig(name="default", description="4,000/1,000 split")]

    @classmethod
    def config_for(cls, num_samples: int | None) -> Mnist1dConfig:
        if num_samples is None or num_samples == 5000:
            return cls.BUILDER_CONFIGS[0]
        _checks.int_at_least("num_samples", num_samples, 10)
        return Mnist1dConfig(name=f"n{num_samples}", num_samples=num_samples)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="MNIST-1D (Greydanus 2020), generated locally with the mnist1d package.",
            features=tfds.features.FeaturesDict(
                {
                    "x": tfds.features.Tensor(shape=(40,), dtype=np.float32),
                    "y": tfds.features.ClassLabel(num_classes=10),
                    "index": np.int32,
                }
            ),
            supervised_keys=("x", "y"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        from mnist1d.data import get_dataset_args
        from mnist1d.data import make_dataset

        args = get_dataset_args()
        args.num_samples = self.builder_config.num_samples
        args.train_split = self.builder_config.train_fraction
        args.seed = self.builder_config.seed
        data = make_dataset(args)
        return {
            "train": self._generate_examples(data["x"], data["y"]),
            "test": self._generate_examples(data["x_test"], data["y_test"]),
        }

    def _generate_examples(self, x, y):
        for i in range(len(x)):
            yield i, {"x": x[i].astype(np.float32), "y": int(y[i]), "index": i}


@dataclasses.dataclass
class StdlibTextConfig(tfds.core.BuilderConfig):
    seq_len: int = 256


def stdlib_source_files() -> list[pathlib.Path]:
    """The running Python's standard-library ``.py`` files (no tests, no site-packages)."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip.intersection(p.relative_to(root).parts)]
    return sorted(files, key=lambda p: str(p.relative_to(root)))


def stdlib_split_of(relative_path: str) -> str:
    """Deterministic split by file: 90% train, 5% validation, 5% test (md5 of the path)."""
    if not isinstance(relative_path, str):
        raise ValueError(f"relative_path={relative_path!r} must be a string")
    bucket = int(hashlib.md5(relative_path.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 90 else ("validation" if bucket < 95 else "test")


class StdlibText(tfds.core.GeneratorBasedBuilder):
    """Byte-level text from the standard library's sources, in ``seq_len``-byte chunks.

    Files are split by path (see :func:`stdlib_split_of`), concatenated per split in path order
    with a NUL byte between files, and cut into chunks of ``seq_len + 1`` bytes so that inputs
    and next-byte targets come from one example.
    """

    VERSION = tfds.core.Version("1.1.0")
    RELEASE_NOTES = {"1.1.0": "Examples stored in index order.", "1.0.0": "First version."}
    BUILDER_CONFIGS = [StdlibTextConfig(name="seq256", seq_len=256)]

    @classmethod
    def config_for(cls, seq_len: int | None) -> StdlibTextConfig:
        if seq_len is None or seq_len == 256:
            return cls.BUILDER_CONFIGS[0]
        _checks.int_at_least("seq_len", seq_len)
        return StdlibTextConfig(name=f"seq{seq_len}", seq_len=seq_len)

    def _info(self) -> tfds.core.DatasetInfo:
        length = self.builder_config.seq_len + 1
        return tfds.core.DatasetInfo(
            builder=self,
            description="Bytes of the running Python's standard-library .py files.",
            features=tfds.features.FeaturesDict(
                {
                    "tokens": tfds.features.Tensor(shape=(length,), dtype=np.uint8),
                    "index": np.int32,
                }
            ),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        root = pathlib.Path(sysconfig.get_paths()["stdlib"])
        per_split: dict[str, list[bytes]] = {s: [] for s in STDLIB_TEXT_SPLITS}
        for path in stdlib_source_files():
            rel = str(path.relative_to(root))
            per_split[stdlib_split_of(rel)].append(path.read_bytes())
        return {s: self._generate_examples(b"\0".join(per_split[s])) for s in STDLIB_TEXT_SPLITS}

    def _generate_examples(self, text: bytes):
        length = self.builder_config.seq_len + 1
        data = np.frombuffer(text, dtype=np.uint8)
        for i in range(len(data) // length):
            yield i, {"tokens": data[i * length : (i + 1) * length], "index": i}
