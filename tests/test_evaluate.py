"""``finetune evaluate`` on other data: classes matched by name, sizes the model cannot take refused in one line."""

import copy
import json

import numpy as np
import pytest
from conftest import cli_in_process

import finetune
from finetune import data
from finetune.errors import FinetuneError

# A dense backbone on all ten Fashion-MNIST classes: three short epochs make a model right far more often
# than chance, so scoring against the wrong class numbers would show. It takes the stored 28x28 images and
# resizes them to 32x32 inside itself: an image folder (whose default stored size is image_size) must be
# stored at 28x28 to be evaluated.
MLP_RUN = {
    "name": "evaluate_mlp",
    "seed": 0,
    "precision": "float32",
    "data": {
        "source": "fashion_mnist",
        "image_size": 32,
        "validation_split": 0.2,
        "train_limit": 200,
        "test_limit": 100,
    },
    "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [32]}}, "head": {"dense": []}},
    "training": {"batch_size": 32, "verbose": 0, "tensorboard": False, "gradient_health_every": 0},
    "phases": [{"name": "all", "epochs": 3, "trainable": "all", "optimizer": {"name": "adam", "learning_rate": 3e-3}}],
    "export": {"formats": ["keras"]},
}


@pytest.fixture(scope="module")
def mlp_run(tmp_path_factory):
    recipe = finetune.load_recipe(copy.deepcopy(MLP_RUN))
    return finetune.run(recipe, out=tmp_path_factory.mktemp("runs") / "mlp", log=None)


@pytest.fixture(autouse=True)
def image_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "cache"))


def _write_class_folders(root, split, class_names, wanted, extra=()):
    """``split``'s images of the classes named in ``wanted`` as PNGs in ``root/<class>/``; ``extra`` names
    folders of classes the model does not know (filled with a few of the same images)."""
    from PIL import Image

    for label, name in enumerate(class_names):
        if name not in wanted:
            continue
        (root / name).mkdir(parents=True)
        for position in np.flatnonzero(split.labels == label):
            Image.fromarray(split.images[position][:, :, 0], mode="L").save(root / name / f"{position:05d}.png")
    for name in extra:
        (root / name).mkdir(parents=True)
        for position in range(3):
            Image.fromarray(split.images[position][:, :, 0], mode="L").save(root / name / f"{position:05d}.png")


def _folder(tmp_path, run, wanted, extra=()):
    """An image folder with ``train/`` and ``test/``: ``test/`` holds the run's own test images of ``wanted``."""
    dataset = data.load_dataset(run.recipe.data, run.recipe.seed)
    names = dataset.class_names
    _write_class_folders(tmp_path / "folder" / "test", dataset.test, names, wanted, extra)
    _write_class_folders(tmp_path / "folder" / "train", dataset.train, names, wanted, extra)
    return tmp_path / "folder", dataset


def _on_folder(root):
    # The whole test/ folder, and no validation hold-out from the (unused) train/ folder.
    return [
        "data.source=image_folder",
        f"data.data_dir={root}",
        "data.test_limit=null",
        "data.validation_split=0",
    ]


def test_an_image_folder_is_scored_by_class_name_as_its_idx_files_are(mlp_run, tmp_path):
    from finetune.runner.evaluate_run import evaluate_run

    names = data.load_dataset(mlp_run.recipe.data, mlp_run.recipe.seed).class_names
    # Every class a folder can be named (no '/'), in an order unlike the model's: sorted names number them apart.
    wanted = [name for name in names if "/" not in name]
    root, dataset = _folder(tmp_path, mlp_run, wanted)
    by_idx = evaluate_run(mlp_run.run_dir, [], log=None).metrics["test"]
    by_folder = evaluate_run(mlp_run.run_dir, _on_folder(root), log=None).metrics["test"]

    assert by_folder["class_names"] == list(names)  # the run's classes, in the model's order
    kept = [names.index(name) for name in wanted]
    idx_confusion, folder_confusion = np.array(by_idx["confusion_matrix"]), np.array(by_folder["confusion_matrix"])
    # Image for image the same predictions against the same labels: each class's row of the confusion matrix.
    np.testing.assert_array_equal(folder_confusion[kept], idx_confusion[kept])
    assert folder_confusion[[names.index("T-shirt/top")]].sum() == 0
    assert by_folder["examples"] == int(np.isin(dataset.test.labels, kept).sum())
    # The same accuracy as the IDX files' on these images, recomputed from the model's own predictions.
    images = dataset.test.images[np.isin(dataset.test.labels, kept)]
    labels = dataset.test.labels[np.isin(dataset.test.labels, kept)]
    predicted = mlp_run.model.predict(images, verbose=0).argmax(axis=1)
    assert by_folder["accuracy"] == pytest.approx(float(np.mean(predicted == labels)))
    assert by_folder["accuracy"] > 0.5  # a model far from chance: wrong numbering could not score the same


def test_a_subset_of_the_classes_keeps_the_runs_numbering(mlp_run, tmp_path):
    from finetune.runner.evaluate_run import evaluate_run

    root, dataset = _folder(tmp_path, mlp_run, ["Trouser", "Bag", "Ankle boot"])
    evaluation = evaluate_run(mlp_run.run_dir, _on_folder(root), log=None)
    test = evaluation.metrics["test"]
    names = dataset.class_names
    keep = np.isin(dataset.test.labels, [names.index(name) for name in ("Trouser", "Bag", "Ankle boot")])
    predicted = mlp_run.model.predict(dataset.test.images[keep], verbose=0).argmax(axis=1)
    assert test["class_names"] == list(names) and test["examples"] == int(keep.sum())
    assert test["accuracy"] == pytest.approx(float(np.mean(predicted == dataset.test.labels[keep])))
    written = json.loads((evaluation.folder / "metrics.json").read_text())["test"]
    assert written["per_class_accuracy"]["Coat"] is None  # a class the folder lacks has no images, not a score
    assert {"confusion_matrix.png", "mistakes.png", "report.html"} <= {
        path.name for path in evaluation.folder.iterdir()
    }


def test_a_folder_with_a_class_the_model_does_not_know_is_refused_in_one_line(mlp_run, tmp_path):
    from finetune.runner.evaluate_run import evaluate_run

    names = data.load_dataset(mlp_run.recipe.data, mlp_run.recipe.seed).class_names
    # Ten folders, as many as the model has classes: once numbered by sorted name and scored without a word.
    root, _ = _folder(tmp_path, mlp_run, [name for name in names if "/" not in name], extra=["Hat"])
    evaluations = mlp_run.run_dir / "evaluations"
    before = set(evaluations.iterdir()) if evaluations.exists() else set()
    with pytest.raises(FinetuneError) as refused:
        evaluate_run(mlp_run.run_dir, _on_folder(root), log=None)
    message = str(refused.value)
    assert "'Hat'" in message and "'T-shirt/top'" in message and "\n" not in message  # unknown, and lacking
    assert (set(evaluations.iterdir()) if evaluations.exists() else set()) == before  # nothing written


def test_the_command_refuses_foreign_class_folders_with_exit_2_and_one_line(mlp_run, tmp_path):
    root, _ = _folder(tmp_path, mlp_run, ["Trouser", "Bag"], extra=["Hat"])
    sets = [part for setting in _on_folder(root) for part in ("--set", setting)]
    result = cli_in_process("evaluate", str(mlp_run.run_dir), *sets, "--quiet")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "'Hat'" in lines[0] and "not" in lines[0]


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, mlp_run):
    """A run trained on an image folder (three classes, decoded at 28x28)."""
    base = tmp_path_factory.mktemp("folder_run")
    dataset = data.load_dataset(mlp_run.recipe.data, mlp_run.recipe.seed)
    _write_class_folders(base / "images", dataset.train, dataset.class_names, ["Trouser", "Bag", "Sneaker"])
    raw = copy.deepcopy(MLP_RUN)
    raw["data"] = {"source": "image_folder", "data_dir": str(base / "images"), "image_size": 28, "test_split": 0.3}
    raw["data"]["validation_split"] = 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FINETUNE_CACHE_DIR", str(base / "cache"))
        return finetune.run(finetune.load_recipe(raw), out=base / "run", log=None)


@pytest.mark.parametrize(
    ("setting", "expected"),
    [("data.image_size=64", "trained at 28x28"), ("data.stored_size=64", "28x28")],
)
def test_evaluate_refuses_an_image_size_the_model_cannot_take_in_one_line(folder_run, setting, expected):
    result = cli_in_process("evaluate", str(folder_run.run_dir), "--set", setting, "--quiet")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and expected in lines[0] and "64" in lines[0]


def test_a_run_folder_that_cannot_be_created_is_refused_in_one_line(tmp_path):
    import yaml

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(MLP_RUN))
    result = cli_in_process("run", str(recipe), "--out", "/proc/finetune-run", "--quiet")
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and "cannot create the run folder" in lines[0] and "/proc/finetune-run" in lines[0]


def test_metrics_record_the_test_time_augmentation_they_were_computed_with(mlp_run):
    from finetune.runner.evaluate_run import evaluate_run

    plain = evaluate_run(mlp_run.run_dir, [], log=None)
    flipped = evaluate_run(mlp_run.run_dir, ["evaluation.tta=[flip]"], log=None)
    assert "tta" not in json.loads((plain.folder / "metrics.json").read_text())["test"]
    written = json.loads((flipped.folder / "metrics.json").read_text())["test"]
    assert written["tta"] == ["flip"]
    # The numbers are those of the mean of each image's and its mirror image's probabilities, recomputed here.
    dataset = data.load_dataset(mlp_run.recipe.data, mlp_run.recipe.seed)
    images = np.asarray(dataset.test.images)
    mean = (mlp_run.model.predict(images, verbose=0) + mlp_run.model.predict(images[:, :, ::-1], verbose=0)) / 2
    assert written["accuracy"] == pytest.approx(float(np.mean(mean.argmax(axis=1) == dataset.test.labels)))
