"""``history.csv``: one row per epoch, written as it happens, read by resume, compare and the report."""

from __future__ import annotations

import csv
import time
from pathlib import Path
from typing import Any

import keras

from finetune.files import write_atomically
from finetune.training.phases import optimizer_learning_rate

HISTORY_FIELDS = [
    "phase",
    "epoch",
    "phase_epoch",
    "learning_rate",
    "loss",
    "accuracy",
    "val_loss",
    "val_accuracy",
    "seconds",
]


class HistoryCSV(keras.callbacks.Callback):
    """Appends one row per epoch to ``history.csv`` and flushes it at once."""

    def __init__(self, path: Path, phase: str, first_epoch: int):
        super().__init__()
        self.path = Path(path)
        self.phase = phase
        self.first_epoch = first_epoch
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
        row.update({key: float(logs[key]) for key in HISTORY_FIELDS if key in logs})
        new_file = not self.path.exists()
        with self.path.open("a", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=HISTORY_FIELDS, extrasaction="ignore")
            if new_file:
                writer.writeheader()
            writer.writerow(row)


def truncate_history(path: Path, epochs: int) -> None:
    """Keep the rows of the first ``epochs`` epochs of ``history.csv``, byte for byte; drop later ones."""
    if not path.exists():
        return
    lines = path.read_bytes().splitlines(keepends=True)
    kept = lines[: 1 + epochs] if epochs else []
    if len(kept) != len(lines):
        write_atomically(path, lambda temporary: temporary.write_bytes(b"".join(kept)))


def read_history(path: Path) -> list[dict]:
    """The rows of ``history.csv`` (none when it does not exist yet)."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))
