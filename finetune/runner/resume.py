"""Resume: an interrupted or killed run continues from its own folder, where its last checkpoint stood."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import keras

from finetune import model as model_stage
from finetune.errors import RunFolderError
from finetune.plan import prepare
from finetune.progress import Progress, StageTimes, lines_to
from finetune.runner.conclude import RunResult, conclude
from finetune.runner.folder import RunFolder
from finetune.runner.session import RunSession, open_run
from finetune.training.checkpoints import read_checkpoint
from finetune.training.history_file import read_history, truncate_history
from finetune.training.state import Checkpoint

logger = logging.getLogger(__name__)


def resume(
    run_dir: str | Path, *, log: Callable[[str], None] | Progress | None = print, times: StageTimes | None = None
) -> RunResult:
    """Continue the run in ``run_dir`` from its ``recipe.yaml`` and ``checkpoint.keras``.

    Finished phases are not redone and their ``history.csv`` rows stay as
    they were; the interrupted phase goes on at the epoch after its last
    checkpoint, with the optimizer's state and step; rows of epochs after
    that checkpoint are dropped, as those epochs run again. A run whose
    training had finished redoes only evaluation and export. A finished run
    is left as it is. A folder whose ``recipe.yaml`` changed, or that another
    process holds, is refused in one line. ``times`` as for :func:`~finetune.runner.run`; the seconds of
    the processes before this one are one stage, ``earlier processes``.
    """
    folder = RunFolder.existing(run_dir)
    with lines_to(log), folder.locked():
        if folder.status.get("status") == "finished":
            logger.info(f"run {folder.path} already finished; nothing to resume")
            return finished_result(folder)
        if folder.recipe_changed():
            raise RunFolderError(
                f"{str(folder.path / 'recipe.yaml')!r} was edited after the run started; resume runs the recipe "
                "it started with (start a new run for the edited one)"
            )
        with open_run(folder.path / "recipe.yaml", resume=folder, times=times) as session:
            checkpoint = restore(session)
            session.train(resume_from=checkpoint)
            return conclude(session)


def restore(session: RunSession) -> Checkpoint | None:
    """The run's last checkpoint put back into the session's model (None: training starts from the beginning),
    with ``history.csv`` cut to it and the run's clock going on from it."""
    assert session.folder is not None
    path = session.folder.path
    checkpoint = read_checkpoint(path / "checkpoint.keras")
    if checkpoint is None:
        logger.info("no checkpoint yet: training starts from the beginning")
        truncate_history(path / "history.csv", 0)
        session.fit_input_statistics()
        return None
    saved = keras.saving.load_model(checkpoint.path, compile=False, safe_mode=True)
    session.model.set_weights(saved.get_weights())
    state = checkpoint.state
    truncate_history(path / "history.csv", state.epochs_done)
    logger.info(f"resuming after epoch {state.epochs_done} (phase {state.phase})")
    # The run's time goes on from the checkpoint's: the work kept counts, the work redone once.
    session.started -= state.run_seconds or 0.0
    session.times.add("earlier processes", state.run_seconds or 0.0)
    return checkpoint


def finished_result(folder: RunFolder) -> RunResult:
    """What a finished run left in its folder."""
    recipe, _ = prepare(folder.path / "recipe.yaml")
    return RunResult(
        run_dir=folder.path,
        metrics=folder.read_json("metrics.json"),
        model=model_stage.load_model(folder.path / "model.keras"),
        recipe=recipe,
        history=read_history(folder.path / "history.csv"),
    )
