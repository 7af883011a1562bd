"""Export: a TensorFlow SavedModel whose ``serve`` takes raw uint8 images."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from finetune.data.input_spec import InputSpec, write_input_spec
from finetune.errors import FinetuneError
from finetune.files import write_text_atomically


def export_saved_model(model, path: Path, class_names, input_spec: InputSpec | None = None) -> Path:
    """Write ``path`` (a SavedModel) and ``labels.txt`` inside it, with ``input.json`` when ``input_spec`` is given.

    ``tf.saved_model.load(path).serve(images)`` takes a batch shaped like
    the dataset's images, dtype uint8, and returns class probabilities.
    """
    path = Path(path)
    try:
        import tensorflow  # noqa: F401  (SavedModel is a TensorFlow format)
    except ImportError:
        raise FinetuneError("export.saved_model needs TensorFlow installed; set export.saved_model: false") from None
    # Written aside and renamed whole: a kill mid-export leaves no half SavedModel under the final name.
    for stale in path.parent.glob(f".{path.name}.partial-*"):  # left by a killed export
        shutil.rmtree(stale, ignore_errors=True)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    model.export(str(partial), format="tf_saved_model", verbose=False)
    write_text_atomically(partial / "labels.txt", "".join(f"{name}\n" for name in class_names))
    if input_spec is not None:
        write_input_spec(partial, input_spec)
    if path.exists():  # an export a resumed run redoes
        shutil.rmtree(path)
    os.replace(partial, path)
    return path
