"""``learning_curves.png`` (loss and accuracy) and ``learning_rate.png``: every phase on one epoch axis."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.ticker import MaxNLocator

from finetune.report.canvas import new_figure, save_png
from finetune.report.history import PhaseSpan, boundaries, epochs, has_values, phase_spans, series

TRAIN = {"color": "#1f77b4", "marker": "o", "markersize": 3}
VALIDATION = {"color": "#d62728", "marker": "s", "markersize": 3}


def mark_phases(axes: Axes, spans: Sequence[PhaseSpan]) -> None:
    """A dashed line half an epoch before each new phase, and each phase's name over its epochs."""
    for first in boundaries(spans):
        axes.axvline(first - 0.5, color="#777777", linestyle="--", linewidth=1)
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    for span in spans:
        axes.text(
            (span.first + span.last) / 2,
            1.01,
            span.name,
            transform=axes.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=9,
            color="#444444",
            clip_on=False,
        )


def draw_learning_curves(rows: Sequence[dict], path: str | Path, title: str = "") -> list[int]:
    """Loss and accuracy, train and validation, per epoch; returns the epochs where a new phase starts."""
    spans = phase_spans(rows)
    x = epochs(rows)
    figure = new_figure(10, 4.2)
    loss_axes, accuracy_axes = figure.subplots(1, 2)
    for axes, key, label in ((loss_axes, "loss", "loss"), (accuracy_axes, "accuracy", "accuracy")):
        axes.plot(x, series(rows, key), label=f"train {label}", **TRAIN)
        validation = series(rows, f"val_{key}")
        if has_values(validation):
            axes.plot(x, validation, label=f"validation {label}", **VALIDATION)
        mark_phases(axes, spans)
        axes.set_xlabel("epoch")
        axes.set_ylabel(label)
        axes.grid(True, alpha=0.3)
        axes.legend(loc="best", fontsize=8)
        if x:
            axes.set_xlim(min(x) - 0.6, max(x) + 0.6)
    accuracy_axes.set_ylim(0, 1.02)
    if title:
        figure.suptitle(title)
    save_png(figure, path)
    return boundaries(spans)


def draw_learning_rate(rows: Sequence[dict], path: str | Path, title: str = "") -> list[int]:
    """The learning rate at each epoch's end, log scale when it spans more than a decade; returns phase starts."""
    spans = phase_spans(rows)
    x = epochs(rows)
    rates = series(rows, "learning_rate")
    figure = new_figure(10, 3.6)
    axes = figure.subplots()
    axes.plot(x, rates, color="#2ca02c", marker="o", markersize=3)
    mark_phases(axes, spans)
    if _spans_a_decade(rates):
        axes.set_yscale("log")
    axes.set_xlabel("epoch")
    axes.set_ylabel("learning rate (end of epoch)")
    axes.grid(True, alpha=0.3, which="both")
    if x:
        axes.set_xlim(min(x) - 0.6, max(x) + 0.6)
    if title:
        figure.suptitle(title)
    save_png(figure, path)
    return boundaries(spans)


def _spans_a_decade(values: Sequence[float]) -> bool:
    positive = [value for value in values if value > 0]  # NaN compares False
    return bool(positive) and max(positive) > 10 * min(positive)
