"""``finetune evaluate``: a finished run's model on another split or dataset, into a new subfolder of the run."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from finetune import model as model_stage
from finetune.errors import ModelError, RecipeError, RunFolderError
from finetune.files import write_json_atomically, write_text_atomically
from finetune.plan import prepare
from finetune.progress import Progress, lines_to, live
from finetune.recipe import parse_assignments, read_recipe
from finetune.report.write import write_pictures_and_report
from finetune.runner.conclude import evaluate_test_split
from finetune.runner.distribution import one_process_note
from finetune.runner.folder import RunFolder
from finetune.runner.session import load_data

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
    for key in parse_assignments(overrides, "--set", "data.test_limit=null"):
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
    dataset = load_data(plan)
    model = model_stage.load_model(folder.path / "model.keras")
    classes = model.output_shape[-1]
    if dataset.num_classes != classes:
        raise RecipeError(
            f"the data has {dataset.num_classes} classes and the model {classes}: evaluate on the run's classes"
        )
    live(f"evaluating {folder.path} on {len(dataset.test):,} test images", force=True)
    metrics, probabilities = evaluate_test_split(model, plan, dataset)
    metrics = {"test": metrics, "run": str(folder.path), "overrides": overrides, "data": dataset.source}
    with folder.locked():
        out = _new_evaluation_folder(folder.path / "evaluations")
        write_text_atomically(out / "recipe.yaml", recipe.to_yaml())
        write_json_atomically(out / "metrics.json", metrics)
        title = f"{plan.name}: evaluation"
        for problem in write_pictures_and_report(out, title, [], metrics, dataset.test, probabilities):
            logger.warning(f"picture not drawn: {problem}")
    test = metrics["test"]
    logger.info(
        f"test accuracy {test['accuracy']:.4f}, loss {test['loss']:.4f} on {test['examples']:,} images; "
        f"results in {out}"
    )
    return Evaluation(out, metrics)


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
