"""Every ``keras.applications`` image model as a backbone spec: preprocessing, minimum size, blocks, file."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from finetune.backbones.spec import BackboneSpec
from finetune.errors import RecipeError


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


def _imagenet_alpha(name: str, options: dict, allowed: Sequence[float]) -> float:
    # Keras has ImageNet files for these widths only; a file name for another would not exist.
    value = options.get("alpha", 1.0)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RecipeError(f"model.backbone.options.alpha: expected a number, got {value!r}")
    alpha = float(value)
    if alpha not in allowed:
        raise RecipeError(
            f"model.backbone.options.alpha: {name} has ImageNet weights for alpha "
            f"{', '.join(f'{value:g}' for value in allowed)} only, got {alpha:g} (or set weights: null)"
        )
    return alpha


def _mobilenet_file(image_size, options) -> str:
    alpha = _imagenet_alpha("mobilenet", options, (0.25, 0.5, 0.75, 1.0))
    alpha_text = {1.0: "1_0", 0.75: "7_5", 0.5: "5_0", 0.25: "2_5"}[alpha]
    rows = _square_rows(image_size, (128, 160, 192, 224))
    return f"mobilenet_{alpha_text}_{rows}_tf_no_top.h5"


def _mobilenet_v2_file(image_size, options) -> str:
    alpha = _imagenet_alpha("mobilenet_v2", options, (0.35, 0.5, 0.75, 1.0, 1.3, 1.4))
    rows = _square_rows(image_size, (96, 128, 160, 192, 224))
    return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{alpha}_{rows}_no_top.h5"


def _mobilenet_v3_file(model_type: str):
    def file_name(image_size, options) -> str:
        minimalistic = "_minimalistic" if options.get("minimalistic") else ""
        alpha = _imagenet_alpha(f"mobilenet_v3_{model_type}", options, (0.75, 1.0))
        return f"weights_mobilenet_v3_{model_type}{minimalistic}_224_{alpha}_float_no_top_v2.h5"

    return file_name


_RESNET_BLOCKS = r"^(conv\d+_block\d+)_"
_EFFICIENTNET_BLOCKS = r"^(block\d+[a-z])_"
_NASNET_BLOCKS = r"^((?:normal|reduction)_concat_\w+)$"
_MOBILENET_V3_BLOCKS = r"^(expanded_conv(?:_\d+)?)_"


def _spec(name, constructor, preprocessing, min_size, block_pattern, has_stem, weights_file) -> BackboneSpec:
    return BackboneSpec(
        name=name,
        build=_application(constructor),
        preprocessing=preprocessing,
        min_size=min_size,
        block_pattern=block_pattern,
        has_stem=has_stem,
        weights_file=weights_file,
        notes=f"keras.applications.{constructor}",
    )


def _tf_kernels(stem: str) -> Callable[[tuple[int, int], dict], str]:
    return _fixed(f"{stem}_weights_tf_dim_ordering_tf_kernels_notop.h5")


def specs() -> dict[str, BackboneSpec]:
    """A spec for every ``keras.applications`` image model, by name."""
    # fmt: off
    # name, constructor, preprocessing, min size, block pattern, has stem, weights file
    table = [
        _spec("xception", "Xception", "tf", 71, r"^(block\d+)_", True, _tf_kernels("xception")),
        _spec("vgg16", "VGG16", "caffe", 32, r"^(block\d+)_", True, _tf_kernels("vgg16")),
        _spec("vgg19", "VGG19", "caffe", 32, r"^(block\d+)_", True, _tf_kernels("vgg19")),
        _spec("inception_v3", "InceptionV3", "tf", 75, r"^(mixed\d+)$", False, _tf_kernels("inception_v3")),
        _spec("inception_resnet_v2", "InceptionResNetV2", "tf", 75, r"^(block\d+_\d+|mixed_\d[a-z])(?:_|$)", False,
              _tf_kernels("inception_resnet_v2")),
        _spec("mobilenet", "MobileNet", "tf", 32, r"^conv_(?:dw|pw|pad)_(\d+)", True, _mobilenet_file),
        _spec("mobilenet_v2", "MobileNetV2", "tf", 32, r"^(expanded_conv|block_\d+)_", True, _mobilenet_v2_file),
        _spec("mobilenet_v3_small", "MobileNetV3Small", "none", 32, _MOBILENET_V3_BLOCKS, True,
              _mobilenet_v3_file("small")),
        _spec("mobilenet_v3_large", "MobileNetV3Large", "none", 32, _MOBILENET_V3_BLOCKS, True,
              _mobilenet_v3_file("large")),
        _spec("nasnet_mobile", "NASNetMobile", "tf", 32, _NASNET_BLOCKS, False, _fixed("nasnet_mobile_no_top.h5")),
        _spec("nasnet_large", "NASNetLarge", "tf", 32, _NASNET_BLOCKS, False, _fixed("nasnet_large_no_top.h5")),
    ]
    for depth in (50, 101, 152):
        table.append(_spec(f"resnet{depth}", f"ResNet{depth}", "caffe", 32, _RESNET_BLOCKS, True,
                           _tf_kernels(f"resnet{depth}")))
        table.append(_spec(f"resnet{depth}_v2", f"ResNet{depth}V2", "tf", 32, _RESNET_BLOCKS, True,
                           _tf_kernels(f"resnet{depth}v2")))
    for depth in (121, 169, 201):
        table.append(_spec(f"densenet{depth}", f"DenseNet{depth}", "torch", 32, _RESNET_BLOCKS, True,
                           _tf_kernels(f"densenet{depth}")))
    for number in range(8):
        table.append(_spec(f"efficientnet_b{number}", f"EfficientNetB{number}", "none", 32, _EFFICIENTNET_BLOCKS,
                           True, _fixed(f"efficientnetb{number}_notop.h5")))
    for variant in ("b0", "b1", "b2", "b3", "s", "m", "l"):
        table.append(_spec(f"efficientnet_v2_{variant}", f"EfficientNetV2{variant.upper()}", "none", 32,
                           _EFFICIENTNET_BLOCKS, True, _fixed(f"efficientnetv2-{variant}_notop.h5")))
    for size in ("tiny", "small", "base", "large", "xlarge"):
        table.append(_spec(f"convnext_{size}", f"ConvNeXt{size.capitalize().replace('Xl', 'XL')}", "none", 32,
                           r"_(stage_\d+_block_\d+)_", True, _fixed(f"convnext_{size}_notop.h5")))
    # fmt: on
    return {spec.name: spec for spec in table}
