"""The orchestrator: recipe -> data -> model -> phases -> evaluation -> export."""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from finetune.errors import RunFolderError
from finetune.recipe import Recipe, load_recipe


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


def check_run_dir(out: str | Path | None) -> None:
    """Refuse an ``--out`` folder that holds anything: earlier runs are never overwritten."""
    if out is None:
        return
    path = Path(out)
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise RunFolderError(
            f"run folder {str(path)!r} already exists and is not empty; choose another --out "
            "(earlier runs are never overwritten)"
        )


def new_run_dir(out: str | Path | None, recipe_name: str, root: Path = Path("runs")) -> Path:
    """A fresh run folder; an existing, non-empty one is never reused."""
    if out is not None:
        check_run_dir(out)
        path = Path(out)
        path.mkdir(parents=True, exist_ok=True)
        return path
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = root / f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', recipe_name)}-{stamp}"
    for attempt in range(1, 1000):
        path = base if attempt == 1 else base.with_name(f"{base.name}-{attempt}")
        try:
            path.mkdir(parents=True, exist_ok=False)
            return path
        except FileExistsError:
            continue
    raise RunFolderError(f"cannot create a new run folder next to {base}")


def run(recipe: Recipe | str | Path, out: str | Path | None = None, *, log: Callable[[str], None] = print) -> RunResult:
    """Run a whole recipe and return its metrics, model and run folder.

    The run folder holds ``recipe.yaml`` (resolved), ``history.csv`` (one row
    per epoch, written as it happens), ``checkpoint.keras`` and ``state.json``
    (as epochs finish, at most every ``training.checkpoint_seconds``, and on
    Ctrl-C), ``model.keras``, ``metrics.json``, ``confusion_matrix.png`` and
    ``saved_model/``.
    """
    import keras

    from finetune import caching, data, evaluation, export, report, schedules, training
    from finetune.model import build_model, resolve_precision

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    started = time.perf_counter()
    # Everything that can fail on bad input (the --out folder, data, weights, phases) fails before a
    # run folder exists, so failed attempts leave nothing behind.
    check_run_dir(out)
    data.peek_class_names(recipe.data)
    keras.utils.set_random_seed(recipe.seed)
    precision = resolve_precision(recipe.precision)
    # Data first: the model's input shape and class count come from it.
    dataset = data.load_dataset(recipe.data, recipe.seed)
    model = build_model(recipe, input_shape=dataset.input_shape, num_classes=dataset.num_classes)
    training.check_phases(model, recipe)

    run_dir = new_run_dir(out, recipe.name)
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    status = {"status": "running", "started": datetime.now().isoformat(timespec="seconds"), "phases_done": []}
    training.write_json_atomically(run_dir / "run.json", status)
    checkpoint = None
    # The frozen part's outputs, shared by the phases that keep it frozen.
    features = caching.FeatureStore(recipe, run_dir / "cache", log)
    try:
        log(f"[finetune] run folder {run_dir}")
        log(f"[finetune] backend {keras.backend.backend()}, precision {precision}")
        log(
            f"[finetune] data {recipe.data.source} from {dataset.source}: {len(dataset.train)} train, "
            f"{len(dataset.validation) if dataset.validation is not None else 0} validation, "
            f"{len(dataset.test)} test images of {dataset.input_shape} -> {recipe.data.image_hw}, "
            f"{dataset.num_classes} classes"
        )
        for notice in recipe.notices:
            log(f"[finetune] note: {notice}")
        for warning in training.recipe_warnings(model, recipe):
            log(f"[finetune] warning: {warning}")
        backbone_input = model.get_layer("backbone_input")
        # A reused run's backbone keeps the statistics it was trained with (set by build_model).
        if backbone_input.preprocessing == "standardize" and recipe.model.backbone.name != "run":
            backbone_input.adapt(dataset.train.images)
        epochs_done = 0
        for index, phase in enumerate(recipe.phases):
            if phase.epochs == 0:
                log(f"[finetune] phase {phase.name}: 0 epochs, skipped")
                continue
            plan = training.configure_phase(model, recipe, phase)
            steps = training.steps_per_epoch(recipe, phase, len(dataset.train))
            setup = training.compile_for_phase(model, phase, steps, run_dir, recipe.training)
            what = (
                "backbone frozen" if not plan.trainable_blocks
                else f"{len(plan.trainable_blocks)} of {plan.total_blocks} backbone blocks trainable "
                f"({plan.trainable_backbone_weights:,} of {plan.backbone_weights:,} backbone weights)"
            )
            log(
                f"[finetune] phase {phase.name} ({index + 1}/{len(recipe.phases)}): {phase.epochs} epochs, {what}, "
                f"{phase.optimizer.name} lr {phase.optimizer.learning_rate:g}"
                + (f", schedule {schedules.schedule_spec(phase.schedule).name}" if phase.schedule else "")
                + (f", backbone lr x{phase.backbone_lr_multiplier:g}" if phase.backbone_lr_multiplier != 1 else "")
            )
            checkpoint = training.EpochCheckpoint(
                run_dir, phase.name, index, epochs_done, full_model=model,
                every_seconds=recipe.training.checkpoint_seconds, last_epoch=epochs_done + phase.epochs,
            )
            callbacks = [
                training.HistoryCSV(run_dir / "history.csv", phase.name, epochs_done),
                checkpoint,
                *setup.callbacks,
            ]
            training.fit_phase(model, recipe, phase, dataset, initial_epoch=epochs_done, callbacks=callbacks,
                               log=log, features=features)
            checkpoint = None  # the phase's last epoch is saved; a later Ctrl-C has no epoch to save
            epochs_done += phase.epochs
            status["phases_done"].append(phase.name)
            training.write_json_atomically(run_dir / "run.json", status)

        features.close()  # frees the kept features before the test pass
        test_metrics = evaluation.evaluate(model, dataset.test, dataset.class_names, recipe.evaluation.batch_size,
                                           recipe.evaluation.mc_samples)
        metrics = {
            "test": test_metrics,
            "recipe": recipe.name,
            "precision": precision,
            "backend": keras.backend.backend(),
            "train_images": len(dataset.train),
            "validation_images": len(dataset.validation) if dataset.validation is not None else 0,
            "seconds": round(time.perf_counter() - started, 2),
        }
        history = _read_history(run_dir / "history.csv")
        if dataset.validation is not None and history and history[-1].get("val_accuracy"):
            # The last epoch already measured the final model on the validation split.
            metrics["validation"] = {"loss": float(history[-1]["val_loss"]),
                                     "accuracy": float(history[-1]["val_accuracy"]),
                                     "examples": len(dataset.validation)}
        training.save_model_atomically(model, run_dir / "model.keras")
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        report.confusion_matrix_png(
            test_metrics["confusion_matrix"], dataset.class_names, run_dir / "confusion_matrix.png",
            f"{recipe.name}: test split",
        )
        if recipe.export.saved_model:
            export.export_saved_model(model, run_dir / "saved_model", dataset.class_names)
        (run_dir / "checkpoint.keras").unlink(missing_ok=True)
        _remove_feature_cache(run_dir / "cache")
        status.update(status="finished", finished=datetime.now().isoformat(timespec="seconds"))
        training.write_json_atomically(run_dir / "run.json", status)
        log(
            f"[finetune] test accuracy {test_metrics['accuracy']:.4f}, loss {test_metrics['loss']:.4f} "
            f"on {test_metrics['examples']} images; {metrics['seconds']:.0f}s; results in {run_dir}"
        )
    except BaseException as error:
        features.close()
        if isinstance(error, KeyboardInterrupt) and checkpoint is not None:
            checkpoint.save_now(interrupted=True)  # between two steps, the weights are consistent
        status.update(status="interrupted" if isinstance(error, KeyboardInterrupt) else "failed",
                      error=str(error).splitlines()[0] if str(error) else type(error).__name__)
        training.write_json_atomically(run_dir / "run.json", status)
        raise
    return RunResult(run_dir=run_dir, metrics=metrics, model=model, recipe=recipe, history=history)


def _remove_feature_cache(folder: Path) -> None:
    """Cached features are large and rebuilt on demand: drop them once the run has finished."""
    import shutil

    if folder.is_dir():
        shutil.rmtree(folder)


def _read_history(path: Path) -> list[dict]:
    import csv

    if not path.exists():
        return []
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))
