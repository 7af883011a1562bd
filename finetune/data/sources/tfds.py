"""A prepared tensorflow-datasets image classification dataset, read offline when it is prepared."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from finetune.data.images import as_uint8, to_stored
from finetune.data.sampling import carve_test_split
from finetune.data.splits import DatasetSource, Split, split_source
from finetune.errors import DataError, first_line

if TYPE_CHECKING:
    from finetune.recipe.schema import DataConfig


def _dataset_name(config: DataConfig) -> str:
    """``NAME`` of ``tfds:NAME`` (the source registry has already refused a missing one)."""
    _, name = split_source(config.source)
    if not name:
        raise DataError(f"data.source {config.source!r}: name the dataset, e.g. tfds:mnist")
    return name


def _tfds_open(config: DataConfig) -> Any:  # a tfds.core.DatasetBuilder
    """The builder of ``tfds:NAME``: from its prepared files when there are some, else its registered class.

    A prepared dataset needs no builder code (tfds reads ``dataset_info.json``).
    """
    name = _dataset_name(config)
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(
            f"data.source {config.source}: needs tensorflow-datasets (pip install tensorflow-datasets)"
        ) from None
    data_dir = str(Path(config.data_dir).expanduser()) if config.data_dir else None
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR
    try:
        return tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # noqa: BLE001 - DatasetNotFoundError, bad config or version
        if isinstance(error, tfds.core.registered.DatasetNotFoundError):
            raise DataError(
                f"tfds dataset {name!r} is not prepared in {where} and tensorflow-datasets has no builder of that name"
            ) from None
        raise DataError(f"tfds dataset {name!r} in {where}: {first_line(error)}") from None


def _tfds_builder(config: DataConfig) -> Any:  # a tfds.core.DatasetBuilder
    """The builder of ``tfds:NAME``, prepared (downloading only when it is not) or a DataError."""
    name = _dataset_name(config)
    builder = _tfds_open(config)
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except Exception as error:  # noqa: BLE001 - no network, manual download needed, ...
            raise DataError(
                f"tfds dataset {name!r} is not prepared in {builder.data_dir_root} and preparing it "
                f"failed ({first_line(error)}); prepare it there on a machine with network, "
                "or set data.data_dir"
            ) from None
    return builder


def _tfds_keys(builder: Any, name: str) -> tuple[str, str]:
    import tensorflow_datasets as tfds

    features = builder.info.features
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    if not (
        isinstance(image_key, str)
        and isinstance(label_key, str)
        and image_key in features
        and label_key in features
        and isinstance(features[image_key], tfds.features.Image)
        and isinstance(features[label_key], tfds.features.ClassLabel)
    ):
        raise DataError(
            f"tfds dataset {name!r} is not an image classification dataset "
            f"(needs an Image feature and a ClassLabel; has {', '.join(features.keys())})"
        )
    return image_key, label_key


def load_tfds(config: DataConfig) -> tuple[Split, Split, tuple[str, ...], str]:
    """A prepared tensorflow-datasets image classification dataset (its train and test splits).

    Without a ``test`` split, a seeded stratified ``data.test_split`` of
    ``train`` is the test split. Images that vary in size, or all of them when
    ``data.stored_size`` is set, are stored at the stored size.
    """
    name = _dataset_name(config)
    builder = _tfds_builder(config)
    image_key, label_key = _tfds_keys(builder, name)
    class_names = tuple(str(label) for label in builder.info.features[label_key].names)
    splits = builder.info.splits
    if "train" not in splits:
        raise DataError(f"tfds dataset {name!r} has no 'train' split (splits: {', '.join(splits.keys())})")
    feature = builder.info.features[image_key]
    shape = tuple(feature.shape)
    resize = config.stored_size is not None or None in shape[:2]
    channels = shape[-1] or 3
    if resize and channels not in (1, 3):
        channels = 3
    read = {
        split: _read_tfds_split(
            builder,
            split,
            image_key,
            label_key,
            splits[split].num_examples,
            shape,
            channels,
            config.stored_hw if resize else None,
            config.resize,
        )
        for split in ("train", "test")
        if split in splits
    }
    train = read["train"]
    if "test" in read:
        test, how = read["test"], "train and test splits"
    else:
        chosen = carve_test_split(train.labels, config.test_split, f"tfds {name} train")
        rest = np.setdiff1d(np.arange(len(train)), chosen)
        train, test, how = train.subset(rest), train.subset(chosen), f"no test split: test_split {config.test_split}"
    return train, test, class_names, f"tfds {builder.info.full_name} in {builder.data_dir_root} ({how})"


def _read_tfds_split(
    builder: Any,
    split: str,
    image_key: str,
    label_key: str,
    count: int,
    shape: tuple[int | None, ...],
    channels: int,
    size_hw: tuple[int, int] | None,
    resize: str,
) -> Split:
    import tensorflow_datasets as tfds
    from PIL import Image

    dataset = builder.as_dataset(split=split, shuffle_files=False)
    dataset = dataset.map(lambda example: (example[image_key], example[label_key]))
    labels = np.empty(count, dtype=np.int32)
    if size_hw is None:
        images = np.empty((count, *shape), dtype=np.uint8)  # type: ignore[type-var]  # fixed size: no None
        filled = 0
        for batch_images, batch_labels in tfds.as_numpy(dataset.batch(1024)):
            images[filled : filled + len(batch_labels)] = _checked_uint8(batch_images)
            labels[filled : filled + len(batch_labels)] = batch_labels
            filled += len(batch_labels)
    else:
        images = np.empty((count, *size_hw, channels), dtype=np.uint8)
        filled = 0
        for pixels, label in tfds.as_numpy(dataset):
            pixels = _checked_uint8(pixels)
            picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
            images[filled] = to_stored(picture, size_hw, channels, resize)
            labels[filled] = label
            filled += 1
    if filled != count:
        raise DataError(
            f"tfds split {split!r} of {builder.info.full_name} has {filled} examples, its metadata says {count}"
        )
    return Split(images, labels)


def _checked_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype not in (np.uint8, np.uint16):
        raise DataError(f"tfds images of dtype {pixels.dtype} are not supported (uint8 or uint16)")
    return as_uint8(pixels)


def peek_tfds(config: DataConfig) -> tuple[str, ...] | None:
    """The label names of a prepared dataset; None when it would have to be downloaded."""
    name = _dataset_name(config)
    builder = _tfds_open(config)
    if not builder.is_prepared():
        return None
    _, label_key = _tfds_keys(builder, name)
    return tuple(str(label) for label in builder.info.features[label_key].names)


SOURCE = DatasetSource(
    name="tfds",
    load=load_tfds,
    argument="NAME",
    argument_required=True,
    resizes=True,
    peek=peek_tfds,
)
