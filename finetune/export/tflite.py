"""Export: a TFLite (LiteRT) flat buffer through Keras's ``litert`` export, float32 or quantized, and its interpreter.

The file takes raw uint8 images of the stored shape (the preprocessing is
inside the model) and returns class probabilities. Quantization is the
converter's post-training kind: ``float16`` stores the weights as float16
(about half the size), ``dynamic_range`` stores them as int8 and quantizes
activations on the fly (about a quarter).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

FILE_NAMES = {"none": "model.tflite", "float16": "model_float16.tflite", "dynamic_range": "model_dynamic_range.tflite"}


def file_name(quantization: str) -> str:
    return FILE_NAMES[quantization]


def converter_settings(quantization: str) -> dict:
    """``tf.lite.TFLiteConverter`` attributes for ``quantization`` (Keras's litert export sets them)."""
    import tensorflow as tf

    if quantization == "none":
        return {}
    settings: dict = {"optimizations": [tf.lite.Optimize.DEFAULT]}
    if quantization == "float16":
        settings["target_spec"] = {"supported_types": [tf.float16]}
    return settings


def write_tflite(model, path: Path, quantization: str) -> None:
    """``path`` (ending in ``.tflite``) written by ``model.export(format="litert")`` (not atomic: the caller's job)."""
    model.export(str(path), format="litert", verbose=False, **converter_settings(quantization))


def interpreter_class():
    """LiteRT's interpreter (``ai_edge_litert``) where installed, else TensorFlow's ``tf.lite.Interpreter``."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        return tf.lite.Interpreter
    return Interpreter


def runtime_name() -> str:
    interpreter = interpreter_class()
    package = interpreter.__module__.split(".")[0]
    if package == "tensorflow":
        import tensorflow as tf

        return f"tensorflow {tf.__version__} tf.lite.Interpreter"
    from importlib import metadata

    return f"ai_edge_litert {metadata.version('ai-edge-litert')} Interpreter"


def predict_tflite(path: Path, images: np.ndarray) -> np.ndarray:
    """Class probabilities for ``images`` from the interpreter, the whole batch in one invocation."""
    with warnings.catch_warnings():  # tf.lite.Interpreter's notice that LiteRT is its successor
        warnings.simplefilter("ignore")
        interpreter = interpreter_class()(model_path=str(path))
    source = interpreter.get_input_details()[0]
    interpreter.resize_tensor_input(source["index"], images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(source["index"], np.ascontiguousarray(images, dtype=source["dtype"]))
    interpreter.invoke()
    return np.array(interpreter.get_tensor(interpreter.get_output_details()[0]["index"]))
