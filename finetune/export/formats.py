"""The export formats, in the Keras ``get(identifier)`` style, and the step that writes and verifies them.

Every artifact is written aside, loaded again by its own runtime (Keras,
TensorFlow, the TFLite interpreter, ONNX Runtime), its predictions on a few
test images compared with the Keras model's, and only then renamed into
place: a file under a format's name always agrees with the model.
"""

from __future__ import annotations

import importlib.util
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from finetune.catalog.augment import augmentation_layers
from finetune.errors import ExportError, describe
from finetune.export import onnx_file, saved_model, tflite
from finetune.export.verify import TOLERANCES, agreement, check
from finetune.files import write_atomically, write_folder_atomically, write_text_atomically
from finetune.recipe.schema import EXPORT_PACKAGES
from finetune.registry import Registry

#: The run's export check images (uint8, the model's input shape), kept in its folder by the run.
VERIFY_IMAGES_FILE = "export_check_images.npy"


@dataclass(frozen=True)
class ExportFormat:
    """How one format is written, named, and read back by its own runtime."""

    file_name: Callable[[str], str]
    """quantization -> the artifact's name in the run folder"""
    write: Callable[..., None]
    """(model, path to write, quantization, class names); the caller makes it atomic. A quantized format's
    writer also takes ``calibration`` (uint8 training images) and ``output`` (its output tensor's type)."""
    predict: Callable[[Path, np.ndarray], np.ndarray]
    """(artifact, uint8 images) -> class probabilities, by the format's own runtime"""
    runtime: Callable[[], str]
    packages: tuple[str, ...] = ()
    needs_tensorflow_backend: bool = False
    quantized: bool = False
    folder: bool = False
    describe: Callable[[Path], dict] | None = None
    """facts about a written file that metrics.json records (a TFLite file's tensor types)"""


def _write_keras(model, path: Path, quantization: str, class_names) -> None:
    model.save(path)


def _predict_keras(path: Path, images: np.ndarray) -> np.ndarray:
    """A ``.keras`` file's deterministic predictions (its MC dropout and augmentation off), as the artifacts'."""
    # Imported here, as Keras is: this module's import stays light for the CLI's format checks.
    from finetune.model import load_model

    return for_serving(load_model(path, compile=False)).predict_on_batch(images)


def _keras_runtime() -> str:
    import keras

    return f"keras {keras.__version__} load_model"


def _tensorflow_runtime() -> str:
    import tensorflow as tf

    return f"tensorflow {tf.__version__} saved_model.load"


formats: Registry[ExportFormat] = Registry(
    "export_formats",
    builtins=lambda: {
        "keras": ExportFormat(lambda _: "model.keras", _write_keras, _predict_keras, _keras_runtime),
        "saved_model": ExportFormat(
            lambda _: "saved_model",
            lambda model, path, _, names: saved_model.write_saved_model(model, path, names),
            saved_model.predict_saved_model,
            _tensorflow_runtime,
            packages=EXPORT_PACKAGES["saved_model"],
            folder=True,
        ),
        "tflite": ExportFormat(
            tflite.file_name,
            lambda model, path, quantization, _, **options: tflite.write_tflite(model, path, quantization, **options),
            tflite.predict_tflite,
            tflite.runtime_name,
            packages=EXPORT_PACKAGES["tflite"],
            needs_tensorflow_backend=True,
            quantized=True,
            describe=lambda path: {"tensors": tflite.tensor_types(path)},
        ),
        "onnx": ExportFormat(
            lambda _: "model.onnx",
            lambda model, path, _, names: onnx_file.write_onnx(model, path),
            onnx_file.predict_onnx,
            onnx_file.runtime_name,
            packages=EXPORT_PACKAGES["onnx"],
            needs_tensorflow_backend=True,
        ),
    },
)


def get(name: str) -> ExportFormat:
    """The format called ``name`` (keras, saved_model, tflite, onnx); unknown names are one line."""
    return formats.entry(name)


def artifact_key(name: str, quantization: str) -> str:
    """The key in ``metrics.json``'s ``export`` part: the format, and a quantized tflite's kind (tflite_float16)."""
    return name if not get(name).quantized or quantization == "none" else f"{name}_{quantization}"


def check_available(names: Sequence[str]) -> None:
    """One line naming the first missing package (or the wrong Keras backend) before anything is written."""
    import keras

    for name in names:
        entry = get(name)
        missing = [package for package in entry.packages if importlib.util.find_spec(package) is None]
        if missing:
            hint = " (pip install 'finetune[onnx]')" if name == "onnx" else ""
            raise ExportError(f"export.formats: {name} needs the {', '.join(missing)} package(s){hint}")
        if entry.needs_tensorflow_backend and keras.backend.backend() != "tensorflow":
            raise ExportError(
                f"export.formats: {name} is written through TensorFlow; this process runs the "
                f"{keras.backend.backend()} backend (set KERAS_BACKEND=tensorflow)"
            )


def export_all(
    model,
    run_dir: Path,
    names: Sequence[str],
    quantization: str,
    class_names: Sequence[str],
    images: np.ndarray,
    keep_existing_keras: bool = True,
    calibration: np.ndarray | None = None,
    tflite_io: str = "float32",
    reference: np.ndarray | None = None,
) -> dict[str, dict]:
    """Write each format into ``run_dir``, verified against ``model`` on ``images``; ``labels.txt`` beside them.

    Returns ``metrics.json``'s ``export`` part: per artifact its file, size,
    runtime, quantization, max absolute probability difference and top-1
    agreement with the Keras model, the tolerance it passed, and the seconds
    its writing and check took. A format
    that cannot be written or disagrees gets ``{"file", "format",
    "quantization", "error"}`` instead (nothing is left under its name; see :func:`failures`). An
    existing ``model.keras`` (the run's own) is verified, not rewritten,
    unless ``keep_existing_keras`` is false. ``calibration`` (uint8 training images) and ``tflite_io`` go to
    an ``int8`` quantization. ``reference``: the model's probabilities for ``images`` when the caller has
    them (the evaluation's); used only where the served model is the model itself.
    """
    run_dir = Path(run_dir)
    images = np.asarray(images)
    serving = for_serving(model)
    if reference is None or serving is not model or len(reference) != len(images):
        reference = serving.predict_on_batch(images)  # one batch: no input pipeline
    model = serving
    half_precision = model.dtype_policy.compute_dtype in ("float16", "bfloat16")  # a mixed precision run
    results: dict[str, dict] = {}
    for name in names:
        entry = get(name)
        kind = quantization if entry.quantized else "none"
        key = artifact_key(name, kind)
        path = run_dir / entry.file_name(kind)
        measured: dict = {}
        began = time.perf_counter()

        def write_and_verify(target: Path, entry=entry, kind=kind, key=key, measured=measured) -> None:
            with warnings.catch_warnings():
                # What Keras's exporters say on every export, about themselves (a traced call's input
                # structure, tf2onnx's numpy 2 patch), not about the model.
                warnings.filterwarnings("ignore", message="The structure of `inputs` doesn't match")
                warnings.filterwarnings("ignore", message="In the future `np.object`")
                if kind == "int8":
                    if calibration is None:
                        raise ExportError(f"export {key}: int8 quantization needs calibration images")
                    entry.write(model, target, kind, class_names, calibration=calibration, output=tflite_io)
                else:
                    entry.write(model, target, kind, class_names)
            measured.update(verify(entry, key, kind, target, images, reference, half_precision))
            if entry.describe is not None:
                measured.update(entry.describe(target))

        try:
            check_available([name])
            if name == "keras" and keep_existing_keras and path.is_file():
                measured.update(verify(entry, key, kind, path, images, reference, half_precision))
            elif entry.folder:
                write_folder_atomically(path, write_and_verify)
            else:
                write_atomically(path, write_and_verify)
        except ExportError as error:
            # One format that cannot be written or read back costs that format, not the others or the run.
            results[key] = {"file": path.name, "format": name, "quantization": kind, "error": str(error)}
            results[key]["seconds"] = round(time.perf_counter() - began, 2)
            continue
        results[key] = {"file": path.name, "bytes": _size(path), "runtime": entry.runtime(), "quantization": kind}
        results[key].update(measured)
        results[key]["seconds"] = round(time.perf_counter() - began, 2)
    if any(not get(name).folder for name in names):
        write_text_atomically(run_dir / "labels.txt", "".join(f"{label}\n" for label in class_names))
    return results


def failures(results: dict[str, dict]) -> dict[str, str]:
    """The formats of :func:`export_all`'s ``results`` that failed, with their one-line reasons."""
    return {key: result["error"] for key, result in results.items() if "error" in result}


def for_serving(model):
    """``model`` with its augmentation and MC dropout layers replaced by identities, sharing every other
    layer and weight.

    An exporter traces the model without a ``training`` flag, and Keras's random image layers
    default to training there: a trained model's SavedModel translated every image it served. MC
    dropout stays on at inference by design; a served model answers the same image the same way,
    so the artifacts are its deterministic form (``finetune evaluate`` averages the stochastic passes
    of ``model.keras``, which keeps the layers).
    """
    import keras

    # Imported here, as Keras is: this module's import stays light for the CLI's format checks.
    from finetune.backbones.blocks import nested_layers
    from finetune.catalog.regularizers import MCDropout

    replaced = {id(layer) for layer in augmentation_layers(model)}
    stochastic = {id(layer) for layer in nested_layers(model) if isinstance(layer, MCDropout)}
    if not replaced | stochastic:
        return model
    return keras.models.clone_model(
        model,
        clone_function=lambda layer: (
            keras.layers.Identity(name=layer.name) if id(layer) in replaced | stochastic else layer
        ),
        recursive=bool(stochastic),  # MC dropout may sit inside a nested backbone (the mlp's)
    )


def verify(
    entry: ExportFormat,
    key: str,
    kind: str,
    path: Path,
    images: np.ndarray,
    reference: np.ndarray,
    half_precision: bool = False,
) -> dict:
    """The artifact at ``path`` read back by its runtime; its agreement with ``reference``, or an ExportError.

    A model that computes in float16 (mixed precision) is held to the float16 tolerance at least.
    """
    try:
        predicted = entry.predict(path, images)
    except Exception as error:
        hint = " (a mixed precision model: try precision: float32)" if half_precision else ""
        raise ExportError(
            f"export {key}: {entry.runtime()} cannot run the written file ({describe(error)}){hint}; "
            "nothing was written under its name"
        ) from error
    tolerance = TOLERANCES["float16"] if half_precision and kind == "none" else TOLERANCES[kind]
    return check(key, agreement(reference, predicted), tolerance)


def _size(path: Path) -> int:
    if path.is_dir():
        return sum(item.stat().st_size for item in path.rglob("*") if item.is_file())
    return path.stat().st_size
