"""Heatmaps (Grad-CAM on the backbone's last spatial output): they point at the object, nested backbones
included, and `finetune predict --explain` draws them."""

from __future__ import annotations

import copy

import keras
import numpy as np
import pytest
from PIL import Image

import finetune
from finetune.data.input_spec import describe_input, write_input_spec
from finetune.errors import ModelError
from finetune.inference.explain import explain, overlay, split_at_backbone
from tests.conftest import TINY_RECIPE, cli_in_process

CANVAS = 112  # four times a garment's 28 pixels


def garments_on_canvases(count: int, seed: int):
    """Fashion-MNIST garments pasted at random places on blank 112x112 canvases, each with a handwritten
    digit (scikit-learn's, scaled to 28x28) elsewhere as a distractor: images, labels, garment boxes.

    On a blank canvas any ReLU network's strongest activation sits on the only content there is; the
    digit makes a heatmap have to choose the object its class came from."""
    from sklearn.datasets import load_digits

    from finetune import data

    recipe = finetune.load_recipe({**TINY_RECIPE, "data": {**TINY_RECIPE["data"], "train_limit": 10000}})
    dataset = data.load_dataset(recipe.data, 0)
    digits = load_digits().images  # 8x8, values 0-16
    digits = np.stack(
        [np.asarray(Image.fromarray((d * 255 / 16).astype(np.uint8)).resize((28, 28), Image.Resampling.BILINEAR))
         for d in digits]
    )  # fmt: skip
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(dataset.train), count)
    images = np.zeros((count, CANVAS, CANVAS, 1), np.uint8)
    boxes = np.zeros((count, 2), np.int64)
    for row, pick in enumerate(picks):
        # The canvas in a 4x4 grid of 28-pixel cells: the garment and the digit in two different cells.
        garment_cell, digit_cell = rng.choice(16, 2, replace=False)
        top, left = divmod(int(garment_cell), 4)
        boxes[row] = top * 28, left * 28
        images[row, top * 28 : top * 28 + 28, left * 28 : left * 28 + 28] = dataset.train.images[pick]
        top, left = divmod(int(digit_cell), 4)
        images[row, top * 28 : top * 28 + 28, left * 28 : left * 28 + 28, 0] = digits[rng.integers(len(digits))]
    return images, dataset.train.labels[picks], boxes


def tiny_conv_classifier() -> keras.Model:
    """uint8 canvas -> a nested conv backbone (14x14 output) -> pooled dense head, as finetune nests one."""
    backbone = keras.Sequential(
        [
            keras.Input((CANVAS, CANVAS, 1)),
            keras.layers.Conv2D(16, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(64, 3, padding="same", activation="relu"),
            keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu"),
        ],
        name="backbone",
    )
    images = keras.Input((CANVAS, CANVAS, 1), dtype="uint8", name="images")
    x = keras.layers.Rescaling(1 / 255, name="backbone_input")(keras.ops.cast(images, "float32"))
    x = backbone(x)
    x = keras.layers.GlobalMaxPooling2D(name="head_pool")(x)  # the head's "max" pooling: one place decides
    return keras.Model(images, keras.layers.Dense(10, activation="softmax", name="predictions")(x))


@pytest.mark.slow
def test_the_heatmaps_peak_lies_on_the_garment_for_most_images():
    keras.utils.set_random_seed(0)
    images, labels, _ = garments_on_canvases(3000, seed=100)
    model = tiny_conv_classifier()
    model.compile(optimizer=keras.optimizers.Adam(2e-3), loss="sparse_categorical_crossentropy")
    model.fit(images, labels, epochs=5, batch_size=64, verbose=0)
    test_images, _, boxes = garments_on_canvases(50, seed=200)
    heatmaps = explain(model, test_images).heatmaps
    inside = 0
    for heatmap, (top, left) in zip(heatmaps, boxes, strict=True):
        row, column = np.unravel_index(np.argmax(heatmap), heatmap.shape)
        inside += top <= row < top + 28 and left <= column < left + 28
    assert inside / len(boxes) >= 0.8, f"the peak was on the garment in {inside} of {len(boxes)} images"


def test_a_nested_keras_applications_backbone_cut_or_whole_gives_heatmaps_without_a_graph_error():
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["data"]["image_size"] = 64
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    for cut in (None, "block_6"):
        recipe["model"]["backbone"]["cut_at"] = cut
        model = finetune.build_model(finetune.load_recipe(recipe), input_shape=(28, 28, 1), num_classes=10)
        explanation = explain(model, images)
        assert explanation.heatmaps.shape == (3, 28, 28)
        assert explanation.heatmaps.min() >= 0 and explanation.heatmaps.max() <= 1
        features_of, head_of = split_at_backbone(model)  # the halves are the model's own layers
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(head_of(features_of(images))),
            keras.ops.convert_to_numpy(model(images, training=False)),
            atol=1e-5,
        )


def test_heatmaps_explain_the_class_asked_for_and_differ_between_classes():
    keras.utils.set_random_seed(1)
    model = tiny_conv_classifier()
    images, _, _ = garments_on_canvases(2, seed=3)
    first = explain(model, images, classes=np.array([0, 0]))
    second = explain(model, images, classes=np.array([5, 5]))
    assert list(first.classes) == [0, 0] and list(second.classes) == [5, 5]
    assert not np.allclose(first.heatmaps, second.heatmaps)


def test_a_backbone_without_a_spatial_output_is_a_one_line_error():
    recipe = {
        **TINY_RECIPE,
        "data": {**TINY_RECIPE["data"], "image_size": 28},
        "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [8]}}, "head": {}},
    }
    model = finetune.build_model(finetune.load_recipe(recipe), input_shape=(28, 28, 1), num_classes=10)
    with pytest.raises(ModelError, match="not spatial"):
        explain(model, np.zeros((1, 28, 28, 1), np.uint8))


def test_the_overlay_keeps_the_image_where_the_heat_is_zero_and_scales_it():
    image = np.full((4, 4, 1), 200, np.uint8)
    cold = overlay(image, np.zeros((4, 4)), scale=3)
    assert cold.shape == (12, 12, 3)
    hot = overlay(image, np.ones((4, 4)))
    assert not np.array_equal(hot, overlay(image, np.zeros((4, 4))))


def test_predict_explain_writes_one_heatmap_per_readable_image(tmp_path):
    recipe = copy.deepcopy(TINY_RECIPE)
    model = finetune.build_model(finetune.load_recipe(recipe), input_shape=(28, 28, 1), num_classes=10)
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.keras")
    images = np.random.default_rng(0).integers(0, 256, (2, 28, 28, 1), dtype=np.uint8)
    write_input_spec(run, describe_input(images, tuple(str(i) for i in range(10)), "crop"))
    photos = tmp_path / "photos"
    photos.mkdir()
    for position, image in enumerate(images):
        Image.fromarray(image[..., 0]).save(photos / f"{position}.png")
    (photos / "broken.png").write_bytes(b"not a png")
    result = cli_in_process("predict", str(run), str(photos), "--explain", str(tmp_path / "heat"))
    assert result.returncode == 2  # the broken file, reported as predict reports it
    written = sorted(path.name for path in (tmp_path / "heat").iterdir())
    assert written == ["0.heatmap.png", "1.heatmap.png"]
    with Image.open(tmp_path / "heat" / "0.heatmap.png") as drawn:
        assert drawn.size == (224, 224) and drawn.mode == "RGB"
