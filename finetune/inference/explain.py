"""Heatmaps that show where the model looked: Grad-CAM on the backbone's last spatial output.

The model is split at its nested backbone and the two halves are called layer by layer on the same tensors,
so nothing is rebuilt from the nested graph (the "graph disconnected" error of the usual recipe, which asks
a nested model's inner layer for a tensor of the outer graph). The split is checked: the halves together
must give the model's own probabilities.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from finetune.errors import ModelError

_EPSILON = 1e-7


@dataclass(frozen=True)
class Explanation:
    """``heatmaps``: (N, H, W) in [0, 1] at the stored image size; ``classes``: the class each one explains."""

    heatmaps: np.ndarray
    classes: np.ndarray
    probabilities: np.ndarray


def explain(model, images: np.ndarray, classes: np.ndarray | None = None) -> Explanation:
    """Grad-CAM heatmaps of uint8 ``images`` (N, H, W, C) for ``classes`` (default: each image's top class).

    ``model`` is a finetune model (input, backbone as a nested model, head). Works on the TensorFlow and
    JAX backends; a backbone without a spatial output (the ``mlp``) has nothing to show: ModelError.
    """
    import keras

    images = np.asarray(images)
    features_of, head_of = split_at_backbone(model)
    features = features_of(images)
    if len(features.shape) != 4:
        raise ModelError("the backbone's output is not spatial (no height and width): there is no heatmap to draw")
    probabilities = np.asarray(keras.ops.convert_to_numpy(head_of(features)), np.float32)
    reference = np.asarray(keras.ops.convert_to_numpy(model(images, training=False)), np.float32)
    if not np.allclose(probabilities, reference, atol=1e-4):
        raise ModelError("this model cannot be split at its backbone for a heatmap (its layers are not a chain)")
    if classes is None:
        classes = probabilities.argmax(axis=-1)
    classes = np.asarray(classes, np.int64)
    gradients = np.asarray(_gradients(head_of, features, classes), np.float32)
    maps = np.asarray(keras.ops.convert_to_numpy(features), np.float32)
    weights = gradients.mean(axis=(1, 2), keepdims=True)  # each channel's importance for the class
    cams = np.maximum((weights * maps).sum(axis=-1), 0.0)
    heatmaps = np.stack([_upsample(cam, images.shape[1:3]) for cam in cams])
    return Explanation(heatmaps, classes, probabilities)


def split_at_backbone(model) -> tuple[Callable, Callable]:
    """(images -> backbone output, backbone output -> probabilities), each calling the model's own layers."""
    import keras

    from finetune.backbones.blocks import get_backbone

    try:
        backbone = get_backbone(model)
    except ValueError as error:
        raise ModelError(f"no heatmap: {error}") from None
    layers = [layer for layer in model.layers if not isinstance(layer, keras.layers.InputLayer)]
    cut = layers.index(backbone) + 1

    def through(chain: list) -> Callable:
        def call(x):
            for layer in chain:
                x = layer(x, training=False)
            return x

        return call

    return through(layers[:cut]), through(layers[cut:])


def _gradients(head_of: Callable, features, classes: np.ndarray):
    """d log p(class) / d features, through the head only (the backbone's output is the variable)."""
    import keras

    backend = keras.backend.backend()
    rows = np.arange(len(classes))
    if backend == "tensorflow":
        import tensorflow as tf

        features = tf.convert_to_tensor(features)
        with tf.GradientTape() as tape:
            tape.watch(features)
            chosen = tf.gather_nd(head_of(features), np.stack([rows, classes], axis=1))
            score = tf.reduce_sum(tf.math.log(tf.cast(chosen, "float32") + _EPSILON))
        return tape.gradient(score, features).numpy()
    if backend == "jax":
        import jax
        import jax.numpy as jnp

        def score(values):
            chosen = head_of(values)[rows, classes]
            return jnp.sum(jnp.log(chosen.astype("float32") + _EPSILON))

        return np.asarray(jax.grad(score)(jnp.asarray(features)))
    raise ModelError(f"heatmaps need the tensorflow or jax backend, not {backend}")


def _upsample(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (h, w) map scaled to [0, 1] and resized (bilinear) to the stored image's (H, W)."""
    from PIL import Image

    peak = float(cam.max())
    scaled = cam / peak if peak > 0 else np.zeros_like(cam)
    height, width = size
    return np.asarray(
        Image.fromarray(scaled.astype(np.float32), "F").resize((width, height), Image.Resampling.BILINEAR)
    )


def overlay(image: np.ndarray, heatmap: np.ndarray, scale: int = 1, alpha: float = 0.45) -> np.ndarray:
    """The uint8 image (H, W, C) with its heatmap over it in matplotlib's ``jet``, ``scale`` times larger."""
    from matplotlib import colormaps
    from PIL import Image

    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image[..., :3]
    colours = (colormaps["jet"](np.clip(heatmap, 0, 1))[..., :3] * 255).astype(np.float32)
    blended = ((1 - alpha) * rgb.astype(np.float32) + alpha * colours).round().clip(0, 255).astype(np.uint8)
    if scale > 1:
        height, width = blended.shape[:2]
        blended = np.asarray(Image.fromarray(blended).resize((width * scale, height * scale), Image.Resampling.NEAREST))
    return blended


def no_heatmap_reason(predictor) -> str | None:
    """Why :func:`explain_predictor` cannot draw heatmaps for ``predictor``, or None when it can."""
    if predictor.keras_model is None:
        return f"{predictor.path} is a {predictor.kind}: heatmaps need the run folder (its model.keras)"
    return model_without_heatmaps(predictor.keras_model)


def model_without_heatmaps(model) -> str | None:
    """Why :func:`explain` cannot draw heatmaps for ``model``, or None when it can."""
    from finetune.backbones.blocks import get_backbone

    try:
        rank = len(get_backbone(model).output.shape)
    except (ValueError, AttributeError) as error:
        return f"no heatmap: {error}"
    return None if rank == 4 else "the backbone's output is not spatial (no height and width): no heatmap to draw"


def overlays_for(model) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
    """``(images, classes) -> RGB pictures`` with each class's heatmap over its image, for the report's
    mistakes; None for a model without heatmaps."""
    if model_without_heatmaps(model) is not None:
        return None

    def draw(images: np.ndarray, classes: np.ndarray) -> np.ndarray:
        heatmaps = explain(model, images, classes).heatmaps
        return np.stack([overlay(image, heatmap) for image, heatmap in zip(images, heatmaps, strict=True)])

    return draw


def explain_predictor(predictor, images: np.ndarray, classes: np.ndarray | None = None) -> Explanation:
    """:func:`explain` for a loaded :class:`~finetune.inference.Predictor` (a Keras model, not a SavedModel)."""
    reason = no_heatmap_reason(predictor)
    if reason is not None:
        raise ModelError(reason)
    return explain(predictor.keras_model, images, classes)


def viewing_scale(shape: tuple[int, ...], at_least: int = 224) -> int:
    """How many times larger a stored image is drawn so that its shorter side has ``at_least`` pixels."""
    return max(1, -(-at_least // min(shape[:2])))


def write_heatmaps(predictor, paths, out_dir, invert: str = "auto", chunk: int = 64) -> list:
    """Each readable image file with its heatmap over it, as ``OUT_DIR/<name>.heatmap.png`` (a number added
    when two files share a name); returns the files written. Unreadable files are skipped (predict reports them).
    """
    from pathlib import Path

    from PIL import Image

    from finetune.data.images import IMAGE_EXTENSIONS
    from finetune.errors import DataError
    from finetune.files import write_atomically
    from finetune.inference.images import image_files, load_stored

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    readable = [path for path, problem in image_files(paths) if problem is None]
    written: list[Path] = []
    taken: set[str] = set()
    scale = viewing_scale(predictor.spec.shape)
    for start in range(0, len(readable), chunk):
        pictures, names = [], []
        for path in readable[start : start + chunk]:
            try:
                pictures.append(load_stored(path, predictor.spec, invert)[0])
            except DataError:
                continue
            stem = path.stem if path.suffix.lower() in IMAGE_EXTENSIONS else path.name
            name, number = f"{stem}.heatmap.png", 1
            while name in taken:
                number += 1
                name = f"{stem}-{number}.heatmap.png"
            taken.add(name)
            names.append(name)
        if not pictures:
            continue
        explanation = explain_predictor(predictor, np.stack(pictures))
        for picture, heatmap, name in zip(pictures, explanation.heatmaps, names, strict=True):
            drawn = Image.fromarray(overlay(picture, heatmap, scale))

            def save(temporary: Path, drawn: Image.Image = drawn) -> None:
                drawn.save(temporary, format="PNG")

            written.append(write_atomically(out_dir / name, save))
    return written
