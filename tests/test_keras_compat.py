"""Each private Keras API finetune uses, checked against what public Keras says it should give.

When a Keras release moves one of them, the failure is here, by name.
"""

import keras
import numpy as np
import pytest

from finetune import _keras_compat as compat


def small_graph():
    inputs = keras.Input((4,), name="x")
    first = keras.layers.Dense(3, name="first")
    second = keras.layers.Dense(2, name="second")
    hidden = first(inputs)
    outputs = second(hidden)
    return keras.Model(inputs, outputs), first, second, hidden


def test_producer_is_the_layer_whose_call_made_a_tensor():
    model, first, second, hidden = small_graph()
    assert compat.producer(hidden) is first
    assert compat.producer(model.output) is second
    assert compat.producer(np.zeros(2)) is None  # not a symbolic tensor


def test_inbound_nodes_and_parent_operations_follow_the_calls():
    _, first, second, _ = small_graph()
    assert len(compat.inbound_nodes(second)) == 1
    parents = compat.parent_operations(second)
    assert parents == [first]
    other_inputs = keras.Input((4,))
    second(first(other_inputs))  # a second call of both layers
    assert len(compat.inbound_nodes(second)) == 2
    assert compat.parent_operations(second) == [first, first]


def test_calls_in_graph_keeps_only_the_calls_a_model_records():
    model, first, second, _ = small_graph()
    derived_inputs = keras.Input((3,))
    keras.Model(derived_inputs, second(derived_inputs))  # second gains a call outside `model`
    assert len(compat.inbound_nodes(second)) == 2
    (call,) = compat.calls_in_graph(second, model)
    assert compat.producer(call.input_tensors[0]) is first


def test_variable_index_is_the_variables_position_in_the_optimizer():
    model, _, _, _ = small_graph()
    optimizer = keras.optimizers.SGD(0.1)
    optimizer.build(model.trainable_variables)
    positions = [compat.variable_index(optimizer, variable) for variable in model.trainable_variables]
    assert positions == list(range(len(model.trainable_variables)))


def test_keras_downloads_route_what_applications_ask_for_and_restore_it(tmp_path, monkeypatch):
    from keras.src.utils import file_utils

    asked = []

    def refuse(*args, **kwargs):
        raise AssertionError("the real download must not run inside the block")

    monkeypatch.setattr(file_utils, "get_file", refuse)

    def handler(fname, origin, file_hash, download):
        asked.append((fname, origin, file_hash))
        raise ConnectionError("stop here")  # the handler decides; here: no file

    with compat.keras_downloads(handler), pytest.raises(ConnectionError):
        keras.applications.MobileNetV3Small(input_shape=(32, 32, 3), include_top=False, weights="imagenet")
    ((fname, origin, file_hash),) = asked
    assert fname == "weights_mobilenet_v3_small_224_1.0_float_no_top_v2.h5"
    assert origin.startswith("https://") and origin.endswith(fname)
    assert isinstance(file_hash, str) and len(file_hash) >= 32  # Keras's published hash
    assert file_utils.get_file is refuse  # restored after the block


def test_keras_downloads_hands_over_the_download_keras_meant():
    from keras.src.utils import file_utils

    made = []
    original = file_utils.get_file
    try:
        file_utils.get_file = lambda *args, **kwargs: made.append((args, kwargs)) or "/cache/file.h5"
        with compat.keras_downloads(lambda fname, origin, file_hash, download: download()):
            path = file_utils.get_file("file.h5", "https://example.org/file.h5", file_hash="abc", cache_subdir="x")
    finally:
        file_utils.get_file = original
    assert path == "/cache/file.h5"
    assert made == [(("file.h5", "https://example.org/file.h5"), {"file_hash": "abc", "cache_subdir": "x"})]


def test_multi_worker_fit_wraps_the_build_and_the_step_reduction_and_restores_them():
    """The two-worker run in tests/test_distribution.py is the real check; here: the names it replaces exist,
    a fit inside the block still trains under a strategy, and both are Keras's own again afterwards."""
    tf = pytest.importorskip("tensorflow")
    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.distribute needs the TensorFlow backend")
    import inspect

    from keras.src.backend.tensorflow import trainer

    build, reduce = trainer.TensorFlowTrainer._maybe_symbolic_build, trainer.reduce_per_replica
    assert list(inspect.signature(build).parameters) == ["self", "iterator", "data_batch"]
    assert list(inspect.signature(reduce).parameters) == ["values", "strategy", "reduction"]
    strategy = tf.distribute.MirroredStrategy(["/cpu:0"])
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = x @ np.array([[1.0], [-2.0], [0.5], [3.0]], dtype="float32")
    with compat.multi_worker_fit(), strategy.scope():
        assert trainer.reduce_per_replica is not reduce
        model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.1), "mse")
        losses = model.fit(x, y, batch_size=16, epochs=3, verbose=0).history["loss"]
    assert losses[-1] < losses[0] / 2
    assert trainer.TensorFlowTrainer._maybe_symbolic_build is build and trainer.reduce_per_replica is reduce
