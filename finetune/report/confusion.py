"""``confusion_matrix.png``: rows are true classes, columns predictions; each row normalised to sum to 1."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from finetune.report.canvas import new_figure, save_png

# Beyond this many classes the shares and counts no longer fit in their cells.
MOST_CLASSES_WITH_COUNTS = 30
# Beyond this many classes a cell's two lines need the smaller font.
MOST_CLASSES_IN_LARGE_TYPE = 12


def row_shares(confusion) -> np.ndarray:
    """Each row divided by its sum (the true class's images), so a row sums to 1; a class without images stays 0."""
    confusion = np.asarray(confusion, dtype=np.int64)
    return confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)


def cell_text(count: int, share: float) -> str:
    """A cell's share of its row above its count; a share that rounds to 0% but is not reads ``<1%``."""
    percent = "<1%" if 0 < share < 0.005 else f"{share:.0%}"
    return f"{percent}\n{count}"


def draw_confusion_matrix(confusion, class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Shares of the true class (row) as colour and text, recall on the diagonal, counts beneath, class names on
    both axes with each class's number of images."""
    confusion = np.asarray(confusion, dtype=np.int64)
    count = len(class_names)
    shares = row_shares(confusion)
    support = confusion.sum(axis=1)
    side = max(5.0, 0.55 * count + 3.0)
    figure = new_figure(side + 1.2, side)
    axes = figure.subplots()
    shown = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    colorbar = figure.colorbar(shown, ax=axes, shrink=0.8)
    colorbar.set_label("share of the true class (each row sums to 1)")
    if count <= MOST_CLASSES_WITH_COUNTS:
        fontsize = 8 if count <= MOST_CLASSES_IN_LARGE_TYPE else 6.5
        for row in range(count):
            for column in range(count):
                if confusion[row, column]:
                    axes.text(
                        column,
                        row,
                        cell_text(int(confusion[row, column]), float(shares[row, column])),
                        ha="center",
                        va="center",
                        fontsize=fontsize,
                        linespacing=1.1,
                        color="white" if shares[row, column] > 0.55 else "black",
                    )
    axes.set_xticks(range(count), [str(name) for name in class_names], rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(count), [f"{name} ({support[i]})" for i, name in enumerate(class_names)], fontsize=8)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class (test images)")
    accuracy = np.trace(confusion) / max(int(confusion.sum()), 1)
    axes.set_title(
        f"{title or 'Confusion matrix'}, rows normalised\naccuracy {accuracy:.2%} on {confusion.sum()} images",
        fontsize=10,
    )
    return save_png(figure, path)
