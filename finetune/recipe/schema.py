"""What a recipe is: the pydantic schema of the YAML file that drives a run.

Only types, ranges and the rules that need nothing but the recipe itself
live here; names that registries know (backbones, optimizers, data sources)
are checked when the recipe is resolved (:mod:`finetune.plan`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

Precision = Literal["auto", "float32", "mixed_float16", "mixed_bfloat16"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CsvColumns(_Strict):
    """The columns of a ``csv`` source's file, by their header names."""

    image: str = Field("image", description="csv: the column of image paths (relative to the CSV's folder or absolute)")
    label: str = Field("label", description="csv: the column of class names")
    split: str = Field(
        "split", description="csv: the column of train | validation | test (optional; an empty cell: seeded splits)"
    )


class DataConfig(_Strict):
    source: str = Field(
        "fashion_mnist", description="fashion_mnist | tfds:NAME | image_folder (or image_folder:PATH) | csv"
    )
    data_dir: str | None = Field(
        None,
        description=(
            "fashion_mnist: folder of the IDX files; tfds: the TFDS data dir; image_folder: the folder of class "
            "folders; csv: the CSV (or .tsv) file of image paths and labels"
        ),
    )
    image_size: int | tuple[int, int] = Field(96, description="backbone input size: N or [height, width]")
    stored_size: int | tuple[int, int] | None = Field(
        None,
        description=(
            "image_folder (and tfds images that vary in size): size the images are decoded to; default image_size"
        ),
    )
    resize: Literal["crop", "pad", "stretch"] = Field(
        "crop", description=("how images of another aspect reach stored_size: centre crop, pad with black, or stretch")
    )
    test_split: float = Field(
        0.2, gt=0.0, lt=1.0, description="test fraction carved out (seeded, stratified) when the source has none"
    )
    classes: list[str | int] | None = Field(
        None, min_length=2, description=("keep these classes (names, or indices), relabelled 0..k-1 in this order")
    )
    train_per_class: int | None = Field(
        None, gt=0, description=("keep this many training images per class (before the validation hold-out)")
    )
    validation_split: float = Field(
        0.1, ge=0.0, lt=1.0, description="fraction of the training images held out for validation (stratified, seeded)"
    )
    skip_bad_images: bool = Field(
        False, description="image_folder, csv: skip images that cannot be read (counted in the log) instead of stopping"
    )
    columns: CsvColumns = Field(default_factory=CsvColumns)
    label_delimiter: str | None = Field(
        None,
        min_length=1,
        description=(
            "csv: split each label cell at this string into a set of tags (e.g. ' '); the run is then "
            "multi-label: a sigmoid head, binary cross-entropy, per-tag thresholds chosen on validation"
        ),
    )
    allow_outside_paths: bool = Field(
        False, description="csv: allow image paths that leave the CSV's folder (through '..' or a symbolic link)"
    )
    sampling: Literal["natural", "balanced"] = Field(
        "natural",
        description=(
            "natural: each epoch reads every training image once; balanced: each epoch draws as many images "
            "with every class equally often (with replacement), from (seed, epoch)"
        ),
    )
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
    def multi_label(self) -> bool:
        """Each image has a set of tags (``label_delimiter``), not one class."""
        return self.label_delimiter is not None

    @property
    def image_hw(self) -> tuple[int, int]:
        size = self.image_size
        return (size, size) if isinstance(size, int) else (size[0], size[1])

    @property
    def stored_hw(self) -> tuple[int, int]:
        """The size resized sources store images at (``stored_size``, else ``image_size``)."""
        size = self.image_size if self.stored_size is None else self.stored_size
        return (size, size) if isinstance(size, int) else (size[0], size[1])


class BackboneConfig(_Strict):
    name: str = Field("xception", description="a registered backbone (`finetune plugins`), or run")
    weights: str | None = Field("imagenet", description="imagenet, null (random init) or a weights file")
    options: dict[str, Any] = Field(default_factory=dict, description="extra constructor arguments, e.g. alpha")
    path: str | None = Field(None, description="for name: run, a finished run folder whose backbone is reused")
    cut_at: str | None = Field(
        None, description="build the backbone only up to this block (its name, e.g. block5c); the head sits there"
    )
    top_blocks_removed: int | None = Field(None, ge=0, description="build the backbone without its last N blocks")

    @model_validator(mode="after")
    def _path_only_for_runs(self):
        if self.cut_at is not None and self.top_blocks_removed:
            raise ValueError("give cut_at or top_blocks_removed, not both")
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
    activation: Identifier = Field("relu", description="relu, leaky_relu, elu, selu, ...")
    kernel_initializer: Identifier = Field("glorot_uniform", description="glorot_*, he_*, lecun_*, ...")
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
    pooling: Literal["avg", "max"] = Field("avg", description="global pooling of the backbone's feature map")


class MLPOptions(DenseStackConfig):
    """Options of the ``mlp`` backbone."""

    dense: list[int] = Field(default_factory=lambda: [300, 100])
    input_batch_norm: bool = False
    input_scaling: Literal["unit", "standardize"] = "unit"


class ModelConfig(_Strict):
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    head: HeadConfig = Field(default_factory=HeadConfig)
    augment: list[Identifier] = Field(
        default_factory=list,
        description=(
            "training-only augmentation layers inside the model, at the stored resolution: random_translation, "
            "random_flip, random_zoom, random_rotation, random_erasing, rand_augment, ..."
        ),
    )


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
    name: str = Field(description="the phase's name (history.csv, --set phases.NAME.KEY=VALUE)")
    epochs: int = Field(ge=0, description="0 skips the phase")
    min_steps: int = Field(
        0,
        ge=0,
        description=(
            "train at least this many optimizer steps: where the training split gives fewer in `epochs`, "
            "the phase runs ceil(min_steps / steps per epoch) epochs (0: `epochs` alone)"
        ),
    )
    trainable: Literal["none", "all"] | TopBlocks = Field(
        "none", description="what of the backbone trains: none, all, or its top N blocks"
    )
    train_bn: bool = Field(False, description="let backbone BatchNorm layers train (batch statistics)")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: Identifier | None = Field(None, description="learning-rate schedule; lr0 is optimizer.learning_rate")
    backbone_lr_multiplier: float = Field(1.0, gt=0.0, description="backbone rate = head rate * this")
    callbacks: list[Identifier] = Field(
        default_factory=list, description="Keras callbacks by name: early_stopping, reduce_lr_on_plateau, ..."
    )
    batch_size: int | None = Field(None, gt=0, description="this phase's batch size (default training.batch_size)")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value):
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", value):
            raise ValueError("use letters, digits, '_' and '-' (it names files and --set paths)")
        return value

    @property
    def schedule_name(self) -> str | None:
        if self.schedule is None:
            return None
        return self.schedule if isinstance(self.schedule, str) else str(self.schedule.get("name"))

    def describe(self) -> str:
        """The optimizer, rate, schedule and backbone multiplier, for logs: ``adam lr 0.001, schedule cosine``."""
        parts = [f"{self.optimizer.name} lr {self.optimizer.learning_rate:g}"]
        if self.schedule_name:
            parts.append(f"schedule {self.schedule_name}")
        if self.backbone_lr_multiplier != 1:
            parts.append(f"backbone lr x{self.backbone_lr_multiplier:g}")
        return ", ".join(parts)


class LossConfig(_Strict):
    """The training loss: sparse categorical cross-entropy, optionally with label smoothing."""

    label_smoothing: float = Field(0.0, ge=0.0, lt=1.0, description="targets (1 - e) one-hot + e / classes")


class TrainingConfig(_Strict):
    batch_size: int = Field(64, gt=0, description="training batch size")
    loss: LossConfig = Field(default_factory=LossConfig)
    verbose: Literal["auto", 0, 1, 2] = Field(
        "auto",
        description=(
            "auto: a live line per step on a terminal and one line per epoch; 0: no epoch lines; "
            "1, 2: Keras's own progress bar or epoch line"
        ),
    )
    tensorboard: bool = Field(True, description="TensorBoard logs in RUN_DIR/tensorboard (phases on one epoch axis)")
    epoch_metrics: list[Literal["macro_f1"]] = Field(
        default_factory=list, description="logged each epoch besides accuracy, for training and validation (val_NAME)"
    )
    shuffle: bool = Field(True, description="a new order of the training images each epoch, from (seed, epoch)")
    class_weight: Literal["none", "balanced"] | dict[str, float] = Field(
        "none",
        description=(
            "weigh each training example's loss by its class, in every phase: none, balanced "
            "(n_images / (n_classes * n_class), from the training split) or {CLASS: weight} (others 1)"
        ),
    )
    cache: Literal["auto", "memory", "disk", "off"] = Field(
        "auto", description="compute the frozen part once per phase (auto: memory or disk by size)"
    )
    cache_dtype: Literal["float32", "float16"] = Field("float32", description="how cached features are stored")
    augmented_views: int = Field(
        0,
        ge=0,
        description=(
            "with model.augment: compute the frozen part for this many augmented copies of the training "
            "images once and train on one copy per epoch (0: no caching while augmenting)"
        ),
    )
    mix: list[Identifier] = Field(
        default_factory=list,
        description=(
            "batch-level augmentation mixing two training images and their labels: mixup, cutmix "
            "(several: each batch draws one); training batches only, never validation or evaluation"
        ),
    )
    recalibrate_bn: Literal["auto", "always", "off"] = Field(
        "auto",
        description=(
            "recompute BatchNorm statistics on training images after a phase (auto: after phases with "
            "train_bn: true, whose moving averages trail fast-changing weights)"
        ),
    )
    recalibrate_bn_images: int = Field(4096, gt=0, description="how many training images recalibration uses")
    gradient_health_every: int = Field(
        200,
        ge=0,
        description=(
            "every this many steps, record each layer's gradient norm and dense units' health on one batch; "
            "warn on vanishing/exploding gradients; gradient_norms.png (0: off)"
        ),
    )
    steps_per_execution: int = Field(1, gt=0, description="Keras steps_per_execution")
    checkpoint_seconds: float = Field(
        60.0,
        ge=0.0,
        description=(
            "write the epoch checkpoint at most this often (0: every epoch); the last epoch of a phase "
            "and an interrupted run are always saved"
        ),
    )
    jit_compile: Literal["auto", True, False] = Field("auto", description="XLA compilation (Keras's jit_compile)")

    @field_validator("class_weight", mode="before")
    @classmethod
    def _class_weight_names(cls, value):
        # YAML reads `class_weight: null` as None, and a class folder named 3 as the key 3.
        if value is None:
            return "none"
        return {str(name): weight for name, weight in value.items()} if isinstance(value, dict) else value

    @field_validator("class_weight")
    @classmethod
    def _positive_weights(cls, value):
        if isinstance(value, dict) and any(not weight > 0 for weight in value.values()):
            raise ValueError("class weights must be positive")
        return value

    @field_validator("cache", mode="before")
    @classmethod
    def _yaml_off(cls, value):
        # YAML 1.1 reads a bare `off` as false (and `on` as true).
        return {False: "off", True: "auto"}.get(value, value) if isinstance(value, bool) else value

    def batch_size_for(self, phase: PhaseConfig) -> int:
        return phase.batch_size or self.batch_size


class EvaluationConfig(_Strict):
    batch_size: int = Field(256, gt=0, description="prediction batch size")
    mc_samples: int = Field(0, ge=0, description="average this many stochastic passes (needs mc_dropout)")
    tta: list[Literal["flip"]] = Field(
        default_factory=list, description="test-time augmentation: also predict on these views and average"
    )


ExportFormat = Literal["keras", "saved_model", "tflite", "onnx"]
TFLiteQuantization = Literal["none", "float16", "dynamic_range", "int8"]
TFLiteOutput = Literal["float32", "uint8", "int8"]
_TFLITE_WEIGHTS = "tflite weights: none (float32), float16, dynamic_range (int8), int8 (activations too, calibrated)"
DEFAULT_EXPORT_FORMATS: tuple[ExportFormat, ...] = ("keras", "saved_model")
EXPORT_PACKAGES: dict[str, tuple[str, ...]] = {
    "saved_model": ("tensorflow",),
    "tflite": ("tensorflow",),
    "onnx": ("tf2onnx", "onnx", "onnxruntime"),  # writing (tf2onnx, onnx) and checking (onnxruntime) the file
}
"""The packages each export format needs beyond Keras (``pip install 'finetune[onnx]'`` for ONNX)."""


class ExportConfig(_Strict):
    formats: list[ExportFormat] = Field(
        default_factory=lambda: list(DEFAULT_EXPORT_FORMATS),
        # Stated in the schema and the README's table: pydantic states no default for a default_factory.
        json_schema_extra={"default": list(DEFAULT_EXPORT_FORMATS)},
        description=(
            "what the run writes and verifies: keras (model.keras, always written; listed: reloaded and checked), "
            "saved_model (saved_model/), tflite (model.tflite), onnx (model.onnx; pip install 'finetune[onnx]')"
        ),
    )
    tflite_quantization: TFLiteQuantization = Field("none", description=_TFLITE_WEIGHTS)
    calibration_images: int = Field(200, gt=0, description="int8: training images that set the activations' ranges")
    tflite_io: TFLiteOutput = Field("float32", description="int8 output tensor: float32, or uint8/int8 (scaled)")
    verify_images: int = Field(
        32, gt=0, description="test images each artifact predicts after writing, compared with the Keras model"
    )

    @field_validator("formats")
    @classmethod
    def _no_repeats(cls, value):
        repeated = sorted({name for name in value if value.count(name) > 1})
        if repeated:
            raise ValueError(f"{', '.join(repeated)} listed more than once")
        return value

    @model_validator(mode="after")
    def _integer_output_needs_int8(self):
        if self.tflite_io != "float32" and self.tflite_quantization != "int8":
            raise ValueError(f"tflite_io {self.tflite_io} needs tflite_quantization: int8")
        return self


class DistributionConfig(_Strict):
    """Where a run trains: one device, several on this machine, or several machines."""

    strategy: Literal["auto", "none", "mirrored", "multi_worker_mirrored"] = Field(
        "none",
        description=(
            "none: one device; mirrored: every GPU here (tf.distribute.MirroredStrategy; on JAX "
            "keras.distribution.DataParallel over every local device); multi_worker_mirrored: the machines "
            "TF_CONFIG names, each started with the same command (TensorFlow only); auto: mirrored when "
            "several GPUs are visible, else none"
        ),
    )
    lr_scaling: Literal["none", "linear", "sqrt"] = Field(
        "none",
        description=(
            "how every phase's learning rate follows the global batch (batch sizes are per replica): "
            "none, linear (x replicas), sqrt (x sqrt(replicas))"
        ),
    )


class Recipe(_Strict):
    """A whole fine-tuning run."""

    _notices: list[str] = PrivateAttr(default_factory=list)

    name: str = Field("recipe", description="the run's name (its folder: runs/NAME-TIME)")
    seed: int = Field(42, description="seeds subsets, shuffling, initial weights and augmentation")
    precision: Precision = Field("auto", description="auto: mixed_float16 on a GPU, float32 elsewhere")
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    phases: list[PhaseConfig] = Field(min_length=1)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    distribution: DistributionConfig = Field(default_factory=DistributionConfig)

    @model_validator(mode="before")
    @classmethod
    def _gradual_unfreezing(cls, value):
        # `trainable: {top_blocks: [2, 4, 8]}` is fastai-style gradual unfreezing: one phase per count,
        # each with the phase's epochs and settings, named NAME_top2, NAME_top4, ...
        if not isinstance(value, dict) or not isinstance(value.get("phases"), list):
            return value
        phases = []
        for phase in value["phases"]:
            trainable = phase.get("trainable") if isinstance(phase, dict) else None
            counts = trainable.get("top_blocks") if isinstance(trainable, dict) else None
            if not isinstance(trainable, dict) or not isinstance(counts, list) or len(trainable) != 1:
                phases.append(phase)
                continue
            if not counts:
                raise ValueError(f"phases: {phase.get('name')}: top_blocks is an empty list")
            for count in counts:
                phases.append({**phase, "name": f"{phase.get('name')}_top{count}", "trainable": {"top_blocks": count}})
        return {**value, "phases": phases}

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
