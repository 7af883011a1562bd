"""A built backbone's layers grouped into a stem and ordered blocks, and the backbone inside a model."""

from __future__ import annotations

import re

from finetune._keras_compat import parent_operations
from finetune.backbones.spec import BackboneLayout, BackboneSpec, Block
from finetune.errors import RecipeError


def layout_of(backbone, spec: BackboneSpec, inference_only: bool = True) -> BackboneLayout:
    """``backbone`` split into blocks once, for every phase that picks trainable blocks from it."""
    stem, blocks = split_into_blocks(backbone, spec)
    return BackboneLayout(spec.name, backbone, stem, tuple(blocks), inference_only)


def get_backbone(model):
    """The backbone sub-model inside a model built by :func:`finetune.build_model`."""
    import keras

    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise ValueError(f"expected one backbone inside {model.name!r}, found {len(nested)}")
    return nested[0]


def nested_layers(layer) -> list:
    """A layer and every layer inside it (nested models, Sequential blocks)."""
    found = [layer]
    for child in getattr(layer, "layers", []) or []:
        found.extend(nested_layers(child))
    return found


def split_into_blocks(backbone, spec: BackboneSpec) -> tuple[tuple, list[Block]]:
    """Group a built backbone's layers into (stem layers, ordered blocks).

    A layer whose name matches ``spec.block_pattern`` belongs to the block its
    first group names. Unnamed layers (``conv2d_3``, ``add``) are placed by the
    graph: with ``lo`` the latest block among their nearest named ancestors and
    ``hi`` the earliest among their nearest named descendants, a layer inside a
    block (lo == hi) stays there, one feeding the next block (hi == lo + 1, as
    Inception's branches feeding ``mixedN``) joins it, and one that skips a
    block (a residual shortcut such as Xception's, hi == lo + 2) belongs to the
    block it runs beside. A merge that takes a named layer of block lo as a
    direct input (Xception's unnamed residual ``add`` after ``block12_sepconv3_bn``)
    closes block lo: the next block then starts from its one output, so a cut
    there keeps one tensor, not the sum's two inputs. Layers before any block
    form the stem (or join the first block when ``spec.has_stem`` is false);
    layers after the last join it.
    """
    pattern = re.compile(spec.block_pattern)
    layers = [layer for layer in backbone.layers if type(layer).__name__ != "InputLayer"]
    order: dict[str, int] = {}
    named: dict[int, int] = {}
    for layer in layers:
        match = pattern.search(layer.name)
        if match is not None:
            named[id(layer)] = order.setdefault(match.group(1), len(order))
    if not order:
        raise RecipeError(f"backbone {spec.name!r}: no layer matches its block pattern {spec.block_pattern!r}")

    # The graph holds plain operations too (``x + 3.0`` in MobileNetV3): walk through them.
    operations = list(getattr(backbone, "operations", layers))
    parents = {id(op): parent_operations(op) for op in operations}
    children: dict[int, list] = {id(op): [] for op in operations}
    for op in operations:
        for parent in parents[id(op)]:
            children.setdefault(id(parent), []).append(op)

    def nearest_named(start, neighbours, pick):
        found, stack, seen = [], list(neighbours(start)), set()
        while stack:
            layer = stack.pop()
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if id(layer) in named:
                found.append(named[id(layer)])
            else:
                stack.extend(neighbours(layer))
        return pick(found) if found else None

    names = list(order)
    stem: list = []
    members: dict[str, list] = {name: [] for name in names}
    for layer in layers:
        if id(layer) in named:
            members[names[named[id(layer)]]].append(layer)
            continue
        lo = nearest_named(layer, lambda item: parents.get(id(item), []), max)
        hi = nearest_named(layer, lambda item: children.get(id(item), []), min)
        if lo is None and spec.has_stem:
            stem.append(layer)
            continue
        if lo is None:
            index = hi
        elif hi is None or hi <= lo:
            index = lo
        elif hi == lo + 1:
            closes = len(parents[id(layer)]) > 1 and any(named.get(id(p)) == lo for p in parents[id(layer)])
            index = lo if closes else hi
        else:
            index = lo + 1
        members[names[index]].append(layer)
    return tuple(stem), [Block(name, tuple(members[name])) for name in names]
