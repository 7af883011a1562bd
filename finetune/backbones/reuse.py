"""A previous run's trained model, without its head, as a backbone.

``model.backbone: {name: run, path: RUN_DIR}`` is the chapter's "reusing a
Keras model": the backbone inside ``RUN_DIR/model.keras`` is rebuilt and
gets the trained weights, so the earlier run's files never change. It keeps
the original backbone's preprocessing, block layout and BatchNorm rules, so
freezing and ``top_blocks`` work as for any other backbone.

A run folder is read once per process (its recipe, and its ``model.keras``
when the backbone is built), while its files stay unchanged.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.backbones.blocks import get_backbone
from finetune.backbones.registry import get
from finetune.backbones.spec import BackboneSpec
from finetune.errors import RecipeError, WeightsError, first_line
from finetune.files import is_dir
from finetune.recipe import Recipe, read_recipe


@dataclass(frozen=True)
class EarlierRun:
    """A finished run folder whose backbone a recipe reuses."""

    folder: Path
    recipe: Recipe
    original: BackboneSpec
    """The spec of the backbone that run was built on (through any runs it reused itself)."""

    @property
    def trained_size(self) -> tuple[int, int]:
        return self.recipe.data.image_hw

    @property
    def spec(self) -> BackboneSpec:
        """A spec whose ``build`` gives a copy of the trained backbone."""
        return dataclasses.replace(
            self.original,
            name="run",
            build=self._build,
            preprocessing=self.original.preprocessing_for(self.recipe.model.backbone.options),
            preprocessing_option=None,
            weights_file=None,
            min_size=min(self.trained_size),
            default_options={},
            notes=f"the trained backbone of {self.folder}",
        )

    def check_size(self, image_hw) -> None:
        """The backbone sees images at the size it was trained at, or not at all."""
        if tuple(image_hw) != self.trained_size:
            raise RecipeError(
                f"data.image_size: the backbone from {str(self.folder)!r} was trained at "
                f"{self.trained_size[0]}x{self.trained_size[1]}; use that size"
            )

    def _build(self, input_shape, weights=None, **options):
        self.check_size(input_shape[:2])
        return self.trained().clone()

    def trained(self) -> TrainedBackbone:
        model_file = self.folder / "model.keras"
        return _trained_backbone(str(model_file), model_file.stat().st_mtime_ns)


def earlier_run(path: str | Path | None) -> EarlierRun:
    """The run folder at ``path``, checked: it must hold a finished run."""
    if not path:
        raise RecipeError("model.backbone.path: required for name: run (a finished run folder)")
    folder = Path(path).expanduser()
    if not is_dir(folder):
        raise RecipeError(f"model.backbone.path: run folder {str(folder)!r} does not exist")
    if not (folder / "model.keras").is_file():
        raise RecipeError(
            f"model.backbone.path: {str(folder)!r} has no model.keras (only a finished run can be reused)"
        )
    recipe_file = folder / "recipe.yaml"
    if not recipe_file.is_file():
        raise RecipeError(f"model.backbone.path: {str(folder)!r} has no recipe.yaml")
    return _earlier_run(str(folder.resolve()), recipe_file.stat().st_mtime_ns)


@functools.lru_cache(maxsize=32)
def _earlier_run(folder: str, recipe_stamp: int) -> EarlierRun:
    try:
        recipe = read_recipe(Path(folder) / "recipe.yaml")
        backbone = recipe.model.backbone
        original = earlier_run(backbone.path).spec if backbone.name == "run" else get(backbone.name)
    except RecipeError as error:
        raise RecipeError(f"model.backbone.path: the run's own recipe is no longer valid: {error}") from None
    return EarlierRun(Path(folder), recipe, original)


@dataclass(frozen=True)
class TrainedBackbone:
    """What a saved model keeps of its backbone: architecture, weights, and the input statistics."""

    config: dict
    weights: list
    input_mean: float
    input_std: float

    def clone(self):
        import keras

        backbone = keras.Model.from_config(copy.deepcopy(self.config))  # Keras consumes the config it reads
        backbone.set_weights(self.weights)
        return backbone


@functools.lru_cache(maxsize=2)
def _trained_backbone(model_file: str, stamp: int) -> TrainedBackbone:
    import keras

    try:
        saved = load_saved_model(model_file, compile=False)
    except Exception as error:  # noqa: BLE001 - Keras raises many kinds for a file it cannot read
        raise WeightsError(f"cannot load {model_file!r}: {first_line(error)}") from None
    source = get_backbone(saved)
    statistics = saved.get_layer("backbone_input")
    return TrainedBackbone(
        config=source.get_config(),
        weights=[keras.ops.convert_to_numpy(weight) for weight in source.weights],
        input_mean=float(keras.ops.convert_to_numpy(statistics.mean)),
        input_std=float(keras.ops.convert_to_numpy(statistics.std)),
    )


def load_saved_model(path: str | Path, compile: bool = True) -> Any:
    """A saved finetune model (``model.keras``, ``checkpoint.keras``), safe mode on.

    ``path`` may also be a run folder: its ``model.keras`` is loaded. Imports
    the modules whose classes such a file names (the input layer, MC dropout,
    optimizers with learning-rate multipliers, schedules, the smoothed loss)
    first: Keras finds a custom class only once its module has registered it.
    """
    import keras

    from finetune.backbones import input_layer  # noqa: F401
    from finetune.catalog import losses, optimizers, regularizers, schedules  # noqa: F401

    path = Path(path)
    if path.is_dir() and (path / "model.keras").is_file():
        path = path / "model.keras"
    return keras.saving.load_model(path, compile=compile, safe_mode=True)
