"""Training phases: set what trains, build a fresh optimizer, recompile, fit.

Keras only applies a change of ``trainable`` at the next ``compile()``, so
every phase compiles again with its own new optimizer.
"""

from __future__ import annotations

import csv
import json
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import keras

from finetune import backbones, callbacks as callback_registry, optimizers, schedules
from finetune.errors import RecipeError
from finetune.model import get_backbone
from finetune.recipe import PhaseConfig, Recipe, TrainingConfig


@dataclass(frozen=True)
class PhasePlan:
    """What a phase trains, for logs and tests."""

    phase: str
    trainable_blocks: tuple[str, ...]
    total_blocks: int
    trainable_backbone_weights: int
    backbone_weights: int


def _nested_layers(layer) -> list:
    """A layer and every layer inside it (nested models, Sequential blocks)."""
    found = [layer]
    for child in getattr(layer, "layers", []) or []:
        found.extend(_nested_layers(child))
    return found


def configure_phase(model: keras.Model, recipe: Recipe, phase: PhaseConfig) -> PhasePlan:
    """Set the backbone's trainable flags for ``phase``; the head always trains.

    BatchNorm layers of the backbone stay frozen (and so in inference mode)
    unless the phase says ``train_bn: true``.
    """
    spec = backbones.spec_for(recipe.model.backbone)
    backbone = get_backbone(model)
    stem, blocks = backbones.split_into_blocks(backbone, spec)
    if phase.trainable == "none":
        chosen_blocks, chosen = [], set()
    elif phase.trainable == "all":
        chosen_blocks = blocks
        chosen = {id(layer) for layer in stem} | {id(layer) for block in blocks for layer in block.layers}
    else:
        chosen_blocks = _top_blocks(blocks, phase, spec)
        chosen = {id(layer) for block in chosen_blocks for layer in block.layers}

    for layer in model.layers:
        if layer is not backbone:
            layer.trainable = True
    backbone.trainable = True
    for layer in backbone.layers:
        train_layer = id(layer) in chosen
        for inner in _nested_layers(layer):
            is_batch_norm = isinstance(inner, keras.layers.BatchNormalization)
            inner.trainable = train_layer and (phase.train_bn or not is_batch_norm)
    return PhasePlan(
        phase=phase.name,
        trainable_blocks=tuple(block.name for block in chosen_blocks),
        total_blocks=len(blocks),
        trainable_backbone_weights=_count(backbone.trainable_weights),
        backbone_weights=_count(backbone.weights),
    )


def _count(variables) -> int:
    return int(sum(math.prod(variable.shape) for variable in variables))


def _top_blocks(blocks: list, phase: PhaseConfig, spec) -> list:
    count = phase.trainable.top_blocks
    if count > len(blocks):
        raise RecipeError(
            f"phases.{phase.name}.trainable.top_blocks: {spec.name} has {len(blocks)} blocks "
            f"({blocks[0].name} .. {blocks[-1].name}), got {count}"
        )
    return blocks[-count:]


def check_phases(model: keras.Model, recipe: Recipe) -> None:
    """Fail before any data is loaded if a phase asks for more blocks than exist."""
    spec = backbones.spec_for(recipe.model.backbone)
    _, blocks = backbones.split_into_blocks(get_backbone(model), spec)
    for phase in recipe.phases:
        if not isinstance(phase.trainable, str):
            _top_blocks(blocks, phase, spec)


def recipe_warnings(model: keras.Model, recipe: Recipe) -> list[str]:
    """Settings that are valid but probably not what the user wants."""
    warnings = []
    backbone = get_backbone(model)
    has_batch_norm = any(
        isinstance(inner, keras.layers.BatchNormalization)
        for layer in backbone.layers for inner in _nested_layers(layer)
    )
    if recipe.model.backbone.weights is None and has_batch_norm and not any(p.train_bn for p in recipe.phases):
        warnings.append(
            "the backbone starts from random weights and its BatchNorm layers never train, so their "
            "statistics match nothing and its features carry almost no signal; set train_bn: true on a "
            "phase that trains the backbone (or use pretrained weights)"
        )
    return warnings


@dataclass
class PhaseSetup:
    """A compiled phase: its optimizer and the callbacks its settings need."""

    optimizer: keras.optimizers.Optimizer
    callbacks: list


def steps_per_epoch(recipe: Recipe, phase: PhaseConfig, train_size: int) -> int:
    return max(1, math.ceil(train_size / (phase.batch_size or recipe.training.batch_size)))


def compile_for_phase(model: keras.Model, phase: PhaseConfig, steps: int = 1,
                      run_dir: Path | None = None, recipe_training: TrainingConfig | None = None) -> PhaseSetup:
    """A fresh optimizer (with the phase's schedule and backbone rate), then compile.

    ``steps`` is the number of optimizer steps per epoch (schedules in epochs need it).
    """
    recipe_training = recipe_training or TrainingConfig()
    context = schedules.ScheduleContext(phase.optimizer.learning_rate, steps, phase.epochs)
    schedule = schedules.build_schedule(phase.schedule, context)
    multipliers = None
    if phase.backbone_lr_multiplier != 1.0:
        multipliers = {variable.path: phase.backbone_lr_multiplier
                       for variable in get_backbone(model).trainable_weights}
    optimizer = optimizers.get(phase.optimizer.as_identifier(), learning_rate=schedule.learning_rate,
                               lr_multipliers=multipliers)
    extra = []
    for callback in schedule.callbacks:
        if hasattr(callback, "bind"):  # a momentum schedule waiting for its optimizer
            callback = callback.bind(optimizer)
        if callback is not None:
            extra.append(callback)
    extra.extend(callback_registry.build_callbacks(phase.callbacks, run_dir, phase.name))
    # A momentum schedule moves between every two steps, so those run one at a time.
    one_step = any(isinstance(callback, schedules.OneCycleMomentum) for callback in extra)
    compile_model(model, optimizer, 1 if one_step else recipe_training.steps_per_execution,
                  recipe_training.jit_compile)
    return PhaseSetup(optimizer, extra)


def compile_model(model: keras.Model, optimizer, steps_per_execution: int = 1, jit_compile="auto") -> None:
    model.compile(optimizer=optimizer, loss="sparse_categorical_crossentropy", metrics=["accuracy"],
                  steps_per_execution=steps_per_execution, jit_compile=jit_compile)


def fit_phase(
    model: keras.Model,
    recipe: Recipe,
    phase: PhaseConfig,
    dataset,
    *,
    initial_epoch: int = 0,
    callbacks: list | None = None,
    cache_dir: Path | None = None,
    log: Callable[[str], None] | None = None,
    features=None,
) -> keras.callbacks.History:
    """Fit one compiled phase; epochs are counted across phases.

    When ``recipe.training.cache`` allows it and the phase trains only the top
    of the model, the frozen bottom runs once per split (see ``caching``) and
    the fit runs on its outputs. ``features`` (a ``caching.FeatureStore``)
    keeps them across a run's phases; without one, they last for this phase.
    """
    from finetune import caching

    batch_size = phase.batch_size or recipe.training.batch_size
    validation = dataset.validation
    train_x, val_x = dataset.train.images, validation.images if validation is not None else None
    fit_model = model
    store = features if features is not None else caching.FeatureStore(recipe, cache_dir, log)
    cached = store.features(model, phase, dataset, batch_size)
    if cached is not None:
        compile_model(cached.top, model.optimizer, model.steps_per_execution, recipe.training.jit_compile)
        fit_model, train_x, val_x = cached.top, cached.train, cached.validation
        for callback in callbacks or []:
            if hasattr(callback, "full_model") and callback.full_model is None:
                callback.full_model = model
    try:
        return _fit(fit_model, recipe, phase, dataset, train_x, val_x, batch_size, initial_epoch, callbacks)
    finally:
        if features is None:  # a store of this phase alone
            store.close()


def _fit(fit_model, recipe, phase, dataset, train_x, val_x, batch_size, initial_epoch, callbacks):
    from finetune.batches import FileBatches
    from finetune.data import on_disk

    validation = dataset.validation
    common = dict(epochs=initial_epoch + phase.epochs, initial_epoch=initial_epoch, callbacks=callbacks or [],
                  verbose=resolve_verbosity(recipe.training.verbose))
    if on_disk(train_x) or on_disk(val_x):
        # Keras would copy a memory-mapped array into one tensor: read it a batch at a time instead.
        validation_batches = None if validation is None else FileBatches(val_x, validation.labels, batch_size)
        return fit_model.fit(
            FileBatches(train_x, dataset.train.labels, batch_size, shuffle=recipe.training.shuffle,
                        seed=recipe.seed + initial_epoch),
            validation_data=validation_batches, shuffle=False,  # FileBatches shuffles rows itself
            **common,
        )
    return fit_model.fit(
        train_x,
        dataset.train.labels,
        batch_size=batch_size,
        validation_data=(val_x, validation.labels) if validation is not None else None,
        shuffle=recipe.training.shuffle,
        **common,
    )


def resolve_verbosity(setting) -> int:
    """``auto``: a progress bar on a terminal, one line per epoch in a log file."""
    if setting != "auto":
        return int(setting)
    return 1 if sys.stdout.isatty() else 2


def optimizer_learning_rate(optimizer) -> float:
    """The rate the optimizer uses now (a schedule evaluated at the current step)."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))


# --- callbacks that keep a run safe ---------------------------------------

HISTORY_FIELDS = ["phase", "epoch", "phase_epoch", "learning_rate", "loss", "accuracy", "val_loss", "val_accuracy", "seconds"]


class HistoryCSV(keras.callbacks.Callback):
    """Appends one row per epoch to ``history.csv`` and flushes it at once."""

    def __init__(self, path: Path, phase: str, first_epoch: int):
        super().__init__()
        self.path = Path(path)
        self.phase = phase
        self.first_epoch = first_epoch
        self._started = 0.0

    def on_epoch_begin(self, epoch, logs=None):
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        row = {
            "phase": self.phase,
            "epoch": epoch + 1,
            "phase_epoch": epoch + 1 - self.first_epoch,
            "learning_rate": float(f"{optimizer_learning_rate(self.model.optimizer):.6g}"),
            "seconds": round(time.perf_counter() - self._started, 3),
        }
        row.update({key: float(logs[key]) for key in HISTORY_FIELDS if key in logs})
        new_file = not self.path.exists()
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the model with its optimizer state, atomically, as epochs finish.

    ``checkpoint.keras`` and ``state.json`` say where the run stood. Writing a
    large backbone takes longer than an epoch of a cached head, so saves are
    at most ``every_seconds`` apart, the phase's last epoch is always saved,
    and :meth:`save_now` saves an interrupted run. ``full_model`` is the model
    to save when the fit runs on a cached top model that shares its layers.
    """

    def __init__(self, run_dir: Path, phase: str, phase_index: int, first_epoch: int,
                 full_model: keras.Model | None = None, every_seconds: float = 0.0, last_epoch: int | None = None):
        super().__init__()
        self.full_model = full_model
        self.run_dir = Path(run_dir)
        self.phase = phase
        self.phase_index = phase_index
        self.first_epoch = first_epoch
        self.every_seconds = every_seconds
        self.last_epoch = last_epoch
        self.epochs_done = first_epoch
        self._last_save = time.monotonic()

    def on_epoch_end(self, epoch, logs=None):
        self.epochs_done = epoch + 1
        due = time.monotonic() - self._last_save >= self.every_seconds
        if due or self.epochs_done == self.last_epoch:
            self.save_now()

    def save_now(self, interrupted: bool = False) -> None:
        model = self.full_model or self.model
        if model is None:
            return
        save_model_atomically(model, self.run_dir / "checkpoint.keras")
        state = {
            "phase": self.phase,
            "phase_index": self.phase_index,
            "phase_epochs_done": self.epochs_done - self.first_epoch,
            "epochs_done": self.epochs_done,
        }
        if interrupted:
            state["interrupted_during_epoch"] = self.epochs_done + 1
        write_json_atomically(self.run_dir / "state.json", state)
        self._last_save = time.monotonic()


def save_model_atomically(model: keras.Model, path: Path) -> None:
    partial = path.with_name(f".{path.stem}.partial{path.suffix}")
    model.save(partial)
    os.replace(partial, path)


def write_json_atomically(path: Path, payload) -> None:
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(partial, path)
