"""Gradient health: vanishing gradients in a deep sigmoid stack are named; a healthy network gets no warning."""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import logged_lines

from finetune.training.gradient_health import GradientHealth, HealthSampler, layer_gradient_norms, unit_health


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(256, 20)).astype("float32")
    return x, (x[:, 0] > 0).astype("int32")


def _network(depth, activation, initializer):
    keras.utils.set_random_seed(0)
    layers = [keras.Input((20,))]
    layers += [keras.layers.Dense(64, activation=activation, kernel_initializer=initializer) for _ in range(depth)]
    model = keras.Sequential([*layers, keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.01), "sparse_categorical_crossentropy")
    return model


def _fit_with_health(model, tmp_path):
    x, y = _data()
    health = GradientHealth(tmp_path, "train", every_steps=4)
    health.sample = (x[:64], y[:64])
    with logged_lines() as lines:
        model.fit(x, y, batch_size=32, epochs=1, verbose=0, callbacks=[health])
    return health, lines


def test_a_deep_sigmoid_stack_with_a_small_init_warns_of_vanishing_gradients(tmp_path):
    model = _network(12, "sigmoid", keras.initializers.RandomNormal(stddev=0.1))
    health, lines = _fit_with_health(model, tmp_path)
    assert any(line.startswith("[finetune] warning: gradients vanish in phase train") for line in lines), lines
    norms = health.samples[0]["norms"]
    assert norms[next(iter(norms))] < 1e-4 * max(norms.values())  # what the warning says, measured
    assert (tmp_path / "gradient_norms.png").stat().st_size > 1000
    assert json.loads((tmp_path / "gradient_norms.json").read_text())["train"][0]["step"] == 1


def test_a_deep_sigmoid_stack_with_a_large_init_warns_of_exploding_gradients_and_saturation(tmp_path):
    model = _network(20, "sigmoid", keras.initializers.RandomNormal(stddev=8.0))
    health, lines = _fit_with_health(model, tmp_path)
    assert any(line.startswith("[finetune] warning: gradients explode in phase train") for line in lines), lines
    assert any(warning.startswith("saturated:") for warning in health.warnings), health.warnings
    assert max(health.samples[0]["norms"].values()) > 1e3


def test_a_healthy_network_gets_no_warning(tmp_path):
    model = _network(4, "relu", "he_normal")
    health, lines = _fit_with_health(model, tmp_path)
    assert health.warnings == [] and lines == []
    assert len(health.samples) == 3  # steps 1, 4 and 8 of 8


def test_layer_norms_are_the_norms_of_the_real_gradient():
    model = _network(1, None, "glorot_uniform")
    x, y = _data()

    def loss(truth, predicted):
        return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(truth, predicted))

    norms = layer_gradient_norms(model, x[:8], y[:8], loss)
    # The output layer's bias gradient of softmax cross-entropy is mean(p - onehot): check it by hand.
    probabilities = keras.ops.convert_to_numpy(model(x[:8]))
    bias_gradient = (probabilities - np.eye(2)[y[:8]]).mean(axis=0)
    hidden = keras.ops.convert_to_numpy(model.layers[0](x[:8]))
    kernel_gradient = hidden.T @ (probabilities - np.eye(2)[y[:8]]) / 8
    expected = np.sqrt(np.sum(bias_gradient**2) + np.sum(kernel_gradient**2))
    assert list(norms)[-1].endswith(model.layers[-1].name)
    np.testing.assert_allclose(norms[list(norms)[-1]], expected, rtol=1e-4)


def test_a_sample_leaves_batch_norm_statistics_and_dropout_state_as_they_were(tmp_path):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((20,)),
            keras.layers.Dense(16),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, y = _data()
    model.fit(x[:32], y[:32], verbose=0)
    before = [keras.ops.convert_to_numpy(v).copy() for v in model.variables]
    health = GradientHealth(None, "train")
    health.set_model(model)
    health.sample = (x + 5.0, y)  # a batch whose statistics differ: a leak would show
    health.record()
    after = [keras.ops.convert_to_numpy(v) for v in model.variables]
    for old, new in zip(before, after, strict=True):
        np.testing.assert_array_equal(old, new)


def _loss(truth, predicted):
    return keras.ops.mean(keras.losses.sparse_categorical_crossentropy(truth, predicted))


def test_the_traced_sample_equals_the_eager_one_and_moves_nothing():
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((20,)),
            keras.layers.Dense(16, activation="relu"),
            keras.layers.BatchNormalization(),
            keras.layers.Dropout(0.5),
            keras.layers.Dense(8, activation="tanh"),
            keras.layers.Dense(2, activation="softmax"),
        ]
    )
    model.compile("sgd", "sparse_categorical_crossentropy")
    x, y = _data()
    model.fit(x[:32], y[:32], verbose=0)
    kernel, bias = model.layers[0].get_weights()
    model.layers[0].set_weights([kernel, np.where(np.arange(16) < 4, -100.0, bias)])  # 4 of 16 units dead
    sample_x, sample_y = x[:64] * 3.0, y[:64]  # statistics unlike the fitted ones: a leak would show
    before = [keras.ops.convert_to_numpy(v).copy() for v in model.variables]
    sampler = HealthSampler(model, _loss)
    for _ in range(2):  # traced at the first call, reused at the second
        norms, units = sampler(sample_x, sample_y)
        after = [keras.ops.convert_to_numpy(v) for v in model.variables]
        for old, new in zip(before, after, strict=True):
            np.testing.assert_array_equal(old, new)
    assert sampler._traced.experimental_get_tracing_count() == 1  # TensorFlow's tf.function
    eager_units = unit_health(model, sample_x)  # before the eager gradient, which moves the statistics
    # The eager reference draws dropout's mask from the same state the traced call drew from.
    assert norms == pytest.approx(layer_gradient_norms(model, sample_x, sample_y, _loss), rel=1e-4)
    assert units.keys() == eager_units.keys()
    for name, shares in units.items():
        assert shares == pytest.approx(eager_units[name]), name
    assert set(units) == {layer.name for layer in model.layers if isinstance(layer, keras.layers.Dense)}
    assert units[model.layers[0].name]["dead"] == 0.25 and units[model.layers[3].name]["saturated"] > 0.1


_JAX_SAMPLE = """
import json, keras, numpy as np
from finetune.training.gradient_health import HealthSampler, layer_gradient_norms, unit_health
keras.utils.set_random_seed(0)
model = keras.Sequential([keras.Input((20,)), keras.layers.Dense(16, activation="relu"),
    keras.layers.BatchNormalization(), keras.layers.Dropout(0.5), keras.layers.Dense(8, activation="tanh"),
    keras.layers.Dense(2, activation="softmax")])
model.compile("sgd", "sparse_categorical_crossentropy")
x = np.random.default_rng(0).normal(size=(64, 20)).astype("float32") * 3.0
y = (x[:, 0] > 0).astype("int32")
model.fit(x[:32], y[:32], verbose=0)
loss = lambda t, p: keras.ops.mean(keras.losses.sparse_categorical_crossentropy(t, p))
before = [keras.ops.convert_to_numpy(v).copy() for v in model.variables]
norms, units = HealthSampler(model, loss)(x, y)
unchanged = all(np.array_equal(a, keras.ops.convert_to_numpy(v)) for a, v in zip(before, model.variables))
print(json.dumps({"backend": keras.backend.backend(), "unchanged": unchanged, "norms": norms, "units": units,
    "eager_units": unit_health(model, x), "eager_norms": layer_gradient_norms(model, x, y, loss)}))
"""


@pytest.mark.slow
def test_the_jitted_sample_on_jax_equals_the_eager_one_and_moves_nothing():
    """The GPU machines train on JAX: the sample there is a jitted pure function."""
    pytest.importorskip("jax")
    result = subprocess.run(
        [sys.executable, "-c", _JAX_SAMPLE],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(Path(__file__).resolve().parents[1])},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == "jax" and report["unchanged"]
    assert report["norms"] == pytest.approx(report["eager_norms"], rel=1e-4)
    assert report["units"] == report["eager_units"] and report["units"]["dense_1"]["saturated"] > 0.1
