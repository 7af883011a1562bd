"""The learning-rate finder's picture: loss against learning rate, log x scale, the suggestion marked."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def lr_find_png(
    learning_rates: Sequence[float],
    losses: Sequence[float],
    suggestion: float,
    path: Path,
    title: str = "",
    raw_losses: Sequence[float] | None = None,
) -> Path:
    """``losses`` (smoothed) against ``learning_rates``; ``raw_losses`` faint behind them; ``suggestion`` marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(7, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    if raw_losses:
        axes.plot(learning_rates, raw_losses, color="#1f77b4", alpha=0.25, linewidth=0.8, label="batch loss")
    axes.plot(learning_rates, losses, color="#1f77b4", linewidth=1.8, label="smoothed loss")
    axes.set_xscale("log")
    axes.axvline(suggestion, color="#d62728", linestyle="--", linewidth=1.2, label=f"suggestion {suggestion:.2g}")
    # The last steps' explosion would flatten the rest: show up to half again the starting loss.
    low = min(losses)
    high = min(max(losses), 1.5 * max(losses[0], low))
    margin = 0.05 * (high - low) + 1e-12
    axes.set_ylim(low - margin, high + margin)
    axes.set_xlabel("learning rate")
    axes.set_ylabel("training loss")
    axes.set_title(title or "Learning-rate finder")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="upper left")
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, format="png")
    return path
