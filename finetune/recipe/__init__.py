"""The recipe: its schema and how it is read. Nothing here knows the registries."""

from finetune.recipe.load import format_validation_error, parse_assignments, parse_yaml, read_recipe, source_label
from finetune.recipe.schema import (
    BackboneConfig,
    DataConfig,
    DenseStackConfig,
    DistributionConfig,
    EvaluationConfig,
    ExportConfig,
    HeadConfig,
    MLPOptions,
    ModelConfig,
    OptimizerConfig,
    PhaseConfig,
    Recipe,
    TopBlocks,
    TrainingConfig,
)

__all__ = [
    "BackboneConfig",
    "DataConfig",
    "DenseStackConfig",
    "DistributionConfig",
    "EvaluationConfig",
    "ExportConfig",
    "HeadConfig",
    "MLPOptions",
    "ModelConfig",
    "OptimizerConfig",
    "PhaseConfig",
    "Recipe",
    "TopBlocks",
    "TrainingConfig",
    "format_validation_error",
    "parse_assignments",
    "parse_yaml",
    "read_recipe",
    "source_label",
]
