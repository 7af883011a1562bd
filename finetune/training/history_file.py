"""``history.csv`` read and cut back, without Keras: resume, compare and the report read it."""

from __future__ import annotations

import csv
from pathlib import Path

from finetune.files import write_atomically

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
