"""A backbone's block names, for checking ``cut_at``, ``top_blocks_removed`` and ``top_blocks`` before a run.

The built-in backbones' names come from a table (``block_names.json``, written by
``scripts/block_names_table.py`` and checked against the built networks by the tests), so
``finetune validate`` answers in milliseconds; a backbone with other options, or one a plugin
adds, is built once without weights at its smallest input to read them.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

from finetune.backbones.spec import BackboneSpec

TABLE_FILE = Path(__file__).with_name("block_names.json")


@functools.cache
def _table() -> dict[str, list[str]]:
    return json.loads(TABLE_FILE.read_text()) if TABLE_FILE.is_file() else {}


def tabled(spec: BackboneSpec, options: dict | None = None) -> list[str] | None:
    """The block names in the table, for a built-in backbone with its default options; else None."""
    if options and {**spec.default_options, **options} != spec.default_options:
        return None  # options may change the structure (the mlp's layers): build to know
    return _table().get(spec.name)


def built(spec: BackboneSpec, options: dict | None = None) -> list[str]:
    """The block names of ``spec`` built without weights at its smallest input (no weights are read)."""
    from finetune.backbones.blocks import split_into_blocks

    size = max(spec.min_size, 32)
    backbone = spec.build(
        input_shape=(size, size, spec.channels or 3), weights=None, **{**spec.default_options, **(options or {})}
    )
    return [block.name for block in split_into_blocks(backbone, spec)[1]]


def block_names(spec: BackboneSpec, options: dict | None = None) -> list[str]:
    """Block names in order, from the table when it has them, else from a built network."""
    return tabled(spec, options) or built(spec, options)
