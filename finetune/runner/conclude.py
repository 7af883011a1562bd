"""The end of a run: evaluation on the test split, the saved model and its export formats, the pictures
and report, the folder marked finished."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from finetune import model as model_stage
from finetune.data import Dataset
from finetune.data.input_spec import describe_input, write_input_spec, write_thresholds
from finetune.evaluation import metrics as metrics_stage
from finetune.evaluation import multilabel as multi_label
from finetune.export.formats import VERIFY_IMAGES_FILE, export_all, failures
from finetune.export.tflite import calibration_sample
from finetune.files import write_atomically
from finetune.inference.explain import overlays_for
from finetune.plan import RunPlan
from finetune.progress import live
from finetune.recipe import Recipe
from finetune.report.write import write_pictures_and_report
from finetune.runner.folder import RunFolder
from finetune.runner.session import RunSession
from finetune.runner.summary import stage_line, summary_lines
from finetune.training.divergence import read_warnings
from finetune.training.history_file import read_history

logger = logging.getLogger(__name__)


@dataclass
class RunResult:
    """What a run produced; ``metrics["test"]`` holds the test metrics."""

    run_dir: Path
    metrics: dict[str, Any]
    model: Any
    recipe: Recipe
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def test_accuracy(self) -> float:
        return self.metrics["test"]["accuracy"]


def conclude(session: RunSession) -> RunResult:
    """Evaluation and export of the trained model, then the folder marked finished.

    Outside the distribution's scope: a SavedModel traced inside a tf.distribute scope cannot run outside one.
    """
    folder = session.folder
    assert folder is not None, "only a run with a folder concludes"
    history = read_history(folder.path / "history.csv")
    live(f"evaluating on {len(session.dataset.test):,} test images", force=True)
    with session.times.stage("evaluation"):
        metrics, probabilities = evaluate(session, history)
    metrics.update(session.facts)
    warnings = read_warnings(folder.path)
    if warnings:
        metrics["warnings"] = warnings
    save(session, metrics, probabilities, history)
    folder.finish()
    for line in summary_lines(history, metrics, folder.path):
        logger.info(line)
    logger.info(stage_line(metrics["seconds_by_stage"]))
    return RunResult(folder.path, metrics, session.model, session.recipe, history)


def evaluate_test_split(
    model: keras.Model, plan: RunPlan, dataset: Dataset, thresholds: np.ndarray | None = None
) -> tuple[dict[str, Any], np.ndarray]:
    """The test split's metrics and class probabilities, with the recipe's evaluation settings.

    Multi-label: the tags' ``thresholds`` given, else chosen on the validation split (``test["thresholds"]``)."""
    evaluation = plan.evaluation
    if dataset.multi_label:
        return multi_label.evaluate_multi_label(
            model,
            dataset.test,
            dataset.validation,
            dataset.class_names,
            evaluation.batch_size,
            thresholds,
            evaluation.tta,
        )
    return metrics_stage.evaluate_with_probabilities(
        model, dataset.test, dataset.class_names, evaluation.batch_size, evaluation.mc_samples, evaluation.tta
    )


def evaluate(session: RunSession, history: list[dict[str, Any]]) -> tuple[dict[str, Any], np.ndarray]:
    """Test metrics of the trained model, with the run's context (validation from its last epoch),
    and its class probabilities for each test image (for the pictures; too big for metrics.json)."""
    model, plan, dataset = session.model, session.plan, session.dataset
    test, probabilities = evaluate_test_split(model, plan, dataset)
    metrics = {
        "test": test,
        "recipe": plan.name,
        "precision": model_stage.resolve_precision(plan.model.precision),
        "backend": keras.backend.backend(),
        "weights": {  # the trainable ones are the last phase's
            "total": int(model.count_params()),
            "trainable": int(sum(math.prod(weight.shape) for weight in model.trainable_weights)),
        },
        "train_images": len(dataset.train),
        "validation_images": len(dataset.validation) if dataset.validation is not None else 0,
        "seconds": round(session.seconds, 2),
    }
    if session.class_weights is not None:
        metrics["class_weight"] = session.class_weights
    if plan.data.sampling != "natural":
        metrics["sampling"] = plan.data.sampling
    if dataset.validation is not None and history and history[-1].get("val_accuracy"):
        # The last epoch already measured the final model on the validation split.
        metrics["validation"] = {
            "loss": float(history[-1]["val_loss"]),
            "accuracy": float(history[-1]["val_accuracy"]),
            "examples": len(dataset.validation),
        }
    return metrics, probabilities


def save(
    session: RunSession, metrics: dict[str, Any], probabilities: np.ndarray, history: list[dict[str, Any]]
) -> None:
    """``model.keras``, ``input.json``, ``metrics.json``, the export formats (each reloaded and checked against
    the model), then the pictures and ``report.html``."""
    model, plan, dataset, times = session.model, session.plan, session.dataset, session.times
    folder: RunFolder | None = session.folder
    assert folder is not None
    with times.stage("model.keras"):
        folder.save_model(model)
    if "thresholds" in metrics["test"]:  # multi-label: the tags' thresholds go wherever the model goes
        write_thresholds(folder.path, metrics["test"]["thresholds"], metrics["test"]["thresholds_chosen_on"])
    # What `finetune predict` needs to turn any picture into this model's input (shape, resize, background).
    input_spec = describe_input(dataset.train.images, dataset.class_names, plan.data.resize)
    write_input_spec(folder.path, input_spec)
    # Written before the exports as well: a run killed while exporting still has its test metrics.
    folder.write_json("metrics.json", metrics)
    images = np.asarray(dataset.test.images[: plan.export.verify_images])
    # Kept with the run (a few dozen small images): `finetune export` checks later formats on them
    # wherever the folder goes, without the training data.
    write_atomically(folder.path / VERIFY_IMAGES_FILE, lambda path: np.save(path, images))
    formats, quantization = plan.export.formats, plan.export.tflite_quantization
    calibration = None
    if "tflite" in formats and quantization == "int8":  # the activations' ranges, from the training split
        calibration = calibration_sample(dataset.train.images, plan.export.calibration_images, plan.seed)
    # The evaluation's answers for these images are the model's own unless views or MC passes were averaged:
    # then no second prediction (and no trace of the model for its batch size) is needed.
    plain = not plan.evaluation.tta and not plan.evaluation.mc_samples
    reference = probabilities[: len(images)].astype(np.float32) if plain else None
    with times.stage("export (shared work)"):  # reference predictions, labels.txt; each format on its own
        metrics["export"] = export_all(
            model, folder.path, formats, quantization, dataset.class_names, images,
            calibration=calibration, tflite_io=plan.export.tflite_io, reference=reference,
        )  # fmt: skip
        for key, result in metrics["export"].items():
            times.add(f"export {key}", result["seconds"])
    for key, reason in failures(metrics["export"]).items():
        # The trained model is never held hostage by a format: the run finishes, the failure is on record.
        failed = metrics["export"][key]
        retry = f"finetune export {folder.path} --format {failed['format']}"
        if failed["quantization"] != "none":
            retry += f" --quantization {failed['quantization']}"
        logger.warning(f"{reason}; the run is finished and model.keras saved; retry with: {retry}")
    if "saved_model" in formats:
        write_input_spec(folder.path / "saved_model", input_spec)  # predict reads it beside labels.txt
        if "thresholds" in metrics["test"]:
            write_thresholds(
                folder.path / "saved_model", metrics["test"]["thresholds"], metrics["test"]["thresholds_chosen_on"]
            )
    metrics["seconds_by_stage"] = times.as_dict()
    folder.write_json("metrics.json", metrics)
    with times.stage("pictures and report"):
        problems = write_pictures_and_report(
            folder.path, plan.name, history, metrics, dataset.test, probabilities, overlay=overlays_for(model)
        )
        for problem in problems:
            logger.warning(f"picture not drawn: {problem}")
    metrics["seconds_by_stage"] = times.as_dict()
    folder.write_json("metrics.json", metrics)  # with the pictures' own seconds
