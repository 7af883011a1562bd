"""Where a run's time went: seconds per stage, each counted once.

A stage that contains another (a phase's fit, whose first epoch computes the frozen part) is
charged only for its own time, so the stages add up to the run's time and a slow run shows
which stage made it slow.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path


class StageTimes:
    """Seconds per named stage, in the order the stages first ran."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open stage: seconds already charged to stages inside it

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Charge the block's time to ``name``, less what stages opened inside it were charged."""
        began = time.perf_counter()
        self._inner.append(0.0)
        try:
            yield
        finally:
            inner = self._inner.pop()
            elapsed = time.perf_counter() - began
            self._charge(name, elapsed - inner)
            if self._inner:
                self._inner[-1] += elapsed

    def add(self, name: str, seconds: float) -> None:
        """Charge ``seconds`` measured elsewhere to ``name`` (and take them out of the open stage)."""
        self._charge(name, seconds)
        if self._inner:
            self._inner[-1] += seconds

    def _charge(self, name: str, seconds: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + max(seconds, 0.0)

    def as_dict(self) -> dict[str, float]:
        """``{stage: seconds}``, rounded to 10 ms, in the order the stages first ran."""
        return {name: round(seconds, 2) for name, seconds in self._seconds.items()}

    def __bool__(self) -> bool:
        return bool(self._seconds)


def seconds_since_process_start() -> float | None:
    """How long this process has existed (interpreter start and imports included); None where unknown.

    Linux only: ``/proc/self/stat`` gives the start in clock ticks after boot.
    """
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ticks = int(fields[19])  # field 22 of stat(5); the first two are before the split
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return max(uptime - ticks / os.sysconf("SC_CLK_TCK"), 0.0)
    except (OSError, ValueError, IndexError):
        return None
