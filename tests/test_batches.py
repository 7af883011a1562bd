"""Images and features in files are read a batch at a time, with the same results as arrays."""

import keras
import numpy as np
import pytest

from finetune.data import Split
from finetune.data.arrays import MappedImages, on_disk, pick_rows
from finetune.data.batches import FileBatches
from finetune.data.loading import _take
from finetune.evaluation import metrics as evaluation


@pytest.fixture
def mapped(tmp_path):
    """A memory-mapped uint8 image file whose row i is filled with i."""
    path = tmp_path / "images.npy"
    array = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(50, 6, 6, 1))
    array[:] = np.arange(50, dtype=np.uint8)[:, None, None, None]
    array.flush()
    return np.load(path, mmap_mode="r")


def test_subsets_of_a_mapped_file_stay_mapped_and_read_the_right_rows(mapped):
    labels = np.arange(50) % 3
    split = _take(Split(mapped, labels), labels, np.array([40, 3, 17, 8]))
    assert isinstance(split.images, MappedImages) and on_disk(split.images)
    assert split.images.shape == (4, 6, 6, 1) and split.images.base is mapped  # nothing copied yet
    np.testing.assert_array_equal(np.asarray(split.images)[:, 0, 0, 0], [40, 3, 17, 8])
    smaller = split.subset(np.array([3, 0]))
    assert isinstance(smaller.images, MappedImages)
    np.testing.assert_array_equal(smaller.images[:][:, 0, 0, 0], [8, 40])
    np.testing.assert_array_equal(smaller.labels, labels[[8, 40]])
    assert not isinstance(pick_rows(np.asarray(mapped), [1, 2]), MappedImages)  # in-memory arrays copy as before


def test_file_batches_cover_every_row_once_per_epoch_in_a_new_seeded_order(mapped):
    images = MappedImages(mapped, np.arange(50))
    labels = np.arange(50)
    batches = FileBatches(images, labels, batch_size=16, shuffle=True, seed=3)
    assert len(batches) == 4

    def epoch():
        seen = []
        for index in range(len(batches)):
            x, y = batches[index]
            np.testing.assert_array_equal(x[:, 0, 0, 0], y)  # images travel with their labels
            seen.extend(y.tolist())
        batches.on_epoch_end()
        return seen

    first, second = epoch(), epoch()
    assert sorted(first) == sorted(second) == list(range(50))
    assert first != second and first != list(range(50))
    assert FileBatches(images, labels, 16, shuffle=True, seed=3)[0][1].tolist() == first[:16]  # seeded
    # Epoch 1's order depends on (seed, epoch) alone: a run resumed at epoch 1 reads what this one read.
    assert FileBatches(images, labels, 16, shuffle=True, seed=3, epoch=1)[0][1].tolist() == second[:16]


def tiny_classifier():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6, 6, 1), dtype="uint8")
    x = keras.layers.Flatten()(keras.ops.cast(inputs, "float32") / 50.0)
    outputs = keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(8, activation="relu")(x))
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    return model


def test_training_from_batches_of_a_file_equals_training_on_the_array(mapped):
    labels = (np.arange(50) % 3).astype(np.int32)
    in_memory, from_file = tiny_classifier(), tiny_classifier()
    in_memory.fit(np.asarray(mapped), labels, batch_size=8, epochs=2, shuffle=False, verbose=0)
    from_file.fit(
        FileBatches(MappedImages(mapped, np.arange(50)), labels, batch_size=8), epochs=2, verbose=0, shuffle=False
    )  # Keras would otherwise shuffle the batch order of a PyDataset
    for a, b in zip(in_memory.weights, from_file.weights, strict=True):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), rtol=1e-5, atol=1e-6)


def test_evaluation_of_mapped_images_equals_evaluation_of_the_array(mapped):
    model = tiny_classifier()
    labels = (np.arange(50) % 3).astype(np.int32)
    split = _take(Split(mapped, labels), labels, np.arange(49, -1, -1))
    from_file = evaluation.evaluate(model, split, ("a", "b", "c"), batch_size=16)
    in_memory = evaluation.evaluate(model, Split(np.asarray(split.images), split.labels), ("a", "b", "c"), 16)
    assert from_file["confusion_matrix"] == in_memory["confusion_matrix"]
    assert from_file["loss"] == pytest.approx(in_memory["loss"], rel=1e-6)


def test_standardize_statistics_from_a_file_match_numpy(mapped):
    from finetune.backbones.input_layer import BackboneInput

    layer = BackboneInput(6, 6, "standardize", channels=None)
    layer.adapt(MappedImages(mapped, np.arange(50)))
    values = np.asarray(mapped, dtype=np.float64)
    assert float(layer.mean.numpy()) == pytest.approx(values.mean(), rel=1e-6)
    assert float(layer.std.numpy()) == pytest.approx(values.std(), rel=1e-6)
