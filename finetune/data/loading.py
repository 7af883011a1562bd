"""A dataset for a run: a source's splits, its classes kept, seeded subsets, a validation hold-out;
labels renumbered by class name to a trained model's classes.

The stored form is compact pixels (uint8, N x H x W x C); resizing to the
backbone's input and colour conversion happen inside the model, so memory
does not grow with the backbone's input size.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from finetune.data.arrays import pick_rows
from finetune.data.sampling import list_names, per_class_sample, select_classes, stratified_sample
from finetune.data.sources import get
from finetune.data.splits import Dataset, Split, as_labels, strata
from finetune.errors import DataError

if TYPE_CHECKING:
    from finetune.recipe.schema import DataConfig


def load_dataset(config: DataConfig, seed: int) -> Dataset:
    """Load ``config.source``, keep ``data.classes``, take the seeded subsets and hold out validation.

    Order: classes (relabelled 0..k-1 in the given order), train_per_class,
    train_limit, test_limit, then the validation hold-out from what is left
    of the training images. Subsets are chosen on labels; images are copied
    once, at the end. A source that names its own validation images (a CSV's
    split column) gives the validation split: nothing is held out then.
    """
    source = get(config.source)
    loaded = source.load(config)
    train, test, class_names, where = loaded[:4]
    given = loaded[4] if len(loaded) == 5 else None
    train_positions, test_positions = np.arange(len(train)), np.arange(len(test))
    train_labels, test_labels = train.labels, test.labels
    given_labels = given.labels if given is not None else np.zeros(0, dtype=np.int32)
    multi_label = train.labels.ndim == 2
    if config.classes is not None and multi_label:  # the chosen tags' columns; every image stays
        chosen = select_classes(class_names, config.classes)
        train_labels, test_labels = train.labels[:, chosen], test.labels[:, chosen]
        given_labels = given.labels[:, chosen] if given is not None else given_labels
        class_names = tuple(class_names[index] for index in chosen)
    elif config.classes is not None:
        chosen = select_classes(class_names, config.classes)
        relabel = np.full(len(class_names), -1, dtype=np.int32)
        relabel[chosen] = np.arange(len(chosen), dtype=np.int32)
        train_labels, test_labels, given_labels = relabel[train.labels], relabel[test.labels], relabel[given_labels]
        train_positions, test_positions = np.flatnonzero(train_labels >= 0), np.flatnonzero(test_labels >= 0)
        class_names = tuple(class_names[index] for index in chosen)
    rng = np.random.default_rng(seed)
    if config.train_per_class is not None and multi_label:
        raise DataError("data.train_per_class: not for multi-label data (data.label_delimiter); use train_limit")
    if config.train_per_class is not None:
        picked = per_class_sample(train_labels[train_positions], config.train_per_class, class_names, rng)
        train_positions = train_positions[picked]
    if config.train_limit is not None and config.train_limit < len(train_positions):
        train_positions = train_positions[
            stratified_sample(strata(train_labels[train_positions]), config.train_limit, rng)
        ]
    if config.test_limit is not None and config.test_limit < len(test_positions):
        test_positions = test_positions[
            np.sort(stratified_sample(strata(test_labels[test_positions]), config.test_limit, rng))
        ]
    validation = None
    if given is not None:
        kept = np.arange(len(given)) if multi_label else np.flatnonzero(given_labels >= 0)
        validation = _take(given, given_labels, kept) if len(kept) else None
    elif config.validation_split > 0:
        size = int(round(len(train_positions) * config.validation_split))
        if size == 0 or size >= len(train_positions):
            raise DataError(
                f"data.validation_split {config.validation_split} of {len(train_positions)} training images "
                f"leaves {size} for validation; raise train_limit or change the split"
            )
        held_out = stratified_sample(strata(train_labels[train_positions]), size, rng)
        keep = np.setdiff1d(np.arange(len(train_positions)), held_out)
        validation = _take(train, train_labels, train_positions[held_out])
        train_positions = train_positions[rng.permutation(keep)]
    return Dataset(
        train=_take(train, train_labels, train_positions),
        validation=validation,
        test=_take(test, test_labels, test_positions),
        class_names=tuple(class_names),
        source=where,
    )


def relabel_by_name(dataset: Dataset, class_names: Sequence[str], owner: str = "the model") -> Dataset:
    """``dataset`` with its labels numbered as ``class_names`` numbers them, matched by name, and those names.

    The data may hold only some of ``class_names`` (the others then have no images); a class of the
    data that ``class_names`` lacks is a DataError naming it (``owner`` says whose classes they are).
    """
    names = tuple(class_names)
    if tuple(dataset.class_names) == names:
        return dataset
    unknown = [name for name in dataset.class_names if name not in names]
    if unknown:
        missing = [name for name in names if name not in dataset.class_names]
        plural = len(unknown) > 1
        raise DataError(
            f"the data's class{'es' if plural else ''} {list_names(unknown)} {'are' if plural else 'is'} not among "
            f"{owner}'s {len(names)} classes ({list_names(names)})"
            + (f"; {owner}'s classes the data lacks: {list_names(missing)}" if missing else "")
        )
    numbers = np.array([names.index(name) for name in dataset.class_names], dtype=np.int32)

    def renumbered(split: Split) -> Split:
        if split.labels.ndim == 2:  # multi-hot: the data's tag columns moved to the model's
            labels = np.zeros((len(split), len(names)), dtype=np.uint8)
            labels[:, numbers] = split.labels
            return Split(split.images, labels, split.indices)
        return Split(split.images, numbers[split.labels], split.indices)  # the images stay as they are (mapped)

    return Dataset(
        train=renumbered(dataset.train),
        validation=renumbered(dataset.validation) if dataset.validation is not None else None,
        test=renumbered(dataset.test),
        class_names=names,
        source=dataset.source,
    )


def _take(split: Split, labels: np.ndarray, positions: np.ndarray) -> Split:
    if len(positions) == len(split) and np.array_equal(positions, np.arange(len(split))):
        return Split(split.images, as_labels(labels), split.indices)  # no copy of a memmap
    return Split(
        pick_rows(split.images, positions),  # type: ignore[arg-type]  # rows of a memmap stay mapped
        as_labels(labels[positions]),
        split.indices[positions],
    )


def model_io(
    config: DataConfig, seed: int, input_shape: Sequence[int] | None = None, num_classes: int | None = None
) -> tuple[tuple, int]:
    """``(input_shape, num_classes)`` for a model built without a loaded dataset.

    Sources with a static shape answer at once; data-dependent sources
    (``tfds:NAME``, ``image_folder``) load the dataset to find out (an image
    folder's decode cache makes that cheap after the first time).
    """
    if input_shape is not None and num_classes:
        return tuple(input_shape), num_classes
    source = get(config.source)
    if source.input_shape is not None and source.num_classes is not None:
        shape, count = source.input_shape, len(config.classes) if config.classes else source.num_classes
    else:
        dataset = load_dataset(config, seed)
        shape, count = dataset.input_shape, dataset.num_classes
    return tuple(input_shape or shape), num_classes or count
