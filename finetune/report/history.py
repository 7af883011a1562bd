"""The rows of ``history.csv`` as phases and numeric series (the report reads them; training writes them)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class PhaseSpan:
    """Consecutive history rows of one phase: epochs ``first`` to ``last`` (1-based, run-wide)."""

    name: str
    first: int
    last: int
    seconds: float
    best_val_accuracy: float | None

    @property
    def epochs(self) -> int:
        return self.last - self.first + 1


def number(value) -> float:
    """A history cell as a float; an empty or missing cell (no validation split) is NaN."""
    if value is None or value == "":
        return math.nan
    return float(value)


def epochs(rows: Sequence[dict]) -> list[int]:
    return [int(row["epoch"]) for row in rows]


def series(rows: Sequence[dict], key: str) -> list[float]:
    return [number(row.get(key)) for row in rows]


def has_values(values: Sequence[float]) -> bool:
    return any(not math.isnan(value) for value in values)


def phase_spans(rows: Sequence[dict]) -> list[PhaseSpan]:
    """The phases in the order they ran; a phase of 0 epochs has no rows and no span."""
    groups: list[list[dict]] = []
    for row in rows:
        if groups and groups[-1][0]["phase"] == row["phase"]:
            groups[-1].append(row)
        else:
            groups.append([row])
    spans = []
    for group in groups:
        accuracies = [value for value in series(group, "val_accuracy") if not math.isnan(value)]
        spans.append(
            PhaseSpan(
                name=group[0]["phase"],
                first=int(group[0]["epoch"]),
                last=int(group[-1]["epoch"]),
                seconds=sum(value for value in series(group, "seconds") if not math.isnan(value)),
                best_val_accuracy=max(accuracies) if accuracies else None,
            )
        )
    return spans


def boundaries(spans: Sequence[PhaseSpan]) -> list[int]:
    """The first epoch of every phase after the first: where a new phase starts."""
    return [span.first for span in spans[1:]]
