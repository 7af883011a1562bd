"""Callback registry: Keras callbacks a phase can name in its ``callbacks:`` list.

File-writing callbacks write inside the run folder.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import keras

from finetune.errors import RecipeError
from finetune.registry import Registry

#: Each factory takes ``(run_dir, phase_name, **settings)``.
callbacks: Registry[Callable[..., keras.callbacks.Callback]] = Registry("callbacks")


def callback_name(identifier: Any) -> str:
    return identifier if isinstance(identifier, str) else str(dict(identifier).get("name"))


def build_callbacks(items: list, run_dir: Path | None, phase: str) -> list[keras.callbacks.Callback]:
    built = []
    for item in items:
        settings = {"name": item} if isinstance(item, str) else dict(item)
        name = settings.pop("name")
        factory = callbacks.lookup(name)
        try:
            built.append(factory(Path(run_dir) if run_dir else Path("."), phase, **settings))
        except (TypeError, ValueError) as error:
            raise RecipeError(f"callback {name}: {error}") from None
    return built


callbacks.register(
    "early_stopping",
    lambda run_dir, phase, monitor="val_loss", patience=5, restore_best_weights=True, **kw:
        keras.callbacks.EarlyStopping(monitor=monitor, patience=patience,
                                      restore_best_weights=restore_best_weights, **kw),
)
class FullModelCheckpoint(keras.callbacks.ModelCheckpoint):
    """ModelCheckpoint that saves the whole model even while a cached top model trains."""

    full_model: keras.Model | None = None

    def _save_model(self, epoch, batch, logs):
        fitted = self.model
        if self.full_model is not None:
            self.set_model(self.full_model)  # shares every weight with the cached top model
        try:
            super()._save_model(epoch, batch, logs)
        finally:
            self.set_model(fitted)


callbacks.register(
    "model_checkpoint",
    lambda run_dir, phase, monitor="val_loss", save_best_only=True, **kw:
        FullModelCheckpoint(str(run_dir / f"best_{phase}.keras"), monitor=monitor,
                            save_best_only=save_best_only, **kw),
)
callbacks.register(
    "tensorboard",
    lambda run_dir, phase, **kw: keras.callbacks.TensorBoard(log_dir=str(run_dir / "tensorboard" / phase), **kw),
)
callbacks.register(
    "csv_logger",
    lambda run_dir, phase, **kw: keras.callbacks.CSVLogger(str(run_dir / f"keras_log_{phase}.csv"), **kw),
)
callbacks.register(
    "reduce_lr_on_plateau",
    lambda run_dir, phase, monitor="val_loss", factor=0.5, patience=5, **kw:
        keras.callbacks.ReduceLROnPlateau(monitor=monitor, factor=factor, patience=patience, **kw),
)
callbacks.register("terminate_on_nan", lambda run_dir, phase: keras.callbacks.TerminateOnNaN())
