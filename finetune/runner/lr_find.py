"""``finetune lr-find``: recipe -> data -> model -> [earlier phases] -> sweep of one phase -> picture and JSON."""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import keras

from finetune import model as model_stage
from finetune.errors import RecipeError, RunFolderError, first_line
from finetune.files import write_atomically, write_json_atomically
from finetune.progress import Progress, lines_to
from finetune.recipe import Recipe, read_recipe
from finetune.report.lr_plot import lr_find_png
from finetune.runner.session import RunSession, open_run
from finetune.training.lr_find import LRFinderResult, SweepSettings, find_phase_learning_rate
from finetune.training.train import train

logger = logging.getLogger(__name__)

FILES = ("lr_find.png", "lr_find.json")


@dataclass
class LRFindReport:
    """The sweep's result, where its files went, and the ``--set`` that applies the suggestion."""

    result: LRFinderResult
    phase: str
    out: Path

    @property
    def rate(self) -> str:
        """The suggestion to two significant digits, as it goes on the command line."""
        return f"{self.result.suggestion:.2g}"

    @property
    def set_option(self) -> str:
        return f"--set phases.{self.phase}.optimizer.learning_rate={self.rate}"


def lr_find(
    recipe: Recipe | str | Path,
    phase: str | None = None,
    *,
    sweep: SweepSettings = SweepSettings(),
    out: str | Path | None = None,
    from_run: str | Path | None = None,
    log: Callable[[str], None] | Progress | None = print,
) -> LRFindReport:
    """Sweep the learning rate of ``phase`` (default: the first) of ``recipe``; write ``lr_find.png`` and ``.json``.

    A later phase starts where the earlier ones leave the model: from
    ``from_run``'s ``model.keras`` when given, else the earlier phases are
    trained first, as ``finetune run`` would, in a temporary folder removed
    afterwards. ``out`` defaults to ``runs/lr_find-<recipe name>-<time>``.
    """
    recipe = recipe if isinstance(recipe, Recipe) else read_recipe(recipe)  # read once, checked before any data
    names = [candidate.name for candidate in recipe.phases]
    name = phase if phase is not None else names[0]
    if name not in names:
        raise RecipeError(f"--phase {name!r}: the recipe has no such phase (its phases: {', '.join(names)})")
    if not 0 < sweep.start < sweep.end:
        raise RecipeError(f"--start {sweep.start:g} and --end {sweep.end:g}: the sweep needs 0 < start < end")
    if sweep.steps < 2:
        raise RecipeError(f"--steps {sweep.steps}: the sweep needs at least 2 steps")
    folder = _out_folder(out, recipe.name)
    with lines_to(log), open_run(recipe, command="lr-find") as session:
        plan = session.plan
        session.fit_input_statistics()
        _train_earlier_phases(session, names.index(name), from_run)
        chosen = plan.phases[names.index(name)]
        logger.info(
            f"lr-find: phase {name}, {chosen.optimizer.name} at rates {sweep.start:g} to {sweep.end:g} over up to "
            f"{sweep.steps} steps of {plan.training.batch_size_for(chosen)} images"
        )
        seeded = dataclasses.replace(sweep, seed=plan.seed)
        result = find_phase_learning_rate(session.training(), chosen, seeded)
    report = LRFindReport(result, name, folder)
    _write(report, plan.name)
    stopped = "stopped when the loss exploded" if result.stopped_early else "ran every step"
    with lines_to(log):
        logger.info(
            f"lr-find: {len(result.learning_rates)} steps ({stopped}); lowest smoothed loss at "
            f"{result.minimum:.2g}, suggestion {report.rate} (that / 10); {folder / 'lr_find.png'}"
        )
    return report


def _train_earlier_phases(session: RunSession, index: int, from_run: str | Path | None) -> None:
    """The model as the phases before ``index`` leave it: ``from_run``'s, or trained here in a scratch folder."""
    names = [phase.name for phase in session.plan.phases]
    if from_run is not None:
        _load_run_weights(session.model, Path(from_run))
        logger.info(f"lr-find: starting from {Path(from_run) / 'model.keras'}")
    elif index > 0:
        logger.info(
            f"lr-find: phase {names[index]} starts where {', '.join(names[:index])} left the model; "
            "training those first in a temporary folder (pass --from RUN_DIR to start from a finished run instead)"
        )
        scratch = Path(tempfile.mkdtemp(prefix="finetune-lr-find-"))
        try:
            earlier = dataclasses.replace(session.training(run_dir=scratch), phases=session.plan.phases[:index])
            train(earlier)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)


def _write(report: LRFindReport, recipe_name: str) -> None:
    """``lr_find.json`` and ``lr_find.png`` into the report's folder."""
    result, folder = report.result, report.out
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomically(folder / "lr_find.json", {"recipe": recipe_name, "phase": report.phase, **result.to_dict()})
    write_atomically(
        folder / "lr_find.png",
        lambda path: lr_find_png(
            result.learning_rates,
            result.losses,
            result.suggestion,
            path,
            f"{recipe_name}: phase {report.phase}",
            result.raw_losses,
        ),
    )


def _out_folder(out: str | Path | None, recipe_name: str) -> Path:
    """``out`` (never overwriting an earlier sweep's files), or a new ``runs/lr_find-<name>-<time>``."""
    if out is not None:
        path = Path(out)
        if path.exists() and not path.is_dir():
            raise RunFolderError(f"--out {str(path)!r} is a file, not a folder")
        taken = [name for name in FILES if (path / name).exists()]
        if taken:
            raise RunFolderError(f"--out {str(path)!r} already holds {taken[0]}; choose another folder")
        return path
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"lr_find-{re.sub(r'[^A-Za-z0-9_.-]+', '_', recipe_name)}-{stamp}"
    path, attempt = base, 1
    while path.exists():
        attempt += 1
        path = base.with_name(f"{base.name}-{attempt}")
    return path


def _load_run_weights(model: keras.Model, run_dir: Path) -> None:
    saved_path = run_dir / "model.keras"
    if not saved_path.is_file():
        raise RunFolderError(f"--from {str(run_dir)!r}: no model.keras there (is it a finished run folder?)")
    saved = model_stage.load_model(saved_path, compile=False)
    try:
        model.set_weights(saved.get_weights())
    except ValueError as error:
        raise RunFolderError(
            f"--from {str(run_dir)!r}: its model does not fit this recipe's model ({first_line(error)})"
        ) from None
