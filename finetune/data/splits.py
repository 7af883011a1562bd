"""The data's types: a split of images and labels, a dataset, and a registered source."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from finetune.data.arrays import pick_rows


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, H, W, C)
    labels: np.ndarray  # int32, (N,); multi-label: uint8 multi-hot, (N, tags)
    indices: np.ndarray = None  # type: ignore[assignment]  # positions in the source's split; set when None

    def __post_init__(self) -> None:
        if self.indices is None:
            object.__setattr__(self, "indices", np.arange(len(self.labels)))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions: np.ndarray) -> Split:
        return Split(
            pick_rows(self.images, positions),  # type: ignore[arg-type]  # rows of a memmap stay mapped
            self.labels[positions],
            self.indices[positions],
        )


def class_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class: a count of integer labels, or the column sums of a multi-hot matrix (images per tag)."""
    if labels.ndim == 2:
        return labels.sum(axis=0, dtype=np.int64)
    return np.bincount(labels, minlength=num_classes)


def strata(labels: np.ndarray) -> np.ndarray:
    """What a stratified choice keeps in proportion: the labels, or each multi-hot row's combination of tags."""
    if labels.ndim == 2:
        return np.unique(labels, axis=0, return_inverse=True)[1].reshape(-1).astype(np.int32)
    return labels


def as_labels(labels: np.ndarray) -> np.ndarray:
    """Integer labels as int32; a multi-hot matrix as uint8."""
    return labels.astype(np.uint8 if labels.ndim == 2 else np.int32, copy=False)


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

    @property
    def multi_label(self) -> bool:
        """Each image has a set of tags (a multi-hot label row)."""
        return self.train.labels.ndim == 2


Loaded = tuple[Split, Split, tuple[str, ...], str] | tuple[Split, Split, tuple[str, ...], str, Split]
"""What a source's ``load`` gives: train, test, class names, where, and optionally its own validation split."""


@dataclass(frozen=True)
class DatasetSource:
    """A registered dataset: how to load it, and what its images look like.

    ``input_shape``/``num_classes``/``class_names`` are None when they depend
    on the data (``tfds:NAME``, ``image_folder``). ``argument`` names what may
    follow a colon in ``data.source`` (``tfds:NAME``); ``peek(config)`` gives
    the class names without loading images, or None when that is not cheap;
    ``split_counts(config)`` gives them with each split's images per class.
    """

    name: str
    load: Callable[..., Loaded]
    """``load(config) -> (train, test, class_names, where it was found[, validation])``: a source whose data
    names its validation images (a CSV's split column) gives them fifth; the run then holds none out."""
    input_shape: tuple[int, int, int] | None = None
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    argument: str | None = None
    argument_required: bool = False
    resizes: bool = False  # honours data.stored_size
    peek: Callable[..., tuple[str, ...] | None] | None = None
    check: Callable[..., None] | None = None
    """``check(config)`` raises RecipeError for settings the source cannot use, without reading files."""
    split_counts: Callable[..., tuple[tuple[str, ...], dict[str, list[int]]]] | None = None
    """``split_counts(config) -> (class_names, {split: images per class})``, no image decoded (``validate``)."""


def split_source(source: str) -> tuple[str, str | None]:
    """``"tfds:mnist"`` -> ``("tfds", "mnist")``; ``"fashion_mnist"`` -> ``("fashion_mnist", None)``."""
    name, colon, argument = source.partition(":")
    return name.strip(), (argument.strip() if colon else None)
