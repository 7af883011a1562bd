"""The orchestrator: recipe -> data -> model -> phases -> evaluation -> export, one step per stage."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from finetune import model as model_stage
from finetune.allocator import keep_freed_memory
from finetune.data import Dataset, load_dataset, peek_class_names
from finetune.data.input_spec import describe_input, write_input_spec
from finetune.errors import RunInterrupted
from finetune.evaluation import metrics as metrics_stage
from finetune.export.formats import export_all
from finetune.plan import RunPlan, prepare
from finetune.progress import Progress
from finetune.recipe import Recipe, read_recipe
from finetune.report.write import write_pictures_and_report
from finetune.runner import distribution as distribute
from finetune.runner.folder import RunFolder, check_run_dir
from finetune.runner.summary import summary_lines
from finetune.training.checkpoints import read_history
from finetune.training.divergence import read_warnings
from finetune.training.phases import check_phases, setup_warnings, sized_phases
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


def run(
    recipe: Recipe | str | Path, out: str | Path | None = None, *, log: Callable[[str], None] | Progress = print
) -> RunResult:
    """Run a whole recipe and return its metrics, model and run folder.

    The run folder holds ``recipe.yaml`` (resolved), ``history.csv`` (one row
    per epoch, written as it happens), ``checkpoint.keras`` and ``state.json``
    (as epochs finish, at most every ``training.checkpoint_seconds``, and on
    Ctrl-C), ``model.keras``, ``metrics.json``, ``saved_model/``, the pictures
    (``learning_curves.png``, ``learning_rate.png``, ``confusion_matrix.png``,
    ``mistakes.png``) and ``report.html``. Everything that can fail on bad input (the ``--out``
    folder, data, weights, phases) fails before the folder exists. Ctrl-C
    raises :class:`~finetune.errors.RunInterrupted`, naming the folder that
    :func:`resume` continues.
    """
    keep_freed_memory()
    if not isinstance(recipe, Recipe):  # a multi-worker engine starts before anything runs TensorFlow
        distribute.start(read_recipe(recipe).distribution)
    recipe, plan = prepare(recipe)
    log = Progress.of(log)
    started = time.perf_counter()
    distribution = distribute.start(plan.distribution)
    facts = {"distribution": distribution.record(plan)}
    described = distribution.describe(plan)
    plan = distribution.adjust(plan)  # global batch sizes, scaled learning rates
    with distribute.worker_folder(out, distribution) as out:
        check_run_dir(out)
        dataset = load_data(plan)
        plan = sized_to_data(plan, dataset)
        with distribute.scope(distribution):
            model, layout = build(plan, dataset)
        folder = RunFolder.claim(out, recipe)
        with folder.locked(), interrupts_named(folder), folder.recording():
            announce(plan, dataset, layout, folder, log)
            folder.note(**facts)
            if distribution.strategy != "none":
                log(f"[finetune] {described}")
            with distribute.scope(distribution):
                model_stage.fit_input_statistics(model, plan.model, dataset.train.images)
            return train_and_conclude(
                model, layout, plan, recipe, dataset, folder, started, log, distribution=distribution, facts=facts
            )


def train_and_conclude(
    model,
    layout,
    plan: RunPlan,
    recipe: Recipe,
    dataset: Dataset,
    folder: RunFolder,
    started: float,
    log,
    *,
    distribution: distribute.Distribution,
    resume_from=None,
    facts: dict | None = None,
) -> RunResult:
    """The phases (from ``resume_from``'s epoch when given) under ``distribution``, then evaluation and export
    outside it (a SavedModel traced inside a tf.distribute scope cannot run outside one); the folder marked
    finished."""
    with distribute.scope(distribution):
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
            run_clock=lambda: time.perf_counter() - started,
        )
    return conclude(model, plan, recipe, dataset, folder, started, log, facts)


def conclude(
    model,
    plan: RunPlan,
    recipe: Recipe,
    dataset: Dataset,
    folder: RunFolder,
    started: float,
    log,
    facts: dict | None = None,
):
    """Evaluation and export of a trained model, then the folder marked finished; ``facts`` join metrics.json."""
    log = Progress.of(log)
    history = read_history(folder.path / "history.csv")
    log.live(f"[finetune] evaluating on {len(dataset.test):,} test images", force=True)
    metrics, probabilities = evaluate(model, plan, dataset, history, started)
    metrics.update(facts or {})
    warnings = read_warnings(folder.path)
    if warnings:
        metrics["warnings"] = warnings
    save(model, plan, dataset, metrics, folder, log, probabilities, history)
    folder.finish()
    for line in summary_lines(history, metrics, folder.path):
        log(f"[finetune] {line}")
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


def sized_to_data(plan: RunPlan, dataset: Dataset) -> RunPlan:
    """``plan`` with each phase long enough for its ``min_steps`` on ``dataset``'s training split (said in notices)."""
    phases, notes = sized_phases(plan.phases, plan.training, len(dataset.train))
    return dataclasses.replace(plan, phases=phases, notices=(*plan.notices, *notes))


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


def evaluate_test_split(model, plan: RunPlan, dataset: Dataset) -> tuple[dict, Any]:
    """The test split's metrics and class probabilities, with the recipe's evaluation settings."""
    evaluation = plan.evaluation
    return metrics_stage.evaluate_with_probabilities(
        model, dataset.test, dataset.class_names, evaluation.batch_size, evaluation.mc_samples, evaluation.tta
    )


def evaluate(model, plan: RunPlan, dataset: Dataset, history: list[dict], started: float) -> tuple[dict, Any]:
    """Test metrics of the trained model, with the run's context (validation from its last epoch),
    and its class probabilities for each test image (for the pictures; too big for metrics.json)."""
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
        "seconds": round(time.perf_counter() - started, 2),
    }
    if dataset.validation is not None and history and history[-1].get("val_accuracy"):
        # The last epoch already measured the final model on the validation split.
        metrics["validation"] = {
            "loss": float(history[-1]["val_loss"]),
            "accuracy": float(history[-1]["val_accuracy"]),
            "examples": len(dataset.validation),
        }
    return metrics, probabilities


def save(
    model, plan: RunPlan, dataset: Dataset, metrics: dict, folder: RunFolder, log, probabilities, history: list[dict]
) -> None:
    """``model.keras``, ``input.json``, ``metrics.json``, the export formats (each reloaded and checked against
    the model), then the pictures and ``report.html``."""
    folder.save_model(model)
    # What `finetune predict` needs to turn any picture into this model's input (shape, resize, background).
    input_spec = describe_input(dataset.train.images, dataset.class_names, plan.data.resize)
    write_input_spec(folder.path, input_spec)
    folder.write_json("metrics.json", metrics)
    images = dataset.test.images[: plan.export.verify_images]
    formats, quantization = plan.export.formats, plan.export.tflite_quantization
    metrics["export"] = export_all(model, folder.path, formats, quantization, dataset.class_names, images)
    if "saved_model" in formats:
        write_input_spec(folder.path / "saved_model", input_spec)  # predict reads it beside labels.txt
    folder.write_json("metrics.json", metrics)
    for problem in write_pictures_and_report(folder.path, plan.name, history, metrics, dataset.test, probabilities):
        log(f"[finetune] warning: picture not drawn: {problem}")
