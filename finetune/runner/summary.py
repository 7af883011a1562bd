"""The table a run ends with: per phase its epochs, time and best validation accuracy; then the test result."""

from __future__ import annotations

from pathlib import Path

from finetune.progress import duration


def phase_rows(history: list[dict]) -> list[dict]:
    """One row per phase, in run order: epochs, seconds, best validation accuracy (None without validation)."""
    rows: dict[str, dict] = {}
    for epoch in history:
        row = rows.setdefault(epoch["phase"], {"phase": epoch["phase"], "epochs": 0, "seconds": 0.0, "best": None})
        row["epochs"] += 1
        row["seconds"] += float(epoch.get("seconds") or 0.0)
        value = epoch.get("val_accuracy")
        if value not in (None, ""):
            row["best"] = max(float(value), row["best"] if row["best"] is not None else float("-inf"))
    return list(rows.values())


def summary_lines(history: list[dict], metrics: dict, run_dir: Path) -> list[str]:
    """The end-of-run table as lines of text."""
    rows = phase_rows(history)
    width = max([len("phase"), *(len(row["phase"]) for row in rows)])
    lines = [f"{'phase':<{width}}  epochs      time  best val acc"]
    for row in rows:
        best = f"{row['best']:.4f}" if row["best"] is not None else "-"
        lines.append(f"{row['phase']:<{width}}  {row['epochs']:>6}  {duration(row['seconds']):>8}  {best:>12}")
    test = metrics["test"]
    lines.append(
        f"test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f} on {test['examples']:,} images; "
        f"{duration(metrics['seconds'])} in all; results in {run_dir}"
    )
    return lines
