"""Backbone registry: every ``keras.applications`` image model, plus room for more.

Each entry records what the pipeline must know about a backbone without
building it: how its inputs are preprocessed, the smallest input it accepts,
how its layers group into blocks (for ``trainable: {top_blocks: N}``), and
the canonical Keras file name of its ImageNet weights (for offline use).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from finetune.errors import RecipeError, WeightsError
from finetune.registry import Registry

#: ``preprocessing`` values: "tf", "caffe" and "torch" as in
#: ``keras.applications.imagenet_utils``; "none" when the backbone rescales its
#: inputs itself; "unit" scales to [0, 1]; "standardize" to zero mean and unit
#: variance with statistics taken from the training images.
PREPROCESSING_MODES = ("tf", "caffe", "torch", "none", "unit", "standardize")


@dataclass(frozen=True)
class BackboneSpec:
    """What the pipeline needs to know about one backbone."""

    name: str
    build: Callable[..., Any]
    """``build(input_shape, weights, **options) -> keras.Model`` without top."""
    preprocessing: str
    min_size: int
    block_pattern: str
    """Regex whose first group names the block a layer belongs to."""
    has_stem: bool = True
    """Unmatched layers before the first block form a stem (else they join it)."""
    weights_file: Callable[[tuple[int, int], dict], str] | None = None
    """Canonical file name of the ImageNet weights without top."""
    notes: str = ""
    default_options: dict = field(default_factory=dict)
    channels: int | None = 3
    """Input channels the backbone takes: 3 (RGB), or None to keep the dataset's."""
    inference_mode: bool = True
    """Call it with ``training=False`` (pretrained BN); False for from-scratch stacks."""
    preprocessing_option: str | None = None
    """An option that overrides ``preprocessing`` (the mlp's ``input_scaling``)."""
    load_weights: Callable[[Any, Path], None] | None = None
    """``load_weights(model, path)`` for a weights file; None uses ``model.load_weights``."""
    locate_weights: Callable[[], Path] | None = None
    """ImageNet weights found outside the searched folders (an installed package); raises WeightsError."""

    def preprocessing_for(self, options: dict | None = None) -> str:
        if self.preprocessing_option and options and self.preprocessing_option in options:
            return options[self.preprocessing_option]
        return self.preprocessing

    def imagenet_file(self, image_size: tuple[int, int], options: dict | None = None) -> str | None:
        if self.weights_file is None:
            return None
        return self.weights_file(image_size, {**self.default_options, **(options or {})})


backbones: Registry[BackboneSpec] = Registry("backbones", instance_type=BackboneSpec)


def get(identifier: str | BackboneSpec) -> BackboneSpec:
    """The spec registered under a name (or the spec itself)."""
    if isinstance(identifier, BackboneSpec):
        return identifier
    return backbones.lookup(identifier)


def spec_for(config) -> BackboneSpec:
    """The spec a recipe's ``model.backbone`` section describes (``run`` reads its run folder)."""
    if config.name == "run":
        from finetune.reuse import run_spec

        if not config.path:
            raise RecipeError("model.backbone.path: required for name: run (a finished run folder)")
        return run_spec(config.path)
    return get(config.name)


@dataclass(frozen=True)
class Block:
    name: str
    layers: tuple


def split_into_blocks(backbone, spec: BackboneSpec) -> tuple[tuple, list[Block]]:
    """Group a built backbone's layers into (stem layers, ordered blocks).

    A layer whose name matches ``spec.block_pattern`` belongs to the block its
    first group names. Unnamed layers (``conv2d_3``, ``add``) are placed by the
    graph: with ``lo`` the latest block among their nearest named ancestors and
    ``hi`` the earliest among their nearest named descendants, a layer inside a
    block (lo == hi) stays there, one feeding the next block (hi == lo + 1, as
    Inception's branches feeding ``mixedN``) joins it, and one that skips a
    block (a residual shortcut such as Xception's, hi == lo + 2) belongs to the
    block it runs beside. Layers before any block form the stem (or join the
    first block when ``spec.has_stem`` is false); layers after the last join it.
    """
    pattern = re.compile(spec.block_pattern)
    layers = [layer for layer in backbone.layers if type(layer).__name__ != "InputLayer"]
    order: dict[str, int] = {}
    named: dict[int, int] = {}
    for layer in layers:
        match = pattern.search(layer.name)
        if match is not None:
            named[id(layer)] = order.setdefault(match.group(1), len(order))
    if not order:
        raise RecipeError(f"backbone {spec.name!r}: no layer matches its block pattern {spec.block_pattern!r}")

    # The graph holds plain operations too (``x + 3.0`` in MobileNetV3): walk through them.
    operations = list(getattr(backbone, "operations", layers))
    parents = {id(op): _parent_operations(op) for op in operations}
    children: dict[int, list] = {id(op): [] for op in operations}
    for op in operations:
        for parent in parents[id(op)]:
            children.setdefault(id(parent), []).append(op)

    def nearest_named(start, neighbours, pick):
        found, stack, seen = [], list(neighbours(start)), set()
        while stack:
            layer = stack.pop()
            if id(layer) in seen:
                continue
            seen.add(id(layer))
            if id(layer) in named:
                found.append(named[id(layer)])
            else:
                stack.extend(neighbours(layer))
        return pick(found) if found else None

    names = list(order)
    stem, members = [], {name: [] for name in names}
    for layer in layers:
        if id(layer) in named:
            members[names[named[id(layer)]]].append(layer)
            continue
        lo = nearest_named(layer, lambda item: parents.get(id(item), []), max)
        hi = nearest_named(layer, lambda item: children.get(id(item), []), min)
        if lo is None and spec.has_stem:
            stem.append(layer)
            continue
        if lo is None:
            index = hi
        elif hi is None or hi <= lo:
            index = lo
        elif hi == lo + 1:
            index = hi
        else:
            index = lo + 1
        members[names[index]].append(layer)
    return tuple(stem), [Block(name, tuple(members[name])) for name in names]


def _parent_operations(operation) -> list:
    """Operations whose outputs feed ``operation`` (in the graph it was built in)."""
    parents = []
    for node in getattr(operation, "_inbound_nodes", []):
        for tensor in node.input_tensors:
            history = getattr(tensor, "_keras_history", None)
            if history is not None:
                parents.append(history.operation)
    return parents


def calibrate_batch_norm(backbone, images, batch_size: int = 32) -> None:
    """Give each BatchNorm layer the statistics of its inputs on ``images``.

    A backbone that starts from random weights and keeps BatchNorm in
    inference mode has moving statistics (0, 1) that match nothing: its
    features vanish (about 1e-5 for Xception) and no head can learn from
    them. Layer by layer, this sets each BN layer's moving mean and variance
    to the statistics of its inputs, as a pretrained backbone would have
    them. ``images`` must already be the backbone's input (preprocessed).
    """
    import keras
    import numpy as np

    images = keras.ops.convert_to_numpy(images)
    for layer in backbone.layers:
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        probe = keras.Model(backbone.input, layer.input)
        total, total_sq, count = 0.0, 0.0, 0
        for start in range(0, len(images), batch_size):
            values = np.asarray(keras.ops.convert_to_numpy(probe(images[start:start + batch_size])), np.float64)
            values = values.reshape(-1, values.shape[-1])
            total, total_sq, count = total + values.sum(0), total_sq + (values ** 2).sum(0), count + len(values)
        mean = total / count
        layer.moving_mean.assign(mean.astype("float32"))
        layer.moving_variance.assign(np.maximum(total_sq / count - mean ** 2, 0.0).astype("float32"))


# --- building and weights -------------------------------------------------


def build_backbone(spec: BackboneSpec, image_size: tuple[int, int], weights: str | None, options: dict | None = None,
                   channels: int = 3):
    """Build ``spec`` for RGB inputs of ``image_size``, with resolved weights.

    ``weights`` is ``"imagenet"``, ``None`` (random init) or a file path.
    ImageNet weights come from ``$FINETUNE_WEIGHTS_DIR/<canonical name>``
    when present there (no network, no hash check), else through Keras's own
    download and cache (``~/.keras/models``).
    """
    options = {**spec.default_options, **(options or {})}
    input_shape = (image_size[0], image_size[1], spec.channels or channels)
    if weights is None:
        return _construct(spec, input_shape, None, options)
    if weights == "imagenet":
        local = find_imagenet_weights(spec, image_size, options)
        if local is not None:
            return _load_file(spec, input_shape, local, options)
        try:
            return _construct(spec, input_shape, "imagenet", options)
        except WeightsError:
            raise
        except Exception as error:  # Keras raises plain Exceptions for fetch failures
            raise WeightsError(_missing_imagenet_message(spec, image_size, options, error)) from None
    return _load_file(spec, input_shape, Path(weights).expanduser(), options)


def weights_search_dirs() -> list[Path]:
    """Folders searched for canonical ImageNet weight files, in order.

    ``$FINETUNE_WEIGHTS_DIR`` first (a folder copied to an offline machine),
    then Keras's own cache (``$KERAS_HOME/models``, by default
    ``~/.keras/models``). A file found here is loaded directly: Keras would
    re-download a cached file whose hash it cannot check.
    """
    dirs = []
    if os.environ.get("FINETUNE_WEIGHTS_DIR"):
        dirs.append(Path(os.environ["FINETUNE_WEIGHTS_DIR"]).expanduser())
    dirs.append(keras_cache_dir())
    return dirs


def keras_cache_dir() -> Path:
    """Where ``keras.applications`` downloads ImageNet weights."""
    home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    return Path(home).expanduser() / "models"


def find_imagenet_weights(spec: BackboneSpec, image_size, options=None) -> Path | None:
    """The ImageNet file to load without a download: in the searched folders, else from a package.

    None when neither has it (then the backbone's own constructor downloads
    the file, or says what to install).
    """
    found = find_local_imagenet_weights(spec, image_size, options)
    if found is None and spec.locate_weights is not None:
        try:
            found = spec.locate_weights()
        except WeightsError:
            return None
    return found


def find_local_imagenet_weights(spec: BackboneSpec, image_size, options=None) -> Path | None:
    file_name = spec.imagenet_file(tuple(image_size), options)
    if file_name is None:
        return None
    for folder in weights_search_dirs():
        candidate = folder / file_name
        if candidate.is_file():
            return candidate
    return None


def _missing_imagenet_message(spec, image_size, options, error) -> str:
    file_name = spec.imagenet_file(tuple(image_size), options)
    where = os.environ.get("FINETUNE_WEIGHTS_DIR") or "unset"
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    if file_name is None:
        return f"backbone {spec.name!r} has no ImageNet weights ({reason})"
    return (
        f"ImageNet weights for {spec.name!r} are not available offline: put {file_name} in "
        f"$FINETUNE_WEIGHTS_DIR (now {where}) or ~/.keras/models, or set model.backbone.weights: null "
        f"to start from random weights (download failed: {reason})"
    )


def _construct(spec, input_shape, weights, options):
    try:
        return spec.build(input_shape=input_shape, weights=weights, **options)
    except TypeError as error:
        raise RecipeError(f"model.backbone.options for {spec.name!r}: {error}") from None
    except ValueError as error:
        if weights is None:
            raise RecipeError(f"backbone {spec.name!r}: {str(error).splitlines()[0]}") from None
        raise


def _load_file(spec, input_shape, path: Path, options):
    if not path.is_file():
        raise WeightsError(f"model.backbone.weights: file {str(path)!r} does not exist")
    model = _construct(spec, input_shape, None, options)
    try:
        if spec.load_weights is not None:
            spec.load_weights(model, path)
        else:
            model.load_weights(str(path))
    except WeightsError:
        raise
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise WeightsError(f"cannot load weights {str(path)!r} into {spec.name!r}: {first_line}") from None
    return model


# --- keras.applications ---------------------------------------------------


def _application(constructor: str) -> Callable[..., Any]:
    def build(input_shape, weights, **options):
        import keras

        return getattr(keras.applications, constructor)(
            include_top=False, weights=weights, input_shape=input_shape, **options
        )

    build.__name__ = f"build_{constructor}"
    return build


def _fixed(file_name: str) -> Callable[[tuple[int, int], dict], str]:
    return lambda image_size, options: file_name


def _square_rows(image_size, allowed: Sequence[int]) -> int:
    # Keras falls back to the 224 weights when the input is not one of the sizes it has.
    rows, cols = image_size
    return rows if rows == cols and rows in allowed else 224


def _mobilenet_file(image_size, options) -> str:
    alpha = float(options.get("alpha", 1.0))
    alpha_text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0"}.get(alpha, "2_5")
    rows = _square_rows(image_size, (128, 160, 192, 224))
    return f"mobilenet_{alpha_text}_{rows}_tf_no_top.h5"


def _mobilenet_v2_file(image_size, options) -> str:
    alpha = float(options.get("alpha", 1.0))
    rows = _square_rows(image_size, (96, 128, 160, 192, 224))
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}_no_top.h5"


def _mobilenet_v3_file(model_type: str):
    def file_name(image_size, options) -> str:
        minimalistic = "_minimalistic" if options.get("minimalistic") else ""
        alpha = float(options.get("alpha", 1.0))
        return f"weights_mobilenet_v3_{model_type}{minimalistic}_224_{alpha}_float_no_top_v2.h5"

    return file_name


_RESNET_BLOCKS = r"^(conv\d+_block\d+)_"
_EFFICIENTNET_BLOCKS = r"^(block\d+[a-z])_"


def _register_applications() -> None:
    table = [
        # name, constructor, preprocessing, min size, block pattern, has stem, weights file
        ("xception", "Xception", "tf", 71, r"^(block\d+)_", True,
         _fixed("xception_weights_tf_dim_ordering_tf_kernels_notop.h5")),
        ("vgg16", "VGG16", "caffe", 32, r"^(block\d+)_", True,
         _fixed("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5")),
        ("vgg19", "VGG19", "caffe", 32, r"^(block\d+)_", True,
         _fixed("vgg19_weights_tf_dim_ordering_tf_kernels_notop.h5")),
        ("inception_v3", "InceptionV3", "tf", 75, r"^(mixed\d+)$", False,
         _fixed("inception_v3_weights_tf_dim_ordering_tf_kernels_notop.h5")),
        ("inception_resnet_v2", "InceptionResNetV2", "tf", 75, r"^(block\d+_\d+|mixed_\d[a-z])(?:_|$)", False,
         _fixed("inception_resnet_v2_weights_tf_dim_ordering_tf_kernels_notop.h5")),
        ("mobilenet", "MobileNet", "tf", 32, r"^conv_(?:dw|pw|pad)_(\d+)", True, _mobilenet_file),
        ("mobilenet_v2", "MobileNetV2", "tf", 32, r"^(expanded_conv|block_\d+)_", True, _mobilenet_v2_file),
        ("mobilenet_v3_small", "MobileNetV3Small", "none", 32, r"^(expanded_conv(?:_\d+)?)_", True,
         _mobilenet_v3_file("small")),
        ("mobilenet_v3_large", "MobileNetV3Large", "none", 32, r"^(expanded_conv(?:_\d+)?)_", True,
         _mobilenet_v3_file("large")),
        ("nasnet_mobile", "NASNetMobile", "tf", 32, r"^((?:normal|reduction)_concat_\w+)$", False,
         _fixed("nasnet_mobile_no_top.h5")),
        ("nasnet_large", "NASNetLarge", "tf", 32, r"^((?:normal|reduction)_concat_\w+)$", False,
         _fixed("nasnet_large_no_top.h5")),
    ]
    for depth in (50, 101, 152):
        table.append((f"resnet{depth}", f"ResNet{depth}", "caffe", 32, _RESNET_BLOCKS, True,
                      _fixed(f"resnet{depth}_weights_tf_dim_ordering_tf_kernels_notop.h5")))
        table.append((f"resnet{depth}_v2", f"ResNet{depth}V2", "tf", 32, _RESNET_BLOCKS, True,
                      _fixed(f"resnet{depth}v2_weights_tf_dim_ordering_tf_kernels_notop.h5")))
    for depth in (121, 169, 201):
        table.append((f"densenet{depth}", f"DenseNet{depth}", "torch", 32, _RESNET_BLOCKS, True,
                      _fixed(f"densenet{depth}_weights_tf_dim_ordering_tf_kernels_notop.h5")))
    for variant in range(8):
        table.append((f"efficientnet_b{variant}", f"EfficientNetB{variant}", "none", 32, _EFFICIENTNET_BLOCKS, True,
                      _fixed(f"efficientnetb{variant}_notop.h5")))
    for variant in ("b0", "b1", "b2", "b3", "s", "m", "l"):
        table.append((f"efficientnet_v2_{variant}", f"EfficientNetV2{variant.upper()}", "none", 32,
                      _EFFICIENTNET_BLOCKS, True, _fixed(f"efficientnetv2-{variant}_notop.h5")))
    for size in ("tiny", "small", "base", "large", "xlarge"):
        table.append((f"convnext_{size}", f"ConvNeXt{size.capitalize().replace('Xl', 'XL')}", "none", 32,
                      r"_(stage_\d+_block_\d+)_", True, _fixed(f"convnext_{size}_notop.h5")))
    for name, constructor, preprocessing, min_size, pattern, has_stem, weights_file in table:
        backbones.register(name, BackboneSpec(
            name=name, build=_application(constructor), preprocessing=preprocessing, min_size=min_size,
            block_pattern=pattern, has_stem=has_stem, weights_file=weights_file,
            notes=f"keras.applications.{constructor}",
        ))


_register_applications()


# --- mlp: the chapter's from-scratch dense networks ------------------------


def _build_mlp(input_shape, weights, **options):
    import keras

    from finetune.dense import dense_stack
    from finetune.recipe import MLPOptions, pydantic_error_line

    try:
        config = MLPOptions(**options)
    except Exception as error:  # pydantic.ValidationError
        raise RecipeError(f"model.backbone.options: {pydantic_error_line(error)}") from None
    inputs = keras.Input(shape=input_shape, name="mlp_input")
    x = keras.layers.Flatten(name="flatten")(inputs)
    if config.input_batch_norm:
        x = keras.layers.BatchNormalization(name="input_bn")(x)
    x = dense_stack(x, config, prefix="block")
    return keras.Model(inputs, x, name="mlp")


def _run_placeholder(input_shape, weights, **options):
    raise RecipeError("model.backbone: name run needs path: RUN_DIR")


backbones.register("run", BackboneSpec(
    name="run", build=_run_placeholder, preprocessing="none", min_size=1, block_pattern=r"^$",
    notes="a finished run's trained backbone, without its head: {name: run, path: RUN_DIR}",
))

backbones.register("mlp", BackboneSpec(
    name="mlp", build=_build_mlp, preprocessing="unit", min_size=1, block_pattern=r"^(block\d+)_",
    channels=None, inference_mode=False, preprocessing_option="input_scaling",
    notes="Flatten + Dense stack trained from scratch (options: dense, activation, kernel_initializer, "
          "batch_norm, dropout, regularizers, input_batch_norm, input_scaling)",
))


import finetune.efficientnet_lite  # noqa: E402,F401  (registers efficientnet_lite0)
