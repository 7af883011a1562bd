"""The phases of a run, in order: each one configured, compiled and fitted, with history and checkpoints."""

from __future__ import annotations

import importlib.util
import logging
import math
from pathlib import Path
from typing import Any

import keras

from finetune.errors import TrainingDiverged
from finetune.training.batch_norm import RecalibrateBatchNorm
from finetune.training.checkpoints import EpochCheckpoint, RestoreTrainingState, restore_phase_start
from finetune.training.context import PhaseRun, RunContext
from finetune.training.divergence import DivergenceWatch
from finetune.training.features import FeatureStore
from finetune.training.gradient_health import GradientHealth
from finetune.training.history import HistoryCSV
from finetune.training.interrupts import InterruptAtStepEnd, ctrl_c_remembered, interrupt_handled
from finetune.training.phases import compile_for_phase, configure_phase, fit_phase, steps_per_epoch
from finetune.training.progress import PhaseProgress
from finetune.training.state import CheckpointState

logger = logging.getLogger(__name__)


def train(run: RunContext) -> None:
    """Train ``run.phases`` one after another; epochs are numbered across phases.

    Every epoch appends a row to ``history.csv``; ``checkpoint.keras`` and
    ``state.json`` are written as epochs finish (at most every
    ``training.checkpoint_seconds``, always after a phase's last epoch) and
    when Ctrl-C stops a phase. The frozen part's outputs are shared by the
    phases that keep it frozen and freed before this returns.

    ``run.resume_from`` (a checkpoint whose weights the model already holds)
    skips the phases it finished and continues its phase at the next epoch,
    with the optimizer's state and step. Each checkpoint keeps ``run.clock``,
    so a resumed run's time goes on from it.
    """
    assert run.run_dir is not None, "training writes history.csv and checkpoints into the run's folder"
    board = tensorboard_folder(run.run_dir, run.settings.tensorboard)
    features = FeatureStore(run.phases, run.settings, run.layout, run.run_dir / "cache", run.times)
    start = run.resume_from.state if run.resume_from is not None else CheckpointState("", 0, 0, 0)
    checkpoint: EpochCheckpoint | None = None
    epochs_done = 0
    resuming = run.resume_from  # until the first phase this process trains has its RNG states back
    try:
        with ctrl_c_remembered():
            for index, phase in enumerate(run.phases):
                done_here = start.phase_epochs_done if index == start.phase_index else 0
                if index < start.phase_index or phase.epochs == 0 or done_here >= phase.epochs:
                    if phase.epochs == 0:
                        logger.info(f"phase {phase.name}: 0 epochs, skipped")
                    elif run.resume_from is not None:
                        logger.info(f"phase {phase.name}: finished before, not redone")
                    epochs_done += phase.epochs
                    continue
                steps = steps_per_epoch(phase, run.settings, len(run.dataset.train))
                stage = PhaseRun(phase, index, first_epoch=epochs_done, steps=steps, epochs_done=done_here)
                if resuming is not None:  # the RNG states this phase began with (at a boundary: the checkpoint's)
                    restore_phase_start(resuming, run.model, phase_begun=done_here > 0)
                resuming = None
                checkpoint = EpochCheckpoint(run, stage)
                train_phase(run, stage, checkpoint, features, board)
                checkpoint = None  # the phase's last epoch is saved; a later Ctrl-C has no epoch to save
                epochs_done += phase.epochs
                run.phase_done(phase.name)
    except KeyboardInterrupt:
        interrupt_handled()
        if checkpoint is not None:
            checkpoint.save_interrupted()
        raise
    finally:
        features.close()


def train_phase(
    run: RunContext, stage: PhaseRun, checkpoint: EpochCheckpoint, features: FeatureStore, board: Path | None
) -> None:
    """Set what ``stage`` trains, compile it with a fresh optimizer, and fit it with the run's callbacks."""
    phase = stage.phase
    trainable = configure_phase(run.model, run.layout, phase)
    setup = compile_for_phase(run.model, run.layout, phase, stage.steps, run.run_dir, run.settings)
    resumed = f", resumed after epoch {stage.initial_epoch}" if stage.epochs_done else ""
    logger.info(
        f"phase {phase.name} ({stage.index + 1}/{len(run.phases)}): {phase.epochs} epochs, "
        f"{trainable.describe()}, {phase.describe()}{resumed}"
    )
    # After recalibration, so the checkpoint keeps the recalibrated statistics.
    callbacks = [*phase_callbacks(run, stage, board), checkpoint, *setup.callbacks]
    with run.times.stage(f"{phase.name}: training"):  # less the frozen part's seconds, charged on their own
        fit_phase(run, stage, callbacks=callbacks, features=features)


def phase_callbacks(run: RunContext, stage: PhaseRun, board: Path | None) -> list[keras.callbacks.Callback]:
    """finetune's own callbacks for one phase, before its checkpoint, in the order they see each epoch's end;
    ``board`` is the TensorBoard folder (None: off)."""
    phase, settings = stage.phase, run.settings
    assert run.run_dir is not None
    callbacks: list[keras.callbacks.Callback] = [
        InterruptAtStepEnd(),
        StopOnNaN(phase.name, stage.first_epoch),
        DivergenceWatch(
            phase.name,
            2 if run.dataset.multi_label else run.dataset.num_classes,  # a tag at chance: ln 2
            stage.first_epoch,
            run.run_dir,
            head_only=phase.trainable == "none",
        ),
        HistoryCSV(run.run_dir / "history.csv", phase.name, stage.first_epoch, tuple(settings.epoch_metrics)),
    ]
    if settings.verbose == "auto":
        images = min(stage.steps * settings.batch_size_for(phase), len(run.dataset.train))
        callbacks.append(PhaseProgress(stage, images_per_epoch=images))
    if board is not None:
        callbacks.append(EpochTensorBoard(log_dir=str(board), write_graph=False))
    if settings.gradient_health_every:
        callbacks.append(GradientHealth(run.run_dir, phase.name, settings.gradient_health_every))
    if stage.epochs_done and run.resume_from is not None:
        callbacks.insert(0, RestoreTrainingState(run.resume_from, run.model))
    if settings.recalibrate_bn == "always" or (settings.recalibrate_bn == "auto" and phase.train_bn):
        callbacks.append(RecalibrateBatchNorm(run, stage))
    return [*callbacks, *run.observers]


def tensorboard_folder(run_dir: Path, wanted: bool) -> Path | None:
    """Where Keras's TensorBoard callback writes (epochs are numbered across phases); None when off.

    Keras writes the event files with ``tf.summary``, which needs TensorFlow and the tensorboard package:
    on a machine with JAX alone there are none.
    """
    if not wanted:
        return None
    missing = [name for name in ("tensorflow", "tensorboard") if importlib.util.find_spec(name) is None]
    if missing:
        logger.info(f"note: {' and '.join(missing)} not installed here, so no TensorBoard logs are written")
        return None
    return run_dir / "tensorboard"


class EpochTensorBoard(keras.callbacks.TensorBoard):
    """Keras's TensorBoard at ``update_freq="epoch"``: its batch-end hook then writes nothing (no summary
    writer is active between epochs), so Keras may run it on a thread like finetune's own."""

    async_safe = True

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        # Keras's hook still calls tf.summary.scalar for every log of every batch, written nowhere at
        # update_freq="epoch": a fifth of a small head's epoch (scripts/step_overhead.py --case head).
        if self.update_freq != "epoch" or getattr(self, "_should_trace", False):
            super().on_train_batch_end(batch, logs)


class StopOnNaN(keras.callbacks.Callback):
    """Stops the run at the first step whose loss is NaN or infinite, naming the phase, epoch and step."""

    async_safe = True  # its batch-end hook only records or raises: Keras may run it on a thread

    def __init__(self, phase: str, first_epoch: int):
        super().__init__()
        self.phase = phase
        self.epoch = first_epoch

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epoch = epoch

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDiverged(
                f"loss became {float(loss)} in phase {self.phase}, epoch {self.epoch + 1}, step {batch + 1}; "
                "try a lower learning rate or gradient clipping (optimizer: {clipnorm: 1.0}); "
                "checkpoint.keras keeps the last good epoch"
            )
