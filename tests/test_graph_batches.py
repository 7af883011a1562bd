"""In-memory batches read inside TensorFlow's input pipeline: the same batches, the same training."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from finetune.data import graph_batches
from finetune.data.batches import FileBatches, MixedBatches, ViewBatches
from finetune.data.graph_batches import EpochOrder, fit_feed

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="a TensorFlow input pipeline")


def _arrays(rows: int = 50) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(3)
    return rng.normal(size=(rows, 6)).astype("float32"), rng.integers(0, 3, rows)


def _pipeline_epoch(pipeline, order: EpochOrder, epoch: int) -> list[tuple[np.ndarray, ...]]:
    order.on_epoch_begin(epoch)
    return [tuple(np.asarray(part) for part in batch) for batch in pipeline]


@pytest.mark.parametrize("balanced", [False, True])
def test_each_epoch_reads_the_batches_file_batches_read(balanced: bool) -> None:
    x, y = _arrays()
    batches = FileBatches(x, y, 16, shuffle=True, seed=7, epoch=2, balanced=balanced, class_weights=[1.0, 2.0, 3.0])
    reference = FileBatches(x, y, 16, shuffle=True, seed=7, epoch=2, balanced=balanced, class_weights=[1.0, 2.0, 3.0])
    pipeline, callbacks = fit_feed(batches)
    assert pipeline is not batches and len(callbacks) == 1
    for epoch in (2, 3, 5):  # a resumed run begins at a later epoch, and Keras says which
        expected = reference.at_epoch(epoch)
        got = _pipeline_epoch(pipeline, callbacks[0], epoch)
        assert len(got) == len(expected) == 4  # 16, 16, 16 and the last 2 rows
        for index, batch in enumerate(got):
            for ours, theirs in zip(batch, expected[index], strict=True):
                np.testing.assert_array_equal(ours, theirs)


def test_several_inputs_and_no_labels() -> None:
    x, _ = _arrays()
    other = np.arange(50, dtype=np.int32)
    pipeline, callbacks = fit_feed(FileBatches([x, other], None, 20))
    got = _pipeline_epoch(pipeline, callbacks[0], 0)
    np.testing.assert_array_equal(np.concatenate([batch[1] for batch in got]), other)
    np.testing.assert_array_equal(np.concatenate([batch[0] for batch in got]), x)


def _memory_mapped(tmp_path, x: np.ndarray) -> np.ndarray:
    mapped = np.lib.format.open_memmap(tmp_path / "x.npy", mode="w+", dtype="float32", shape=x.shape)
    mapped[:] = x
    return mapped


def test_files_views_mixes_and_big_arrays_are_read_through_a_generator_in_each_epochs_order(
    tmp_path, monkeypatch
) -> None:
    x, y = _arrays()
    monkeypatch.setattr(graph_batches, "MAX_COPY_BYTES", x.nbytes + y.nbytes - 1)  # too big to copy

    def mixed() -> MixedBatches:
        return MixedBatches(x, y, 3, 16, lambda images, targets, rng: (images * rng.random(), targets), seed=4)

    cases = [
        (lambda: FileBatches(_memory_mapped(tmp_path, x), y, 16, seed=5), 4),
        (lambda: ViewBatches([x, 2 * x, 3 * x], y, 16, seed=5, class_weights=[1.0, 2.0, 3.0]), 4),
        (mixed, 4),
        (lambda: FileBatches(x, y, 16, seed=5), 4),
        (lambda: FileBatches([x, x[:, :2]], None, 20, seed=5), 3),
    ]
    for make, count in cases:
        batches, reference = make(), make()
        assert not graph_batches.can_read_in_graph(batches)
        pipeline, callbacks = fit_feed(batches)
        assert pipeline is not batches and pipeline.options().autotune.enabled is False
        for epoch in (0, 1, 5):
            expected = reference.at_epoch(epoch)
            got = _pipeline_epoch(pipeline, callbacks[0], epoch)
            assert len(got) == len(expected) == count
            for index, batch in enumerate(got):
                for ours, theirs in zip(batch, expected[index], strict=True):
                    np.testing.assert_allclose(ours, np.asarray(theirs), rtol=1e-6)


def test_every_pipeline_runs_without_autotuning() -> None:
    x, y = _arrays()
    pipeline, _ = fit_feed(FileBatches(x, y, 16))
    assert pipeline.options().autotune.enabled is False  # see scripts/autotune_bench.py for why


def test_other_backends_read_the_batches_themselves(monkeypatch) -> None:
    x, y = _arrays()
    batches = ViewBatches([x, x], y, 16)
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    assert fit_feed(batches) == (batches, [])


def _model() -> keras.Model:
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3)])
    model.compile(keras.optimizers.SGD(0.1), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model


@pytest.mark.parametrize("views", [1, 3])
def test_a_fit_through_the_pipeline_trains_on_each_epochs_own_batches(views: int) -> None:
    """Epochs 1-3 of a fit (a resumed run's) equal training on ``at_epoch(e)``'s batches one by one.

    One view: gathered in the graph; three augmented views: read through the generator.
    """
    x, y = _arrays(200)

    def make() -> FileBatches:
        if views == 1:
            return FileBatches(x, y, 32, shuffle=True, seed=1)
        return ViewBatches([x * (1 + view) for view in range(views)], y, 32, shuffle=True, seed=1)

    batches = make().at_epoch(1)
    feed, callbacks = fit_feed(batches)
    fitted = _model()
    fitted.fit(feed, epochs=4, initial_epoch=1, shuffle=False, callbacks=callbacks, verbose=0)
    by_hand = _model()
    for epoch in (1, 2, 3):
        epoch_batches = make().at_epoch(epoch)
        for index in range(len(epoch_batches)):
            by_hand.train_on_batch(*epoch_batches[index])
    for ours, theirs in zip(fitted.get_weights(), by_hand.get_weights(), strict=True):
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
