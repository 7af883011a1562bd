"""Export: a TensorFlow SavedModel whose ``serve`` takes raw uint8 images, and its reload by TensorFlow."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finetune.errors import ExportError
from finetune.files import write_folder_atomically, write_text_atomically


def export_saved_model(model, path: Path, class_names) -> Path:
    """Write ``path`` (a SavedModel) and ``labels.txt`` inside it, whole or not at all.

    ``tf.saved_model.load(path).serve(images)`` takes a batch shaped like
    the dataset's images, dtype uint8, and returns class probabilities.
    """
    return write_folder_atomically(path, lambda folder: write_saved_model(model, folder, class_names))


def write_saved_model(model, folder: Path, class_names) -> None:
    """The SavedModel and its ``labels.txt`` in ``folder`` (not atomic: the caller renames it into place)."""
    try:
        import tensorflow  # noqa: F401  (SavedModel is a TensorFlow format)
    except ImportError:
        raise ExportError(
            "export.formats: saved_model needs TensorFlow installed; take saved_model out of export.formats"
        ) from None
    import keras

    if keras.backend.backend() != "tensorflow" or not _save_traced_once(model, folder):
        model.export(str(folder), format="tf_saved_model", verbose=False)
    write_text_atomically(Path(folder) / "labels.txt", "".join(f"{name}\n" for name in class_names))


def _save_traced_once(model, folder: Path) -> bool:
    """``model.export``'s ``serve`` and ``serving_default``, with the model traced once and each weight written once.

    Keras's exporter traces the model four times and lists every weight twice (as a Keras variable and as
    the tf.Variable its function reads), so Xception's SavedModel took 161 MB against 81 MB and 6.1 s
    against 2.7 s (scripts/export_speed.py). False, with nothing kept, for a model this cannot save
    (one whose function reads a TensorFlow resource that is not a weight); the caller then uses Keras's.
    """
    import shutil

    import tensorflow as tf

    signature = [tf.TensorSpec(shape=tensor.shape, dtype=tensor.dtype, name=tensor.name) for tensor in model.inputs]

    @tf.function(input_signature=signature, autograph=False)
    def serve(images):
        return model(images, training=False)

    module = tf.Module()
    # The tf.Variables the traced function reads: outside an autocast scope ``value`` is the variable itself.
    module.model_variables = [variable.value for variable in model.variables]
    module.serve = serve
    traced = serve.get_concrete_function()
    try:
        tf.saved_model.save(module, str(folder), signatures={"serve": traced, "serving_default": traced})
    except (ValueError, AssertionError):  # an untracked resource: Keras's exporter tracks those
        shutil.rmtree(folder, ignore_errors=True)  # what it wrote before failing; Keras's exporter starts afresh
        return False
    return True


def predict_saved_model(folder: Path, images: np.ndarray) -> np.ndarray:
    """Class probabilities from the SavedModel's ``serve``, loaded by TensorFlow alone (no finetune, no Keras)."""
    import tensorflow as tf

    served = tf.saved_model.load(str(folder))
    return np.asarray(served.serve(tf.constant(images)))
