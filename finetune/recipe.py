"""Recipes: the YAML file that drives a run, validated as a whole up front.

``load_recipe(path, overrides)`` reads the YAML (``safe_load`` only), applies
``--set`` style overrides (dotted paths; phases addressed by name) and
validates everything that can be checked without heavy work: unknown keys,
types, value ranges, backbone names, image sizes against the backbone's
minimum, weight files, optimizer names and settings.
"""

from __future__ import annotations

import copy
import re
import typing
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, field_validator, model_validator

from finetune.errors import RecipeError

Precision = Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    source: str = Field("fashion_mnist", description="fashion_mnist | tfds:NAME | image_folder (or image_folder:PATH)")
    data_dir: str | None = Field(None, description=(
        "fashion_mnist: folder of the IDX files; tfds: the TFDS data dir; image_folder: the folder of class folders"))
    image_size: int | tuple[int, int] = Field(96, description="backbone input size: N or [height, width]")
    stored_size: int | tuple[int, int] | None = Field(None, description=(
        "image_folder (and tfds images that vary in size): size the images are decoded to; default image_size"))
    resize: Literal["crop", "pad", "stretch"] = Field("crop", description=(
        "how images of another aspect reach stored_size: centre crop, pad with black, or stretch"))
    test_split: float = Field(0.2, gt=0.0, lt=1.0, description=(
        "test fraction carved out (seeded, stratified) when the source has no test split"))
    classes: list[str | int] | None = Field(None, min_length=2, description=(
        "keep these classes (names, or indices), relabelled 0..k-1 in this order"))
    train_per_class: int | None = Field(None, gt=0, description=(
        "keep this many training images per class (before the validation hold-out)"))
    validation_split: float = Field(0.1, ge=0.0, lt=1.0)
    train_limit: int | None = Field(None, gt=0, description="stratified subset of the training images")
    test_limit: int | None = Field(None, gt=0, description="stratified subset of the test images")

    @model_validator(mode="before")
    @classmethod
    def _folder_shorthand(cls, value):
        # `source: image_folder:PATH` is `source: image_folder` with `data_dir: PATH`.
        if isinstance(value, dict) and isinstance(value.get("source"), str):
            name, colon, folder = value["source"].partition(":")
            if colon and name.strip() == "image_folder" and folder.strip():
                if value.get("data_dir") not in (None, folder.strip()):
                    raise ValueError(f"source names folder {folder.strip()!r} but data_dir is {value['data_dir']!r}")
                value = {**value, "source": "image_folder", "data_dir": folder.strip()}
        return value

    @field_validator("image_size", "stored_size")
    @classmethod
    def _positive_size(cls, value):
        if value is None:
            return value
        sizes = (value, value) if isinstance(value, int) else value
        if min(sizes) <= 0:
            raise ValueError("must be positive")
        return value

    @field_validator("classes")
    @classmethod
    def _distinct_classes(cls, value):
        if value is not None and len(set(map(repr, value))) != len(value):
            raise ValueError("lists a class twice")
        return value

    @property
    def image_hw(self) -> tuple[int, int]:
        size = self.image_size
        return (size, size) if isinstance(size, int) else tuple(size)

    @property
    def stored_hw(self) -> tuple[int, int]:
        """The size resized sources store images at (``stored_size``, else ``image_size``)."""
        size = self.image_size if self.stored_size is None else self.stored_size
        return (size, size) if isinstance(size, int) else tuple(size)


class BackboneConfig(_Strict):
    name: str = "xception"
    weights: str | None = Field("imagenet", description="imagenet, null (random init) or a weights file")
    options: dict[str, Any] = Field(default_factory=dict, description="extra constructor arguments, e.g. alpha")
    path: str | None = Field(None, description="for name: run, a finished run folder whose backbone is reused")

    @model_validator(mode="after")
    def _path_only_for_runs(self):
        if self.name == "run" and not self.path:
            raise ValueError("name run needs path: a finished run folder")
        if self.name != "run" and self.path:
            raise ValueError(f"path is only for name: run (got name {self.name!r})")
        if self.name == "run" and (self.options or self.weights not in (None, "imagenet")):
            raise ValueError("name run takes its weights and options from the run folder; set only path")
        return self


Identifier = str | dict[str, Any]


class DenseStackConfig(_Strict):
    """Hidden Dense layers and the chapter-11 techniques that shape them."""

    dense: list[int] = Field(default_factory=list, description="units of the hidden Dense layers")
    activation: Identifier = "relu"
    kernel_initializer: Identifier = "glorot_uniform"
    batch_norm: Literal["none", "before", "after"] = Field("none", description="relative to the activation")
    dropout: float | Identifier | None = Field(None, description="a rate, or a dropout-family regularizer")
    regularizers: list[Identifier] = Field(default_factory=list, description="l1, l2, l1_l2, max_norm, ...")

    @field_validator("dense")
    @classmethod
    def _positive_units(cls, value):
        if any(units <= 0 for units in value):
            raise ValueError("units must be positive")
        return value


class HeadConfig(DenseStackConfig):
    pooling: Literal["avg", "max"] = "avg"


class MLPOptions(DenseStackConfig):
    """Options of the ``mlp`` backbone."""

    dense: list[int] = Field(default_factory=lambda: [300, 100])
    input_batch_norm: bool = False
    input_scaling: Literal["unit", "standardize"] = "unit"


class ModelConfig(_Strict):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)


class TopBlocks(_Strict):
    top_blocks: int = Field(gt=0)


class OptimizerConfig(BaseModel):
    """An optimizer name and its settings (any Keras optimizer argument)."""

    model_config = ConfigDict(extra="allow")
    name: str = "adam"
    learning_rate: float = Field(1e-3, gt=0.0)

    def as_identifier(self) -> dict[str, Any]:
        return self.model_dump()


class PhaseConfig(_Strict):
    name: str
    epochs: int = Field(ge=0, description="0 skips the phase")
    trainable: Literal["none", "all"] | TopBlocks = "none"
    train_bn: bool = Field(False, description="let backbone BatchNorm layers train (batch statistics)")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: Identifier | None = Field(None, description="learning-rate schedule; lr0 is optimizer.learning_rate")
    backbone_lr_multiplier: float = Field(1.0, gt=0.0, description="backbone rate = head rate * this")
    callbacks: list[Identifier] = Field(default_factory=list)
    batch_size: int | None = Field(None, gt=0)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", value):
            raise ValueError("use letters, digits, '_' and '-' (it names files and --set paths)")
        return value


class TrainingConfig(_Strict):
    batch_size: int = Field(64, gt=0)
    verbose: Literal["auto", 0, 1, 2] = "auto"
    shuffle: bool = True
    cache: Literal["auto", "memory", "disk", "off"] = Field(
        "auto", description="compute the frozen part once per phase (auto: memory or disk by size)")
    cache_dtype: Literal["float32", "float16"] = "float32"

    @field_validator("cache", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        # YAML 1.1 reads a bare `off` as false (and `on` as true).
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value
    steps_per_execution: int = Field(1, gt=0)
    checkpoint_seconds: float = Field(60.0, ge=0.0, description=(
        "write the epoch checkpoint at most this often (0: every epoch); the last epoch of a phase "
        "and an interrupted run are always saved"))
    jit_compile: Literal["auto", True, False] = "auto"


class EvaluationConfig(_Strict):
    batch_size: int = Field(256, gt=0)
    mc_samples: int = Field(0, ge=0, description="average this many stochastic passes (needs mc_dropout)")


class ExportConfig(_Strict):
    saved_model: bool = True


class Recipe(_Strict):
    """A whole fine-tuning run."""

    _notices: list[str] = PrivateAttr(default_factory=list)

    name: str = "recipe"
    seed: int = 42
    precision: Precision = "auto"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    phases: list[PhaseConfig] = Field(min_length=1)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)

    @model_validator(mode="after")
    def _consistent(self):
        names = [phase.name for phase in self.phases]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"phases: duplicate phase name(s) {', '.join(duplicates)}")
        return self

    @property
    def notices(self) -> list[str]:
        """What loading changed or found doubtful (printed, never silent)."""
        return self._notices

    def phase(self, name: str) -> PhaseConfig:
        for phase in self.phases:
            if phase.name == name:
                return phase
        raise KeyError(name)

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# --- loading --------------------------------------------------------------


class _RecipeLoader(yaml.SafeLoader):
    """safe_load, but ``1e-5`` is a float as in YAML 1.2 (PyYAML reads it as a string)."""


_RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)[eE][-+]?\d+$"),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str = "recipe") -> Any:
    try:
        return yaml.load(text, Loader=_RecipeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise RecipeError(f"{source}:{where}: invalid YAML: {problem}") from None


def load_recipe(
    source: str | Path | Mapping[str, Any],
    overrides: Mapping[str, Any] | list[str] | None = None,
) -> Recipe:
    """Read, override and validate a recipe.

    ``source`` is a YAML file or an already parsed mapping. ``overrides`` maps
    dotted paths to values (``{"phases.head.epochs": 1}``) or is a list of
    ``KEY=VALUE`` strings whose values are read as YAML.
    """
    if isinstance(source, Mapping):
        raw, label, default_name = copy.deepcopy(dict(source)), "recipe", "recipe"
    else:
        path = Path(source)
        if not path.is_file():
            raise RecipeError(f"recipe file {str(path)!r} does not exist")
        raw = parse_yaml(path.read_text(), str(path))
        label, default_name = str(path), path.stem
        if not isinstance(raw, dict):
            raise RecipeError(f"{path}: a recipe must be a YAML mapping, got {type(raw).__name__}")
    raw.setdefault("name", default_name)
    for key, value in _normalize_overrides(overrides).items():
        set_path(raw, key, value)
    notices = _convert_decay(raw, label)
    try:
        recipe = Recipe.model_validate(raw)
    except ValidationError as error:
        raise RecipeError(f"{label}: {format_validation_error(error, raw)}") from None
    recipe._notices.extend(notices)
    check_recipe(recipe, label)
    return recipe


def _convert_decay(raw: dict, label: str) -> list[str]:
    """The book's ``SGD(..., decay=d)`` becomes the power schedule it meant.

    Keras 3 accepts ``decay`` with a warning and then ignores it.
    """
    notices = []
    for phase in raw.get("phases") or []:
        if not isinstance(phase, dict) or not isinstance(phase.get("optimizer"), dict):
            continue
        optimizer = phase["optimizer"]
        if "decay" not in optimizer:
            continue
        decay = optimizer.pop("decay")
        name = phase.get("name", "?")
        if decay in (None, 0):
            continue
        if not isinstance(decay, (int, float)) or decay < 0:
            raise RecipeError(f"{label}: phases.{name}.optimizer.decay: expected a positive number, got {decay!r}")
        if phase.get("schedule") is not None:
            raise RecipeError(
                f"{label}: phases.{name}: optimizer.decay and schedule both set the learning rate; keep one"
            )
        phase["schedule"] = {"name": "power", "s": 1.0 / float(decay), "c": 1.0}
        notices.append(
            f"phases.{name}.optimizer.decay={decay} (ignored by Keras 3 optimizers) became the power schedule "
            f"it meant: lr0 / (1 + {decay} * step), i.e. schedule: {{name: power, s: {1.0 / float(decay):g}, c: 1}}"
        )
    return notices


def _normalize_overrides(overrides) -> dict[str, Any]:
    if overrides is None:
        return {}
    if isinstance(overrides, Mapping):
        return dict(overrides)
    result = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--set {item!r}: expected KEY=VALUE, e.g. phases.head.epochs=1")
        result[key.strip()] = parse_yaml(value, f"--set {key.strip()}") if value.strip() else None
    return result


def set_path(raw: dict, dotted: str, value: Any) -> None:
    """Set ``value`` at a dotted path; list items (phases) are addressed by name."""
    parts = dotted.split(".")
    node: Any = raw
    for depth, part in enumerate(parts):
        last = depth == len(parts) - 1
        here = ".".join(parts[: depth + 1])
        if isinstance(node, list):
            index = _find_item(node, part, here)
            if last:
                node[index] = value
                return
            node = node[index]
            continue
        if not isinstance(node, dict):
            raise RecipeError(f"--set {dotted}: {'.'.join(parts[:depth])} is not a section")
        if last:
            _check_known_key(raw, parts, here)
            node[part] = value
            return
        if node.get(part) is None:
            _check_known_key(raw, parts[: depth + 1], here)
            node[part] = {}
        node = node[part]


def _find_item(items: list, key: str, here: str) -> int:
    for index, item in enumerate(items):
        if isinstance(item, dict) and item.get("name") == key:
            return index
    if key.isdigit() and int(key) < len(items):
        return int(key)
    names = [str(item.get("name")) for item in items if isinstance(item, dict)]
    raise RecipeError(f"--set {here}: no item named {key!r} (have: {', '.join(names)})")


def _check_known_key(raw: dict, parts: list[str], here: str) -> None:
    """Reject a --set path that names no recipe field, before validation."""
    model: Any = Recipe
    index = 0
    while index < len(parts) and isinstance(model, type) and issubclass(model, BaseModel):
        if model.model_config.get("extra") == "allow":
            return  # free-form settings (optimizer arguments) are checked by Keras
        part = parts[index]
        fields = model.model_fields
        if part not in fields:
            raise RecipeError(f"--set {here}: unknown key {part!r} (known: {', '.join(fields)})")
        annotation = fields[part].annotation
        if typing.get_origin(annotation) is list:
            model = typing.get_args(annotation)[0]
            index += 2  # skip the item's name
        else:
            model = annotation
            index += 1


def pydantic_error_line(error: Exception) -> str:
    """A pydantic error as one line (for option dicts validated outside the recipe)."""
    if isinstance(error, ValidationError):
        return format_validation_error(error, {})
    return str(error).splitlines()[0]


def format_validation_error(error: ValidationError, raw: Mapping[str, Any]) -> str:
    """Pydantic errors as one line, with phases named rather than numbered."""
    messages = []
    for item in error.errors():
        location = _readable_location(item["loc"], raw)
        message = item["msg"]
        if item["type"] == "extra_forbidden":
            message = "unknown key"
        elif item["type"] == "missing":
            message = "required"
        elif "input" in item and not isinstance(item["input"], (dict, list)):
            message = f"{message} (got {item['input']!r})"
        messages.append(f"{location}: {message}" if location else message)
    # Union types repeat one problem per alternative; keep the first of each location.
    seen, unique = set(), []
    for message in messages:
        key = message.split(":")[0]
        if key not in seen:
            seen.add(key)
            unique.append(message)
    return "; ".join(unique)


def _readable_location(location, raw) -> str:
    parts: list[str] = []
    node: Any = raw
    for part in location:
        if isinstance(part, int) and isinstance(node, list):
            item = node[part] if part < len(node) else None
            parts.append(str(item.get("name")) if isinstance(item, dict) and item.get("name") else str(part))
            node = item
        elif isinstance(part, str) and part in ("literal['none','all']", "TopBlocks", "int", "tuple[int, int]"):
            continue  # union branch labels
        else:
            parts.append(str(part))
            node = node.get(part) if isinstance(node, dict) else None
    return ".".join(parts)


# --- checks beyond the schema ---------------------------------------------


def check_recipe(recipe: Recipe, label: str = "recipe") -> None:
    """Checks that need the registries: names, sizes, files, optimizer settings."""
    from finetune import backbones, data

    def fail(message: str):
        raise RecipeError(f"{label}: {message}")

    try:
        data.check_config(recipe.data)
    except RecipeError as error:
        fail(str(error))
    backbone_name = recipe.model.backbone.name
    if backbone_name not in backbones.backbones:
        fail(f"model.backbone.name: {backbones.backbones.unknown_message(backbone_name)}")
    spec = backbones.spec_for(recipe.model.backbone)
    height, width = recipe.data.image_hw
    if backbone_name == "run":
        from finetune.reuse import run_recipe

        trained = run_recipe(recipe.model.backbone.path).data.image_hw
        if (height, width) != tuple(trained):
            fail(f"data.image_size: the backbone from {recipe.model.backbone.path!r} was trained at "
                 f"{trained[0]}x{trained[1]}; use that size")
    if min(height, width) < spec.min_size:
        fail(
            f"data.image_size: {backbone_name} needs at least {spec.min_size}x{spec.min_size} "
            f"inputs, got {height}x{width}"
        )
    weights = recipe.model.backbone.weights if backbone_name != "run" else None
    if weights not in (None, "imagenet") and not Path(weights).expanduser().is_file():
        fail(f"model.backbone.weights: file {weights!r} does not exist (use imagenet, null or a weights file)")
    if weights == "imagenet" and spec.weights_file is None:
        fail(f"model.backbone.weights: {backbone_name} has no ImageNet weights; use null or a weights file")
    from finetune import callbacks, dense, optimizers, regularizers, schedules

    if backbone_name == "mlp":
        try:
            options = MLPOptions(**recipe.model.backbone.options)
        except ValidationError as error:
            fail(f"model.backbone.options: {format_validation_error(error, {})}")
        dense.check_stack(options, f"{label}: model.backbone.options")
    dense.check_stack(recipe.model.head, f"{label}: model.head")

    for phase in recipe.phases:
        where = f"phases.{phase.name}"
        try:
            optimizers.get(phase.optimizer.as_identifier())
        except RecipeError as error:
            fail(f"{where}.optimizer: {error}")
        try:
            spec = schedules.schedule_spec(phase.schedule)
            if phase.schedule is not None:
                schedules.build_schedule(phase.schedule, schedules.ScheduleContext(
                    phase.optimizer.learning_rate, steps_per_epoch=100, epochs=max(phase.epochs, 1)))
            plateau = [item for item in phase.callbacks if callbacks.callback_name(item) == "reduce_lr_on_plateau"]
            for item in phase.callbacks:
                callbacks.callbacks.lookup(callbacks.callback_name(item))
        except RecipeError as error:
            fail(f"{where}: {error}")
        if spec is not None and spec.step_based and plateau:
            fail(
                f"{where}: the {spec.name} schedule and reduce_lr_on_plateau would both own the learning rate "
                "(Keras fails mid-run); use schedule: performance, or drop the callback"
            )
    if recipe.evaluation.mc_samples:
        stacks = [recipe.model.head] + ([MLPOptions(**recipe.model.backbone.options)] if backbone_name == "mlp" else [])
        kinds = [regularizers.resolve(stack.dropout, stack.regularizers).dropout_names for stack in stacks]
        if not any("mc_dropout" in names for names in kinds):
            fail("evaluation.mc_samples: needs an mc_dropout layer (dropout: {name: mc_dropout, rate: 0.2})")
    recipe._notices.extend(technique_warnings(recipe))


def technique_warnings(recipe: Recipe) -> list[str]:
    """Combinations that break what a technique relies on (SELU self-normalization)."""
    from finetune import dense, regularizers

    backbone = recipe.model.backbone
    mlp = MLPOptions(**backbone.options) if backbone.name == "mlp" else None
    stacks = [("model.head", recipe.model.head)] + ([("model.backbone.options", mlp)] if mlp else [])
    warnings = []
    for where, stack in stacks:
        if dense.activation_name(stack.activation) != "selu" or not stack.dense:
            continue
        broken = []
        initializer = stack.kernel_initializer if isinstance(stack.kernel_initializer, str) else \
            stack.kernel_initializer.get("name")
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
