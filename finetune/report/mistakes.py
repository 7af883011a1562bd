"""``mistakes.png``: the test images the model got wrong, as stored, with true and predicted class."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from finetune.data.arrays import read_rows
from finetune.report.canvas import DPI, new_figure, save_png

COLUMNS = 6
CAPTION_PIXELS = 32  # two lines of 8-point text at the canvas's DPI


def mistake_indices(labels, probabilities: np.ndarray, limit: int = 36) -> np.ndarray:
    """Positions of misclassified images, most confident mistakes first (ties in test order), at most ``limit``."""
    labels = np.asarray(labels, dtype=np.int64)
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    return wrong[np.argsort(-confidence, kind="stable")][:limit]


def draw_mistakes(
    images,
    labels,
    probabilities: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    limit: int = 36,
    title: str = "",
    overlay: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> np.ndarray:
    """A grid of up to ``limit`` misclassified images; returns their positions in the split, in drawing order.

    ``overlay(images, classes)`` (RGB pictures of the same size) draws each image with the heatmap of the
    class it was wrongly given."""
    chosen = mistake_indices(labels, probabilities, limit)
    wrong = int(np.sum(probabilities.argmax(axis=1) != np.asarray(labels)))
    heading = title or "Misclassified test images"
    if not len(chosen):
        figure = new_figure(6, 1.2)
        figure.text(0.5, 0.5, f"{heading}: none of {len(labels)} images", ha="center", va="center")
        save_png(figure, path)
        return chosen
    pictures = read_rows(images, chosen)
    if overlay is not None:
        pictures = overlay(pictures, probabilities[chosen].argmax(axis=1))
    if pictures.shape[-1] == 1:
        pictures = np.repeat(pictures, 3, axis=-1)
    height, width = pictures.shape[1:3]
    columns = min(COLUMNS, len(chosen))
    rows = -(-len(chosen) // columns)
    # One picture of every cell, drawn once: 36 separate axes take seconds to lay out.
    cell_inches = 1.75
    side = max(1, round(0.06 * width))
    cell_width = width + 2 * side
    top = int(np.ceil(CAPTION_PIXELS * cell_width / (cell_inches * DPI)))  # two caption lines, in image pixels
    cell_height = height + top + side
    mosaic = np.full((rows * cell_height, columns * cell_width, 3), 255, dtype=np.uint8)
    predicted = probabilities.argmax(axis=1)
    figure = new_figure(cell_inches * columns, cell_inches * rows * cell_height / cell_width + 0.45, layout=None)
    title_share = 0.45 / figure.get_figheight()
    axes = figure.add_axes((0, 0, 1, 1 - title_share))
    for slot, (position, picture) in enumerate(zip(chosen, pictures, strict=True)):
        row, column = divmod(slot, columns)
        y, x = row * cell_height + top, column * cell_width + side
        mosaic[y : y + height, x : x + width] = picture
        true, guess = int(labels[position]), int(predicted[position])
        axes.text(
            x + width / 2,
            y - 0.5,
            f"true: {_short(class_names[true])}\n"
            f"pred: {_short(class_names[guess])} {probabilities[position, guess]:.0%}",
            ha="center",
            va="bottom",
            fontsize=8,
        )
    axes.imshow(mosaic, interpolation="nearest", aspect="equal")
    axes.set_axis_off()
    shown = f"the {len(chosen)} most confident" if len(chosen) < wrong else f"all {wrong}"
    figure.text(
        0.5, 1 - title_share / 2, f"{heading}: {shown} of {wrong} mistakes in {len(labels)} images", ha="center",
        va="center", fontsize=12,
    )  # fmt: skip
    save_png(figure, path)
    return chosen


def _short(name: str, most: int = 16) -> str:
    """A class name that fits under its cell."""
    return name if len(name) <= most else name[: most - 1] + "…"
