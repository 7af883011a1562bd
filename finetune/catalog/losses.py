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


@keras.saving.register_keras_serializable(package="finetune")
class MacroF1(keras.metrics.Metric):
    """The mean F1 over the classes that occur in the labels or the predictions, as scikit-learn's
    ``f1_score(average="macro")`` and finetune's test ``macro_f1`` count it, from a confusion matrix summed
    over the epoch (a mean of per-batch F1s would differ). Images count once each, whatever their weight."""

    def __init__(self, num_classes: int, name: str = "macro_f1", dtype=None):
        super().__init__(name=name, dtype=dtype)
        self.num_classes = int(num_classes)
        shape = (self.num_classes, self.num_classes)
        self.confusion = self.add_variable(shape=shape, initializer="zeros", dtype="float32", name="confusion")

    def update_state(self, y_true, y_pred, sample_weight=None):
        predicted = ops.one_hot(ops.argmax(y_pred, axis=-1), self.num_classes, dtype="float32")
        if len(y_true.shape) == len(y_pred.shape) and y_true.shape[-1] == self.num_classes:
            labels = ops.argmax(y_true, axis=-1)  # one-hot or mixed targets: the class that dominates
        else:
            labels = ops.reshape(ops.cast(y_true, "int32"), (-1,))
        truth = ops.one_hot(labels, self.num_classes, dtype="float32")
        self.confusion.assign_add(ops.matmul(ops.transpose(truth), predicted))

    def result(self):
        right = ops.diagonal(self.confusion)
        labelled, predicted = ops.sum(self.confusion, axis=1), ops.sum(self.confusion, axis=0)
        occurring = ops.cast(labelled + predicted > 0, "float32")
        f1 = 2.0 * right / ops.maximum(labelled + predicted, 1.0)  # = 2PR / (P + R); 0 where nothing was right
        return ops.sum(f1 * occurring) / ops.maximum(ops.sum(occurring), 1.0)

    def reset_state(self):
        self.confusion.assign(ops.zeros_like(self.confusion))

    def get_config(self):
        return {"num_classes": self.num_classes, "name": self.name, "dtype": self.dtype}


def epoch_metrics(names, num_classes: int, multi_label: bool = False) -> list:
    """``compile``'s metrics for ``training.epoch_metrics`` (logged as NAME and val_NAME); none for tags."""
    return [] if multi_label else [MacroF1(num_classes) for name in names if name == "macro_f1"]
