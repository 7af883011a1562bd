"""Verification: an artifact's predictions against the Keras model's, with a tolerance per kind of weights."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from finetune.errors import ExportError


@dataclass(frozen=True)
class Tolerance:
    """The largest absolute difference of any class probability, and the least top-1 agreement, that pass."""

    max_abs_diff: float
    min_top1_agreement: float


FLOAT32 = Tolerance(max_abs_diff=1e-4, min_top1_agreement=0.0)
"""Same weights, other kernels: only rounding differs (a top-1 flip is then a tie within 1e-4)."""
FLOAT16 = Tolerance(max_abs_diff=0.05, min_top1_agreement=0.95)
"""float16 weights: probabilities move a little; the predicted class must almost always stay."""
DYNAMIC_RANGE = Tolerance(max_abs_diff=0.25, min_top1_agreement=0.9)
"""int8 weights and activations quantized on the fly: probabilities move more; most predictions must stay."""

INT8 = Tolerance(max_abs_diff=0.35, min_top1_agreement=0.9)
"""int8 weights and activations with calibrated ranges: like dynamic range, a little wider on probabilities."""

TOLERANCES = {"none": FLOAT32, "float16": FLOAT16, "dynamic_range": DYNAMIC_RANGE, "int8": INT8}


def agreement(reference: np.ndarray, predicted: np.ndarray) -> dict:
    """Max absolute probability difference and top-1 agreement of ``predicted`` with ``reference``."""
    reference = np.asarray(reference, dtype=np.float64)
    predicted = np.asarray(predicted, dtype=np.float64).reshape(reference.shape)
    return {
        "images": len(reference),
        "max_abs_diff": float(np.abs(predicted - reference).max()),
        "top1_agreement": float(np.mean(predicted.argmax(axis=-1) == reference.argmax(axis=-1))),
    }


def check(label: str, measured: dict, tolerance: Tolerance) -> dict:
    """``measured`` with its tolerance added; one-line ExportError naming ``label`` when it is outside."""
    bad_diff = not measured["max_abs_diff"] <= tolerance.max_abs_diff  # NaN fails too
    bad_top1 = measured["top1_agreement"] < tolerance.min_top1_agreement
    if bad_diff or bad_top1:
        raise ExportError(
            f"export {label} disagrees with the Keras model on {measured['images']} test images: "
            f"max |probability difference| {measured['max_abs_diff']:.3g} (tolerance {tolerance.max_abs_diff:g}), "
            f"top-1 agreement {measured['top1_agreement']:.3f} (at least {tolerance.min_top1_agreement:g}); "
            "nothing was written under its name"
        )
    return {**measured, "tolerance": asdict(tolerance)}
