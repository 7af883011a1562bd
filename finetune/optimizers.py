"""Optimizer registry: names for Keras's own optimizer classes."""

from __future__ import annotations

from typing import Any

import keras

from finetune.errors import RecipeError
from finetune.registry import Registry

optimizers: Registry = Registry("optimizers", instance_type=keras.optimizers.Optimizer)

optimizers.register("sgd", keras.optimizers.SGD)
optimizers.register("momentum", lambda momentum=0.9, **kwargs: keras.optimizers.SGD(momentum=momentum, **kwargs))
optimizers.register(
    "nesterov", lambda momentum=0.9, **kwargs: keras.optimizers.SGD(momentum=momentum, nesterov=True, **kwargs)
)
optimizers.register("adagrad", keras.optimizers.Adagrad)
optimizers.register("rmsprop", keras.optimizers.RMSprop)
optimizers.register("adam", keras.optimizers.Adam)
optimizers.register("nadam", keras.optimizers.Nadam)
optimizers.register("adamw", keras.optimizers.AdamW)


def get(identifier: Any) -> keras.optimizers.Optimizer:
    """A fresh optimizer from a name, a ``{name: ..., **settings}`` mapping or an instance."""
    if isinstance(identifier, dict) and "decay" in identifier:
        # Keras 3 accepts ``decay`` with a warning and then ignores it.
        raise RecipeError(
            "optimizer setting 'decay' would be silently ignored by Keras 3 optimizers "
            "(it meant lr = lr0 / (1 + decay * step)); remove it"
        )
    try:
        return optimizers.get(identifier)
    except ValueError as error:  # Keras rejects unknown or bad arguments with ValueError
        raise RecipeError(f"optimizer {identifier!r}: {str(error).splitlines()[0]}") from None
