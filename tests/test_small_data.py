"""Off the beaten path: phases sized to the data, a first epoch that makes things worse named, lr-find on any size."""

import json
import math

import keras
import numpy as np
import pytest
import yaml
from click.testing import CliRunner
from conftest import logged_lines

import finetune
from finetune.cli import main
from finetune.data.batches import FileBatches
from finetune.recipe import PhaseConfig, TrainingConfig
from finetune.training.divergence import DivergenceWatch, divergence_message, read_warnings
from finetune.training.lr_find import SweepBatches
from finetune.training.phases import sized_phases


def phase(name, epochs, min_steps=0, batch_size=None):
    return PhaseConfig(name=name, epochs=epochs, min_steps=min_steps, batch_size=batch_size)


def test_a_phase_runs_enough_epochs_for_its_min_steps_and_says_so():
    phases = (phase("head", 1, min_steps=100), phase("finetune", 3, min_steps=300), phase("off", 0, min_steps=50))
    sized, notes = sized_phases(phases, TrainingConfig(batch_size=128), 1281)  # 11 steps per epoch
    assert [p.epochs for p in sized] == [10, 28, 0]  # ceil(100 / 11), ceil(300 / 11); 0 stays skipped
    assert len(notes) == 2 and "trains 10 epochs (110 steps) for min_steps: 100" in notes[0]
    full, notes = sized_phases(phases, TrainingConfig(batch_size=128), 57_000)  # 446 steps per epoch
    assert [p.epochs for p in full] == [1, 3, 0] and notes == []
    own_batch, _ = sized_phases((phase("x", 1, min_steps=20, batch_size=10),), TrainingConfig(batch_size=128), 100)
    assert own_batch[0].epochs == 2  # the phase's own batch size: 10 steps per epoch


@pytest.mark.parametrize(
    ("first", "epoch", "expected"),
    [
        (2.4, 2.78, "higher than where it started"),  # the quick start on 1,300 digits before the fix
        (2.35, 2.36, "above chance"),
        (5.0, 3.16, None),  # a new head on large features: far above chance, but falling fast
        (0.30, 0.32, None),  # a warm model's noise
        (2.3, 1.2, None),
    ],
)
def test_divergence_is_a_rise_or_a_loss_above_chance_that_did_not_fall(first, epoch, expected):
    message = divergence_message("finetune", 10, first, epoch)
    if expected is None:
        assert message is None
    else:
        assert expected in message and "phase finetune" in message and "trainable: none" in message


def test_a_rate_that_wrecks_the_model_is_warned_about_and_kept(tmp_path):
    """A real fit at an absurd rate: the watch warns once, in the log and in warnings.json."""
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 20)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, "relu"), keras.layers.Dense(2, "softmax")])
    model.compile(keras.optimizers.Adam(5.0), "sparse_categorical_crossentropy")  # finite, and far worse
    watch = DivergenceWatch("head", 2, 0, tmp_path)
    with logged_lines() as lines:
        model.fit(x, y, batch_size=16, epochs=2, verbose=0, callbacks=[watch])
    assert watch.message is not None and len([line for line in lines if "warning" in line]) == 1
    assert read_warnings(tmp_path)[0]["phase"] == "head"
    calm = DivergenceWatch("calm", 2, 0, tmp_path)
    model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, "relu"), keras.layers.Dense(2, "softmax")])
    model.compile(keras.optimizers.Adam(1e-3), "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=16, epochs=1, verbose=0, callbacks=[calm])
    assert calm.message is None and len(read_warnings(tmp_path)) == 1


def test_epochs_of_one_step_are_judged_over_the_first_ten_steps():
    """On a tiny split each epoch is one batch: the first epoch is the first batch, never worse than itself."""
    rng = np.random.default_rng(1)
    x = rng.normal(size=(12, 20)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")

    def fit(rate, epochs):
        keras.utils.set_random_seed(0)
        model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(64, "relu"), keras.layers.Dense(2, "softmax")])
        model.compile(keras.optimizers.Adam(rate), "sparse_categorical_crossentropy")
        watch = DivergenceWatch("head", 2, 0, head_only=True)
        model.fit(x, y, batch_size=16, epochs=epochs, verbose=0, callbacks=[watch])
        return watch.message

    assert fit(1e-2, 14) is None  # learning: no warning, although epoch 1's loss equals its first batch's
    message = fit(5.0, 14)
    assert message is not None and "its first 10 steps (10 epochs)" in message
    assert "trainable: none" not in message and "Lower the learning rate" in message  # it is the head phase
    assert fit(5.0, 3) is not None  # a phase shorter than ten steps is judged at its end


def test_the_sweep_reads_the_same_batches_whatever_order_keras_asks_in():
    """Step i is batch i % per_pass of pass i // per_pass; Keras reads batch 0 first, then in order."""
    x = np.arange(50, dtype="float32").reshape(50, 1)
    y = np.arange(50)
    in_order = SweepBatches(FileBatches(x, y, 16, shuffle=True, seed=3), 20)
    first = [in_order[i][1].tolist() for i in range(20)]
    shuffled = SweepBatches(FileBatches(x, y, 16, shuffle=True, seed=3), 20)
    asked = [0, *range(20)]  # Keras's peek at batch 0, then the sweep
    seen = {i: shuffled[i][1].tolist() for i in asked}
    assert [seen[i] for i in range(20)] == first
    assert in_order.passes == 7 and in_order.sizes == [16] * 20  # 3 whole batches a pass; the 2 left over skipped
    assert first[:3] != first[3:6]  # each pass in its own order


def small_recipe(folder, train_limit):
    recipe = {
        "name": "small_mlp",
        "seed": 0,
        "precision": "float32",
        "data": {"source": "fashion_mnist", "image_size": 28, "validation_split": 0.2, "train_limit": train_limit},
        "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [16]}}},
        "training": {"batch_size": 64, "verbose": 0, "gradient_health_every": 0},
        "phases": [{"name": "head", "epochs": 1, "trainable": "none", "optimizer": {"name": "adam"}}],
    }
    path = folder / "small.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("train_limit", [30, 100])
def test_lr_find_runs_every_step_on_less_data_than_the_sweep_reads(tmp_path, train_limit):
    recipe = small_recipe(tmp_path, train_limit)
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["lr-find", str(recipe), "--steps", "60", "--end", "0.1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    saved = json.loads((out / "lr_find.json").read_text())
    assert len(saved["learning_rates"]) == 60 and all(math.isfinite(loss) for loss in saved["losses"])
    assert "times over" in result.stderr
    if train_limit == 30:  # 24 training images: fewer than one batch of 64
        assert "fewer than one batch of 64" in result.stderr


def test_a_run_sized_up_for_small_data_records_its_epochs_and_resumes_alike(tmp_path):
    recipe = yaml.safe_load(small_recipe(tmp_path, 100).read_text())
    recipe["phases"][0]["min_steps"] = 6  # 80 training images, batch 64: 2 steps per epoch -> 3 epochs
    lines = []
    result = finetune.run(finetune.load_recipe(recipe), out=tmp_path / "run", log=lines.append)
    assert [row["phase_epoch"] for row in result.history] == ["1", "2", "3"]
    assert any("trains 3 epochs (6 steps) for min_steps: 6" in line for line in lines)


def test_lr_find_says_in_one_line_that_it_runs_as_one_process(tmp_path):
    recipe = small_recipe(tmp_path, 100)
    out = tmp_path / "sweep"
    args = ["lr-find", str(recipe), "--steps", "4", "--out", str(out), "--set", "distribution.strategy=mirrored"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    notes = [line for line in result.stderr.splitlines() if "runs as one process" in line]
    assert notes == [
        "[finetune] note: finetune lr-find runs as one process; distribution.strategy: mirrored applies to "
        "finetune run and resume"
    ]
    assert json.loads((out / "lr_find.json").read_text())["learning_rates"]
