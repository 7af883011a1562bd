"""A previous run's trained model, without its head, as a backbone.

``model.backbone: {name: run, path: RUN_DIR}`` is the chapter's "reusing a
Keras model": the backbone inside ``RUN_DIR/model.keras`` is cloned and
gets the trained weights, so the earlier run's files never change. It keeps
the original backbone's preprocessing, block layout and BatchNorm rules, so
freezing and ``top_blocks`` work as for any other backbone.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

from finetune.errors import RecipeError, WeightsError


def run_recipe(path: str | Path):
    """The resolved recipe a finished run folder was trained with."""
    from finetune.recipe import load_recipe

    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise RecipeError(f"model.backbone.path: run folder {str(folder)!r} does not exist")
    if not (folder / "model.keras").is_file():
        raise RecipeError(
            f"model.backbone.path: {str(folder)!r} has no model.keras (only a finished run can be reused)"
        )
    if not (folder / "recipe.yaml").is_file():
        raise RecipeError(f"model.backbone.path: {str(folder)!r} has no recipe.yaml")
    try:
        return load_recipe(folder / "recipe.yaml")
    except RecipeError as error:
        raise RecipeError(f"model.backbone.path: the run's own recipe is no longer valid: {error}") from None


def run_spec(path: str | Path):
    """A :class:`~finetune.backbones.BackboneSpec` that builds a clone of the run's backbone."""
    from finetune import backbones

    folder = Path(path).expanduser()
    earlier = run_recipe(folder)
    original = backbones.spec_for(earlier.model.backbone)
    trained_size = tuple(earlier.data.image_hw)

    def build(input_shape, weights=None, **options):
        # The run's trained weights always; the recipe check allows only imagenet (default) or null here.
        if tuple(input_shape[:2]) != trained_size:
            raise RecipeError(
                f"data.image_size: the backbone from {str(folder)!r} was trained at "
                f"{trained_size[0]}x{trained_size[1]}; use that size"
            )
        return clone_backbone(folder / "model.keras")

    return dataclasses.replace(
        original,
        name="run",
        build=build,
        preprocessing=original.preprocessing_for(earlier.model.backbone.options),
        preprocessing_option=None,
        weights_file=None,
        min_size=min(trained_size),
        default_options={},
        notes=f"the trained backbone of {folder}",
    )


def copy_input_statistics(run_dir: str | Path, backbone_input) -> None:
    """Give ``backbone_input`` the pixel mean and deviation the run's backbone was trained on.

    A reused ``standardize`` backbone must see inputs scaled as in its own
    training; statistics of the new data would shift every activation.
    """
    import keras

    from finetune.model import load_model

    saved = load_model(Path(run_dir).expanduser() / "model.keras", compile=False).get_layer("backbone_input")
    backbone_input.mean.assign(keras.ops.convert_to_numpy(saved.mean))
    backbone_input.std.assign(keras.ops.convert_to_numpy(saved.std))


def clone_backbone(model_file: Path):
    """A fresh copy of the backbone inside a saved finetune model, with its trained weights."""
    import keras

    from finetune.model import get_backbone, load_model

    try:
        saved = load_model(model_file, compile=False)
    except Exception as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(f"cannot load {str(model_file)!r}: {reason}") from None
    source = get_backbone(saved)
    clone = keras.models.clone_model(source)
    clone.set_weights(source.get_weights())
    return clone
