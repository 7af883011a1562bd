"""Pictures of a run, drawn with Pillow alone."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def confusion_matrix_png(confusion, class_names, path: Path, title: str = "") -> Path:
    """A confusion matrix: rows are true classes, columns predictions.

    Cell colour is the share of the row (recall), the number is the count;
    the diagonal is what was right.
    """
    from PIL import Image, ImageDraw

    confusion = np.asarray(confusion)
    count = len(class_names)
    cell, font, small = 52, _font(15), _font(12)
    labels = [f"{index} {name}" for index, name in enumerate(class_names)]
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 16 + max(probe.textlength(label, font=font) for label in labels)
    top, bottom = 64, 56
    width, height = int(left + count * cell + 110), int(top + count * cell + bottom)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    accuracy = np.trace(confusion) / max(confusion.sum(), 1)
    draw.text((16, 12), title or "Confusion matrix", fill="black", font=_font(18))
    draw.text(
        (16, 36),
        f"accuracy {accuracy:.2%} on {confusion.sum()} images; rows: true class, columns: predicted",
        fill="#444444",
        font=small,
    )
    shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    for row in range(count):
        y = top + row * cell
        draw.text((left - 8, y + cell / 2), labels[row], fill="black", font=font, anchor="rm")
        for column in range(count):
            x = left + column * cell
            share = float(shares[row, column])
            shade = (
                (int(255 - 205 * share), int(255 - 150 * share), 255)
                if row == column
                else (255, int(255 - 180 * share), int(255 - 180 * share))
            )
            draw.rectangle([x, y, x + cell - 2, y + cell - 2], fill=shade)
            value = int(confusion[row, column])
            if value:
                colour = "white" if share > 0.6 else "black"
                draw.text((x + cell / 2 - 1, y + cell / 2 - 1), str(value), fill=colour, font=small, anchor="mm")
        draw.text(
            (left + count * cell + 10, y + cell / 2), f"{shares[row, row]:.0%}", fill="#1f4e9a", font=small, anchor="lm"
        )
    for column in range(count):
        x = left + column * cell + cell / 2
        draw.text((x, top + count * cell + 14), str(column), fill="black", font=font, anchor="mm")
    draw.text(
        (left + count * cell / 2, top + count * cell + 38), "predicted class", fill="#444444", font=small, anchor="mm"
    )
    draw.text((left + count * cell + 10, top - 14), "recall", fill="#1f4e9a", font=small, anchor="lm")
    path = Path(path)
    image.save(path)
    return path
