"""Several labels per image (``data.label_delimiter``): tags from a CSV, a sigmoid head, per-tag thresholds."""

import numpy as np
import pytest
from PIL import Image

from finetune import data
from finetune.recipe import DataConfig

TAGS = ("bright", "striped")


@pytest.fixture(autouse=True)
def image_cache(tmp_path, monkeypatch):
    """Each test decodes into its own cache folder."""
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "image-cache"))


def tagged_image(bright: bool, striped: bool, rng: np.random.Generator) -> np.ndarray:
    """A 12x12 grey image: bright or dark (mean level), with or without horizontal stripes."""
    level = 170 if bright else 70
    pixels = np.full((12, 12), level, dtype=np.float64) + rng.normal(0, 12, (12, 12))
    if striped:
        pixels[::3] += 60
        pixels[1::3] -= 30
    return np.clip(pixels, 0, 255).astype(np.uint8)


def make_tagged_csv(root, count=160, seed=0, delimiter=" ", split_column=True):
    """``count`` images whose tags are two independent attributes (brightness, stripes), listed in labels.csv.

    Returns the CSV's path and each row's true multi-hot labels (columns in ``TAGS`` order)."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows, truth = ["image,label,split"], []
    for index in range(count):
        bright, striped = bool(rng.integers(2)), bool(rng.integers(2))
        name = f"img_{index:03d}.png"
        Image.fromarray(tagged_image(bright, striped, rng)).save(root / name)
        tags = delimiter.join(tag for tag, on in zip(TAGS, (bright, striped), strict=True) if on)
        split = ("test" if index % 5 == 0 else "validation" if index % 5 == 1 else "train") if split_column else ""
        rows.append(f"{name},{tags},{split}")
        truth.append([int(bright), int(striped)])
    path = root / "labels.csv"
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path, np.array(truth, dtype=np.uint8)


def test_tag_lists_become_a_multi_hot_matrix_in_every_split(tmp_path):
    path, truth = make_tagged_csv(tmp_path / "tagged", count=40)
    dataset = data.load_dataset(DataConfig(source="csv", data_dir=str(path), image_size=12, label_delimiter=" "), 0)
    assert dataset.class_names == TAGS and dataset.multi_label
    positions = np.arange(len(truth))
    for split, wanted in (("test", positions % 5 == 0), ("validation", positions % 5 == 1)):
        labels = getattr(dataset, split).labels
        assert labels.dtype == np.uint8 and labels.shape == (int(wanted.sum()), 2)
        np.testing.assert_array_equal(labels, truth[wanted])  # rows in CSV order, with their own tags
    assert sorted(map(tuple, dataset.train.labels.tolist())) == sorted(map(tuple, truth[positions % 5 >= 2].tolist()))
    # Without a split column: seeded splits stratified by tag combination; tags in any order, repeated, spaced.
    other, _ = make_tagged_csv(tmp_path / "other", count=40, delimiter=" | ", split_column=False)
    other.write_text(other.read_text().replace("bright | striped", "striped|bright|striped"))
    config = DataConfig(source="csv", data_dir=str(other), image_size=12, label_delimiter="|", validation_split=0.25)
    dataset = data.load_dataset(config, 0)
    assert dataset.class_names == TAGS
    everything = np.concatenate([dataset.train.labels, dataset.validation.labels, dataset.test.labels])
    _, again = make_tagged_csv(tmp_path / "again", count=40, split_column=False)
    assert sorted(map(tuple, everything.tolist())) == sorted(map(tuple, again.tolist()))
    # data.classes keeps the chosen tags' columns, in the given order.
    kept = data.load_dataset(config.model_copy(update={"classes": ["striped", "bright"]}), 0)
    np.testing.assert_array_equal(kept.test.labels, dataset.test.labels[:, ::-1])


def noisy_tag_probabilities(rng, rows=300, tags=4):
    """Multi-hot labels and probabilities that rank them imperfectly, with ties (rounded to 0.05)."""
    labels = (rng.random((rows, tags)) < np.array([0.5, 0.3, 0.1, 0.7])[:tags]).astype(np.uint8)
    scores = 1 / (1 + np.exp(-(2.0 * labels - 1.0) * rng.uniform(0.2, 1.5, tags) + rng.normal(0, 1, (rows, tags))))
    return labels, np.round(scores, 2)


def test_mean_average_precision_and_f1s_equal_scikit_learns():
    from sklearn.metrics import average_precision_score, f1_score

    from finetune.evaluation.multilabel import choose_thresholds, multi_label_metrics

    rng = np.random.default_rng(0)
    labels, probabilities = noisy_tag_probabilities(rng)
    thresholds = np.array([0.3, 0.5, 0.72, 0.55])
    metrics = multi_label_metrics(probabilities, labels, list("abcd"), thresholds)
    predicted = (probabilities >= thresholds).astype(int)
    assert metrics["mean_average_precision"] == pytest.approx(average_precision_score(labels, probabilities))
    for tag in range(4):
        expected = average_precision_score(labels[:, tag], probabilities[:, tag])
        assert metrics["per_class"]["abcd"[tag]]["average_precision"] == pytest.approx(expected)
    for average in ("micro", "macro"):
        expected = f1_score(labels, predicted, average=average, zero_division=0)
        assert metrics[f"{average}_f1"] == pytest.approx(expected)
    assert metrics["exact_match"] == pytest.approx(np.mean((predicted == labels).all(axis=1)))
    assert metrics["per_class"]["c"]["support"] == int(labels[:, 2].sum())
    # At thresholds chosen on validation scores, the same agreement.
    valid_labels, valid_probabilities = noisy_tag_probabilities(np.random.default_rng(1))
    chosen = choose_thresholds(valid_probabilities, valid_labels)
    metrics = multi_label_metrics(probabilities, labels, list("abcd"), chosen)
    predicted = (probabilities >= chosen).astype(int)
    assert metrics["macro_f1"] == pytest.approx(f1_score(labels, predicted, average="macro", zero_division=0))
    assert metrics["micro_f1"] == pytest.approx(f1_score(labels, predicted, average="micro", zero_division=0))


def test_thresholds_maximise_each_tags_validation_f1():
    from sklearn.metrics import f1_score

    from finetune.evaluation.multilabel import DEFAULT_THRESHOLD, choose_thresholds

    rng = np.random.default_rng(2)
    labels, probabilities = noisy_tag_probabilities(rng)
    chosen = choose_thresholds(probabilities, labels)
    for tag in range(4):
        scores, truth = probabilities[:, tag], labels[:, tag]
        best = max(f1_score(truth, scores >= cut, zero_division=0) for cut in np.unique(scores))
        assert f1_score(truth, scores >= chosen[tag], zero_division=0) == pytest.approx(best)
    # A constructed case: positives score 0.6-0.8, negatives 0.1-0.65; 0.5 would flag the 0.55 and 0.65 negatives.
    scores = np.array([[0.8], [0.7], [0.6], [0.65], [0.55], [0.3], [0.1]])
    truth = np.array([[1], [1], [1], [0], [0], [0], [0]])
    (threshold,) = choose_thresholds(scores, truth)
    assert 0.55 < threshold <= 0.6  # every positive, no negative but the 0.65 one: F1 6/7, the best there is
    # Without validation labels, or a tag without a positive: 0.5.
    assert choose_thresholds(scores, None).tolist() == [DEFAULT_THRESHOLD]
    assert choose_thresholds(scores, np.zeros_like(truth)).tolist() == [DEFAULT_THRESHOLD]


def multi_label_recipe(csv_path, epochs=12, formats=("keras",), learning_rate=3e-3, **data):
    import finetune

    return finetune.load_recipe(
        {
            "name": "tags",
            "seed": 0,
            "precision": "float32",
            "data": {"source": "csv", "data_dir": str(csv_path), "image_size": 12, "label_delimiter": " ", **data},
            "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [32]}}, "head": {}},
            "training": {"batch_size": 16, "verbose": 0, "tensorboard": False, "gradient_health_every": 0},
            "export": {"formats": list(formats)},
            "phases": [
                {
                    "name": "all",
                    "epochs": epochs,
                    "trainable": "all",
                    "optimizer": {"name": "adam", "learning_rate": learning_rate},
                }
            ],
        }
    )


@pytest.fixture(scope="module")
def tagged_run(tmp_path_factory):
    """A finished multi-label run: brightness and stripes, two independent tags of 12x12 images."""
    import os

    import finetune

    root = tmp_path_factory.mktemp("tags")
    os.environ["FINETUNE_CACHE_DIR"] = str(root / "cache")
    csv_path, truth = make_tagged_csv(root / "images", count=200)
    # At 3e-3 whether brightness is learned in 12 epochs depended on the seed and the batch order (2 of 4
    # seeds stayed near an F1 of 0.77); at 1e-2 each of 6 seeds reached 1.0.
    recipe = multi_label_recipe(csv_path, formats=("keras", "saved_model"), learning_rate=1e-2)
    result = finetune.run(recipe, out=root / "run", log=lambda line: None)
    return result, csv_path, truth


def test_a_multi_label_run_learns_both_tags_and_keeps_its_thresholds(tagged_run):
    import json

    result, _, _ = tagged_run
    test = result.metrics["test"]
    assert test["class_names"] == list(TAGS) and test["examples"] == 40
    # Chance is an F1 of about 0.67 (every image tagged) and an exact match of 0.25 (two coin tosses).
    for tag in TAGS:
        assert test["per_class"][tag]["f1"] > 0.85, test["per_class"]
    assert test["exact_match"] > 0.7 and test["mean_average_precision"] > 0.9
    assert test["thresholds_chosen_on"] == "validation"
    # The thresholds were written beside labels and model, and into the SavedModel folder.
    for folder in (result.run_dir, result.run_dir / "saved_model"):
        saved = json.loads((folder / "thresholds.json").read_text())
        assert saved["thresholds"] == test["thresholds"]
    history = (result.run_dir / "history.csv").read_text()
    assert "val_accuracy" in history.splitlines()[0]


def test_predict_prints_every_tag_above_its_threshold(tagged_run, tmp_path):
    import json

    from conftest import cli_in_process

    result, _, _ = tagged_run
    rng = np.random.default_rng(7)
    files = {}
    for bright, striped in ((True, True), (False, False), (True, False), (False, True)):
        path = tmp_path / f"b{int(bright)}s{int(striped)}.png"
        Image.fromarray(tagged_image(bright, striped, rng)).save(path)
        files[path] = {tag for tag, on in zip(TAGS, (bright, striped), strict=True) if on}
    thresholds = json.loads((result.run_dir / "thresholds.json").read_text())["thresholds"]
    for model in (result.run_dir, result.run_dir / "saved_model"):
        answer = cli_in_process("predict", str(model), *map(str, files), "--json", "--invert", "no")
        assert answer.returncode == 0, answer.stderr
        right = 0
        for line in answer.stdout.splitlines():
            row = json.loads(line)
            tags = {item["tag"]: item["probability"] for item in row["tags"]}
            # Every tag printed reaches its threshold, and every tag that reaches its threshold is printed.
            assert tags == {
                item["class"]: item["probability"]
                for item in row["top"]
                if item["probability"] >= thresholds[item["class"]]
            }
            right += set(tags) == files[next(path for path in files if str(path) == row["path"])]
        assert right >= 3
        text = cli_in_process("predict", str(model), *map(str, files), "--invert", "no")
        dark_plain = next(line for line in text.stdout.splitlines() if "b0s0.png" in line)
        assert dark_plain.endswith("no tag above its threshold") or "bright" not in dark_plain
        # --top still limits what is shown.
        one = cli_in_process("predict", str(model), *map(str, files), "--invert", "no", "--top", "1", "--json")
        assert all(len(json.loads(line)["tags"]) <= 1 for line in one.stdout.splitlines())


def test_the_saved_model_serves_one_probability_per_tag_and_keeps_the_thresholds(tagged_run):
    import json
    import shutil

    import tensorflow as tf
    from conftest import cli_in_process

    from finetune.data.input_spec import read_thresholds
    from finetune.model import load_model

    result, _, _ = tagged_run
    images = np.load(result.run_dir / "export_check_images.npy")
    expected = np.asarray(load_model(result.run_dir / "model.keras", compile=False).predict(images, verbose=0))
    exported = result.metrics["export"]["saved_model"]
    assert exported["max_abs_diff"] <= 1e-4 and exported["images"] == len(images)
    # `finetune export` writes it again: the thresholds go with it.
    shutil.rmtree(result.run_dir / "saved_model")
    answer = cli_in_process("export", str(result.run_dir), "--format", "saved_model")
    assert answer.returncode == 0, answer.stderr
    loaded = tf.saved_model.load(str(result.run_dir / "saved_model"))  # kept: its variables live as long as it
    served = loaded.serve(tf.constant(images)).numpy()
    assert served.shape == (len(images), len(TAGS))
    np.testing.assert_allclose(served, expected, atol=1e-5)  # sigmoid per tag: rows need not sum to 1
    assert not np.allclose(served.sum(axis=1), 1.0)
    saved = json.loads((result.run_dir / "saved_model" / "thresholds.json").read_text())
    assert saved["thresholds"] == result.metrics["test"]["thresholds"]
    np.testing.assert_array_equal(
        read_thresholds(result.run_dir / "saved_model", TAGS), [result.metrics["test"]["thresholds"][t] for t in TAGS]
    )


def test_evaluate_uses_the_saved_thresholds_and_gives_the_runs_test_metrics(tagged_run):
    import json

    from conftest import cli_in_process

    result, _, _ = tagged_run
    answer = cli_in_process("evaluate", str(result.run_dir))
    assert answer.returncode == 0, answer.stderr
    evaluation = sorted((result.run_dir / "evaluations").iterdir())[-1]
    test = json.loads((evaluation / "metrics.json").read_text())["test"]
    assert test["thresholds_chosen_on"] == "given" and test["thresholds"] == result.metrics["test"]["thresholds"]
    for key in ("micro_f1", "macro_f1", "mean_average_precision", "exact_match"):
        assert test[key] == pytest.approx(result.metrics["test"][key]), key
    for tag in TAGS:
        assert test["per_class"][tag] == pytest.approx(result.metrics["test"]["per_class"][tag])
    assert (evaluation / "report.html").is_file()


@pytest.mark.parametrize("cache", ["disk", "off"])
def test_a_multi_label_run_with_cached_features_resumes_to_the_same_weights(tmp_path, monkeypatch, cache):
    """Tolerance: rtol 1e-5, atol 1e-6 on every weight, with TensorFlow's op determinism on."""
    import keras
    import tensorflow as tf
    from test_resume import _interrupt_at

    import finetune
    from finetune.errors import RunInterrupted
    from finetune.training import train as training

    tf.config.experimental.enable_op_determinism()
    csv_path, _ = make_tagged_csv(tmp_path / "images", count=100)
    raw = multi_label_recipe(csv_path).model_dump(mode="json")
    raw["training"]["cache"] = cache
    raw["phases"] = [
        {"name": "head", "epochs": 2, "trainable": "none", "optimizer": {"name": "adam", "learning_rate": 3e-3}},
        {"name": "all", "epochs": 2, "trainable": "all", "optimizer": {"name": "adam", "learning_rate": 1e-3}},
    ]
    recipe = finetune.load_recipe(raw)
    alone = finetune.run(recipe, out=tmp_path / "alone", log=lambda line: None)
    original = _interrupt_at(monkeypatch, epoch=4)
    with pytest.raises(RunInterrupted):
        finetune.run(recipe, out=tmp_path / "killed", log=lambda line: None)
    monkeypatch.setattr(training, "fit_phase", original)
    resumed = finetune.resume(tmp_path / "killed", log=lambda line: None)
    for mine, other in zip(resumed.model.weights, alone.model.weights, strict=True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(mine), keras.ops.convert_to_numpy(other), rtol=1e-5, atol=1e-6, err_msg=mine.path
        )
    assert resumed.metrics["test"]["thresholds"] == pytest.approx(alone.metrics["test"]["thresholds"])
    assert resumed.metrics["test"]["micro_f1"] == pytest.approx(alone.metrics["test"]["micro_f1"])
    assert (tmp_path / "killed" / "thresholds.json").is_file()


def test_the_head_is_a_float32_sigmoid_under_mixed_precision_and_the_loss_is_smoothed_binary_cross_entropy(tmp_path):
    import keras

    from finetune.catalog.losses import training_loss
    from finetune.model import build_model

    csv_path, _ = make_tagged_csv(tmp_path / "images", count=20)
    recipe = multi_label_recipe(csv_path).model_copy(update={"precision": "mixed_float16"})
    model = build_model(recipe)
    images = np.random.default_rng(0).integers(0, 256, (8, 12, 12, 1), dtype=np.uint8)
    output = model(images, training=False)
    assert keras.backend.standardize_dtype(output.dtype) == "float32" and tuple(output.shape) == (8, 2)
    probabilities = keras.ops.convert_to_numpy(output)
    # Independent tags: each a probability in (0, 1); the two are not a distribution over classes.
    logits = np.log(probabilities / (1 - probabilities))
    assert not np.allclose(probabilities.sum(axis=1), 1.0) and np.all(np.isfinite(logits))
    # The loss: binary cross-entropy against targets pulled toward 0.5 by the label smoothing (numpy reference).
    truth = np.array([[1, 0], [0, 0], [1, 1]], dtype=np.float32)
    predicted = np.array([[0.9, 0.2], [0.3, 0.1], [0.6, 0.7]], dtype=np.float32)
    targets = truth * 0.8 + 0.1
    expected = -np.mean(targets * np.log(predicted) + (1 - targets) * np.log(1 - predicted))
    loss = training_loss(0.2, multi_label=True)(truth, predicted)
    assert float(keras.ops.convert_to_numpy(loss)) == pytest.approx(expected, rel=1e-5)


def test_mixed_batches_mix_tag_rows_and_tag_accuracy_rounds_mixed_targets():
    import keras

    from finetune.catalog.losses import TagAccuracy
    from finetune.catalog.mixing import MixUp
    from finetune.data.batches import MixedBatches

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (16, 4, 4, 1), dtype=np.uint8)
    labels = rng.integers(0, 2, (16, 3)).astype(np.uint8)
    batches = MixedBatches(images, labels, 3, 8, MixUp(alpha=1.0), shuffle=False, seed=5, epoch=2)
    _, targets = batches[1]
    # The same draw as the batch's: lam ~ Beta(1, 1) and a partner permutation from (seed, epoch, index).
    draw = np.random.default_rng([5, 2, 1])
    lam, partner = draw.beta(1.0, 1.0), draw.permutation(8)
    rows = labels[8:16].astype(np.float32)
    np.testing.assert_allclose(targets, lam * rows + (1 - lam) * rows[partner], rtol=1e-6)
    assert targets.shape == (8, 3) and 0 < lam < 1
    # A mixed target of 0.7 counts for its dominant tag, at 0.5 on both sides.
    metric = TagAccuracy()
    metric.update_state(np.array([[0.7, 0.3, 1.0, 0.0]]), np.array([[0.9, 0.2, 0.4, 0.6]]))
    assert float(keras.ops.convert_to_numpy(metric.result())) == pytest.approx(0.5)


def test_test_time_flips_average_validation_and_test_scores_before_thresholds_are_chosen():
    from types import SimpleNamespace

    import keras

    from finetune.evaluation.multilabel import choose_thresholds, evaluate_multi_label

    class Split(SimpleNamespace):
        def __len__(self):
            return len(self.images)

    rng = np.random.default_rng(1)
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [
            keras.Input((6, 6, 1)),
            keras.layers.Rescaling(1 / 255),
            keras.layers.Flatten(),
            keras.layers.Dense(2, "sigmoid"),
        ]
    )
    test, validation = (
        Split(images=rng.integers(0, 256, (count, 6, 6, 1)).astype(np.uint8), labels=rng.integers(0, 2, (count, 2)))
        for count in (30, 40)
    )

    def both_views(images):
        plain = model.predict(images, verbose=0)
        return (plain + model.predict(images[:, :, ::-1], verbose=0)) / 2

    metrics, probabilities = evaluate_multi_label(model, test, validation, TAGS, 16, tta=("flip",))
    np.testing.assert_allclose(probabilities, both_views(test.images), rtol=1e-5, atol=1e-6)
    wanted = choose_thresholds(both_views(validation.images).astype(np.float64), validation.labels)
    assert metrics["thresholds"] == pytest.approx(dict(zip(TAGS, wanted.tolist(), strict=True)), rel=1e-5)
    assert metrics["tta"] == ["flip"]
    plain, _ = evaluate_multi_label(model, test, validation, TAGS, 16)
    assert "tta" not in plain and plain["thresholds"] != metrics["thresholds"]


def test_a_multi_label_run_trains_on_mixed_batches_and_evaluates_with_flips(tmp_path):
    import finetune

    csv_path, _ = make_tagged_csv(tmp_path / "images", count=200)
    raw = multi_label_recipe(csv_path, epochs=30).model_dump(mode="json")  # mixup learns brightness slower
    raw["training"]["mix"] = [{"name": "mixup", "alpha": 0.2}]
    raw["evaluation"]["tta"] = ["flip"]
    result = finetune.run(finetune.load_recipe(raw), out=tmp_path / "run", log=lambda line: None)
    test = result.metrics["test"]
    assert test["tta"] == ["flip"]
    for tag in TAGS:  # stripes are horizontal, so a left-right flip keeps every tag
        assert test["per_class"][tag]["f1"] > 0.8, test["per_class"]
    assert float(result.history[-1]["accuracy"]) > 0.7  # rounded mixed targets: Keras's BinaryAccuracy would be near 0


@pytest.mark.parametrize(
    ("setting", "key"),
    [
        ({"training": {"class_weight": "balanced"}}, "training.class_weight"),
        ({"data": {"sampling": "balanced"}}, "data.sampling"),
        ({"training": {"epoch_metrics": ["macro_f1"]}}, "training.epoch_metrics"),
        ({"data": {"source": "fashion_mnist", "data_dir": None}}, "data.label_delimiter"),
    ],
)
def test_what_multi_label_runs_do_not_do_is_refused_in_one_line(tmp_path, setting, key):
    from conftest import cli_in_process

    csv_path, _ = make_tagged_csv(tmp_path / "images", count=20)
    recipe = multi_label_recipe(csv_path).model_dump(mode="json")
    for section, values in setting.items():
        recipe[section].update(values)
    path = tmp_path / "recipe.yaml"
    import yaml

    path.write_text(yaml.safe_dump(recipe))
    answer = cli_in_process("run", str(path), "--out", str(tmp_path / "run"))
    assert answer.returncode == 2 and key in answer.stderr and len(answer.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


def test_validate_prints_each_splits_images_per_tag(tmp_path):
    from conftest import cli_in_process

    csv_path, truth = make_tagged_csv(tmp_path / "images", count=40)
    answer = cli_in_process(
        "validate",
        "recipes/csv_example.yaml",
        "--set",
        f"data.data_dir={csv_path}",
        "--set",
        'data.label_delimiter=" "',
        "--set",
        "model.backbone.weights=null",
    )
    assert answer.returncode == 0, answer.stderr
    for split, rows in (("test", 0), ("validation", 1)):
        bright, striped = truth[np.arange(40) % 5 == rows].sum(axis=0)
        assert f"{split}: images per tag (bright {bright}, striped {striped})" in answer.stdout, answer.stdout
