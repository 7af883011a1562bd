"""Your own images listed in a CSV (or TSV) file: a column of image paths, one of labels, optionally one of splits.

The images are decoded once into the same memory-mapped cache as an image folder's
(:func:`finetune.data.sources.image_folder.load_cached`). Every problem of the file is a one-line
DataError naming the file, the row (as a spreadsheet numbers it: the header is row 1) and the column.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from finetune.data.sampling import carve_test_split, list_names
from finetune.data.sources.image_folder import load_cached, split_counts
from finetune.data.splits import DatasetSource, Loaded
from finetune.errors import DataError, first_line
from finetune.files import is_dir, is_file

if TYPE_CHECKING:
    from finetune.recipe.schema import DataConfig

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class _Row:
    number: int  # the row as a spreadsheet numbers it (the header is row 1)
    cell: str  # the image path as written
    path: Path  # the file it names, links resolved
    label: str
    split: str  # train, validation, test, or "" (the seeded splits decide)
    tags: tuple[str, ...] = ()  # multi-label (data.label_delimiter): the label cell's distinct tags, sorted


@dataclass(frozen=True)
class _Table:
    path: Path  # the CSV file
    class_names: tuple[str, ...]
    parts: dict[str, list[_Row]]  # train, validation, test
    layout: str  # how the splits were made
    multi_label: bool = False

    def files(self, split: str) -> list[tuple[Path, int | tuple[int, ...]]]:
        """The split's image files and their labels (multi-label: their tags' numbers)."""
        number = {name: index for index, name in enumerate(self.class_names)}
        if self.multi_label:
            return [(row.path, tuple(number[tag] for tag in row.tags)) for row in self.parts[split]]
        return [(row.path, number[row.label]) for row in self.parts[split]]


def csv_file_path(config: DataConfig) -> Path:
    """The CSV file named by ``data.data_dir``, which must exist."""
    if not config.data_dir:
        raise DataError(
            "data.source csv needs data.data_dir: the CSV (or .tsv) file of image paths and labels "
            "(--set data.data_dir=PATH)"
        )
    path = Path(config.data_dir).expanduser().absolute()
    if not is_file(path):
        raise DataError(f"CSV file {str(path)!r} {'is a folder' if is_dir(path) else 'does not exist'}")
    return path


def _at(path: Path, number: int, column: str) -> str:
    return f"{path} row {number}, column {column!r}"


def _not_utf8(path: Path, raw: bytes, error: UnicodeDecodeError, delimiter: str) -> str:
    """Where the first byte that is not UTF-8 sits: its row and (counting delimiters) its column."""
    row = raw.count(b"\n", 0, error.start) + 1
    line_start = raw.rfind(b"\n", 0, error.start) + 1
    header = raw.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace").strip().split(delimiter)
    index = raw.count(delimiter.encode(), line_start, error.start)
    column = header[index].strip() if index < len(header) else f"#{index + 1}"
    return (
        f"{_at(path, row, column)}: not UTF-8 (byte 0x{raw[error.start]:02x}); "
        "save the file as UTF-8 (most spreadsheets offer 'CSV UTF-8')"
    )


def _records(path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header and the non-empty records with their row numbers."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DataError(f"cannot read CSV file {path}: {first_line(error)}") from None
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark, as spreadsheets write one, is no column name
    except UnicodeDecodeError as error:
        raise DataError(_not_utf8(path, raw, error, delimiter)) from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:
        header = [name.strip() for name in next(reader, [])]
        records = [(reader.line_num, record) for record in reader if any(cell.strip() for cell in record)]
    except csv.Error as error:
        raise DataError(f"{path} row {reader.line_num}: {first_line(error)}") from None
    return header, records


def _column(path: Path, header: Sequence[str], config: DataConfig, key: str, required: bool) -> int | None:
    name = getattr(config.columns, key)
    if name in header:
        return list(header).index(name)
    if not required:
        return None
    there = f"the columns are {list_names(header)}" if any(header) else "the file has no header row"
    raise DataError(f"{path} row 1: no column {name!r} (data.columns.{key}); {there}")


def _image_file(cell: str, where: str, folder: Path, config: DataConfig) -> Path:
    """The file ``cell`` names (relative to ``folder``, or absolute), links resolved; checked to exist."""
    given = Path(cell).expanduser()
    path = given if given.is_absolute() else folder / given
    real = path.resolve()
    if not config.allow_outside_paths and not real.is_relative_to(folder.resolve()):
        raise DataError(
            f"{where}: {cell!r} leads outside the CSV's folder {str(folder)!r} (through '..' or a symbolic link) "
            "to " + str(real) + "; move the image into the folder, or set data.allow_outside_paths: true"
        )
    if not real.is_file() and not config.skip_bad_images:  # with skip_bad_images: counted and skipped
        why = "is a folder" if real.is_dir() else ("is a dangling link" if path.is_symlink() else "does not exist")
        raise DataError(f"{where}: image {cell!r} {why} ({path}); fix the row, or set data.skip_bad_images: true")
    return real


def _rows(path: Path, config: DataConfig) -> tuple[list[_Row], int]:
    """The rows of the CSV, checked, without repeats of a file (and how many repeats were dropped)."""
    header, records = _records(path)
    image_at = _column(path, header, config, "image", required=True)
    label_at = _column(path, header, config, "label", required=True)
    split_at = _column(path, header, config, "split", required="split" in config.columns.model_fields_set)
    columns = config.columns

    def cell(record: list[str], index: int | None) -> str:
        return record[index].strip() if index is not None and index < len(record) else ""

    rows: list[_Row] = []
    first: dict[Path, _Row] = {}
    for number, record in records:
        image, label, split = cell(record, image_at), cell(record, label_at), cell(record, split_at)
        if not image:
            raise DataError(f"{_at(path, number, columns.image)}: no image path")
        tags = _tags(label, config.label_delimiter)
        if not label and config.label_delimiter is None:  # multi-label: an empty cell is an image with no tag
            raise DataError(f"{_at(path, number, columns.label)}: empty label for {image!r}")
        if split not in ("", *SPLITS):
            raise DataError(
                f"{_at(path, number, columns.split)}: {split!r} is not train, validation or test "
                "(leave it empty for the seeded splits)"
            )
        row = _Row(
            number, image, _image_file(image, _at(path, number, columns.image), path.parent, config), label, split, tags
        )
        earlier = first.get(row.path)
        if earlier is None:
            first[row.path] = row
            rows.append(row)
        elif earlier.tags != tags if config.label_delimiter is not None else earlier.label != label:
            raise DataError(
                f"{_at(path, number, columns.label)}: {label!r} for {image!r}, "
                f"but row {earlier.number} gives the same file the label {earlier.label!r}"
            )
        elif earlier.split != split:
            raise DataError(
                f"{_at(path, number, columns.split)}: {split or 'empty'!r} for {image!r}, "
                f"but row {earlier.number} puts the same file in {earlier.split or 'empty'!r}"
            )
    return rows, len(records) - len(rows)


def _tags(cell: str, delimiter: str | None) -> tuple[str, ...]:
    """The distinct, non-empty tags of a label cell split at ``delimiter``, sorted; () without a delimiter."""
    if delimiter is None:
        return ()
    return tuple(sorted({tag.strip() for tag in cell.split(delimiter)} - {""}))


def scan_csv(config: DataConfig) -> _Table:
    """The CSV's classes and its rows in each split; no image is opened.

    Rows marked ``test`` are the test split (without any, a seeded ``data.test_split`` of the rows
    with no split); rows marked ``validation`` are the validation split (without any, the run holds
    ``data.validation_split`` out of the training rows); the other rows train.
    """
    path = csv_file_path(config)
    rows, repeats = _rows(path, config)
    multi_label = config.label_delimiter is not None
    if multi_label:
        class_names = tuple(sorted({tag for row in rows for tag in row.tags}))
        if not class_names:
            raise DataError(f"{path}: no tag in column {config.columns.label!r} (data.label_delimiter)")
    else:
        class_names = tuple(sorted({row.label for row in rows}))
    if len(class_names) < 2 and not multi_label:
        raise DataError(
            f"{path} needs at least 2 classes in column {config.columns.label!r}, found {len(class_names)}"
            + (f": {class_names[0]}" if class_names else "")
        )
    marked = {row.split for row in rows}
    if "test" in marked:
        tested, layout = {row.number for row in rows if row.split == "test"}, "test rows"
    else:
        free = [row for row in rows if not row.split]
        if not free:
            raise DataError(
                f"{path}: no row is marked test in column {config.columns.split!r} and none is left without "
                "a split for data.test_split to choose from"
            )
        if multi_label:  # stratified by each image's combination of tags
            combinations = {combination: index for index, combination in enumerate(sorted({r.tags for r in free}))}
            labels = np.array([combinations[row.tags] for row in free], dtype=np.int32)
        else:
            number = {name: label for label, name in enumerate(class_names)}
            labels = np.array([number[row.label] for row in free], dtype=np.int32)
        tested = {free[position].number for position in carve_test_split(labels, config.test_split, str(path))}
        layout = f"test_split {config.test_split}"
    parts = {
        "train": [row for row in rows if row.split in ("", "train") and row.number not in tested],
        "validation": [row for row in rows if row.split == "validation"],
        "test": [row for row in rows if row.number in tested],
    }
    if "validation" in marked:
        layout += ", validation rows"
    trained = {name for row in parts["train"] for name in (row.tags if multi_label else (row.label,))}
    for split in ("test", "validation"):
        for row in parts[split]:
            for name in row.tags if multi_label else (row.label,):
                if name not in trained:
                    raise DataError(
                        f"{_at(path, row.number, config.columns.label)}: {'tag' if multi_label else 'class'} "
                        f"{name!r} has {split} images but no training image"
                    )
    if repeats:
        layout += f", {repeats} repeated row{'s' if repeats != 1 else ''} dropped"
    return _Table(path, class_names, parts, layout, multi_label)


def load_csv(config: DataConfig) -> Loaded:
    """The CSV's images, decoded once (as an image folder's are); its validation rows fifth, when it has any."""
    table = scan_csv(config)
    order = [*table.parts["train"], *table.parts["validation"], *table.parts["test"]]
    files = [table.files(split) for split in ("train", "validation", "test")]

    def image_name(position: int) -> str:
        return _at(table.path, order[position].number, config.columns.image)

    (train, validation, test), where = load_cached(
        files, config, table.class_names, table.path, table.layout, kind="csv", image_name=image_name
    )
    if not table.parts["validation"]:
        return train, test, table.class_names, where
    return train, test, table.class_names, where, validation


def peek_csv(config: DataConfig) -> tuple[str, ...]:
    return scan_csv(config).class_names


def csv_split_counts(config: DataConfig) -> tuple[tuple[str, ...], dict[str, list[int]]]:
    """The class names and each split's images per class (validation only when rows are marked so)."""
    table = scan_csv(config)
    parts = {split: table.files(split) for split in SPLITS if table.parts[split] or split != "validation"}
    return table.class_names, split_counts(parts, len(table.class_names))


SOURCE = DatasetSource(
    name="csv",
    load=load_csv,
    resizes=True,
    peek=peek_csv,
    split_counts=csv_split_counts,
)
