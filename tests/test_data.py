import gzip
import struct

import numpy as np
import pytest

from finetune import data
from finetune.data import sampling
from finetune.data.sources import fashion_mnist
from finetune.errors import DataError
from finetune.recipe import DataConfig

SYSTEM_DIR = fashion_mnist.fashion_mnist_search_dirs()[-2]
needs_fashion_mnist = pytest.mark.skipif(
    fashion_mnist._find_idx_files(SYSTEM_DIR) is None, reason="apt-get install dataset-fashion-mnist"
)


def write_idx(path, array, compress=True):
    array = np.asarray(array, dtype=np.uint8)
    payload = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    (gzip.open if compress else open)(path, "wb").write(payload)


def write_fake_fashion_mnist(folder, train=40, test=20, fill=7):
    folder.mkdir(parents=True, exist_ok=True)
    labels = lambda n: np.arange(n) % 10  # noqa: E731
    write_idx(folder / "train-images-idx3-ubyte.gz", np.full((train, 28, 28), fill))
    write_idx(folder / "train-labels-idx1-ubyte.gz", labels(train))
    write_idx(folder / "t10k-images-idx3-ubyte", np.full((test, 28, 28), fill), compress=False)
    write_idx(folder / "t10k-labels-idx1-ubyte", labels(test), compress=False)
    return folder


@needs_fashion_mnist
def test_reads_the_real_fashion_mnist_files():
    train, test, classes, where = fashion_mnist.load_fashion_mnist(DataConfig())
    assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
    assert test.images.shape == (10000, 28, 28, 1)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert classes[0] == "T-shirt/top" and classes[9] == "Ankle boot"
    assert where == str(SYSTEM_DIR)


def test_search_order_data_dir_then_environment(tmp_path, monkeypatch):
    explicit = write_fake_fashion_mnist(tmp_path / "explicit", fill=1)
    from_env = write_fake_fashion_mnist(tmp_path / "env", fill=2)
    monkeypatch.setenv("FINETUNE_DATA_DIR", str(from_env))
    train, _, _, where = fashion_mnist.load_fashion_mnist(DataConfig(data_dir=str(explicit)))
    assert where == str(explicit) and train.images.max() == 1
    train, _, _, where = fashion_mnist.load_fashion_mnist(DataConfig())
    assert where == str(from_env) and train.images.max() == 2


def test_nothing_found_and_no_network_is_one_line(tmp_path, monkeypatch):
    import keras

    monkeypatch.setattr(
        fashion_mnist, "fashion_mnist_search_dirs", lambda data_dir=None: [tmp_path / "a", tmp_path / "b"]
    )

    def offline():
        raise Exception("URL fetch failure: no network")

    monkeypatch.setattr(keras.datasets.fashion_mnist, "load_data", offline)
    with pytest.raises(DataError) as caught:
        fashion_mnist.load_fashion_mnist(DataConfig())
    message = str(caught.value)
    assert str(tmp_path / "a") in message and "dataset-fashion-mnist" in message and "\n" not in message


def test_truncated_idx_file_is_reported(tmp_path):
    folder = write_fake_fashion_mnist(tmp_path / "d")
    raw = (folder / "t10k-images-idx3-ubyte").read_bytes()
    (folder / "t10k-images-idx3-ubyte").write_bytes(raw[:-10])
    with pytest.raises(DataError, match="truncated or corrupt"):
        fashion_mnist.load_fashion_mnist(DataConfig(data_dir=str(folder)))


def test_stratified_sample_keeps_class_proportions():
    labels = np.repeat(np.arange(4), [400, 300, 200, 100])
    rng = np.random.default_rng(0)
    picked = sampling.stratified_sample(labels, 100, rng)
    assert len(picked) == len(set(picked.tolist())) == 100
    assert np.bincount(labels[picked]).tolist() == [40, 30, 20, 10]


def test_stratified_sample_is_seeded():
    labels = np.arange(1000) % 10
    first = sampling.stratified_sample(labels, 50, np.random.default_rng(3))
    again = sampling.stratified_sample(labels, 50, np.random.default_rng(3))
    other = sampling.stratified_sample(labels, 50, np.random.default_rng(4))
    assert first.tolist() == again.tolist() and first.tolist() != other.tolist()


@needs_fashion_mnist
def test_limits_and_validation_split_are_stratified_and_disjoint():
    config = DataConfig(train_limit=1000, test_limit=500, validation_split=0.2, image_size=299)
    dataset = data.load_dataset(config, seed=1)
    assert len(dataset.train) == 800 and len(dataset.validation) == 200 and len(dataset.test) == 500
    assert np.bincount(dataset.train.labels).tolist() == [80] * 10
    assert np.bincount(dataset.validation.labels).tolist() == [20] * 10
    assert np.bincount(dataset.test.labels).tolist() == [50] * 10
    assert not set(dataset.train.indices.tolist()) & set(dataset.validation.indices.tolist())
    # The stored form stays 28x28 uint8 whatever the backbone's input size.
    assert dataset.train.images.shape[1:] == (28, 28, 1) and dataset.train.images.dtype == np.uint8
    again = data.load_dataset(config, seed=1)
    assert dataset.validation.indices.tolist() == again.validation.indices.tolist()


def test_validation_split_too_small_is_an_error(tmp_path):
    folder = write_fake_fashion_mnist(tmp_path / "d", train=10)
    config = DataConfig(data_dir=str(folder), validation_split=0.01)
    with pytest.raises(DataError, match="validation"):
        data.load_dataset(config, seed=0)


def test_unknown_source_lists_the_known_ones(tiny_recipe_dict):
    import finetune

    tiny_recipe_dict["data"]["source"] = "mnits"
    with pytest.raises(finetune.RecipeError, match=r"known: csv, fashion_mnist, image_folder"):
        finetune.load_recipe(tiny_recipe_dict)


@pytest.mark.parametrize(
    "damage, expected",
    [
        ("truncated_gzip", "cannot read"),
        ("wrong_magic", "is not an unsigned-byte IDX file"),
        ("counts_disagree", "images and labels differ in count"),
    ],
)
def test_damaged_idx_files_are_one_line_naming_the_file_and_leave_no_run_folder(tmp_path, damage, expected):
    import copy

    from conftest import TINY_RECIPE

    import finetune

    folder = write_fake_fashion_mnist(tmp_path / "d")
    images = folder / "train-images-idx3-ubyte.gz"
    if damage == "truncated_gzip":
        images.write_bytes(images.read_bytes()[:-30])
    elif damage == "wrong_magic":
        raw = gzip.decompress(images.read_bytes())
        images.write_bytes(gzip.compress(bytes([0, 0, 0x0D]) + raw[3:]))
    else:
        write_idx(folder / "train-labels-idx1-ubyte.gz", np.arange(39) % 10)
    with pytest.raises(DataError) as caught:
        fashion_mnist.load_fashion_mnist(DataConfig(data_dir=str(folder)))
    assert expected in str(caught.value) and "\n" not in str(caught.value)
    assert "train-" in str(caught.value) or damage == "counts_disagree"
    raw = copy.deepcopy(TINY_RECIPE)
    raw["data"]["data_dir"] = str(folder)
    with pytest.raises(DataError):
        finetune.run(finetune.load_recipe(raw), out=tmp_path / "run", log=lambda line: None)
    assert not (tmp_path / "run").exists()
