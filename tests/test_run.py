"""End to end: the import API, the run folder, the SavedModel and the command line."""

import csv
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from conftest import ROOT, cli, cli_in_process

import finetune
from finetune.errors import RunFolderError, RunInterrupted


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_backbone_weights):
    import copy

    from conftest import TINY_RECIPE

    raw = copy.deepcopy(TINY_RECIPE)
    raw["model"]["backbone"]["weights"] = str(tiny_backbone_weights)
    raw["phases"][0]["epochs"] = 2
    raw["training"].update(verbose="auto", tensorboard=True, gradient_health_every=200)  # epoch lines into ``lines``
    raw["export"] = {"formats": ["keras", "saved_model"]}
    recipe = finetune.load_recipe(raw)
    out = tmp_path_factory.mktemp("runs") / "tiny"
    lines: list[str] = []
    result = finetune.run(recipe, out=out, log=lines.append)
    result.log_lines = lines
    return result


def test_run_folder_holds_every_artifact(finished_run):
    run_dir = finished_run.run_dir
    for name in ("recipe.yaml", "history.csv", "metrics.json", "model.keras", "saved_model", "state.json", "run.json"):
        assert (run_dir / name).exists(), name
    assert not (run_dir / "checkpoint.keras").exists()  # replaced by model.keras at the end
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    # Gradient health sampled both phases, the cached head phase included.
    assert set(json.loads((run_dir / "gradient_norms.json").read_text())) == {"head", "finetune"}
    assert (run_dir / "gradient_norms.png").stat().st_size > 1000
    assert finetune.load_recipe(run_dir / "recipe.yaml") == finished_run.recipe


def test_history_has_every_epoch_of_every_phase(finished_run):
    with (finished_run.run_dir / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["phase"], row["epoch"], row["phase_epoch"]) for row in rows] == [
        ("head", "1", "1"),
        ("head", "2", "2"),
        ("finetune", "3", "1"),
    ]
    assert float(rows[0]["learning_rate"]) == pytest.approx(1e-3)
    assert float(rows[2]["learning_rate"]) == pytest.approx(1e-2)
    # The last row's validation accuracy is the final model's, recomputed here from its predictions.
    from finetune import data

    validation = data.load_dataset(finished_run.recipe.data, finished_run.recipe.seed).validation
    predicted = finished_run.model.predict(validation.images, verbose=0).argmax(axis=1)
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(float(np.mean(predicted == validation.labels)), abs=1e-6)


def test_each_epoch_has_one_log_line_with_the_history_values(finished_run):
    with (finished_run.run_dir / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    epoch_lines = [line for line in finished_run.log_lines if " epoch " in line and "img/s" in line]
    assert len(epoch_lines) == len(rows) == 3
    for line, row in zip(epoch_lines, rows, strict=True):
        assert line.startswith(f"[finetune] {row['phase']} epoch {row['epoch']}/")
        assert f"loss {float(row['loss']):.4f}" in line and f"val_acc {float(row['val_accuracy']):.4f}" in line
    assert not any("\r" in line for line in finished_run.log_lines)  # no live line outside a terminal


def test_the_run_ends_with_a_table_of_its_phases_and_the_test_result(finished_run):
    with (finished_run.run_dir / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    log = finished_run.log_lines
    table = log[log.index(next(line for line in log if "best val acc" in line)) :]
    head_best = max(float(row["val_accuracy"]) for row in rows if row["phase"] == "head")
    assert table[1].split()[1:3] == ["head", "2"] and table[1].endswith(f"{head_best:.4f}")
    assert table[2].split()[1:3] == ["finetune", "1"] and table[2].endswith(f"{float(rows[2]['val_accuracy']):.4f}")
    assert f"test accuracy {finished_run.test_accuracy:.4f}" in table[3] and str(finished_run.run_dir) in table[3]


def test_tensorboard_shows_every_phase_on_one_epoch_axis(finished_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with (finished_run.run_dir / "history.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    events = EventAccumulator(str(finished_run.run_dir / "tensorboard" / "train"))
    events.Reload()
    # Two fits (the phases) wrote to the same folder.
    logged = {event.step: float(tf_value(event)) for event in events.Tensors("epoch_loss")}
    assert sorted(logged) == [0, 1, 2]
    np.testing.assert_allclose([logged[step] for step in (0, 1, 2)], [float(row["loss"]) for row in rows], rtol=1e-5)


def tf_value(event):
    import tensorflow as tf

    return tf.make_ndarray(event.tensor_proto)


def test_evaluate_writes_another_split_into_a_new_subfolder(finished_run):
    from click.testing import CliRunner

    from finetune import data
    from finetune.cli import main

    run_dir = finished_run.run_dir
    metrics_before = (run_dir / "metrics.json").read_bytes()
    result = CliRunner().invoke(main, ["evaluate", str(run_dir), "--set", "data.test_limit=60", "--quiet"])
    assert result.exit_code == 0, result.output
    (folder,) = (run_dir / "evaluations").iterdir()
    metrics = json.loads((folder / "metrics.json").read_text())
    test = data.load_dataset(finetune.load_recipe(folder / "recipe.yaml").data, finished_run.recipe.seed).test
    assert metrics["test"]["examples"] == len(test) == 60
    predicted = finetune.load_model(run_dir).predict(test.images, verbose=0).argmax(axis=1)
    assert metrics["test"]["accuracy"] == pytest.approx(float(np.mean(predicted == test.labels)))
    # mistake_heatmaps.png: a MobileNetV2 backbone has a spatial output, so the mistakes get heatmaps too.
    pictures = {"confusion_matrix.png", "mistakes.png", "mistake_heatmaps.png", "report.html"}
    assert pictures <= {path.name for path in folder.iterdir()}
    assert (run_dir / "metrics.json").read_bytes() == metrics_before  # the run itself is untouched


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("phases.head.epochs=3", "evaluate changes only data.* and evaluation.*"), ("data.classes=[Bag]", "classes")],
)
def test_evaluate_refuses_what_would_change_the_model_in_one_line(finished_run, setting, expected):
    from click.testing import CliRunner

    from finetune.cli import main

    result = CliRunner().invoke(main, ["evaluate", str(finished_run.run_dir), "--set", setting])
    assert result.exit_code == 2 and expected in result.output and len(result.output.strip().splitlines()) == 1


def test_compare_reads_each_run_from_its_folder(finished_run, tmp_path):
    import csv as csv_module

    from click.testing import CliRunner

    from finetune.cli import main

    run_dir = str(finished_run.run_dir)
    (row,) = json.loads(CliRunner().invoke(main, ["compare", run_dir, "--json"]).output)
    assert row["test_accuracy"] == finished_run.test_accuracy and row["phases"] == "head 2, finetune 1"
    trainable = sum(int(np.prod(weight.shape)) for weight in finished_run.model.trainable_weights)
    assert row["trainable_weights"] == trainable and row["image_size"] == "32x32" and row["status"] == "finished"
    (parsed,) = csv_module.DictReader(CliRunner().invoke(main, ["compare", run_dir, "--csv"]).output.splitlines())
    assert float(parsed["test_accuracy"]) == finished_run.test_accuracy
    table = CliRunner().invoke(main, ["compare", run_dir, run_dir]).output.splitlines()
    assert table[0].split()[:3] == ["run", "recipe", "backbone"] and len(table) == 3
    refused = CliRunner().invoke(main, ["compare", run_dir, str(tmp_path)])
    assert refused.exit_code == 2 and "is not a run folder" in refused.output


def test_metrics_are_computed_from_the_model(finished_run):
    from finetune import data

    metrics = json.loads((finished_run.run_dir / "metrics.json").read_text())
    test = metrics["test"]
    assert set(test) >= {"accuracy", "loss", "per_class_accuracy", "confusion_matrix"}
    dataset = data.load_dataset(finished_run.recipe.data, finished_run.recipe.seed)
    predictions = finished_run.model.predict(dataset.test.images, verbose=0).argmax(axis=1)
    assert test["accuracy"] == pytest.approx(float(np.mean(predictions == dataset.test.labels)))
    confusion = np.array(test["confusion_matrix"])
    assert confusion.sum() == len(dataset.test) == 100
    assert np.trace(confusion) / confusion.sum() == pytest.approx(test["accuracy"])
    # 160 images and 3 epochs make no good classifier, but the training loss must fall.
    losses = [float(row["loss"]) for row in finished_run.history]
    assert losses[1] < losses[0]


def test_saved_model_serves_raw_uint8_images(finished_run):
    import tensorflow as tf

    served = tf.saved_model.load(str(finished_run.run_dir / "saved_model"))
    assert "serve" in served.signatures
    signature = served.signatures["serve"]
    rng = np.random.default_rng(0)
    for batch in (1, 7):
        images = rng.integers(0, 256, size=(batch, 28, 28, 1)).astype(np.uint8)
        expected = keras.ops.convert_to_numpy(finished_run.model(images))
        got = served.serve(tf.constant(images)).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)  # graph vs eager rounding
    spec = next(iter(signature.structured_input_signature[1].values()))
    assert spec.dtype == tf.uint8 and spec.shape.as_list() == [None, 28, 28, 1]
    labels = (finished_run.run_dir / "saved_model" / "labels.txt").read_text().splitlines()
    assert labels[0] == "T-shirt/top" and len(labels) == 10


def test_model_keras_loads_in_a_fresh_process(finished_run):
    code = (
        "import sys, numpy as np, finetune\n"
        "model = finetune.load_model(sys.argv[1])\n"
        "print(model.optimizer.__class__.__name__, model.output_shape[-1])\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(finished_run.run_dir / "model.keras")],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "10"


def test_model_keras_reloads_in_safe_mode(finished_run):
    reloaded = keras.saving.load_model(finished_run.run_dir / "model.keras", safe_mode=True)
    images = np.random.default_rng(1).integers(0, 256, size=(5, 28, 28, 1)).astype(np.uint8)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(reloaded(images)),
        keras.ops.convert_to_numpy(finished_run.model(images)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_an_existing_run_folder_is_never_overwritten(finished_run):
    before = {path.name: path.stat().st_mtime_ns for path in finished_run.run_dir.iterdir()}
    with pytest.raises(RunFolderError, match="already exists"):
        finetune.run(finished_run.recipe, out=finished_run.run_dir, log=lambda line: None)
    after = {path.name: path.stat().st_mtime_ns for path in finished_run.run_dir.iterdir()}
    assert before == after


def test_default_run_folder_is_new_each_time(tmp_path):
    from finetune.runner import new_run_dir

    first = new_run_dir(None, "my recipe", root=tmp_path)
    second = new_run_dir(None, "my recipe", root=tmp_path)
    assert first != second and first.parent == second.parent == tmp_path
    assert first.name.startswith("my_recipe-")


def test_cli_validate_accepts_the_flagship_recipe(tmp_path, monkeypatch):
    # Where its ImageNet file is (validate checks that the file is there, as a run would find it).
    (tmp_path / "xception_weights_tf_dim_ordering_tf_kernels_notop.h5").write_bytes(b"")
    monkeypatch.setenv("FINETUNE_WEIGHTS_DIR", str(tmp_path))
    result = cli_in_process("validate", "recipes/xception_fmnist.yaml")
    assert result.returncode == 0, result.stderr
    assert "phase head" in result.stdout and "phase finetune" in result.stdout


def test_cli_validate_shows_the_cut_and_the_augmentation():
    result = cli_in_process(
        "validate",
        "recipes/quickstart_lite0.yaml",
        *("--set", "model.backbone.cut_at=block5c", "--set", "data.image_size=80"),
        *("--set", "model.augment=[random_translation, random_flip, random_erasing]"),
        *("--set", "training.mix=[mixup, {name: cutmix, alpha: 0.5}]"),
    )
    assert result.returncode == 0, result.stderr
    assert "efficientnet_lite0 (imagenet) cut after block5c at 80x80" in result.stdout
    assert "augment (training only): random_translation, random_flip, random_erasing" in result.stdout
    assert "mix (training batches only): mixup, cutmix" in result.stdout


@pytest.mark.parametrize(
    "args, expected",
    [
        (["validate", "recipes/xception_fmnist.yaml", "--set", "data.image_size=32"], "at least 71x71"),
        (["validate", "recipes/xception_fmnist.yaml", "--set", "phases.heads.epochs=1"], "no item named 'heads'"),
        (["validate", "recipes/xception_fmnist.yaml", "--set", "epochs"], "expected KEY=VALUE"),
        (["validate", "missing.yaml"], "does not exist"),
        (["run", "recipes/xception_fmnist.yaml", "--set", "model.backbone.name=resnet"], "unknown backbone"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(args, expected):
    # One case through a real process (the entry point's exit code and stderr), the rest in this one.
    result = cli(*args) if args == ["validate", "missing.yaml"] else cli_in_process(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and expected in lines[0], result.stderr
    assert "Traceback" not in result.stderr


def test_cli_run_offline_without_imagenet_weights_fails_cleanly(tmp_path):
    out = tmp_path / "run"
    env_dir = tmp_path / "empty_weights"
    env_dir.mkdir()
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from keras.src.utils import file_utils\n"
            "def offline(*a, **k): raise Exception('URL fetch failure: offline')\n"
            "file_utils.get_file = offline\n"
            "from finetune.cli import main; sys.argv = ['finetune'] + sys.argv[1:]; main()",
            "run",
            "recipes/xception_fmnist.yaml",
            "--set",
            "data.train_limit=100",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT), "FINETUNE_WEIGHTS_DIR": str(env_dir)},
    )
    assert result.returncode == 2
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "xception_weights_tf_dim_ordering_tf_kernels_notop.h5" in last
    assert not out.exists()  # nothing is left behind by a run that could not start


@pytest.mark.slow
def test_cli_run_end_to_end(tmp_path, tiny_backbone_weights):
    import yaml
    from conftest import TINY_RECIPE

    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(TINY_RECIPE))
    out = tmp_path / "out"
    result = cli(
        "run",
        str(recipe_path),
        "--set",
        f"model.backbone.weights={tiny_backbone_weights}",
        "--set",
        "phases.finetune.epochs=0",
        "--set",
        "training.verbose=auto",
        "--set",
        "export.formats=[keras,saved_model]",
        "--out",
        str(out),
    )
    assert result.returncode == 0, result.stderr
    assert "phase finetune: 0 epochs, skipped" in result.stderr
    metrics = json.loads((out / "metrics.json").read_text())
    # The accuracy the command reports is the saved model's on the recipe's test images.
    from finetune import data

    recipe = finetune.load_recipe(out / "recipe.yaml")
    test = data.load_dataset(recipe.data, recipe.seed).test
    predicted = finetune.load_model(out / "model.keras").predict(test.images, verbose=0).argmax(axis=1)
    assert metrics["test"]["accuracy"] == pytest.approx(float(np.mean(predicted == test.labels)))
    assert metrics["test"]["examples"] == len(test) == 100
    assert (out / "saved_model" / "saved_model.pb").exists()
    # Not a terminal: one line per epoch and no live line redrawn in place.
    assert "\r" not in result.stderr
    assert sum(" epoch 1/1: loss " in line for line in result.stderr.splitlines()) == 1


@pytest.mark.slow
def test_cli_run_quiet_prints_nothing(tmp_path, tiny_backbone_weights):
    import yaml
    from click.testing import CliRunner
    from conftest import TINY_RECIPE

    from finetune.cli import main

    recipe_path = tmp_path / "tiny.yaml"
    recipe_path.write_text(yaml.safe_dump(TINY_RECIPE))
    out = tmp_path / "out"
    settings = [f"model.backbone.weights={tiny_backbone_weights}", "phases.finetune.epochs=0", "training.verbose=auto"]
    args = ["run", str(recipe_path), "--out", str(out), "--quiet"]
    for setting in settings:
        args += ["--set", setting]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    assert result.output == ""
    assert json.loads((out / "run.json").read_text())["status"] == "finished"


def test_pictures_and_report_are_written(finished_run):
    from PIL import Image

    from finetune import data

    run_dir = finished_run.run_dir
    for name in ("confusion_matrix.png", "learning_curves.png", "learning_rate.png", "mistakes.png"):
        with Image.open(run_dir / name) as picture:
            assert picture.format == "PNG" and picture.width > 400 and picture.height > 100, name
    report = (run_dir / "report.html").read_text(encoding="utf-8")
    # The four, mistake_heatmaps.png (a spatial backbone) and gradient_norms.png.
    assert report.count('<img src="data:image/png;base64,') == 6
    # The probabilities behind the pictures stay out of metrics.json and the result.
    assert json.loads((run_dir / "metrics.json").read_text()) == finished_run.metrics
    assert all(not key.startswith("_") for key in finished_run.metrics)
    # The mistakes are the model's: the page counts them, recomputed here from its predictions.
    test = data.load_dataset(finished_run.recipe.data, finished_run.recipe.seed).test
    wrong = int(np.sum(finished_run.model.predict(test.images, verbose=0).argmax(axis=1) != test.labels))
    assert f"{wrong} of {len(test)} test images misclassified" in report


def test_random_init_with_frozen_batch_norm_is_warned_about(tiny_recipe_dict):
    from conftest import layout_of

    from finetune.training.phases import setup_warnings

    def warnings(recipe):
        return setup_warnings(
            layout_of(finetune.build_model(recipe), recipe), recipe.model.backbone.weights, recipe.phases
        )

    tiny_recipe_dict["model"]["backbone"]["weights"] = None
    assert any("train_bn: true" in warning for warning in warnings(finetune.load_recipe(tiny_recipe_dict)))
    tiny_recipe_dict["phases"][1]["train_bn"] = True
    assert warnings(finetune.load_recipe(tiny_recipe_dict)) == []


class InterruptAt(keras.callbacks.Callback):
    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise KeyboardInterrupt


def test_an_interrupted_run_keeps_history_and_a_loadable_checkpoint(tmp_path, tiny_recipe_dict, monkeypatch):
    from finetune.training import train as training

    tiny_recipe_dict["phases"][0]["epochs"] = 3
    tiny_recipe_dict["training"]["checkpoint_seconds"] = 0  # a checkpoint after every epoch
    recipe = finetune.load_recipe(tiny_recipe_dict)
    original = training.fit_phase

    def fit_with_interrupt(*args, callbacks=None, **kwargs):
        # Ctrl-C arrives after epoch 2, once the run's own callbacks have saved it.
        return original(*args, callbacks=[*(callbacks or []), InterruptAt(2)], **kwargs)

    monkeypatch.setattr(training, "fit_phase", fit_with_interrupt)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(recipe, out=tmp_path / "run", log=lambda line: None)
    run_dir = tmp_path / "run"
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    state = json.loads((run_dir / "state.json").read_text())
    assert state.pop("run_seconds") > 0  # the run's clock at epoch 2's end, where a resume goes on from
    assert state == {
        "phase": "head",
        "phase_index": 0,
        "phase_epochs_done": 2,
        "epochs_done": 2,
        "interrupted_during_epoch": 3,
    }
    with (run_dir / "history.csv").open() as handle:
        assert len(list(csv.DictReader(handle))) == 2
    checkpoint = keras.saving.load_model(run_dir / "checkpoint.keras", safe_mode=True)
    assert int(keras.ops.convert_to_numpy(checkpoint.optimizer.iterations)) == 2 * 5  # 160 images, batch 32
    assert not list(run_dir.glob(".*partial*"))


def test_throttled_checkpoints_still_save_an_interrupted_run(tmp_path, tiny_recipe_dict, monkeypatch):
    from finetune.training import checkpoints
    from finetune.training import train as training

    tiny_recipe_dict["phases"][0]["epochs"] = 3
    tiny_recipe_dict["training"]["checkpoint_seconds"] = 3600  # no epoch is due for a save
    saves = []
    original_save = checkpoints.save_checkpoint
    monkeypatch.setattr(
        checkpoints,
        "save_checkpoint",
        lambda model, path, state, **kwargs: (saves.append(path.name), original_save(model, path, state, **kwargs)),
    )
    original = training.fit_phase

    def fit_with_interrupt(*args, callbacks=None, **kwargs):
        return original(*args, callbacks=[*(callbacks or []), InterruptAt(2)], **kwargs)

    monkeypatch.setattr(training, "fit_phase", fit_with_interrupt)
    with pytest.raises(KeyboardInterrupt):
        finetune.run(finetune.load_recipe(tiny_recipe_dict), out=tmp_path / "run", log=lambda line: None)
    assert saves == ["checkpoint.keras"]  # only the save on interrupt
    checkpoint = keras.saving.load_model(tmp_path / "run" / "checkpoint.keras", safe_mode=True)
    assert int(keras.ops.convert_to_numpy(checkpoint.optimizer.iterations)) == 2 * 5


_JAX_RUN = """
import copy, json, sys
sys.path.insert(0, "tests")
import keras, numpy as np
from keras.src.callbacks import callback_list
from conftest import TINY_RECIPE
import finetune
from finetune.errors import TrainingDiverged
from finetune.training.history import HistoryCSV
from finetune.training.train import StopOnNaN

dispatch = []
configure = callback_list.CallbackList._configure_async_dispatch

def spy(self, callbacks):
    configure(self, callbacks)
    if any(isinstance(callback, (HistoryCSV, StopOnNaN)) for callback in callbacks or []):
        dispatch.append(self._async_train)

callback_list.CallbackList._configure_async_dispatch = spy
recipe = copy.deepcopy(TINY_RECIPE)
recipe["export"] = {"saved_model": False}
recipe["data"]["classes"] = ["Sandal", "Shirt", "Bag"]
result = finetune.run(finetune.load_recipe(recipe), out=sys.argv[1], log=lambda _: None)
model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
model.compile(keras.optimizers.SGD(1e30), "mse")
x = np.ones((400, 3), "float32")
try:
    model.fit(x, x[:, :2] * 1e20, batch_size=4, epochs=1, verbose=0, callbacks=[StopOnNaN("train", 0)])
    stopped = None
except TrainingDiverged as error:
    stopped = str(error)
print(json.dumps({"backend": keras.backend.backend(), "phases": [row["phase"] for row in result.history],
                  "dispatch": dispatch, "stopped": stopped}))
"""


@pytest.mark.slow
def test_whole_run_on_the_jax_backend(tmp_path):
    """The GPU machines have JAX, not TensorFlow: model, data and training must not need tf."""
    pytest.importorskip("jax")
    code = _JAX_RUN
    out = tmp_path / "run"
    result = subprocess.run(
        [sys.executable, "-c", code, str(out)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == "jax" and report["phases"] == ["head", "finetune"]
    # JAX's Keras dispatches batch-end hooks on a thread when every callback allows it (TensorFlow's calls them
    # in line), so a step does not wait for the last one's logs: finetune's callbacks allow it, every fit.
    assert report["dispatch"] and all(report["dispatch"]), report
    assert report["stopped"] and report["stopped"].startswith("loss became"), report  # a NaN still stops it
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    assert json.loads((out / "metrics.json").read_text())["test"]["class_names"] == ["Sandal", "Shirt", "Bag"]


@pytest.mark.parametrize(
    "raised, code, expected",
    [
        (KeyboardInterrupt(), 130, "interrupted"),
        (
            RunInterrupted("runs/my run"),
            130,
            "interrupted; the last finished epoch is saved. Continue with: finetune resume 'runs/my run'",
        ),
        (
            RuntimeError("the tensor went sideways\nand a second line"),
            1,
            "error: unexpected RuntimeError: the tensor went sideways (run again with --debug for the traceback)",
        ),
        (RunFolderError("run folder 'x' already exists"), 2, "error: run folder 'x' already exists"),
    ],
)
def test_cli_exit_codes_and_one_line_for_every_way_a_command_ends(
    monkeypatch, tiny_recipe_dict, tmp_path, raised, code, expected
):
    import yaml
    from click.testing import CliRunner

    from finetune.cli import main
    from finetune.runner import pipeline

    def failing_run(*args, **kwargs):
        raise raised

    monkeypatch.setattr(pipeline, "run", failing_run)  # what `finetune run` calls
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(tiny_recipe_dict))
    result = CliRunner().invoke(main, ["run", str(recipe)])
    assert result.exit_code == code
    assert result.output.strip().splitlines() == [expected]
    debug = CliRunner().invoke(main, ["run", str(recipe), "--debug"])
    assert debug.exit_code == code
    assert "Traceback (most recent call last)" in debug.output and "failing_run" in debug.output
    assert debug.output.strip().splitlines()[-1] == expected


@pytest.mark.parametrize(
    "command",
    [
        ["validate", "recipes/xception_fmnist.yaml"],
        ["plugins"],
        ["weights"],
        ["weights", "fetch", "xception"],
        ["weights", "import", "xception", "x.h5"],
        ["resume", "no-such-run"],
    ],
)
def test_every_command_takes_debug(command):
    from click.testing import CliRunner

    from finetune.cli import main

    result = CliRunner().invoke(main, [*command, "--help"])
    assert result.exit_code == 0 and "--debug" in result.output


def test_debug_shows_the_traceback_behind_a_recipe_error():
    from click.testing import CliRunner

    from finetune.cli import main

    args = ["validate", "recipes/xception_fmnist.yaml", "--set", "data.image_size=32"]
    plain = CliRunner().invoke(main, args)
    assert plain.exit_code == 2 and "Traceback" not in plain.output
    debug = CliRunner().invoke(main, [*args, "--debug"])
    assert debug.exit_code == 2 and "Traceback (most recent call last)" in debug.output
    assert "RecipeError" in debug.output and debug.output.strip().splitlines()[-1] == plain.output.strip()


@pytest.mark.slow
def test_ctrl_c_on_a_real_run_exits_130_and_marks_the_folder_interrupted(tmp_path, tiny_backbone_weights):
    import signal
    import time

    from conftest import long_recipe_file

    path = long_recipe_file(tmp_path, tiny_backbone_weights, epochs=200)
    out = tmp_path / "run"
    process = subprocess.Popen(
        [sys.executable, "-m", "finetune", "run", str(path), "--out", str(out)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "history.csv").exists():  # an epoch has finished: the run is well inside fit
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
            time.sleep(0.2)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 130, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        f"interrupted; the last finished epoch is saved. Continue with: finetune resume {out}"
    )
    assert "Traceback" not in stderr
    assert json.loads((out / "run.json").read_text())["status"] == "interrupted"
    assert (out / "checkpoint.keras").is_file()


def test_a_reader_that_stops_early_gets_no_error(tmp_path):
    """`finetune plugins | head -1`: the closed pipe ends the command without a message."""
    command = f"{sys.executable} -m finetune plugins | head -1"
    result = subprocess.run(
        ["bash", "-c", command],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.stdout.startswith("optimizers")
    assert "BrokenPipe" not in result.stderr and "Traceback" not in result.stderr
    assert not any(line.startswith("error:") for line in result.stderr.splitlines())
