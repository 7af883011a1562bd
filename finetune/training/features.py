"""Feature caching: run the frozen part of the model once, train the rest.

While a phase trains only the top of the model, and everything below the
trainable part is deterministic (backbone in inference mode, no dropout or
augmentation before the cut), the frozen bottom gives the same numbers every
epoch. Such a phase computes the bottom's output once per split and fits a
"top" model on it (:mod:`finetune.training.cuts`). Once the phase ends the
full model holds the trained weights, and evaluation and export use it
unchanged.

A :class:`FeatureStore` keeps the extracted outputs across phases while the
layers below the cut stay frozen, so a run of a head phase and then a
top-block phase runs the frozen bottom once: the head phase extracts at the
later phase's (lower) cut and computes its pooled features from there.
"""

from __future__ import annotations

import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import numpy as np

from finetune import progress
from finetune.backbones.spec import BackboneLayout
from finetune.catalog.augment import augmentation_layers
from finetune.data.arrays import even_batch_size, predict_in_steady_batches
from finetune.errors import RecipeError
from finetune.progress import StageTimes
from finetune.recipe import PhaseConfig, TrainingConfig
from finetune.training.cuts import CutModels, bridge, plan_cut, single

logger = logging.getLogger(__name__)


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


@dataclass(frozen=True)
class CacheTarget:
    """Where extracted features go: their dtype, ``memory`` or ``disk`` (files ``<name>_<i>.npy`` in ``folder``)."""

    dtype: str
    storage: str
    folder: Path | None
    name: str


def extract(
    bottom: keras.Model,
    images: Any,
    batch_size: int,
    target: CacheTarget,
    rows_done: Callable[[int, int], None] = lambda done, total: None,
) -> list[np.ndarray]:
    """The bottom's outputs for ``images`` (an array or a list of arrays), in chunks into RAM or files.

    ``rows_done(done, total)`` is told after each chunk.
    """
    dtype, storage, folder, name = target.dtype, target.storage, target.folder, target.name
    outputs = _as_list(bottom.output)
    inputs = _as_list(images)
    rows = len(inputs[0])
    arrays: list[np.ndarray] = []
    for index, tensor in enumerate(outputs):
        shape = (rows, *tensor.shape[1:])
        if storage == "disk":
            assert folder is not None, "disk storage needs a folder"
            folder.mkdir(parents=True, exist_ok=True)
            arrays.append(
                np.lib.format.open_memmap(folder / f"{name}_{index}.npy", mode="w+", dtype=dtype, shape=shape)
            )
        else:
            arrays.append(np.empty(shape, dtype=dtype))
    # One batch shape throughout (the last batch padded): the bottom is traced once, not again for a short batch.
    steady = even_batch_size(rows, batch_size)
    chunk = steady * max(1, 1024 // steady)  # bounds what predict holds before it is written out
    for start in range(0, rows, chunk):
        block = [np.asarray(array[start : start + chunk]) for array in inputs]
        produced = _as_list(predict_in_steady_batches(bottom, block, steady))
        for array, values in zip(arrays, produced, strict=True):
            array[start : start + len(values)] = keras.ops.convert_to_numpy(values).astype(dtype, copy=False)
        rows_done(min(start + chunk, rows), rows)
    for array in arrays:
        if isinstance(array, np.memmap):
            array.flush()
    return arrays


def augmented_copy(model: keras.Model, images: Any, batch_size: int, view: int = 0) -> np.ndarray:
    """``images`` through the model's augmentation layers in training mode, stored again as uint8.

    Copy ``view`` is drawn from the layers' seeds and ``view`` alone (their random state is set for it and
    put back after), so a later phase or a resumed run that draws it again gets the same copy. The copy is
    held in memory (the stored size of the training images, 47 MB for Fashion-MNIST).
    """
    layers = augmentation_layers(model)
    states = [v for layer in layers for v in layer.variables if v.path.endswith("seed_generator_state")]
    before = [keras.ops.convert_to_numpy(state) for state in states]
    for state, value in zip(states, before, strict=True):
        # [seed, counter]: each draw moves the counter by one; copies start a million draws apart.
        state.assign(np.array([value[0], (view + 1) * 1_000_000]).astype(value.dtype))
    copies = np.empty(images.shape, dtype=np.uint8)
    try:
        for start in range(0, len(images), max(batch_size, 1024)):
            x = np.asarray(images[start : start + max(batch_size, 1024)])
            for layer in layers:
                x = layer(x, training=True)
            copies[start : start + len(x)] = np.clip(np.rint(keras.ops.convert_to_numpy(x)), 0, 255).astype(np.uint8)
    finally:
        for state, value in zip(states, before, strict=True):
            state.assign(value)
    return copies


def _could_cache(phase: PhaseConfig) -> bool:
    return phase.trainable != "all" and not phase.train_bn


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


@dataclass
class PhaseFeatures:
    """What a cached phase fits: the top model and its inputs per split."""

    top: keras.Model
    train: object
    validation: object | None
    views: list | None = None
    """With ``training.augmented_views``: the training features of each augmented copy (one per epoch)."""


class FeatureStore:
    """The frozen part's outputs, kept across a run's phases while the layers below the cut stay frozen.

    Before the first cached phase extracts, it looks at the phases after it:
    when a later phase cuts lower (more blocks trainable) and nothing below
    that cut trains in between, it extracts there once, keeps the result, and
    computes each phase's own features from it with a forward pass of the
    frozen layers in between. A phase that trains a layer below the kept cut
    (``trainable: all``, ``train_bn``) drops what is kept.
    """

    def __init__(
        self,
        phases: Sequence[PhaseConfig],
        settings: TrainingConfig,
        layout: BackboneLayout,
        cache_dir: Path | None = None,
        times: StageTimes | None = None,
    ):
        self.phases = list(phases)
        self.times = times if times is not None else StageTimes()
        self.settings = settings
        self.layout = layout
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        self.kept: CutModels | None = None
        self.kept_from = ""
        self.splits: dict[str, list] = {}
        self._plans: dict[str, CutModels | None] = {}
        self._temporary: list[Path] = []

    def plan(self, model: keras.Model, phase: PhaseConfig) -> CutModels | None:
        if self.settings.cache == "off":
            return None
        if self.settings.mix:
            if phase.name not in self._plans and _could_cache(phase):
                logger.info(
                    f"note: phase {phase.name}: training.mix mixes the images of each batch, so the "
                    "frozen part is not cached and the whole model runs each step"
                )
            self._plans[phase.name] = None
            return None
        if phase.name not in self._plans:
            views = self._views(model)
            self._plans[phase.name] = plan_cut(model, self.layout, phase, augmented_views=views)
            if self._plans[phase.name] is None and augmentation_layers(model) and not views and _could_cache(phase):
                logger.info(
                    f"note: phase {phase.name}: model.augment changes the images every epoch, so the "
                    "frozen part is not cached and the whole model runs each step (training.augmented_views: K "
                    "computes it once for K augmented copies instead)"
                )
        return self._plans[phase.name]

    def features(self, model: keras.Model, phase: PhaseConfig, dataset: Any, batch_size: int) -> PhaseFeatures | None:
        """The inputs of a cached fit of ``phase``, or None where it must run the whole model."""
        self._drop_if_trained(model)
        cut = self.plan(model, phase)
        if cut is None:
            return None
        views = self._views(model)
        if self.kept is None or not self.kept.frozen <= cut.frozen:
            source = self._lowest_shared_cut(model, phase, cut)
            images = (max(views, 1) * len(dataset.train)) + (
                len(dataset.validation) if dataset.validation is not None else 0
            )
            if source is not cut and self._storage(source.bottom, images) == "off":
                source = cut
            shared = "" if source is cut else ", kept for the later phases"
            what = f"frozen part computed for {views} augmented views" if views else "frozen part computed once"
            self.kept, self.splits = None, {}  # what was kept is of no use here: free it first
            kept = self._compute(
                source.bottom,
                self._inputs(model, dataset, batch_size, views),
                phase,
                batch_size,
                f"frozen_{phase.name}",
                f"{what} ({source.where}{shared})",
            )
            if kept is None:
                if views:
                    raise RecipeError(
                        f"training.augmented_views: {views} augmented copies of the frozen part's outputs fit "
                        "neither in memory nor on disk; lower augmented_views, or set it to 0 to run the whole "
                        "model each step"
                    )
                return None
            self.kept, self.kept_from, self.splits = source, phase.name, kept
        elif self.kept.key == cut.key:
            logger.info(f"phase {phase.name}: frozen part reused from phase {self.kept_from} ({cut.where})")
        own = self.splits
        if self.kept.key != cut.key:
            derived = self._compute(
                bridge(self.kept, cut),
                self.splits,
                phase,
                batch_size,
                phase.name,
                f"its features computed once from the kept part ({cut.where})",
            )
            if derived is None:
                return None
            own = derived
        validation = single(own["validation"]) if "validation" in own else None
        if views:
            copies = [single(own[f"train_view{index}"]) for index in range(views)]
            return PhaseFeatures(cut.top, copies[0], validation, views=copies)
        return PhaseFeatures(cut.top, single(own["train"]), validation)

    def _views(self, model: keras.Model) -> int:
        return self.settings.augmented_views if augmentation_layers(model) else 0

    @staticmethod
    def _inputs(model: keras.Model, dataset: Any, batch_size: int, views: int) -> dict:
        """The images the frozen part sees: the training images (or ``views`` augmented copies of them; the
        same copies whichever phase draws them) and the validation images, never augmented."""
        if views:
            splits = {
                f"train_view{index}": augmented_copy(model, dataset.train.images, batch_size, view=index)
                for index in range(views)
            }
        else:
            splits = {"train": dataset.train.images}
        if dataset.validation is not None:
            splits["validation"] = dataset.validation.images
        return splits

    def close(self) -> None:
        """Forget what is kept and delete temporary files."""
        self.kept, self.splits = None, {}
        for folder in self._temporary:
            shutil.rmtree(folder, ignore_errors=True)
        self._temporary = []

    def _drop_if_trained(self, model: keras.Model) -> None:
        if self.kept is None:
            return
        trained = {id(layer) for layer in self.layout.backbone.layers if layer.trainable and layer.weights}
        if trained & self.kept.frozen:
            self.kept, self.splits = None, {}

    def _lowest_shared_cut(self, model: keras.Model, phase: PhaseConfig, cut: CutModels) -> CutModels:
        if not self.layout.inference_only:
            return cut  # later cuts would depend on which layers are trainable then
        names = [p.name for p in self.phases]
        source = cut
        for later in self.phases[names.index(phase.name) + 1 :]:
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
        size = feature_bytes(producer, images, self.settings.cache_dtype)
        return choose_storage(self.settings.cache, size, self.cache_dir)

    def _folder(self, name: str) -> Path:
        if self.cache_dir is not None:
            return self.cache_dir / name
        import tempfile

        folder = Path(tempfile.mkdtemp(prefix="finetune-cache-"))
        self._temporary.append(folder)
        return folder

    def _compute(
        self, producer: keras.Model, splits: dict, phase: PhaseConfig, batch_size: int, folder_name: str, what: str
    ) -> dict | None:
        """``producer``'s outputs for each split, in memory or on disk; None (said) when neither has room."""
        images = sum(len(_as_list(inputs)[0]) for inputs in splits.values())
        storage = self._storage(producer, images)
        if storage == "off":
            size = feature_bytes(producer, images, self.settings.cache_dtype)
            logger.info(
                f"phase {phase.name}: no room to cache the frozen part ({size / 1e9:,.1f} GB); "
                "running the whole model each epoch"
            )
            return None
        folder = self._folder(folder_name) if storage == "disk" else None
        started = time.perf_counter()
        computed = {}
        for name, inputs in splits.items():

            def shown(done: int, total: int, split: str = name) -> None:
                progress.live(f"phase {phase.name}: {what}, {split} {done:,}/{total:,} images")

            dtype = self.settings.cache_dtype
            target = CacheTarget(dtype, storage, folder, name)
            computed[name] = extract(producer, inputs, batch_size, target, shown)
        size = sum(array.nbytes for arrays in computed.values() for array in arrays)
        seconds = time.perf_counter() - started
        self.times.add(f"{phase.name}: frozen part", seconds)
        logger.info(f"phase {phase.name}: {what}, {size / 1e6:,.0f} MB in {storage}, {seconds:.1f}s")
        return computed
