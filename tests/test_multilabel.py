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
