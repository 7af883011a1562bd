"""BatchNorm statistics for a backbone that starts from random weights."""

from __future__ import annotations

from pathlib import Path

from finetune.data.arrays import Moments


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
        moments = Moments(per_channel=True)
        for start in range(0, len(images), batch_size):
            moments.add(keras.ops.convert_to_numpy(probe(images[start : start + batch_size])))
        layer.moving_mean.assign(np.asarray(moments.mean, dtype="float32"))
        layer.moving_variance.assign(np.asarray(moments.variance, dtype="float32"))


def save_calibrated_weights(
    name: str,
    image_size: int,
    path: Path,
    images: int = 256,
    options: dict | None = None,
    batch_size: int = 32,
    data_seed: int = 0,
) -> Path:
    """Random weights for backbone ``name`` with BatchNorm calibrated on Fashion-MNIST, saved to ``path``.

    Such a backbone gives healthy (if untrained) features: tests and
    benchmarks use it where no ImageNet file may be downloaded. The weights
    are seeded (0); ``data_seed`` picks the ``images`` calibrated on.
    """
    import keras

    # Imported here: calibration is a test and script helper; building backbones loads Keras.
    from finetune.backbones.build import build_backbone
    from finetune.backbones.input_layer import BackboneInput
    from finetune.backbones.registry import get
    from finetune.data import load_dataset
    from finetune.recipe import DataConfig

    keras.utils.set_random_seed(0)
    spec = get(name)
    backbone = build_backbone(spec, (image_size, image_size), None, options)
    split = load_dataset(DataConfig(train_limit=images, validation_split=0.0), seed=data_seed).train
    pixels = BackboneInput(image_size, image_size, spec.preprocessing)(split.images)
    calibrate_batch_norm(backbone, pixels, batch_size=batch_size)
    backbone.save_weights(path)
    return Path(path)
