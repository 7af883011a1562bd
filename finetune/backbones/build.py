"""Building a backbone with its weights: random, ImageNet (offline first) or a file.

Errors say what they are: a constructor that rejects its options is a
recipe error, a download that fails or a file that does not load is a
weights error.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from finetune._keras_compat import keras_downloads
from finetune.backbones.spec import BackboneSpec
from finetune.backbones.weight_files import find_imagenet_weights
from finetune.errors import FinetuneError, RecipeError, WeightsError, first_line


def build_backbone(
    spec: BackboneSpec, image_size: tuple[int, int], weights: str | None, options: dict | None = None, channels: int = 3
):
    """Build ``spec`` for inputs of ``image_size``, with resolved weights.

    ``weights`` is ``"imagenet"``, ``None`` (random init) or a file path.
    ImageNet weights come from the weights folders or a package that ships
    them when present (no network, no hash check), else through Keras's own
    download and cache (``~/.keras/models``).
    """
    options = {**spec.default_options, **(options or {})}
    input_shape = (image_size[0], image_size[1], spec.channels or channels)
    if weights is None:
        return _construct(spec, input_shape, None, options)
    if weights == "imagenet":
        if spec.weights_file is None:
            raise RecipeError(
                f"model.backbone.weights: {spec.name} has no ImageNet weights; use null or a weights file"
            )
        local = find_imagenet_weights(spec, image_size, options)
        if local is not None:
            return _load_file(spec, input_shape, local, options)
        return _download_imagenet(spec, input_shape, options)
    return _load_file(spec, input_shape, Path(weights).expanduser(), options)


def _download_imagenet(spec: BackboneSpec, input_shape, options):
    """Let the constructor download its file; a failed download is a WeightsError, a refusal a RecipeError."""
    failures: list[Exception] = []

    def watched(fname, origin, file_hash, download):
        try:
            return download()
        except Exception as error:
            failures.append(error)
            raise

    try:
        with keras_downloads(watched):
            return spec.build(input_shape=input_shape, weights="imagenet", **options)
    except FinetuneError:
        raise
    except Exception as error:
        if failures:
            raise WeightsError(
                missing_imagenet_message(spec, input_shape[:2], options, first_line(failures[-1]))
            ) from None
        if isinstance(error, (TypeError, ValueError)):
            raise _refused(spec, error) from None
        raise


def missing_imagenet_message(spec: BackboneSpec, image_size, options, problem: str) -> str:
    """One line: where to put the ImageNet file, or how to do without it; ``problem`` says why the download failed."""
    file_name = spec.imagenet_file(tuple(image_size), options)
    where = os.environ.get("FINETUNE_WEIGHTS_DIR") or "unset"
    return (
        f"ImageNet weights for {spec.name!r} are not available offline: put {file_name} in "
        f"$FINETUNE_WEIGHTS_DIR (now {where}) or ~/.keras/models, or set model.backbone.weights: null "
        f"to start from random weights (download failed: {problem})"
    )


def _construct(spec, input_shape, weights, options):
    try:
        return spec.build(input_shape=input_shape, weights=weights, **options)
    except (TypeError, ValueError) as error:
        raise _refused(spec, error) from None


def _refused(spec: BackboneSpec, error: Exception) -> RecipeError:
    """The constructor's own complaint about its options, as a recipe error."""
    if isinstance(error, TypeError):
        return RecipeError(f"model.backbone.options for {spec.name!r}: {first_line(error)}")
    return RecipeError(f"backbone {spec.name!r}: {first_line(error)}")


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
    except Exception as error:  # noqa: BLE001 - h5py, Keras and the pickle reader raise many kinds
        raise WeightsError(f"cannot load weights {str(path)!r} into {spec.name!r}: {_mismatch(error)}") from None
    return model


def _mismatch(error: Exception) -> str:
    """Keras's page about variables that do not fit, as the first layer that does not match and its shapes."""
    text = str(error)
    layer = re.search(r"for object <\w+ name=([^,>]+)", text)
    shapes = re.search(r"variable\.shape=(\([^)]*\)), Received: value\.shape=(\([^)]*\))", text)
    count = re.search(r"A total of (\d+) objects could not be loaded", text)
    if layer and shapes:
        others = f" ({count.group(1)} layers do not match)" if count else ""
        return (
            f"the file does not fit this architecture: layer {layer.group(1)!r} has a weight of shape "
            f"{shapes.group(1)}, the file {shapes.group(2)}{others}"
        )
    return first_line(error)
