"""Augmentation plugins: Keras 3's own random image layers, by name.

They sit inside the model between the raw images and the backbone's input
layer, so they act on the stored pixels (28x28 for Fashion-MNIST: cheaper
than after the resize), run only when Keras calls the model in training, and
travel with the saved model, where inference leaves images untouched.
Defaults are mild, for small centred images; every Keras argument can be
given (``{name: random_translation, height_factor: 0.1}``).
"""

from __future__ import annotations

from typing import Any

import keras

from finetune.registry import Registry


def _translation(factor: float = 0.08, **kwargs):
    kwargs.setdefault("height_factor", factor)
    kwargs.setdefault("width_factor", factor)
    kwargs.setdefault("fill_mode", "constant")
    return keras.layers.RandomTranslation(**kwargs)


def _flip(mode: str = "horizontal", **kwargs):
    return keras.layers.RandomFlip(mode, **kwargs)


def _zoom(factor: float = 0.1, **kwargs):
    kwargs.setdefault("height_factor", factor)
    kwargs.setdefault("fill_mode", "constant")
    return keras.layers.RandomZoom(**kwargs)


def _rotation(factor: float = 0.03, **kwargs):
    kwargs.setdefault("fill_mode", "constant")
    return keras.layers.RandomRotation(factor, **kwargs)


def _erasing(**kwargs):
    kwargs.setdefault("value_range", (0, 255))
    return keras.layers.RandomErasing(**kwargs)


def _rand_augment(**kwargs):
    kwargs.setdefault("value_range", (0, 255))
    return keras.layers.RandAugment(**kwargs)


augmentations: Registry = Registry(
    "augmentations",
    instance_type=keras.layers.Layer,
    builtins={
        "random_translation": _translation,
        "random_flip": _flip,
        "random_zoom": _zoom,
        "random_rotation": _rotation,
        "random_erasing": _erasing,
        "rand_augment": _rand_augment,
        "random_contrast": lambda factor=0.2, **kwargs: keras.layers.RandomContrast(factor, **kwargs),
        "random_brightness": lambda factor=0.1, **kwargs: keras.layers.RandomBrightness(factor, **kwargs),
    },
)

#: Name prefix of augmentation layers in a built model (feature caching looks for it).
LAYER_PREFIX = "augment_"


def build_augmentation(identifiers: list[Any], seed: int | None = None) -> list[keras.layers.Layer]:
    """One seeded layer per identifier, named ``augment_<position>_<name>``."""
    built = []
    for index, identifier in enumerate(identifiers):
        name, settings = augmentations.split(identifier)
        if seed is not None:
            settings.setdefault("seed", seed + index)
        settings.setdefault("dtype", "float32")  # pixel maths stays exact under mixed precision
        built.append(augmentations.get({"name": name, **settings}, name=f"{LAYER_PREFIX}{index}_{name}"))
    return built


def augmentation_layers(model: keras.Model) -> list[keras.layers.Layer]:
    """The augmentation layers of a model built by :func:`finetune.model.assemble`."""
    return [layer for layer in model.layers if layer.name.startswith(LAYER_PREFIX)]
