"""Datasets: the stored form is the original pixels (uint8, N x H x W x C).

Resizing and colour conversion happen inside the model, so memory does not
grow with the backbone's input size. Splits and subsets are seeded and
stratified.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from finetune.errors import DataError
from finetune.registry import Registry


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, H, W, C)
    labels: np.ndarray  # int32, (N,)
    indices: np.ndarray | None = None  # positions in the source's original split

    def __post_init__(self):
        if self.indices is None:
            object.__setattr__(self, "indices", np.arange(len(self.labels)))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions: np.ndarray) -> "Split":
        return Split(self.images[positions], self.labels[positions], self.indices[positions])


@dataclass(frozen=True)
class Dataset:
    train: Split
    validation: Split | None
    test: Split
    class_names: tuple[str, ...]
    source: str = ""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class DatasetSource:
    """A registered dataset: how to load it, and what its images look like."""

    name: str
    load: Callable[..., tuple[Split, Split, tuple[str, ...], str]]
    """``load(config) -> (train, test, class_names, where it was found)``"""
    input_shape: tuple[int, int, int]
    num_classes: int


datasets: Registry[DatasetSource] = Registry("datasets", instance_type=DatasetSource)


def get(name: str) -> DatasetSource:
    return datasets.lookup(name)


def load_dataset(config, seed: int) -> Dataset:
    """Load ``config.source``, take the stratified limits and hold out validation."""
    source = get(config.source)
    train, test, class_names, where = source.load(config)
    rng = np.random.default_rng(seed)
    if config.train_limit is not None and config.train_limit < len(train):
        train = train.subset(stratified_sample(train.labels, config.train_limit, rng))
    if config.test_limit is not None and config.test_limit < len(test):
        test = test.subset(np.sort(stratified_sample(test.labels, config.test_limit, rng)))
    validation = None
    if config.validation_split > 0:
        size = int(round(len(train) * config.validation_split))
        if size == 0 or size >= len(train):
            raise DataError(
                f"data.validation_split {config.validation_split} of {len(train)} training images "
                f"leaves {size} for validation; raise train_limit or change the split"
            )
        held_out = stratified_sample(train.labels, size, rng)
        keep = np.setdiff1d(np.arange(len(train)), held_out)
        validation = train.subset(held_out)
        train = train.subset(rng.permutation(keep))
    return Dataset(train=train, validation=validation, test=test, class_names=class_names, source=where)


def stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices with each class in proportion to its frequency (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / len(labels)
    take = np.floor(exact).astype(int)
    shortfall = size - int(take.sum())
    take[np.argsort(-(exact - take), kind="stable")[:shortfall]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == cls))[:count] for cls, count in zip(classes, take)]
    return rng.permutation(np.concatenate(chosen))


# --- IDX files (MNIST family) ---------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(f"{path} is truncated or corrupt: expected {expected} bytes of data, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def fashion_mnist_search_dirs(data_dir: str | None = None) -> list[Path]:
    """Where the Fashion-MNIST IDX files are looked for, in order."""
    dirs = []
    if data_dir:
        dirs.append(Path(data_dir).expanduser())
    if os.environ.get("FINETUNE_DATA_DIR"):
        dirs.append(Path(os.environ["FINETUNE_DATA_DIR"]).expanduser())
    dirs.append(Path("/usr/share/datasets/fashion-mnist"))
    dirs.append(Path("~/.keras/datasets/fashion-mnist").expanduser())
    return dirs


def _find_idx_files(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in _FASHION_MNIST_FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def load_fashion_mnist(config) -> tuple[Split, Split, tuple[str, ...], str]:
    """Fashion-MNIST from local IDX files, else through a Keras download."""
    searched = fashion_mnist_search_dirs(getattr(config, "data_dir", None))
    for folder in searched:
        files = _find_idx_files(folder)
        if files is not None:
            arrays = {key: read_idx(path) for key, path in files.items()}
            return _fashion_mnist_splits(arrays, str(folder))
    try:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(
            "Fashion-MNIST not found in " + ", ".join(str(d) for d in searched)
            + f" and the download failed ({reason}); install it with "
            "'apt-get install dataset-fashion-mnist' or put the four IDX files in $FINETUNE_DATA_DIR"
        ) from None
    arrays = {"train_images": x_train, "train_labels": y_train, "test_images": x_test, "test_labels": y_test}
    return _fashion_mnist_splits(arrays, "keras download (~/.keras/datasets)")


def _fashion_mnist_splits(arrays, where: str):
    def split(prefix: str) -> Split:
        images, labels = arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"]
        if len(images) != len(labels):
            raise DataError(f"Fashion-MNIST {prefix} images and labels differ in count ({where})")
        return Split(np.ascontiguousarray(images[..., None]), labels.astype(np.int32))

    return split("train"), split("test"), FASHION_MNIST_CLASSES, where


datasets.register("fashion_mnist", DatasetSource(
    name="fashion_mnist", load=load_fashion_mnist, input_shape=(28, 28, 1), num_classes=10,
))
