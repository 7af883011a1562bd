"""The table a run ends with: per phase its epochs, time and best validation accuracy; then the test result."""

from __future__ import annotations

from pathlib import Path

from finetune.progress import duration
from finetune.report.history import phase_spans


def summary_lines(history: list[dict], metrics: dict, run_dir: Path) -> list[str]:
    """The end-of-run table as lines of text."""
    spans = phase_spans(history)
    width = max([len("phase"), *(len(span.name) for span in spans)])
    lines = [f"{'phase':<{width}}  epochs      time  best val acc"]
    for span in spans:
        best = f"{span.best_val_accuracy:.4f}" if span.best_val_accuracy is not None else "-"
        lines.append(f"{span.name:<{width}}  {span.epochs:>6}  {duration(span.seconds):>8}  {best:>12}")
    test = metrics["test"]
    if test.get("multi_label"):
        lines.append(
            f"test micro-F1 {test['micro_f1']:.4f}, macro-F1 {test['macro_f1']:.4f}, "
            f"mAP {test['mean_average_precision'] or 0:.4f}, exact match {test['exact_match']:.4f} "
            f"on {test['examples']:,} images; {duration(metrics['seconds'])} in all; results in {run_dir}"
        )
        return lines
    lines.append(
        f"test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f} on {test['examples']:,} images; "
        f"{duration(metrics['seconds'])} in all; results in {run_dir}"
    )
    return lines


def stage_line(seconds_by_stage: dict[str, float]) -> str:
    """Where the run's time went, in the order the stages ran, with each stage's share."""
    total = sum(seconds_by_stage.values()) or 1.0
    parts = [
        f"{name} {seconds:.1f}s ({100 * seconds / total:.0f}%)"
        if seconds < 60
        else f"{name} {duration(seconds)} ({100 * seconds / total:.0f}%)"
        for name, seconds in seconds_by_stage.items()
    ]
    return f"where the time went ({duration(total)}): {', '.join(parts)}"
