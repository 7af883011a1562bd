"""Your own images: one sub-folder per class, decoded once into a memory-mapped cache."""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import re
import shutil
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from finetune.data.arrays import pick_rows
from finetune.data.images import IMAGE_EXTENSIONS, is_gray_mode, to_stored
from finetune.data.sampling import carve_test_split, list_names
from finetune.data.splits import DatasetSource, Split, class_counts, split_source
from finetune.errors import DataError, RecipeError, first_line
from finetune.files import is_dir, is_file

if TYPE_CHECKING:
    from typing import TypeVar

    from finetune.recipe.schema import DataConfig

    _T = TypeVar("_T")

_Files = Sequence[tuple[Path, int | tuple[int, ...]]]  # image files and their labels (or, multi-label, tag numbers)

logger = logging.getLogger(__name__)


def check_folder_setting(config: DataConfig) -> None:
    """The folder may be named once only: in ``data.source`` (``image_folder:PATH``) or in ``data.data_dir``."""
    _given_folder(config)


def _given_folder(config: DataConfig) -> str | None:
    _, argument = split_source(config.source)
    if argument and config.data_dir and Path(argument).expanduser() != Path(config.data_dir).expanduser():
        raise RecipeError(f"data.source names folder {argument!r} but data.data_dir is {config.data_dir!r}; keep one")
    return argument or config.data_dir


def image_folder_path(config: DataConfig) -> Path:
    """The folder of ``image_folder`` (``data.data_dir`` or ``image_folder:PATH``), which must exist."""
    folder = _given_folder(config)
    if not folder:
        raise DataError(
            "data.source image_folder needs data.data_dir: a folder with one sub-folder per class "
            "(--set data.data_dir=PATH)"
        )
    path = Path(folder).expanduser()
    if not is_dir(path):
        raise DataError(f"image folder {str(path)!r} {'is not a folder' if is_file(path) else 'does not exist'}")
    return path


def _class_folders(folder: Path) -> list[Path]:
    return sorted(
        (path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")),
        key=lambda path: path.name,
    )


def _image_files(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder`` (hidden files and folders skipped), sorted."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found += [
            Path(parent) / name
            for name in files
            if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS
        ]
    return sorted(found)


def scan_image_folder(root: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]], list[tuple[Path, int]] | None]:
    """``(class names, train files, test files or None)``; no image is opened.

    ``root/train/<class>`` and ``root/test/<class>`` when both ``train`` and
    ``test`` exist, else ``root/<class>``.
    """
    split_layout = (root / "train").is_dir() and (root / "test").is_dir()
    train_root = root / "train" if split_layout else root
    classes = _class_folders(train_root)
    names = tuple(folder.name for folder in classes)
    if len(classes) < 2:
        raise DataError(
            f"image folder {str(train_root)!r} needs at least 2 class sub-folders, found "
            f"{len(classes)}{': ' + names[0] if names else ''}"
        )

    def files_of(base: Path, required: bool) -> list[tuple[Path, int]]:
        found = []
        for label, name in enumerate(names):
            files = _image_files(base / name) if (base / name).is_dir() else []
            if not files and required:
                raise DataError(
                    f"class folder {str(base / name)!r} has no images ({', '.join(sorted(IMAGE_EXTENSIONS))})"
                )
            found += [(path, label) for path in files]
        return found

    train = files_of(train_root, required=True)
    if not split_layout:
        return names, train, None
    extra = sorted(set(folder.name for folder in _class_folders(root / "test")) - set(names))
    if extra:
        raise DataError(
            f"{str(root / 'test')!r} has class folder(s) {', '.join(extra)} missing from {str(train_root)!r}"
        )
    return names, train, files_of(root / "test", required=False)


def peek_image_folder(config: DataConfig) -> tuple[str, ...]:
    return scan_image_folder(image_folder_path(config))[0]


def cache_root() -> Path:
    """Where decoded image folders are kept: ``$FINETUNE_CACHE_DIR``, else ``~/.cache/finetune``."""
    if os.environ.get("FINETUNE_CACHE_DIR"):
        return Path(os.environ["FINETUNE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "finetune"


_CACHE_FORMAT = 1


def _image_folder_splits(config: DataConfig) -> tuple[Path, tuple[str, ...], list[_Files], str]:
    """``(folder, class names, [train files, test files], layout)``: the test split carved when not given."""
    root = image_folder_path(config).resolve()
    class_names, train_files, test_files = scan_image_folder(root)
    if test_files is not None:
        return root, class_names, [train_files, test_files], "train/ and test/ folders"
    labels = np.array([label for _, label in train_files], dtype=np.int32)
    test_positions = carve_test_split(labels, config.test_split, str(root))
    in_test = np.zeros(len(labels), dtype=bool)
    in_test[test_positions] = True
    test_files = [item for item, chosen in zip(train_files, in_test, strict=True) if chosen]
    train_files = [item for item, chosen in zip(train_files, in_test, strict=True) if not chosen]
    return root, class_names, [train_files, test_files], f"test_split {config.test_split}"


def load_image_folder(config: DataConfig) -> tuple[Split, Split, tuple[str, ...], str]:
    """A folder of images, decoded once into a uint8 ``.npy`` that later runs memory-map.

    The cache entry is keyed by the files (path, size, mtime), the class
    list, the stored size, the resize mode and the test split, so editing the
    folder or the recipe's data settings decodes afresh.
    """
    root, class_names, parts, layout = _image_folder_splits(config)
    (train, test), where = load_cached(parts, config, class_names, root, layout)
    return train, test, class_names, where


def image_folder_split_counts(config: DataConfig) -> tuple[tuple[str, ...], dict[str, list[int]]]:
    """The class names and each split's images per class, without opening an image."""
    _, class_names, parts, _ = _image_folder_splits(config)
    return class_names, split_counts(dict(zip(("train", "test"), parts, strict=True)), len(class_names))


def split_counts(parts: Mapping[str, _Files], classes: int) -> dict[str, list[int]]:
    """Images per class of each split of ``parts`` (split name -> files and labels)."""
    return {name: class_counts(label_array(files, classes), classes).tolist() for name, files in parts.items()}


def label_array(files: _Files, classes: int) -> np.ndarray:
    """The labels of ``files``: int32, or (tag numbers given) a uint8 multi-hot matrix of ``classes`` columns."""
    if not any(isinstance(label, tuple) for _, label in files):
        return np.array([label for _, label in files], dtype=np.int32)
    hot = np.zeros((len(files), classes), dtype=np.uint8)
    for row, (_, tags) in enumerate(files):
        hot[row, list(tags) if isinstance(tags, tuple) else [tags]] = 1
    return hot


def load_cached(
    parts: Sequence[_Files],
    config: DataConfig,
    class_names: tuple[str, ...],
    origin: Path,
    layout: str,
    kind: str = "image_folder",
    image_name: Callable[[int], str] | None = None,
) -> tuple[list[Split], str]:
    """The splits of ``parts`` (files and labels, the training split first), decoded once into a cache entry.

    ``origin`` is the folder (or the file listing the images: ``kind`` csv) the entry is named and keyed
    by; ``image_name(position)`` names an image of ``parts`` (in order) in an error, else its path.
    Returns the splits and where they came from.
    """
    root = origin if origin.is_dir() else origin.parent
    files = [item for part in parts for item in part]
    labels = label_array(files, len(class_names))
    bounds = np.cumsum([0, *(len(part) for part in parts)])
    size_hw = config.stored_hw
    key_material = {
        "format": _CACHE_FORMAT,
        "root": str(origin),
        "classes": class_names,
        "size": size_hw,
        "resize": config.resize,
        "layout": layout,
        "train": len(parts[0]),
        "files": [[*_file_key(path, root, config.skip_bad_images), label] for path, label in files],
        "skip_bad_images": config.skip_bad_images,
    }
    if len(parts) != 2:
        key_material["parts"] = [len(part) for part in parts]
    key = hashlib.sha256(json.dumps(key_material).encode()).hexdigest()[:20]
    entry = cache_root() / kind / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', origin.name)[:40]}-{key}"
    what = f"{kind.replace('_', ' ')} {str(origin)!r}"
    if (entry / "meta.json").is_file():
        images, how = np.load(entry / "images.npy", mmap_mode="r"), "cached"
        skipped = json.loads((entry / "meta.json").read_text()).get("skipped", [])
    else:
        images, skipped = _decode_into_cache(
            files, size_hw, config.resize, entry, class_names, root, config.skip_bad_images, image_name
        )
        how = "decoded"
    if skipped:
        splits = _without(images, labels, bounds, skipped, class_names, what)
        how += f", {len(skipped)} unreadable image{'s' if len(skipped) != 1 else ''} skipped"
    else:
        splits = [Split(images[start:end], labels[start:end]) for start, end in itertools.pairwise(bounds)]
    _warn_about_thin_classes(splits[0], splits[-1], class_names, what)
    return splits, f"{origin} ({layout}; {how}, {len(files)} images at {entry})"


def _warn_about_thin_classes(train: Split, test: Split, class_names: Sequence[str], what: str) -> None:
    """A warning naming the classes with a single training image, and one naming those without test images."""
    trained = class_counts(train.labels, len(class_names))
    tested = class_counts(test.labels, len(class_names))
    single = [name for name, count in zip(class_names, trained, strict=True) if count == 1]
    if single:
        logger.warning(
            f"{what}: {_classes(single)} one training image only; "
            "what the model learns of such a class rests on that one image"
        )
    untested = [name for name, count in zip(class_names, tested, strict=True) if count == 0]
    if untested:
        logger.warning(
            f"{what}: {_classes(untested)} no test images; "
            "the test metrics say nothing about such a class (its accuracy is null)"
        )


def _classes(names: Sequence[str]) -> str:
    return f"class {names[0]!r} has" if len(names) == 1 else f"classes {list_names(names)} have"


def _without(
    images: np.ndarray,
    labels: np.ndarray,
    bounds: np.ndarray,
    skipped: list[int],
    class_names: Sequence[str],
    what: str,
) -> list[Split]:
    """The splits (rows ``bounds[i]:bounds[i + 1]``) without the rows of images that could not be read."""
    kept = np.setdiff1d(np.arange(len(labels)), np.asarray(skipped, dtype=np.int64))
    rows = [kept[(kept >= start) & (kept < end)] for start, end in itertools.pairwise(bounds)]
    counts = class_counts(labels[rows[0]], len(class_names))
    empty = [name for name, count in zip(class_names, counts, strict=True) if count == 0]
    if empty:
        raise DataError(f"{what}: class {empty[0]!r} has no readable training images left")
    return [
        Split(pick_rows(images, part), labels[part])  # type: ignore[arg-type]  # rows stay mapped
        for part in rows
    ]


def _file_key(path: Path, root: Path, skip_bad: bool = False) -> list[str | int | None]:
    name = str(path.relative_to(root)) if path.is_relative_to(root) else str(path)
    try:
        stat = path.stat()
    except OSError as error:  # a dangling link, a file removed meanwhile
        if skip_bad:
            return [name, None, None]  # decoding will skip it
        raise DataError(f"cannot read image {path}: {first_line(error)}") from None
    return [name, stat.st_size, stat.st_mtime_ns]


def _image_mode(path: Path) -> str:
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)  # a bomb is refused, not decoded
            with Image.open(path) as image:  # reads the header only
                return image.mode
    except Exception as error:  # noqa: BLE001 - Pillow raises many kinds for a bad file
        raise DataError(f"cannot read image {path}: {first_line(error)}") from None


def _decode_image(path: Path, size_hw: tuple[int, int], channels: int, resize: str) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings(), Image.open(path) as image:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if image.format == "JPEG":
                # Let libjpeg decode at a reduced scale that still covers the stored size.
                image.draft(None, (max(size_hw),) * 2)
            return to_stored(ImageOps.exif_transpose(image), size_hw, channels, resize)
    except Exception as error:  # noqa: BLE001
        raise DataError(f"cannot read image {path}: {first_line(error)}") from None


def _decode_into_cache(
    files: _Files,
    size_hw: tuple[int, int],
    resize: str,
    entry: Path,
    class_names: Sequence[str],
    root: Path,
    skip_bad: bool = False,
    image_name: Callable[[int], str] | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Decode ``files`` into ``entry/images.npy`` (written aside, then renamed) and map it.

    Returns the array and the positions of images that could not be read
    (only with ``skip_bad``; otherwise the first one is a DataError, its
    message led by ``image_name(position)`` when given).
    """
    from concurrent.futures import ThreadPoolExecutor

    paths = [path for path, _ in files]
    skipped: set[int] = set()

    def attempt(position: int, read: Callable[[Path], _T]) -> _T | None:
        try:
            return read(paths[position])
        except DataError as error:
            if not skip_bad:
                if image_name is not None:
                    raise DataError(f"{image_name(position)}: {error}") from None
                raise
            skipped.add(position)
            return None

    # Headers first: one channel only if every image is greyscale, decided before any pixel is written.
    modes = [attempt(position, _image_mode) for position in range(len(paths))]
    channels = 1 if all(is_gray_mode(mode) for mode in modes if mode is not None) else 3
    height, width = size_hw
    partial = entry.with_name(f".{entry.name}.partial-{os.getpid()}")
    try:
        partial.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(
            f"cannot write the image cache {partial.parent}: {first_line(error)}; "
            "set FINETUNE_CACHE_DIR to a writable folder"
        ) from None
    try:
        images = np.lib.format.open_memmap(
            partial / "images.npy", mode="w+", dtype=np.uint8, shape=(len(paths), height, width, channels)
        )
        chunk = 256  # bounds the decoded images held at once
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes without the GIL
            for start in range(0, len(paths), chunk):
                positions = [p for p in range(start, min(start + chunk, len(paths))) if p not in skipped]
                decoded = pool.map(
                    lambda p: attempt(p, lambda path: _decode_image(path, size_hw, channels, resize)), positions
                )
                for position, pixels in zip(positions, decoded, strict=True):
                    if pixels is not None:
                        images[position] = pixels
        images.flush()
        del images
        (partial / "meta.json").write_text(
            json.dumps(
                {
                    "classes": list(class_names),
                    "images": len(paths),
                    "shape": [height, width, channels],
                    "resize": resize,
                    "root": str(root),
                    "skipped": sorted(skipped),
                },
                indent=1,
            )
            + "\n"
        )
        try:
            partial.rename(entry)
        except OSError:
            if not (entry / "meta.json").is_file():
                raise
            shutil.rmtree(partial)  # another process finished the same entry first
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return np.load(entry / "images.npy", mmap_mode="r"), sorted(skipped)


SOURCE = DatasetSource(
    name="image_folder",
    load=load_image_folder,
    argument="PATH",
    resizes=True,
    peek=peek_image_folder,
    check=check_folder_setting,
    split_counts=image_folder_split_counts,
)
