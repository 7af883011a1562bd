"""Command line: ``finetune run RECIPE``, ``finetune validate RECIPE``."""

from __future__ import annotations

import contextlib
import os
import sys

import click

# Quiet TensorFlow's C++ start-up chatter before anything imports it.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from finetune import __version__  # noqa: E402
from finetune.errors import FinetuneError  # noqa: E402

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


@contextlib.contextmanager
def user_errors():
    """Recipe, data and usage problems: one line on stderr, exit code 2."""
    try:
        yield
    except FinetuneError as error:
        click.echo(f"error: {error}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted: the run folder keeps history.csv and the last epoch's checkpoint", err=True)
        sys.exit(130)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="finetune")
def main():
    """Fine-tune keras.applications backbones from a YAML recipe.

    \b
    finetune validate recipes/xception_fmnist.yaml
    finetune run recipes/xception_fmnist.yaml --set data.train_limit=2000
    """


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
@click.option("--out", type=click.Path(file_okay=False), help="Run folder (must not exist or be empty). "
              "Default: runs/<recipe name>-<time>.")
def run(recipe, overrides, out):
    """Train and evaluate RECIPE, then export the model.

    Writes recipe.yaml, history.csv, metrics.json, model.keras and
    saved_model/ into the run folder.
    """
    with user_errors():
        from finetune.recipe import load_recipe
        from finetune.runner import run as run_recipe

        load_backend_quietly()
        run_recipe(load_recipe(recipe, list(overrides)), out=out, log=lambda line: click.echo(line, err=True))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help=SET_HELP)
def validate(recipe, overrides):
    """Check RECIPE without training; print what it would do."""
    with user_errors():
        from finetune import data
        from finetune.recipe import load_recipe

        load_backend_quietly()
        loaded = load_recipe(recipe, list(overrides))
        # Class names when they are cheap to find (no image is decoded); data errors surface here.
        class_names = data.peek_class_names(loaded.data)
        height, width = loaded.data.image_hw
        backbone = loaded.model.backbone
        click.echo(
            f"{recipe}: valid. {loaded.data.source} -> {backbone.name} "
            f"({backbone.weights or 'random init'}) at {height}x{width}, precision {loaded.precision}"
        )
        if class_names is not None:
            shown = ", ".join(class_names[:10]) + (", ..." if len(class_names) > 10 else "")
            folder = f" {loaded.data.data_dir}" if loaded.data.data_dir else ""
            click.echo(f"  data {loaded.data.source}{folder}: {len(class_names)} classes ({shown})")
        for phase in loaded.phases:
            trainable = phase.trainable if isinstance(phase.trainable, str) else f"top {phase.trainable.top_blocks} blocks"
            schedule = phase.schedule if isinstance(phase.schedule, str) or phase.schedule is None \
                else phase.schedule.get("name")
            click.echo(
                f"  phase {phase.name}: {phase.epochs} epochs, backbone trainable: {trainable}, "
                f"{phase.optimizer.name} lr {phase.optimizer.learning_rate:g}"
                + (f", schedule {schedule}" if schedule else "")
                + (f", backbone lr x{phase.backbone_lr_multiplier:g}" if phase.backbone_lr_multiplier != 1 else "")
            )
        for notice in loaded.notices:
            click.echo(f"note: {notice}")


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object: each kind mapped to its names.")
def plugins(as_json):
    """List what recipes can name: optimizers, schedules, regularizers, ...

    Other packages add entries through the entry-point groups finetune.<kind>.
    """
    import json
    import textwrap

    with user_errors():
        load_backend_quietly()
        from finetune.plugins import catalog

        names = catalog()
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
    from finetune.errors import RecipeError
    from finetune.recipe import parse_yaml

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise RecipeError(f"--option {item!r}: expected KEY=VALUE, e.g. alpha=0.35")
        options[key.strip()] = parse_yaml(value, f"--option {key.strip()}")
    return options


_SIZE_HELP = "Input size the file is for (only MobileNet and MobileNetV2 file names depend on it)."
_OPTION_HELP = "Backbone constructor option the file depends on, e.g. alpha=0.35. Repeatable."


@main.group(invoke_without_command=True)
@click.option("--image-size", type=int, default=224, show_default=True, help=_SIZE_HELP)
@click.option("--option", "option_items", multiple=True, metavar="KEY=VALUE", help=_OPTION_HELP)
@click.option("--check", is_flag=True, help="Also load each present file into its architecture (slow).")
@click.option("--json", "as_json", is_flag=True, help="One JSON list instead of the table.")
@click.pass_context
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

    with user_errors():
        load_backend_quietly()
        from finetune import backbones
        from finetune import weights as weights_module

        rows = weights_module.status(image_size=image_size, options=_parse_options(option_items), check=check)
        if as_json:
            click.echo(json.dumps([
                {"backbone": row.backbone, "file": row.file_name, "path": str(row.path) if row.path else None,
                 "usable": row.usable, "problem": row.problem} for row in rows], indent=2))
            return
        click.echo("searched: " + ", ".join(str(folder) for folder in backbones.weights_search_dirs()))
        width = max(len(row.backbone) for row in rows) + 2
        for row in rows:
            state = f"missing   {row.file_name}" if row.path is None else (
                f"PROBLEM   {row.path} ({row.problem})" if row.problem else f"present   {row.path}")
            click.echo(f"{row.backbone:<{width}}{state}")
        present = sum(row.usable for row in rows)
        click.echo(f"{present} of {len(rows)} backbones have their ImageNet weights here")


@weights.command("fetch")
@click.argument("names", nargs=-1, required=True)
@click.option("--dir", "folder", type=click.Path(file_okay=False), help="Target folder (default: see above).")
@click.option("--image-size", type=int, default=224, show_default=True, help=_SIZE_HELP)
@click.option("--option", "option_items", multiple=True, metavar="KEY=VALUE", help=_OPTION_HELP)
def weights_fetch(names, folder, image_size, option_items):
    """Download NAMES' ImageNet weights (Keras's URLs and hash check)."""
    with user_errors():
        load_backend_quietly()
        from finetune import weights as weights_module

        options = _parse_options(option_items)
        for name in names:
            _known_backbone(name)
            path = weights_module.fetch(name, folder, image_size, options)
            click.echo(f"{name}: {path}")


@weights.command("import")
@click.argument("name")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option("--dir", "folder", type=click.Path(file_okay=False), help="Target folder (default: see above).")
@click.option("--image-size", type=int, default=224, show_default=True, help=_SIZE_HELP)
@click.option("--option", "option_items", multiple=True, metavar="KEY=VALUE", help=_OPTION_HELP)
@click.option("--force", is_flag=True, help="Replace a different file already stored under the name.")
def weights_import(name, file, folder, image_size, option_items, force):
    """Check that FILE loads into NAME's architecture; store it under the canonical name."""
    with user_errors():
        load_backend_quietly()
        from finetune import weights as weights_module

        _known_backbone(name)
        path = weights_module.import_file(name, file, folder, image_size, _parse_options(option_items), force)
        click.echo(f"{name}: {file} loads; stored as {path}")


def _known_backbone(name: str) -> None:
    from finetune import backbones
    from finetune.errors import RecipeError

    if name not in backbones.backbones:
        raise RecipeError(backbones.backbones.unknown_message(name))


if __name__ == "__main__":
    main()
