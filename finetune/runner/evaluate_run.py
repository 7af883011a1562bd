"""``finetune evaluate``: a finished run's model on another split or dataset, into a new subfolder of the run."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from finetune import model as model_stage
from finetune.data import Dataset, relabel_by_name
from finetune.data.input_spec import read_input_spec, read_thresholds
from finetune.data.sources import get as get_source
from finetune.errors import DataError, ModelError, RecipeError, RunFolderError
from finetune.files import write_json_atomically, write_text_atomically
from finetune.inference.explain import overlays_for
from finetune.plan import prepare
from finetune.progress import Progress, lines_to, live
from finetune.recipe import parse_assignments, read_recipe
from finetune.report.write import write_pictures_and_report
from finetune.runner.conclude import evaluate_test_split
from finetune.runner.distribution import one_process_note
from finetune.runner.folder import RunFolder
from finetune.runner.session import load_data

if TYPE_CHECKING:
    import keras

    from finetune.recipe.schema import DataConfig

logger = logging.getLogger(__name__)

# What an evaluation may change: where the images come from and how they are predicted, never the model.
CHANGEABLE = ("data.", "evaluation.")


@dataclass
class Evaluation:
    folder: Path
    metrics: dict


def evaluate_run(
    run_dir: str | Path, overrides: list[str] | None = None, *, log: Callable[[str], None] | Progress | None = print
) -> Evaluation:
    """Evaluate ``run_dir``'s ``model.keras`` on the test split of its recipe's data with ``overrides``
    (``data.KEY=VALUE`` or ``evaluation.KEY=VALUE``).

    Writes ``recipe.yaml`` (as evaluated), ``metrics.json``, ``confusion_matrix.png``,
    ``mistakes.png`` and ``report.html`` into ``RUN_DIR/evaluations/<time>/``; nothing of
    the run itself changes.
    """
    with lines_to(log):
        return _evaluate(run_dir, list(overrides or []))


def _evaluate(run_dir: str | Path, overrides: list[str]) -> Evaluation:
    keys = set(parse_assignments(overrides, "--set", "data.test_limit=null"))
    for key in keys:
        if not key.startswith(CHANGEABLE):
            raise RecipeError(f"--set {key}: evaluate changes only data.* and evaluation.* (the model is trained)")
    folder = RunFolder.existing(run_dir)
    if folder.status.get("status") != "finished" or not (folder.path / "model.keras").is_file():
        raise RunFolderError(
            f"{str(folder.path)!r} holds no finished run (status {folder.status.get('status')!r}); "
            f"finish it with: finetune resume {folder.path}"
        )
    recipe, plan = prepare(read_recipe(folder.path / "recipe.yaml", overrides))
    if note := one_process_note(plan.distribution, "evaluate"):
        logger.info(note)
    model = model_stage.load_model(folder.path / "model.keras")
    stored = tuple(int(size) for size in model.input_shape[1:])
    _check_image_size(model, plan.data)
    height, width = stored[0], stored[1]
    if (
        "data.stored_size" not in keys
        and plan.data.stored_hw != (height, width)
        and get_source(plan.data.source).resizes
    ):
        # Decoded at the size the model takes, as its training images were (a resizing source's default is image_size).
        recipe.data.stored_size = height if height == width else (height, width)
        plan = dataclasses.replace(plan, data=recipe.data)
    dataset = _matched_to_model(load_data(plan), folder.path, stored, int(model.output_shape[-1]))
    live(f"evaluating {folder.path} on {len(dataset.test):,} test images", force=True)
    # A multi-label model decides with the thresholds it was saved with (chosen on its run's validation split).
    thresholds = read_thresholds(folder.path, dataset.class_names) if dataset.multi_label else None
    metrics, probabilities = evaluate_test_split(model, plan, dataset, thresholds)
    metrics = {"test": metrics, "run": str(folder.path), "overrides": overrides, "data": dataset.source}
    with folder.locked():
        out = _new_evaluation_folder(folder.path / "evaluations")
        write_text_atomically(out / "recipe.yaml", recipe.to_yaml())
        write_json_atomically(out / "metrics.json", metrics)
        title = f"{plan.name}: evaluation"
        problems = write_pictures_and_report(
            out, title, [], metrics, dataset.test, probabilities, overlay=overlays_for(model)
        )
        for problem in problems:
            logger.warning(f"picture not drawn: {problem}")
    test = metrics["test"]
    if test.get("multi_label"):
        logger.info(
            f"test micro-F1 {test['micro_f1']:.4f}, macro-F1 {test['macro_f1']:.4f}, exact match "
            f"{test['exact_match']:.4f}, loss {test['loss']:.4f} on {test['examples']:,} images; results in {out}"
        )
        return Evaluation(out, metrics)
    logger.info(
        f"test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f} on {test['examples']:,} images; "
        f"results in {out}"
    )
    return Evaluation(out, metrics)


def _size(shape: tuple[int, ...]) -> str:
    return "x".join(str(size) for size in shape)


def _check_image_size(model: keras.Model, data: DataConfig) -> None:
    """Refuse a ``data.image_size`` other than the one the model resizes to inside itself (it is trained)."""
    try:
        layer = model.get_layer("backbone_input")
    except ValueError:  # a model without finetune's input layer: its input shape alone is checked
        return
    trained = (int(layer.height), int(layer.width))
    if data.image_hw != trained:
        raise RecipeError(
            f"data.image_size {_size(data.image_hw)}: the model was trained at {_size(trained)} and resizes "
            "its input to that itself; leave data.image_size out"
        )


def _matched_to_model(dataset: Dataset, run: Path, stored: tuple[int, ...], classes: int) -> Dataset:
    """``dataset`` refused unless the model can take its images, its labels numbered as the model's outputs."""
    if tuple(dataset.input_shape) != stored:
        channels = stored[-1]
        hint = (
            "leave data.stored_size out (evaluate then stores images at the model's size)"
            if tuple(dataset.input_shape[:2]) != stored[:2]
            else f"the model takes {channels}-channel ({'greyscale' if channels == 1 else 'colour'}) images"
        )
        raise DataError(
            f"the data's images are {_size(dataset.input_shape)} (height x width x channels) but the model was "
            f"trained on {_size(stored)} images; {hint}"
        )
    names = _run_class_names(run, classes)
    if names is None:  # a run saved before input.json, without labels.txt or metrics.json: numbers only
        if dataset.num_classes != classes:
            raise RecipeError(
                f"the data has {dataset.num_classes} classes and the model {classes}: evaluate on the run's classes"
            )
        logger.warning(f"{run} records no class names: the data's classes are taken in the model's order")
        return dataset
    return relabel_by_name(dataset, names, owner="the model")


def _run_class_names(run: Path, classes: int) -> tuple[str, ...] | None:
    """The model's class names in output order: ``input.json``, else ``metrics.json``, else ``labels.txt``."""
    candidates = []
    spec = read_input_spec(run)
    if spec is not None:
        candidates.append(spec.class_names)
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # an unreadable file only loses the names
        candidates.append(tuple(json.loads((run / "metrics.json").read_text())["test"]["class_names"]))
    with contextlib.suppress(OSError):
        candidates.append(tuple((run / "labels.txt").read_text().splitlines()))
    return next((tuple(map(str, names)) for names in candidates if len(names) == classes), None)


def _new_evaluation_folder(root: Path) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    for attempt in range(1, 1000):
        path = root / (stamp if attempt == 1 else f"{stamp}-{attempt}")
        try:
            path.mkdir(parents=True, exist_ok=False)
        except FileExistsError:
            continue
        return path
    raise ModelError(f"cannot create a new evaluation folder in {root}")
