"""Data sources beyond Fashion-MNIST: image folders, tensorflow-datasets, class selection, few-shot."""

import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from conftest import ROOT, cli, cli_in_process
from PIL import Image
from test_data import write_idx

import finetune
from finetune import data
from finetune.data.sources import fashion_mnist, image_folder
from finetune.data.sources import tfds as tfds_source
from finetune.errors import DataError, RecipeError
from finetune.recipe import DataConfig

CLASSES = ("bright", "dark", "striped")
MODES = ("L", "RGB", "RGBA", "P", "RGB", "L", "RGBA")


@pytest.fixture(autouse=True)
def image_cache(tmp_path, monkeypatch):
    """Each test decodes into its own cache folder."""
    folder = tmp_path / "image-cache"
    monkeypatch.setenv("FINETUNE_CACHE_DIR", str(folder))
    return folder


def class_pixels(kind: str, rng, height: int, width: int) -> np.ndarray:
    """RGB pixels that tell the classes apart in any mode: near white, near black, or horizontal stripes."""
    if kind == "striped":
        rows = (np.arange(height) // 3) % 2 * 230 + 10
        pixels = np.repeat(rows[:, None, None], width, axis=1).repeat(3, axis=2)
    else:
        pixels = np.full((height, width, 3), 235 if kind == "bright" else 20)
    pixels = pixels + rng.integers(0, 10, (height, width, 3))
    tint = rng.uniform(0.85, 1.0, size=3)  # colour differs within a class, so colour is no shortcut
    return np.clip(pixels * tint, 0, 255).astype(np.uint8)


def save_as(pixels: np.ndarray, mode: str, path, jpeg: bool):
    image = Image.fromarray(pixels, "RGB")
    if mode == "L":
        image = image.convert("L")
    elif mode == "RGBA":
        alpha = np.full(pixels.shape[:2], 255, np.uint8)
        alpha[:2, :] = 0  # a transparent top edge (white once composited)
        image = Image.fromarray(np.dstack([pixels, alpha]), "RGBA")
    elif mode == "P":
        image = image.quantize(colors=64)
    if jpeg and mode in ("L", "RGB"):
        image.save(path.with_suffix(".jpg"), quality=90)
    else:
        image.save(path.with_suffix(".png"))


def make_image_folder(root, per_class=14, seed=0, classes=CLASSES):
    """A folder of mixed-size, mixed-mode PNG and JPEG images, one sub-folder per class."""
    rng = np.random.default_rng(seed)
    for kind in classes:
        folder = root / kind
        folder.mkdir(parents=True)
        for index in range(per_class):
            height, width = rng.integers(20, 70, size=2)
            mode = MODES[index % len(MODES)]
            save_as(class_pixels(kind, rng, height, width), mode, folder / f"{kind}_{index:02d}", jpeg=index % 3 == 0)
    return root


def folder_config(root, **settings):
    return DataConfig(source="image_folder", data_dir=str(root), image_size=32, **settings)


# --- image folders --------------------------------------------------------


def test_an_image_folder_is_stored_compactly_at_the_stored_size(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=15)
    modes = {Image.open(path).mode for path in root.rglob("*.*")}
    suffixes = {path.suffix for path in root.rglob("*.*")}
    assert modes == {"L", "RGB", "RGBA", "P"} and suffixes == {".png", ".jpg"}
    train, test, names, where = image_folder.load_image_folder(folder_config(root))
    assert names == CLASSES and str(root) in where
    assert isinstance(train.images, np.memmap) and train.images.dtype == np.uint8
    assert train.images.shape[1:] == (32, 32, 3) and test.images.shape[1:] == (32, 32, 3)
    assert len(train) + len(test) == 45
    # The seeded test split is stratified: 20% of 15 images of each class.
    assert np.bincount(test.labels).tolist() == [3, 3, 3]
    means = {name: np.asarray(train.images)[train.labels == label].mean() for label, name in enumerate(names)}
    assert means["dark"] < 80 < means["striped"] < 170 < means["bright"]
    stripes = np.asarray(train.images)[train.labels == names.index("striped")].astype(float)
    assert stripes.std(axis=1).mean() > 5 * stripes.std(axis=2).mean()  # rows vary, columns do not


def test_test_split_is_seeded_and_independent_of_the_recipe_seed(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=10)
    first = data.load_dataset(folder_config(root, validation_split=0.0), seed=1)
    again = data.load_dataset(folder_config(root, validation_split=0.0), seed=2)
    np.testing.assert_array_equal(first.test.images, again.test.images)
    other = image_folder.load_image_folder(folder_config(root, test_split=0.5))[1]
    assert len(other) == 15 and len(first.test) == 6


def test_train_and_test_subfolders_are_used_as_given(tmp_path):
    make_image_folder(tmp_path / "split" / "train", per_class=5)
    make_image_folder(tmp_path / "split" / "test", per_class=2, seed=1)
    train, test, names, where = image_folder.load_image_folder(folder_config(tmp_path / "split"))
    assert names == CLASSES and "train/ and test/" in where
    assert np.bincount(train.labels).tolist() == [5, 5, 5] and np.bincount(test.labels).tolist() == [2, 2, 2]


def test_a_class_with_one_training_image_or_no_test_images_is_named_in_a_warning(tmp_path, caplog):
    root = tmp_path / "split"
    make_image_folder(root / "train", per_class=3)
    for extra in sorted((root / "train" / "dark").iterdir())[1:]:
        extra.unlink()  # dark: one training image
    make_image_folder(root / "test", per_class=2, seed=1, classes=("bright", "dark"))  # striped: no test images
    with caplog.at_level(logging.WARNING, logger="finetune"):
        train, test, names, _ = image_folder.load_image_folder(folder_config(root))
    assert names == CLASSES
    assert np.bincount(train.labels, minlength=3).tolist() == [3, 1, 3]
    assert np.bincount(test.labels, minlength=3).tolist() == [2, 2, 0]
    warned = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert len(warned) == 2, warned
    (single,) = [message for message in warned if "one training image" in message]
    (untested,) = [message for message in warned if "no test images" in message]
    assert "'dark'" in single and "'bright'" not in single and "'striped'" not in single
    assert "'striped'" in untested and "'bright'" not in untested and "'dark'" not in untested

    caplog.clear()
    make_image_folder(tmp_path / "enough", per_class=5)  # every class in both splits, several images each
    with caplog.at_level(logging.WARNING, logger="finetune"):
        image_folder.load_image_folder(folder_config(tmp_path / "enough", test_split=0.4))
    assert [record for record in caplog.records if record.levelno >= logging.WARNING] == []


def test_a_grayscale_folder_keeps_one_channel_and_16_bit_images_are_scaled(tmp_path):
    for name, level in (("low", 0.2), ("high", 0.8)):
        folder = tmp_path / "gray" / name
        folder.mkdir(parents=True)
        Image.fromarray(np.full((30, 20), int(level * 255), np.uint8), "L").save(folder / "a.png")
        Image.fromarray(np.full((25, 25), int(level * 65535), np.uint16)).save(folder / "b.png")
        assert Image.open(folder / "b.png").mode.startswith("I")
        Image.fromarray(np.full((10, 40, 2), [int(level * 255), 255], np.uint8), "LA").save(folder / "c.png")
    train, test, names, _ = image_folder.load_image_folder(folder_config(tmp_path / "gray", test_split=0.34))
    images = np.concatenate([train.images, test.images])
    labels = np.concatenate([train.labels, test.labels])
    assert images.shape[1:] == (32, 32, 1)
    for label, level in ((names.index("low"), 0.2), (names.index("high"), 0.8)):
        assert np.abs(images[labels == label].astype(int) - level * 255).max() <= 1


def test_transparency_is_composited_on_white(tmp_path):
    for name, alpha in (("clear", 0), ("solid", 255)):
        folder = tmp_path / "alpha" / name
        folder.mkdir(parents=True)
        for index in range(3):
            Image.fromarray(
                np.dstack([np.zeros((16, 16, 3), np.uint8), np.full((16, 16), alpha, np.uint8)]), "RGBA"
            ).save(folder / f"{index}.png")
    train, test, names, _ = image_folder.load_image_folder(folder_config(tmp_path / "alpha", test_split=0.34))
    images = np.concatenate([train.images, test.images])
    labels = np.concatenate([train.labels, test.labels])
    assert (images[labels == names.index("clear")] == 255).all()  # dropping alpha would give black
    assert (images[labels == names.index("solid")] == 0).all()


def test_exif_orientation_is_applied(tmp_path):
    # A landscape JPEG, left half red, that its EXIF says to show rotated 90 degrees clockwise.
    pixels = np.zeros((20, 40, 3), np.uint8)
    pixels[:, :20] = (255, 0, 0)
    exif = Image.Exif()
    exif[0x0112] = 6
    for name in ("a", "b"):
        (tmp_path / "exif" / name).mkdir(parents=True)
        for index in range(2):
            Image.fromarray(pixels).save(tmp_path / "exif" / name / f"{index}.jpg", exif=exif, quality=95)
    config = folder_config(tmp_path / "exif", stored_size=[40, 20], resize="stretch", test_split=0.5)
    train, _, _, _ = image_folder.load_image_folder(config)
    upright = np.asarray(train.images[0]).astype(int)
    assert upright.shape == (40, 20, 3)
    # Shown upright, the red half is on top, across the whole width.
    assert upright[2, -2, 0] > 200 and upright[2, -2, 1] < 60
    assert upright[-2, 2].max() < 60


@pytest.mark.parametrize("resize", ["crop", "pad", "stretch"])
def test_aspect_handling(tmp_path, resize):
    # A wide image in three vertical bands: red | green | blue.
    pixels = np.zeros((20, 60, 3), np.uint8)
    pixels[:, :20], pixels[:, 20:40], pixels[:, 40:] = (255, 0, 0), (0, 255, 0), (0, 0, 255)
    for name in ("a", "b"):
        (tmp_path / "bands" / name).mkdir(parents=True)
        for index in range(2):
            Image.fromarray(pixels).save(tmp_path / "bands" / name / f"{index}.png")
    config = folder_config(tmp_path / "bands", stored_size=30, resize=resize, test_split=0.5)
    image = np.asarray(image_folder.load_image_folder(config)[0].images[0]).astype(int)
    centre, left_middle, top_middle = image[15, 15], image[15, 1], image[1, 15]
    assert centre.argmax() == 1  # green in the middle whatever the mode
    if resize == "crop":
        assert left_middle.argmax() == 1 and top_middle.argmax() == 1  # only the green band is left
    elif resize == "pad":
        assert left_middle.argmax() == 0 and top_middle.max() == 0  # whole image, black bands above and below
    else:
        assert left_middle.argmax() == 0 and top_middle.argmax() == 1


def test_decoded_images_are_cached_and_reused(tmp_path, monkeypatch, image_cache):
    root = make_image_folder(tmp_path / "images", per_class=4)
    decoded = []
    original = image_folder._decode_image
    monkeypatch.setattr(
        image_folder, "_decode_image", lambda path, *args: (decoded.append(path), original(path, *args))[1]
    )
    first = image_folder.load_image_folder(folder_config(root, test_split=0.25))
    assert len(decoded) == 12 and "decoded" in first[3]
    entries = list((image_cache / "image_folder").iterdir())
    assert len(entries) == 1 and (entries[0] / "images.npy").is_file()
    stamp = (entries[0] / "images.npy").stat().st_mtime_ns

    second = image_folder.load_image_folder(folder_config(root, test_split=0.25))
    assert len(decoded) == 12 and "cached" in second[3]  # nothing decoded the second time
    assert (entries[0] / "images.npy").stat().st_mtime_ns == stamp
    np.testing.assert_array_equal(first[0].images, second[0].images)

    # A changed file, or another stored size, is a new cache entry.
    changed = sorted(root.rglob("*.*"))[0]
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    image_folder.load_image_folder(folder_config(root, test_split=0.25))
    image_folder.load_image_folder(folder_config(root, test_split=0.25, stored_size=24))
    assert len(decoded) == 36 and len(list((image_cache / "image_folder").iterdir())) == 3


@pytest.mark.parametrize(
    "layout, expected",
    [
        ("missing", "does not exist"),
        ("one_class", "needs at least 2 class sub-folders"),
        ("empty_class", "has no images"),
        ("corrupt", "cannot read image"),
        ("bomb", "cannot read image"),
        ("dangling", "cannot read image"),
    ],
)
def test_folder_problems_are_one_line_data_errors(tmp_path, layout, expected, monkeypatch):
    root = tmp_path / "images"
    if layout != "missing":
        make_image_folder(root, per_class=3, classes=CLASSES[:1] if layout == "one_class" else CLASSES)
    if layout == "empty_class":
        (root / "empty").mkdir()
    if layout == "corrupt":
        (root / "dark" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    if layout == "bomb":  # Pillow's own limit, lowered so that a small file is a bomb
        Image.new("L", (200, 200)).save(root / "dark" / "broken.png")
        monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 30_000)
    if layout == "dangling":  # a link whose target is gone: unreadable
        (root / "dark" / "broken.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(DataError) as caught:
        data.load_dataset(folder_config(root), seed=0)
    message = str(caught.value)
    assert expected in message and "\n" not in message
    if layout in ("corrupt", "bomb", "dangling"):
        assert "broken.png" in message
    if layout == "empty_class":
        assert "empty" in message


def test_image_folder_without_a_folder_says_how_to_give_one():
    with pytest.raises(DataError, match=r"--set data.data_dir=PATH"):
        data.load_dataset(DataConfig(source="image_folder"), seed=0)


def test_the_folder_shorthand_is_normalized(tmp_path, tiny_recipe_dict):
    tiny_recipe_dict["data"]["source"] = f"image_folder:{tmp_path}"
    recipe = finetune.load_recipe(tiny_recipe_dict)
    assert recipe.data.source == "image_folder" and recipe.data.data_dir == str(tmp_path)
    tiny_recipe_dict["data"]["data_dir"] = "/elsewhere"
    with pytest.raises(RecipeError, match="data_dir"):
        finetune.load_recipe(tiny_recipe_dict)


def test_stored_size_is_refused_where_it_does_nothing(tiny_recipe_dict):
    tiny_recipe_dict["data"]["stored_size"] = 32
    with pytest.raises(RecipeError, match="stored_size"):
        finetune.load_recipe(tiny_recipe_dict)


# --- classes and few-shot, for every source --------------------------------


def labelled_fashion_mnist(folder, train=200, test=100):
    """Fake Fashion-MNIST IDX files whose every image is filled with its label."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for _prefix, count, stem in (("train", train, "train"), ("test", test, "t10k")):
        labels = rng.permutation(np.arange(count) % 10)
        write_idx(folder / f"{stem}-images-idx3-ubyte.gz", np.repeat(labels, 28 * 28).reshape(count, 28, 28))
        write_idx(folder / f"{stem}-labels-idx1-ubyte.gz", labels)
    return folder


def test_classes_keeps_and_relabels_in_the_given_order(tmp_path):
    folder = labelled_fashion_mnist(tmp_path / "fmnist")
    config = DataConfig(data_dir=str(folder), classes=["Shirt", 0, "Bag"], validation_split=0.2)
    dataset = data.load_dataset(config, seed=0)
    assert dataset.class_names == ("Shirt", "T-shirt/top", "Bag") and dataset.num_classes == 3
    original_train = fashion_mnist.read_idx(folder / "train-labels-idx1-ubyte.gz")
    for split, original in (
        (dataset.train, original_train),
        (dataset.validation, original_train),
        (dataset.test, fashion_mnist.read_idx(folder / "t10k-labels-idx1-ubyte.gz")),
    ):
        assert sorted(set(split.labels.tolist())) == [0, 1, 2]
        # The images relabelled 0 ('Shirt') are Fashion-MNIST label 6, and so on.
        for new, old in ((0, 6), (1, 0), (2, 8)):
            kept = split.labels == new
            assert (split.images[kept] == old).all() and (original[split.indices[kept]] == old).all()
    assert len(dataset.train) + len(dataset.validation) == 60 and len(dataset.test) == 30


def test_unknown_classes_are_one_line_errors_listing_valid_names(tiny_recipe_dict, tmp_path):
    tiny_recipe_dict["data"]["classes"] = ["Shirt", "Hat"]
    with pytest.raises(RecipeError) as caught:
        finetune.load_recipe(tiny_recipe_dict)
    assert "'Hat'" in str(caught.value) and "'Ankle boot'" in str(caught.value)
    tiny_recipe_dict["data"]["classes"] = [0, 10]
    with pytest.raises(RecipeError, match=r"out of range 0\.\.9"):
        finetune.load_recipe(tiny_recipe_dict)
    tiny_recipe_dict["data"]["classes"] = ["Shirt", "Shirt"]
    with pytest.raises(RecipeError, match="twice"):
        finetune.load_recipe(tiny_recipe_dict)
    root = make_image_folder(tmp_path / "images", per_class=3)
    with pytest.raises(DataError, match="valid names: 'bright', 'dark', 'striped'"):
        data.load_dataset(folder_config(root, classes=["dark", "blurry"]), seed=0)


def test_train_per_class_keeps_exactly_n_per_class(tmp_path):
    folder = labelled_fashion_mnist(tmp_path / "fmnist")
    few = data.load_dataset(DataConfig(data_dir=str(folder), train_per_class=5, validation_split=0.0), seed=3)
    assert np.bincount(few.train.labels, minlength=10).tolist() == [5] * 10
    assert len(few.test) == 100  # the test split is untouched
    again = data.load_dataset(DataConfig(data_dir=str(folder), train_per_class=5, validation_split=0.0), seed=3)
    assert few.train.indices.tolist() == again.train.indices.tolist()
    # The validation hold-out comes out of the N per class.
    held = data.load_dataset(DataConfig(data_dir=str(folder), train_per_class=10, validation_split=0.2), seed=3)
    assert np.bincount(held.train.labels).tolist() == [8] * 10
    assert np.bincount(held.validation.labels).tolist() == [2] * 10
    with pytest.raises(DataError, match="class 'T-shirt/top' has only 20 training images"):
        data.load_dataset(DataConfig(data_dir=str(folder), train_per_class=21), seed=0)


def test_train_per_class_applies_to_the_kept_classes(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=10)
    dataset = data.load_dataset(
        folder_config(root, classes=["striped", "bright"], train_per_class=4, validation_split=0.0), seed=0
    )
    assert dataset.class_names == ("striped", "bright")
    assert np.bincount(dataset.train.labels).tolist() == [4, 4]
    assert dataset.input_shape == (32, 32, 3)


def test_build_model_without_a_dataset_finds_the_shape(tmp_path, tiny_recipe_dict):
    root = make_image_folder(tmp_path / "images", per_class=3)
    tiny_recipe_dict["data"].update(
        source="image_folder",
        data_dir=str(root),
        train_limit=None,
        test_limit=None,
        validation_split=0.0,
        classes=["dark", "bright"],
    )
    model = finetune.build_model(finetune.load_recipe(tiny_recipe_dict))
    assert tuple(model.input.shape[1:]) == (32, 32, 3) and model.output.shape[-1] == 2
    tiny_recipe_dict["data"] = {"source": "fashion_mnist", "image_size": 32, "classes": ["Bag", "Coat"]}
    model = finetune.build_model(finetune.load_recipe(tiny_recipe_dict))
    assert tuple(model.input.shape[1:]) == (28, 28, 1) and model.output.shape[-1] == 2


def test_the_package_imports_without_tensorflow():
    code = textwrap.dedent("""
        import sys
        from finetune import data
        from finetune.recipe import DataConfig
        data.check_config(DataConfig(source="tfds:mnist"))
        data.check_config(DataConfig(source="image_folder"))
        assert "tensorflow" not in sys.modules and "tensorflow_datasets" not in sys.modules, "imported TF"
    """)
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "source, expected",
    [
        ("tfds", "needs tfds:NAME"),
        ("fashion_mnist:x", "takes no ':' argument"),
        ("imagefolder", "did you mean 'image_folder'"),
    ],
)
def test_source_syntax_errors(tiny_recipe_dict, source, expected):
    tiny_recipe_dict["data"]["source"] = source
    with pytest.raises(RecipeError, match=expected):
        finetune.load_recipe(tiny_recipe_dict)


# --- tensorflow-datasets ---------------------------------------------------

PREPARE_SHAPES = textwrap.dedent('''
    import sys
    import numpy as np
    import tensorflow_datasets as tfds

    class FinetuneTestShapes(tfds.core.GeneratorBasedBuilder):
        """Images of varying size; the label is the one lit colour channel."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, supervised_keys=("image", "label"),
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(None, None, 3)),
                    "label": tfds.features.ClassLabel(names=["red", "green", "blue"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(30), "test": self._generate_examples(12)}

        def _generate_examples(self, count):
            for index in range(count):
                image = np.zeros((10 + index % 7, 30 - index % 5, 3), np.uint8)
                image[..., index % 3] = 200
                yield index, {"image": image, "label": index % 3}

    FinetuneTestShapes(data_dir=sys.argv[1]).download_and_prepare()
''')


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
    """A TFDS data dir prepared by another process: this one has no builder class for it."""
    pytest.importorskip("tensorflow_datasets")
    folder = tmp_path_factory.mktemp("tfds")
    result = subprocess.run(
        [sys.executable, "-c", PREPARE_SHAPES, str(folder)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return folder


@pytest.fixture(scope="module")
def gray_builder():
    """A builder class of this process: fixed-size 8x8 greyscale images, a train split only."""
    tfds = pytest.importorskip("tensorflow_datasets")

    class FinetuneTestGray(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self,
                features=tfds.features.FeaturesDict(
                    {
                        "image": tfds.features.Image(shape=(8, 8, 1)),
                        "label": tfds.features.ClassLabel(names=["dim", "lit"]),
                    }
                ),
            )

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for index in range(40):
                yield index, {"image": np.full((8, 8, 1), 30 + 200 * (index % 2), np.uint8), "label": index % 2}

    return FinetuneTestGray


@pytest.fixture
def offline_tfds(monkeypatch):
    """Every download_and_prepare fails as without network, and is recorded."""
    import tensorflow_datasets as tfds

    calls = []

    def refuse(self, *args, **kwargs):
        calls.append(self.name)
        raise ConnectionError("no network in tests")

    monkeypatch.setattr(tfds.core.DatasetBuilder, "download_and_prepare", refuse)
    return calls


def test_a_prepared_tfds_dataset_loads_by_name_without_its_builder_code(tfds_dir, offline_tfds):
    import tensorflow_datasets as tfds

    assert "finetune_test_shapes" not in tfds.list_builders(with_community_datasets=False)
    config = DataConfig(source="tfds:finetune_test_shapes", data_dir=str(tfds_dir), image_size=16)
    train, test, names, where = tfds_source.load_tfds(config)
    assert names == ("red", "green", "blue") and "finetune_test_shapes" in where
    assert len(train) == 30 and len(test) == 12 and offline_tfds == []
    # Images vary in size, so they are stored at the stored size (image_size by default).
    assert train.images.shape == (30, 16, 16, 3) and train.images.dtype == np.uint8
    for split in (train, test):
        lit = split.images.reshape(len(split), -1, 3).mean(axis=1).argmax(axis=1)
        assert lit.tolist() == split.labels.tolist()
    assert data.peek_class_names(config) == ("red", "green", "blue")
    selected = data.load_dataset(config.model_copy(update={"classes": ["blue", "red"]}), seed=0)
    assert selected.class_names == ("blue", "red") and len(selected.test) == 8


def test_a_prepared_tfds_dataset_is_never_downloaded_again(tmp_path, gray_builder, offline_tfds, monkeypatch):
    import tensorflow_datasets as tfds

    monkeypatch.undo()  # prepare once, for real
    gray_builder(data_dir=str(tmp_path)).download_and_prepare()
    monkeypatch.setattr(
        tfds.core.DatasetBuilder, "download_and_prepare", lambda self, *a, **k: offline_tfds.append(self.name) or 1 / 0
    )
    config = DataConfig(source="tfds:finetune_test_gray", data_dir=str(tmp_path), test_split=0.25)
    dataset = data.load_dataset(config.model_copy(update={"validation_split": 0.0}), seed=0)
    assert offline_tfds == []
    # Fixed-size images are stored as they are; without a test split a stratified quarter is carved out.
    assert dataset.input_shape == (8, 8, 1) and dataset.class_names == ("dim", "lit")
    assert len(dataset.train) == 30 and np.bincount(dataset.test.labels).tolist() == [5, 5]
    assert "no test split" in dataset.source
    assert ((dataset.train.images.reshape(30, -1).mean(axis=1) > 100) == (dataset.train.labels == 1)).all()
    # An explicit stored_size resizes fixed-size images too.
    small = tfds_source.load_tfds(config.model_copy(update={"stored_size": 4}))[0]
    assert small.images.shape == (30, 4, 4, 1) and offline_tfds == []


def test_an_unprepared_tfds_dataset_offline_is_one_line(tmp_path, gray_builder, offline_tfds):
    config = DataConfig(source="tfds:finetune_test_gray", data_dir=str(tmp_path / "empty"))
    with pytest.raises(DataError) as caught:
        data.load_dataset(config, seed=0)
    message = str(caught.value)
    assert "'finetune_test_gray'" in message and str(tmp_path / "empty") in message and "\n" not in message
    assert offline_tfds == ["finetune_test_gray"]
    assert data.peek_class_names(config) is None  # validate does not download either


def test_an_unknown_tfds_dataset_is_one_line(tmp_path):
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(DataError) as caught:
        data.load_dataset(DataConfig(source="tfds:no_such_dataset_xyz", data_dir=str(tmp_path)), seed=0)
    assert "'no_such_dataset_xyz'" in str(caught.value) and "\n" not in str(caught.value)


# --- end to end -------------------------------------------------------------


@pytest.mark.slow
def test_image_folder_recipe_end_to_end(tmp_path, tiny_backbone_weights, monkeypatch):
    from finetune.report import confusion as report

    root = make_image_folder(tmp_path / "images", per_class=30)
    pictures = []
    original = report.draw_confusion_matrix
    monkeypatch.setattr(
        report,
        "draw_confusion_matrix",
        lambda matrix, names, *args, **kwargs: (pictures.append(list(names)), original(matrix, names, *args, **kwargs))[
            1
        ],
    )
    recipe = finetune.load_recipe(
        ROOT / "recipes" / "image_folder_example.yaml",
        {
            "data.data_dir": str(root),
            "data.image_size": 32,
            "precision": "float32",
            "model.backbone.weights": str(tiny_backbone_weights),
            "model.backbone.options": {"alpha": 0.35},
            "training.batch_size": 8,
            "training.verbose": 0,
            "phases.head.epochs": 10,
            "phases.finetune.epochs": 1,
        },
    )
    result = finetune.run(recipe, out=tmp_path / "run", log=lambda line: None)
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["test"]["class_names"] == list(CLASSES) and pictures == [list(CLASSES)]
    assert (result.run_dir / "saved_model" / "labels.txt").read_text().splitlines() == list(CLASSES)
    assert (result.run_dir / "confusion_matrix.png").is_file() and (result.run_dir / "mistakes.png").is_file()
    assert tuple(result.model.input.shape[1:]) == (32, 32, 3) and result.model.output.shape[-1] == 3
    assert metrics["test"]["examples"] == 18 and metrics["train_images"] + metrics["validation_images"] == 72
    assert metrics["test"]["accuracy"] > 0.6  # chance is 1/3


@pytest.mark.parametrize("command", ["validate", "run"])
def test_cli_missing_image_folder_is_one_line_with_exit_code_2(tmp_path, command):
    missing = tmp_path / "nowhere"
    extra = ["--out", str(tmp_path / "out")] if command == "run" else []
    # validate in this process (a fresh one costs ~10 s of imports); run through the real entry point.
    invoke = cli if command == "run" else cli_in_process
    result = invoke(command, "recipes/image_folder_example.yaml", "--set", f"data.data_dir={missing}", *extra)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(missing) in lines[0], result.stderr
    assert not (tmp_path / "out").exists()  # nothing started


def test_cli_validate_prints_the_class_count(tmp_path):
    root = make_image_folder(tmp_path / "images", per_class=2)
    result = cli_in_process(
        "validate",
        "recipes/image_folder_example.yaml",
        *("--set", f"data.data_dir={root}", "--set", "model.backbone.weights=null"),  # offline: no ImageNet file
    )
    assert result.returncode == 0, result.stderr
    assert "3 classes (bright, dark, striped)" in result.stdout


def test_skip_bad_images_skips_them_with_a_count_and_keeps_the_rest(tmp_path, image_cache):
    root = tmp_path / "images"
    make_image_folder(root, per_class=6)
    (root / "dark" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "dark" / "gone.png").symlink_to(tmp_path / "nothing.png")
    with pytest.raises(DataError, match=r"broken\.png|gone\.png"):
        image_folder.load_image_folder(folder_config(root, test_split=0.25))
    train, test, names, description = image_folder.load_image_folder(
        folder_config(root, test_split=0.25, skip_bad_images=True)
    )
    assert "2 unreadable images skipped" in description
    assert len(train.labels) + len(test.labels) == 6 * len(names)  # every readable image, none of the bad ones
    assert train.images[:].shape[0] == len(train.labels) and train.images[:].max() > 0
    again = image_folder.load_image_folder(folder_config(root, test_split=0.25, skip_bad_images=True))
    assert "cached" in again[3] and "2 unreadable images skipped" in again[3]
    np.testing.assert_array_equal(again[0].images[:], train.images[:])
