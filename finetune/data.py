"""Datasets: the stored form is compact pixels (uint8, N x H x W x C).

Resizing to the backbone's input and colour conversion happen inside the
model, so memory does not grow with the backbone's input size. Sources:
``fashion_mnist`` (IDX files), ``tfds:NAME`` (a prepared tensorflow-datasets
image classification dataset) and ``image_folder`` (one sub-folder per class,
decoded once into a memory-mapped cache). Splits and subsets are seeded and
stratified; ``data.classes`` and ``data.train_per_class`` apply to every source.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from finetune.errors import DataError, RecipeError
from finetune.registry import Registry


@dataclass(frozen=True)
class Split:
    images: np.ndarray  # uint8, (N, H, W, C)
    labels: np.ndarray  # int32, (N,)
    indices: np.ndarray | None = None  # positions in the source's original split

    def __post_init__(self):
        if self.indices is None:
            object.__setattr__(self, "indices", np.arange(len(self.labels)))

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, positions: np.ndarray) -> "Split":
        return Split(pick_rows(self.images, positions), self.labels[positions], self.indices[positions])


class MappedImages:
    """Rows of a memory-mapped image array, picked by position and read only when asked for.

    Subsets of a decoded image folder stay on disk this way: training,
    feature extraction and evaluation read them a batch at a time (see
    :mod:`finetune.batches`), so memory does not grow with the number of
    images. Indexing returns ordinary arrays.
    """

    def __init__(self, base: np.ndarray, positions: np.ndarray):
        self.base = base
        self.positions = np.asarray(positions, dtype=np.int64)

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.positions), *self.base.shape[1:])

    @property
    def dtype(self) -> np.dtype:
        return self.base.dtype

    @property
    def ndim(self) -> int:
        return self.base.ndim

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def __len__(self) -> int:
        return len(self.positions)

    def take(self, positions) -> "MappedImages":
        return MappedImages(self.base, self.positions[positions])

    def __getitem__(self, key) -> np.ndarray:
        key, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        rows = self.positions[key]
        if np.ndim(rows) == 0:
            picked = np.asarray(self.base[int(rows)])
            return picked[rest] if rest else picked
        picked = read_rows(self.base, rows)
        return picked[(slice(None), *rest)] if rest else picked

    def __array__(self, dtype=None, copy=None):
        array = self[:]
        return array if dtype is None else array.astype(dtype, copy=False)


def on_disk(images) -> bool:
    """Whether ``images`` (or any of a list of arrays) lives in a file rather than in memory."""
    if isinstance(images, (list, tuple)):
        return any(on_disk(item) for item in images)
    return isinstance(images, (MappedImages, np.memmap))


def pick_rows(images, positions):
    """``images[positions]``, except that rows of a memory-mapped array stay mapped."""
    if isinstance(images, MappedImages):
        return images.take(positions)
    if isinstance(images, np.memmap):
        return MappedImages(images, positions)
    return images[positions]


def read_rows(array, rows: np.ndarray) -> np.ndarray:
    """``array[rows]`` as an in-memory array, reading a memory-mapped file in ascending order."""
    if isinstance(array, MappedImages):
        return array[rows]
    rows = np.asarray(rows, dtype=np.int64)
    order = np.argsort(rows, kind="stable")
    out = np.empty((len(rows), *array.shape[1:]), dtype=array.dtype)
    out[order] = array[rows[order]]
    return out


@dataclass(frozen=True)
class Dataset:
    train: Split
    validation: Split | None
    test: Split
    class_names: tuple[str, ...]
    source: str = ""

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.images.shape[1:])

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


@dataclass(frozen=True)
class DatasetSource:
    """A registered dataset: how to load it, and what its images look like.

    ``input_shape``/``num_classes``/``class_names`` are None when they depend
    on the data (``tfds:NAME``, ``image_folder``). ``argument`` names what may
    follow a colon in ``data.source`` (``tfds:NAME``); ``peek(config)`` gives
    the class names without loading images, or None when that is not cheap.
    """

    name: str
    load: Callable[..., tuple[Split, Split, tuple[str, ...], str]]
    """``load(config) -> (train, test, class_names, where it was found)``"""
    input_shape: tuple[int, int, int] | None = None
    num_classes: int | None = None
    class_names: tuple[str, ...] | None = None
    argument: str | None = None
    argument_required: bool = False
    resizes: bool = False  # honours data.stored_size
    peek: Callable[..., tuple[str, ...] | None] | None = None


datasets: Registry[DatasetSource] = Registry("datasets", instance_type=DatasetSource)


def split_source(source: str) -> tuple[str, str | None]:
    """``"tfds:mnist"`` -> ``("tfds", "mnist")``; ``"fashion_mnist"`` -> ``("fashion_mnist", None)``."""
    name, colon, argument = source.partition(":")
    return name.strip(), (argument.strip() if colon else None)


def get(source: str) -> DatasetSource:
    """The registered source behind ``data.source`` (``NAME`` or ``NAME:ARGUMENT``)."""
    name, argument = split_source(source)
    entry = datasets.lookup(name, missing_ok=True) if name else None
    if entry is None:
        raise RecipeError(
            datasets.unknown_message(name or source)
            + " (tfds:NAME for a tensorflow-datasets dataset, image_folder with data.data_dir for your own images)"
        )
    if argument is not None and entry.argument is None:
        raise RecipeError(f"dataset {entry.name!r} takes no ':' argument, got {source!r}")
    if entry.argument_required and not argument:
        raise RecipeError(f"dataset {entry.name!r} needs {entry.name}:{entry.argument}, got {source!r}")
    return entry


def check_config(config) -> None:
    """Checks of ``data`` that need no files: the source, and class names a source knows statically."""
    try:
        source = get(config.source)
    except RecipeError as error:
        raise RecipeError(f"data.source: {error}") from None
    if config.stored_size is not None and not source.resizes:
        raise RecipeError(
            f"data.stored_size: {source.name} images are stored at their own size; "
            "stored_size applies to image_folder and tfds sources"
        )
    if source.name == "image_folder":
        image_folder_path(config, check=False)
    if config.classes is not None and source.class_names is not None:
        try:
            select_classes(source.class_names, config.classes)
        except DataError as error:
            raise RecipeError(str(error)) from None


def peek_class_names(config) -> tuple[str, ...] | None:
    """The class names a run would train on (after ``data.classes``), if cheap to find; else None."""
    source = get(config.source)
    names = source.class_names if source.class_names is not None else (
        source.peek(config) if source.peek is not None else None)
    if names is None:
        return None
    if config.classes is None:
        return tuple(names)
    return tuple(names[index] for index in select_classes(names, config.classes))


def model_io(config, seed: int, input_shape=None, num_classes: int | None = None) -> tuple[tuple, int]:
    """``(input_shape, num_classes)`` for a model built without a loaded dataset.

    Sources with a static shape answer at once; data-dependent sources
    (``tfds:NAME``, ``image_folder``) load the dataset to find out (an image
    folder's decode cache makes that cheap after the first time).
    """
    if input_shape is not None and num_classes:
        return tuple(input_shape), num_classes
    source = get(config.source)
    if source.input_shape is not None and source.num_classes is not None:
        shape, count = source.input_shape, len(config.classes) if config.classes else source.num_classes
    else:
        dataset = load_dataset(config, seed)
        shape, count = dataset.input_shape, dataset.num_classes
    return tuple(input_shape or shape), num_classes or count


def load_dataset(config, seed: int) -> Dataset:
    """Load ``config.source``, keep ``data.classes``, take the seeded subsets and hold out validation.

    Order: classes (relabelled 0..k-1 in the given order), train_per_class,
    train_limit, test_limit, then the validation hold-out from what is left
    of the training images. Subsets are chosen on labels; images are copied
    once, at the end.
    """
    source = get(config.source)
    train, test, class_names, where = source.load(config)
    train_positions, test_positions = np.arange(len(train)), np.arange(len(test))
    train_labels, test_labels = train.labels, test.labels
    if config.classes is not None:
        chosen = select_classes(class_names, config.classes)
        relabel = np.full(len(class_names), -1, dtype=np.int32)
        relabel[chosen] = np.arange(len(chosen), dtype=np.int32)
        train_labels, test_labels = relabel[train.labels], relabel[test.labels]
        train_positions, test_positions = np.flatnonzero(train_labels >= 0), np.flatnonzero(test_labels >= 0)
        class_names = tuple(class_names[index] for index in chosen)
    rng = np.random.default_rng(seed)
    if config.train_per_class is not None:
        picked = per_class_sample(train_labels[train_positions], config.train_per_class, class_names, rng)
        train_positions = train_positions[picked]
    if config.train_limit is not None and config.train_limit < len(train_positions):
        train_positions = train_positions[
            stratified_sample(train_labels[train_positions], config.train_limit, rng)]
    if config.test_limit is not None and config.test_limit < len(test_positions):
        test_positions = test_positions[
            np.sort(stratified_sample(test_labels[test_positions], config.test_limit, rng))]
    validation = None
    if config.validation_split > 0:
        size = int(round(len(train_positions) * config.validation_split))
        if size == 0 or size >= len(train_positions):
            raise DataError(
                f"data.validation_split {config.validation_split} of {len(train_positions)} training images "
                f"leaves {size} for validation; raise train_limit or change the split"
            )
        held_out = stratified_sample(train_labels[train_positions], size, rng)
        keep = np.setdiff1d(np.arange(len(train_positions)), held_out)
        validation = _take(train, train_labels, train_positions[held_out])
        train_positions = train_positions[rng.permutation(keep)]
    return Dataset(train=_take(train, train_labels, train_positions), validation=validation,
                   test=_take(test, test_labels, test_positions), class_names=tuple(class_names), source=where)


def _take(split: Split, labels: np.ndarray, positions: np.ndarray) -> Split:
    if len(positions) == len(split) and np.array_equal(positions, np.arange(len(split))):
        return Split(split.images, labels.astype(np.int32, copy=False), split.indices)  # no copy of a memmap
    return Split(pick_rows(split.images, positions), labels[positions].astype(np.int32, copy=False),
                 split.indices[positions])


def select_classes(class_names, wanted) -> list[int]:
    """Positions in ``class_names`` of ``wanted`` (names, or integer indices), in the given order."""
    chosen = []
    for item in wanted:
        if isinstance(item, bool) or not isinstance(item, (int, str)):
            raise DataError(f"data.classes: {item!r} is neither a class name nor an index")
        if isinstance(item, int):
            if not 0 <= item < len(class_names):
                raise DataError(f"data.classes: index {item} is out of range 0..{len(class_names) - 1}; "
                                f"classes: {_list_names(class_names)}")
            index = item
        elif item in class_names:
            index = list(class_names).index(item)
        else:
            raise DataError(f"data.classes: unknown class {item!r}; valid names: {_list_names(class_names)}")
        if index in chosen:
            raise DataError(f"data.classes: class {class_names[index]!r} is listed twice")
        chosen.append(index)
    return chosen


def _list_names(class_names) -> str:
    names = ", ".join(repr(name) for name in class_names[:50])
    return names + (f", ... ({len(class_names)} in all)" if len(class_names) > 50 else "")


def per_class_sample(labels: np.ndarray, count: int, class_names, rng: np.random.Generator) -> np.ndarray:
    """``count`` random positions of each class (few-shot); a class with fewer is an error."""
    chosen = []
    for label, name in enumerate(class_names):
        members = np.flatnonzero(labels == label)
        if len(members) < count:
            raise DataError(f"data.train_per_class {count}: class {name!r} has only {len(members)} training images")
        chosen.append(rng.permutation(members)[:count])
    return rng.permutation(np.concatenate(chosen))


def stratified_sample(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """``size`` indices with each class in proportion to its frequency (largest remainder)."""
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * size / len(labels)
    take = np.floor(exact).astype(int)
    shortfall = size - int(take.sum())
    take[np.argsort(-(exact - take), kind="stable")[:shortfall]] += 1
    chosen = [rng.permutation(np.flatnonzero(labels == cls))[:count] for cls, count in zip(classes, take)]
    return rng.permutation(np.concatenate(chosen))


# A constant seed for carved-out test splits: the test images stay the same whatever the recipe's seed.
TEST_SPLIT_SEED = 20240601


def carve_test_split(labels: np.ndarray, fraction: float, what: str) -> np.ndarray:
    """Sorted positions of a seeded, stratified test split of ``fraction`` of ``labels``."""
    size = int(round(len(labels) * fraction))
    if size == 0 or size >= len(labels):
        raise DataError(f"data.test_split {fraction} of {len(labels)} images of {what} leaves {size} test images")
    test = np.sort(stratified_sample(labels, size, np.random.default_rng(TEST_SPLIT_SEED)))
    left = np.bincount(np.delete(labels, test), minlength=int(labels.max()) + 1)
    if (left[np.unique(labels)] == 0).any():
        raise DataError(f"data.test_split {fraction} leaves a class of {what} without training images; "
                        "lower test_split or add images")
    return test


# --- IDX files (MNIST family) ---------------------------------------------


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (optionally gzipped) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as error:
        raise DataError(f"cannot read {path}: {error}") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise DataError(f"{path} is not an unsigned-byte IDX file")
    ndim = raw[3]
    header = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    expected = int(np.prod(shape))
    if len(raw) - header != expected:
        raise DataError(f"{path} is truncated or corrupt: expected {expected} bytes of data, found {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)
_FASHION_MNIST_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def fashion_mnist_search_dirs(data_dir: str | None = None) -> list[Path]:
    """Where the Fashion-MNIST IDX files are looked for, in order."""
    dirs = []
    if data_dir:
        dirs.append(Path(data_dir).expanduser())
    if os.environ.get("FINETUNE_DATA_DIR"):
        dirs.append(Path(os.environ["FINETUNE_DATA_DIR"]).expanduser())
    dirs.append(Path("/usr/share/datasets/fashion-mnist"))
    dirs.append(Path("~/.keras/datasets/fashion-mnist").expanduser())
    return dirs


def _find_idx_files(folder: Path) -> dict[str, Path] | None:
    found = {}
    for key, stem in _FASHION_MNIST_FILES.items():
        for candidate in (folder / stem, folder / f"{stem}.gz"):
            if candidate.is_file():
                found[key] = candidate
                break
        else:
            return None
    return found


def load_fashion_mnist(config) -> tuple[Split, Split, tuple[str, ...], str]:
    """Fashion-MNIST from local IDX files, else through a Keras download."""
    searched = fashion_mnist_search_dirs(getattr(config, "data_dir", None))
    for folder in searched:
        files = _find_idx_files(folder)
        if files is not None:
            arrays = {key: read_idx(path) for key, path in files.items()}
            return _fashion_mnist_splits(arrays, str(folder))
    try:
        import keras

        (x_train, y_train), (x_test, y_test) = keras.datasets.fashion_mnist.load_data()
    except Exception as error:
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise DataError(
            "Fashion-MNIST not found in " + ", ".join(str(d) for d in searched)
            + f" and the download failed ({reason}); install it with "
            "'apt-get install dataset-fashion-mnist' or put the four IDX files in $FINETUNE_DATA_DIR"
        ) from None
    arrays = {"train_images": x_train, "train_labels": y_train, "test_images": x_test, "test_labels": y_test}
    return _fashion_mnist_splits(arrays, "keras download (~/.keras/datasets)")


def _fashion_mnist_splits(arrays, where: str):
    def split(prefix: str) -> Split:
        images, labels = arrays[f"{prefix}_images"], arrays[f"{prefix}_labels"]
        if len(images) != len(labels):
            raise DataError(f"Fashion-MNIST {prefix} images and labels differ in count ({where})")
        return Split(np.ascontiguousarray(images[..., None]), labels.astype(np.int32))

    return split("train"), split("test"), FASHION_MNIST_CLASSES, where


datasets.register("fashion_mnist", DatasetSource(
    name="fashion_mnist", load=load_fashion_mnist, input_shape=(28, 28, 1), num_classes=10,
    class_names=FASHION_MNIST_CLASSES,
))



# --- stored form of images of any size and mode ----------------------------

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp",
                              ".ppm", ".pgm", ".pbm"})
_GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "F"})


def is_gray_mode(mode: str) -> bool:
    # Palette images count as colour: telling a grey palette apart needs the pixels decoded.
    return mode in _GRAY_MODES or mode.startswith("I;16")


def to_stored(image, size_hw: tuple[int, int], channels: int, resize: str = "crop") -> np.ndarray:
    """A PIL image as uint8 ``(height, width, channels)``.

    16-bit images are scaled to 8 bits; transparency is composited on white;
    ``resize`` is ``crop`` (scale to cover, centre crop: aspect kept, edges
    lost), ``pad`` (scale to fit, black borders) or ``stretch``.
    """
    from PIL import Image, ImageOps

    image = _eight_bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "RGBa", "LA", "La", "PA"):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(white, image.convert("RGBA"))
    image = image.convert("L" if channels == 1 else "RGB")
    height, width = size_hw
    if image.size != (width, height):
        method = Image.Resampling.BICUBIC
        if resize == "crop":
            image = ImageOps.fit(image, (width, height), method=method)
        elif resize == "pad":
            image = ImageOps.pad(image, (width, height), method=method, color=0)
        else:
            image = image.resize((width, height), method)
    return np.asarray(image, dtype=np.uint8).reshape(height, width, channels)


def _eight_bit(image):
    """Integer and float images as 8-bit greyscale (PIL's own conversion clips at 255)."""
    from PIL import Image

    if not (image.mode.startswith("I;16") or image.mode in ("I", "F")):
        return image
    pixels = np.asarray(image).astype(np.float64)
    # 'I' holds 16-bit PNG/TIFF data on some Pillow versions: scale it when it exceeds 8 bits.
    if image.mode.startswith("I;16") or (image.mode == "I" and pixels.max(initial=0) > 255):
        pixels = pixels / 257.0
    return Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8), "L")


# --- image folders ----------------------------------------------------------


def image_folder_path(config, check: bool = True) -> Path | None:
    """The folder of ``image_folder`` (``data.data_dir`` or ``image_folder:PATH``)."""
    _, argument = split_source(config.source)
    if argument and config.data_dir and Path(argument).expanduser() != Path(config.data_dir).expanduser():
        raise RecipeError(f"data.source names folder {argument!r} but data.data_dir is {config.data_dir!r}; keep one")
    folder = argument or config.data_dir
    if not check:
        return Path(folder).expanduser() if folder else None
    if not folder:
        raise DataError("data.source image_folder needs data.data_dir: a folder with one sub-folder per class "
                        "(--set data.data_dir=PATH)")
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DataError(f"image folder {str(path)!r} {'is not a folder' if path.exists() else 'does not exist'}")
    return path


def _class_folders(folder: Path) -> list[Path]:
    return sorted((path for path in folder.iterdir() if path.is_dir() and not path.name.startswith(".")),
                  key=lambda path: path.name)


def _image_files(folder: Path) -> list[Path]:
    """Image files anywhere below ``folder`` (hidden files and folders skipped), sorted."""
    found = []
    for parent, dirs, files in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        found += [Path(parent) / name for name in files
                  if not name.startswith(".") and Path(name).suffix.lower() in IMAGE_EXTENSIONS]
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
        raise DataError(f"image folder {str(train_root)!r} needs at least 2 class sub-folders, found "
                        f"{len(classes)}{': ' + names[0] if names else ''}")

    def files_of(base: Path, required: bool) -> list[tuple[Path, int]]:
        found = []
        for label, name in enumerate(names):
            files = _image_files(base / name) if (base / name).is_dir() else []
            if not files and required:
                raise DataError(f"class folder {str(base / name)!r} has no images "
                                f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
            found += [(path, label) for path in files]
        return found

    train = files_of(train_root, required=True)
    if not split_layout:
        return names, train, None
    extra = sorted(set(folder.name for folder in _class_folders(root / "test")) - set(names))
    if extra:
        raise DataError(f"{str(root / 'test')!r} has class folder(s) {', '.join(extra)} missing from "
                        f"{str(train_root)!r}")
    return names, train, files_of(root / "test", required=False)


def peek_image_folder(config) -> tuple[str, ...]:
    return scan_image_folder(image_folder_path(config))[0]


def cache_root() -> Path:
    """Where decoded image folders are kept: ``$FINETUNE_CACHE_DIR``, else ``~/.cache/finetune``."""
    if os.environ.get("FINETUNE_CACHE_DIR"):
        return Path(os.environ["FINETUNE_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or "~/.cache"
    return Path(base).expanduser() / "finetune"


_CACHE_FORMAT = 1


def load_image_folder(config) -> tuple[Split, Split, tuple[str, ...], str]:
    """A folder of images, decoded once into a uint8 ``.npy`` that later runs memory-map.

    The cache entry is keyed by the files (path, size, mtime), the class
    list, the stored size, the resize mode and the test split, so editing the
    folder or the recipe's data settings decodes afresh.
    """
    root = image_folder_path(config).resolve()
    class_names, train_files, test_files = scan_image_folder(root)
    if test_files is None:
        labels = np.array([label for _, label in train_files], dtype=np.int32)
        test_positions = carve_test_split(labels, config.test_split, str(root))
        in_test = np.zeros(len(labels), dtype=bool)
        in_test[test_positions] = True
        test_files = [item for item, chosen in zip(train_files, in_test) if chosen]
        train_files = [item for item, chosen in zip(train_files, in_test) if not chosen]
        layout = f"test_split {config.test_split}"
    else:
        layout = "train/ and test/ folders"
    files = train_files + test_files
    labels = np.array([label for _, label in files], dtype=np.int32)
    size_hw = config.stored_hw
    key_material = {
        "format": _CACHE_FORMAT, "root": str(root), "classes": class_names, "size": size_hw,
        "resize": config.resize, "layout": layout, "train": len(train_files),
        "files": [_file_key(path, root) + [label] for path, label in files],
    }
    key = hashlib.sha256(json.dumps(key_material).encode()).hexdigest()[:20]
    entry = cache_root() / "image_folder" / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', root.name)[:40]}-{key}"
    if (entry / "meta.json").is_file():
        images, how = np.load(entry / "images.npy", mmap_mode="r"), "cached"
    else:
        images, how = _decode_into_cache(files, size_hw, config.resize, entry, class_names, root), "decoded"
    count = len(train_files)
    train = Split(images[:count], labels[:count])
    test = Split(images[count:], labels[count:])
    return train, test, class_names, f"{root} ({layout}; {how}, {len(files)} images at {entry})"


def _file_key(path: Path, root: Path) -> list:
    stat = path.stat()
    return [str(path.relative_to(root)), stat.st_size, stat.st_mtime_ns]


def _image_mode(path: Path) -> str:
    from PIL import Image

    try:
        with Image.open(path) as image:  # reads the header only
            return image.mode
    except Exception as error:  # noqa: BLE001 - Pillow raises many kinds for a bad file
        raise DataError(f"cannot read image {path}: {_reason(error)}") from None


def _decode_image(path: Path, size_hw: tuple[int, int], channels: int, resize: str) -> np.ndarray:
    from PIL import Image, ImageOps

    try:
        with Image.open(path) as image:
            if image.format == "JPEG":
                # Let libjpeg decode at a reduced scale that still covers the stored size.
                image.draft(None, (max(size_hw),) * 2)
            return to_stored(ImageOps.exif_transpose(image), size_hw, channels, resize)
    except Exception as error:  # noqa: BLE001
        raise DataError(f"cannot read image {path}: {_reason(error)}") from None


def _reason(error: Exception) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return text or type(error).__name__


def _decode_into_cache(files, size_hw, resize, entry: Path, class_names, root: Path) -> np.ndarray:
    """Decode ``files`` into ``entry/images.npy`` (written aside, then renamed) and map it."""
    from concurrent.futures import ThreadPoolExecutor

    paths = [path for path, _ in files]
    # Headers first: one channel only if every image is greyscale, decided before any pixel is written.
    channels = 1 if all(is_gray_mode(_image_mode(path)) for path in paths) else 3
    height, width = size_hw
    partial = entry.with_name(f".{entry.name}.partial-{os.getpid()}")
    try:
        partial.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise DataError(f"cannot write the image cache {partial.parent}: {_reason(error)}; "
                        "set FINETUNE_CACHE_DIR to a writable folder") from None
    try:
        images = np.lib.format.open_memmap(partial / "images.npy", mode="w+", dtype=np.uint8,
                                           shape=(len(paths), height, width, channels))
        chunk = 256  # bounds the decoded images held at once
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:  # Pillow decodes without the GIL
            for start in range(0, len(paths), chunk):
                part = paths[start:start + chunk]
                decoded = pool.map(lambda path: _decode_image(path, size_hw, channels, resize), part)
                for offset, pixels in enumerate(decoded):
                    images[start + offset] = pixels
        images.flush()
        del images
        (partial / "meta.json").write_text(json.dumps({
            "classes": list(class_names), "images": len(paths), "shape": [height, width, channels],
            "resize": resize, "root": str(root),
        }, indent=1) + "\n")
        try:
            partial.rename(entry)
        except OSError:
            if not (entry / "meta.json").is_file():
                raise
            shutil.rmtree(partial)  # another process finished the same entry first
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return np.load(entry / "images.npy", mmap_mode="r")


datasets.register("image_folder", DatasetSource(
    name="image_folder", load=load_image_folder, argument="PATH", resizes=True, peek=peek_image_folder,
))


# --- tensorflow-datasets ---------------------------------------------------


def _tfds_open(config):
    """The builder of ``tfds:NAME``: from its prepared files when there are some, else its registered class.

    A prepared dataset needs no builder code (tfds reads ``dataset_info.json``).
    """
    _, name = split_source(config.source)
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise DataError(f"data.source {config.source}: needs tensorflow-datasets (pip install tensorflow-datasets)"
                        ) from None
    data_dir = str(Path(config.data_dir).expanduser()) if config.data_dir else None
    where = data_dir or os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR
    try:
        return tfds.builder(name, data_dir=data_dir)
    except Exception as error:  # noqa: BLE001 - DatasetNotFoundError, bad config or version
        if isinstance(error, tfds.core.registered.DatasetNotFoundError):
            raise DataError(f"tfds dataset {name!r} is not prepared in {where} and tensorflow-datasets has no "
                            "builder of that name") from None
        raise DataError(f"tfds dataset {name!r} in {where}: {_reason(error)}") from None


def _tfds_builder(config):
    """The builder of ``tfds:NAME``, prepared (downloading only when it is not) or a DataError."""
    _, name = split_source(config.source)
    builder = _tfds_open(config)
    if not builder.is_prepared():
        try:
            builder.download_and_prepare()
        except Exception as error:  # noqa: BLE001 - no network, manual download needed, ...
            raise DataError(f"tfds dataset {name!r} is not prepared in {builder.data_dir_root} and preparing it "
                            f"failed ({_reason(error)}); prepare it there on a machine with network, "
                            "or set data.data_dir") from None
    return builder


def _tfds_keys(builder, name: str) -> tuple[str, str]:
    import tensorflow_datasets as tfds

    features = builder.info.features
    image_key, label_key = builder.info.supervised_keys or ("image", "label")
    if not (isinstance(image_key, str) and isinstance(label_key, str) and image_key in features
            and label_key in features and isinstance(features[image_key], tfds.features.Image)
            and isinstance(features[label_key], tfds.features.ClassLabel)):
        raise DataError(f"tfds dataset {name!r} is not an image classification dataset "
                        f"(needs an Image feature and a ClassLabel; has {', '.join(features.keys())})")
    return image_key, label_key


def load_tfds(config) -> tuple[Split, Split, tuple[str, ...], str]:
    """A prepared tensorflow-datasets image classification dataset (its train and test splits).

    Without a ``test`` split, a seeded stratified ``data.test_split`` of
    ``train`` is the test split. Images that vary in size, or all of them when
    ``data.stored_size`` is set, are stored at the stored size.
    """
    _, name = split_source(config.source)
    builder = _tfds_builder(config)
    image_key, label_key = _tfds_keys(builder, name)
    class_names = tuple(str(label) for label in builder.info.features[label_key].names)
    splits = builder.info.splits
    if "train" not in splits:
        raise DataError(f"tfds dataset {name!r} has no 'train' split (splits: {', '.join(splits.keys())})")
    feature = builder.info.features[image_key]
    shape = tuple(feature.shape)
    resize = config.stored_size is not None or None in shape[:2]
    channels = shape[-1] or 3
    if resize and channels not in (1, 3):
        channels = 3
    read = {split: _read_tfds_split(builder, split, image_key, label_key, splits[split].num_examples,
                                    shape, channels, config.stored_hw if resize else None, config.resize)
            for split in ("train", "test") if split in splits}
    train = read["train"]
    if "test" in read:
        test, how = read["test"], "train and test splits"
    else:
        chosen = carve_test_split(train.labels, config.test_split, f"tfds {name} train")
        rest = np.setdiff1d(np.arange(len(train)), chosen)
        train, test, how = train.subset(rest), train.subset(chosen), f"no test split: test_split {config.test_split}"
    return train, test, class_names, f"tfds {builder.info.full_name} in {builder.data_dir_root} ({how})"


def _read_tfds_split(builder, split, image_key, label_key, count, shape, channels, size_hw, resize) -> Split:
    import tensorflow_datasets as tfds
    from PIL import Image

    dataset = builder.as_dataset(split=split, shuffle_files=False)
    dataset = dataset.map(lambda example: (example[image_key], example[label_key]))
    labels = np.empty(count, dtype=np.int32)
    if size_hw is None:
        images = np.empty((count, *shape), dtype=np.uint8)
        filled = 0
        for batch_images, batch_labels in tfds.as_numpy(dataset.batch(1024)):
            images[filled:filled + len(batch_labels)] = _as_uint8(batch_images)
            labels[filled:filled + len(batch_labels)] = batch_labels
            filled += len(batch_labels)
    else:
        images = np.empty((count, *size_hw, channels), dtype=np.uint8)
        filled = 0
        for pixels, label in tfds.as_numpy(dataset):
            pixels = _as_uint8(pixels)
            picture = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
            images[filled] = to_stored(picture, size_hw, channels, resize)
            labels[filled] = label
            filled += 1
    if filled != count:
        raise DataError(f"tfds split {split!r} of {builder.info.full_name} has {filled} examples, "
                        f"its metadata says {count}")
    return Split(images, labels)


def _as_uint8(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.uint8:
        return pixels
    if pixels.dtype == np.uint16:
        return np.rint(pixels / 257.0).astype(np.uint8)
    raise DataError(f"tfds images of dtype {pixels.dtype} are not supported (uint8 or uint16)")


def peek_tfds(config) -> tuple[str, ...] | None:
    """The label names of a prepared dataset; None when it would have to be downloaded."""
    _, name = split_source(config.source)
    builder = _tfds_open(config)
    if not builder.is_prepared():
        return None
    _, label_key = _tfds_keys(builder, name)
    return tuple(str(label) for label in builder.info.features[label_key].names)


datasets.register("tfds", DatasetSource(
    name="tfds", load=load_tfds, argument="NAME", argument_required=True, resizes=True, peek=peek_tfds,
))
