"""Export: an ONNX file through Keras's ``onnx`` export (tf2onnx), and its reload by ONNX Runtime.

Optional: ``pip install 'finetune[onnx]'`` brings tf2onnx, onnx and onnxruntime.
The file's one input takes raw uint8 images of the stored shape, any batch size.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np


def write_onnx(model, path: Path) -> None:
    """``path`` (ending in ``.onnx``) written by ``model.export(format="onnx")`` (not atomic: the caller's job)."""
    # tf2onnx logs every graph rewrite at INFO and warns about numpy 2; the run's own log says what matters.
    quiet = [logging.getLogger(name) for name in ("tf2onnx", "onnx")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        model.export(str(path), format="onnx", verbose=False)
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


def runtime_name() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


def predict_onnx(path: Path, images: np.ndarray) -> np.ndarray:
    """Class probabilities for ``images`` from an ONNX Runtime session on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    source = session.get_inputs()[0]
    return np.asarray(session.run(None, {source.name: np.ascontiguousarray(images, dtype=np.uint8)})[0])
