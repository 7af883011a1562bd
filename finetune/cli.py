"""Command line: ``finetune run``, ``resume``, ``validate``, ``lr-find``, ``predict``, ``compare``,
``schema``, ``plugins`` and ``weights``.

Every command reports a problem the user can fix as one line on stderr with
exit code 2, an unexpected error as one line with exit code 1, and Ctrl-C
with exit code 130; ``--debug`` shows the traceback behind the line.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import sys
import traceback
import unicodedata

import click

from finetune import __version__
from finetune.errors import FinetuneError, describe

SET_HELP = (
    "Override a recipe value: a dotted path, phases addressed by name "
    "(phases.head.epochs=1); VALUE is read as YAML (null, 3, 1e-4, [96, 96]). Repeatable."
)


@contextlib.contextmanager
def native_stderr_silenced():
    """Hide what C++ libraries print on stderr (TensorFlow's start-up logging).

    TensorFlow 2.21 logs its CUDA probing before ``TF_CPP_MIN_LOG_LEVEL`` is
    read. What was printed is shown after all if the block fails.
    """
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def load_backend_quietly() -> None:
    """Import Keras and let TensorFlow probe for GPUs with its chatter hidden."""
    with native_stderr_silenced():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")
            tf.get_logger().setLevel("ERROR")  # retracing notices from short predict calls are not the user's concern


QUIET = click.option("--quiet", "-q", is_flag=True, help="No progress and no log lines; errors only.")


def progress(quiet: bool):
    """Where a command's progress goes: stderr (a live line on a terminal), or nowhere with ``--quiet``."""
    from finetune.progress import Progress

    return Progress(sys.stderr, "quiet" if quiet else "auto")


def reported(command):
    """Give ``command`` a ``--debug`` flag and turn what it raises into one line and an exit code."""

    @click.option("--debug", is_flag=True, help="Show the full traceback behind an error.")
    @functools.wraps(command)
    def wrapper(*args, debug: bool = False, **kwargs):
        try:
            return command(*args, **kwargs)
        except FinetuneError as error:
            _fail(error, f"error: {error}", 2, debug)
        except KeyboardInterrupt as error:
            where = getattr(error, "run_dir", None)
            line = "interrupted"
            if where is not None:
                line += f"; the last finished epoch is saved. Continue with: finetune resume {shlex.quote(str(where))}"
            _fail(error, line, 130, debug)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except BrokenPipeError:  # `finetune plugins | head`: the reader has gone; say nothing more
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except Exception as error:  # noqa: BLE001 - a bug, not the user's input: still one line, and a way to see more
            _fail(error, f"error: unexpected {describe(error)} (run again with --debug for the traceback)", 1, debug)

    return wrapper


def _names(identifiers) -> str:
    return ", ".join(item if isinstance(item, str) else str(item.get("name")) for item in identifiers)


def _fail(error: BaseException, line: str, code: int, debug: bool) -> None:
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    click.echo(one_line(line), err=True)
    sys.exit(code)


def one_line(text: str) -> str:
    """``text`` with control characters (newlines from a recipe key, say) written as escapes."""
    return "".join(
        character
        if character == " " or unicodedata.category(character)[0] not in "CZ"
        else character.encode("unicode_escape").decode("ascii")
        for character in text
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="finetune")
def main():
    """Fine-tune keras.applications backbones from a YAML recipe.

    \b
    finetune validate recipes/xception_fmnist.yaml
    finetune run recipes/xception_fmnist.yaml --set data.train_limit=2000
    """
    # Quiet TensorFlow's C++ start-up chatter; nothing has imported TensorFlow yet.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


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

    Writes recipe.yaml, history.csv, metrics.json, model.keras and
    saved_model/ into the run folder. Progress goes to stderr: a live line
    on a terminal, one line per epoch otherwise.
    """
    load_backend_quietly()  # before anything imports Keras
    from finetune.plan import load_recipe
    from finetune.runner import run as run_recipe

    run_recipe(load_recipe(recipe, list(overrides)), out=out, log=progress(quiet))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@QUIET
@reported
def resume(run_dir, quiet):
    """Continue the interrupted or killed run in RUN_DIR where its last checkpoint stood.

    Finished phases are not redone; a finished run is left as it is.
    """
    load_backend_quietly()
    from finetune.runner import resume as resume_run

    resume_run(run_dir, log=progress(quiet))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@reported
def validate(recipe, overrides):
    """Check RECIPE without training; print what it would do."""
    load_backend_quietly()
    from finetune.data import peek_class_names
    from finetune.plan import load_recipe

    loaded = load_recipe(recipe, list(overrides))
    # Class names when they are cheap to find (no image is decoded); data errors surface here.
    class_names = peek_class_names(loaded.data)
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
    for phase in loaded.phases:
        trainable = phase.trainable if isinstance(phase.trainable, str) else f"top {phase.trainable.top_blocks} blocks"
        click.echo(f"  phase {phase.name}: {phase.epochs} epochs, backbone trainable: {trainable}, {phase.describe()}")
    for notice in loaded.notices:
        click.echo(f"note: {notice}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object: each kind mapped to its names.")
@reported
def plugins(as_json):
    """List what recipes can name: optimizers, schedules, regularizers, ...

    Other packages add entries through the entry-point groups finetune.<kind>.
    """
    import json
    import textwrap

    load_backend_quietly()
    from finetune.plan import registries

    names = {kind: registry.names() for kind, registry in registries().items()}
    if as_json:
        click.echo(json.dumps(names, indent=2))
        return
    width = max(len(kind) for kind in names) + 6
    for kind, items in names.items():
        label = f"{kind} ({len(items)})"
        lines = textwrap.wrap(", ".join(items), width=100 - width) or [""]
        click.echo(f"{label:<{width}}{lines[0]}")
        for line in lines[1:]:
            click.echo(" " * width + line)


@main.command()
@click.option("--markdown", is_flag=True, help="The README's table of every recipe key instead of the JSON schema.")
@reported
def schema(markdown):
    """Print the recipe's JSON schema (for editors and validators), or the table of its keys."""
    import json

    from finetune.recipe.reference import json_schema, markdown_table

    click.echo(markdown_table() if markdown else json.dumps(json_schema(), indent=2))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Change data or evaluation settings: data.test_limit=null, data.source=tfds:mnist, evaluation.tta=[flip].",
)
@QUIET
@reported
def evaluate(run_dir, overrides, quiet):
    """Evaluate a finished run's model on another split or dataset.

    Writes metrics.json, the pictures and report.html into a new folder
    RUN_DIR/evaluations/<time>/; the run itself is not changed.
    """
    load_backend_quietly()
    from finetune.runner.evaluate_run import evaluate_run

    evaluate_run(run_dir, list(overrides), log=progress(quiet))


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON list of objects instead of the table.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row instead of the table.")
@reported
def compare(run_dirs, as_json, as_csv):
    """Runs side by side: recipe, backbone, image size, phases, trainable weights, time, test accuracy and loss."""
    import json

    from finetune.runner import compare as comparison

    rows = [comparison.compare_row(run_dir) for run_dir in run_dirs]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif as_csv:
        click.echo(comparison.as_csv(rows), nl=False)
    else:
        click.echo(comparison.as_text(rows))


def _parse_options(items) -> dict:
    from finetune.recipe import parse_assignments

    return parse_assignments(items, "--option", "alpha=0.35")


_SIZE_HELP = "Input size the file is for (only MobileNet and MobileNetV2 file names depend on it)."
_OPTION_HELP = "Backbone constructor option the file depends on, e.g. alpha=0.35. Repeatable."


@main.group(invoke_without_command=True)
@click.option("--image-size", type=int, default=224, show_default=True, help=_SIZE_HELP)
@click.option("--option", "option_items", multiple=True, metavar="KEY=VALUE", help=_OPTION_HELP)
@click.option("--check", is_flag=True, help="Also load each present file into its architecture (slow).")
@click.option("--json", "as_json", is_flag=True, help="One JSON list instead of the table.")
@click.pass_context
@reported
def weights(ctx, image_size, option_items, check, as_json):
    """ImageNet weight files: which are here (this command), fetch, import.

    \b
    Files are looked for in $FINETUNE_WEIGHTS_DIR, then in Keras's cache
    ($KERAS_HOME/models, default ~/.keras/models); fetch and import write to
    the first of these. Copy the folder to an offline machine and set
    FINETUNE_WEIGHTS_DIR there.
    """
    if ctx.invoked_subcommand is not None:
        return
    import json

    load_backend_quietly()
    from finetune.backbones.weight_files import search_dirs
    from finetune.weights import manage

    rows = manage.status(image_size=image_size, options=_parse_options(option_items), check=check)
    if as_json:
        click.echo(
            json.dumps(
                [
                    {
                        "backbone": row.backbone,
                        "file": row.file_name,
                        "path": str(row.path) if row.path else None,
                        "usable": row.usable,
                        "problem": row.problem,
                    }
                    for row in rows
                ],
                indent=2,
            )
        )
        return
    click.echo("searched: " + ", ".join(str(folder) for folder in search_dirs()))
    width = max(len(row.backbone) for row in rows) + 2
    for row in rows:
        click.echo(f"{row.backbone:<{width}}{row.describe()}")
    present = sum(row.usable for row in rows)
    click.echo(f"{present} of {len(rows)} backbones have their ImageNet weights here")


@weights.command("fetch")
@click.argument("names", nargs=-1, required=True)
@click.option("--dir", "folder", type=click.Path(file_okay=False), help="Target folder (default: see above).")
@click.option("--image-size", type=int, default=224, show_default=True, help=_SIZE_HELP)
@click.option("--option", "option_items", multiple=True, metavar="KEY=VALUE", help=_OPTION_HELP)
@reported
def weights_fetch(names, folder, image_size, option_items):
    """Download NAMES' ImageNet weights (Keras's URLs and hash check)."""
    load_backend_quietly()
    from finetune.weights import manage

    options = _parse_options(option_items)
    for name in names:
        path = manage.fetch(name, folder, image_size, options)
        click.echo(f"{name}: {path}")


@weights.command("import")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--dir", "folder", type=click.Path(file_okay=False), help="Target folder (default: see above).")
@click.option("--image-size", type=int, default=224, show_default=True, help=_SIZE_HELP)
@click.option("--option", "option_items", multiple=True, metavar="KEY=VALUE", help=_OPTION_HELP)
@click.option("--force", is_flag=True, help="Replace a different file already stored under the name.")
@reported
def weights_import(name, file, folder, image_size, option_items, force):
    """Check that FILE loads into NAME's architecture; store it under the canonical name."""
    load_backend_quietly()
    from finetune.weights import manage

    path = manage.import_file(name, file, folder, image_size, _parse_options(option_items), force)
    click.echo(f"{name}: {file} loads; stored as {path}")


_INVERT_HELP = (
    "Turn images negative first: auto (default) inverts an image whose border is on the other side of the "
    "training images' background (light-on-dark for Fashion-MNIST), yes inverts every image, no none."
)


@main.command()
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option("--top", type=click.IntRange(min=1), default=5, show_default=True, help="Classes shown per image.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image per line.")
@click.option(
    "--invert", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True, help=_INVERT_HELP
)
@reported
def predict(model, images, top, as_json, invert):
    """Print the top classes of each of IMAGES (files, or folders of them) by MODEL.

    \b
    MODEL is a run folder (its model.keras) or an exported saved_model/
    folder. Each image is decoded as the training images were (grey or RGB,
    16-bit scaled, transparency on white, EXIF orientation, the run's
    crop/pad/stretch resize to the stored size).

    \b
    --invert auto: the run's input.json records whether the training images
    have a dark or a light background (the median of each image's outermost
    ring of pixels, under 128 or not, for at least 90% of them). An image
    whose own border median (before resizing) is on the other side is
    inverted. Models saved before input.json existed: 28x28 grey ones are
    taken as light-on-dark (Fashion-MNIST); others are never auto-inverted.

    \b
    finetune predict runs/fmnist shirt.jpg photos/ --top 3
    finetune predict runs/fmnist/saved_model photos/ --json

    An image that cannot be read is one line on stderr; the others are still
    predicted, and the exit code is 2.
    """
    import json

    load_backend_quietly()
    from finetune.inference import load_predictor, predict_files

    predictor = load_predictor(model)
    for note in predictor.notes:
        click.echo(one_line(f"note: {note}"), err=True)
    failed = total = 0
    for prediction in predict_files(predictor, images, top, invert):
        total += 1
        if prediction.error is not None:
            failed += 1
            click.echo(one_line(f"error: {prediction.error}"), err=True)
        elif as_json:
            click.echo(json.dumps(prediction.to_json()))
        else:
            shown = ", ".join(f"{name} {probability:.3f}" for _, name, probability in prediction.top)
            click.echo(one_line(f"{prediction.path}: {shown}{' (inverted)' if prediction.inverted else ''}"))
    if failed:
        click.echo(f"{failed} of {total} images could not be read", err=True)
        sys.exit(2)


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
    from finetune.plan import load_recipe
    from finetune.runner.lr_find import lr_find as find

    report = find(
        load_recipe(recipe, list(overrides)),
        phase,
        out=out,
        start=start,
        end=end,
        steps=steps,
        from_run=from_run,
        log=lambda line: click.echo(line, err=True),
    )
    click.echo(f"suggested learning rate for phase {report.phase}: {report.rate}")
    click.echo(f"finetune run {shlex.quote(recipe)} {report.set_option}")


if __name__ == "__main__":
    main()
