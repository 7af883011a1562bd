"""What a model's stored input looks like: shape, resize mode, class names, background polarity (``input.json``)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.data.arrays import MappedImages, read_rows
from finetune.errors import DataError
from finetune.files import write_json_atomically

INPUT_FILE = "input.json"
DARK_BELOW = 128  # a border whose median brightness (0-255) is under this is dark
_POLAR_FRACTION = 0.9  # this share of the training images agreeing makes the data one-polarity
_SAMPLED_IMAGES = 2000


@dataclass(frozen=True)
class InputSpec:
    """A model's stored input: images of ``shape`` (height, width, channels) as training saw them.

    ``background`` is ``dark`` (light-on-dark, like Fashion-MNIST), ``light``,
    ``mixed`` (training images of both kinds) or ``unknown``.
    """

    shape: tuple[int, int, int]
    resize: str
    class_names: tuple[str, ...]
    background: str
    border_brightness: float | None = None  # median over the training images of their border's median
    dark_fraction: float | None = None  # share of the training images with a dark border

    def to_json(self) -> dict:
        return {
            "shape": list(self.shape),
            "resize": self.resize,
            "class_names": list(self.class_names),
            "background": self.background,
            "border_brightness": self.border_brightness,
            "dark_fraction": self.dark_fraction,
        }

    @classmethod
    def from_json(cls, payload: dict) -> InputSpec:
        return cls(
            shape=tuple(int(size) for size in payload["shape"]),  # type: ignore[arg-type]
            resize=str(payload["resize"]),
            class_names=tuple(str(name) for name in payload["class_names"]),
            background=str(payload["background"]),
            border_brightness=payload.get("border_brightness"),
            dark_fraction=payload.get("dark_fraction"),
        )


def border_brightness(images: np.ndarray) -> np.ndarray:
    """Per image of ``(N, H, W, C)``: the median of its outermost ring of pixels, every channel, 0-255.

    A median, not a mean: a garment touching the top and bottom edges (trousers)
    still leaves most of the ring the background's colour.
    """
    images = np.asarray(images)
    count, height, width = images.shape[:3]
    if height <= 2 or width <= 2:
        ring = images.reshape(count, -1)
    else:
        edges = (images[:, 0], images[:, -1], images[:, 1:-1, 0], images[:, 1:-1, -1])
        ring = np.concatenate([edge.reshape(count, -1) for edge in edges], axis=1)
    return np.median(ring, axis=1)


def polarity(brightness: float) -> str:
    """``dark`` or ``light``: one image's border brightness against the midpoint."""
    return "dark" if brightness < DARK_BELOW else "light"


def describe_input(images: np.ndarray | MappedImages, class_names: Iterable[str], resize: str) -> InputSpec:
    """The spec of a model trained on ``images`` (uint8 ``(N, H, W, C)``, possibly memory-mapped).

    The background is ``dark`` or ``light`` when at least 90% of the training
    images (up to 2000, evenly spaced) have a border of that kind, else ``mixed``.
    """
    count = len(images)
    positions = np.unique(np.linspace(0, count - 1, min(count, _SAMPLED_IMAGES)).astype(np.int64))
    borders = border_brightness(read_rows(images, positions))
    dark_fraction = float(np.mean(borders < DARK_BELOW))
    background = "mixed"
    if dark_fraction >= _POLAR_FRACTION:
        background = "dark"
    elif dark_fraction <= 1 - _POLAR_FRACTION:
        background = "light"
    return InputSpec(
        shape=tuple(int(size) for size in images.shape[1:]),  # type: ignore[arg-type]
        resize=resize,
        class_names=tuple(class_names),
        background=background,
        border_brightness=round(float(np.median(borders)), 2),
        dark_fraction=round(dark_fraction, 4),
    )


def write_input_spec(folder: str | Path, spec: InputSpec) -> Path:
    """``input.json`` in ``folder``, written atomically."""
    return write_json_atomically(Path(folder) / INPUT_FILE, spec.to_json())


def read_input_spec(folder: str | Path) -> InputSpec | None:
    """The ``input.json`` in ``folder``, or None when there is none (a model saved before it existed)."""
    path = Path(folder) / INPUT_FILE
    if not path.is_file():
        return None
    try:
        return InputSpec.from_json(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path} is not a valid {INPUT_FILE}: {error}") from None


THRESHOLDS_FILE = "thresholds.json"
"""A multi-label model's per-tag thresholds: ``{"thresholds": {tag: threshold}, "chosen_on": ...}``."""


def write_thresholds(folder: str | Path, thresholds: dict[str, float], chosen_on: str) -> Path:
    """``thresholds.json`` in ``folder``: each tag's threshold (in output order) and what chose them."""
    document = {"thresholds": {name: float(value) for name, value in thresholds.items()}, "chosen_on": chosen_on}
    return write_json_atomically(Path(folder) / THRESHOLDS_FILE, document)


def read_thresholds(folder: str | Path, class_names: Iterable[str]) -> np.ndarray | None:
    """The thresholds of ``folder``'s ``thresholds.json`` in ``class_names``' order; None without the file.

    A file that is not JSON, or lacks a tag, is a DataError naming it."""
    path = Path(folder) / THRESHOLDS_FILE
    if not path.is_file():
        return None
    try:
        given = json.loads(path.read_text(encoding="utf-8"))["thresholds"]
        return np.array([float(given[name]) for name in class_names])
    except (ValueError, KeyError, TypeError) as error:
        raise DataError(f"{path} is not a thresholds file of this model's tags ({error!r})") from None
