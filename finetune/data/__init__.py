"""Data: images stored compactly (uint8), from a registered source, split and subset by seed.

``load_dataset(config, seed)`` gives the run's :class:`Dataset`; the source
registry and its file-free checks are in :mod:`finetune.data.sources`, array
views of memory-mapped files in :mod:`finetune.data.arrays`.
"""

from finetune.data.loading import load_dataset, model_io, relabel_by_name
from finetune.data.sources import check_config, datasets, peek_class_names, peek_split_counts
from finetune.data.splits import Dataset, DatasetSource, Split

__all__ = [
    "Dataset",
    "DatasetSource",
    "Split",
    "check_config",
    "datasets",
    "load_dataset",
    "model_io",
    "peek_class_names",
    "peek_split_counts",
    "relabel_by_name",
]
