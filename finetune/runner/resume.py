"""Resume: an interrupted or killed run continues from its own folder, where its last checkpoint stood."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import keras

from finetune import model as model_stage
from finetune.allocator import keep_freed_memory
from finetune.errors import RunFolderError
from finetune.plan import prepare
from finetune.progress import Progress
from finetune.recipe import read_recipe
from finetune.runner import distribution as distribute
from finetune.runner.folder import RunFolder
from finetune.runner.pipeline import (
    RunResult,
    announce,
    build,
    interrupts_named,
    load_data,
    sized_to_data,
    train_and_conclude,
)
from finetune.training.checkpoints import read_checkpoint, read_history, truncate_history


def resume(run_dir: str | Path, *, log: Callable[[str], None] | Progress = print) -> RunResult:
    """Continue the run in ``run_dir`` from its ``recipe.yaml`` and ``checkpoint.keras``.

    Finished phases are not redone and their ``history.csv`` rows stay as
    they were; the interrupted phase goes on at the epoch after its last
    checkpoint, with the optimizer's state and step; rows of epochs after
    that checkpoint are dropped, as those epochs run again. A run whose
    training had finished redoes only evaluation and export. A finished run
    is left as it is. A folder whose ``recipe.yaml`` changed, or that another
    process holds, is refused in one line.
    """
    keep_freed_memory()
    log = Progress.of(log)
    folder = RunFolder.existing(run_dir)
    with folder.locked():
        if folder.status.get("status") == "finished":
            log(f"[finetune] run {folder.path} already finished; nothing to resume")
            return finished_result(folder)
        if folder.recipe_changed():
            raise RunFolderError(
                f"{str(folder.path / 'recipe.yaml')!r} was edited after the run started; resume runs the recipe "
                "it started with (start a new run for the edited one)"
            )
        config = read_recipe(folder.path / "recipe.yaml").distribution  # its engine starts before TensorFlow runs
        distribution = distribute.for_resume(config, folder.status.get("distribution"))
        recipe, plan = prepare(folder.path / "recipe.yaml")
        started = time.perf_counter()
        facts = {"distribution": distribution.record(plan)}
        described = distribution.describe(plan)
        plan = distribution.adjust(plan)
        dataset = load_data(plan)
        plan = sized_to_data(plan, dataset)
        with distribute.scope(distribution):
            model, layout = build(plan, dataset)
        with interrupts_named(folder), folder.recording(resumed=True):
            announce(plan, dataset, layout, folder, log)
            if distribution.strategy != "none" or distribution.started_with:
                log(f"[finetune] {described}")
            return _continue(model, layout, folder, recipe, plan, dataset, started, log, facts, distribution)


def _continue(model, layout, folder, recipe, plan, dataset, started, log, facts, distribution) -> RunResult:
    """Training from the last checkpoint (or from the start when there is none), then evaluation and export."""
    checkpoint = read_checkpoint(folder.path / "checkpoint.keras")
    if checkpoint is None:
        log("[finetune] no checkpoint yet: training starts from the beginning")
        truncate_history(folder.path / "history.csv", 0)
        with distribute.scope(distribution):
            model_stage.fit_input_statistics(model, plan.model, dataset.train.images)
    else:
        saved = keras.saving.load_model(checkpoint.path, compile=False, safe_mode=True)
        model.set_weights(saved.get_weights())
        truncate_history(folder.path / "history.csv", checkpoint.state["epochs_done"])
        state = checkpoint.state
        log(f"[finetune] resuming after epoch {state['epochs_done']} (phase {state['phase']})")
        # The run's time goes on from the checkpoint's: the work kept counts, the work redone once.
        started -= state.get("run_seconds", 0.0)
    return train_and_conclude(
        model,
        layout,
        plan,
        recipe,
        dataset,
        folder,
        started,
        log,
        distribution=distribution,
        resume_from=checkpoint,
        facts=facts,
    )


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
