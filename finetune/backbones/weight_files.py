"""Where weight files are found: the weights folders (offline copies), then a package that ships them."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from finetune.backbones.spec import BackboneSpec
from finetune.errors import WeightsError


def search_dirs() -> list[Path]:
    """Folders searched for canonical ImageNet weight files, in order.

    ``$FINETUNE_WEIGHTS_DIR`` first (a folder copied to an offline machine),
    then Keras's own cache (``$KERAS_HOME/models``, by default
    ``~/.keras/models``). A file found here is loaded directly: Keras would
    re-download a cached file whose hash it cannot check.
    """
    dirs = []
    if os.environ.get("FINETUNE_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["FINETUNE_WEIGHTS_DIR"]).expanduser())
    dirs.append(keras_cache_dir())
    return dirs


def keras_cache_dir() -> Path:
    """Where ``keras.applications`` downloads ImageNet weights."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home).expanduser() / "models"


def find_in_folders(file_name: str | None) -> Path | None:
    """``file_name`` in the first searched folder that has it."""
    if file_name is None:
        return None
    for folder in search_dirs():
        candidate = folder / file_name
        if candidate.is_file():
            return candidate
    return None


def find_imagenet_weights(spec: BackboneSpec, image_size, options=None) -> Path | None:
    """The ImageNet file to load without a download: in the searched folders, else from a package.

    None when neither has it (then the backbone's own constructor downloads
    the file, or says what to install).
    """
    found = find_in_folders(spec.imagenet_file(tuple(image_size), options))
    if found is None and spec.locate_weights is not None:
        try:
            found = spec.locate_weights()
        except WeightsError:
            return None
    return found


#: Where ``keras.applications`` downloads its ImageNet files from.
DOWNLOAD_HOST = "storage.googleapis.com"


def download_reachable(timeout: float = 3.0) -> str | None:
    """None when Keras's download host accepts a connection, else why not (offline, no DNS, a firewall)."""
    try:
        socket.create_connection((DOWNLOAD_HOST, 443), timeout=timeout).close()
    except OSError as error:
        return f"{DOWNLOAD_HOST} cannot be reached: {error.strerror or type(error).__name__}"
    return None
