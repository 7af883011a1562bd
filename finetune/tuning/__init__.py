"""Searching for the best recipe on Optuna: ``finetune tune`` and :func:`tune`.

A space of recipe keys (as ``--set`` names them), Optuna's seeded TPE sampler, a pruner fed each
epoch's validation metric, a storage that survives a kill and that several processes share; every
trial a normal run folder.
"""

from __future__ import annotations

from pathlib import Path

from finetune.tuning.study import TuneResult, TuneSettings, parse_budget, read_settings, start, summary_rows, work

__all__ = ["TuneResult", "TuneSettings", "parse_budget", "read_settings", "start", "summary_rows", "tune", "work"]


def tune(
    recipe: str | Path,
    space: str | Path,
    *,
    out: str | Path,
    trials: int | None = None,
    budget: str | None = None,
    metric: str = "val_accuracy",
    pruner: str = "median",
    seed: int = 0,
    storage: str | None = None,
    fidelity: tuple[str, ...] = (),
    workers: int = 1,
    in_process: bool = False,
) -> TuneResult:
    """Search ``space`` around the recipe file ``recipe`` into ``out``; the study's best value, trial
    folder and ``best_recipe.yaml``. Each trial runs in a process of its own unless ``in_process``."""
    settings = TuneSettings(
        out=str(out),
        trials=trials,
        budget_seconds=parse_budget(budget),
        metric=metric,
        pruner=pruner,
        seed=seed,
        storage=storage,
        fidelity=list(fidelity),
        in_process=in_process,
    )
    return start(recipe, space, settings, workers=workers)
