"""The orchestrator: recipe -> data -> model -> phases -> evaluation -> export, one step per stage."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from finetune.progress import Progress, StageTimes, lines_to
from finetune.recipe import Recipe
from finetune.recipe.load import Overrides
from finetune.runner.conclude import RunResult, conclude
from finetune.runner.session import open_run

__all__ = ["RunResult", "run"]


def run(
    recipe: Recipe | str | Path,
    out: str | Path | None = None,
    *,
    overrides: Overrides = None,
    log: Callable[[str], None] | Progress | None = print,
    times: StageTimes | None = None,
    callbacks: Sequence[Any] = (),
) -> RunResult:
    """Run a whole recipe (a :class:`Recipe`, or a YAML file read with ``overrides``) and return its
    metrics, model and run folder.

    The run folder holds ``recipe.yaml`` (resolved), ``history.csv`` (one row
    per epoch, written as it happens), ``checkpoint.keras`` and ``state.json``
    (as epochs finish, at most every ``training.checkpoint_seconds``, and on
    Ctrl-C), ``model.keras``, ``metrics.json``, ``saved_model/``, the pictures
    and ``report.html``. Everything that can fail on bad input (the ``--out``
    folder, data, weights, phases) fails before the folder exists. Ctrl-C
    raises :class:`~finetune.errors.RunInterrupted`, naming the folder that
    :func:`resume` continues. The lines the run logs (the ``finetune`` logger)
    also go to ``log``; ``None`` leaves them to the application's logging. Each stage's seconds go to
    ``times`` (a new clock by default; the command line passes one holding the process's start-up), and
    from there to ``metrics.json``'s ``seconds_by_stage``. ``callbacks`` (Keras callbacks) see every phase's
    epochs after finetune's own: a tuner's pruning callback, say.
    """
    with lines_to(log), open_run(recipe, overrides=overrides, out=out, times=times) as session:
        session.observers.extend(callbacks)
        session.fit_input_statistics()  # recipe -> data -> model, opened above
        session.train()  # phases: set trainable -> new optimizer -> compile -> fit
        return conclude(session)  # evaluation -> model.keras + export formats -> pictures and report
