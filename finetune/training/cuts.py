"""Where to cut a model so its frozen bottom can run once and its top train on the result.

* ``trainable: none``: after the head's pooling (or the backbone's output):
  the head trains on one small vector per image.
* ``trainable: {top_blocks: N}``: at the tensors entering the first trainable
  block (two for Xception's residual blocks): each epoch runs only the top
  blocks and the head.

The bottom and the top share the full model's layers (and so its weights).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras

from finetune._keras_compat import calls_in_graph, producer
from finetune.backbones.spec import BackboneLayout
from finetune.catalog.augment import augmentation_layers
from finetune.recipe import PhaseConfig, TopBlocks

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
    """The frozen bottom and the trainable top of a model, sharing its layers.

    ``inner_cut`` are the backbone's own tensors where the bottom ends (its
    output for a cut before the head), ``after_backbone`` the layers that turn
    them into the top's input (the head's pooling), and ``frozen`` the ids of
    the backbone layers whose weights the bottom's output depends on.
    """

    bottom: keras.Model
    top: keras.Model
    where: str
    inner_cut: list
    after_backbone: list
    frozen: frozenset
    training: bool | None = False

    @property
    def key(self) -> tuple:
        return self.frozen, self.where


def plan_cut(
    model: keras.Model, layout: BackboneLayout, phase: PhaseConfig, augmented_views: int = 0
) -> CutModels | None:
    """Split ``model`` for ``phase``, or None when caching would change the result.

    Augmented images differ every epoch, so nothing below the augmentation
    can be computed once, unless the caller computes the bottom for a fixed
    number of augmented copies (``augmented_views``).
    """
    backbone = layout.backbone
    if phase.train_bn or (augmentation_layers(model) and not augmented_views):
        return None
    if phase.trainable == "all":
        return None
    if phase.trainable == "none":
        if not layout.inference_only and _training_dependent(backbone.layers):
            return None
        return _cut_before_head(model, backbone)
    assert isinstance(phase.trainable, TopBlocks)
    top_layers = {id(layer) for block in layout.top(phase.trainable.top_blocks) for layer in block.layers}
    bottom_layers = [layer for layer in backbone.layers if id(layer) not in top_layers]
    if not layout.inference_only and _training_dependent(bottom_layers):
        return None
    return _cut_inside_backbone(model, backbone, top_layers, layout.inference_only)


def _training_dependent(layers: Sequence[Any]) -> bool:
    # A frozen BatchNorm layer (trainable=False) always runs in inference mode.
    return any(
        isinstance(layer, _TRAINING_DEPENDENT)
        or (isinstance(layer, keras.layers.BatchNormalization) and layer.trainable)
        for layer in layers
    )


def _layers_after(model: keras.Model, name: str) -> list:
    """The layers that follow ``name`` (the head is a chain after the backbone)."""
    names = [layer.name for layer in model.layers]
    return model.layers[names.index(name) + 1 :]


def _cut_before_head(model: keras.Model, backbone: keras.Model) -> CutModels:
    start = "head_pool" if any(layer.name == "head_pool" for layer in model.layers) else backbone.name
    head_layers = _layers_after(model, start)
    # The first head layer's first call is in the full model's graph; a nested backbone's own
    # ``.output`` belongs to its inner graph.
    features = calls_in_graph(head_layers[0], model)[0].input_tensors[0]
    bottom = keras.Model(model.input, features, name="cached_bottom")
    inputs = keras.Input(shape=features.shape[1:], dtype=features.dtype, name="cached_features")
    x = inputs
    for layer in head_layers:
        x = layer(x)
    after_backbone = [] if start == backbone.name else _layers_after(model, backbone.name)[:1]
    return CutModels(
        bottom,
        keras.Model(inputs, x, name="cached_top"),
        where=f"after {start}",
        inner_cut=list(backbone.outputs),
        after_backbone=after_backbone,
        frozen=frozenset(id(layer) for layer in backbone.layers),
    )


def _cut_inside_backbone(model: keras.Model, backbone: keras.Model, top_layers: set, inference_only: bool) -> CutModels:
    # Tensors made outside the trainable blocks and consumed inside them.
    cut, seen = [], set()
    for layer in backbone.layers:
        if id(layer) not in top_layers:
            continue
        for node in calls_in_graph(layer, backbone):
            for tensor in node.input_tensors:
                if id(producer(tensor)) not in top_layers and id(tensor) not in seen:
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
    names = ", ".join(getattr(producer(t), "name", "input") for t in cut)
    frozen = frozenset(id(layer) for layer in backbone.layers if id(layer) not in top_layers)
    return CutModels(
        bottom,
        keras.Model(single(inputs), x, name="cached_top"),  # one input as itself: Keras warns about a list of one
        where=f"at {names}",
        inner_cut=cut,
        after_backbone=[],
        frozen=frozen,
        training=training,
    )


def bridge(source: CutModels, target: CutModels) -> keras.Model:
    """From ``source``'s features to ``target``'s, for a source at or below the target's cut."""
    inputs = [
        keras.Input(shape=t.shape[1:], dtype=t.dtype, name=f"kept_features_{i}") for i, t in enumerate(source.inner_cut)
    ]
    between = keras.Model(single(source.inner_cut), single(target.inner_cut), name="frozen_between")
    x = between(inputs if len(inputs) > 1 else inputs[0], training=target.training)
    for layer in target.after_backbone:
        x = layer(x)
    return keras.Model(inputs, x, name="cached_bridge")


def single(arrays: list) -> Any:
    """One array as itself, several as a list (a model's single input or output is not a list)."""
    return arrays[0] if len(arrays) == 1 else arrays
