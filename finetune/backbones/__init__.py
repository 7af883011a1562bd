"""Backbones: what each one is (spec.py, registry.py), how it is built with its weights (build.py), its blocks.

A reused run folder (``model.backbone: {name: run, path: ...}``) is read by reuse.py.
"""

from finetune.backbones.registry import backbones, get
from finetune.backbones.spec import PREPROCESSING_MODES, BackboneLayout, BackboneSpec, Block

__all__ = ["PREPROCESSING_MODES", "BackboneLayout", "BackboneSpec", "Block", "backbones", "get"]
