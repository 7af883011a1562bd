"""Evaluation on the test split: loss, accuracy, per-class precision/recall/F1, macro-F1, balanced and top-k
accuracy, confusion matrix."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from finetune.data.arrays import chunks, even_batch_size, predict_in_steady_batches

# Keras clips probabilities by this epsilon in its cross-entropy.
_EPSILON = 1e-7

# top_k_accuracy's k; with this many classes or fewer it is omitted (top-5 of 5 classes is always 1).
TOP_K = 5


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
        return predict_views(model, split.images, batch_size, tta)

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


def predict_views(model, images, batch_size: int, tta: Sequence[str] = ()) -> np.ndarray:
    """The mean probabilities of ``images`` as they are and in each test-time view of ``tta``."""
    return np.mean([predict_view(model, images, batch_size, view) for view in ("none", *tta)], axis=0)


def predict_view(model, images, batch_size: int, view: str = "none") -> np.ndarray:
    """Class probabilities of ``images`` as they are (``none``) or mirrored left to right (``flip``)."""
    if view not in ("none", "flip"):
        raise ValueError(f"unknown test-time view {view!r}")
    # One batch shape for every view and chunk: the model is traced once, not again for a last short batch.
    # A memory-mapped split is read a batch (or a flipped chunk) at a time, never copied whole.
    steady = even_batch_size(len(images), batch_size)
    if view == "none":
        return np.asarray(predict_in_steady_batches(model, images, steady), dtype=np.float64)
    parts = [
        predict_in_steady_batches(model, chunk[:, :, ::-1], steady)
        for chunk in chunks(images, steady * max(1, 4096 // steady))
    ]
    return np.concatenate(parts).astype(np.float64)


def metrics_from_probabilities(probabilities: np.ndarray, labels: np.ndarray, class_names) -> dict:
    """Single-label metrics of ``probabilities`` (one row per image) against ``labels`` (class indices).

    ``per_class`` gives each class's precision, recall, F1 and support (its
    number of images in ``labels``); ``per_class_accuracy`` is the recall,
    kept for older readers, and None for a class without images. The other
    scores follow scikit-learn with ``zero_division=0``:

    * a class with no images has recall 0, a class never predicted precision
      0, and F1 is 0 where precision and recall are both 0;
    * ``macro_f1`` is the mean F1 over the classes that occur in the labels or
      the predictions (``f1_score(average="macro")``): a class predicted but
      absent from the labels counts with its F1 of 0 (its false alarms), one
      absent from both is left out, as nothing was measured about it;
    * ``balanced_accuracy`` is the mean recall over the classes present in the
      labels (``balanced_accuracy_score``);
    * ``top_k_accuracy`` (with ``top_k``, only with more than ``TOP_K``
      classes) is the share of images whose true class is among the ``top_k``
      most probable; of tied probabilities the lower class index ranks first,
      as in ``argmax``, so a top-1 accuracy would equal ``accuracy``.
    """
    labels = np.asarray(labels, dtype=np.int64)
    predictions = probabilities.argmax(axis=1)
    picked = np.clip(probabilities[np.arange(len(labels)), labels], _EPSILON, 1.0 - _EPSILON)
    num_classes = len(class_names)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (labels, predictions), 1)
    support = confusion.sum(axis=1)
    per_class_accuracy = {
        name: (float(confusion[index, index] / support[index]) if support[index] else None)
        for index, name in enumerate(class_names)
    }
    precision, recall, f1 = _precision_recall_f1(confusion)
    present = support > 0
    occurring = present | (confusion.sum(axis=0) > 0)
    metrics = {
        "loss": float(-np.mean(np.log(picked))),
        "accuracy": float(np.mean(predictions == labels)),
        "examples": len(labels),
        "per_class_accuracy": per_class_accuracy,
        "class_names": list(class_names),
        "confusion_matrix": confusion.tolist(),
        "per_class": per_class_scores(class_names, (precision, recall, f1), support),
        # None without any image: no mean to take, and json writes null rather than NaN.
        "macro_f1": float(f1[occurring].mean()) if occurring.any() else None,
        "balanced_accuracy": float(recall[present].mean()) if present.any() else None,
    }
    if num_classes > TOP_K:
        metrics["top_k"] = TOP_K
        metrics["top_k_accuracy"] = top_k_accuracy(probabilities, labels, TOP_K)
    return metrics


def _precision_recall_f1(confusion: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class (rows true, columns predicted), a ratio with a zero denominator being 0 (``zero_division=0``)."""
    return precision_recall_f1(np.diag(confusion), confusion.sum(axis=0), confusion.sum(axis=1))


def precision_recall_f1(
    true_positives: np.ndarray, predicted: np.ndarray, actual: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class from its counts (hits, predictions, true members); a zero denominator gives 0."""
    true_positives = np.asarray(true_positives, dtype=np.float64)
    predicted, actual = np.asarray(predicted, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    precision = ratio(true_positives, predicted)
    recall = ratio(true_positives, actual)
    # 2TP / (2TP + FP + FN): the harmonic mean of precision and recall, without dividing by a zero of either.
    f1 = ratio(2 * true_positives, predicted + actual)
    return precision, recall, f1


def ratio(numerator: Any, denominator: Any) -> np.ndarray:
    """``numerator / denominator``, 0 where the denominator is 0 (scikit-learn's ``zero_division=0``)."""
    numerator, denominator = np.asarray(numerator, dtype=np.float64), np.asarray(denominator, dtype=np.float64)
    return np.divide(numerator, denominator, out=np.zeros_like(numerator), where=denominator > 0)


def per_class_scores(
    class_names: Sequence[str], scores: tuple[np.ndarray, np.ndarray, np.ndarray], support: np.ndarray
) -> dict[str, dict[str, Any]]:
    """``metrics.json``'s ``per_class``: each class's precision, recall, F1 and support."""
    precision, recall, f1 = scores
    return {
        name: {
            "precision": float(precision[index]),
            "recall": float(recall[index]),
            "f1": float(f1[index]),
            "support": int(support[index]),
        }
        for index, name in enumerate(class_names)
    }


def top_k_accuracy(probabilities: np.ndarray, labels: np.ndarray, k: int) -> float:
    """The share of rows whose true class ranks among the ``k`` most probable (ties: lower index first)."""
    rows = np.arange(len(labels))
    true = probabilities[rows, labels][:, None]
    columns = np.arange(probabilities.shape[1])[None, :]
    # A class ranks before the true one if more probable, or as probable and of a lower index (argmax's choice).
    ahead = (probabilities > true) | ((probabilities == true) & (columns < labels[:, None]))
    return float(np.mean(ahead.sum(axis=1) < k))
