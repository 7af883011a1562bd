"""The csv source: image paths and labels from a CSV (or TSV) file, decoded into the image folder's cache."""

import numpy as np
import pytest
from conftest import cli_in_process
from PIL import Image
from test_sources import CLASSES, make_image_folder

from finetune import data
from finetune.data.sources import csv_file, image_folder
from finetune.errors import DataError
from finetune.recipe import DataConfig


@pytest.fixture(autouse=True)
def image_cache(tmp_path, monkeypatch):
    """Each test decodes into its own cache folder."""
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(tmp_path / "image-cache"))


def images_of(root):
    """``(path relative to root, class)`` of a class-folder tree, in the order image_folder reads it."""
    return [(str(path.relative_to(root)), path.parent.name) for path in sorted(root.glob("*/*")) if path.is_file()]


def write_table(path, rows, header=("image", "label", "split"), delimiter=","):
    path.write_text("\n".join(delimiter.join(cells) for cells in [header, *rows]) + "\n", encoding="utf-8")
    return path


def csv_config(path, **settings):
    return DataConfig(source="csv", data_dir=str(path), image_size=16, **settings)


@pytest.fixture
def folder(tmp_path):
    """Four mixed-size, mixed-mode images (PNG and JPEG) of each of three classes, in class folders."""
    return make_image_folder(tmp_path / "images", per_class=4)


def test_a_given_split_column_is_respected_row_by_row(folder):
    images = images_of(folder)
    splits = {path: ("test" if path.endswith("_00.png") or path.endswith("_00.jpg") else "") for path, _ in images}
    splits.update({path: "validation" for path, _ in images if "_01." in path})
    splits.update({path: "train" for path, _ in images if "_02." in path})
    csv_path = write_table(folder / "labels.csv", [(path, label, splits[path]) for path, label in images])
    dataset = data.load_dataset(csv_config(csv_path, validation_split=0.5), seed=0)
    assert dataset.class_names == CLASSES  # sorted, as image_folder sorts its class folders
    for split, rows in (("test", "_00."), ("validation", "_01.")):
        part = getattr(dataset, split)
        expected = [CLASSES.index(label) for path, label in images if rows in path]
        assert sorted(part.labels.tolist()) == sorted(expected) and part.images.shape[1:] == (16, 16, 3)
    assert np.bincount(dataset.train.labels).tolist() == [2, 2, 2]  # no hold-out on top of the given validation
    # Each split holds exactly its rows' pixels: compare with the image folder's own decode of the same files.
    train, test, _, _ = image_folder.load_image_folder(
        DataConfig(source="image_folder", data_dir=str(folder), image_size=16, test_split=0.25)
    )
    everything = np.concatenate([np.asarray(train.images), np.asarray(test.images)])
    for split in (dataset.train, dataset.validation, dataset.test):
        for pixels in np.asarray(split.images):
            assert (everything == pixels).all(axis=(1, 2, 3)).any()


def test_without_a_split_column_the_splits_are_the_image_folders_arrays_and_labels(folder):
    csv_path = write_table(folder / "labels.csv", images_of(folder), header=("image", "label"))
    for settings in ({"test_split": 0.25}, {"test_split": 0.5, "resize": "pad", "stored_size": 12}):
        by_csv = csv_file.load_csv(csv_config(csv_path, **settings))
        by_folder = image_folder.load_image_folder(
            DataConfig(source="image_folder", data_dir=str(folder), image_size=16, **settings)
        )
        assert len(by_csv) == 4 and by_csv[2] == by_folder[2] == CLASSES
        for ours, theirs in zip(by_csv[:2], by_folder[:2], strict=True):
            np.testing.assert_array_equal(ours.labels, theirs.labels)
            np.testing.assert_array_equal(np.asarray(ours.images), np.asarray(theirs.images))
    # The validation hold-out is the seeded one of every source.
    one = data.load_dataset(csv_config(csv_path, test_split=0.25, validation_split=0.34), seed=3)
    other = data.load_dataset(
        DataConfig(source="image_folder", data_dir=str(folder), image_size=16, test_split=0.25, validation_split=0.34),
        seed=3,
    )
    np.testing.assert_array_equal(one.validation.images, other.validation.images)
    np.testing.assert_array_equal(one.train.labels, other.train.labels)


def test_a_tsv_with_its_own_column_names_and_absolute_paths_inside_the_folder(folder):
    rows = [
        (str(folder / path) if index % 2 else path, label, "") for index, (path, label) in enumerate(images_of(folder))
    ]
    tsv = write_table(folder / "list.tsv", rows, header=("file", "class", "set"), delimiter="\t")
    columns = {"image": "file", "label": "class", "split": "set"}
    train, test, names, where = csv_file.load_csv(csv_config(tsv, columns=columns, test_split=0.25))
    assert names == CLASSES and len(train) == 9 and len(test) == 3 and "list.tsv" in where
    # Cached: a second load decodes nothing.
    assert "cached" in csv_file.load_csv(csv_config(tsv, columns=columns, test_split=0.25))[3]


def bad(folder, tmp_path, case):
    """A CSV with one problem ``case``; returns the CSV, the config's settings and what the error must say."""
    images = images_of(folder)
    rows = [[path, label, "test" if index % 4 == 0 else ""] for index, (path, label) in enumerate(images)]
    header, settings = ["image", "label", "split"], {}
    expect = ["row 4, column 'image'"]  # the third data row (the header is row 1)
    if case == "missing":
        rows[2][0] = "dark/nothing.png"
    elif case == "unreadable":
        (folder / "dark" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
        rows[2][0] = "dark/broken.png"
        expect.append("broken.png")
    elif case == "missing_column":
        header[1], expect = "class", ["no column 'label'", "'image', 'class', 'split'"]
    elif case == "empty_label":
        rows[2][1], expect = "", ["row 4, column 'label'", "empty label"]
    elif case == "bad_split":
        rows[2][2], expect = "val", ["row 4, column 'split'", "'val'"]
    elif case == "test_only_class":
        Image.new("RGB", (8, 8)).save(folder / "owl.png")
        rows.append(["owl.png", "owl", "test"])
        expect = [f"row {len(rows) + 1}, column 'label'", "'owl'", "no training image"]
    elif case == "not_utf8":
        rows[2][1] = "caf\xe9"  # written as Latin-1 below
        expect = ["row 4, column 'label'", "not UTF-8"]
    elif case == "conflicting_duplicate":
        rows.append([rows[2][0], "striped" if rows[2][1] != "striped" else "dark", rows[2][2]])
        expect = [f"row {len(rows) + 1}, column 'label'", "row 4"]
    elif case == "dotdot":
        Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
        rows[2][0] = "../outside.png"
        expect.append("allow_outside_paths")
    elif case == "symlink":
        Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
        (folder / "dark" / "link.png").symlink_to(tmp_path / "outside.png")
        rows[2][0] = "dark/link.png"
        expect.append("allow_outside_paths")
    text = "\n".join(",".join(cells) for cells in [header, *rows]) + "\n"
    path = folder / "labels.csv"
    path.write_bytes(text.encode("latin-1" if case == "not_utf8" else "utf-8"))
    return path, settings, [str(path), *expect]


CASES = [
    "missing",
    "unreadable",
    "missing_column",
    "empty_label",
    "bad_split",
    "test_only_class",
    "not_utf8",
    "conflicting_duplicate",
    "dotdot",
    "symlink",
]


@pytest.mark.parametrize("case", CASES)
def test_bad_input_is_a_one_line_error_naming_the_file_the_row_and_the_cell(folder, tmp_path, case):
    path, settings, expected = bad(folder, tmp_path, case)
    with pytest.raises(DataError) as caught:
        data.load_dataset(csv_config(path, **settings), seed=0)
    message = str(caught.value)
    assert "\n" not in message and all(part in message for part in expected), message


@pytest.mark.parametrize("case", ["missing", "unreadable"])
def test_skip_bad_images_counts_and_skips_missing_and_unreadable_files(folder, tmp_path, case):
    path, _, _ = bad(folder, tmp_path, case)
    train, test, names, where = csv_file.load_csv(csv_config(path, skip_bad_images=True))
    assert "1 unreadable image skipped" in where and len(train) + len(test) == 11 and names == CLASSES


@pytest.mark.parametrize("case", ["dotdot", "symlink"])
def test_paths_outside_the_folder_load_when_allowed(folder, tmp_path, case):
    path, _, _ = bad(folder, tmp_path, case)
    train, test, _, _ = csv_file.load_csv(csv_config(path, allow_outside_paths=True))
    assert len(train) + len(test) == 12


def test_the_same_file_twice_with_the_same_label_counts_once(folder):
    images = images_of(folder)
    csv_path = write_table(folder / "labels.csv", [*images, images[0]], header=("image", "label"))
    train, test, _, where = csv_file.load_csv(csv_config(csv_path, test_split=0.25))
    assert len(train) + len(test) == 12 and "1 repeated row dropped" in where


def test_cli_run_on_a_bad_csv_is_one_line_exit_2_and_leaves_no_run_folder(folder, tmp_path):
    path, _, expected = bad(folder, tmp_path, "bad_split")
    out = tmp_path / "out"
    result = cli_in_process(
        "run",
        "recipes/csv_example.yaml",
        *("--set", f"data.data_dir={path}", "--set", "model.backbone.weights=null", "--out", str(out)),
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and all(part in lines[0] for part in expected), lines
    assert not out.exists()


def test_cli_validate_prints_each_splits_class_counts(folder):
    images = images_of(folder)
    rows = [
        (path, label, "test" if "_00." in path else "validation" if "_01." in path else "") for path, label in images
    ]
    csv_path = write_table(folder / "labels.csv", rows)
    result = cli_in_process(
        "validate",
        "recipes/csv_example.yaml",
        *("--set", f"data.data_dir={csv_path}", "--set", "model.backbone.weights=null"),
    )
    assert result.returncode == 0, result.stderr
    assert "3 classes (bright, dark, striped)" in result.stdout
    for line in (
        "train: 6 images (bright 2, dark 2, striped 2)",
        "validation: 3 images (bright 1, dark 1, striped 1)",
        "test: 3 images (bright 1, dark 1, striped 1)",
    ):
        assert line in result.stdout, result.stdout
