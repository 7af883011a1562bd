"""Request bodies to the model's stored input: TF Serving's JSON (nested uint8 lists or ``{"b64": ...}`` image
files) and uploaded image files, each problem a :class:`BadRequest` naming it in one line."""

from __future__ import annotations

import base64
import binascii
import io
import json

import numpy as np

from finetune.data.input_spec import InputSpec
from finetune.errors import DataError, first_line
from finetune.inference.images import load_stored


class BadRequest(Exception):
    """A request the server refuses: ``status`` (4xx) and a one-line ``message`` for ``{"error": ...}``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def decode_image(data: bytes, name: str, spec: InputSpec, invert: str, max_pixels: int) -> tuple[np.ndarray, bool]:
    """An image file's bytes as the model's stored input, decoded as ``finetune predict`` decodes a file."""
    if not data:
        raise BadRequest(400, f"{name} is empty")
    try:
        return load_stored(io.BytesIO(data), spec, invert, name=name, max_pixels=max_pixels)
    except DataError as error:
        raise BadRequest(400, first_line(error)) from None


def parse_json(body: bytes) -> dict:
    if not body:
        raise BadRequest(400, "the request body is empty: send a JSON object with instances or inputs")
    try:
        document = json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise BadRequest(400, f"the body is not valid JSON: {first_line(error)}") from None
    if not isinstance(document, dict):
        raise BadRequest(400, "the body must be a JSON object with instances or inputs")
    return document


def tensorflow_serving_images(
    document: dict, spec: InputSpec, input_name: str, invert: str, max_pixels: int
) -> tuple[np.ndarray, str]:
    """The images of a TF Serving predict request, and the key its answer goes under.

    Row format ``{"instances": [...]}`` is answered under ``predictions``; columnar ``{"inputs": ...}``
    under ``outputs``, as TF Serving answers them. An instance is a nested list of integers 0-255 in the
    stored shape, ``{"b64": "..."}`` holding an image file, or either of them under the input's name.
    """
    signature = document.get("signature_name", "serving_default")
    if signature not in ("serving_default", "serve"):
        raise BadRequest(400, f"unknown signature_name {signature!r}: this model has serving_default")
    if ("instances" in document) == ("inputs" in document):
        raise BadRequest(400, "the body needs exactly one of instances (row format) or inputs (columnar format)")
    if "instances" in document:
        field, rows, answer_key = "instances", document["instances"], "predictions"
    else:
        field, rows, answer_key = "inputs", document["inputs"], "outputs"
        if isinstance(rows, dict):
            rows = _named(rows, input_name, "inputs")
    if isinstance(rows, dict) and "b64" in rows:
        rows = [rows]  # one image, unbatched, as a columnar request may send it
    if not isinstance(rows, list) or not rows:
        raise BadRequest(400, f"{field} must be a non-empty list")
    images = [_instance(row, position, spec, input_name, invert, max_pixels) for position, row in enumerate(rows)]
    return np.stack(images), answer_key


def _named(value: dict, input_name: str, where: str):
    if set(value) != {input_name}:
        raise BadRequest(400, f"{where} names {sorted(value)}; this model's one input is {input_name!r}")
    return value[input_name]


def _instance(row, position: int, spec: InputSpec, input_name: str, invert: str, max_pixels: int) -> np.ndarray:
    if isinstance(row, dict) and "b64" not in row:
        row = _named(row, input_name, f"instance {position}")
    if isinstance(row, dict):
        encoded = row["b64"]
        if not isinstance(encoded, str):
            raise BadRequest(400, f"instance {position}: b64 must be a string")
        try:
            data = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest(400, f"instance {position}: b64 is not valid base64") from None
        return decode_image(data, f"instance {position}", spec, invert, max_pixels)[0]
    try:
        array = np.array(row)
    except (ValueError, TypeError):
        shape = list(spec.shape)
        raise BadRequest(400, f"instance {position}: a ragged list; the model takes {shape} arrays") from None
    if array.dtype.kind not in "iu" or array.dtype == np.bool_:
        kind = "numbers" if array.dtype.kind == "f" else f"{array.dtype.kind!r} values"
        raise BadRequest(400, f"instance {position}: {kind}; the model takes integers 0-255 (uint8)")
    if tuple(array.shape) != spec.shape:
        raise BadRequest(400, f"instance {position}: shape {list(array.shape)}; the model takes {list(spec.shape)}")
    if array.size and (array.min() < 0 or array.max() > 255):
        raise BadRequest(400, f"instance {position}: values outside 0-255; the model takes uint8")
    return array.astype(np.uint8)
