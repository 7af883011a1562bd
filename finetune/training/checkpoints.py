"""What a run keeps as it trains: a history row per epoch, and checkpoints to resume from."""

from __future__ import annotations

import csv
import time
from pathlib import Path

import keras

from finetune.files import write_atomically, write_json_atomically
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

    def __init__(
        self,
        run_dir: Path,
        phase: str,
        phase_index: int,
        first_epoch: int,
        full_model: keras.Model | None = None,
        every_seconds: float = 0.0,
        last_epoch: int | None = None,
    ):
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
    write_atomically(path, model.save)


def read_history(path: Path) -> list[dict]:
    """The rows of ``history.csv`` (none when it does not exist yet)."""
    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))
