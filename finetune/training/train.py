"""The phases of a run, in order: each one configured, compiled and fitted, with history and checkpoints."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import keras

from finetune.backbones.spec import BackboneLayout
from finetune.recipe import PhaseConfig, TrainingConfig
from finetune.training.batch_norm import RecalibrateBatchNorm
from finetune.training.checkpoints import EpochCheckpoint, HistoryCSV
from finetune.training.features import FeatureStore
from finetune.training.interrupts import InterruptAtStepEnd, ctrl_c_remembered, interrupt_handled
from finetune.training.phases import compile_for_phase, configure_phase, fit_phase, steps_per_epoch


def train(
    model: keras.Model,
    layout: BackboneLayout,
    phases: tuple[PhaseConfig, ...],
    settings: TrainingConfig,
    dataset,
    run_dir: Path,
    *,
    seed: int,
    log: Callable[[str], None],
    phase_done: Callable[[str], None] = lambda name: None,
) -> None:
    """Train ``phases`` one after another; epochs are numbered across phases.

    Every epoch appends a row to ``history.csv``; ``checkpoint.keras`` and
    ``state.json`` are written as epochs finish (at most every
    ``settings.checkpoint_seconds``, always after a phase's last epoch) and
    when Ctrl-C stops a phase. The frozen part's outputs are shared by the
    phases that keep it frozen and freed before this returns.
    """
    features = FeatureStore(phases, settings, layout, run_dir / "cache", log)
    checkpoint = None
    epochs_done = 0
    try:
        with ctrl_c_remembered():
            for index, phase in enumerate(phases):
                if phase.epochs == 0:
                    log(f"[finetune] phase {phase.name}: 0 epochs, skipped")
                    continue
                trainable = configure_phase(model, layout, phase)
                steps = steps_per_epoch(phase, settings, len(dataset.train))
                setup = compile_for_phase(model, layout, phase, steps, run_dir, settings)
                log(
                    f"[finetune] phase {phase.name} ({index + 1}/{len(phases)}): {phase.epochs} epochs, "
                    f"{trainable.describe()}, {phase.describe()}"
                )
                checkpoint = EpochCheckpoint(
                    run_dir,
                    phase.name,
                    index,
                    epochs_done,
                    full_model=model,
                    every_seconds=settings.checkpoint_seconds,
                    last_epoch=epochs_done + phase.epochs,
                )
                callbacks = [InterruptAtStepEnd(), HistoryCSV(run_dir / "history.csv", phase.name, epochs_done)]
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
                    initial_epoch=epochs_done,
                    callbacks=callbacks,
                    features=features,
                )
                checkpoint = None  # the phase's last epoch is saved; a later Ctrl-C has no epoch to save
                epochs_done += phase.epochs
                phase_done(phase.name)
    except KeyboardInterrupt:
        interrupt_handled()
        if checkpoint is not None:
            checkpoint.save_now(interrupted=True)  # between two steps, the weights are consistent
        raise
    finally:
        features.close()
