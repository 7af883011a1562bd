"""Files written whole or not at all: a reader (or a crash) never sees half a file."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any


def write_atomically(path: str | Path, write: Callable[[Path], Any]) -> Path:
    """Call ``write(temporary)`` beside ``path``, flush it to disk, then rename it over ``path``.

    The temporary name keeps the last suffix (Keras picks the format of
    ``model.save`` by it) and contains ``partial``. When ``write`` fails,
    the earlier file at ``path`` is left as it was and the temporary is removed.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(3)}.partial{path.suffix}")
    try:
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
    _fsync(path.parent)  # the rename itself
    return path


def write_folder_atomically(path: str | Path, fill: Callable[[Path], Any]) -> Path:
    """Call ``fill(temporary folder)`` beside ``path``, then put it in place of ``path`` whole.

    A kill mid-write leaves no half folder under the final name; the next
    call removes what a killed one left (``.NAME.partial-*``).
    """
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.partial-*"):
        shutil.rmtree(stale, ignore_errors=True)
    temporary = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        fill(temporary)
        if path.exists():  # an export redone (a resumed run, `finetune export`)
            shutil.rmtree(path)
        os.replace(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    _fsync(path.parent)
    return path


def write_text_atomically(path: str | Path, text: str) -> Path:
    return write_atomically(path, lambda temporary: temporary.write_text(text))


def write_json_atomically(path: str | Path, payload: Any) -> Path:
    return write_text_atomically(path, json.dumps(payload, indent=2) + "\n")


def copy_atomically(source: str | Path, destination: str | Path) -> Path:
    return write_atomically(destination, lambda temporary: shutil.copyfile(source, temporary))


def _fsync(path: Path) -> None:
    if path.is_dir() and os.name == "nt":  # Windows cannot open a folder to flush it
        return
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def is_file(path: str | Path) -> bool:
    """``Path.is_file`` for a path a user typed: a name too long or with a NUL byte is simply not a file."""
    try:
        return Path(path).expanduser().is_file()
    except (OSError, ValueError):
        return False


def is_dir(path: str | Path) -> bool:
    """``Path.is_dir`` for a path a user typed (see :func:`is_file`)."""
    try:
        return Path(path).expanduser().is_dir()
    except (OSError, ValueError):
        return False
