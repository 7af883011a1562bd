"""Regularizers (ch. 11): l1, l2, l1_l2, dropout, alpha_dropout, MC dropout, max-norm.

Each entry says where it acts: ``kernel_regularizer`` (a penalty added to
the loss), ``dropout`` (a layer placed before each Dense layer) or
``kernel_constraint`` (applied to the weights after each step). All are
attached when the layers are built: Keras silently ignores a regularizer
set on a layer that is already built.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import keras

from finetune.errors import RecipeError, first_line
from finetune.registry import Registry

Slot = Literal["kernel_regularizer", "dropout", "kernel_constraint"]


@keras.saving.register_keras_serializable(package="finetune")
class MCDropout(keras.layers.Dropout):
    """Dropout that stays on at inference: average many predictions (MC dropout)."""

    def call(self, inputs, training=None):
        return super().call(inputs, training=True)


@dataclass(frozen=True)
class RegularizerSpec:
    name: str
    slot: Slot
    build: Callable[..., Any]
    notes: str = ""


regularizers: Registry[RegularizerSpec] = Registry(
    "regularizers",
    instance_type=RegularizerSpec,
    builtins={
        spec.name: spec
        for spec in (
            RegularizerSpec(
                "l1",
                "kernel_regularizer",
                lambda l1=0.01: keras.regularizers.L1(l1=l1),
                "adds l1 * sum(|w|) to the loss",
            ),
            RegularizerSpec(
                "l2",
                "kernel_regularizer",
                lambda l2=0.01: keras.regularizers.L2(l2=l2),
                "adds l2 * sum(w^2) to the loss",
            ),
            RegularizerSpec(
                "l1_l2", "kernel_regularizer", lambda l1=0.01, l2=0.01: keras.regularizers.L1L2(l1=l1, l2=l2), "both"
            ),
            RegularizerSpec(
                "dropout",
                "dropout",
                lambda rate=0.2, seed=None, name=None: keras.layers.Dropout(rate, seed=seed, name=name),
                "training only",
            ),
            RegularizerSpec(
                "alpha_dropout",
                "dropout",
                lambda rate=0.1, seed=None, name=None: keras.layers.AlphaDropout(rate, seed=seed, name=name),
                "keeps SELU's mean and variance",
            ),
            RegularizerSpec(
                "mc_dropout",
                "dropout",
                lambda rate=0.2, seed=None, name=None: MCDropout(rate, seed=seed, name=name),
                "also at inference",
            ),
            RegularizerSpec(
                "max_norm",
                "kernel_constraint",
                lambda max_value=1.0, axis=0: keras.constraints.MaxNorm(max_value, axis=axis),
                "rescales each unit's incoming weights to norm <= max_value",
            ),
        )
    },
)


@dataclass(frozen=True)
class Regularization:
    """Regularizer specs sorted by where they act, ready to build per layer."""

    kernel_regularizer: tuple = ()
    dropout: tuple = ()
    kernel_constraint: tuple = ()

    def new_kernel_regularizer(self):
        return _build_one(self.kernel_regularizer, "kernel_regularizer")

    def new_kernel_constraint(self):
        return _build_one(self.kernel_constraint, "kernel_constraint")

    def new_dropout(self, name: str):
        return _build_one(self.dropout, "dropout", name=name)

    @property
    def dropout_names(self) -> list[str]:
        return [spec[0].name for spec in self.dropout]


def _build_one(entries, slot, **extra):
    if not entries:
        return None
    spec, params = entries[0]
    try:
        return spec.build(**params, **extra)
    except (TypeError, ValueError) as error:
        raise RecipeError(f"regularizer {spec.name!r}: {first_line(error)}") from None


def resolve(dropout: float | str | dict | None, entries: list) -> Regularization:
    """Sort ``dropout`` (a rate or a spec) and a list of specs by slot; one per slot."""
    items = list(entries or [])
    if isinstance(dropout, (int, float)) and not isinstance(dropout, bool):
        if not 0 <= dropout < 1:
            raise RecipeError(f"dropout rate must be in [0, 1), got {dropout}")
        if dropout > 0:
            items.append({"name": "dropout", "rate": float(dropout)})
    elif dropout is not None:
        items.append(dropout)
    slots: dict[str, list] = {"kernel_regularizer": [], "dropout": [], "kernel_constraint": []}
    for item in items:
        name, params = regularizers.split(item)
        spec = regularizers.entry(name)
        slots[spec.slot].append((spec, params))
    for slot, found in slots.items():
        if len(found) > 1:
            raise RecipeError(f"one {slot} at a time, got {', '.join(spec.name for spec, _ in found)}")
    regularization = Regularization(**{slot: tuple(found) for slot, found in slots.items()})
    # Build once now so bad arguments fail at validation, not mid-run.
    regularization.new_kernel_regularizer(), regularization.new_kernel_constraint()
    _build_one(regularization.dropout, "dropout")
    return regularization
