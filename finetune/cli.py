"""Command line: ``finetune run``, ``validate``, ``plugins`` and ``weights``.

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
@reported
def run(recipe, overrides, out):
    """Train and evaluate RECIPE, then export the model.

    Writes recipe.yaml, history.csv, metrics.json, model.keras and
    saved_model/ into the run folder.
    """
    load_backend_quietly()  # before anything imports Keras
    from finetune.plan import load_recipe
    from finetune.runner import run as run_recipe

    run_recipe(load_recipe(recipe, list(overrides)), out=out, log=lambda line: click.echo(line, err=True))


@main.command()
@click.argument("run_dir", type=click.Path(file_okay=False))
@reported
def resume(run_dir):
    """Continue the interrupted or killed run in RUN_DIR where its last checkpoint stood.

    Finished phases are not redone; a finished run is left as it is.
    """
    load_backend_quietly()
    from finetune.runner import resume as resume_run

    resume_run(run_dir, log=lambda line: click.echo(line, err=True))


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


@main.command("export")
@click.argument("run_dir", type=click.Path(file_okay=False))
@click.option(
    "--format",
    "formats",
    multiple=True,
    type=click.Choice(["keras", "saved_model", "tflite", "onnx"]),
    help="Format to write (repeatable). Default: the run recipe's export.formats.",
)
@click.option(
    "--quantization",
    type=click.Choice(["none", "float16", "dynamic_range"]),
    help="TFLite weights. Default: the run recipe's export.tflite_quantization.",
)
@reported
def export(run_dir, formats, quantization):
    """Write the finished run in RUN_DIR in more formats, each checked against model.keras.

    \b
    finetune export runs/tiny --format onnx --format tflite --quantization float16
    Files go into RUN_DIR (model.onnx, model_float16.tflite, labels.txt); metrics.json's
    "export" part records each one's agreement with the Keras model on test images.
    """
    load_backend_quietly()
    from finetune.runner.export_run import export_run

    export_run(run_dir, formats, quantization, log=lambda line: click.echo(line, err=True))


if __name__ == "__main__":
    main()
