"""The model: raw pixels -> backbone input -> backbone -> new classification head."""

from __future__ import annotations

import contextlib

import keras

from finetune import backbones, data, dense
from finetune.layers import BackboneInput
from finetune.recipe import Recipe, load_recipe


def resolve_precision(setting: str) -> str:
    """``auto`` is mixed_float16 with a GPU and float32 without one."""
    if setting != "auto":
        return setting
    return "mixed_float16" if gpu_available() else "float32"


def gpu_available() -> bool:
    backend = keras.backend.backend()
    try:
        if backend == "tensorflow":
            import tensorflow as tf

            return bool(tf.config.list_physical_devices("GPU"))
        if backend == "jax":
            import jax

            return any(device.platform == "gpu" for device in jax.devices())
        if backend == "torch":
            import torch

            return torch.cuda.is_available()
    except Exception:  # a broken driver means no usable GPU
        return False
    return False


@contextlib.contextmanager
def dtype_policy(name: str):
    """Build layers under ``name`` without changing the caller's global policy."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def build_model(recipe: Recipe | str, *, input_shape=None, num_classes: int | None = None) -> keras.Model:
    """The full classifier for a recipe, taking raw uint8 images.

    The backbone is called with ``training=False`` so its BatchNorm layers
    keep their moving statistics even when unfrozen; a recipe with a
    ``train_bn: true`` phase instead lets each BatchNorm layer's trainable
    flag decide (a frozen one always runs in inference mode).

    ``input_shape`` and ``num_classes`` are the dataset's (the runner passes
    them); left out, a source with a static shape gives it, and ``tfds:NAME``
    or ``image_folder`` data is loaded to find out.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    # Without a dataset's shape: the source's static one, or the data loaded to find out (data.model_io).
    input_shape, num_classes = data.model_io(recipe.data, recipe.seed, input_shape, num_classes)
    spec = backbones.spec_for(recipe.model.backbone)
    height, width = recipe.data.image_hw
    head = recipe.model.head
    options = recipe.model.backbone.options
    inference_only = backbone_inference_only(recipe, spec)

    with dtype_policy(resolve_precision(recipe.precision)):
        images = keras.Input(shape=input_shape, dtype="uint8", name="images")
        # Preprocessing stays in float32: it is cheap and keeps pixel maths exact.
        x = BackboneInput(height, width, spec.preprocessing_for(options), channels=spec.channels,
                          name="backbone_input", dtype="float32")(images)
        backbone = backbones.build_backbone(spec, (height, width), recipe.model.backbone.weights, options,
                                            channels=input_shape[-1])
        x = backbone(x, training=False if inference_only else None)
        if len(x.shape) == 4:
            pooling = keras.layers.GlobalAveragePooling2D if head.pooling == "avg" else keras.layers.GlobalMaxPooling2D
            x = pooling(name="head_pool")(x)
        x = dense.dense_stack(x, head, prefix="head_")
        outputs = dense.output_layer(x, head, num_classes)
        model = keras.Model(images, outputs, name="finetune")
    if recipe.model.backbone.name == "run" and spec.preprocessing == "standardize":
        from finetune.reuse import copy_input_statistics

        copy_input_statistics(recipe.model.backbone.path, model.get_layer("backbone_input"))
    return model


def backbone_inference_only(recipe: Recipe, spec=None) -> bool:
    """Whether the backbone always runs with ``training=False``.

    Pretrained backbones do, so BatchNorm keeps its moving statistics; with a
    train_bn phase (or a from-scratch stack) each layer's trainable flag decides.
    """
    spec = spec or backbones.spec_for(recipe.model.backbone)
    return spec.inference_mode and not any(phase.train_bn for phase in recipe.phases)


def load_model(path, compile: bool = True) -> keras.Model:
    """A saved finetune model (``model.keras``, ``checkpoint.keras``), safe mode on.

    Imports the modules whose classes such a file names (the input layer, MC
    dropout, optimizers with learning-rate multipliers, schedules) first.
    """
    from finetune import optimizers, regularizers, schedules  # noqa: F401  (register their classes)

    return keras.saving.load_model(path, compile=compile, safe_mode=True)


def get_backbone(model: keras.Model) -> keras.Model:
    """The backbone sub-model inside a model built by :func:`build_model`."""
    nested = [layer for layer in model.layers if isinstance(layer, keras.Model)]
    if len(nested) != 1:
        raise ValueError(f"expected one backbone inside {model.name!r}, found {len(nested)}")
    return nested[0]
