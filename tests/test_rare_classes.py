"""Rare classes: ``training.class_weight`` (every phase, cached features too), ``data.sampling: balanced``,
and the warning when the largest training class dwarfs the smallest."""

import html
import json
import logging

import numpy as np
import pytest
from PIL import Image

import finetune
from finetune.data.balance import class_weights
from finetune.data.batches import FileBatches
from finetune.data.sources.fashion_mnist import load_fashion_mnist
from finetune.errors import RecipeError
from finetune.recipe import DataConfig

COMMON, RARE = "pullover", "coat"  # Fashion-MNIST classes 2 and 4: alike, so a model can ignore the rare one
TRAIN_COUNTS = {COMMON: 400, RARE: 20}  # 1:20
TEST_PER_CLASS = 100


@pytest.fixture(autouse=True)
def image_cache(tmp_path, monkeypatch):
    """Each test decodes its image folder into its own cache folder."""
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "image-cache"))


def write_fashion_folder(root, counts, test_per_class=TEST_PER_CLASS):
    """``root/train/CLASS/*.png`` with ``counts[CLASS]`` real Fashion-MNIST images, ``root/test`` balanced."""
    train, test, _, _ = load_fashion_mnist(DataConfig())
    labels = {COMMON: 2, RARE: 4}
    for split, pick in (("train", counts), ("test", dict.fromkeys(counts, test_per_class))):
        images, all_labels = (train.images, train.labels) if split == "train" else (test.images, test.labels)
        for name, count in pick.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for index, row in enumerate(np.flatnonzero(all_labels == labels[name])[:count]):
                Image.fromarray(images[row, ..., 0], "L").save(folder / f"{index:04d}.png")
    return root


@pytest.fixture(scope="module")
def imbalanced_folder(tmp_path_factory):
    return write_fashion_folder(tmp_path_factory.mktemp("imbalanced"), TRAIN_COUNTS)


def mlp_recipe(folder, trainable="all", epochs=6, **training):
    """A dense backbone on the image folder: the whole network trains (``all``), or a head on its cached
    frozen features (``none``)."""
    return {
        "name": "rare",
        "seed": 0,
        "precision": "float32",
        "data": {"source": "image_folder", "data_dir": str(folder), "image_size": 28, "validation_split": 0.0},
        "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [64]}}, "head": {"dense": []}},
        "training": {
            "batch_size": 32,
            "verbose": 0,
            "tensorboard": False,
            "gradient_health_every": 0,
            "cache": "memory",
            **training,
        },
        "phases": [
            {
                "name": "only",
                "epochs": epochs,
                "trainable": trainable,
                "optimizer": {"name": "adam", "learning_rate": 1e-3},
            }
        ],
        "export": {"formats": ["keras"]},
    }


def rare_recall(result, folder):
    """Recall of the rare class on the balanced test folder, recomputed from the model's predictions."""
    images = np.stack([np.asarray(Image.open(path))[..., None] for path in sorted((folder / "test" / RARE).iterdir())])
    predicted = np.argmax(np.asarray(result.model.predict(images, verbose=0)), axis=-1)
    names = json.loads((result.run_dir / "input.json").read_text())["class_names"]
    return float(np.mean(predicted == names.index(RARE)))


def run(recipe, out):
    return finetune.run(finetune.load_recipe(recipe), out=out, log=None)


@pytest.mark.parametrize("trainable", ["all", "none"], ids=["whole_model", "cached_head"])
def test_balanced_class_weight_raises_the_rare_class_recall(imbalanced_folder, tmp_path, trainable, caplog):
    recalls = {}
    for setting in ("none", "balanced"):
        recipe = mlp_recipe(imbalanced_folder, trainable, class_weight=setting)
        with caplog.at_level(logging.INFO, logger="finetune"):
            result = run(recipe, tmp_path / setting)
        recalls[setting] = rare_recall(result, imbalanced_folder)
        if trainable == "none":  # the head trained on the frozen part's cached outputs
            assert any("frozen part computed once" in record.getMessage() for record in caplog.records)
        caplog.clear()
    print(f"rare-class recall ({trainable}): {recalls}")
    # Seen here (seeds 0..3): whole model 0.0 -> 0.79..0.91, cached head 0.0 -> 0.38..0.68.
    assert recalls["balanced"] >= recalls["none"] + 0.2, recalls


def test_balanced_weights_equal_scikit_learns():
    from sklearn.utils.class_weight import compute_class_weight

    labels = np.repeat(np.arange(4), [300, 45, 7, 120])
    ours = class_weights("balanced", labels, ("a", "b", "c", "d"))
    theirs = compute_class_weight("balanced", classes=np.arange(4), y=labels)
    np.testing.assert_allclose(ours, theirs, rtol=1e-12)
    named = class_weights({"c": 5.0}, labels, ("a", "b", "c", "d"))
    assert named.tolist() == [1.0, 1.0, 5.0, 1.0]
    assert class_weights("none", labels, ("a", "b", "c", "d")) is None


def test_balanced_weights_come_from_the_training_split_after_classes_and_the_hold_out(imbalanced_folder, tmp_path):
    from sklearn.utils.class_weight import compute_class_weight

    recipe = mlp_recipe(imbalanced_folder, epochs=1, class_weight="balanced")
    recipe["data"]["validation_split"] = 0.25
    result = run(recipe, tmp_path / "run")
    dataset = finetune.data.load_dataset(finetune.load_recipe(recipe).data, 0)
    assert np.bincount(dataset.train.labels).tolist() == [15, 300]  # coat, pullover: a quarter held out
    expected = compute_class_weight("balanced", classes=np.arange(2), y=dataset.train.labels)
    recorded = json.loads((result.run_dir / "metrics.json").read_text())["class_weight"]
    assert list(recorded) == ["coat", "pullover"]
    np.testing.assert_allclose(list(recorded.values()), expected, rtol=1e-5)


def test_class_weight_weighs_each_example_of_every_batch_by_its_class():
    labels = np.repeat(np.arange(3), [50, 5, 25])
    batches = FileBatches(np.arange(80)[:, None], labels, 16, shuffle=True, seed=1, class_weights=[1.0, 10.0, 2.0])
    for index in range(len(batches)):
        x, y, weights = batches[index]
        np.testing.assert_array_equal(y, labels[x[:, 0]])
        np.testing.assert_array_equal(weights, np.array([1.0, 10.0, 2.0], np.float32)[y])


def test_balanced_sampling_draws_every_class_equally_often_and_the_same_batches_for_a_seed_and_epoch():
    labels = np.repeat(np.arange(3), [200, 10, 30])
    rows = np.arange(len(labels))[:, None]
    batches = FileBatches(rows, labels, 32, shuffle=True, seed=7, balanced=True)
    epochs = []
    for _ in range(3):
        seen = np.concatenate([batches[index][1] for index in range(len(batches))])
        counts = np.bincount(seen, minlength=3)
        assert counts.sum() == len(labels) and counts.max() - counts.min() <= 1, counts  # 80 each
        drawn = np.concatenate([batches[index][0][:, 0] for index in range(len(batches))])
        np.testing.assert_array_equal(labels[drawn], seen)  # each image keeps its label
        epochs.append(drawn)
        batches.on_epoch_end()
    assert not np.array_equal(epochs[0], epochs[1])  # a new draw each epoch
    # A run resumed at epoch 2 reads what the uninterrupted one read.
    resumed = FileBatches(rows, labels, 32, shuffle=True, seed=7, epoch=2, balanced=True)
    np.testing.assert_array_equal(np.concatenate([resumed[i][0][:, 0] for i in range(len(resumed))]), epochs[2])
    other_seed = FileBatches(rows, labels, 32, shuffle=True, seed=8, epoch=2, balanced=True)
    assert not np.array_equal(np.concatenate([other_seed[i][0][:, 0] for i in range(len(other_seed))]), epochs[2])
    # The rare class's 10 images are drawn again and again (with replacement).
    assert len(np.unique(epochs[0][labels[epochs[0]] == 1])) <= 10


def test_a_run_with_balanced_sampling_trains_on_balanced_epochs(imbalanced_folder, tmp_path, monkeypatch):
    from finetune.training import phases

    made = []
    original = phases.training_batches

    def remembered(*args, **kwargs):
        made.append(original(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(phases, "training_batches", remembered)
    recipe = mlp_recipe(imbalanced_folder, epochs=1)
    recipe["data"]["sampling"] = "balanced"
    result = run(recipe, tmp_path / "run")
    (batches,) = made
    seen = np.concatenate([batches.at_epoch(0)[index][1] for index in range(len(batches))])
    assert np.bincount(seen).tolist() == [210, 210]  # 420 images a epoch, as natural sampling reads
    assert json.loads((result.run_dir / "metrics.json").read_text())["sampling"] == "balanced"


def warnings_of(caplog):
    return [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]


def test_a_run_warns_when_the_largest_class_has_over_ten_times_the_smallest(imbalanced_folder, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="finetune"):
        result = run(mlp_recipe(imbalanced_folder, epochs=1), tmp_path / "imbalanced")
    (warning,) = [message for message in warnings_of(caplog) if "imbalanced" in message]
    assert "'pullover' has 400 images" in warning and "'coat' only 20" in warning
    assert "training.class_weight: balanced" in warning
    # metrics.json (and so the report) keeps it as well.
    kept = json.loads((result.run_dir / "metrics.json").read_text())["warnings"]
    assert {"phase": "data", "kind": "class_imbalance", "message": warning} in kept
    assert html.escape(warning) in (result.run_dir / "report.html").read_text()
    assert "class weights" not in " ".join(record.getMessage() for record in caplog.records)

    caplog.clear()  # weighted: the weights are said once, no warning
    with caplog.at_level(logging.INFO, logger="finetune"):
        run(mlp_recipe(imbalanced_folder, epochs=1, class_weight="balanced"), tmp_path / "weighted")
    assert not [message for message in warnings_of(caplog) if "imbalanced" in message]
    (said,) = [record.getMessage() for record in caplog.records if "class weights" in record.getMessage()]
    assert "'coat' 10.5" in said and "'pullover' 0.525" in said

    caplog.clear()
    balanced = write_fashion_folder(tmp_path / "balanced", {COMMON: 40, RARE: 40}, test_per_class=10)
    with caplog.at_level(logging.INFO, logger="finetune"):
        run(mlp_recipe(balanced, epochs=1), tmp_path / "balanced_run")
    assert not [message for message in warnings_of(caplog) if "imbalanced" in message]


def test_an_unknown_class_in_class_weight_is_one_line_before_the_run_folder(imbalanced_folder, tmp_path):
    recipe = mlp_recipe(imbalanced_folder, epochs=1, class_weight={"coat": 5.0, "jacket": 2.0})
    with pytest.raises(RecipeError) as caught:
        run(recipe, tmp_path / "run")
    message = str(caught.value)
    assert "\n" not in message and "training.class_weight" in message and "'jacket'" in message
    assert "'coat'" in message and "'pullover'" in message  # the valid names
    assert not (tmp_path / "run").exists()


def test_class_weight_must_be_none_balanced_or_positive_weights():
    recipe = mlp_recipe("unused", class_weight={"coat": 0})
    with pytest.raises(RecipeError, match="class_weight"):
        finetune.load_recipe(recipe)
    recipe = mlp_recipe("unused", class_weight="inverse")
    with pytest.raises(RecipeError, match="class_weight"):
        finetune.load_recipe(recipe)


def test_a_mixed_example_weighs_as_its_target_mixes_the_class_weights():
    from finetune.catalog.mixing import BatchMixer
    from finetune.data.batches import MixedBatches

    labels = np.repeat(np.arange(3), [40, 4, 20])
    images = np.random.default_rng(0).integers(0, 255, (64, 8, 8, 1), dtype=np.uint8)
    weights = np.array([0.5, 5.0, 1.0])
    batches = MixedBatches(images, labels, 3, 16, BatchMixer(["mixup"]), seed=2, class_weights=weights)
    _, targets, sample_weights = batches[0]
    assert not np.allclose(targets.max(axis=1), 1.0)  # mixed rows
    np.testing.assert_allclose(sample_weights, np.asarray(targets, np.float64) @ weights, rtol=1e-5)
