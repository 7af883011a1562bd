"""``finetune export``: a finished run's ``model.keras`` written in more formats, each verified, into its folder."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from finetune import model as model_stage
from finetune.data import load_dataset
from finetune.data.input_spec import read_input_spec, read_thresholds, write_input_spec, write_thresholds
from finetune.errors import ExportError, RunFolderError, first_line
from finetune.export.formats import VERIFY_IMAGES_FILE, check_available, export_all, failures
from finetune.export.tflite import calibration_sample
from finetune.plan import RunPlan, prepare
from finetune.progress import Progress, lines_to
from finetune.runner.distribution import one_process_note
from finetune.runner.folder import RunFolder

logger = logging.getLogger(__name__)


def export_run(
    run_dir: str | Path,
    formats: Sequence[str] | None = None,
    quantization: str | None = None,
    *,
    tflite_io: str | None = None,
    log: Callable[[str], None] | Progress | None = print,
) -> dict[str, dict]:
    """Export the finished run in ``run_dir`` as ``formats`` (default: its recipe's ``export.formats``).

    Each artifact is checked against ``model.keras`` on the first
    ``export.verify_images`` test images of the run's own data, then
    renamed into the folder; ``metrics.json``'s ``export`` part gets one
    entry per artifact (others are kept). An unfinished run, or one without
    ``model.keras`` or ``metrics.json``, is refused in one line.
    """
    with lines_to(log):
        return _export(RunFolder.existing(run_dir), formats, quantization, tflite_io)


def _export(
    folder: RunFolder, formats: Sequence[str] | None, quantization: str | None, tflite_io: str | None = None
) -> dict[str, dict]:
    with folder.locked():
        status = folder.status.get("status")
        if status != "finished":
            raise RunFolderError(
                f"run {str(folder.path)!r} is {status or 'not started'}, not finished; "
                f"finish it first (finetune resume {folder.path})"
            )
        for name in ("model.keras", "metrics.json"):
            if not (folder.path / name).is_file():
                raise RunFolderError(f"run {str(folder.path)!r} has no {name} to export from")
        # The formats asked for replace the recipe's (a converter the run used need not be installed now).
        overrides: dict[str, object] = {"export.formats": list(formats)} if formats else {}
        if quantization:
            overrides["export.tflite_quantization"] = quantization
        if tflite_io:  # an int8 file's output tensor (the recipe refuses it with any other quantization)
            overrides["export.tflite_io"] = tflite_io
        _, plan = prepare(folder.path / "recipe.yaml", overrides)
        formats, quantization = plan.export.formats, plan.export.tflite_quantization
        check_available(formats)  # before the data is read
        if note := one_process_note(plan.distribution, "export"):
            logger.info(note)
        metrics = folder.read_json("metrics.json")
        images, class_names = _check_images(folder, plan)
        model = model_stage.load_model(folder.path / "model.keras", compile=False)
        calibration = None
        if "tflite" in formats and quantization == "int8":  # the activations' ranges, from the training split
            train = load_dataset(plan.data, plan.seed).train.images
            calibration = calibration_sample(train, plan.export.calibration_images, plan.seed)
        results = export_all(
            model, folder.path, formats, quantization, class_names, images,
            calibration=calibration, tflite_io=plan.export.tflite_io,
        )  # fmt: skip
        spec = read_input_spec(folder.path)
        if "saved_model" in formats and spec is not None:
            write_input_spec(folder.path / "saved_model", spec)  # as a run writes it, for finetune predict
        thresholds = read_thresholds(folder.path, class_names)
        if "saved_model" in formats and thresholds is not None:  # multi-label: the tags' thresholds go with it
            chosen_on = metrics.get("test", {}).get("thresholds_chosen_on", "validation")
            write_thresholds(folder.path / "saved_model", dict(zip(class_names, thresholds, strict=True)), chosen_on)
        metrics["export"] = {**metrics.get("export", {}), **results}
        folder.write_json("metrics.json", metrics)
    failed = failures(results)
    for key, result in results.items():
        if key in failed:
            continue
        logger.info(
            f"{key}: {result['file']} ({result['bytes'] / 1e6:.2f} MB), {result['runtime']}: "
            f"max |probability difference| {result['max_abs_diff']:.2g}, top-1 agreement "
            f"{result['top1_agreement']:.3f} on {result['images']} test images"
        )
    if failed:
        # The formats that worked are written and recorded; the command still fails, naming what did not.
        raise ExportError("; ".join(failed.values()))
    return results


def _check_images(folder: RunFolder, plan: RunPlan) -> tuple[np.ndarray, list[str]]:
    """The images the run kept for export checks, and its class names; an older run's from its data."""
    kept, spec = folder.path / VERIFY_IMAGES_FILE, read_input_spec(folder.path)
    if kept.is_file() and spec is not None:
        try:
            images = np.load(kept, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise RunFolderError(f"{str(kept)!r} cannot be read ({first_line(error)})") from None
        return images[: plan.export.verify_images], list(spec.class_names)
    dataset = load_dataset(plan.data, plan.seed)
    return np.asarray(dataset.test.images[: plan.export.verify_images]), list(dataset.class_names)
