"""Where images come from: the registry of dataset sources, and the checks that need no files.

Built in: ``fashion_mnist`` (IDX files), ``tfds:NAME`` (a prepared
tensorflow-datasets image classification dataset), ``image_folder`` (one
sub-folder per class) and ``csv`` (a CSV or TSV file of image paths and
labels). Other packages add sources through the entry-point group
``finetune.datasets``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.data.sampling import select_classes
from finetune.data.splits import DatasetSource, split_source
from finetune.errors import DataError, RecipeError
from finetune.registry import Registry

if TYPE_CHECKING:
    from finetune.recipe.schema import DataConfig


def _builtin_sources() -> dict[str, DatasetSource]:
    # Imported when the registry first looks a name up: each source module imports this one (DatasetSource).
    from finetune.data.sources import csv_file, fashion_mnist, image_folder, tfds

    return {source.name: source for source in (fashion_mnist.SOURCE, image_folder.SOURCE, csv_file.SOURCE, tfds.SOURCE)}


datasets: Registry[DatasetSource] = Registry("datasets", instance_type=DatasetSource, builtins=_builtin_sources)


def get(source: str) -> DatasetSource:
    """The registered source behind ``data.source`` (``NAME`` or ``NAME:ARGUMENT``)."""
    name, argument = split_source(source)
    entry = datasets.lookup(name, missing_ok=True) if name else None
    if entry is None:
        raise RecipeError(
            datasets.unknown_message(name or source)
            + " (tfds:NAME for a tensorflow-datasets dataset; image_folder or csv, with data.data_dir, for your own"
            " images)"
        )
    if argument is not None and entry.argument is None:
        raise RecipeError(f"dataset {entry.name!r} takes no ':' argument, got {source!r}")
    if entry.argument_required and not argument:
        raise RecipeError(f"dataset {entry.name!r} needs {entry.name}:{entry.argument}, got {source!r}")
    return entry


def check_config(config: DataConfig) -> None:
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
    if source.check is not None:
        source.check(config)
    if config.classes is not None and source.class_names is not None:
        try:
            select_classes(source.class_names, config.classes)
        except DataError as error:
            raise RecipeError(str(error)) from None


def peek_class_names(config: DataConfig) -> tuple[str, ...] | None:
    """The class names a run would train on (after ``data.classes``), if cheap to find; else None."""
    source = get(config.source)
    names = (
        source.class_names
        if source.class_names is not None
        else (source.peek(config) if source.peek is not None else None)
    )
    if names is None:
        return None
    if config.classes is None:
        return tuple(names)
    return tuple(names[index] for index in select_classes(names, config.classes))


def peek_split_counts(config: DataConfig) -> dict[str, dict[str, int]] | None:
    """Each of the source's splits' images per kept class (before subsets and the validation hold-out),
    when the source can count them without decoding an image; else None."""
    source = get(config.source)
    if source.split_counts is None:
        return None
    names, counts = source.split_counts(config)
    kept = select_classes(names, config.classes) if config.classes is not None else range(len(names))
    return {split: {names[index]: per_class[index] for index in kept} for split, per_class in counts.items()}
