"""A phase's progress: a live line per step on a terminal, one line per epoch everywhere."""

from __future__ import annotations

import logging
import math
import time
from typing import Any

import keras

from finetune import progress
from finetune.progress import duration
from finetune.training.context import PhaseRun
from finetune.training.phases import optimizer_learning_rate

logger = logging.getLogger(__name__)

_SHOWN = (("loss", "loss {:.4f}"), ("accuracy", "acc {:.4f}"))
_SHOWN_AT_EPOCH_END = (*_SHOWN, ("val_loss", "val_loss {:.4f}"), ("val_accuracy", "val_acc {:.4f}"))


class PhaseProgress(keras.callbacks.Callback):
    """Shows where a phase is: epoch, step, loss, accuracy, learning rate, images/s and ETA.

    Epochs are numbered across phases, as in ``history.csv``. The line per epoch is logged; the
    live line per step is drawn only where a terminal shows one (:func:`finetune.progress.live`).
    """

    async_safe = True  # its batch-end hook only draws the live line: Keras may run it on a thread

    def __init__(self, stage: PhaseRun, *, images_per_epoch: int):
        super().__init__()
        if progress.shows_live():  # only a terminal's live line needs a call per step
            self.on_train_batch_end = self._live_step
        self.phase = stage.name
        self.first_epoch = stage.first_epoch
        self.last_epoch = stage.last_epoch
        self.steps = max(1, stage.steps)
        self.images_per_step = images_per_epoch / self.steps
        self._phase_started = 0.0
        self._steps_done_in_phase = 0
        self._epoch_started = 0.0
        self._epoch = 0

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        self._phase_started = time.perf_counter()
        self._steps_done_in_phase = 0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch = epoch
        self._epoch_started = time.perf_counter()

    def _live_step(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._steps_done_in_phase += 1
        if not progress.live_due():  # converting the logs waits for the step: only when the line is redrawn
            return
        elapsed = time.perf_counter() - self._phase_started
        rate = self._steps_done_in_phase / elapsed if elapsed > 0 else 0.0
        remaining = (self.last_epoch - self._epoch - 1) * self.steps + (self.steps - batch - 1)
        parts = [
            f"{self.phase} epoch {self._epoch + 1}/{self.last_epoch} step {batch + 1}/{self.steps}",
            *_values(logs, _SHOWN),
            f"lr {optimizer_learning_rate(self.model.optimizer):.2e}",
            f"{rate * self.images_per_step:,.0f} img/s",
            f"ETA {duration(remaining / rate) if rate else '?'}",
        ]
        progress.live("  ".join(part for part in parts if part))

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        seconds = time.perf_counter() - self._epoch_started
        images = self.images_per_step * self.steps
        parts = [
            *_values(logs, _SHOWN_AT_EPOCH_END),
            f"lr {optimizer_learning_rate(self.model.optimizer):.2e}",
            f"{seconds:.1f}s",
            f"{images / seconds:,.0f} img/s" if seconds > 0 else "",
        ]
        logger.info(f"{self.phase} epoch {epoch + 1}/{self.last_epoch}: " + ", ".join(part for part in parts if part))


def _values(logs: dict[str, Any] | None, shown: tuple[tuple[str, str], ...]) -> list[str]:
    logs = logs or {}
    values = []
    for key, form in shown:
        if key in logs:
            value = float(logs[key])
            values.append(form.format(value) if math.isfinite(value) else f"{key} {value}")
    return values
