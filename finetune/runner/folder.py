"""The run folder: claimed new for every run, written atomically, with the run's status in ``run.json``."""

from __future__ import annotations

import contextlib
import re
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from finetune.errors import RunFolderError, first_line
from finetune.files import write_atomically, write_json_atomically, write_text_atomically


def check_run_dir(out: str | Path | None) -> None:
    """Refuse an ``--out`` folder that holds anything: earlier runs are never overwritten."""
    if out is None:
        return
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RunFolderError(
            f"run folder {str(path)!r} already exists and is not empty; choose another --out "
            "(earlier runs are never overwritten)"
        )


def new_run_dir(out: str | Path | None, recipe_name: str, root: Path = Path("runs")) -> Path:
    """A fresh run folder; an existing, non-empty one is never reused."""
    if out is not None:
        check_run_dir(out)
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', recipe_name)}-{stamp}"
    for attempt in range(1, 1000):
        path = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RunFolderError(f"cannot create a new run folder next to {base}")


class RunFolder:
    """One run's folder and its ``run.json`` (running / finished / failed / interrupted)."""

    def __init__(self, path: Path):
        self.path = path
        self.status: dict[str, Any] = {}

    @classmethod
    def claim(cls, out: str | Path | None, recipe) -> RunFolder:
        """A new folder (``out``, or ``runs/<name>-<time>``) holding the resolved ``recipe.yaml``."""
        folder = cls(new_run_dir(out, recipe.name))
        write_text_atomically(folder.path / "recipe.yaml", recipe.to_yaml())
        return folder

    @contextlib.contextmanager
    def recording(self) -> Iterator[RunFolder]:
        """``run.json`` says running inside the block, and how it ended when it raises."""
        self._write(status="running", started=_now(), phases_done=[])
        try:
            yield self
        except BaseException as error:
            self._write(
                status="interrupted" if isinstance(error, KeyboardInterrupt) else "failed", error=first_line(error)
            )
            raise

    def phase_done(self, name: str) -> None:
        self._write(phases_done=[*self.status["phases_done"], name])

    def finish(self) -> None:
        """Drop what only an unfinished run needs (the checkpoint, cached features); mark it finished."""
        (self.path / "checkpoint.keras").unlink(missing_ok=True)
        if (self.path / "cache").is_dir():
            shutil.rmtree(self.path / "cache")  # large, and rebuilt on demand
        self._write(status="finished", finished=_now())

    def save_model(self, model) -> Path:
        return write_atomically(self.path / "model.keras", model.save)

    def write_json(self, name: str, payload) -> Path:
        return write_json_atomically(self.path / name, payload)

    def _write(self, **changes) -> None:
        self.status.update(changes)
        write_json_atomically(self.path / "run.json", self.status)


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")
