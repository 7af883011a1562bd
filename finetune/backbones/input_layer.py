"""The layer that turns raw dataset pixels into what a backbone expects.

It lives inside the model, so the exported model takes raw uint8 images and
the input pipeline moves only the stored bytes. Written with ``keras.ops``
alone: it runs on every Keras backend and loads with ``safe_mode=True``.
"""

from __future__ import annotations

import keras
import numpy as np
from keras import ops

from finetune.backbones.spec import PREPROCESSING_MODES
from finetune.data.arrays import Moments, chunks

# keras.applications.imagenet_utils constants ("caffe" works in BGR order).
_CAFFE_BGR_MEAN = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)


@keras.saving.register_keras_serializable(package="finetune")
class BackboneInput(keras.layers.Layer):
    """Raw pixels (any dtype, 1, 3 or 4 channels) to a backbone's input.

    Casts to float, resizes to ``(height, width)`` (before adding channels,
    which is three times cheaper for grayscale), repeats one channel to RGB
    or drops alpha (``channels=3``; ``None`` keeps them), then applies the
    backbone family's ``preprocess_input`` convention: "tf" (to [-1, 1]),
    "caffe" (BGR, ImageNet mean subtracted), "torch" (to [0, 1], ImageNet
    mean and std), "none" (the backbone rescales by itself), "unit" (to
    [0, 1]) or "standardize" (zero mean, unit variance; see :meth:`adapt`).
    """

    def __init__(
        self,
        height: int,
        width: int,
        preprocessing: str = "none",
        interpolation: str = "bilinear",
        channels: int | None = 3,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if preprocessing not in PREPROCESSING_MODES:
            raise ValueError(f"preprocessing must be one of {PREPROCESSING_MODES}, got {preprocessing!r}")
        self.height, self.width = int(height), int(width)
        self.preprocessing = preprocessing
        self.interpolation = interpolation
        self.channels = channels
        # Pixel statistics for "standardize", set by adapt() from the training images.
        self.mean = self.add_weight(shape=(), initializer="zeros", trainable=False, name="mean")
        self.std = self.add_weight(shape=(), initializer="ones", trainable=False, name="std")

    def adapt(self, images) -> None:
        """Take the pixel mean and standard deviation of ``images`` (for "standardize").

        Images in a file are read in chunks, never as one float64 array.
        """
        moments = Moments()
        for chunk in chunks(images):
            moments.add(chunk)
        self.mean.assign(float(moments.mean))
        self.std.assign(float(np.sqrt(moments.variance)) or 1.0)

    def call(self, images):
        images = ops.cast(images, self.compute_dtype)
        if tuple(images.shape[1:3]) != (self.height, self.width):
            images = ops.image.resize(images, (self.height, self.width), interpolation=self.interpolation)
        if self.channels == 3:
            if images.shape[-1] == 1:
                images = ops.repeat(images, 3, axis=-1)
            elif images.shape[-1] == 4:
                images = images[..., :3]
        return self._preprocess(images)

    def _preprocess(self, images):
        if self.preprocessing == "tf":
            return images / 127.5 - 1.0
        if self.preprocessing == "caffe":
            bgr = ops.flip(images, axis=-1)
            return bgr - ops.convert_to_tensor(_CAFFE_BGR_MEAN, dtype=self.compute_dtype)
        if self.preprocessing == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(_TORCH_STD, dtype=self.compute_dtype)
            return (images / 255.0 - mean) / std
        if self.preprocessing == "unit":
            return images / 255.0
        if self.preprocessing == "standardize":
            return (images - ops.cast(self.mean, self.compute_dtype)) / ops.cast(self.std, self.compute_dtype)
        return images

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.height, self.width, 3 if self.channels == 3 else input_shape[-1])

    def get_config(self):
        return {
            **super().get_config(),
            "height": self.height,
            "width": self.width,
            "preprocessing": self.preprocessing,
            "interpolation": self.interpolation,
            "channels": self.channels,
        }
