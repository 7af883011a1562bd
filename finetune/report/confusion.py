"""``confusion_matrix.png``: rows are true classes, columns predictions; colour is the row's share."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from finetune.report.canvas import new_figure, save_png

# Beyond this many classes the counts no longer fit in their cells.
MOST_CLASSES_WITH_COUNTS = 30


def draw_confusion_matrix(confusion, class_names: Sequence[str], path: str | Path, title: str = "") -> Path:
    """Counts in the cells, colours normalised per row (recall on the diagonal), class names on both axes."""
    confusion = np.asarray(confusion, dtype=np.int64)
    count = len(class_names)
    shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    side = max(5.0, 0.55 * count + 3.0)
    figure = new_figure(side + 1.2, side)
    axes = figure.subplots()
    shown = axes.imshow(shares, cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    colorbar = figure.colorbar(shown, ax=axes, shrink=0.8)
    colorbar.set_label("share of the true class (row)")
    if count <= MOST_CLASSES_WITH_COUNTS:
        for row in range(count):
            for column in range(count):
                if confusion[row, column]:
                    axes.text(
                        column,
                        row,
                        str(confusion[row, column]),
                        ha="center",
                        va="center",
                        fontsize=9,
                        color="white" if shares[row, column] > 0.55 else "black",
                    )
    axes.set_xticks(range(count), [str(name) for name in class_names], rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(count), [f"{name} ({shares[i, i]:.0%})" for i, name in enumerate(class_names)], fontsize=8)
    axes.set_xlabel("predicted class")
    axes.set_ylabel("true class (recall)")
    accuracy = np.trace(confusion) / max(int(confusion.sum()), 1)
    axes.set_title(f"{title or 'Confusion matrix'}\naccuracy {accuracy:.2%} on {confusion.sum()} images", fontsize=10)
    return save_png(figure, path)
