"""The phases of a run, in order: each one configured, compiled and fitted, with history and checkpoints."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import keras

from finetune.backbones.spec import BackboneLayout
from finetune.errors import TrainingDiverged
from finetune.progress import Progress
from finetune.recipe import PhaseConfig, TrainingConfig
from finetune.training.batch_norm import RecalibrateBatchNorm
from finetune.training.checkpoints import Checkpoint, EpochCheckpoint, HistoryCSV, RestoreTrainingState
from finetune.training.divergence import DivergenceWatch
from finetune.training.features import FeatureStore
from finetune.training.gradient_health import GradientHealth
from finetune.training.interrupts import InterruptAtStepEnd, ctrl_c_remembered, interrupt_handled
from finetune.training.phases import compile_for_phase, configure_phase, fit_phase, steps_per_epoch
from finetune.training.progress import PhaseProgress


def train(
    model: keras.Model,
    layout: BackboneLayout,
    phases: tuple[PhaseConfig, ...],
    settings: TrainingConfig,
    dataset,
    run_dir: Path,
    *,
    seed: int,
    log: Callable[[str], None] | Progress,
    phase_done: Callable[[str], None] = lambda name: None,
    resume_from: Checkpoint | None = None,
    run_clock: Callable[[], float] | None = None,
) -> None:
    """Train ``phases`` one after another; epochs are numbered across phases.

    Every epoch appends a row to ``history.csv``; ``checkpoint.keras`` and
    ``state.json`` are written as epochs finish (at most every
    ``settings.checkpoint_seconds``, always after a phase's last epoch) and
    when Ctrl-C stops a phase. The frozen part's outputs are shared by the
    phases that keep it frozen and freed before this returns.

    ``resume_from`` (a checkpoint whose weights ``model`` already holds)
    skips the phases it finished and continues its phase at the next epoch,
    with the optimizer's state and step. ``run_clock`` gives the run's seconds
    so far; each checkpoint keeps it, so a resumed run's time goes on from it.

    ``log`` takes the lines that stay; a :class:`~finetune.progress.Progress`
    also shows a live line per step on a terminal (``settings.verbose: auto``).
    """
    log = Progress.of(log)
    board = tensorboard_folder(run_dir, settings, log)
    features = FeatureStore(phases, settings, layout, run_dir / "cache", log)
    checkpoint = None
    epochs_done = 0
    start = resume_from.state if resume_from is not None else {"phase_index": 0, "phase_epochs_done": 0}
    try:
        with ctrl_c_remembered():
            for index, phase in enumerate(phases):
                done_here = start["phase_epochs_done"] if index == start["phase_index"] else 0
                if index < start["phase_index"] or phase.epochs == 0 or done_here >= phase.epochs:
                    if phase.epochs == 0:
                        log(f"[finetune] phase {phase.name}: 0 epochs, skipped")
                    elif resume_from is not None:
                        log(f"[finetune] phase {phase.name}: finished before, not redone")
                    epochs_done += phase.epochs
                    continue
                trainable = configure_phase(model, layout, phase)
                steps = steps_per_epoch(phase, settings, len(dataset.train))
                setup = compile_for_phase(model, layout, phase, steps, run_dir, settings)
                resumed = f", resumed after epoch {epochs_done + done_here}" if done_here else ""
                log(
                    f"[finetune] phase {phase.name} ({index + 1}/{len(phases)}): {phase.epochs} epochs, "
                    f"{trainable.describe()}, {phase.describe()}{resumed}"
                )
                checkpoint = EpochCheckpoint(
                    run_dir,
                    phase.name,
                    index,
                    epochs_done,
                    full_model=model,
                    every_seconds=settings.checkpoint_seconds,
                    last_epoch=epochs_done + phase.epochs,
                    epochs_saved=epochs_done + done_here,
                    log=log,
                    run_clock=run_clock,
                )
                callbacks: list = [
                    InterruptAtStepEnd(),
                    StopOnNaN(phase.name, epochs_done),
                    DivergenceWatch(
                        phase.name, dataset.num_classes, epochs_done, log, run_dir, head_only=phase.trainable == "none"
                    ),
                    HistoryCSV(run_dir / "history.csv", phase.name, epochs_done),
                ]
                if settings.verbose == "auto":
                    callbacks.append(
                        PhaseProgress(
                            log,
                            phase.name,
                            first_epoch=epochs_done,
                            last_epoch=epochs_done + phase.epochs,
                            steps=steps,
                            images_per_epoch=min(steps * settings.batch_size_for(phase), len(dataset.train)),
                        )
                    )
                if board is not None:
                    callbacks.append(keras.callbacks.TensorBoard(log_dir=str(board), write_graph=False))
                if settings.gradient_health_every:
                    callbacks.append(GradientHealth(run_dir, phase.name, settings.gradient_health_every, log))
                if done_here and resume_from is not None:
                    callbacks.insert(0, RestoreTrainingState(resume_from, model))
                if settings.recalibrate_bn == "always" or (settings.recalibrate_bn == "auto" and phase.train_bn):
                    callbacks.append(
                        RecalibrateBatchNorm(
                            model,
                            dataset.train.images,
                            epochs_done + phase.epochs,
                            batch_size=settings.batch_size_for(phase),
                            max_images=settings.recalibrate_bn_images,
                            seed=seed,
                            log=log,
                            phase=phase.name,
                        )
                    )
                callbacks += [checkpoint, *setup.callbacks]  # the checkpoint keeps recalibrated statistics
                fit_phase(
                    model,
                    layout,
                    phase,
                    dataset,
                    settings,
                    seed=seed,
                    initial_epoch=epochs_done + done_here,
                    phase_epochs_done=done_here,
                    callbacks=callbacks,
                    features=features,
                )
                checkpoint = None  # the phase's last epoch is saved; a later Ctrl-C has no epoch to save
                epochs_done += phase.epochs
                phase_done(phase.name)
    except KeyboardInterrupt:
        interrupt_handled()
        if checkpoint is not None:
            checkpoint.save_interrupted()
        raise
    finally:
        features.close()


def tensorboard_folder(run_dir: Path, settings: TrainingConfig, log: Progress) -> Path | None:
    """Where Keras's TensorBoard callback writes (epochs are numbered across phases); None when off.

    Keras writes the event files with ``tf.summary``, which needs TensorFlow and the tensorboard package:
    on a machine with JAX alone there are none.
    """
    if not settings.tensorboard:
        return None
    import importlib.util

    missing = [name for name in ("tensorflow", "tensorboard") if importlib.util.find_spec(name) is None]
    if missing:
        log(f"[finetune] note: {' and '.join(missing)} not installed here, so no TensorBoard logs are written")
        return None
    return run_dir / "tensorboard"


class StopOnNaN(keras.callbacks.Callback):
    """Stops the run at the first step whose loss is NaN or infinite, naming the phase, epoch and step."""

    def __init__(self, phase: str, first_epoch: int):
        super().__init__()
        self.phase = phase
        self.epoch = first_epoch

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not math.isfinite(float(loss)):
            raise TrainingDiverged(
                f"loss became {float(loss)} in phase {self.phase}, epoch {self.epoch + 1}, step {batch + 1}; "
                "try a lower learning rate or gradient clipping (optimizer: {clipnorm: 1.0}); "
                "checkpoint.keras keeps the last good epoch"
            )
