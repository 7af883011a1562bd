"""`finetune predict`: image files of any mode to the classes the model gives their stored arrays."""

import json
import shutil

import keras
import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

import finetune
from finetune.cli import main
from finetune.data.input_spec import describe_input, read_input_spec, write_input_spec

MLP_RECIPE = {
    "name": "mlp",
    "seed": 0,
    "precision": "float32",
    "data": {"source": "fashion_mnist", "image_size": 28, "validation_split": 0.0, "train_limit": 500},
    "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [32]}}, "head": {}},
    "training": {"batch_size": 32, "verbose": 0},
    "phases": [
        {"name": "train", "epochs": 3, "trainable": "all", "optimizer": {"name": "adam", "learning_rate": 3e-3}}
    ],
}


@pytest.fixture(scope="module")
def fmnist():
    """The recipe's dataset (500 training images) and ten test images, one of each class."""
    from finetune import data

    recipe = finetune.load_recipe(MLP_RECIPE)
    dataset = data.load_dataset(recipe.data, recipe.seed)
    firsts = [int(np.flatnonzero(dataset.test.labels == label)[0]) for label in range(10)]
    return recipe, dataset, dataset.test.images[firsts]


@pytest.fixture(scope="module")
def trained(fmnist, tmp_path_factory):
    """A folder like a run's: ``model.keras`` (an mlp fitted for 3 epochs, no run) and ``input.json``."""
    recipe, dataset, _ = fmnist
    keras.utils.set_random_seed(0)
    model = finetune.build_model(recipe)
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="sparse_categorical_crossentropy")
    model.fit(dataset.train.images, dataset.train.labels, epochs=3, batch_size=32, verbose=0)
    folder = tmp_path_factory.mktemp("trained")
    model.save(folder / "model.keras")
    write_input_spec(folder, describe_input(dataset.train.images, dataset.class_names, "crop"))
    return folder, model


def reference(model, images) -> np.ndarray:
    """The Keras model's probabilities on the original arrays."""
    return keras.ops.convert_to_numpy(model(np.asarray(images), training=False))


def save_all(folder, images, suffix, **options) -> list:
    folder.mkdir(exist_ok=True)
    paths = []
    for position, image in enumerate(images):
        path = folder / f"{position:02d}{suffix}"
        Image.fromarray(image[..., 0], "L").save(path, **options)
        paths.append(path)
    return paths


def predict_json(*arguments) -> tuple[list[dict], object]:
    result = CliRunner().invoke(main, ["predict", *map(str, arguments), "--json"])
    return [json.loads(line) for line in result.stdout.splitlines()], result


def test_fashion_mnist_is_recorded_as_light_on_dark_and_its_negative_as_dark_on_light(fmnist):
    _, dataset, _ = fmnist
    images = dataset.train.images
    assert describe_input(images, dataset.class_names, "crop").background == "dark"
    assert describe_input(255 - images, dataset.class_names, "crop").background == "light"
    half = images.copy()
    half[: len(half) // 2] = 255 - half[: len(half) // 2]
    assert describe_input(half, dataset.class_names, "crop").background == "mixed"


def test_png_and_jpeg_files_get_the_classes_of_the_original_arrays(trained, fmnist, tmp_path):
    folder, model = trained
    _, dataset, images = fmnist
    expected = reference(model, images)
    save_all(tmp_path / "png", images, ".png")
    save_all(tmp_path / "jpeg", images, ".jpg", quality=100)

    rows, result = predict_json(folder, tmp_path / "png", "--top", "10")
    assert result.exit_code == 0, result.output
    assert [row["path"] for row in rows] == [str(tmp_path / "png" / f"{i:02d}.png") for i in range(10)]
    assert not any(row["inverted"] for row in rows)
    assert [row["top"][0]["index"] for row in rows] == list(expected.argmax(axis=1))
    for row, probabilities in zip(rows, expected, strict=True):  # PNG is lossless: the very same input
        got = {entry["index"]: entry["probability"] for entry in row["top"]}
        np.testing.assert_allclose([got[index] for index in range(10)], probabilities, atol=1e-5)
        assert row["top"][0]["class"] == dataset.class_names[row["top"][0]["index"]]

    rows, result = predict_json(folder, tmp_path / "jpeg", "--top", "1")
    assert result.exit_code == 0, result.output
    # JPEG is lossy even at quality 100 (DCT rounding moves pixels by a level or two), so an image whose two best
    # classes are nearly tied may flip: 9 of the 10 must agree.
    agree = sum(row["top"][0]["index"] == label for row, label in zip(rows, expected.argmax(axis=1), strict=True))
    assert agree >= 9


def test_class_names_and_text_output(trained, fmnist, tmp_path):
    folder, model = trained
    _, dataset, images = fmnist
    paths = save_all(tmp_path, images[:3], ".png")
    result = CliRunner().invoke(main, ["predict", str(folder), *map(str, paths), "--top", "3"])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len(lines) == 3
    best = reference(model, images[:3]).argsort(axis=1)[:, ::-1][:, :3]
    for line, path, classes in zip(lines, paths, best, strict=True):
        named = ", ".join(dataset.class_names[index] for index in classes)
        shown = ", ".join(part.rsplit(" ", 1)[0] for part in line.split(": ", 1)[1].split(", "))
        assert line.startswith(f"{path}: ") and shown == named


def test_rgb_rgba_16_bit_and_palette_files_read_as_the_stored_grey_image(trained, fmnist, tmp_path):
    folder, model = trained
    _, _, images = fmnist
    image = images[3][..., 0]
    rgb = np.repeat(image[..., None], 3, axis=2)
    files = {
        "rgb.png": Image.fromarray(rgb, "RGB"),
        "rgba.png": Image.fromarray(np.dstack([rgb, np.full_like(image, 255)]), "RGBA"),
        "sixteen.png": Image.fromarray(image.astype(np.uint16) * 257),  # 65535 is white, as 255 in 8 bits
        "palette.png": Image.fromarray(image, "L").convert("P"),
        "rgb.jpg": Image.fromarray(rgb, "RGB"),
    }
    for name, picture in files.items():
        picture.save(tmp_path / name, **({"quality": 100} if name.endswith(".jpg") else {}))
    assert Image.open(tmp_path / "sixteen.png").mode.startswith("I")
    assert Image.open(tmp_path / "palette.png").mode == "P"
    predictions = finetune.predict(folder, tmp_path, top=10)
    assert [p.path.name for p in predictions] == sorted(files)
    expected = reference(model, images[3:4])[0]
    for prediction in predictions:
        assert prediction.error is None and not prediction.inverted
        got = dict((index, probability) for index, _, probability in prediction.top)
        tolerance = 0.05 if prediction.path.suffix == ".jpg" else 1e-5  # the JPEG's pixels differ a little
        np.testing.assert_allclose([got[i] for i in range(10)], expected, atol=tolerance, err_msg=prediction.path.name)


def test_auto_inverts_a_dark_on_light_image_back(trained, fmnist, tmp_path):
    folder, model = trained
    _, _, images = fmnist
    negatives = 255 - images
    paths = save_all(tmp_path / "negative", negatives, ".png")
    # The same negative as a 56x56 colour photo: judged before it is shrunk to the stored 28x28 grey.
    big = np.repeat(np.repeat(np.repeat(negatives[0], 2, axis=0), 2, axis=1), 3, axis=2)
    Image.fromarray(big, "RGB").save(tmp_path / "photo.png")

    rows, result = predict_json(folder, *paths, tmp_path / "photo.png", "--top", "10")
    assert result.exit_code == 0, result.output
    assert all(row["inverted"] for row in rows)
    expected = reference(model, images)
    assert [row["top"][0]["index"] for row in rows] == [*expected.argmax(axis=1), expected[0].argmax()]

    rows, _ = predict_json(folder, *paths[:2], "--invert", "no", "--top", "10")
    assert not any(row["inverted"] for row in rows)
    as_given = reference(model, negatives[:2])
    for row, probabilities in zip(rows, as_given, strict=True):
        got = {entry["index"]: entry["probability"] for entry in row["top"]}
        np.testing.assert_allclose([got[index] for index in range(10)], probabilities, atol=1e-5)

    originals = save_all(tmp_path / "original", images[:1], ".png")
    rows, _ = predict_json(folder, *originals, "--invert", "yes", "--top", "10")
    assert rows[0]["inverted"]  # light-on-dark already, inverted because asked
    got = {entry["index"]: entry["probability"] for entry in rows[0]["top"]}
    np.testing.assert_allclose([got[index] for index in range(10)], reference(model, negatives[:1])[0], atol=1e-5)


def test_a_bad_file_is_one_line_and_exit_2_while_the_others_are_predicted(trained, fmnist, tmp_path):
    folder, _ = trained
    _, _, images = fmnist
    good = save_all(tmp_path, images[:2], ".png")
    (tmp_path / "notes.png").write_text("not an image\n")
    whole = (tmp_path / "00.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(whole[: len(whole) // 2])
    missing = tmp_path / "missing.jpg"

    result = CliRunner().invoke(main, ["predict", str(folder), str(tmp_path), str(missing), "--json"])
    assert result.exit_code == 2
    assert [json.loads(line)["path"] for line in result.stdout.splitlines()] == [str(path) for path in good]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    for bad in ("notes.png", "truncated.png", "missing.jpg"):
        assert sum(bad in line for line in errors) == 1, result.stderr


def test_a_bad_model_path_is_one_line_and_exit_2(fmnist, tmp_path):
    _, _, images = fmnist
    (image,) = save_all(tmp_path / "images", images[:1], ".png")
    for model in (tmp_path / "no_such_run", tmp_path / "images"):
        result = CliRunner().invoke(main, ["predict", str(model), str(image)])
        assert result.exit_code == 2
        assert result.stdout == "" and len(result.stderr.splitlines()) == 1
        assert str(model) in result.stderr
    (tmp_path / "broken.keras").write_text("not a model")
    result = CliRunner().invoke(main, ["predict", str(tmp_path / "broken.keras"), str(image)])
    assert result.exit_code == 2 and len(result.stderr.splitlines()) == 1


def test_an_older_run_folder_is_taken_as_light_on_dark_with_one_note(trained, fmnist, tmp_path):
    folder, model = trained
    _, _, images = fmnist
    old = tmp_path / "old_run"
    old.mkdir()
    shutil.copy(folder / "model.keras", old / "model.keras")  # no input.json, no class names
    paths = save_all(tmp_path / "negative", 255 - images[:3], ".png")
    rows, result = predict_json(old, *paths)
    assert result.exit_code == 0
    assert [line for line in result.stderr.splitlines() if line.startswith("note:")] == [
        line for line in result.stderr.splitlines() if "input.json" in line
    ]
    assert len([line for line in result.stderr.splitlines() if "input.json" in line]) == 1
    assert all(row["inverted"] for row in rows)
    assert [row["top"][0]["index"] for row in rows] == list(reference(model, images[:3]).argmax(axis=1))
    assert rows[0]["top"][0]["class"] == str(rows[0]["top"][0]["index"])  # no names to be found


@pytest.mark.slow
def test_the_saved_model_gives_the_run_folders_probabilities(fmnist, tmp_path):
    _, _, images = fmnist
    recipe = {**MLP_RECIPE, "data": {**MLP_RECIPE["data"], "test_limit": 100}, "export": {"saved_model": True}}
    result = finetune.run(finetune.load_recipe(recipe), out=tmp_path / "run", log=lambda line: None)
    run_dir = result.run_dir
    spec = read_input_spec(run_dir)
    assert spec is not None and spec.background == "dark" and spec.shape == (28, 28, 1)
    assert read_input_spec(run_dir / "saved_model") == spec
    assert spec.class_names[0] == "T-shirt/top"
    paths = save_all(tmp_path / "images", images, ".png")
    from_folder, _ = predict_json(run_dir, *paths, "--top", "10")
    from_saved, outcome = predict_json(run_dir / "saved_model", *paths, "--top", "10")
    assert outcome.exit_code == 0, outcome.output
    assert len(from_saved) == len(from_folder) == 10
    for keras_row, saved_row in zip(from_folder, from_saved, strict=True):
        assert [entry["class"] for entry in keras_row["top"]] == [entry["class"] for entry in saved_row["top"]]
        np.testing.assert_allclose(
            [entry["probability"] for entry in keras_row["top"]],
            [entry["probability"] for entry in saved_row["top"]],
            atol=1e-5,
        )
    np.testing.assert_allclose(
        [row["top"][0]["probability"] for row in from_folder], reference(result.model, images).max(axis=1), atol=1e-5
    )


@pytest.mark.parametrize("suffix", [".onnx", ".tflite", ".ONNX"])
def test_an_onnx_or_tflite_file_is_refused_in_one_line_naming_what_to_give_instead(tmp_path, suffix):
    image = tmp_path / "image.png"
    Image.fromarray(np.zeros((28, 28), np.uint8), "L").save(image)
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"")  # the run folder the file came from
    model = run / f"model{suffix}"
    model.write_bytes(b"\x08\x07")  # any bytes: the name alone says what the file is
    result = CliRunner().invoke(main, ["predict", str(model), str(image)])
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr.splitlines() == [
        f"error: {model} is a {suffix.lower()} file: use the run folder ({run}) or its saved_model folder"
    ]
    with pytest.raises(finetune.errors.ModelError, match="use the run folder"):
        finetune.predict(model, [image])
