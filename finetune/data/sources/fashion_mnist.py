"""Fashion-MNIST from its original IDX files (Debian's dataset-fashion-mnist), else a Keras download."""

from __future__ import annotations

import gzip
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from finetune.data.splits import DatasetSource, Split
from finetune.errors import DataError, first_line

if TYPE_CHECKING:
    from finetune.recipe.schema import DataConfig


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read {path}: {first_line(error)}") from None
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
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
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


def load_fashion_mnist(config: DataConfig) -> tuple[Split, Split, tuple[str, ...], str]:
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
    except Exception as error:  # noqa: BLE001 - Keras raises plain Exceptions for a failed download
        raise DataError(
            "Fashion-MNIST not found in "
            + ", ".join(str(d) for d in searched)
            + f" and the download failed ({first_line(error)}); install it with "
            "'apt-get install dataset-fashion-mnist' or put the four IDX files in $FINETUNE_DATA_DIR"
        ) from None
    arrays = {"train_images": x_train, "train_labels": y_train, "test_images": x_test, "test_labels": y_test}
    return _fashion_mnist_splits(arrays, "keras download (~/.keras/datasets)")


def _fashion_mnist_splits(arrays: dict[str, np.ndarray], where: str) -> tuple[Split, Split, tuple[str, ...], str]:
    def split(prefix: str) -> Split:
        images, labels = arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"]
        if len(images) != len(labels):
            raise DataError(f"Fashion-MNIST {prefix} images and labels differ in count ({where})")
        return Split(np.ascontiguousarray(images[..., None]), labels.astype(np.int32))

    return split("train"), split("test"), FASHION_MNIST_CLASSES, where


SOURCE = DatasetSource(
    name="fashion_mnist",
    load=load_fashion_mnist,
    input_shape=(28, 28, 1),
    num_classes=10,
    class_names=FASHION_MNIST_CLASSES,
)
