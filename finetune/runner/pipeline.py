"""The orchestrator: recipe -> data -> model -> phases -> evaluation -> export, one step per stage."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from finetune import model as model_stage
from finetune.data import Dataset, load_dataset, peek_class_names
from finetune.errors import RunInterrupted
from finetune.evaluation import metrics as metrics_stage
from finetune.evaluation import pictures
from finetune.export.formats import export_all
from finetune.files import write_atomically
from finetune.plan import RunPlan, prepare
from finetune.recipe import Recipe
from finetune.runner.folder import RunFolder, check_run_dir
from finetune.training.checkpoints import read_history
from finetune.training.phases import check_phases, setup_warnings
from finetune.training.train import train


@dataclass
class RunResult:
    """What a run produced; ``metrics["test"]`` holds the test metrics."""

    run_dir: Path
    metrics: dict
    model: Any
    recipe: Recipe
    history: list[dict] = field(default_factory=list)

    @property
    def test_accuracy(self) -> float:
        return self.metrics["test"]["accuracy"]


def run(recipe: Recipe | str | Path, out: str | Path | None = None, *, log: Callable[[str], None] = print) -> RunResult:
    """Run a whole recipe and return its metrics, model and run folder.

    The run folder holds ``recipe.yaml`` (resolved), ``history.csv`` (one row
    per epoch, written as it happens), ``checkpoint.keras`` and ``state.json``
    (as epochs finish, at most every ``training.checkpoint_seconds``, and on
    Ctrl-C), ``model.keras``, ``metrics.json``, ``confusion_matrix.png`` and
    ``saved_model/``. Everything that can fail on bad input (the ``--out``
    folder, data, weights, phases) fails before the folder exists. Ctrl-C
    raises :class:`~finetune.errors.RunInterrupted`, naming the folder that
    :func:`resume` continues.
    """
    recipe, plan = prepare(recipe)
    started = time.perf_counter()
    check_run_dir(out)
    dataset = load_data(plan)
    model, layout = build(plan, dataset)
    folder = RunFolder.claim(out, recipe)
    with folder.locked(), interrupts_named(folder), folder.recording():
        announce(plan, dataset, layout, folder, log)
        model_stage.fit_input_statistics(model, plan.model, dataset.train.images)
        return train_and_conclude(model, layout, plan, recipe, dataset, folder, started, log)


def train_and_conclude(
    model,
    layout,
    plan: RunPlan,
    recipe: Recipe,
    dataset: Dataset,
    folder: RunFolder,
    started: float,
    log,
    resume_from=None,
) -> RunResult:
    """The phases (from ``resume_from``'s epoch when given), evaluation and export; the folder marked finished."""
    train(
        model,
        layout,
        plan.phases,
        plan.training,
        dataset,
        folder.path,
        seed=plan.seed,
        log=log,
        phase_done=folder.phase_done,
        resume_from=resume_from,
    )
    return conclude(model, plan, recipe, dataset, folder, started, log)


def conclude(model, plan: RunPlan, recipe: Recipe, dataset: Dataset, folder: RunFolder, started: float, log):
    """Evaluation and export of a trained model, then the folder marked finished."""
    history = read_history(folder.path / "history.csv")
    metrics = evaluate(model, plan, dataset, history, started)
    save(model, plan, dataset, metrics, folder)
    folder.finish()
    test = metrics["test"]
    log(
        f"[finetune] test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f} on {test['examples']} images; "
        f"{metrics['seconds']:.0f}s; results in {folder.path}"
    )
    return RunResult(run_dir=folder.path, metrics=metrics, model=model, recipe=recipe, history=history)


@contextlib.contextmanager
def interrupts_named(folder: RunFolder):
    """Ctrl-C leaves as :class:`RunInterrupted`, which names the folder to resume."""
    try:
        yield
    except RunInterrupted:
        raise
    except KeyboardInterrupt:
        raise RunInterrupted(folder.path) from None


def load_data(plan: RunPlan) -> Dataset:
    """The run's images, seeded (the model's input shape and class count come from them)."""
    peek_class_names(plan.data)  # a missing folder or unknown class fails before anything is read
    keras.utils.set_random_seed(plan.seed)
    return load_dataset(plan.data, plan.seed)


def build(plan: RunPlan, dataset: Dataset):
    """The model for ``dataset``, and its backbone's blocks (the phases are checked against them)."""
    model = model_stage.assemble(plan.model, dataset.input_shape, dataset.num_classes)
    layout = model_stage.layout(model, plan.model)
    check_phases(layout, plan.phases)
    return model, layout


def announce(plan: RunPlan, dataset: Dataset, layout, folder: RunFolder, log: Callable[[str], None]) -> None:
    log(f"[finetune] run folder {folder.path}")
    log(
        f"[finetune] backend {keras.backend.backend()}, precision {model_stage.resolve_precision(plan.model.precision)}"
    )
    validation = len(dataset.validation) if dataset.validation is not None else 0
    log(
        f"[finetune] data {plan.data.source} from {dataset.source}: {len(dataset.train)} train, {validation} "
        f"validation, {len(dataset.test)} test images of {dataset.input_shape} -> {plan.data.image_hw}, "
        f"{dataset.num_classes} classes"
    )
    for notice in plan.notices:
        log(f"[finetune] note: {notice}")
    for warning in setup_warnings(layout, plan.model.weights, plan.phases):
        log(f"[finetune] warning: {warning}")


def evaluate(model, plan: RunPlan, dataset: Dataset, history: list[dict], started: float) -> dict:
    """Test metrics of the trained model, with the run's context; validation from its last epoch."""
    test = metrics_stage.evaluate(
        model,
        dataset.test,
        dataset.class_names,
        plan.evaluation.batch_size,
        plan.evaluation.mc_samples,
        plan.evaluation.tta,
    )
    metrics = {
        "test": test,
        "recipe": plan.name,
        "precision": model_stage.resolve_precision(plan.model.precision),
        "backend": keras.backend.backend(),
        "train_images": len(dataset.train),
        "validation_images": len(dataset.validation) if dataset.validation is not None else 0,
        "seconds": round(time.perf_counter() - started, 2),
    }
    if dataset.validation is not None and history and history[-1].get("val_accuracy"):
        # The last epoch already measured the final model on the validation split.
        metrics["validation"] = {
            "loss": float(history[-1]["val_loss"]),
            "accuracy": float(history[-1]["val_accuracy"]),
            "examples": len(dataset.validation),
        }
    return metrics


def save(model, plan: RunPlan, dataset: Dataset, metrics: dict, folder: RunFolder) -> None:
    """``model.keras``, ``metrics.json``, the confusion-matrix picture and the export formats, each verified."""
    folder.save_model(model)
    folder.write_json("metrics.json", metrics)
    write_atomically(
        folder.path / "confusion_matrix.png",
        lambda path: pictures.confusion_matrix_png(
            metrics["test"]["confusion_matrix"], dataset.class_names, path, f"{plan.name}: test split"
        ),
    )
    images = dataset.test.images[: plan.export.verify_images]
    formats, quantization = plan.export.formats, plan.export.tflite_quantization
    metrics["export"] = export_all(model, folder.path, formats, quantization, dataset.class_names, images)
    folder.write_json("metrics.json", metrics)
