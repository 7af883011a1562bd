"""The model: raw pixels -> backbone input -> backbone -> new classification head."""

from __future__ import annotations

import contextlib
from pathlib import Path

import keras

from finetune.backbones.blocks import get_backbone, layout_of
from finetune.backbones.build import build_backbone
from finetune.backbones.input_layer import BackboneInput
from finetune.backbones.reuse import load_saved_model
from finetune.backbones.spec import BackboneLayout
from finetune.backbones.truncate import truncate
from finetune.catalog.augment import build_augmentation
from finetune.catalog.layers import dense_stack, output_layer
from finetune.data import model_io
from finetune.plan import ModelPlan, prepare
from finetune.recipe import Recipe


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
    except Exception:  # noqa: BLE001 - a broken driver means no usable GPU
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


def build_model(recipe: Recipe | str | Path, *, input_shape=None, num_classes: int | None = None) -> keras.Model:
    """The full classifier for a recipe, taking raw uint8 images.

    ``input_shape`` and ``num_classes`` are the dataset's; left out, a source
    with a static shape gives them, and ``tfds:NAME`` or ``image_folder``
    data is loaded to find out.
    """
    _, plan = prepare(recipe)
    input_shape, num_classes = model_io(plan.data, plan.seed, input_shape, num_classes)
    return assemble(plan.model, input_shape, num_classes)


def assemble(plan: ModelPlan, input_shape, num_classes: int) -> keras.Model:
    """Input layer, backbone and head for a resolved model section.

    The backbone is called with ``training=False`` so its BatchNorm layers
    keep their moving statistics even when unfrozen; with a ``train_bn:
    true`` phase (or a from-scratch stack) each BatchNorm layer's trainable
    flag decides instead (a frozen one always runs in inference mode).
    """
    height, width = plan.image_hw
    head = plan.head
    with dtype_policy(resolve_precision(plan.precision)):
        images = keras.Input(shape=input_shape, dtype="uint8", name="images")
        x = images
        # Augmentation acts on the stored pixels (cheaper than after the resize), in float32, in training only.
        for layer in build_augmentation(list(plan.augment), seed=plan.seed):
            x = layer(x)
        # Preprocessing stays in float32: it is cheap and keeps pixel maths exact.
        backbone_input = BackboneInput(
            height, width, plan.preprocessing, channels=plan.backbone.channels, name="backbone_input", dtype="float32"
        )
        x = backbone_input(x)
        if plan.reused is not None:
            trained = plan.reused.trained()
            backbone = trained.clone()
            # A reused backbone sees its inputs scaled as in its own training, not by the new data's statistics.
            backbone_input.mean.assign(trained.input_mean)
            backbone_input.std.assign(trained.input_std)
        else:
            backbone = build_backbone(
                plan.backbone, plan.image_hw, plan.weights, plan.options, channels=input_shape[-1]
            )
        backbone = truncate(backbone, plan.backbone, plan.cut_at, plan.top_blocks_removed)
        x = backbone(x, training=False if plan.inference_only else None)
        if len(x.shape) == 4:
            pooling = keras.layers.GlobalAveragePooling2D if head.pooling == "avg" else keras.layers.GlobalMaxPooling2D
            x = pooling(name="head_pool")(x)
        x = dense_stack(x, head, prefix="head_")
        outputs = output_layer(x, head, num_classes, multi_label=plan.multi_label)
        return keras.Model(images, outputs, name="finetune")


def fit_input_statistics(model: keras.Model, plan: ModelPlan, images) -> None:
    """A ``standardize`` input layer takes the training images' pixel statistics.

    A reused backbone keeps the statistics it was trained with (set by :func:`assemble`).
    """
    layer = model.get_layer("backbone_input")
    if layer.preprocessing == "standardize" and plan.reused is None:
        layer.adapt(images)


def layout(model: keras.Model, plan: ModelPlan) -> BackboneLayout:
    """The backbone inside ``model`` split into its blocks, once for the whole run."""
    return layout_of(get_backbone(model), plan.backbone, plan.inference_only)


def load_model(path, compile: bool = True) -> keras.Model:
    """A saved finetune model (``model.keras``, ``checkpoint.keras`` or a run folder), safe mode on."""
    return load_saved_model(path, compile=compile)
