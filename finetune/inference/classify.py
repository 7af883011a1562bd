"""Image files to their top classes, a chunk at a time; a file that cannot be read is reported, not fatal."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.errors import DataError
from finetune.inference.images import image_files, load_stored
from finetune.inference.predictor import Predictor, load_predictor

_CHUNK = 256  # files decoded before one prediction call: memory stays flat over a large folder


@dataclass(frozen=True)
class Prediction:
    """One file's result: ``top`` as ``(class index, class name, probability)``, best first; or ``error``.

    A multi-label model's ``tags`` are those at or above their thresholds, most probable first (at most
    ``top`` of them when a top was asked for); None for a single-label model."""

    path: Path
    top: list[tuple[int, str, float]] = field(default_factory=list)
    inverted: bool = False
    error: str | None = None
    tags: list[tuple[int, str, float]] | None = None

    def to_json(self) -> dict:
        result = {
            "path": str(self.path),
            "top": [{"class": name, "index": index, "probability": chance} for index, name, chance in self.top],
            "inverted": self.inverted,
        }
        if self.tags is not None:
            result["tags"] = [{"tag": name, "index": index, "probability": chance} for index, name, chance in self.tags]
        return result


def predict(model, images, top: int | None = 5, invert: str = "auto") -> list[Prediction]:
    """The ``top`` classes of each image file (a folder stands for its image files, sorted).

    ``model`` is a run folder, a ``.keras`` file, a SavedModel folder, or a
    loaded :class:`Predictor`. ``invert`` is ``auto``, ``yes`` or ``no`` (see
    :func:`finetune.inference.images.should_invert`). A file that cannot be
    read gives a :class:`Prediction` with ``error`` set; the others are still
    predicted.
    """
    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    return list(predict_files(predictor, [images] if isinstance(images, (str, Path)) else images, top, invert))


def predict_files(predictor: Predictor, paths, top: int | None = 5, invert: str = "auto") -> Iterator[Prediction]:
    """:func:`predict`'s results one by one, in the order of ``paths`` (folders expanded).

    ``top`` None: the 5 most probable classes, and (multi-label) every tag above its threshold."""
    if top is not None and top < 1:
        raise ValueError(f"top must be at least 1, not {top}")
    files = image_files(paths)
    for start in range(0, len(files), _CHUNK):
        chunk = files[start : start + _CHUNK]
        decoded: list[tuple[int, np.ndarray, bool]] = []
        problems: dict[int, str] = {}
        for position, (path, problem) in enumerate(chunk):
            if problem is not None:
                problems[position] = f"cannot read image {path}: {problem}"
                continue
            try:
                picture, inverted = load_stored(path, predictor.spec, invert)
            except DataError as error:
                problems[position] = str(error)
                continue
            decoded.append((position, picture, inverted))
        if not decoded:
            yield from (Prediction(path, error=problems[position]) for position, (path, _) in enumerate(chunk))
            continue
        probabilities = predictor.predict(np.stack([picture for _, picture, _ in decoded]))
        names, thresholds = predictor.spec.class_names, predictor.thresholds
        results = {
            position: Prediction(
                chunk[position][0],
                _top(probabilities[row], names, top or 5),
                flag,
                tags=None if thresholds is None else _tags(probabilities[row], names, thresholds, top),
            )
            for row, (position, _, flag) in enumerate(decoded)
        }
        for position, (path, _) in enumerate(chunk):
            yield results[position] if position in results else Prediction(path, error=problems[position])


def _top(probabilities: np.ndarray, class_names, count: int) -> list[tuple[int, str, float]]:
    order = np.argsort(-probabilities, kind="stable")[:count]
    return [(int(index), class_names[index], float(probabilities[index])) for index in order]


def _tags(probabilities: np.ndarray, class_names, thresholds: np.ndarray, count: int | None) -> list:
    """The tags at or above their thresholds, most probable first (the first ``count`` when given)."""
    shown = [entry for entry in _top(probabilities, class_names, len(class_names)) if entry[2] >= thresholds[entry[0]]]
    return shown if count is None else shown[:count]
