"""Multi-label evaluation: per-tag thresholds chosen for F1, micro/macro F1, mean average precision, exact match.

A multi-label model gives one sigmoid probability per tag; a tag is predicted when its probability
reaches the tag's threshold. The scores follow scikit-learn (``f1_score`` micro and macro,
``average_precision_score`` macro) with ``zero_division=0``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from finetune.evaluation.metrics import per_class_scores, precision_recall_f1, predict_views, ratio

DEFAULT_THRESHOLD = 0.5
"""Every tag's threshold when there is no validation split to choose them on."""

# Keras clips probabilities by this epsilon in its cross-entropy.
_EPSILON = 1e-7


def best_f1_threshold(scores: np.ndarray, truth: np.ndarray) -> float:
    """The threshold on ``scores`` whose predictions (``scores >= threshold``) give ``truth`` its highest F1.

    Halfway between the lowest score predicted positive and the next lower score (so a slightly different
    score on new images falls on the same side); 0.5 when ``truth`` has no positive (no F1 to maximise).
    Of equal F1s the higher threshold wins (fewer false alarms).
    """
    truth = np.asarray(truth).astype(bool)
    positives = int(truth.sum())
    if positives == 0 or len(scores) == 0:
        return DEFAULT_THRESHOLD
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], truth[order]
    true_positives = np.cumsum(hits)
    predicted = np.arange(1, len(ranked) + 1)
    # Only cut where the next score is lower: tied scores are predicted together.
    cut = np.r_[ranked[1:] < ranked[:-1], True]
    f1 = np.where(cut, 2 * true_positives / (predicted + positives), -1.0)
    best = int(np.argmax(f1))  # the first maximum: the fewest images predicted
    lower = ranked[best + 1] if best + 1 < len(ranked) else max(0.0, ranked[best] - 1e-3)
    return float((ranked[best] + lower) / 2)


def choose_thresholds(probabilities: np.ndarray, labels: np.ndarray | None) -> np.ndarray:
    """Each tag's threshold maximising its F1 on ``labels`` (the validation split); 0.5 each without one."""
    tags = probabilities.shape[1]
    if labels is None or len(labels) == 0:
        return np.full(tags, DEFAULT_THRESHOLD)
    return np.array([best_f1_threshold(probabilities[:, tag], labels[:, tag]) for tag in range(tags)])


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """The area under the precision-recall steps, as scikit-learn's ``average_precision_score``; None
    without a positive."""
    truth = np.asarray(truth).astype(bool)
    positives = int(truth.sum())
    if positives == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    ranked, hits = scores[order], truth[order]
    ends = np.r_[np.flatnonzero(ranked[1:] < ranked[:-1]), len(ranked) - 1]  # the last row of each distinct score
    true_positives = np.cumsum(hits)[ends]
    precision = true_positives / (ends + 1)
    recall = true_positives / positives
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def multi_label_metrics(
    probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str], thresholds: np.ndarray
) -> dict[str, Any]:
    """The test metrics of tag ``probabilities`` (one row per image) against multi-hot ``labels``.

    * ``loss``: the mean binary cross-entropy over images and tags (Keras's clipping);
    * ``accuracy``: the share of (image, tag) decisions right at the thresholds;
    * ``exact_match``: the share of images whose predicted tag set is exactly their true one;
    * ``micro_f1``: F1 of all (image, tag) decisions pooled; ``macro_f1``: the mean of the tags' F1s;
    * ``mean_average_precision``: the mean of the tags' average precision (threshold-free), over the tags
      with a positive (scikit-learn's ``average_precision_score``, ``average="macro"``);
    * ``per_class``: each tag's precision, recall, F1, support (images with it), threshold and average precision.
    """
    truth = np.asarray(labels).astype(bool)
    predicted = probabilities >= thresholds[None, :]
    clipped = np.clip(probabilities, _EPSILON, 1.0 - _EPSILON)
    loss = -np.mean(np.where(truth, np.log(clipped), np.log(1.0 - clipped)))
    true_positives = (predicted & truth).sum(axis=0).astype(np.float64)
    predicted_count, support = predicted.sum(axis=0), truth.sum(axis=0)
    precision, recall, f1 = precision_recall_f1(true_positives, predicted_count, support)
    precisions = [average_precision(probabilities[:, tag], truth[:, tag]) for tag in range(truth.shape[1])]
    measured = [value for value in precisions if value is not None]
    return {
        "multi_label": True,
        "loss": float(loss),
        "accuracy": float(np.mean(predicted == truth)),
        "exact_match": float(np.mean((predicted == truth).all(axis=1))),
        "micro_f1": float(ratio(2 * true_positives.sum(), predicted_count.sum() + support.sum())),
        "macro_f1": float(f1.mean()),
        "mean_average_precision": float(np.mean(measured)) if measured else None,
        "examples": len(truth),
        "class_names": list(class_names),
        "thresholds": {name: float(thresholds[index]) for index, name in enumerate(class_names)},
        "per_class": {
            name: {
                **scores,
                "threshold": float(thresholds[index]),
                "average_precision": precisions[index],
                "predicted": int(predicted_count[index]),
            }
            for index, (name, scores) in enumerate(
                per_class_scores(class_names, (precision, recall, f1), support).items()
            )
        },
    }


def evaluate_multi_label(
    model: Any,
    test: Any,
    validation: Any | None,
    class_names: Sequence[str],
    batch_size: int = 256,
    thresholds: np.ndarray | None = None,
    tta: Sequence[str] = (),
) -> tuple[dict[str, Any], np.ndarray]:
    """The test split's multi-label metrics and tag probabilities.

    ``thresholds`` given (a saved model's) are used as they are; otherwise each tag's is chosen to maximise
    its F1 on ``validation`` (0.5 each without one), and ``thresholds_chosen_on`` says which. With ``tta``
    each image's probabilities are the mean over it and its views (``flip``), on validation as on test, so
    the thresholds are chosen on the scores they are applied to.
    """

    chosen_on = "given"
    if thresholds is None:
        if validation is not None and len(validation):
            scores = predict_views(model, validation.images, batch_size, tta)
            thresholds, chosen_on = choose_thresholds(scores, np.asarray(validation.labels)), "validation"
        else:
            thresholds, chosen_on = np.full(len(class_names), DEFAULT_THRESHOLD), "default"
    probabilities = predict_views(model, test.images, batch_size, tta)
    metrics = multi_label_metrics(probabilities, np.asarray(test.labels), class_names, thresholds)
    metrics["thresholds_chosen_on"] = chosen_on
    if tta:
        metrics["tta"] = list(tta)
    return metrics, probabilities
