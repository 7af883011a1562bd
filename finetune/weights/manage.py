"""ImageNet weight files for offline machines: list, fetch, import.

Every ``keras.applications`` backbone loads its ImageNet weights from one
file with a canonical name (``xception_weights_tf_dim_ordering_tf_kernels_notop.h5``).
``finetune`` looks for that name in ``$FINETUNE_WEIGHTS_DIR`` and then in
Keras's cache (see :func:`finetune.backbones.weight_files.search_dirs`), so a
folder filled on a connected machine (``fetch``) or from files at hand
(``import``) can be copied to an air-gapped one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from finetune._keras_compat import keras_downloads
from finetune.backbones.build import build_backbone
from finetune.backbones.registry import backbones, get
from finetune.backbones.weight_files import find_imagenet_weights, search_dirs
from finetune.errors import RecipeError, WeightsError, first_line
from finetune.files import copy_atomically, write_atomically

_HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

#: The input size each backbone's ImageNet weights were trained at (file names
#: of MobileNet and MobileNetV2 depend on it; the others do not).
DEFAULT_SIZE = 224


@dataclass(frozen=True)
class WeightsStatus:
    """Where (if anywhere) one backbone's ImageNet file is."""

    backbone: str
    file_name: str | None
    path: Path | None
    problem: str | None = None
    """Why a file that is there cannot be used (not HDF5, empty, fails to load)."""

    @property
    def usable(self) -> bool:
        return self.path is not None and self.problem is None

    def describe(self) -> str:
        """``present PATH``, ``missing FILE`` or ``PROBLEM ...``, for the listing."""
        if self.path is None:
            return f"PROBLEM   {self.problem}" if self.problem else f"missing   {self.file_name}"
        return f"PROBLEM   {self.path} ({self.problem})" if self.problem else f"present   {self.path}"


def target_dir(folder: str | Path | None = None) -> Path:
    """Where ``fetch`` and ``import`` write: ``folder``, else the first search folder."""
    if folder is not None:
        return Path(folder).expanduser()
    return search_dirs()[0]


def status(
    names: list[str] | None = None, image_size: int = DEFAULT_SIZE, options: dict | None = None, check: bool = False
) -> list[WeightsStatus]:
    """For each backbone with ImageNet weights: its file and whether it is present.

    A present file is checked cheaply (non-empty, HDF5 signature); with
    ``check`` it is also loaded into its architecture.
    """
    result = []
    for name in names or backbones.names():
        spec = get(name)
        if spec.weights_file is None:
            continue
        try:
            file_name = spec.imagenet_file((image_size, image_size), options)
        except RecipeError as error:  # e.g. a width this backbone has no ImageNet file for
            result.append(WeightsStatus(name, None, None, first_line(error)))
            continue
        path = find_imagenet_weights(spec, (image_size, image_size), options)
        problem = None
        if path is not None:
            problem = _quick_problem(path)
            if problem is None and check:
                problem = _load_problem(spec, path, image_size, options)
        result.append(WeightsStatus(name, file_name, path, problem))
    return result


def _quick_problem(path: Path) -> str | None:
    if path.stat().st_size == 0:
        return "empty file"
    with path.open("rb") as handle:
        head = handle.read(8)
    if path.suffix == ".h5" and head != _HDF5_SIGNATURE:
        return "not an HDF5 file"
    if path.suffix in (".pth", ".pt") and not (head.startswith(b"\x80") or head.startswith(b"PK")):
        return "not a PyTorch file"
    return None


def _load_problem(spec, path: Path, image_size: int, options) -> str | None:
    try:
        build_backbone(spec, (image_size, image_size), str(path), options)
    except WeightsError as error:
        return str(error).split(": ", 1)[-1]
    finally:
        _clear_session()
    return None


def _clear_session() -> None:
    import keras

    keras.backend.clear_session()


def download(file_name: str, origin: str, file_hash: str | None, folder: Path) -> str:
    """Keras's own download, with its hash check, into ``folder``.

    Tests replace this function: nothing here may be skipped in their place.
    """
    import keras

    return keras.utils.get_file(
        fname=file_name,
        origin=origin,
        file_hash=file_hash,
        cache_subdir=str(folder.resolve()),
    )


def fetch(
    name: str, folder: str | Path | None = None, image_size: int = DEFAULT_SIZE, options: dict | None = None
) -> Path:
    """Download ``name``'s ImageNet weights into ``folder`` and prove they load.

    The URL and hash are the ones ``keras.applications`` itself uses: the
    backbone is built with ``weights="imagenet"`` while its download is sent
    to ``folder``.
    """
    spec = get(name)
    folder = target_dir(folder)
    file_name = spec.imagenet_file((image_size, image_size), options)
    if file_name is None:
        raise WeightsError(f"backbone {name!r} has no ImageNet weights to fetch")
    folder.mkdir(parents=True, exist_ok=True)
    if spec.locate_weights is not None:
        return _copy_packaged(spec, folder / file_name, image_size, options)
    fetched: list[Path] = []

    def into_folder(fname, origin, file_hash, keras_download):
        path = download(fname, origin, file_hash, folder)
        fetched.append(Path(path))
        return path

    try:
        with keras_downloads(into_folder):
            input_shape = (image_size, image_size, spec.channels or 3)
            spec.build(input_shape=input_shape, weights="imagenet", **{**spec.default_options, **(options or {})})
    except WeightsError:
        raise
    except Exception as error:  # noqa: BLE001 - Keras raises plain Exceptions for fetch and hash failures
        raise WeightsError(f"cannot fetch {file_name} for {name!r}: {first_line(error)}") from None
    finally:
        _clear_session()
    destination = folder / file_name
    if not destination.is_file():
        asked = ", ".join(path.name for path in fetched) or "nothing"
        raise WeightsError(f"fetching {name!r} downloaded {asked}, not {file_name}")
    return destination


def _copy_packaged(spec, destination: Path, image_size: int, options) -> Path:
    """Weights a pip package ships: copied into the folder (for a machine without the package)."""
    source = spec.locate_weights()  # a one-line WeightsError saying what to install
    if destination.exists() and _same_bytes(destination, source):
        return destination
    copy_atomically(source, destination)
    problem = _load_problem(spec, destination, image_size, options)
    if problem is not None:
        destination.unlink()
        raise WeightsError(f"{source} does not load into {spec.name!r}: {problem}")
    return destination


def import_file(
    name: str,
    source: str | Path,
    folder: str | Path | None = None,
    image_size: int = DEFAULT_SIZE,
    options: dict | None = None,
    force: bool = False,
) -> Path:
    """Check that ``source`` loads into ``name``'s architecture; store it under the canonical name.

    A legacy ``.h5`` weights file (or a ``.pth`` for a backbone whose
    canonical file is one) is copied byte for byte; a Keras 3 ``.weights.h5``
    or ``.keras`` file is re-saved in the legacy layout that the canonical
    ``.h5`` name implies. An existing, different file is only
    replaced with ``force``.
    """
    spec = get(name)
    source = Path(source).expanduser()
    if not source.is_file():
        raise WeightsError(f"weights file {str(source)!r} does not exist")
    file_name = spec.imagenet_file((image_size, image_size), options)
    if file_name is None:
        raise WeightsError(f"backbone {name!r} has no canonical ImageNet file name")
    folder = target_dir(folder)
    destination = folder / file_name
    copy_bytes = _is_legacy_h5(source) if destination.suffix == ".h5" else source.suffix == destination.suffix
    if destination.suffix != ".h5" and not copy_bytes:
        raise WeightsError(f"{name!r} stores its weights as {destination.suffix} files; {source.name} is not one")
    if destination.exists() and not force and not _same_bytes(destination, source):
        raise WeightsError(f"{destination} already exists; pass --force to replace it")
    model = build_backbone(spec, (image_size, image_size), str(source), options)  # raises if it won't load
    folder.mkdir(parents=True, exist_ok=True)
    try:
        if copy_bytes:
            copy_atomically(source, destination)
        else:
            write_atomically(destination, model.save)  # a .h5 path makes model.save write the legacy layout
    finally:
        _clear_session()
    return destination


def _is_legacy_h5(path: Path) -> bool:
    return path.suffix in (".h5", ".hdf5") and not path.name.endswith(".weights.h5")


def _same_bytes(first: Path, second: Path) -> bool:
    if first.stat().st_size != second.stat().st_size:
        return False
    with first.open("rb") as a, second.open("rb") as b:
        while True:
            chunk = a.read(1 << 20)
            if chunk != b.read(1 << 20):
                return False
            if not chunk:
                return True
