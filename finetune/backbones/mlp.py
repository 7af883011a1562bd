"""``mlp``: the chapter's from-scratch dense networks as a backbone (Flatten + Dense stack)."""

from __future__ import annotations

from pydantic import ValidationError

from finetune.backbones.spec import BackboneSpec
from finetune.catalog.layers import dense_stack
from finetune.errors import RecipeError
from finetune.recipe import MLPOptions, format_validation_error


def options(raw: dict) -> MLPOptions:
    """The ``mlp`` backbone's options, validated (a one-line RecipeError otherwise)."""
    try:
        return MLPOptions(**raw)
    except ValidationError as error:
        raise RecipeError(f"model.backbone.options: {format_validation_error(error, {})}") from None


def build(input_shape, weights=None, **raw_options):
    import keras

    config = options(raw_options)
    inputs = keras.Input(shape=input_shape, name="mlp_input")
    x = keras.layers.Flatten(name="flatten")(inputs)
    if config.input_batch_norm:
        x = keras.layers.BatchNormalization(name="input_bn")(x)
    x = dense_stack(x, config, prefix="block")
    return keras.Model(inputs, x, name="mlp")


SPEC = BackboneSpec(
    name="mlp",
    build=build,
    preprocessing="unit",
    min_size=1,
    block_pattern=r"^(block\d+)_",
    channels=None,
    inference_mode=False,
    preprocessing_option="input_scaling",
    notes="Flatten + Dense stack trained from scratch (options: dense, activation, kernel_initializer, "
    "batch_norm, dropout, regularizers, input_batch_norm, input_scaling)",
)
