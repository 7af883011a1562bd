"""Export formats: each artifact reloaded by its own runtime agrees with the Keras model; `finetune export`."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ROOT

import finetune
from finetune.errors import ExportError, RecipeError

MLP_RECIPE = {
    "name": "mlp_export",
    "seed": 0,
    "precision": "float32",
    "data": {
        "source": "fashion_mnist",
        "image_size": 28,
        "validation_split": 0.0,
        "train_limit": 640,
        "test_limit": 64,
    },
    "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [32, 16]}}, "head": {}},
    "training": {"batch_size": 32, "verbose": 0},
    "phases": [
        {"name": "train", "epochs": 3, "trainable": "all", "optimizer": {"name": "adam", "learning_rate": 5e-3}}
    ],
    "export": {"formats": ["keras", "saved_model", "tflite", "onnx"]},
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A trained tiny MLP run that wrote every format (trained: confident predictions for the quantized checks)."""
    out = tmp_path_factory.mktemp("export") / "run"
    return finetune.run(finetune.load_recipe(copy.deepcopy(MLP_RECIPE)), out=out, log=lambda line: None)


@pytest.fixture
def run_copy(finished_run, tmp_path):
    """The finished run's folder, copied, so a test may change it."""
    return shutil.copytree(finished_run.run_dir, tmp_path / "run")


def _test_images(count=32):
    from finetune import data

    dataset = data.load_dataset(finetune.load_recipe(copy.deepcopy(MLP_RECIPE)).data, 0)
    return np.asarray(dataset.test.images[:count]), dataset.class_names


def _cli(*arguments):
    from finetune.cli import main

    return CliRunner().invoke(main, [str(argument) for argument in arguments])


def _tflite_predict(path, images):
    import tensorflow as tf

    interpreter = tf.lite.Interpreter(model_path=str(path))
    index = interpreter.get_input_details()[0]["index"]
    interpreter.resize_tensor_input(index, images.shape)
    interpreter.allocate_tensors()
    interpreter.set_tensor(index, images)
    interpreter.invoke()
    return interpreter.get_tensor(interpreter.get_output_details()[0]["index"])


def test_a_run_writes_every_format_and_each_runtime_agrees_with_keras(finished_run):
    import onnxruntime
    import tensorflow as tf

    run_dir = finished_run.run_dir
    images, class_names = _test_images()
    expected = finished_run.model.predict(images, verbose=0)
    assert expected.max(axis=1).mean() > 0.4  # trained (flat outputs are 0.1): the comparisons mean something
    # Each artifact read back here by its own runtime, raw uint8 images in.
    served = tf.saved_model.load(str(run_dir / "saved_model"))  # kept: serve needs the loaded object alive
    reloaded = {
        "keras": finetune.load_model(run_dir / "model.keras", compile=False).predict(images, verbose=0),
        "saved_model": served.serve(tf.constant(images)).numpy(),
        "tflite": _tflite_predict(run_dir / "model.tflite", images),
        "onnx": onnxruntime.InferenceSession(str(run_dir / "model.onnx")).run(None, {"images": images})[0],
    }
    for name, probabilities in reloaded.items():
        np.testing.assert_allclose(probabilities, expected, atol=1e-4, err_msg=name)
    exported = json.loads((run_dir / "metrics.json").read_text())["export"]
    assert sorted(exported) == ["keras", "onnx", "saved_model", "tflite"]
    for name, entry in exported.items():
        measured = np.abs(reloaded[name] - expected).max()
        assert entry["max_abs_diff"] <= 1e-4 and entry["max_abs_diff"] == pytest.approx(measured, abs=2e-6), name
        assert entry["top1_agreement"] == 1.0 and entry["images"] == 32, name
    assert exported["tflite"]["bytes"] == (run_dir / "model.tflite").stat().st_size
    assert (run_dir / "labels.txt").read_text().splitlines() == list(class_names)
    assert (run_dir / "saved_model" / "labels.txt").read_text().splitlines() == list(class_names)
    assert not [path.name for path in run_dir.iterdir() if "partial" in path.name]


def test_the_saved_model_holds_each_weight_once_and_serves_under_both_signature_names(finished_run):
    import tensorflow as tf

    folder = finished_run.run_dir / "saved_model"
    stored = tf.train.load_checkpoint(str(folder / "variables" / "variables")).get_variable_to_shape_map()
    weights = [name for name in stored if name != "_CHECKPOINTABLE_OBJECT_GRAPH"]
    assert len(weights) == len(finished_run.model.variables)  # Keras's exporter stores each twice
    served = tf.saved_model.load(str(folder))
    images, _ = _test_images(8)
    expected = served.serve(tf.constant(images)).numpy()
    for name in ("serve", "serving_default"):
        (answer,) = served.signatures[name](images=tf.constant(images)).values()
        np.testing.assert_allclose(answer.numpy(), expected, atol=1e-6)


def test_a_model_the_one_trace_writer_cannot_save_goes_through_keras_exporter(finished_run, tmp_path, monkeypatch):
    import tensorflow as tf

    from finetune.export import saved_model

    save, calls = tf.saved_model.save, []

    def untracked_resource_once(obj, folder, *args, **kwargs):
        calls.append(type(obj).__name__)
        if len(calls) > 1:  # Keras's exporter, after the one-trace writer gave up
            return save(obj, folder, *args, **kwargs)
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "partial").write_text("half written")
        raise ValueError("Tried to export a function which references an 'untracked' resource")

    monkeypatch.setattr(tf.saved_model, "save", untracked_resource_once)
    images, class_names = _test_images(8)
    path = saved_model.export_saved_model(finished_run.model, tmp_path / "saved_model", class_names)
    monkeypatch.undo()
    assert len(calls) == 2 and not (path / "partial").exists()
    served = tf.saved_model.load(str(path))
    np.testing.assert_allclose(
        served.serve(tf.constant(images)).numpy(), finished_run.model.predict(images, verbose=0), atol=1e-5
    )


def test_quantized_tflite_files_are_a_half_and_a_quarter_the_size_and_keep_the_predictions(run_copy):
    from finetune.export.formats import export_all

    before = json.loads((run_copy / "metrics.json").read_text())["export"]
    float32 = (run_copy / "model.tflite").stat().st_size
    result = _cli("export", run_copy, "--format", "tflite", "--quantization", "float16")
    assert result.exit_code == 0, result.output
    images, class_names = _test_images()
    model = finetune.load_model(run_copy / "model.keras")
    export_all(model, run_copy, ["tflite"], "dynamic_range", class_names, images)
    half = (run_copy / "model_float16.tflite").stat().st_size / float32
    quarter = (run_copy / "model_dynamic_range.tflite").stat().st_size / float32
    assert 0.4 < half < 0.6 and 0.2 < quarter < 0.4, (half, quarter)
    expected = model.predict(images, verbose=0)
    for name in ("float16", "dynamic_range"):
        quantized = _tflite_predict(run_copy / f"model_{name}.tflite", images)
        assert np.mean(quantized.argmax(1) == expected.argmax(1)) >= 0.9, name
    exported = json.loads((run_copy / "metrics.json").read_text())["export"]
    assert {key: exported[key] for key in before} == before  # the run's own entries are kept
    assert exported["tflite_float16"]["quantization"] == "float16"
    assert exported["tflite_float16"]["tolerance"] == {"max_abs_diff": 0.05, "min_top1_agreement": 0.95}
    assert "float16" in result.stderr and "top-1 agreement 1.000 on 32 test images" in result.stderr


def test_an_artifact_that_disagrees_fails_in_one_line_and_is_not_kept(run_copy, monkeypatch):
    import onnxruntime

    genuine = onnxruntime.InferenceSession.run

    def shifted(self, *args, **kwargs):  # the runtime answers with every image's probabilities moved one class on
        return [np.roll(output, 1, axis=-1) for output in genuine(self, *args, **kwargs)]

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", shifted)
    (run_copy / "model.onnx").unlink()
    result = _cli("export", run_copy, "--format", "onnx")
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: export onnx disagrees with the Keras model on 32"), lines
    assert "top-1 agreement" in lines[0]
    assert not (run_copy / "model.onnx").exists()
    assert not [path.name for path in run_copy.iterdir() if "partial" in path.name]

    def broken(self, *args, **kwargs):
        raise RuntimeError("this runtime lacks an op\nand says so at length")

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", broken)
    result = _cli("export", run_copy, "--format", "onnx")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "export onnx: onnxruntime" in result.stderr
    assert "cannot run the written file (RuntimeError: this runtime lacks an op)" in result.stderr
    assert not (run_copy / "model.onnx").exists()


def test_the_evaluations_answers_are_the_checks_reference_where_the_served_model_is_the_model(run_copy):
    from finetune.export.formats import export_all

    images, class_names = _test_images(32)
    model = finetune.load_model(run_copy / "model.keras")
    right = model.predict(images, verbose=0)
    calls: list = []
    (run_copy / "right").mkdir()
    (run_copy / "wrong").mkdir()
    model.predict = lambda *args, **kwargs: calls.append(1) or right  # type: ignore[method-assign]
    results = export_all(model, run_copy / "right", ["keras"], "none", class_names, images, reference=right)
    assert "error" not in results["keras"] and not calls  # the reference given, no prediction of its own
    wrong = np.roll(right, 1, axis=-1)  # a reference that is not the model's: the check must say so
    results = export_all(model, run_copy / "wrong", ["keras"], "none", class_names, images, reference=wrong)
    assert "disagrees with the Keras model" in results["keras"]["error"]


def test_tolerances_are_tight_for_float32_and_looser_for_quantized_weights():
    from finetune.export.verify import DYNAMIC_RANGE, FLOAT16, FLOAT32, agreement, check

    reference = np.eye(10)[np.arange(32) % 10] * 0.9 + 0.01  # confident, one class per image
    nudged = agreement(reference, reference + 0.01)
    assert nudged == {"images": 32, "max_abs_diff": pytest.approx(0.01), "top1_agreement": 1.0}
    assert check("tflite_float16", nudged, FLOAT16)["tolerance"]["max_abs_diff"] == 0.05
    with pytest.raises(ExportError, match=r"^export tflite disagrees .* 0\.01 \(tolerance 0\.0001\)"):
        check("tflite", nudged, FLOAT32)
    flipped = reference.copy()
    flipped[:4] = np.roll(flipped[:4], 1, axis=-1)  # 4 of 32 predictions change: 0.875 agreement
    with pytest.raises(ExportError, match=r"top-1 agreement 0\.875 \(at least 0\.9\)"):
        check("tflite_dynamic_range", agreement(reference, flipped), DYNAMIC_RANGE)
    with pytest.raises(ExportError):
        check("onnx", agreement(reference, reference * np.nan), FLOAT32)


def test_cli_export_refuses_an_unfinished_run_or_one_without_its_model_in_one_line(run_copy):
    status = json.loads((run_copy / "run.json").read_text())
    (run_copy / "run.json").write_text(json.dumps({**status, "status": "interrupted"}))
    result = _cli("export", run_copy, "--format", "tflite")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1
    assert "is interrupted, not finished" in result.stderr and "finetune resume" in result.stderr
    (run_copy / "run.json").write_text(json.dumps(status))
    (run_copy / "model.keras").unlink()
    result = _cli("export", run_copy)
    assert result.exit_code == 2 and result.stderr.strip().endswith("has no model.keras to export from")
    result = _cli("export", run_copy / "nowhere")
    assert result.exit_code == 2 and "is not a run folder" in result.stderr


def test_a_missing_converter_is_one_line_naming_the_package(run_copy, monkeypatch):
    import importlib.util

    from finetune.export.formats import check_available

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tf2onnx" else real(name, *a))
    recipe = copy.deepcopy(MLP_RECIPE)
    with pytest.raises(RecipeError, match=r"export\.formats: onnx needs the tf2onnx package\(s\) \(pip install"):
        finetune.load_recipe(recipe)  # before any training
    with pytest.raises(ExportError, match=r"onnx needs the tf2onnx package"):
        check_available(["keras", "onnx"])
    result = _cli("export", run_copy, "--format", "onnx")
    assert result.exit_code == 2 and "onnx needs the tf2onnx package(s)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    # The run's recipe lists onnx; exporting another format does not need its converter.
    (run_copy / "model.tflite").unlink()
    assert _cli("export", run_copy, "--format", "tflite").exit_code == 0
    assert (run_copy / "model.tflite").is_file()


def test_the_old_saved_model_flag_still_reads_with_a_notice():
    recipe = copy.deepcopy(MLP_RECIPE)
    recipe["export"] = {"saved_model": False}
    loaded = finetune.load_recipe(recipe)
    assert loaded.export.formats == ["keras"]
    assert any("export.saved_model: false is the old form of export.formats" in notice for notice in loaded.notices)
    recipe["export"] = {"saved_model": True}
    assert finetune.load_recipe(recipe).export.formats == ["keras", "saved_model"]
    # Both keys (an old --set on a dumped recipe): the flag edits the list.
    dumped = finetune.load_recipe(copy.deepcopy(MLP_RECIPE)).to_dict()
    assert finetune.load_recipe(dumped, ["export.saved_model=false"]).export.formats == ["keras", "tflite", "onnx"]
    assert finetune.load_recipe({**MLP_RECIPE, "export": {}}).export.formats == ["keras", "saved_model"]
    with pytest.raises(RecipeError, match=r"export\.formats"):
        finetune.load_recipe({**MLP_RECIPE, "export": {"formats": ["tflite", "tflite"]}})


def test_a_model_with_mc_dropout_exports_its_deterministic_form_and_passes_its_check(tmp_path):
    """The book's MC dropout recipe, shortened: the run ends finished, the SavedModel answers an image the same
    way every call, and its answers are the Keras model's with MC dropout off."""
    import keras
    import tensorflow as tf

    from finetune.export.formats import for_serving

    recipe = finetune.load_recipe(
        ROOT / "recipes" / "ch11_mc_dropout.yaml",
        [
            "data.train_limit=300",
            "data.test_limit=64",
            "phases.train.epochs=1",
            "evaluation.mc_samples=50",
            "training.verbose=0",
            "training.tensorboard=false",
            "export.formats=[keras, saved_model]",
        ],
    )
    result = finetune.run(recipe, out=tmp_path / "mc", log=lambda line: None)
    assert json.loads((tmp_path / "mc" / "run.json").read_text())["status"] == "finished"
    from finetune.data import load_dataset

    images = np.asarray(load_dataset(recipe.data, recipe.seed).test.images[:16])
    stochastic = [keras.ops.convert_to_numpy(result.model(images)) for _ in range(2)]
    assert not np.allclose(stochastic[0], stochastic[1])  # model.keras keeps MC dropout on
    served = tf.saved_model.load(str(tmp_path / "mc" / "saved_model"))
    first, second = (np.asarray(served.serve(tf.constant(images))) for _ in range(2))
    np.testing.assert_array_equal(first, second)
    expected = for_serving(result.model).predict(images, verbose=0)
    np.testing.assert_allclose(first, expected, atol=1e-5)
    # `finetune predict` on the run folder answers with the mean of the recipe's 50 passes, as evaluate does:
    # repeated calls then differ by a seventh of what single passes differ by (the mean's standard error).
    from finetune.inference.predictor import load_predictor

    predictor = load_predictor(tmp_path / "mc")
    assert any("mean of 50 MC dropout passes" in note for note in predictor.notes)
    answers = [predictor.predict(images) for _ in range(4)]
    singles = [keras.ops.convert_to_numpy(result.model(images, training=False)) for _ in range(4)]

    def spread(outputs):
        return float(np.mean(np.std(np.stack(outputs), axis=0)))

    assert spread(answers) < 0.35 * spread(singles), (spread(answers), spread(singles))


def test_a_format_that_fails_at_the_end_of_a_run_is_recorded_and_the_run_finishes_then_export_retries_it(
    tmp_path, monkeypatch
):
    """An export failure never strands a trained model: run.json says finished, metrics.json records the
    failure and the retry command; `finetune export --format` then writes it."""
    import onnxruntime

    genuine = onnxruntime.InferenceSession.run
    monkeypatch.setattr(  # the runtime answers with every image's probabilities moved one class on
        onnxruntime.InferenceSession,
        "run",
        lambda self, *args, **kwargs: [np.roll(output, 1, axis=-1) for output in genuine(self, *args, **kwargs)],
    )
    recipe = copy.deepcopy(MLP_RECIPE)
    recipe["phases"][0]["epochs"] = 1
    recipe["export"] = {"formats": ["keras", "onnx"]}
    lines: list[str] = []
    result = finetune.run(finetune.load_recipe(recipe), out=tmp_path / "run", log=lines.append)
    run_dir = result.run_dir
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    exported = json.loads((run_dir / "metrics.json").read_text())["export"]
    assert exported["keras"]["top1_agreement"] == 1.0
    assert exported["onnx"]["error"].startswith("export onnx disagrees with the Keras model")
    assert not (run_dir / "model.onnx").exists()
    warning = [line for line in lines if "export onnx disagrees" in line]
    assert warning and f"retry with: finetune export {run_dir} --format onnx" in warning[0]
    assert warning[0].startswith("[finetune] warning: ")

    monkeypatch.setattr(onnxruntime.InferenceSession, "run", genuine)  # the runtime fixed, say
    retried = _cli("export", run_dir, "--format", "onnx")
    assert retried.exit_code == 0, retried.output
    exported = json.loads((run_dir / "metrics.json").read_text())["export"]
    assert "error" not in exported["onnx"] and exported["onnx"]["top1_agreement"] == 1.0
    assert (run_dir / "model.onnx").is_file()


@pytest.mark.parametrize(
    "precision, formats, refused",
    [
        ("mixed_bfloat16", ["keras", "tflite"], "tflite"),
        ("mixed_float16", ["keras", "tflite"], "tflite"),
        ("mixed_bfloat16", ["keras", "onnx"], "onnx"),
    ],
)
def test_a_precision_whose_export_no_runtime_can_read_is_refused_by_validate(tmp_path, precision, formats, refused):
    """Both failures were measured at the end of real runs (FlexMatMul; ONNX Runtime's MatMul type error)."""
    recipe = copy.deepcopy(MLP_RECIPE)
    recipe["precision"] = precision
    recipe["export"] = {"formats": formats}
    with pytest.raises(RecipeError, match=rf"export\.formats: {refused} cannot be read back from a {precision} model"):
        finetune.load_recipe(recipe)
    path = tmp_path / "recipe.yaml"
    path.write_text(finetune.load_recipe(copy.deepcopy(MLP_RECIPE)).to_yaml())
    result = _cli("validate", path, "--set", f"precision={precision}", "--set", f"export.formats=[{','.join(formats)}]")
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1, result.output
    recipe["export"] = {"formats": ["keras", "saved_model", "onnx"] if precision == "mixed_float16" else ["keras"]}
    assert finetune.load_recipe(recipe).precision == precision  # what a runtime reads stays allowed


def test_export_checks_against_images_kept_with_the_run_so_the_training_data_may_be_gone(tmp_path):
    """A run folder moved to another machine (or its image folder deleted) still exports and verifies."""
    from PIL import Image

    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    for index, name in enumerate(("circle", "square", "star")):
        (folder / name).mkdir(parents=True)
        for number in range(12):
            pixels = rng.integers(0, 80, (20, 20), dtype=np.uint8) + np.uint8(80 * index)
            Image.fromarray(pixels).save(folder / name / f"{number}.png")
    recipe = copy.deepcopy(MLP_RECIPE)
    recipe["data"] = {"source": "image_folder", "data_dir": str(folder), "image_size": 20, "test_split": 0.25}
    recipe["phases"][0]["epochs"] = 1
    recipe["export"] = {"formats": ["keras"]}
    result = finetune.run(finetune.load_recipe(recipe), out=tmp_path / "run", log=lambda line: None)
    kept = np.load(result.run_dir / "export_check_images.npy")
    assert kept.dtype == np.uint8 and kept.shape[1:] == (20, 20, 1) and len(kept) == 9  # the 9 test images
    shutil.rmtree(folder)
    exported = _cli("export", result.run_dir, "--format", "saved_model")
    assert exported.exit_code == 0, exported.output
    entry = json.loads((result.run_dir / "metrics.json").read_text())["export"]["saved_model"]
    assert entry["images"] == 9 and entry["top1_agreement"] == 1.0


def _training_images(count=200):
    from finetune import data

    dataset = data.load_dataset(finetune.load_recipe(copy.deepcopy(MLP_RECIPE)).data, 0)
    return np.asarray(dataset.train.images[:count])


@pytest.mark.parametrize("output", ["float32", "uint8", "int8"])
def test_int8_tflite_computes_in_integers_and_keeps_the_predictions(run_copy, output):
    import tensorflow as tf

    from finetune.export.formats import export_all
    from finetune.export.tflite import predict_tflite

    images, class_names = _test_images(64)  # every test image: a flip is 1.6%, not 3%
    model = finetune.load_model(run_copy / "model.keras")
    results = export_all(
        model, run_copy, ["tflite"], "int8", class_names, images, calibration=_training_images(), tflite_io=output
    )
    assert "error" not in results["tflite_int8"], results
    path = run_copy / "model_int8.tflite"
    interpreter = tf.lite.Interpreter(model_path=str(path))
    source, target = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    assert source["dtype"] == np.uint8  # the raw pixels, as the model takes them
    assert target["dtype"] == {"float32": np.float32, "uint8": np.uint8, "int8": np.int8}[output]
    # Every weight matrix and every activation between the layers is int8 (biases int32): the float
    # model's 784x32, 32x16 and 16x10 kernels are all there, in int8.
    tensors = interpreter.get_tensor_details()
    kernels = [tensor for tensor in tensors if len(tensor["shape"]) == 2 and tensor["shape"][0] in (32, 16, 10)]
    assert {tuple(tensor["shape"]) for tensor in kernels} >= {(32, 784), (16, 32), (10, 16)}
    assert all(tensor["dtype"] == np.int8 for tensor in kernels)
    expected = model.predict(images, verbose=0)
    predicted = predict_tflite(path, images)  # an integer output is brought back to probabilities
    assert np.mean(predicted.argmax(1) == expected.argmax(1)) >= 0.95
    assert np.abs(predicted - expected).max() < 0.35
    assert results["tflite_int8"]["tensors"]["input"] == "uint8"
    assert results["tflite_int8"]["tensors"]["output"] == output
    assert path.stat().st_size < 0.4 * (run_copy / "model.tflite").stat().st_size


def test_int8_without_calibration_images_fails_in_one_line_and_leaves_no_file(run_copy):
    from finetune.export.formats import export_all

    images, class_names = _test_images()
    model = finetune.load_model(run_copy / "model.keras")
    results = export_all(model, run_copy, ["tflite"], "int8", class_names, images)
    assert "calibration images" in results["tflite_int8"]["error"]
    assert not (run_copy / "model_int8.tflite").exists()


def test_an_integer_output_without_int8_is_refused_by_the_recipe():
    recipe = copy.deepcopy(MLP_RECIPE)
    recipe["export"] = {"formats": ["tflite"], "tflite_quantization": "float16", "tflite_io": "uint8"}
    with pytest.raises(RecipeError, match="tflite_io uint8 needs tflite_quantization: int8"):
        finetune.load_recipe(recipe)


def test_cli_export_int8_calibrates_on_the_runs_training_data(run_copy):
    result = _cli("export", run_copy, "--format", "tflite", "--quantization", "int8", "--tflite-io", "uint8")
    assert result.exit_code == 0, result.output
    exported = json.loads((run_copy / "metrics.json").read_text())["export"]
    # On the run's 32 check images (0.9 allows three flips; the product's own floor, checked below).
    assert exported["tflite_int8"]["top1_agreement"] >= 0.9
    assert exported["tflite_int8"]["max_abs_diff"] < 0.35
    assert exported["tflite_int8"]["tensors"]["output"] == "uint8"
    refused = _cli("export", run_copy, "--format", "tflite", "--quantization", "float16", "--tflite-io", "uint8")
    assert refused.exit_code == 2 and "tflite_io uint8 needs tflite_quantization: int8" in refused.output
    assert exported["tflite_int8"]["tolerance"] == {"max_abs_diff": 0.35, "min_top1_agreement": 0.9}
