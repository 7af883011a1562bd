"""Evaluation on the test split: loss, accuracy, per-class accuracy, confusion matrix."""

from __future__ import annotations

import numpy as np

from finetune.data.arrays import chunks, on_disk

# Keras clips probabilities by this epsilon in its cross-entropy.
_EPSILON = 1e-7


def evaluate(model, split, class_names, batch_size: int = 256, mc_samples: int = 0, tta=()) -> dict:
    """Metrics from one prediction pass over ``split``, or the mean of ``mc_samples`` passes.

    See :func:`evaluate_with_probabilities`, which also returns the probabilities.
    """
    return evaluate_with_probabilities(model, split, class_names, batch_size, mc_samples, tta)[0]


def evaluate_with_probabilities(
    model, split, class_names, batch_size: int = 256, mc_samples: int = 0, tta=()
) -> tuple[dict, np.ndarray]:
    """:func:`evaluate`'s metrics, and the class probabilities they were computed from (one row per image).

    Metrics from one prediction pass over ``split``, or the mean of ``mc_samples`` passes.

    With test-time augmentation (``tta: [flip]``) each pass averages the
    probabilities of the images and of their mirror images, and ``tta``
    lists the views.

    With MC dropout (``mc_samples`` > 0) the dropout layers stay active, the
    metrics are those of the averaged probabilities, and ``mc_dropout``
    reports the predictive uncertainty: the mean entropy of the averaged
    prediction and the mean standard deviation, across passes, of the
    probability of the predicted class.
    """

    def predict():
        views = [predict_view(model, split.images, batch_size, view) for view in ("none", *tta)]
        return np.mean(views, axis=0)

    if not mc_samples:
        probabilities = predict()
        metrics = metrics_from_probabilities(probabilities, split.labels, class_names)
    else:
        passes = np.stack([predict() for _ in range(mc_samples)])
        probabilities = passes.mean(axis=0)
        metrics = metrics_from_probabilities(probabilities, split.labels, class_names)
        predicted = probabilities.argmax(axis=1)
        entropy = -np.sum(probabilities * np.log(np.clip(probabilities, _EPSILON, 1.0)), axis=1)
        spread = passes[:, np.arange(len(predicted)), predicted].std(axis=0)
        metrics["mc_dropout"] = {
            "samples": int(mc_samples),
            "accuracy_single_pass": float(np.mean(passes[0].argmax(axis=1) == np.asarray(split.labels))),
            "mean_predictive_entropy": float(entropy.mean()),
            "mean_std_of_predicted_class": float(spread.mean()),
        }
    if tta:
        metrics["tta"] = list(tta)  # the views averaged with each image: metrics.json says what its numbers came from
    return metrics, probabilities


def predict_view(model, images, batch_size: int, view: str = "none") -> np.ndarray:
    """Class probabilities of ``images`` as they are (``none``) or mirrored left to right (``flip``)."""
    if view == "flip":
        parts = [model.predict(chunk[:, :, ::-1], batch_size=batch_size, verbose=0) for chunk in chunks(images, 4096)]
        return np.concatenate(parts).astype(np.float64)
    if view != "none":
        raise ValueError(f"unknown test-time view {view!r}")
    if on_disk(images):  # read a batch at a time rather than copying the file into one tensor
        # Imported here: only a memory-mapped test split needs batched reads.
        from finetune.data.batches import FileBatches

        return np.asarray(model.predict(FileBatches(images, batch_size=batch_size), verbose=0), dtype=np.float64)
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0), dtype=np.float64)


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
        "examples": len(labels),
        "per_class_accuracy": per_class,
        "class_names": list(class_names),
        "confusion_matrix": confusion.tolist(),
    }
