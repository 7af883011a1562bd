"""The run folder: claimed new for every run, written atomically, with the run's status in ``run.json``."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from finetune.errors import RunFolderError, first_line
from finetune.files import write_atomically, write_json_atomically, write_text_atomically
from finetune.recipe import Recipe


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
    """A fresh run folder, claimed in one atomic step; an existing, non-empty one is never reused.

    The claim is the exclusive creation of ``run.json``: of two runs started
    at once with the same ``--out``, one gets the folder and the other a
    one-line refusal.
    """
    if out is not None:
        check_run_dir(out)
        path = Path(out)
        try:
            path.mkdir(parents=True, exist_ok=True)
            claimed = _claim(path)
        except OSError as error:  # no such parent, no permission, a read-only or pseudo file system (/proc)
            raise RunFolderError(
                f"cannot create the run folder {str(path)!r}: {error.strerror or first_line(error)}"
            ) from None
        if not claimed:
            raise RunFolderError(f"run folder {str(path)!r} was just claimed by another run; choose another --out")
        return path
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', recipe_name)}-{stamp}"
    for attempt in range(1, 1000):
        path = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            claimed = _claim(path)
        except FileExistsError:
            continue
        except OSError as error:
            raise RunFolderError(
                f"cannot create the run folder {str(path)!r}: {error.strerror or first_line(error)}"
            ) from None
        if claimed:
            return path
    raise RunFolderError(f"cannot create a new run folder next to {base}")


def _claim(path: Path) -> bool:
    try:
        os.close(os.open(path / "run.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


class RunFolder:
    """One run's folder and its ``run.json`` (running / finished / failed / interrupted)."""

    def __init__(self, path: Path):
        self.path = path
        self.status: dict[str, Any] = {}

    @classmethod
    def claim(cls, out: str | Path | None, recipe: Recipe) -> RunFolder:
        """A new folder (``out``, or ``runs/<name>-<time>``) holding the resolved ``recipe.yaml``."""
        folder = cls(new_run_dir(out, recipe.name))
        write_text_atomically(folder.path / "recipe.yaml", recipe.to_yaml())
        return folder

    @classmethod
    def existing(cls, path: str | Path) -> RunFolder:
        """An earlier run's folder, to resume; one line when it is not one."""
        folder = cls(Path(path))
        for name in ("run.json", "recipe.yaml"):
            if not (folder.path / name).is_file():
                raise RunFolderError(f"{str(folder.path)!r} is not a run folder: it has no {name}")
        try:
            folder.status = json.loads((folder.path / "run.json").read_text())
        except (OSError, ValueError) as error:
            raise RunFolderError(f"{str(folder.path / 'run.json')!r} cannot be read ({first_line(error)})") from None
        # A run whose process is gone is read (compare, export, evaluate, resume) as what it is; run.json stays.
        if (status := folder.effective_status()) != folder.status.get("status"):
            folder.status["status"] = status
        return folder

    def effective_status(self) -> str | None:
        """``run.json``'s status, except that a run recorded ``running`` that no process holds any more
        (killed, out of memory, its machine stopped: nothing wrote how it ended) is ``interrupted``."""
        status = self.status.get("status")
        if status == "running" and not self.in_use():
            return "interrupted"
        return status

    def in_use(self) -> bool:
        """Whether a process holds the folder (:meth:`locked`): asked without waiting, and without keeping it."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks, so no way to tell; what run.json says stands
            return True
        try:
            handle = (self.path / ".lock").open("r")
        except FileNotFoundError:
            return False  # never locked
        except OSError:  # not ours to read: no way to tell
            return True
        with handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            return False  # closing the file lets the shared lock go at once

    def recipe_changed(self) -> bool:
        """Whether ``recipe.yaml`` differs from the one the run started with."""
        recorded = self.status.get("recipe_sha256")
        return recorded is not None and recorded != _digest(self.path / "recipe.yaml")

    @contextlib.contextmanager
    def locked(self) -> Iterator[RunFolder]:
        """Hold the folder for this process: a second run or resume of it is refused in one line."""
        try:
            import fcntl
        except ImportError:  # Windows: no advisory locks; the atomic claim still protects new folders
            yield self
            return
        handle = (self.path / ".lock").open("a+")
        try:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise RunFolderError(
                    f"run folder {str(self.path)!r} is in use by another process (a run or resume of it is still going)"
                ) from None
            yield self
        finally:
            handle.close()

    @contextlib.contextmanager
    def recording(self, resumed: bool = False) -> Iterator[RunFolder]:
        """``run.json`` says running inside the block, and how it ended when it raises."""
        if resumed:
            self._write(status="running", error=None, resumed=[*self.status.get("resumed", []), _now()])
        else:
            self._write(
                status="running", started=_now(), phases_done=[], recipe_sha256=_digest(self.path / "recipe.yaml")
            )
        try:
            yield self
        except BaseException as error:
            self._write(
                status="interrupted" if isinstance(error, KeyboardInterrupt) else "failed", error=first_line(error)
            )
            raise

    def note(self, **facts: Any) -> None:
        """Keep ``facts`` in ``run.json`` (how the run was distributed, for resume)."""
        self._write(**facts)

    def phase_done(self, name: str) -> None:
        self._write(phases_done=[*self.status["phases_done"], name])

    def finish(self) -> None:
        """Mark the run finished, then drop what only an unfinished run needs (checkpoint, cached features)."""
        self._write(status="finished", finished=_now())  # first: a kill in between leaves a finished run
        (self.path / "checkpoint.keras").unlink(missing_ok=True)
        if (self.path / "cache").is_dir():
            shutil.rmtree(self.path / "cache")  # large, and rebuilt on demand

    def save_model(self, model: Any) -> Path:
        return write_atomically(self.path / "model.keras", model.save)

    def write_json(self, name: str, payload: Any) -> Path:
        return write_json_atomically(self.path / name, payload)

    def read_json(self, name: str, missing: dict | None = None) -> dict:
        """A JSON file of the folder; ``missing`` when it does not exist (None: one line), one line when unreadable."""
        path = self.path / name
        if missing is not None and not path.is_file():
            return missing
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise RunFolderError(f"{str(path)!r} cannot be read ({first_line(error)})") from None

    def _write(self, **changes: Any) -> None:
        self.status.update(changes)
        write_json_atomically(self.path / "run.json", self.status)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _now() -> str:
    return datetime.now().isoformat(timespec="seconds")
