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
    """One file's result: ``top`` as ``(class index, class name, probability)``, best first; or ``error``."""

    path: Path
    top: list[tuple[int, str, float]] = field(default_factory=list)
    inverted: bool = False
    error: str | None = None

    def to_json(self) -> dict:
        return {
            "path": str(self.path),
            "top": [{"class": name, "index": index, "probability": chance} for index, name, chance in self.top],
            "inverted": self.inverted,
        }


def predict(model, images, top: int = 5, invert: str = "auto") -> list[Prediction]:
    """The ``top`` classes of each image file (a folder stands for its image files, sorted).

    ``model`` is a run folder, a ``.keras`` file, a SavedModel folder, or a
    loaded :class:`Predictor`. ``invert`` is ``auto``, ``yes`` or ``no`` (see
    :func:`finetune.inference.images.should_invert`). A file that cannot be
    read gives a :class:`Prediction` with ``error`` set; the others are still
    predicted.
    """
    predictor = model if isinstance(model, Predictor) else load_predictor(model)
    return list(predict_files(predictor, [images] if isinstance(images, (str, Path)) else images, top, invert))


def predict_files(predictor: Predictor, paths, top: int = 5, invert: str = "auto") -> Iterator[Prediction]:
    """:func:`predict`'s results one by one, in the order of ``paths`` (folders expanded)."""
    if top < 1:
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
        results = {
            position: Prediction(chunk[position][0], _top(probabilities[row], predictor.spec.class_names, top), flag)
            for row, (position, _, flag) in enumerate(decoded)
        }
        for position, (path, _) in enumerate(chunk):
            yield results[position] if position in results else Prediction(path, error=problems[position])


def _top(probabilities: np.ndarray, class_names, count: int) -> list[tuple[int, str, float]]:
    order = np.argsort(-probabilities, kind="stable")[:count]
    return [(int(index), class_names[index], float(probabilities[index])) for index in order]
