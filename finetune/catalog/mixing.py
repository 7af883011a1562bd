"""Batch-level augmentation plugins that mix two training images and their labels: mixup and CutMix.

A mixer takes a batch of uint8 images and one-hot targets and returns the
batch mixed with a shuffled copy of itself, the targets weighted by how much
of each image is in the result (Zhang et al. 2018; Yun et al. 2019). Labels
take part, so mixing happens on the batches fed to ``fit``, not inside the
model: the saved model, ``evaluate`` and validation never see it. Plain
numpy: it runs in the input pipeline of every backend.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from finetune.registry import Registry


class MixUp:
    """``lam * a + (1 - lam) * b`` for images and targets, ``lam ~ Beta(alpha, alpha)`` per batch."""

    def __init__(self, alpha: float = 0.2, probability: float = 1.0):
        _check(alpha, probability)
        self.alpha, self.probability = float(alpha), float(probability)

    def __call__(self, images: np.ndarray, targets: np.ndarray, rng: np.random.Generator):
        lam = rng.beta(self.alpha, self.alpha)
        partner = rng.permutation(len(images))
        mixed = lam * images.astype(np.float32) + (1.0 - lam) * images[partner].astype(np.float32)
        images = np.clip(np.rint(mixed), 0, 255).astype(images.dtype) if images.dtype == np.uint8 else mixed
        return images, (lam * targets + (1.0 - lam) * targets[partner]).astype(np.float32)


class CutMix:
    """A box of a partner image pasted in; targets weighted by the box's share of the pixels."""

    def __init__(self, alpha: float = 1.0, probability: float = 1.0):
        _check(alpha, probability)
        self.alpha, self.probability = float(alpha), float(probability)

    def __call__(self, images: np.ndarray, targets: np.ndarray, rng: np.random.Generator):
        height, width = images.shape[1:3]
        cut = np.sqrt(1.0 - rng.beta(self.alpha, self.alpha))
        box_h, box_w = int(round(height * cut)), int(round(width * cut))
        top = int(rng.integers(0, height - box_h + 1))
        left = int(rng.integers(0, width - box_w + 1))
        partner = rng.permutation(len(images))
        images = images.copy()
        images[:, top : top + box_h, left : left + box_w] = images[partner, top : top + box_h, left : left + box_w]
        pasted = box_h * box_w / (height * width)  # the exact share, after rounding the box to whole pixels
        return images, ((1.0 - pasted) * targets + pasted * targets[partner]).astype(np.float32)


def _check(alpha: float, probability: float) -> None:
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    if not 0 < probability <= 1:
        raise ValueError(f"probability must be in (0, 1], got {probability}")


mixers: Registry = Registry("mixers", builtins={"mixup": MixUp, "cutmix": CutMix})


class BatchMixer:
    """Several mixers: each batch draws one of them (timm's switch), then mixes with that one's probability."""

    def __init__(self, identifiers: list[Any]):
        self.mixers = [mixers.get(identifier) for identifier in identifiers]

    def __bool__(self) -> bool:
        return bool(self.mixers)

    def __call__(self, images: np.ndarray, targets: np.ndarray, rng: np.random.Generator):
        mixer = self.mixers[int(rng.integers(len(self.mixers)))]
        if rng.random() >= getattr(mixer, "probability", 1.0):
            return images, targets
        return mixer(images, targets, rng)
