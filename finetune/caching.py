"""Feature caching: run the frozen part of the model once, train the rest.

While a phase trains only the top of the model, and everything below the
trainable part is deterministic (backbone in inference mode, no dropout or
augmentation before the cut), the frozen bottom gives the same numbers every
epoch. Such a phase computes the bottom's output once per split and fits a
"top" model on it. The top model shares its layers (and so its weights) with
the full model: once the phase ends the full model holds the trained weights,
and evaluation and export use it unchanged.

The cut:

* ``trainable: none``: after the head's pooling (or the backbone's output):
  the head trains on one small vector per image.
* ``trainable: {top_blocks: N}``: at the tensors entering the first trainable
  block (two for Xception's residual blocks): each epoch runs only the top
  blocks and the head.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from finetune import backbones
from finetune.model import get_backbone

# Layers whose output depends on ``training`` (random or batch statistics).
_TRAINING_DEPENDENT = (
    keras.layers.Dropout,
    keras.layers.SpatialDropout1D,
    keras.layers.SpatialDropout2D,
    keras.layers.GaussianNoise,
    keras.layers.GaussianDropout,
    keras.layers.AlphaDropout,
)


@dataclass
class CutModels:
    """The frozen bottom and the trainable top of a model, sharing its layers."""

    bottom: keras.Model
    top: keras.Model
    where: str


def plan_cut(model: keras.Model, recipe, phase) -> CutModels | None:
    """Split ``model`` for ``phase``, or None when caching would change the result."""
    spec = backbones.spec_for(recipe.model.backbone)
    backbone = get_backbone(model)
    inference_only = spec.inference_mode and not any(p.train_bn for p in recipe.phases)
    if phase.train_bn:
        return None
    if phase.trainable == "all":
        return None
    if phase.trainable == "none":
        if not inference_only and _training_dependent(backbone.layers):
            return None
        return _cut_before_head(model, backbone)
    _, blocks = backbones.split_into_blocks(backbone, spec)
    top_layers = {id(layer) for block in blocks[-phase.trainable.top_blocks:] for layer in block.layers}
    bottom_layers = [layer for layer in backbone.layers if id(layer) not in top_layers]
    if not inference_only and _training_dependent(bottom_layers):
        return None
    return _cut_inside_backbone(model, backbone, top_layers, inference_only)


def _training_dependent(layers) -> bool:
    # A frozen BatchNorm layer (trainable=False) always runs in inference mode.
    return any(isinstance(layer, _TRAINING_DEPENDENT)
               or (isinstance(layer, keras.layers.BatchNormalization) and layer.trainable) for layer in layers)


def _layers_after(model: keras.Model, name: str) -> list:
    """The layers that follow ``name`` (the head is a chain after the backbone)."""
    names = [layer.name for layer in model.layers]
    return model.layers[names.index(name) + 1:]


def _cut_before_head(model: keras.Model, backbone) -> CutModels:
    start = "head_pool" if any(layer.name == "head_pool" for layer in model.layers) else backbone.name
    head_layers = _layers_after(model, start)
    # The first head layer's first call is in the full model's graph; a nested backbone's own
    # ``.output`` belongs to its inner graph.
    features = head_layers[0]._inbound_nodes[0].input_tensors[0]
    bottom = keras.Model(model.input, features, name="cached_bottom")
    inputs = keras.Input(shape=features.shape[1:], dtype=features.dtype, name="cached_features")
    x = inputs
    for layer in head_layers:
        x = layer(x)
    return CutModels(bottom, keras.Model(inputs, x, name="cached_top"), where=f"after {start}")


def _cut_inside_backbone(model, backbone, top_layers: set, inference_only: bool) -> CutModels:
    # Tensors made outside the trainable blocks and consumed inside them.
    cut, seen = [], set()
    for layer in backbone.layers:
        if id(layer) not in top_layers:
            continue
        for node in layer._inbound_nodes:
            for tensor in node.input_tensors:
                producer = tensor._keras_history.operation
                if id(producer) not in top_layers and id(tensor) not in seen:
                    seen.add(id(tensor))
                    cut.append(tensor)
    inner_bottom = keras.Model(backbone.input, cut, name="backbone_bottom")
    inner_top = keras.Model(cut, backbone.output, name="backbone_top")
    training = False if inference_only else None
    backbone_input = model.get_layer("backbone_input").output
    bottom = keras.Model(model.input, inner_bottom(backbone_input, training=training), name="cached_bottom")
    inputs = [keras.Input(shape=t.shape[1:], dtype=t.dtype, name=f"cached_features_{i}") for i, t in enumerate(cut)]
    x = inner_top(inputs if len(inputs) > 1 else inputs[0], training=training)
    for layer in _layers_after(model, backbone.name):  # pooling and head
        x = layer(x)
    names = ", ".join(t._keras_history.operation.name for t in cut)
    return CutModels(bottom, keras.Model(inputs, x, name="cached_top"), where=f"at {names}")


def feature_bytes(bottom: keras.Model, images: int, dtype: str) -> int:
    per_image = sum(math.prod(t.shape[1:]) for t in _as_list(bottom.output))
    return per_image * images * np.dtype(dtype).itemsize


def choose_storage(setting: str, estimated_bytes: int) -> str:
    """``auto``: memory while the features fit comfortably, else disk."""
    if setting != "auto":
        return setting
    budget = min(2 * 1024**3, _available_memory() // 4)
    return "memory" if estimated_bytes <= budget else "disk"


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def extract(bottom: keras.Model, images: np.ndarray, batch_size: int, dtype: str,
            storage: str, folder: Path | None, name: str) -> list[np.ndarray]:
    """The bottom's outputs for ``images``, computed in chunks into RAM or memory-mapped files."""
    outputs = _as_list(bottom.output)
    arrays = []
    for index, tensor in enumerate(outputs):
        shape = (len(images), *tensor.shape[1:])
        if storage == "disk":
            folder.mkdir(parents=True, exist_ok=True)
            arrays.append(np.lib.format.open_memmap(folder / f"{name}_{index}.npy", mode="w+", dtype=dtype,
                                                    shape=shape))
        else:
            arrays.append(np.empty(shape, dtype=dtype))
    chunk = max(batch_size, 1024)  # bounds what predict holds before it is written out
    for start in range(0, len(images), chunk):
        produced = _as_list(bottom.predict(images[start:start + chunk], batch_size=batch_size, verbose=0))
        for array, values in zip(arrays, produced):
            array[start:start + len(values)] = keras.ops.convert_to_numpy(values).astype(dtype, copy=False)
    for array in arrays:
        if isinstance(array, np.memmap):
            array.flush()
    return arrays


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]
