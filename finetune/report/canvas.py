"""Matplotlib figures drawn off screen (Agg) and saved atomically, with no pyplot state shared with anyone."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from finetune.files import write_atomically

DPI = 100


def new_figure(width: float, height: float, layout: Literal["constrained"] | None = "constrained") -> Figure:
    """A figure of ``width`` x ``height`` inches on its own Agg canvas (never the global pyplot backend)."""
    figure = Figure(figsize=(width, height), dpi=DPI, layout=layout)
    FigureCanvasAgg(figure)
    return figure


def save_png(figure: Figure, path: str | Path) -> Path:
    """``figure`` as a PNG at ``path``, written whole or not at all."""
    return write_atomically(path, lambda temporary: figure.savefig(temporary, format="png", dpi=DPI))
