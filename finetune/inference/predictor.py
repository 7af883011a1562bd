"""A trained model loaded for prediction: a run folder (``model.keras``) or an exported SavedModel, with its input."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from finetune.data.input_spec import INPUT_FILE, THRESHOLDS_FILE, InputSpec, read_input_spec, read_thresholds
from finetune.errors import ModelError, first_line

_BATCH = 256
_FASHION_MNIST_SHAPE = (28, 28, 1)
_EXPORTS_NOT_READ = (".onnx", ".tflite")  # predicted by their own runtimes, not here


@dataclass
class Predictor:
    """``predict(images)``: uint8 images of ``spec.shape`` to class probabilities.

    ``notes`` says what had to be assumed (a model saved before ``input.json`` existed). ``thresholds``:
    a multi-label model's per-tag thresholds (its ``thresholds.json``), None for a single-label one.
    """

    spec: InputSpec
    kind: str  # "keras" or "saved_model"
    path: Path
    _probabilities: Callable[[np.ndarray], np.ndarray]
    notes: list[str] = field(default_factory=list)
    thresholds: np.ndarray | None = None
    keras_model: object | None = None  # the Keras model itself (heatmaps need it); None for a SavedModel

    def predict(self, images) -> np.ndarray:
        """Probabilities ``(N, classes)``, float32, for uint8 ``images`` of shape ``(N, *spec.shape)``."""
        images = np.asarray(images)
        if images.dtype != np.uint8 or tuple(images.shape[1:]) != self.spec.shape:
            raise ModelError(
                f"the model takes uint8 images of shape {self.spec.shape}, got {images.dtype} {images.shape[1:]}"
            )
        if not len(images):
            return np.zeros((0, len(self.spec.class_names)), np.float32)
        parts = [self._probabilities(images[start : start + _BATCH]) for start in range(0, len(images), _BATCH)]
        return np.concatenate(parts).astype(np.float32)


def load_predictor(path: str | Path) -> Predictor:
    """The model at ``path``: a run folder, a ``.keras`` file, or a SavedModel folder (``saved_model.pb``).

    An exported ``.onnx`` or ``.tflite`` file is a one-line ModelError naming the folder to give instead.
    """
    path = Path(path)
    if not path.exists():
        raise ModelError(f"model {path} does not exist")
    if path.is_dir() and (path / "saved_model.pb").is_file():
        return _saved_model(path)
    if path.is_file() and path.suffix.lower() in _EXPORTS_NOT_READ:
        # What `finetune export` writes for other runtimes: the folder it was written into is what predict reads.
        run = f" ({path.parent})" if (path.parent / "model.keras").is_file() else ""
        raise ModelError(f"{path} is a {path.suffix.lower()} file: use the run folder{run} or its saved_model folder")
    if path.is_file() or (path / "model.keras").is_file():
        return _keras_model(path)
    if (path / "saved_model" / "saved_model.pb").is_file():  # a run folder whose model.keras was removed
        return _saved_model(path / "saved_model")
    raise ModelError(f"{path} is neither a run folder (with model.keras) nor a SavedModel folder (with saved_model.pb)")


def _keras_model(path: Path) -> Predictor:
    # Imported here, as Keras is: a SavedModel or TFLite predictor never loads Keras.
    from finetune.catalog.layers import is_multi_label
    from finetune.model import load_model

    try:
        model = load_model(path, compile=False)
    except Exception as error:  # noqa: BLE001 - Keras raises many kinds for a bad file
        raise ModelError(f"cannot load model {path}: {first_line(error)}") from None
    folder = path if path.is_dir() else path.parent
    shape = tuple(int(size) for size in model.input_shape[1:])
    spec, notes = _spec(folder, shape, int(model.output_shape[-1]))
    # An MC dropout model answers with the mean of the passes its run was evaluated with, as
    # `finetune evaluate` does: one stochastic pass would answer the same image differently each call.
    passes = max(_recipe_evaluation(folder).get("mc_samples") or 0, 1)
    if passes > 1:
        notes.append(f"each answer is the mean of {passes} MC dropout passes (the run's evaluation.mc_samples)")

    def probabilities(images: np.ndarray) -> np.ndarray:
        # predict_on_batch runs the compiled graph (tf.function, jax.jit): on EfficientNet-Lite0 one image
        # took 10 ms against 196 ms for an eager call, which dispatches every op from Python
        # (scripts/predict_speed.py).
        total = sum(np.asarray(model.predict_on_batch(images)) for _ in range(passes))
        return np.asarray(total) / passes

    thresholds = read_thresholds(folder, spec.class_names)
    if thresholds is None and is_multi_label(model):
        thresholds = np.full(len(spec.class_names), 0.5)
        notes.append(f"{folder} has no {THRESHOLDS_FILE}: every tag's threshold is 0.5")
    return Predictor(spec, "keras", path, probabilities, notes, thresholds, keras_model=model)


def _saved_model(path: Path) -> Predictor:
    try:
        import tensorflow as tf
    except ImportError:
        raise ModelError(f"{path} is a SavedModel: reading it needs TensorFlow installed") from None
    try:
        loaded = tf.saved_model.load(str(path))
        signature = loaded.signatures["serve"]
    except Exception as error:  # noqa: BLE001
        raise ModelError(f"cannot load SavedModel {path}: {first_line(error)}") from None
    input_spec = next(iter(signature.structured_input_signature[1].values()))
    output_spec = next(iter(signature.structured_outputs.values()))
    shape = tuple(int(size) for size in input_spec.shape.as_list()[1:])
    spec, notes = _spec(path, shape, int(output_spec.shape[-1]), also=path.parent)

    def probabilities(images: np.ndarray) -> np.ndarray:
        return loaded.serve(tf.constant(images)).numpy()

    thresholds = read_thresholds(path, spec.class_names)
    if thresholds is None and (path.parent / "saved_model").resolve() == path.resolve():
        thresholds = read_thresholds(path.parent, spec.class_names)  # a run's saved_model/ written before them
    return Predictor(spec, "saved_model", path, probabilities, notes, thresholds)


def _spec(folder: Path, shape: tuple, classes: int, also: Path | None = None) -> tuple[InputSpec, list[str]]:
    """The model's ``input.json`` (in ``folder``, else ``also``), or what can be told without it."""
    for place in [folder] if also is None else [folder, also]:
        spec = read_input_spec(place)
        if spec is not None:
            if spec.shape != shape or len(spec.class_names) != classes:
                raise ModelError(
                    f"{place / INPUT_FILE} describes {spec.shape} images and {len(spec.class_names)} classes, "
                    f"but the model takes {shape} and gives {classes}"
                )
            return spec, []
    names = _class_names(folder, classes) or _class_names(also, classes) or tuple(str(i) for i in range(classes))
    resize = _recipe_resize(folder) or _recipe_resize(also) or "crop"
    if shape == _FASHION_MNIST_SHAPE:
        background = "dark"
        note = "assuming light-on-dark images (as Fashion-MNIST's) for this 28x28 grey model"
    else:
        background = "unknown"
        note = "--invert auto leaves every image as it is"
    notes = [f"{folder} has no {INPUT_FILE} (saved by an older finetune); {note}"]
    return InputSpec(shape=shape, resize=resize, class_names=names, background=background), notes


def _class_names(folder: Path | None, classes: int) -> tuple[str, ...] | None:
    """Class names from an older model's ``labels.txt`` or ``metrics.json``, when they fit the model."""
    if folder is None:
        return None
    candidates = []
    for labels in (folder / "labels.txt", folder / "saved_model" / "labels.txt"):
        if labels.is_file():
            candidates.append(tuple(labels.read_text().splitlines()))
    metrics = folder / "metrics.json"
    if metrics.is_file():
        with contextlib.suppress(ValueError, KeyError, TypeError):  # an unreadable file only loses the names
            candidates.append(tuple(json.loads(metrics.read_text())["test"]["class_names"]))
    return next((names for names in candidates if len(names) == classes), None)


def _recipe_resize(folder: Path | None) -> str | None:
    """``data.resize`` of the run's ``recipe.yaml`` (an older run folder's only record of it)."""
    resize = _recipe_section(folder, "data").get("resize")
    return resize if resize in ("crop", "pad", "stretch") else None


def _recipe_evaluation(folder: Path) -> dict:
    """``evaluation`` of the run's ``recipe.yaml``; empty for a bare ``.keras`` file's folder."""
    return _recipe_section(folder, "evaluation")


def _recipe_section(folder: Path | None, section: str) -> dict:
    if folder is None or not (folder / "recipe.yaml").is_file():
        return {}
    import yaml

    try:
        part = yaml.safe_load((folder / "recipe.yaml").read_text())[section]
    except Exception:  # noqa: BLE001 - an unreadable recipe only loses the hint
        return {}
    return part if isinstance(part, dict) else {}
