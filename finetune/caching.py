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

A :class:`FeatureStore` keeps the extracted outputs across phases while the
layers below the cut stay frozen, so a run of a head phase and then a
top-block phase runs the frozen bottom once: the head phase extracts at the
later phase's (lower) cut and computes its pooled features from there.
"""

from __future__ import annotations

import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras
import numpy as np

from finetune import backbones
from finetune.model import backbone_inference_only, get_backbone

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


def plan_cut(model: keras.Model, recipe, phase) -> CutModels | None:
    """Split ``model`` for ``phase``, or None when caching would change the result."""
    spec = backbones.spec_for(recipe.model.backbone)
    backbone = get_backbone(model)
    inference_only = backbone_inference_only(recipe, spec)
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


def _graph_nodes(layer, graph: keras.Model) -> list:
    """The calls of ``layer`` that belong to ``graph`` (cut models add calls of their own)."""
    from keras.src.ops.function import make_node_key

    return [node for index, node in enumerate(layer._inbound_nodes) if make_node_key(layer, index) in graph._nodes]


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
    features = _graph_nodes(head_layers[0], model)[0].input_tensors[0]
    bottom = keras.Model(model.input, features, name="cached_bottom")
    inputs = keras.Input(shape=features.shape[1:], dtype=features.dtype, name="cached_features")
    x = inputs
    for layer in head_layers:
        x = layer(x)
    after_backbone = [] if start == backbone.name else _layers_after(model, backbone.name)[:1]
    return CutModels(bottom, keras.Model(inputs, x, name="cached_top"), where=f"after {start}",
                     inner_cut=list(backbone.outputs), after_backbone=after_backbone,
                     frozen=frozenset(id(layer) for layer in backbone.layers))


def _cut_inside_backbone(model, backbone, top_layers: set, inference_only: bool) -> CutModels:
    # Tensors made outside the trainable blocks and consumed inside them.
    cut, seen = [], set()
    for layer in backbone.layers:
        if id(layer) not in top_layers:
            continue
        for node in _graph_nodes(layer, backbone):
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
    frozen = frozenset(id(layer) for layer in backbone.layers if id(layer) not in top_layers)
    return CutModels(bottom, keras.Model(inputs, x, name="cached_top"), where=f"at {names}", inner_cut=cut,
                     after_backbone=[], frozen=frozen, training=training)


def bridge(source: CutModels, target: CutModels) -> keras.Model:
    """From ``source``'s features to ``target``'s, for a source at or below the target's cut."""
    inputs = [keras.Input(shape=t.shape[1:], dtype=t.dtype, name=f"kept_features_{i}")
              for i, t in enumerate(source.inner_cut)]
    between = keras.Model(_single(source.inner_cut), _single(target.inner_cut), name="frozen_between")
    x = between(inputs if len(inputs) > 1 else inputs[0], training=target.training)
    for layer in target.after_backbone:
        x = layer(x)
    return keras.Model(inputs, x, name="cached_bridge")


def feature_bytes(bottom: keras.Model, images: int, dtype: str) -> int:
    per_image = sum(math.prod(t.shape[1:]) for t in _as_list(bottom.output))
    return per_image * images * np.dtype(dtype).itemsize


def choose_storage(setting: str, estimated_bytes: int, folder: Path | None = None) -> str:
    """``auto``: memory while the features fit comfortably, else disk; ``off`` when neither has room."""
    if setting != "auto":
        return setting
    budget = min(2 * 1024**3, _available_memory() // 4)
    if estimated_bytes <= budget:
        return "memory"
    # Leave the disk room for checkpoints and the saved model: a full disk would fail the run.
    return "disk" if estimated_bytes * 1.05 + 2 * 1024**3 <= _free_disk(folder) else "off"


def _free_disk(folder: Path | None) -> int:
    import tempfile

    place = Path(folder) if folder is not None else Path(tempfile.gettempdir())
    while not place.exists() and place != place.parent:
        place = place.parent
    return shutil.disk_usage(place).free


def _available_memory() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def extract(bottom: keras.Model, images, batch_size: int, dtype: str,
            storage: str, folder: Path | None, name: str) -> list[np.ndarray]:
    """The bottom's outputs for ``images`` (an array or a list of arrays), in chunks into RAM or files."""
    outputs = _as_list(bottom.output)
    inputs = _as_list(images)
    rows = len(inputs[0])
    arrays = []
    for index, tensor in enumerate(outputs):
        shape = (rows, *tensor.shape[1:])
        if storage == "disk":
            folder.mkdir(parents=True, exist_ok=True)
            arrays.append(np.lib.format.open_memmap(folder / f"{name}_{index}.npy", mode="w+", dtype=dtype,
                                                    shape=shape))
        else:
            arrays.append(np.empty(shape, dtype=dtype))
    chunk = max(batch_size, 1024)  # bounds what predict holds before it is written out
    for start in range(0, rows, chunk):
        block = [array[start:start + chunk] for array in inputs]
        produced = _as_list(bottom.predict(block if len(block) > 1 else block[0], batch_size=batch_size,
                                           verbose=0))
        for array, values in zip(arrays, produced):
            array[start:start + len(values)] = keras.ops.convert_to_numpy(values).astype(dtype, copy=False)
    for array in arrays:
        if isinstance(array, np.memmap):
            array.flush()
    return arrays


def _as_list(value) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class PhaseFeatures:
    """What a cached phase fits: the top model and its inputs per split."""

    top: keras.Model
    train: object
    validation: object | None


class FeatureStore:
    """The frozen part's outputs, kept across a run's phases while the layers below the cut stay frozen.

    Before the first cached phase extracts, it looks at the phases after it:
    when a later phase cuts lower (more blocks trainable) and nothing below
    that cut trains in between, it extracts there once, keeps the result, and
    computes each phase's own features from it with a forward pass of the
    frozen layers in between. A phase that trains a layer below the kept cut
    (``trainable: all``, ``train_bn``) drops what is kept.
    """

    def __init__(self, recipe, cache_dir: Path | None = None, log: Callable[[str], None] | None = None):
        self.recipe = recipe
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.log = log or (lambda message: None)
        self.kept: CutModels | None = None
        self.kept_from = ""
        self.splits: dict[str, list] = {}
        self._plans: dict[str, CutModels | None] = {}
        self._temporary: list[Path] = []

    def plan(self, model: keras.Model, phase) -> CutModels | None:
        if self.recipe.training.cache == "off":
            return None
        if phase.name not in self._plans:
            self._plans[phase.name] = plan_cut(model, self.recipe, phase)
        return self._plans[phase.name]

    def features(self, model: keras.Model, phase, dataset, batch_size: int) -> PhaseFeatures | None:
        """The inputs of a cached fit of ``phase``, or None where it must run the whole model."""
        self._drop_if_trained(model)
        cut = self.plan(model, phase)
        if cut is None:
            return None
        splits = {"train": dataset.train.images}
        if dataset.validation is not None:
            splits["validation"] = dataset.validation.images
        images = sum(len(split) for split in splits.values())
        if self.kept is None or not self.kept.frozen <= cut.frozen:
            source = self._lowest_shared_cut(model, phase, cut)
            if source is not cut and self._storage(source.bottom, images) == "off":
                source = cut
            shared = "" if source is cut else ", kept for the later phases"
            self.kept, self.splits = None, {}  # what was kept is of no use here: free it first
            kept = self._compute(source.bottom, splits, phase, batch_size, f"frozen_{phase.name}",
                                 f"frozen part computed once ({source.where}{shared})")
            if kept is None:
                return None
            self.kept, self.kept_from, self.splits = source, phase.name, kept
        elif self.kept.key == cut.key:
            self.log(f"[finetune] phase {phase.name}: frozen part reused from phase {self.kept_from} ({cut.where})")
        if self.kept.key == cut.key:
            own = self.splits
        else:
            own = self._compute(bridge(self.kept, cut), self.splits, phase, batch_size, phase.name,
                                f"its features computed once from the kept part ({cut.where})")
            if own is None:
                return None
        return PhaseFeatures(cut.top, _single(own["train"]),
                             _single(own["validation"]) if "validation" in own else None)

    def close(self) -> None:
        """Forget what is kept and delete temporary files."""
        self.kept, self.splits = None, {}
        for folder in self._temporary:
            shutil.rmtree(folder, ignore_errors=True)
        self._temporary = []

    def _drop_if_trained(self, model: keras.Model) -> None:
        if self.kept is None:
            return
        trained = {id(layer) for layer in get_backbone(model).layers if layer.trainable and layer.weights}
        if trained & self.kept.frozen:
            self.kept, self.splits = None, {}

    def _lowest_shared_cut(self, model: keras.Model, phase, cut: CutModels) -> CutModels:
        if not backbone_inference_only(self.recipe):
            return cut  # later cuts would depend on which layers are trainable then
        names = [p.name for p in self.recipe.phases]
        source = cut
        for later in self.recipe.phases[names.index(phase.name) + 1:]:
            if later.epochs == 0:
                continue
            other = self.plan(model, later)
            if other is None:
                break
            if other.frozen <= source.frozen:
                source = other
            elif not source.frozen <= other.frozen:
                break
        return source

    def _storage(self, producer: keras.Model, images: int) -> str:
        size = feature_bytes(producer, images, self.recipe.training.cache_dtype)
        return choose_storage(self.recipe.training.cache, size, self.cache_dir)

    def _folder(self, name: str) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir / name
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="finetune-cache-"))
        self._temporary.append(folder)
        return folder

    def _compute(self, producer: keras.Model, splits: dict, phase, batch_size: int, folder_name: str,
                 what: str) -> dict | None:
        """``producer``'s outputs for each split, in memory or on disk; None (said) when neither has room."""
        images = sum(len(_as_list(inputs)[0]) for inputs in splits.values())
        storage = self._storage(producer, images)
        if storage == "off":
            size = feature_bytes(producer, images, self.recipe.training.cache_dtype)
            self.log(f"[finetune] phase {phase.name}: no room to cache the frozen part ({size / 1e9:,.1f} GB); "
                     "running the whole model each epoch")
            return None
        folder = self._folder(folder_name) if storage == "disk" else None
        started = time.perf_counter()
        computed = {name: extract(producer, inputs, batch_size, self.recipe.training.cache_dtype, storage, folder, name)
                    for name, inputs in splits.items()}
        size = sum(array.nbytes for arrays in computed.values() for array in arrays)
        self.log(f"[finetune] phase {phase.name}: {what}, {size / 1e6:,.0f} MB in {storage}, "
                 f"{time.perf_counter() - started:.1f}s")
        return computed


def _single(arrays: list):
    return arrays[0] if len(arrays) == 1 else arrays
