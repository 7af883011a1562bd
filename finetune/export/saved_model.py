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
    model.export(str(folder), format="tf_saved_model", verbose=False)
    write_text_atomically(Path(folder) / "labels.txt", "".join(f"{name}\n" for name in class_names))


def predict_saved_model(folder: Path, images: np.ndarray) -> np.ndarray:
    """Class probabilities from the SavedModel's ``serve``, loaded by TensorFlow alone (no finetune, no Keras)."""
    import tensorflow as tf

    served = tf.saved_model.load(str(folder))
    return np.asarray(served.serve(tf.constant(images)))
