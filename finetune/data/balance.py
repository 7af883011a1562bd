"""Class balance of a training split: class weights (``training.class_weight``), balanced draws
(``data.sampling: balanced``), and the warning when the largest class dwarfs the smallest."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from finetune.data.sampling import list_names
from finetune.errors import RecipeError

IMBALANCE_RATIO = 10
"""The largest training class over the smallest above which a run warns."""


def class_counts(labels: np.ndarray, classes: int) -> np.ndarray:
    """Images per class (0..classes-1) among ``labels`` (multi-hot rows: images per tag)."""
    if np.ndim(labels) == 2:
        return np.asarray(labels).sum(axis=0, dtype=np.int64)[:classes]
    return np.bincount(np.asarray(labels, dtype=np.int64).reshape(-1), minlength=classes)[:classes]


def class_weights(
    setting: str | Mapping[str, float], labels: np.ndarray, class_names: Sequence[str]
) -> np.ndarray | None:
    """One weight per class for ``training.class_weight`` on the training ``labels``; None for ``none``.

    ``balanced`` is ``n_samples / (n_classes * n_class)`` over the classes present (scikit-learn's
    ``compute_class_weight("balanced")``); a class without training images keeps 1. A mapping names
    classes as the data does; the classes it leaves out keep 1.
    """
    if isinstance(setting, str):
        if setting == "none":
            return None
        if setting != "balanced":
            raise RecipeError(f"training.class_weight: {setting!r} is none, balanced or {{CLASS: weight}}")
        counts = class_counts(labels, len(class_names))
        present = counts > 0
        weights = np.ones(len(class_names), dtype=np.float64)
        weights[present] = counts.sum() / (int(present.sum()) * counts[present])
        return weights
    unknown = [name for name in setting if name not in class_names]
    if unknown:
        raise RecipeError(
            f"training.class_weight: unknown class {list_names(unknown)}; the classes are {list_names(class_names)}"
        )
    weights = np.ones(len(class_names), dtype=np.float64)
    for name, weight in setting.items():
        weights[list(class_names).index(name)] = float(weight)
    return weights


def named_weights(weights: np.ndarray, class_names: Sequence[str]) -> dict[str, float]:
    """``{class name: weight}``, rounded for logs and metrics.json."""
    return {name: round(float(weight), 6) for name, weight in zip(class_names, weights, strict=True)}


def imbalance_warning(labels: np.ndarray, class_names: Sequence[str]) -> str | None:
    """A warning when the largest training class has more than ``IMBALANCE_RATIO`` times the images of the
    smallest (classes without training images aside); None otherwise."""
    counts = class_counts(labels, len(class_names))
    present = np.flatnonzero(counts > 0)
    if len(present) < 2:
        return None
    largest = present[np.argmax(counts[present])]
    smallest = present[np.argmin(counts[present])]
    if counts[largest] <= IMBALANCE_RATIO * counts[smallest]:
        return None
    return (
        f"the training classes are imbalanced: {class_names[largest]!r} has {counts[largest]:,} images, "
        f"{class_names[smallest]!r} only {counts[smallest]:,} ({counts[largest] / counts[smallest]:.0f}x); "
        "the model may learn to ignore the rare classes: set training.class_weight: balanced "
        "(or data.sampling: balanced)"
    )


def balanced_order(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` row positions drawn with equal class frequency (with replacement within each class), shuffled.

    Each class present in ``labels`` gets ``size // classes`` rows, and ``size % classes`` randomly chosen
    classes one more, so the counts differ by at most one.
    """
    labels = np.asarray(labels).reshape(-1)
    present = np.unique(labels)
    share, extra = divmod(size, len(present))
    takes = np.full(len(present), share)
    takes[rng.permutation(len(present))[:extra]] += 1
    drawn = [
        rng.choice(np.flatnonzero(labels == cls), size=int(take), replace=True)
        for cls, take in zip(present, takes, strict=True)
    ]
    return rng.permutation(np.concatenate(drawn))
