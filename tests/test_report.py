"""The run's pictures and report.html: valid PNGs that show what they claim, one self-contained page."""

import base64
import io
import itertools
import json
from html.parser import HTMLParser

import keras
import numpy as np
import pytest
from PIL import Image

from finetune.data import Split
from finetune.evaluation import metrics as metrics_stage
from finetune.report import confusion, curves, mistakes
from finetune.report.write import write_pictures_and_report

CLASSES = ["T-shirt/top", "Trouser", "Pull<over>", "Dress & co"]


def history_rows(validation=True):
    """``history.csv`` rows as csv.DictReader gives them: three phases, the last of one epoch."""
    phases = ["head"] * 3 + ["finetune"] * 2 + ["polish"]
    rates = [1e-3, 1e-3, 1e-3, 0.1, 0.05, 1e-5]
    rows = []
    for epoch, (phase, rate) in enumerate(zip(phases, rates, strict=True), start=1):
        rows.append(
            {
                "phase": phase,
                "epoch": str(epoch),
                "phase_epoch": str(epoch - phases.index(phase)),
                "learning_rate": str(rate),
                "loss": str(2.0 / epoch),
                "accuracy": str(0.3 + 0.1 * epoch),
                "val_loss": str(2.2 / epoch) if validation else "",
                "val_accuracy": str(0.25 + 0.1 * epoch) if validation else "",
                "seconds": "2.5",
            }
        )
    return rows


def png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()
        return image.size, np.asarray(image.convert("RGB"))


def predictions(count=60, wrong=7, classes=4, seed=0):
    """Labels and probabilities with exactly ``wrong`` mistakes, at known positions."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, count)
    probabilities = rng.dirichlet(np.ones(classes), count) * 0.4
    guesses = labels.copy()
    mistaken = rng.choice(count, wrong, replace=False)
    guesses[mistaken] = (labels[mistaken] + 1 + rng.integers(0, classes - 1, wrong)) % classes
    probabilities[np.arange(count), guesses] += 0.6  # the guess always has the largest probability
    return labels, probabilities, np.sort(mistaken)


def test_learning_curves_mark_where_each_phase_starts(tmp_path):
    rows = history_rows()
    starts = [int(row["epoch"]) for before, row in itertools.pairwise(rows) if row["phase"] != before["phase"]]
    drawn = curves.draw_learning_curves(rows, tmp_path / "curves.png", "tiny")
    assert drawn == starts == [4, 6]
    size, with_validation = png(tmp_path / "curves.png")
    assert 600 < size[0] < 2000 and 300 < size[1] < 1200
    # Without a validation split the page still draws, and shows less.
    assert curves.draw_learning_curves(history_rows(validation=False), tmp_path / "train.png") == [4, 6]
    assert not np.array_equal(png(tmp_path / "train.png")[1], with_validation)


def test_learning_rate_marks_phases_and_follows_the_rates(tmp_path):
    rows = history_rows()
    assert curves.draw_learning_rate(rows, tmp_path / "a.png") == [4, 6]
    assert curves.draw_learning_rate(rows[:3], tmp_path / "one_phase.png") == []
    for row in rows:
        row["learning_rate"] = str(float(row["learning_rate"]) * 2)
    curves.draw_learning_rate(rows, tmp_path / "b.png")
    (size_a, a), (size_b, b) = png(tmp_path / "a.png"), png(tmp_path / "b.png")
    assert size_a == size_b and not np.array_equal(a, b)


def test_mistakes_lists_only_the_misclassified_images_most_confident_first(tmp_path):
    labels, probabilities, mistaken = predictions(wrong=7)
    images = np.random.default_rng(1).integers(0, 256, (len(labels), 28, 28, 1), dtype=np.uint8)
    shown = mistakes.draw_mistakes(images, labels, probabilities, CLASSES, tmp_path / "few.png")
    # Reference: every position whose argmax differs from its label, by descending top probability.
    guesses = probabilities.argmax(axis=1)
    expected = sorted(np.flatnonzero(guesses != labels), key=lambda i: (-probabilities[i, guesses[i]], i))
    assert sorted(shown.tolist()) == mistaken.tolist() and shown.tolist() == expected
    few_size, _ = png(tmp_path / "few.png")
    labels, probabilities, mistaken = predictions(count=120, wrong=50, seed=2)
    images = np.zeros((len(labels), 28, 28, 3), dtype=np.uint8)  # RGB images are shown in colour
    shown = mistakes.draw_mistakes(images, labels, probabilities, CLASSES, tmp_path / "many.png", limit=36)
    assert len(shown) == 36 and set(shown.tolist()) <= set(mistaken.tolist())
    many_size, _ = png(tmp_path / "many.png")
    assert many_size[1] > few_size[1]  # six rows of cells against two


def test_no_mistakes_still_draws_a_picture(tmp_path):
    labels, probabilities, _ = predictions(wrong=0)
    shown = mistakes.draw_mistakes(
        np.zeros((60, 28, 28, 1), np.uint8), labels, probabilities, CLASSES, tmp_path / "m.png"
    )
    assert len(shown) == 0 and png(tmp_path / "m.png")[0][0] > 100


def test_confusion_matrix_picture_changes_with_the_counts(tmp_path):
    matrix = np.array([[5, 1, 0, 0], [0, 6, 0, 0], [2, 0, 3, 1], [0, 0, 0, 7]])
    confusion.draw_confusion_matrix(matrix, CLASSES, tmp_path / "a.png", "tiny")
    matrix[2] = [0, 0, 6, 0]
    confusion.draw_confusion_matrix(matrix, CLASSES, tmp_path / "b.png", "tiny")
    (size, a), (_, b) = png(tmp_path / "a.png"), png(tmp_path / "b.png")
    assert size[0] > 400 and size[1] > 400 and not np.array_equal(a, b)


def test_confusion_matrix_rows_are_normalised_to_sum_to_one():
    matrix = np.array([[5, 1, 0, 0], [0, 0, 0, 0], [2, 0, 3, 1], [0, 0, 0, 700]])
    shares = confusion.row_shares(matrix)
    np.testing.assert_allclose(shares.sum(axis=1), [1, 0, 1, 1])  # the class without images stays 0
    np.testing.assert_allclose(shares[2], [2 / 6, 0, 3 / 6, 1 / 6])
    assert confusion.cell_text(3, 0.5) == "50%\n3" and confusion.cell_text(1, 1 / 701) == "<1%\n1"


class Page(HTMLParser):
    """What a browser would fetch or run, the images' sources, and the per-class table's cells."""

    def __init__(self):
        super().__init__()
        self.links, self.images, self.tags, self.per_class, self.pre = [], [], set(), [], ""
        self._table, self._cell, self._in_pre = None, None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        self.links += [value for key, value in attrs.items() if key in ("src", "href") and value]
        if tag == "img":
            self.images.append(attrs["src"])
        if tag == "table":
            self._table = attrs.get("id")
        if tag == "tr" and self._table == "per-class":
            self.per_class.append([])
        if tag in ("td", "th") and self._table == "per-class":
            self._cell = ""
        self._in_pre = self._in_pre or tag == "pre"

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.per_class[-1].append(self._cell)
            self._cell = None
        if tag == "table":
            self._table = None
        if tag == "pre":
            self._in_pre = False

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._in_pre:
            self.pre += data


def run_folder(tmp_path, recipe_text):
    labels, probabilities, _ = predictions(count=40, wrong=9)
    test = Split(np.random.default_rng(3).integers(0, 256, (40, 28, 28, 1), dtype=np.uint8), labels.astype(np.int32))
    metrics = {
        "test": metrics_stage.metrics_from_probabilities(probabilities, labels, CLASSES),
        "recipe": "tiny",
        "train_images": 480,
        "seconds": 12.5,
    }
    (tmp_path / "recipe.yaml").write_text(recipe_text)
    return test, probabilities, metrics


def test_report_is_one_self_contained_page_with_the_metrics(tmp_path):
    recipe_text = "name: tiny  # <script>alert('x')</script> & more\n"
    test, probabilities, metrics = run_folder(tmp_path, recipe_text)
    problems = write_pictures_and_report(tmp_path, "tiny <run>", history_rows(), metrics, test, probabilities)
    assert problems == []
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    page = Page()
    page.feed(text)
    assert "script" not in page.tags and "link" not in page.tags and "http" not in text
    assert all(link.startswith("data:image/png;base64,") for link in page.links)
    assert len(page.images) == 4  # curves, learning rate, confusion matrix, mistakes
    for source in page.images:
        with Image.open(io.BytesIO(base64.b64decode(source.split(",", 1)[1]))) as image:
            assert image.format == "PNG" and image.width > 100
    assert page.pre == recipe_text  # escaped in the file, the same text once parsed
    header, *rows = page.per_class
    assert header == ["class", "precision", "recall (accuracy)", "F1", "test images"]
    per_class = metrics["test"]["per_class"]
    assert [row[0] for row in rows] == sorted(CLASSES, key=lambda name: per_class[name]["f1"])
    for name, *cells, count in rows:
        expected = [per_class[name][key] for key in ("precision", "recall", "f1")]
        assert [float(cell) for cell in cells] == pytest.approx(expected, abs=5e-5)
        assert int(count) == int(np.sum(test.labels == CLASSES.index(name)))
    for name in ("learning_curves.png", "learning_rate.png", "confusion_matrix.png", "mistakes.png"):
        png(tmp_path / name)
    assert json.dumps(metrics)  # untouched, still JSON


def test_a_picture_that_fails_is_named_and_the_rest_is_written(tmp_path, monkeypatch):
    test, probabilities, metrics = run_folder(tmp_path, "name: tiny\n")

    def broken(*args, **kwargs):
        raise ValueError("no room for the legend\nsecond line")

    monkeypatch.setattr(curves, "draw_learning_curves", broken)
    problems = write_pictures_and_report(tmp_path, "tiny", history_rows(), metrics, test, probabilities)
    assert problems == ["learning_curves.png: no room for the legend"]
    page = Page()
    page.feed((tmp_path / "report.html").read_text(encoding="utf-8"))
    assert len(page.images) == 3 and "no room for the legend" in (tmp_path / "report.html").read_text()
    assert not (tmp_path / "learning_curves.png").exists() and (tmp_path / "mistakes.png").is_file()


def test_evaluate_with_probabilities_returns_the_models_predictions():
    images = np.random.default_rng(0).integers(0, 256, (50, 6, 6, 1), dtype=np.uint8)
    labels = np.random.default_rng(1).integers(0, 3, 50).astype(np.int32)
    model = keras.Sequential([keras.Input((6, 6, 1)), keras.layers.Flatten(), keras.layers.Dense(3, "softmax")])
    split = Split(images, labels)
    metrics, probabilities = metrics_stage.evaluate_with_probabilities(model, split, ["a", "b", "c"], batch_size=16)
    # Batches of 16 and of Keras's 32: one summation order or another, so float32 rounding; a probability
    # of 5e-33 may differ in its fifth digit, which atol covers.
    np.testing.assert_allclose(probabilities, model.predict(images, verbose=0), rtol=1e-6, atol=1e-12)
    assert metrics == metrics_stage.evaluate(model, split, ["a", "b", "c"], batch_size=16)
    assert metrics["accuracy"] == pytest.approx(float(np.mean(probabilities.argmax(axis=1) == labels)))


def test_a_run_s_warnings_are_on_the_page(tmp_path):
    test, probabilities, metrics = run_folder(tmp_path, "name: tiny\n")
    metrics["warnings"] = [{"phase": "finetune", "kind": "diverging", "message": "ended its first epoch <above>"}]
    write_pictures_and_report(tmp_path, "tiny", history_rows(), metrics, test, probabilities)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "<h2>Warnings</h2>" in page and "finetune: ended its first epoch &lt;above&gt;" in page
    del metrics["warnings"]
    write_pictures_and_report(tmp_path, "tiny", history_rows(), metrics, test, probabilities)
    assert "Warnings" not in (tmp_path / "report.html").read_text(encoding="utf-8")


def test_per_class_table_puts_the_worst_f1_first_and_classes_without_images_last():
    from sklearn.metrics import precision_recall_fscore_support

    from finetune.report import page

    names = ["cat <&>", "dog", "never predicted", "no images", "eel"]
    matrix = np.array([[9, 1, 0, 0, 0], [1, 2, 0, 1, 1], [1, 1, 0, 1, 1], [0, 0, 0, 0, 0], [0, 1, 0, 0, 3]])
    true, predicted = np.nonzero(matrix)
    labels = np.repeat(true, matrix[true, predicted])
    guesses = np.repeat(predicted, matrix[true, predicted])
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, guesses, labels=range(len(names)), zero_division=0
    )
    per_class = {
        name: {"precision": precision[i], "recall": recall[i], "f1": f1[i], "support": int(support[i])}
        for i, name in enumerate(names)
    }
    test = {"accuracy": 0.6, "loss": 1.0, "examples": 23, "class_names": names, "confusion_matrix": matrix.tolist()}
    test |= {"per_class": per_class, "macro_f1": 0.385, "balanced_accuracy": 0.44, "top_k": 5, "top_k_accuracy": 1.0}
    text = page.render("tiny", {"test": test}, [], [], "name: tiny\n")
    parsed = Page()
    parsed.feed(text)
    _header, *rows = parsed.per_class
    # F1: cat 18/21, dog 4/10, never predicted 0, eel 6/9; "no images" has none to rank by.
    assert [row[0] for row in rows] == ["never predicted", "dog", "eel", "cat <&>", "no images"]
    assert rows[0] == ["never predicted", "–", "0.0000", "0.0000", "4"]  # no prediction to be right: no precision
    assert rows[1] == ["dog", "0.4000", "0.4000", "0.4000", "5"]
    assert rows[-1] == ["no images", "0.0000", "–", "–", "0"]  # predicted twice, both wrong
    assert "<td>macro-F1</td><td>0.3850</td>" in text and "<td>top-5 accuracy</td><td>1.0000</td>" in text


def test_an_overlay_gives_the_surest_mistakes_a_heatmap_picture_of_the_class_they_were_given(tmp_path):
    test, probabilities, metrics = run_folder(tmp_path, "name: tiny\n")
    asked: list[tuple[np.ndarray, np.ndarray]] = []

    def red_overlay(images, classes):
        asked.append((images, classes))
        return np.stack(
            [np.dstack([np.full(image.shape[:2], 255, np.uint8)] + [image[..., 0]] * 2) for image in images]
        )

    assert write_pictures_and_report(tmp_path, "tiny", history_rows(), metrics, test, probabilities, red_overlay) == []
    ((images, classes),) = asked
    from finetune.report.mistakes import mistake_indices

    chosen = mistake_indices(test.labels, probabilities, limit=12)
    np.testing.assert_array_equal(images, test.images[chosen])  # the surest mistakes, as stored
    np.testing.assert_array_equal(classes, probabilities[chosen].argmax(axis=1))  # the class wrongly given
    png(tmp_path / "mistake_heatmaps.png")
    page = Page()
    page.feed((tmp_path / "report.html").read_text(encoding="utf-8"))
    assert len(page.images) == 5 and "wrongly gave" in (tmp_path / "report.html").read_text()
