"""Seeded, stratified choices of images: subsets, few-shot, held-out test splits, classes."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np

from finetune.errors import DataError


def select_classes(class_names: Sequence[str], wanted: Iterable[str | int]) -> list[int]:
    """Positions in ``class_names`` of ``wanted`` (names, or integer indices), in the given order."""
    chosen: list[int] = []
    for item in wanted:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise DataError(f"data.classes: {item!r} is neither a class name nor an index")
        if isinstance(item, int):
            if not 0 <= item < len(class_names):
                raise DataError(
                    f"data.classes: index {item} is out of range 0..{len(class_names) - 1}; "
                    f"classes: {list_names(class_names)}"
                )
            index = item
        elif item in class_names:
            index = list(class_names).index(item)
        else:
            raise DataError(f"data.classes: unknown class {item!r}; valid names: {list_names(class_names)}")
        if index in chosen:
            raise DataError(f"data.classes: class {class_names[index]!r} is listed twice")
        chosen.append(index)
    return chosen


def list_names(class_names: Sequence[str]) -> str:
    names = ", ".join(repr(name) for name in class_names[:50])
    return names + (f", ... ({len(class_names)} in all)" if len(class_names) > 50 else "")


def per_class_sample(
    labels: np.ndarray, count: int, class_names: Sequence[str], rng: np.random.Generator
) -> np.ndarray:
    """``count`` random positions of each class (few-shot); a class with fewer is an error."""
    chosen = []
    for label, name in enumerate(class_names):
        members = np.flatnonzero(labels == label)
        if len(members) < count:
            raise DataError(f"data.train_per_class {count}: class {name!r} has only {len(members)} training images")
        chosen.append(rng.permutation(members)[:count])
    return rng.permutation(np.concatenate(chosen))


def stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices with each class in proportion to its frequency (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / len(labels)
    take = np.floor(exact).astype(int)
    shortfall = size - int(take.sum())
    take[np.argsort(-(exact - take), kind="stable")[:shortfall]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == cls))[:count] for cls, count in zip(classes, take, strict=True)]
    return rng.permutation(np.concatenate(chosen))


# A constant seed for carved-out test splits: the test images stay the same whatever the recipe's seed.
TEST_SPLIT_SEED = 20240601


def carve_test_split(labels: np.ndarray, fraction: float, what: str) -> np.ndarray:
    """Sorted positions of a seeded, stratified test split of ``fraction`` of ``labels``."""
    size = int(round(len(labels) * fraction))
    if size == 0 or size >= len(labels):
        raise DataError(f"data.test_split {fraction} of {len(labels)} images of {what} leaves {size} test images")
    test = np.sort(stratified_sample(labels, size, np.random.default_rng(TEST_SPLIT_SEED)))
    left = np.bincount(np.delete(labels, test), minlength=int(labels.max()) + 1)
    if (left[np.unique(labels)] == 0).any():
        raise DataError(
            f"data.test_split {fraction} leaves a class of {what} without training images; "
            "lower test_split or add images"
        )
    return test
