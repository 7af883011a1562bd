"""Callback registry: Keras callbacks a phase can name in its ``callbacks:`` list.

Each factory takes ``run_dir`` and ``phase`` (the phase's name) besides its
own settings; file-writing callbacks write inside the run folder.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import keras

from finetune.registry import Registry


def callback_name(identifier: Any) -> str:
    return callbacks.split(identifier)[0]


def build_callbacks(items: list, run_dir: Path | None, phase: str) -> list[keras.callbacks.Callback]:
    folder = Path(run_dir) if run_dir else Path(".")
    return [callbacks.get(item, run_dir=folder, phase=phase) for item in items]


class RunCallback(keras.callbacks.Callback):
    """A Keras callback that also receives its run: before each fit, the phase calls :meth:`set_run` with a
    :class:`~finetune.training.context.PhaseFit`, as Keras calls ``set_model`` and ``set_params``.

    Subclass it for a callback (built in, or registered by a plugin) that needs more than the model Keras
    fits: ``fit.run`` (the whole model while a cached top trains, the run folder, the data, the seed),
    ``fit.phase`` (the phase, its epochs and steps) or ``fit.sample()`` (one batch of what the fit trains on).
    """

    fit_context: Any = None

    def set_run(self, fit: Any) -> None:
        self.fit_context = fit


class FullModelCheckpoint(RunCallback, keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint that saves the whole model even while a cached top model trains.

    The top model shares every weight with the run's whole one, so saving the
    whole model while the top one fits saves the trained weights.
    """

    full_model: keras.Model | None = None

    def set_run(self, fit: Any) -> None:
        super().set_run(fit)
        self.full_model = fit.run.model

    @contextlib.contextmanager
    def _full_model_in_place(self):
        fitted = self.model
        if self.full_model is not None:
            self.set_model(self.full_model)
        try:
            yield
        finally:
            self.set_model(fitted)

    def on_train_batch_end(self, batch, logs=None):
        if self.save_freq == "epoch":  # nothing to save between batches
            return super().on_train_batch_end(batch, logs)
        with self._full_model_in_place():
            super().on_train_batch_end(batch, logs)

    def on_epoch_end(self, epoch, logs=None):
        with self._full_model_in_place():
            super().on_epoch_end(epoch, logs)


def _early_stopping(run_dir, phase, monitor="val_loss", patience=5, restore_best_weights=True, **settings):
    return keras.callbacks.EarlyStopping(
        monitor=monitor, patience=patience, restore_best_weights=restore_best_weights, **settings
    )


def _model_checkpoint(run_dir, phase, monitor="val_loss", save_best_only=True, **settings):
    return FullModelCheckpoint(
        str(run_dir / f"best_{phase}.keras"), monitor=monitor, save_best_only=save_best_only, **settings
    )


def _reduce_lr_on_plateau(run_dir, phase, monitor="val_loss", factor=0.5, patience=5, **settings):
    return keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=factor, patience=patience, **settings)


callbacks: Registry = Registry(
    "callbacks",
    builtins={
        "early_stopping": _early_stopping,
        "model_checkpoint": _model_checkpoint,
        "tensorboard": lambda run_dir, phase, **settings: keras.callbacks.TensorBoard(
            log_dir=str(run_dir / "tensorboard" / phase), **settings
        ),
        "csv_logger": lambda run_dir, phase, **settings: keras.callbacks.CSVLogger(
            str(run_dir / f"keras_log_{phase}.csv"), **settings
        ),
        "reduce_lr_on_plateau": _reduce_lr_on_plateau,
        "terminate_on_nan": lambda run_dir, phase: keras.callbacks.TerminateOnNaN(),
    },
)
