"""The training loss: sparse categorical cross-entropy (binary for tags), with label smoothing when asked.

Keras 3's ``SparseCategoricalCrossentropy`` has no ``label_smoothing``; this
one turns the integer labels into smoothed one-hot targets with ``keras.ops``
(every backend), so datasets keep their integer labels.
"""

from __future__ import annotations

import keras
from keras import ops


@keras.saving.register_keras_serializable(package="finetune")
class SmoothedSparseCrossentropy(keras.losses.Loss):
    """Cross-entropy against ``(1 - e) * one_hot(label) + e / classes`` for probabilities."""

    def __init__(self, label_smoothing: float = 0.0, name: str = "smoothed_sparse_crossentropy", **kwargs):
        super().__init__(name=name, **kwargs)
        self.label_smoothing = float(label_smoothing)

    def call(self, y_true, y_pred):
        classes = ops.shape(y_pred)[-1]
        labels = ops.cast(ops.reshape(y_true, (-1,)), "int32")
        targets = ops.one_hot(labels, classes, dtype=y_pred.dtype)
        smoothing = ops.cast(self.label_smoothing, y_pred.dtype)
        targets = targets * (1.0 - smoothing) + smoothing / ops.cast(classes, y_pred.dtype)
        return keras.losses.categorical_crossentropy(targets, y_pred)

    def get_config(self):
        return {**super().get_config(), "label_smoothing": self.label_smoothing}


def training_loss(label_smoothing: float = 0.0, soft_labels: bool = False, multi_label: bool = False):
    """What ``compile`` gets: Keras's own sparse cross-entropy unless labels are smoothed or soft (mixed).

    ``multi_label``: binary cross-entropy of each tag's sigmoid, smoothed toward 0.5 by ``label_smoothing``."""
    if multi_label:
        return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
    if soft_labels:
        return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)
    if not label_smoothing:
        return "sparse_categorical_crossentropy"
    return SmoothedSparseCrossentropy(label_smoothing)


@keras.saving.register_keras_serializable(package="finetune")
class TagAccuracy(keras.metrics.MeanMetricWrapper):
    """A multi-label run's ``accuracy``: the share of (image, tag) decisions right at 0.5.

    Targets are rounded at 0.5 too, so a mixed (mixup, CutMix) target counts for the tag that dominates it,
    as single-label accuracy counts a mixed row for its larger class; Keras's ``BinaryAccuracy`` would
    count every mixed target as wrong."""

    def __init__(self, name: str = "accuracy", dtype=None):
        super().__init__(fn=_tag_accuracy, name=name, dtype=dtype)

    def get_config(self):
        return {"name": self.name, "dtype": self.dtype}


def _tag_accuracy(y_true, y_pred):
    truth = ops.cast(ops.greater_equal(ops.cast(y_true, "float32"), 0.5), "float32")
    decided = ops.cast(ops.greater(ops.cast(y_pred, "float32"), 0.5), "float32")
    return ops.cast(ops.equal(truth, decided), "float32")
