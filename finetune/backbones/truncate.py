"""A backbone built only up to one of its blocks (timm's ``features_only`` idea).

For small images far from ImageNet (28x28 grey clothing), the low and middle
blocks carry most of what transfers, and the top blocks cost the most to run
and to fine-tune. ``model.backbone.cut_at: BLOCK`` (or ``top_blocks_removed:
N``) keeps the stem and the blocks up to ``BLOCK``, with their pretrained
weights, and the head sits on that block's output.
"""

from __future__ import annotations

from finetune._keras_compat import calls_in_graph, producer
from finetune.backbones.blocks import split_into_blocks
from finetune.backbones.spec import BackboneSpec
from finetune.errors import RecipeError


def cut_block_index(names: list[str], cut_at: str | None, top_blocks_removed: int | None) -> int | None:
    """The index of the last kept block among ``names``, or None to keep them all."""
    if cut_at is not None:
        if cut_at not in names:
            raise RecipeError(f"model.backbone.cut_at: no block {cut_at!r}; the blocks are {', '.join(names)}")
        index = names.index(cut_at)
    elif top_blocks_removed:
        if top_blocks_removed >= len(names):
            raise RecipeError(
                f"model.backbone.top_blocks_removed: the backbone has {len(names)} blocks "
                f"({names[0]} .. {names[-1]}), so at most {len(names) - 1} can go; got {top_blocks_removed}"
            )
        index = len(names) - 1 - top_blocks_removed
    else:
        return None
    return None if index == len(names) - 1 else index


def truncate(backbone, spec: BackboneSpec, cut_at: str | None = None, top_blocks_removed: int | None = None):
    """``backbone`` up to the output of block ``cut_at`` (or without its last ``top_blocks_removed`` blocks).

    The kept layers are the built backbone's own (weights included). The cut
    must cross the graph at one tensor, as it does after a residual block's
    ``add``; a cut that would need several tensors is refused, naming them.
    """
    stem, blocks = split_into_blocks(backbone, spec)
    index = cut_block_index([block.name for block in blocks], cut_at, top_blocks_removed)
    if index is None:
        return backbone
    import keras

    kept = {id(layer) for layer in stem} | {id(layer) for block in blocks[: index + 1] for layer in block.layers}
    dropped = [layer for block in blocks[index + 1 :] for layer in block.layers]
    crossing, seen = [], set()
    for layer in dropped:
        for node in calls_in_graph(layer, backbone):
            for tensor in node.input_tensors:
                source = producer(tensor)
                if source is not None and id(source) in kept and id(tensor) not in seen:
                    seen.add(id(tensor))
                    crossing.append(tensor)
    block = blocks[index].name
    if len(crossing) != 1:
        names = ", ".join(getattr(producer(tensor), "name", "?") for tensor in crossing) or "none"
        raise RecipeError(
            f"model.backbone.cut_at: {spec.name} cannot be cut after {block}: the graph crosses there at "
            f"{len(crossing)} tensors ({names}), not one; pick another block"
        )
    return keras.Model(backbone.input, crossing[0], name=backbone.name)
