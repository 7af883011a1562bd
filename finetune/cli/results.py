"""Commands on a trained model: ``predict``, ``evaluate``, ``compare`` and ``export``."""

from __future__ import annotations

import json
import sys

import click

from finetune.cli.base import QUIET, lines_on_stderr, load_backend_quietly, main, one_line, reported
from finetune.errors import FinetuneError


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
    # Imported here: a command pays for what it uses; `finetune --help` loads no Keras.
    from finetune.runner.evaluate_run import evaluate_run

    with lines_on_stderr(quiet):
        evaluate_run(run_dir, list(overrides), log=None)


@main.command()
@click.argument("run_dirs", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON list of objects instead of the table.")
@click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row instead of the table.")
@reported
def compare(run_dirs, as_json, as_csv):
    """Runs side by side: recipe, backbone, image size, phases, trainable weights, time, test accuracy,
    macro-F1 (- for a run from before it was recorded) and loss."""
    if as_json and as_csv:
        raise FinetuneError("--json and --csv exclude each other: give one of them")
    # Imported here: a command pays for what it uses; `finetune --help` loads no Keras.
    from finetune.runner import compare as comparison

    rows = [comparison.compare_row(run_dir) for run_dir in run_dirs]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
    elif as_csv:
        click.echo(comparison.as_csv(rows), nl=False)
    else:
        click.echo(comparison.as_text(rows))


_INVERT_HELP = (
    "Turn images negative first: auto (default) inverts an image whose border is on the other side of the "
    "training images' background (light-on-dark for Fashion-MNIST), yes inverts every image, no none."
)


@main.command()
@click.argument("model", type=click.Path())
@click.argument("images", nargs=-1, required=True, type=click.Path())
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=None,
    help="Classes shown per image (default 5); multi-label: at most this many of the tags above their thresholds.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per image per line.")
@click.option(
    "--invert", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True, help=_INVERT_HELP
)
@click.option(
    "--explain",
    "explain_dir",
    type=click.Path(file_okay=False),
    default=None,
    help="Also write each image with its heatmap (Grad-CAM for the top class) into this folder.",
)
@reported
def predict(model, images, top, as_json, invert, explain_dir):
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

    \b
    A multi-label model (data.label_delimiter) prints every tag whose
    probability reaches its threshold (thresholds.json), most probable first.

    \b
    --explain DIR writes DIR/<image>.heatmap.png: the image with a Grad-CAM
    heatmap of the top class over it (where the backbone's last spatial
    output mattered for that class); needs the run folder, not a SavedModel.

    An image that cannot be read is one line on stderr; the others are still
    predicted, and the exit code is 2.
    """

    load_backend_quietly()
    # Imported here: a command pays for what it uses; `finetune --help` loads no Keras.
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
            listed = prediction.top if prediction.tags is None else prediction.tags
            shown = ", ".join(f"{name} {probability:.3f}" for _, name, probability in listed)
            if prediction.tags is not None and not listed:
                shown = "no tag above its threshold"
            click.echo(one_line(f"{prediction.path}: {shown}{' (inverted)' if prediction.inverted else ''}"))
    if explain_dir is not None:
        from finetune.inference.explain import write_heatmaps

        written = write_heatmaps(predictor, images, explain_dir, invert)
        click.echo(f"{len(written)} heatmaps in {explain_dir}", err=True)
    if failed:
        click.echo(f"{failed} of {total} images could not be read", err=True)
        sys.exit(2)


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
    type=click.Choice(["none", "float16", "dynamic_range", "int8"]),
    help="TFLite weights (int8: activations too, calibrated on training images). Default: the recipe's.",
)
@click.option(
    "--tflite-io",
    type=click.Choice(["float32", "uint8", "int8"]),
    help="int8 only: the output tensor's type (uint8/int8 carry their scale and zero point).",
)
@reported
def export(run_dir, formats, quantization, tflite_io):
    """Write the finished run in RUN_DIR in more formats, each checked against model.keras.

    \b
    finetune export runs/tiny --format onnx --format tflite --quantization float16
    Files go into RUN_DIR (model.onnx, model_float16.tflite, labels.txt); metrics.json's
    "export" part records each one's agreement with the Keras model on test images.
    """
    load_backend_quietly()
    # Imported here: a command pays for what it uses; `finetune --help` loads no Keras.
    from finetune.runner.export_run import export_run

    with lines_on_stderr():
        export_run(run_dir, formats, quantization, tflite_io=tflite_io, log=None)


@main.command()
@click.argument("model", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind (0.0.0.0: every interface).")
@click.option("--port", type=click.IntRange(0, 65535), default=8501, show_default=True, help="0: a free port.")
@click.option("--model-name", default=None, help="The name in /v1/models/NAME. Default: the recipe's name.")
@click.option("--max-batch", type=click.IntRange(min=1), default=32, show_default=True, help="Images per model call.")
@click.option(
    "--max-delay-ms",
    type=click.FloatRange(min=0),
    default=5.0,
    show_default=True,
    help="How long a request waits for others to join its batch.",
)
@click.option(
    "--max-body",
    type=click.IntRange(min=1),
    default=20 * 1024 * 1024,
    show_default=True,
    help="Largest request body in bytes (413 above it).",
)
@click.option(
    "--api-key",
    envvar="FINETUNE_API_KEY",
    default=None,
    help="Require Authorization: Bearer KEY on every route but /healthz (env FINETUNE_API_KEY).",
)
@QUIET
@reported
def serve(model, host, port, model_name, max_batch, max_delay_ms, max_body, api_key, quiet):
    """Serve MODEL (a run folder or SavedModel folder) over HTTP until Ctrl-C.

    \b
    GET  /                          a page: drop images, see the top classes
    POST /predict                   multipart file fields -> {"predictions": [{"file", "top", ...}]}
    POST /v1/models/NAME:predict    TF Serving's REST API: {"instances": [...]} -> {"predictions": [...]}
    GET  /v1/models/NAME[/metadata] TF Serving's status and metadata (labels included)
    GET  /healthz, GET /metrics     health; Prometheus metrics (requests, errors, latency, batch sizes)

    \b
    finetune serve runs/quick
    curl -F file=@shirt.png http://127.0.0.1:8501/predict
    """
    load_backend_quietly()
    # Imported here: a command pays for what it uses; `finetune --help` loads no Keras or web server.
    from importlib.util import find_spec
    from pathlib import Path

    missing = [name for name in ("starlette", "uvicorn", "multipart", "prometheus_client") if find_spec(name) is None]
    if missing:
        raise FinetuneError(f"finetune serve needs {', '.join(missing)}: pip install 'finetune[serve]'")
    from finetune.serving import ServeSettings, model_name_for
    from finetune.serving import serve as serve_model

    settings = ServeSettings(
        model_name=model_name or model_name_for(Path(model)),
        max_batch=max_batch,
        max_delay_ms=max_delay_ms,
        max_body=max_body,
        api_key=api_key or None,
    )
    with lines_on_stderr(quiet):
        serve_model(model, settings, host=host, port=port)
