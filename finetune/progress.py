"""What a run shows while it works: lines that stay, and one live line that only a terminal sees.

Every module logs through ``logging.getLogger(__name__)``, under the ``finetune`` logger, which
starts at INFO. :class:`ProgressHandler` writes its records as the lines users know
(``[finetune] ...``, ``[finetune] warning: ...``): the command line installs one on stderr, and
:func:`lines_to` one for a Python call's ``log=``. A terminal also gets a line that redraws in
place (epoch, step, loss, learning rate, images/s, ETA), drawn through :func:`live` on the
handler that shows it; a log file or a pipe gets only the lines that stay (one per epoch), so no
progress bar ever fills a log. Errors never go through here: the command line prints them.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

_CLEAR_LINE = "\r\x1b[K"

LOGGER_NAME = "finetune"
LINE_PREFIX = "[finetune] "

_logger = logging.getLogger(LOGGER_NAME)
if _logger.level == logging.NOTSET:  # a run's lines are INFO; an application that set a level keeps it
    _logger.setLevel(logging.INFO)
_logger.addHandler(logging.NullHandler())  # never Python's last-resort handler on stderr


class Progress:
    """A callable that prints a line that stays, with :meth:`live` for the line that redraws.

    ``mode`` is ``auto`` (live on a terminal, lines elsewhere), ``live``,
    ``lines`` or ``quiet``.
    """

    def __init__(
        self,
        stream: TextIO | None = None,
        mode: str = "auto",
        *,
        write: Callable[[str], None] | None = None,
        every_seconds: float = 0.2,
    ):
        if mode not in ("auto", "live", "lines", "quiet"):
            raise ValueError(f"unknown progress mode {mode!r}")
        self.stream = stream if stream is not None else sys.stderr
        if mode == "auto":
            mode = "live" if _is_terminal(self.stream) and write is None else "lines"
        self.mode = mode
        self._write = write
        self.every_seconds = every_seconds
        self._shown = False
        self._last_drawn = 0.0

    @classmethod
    def of(cls, log: Callable[[str], None] | Progress | None) -> Progress:
        """``log`` itself when it is a Progress; otherwise lines handed to ``log`` (print, a list's append)."""
        if isinstance(log, Progress):
            return log
        if log is None:
            return cls(mode="quiet")
        return cls(mode="lines", write=log)

    @property
    def shows_live(self) -> bool:
        return self.mode == "live"

    def __call__(self, line: str) -> None:
        if self.mode == "quiet":
            return
        self.end_live()
        if self._write is not None:
            self._write(line)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def live(self, text: str, force: bool = False) -> None:
        """Redraw the live line, at most every ``every_seconds`` unless ``force``; nothing off a terminal."""
        if not self.shows_live:
            return
        now = time.monotonic()
        if not force and self._shown and now - self._last_drawn < self.every_seconds:
            return
        width = shutil.get_terminal_size((100, 20)).columns - 1
        self.stream.write(_CLEAR_LINE + text[:width])
        self.stream.flush()
        self._shown = True
        self._last_drawn = now

    def due(self) -> bool:
        """Whether a :meth:`live` call now would draw (lets callers skip building the text)."""
        return self.shows_live and (not self._shown or time.monotonic() - self._last_drawn >= self.every_seconds)

    def end_live(self) -> None:
        if self._shown:
            self.stream.write(_CLEAR_LINE)
            self.stream.flush()
            self._shown = False


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # a closed or unusual stream
        return False


def duration(seconds: float) -> str:
    """``0:42``, ``12:05``, ``1:02:03``: the form of an ETA or an elapsed time."""
    seconds = max(0, int(round(seconds)))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


class LineFormatter(logging.Formatter):
    """A record as the line it always was: ``[finetune] `` and, for a warning, ``warning: ``."""

    def format(self, record: logging.LogRecord) -> str:
        kind = "warning: " if record.levelno >= logging.WARNING else ""
        return f"{LINE_PREFIX}{kind}{record.getMessage()}"


class ProgressHandler(logging.Handler):
    """Hands each record's line to a :class:`Progress`, which clears its live line first."""

    def __init__(self, progress: Progress, level: int = logging.NOTSET):
        super().__init__(level)
        self.progress = progress
        self.setFormatter(LineFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.progress(self.format(record))
        except Exception:  # noqa: BLE001 - logging's own rule: a broken handler never stops the run
            self.handleError(record)


@contextlib.contextmanager
def lines_to(log: Callable[[str], None] | Progress | None) -> Iterator[None]:
    """For the block, the ``finetune`` logger's lines go to ``log`` (``print``, a list's append, a Progress), and
    to handlers set on the ``finetune`` logger itself, but not up to the root logger: TensorFlow's absl calls
    ``logging.basicConfig()`` while it exports, which would print every later line twice.

    ``None`` adds nothing and changes nothing: the lines reach the handlers the application configured.
    """
    if log is None:
        yield
        return
    handler = ProgressHandler(Progress.of(log))
    propagate = _logger.propagate
    _logger.addHandler(handler)
    _logger.propagate = False
    try:
        yield
    finally:
        _logger.removeHandler(handler)
        _logger.propagate = propagate
        handler.progress.end_live()


def live(text: str, *, force: bool = False) -> None:
    """Redraw the live line of the handler that shows one (a terminal's); nothing elsewhere or when silenced."""
    shown = _live_progress()
    if shown is not None:
        shown.live(text, force=force)


def live_due() -> bool:
    """Whether a :func:`live` call now would draw (lets callers skip building the text)."""
    shown = _live_progress()
    return shown is not None and shown.due()


def shows_live() -> bool:
    """Whether a live line is shown at all (only then does a per-step hook pay off)."""
    return _live_progress() is not None


def _live_progress() -> Progress | None:
    if not _logger.isEnabledFor(logging.INFO):
        return None
    for handler in _logger.handlers:
        if isinstance(handler, ProgressHandler) and handler.progress.shows_live:
            return handler.progress
    return None


# Where a run's time went: seconds per stage, each counted once. A stage that contains another (a
# phase's fit, whose first epoch computes the frozen part) is charged only for its own time, so the
# stages add up to the run's time and a slow run shows which stage made it slow.


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
