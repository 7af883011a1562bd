"""Optimizer registry: the chapter's optimizers, with clipping, discriminative
learning rates and schedulable momentum.

Each registered name builds a Keras optimizer. The classes are thin
subclasses of Keras's own (``finetune>Adam`` for ``keras.optimizers.Adam``)
that add two things Keras lacks, both backend-agnostic and serializable:

* ``lr_multipliers``: a learning-rate factor per variable, so a phase can
  train the backbone at ``backbone_lr_multiplier`` times the head's rate
  (fastai's ``slice(lr/100, lr)``);
* momentum (SGD) or ``beta_1`` (Adam family) held in a variable that a
  callback can move during training (1cycle).
"""

from __future__ import annotations

from typing import Any

import keras

from finetune._keras_compat import variable_index
from finetune.errors import RecipeError
from finetune.registry import Registry


class ScheduledValue(keras.Variable):
    """A hyper-parameter a callback may change between steps.

    Keras optimizers test ``self.momentum != 0`` in Python while tracing;
    those comparisons see the value the optimizer was built with.
    """

    def __init__(self, value, **kwargs):
        kwargs.setdefault("trainable", False)
        kwargs.setdefault("dtype", "float32")
        super().__init__(float(value), **kwargs)
        self._built_value = float(value)

    def __eq__(self, other):
        return self._built_value == other

    def __ne__(self, other):
        return self._built_value != other

    __hash__ = keras.Variable.__hash__

    def current(self) -> float:
        return float(keras.ops.convert_to_numpy(self.value))


class _FinetuneOptimizer:
    """Mixin for Keras optimizers: per-variable learning-rate multipliers.

    (The Keras optimizer comes after it in the MRO; mypy cannot see that, hence the ignores.)
    """

    def __init__(self, *args, lr_multipliers: dict[str, float] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lr_multipliers = {str(path): float(value) for path, value in (lr_multipliers or {}).items()}
        self._multiplier_by_index: list[float] = []

    def build(self, variables):
        super().build(variables)  # type: ignore[misc]
        self._multiplier_by_index = [self.lr_multipliers.get(variable.path, 1.0) for variable in variables]

    def update_step(self, gradient, variable, learning_rate):
        if self._multiplier_by_index:
            multiplier = self._multiplier_by_index[variable_index(self, variable)]
            if multiplier != 1.0:
                learning_rate = learning_rate * multiplier
        return super().update_step(gradient, variable, learning_rate)  # type: ignore[misc]

    def schedule_hyperparameter(self, attribute: str) -> ScheduledValue:
        """Hold ``attribute`` (momentum, beta_1) in a variable; returns it."""
        value = getattr(self, attribute)
        if not isinstance(value, ScheduledValue):
            value = ScheduledValue(value, name=f"{attribute}_schedule")
            setattr(self, attribute, value)
        return value

    def get_config(self):
        config = super().get_config()  # type: ignore[misc]
        for key, value in config.items():
            if isinstance(value, ScheduledValue):
                config[key] = value.current()
        config["lr_multipliers"] = dict(self.lr_multipliers)
        return config


def _subclass(base: type) -> type:
    cls = type(base.__name__, (_FinetuneOptimizer, base), {"__doc__": f"{base.__doc__ or ''}"})
    cls.__module__ = __name__
    return keras.saving.register_keras_serializable(package="finetune")(cls)


SGD = _subclass(keras.optimizers.SGD)
Adagrad = _subclass(keras.optimizers.Adagrad)
RMSprop = _subclass(keras.optimizers.RMSprop)
Adam = _subclass(keras.optimizers.Adam)
Nadam = _subclass(keras.optimizers.Nadam)
AdamW = _subclass(keras.optimizers.AdamW)

optimizers: Registry = Registry(
    "optimizers",
    instance_type=keras.optimizers.Optimizer,
    builtins={
        "sgd": SGD,
        "momentum": lambda momentum=0.9, **kwargs: SGD(momentum=momentum, **kwargs),
        "nesterov": lambda momentum=0.9, **kwargs: SGD(momentum=momentum, nesterov=True, **kwargs),
        "adagrad": Adagrad,
        "rmsprop": RMSprop,
        "adam": Adam,
        "nadam": Nadam,
        "adamw": AdamW,
    },
)


def get(identifier: Any, learning_rate: Any = None, lr_multipliers: dict | None = None) -> keras.optimizers.Optimizer:
    """A fresh optimizer from a name, a ``{name: ..., **settings}`` mapping or an instance.

    ``learning_rate`` (a float or a schedule) replaces the spec's own.
    """
    if isinstance(identifier, keras.optimizers.Optimizer):
        return identifier
    name, settings = optimizers.split(identifier)
    if "decay" in settings:
        raise RecipeError(
            "optimizer setting 'decay' would be silently ignored by Keras 3; "
            "finetune turns it into a power schedule only in a phase's optimizer"
        )
    if learning_rate is not None:
        settings["learning_rate"] = learning_rate
    if lr_multipliers:
        settings["lr_multipliers"] = lr_multipliers
    return optimizers.get({"name": name, **settings})
