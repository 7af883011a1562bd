"""One training phase: set what trains, build a fresh optimizer, recompile, fit.

Keras only applies a change of ``trainable`` at the next ``compile()``, so
every phase compiles again with its own new optimizer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from finetune.backbones.blocks import nested_layers
from finetune.backbones.spec import BackboneLayout, Block
from finetune.catalog import callbacks as callback_registry
from finetune.catalog import losses, optimizers, schedules
from finetune.catalog.callbacks import RunCallback
from finetune.catalog.layers import is_multi_label
from finetune.catalog.mixing import BatchMixer
from finetune.data.batches import FileBatches, MixedBatches, ViewBatches, one_hot
from finetune.data.graph_batches import fit_feed
from finetune.errors import RecipeError
from finetune.recipe import PhaseConfig, TopBlocks, TrainingConfig
from finetune.training.context import PhaseFit, PhaseRun, RunContext
from finetune.training.features import FeatureStore


@dataclass(frozen=True)
class TrainableSet:
    """What a phase trains, for logs and tests."""

    phase: str
    trainable_blocks: tuple[str, ...]
    total_blocks: int
    trainable_backbone_weights: int
    backbone_weights: int

    def describe(self) -> str:
        if not self.trainable_blocks:
            return "backbone frozen"
        return (
            f"{len(self.trainable_blocks)} of {self.total_blocks} backbone blocks trainable "
            f"({self.trainable_backbone_weights:,} of {self.backbone_weights:,} backbone weights)"
        )


def configure_phase(model: keras.Model, layout: BackboneLayout, phase: PhaseConfig) -> TrainableSet:
    """Set the backbone's trainable flags for ``phase``; the head always trains.

    BatchNorm layers of the backbone stay frozen (and so in inference mode)
    unless the phase says ``train_bn: true``.
    """
    backbone = layout.backbone
    if phase.trainable == "none":
        chosen_blocks: tuple[Block, ...] = ()
        chosen: set[int] = set()
    elif phase.trainable == "all":
        chosen_blocks = layout.blocks
        chosen = {id(layer) for layer in layout.stem} | {id(layer) for block in layout.blocks for layer in block.layers}
    else:
        chosen_blocks = _top_blocks(layout, phase)
        chosen = {id(layer) for block in chosen_blocks for layer in block.layers}

    for layer in model.layers:
        if layer is not backbone:
            layer.trainable = True
    backbone.trainable = True
    for layer in backbone.layers:
        train_layer = id(layer) in chosen
        for inner in nested_layers(layer):
            is_batch_norm = isinstance(inner, keras.layers.BatchNormalization)
            inner.trainable = train_layer and (phase.train_bn or not is_batch_norm)
    return TrainableSet(
        phase=phase.name,
        trainable_blocks=tuple(block.name for block in chosen_blocks),
        total_blocks=len(layout.blocks),
        trainable_backbone_weights=_count(backbone.trainable_weights),
        backbone_weights=_count(backbone.weights),
    )


def _count(variables: Sequence[Any]) -> int:
    return int(sum(math.prod(variable.shape) for variable in variables))


def _top_blocks(layout: BackboneLayout, phase: PhaseConfig) -> tuple[Block, ...]:
    assert isinstance(phase.trainable, TopBlocks)
    count = phase.trainable.top_blocks
    if count > len(layout.blocks):
        raise RecipeError(f"phases.{phase.name}.trainable.top_blocks: {layout.describe()}, got {count}")
    return layout.top(count)


def check_phases(layout: BackboneLayout, phases: Sequence[PhaseConfig]) -> None:
    """Fail before any training if a phase asks for more blocks than the backbone has."""
    for phase in phases:
        if isinstance(phase.trainable, TopBlocks):
            _top_blocks(layout, phase)


def setup_warnings(layout: BackboneLayout, weights: str | None, phases: Sequence[PhaseConfig]) -> list[str]:
    """Settings that are valid but probably not what the user wants."""
    has_batch_norm = any(
        isinstance(inner, keras.layers.BatchNormalization)
        for layer in layout.backbone.layers
        for inner in nested_layers(layer)
    )
    if weights is None and has_batch_norm and not any(phase.train_bn for phase in phases):
        return [
            "the backbone starts from random weights and its BatchNorm layers never train, so their "
            "statistics match nothing and its features carry almost no signal; set train_bn: true on a "
            "phase that trains the backbone (or use pretrained weights)"
        ]
    return []


@dataclass
class PhaseSetup:
    """A compiled phase: its optimizer and the callbacks its settings need."""

    optimizer: keras.optimizers.Optimizer
    callbacks: list


def steps_per_epoch(phase: PhaseConfig, settings: TrainingConfig, train_size: int) -> int:
    return max(1, math.ceil(train_size / settings.batch_size_for(phase)))


def sized_phases(
    phases: tuple[PhaseConfig, ...], settings: TrainingConfig, train_size: int
) -> tuple[tuple[PhaseConfig, ...], list[str]]:
    """``phases`` with each one's epochs raised to hold its ``min_steps`` on ``train_size`` training images.

    Returns the phases and one line for each phase lengthened. Schedules,
    checkpoints and resume then see plain epochs, so a resumed run sizes
    itself the same way from the same data.
    """
    sized, notes = [], []
    for phase in phases:
        steps = steps_per_epoch(phase, settings, train_size)
        needed = math.ceil(phase.min_steps / steps) if phase.epochs else 0
        if needed > phase.epochs:
            notes.append(
                f"phase {phase.name}: {phase.epochs} epoch(s) of {train_size:,} images are {phase.epochs * steps} "
                f"steps; it trains {needed} epochs ({needed * steps} steps) for min_steps: {phase.min_steps}"
            )
            phase = phase.model_copy(update={"epochs": needed})
        sized.append(phase)
    return tuple(sized), notes


def compile_for_phase(
    model: keras.Model,
    layout: BackboneLayout,
    phase: PhaseConfig,
    steps: int = 1,
    run_dir: Path | None = None,
    settings: TrainingConfig | None = None,
) -> PhaseSetup:
    """A fresh optimizer (with the phase's schedule and backbone rate), then compile.

    ``steps`` is the number of optimizer steps per epoch (schedules in epochs need it).
    """
    settings = settings or TrainingConfig()
    context = schedules.ScheduleContext(phase.optimizer.learning_rate, steps, phase.epochs)
    schedule = schedules.build_schedule(phase.schedule, context)
    optimizer = phase_optimizer(layout, phase, schedule.learning_rate)
    extra = []
    for callback in schedule.callbacks:
        if isinstance(callback, schedules.PendingMomentum):  # a momentum schedule waiting for its optimizer
            callback = callback.bind(optimizer)
        if callback is not None:
            extra.append(callback)
    extra.extend(callback_registry.build_callbacks(phase.callbacks, run_dir, phase.name))
    # A momentum schedule moves between every two steps, so those run one at a time.
    one_step = any(isinstance(callback, schedules.OneCycleMomentum) for callback in extra)
    compile_model(
        model, optimizer, settings, 1 if one_step else settings.steps_per_execution, soft_labels=bool(settings.mix)
    )
    return PhaseSetup(optimizer, extra)


def phase_optimizer(layout: BackboneLayout, phase: PhaseConfig, learning_rate: Any) -> keras.optimizers.Optimizer:
    """A fresh optimizer of ``phase``'s kind and settings at ``learning_rate`` (a float or a schedule),
    with the phase's backbone rate multiplier."""
    multipliers = None
    if phase.backbone_lr_multiplier != 1.0:
        multipliers = {variable.path: phase.backbone_lr_multiplier for variable in layout.backbone.trainable_weights}
    return optimizers.get(phase.optimizer.as_identifier(), learning_rate=learning_rate, lr_multipliers=multipliers)


def compile_model(
    model: keras.Model,
    optimizer: keras.optimizers.Optimizer,
    settings: TrainingConfig,
    steps_per_execution: int = 1,
    soft_labels: bool = False,
) -> None:
    """``model`` compiled with the training settings' loss (label smoothing), metrics and ``jit_compile``.

    ``soft_labels``: targets are probability rows (mixed batches), validation labels one-hot.
    A multi-label model (sigmoid head) trains on binary cross-entropy; its ``accuracy`` is the share of
    (image, tag) pairs right at 0.5 (mixed targets rounded), so the logs keep their names."""
    multi_label = is_multi_label(model)
    model.compile(
        optimizer=optimizer,
        loss=losses.training_loss(settings.loss.label_smoothing, soft_labels, multi_label=multi_label),
        metrics=[
            losses.TagAccuracy() if multi_label else "accuracy",
            *losses.epoch_metrics(settings.epoch_metrics, model.output_shape[-1], multi_label),
        ],
        steps_per_execution=steps_per_execution,
        jit_compile=settings.jit_compile,
    )


def fit_phase(
    run: RunContext,
    stage: PhaseRun,
    *,
    callbacks: list[keras.callbacks.Callback] | None = None,
    features: FeatureStore | None = None,
) -> keras.callbacks.History:
    """Fit one compiled phase from ``stage.initial_epoch`` to its last epoch (epochs counted across phases).

    When ``training.cache`` allows it and the phase trains only the top of
    the model, the frozen bottom runs once per split and the fit runs on its
    outputs (:mod:`finetune.training.features`). ``features`` keeps them
    across a run's phases; without one, they last for this phase. Each
    :class:`~finetune.training.context.RunCallback` among ``callbacks`` gets
    the run and the fit through ``set_run`` before the fit starts.
    """
    phase, settings = stage.phase, run.settings
    store = features if features is not None else FeatureStore([phase], settings, run.layout)
    try:
        inputs = fit_inputs(run.model, phase, run.dataset, settings, store)
        return _fit(run, stage, inputs, callbacks or [])
    finally:
        if features is None:  # a store of this phase alone
            store.close()


@dataclass
class FitInputs:
    """What a phase fits: the compiled model (the whole one, or the top above a cached cut) and its inputs."""

    fit_model: keras.Model
    train_x: Any
    val_x: Any
    views: list | None = None


def fit_inputs(
    model: keras.Model, phase: PhaseConfig, dataset: Any, settings: TrainingConfig, store: FeatureStore
) -> FitInputs:
    """The model a fit of ``phase`` trains and its inputs: the top and cached features where ``store`` has them.

    ``model`` is compiled already; a cached top is compiled with its optimizer.
    """
    validation = dataset.validation
    plain = FitInputs(model, dataset.train.images, validation.images if validation is not None else None)
    cached = store.features(model, phase, dataset, settings.batch_size_for(phase))
    if cached is None:
        return plain
    compile_model(cached.top, model.optimizer, settings, model.steps_per_execution)
    return FitInputs(cached.top, cached.train, cached.validation, cached.views)


def _fit(
    run: RunContext, stage: PhaseRun, inputs: FitInputs, callbacks: list[keras.callbacks.Callback]
) -> keras.callbacks.History:
    validation, settings = run.dataset.validation, run.settings
    batch_size = settings.batch_size_for(stage.phase)
    train = training_batches(inputs, run, batch_size, stage.initial_epoch)
    validation_labels = None if validation is None else validation.labels
    if settings.mix and validation is not None:
        validation_labels = one_hot(validation.labels, inputs.fit_model.output_shape[-1])
    fit = PhaseFit(run, stage, inputs.fit_model, sample=lambda: train[0][:2])  # (x, y), without weights
    for callback in callbacks:
        if isinstance(callback, RunCallback):
            callback.set_run(fit)
    # In-memory arrays go to TensorFlow's input pipeline whole (a generator call per batch made a small model's
    # epoch a third longer); the epoch's order is still the batches' own.
    train_feed, keep_in_step = fit_feed(train)
    validation_feed = None
    if validation is not None:
        validation_feed, _ = fit_feed(FileBatches(inputs.val_x, validation_labels, batch_size))
    return inputs.fit_model.fit(
        train_feed,
        validation_data=validation_feed,
        shuffle=False,  # the batches shuffle rows themselves
        epochs=stage.last_epoch,
        initial_epoch=stage.initial_epoch,
        callbacks=[*keep_in_step, *callbacks],
        verbose=resolve_verbosity(settings.verbose),
    )


def training_batches(inputs: FitInputs, run: RunContext, batch_size: int, epoch: int) -> Any:
    """The phase's training batches from ``epoch`` on (a ``FileBatches``; mixed or augmented views where set).

    Their order depends only on (seed, epoch): a resumed run sees what an uninterrupted one would,
    and a memory-mapped array is read a batch at a time, never copied whole. ``data.sampling:
    balanced`` draws each epoch with equal class frequency; ``training.class_weight`` weighs each
    example by its class (a per-example weight in every batch, so a cached top is weighed too).
    """
    dataset, settings = run.dataset, run.settings
    order: dict[str, Any] = dict(
        shuffle=settings.shuffle,
        seed=run.seed,
        epoch=epoch,
        balanced=run.sampling == "balanced",
        class_weights=run.class_weights(),
    )
    if settings.mix:  # the images of the whole model, never cached features (FeatureStore.plan)
        classes = inputs.fit_model.output_shape[-1]
        mixer = BatchMixer(settings.mix)
        return MixedBatches(inputs.train_x, dataset.train.labels, classes, batch_size, mixer, **order)
    if inputs.views is not None:  # one augmented copy of the frozen part's outputs per epoch
        return ViewBatches(inputs.views, dataset.train.labels, batch_size, **order)
    return FileBatches(inputs.train_x, dataset.train.labels, batch_size, **order)


def resolve_verbosity(setting: Any) -> int:
    """Keras's own output for 1 and 2; none for ``auto`` (finetune's progress line shows it) and 0."""
    return 0 if setting == "auto" else int(setting)


def optimizer_learning_rate(optimizer: Any) -> float:
    """The rate the optimizer uses now (a schedule evaluated at the current step)."""
    return float(keras.ops.convert_to_numpy(optimizer.learning_rate))
