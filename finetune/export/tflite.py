"""Export: a TFLite (LiteRT) flat buffer through Keras's ``litert`` export, float32 or quantized, and its interpreter.

The file takes raw uint8 images of the stored shape (the preprocessing is
inside the model) and returns class probabilities. Quantization is the
converter's post-training kind: ``float16`` stores the weights as float16
(about half the size), ``dynamic_range`` stores them as int8 and quantizes
activations on the fly (about a quarter), ``int8`` quantizes weights and
activations, each activation's range calibrated by running training images
through the model's own input path (the file takes the same raw uint8
pixels), for integer-only accelerators and microcontrollers.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

FILE_NAMES = {
    "none": "model.tflite",
    "float16": "model_float16.tflite",
    "dynamic_range": "model_dynamic_range.tflite",
    "int8": "model_int8.tflite",
}
_CALIBRATION_BATCH = 16


def file_name(quantization: str) -> str:
    return FILE_NAMES[quantization]


def calibration_sample(images, count: int, seed: int) -> np.ndarray:
    """``count`` training images (all when fewer), drawn at random with ``seed``, read in index order."""
    chosen = np.sort(np.random.default_rng(seed).permutation(len(images))[:count])
    return np.asarray(images[chosen] if isinstance(images, np.ndarray) else [images[i] for i in chosen])


def converter_settings(quantization: str, calibration: np.ndarray | None = None, output: str = "float32") -> dict:
    """``tf.lite.TFLiteConverter`` attributes for ``quantization`` (Keras's litert export sets them).

    ``int8`` needs ``calibration``: uint8 images of the model's input shape; ``output`` is the output
    tensor's type (float32, or uint8/int8 with the scale and zero point the interpreter reports).
    """
    import tensorflow as tf

    if quantization == "none":
        return {}
    settings: dict = {"optimizations": [tf.lite.Optimize.DEFAULT]}
    if quantization == "float16":
        settings["target_spec"] = {"supported_types": [tf.float16]}
    if quantization == "int8":
        if calibration is None or not len(calibration):
            raise ValueError("int8 quantization needs calibration images")
        images = np.asarray(calibration)

        def representative_dataset():
            for start in range(0, len(images), _CALIBRATION_BATCH):
                yield [images[start : start + _CALIBRATION_BATCH]]

        settings["representative_dataset"] = representative_dataset
        settings["target_spec"] = {"supported_ops": [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]}
        if output != "float32":
            settings["inference_output_type"] = {"uint8": tf.uint8, "int8": tf.int8}[output]
    return settings


def write_tflite(
    model, path: Path, quantization: str, calibration: np.ndarray | None = None, output: str = "float32"
) -> None:
    """``path`` (ending in ``.tflite``) written by ``model.export(format="litert")`` (not atomic: the caller's job)."""
    model.export(str(path), format="litert", verbose=False, **converter_settings(quantization, calibration, output))


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
    target = interpreter.get_output_details()[0]
    output = np.array(interpreter.get_tensor(target["index"]))
    scale, zero_point = target["quantization"]
    if output.dtype in (np.uint8, np.int8) and scale:  # an int8 file's integer output: back to probabilities
        return (output.astype(np.float32) - zero_point) * scale
    return output


def tensor_types(path: Path) -> dict:
    """The file's input and output tensor types, and the output's (scale, zero point) when it is integer."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = interpreter_class()(model_path=str(path))
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    types = {"input": np.dtype(source["dtype"]).name, "output": np.dtype(target["dtype"]).name}
    if types["output"] in ("uint8", "int8"):
        types["output_scale"], types["output_zero_point"] = map(float, target["quantization"])
    return types
