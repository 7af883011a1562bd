"""metrics.json's single-label scores against scikit-learn's, and macro-F1 in ``finetune compare``."""

import csv
import io
import json
import warnings

import numpy as np
import pytest
import yaml
from conftest import cli_in_process
from sklearn.metrics import (
    balanced_accuracy_score,
    f1_score,
    precision_recall_fscore_support,
    top_k_accuracy_score,
)

from finetune.evaluation.metrics import metrics_from_probabilities

NAMES = [f"class {index}" for index in range(9)]
NEVER_PREDICTED, ONLY_PREDICTED, NOWHERE = 6, 7, 8


def fixed_predictions(count=400, seed=0):
    """Random probabilities over nine classes, right about half the time: class 6 is in the labels but never
    predicted, class 7 predicted but never a label, class 8 neither."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, ONLY_PREDICTED, count)  # classes 0-6
    probabilities = rng.dirichlet(np.ones(len(NAMES)), count)
    right = rng.random(count) < 0.5
    probabilities[right, labels[right]] += 1.0
    probabilities[:, NEVER_PREDICTED] *= 0.01
    probabilities[:, NOWHERE] *= 0.01
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    predictions = probabilities.argmax(axis=1)
    assert NEVER_PREDICTED in labels and NEVER_PREDICTED not in predictions
    assert ONLY_PREDICTED in predictions and ONLY_PREDICTED not in labels
    assert NOWHERE not in predictions and NOWHERE not in labels
    return labels, probabilities, predictions


def test_per_class_scores_are_scikit_learns_with_zero_division_0():
    labels, probabilities, predictions = fixed_predictions()
    test = metrics_from_probabilities(probabilities, labels, NAMES)
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predictions, labels=range(len(NAMES)), zero_division=0
    )
    for index, name in enumerate(NAMES):
        score = test["per_class"][name]
        assert score["precision"] == pytest.approx(precision[index], abs=1e-12)
        assert score["recall"] == pytest.approx(recall[index], abs=1e-12)
        assert score["f1"] == pytest.approx(f1[index], abs=1e-12)
        assert score["support"] == support[index] and isinstance(score["support"], int)
    assert test["per_class"][NAMES[NEVER_PREDICTED]]["precision"] == 0.0  # the zero_division cases exist
    assert test["per_class"][NAMES[ONLY_PREDICTED]]["recall"] == 0.0 and f1[ONLY_PREDICTED] == 0.0
    assert json.loads(json.dumps(test)) == test  # plain JSON: no numpy scalars, no NaN


def test_macro_f1_balanced_and_top_k_accuracy_are_scikit_learns():
    labels, probabilities, predictions = fixed_predictions()
    test = metrics_from_probabilities(probabilities, labels, NAMES)
    # scikit-learn's default classes: those in the labels or the predictions (not class 8).
    assert test["macro_f1"] == pytest.approx(f1_score(labels, predictions, average="macro", zero_division=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "y_pred contains classes not in y_true": class 7, on purpose
        balanced = balanced_accuracy_score(labels, predictions)
    assert test["balanced_accuracy"] == pytest.approx(balanced)
    assert test["top_k"] == 5
    expected = top_k_accuracy_score(labels, probabilities, k=5, labels=range(len(NAMES)))
    assert test["top_k_accuracy"] == pytest.approx(expected)
    assert test["accuracy"] < test["top_k_accuracy"] < 1.0


def test_existing_keys_are_unchanged():
    labels, probabilities, predictions = fixed_predictions()
    test = metrics_from_probabilities(probabilities, labels, NAMES)
    confusion = np.zeros((len(NAMES), len(NAMES)), dtype=int)
    for label, prediction in zip(labels, predictions, strict=True):
        confusion[label, prediction] += 1
    assert test["confusion_matrix"] == confusion.tolist() and test["class_names"] == NAMES
    assert test["accuracy"] == pytest.approx(np.mean(labels == predictions)) and test["examples"] == len(labels)
    for index, name in enumerate(NAMES):
        images = labels == index
        expected = float(np.mean(predictions[images] == index)) if images.any() else None
        assert test["per_class_accuracy"][name] == (pytest.approx(expected) if images.any() else None)


def test_top_k_is_left_out_with_five_classes_or_fewer_and_ties_rank_as_argmax_does():
    labels, probabilities, _ = fixed_predictions()
    keep = labels < 5
    five = metrics_from_probabilities(probabilities[keep][:, :5], labels[keep], NAMES[:5])
    assert "top_k" not in five and "top_k_accuracy" not in five and "macro_f1" in five
    # All classes equally probable: argmax says class 0, so the top 5 are classes 0-4.
    uniform = np.full((len(labels), len(NAMES)), 1 / len(NAMES))
    test = metrics_from_probabilities(uniform, labels, NAMES)
    assert test["top_k_accuracy"] == pytest.approx(np.mean(labels < 5))
    assert test["accuracy"] == pytest.approx(np.mean(labels == 0))


RECIPE = {
    "name": "mlp_compare",
    "seed": 0,
    "data": {"source": "fashion_mnist", "image_size": 28, "validation_split": 0.0},
    "model": {"backbone": {"name": "mlp", "weights": None}, "head": {}},
    "phases": [{"name": "train", "epochs": 1, "trainable": "all"}],
}


def fabricated_run(path, test_metrics):
    """A finished run's folder as ``compare`` reads it: recipe, run.json, metrics.json (no model needed)."""
    path.mkdir()
    (path / "recipe.yaml").write_text(yaml.safe_dump(RECIPE))
    (path / "run.json").write_text(json.dumps({"status": "finished"}))
    (path / "metrics.json").write_text(json.dumps({"test": test_metrics, "seconds": 3.0}))
    return str(path)


def test_compare_shows_macro_f1_beside_accuracy_and_a_dash_for_an_older_run(tmp_path):
    new = fabricated_run(tmp_path / "new", {"accuracy": 0.8125, "macro_f1": 0.71875, "loss": 0.5})
    old = fabricated_run(tmp_path / "old", {"accuracy": 0.75, "loss": 0.625})  # metrics.json from before macro-F1
    table = cli_in_process("compare", new, old)
    assert table.returncode == 0, table.stderr
    header, *rows = [line.split() for line in table.stdout.splitlines()]
    column = header.index("test_accuracy")
    assert header[column + 1] == "test_macro_f1"
    # Cells hold no spaces after the backbone's ("mlp (random init)": three words), so count from the end.
    assert [row[column - len(header) : column - len(header) + 2] for row in rows] == [
        ["0.8125", "0.7188"],
        ["0.7500", "-"],
    ]
    (first, second) = json.loads(cli_in_process("compare", new, old, "--json").stdout)
    assert first["test_macro_f1"] == 0.71875 and second["test_macro_f1"] is None
    parsed = list(csv.DictReader(io.StringIO(cli_in_process("compare", new, old, "--csv").stdout)))
    assert [row["test_macro_f1"] for row in parsed] == ["0.71875", ""]


def test_the_epoch_macro_f1_metric_sums_its_batches_as_scikit_learn_scores_the_whole():
    from sklearn.metrics import f1_score

    from finetune.catalog.losses import MacroF1

    rng = np.random.default_rng(3)
    labels = rng.choice([0, 1, 2, 4], size=150)  # class 3 predicted but never a label, class 5 in neither
    probabilities = rng.dirichlet(np.ones(6) * 0.3, size=150)
    probabilities[:5, 3] = 5.0
    metric = MacroF1(6)
    for start in range(0, 150, 32):  # batches of several sizes; a mean of per-batch F1s would differ
        metric.update_state(labels[start : start + 32], probabilities[start : start + 32])
    expected = f1_score(labels, probabilities.argmax(axis=1), average="macro", zero_division=0)
    assert float(metric.result()) == pytest.approx(expected, abs=1e-6)
    one_hot = MacroF1(6)
    one_hot.update_state(np.eye(6)[labels], probabilities)  # mixed batches' targets: the dominant class
    assert float(one_hot.result()) == pytest.approx(expected, abs=1e-6)
    metric.reset_state()
    metric.update_state(labels[:10], np.eye(6)[labels[:10]])
    assert float(metric.result()) == pytest.approx(1.0)


def test_a_run_with_epoch_metrics_logs_validation_macro_f1_equal_to_scikit_learns_on_its_model(tmp_path):
    import copy

    from sklearn.metrics import f1_score

    import finetune
    from finetune import data

    recipe = {
        "name": "mlp_f1",
        "seed": 0,
        "precision": "float32",
        "data": {"source": "fashion_mnist", "image_size": 28, "validation_split": 0.25, "train_limit": 400},
        "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [16]}}, "head": {}},
        "training": {"batch_size": 32, "verbose": 0, "epoch_metrics": ["macro_f1"], "tensorboard": False},
        "evaluation": {"batch_size": 64},
        "export": {"formats": ["keras"]},
        "phases": [
            {"name": "train", "epochs": 2, "trainable": "all", "optimizer": {"name": "adam", "learning_rate": 3e-3}}
        ],
    }
    recipe["data"]["test_limit"] = 50
    loaded = finetune.load_recipe(copy.deepcopy(recipe))
    result = finetune.run(loaded, out=tmp_path / "run", log=lambda line: None)
    rows = list(csv.DictReader((tmp_path / "run" / "history.csv").open()))
    assert {"macro_f1", "val_macro_f1"} <= set(rows[-1])
    validation = data.load_dataset(loaded.data, loaded.seed).validation
    predicted = result.model.predict(validation.images, verbose=0).argmax(axis=1)
    expected = f1_score(validation.labels, predicted, average="macro", zero_division=0)
    assert float(rows[-1]["val_macro_f1"]) == pytest.approx(expected, abs=1e-6)
    assert 0.0 < expected < 1.0  # a partly trained model: the equality means something
