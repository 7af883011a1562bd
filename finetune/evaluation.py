"""Evaluation on the test split: loss, accuracy, per-class accuracy, confusion matrix."""

from __future__ import annotations

import numpy as np

# Keras clips probabilities by this epsilon in its cross-entropy.
_EPSILON = 1e-7


def evaluate(model, split, class_names, batch_size: int = 256) -> dict:
    """Metrics from a single prediction pass over ``split``."""
    probabilities = np.asarray(model.predict(split.images, batch_size=batch_size, verbose=0), dtype=np.float64)
    return metrics_from_probabilities(probabilities, split.labels, class_names)


def metrics_from_probabilities(probabilities: np.ndarray, labels: np.ndarray, class_names) -> dict:
    labels = np.asarray(labels, dtype=np.int64)
    predictions = probabilities.argmax(axis=1)
    picked = np.clip(probabilities[np.arange(len(labels)), labels], _EPSILON, 1.0 - _EPSILON)
    num_classes = len(class_names)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    support = confusion.sum(axis=1)
    per_class = {
        name: (float(confusion[index, index] / support[index]) if support[index] else None)
        for index, name in enumerate(class_names)
    }
    return {
        "loss": float(-np.mean(np.log(picked))),
        "accuracy": float(np.mean(predictions == labels)),
        "examples": int(len(labels)),
        "per_class_accuracy": per_class,
        "class_names": list(class_names),
        "confusion_matrix": confusion.tolist(),
    }
