"""``finetune compare``: finished (or unfinished) runs side by side, from the files in their folders."""

from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Any

from finetune.errors import RecipeError, RunFolderError, first_line
from finetune.recipe import read_recipe
from finetune.report.history import phase_spans
from finetune.runner.folder import RunFolder
from finetune.training.history_file import read_history

COLUMNS = (
    "run",
    "recipe",
    "backbone",
    "image_size",
    "phases",
    "trainable_weights",
    "seconds",
    "test_accuracy",
    "test_macro_f1",
    "test_loss",
    "status",
)


def compare_row(run_dir: str | Path) -> dict:
    """One run's line of the comparison; what a folder lacks (an unfinished run's metrics) is None."""
    folder = RunFolder.existing(run_dir)
    try:
        recipe = read_recipe(folder.path / "recipe.yaml")
    except RecipeError as error:
        raise RunFolderError(f"{str(folder.path / 'recipe.yaml')!r} cannot be read: {first_line(error)}") from None
    metrics = folder.read_json("metrics.json", missing={})
    test = metrics.get("test", {})
    history = read_history(folder.path / "history.csv")
    backbone = recipe.model.backbone
    name = backbone.name + (f" to {backbone.cut_at}" if backbone.cut_at else "")
    if backbone.top_blocks_removed:
        name += f" minus top {backbone.top_blocks_removed}"
    return {
        "run": str(folder.path),
        "recipe": recipe.name,
        "backbone": f"{name} ({backbone.weights or 'random init'})",
        "image_size": "x".join(str(side) for side in recipe.data.image_hw),
        "phases": ", ".join(f"{span.name} {span.epochs}" for span in phase_spans(history)) or None,
        "trainable_weights": metrics.get("weights", {}).get("trainable"),
        "seconds": metrics.get("seconds"),
        "test_accuracy": test.get("accuracy"),
        "test_macro_f1": test.get("macro_f1"),  # None in a metrics.json written before it was computed
        "test_loss": test.get("loss"),
        "status": folder.status.get("status"),
    }


def as_text(rows: list[dict]) -> str:
    """An aligned table, best test accuracy first as given; empty cells are ``-``."""
    shown = [[_cell(column, row[column]) for column in COLUMNS] for row in rows]
    widths = [max(len(column), *(len(cells[index]) for cells in shown)) for index, column in enumerate(COLUMNS)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(COLUMNS, widths, strict=True)).rstrip()]
    for cells in shown:
        lines.append("  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip())
    return "\n".join(lines)


def as_csv(rows: list[dict]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def _cell(column: str, value: Any) -> str:
    if value is None:
        return "-"
    if column in ("test_accuracy", "test_macro_f1", "test_loss"):
        return f"{value:.4f}"
    if column == "seconds":
        return f"{value:,.0f}"
    if column == "trainable_weights":
        return f"{value:,}"
    return str(value)
