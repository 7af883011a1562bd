"""The recipe resolved once: each stage's part, checked against the registries.

:func:`resolve` turns a schema-valid :class:`~finetune.recipe.Recipe` into a
:class:`RunPlan`: the backbone spec (a reused run folder read once), the
data section, the phases, and every name a registry must know, checked
before anything heavy starts. :func:`load_recipe` is reading plus these
checks; the runner resolves the recipe it runs and hands each stage only
its part.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

from finetune.backbones import block_names, mlp
from finetune.backbones.registry import backbones, get
from finetune.backbones.reuse import EarlierRun, earlier_run
from finetune.backbones.spec import BackboneSpec
from finetune.backbones.truncate import cut_block_index
from finetune.catalog import augment, callbacks, layers, mixing, optimizers, regularizers, schedules
from finetune.data import check_config, datasets
from finetune.errors import RecipeError, WeightsError, first_line
from finetune.files import is_file
from finetune.recipe import Recipe, read_recipe, schema, source_label
from finetune.recipe.load import Overrides, RecipeSource
from finetune.registry import Registry


@dataclass(frozen=True)
class ModelPlan:
    """What building the model needs: the backbone spec with its settings, the head, the precision."""

    backbone: BackboneSpec
    weights: str | None
    options: dict
    image_hw: tuple[int, int]
    head: schema.HeadConfig
    precision: str
    inference_only: bool
    """The backbone always runs with ``training=False`` (pretrained BatchNorm statistics stay)."""
    reused: EarlierRun | None = None
    cut_at: str | None = None
    top_blocks_removed: int | None = None
    augment: tuple = ()
    """Augmentation identifiers, in order (:mod:`finetune.catalog.augment`)."""
    seed: int = 0
    multi_label: bool = False
    """A set of tags per image (``data.label_delimiter``): a sigmoid head, one probability per tag."""

    @property
    def preprocessing(self) -> str:
        return self.backbone.preprocessing_for(self.options)


@dataclass(frozen=True)
class RunPlan:
    """A whole run, resolved: what each stage gets."""

    name: str
    seed: int
    data: schema.DataConfig
    model: ModelPlan
    phases: tuple[schema.PhaseConfig, ...]
    training: schema.TrainingConfig
    evaluation: schema.EvaluationConfig
    export: schema.ExportConfig
    notices: tuple[str, ...] = ()
    distribution: schema.DistributionConfig = field(default_factory=schema.DistributionConfig)


def load_recipe(source: RecipeSource, overrides: Overrides = None) -> Recipe:
    """:func:`~finetune.recipe.read_recipe` (YAML, ``--set`` overrides, schema), then checked against the registries.

    Any problem is a one-line :class:`~finetune.errors.RecipeError` naming the key.
    """
    return prepare(source, overrides)[0]


def prepare(source: Recipe | RecipeSource, overrides: Overrides = None) -> tuple[Recipe, RunPlan]:
    """A recipe (read from ``source`` unless it is one already) and its plan, resolved once."""
    if isinstance(source, Recipe):
        return source, resolve(source)
    return resolve_read(read_recipe(source, overrides), source)


def resolve_read(recipe: Recipe, source: Recipe | RecipeSource) -> tuple[Recipe, RunPlan]:
    """:func:`prepare` of a recipe already read from ``source`` (a run starts its distribution in between)."""
    if isinstance(source, Recipe):
        return recipe, resolve(recipe)
    plan = resolve(recipe, source_label(source))
    recipe.notices.extend([notice for notice in plan.notices if notice not in recipe.notices])
    return recipe, plan


def resolve(recipe: Recipe, label: str = "recipe") -> RunPlan:
    """``recipe`` as each stage needs it; a RecipeError (prefixed with ``label``) names what is wrong."""
    try:
        model = _model_plan(recipe)
        _check_phases(recipe.phases)
        _check_validation_watchers(recipe)
        _check_mix(recipe.training.mix)
        _check_mc_dropout(recipe)
        _check_multi_label(recipe)
        _check_export_packages(recipe.export)
        _check_export_precision(recipe.export, recipe.precision)
    except RecipeError as error:
        raise RecipeError(f"{label}: {error}") from None
    return RunPlan(
        name=recipe.name,
        seed=recipe.seed,
        data=recipe.data,
        model=model,
        phases=tuple(recipe.phases),
        training=recipe.training,
        evaluation=recipe.evaluation,
        export=recipe.export,
        notices=tuple(recipe.notices) + tuple(technique_warnings(recipe)),
        distribution=recipe.distribution,
    )


def _model_plan(recipe: Recipe) -> ModelPlan:
    check_config(recipe.data)
    config = recipe.model.backbone
    if config.name not in backbones:
        raise RecipeError(f"model.backbone.name: {backbones.unknown_message(config.name)}")
    reused = earlier_run(config.path) if config.name == "run" else None
    spec = reused.spec if reused is not None else get(config.name)
    height, width = recipe.data.image_hw
    if reused is not None:
        reused.check_size((height, width))
    if min(height, width) < spec.min_size:
        raise RecipeError(
            f"data.image_size: {config.name} needs at least {spec.min_size}x{spec.min_size} inputs, "
            f"got {height}x{width}"
        )
    weights = config.weights if reused is None else None
    if weights not in (None, "imagenet") and not is_file(weights):
        raise RecipeError(
            f"model.backbone.weights: file {weights!r} does not exist (use imagenet, null or a weights file)"
        )
    if weights == "imagenet":
        if spec.weights_file is None:
            raise RecipeError(
                f"model.backbone.weights: {config.name} has no ImageNet weights; use null or a weights file"
            )
        try:
            spec.imagenet_file((height, width), config.options)  # a width with no ImageNet file fails here
        except (TypeError, ValueError) as error:
            raise RecipeError(f"model.backbone.options: {first_line(error)}") from None
    if reused is None:
        names = block_names.tabled(spec, config.options)
        if names is not None:  # a table lookup: every run and validate check the blocks before building
            check_blocks(recipe, spec, names)
    if config.name == "mlp":
        layers.check_stack(_mlp_options(recipe), "model.backbone.options")
    layers.check_stack(recipe.model.head, "model.head")
    try:
        augment.build_augmentation(recipe.model.augment)
    except RecipeError as error:
        raise RecipeError(f"model.augment: {error}") from None
    return ModelPlan(
        backbone=spec,
        weights=weights,
        options={**spec.default_options, **config.options},
        image_hw=(height, width),
        head=recipe.model.head,
        precision=recipe.precision,
        inference_only=spec.inference_mode and not any(phase.train_bn for phase in recipe.phases),
        reused=reused,
        cut_at=config.cut_at,
        top_blocks_removed=config.top_blocks_removed,
        augment=tuple(recipe.model.augment),
        seed=recipe.seed,
        multi_label=recipe.data.multi_label,
    )


def check_blocks(recipe: Recipe, spec: BackboneSpec, names: list[str]) -> None:
    """``cut_at``, ``top_blocks_removed`` and each phase's ``top_blocks`` against the backbone's block ``names``."""
    config = recipe.model.backbone
    last = cut_block_index(names, config.cut_at, config.top_blocks_removed)
    kept = names if last is None else names[: last + 1]
    for phase in recipe.phases:
        count = getattr(phase.trainable, "top_blocks", None)
        if count is not None and count > len(kept):
            raise RecipeError(
                f"phases.{phase.name}.trainable.top_blocks: {spec.name} has {len(kept)} blocks "
                f"({kept[0]} .. {kept[-1]}), got {count}"
            )


def preflight(recipe: Recipe) -> list[str]:
    """What ``finetune validate`` checks beyond :func:`resolve`, as a run would find it before training.

    The blocks of a backbone the name table does not hold (built once, without weights), and where
    ImageNet weights will come from (a weights folder, a package, or a download that must be reachable).
    Returns notes for the user; a problem is a one-line RecipeError or WeightsError.
    """
    config = recipe.model.backbone
    if config.name == "run":
        return []
    spec = get(config.name)
    notes = []
    asks_for_blocks = (
        config.cut_at
        or config.top_blocks_removed
        or any(getattr(phase.trainable, "top_blocks", None) for phase in recipe.phases)
    )
    if asks_for_blocks and block_names.tabled(spec, config.options) is None:
        check_blocks(recipe, spec, block_names.built(spec, config.options))
    if config.weights == "imagenet":
        # Imported here: only validate asks where the weights are before building.
        from finetune.backbones.build import missing_imagenet_message
        from finetune.backbones.weight_files import download_reachable, find_imagenet_weights

        options = {**spec.default_options, **config.options}
        found = find_imagenet_weights(spec, recipe.data.image_hw, options)
        if found is None and spec.locate_weights is not None:
            spec.locate_weights()  # its one-line WeightsError: which package to install
        if found is not None:
            notes.append(f"ImageNet weights for {spec.name}: {found}")
        else:
            problem = download_reachable()
            if problem is not None:
                raise WeightsError(missing_imagenet_message(spec, recipe.data.image_hw, options, problem))
            notes.append(
                f"ImageNet weights for {spec.name} are not on this machine; Keras downloads them on the first run"
            )
    return notes


def _mlp_options(recipe: Recipe) -> schema.MLPOptions:
    return mlp.options(recipe.model.backbone.options)


def _check_mix(identifiers) -> None:
    try:
        mixing.BatchMixer(identifiers)
    except RecipeError as error:
        raise RecipeError(f"training.mix: {error}") from None


def _check_phases(phases) -> None:
    for phase in phases:
        where = f"phases.{phase.name}"
        try:
            optimizers.get(phase.optimizer.as_identifier())
        except RecipeError as error:
            raise RecipeError(f"{where}.optimizer: {error}") from None
        try:
            spec = schedules.schedule_spec(phase.schedule)
            if phase.schedule is not None:
                schedules.build_schedule(
                    phase.schedule,
                    schedules.ScheduleContext(
                        phase.optimizer.learning_rate, steps_per_epoch=100, epochs=max(phase.epochs, 1)
                    ),
                )
            names = [callbacks.callback_name(item) for item in phase.callbacks]
            for name in names:
                callbacks.callbacks.entry(name)
        except RecipeError as error:
            raise RecipeError(f"{where}: {error}") from None
        if spec is not None and spec.step_based and "reduce_lr_on_plateau" in names:
            raise RecipeError(
                f"{where}: the {spec.name} schedule and reduce_lr_on_plateau would both own the learning rate "
                "(Keras fails mid-run); use schedule: performance, or drop the callback"
            )


# What watches a metric, and which one by default: Keras's callbacks and the performance schedule.
_WATCHERS = {"early_stopping": "val_loss", "model_checkpoint": "val_loss", "reduce_lr_on_plateau": "val_loss"}


def _check_validation_watchers(recipe: Recipe) -> None:
    """A callback or schedule that watches validation numbers needs validation images (else it never acts)."""
    if recipe.data.validation_split > 0:
        return
    for phase in recipe.phases:
        watched = [
            (f"callbacks: {name}", settings.get("monitor", _WATCHERS[name]), name)
            for name, settings in map(callbacks.callbacks.split, phase.callbacks)
            if name in _WATCHERS
        ]
        if phase.schedule is not None:
            name, settings = schedules.schedules.split(phase.schedule)
            if name == "performance":
                watched.append(("schedule: performance", settings.get("monitor", "val_loss"), name))
        for where, monitor, name in watched:
            if str(monitor).startswith("val_"):
                raise RecipeError(
                    f"phases.{phase.name}.{where} watches {monitor}, but data.validation_split is 0 (no "
                    f"validation images), so it would never act; hold some out (--set data.validation_split=0.1) "
                    f"or watch the training loss ({{name: {name}, monitor: loss}})"
                )


def _dense_stacks(recipe: Recipe) -> list[tuple[str, schema.DenseStackConfig]]:
    stacks: list[tuple[str, schema.DenseStackConfig]] = [("model.head", recipe.model.head)]
    if recipe.model.backbone.name == "mlp":
        stacks.append(("model.backbone.options", _mlp_options(recipe)))
    return stacks


def _check_multi_label(recipe: Recipe) -> None:
    """What a multi-label run (``data.label_delimiter``) does not do yet, refused before any work."""
    if not recipe.data.multi_label:
        return
    if recipe.data.source != "csv":
        raise RecipeError(f"data.label_delimiter: only data.source csv has tag lists, not {recipe.data.source!r}")
    refused = {
        "training.class_weight": recipe.training.class_weight != "none",
        "data.sampling": recipe.data.sampling != "natural",
        "evaluation.mc_samples": bool(recipe.evaluation.mc_samples),
        "training.epoch_metrics": bool(recipe.training.epoch_metrics),
    }
    for key, given in refused.items():
        if given:
            raise RecipeError(f"{key}: not available for multi-label runs (data.label_delimiter) yet; remove it")


def _check_mc_dropout(recipe: Recipe) -> None:
    if not recipe.evaluation.mc_samples:
        return
    kinds = [
        regularizers.resolve(stack.dropout, stack.regularizers).dropout_names for _, stack in _dense_stacks(recipe)
    ]
    if not any("mc_dropout" in names for names in kinds):
        raise RecipeError("evaluation.mc_samples: needs an mc_dropout layer (dropout: {name: mc_dropout, rate: 0.2})")


def _check_export_packages(export: schema.ExportConfig) -> None:
    # Before the run, not after hours of training: a format whose converter is not installed.
    for name in export.formats:
        needed = schema.EXPORT_PACKAGES.get(name, ())
        missing = [package for package in needed if importlib.util.find_spec(package) is None]
        if missing:
            hint = " (pip install 'finetune[onnx]')" if name == "onnx" else ""
            raise RecipeError(f"export.formats: {name} needs the {', '.join(missing)} package(s){hint}")


# Formats whose runtime cannot run what the converter writes from a model computing in that precision
# (measured with TensorFlow 2.21, ONNX Runtime 1.32): the run would train for hours and fail at its export.
_UNREADABLE_EXPORTS = {
    ("tflite", "mixed_float16"): "the TFLite interpreter has no kernel for its float16 MatMul (FlexMatMul)",
    ("tflite", "mixed_bfloat16"): "the TFLite interpreter has no kernel for its bfloat16 MatMul (FlexMatMul)",
    ("onnx", "mixed_bfloat16"): "ONNX Runtime refuses its MatMul of float16 and bfloat16 tensors",
}


def _check_export_precision(export: schema.ExportConfig, precision: str) -> None:
    for name in export.formats:
        reason = _UNREADABLE_EXPORTS.get((name, precision))
        if reason:
            raise RecipeError(
                f"export.formats: {name} cannot be read back from a {precision} model ({reason}); "
                f"use precision: float32, or drop {name} from export.formats"
            )


def technique_warnings(recipe: Recipe) -> list[str]:
    """Combinations that break what a technique relies on (SELU self-normalization)."""
    backbone = recipe.model.backbone
    mlp = _mlp_options(recipe) if backbone.name == "mlp" else None
    warnings = []
    for where, stack in _dense_stacks(recipe):
        if layers.activation_name(stack.activation) != "selu" or not stack.dense:
            continue
        broken = []
        initializer = layers.initializers.split(stack.kernel_initializer)[0]
        if initializer != "lecun_normal":
            broken.append(f"kernel_initializer is {initializer}, not lecun_normal")
        if mlp is None or mlp.input_scaling != "standardize":
            broken.append("inputs are not standardized (mlp input_scaling: standardize)")
        if stack.batch_norm != "none" or (mlp is not None and mlp.input_batch_norm):
            broken.append("batch norm is used")
        regularization = regularizers.resolve(stack.dropout, stack.regularizers)
        if any(name != "alpha_dropout" for name in regularization.dropout_names):
            broken.append(f"{regularization.dropout_names[0]} is used, not alpha_dropout")
        if regularization.kernel_regularizer or regularization.kernel_constraint:
            broken.append("l1/l2 or max_norm regularization is used")
        if backbone.name != "mlp":
            broken.append(f"the network is not a plain dense stack ({backbone.name} backbone)")
        if broken:
            warnings.append(f"{where}: selu will not self-normalize: " + "; ".join(broken))
    return warnings


def registries() -> dict[str, Registry]:
    """Every registry a recipe can name entries of, for ``finetune plugins`` and for extension."""
    return {
        "optimizers": optimizers.optimizers,
        "schedules": schedules.schedules,
        "regularizers": regularizers.regularizers,
        "initializers": layers.initializers,
        "activations": layers.activations,
        "backbones": backbones,
        "callbacks": callbacks.callbacks,
        "datasets": datasets,
        "augmentations": augment.augmentations,
        "mixers": mixing.mixers,
    }
