"""``history.csv`` written as a run trains: one row per epoch, flushed at once (reading it: history_file.py)."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import keras

from finetune.training.history_file import HISTORY_FIELDS, read_history, truncate_history
from finetune.training.phases import optimizer_learning_rate

__all__ = ["HISTORY_FIELDS", "HistoryCSV", "read_history", "truncate_history"]


class HistoryCSV(keras.callbacks.Callback):
    """Appends one row per epoch to ``history.csv`` and flushes it at once."""

    def __init__(self, path: Path, phase: str, first_epoch: int, epoch_metrics: tuple[str, ...] = ()):
        super().__init__()
        self.path = Path(path)
        self.phase = phase
        self.first_epoch = first_epoch
        # training.epoch_metrics' columns after the fixed ones: a run's file keeps one header, resumed or not.
        self.fields = [*HISTORY_FIELDS, *(f"{prefix}{name}" for name in epoch_metrics for prefix in ("", "val_"))]
        self._started = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        row = {
            "phase": self.phase,
            "epoch": epoch + 1,
            "phase_epoch": epoch + 1 - self.first_epoch,
            "learning_rate": float(f"{optimizer_learning_rate(self.model.optimizer):.6g}"),
            "seconds": round(time.perf_counter() - self._started, 3),
        }
        row.update({key: float(logs[key]) for key in self.fields if key in logs})
        new_file = not self.path.exists()
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=self.fields, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)
