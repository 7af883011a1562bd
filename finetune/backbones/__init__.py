"""Backbones: what each one is (spec), how it is built with its weights, and its blocks.

``spec_for(config)`` turns a recipe's ``model.backbone`` section into the
spec to build, reading a reused run folder (``name: run``) once.
"""

from __future__ import annotations

from finetune.backbones.registry import backbones, get
from finetune.backbones.reuse import earlier_run
from finetune.backbones.spec import PREPROCESSING_MODES, BackboneLayout, BackboneSpec, Block

__all__ = [
    "PREPROCESSING_MODES",
    "BackboneLayout",
    "BackboneSpec",
    "Block",
    "backbones",
    "get",
    "spec_for",
]


def spec_for(config) -> BackboneSpec:
    """The spec a recipe's ``model.backbone`` section describes (``run`` reads its run folder)."""
    if config.name == "run":
        return earlier_run(config.path).spec
    return get(config.name)
