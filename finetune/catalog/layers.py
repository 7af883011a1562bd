"""Dense stacks for the head and the ``mlp`` backbone: initializers,
activations, batch norm before or after the activation, regularizers.

Registries for initializers and activations live here. Activations are
built as layers, so parametrised ones (``leaky_relu`` with its slope) and
batch norm placement work the same way.
"""

from __future__ import annotations

import keras

from finetune.catalog import regularizers
from finetune.errors import RecipeError
from finetune.registry import Registry

initializers: Registry = Registry(
    "initializers",
    instance_type=keras.initializers.Initializer,
    builtins={
        "glorot_uniform": keras.initializers.GlorotUniform,
        "glorot_normal": keras.initializers.GlorotNormal,
        "he_normal": keras.initializers.HeNormal,
        "he_uniform": keras.initializers.HeUniform,
        "lecun_normal": keras.initializers.LecunNormal,
        "lecun_uniform": keras.initializers.LecunUniform,
        "orthogonal": keras.initializers.Orthogonal,
        "random_normal": keras.initializers.RandomNormal,
        "random_uniform": keras.initializers.RandomUniform,
        "truncated_normal": keras.initializers.TruncatedNormal,
        "variance_scaling": keras.initializers.VarianceScaling,
        "zeros": keras.initializers.Zeros,
        "ones": keras.initializers.Ones,
        "constant": keras.initializers.Constant,
        "identity": keras.initializers.Identity,
    },
)


def _activation(name: str):
    return lambda layer_name=None: keras.layers.Activation(name, name=layer_name)


activations: Registry = Registry(
    "activations",
    instance_type=keras.layers.Layer,
    builtins={
        **{
            name: _activation(name)
            for name in ("relu", "elu", "selu", "gelu", "swish", "tanh", "sigmoid", "softplus", "relu6", "linear")
        },
        "leaky_relu": lambda negative_slope=0.2, layer_name=None: keras.layers.LeakyReLU(
            negative_slope=negative_slope, name=layer_name
        ),
        "prelu": lambda layer_name=None: keras.layers.PReLU(name=layer_name),
    },
)


def activation_name(identifier) -> str:
    return activations.split(identifier)[0]


def new_activation(identifier, layer_name: str):
    return activations.get(identifier, layer_name=layer_name)


def new_initializer(identifier):
    return initializers.get(identifier)


def check_stack(config, where: str) -> None:
    """Build each named piece once so a bad name or argument fails at validation."""
    try:
        new_initializer(config.kernel_initializer)
        new_activation(config.activation, "probe")
        regularizers.resolve(config.dropout, config.regularizers)
    except RecipeError as error:
        raise RecipeError(f"{where}: {error}") from None


def dense_stack(x, config, prefix: str):
    """Apply ``config.dense`` hidden layers to ``x``; return the output.

    Per layer: [dropout] -> Dense -> activation, with batch norm before the
    activation (the Dense then has no bias: BN's beta replaces it) or after.
    Layers are named ``{prefix}{i}_{dense,bn,act,dropout}``.
    """
    regularization = regularizers.resolve(config.dropout, config.regularizers)
    for index, units in enumerate(config.dense, start=1):
        x = _dropout(x, regularization, f"{prefix}{index}_dropout")
        x = _dense(units, config, regularization, f"{prefix}{index}_dense", use_bias=config.batch_norm != "before")(x)
        if config.batch_norm == "before":
            x = keras.layers.BatchNormalization(name=f"{prefix}{index}_bn")(x)
        x = new_activation(config.activation, f"{prefix}{index}_act")(x)
        if config.batch_norm == "after":
            x = keras.layers.BatchNormalization(name=f"{prefix}{index}_bn")(x)
    return x


def output_layer(x, config, num_classes: int, name: str = "predictions", multi_label: bool = False):
    """[dropout] -> Dense softmax in float32 (mixed-precision safe), regularized like the stack.

    ``multi_label``: a sigmoid instead, one independent probability per tag."""
    regularization = regularizers.resolve(config.dropout, config.regularizers)
    x = _dropout(x, regularization, f"{name}_dropout")
    activation = "sigmoid" if multi_label else "softmax"
    return _dense(num_classes, config, regularization, name, activation=activation, dtype="float32")(x)


def is_multi_label(model, name: str = "predictions") -> bool:
    """Whether ``model``'s output layer (or a cached top holding it) gives one sigmoid probability per tag."""
    for layer in model.layers:
        if layer.name == name:
            return getattr(getattr(layer, "activation", None), "__name__", "") == "sigmoid"
        if isinstance(layer, keras.Model) and is_multi_label(layer, name):
            return True
    return False


def _dense(units: int, config, regularization, name: str, **settings):
    # Regularizers and constraints are attached here, at construction: Keras ignores ones set later.
    return keras.layers.Dense(
        units,
        kernel_initializer=new_initializer(config.kernel_initializer),
        kernel_regularizer=regularization.new_kernel_regularizer(),
        kernel_constraint=regularization.new_kernel_constraint(),
        name=name,
        **settings,
    )


def _dropout(x, regularization, name):
    layer = regularization.new_dropout(name)
    return layer(x) if layer is not None else x
