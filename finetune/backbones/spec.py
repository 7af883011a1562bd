"""What the pipeline knows about a backbone before building it (no Keras import here).

A :class:`BackboneSpec` records how a backbone's inputs are preprocessed,
the smallest input it accepts, how its layers group into blocks (for
``trainable: {top_blocks: N}``) and the canonical file name of its ImageNet
weights (for offline use). A :class:`BackboneLayout` is those blocks found in
one built backbone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

#: ``preprocessing`` values: "tf", "caffe" and "torch" as in
#: ``keras.applications.imagenet_utils``; "none" when the backbone rescales its
#: inputs itself; "unit" scales to [0, 1]; "standardize" to zero mean and unit
#: variance with statistics taken from the training images.
PREPROCESSING_MODES = ("tf", "caffe", "torch", "none", "unit", "standardize")


@dataclass(frozen=True)
class BackboneSpec:
    """What the pipeline needs to know about one backbone."""

    name: str
    build: Callable[..., Any]
    """``build(input_shape, weights, **options) -> keras.Model`` without top."""
    preprocessing: str
    min_size: int
    block_pattern: str
    """Regex whose first group names the block a layer belongs to."""
    has_stem: bool = True
    """Unmatched layers before the first block form a stem (else they join it)."""
    weights_file: Callable[[tuple[int, int], dict], str] | None = None
    """Canonical file name of the ImageNet weights without top."""
    notes: str = ""
    default_options: dict = field(default_factory=dict)
    channels: int | None = 3
    """Input channels the backbone takes: 3 (RGB), or None to keep the dataset's."""
    inference_mode: bool = True
    """Call it with ``training=False`` (pretrained BN); False for from-scratch stacks."""
    preprocessing_option: str | None = None
    """An option that overrides ``preprocessing`` (the mlp's ``input_scaling``)."""
    load_weights: Callable[[Any, Path], None] | None = None
    """``load_weights(model, path)`` for a weights file; None uses ``model.load_weights``."""
    locate_weights: Callable[[], Path] | None = None
    """ImageNet weights found outside the searched folders (an installed package); raises WeightsError."""

    def preprocessing_for(self, options: dict | None = None) -> str:
        if self.preprocessing_option and options and self.preprocessing_option in options:
            return options[self.preprocessing_option]
        return self.preprocessing

    def imagenet_file(self, image_size: tuple[int, int], options: dict | None = None) -> str | None:
        if self.weights_file is None:
            return None
        return self.weights_file(image_size, {**self.default_options, **(options or {})})


@dataclass(frozen=True)
class Block:
    name: str
    layers: tuple


@dataclass(frozen=True)
class BackboneLayout:
    """A built backbone split into its stem and ordered blocks (computed once per model).

    ``inference_only``: the model calls the backbone with ``training=False``
    (pretrained BatchNorm statistics stay, whatever is trainable).
    """

    spec_name: str
    backbone: Any
    stem: tuple
    blocks: tuple[Block, ...]
    inference_only: bool = True

    def top(self, count: int) -> tuple[Block, ...]:
        """The last ``count`` blocks (the caller checks ``count`` against ``len(blocks)``)."""
        return self.blocks[len(self.blocks) - count :]

    def describe(self) -> str:
        return f"{self.spec_name} has {len(self.blocks)} blocks ({self.blocks[0].name} .. {self.blocks[-1].name})"
