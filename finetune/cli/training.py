"""Commands that train: ``run``, ``resume``, ``validate`` (what a run would do) and ``lr-find``."""

from __future__ import annotations

import shlex

import click

from finetune.cli.base import QUIET, SET_HELP, lines_on_stderr, load_backend_quietly, main, reported
from finetune.errors import FinetuneError


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Run folder (must not exist or be empty). Default: runs/<recipe name>-<time>.",
)
@QUIET
@reported
def run(recipe, overrides, out, quiet):
    """Train and evaluate RECIPE, then export the model.

    Writes recipe.yaml, history.csv, metrics.json, model.keras, the
    export.formats (saved_model/ by default), the pictures and report.html
    into the run folder. Progress goes to stderr: a live line on a
    terminal, one line per epoch otherwise.
    """
    load_backend_quietly()  # before anything imports Keras
    # Imported here: a command pays for what it uses; `finetune --help` loads no Keras.
    from finetune.runner.pipeline import run as run_recipe

    with lines_on_stderr(quiet):  # the run reads the recipe once, and starts its distribution before TensorFlow runs
        run_recipe(recipe, out=out, overrides=list(overrides), log=None, times=started_process())


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@QUIET
@reported
def resume(run_dir, quiet):
    """Continue the interrupted or killed run in RUN_DIR where its last checkpoint stood.

    Finished phases are not redone; a finished run is left as it is.
    """
    load_backend_quietly()
    # Imported here: a command pays for what it uses; `finetune --help` loads no Keras.
    from finetune.runner.resume import resume as resume_run

    with lines_on_stderr(quiet):
        resume_run(run_dir, log=None, times=started_process())


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@reported
def validate(recipe, overrides):
    """Check RECIPE without training; print what it would do."""
    load_backend_quietly()
    # Imported here: a command pays for what it uses; `finetune --help` loads no Keras.
    from finetune.data import peek_class_names
    from finetune.plan import load_recipe, preflight

    loaded = load_recipe(recipe, list(overrides))
    # Class names when they are cheap to find (no image is decoded); data errors surface here.
    class_names = peek_class_names(loaded.data)
    # What a run finds next, before training: the backbone's blocks, where its weights come from.
    checked = preflight(loaded)
    height, width = loaded.data.image_hw
    backbone = loaded.model.backbone
    cut = f" cut after {backbone.cut_at}" if backbone.cut_at else ""
    if backbone.top_blocks_removed:
        cut = f" without its top {backbone.top_blocks_removed} blocks"
    click.echo(
        f"{recipe}: valid. {loaded.data.source} -> {backbone.name} "
        f"({backbone.weights or 'random init'}){cut} at {height}x{width}, precision {loaded.precision}"
    )
    if loaded.model.augment:
        click.echo(f"  augment (training only): {_names(loaded.model.augment)}")
    if loaded.training.mix:
        click.echo(f"  mix (training batches only): {_names(loaded.training.mix)}")
    if class_names is not None:
        shown = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
        folder = f" {loaded.data.data_dir}" if loaded.data.data_dir else ""
        click.echo(f"  data {loaded.data.source}{folder}: {len(class_names)} classes ({shown})")
    for line in _split_lines(loaded.data):
        click.echo(f"    {line}")
    for phase in loaded.phases:
        trainable = phase.trainable if isinstance(phase.trainable, str) else f"top {phase.trainable.top_blocks} blocks"
        click.echo(f"  phase {phase.name}: {phase.epochs} epochs, backbone trainable: {trainable}, {phase.describe()}")
    for notice in [*checked, *loaded.notices]:
        click.echo(f"note: {notice}")


@main.command("lr-find")
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--phase", help="The phase to sweep (default: the first); earlier phases are trained first.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--steps", type=int, default=200, show_default=True, help="Batches in the sweep (at most).")
@click.option("--start", type=float, default=1e-7, show_default=True, help="First learning rate.")
@click.option("--end", type=float, default=10.0, show_default=True, help="Last learning rate.")
@click.option(
    "--from",
    "from_run",
    type=click.Path(file_okay=False),
    help="Start from this finished run's model.keras instead of training the earlier phases.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False),
    help="Folder for lr_find.png and lr_find.json. Default: runs/lr_find-<recipe name>-<time>.",
)
@reported
def lr_find(recipe, phase, overrides, steps, start, end, from_run, out):
    """Sweep a phase's learning rate exponentially and suggest one (Hands-On ML ch. 11, fastai's lr_find).

    The loss is recorded while the rate grows from --start to --end; the
    suggestion is the rate at the lowest smoothed loss divided by 10. Prints
    the --set option that applies it.
    """
    load_backend_quietly()
    # Imported here: a command pays for what it uses; `finetune --help` loads no Keras.
    from finetune.plan import load_recipe
    from finetune.runner.lr_find import lr_find as find
    from finetune.training.lr_find import SweepSettings

    with lines_on_stderr():
        report = find(
            load_recipe(recipe, list(overrides)),
            phase,
            sweep=SweepSettings(start=start, end=end, steps=steps),
            out=out,
            from_run=from_run,
            log=None,
        )
    click.echo(f"suggested learning rate for phase {report.phase}: {report.rate}")
    click.echo(f"finetune run {shlex.quote(recipe)} {report.set_option}")


def _names(identifiers) -> str:
    return ", ".join(item if isinstance(item, str) else str(item.get("name")) for item in identifiers)


def _split_lines(config) -> list[str]:
    """Each split's images per class, when the source counts them without decoding (image_folder, csv)."""
    # Imported here: a command pays for what it uses.
    from finetune.data import peek_split_counts

    counts = peek_split_counts(config)
    if counts is None:
        return []
    lines = []
    for split, per_class in counts.items():
        shown = ", ".join(f"{name} {count}" for name, count in list(per_class.items())[:10])
        more = ", ..." if len(per_class) > 10 else ""
        # Multi-label: an image counts under each of its tags, so the counts do not add up to images.
        total = "images per tag" if config.multi_label else f"{sum(per_class.values())} images"
        line = f"{split}: {total} ({shown}{more})"
        if split == "train" and "validation" not in counts and config.validation_split > 0:
            line += f"; data.validation_split {config.validation_split:g} is held out of these"
        lines.append(line)
    return lines


def started_process():
    """A run's stage clock holding this process's start-up (interpreter, imports, the backend) as its first stage."""
    from finetune.progress import StageTimes, seconds_since_process_start

    times = StageTimes()
    startup = seconds_since_process_start()
    if startup is not None:
        times.add("start-up", startup)
    return times


@main.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option("--space", type=click.Path(dir_okay=False), help="The search space: YAML of recipe keys to ranges.")
@click.option("--trials", type=click.IntRange(min=1), default=None, help="Stop after this many trials in all.")
@click.option("--budget", default=None, help="Stop starting trials after this much time in all: 30m, 2h, 90s.")
@click.option(
    "--out", type=click.Path(file_okay=False), default=None, help="The study's folder (default runs/tune-NAME)."
)
@click.option("--workers", type=click.IntRange(min=1), default=1, show_default=True, help="Processes on the study.")
@click.option("--storage", default=None, help="An Optuna storage URL (default: DIR/study.db, SQLite).")
@click.option("--seed", type=int, default=0, show_default=True, help="The sampler's seed.")
@click.option(
    "--metric", default="val_accuracy", show_default=True, help="The epoch log to optimise (val_loss: minimised)."
)
@click.option("--pruner", type=click.Choice(["median", "halving", "none"]), default="median", show_default=True)
@click.option(
    "--fidelity",
    multiple=True,
    metavar="KEY=VALUE",
    help="A cheaper trial: data.train_limit=12000 (not in best_recipe.yaml).",
)
@click.option(
    "--resume", "resume_dir", type=click.Path(file_okay=False), default=None, help="Continue the study in DIR."
)
@click.option(
    "--in-process",
    is_flag=True,
    help="Run the trials in this process (each starts faster; memory grows trial by trial). "
    "Default: a process per trial.",
)
@click.option("--join", is_flag=True, hidden=True, help="A worker process of --workers.")
@QUIET
@reported
def tune(
    recipe, space, trials, budget, out, workers, storage, seed, metric, pruner, fidelity, in_process, resume_dir,
    join, quiet,
):  # fmt: skip
    """Search for the best values of RECIPE's keys in --space with Optuna; every trial is a run folder.

    \b
    finetune tune recipes/quickstart_lite0.yaml --space recipes/spaces/quickstart_lite0.yaml --budget 60m \\
        --fidelity data.train_limit=12000 --out runs/tune-quick
    finetune tune --resume runs/tune-quick          # after Ctrl-C or a kill: the same study goes on
    finetune run runs/tune-quick/best_recipe.yaml   # the best values, at full fidelity
    """
    from importlib.util import find_spec

    if find_spec("optuna") is None:
        raise FinetuneError("finetune tune needs optuna: pip install 'finetune[tune]'")
    load_backend_quietly()
    # Imported here: a command pays for what it uses; `finetune --help` loads no Keras or Optuna.
    from pathlib import Path

    from finetune.tuning import TuneSettings, parse_budget, start, summary_rows, work

    with lines_on_stderr(quiet):
        if resume_dir is not None:
            if recipe or space:
                raise FinetuneError("--resume DIR continues a study with its own recipe and space: give neither")
            result = work(resume_dir, workers=workers, joined=join)
            out = resume_dir
        else:
            if recipe is None or space is None:
                raise FinetuneError("give a RECIPE and --space SPACE.yaml (or --resume DIR)")
            out = out or str(Path("runs") / f"tune-{Path(recipe).stem}")
            settings = TuneSettings(
                out=out, trials=trials, budget_seconds=parse_budget(budget), metric=metric, pruner=pruner,
                seed=seed, storage=storage, fidelity=list(fidelity), in_process=in_process,
            )  # fmt: skip
            result = start(recipe, space, settings, workers=workers)
    if join:
        return
    from finetune.runner.compare import as_text

    rows = summary_rows(Path(out))
    if rows:
        click.echo(as_text(rows))
    counts = ", ".join(f"{count} {state}" for state, count in result.trials.items() if count)
    if result.best_trial is None:
        click.echo(f"no trial finished ({counts}); the study is in {out}")
    else:
        click.echo(
            f"best {metric} {result.best_value:.4f}: trial {result.best_trial} ({result.best_run_dir}); "
            f"{counts}; best recipe {result.best_recipe}"
        )
