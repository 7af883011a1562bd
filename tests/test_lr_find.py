"""The learning-rate finder: the rates it sweeps, what it records, that it restores the model, and its suggestion."""

import json
import re
from pathlib import Path

import keras
import numpy as np
import pytest
import yaml
from click.testing import CliRunner

from finetune.cli import main
from finetune.data.batches import FileBatches
from finetune.data.sources.fashion_mnist import fashion_mnist_search_dirs, read_idx
from finetune.training.lr_find import SweepSettings, find_learning_rate

BATCH = 32


@pytest.fixture(scope="module")
def images():
    """512 real Fashion-MNIST training images, flattened to [0, 1], and their labels."""
    folder = next(d for d in fashion_mnist_search_dirs() if (d / "train-images-idx3-ubyte.gz").is_file())
    x = read_idx(folder / "train-images-idx3-ubyte.gz")[:512].reshape(512, -1).astype("float32") / 255
    y = read_idx(folder / "train-labels-idx1-ubyte.gz")[:512].astype("int64")
    return x, y


def softmax_regression(learning_rate=0.01, momentum=0.0):
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(10, activation="softmax")])
    model.compile(keras.optimizers.SGD(learning_rate, momentum=momentum), "sparse_categorical_crossentropy")
    return model


class Spy(keras.callbacks.Callback):
    """Reads the optimizer's rate and the model's loss on the batch about to train (first pass only)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches
        self.rates, self.losses_before = [], []
        self.last_weights = None

    def on_train_batch_begin(self, batch, logs=None):
        if batch < len(self.batches) - 1:  # full batches of the first pass
            x, y = self.batches[batch]
            loss = keras.losses.sparse_categorical_crossentropy(y, self.model(x))
            self.losses_before.append(float(np.mean(keras.ops.convert_to_numpy(loss))))

    def on_train_batch_end(self, batch, logs=None):
        self.rates.append(float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
        self.last_weights = [w.copy() for w in self.model.get_weights()]


def test_the_optimizer_trains_at_the_exponential_rates_and_each_batch_loss_is_recorded(images):
    x, y = images
    model = softmax_regression()
    spy = Spy(FileBatches(x, y, BATCH, shuffle=True, seed=0))
    result = find_learning_rate(
        model, x, y, SweepSettings(start=1e-5, end=1e-2, steps=30), batch_size=BATCH, callbacks=[spy]
    )
    expected = 1e-5 * (1e-2 / 1e-5) ** (np.arange(30) / 29)
    assert not result.stopped_early and len(result.learning_rates) == 30
    np.testing.assert_allclose(result.learning_rates, expected, rtol=1e-6)
    np.testing.assert_allclose(spy.rates, expected, rtol=1e-6)  # what the optimizer held at each step
    # Each batch's own loss (Keras reports a running mean): the loss of the weights that met it.
    first_pass = len(spy.losses_before)
    np.testing.assert_allclose(result.raw_losses[:first_pass], spy.losses_before, rtol=2e-4)
    # The smoothed curve is the bias-corrected moving average of those losses.
    average, smoothed = 0.0, []
    for step, loss in enumerate(result.raw_losses):
        average = 0.9 * average + 0.1 * loss
        smoothed.append(average / (1 - 0.9 ** (step + 1)))
    np.testing.assert_allclose(result.losses, smoothed, rtol=1e-6)


def test_the_weights_and_the_optimizer_state_are_restored_afterwards(images):
    x, y = images
    model = softmax_regression(learning_rate=0.05, momentum=0.9)
    model.optimizer.build(model.trainable_variables)
    before = [w.copy() for w in model.get_weights()]
    state = [keras.ops.convert_to_numpy(v).copy() for v in model.optimizer.variables]
    spy = Spy(FileBatches(x, y, BATCH, shuffle=True, seed=0))
    find_learning_rate(model, x, y, SweepSettings(start=1e-4, end=1.0, steps=40), batch_size=BATCH, callbacks=[spy])
    assert any(not np.array_equal(a, b) for a, b in zip(spy.last_weights, before, strict=True))  # it did train
    for restored, original in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(restored, original)
    for variable, original in zip(model.optimizer.variables, state, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), original)
    assert float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)) == pytest.approx(0.05)


def test_the_sweep_stops_once_the_smoothed_loss_passes_four_times_its_minimum(images):
    x, y = images
    result = find_learning_rate(
        softmax_regression(), x, y, SweepSettings(start=1e-3, end=1e4, steps=150), batch_size=BATCH
    )
    losses = np.asarray(result.losses)
    assert result.stopped_early and len(losses) < 150
    # Every smoothed loss but the last stayed within 4x of the minimum so far; the last did not (the clipped
    # cross-entropy stays finite, so it is this rule that stops the sweep).
    assert all(losses[i] <= 4 * losses[: i + 1].min() for i in range(len(losses) - 1))
    assert losses[-1] > 4 * losses.min()


def test_the_suggestion_lies_in_the_sweep_and_within_10x_of_the_best_of_a_grid_of_rates(images):
    x, y = images
    model = softmax_regression()
    result = find_learning_rate(model, x, y, SweepSettings(start=1e-7, end=10.0, steps=200), batch_size=BATCH)
    initial = [w.copy() for w in model.get_weights()]
    final_loss = {}
    for rate in (1e-4, 1e-3, 1e-2, 1e-1, 1.0):  # the same optimizer for 48 steps from the same weights
        model.set_weights(initial)
        for variable in model.optimizer.variables:
            variable.assign(keras.ops.zeros_like(variable))
        model.optimizer.learning_rate.assign(rate)
        model.fit(FileBatches(x, y, BATCH, shuffle=True, seed=1), epochs=3, verbose=0, shuffle=False)
        final_loss[rate] = float(model.evaluate(x, y, verbose=0))
    best = min(final_loss, key=final_loss.get)
    assert 1e-7 <= result.suggestion <= 10.0
    assert best / 10 <= result.suggestion <= best * 10, (result.suggestion, final_loss)


def tiny_mlp_recipe(folder: Path) -> Path:
    recipe = {
        "name": "tiny_mlp",
        "seed": 0,
        "precision": "float32",
        "data": {"source": "fashion_mnist", "image_size": 28, "validation_split": 0.2, "train_limit": 300},
        "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [32]}}},
        "training": {"batch_size": 32, "verbose": 0, "gradient_health_every": 0},
        "phases": [
            {"name": "head", "epochs": 1, "trainable": "none", "optimizer": {"name": "adam", "learning_rate": 1e-3}},
            {"name": "whole", "epochs": 1, "trainable": "all", "optimizer": {"name": "sgd", "momentum": 0.9}},
        ],
    }
    path = folder / "tiny_mlp.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_lr_find_writes_the_picture_and_json_and_prints_the_set_option(tmp_path):
    recipe = tiny_mlp_recipe(tmp_path)
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["lr-find", str(recipe), "--steps", "40", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert (out / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((out / "lr_find.json").read_text())
    assert saved["phase"] == "head" and 2 <= len(saved["learning_rates"]) <= 40
    assert "frozen part computed once" in result.stderr  # the head phase sweeps on cached features
    match = re.search(r"--set phases\.head\.optimizer\.learning_rate=(\S+)", result.stdout)
    assert match and float(match.group(1)) == pytest.approx(saved["suggestion"], rel=0.06)  # two digits
    assert saved["suggestion"] == pytest.approx(saved["learning_rates"][int(np.argmin(saved["losses"]))] / 10)


def test_lr_find_of_a_later_phase_trains_the_earlier_ones_first(tmp_path):
    recipe = tiny_mlp_recipe(tmp_path)
    out = tmp_path / "sweep"
    result = CliRunner().invoke(main, ["lr-find", str(recipe), "--phase", "whole", "--steps", "20", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "training those first" in result.stderr and "phase head (1/1)" in result.stderr
    assert "--set phases.whole.optimizer.learning_rate=" in result.stdout


def test_an_unknown_phase_is_one_line_and_exit_code_2(tmp_path):
    recipe = tiny_mlp_recipe(tmp_path)
    result = CliRunner().invoke(main, ["lr-find", str(recipe), "--phase", "nope", "--out", str(tmp_path / "x")])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "'nope'" in lines[0] and "head, whole" in lines[0], result.stderr
    assert not (tmp_path / "x").exists()
