"""Commands about what recipes can use: ``plugins``, ``schema`` and ``weights``."""

from __future__ import annotations

import json

import click

from finetune.cli.base import load_backend_quietly, main, reported


@main.command()
@click.option("--json", "as_json", is_flag=True, help="One JSON object: each kind mapped to its names.")
@reported
def plugins(as_json):
    """List what recipes can name: optimizers, schedules, regularizers, ...

    Other packages add entries through the entry-point groups finetune.<kind>.
    """
    import textwrap

    load_backend_quietly()
    # Imported here: a command pays for what it uses; `finetune --help` loads no more than click.
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

    # Imported here: a command pays for what it uses; `finetune --help` loads no more than click.
    from finetune.recipe.reference import json_schema, markdown_table

    click.echo(markdown_table() if markdown else json.dumps(json_schema(), indent=2))


def _parse_options(items) -> dict:
    # Imported here: a command pays for what it uses; `finetune --help` loads no more than click.
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

    load_backend_quietly()
    # Imported here: a command pays for what it uses; `finetune --help` loads no more than click.
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
    # Imported here: a command pays for what it uses; `finetune --help` loads no more than click.
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
    # Imported here: a command pays for what it uses; `finetune --help` loads no more than click.
    from finetune.weights import manage

    path = manage.import_file(name, file, folder, image_size, _parse_options(option_items), force)
    click.echo(f"{name}: {file} loads; stored as {path}")
