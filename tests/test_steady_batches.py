"""Prediction in batches of one shape: the model is traced once per pass, and the answers are unchanged."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from finetune.data.arrays import even_batch_size, predict_in_steady_batches
from finetune.evaluation.metrics import predict_views
from finetune.training.features import CacheTarget, extract


class CountingDense(keras.layers.Dense):
    """A dense layer that counts how often Python runs its call: once per trace in a compiled predict."""

    calls = 0

    def call(self, inputs):
        CountingDense.calls += 1
        return super().call(inputs)


def _model(width: int = 12) -> keras.Model:
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4, 3))
    flat = keras.layers.Flatten()(inputs)
    return keras.Model(inputs, CountingDense(5, activation="softmax")(flat))


@pytest.mark.parametrize(
    ("count", "batch", "expected"), [(2000, 256, 250), (10000, 256, 250), (1000, 32, 32), (257, 256, 129), (5, 256, 5)]
)
def test_even_batch_size_keeps_the_number_of_batches(count, batch, expected):
    size = even_batch_size(count, batch)
    assert size == expected
    assert -(-count // size) == -(-count // batch)  # as many batches as the asked size gives
    assert -(-count // size) * size - count < -(-count // batch)  # at most one padded row per batch


def test_a_short_last_batch_is_padded_and_the_model_traced_once():
    images = np.random.default_rng(0).random((1000, 4, 3)).astype("float32")
    CountingDense.calls = 0
    _model().predict(images, batch_size=32, verbose=0)  # Keras's own: 31 batches of 32, then one of 8
    assert CountingDense.calls == 2, "the check below proves nothing if a short batch does not retrace"
    model = _model()
    CountingDense.calls = 0
    got = predict_in_steady_batches(model, images, 32)
    assert CountingDense.calls == 1
    expected = model.predict(images, batch_size=1000, verbose=0)
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_evaluation_views_share_one_trace():
    model = _model()
    rng = np.random.default_rng(1)
    images = rng.random((5000, 4, 3)).astype("float32")
    CountingDense.calls = 0
    both = predict_views(model, images, batch_size=256, tta=("flip",))
    assert CountingDense.calls == 1
    plain = model.predict(images, batch_size=5000, verbose=0)
    mirrored = model.predict(images[:, :, ::-1], batch_size=5000, verbose=0)
    np.testing.assert_allclose(both, (plain + mirrored) / 2, rtol=1e-5, atol=1e-6)


def test_feature_extraction_traces_the_bottom_once(tmp_path):
    model = _model()
    images = np.random.default_rng(2).random((2500, 4, 3)).astype("float32")
    CountingDense.calls = 0
    extracted = [
        extract(model, images, 64, CacheTarget("float32", storage, tmp_path, f"features_{storage}"))[0]
        for storage in ("memory", "disk")
    ]
    assert CountingDense.calls == 1  # 2,500 rows in chunks of 1,024 at 64 would end in a batch of 28
    expected = model.predict(images, batch_size=2500, verbose=0)
    for features in extracted:
        np.testing.assert_allclose(features, expected, rtol=1e-5, atol=1e-6)


def test_a_model_under_a_distribution_strategy_is_predicted_through_keras_predict():
    import tensorflow as tf

    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    with strategy.scope():
        model = _model()
    images = np.random.default_rng(3).random((1000, 4, 3)).astype("float32")
    calls: list[int] = []
    original = model.predict_on_batch
    model.predict_on_batch = lambda *args, **kwargs: calls.append(1) or original(*args, **kwargs)  # type: ignore[method-assign]
    got = predict_in_steady_batches(model, images, 32)
    assert not calls  # Keras's predict, which shards batches over the replicas
    with strategy.scope():
        expected = model.predict(images, batch_size=1000, verbose=0)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
