"""Phase mechanics, proved by what a fit step does to the weights."""

import os

import keras
import numpy as np
import pytest
from conftest import compile_phase, configure, fit, layout_of

import finetune
from finetune import backbones, data
from finetune.backbones.blocks import get_backbone, split_into_blocks
from finetune.errors import RecipeError
from finetune.training import phases as training


def snapshot(layers):
    return {
        (layer.name, index): keras.ops.convert_to_numpy(weight).copy()
        for layer in layers
        for index, weight in enumerate(layer.weights)
    }


def changed(before, after):
    return {key for key in before if not np.array_equal(before[key], after[key])}


@pytest.fixture
def tiny_data(tiny_recipe):
    return data.load_dataset(tiny_recipe.data, tiny_recipe.seed)


def fit_one_phase(model, recipe, phase, dataset, epochs=1):
    phase = phase.model_copy(update={"epochs": epochs})
    configure(model, recipe, phase)
    compile_phase(model, recipe, phase)
    fit(model, recipe, phase, dataset)


def batch_norm_layers(model):
    return [layer for layer in get_backbone(model).layers if isinstance(layer, keras.layers.BatchNormalization)]


def test_head_phase_freezes_the_whole_backbone(tiny_recipe, tiny_data):
    model = finetune.build_model(tiny_recipe)
    backbone = get_backbone(model)
    plan = configure(model, tiny_recipe, tiny_recipe.phase("head"))
    assert plan.trainable_blocks == () and plan.trainable_backbone_weights == 0
    assert backbone.trainable_weights == []
    head_names = {w.path.split("/")[0] for w in model.trainable_weights}
    assert head_names == {"head_1_dense", "predictions"}

    before_backbone, before_head = snapshot(backbone.layers), snapshot([model.get_layer("predictions")])
    compile_phase(model, tiny_recipe, tiny_recipe.phase("head"))
    fit(model, tiny_recipe, tiny_recipe.phase("head"), tiny_data)
    assert changed(before_backbone, snapshot(backbone.layers)) == set()  # BN moving statistics included
    assert changed(before_head, snapshot([model.get_layer("predictions")]))


def test_top_blocks_phase_trains_exactly_those_blocks_with_batch_norm_frozen(tiny_recipe, tiny_data):
    model = finetune.build_model(tiny_recipe)
    backbone = get_backbone(model)
    spec = backbones.get("mobilenet_v2")
    _stem, blocks = split_into_blocks(backbone, spec)
    phase = tiny_recipe.phase("finetune")
    plan = configure(model, tiny_recipe, phase)
    assert plan.trainable_blocks == ("block_15", "block_16")

    top = {id(layer) for block in blocks[-2:] for layer in block.layers}
    for layer in backbone.layers:
        is_bn = isinstance(layer, keras.layers.BatchNormalization)
        assert layer.trainable == (id(layer) in top and not is_bn), layer.name

    frozen_layers = [layer for layer in backbone.layers if id(layer) not in top]
    top_bn = [
        layer for layer in backbone.layers if id(layer) in top and isinstance(layer, keras.layers.BatchNormalization)
    ]
    top_convs = [layer for layer in backbone.layers if id(layer) in top and isinstance(layer, keras.layers.Conv2D)]
    before_frozen, before_bn, before_convs = snapshot(frozen_layers), snapshot(top_bn), snapshot(top_convs)
    compile_phase(model, tiny_recipe, phase)
    fit(model, tiny_recipe, phase, tiny_data)
    assert changed(before_frozen, snapshot(frozen_layers)) == set()
    # BatchNorm inside the unfrozen blocks: gamma, beta and moving statistics all unchanged.
    assert changed(before_bn, snapshot(top_bn)) == set()
    assert len(changed(before_convs, snapshot(top_convs))) == len(before_convs)


def test_all_trains_every_non_batch_norm_layer(tiny_recipe):
    model = finetune.build_model(tiny_recipe)
    phase = tiny_recipe.phase("finetune").model_copy(update={"trainable": "all"})
    plan = configure(model, tiny_recipe, phase)
    assert len(plan.trainable_blocks) == plan.total_blocks == 17
    for layer in get_backbone(model).layers:
        if layer.weights:
            assert layer.trainable == (not isinstance(layer, keras.layers.BatchNormalization)), layer.name


def test_train_bn_lets_batch_norm_learn_and_update_statistics(tiny_recipe_dict, tiny_data):
    tiny_recipe_dict["phases"][1]["train_bn"] = True
    recipe = finetune.load_recipe(tiny_recipe_dict)
    model = finetune.build_model(recipe)
    phase = recipe.phase("finetune")
    configure(model, recipe, phase)
    _, blocks = split_into_blocks(get_backbone(model), backbones.get("mobilenet_v2"))
    top_bn = [
        layer for block in blocks[-2:] for layer in block.layers if isinstance(layer, keras.layers.BatchNormalization)
    ]
    assert all(layer.trainable for layer in top_bn)
    before = snapshot(top_bn)
    compile_phase(model, recipe, phase)
    fit(model, recipe, phase, tiny_data)
    moving = {key for key in changed(before, snapshot(top_bn)) if key[1] in (2, 3)}
    assert len(moving) == 2 * len(top_bn)  # moving mean and variance of every BN layer moved


def test_backbone_runs_in_inference_mode_even_when_trainable(tiny_recipe):
    """With every layer trainable, training=True still gives inference-mode BN outputs."""
    model = finetune.build_model(tiny_recipe)
    configure(model, tiny_recipe, tiny_recipe.phase("finetune").model_copy(update={"trainable": "all"}))
    images = np.random.default_rng(0).integers(0, 256, size=(8, 28, 28, 1)).astype(np.uint8)
    features = keras.Model(model.input, model.get_layer("head_pool").output)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(features(images, training=True)),
        keras.ops.convert_to_numpy(features(images, training=False)),
        rtol=1e-5,
        atol=1e-6,
    )


def test_each_phase_recompiles_with_a_new_optimizer_at_its_own_rate(tiny_recipe, tiny_data):
    model = finetune.build_model(tiny_recipe)
    head, tune = tiny_recipe.phase("head"), tiny_recipe.phase("finetune")
    fit_one_phase(model, tiny_recipe, head, tiny_data)
    first = model.optimizer
    assert int(keras.ops.convert_to_numpy(first.iterations)) > 0

    configure(model, tiny_recipe, tune)
    second = compile_phase(model, tiny_recipe, tune).optimizer
    assert model.optimizer is second and second is not first
    assert isinstance(second, keras.optimizers.SGD) and float(second.momentum) == pytest.approx(0.9)
    assert training.optimizer_learning_rate(second) == pytest.approx(1e-2)
    # The new compile really applies the new trainable flags: the top blocks now change.
    _, blocks = split_into_blocks(get_backbone(model), backbones.get("mobilenet_v2"))
    top_conv = next(layer for layer in blocks[-1].layers if isinstance(layer, keras.layers.Conv2D))
    before = snapshot([top_conv])
    fit(model, tiny_recipe, tune, tiny_data)
    assert changed(before, snapshot([top_conv]))
    assert int(keras.ops.convert_to_numpy(second.iterations)) == int(np.ceil(len(tiny_data.train) / 32))


def test_too_many_top_blocks_fails_before_training(tiny_recipe_dict):
    tiny_recipe_dict["phases"][1]["trainable"] = {"top_blocks": 18}
    recipe = finetune.load_recipe(tiny_recipe_dict)
    model = finetune.build_model(recipe)
    with pytest.raises(RecipeError, match="mobilenet_v2 has 17 blocks"):
        training.check_phases(layout_of(model, recipe), recipe.phases)


def test_mixed_precision_keeps_softmax_in_float32_and_trains(tiny_recipe_dict, tiny_data):
    tiny_recipe_dict["precision"] = "mixed_float16"
    recipe = finetune.load_recipe(tiny_recipe_dict)
    model = finetune.build_model(recipe)
    assert keras.config.dtype_policy().name == "float32"  # the global policy is left alone
    assert get_backbone(model).layers[1].compute_dtype == "float16"
    assert model.get_layer("predictions").compute_dtype == "float32"
    assert model.get_layer("backbone_input").compute_dtype == "float32"
    fit_one_phase(model, recipe, recipe.phase("head"), tiny_data)
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    probabilities = keras.ops.convert_to_numpy(model(tiny_data.test.images[:4]))
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("gpus, expected", [([], "float32"), (["/physical_device:GPU:0"], "mixed_float16")])
def test_auto_precision_is_mixed_float16_only_with_a_gpu(monkeypatch, gpus, expected):
    import tensorflow as tf

    from finetune.model import resolve_precision

    monkeypatch.setattr(tf.config, "list_physical_devices", lambda kind=None: gpus if kind == "GPU" else [])
    assert resolve_precision("auto") == expected
    assert resolve_precision("mixed_bfloat16") == "mixed_bfloat16"  # an explicit setting is kept
    assert resolve_precision("float32") == "float32"


def test_this_machine_without_a_gpu_builds_float32_layers(tiny_recipe_dict):
    """CI has no GPU: a recipe with precision auto builds a float32 model there."""
    import tensorflow as tf

    if tf.config.list_physical_devices("GPU"):
        pytest.skip("this machine has a GPU")
    tiny_recipe_dict["precision"] = "auto"
    model = finetune.build_model(finetune.load_recipe(tiny_recipe_dict))
    assert get_backbone(model).layers[1].compute_dtype == "float32"


def _count_batches_fit(callbacks):
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    batches = []
    counter = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: batches.append(batch))
    x = np.zeros((40, 3), "float32")
    model.fit(x, np.zeros((40, 2), "float32"), batch_size=4, epochs=2, verbose=0, callbacks=[counter, *callbacks])
    return batches


def test_a_ctrl_c_that_python_swallowed_still_stops_the_fit_at_the_next_step():
    import signal
    import time

    from finetune.training.interrupts import InterruptAtStepEnd, ctrl_c_remembered

    assert len(_count_batches_fit([InterruptAtStepEnd()])) == 20  # no key pressed: the fit runs to its end
    before = signal.getsignal(signal.SIGINT)
    with ctrl_c_remembered():
        try:  # what a garbage-collector callback does to a KeyboardInterrupt: prints it and carries on
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        except KeyboardInterrupt:
            pass
        with pytest.raises(KeyboardInterrupt):
            _count_batches_fit([InterruptAtStepEnd()])
    assert signal.getsignal(signal.SIGINT) is before
    assert len(_count_batches_fit([InterruptAtStepEnd()])) == 20  # the press is forgotten with the block


def test_a_ctrl_c_inside_a_gc_callback_is_not_raised_there_but_stops_the_fit(monkeypatch):
    import gc
    import signal
    import sys

    swallowed = []  # where Python sends an exception raised in a gc callback: "Exception ignored in"
    monkeypatch.setattr(sys, "unraisablehook", swallowed.append)

    from finetune.training.interrupts import InterruptAtStepEnd, ctrl_c_remembered

    def press_key_during_collection(phase, info):
        if phase == "start":
            signal.raise_signal(signal.SIGINT)  # the handler runs in this frame: a gc callback's

    with ctrl_c_remembered():
        gc.callbacks.append(press_key_during_collection)
        try:
            gc.collect()
        finally:
            gc.callbacks.remove(press_key_during_collection)
        with pytest.raises(KeyboardInterrupt):
            _count_batches_fit([InterruptAtStepEnd()])
    assert swallowed == []


# --- BatchNorm statistics recomputed after a phase ------------------------------------------------------------


def _batch_norm_net():
    inputs = keras.Input((8,))
    hidden = keras.layers.BatchNormalization(name="bn1")(keras.layers.Dense(16, name="dense1")(inputs))
    hidden = keras.layers.BatchNormalization(name="bn2")(keras.layers.Dense(4, name="dense2")(hidden))
    frozen = keras.layers.BatchNormalization(name="frozen")
    model = keras.Model(inputs, frozen(hidden))
    frozen.trainable = False
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):  # statistics that match nothing
            layer.moving_mean.assign(np.full(layer.moving_mean.shape, 5.0, "float32"))
            layer.moving_variance.assign(np.full(layer.moving_variance.shape, 100.0, "float32"))
    return model


def test_recalibrated_batch_norm_averages_the_batch_statistics_and_skips_frozen_layers():
    from finetune.training.batch_norm import recalibrate_batch_norm

    model = _batch_norm_net()
    images = np.random.default_rng(0).normal(3.0, 2.0, size=(256, 8)).astype("float32")
    used = recalibrate_batch_norm(model, images, batch_size=64, max_images=256)
    assert used == 256
    bn1_inputs = keras.ops.convert_to_numpy(model.get_layer("dense1")(images))  # bn1's input needs no BN
    batch_means = [bn1_inputs[start : start + 64].mean(axis=0) for start in range(0, 256, 64)]
    np.testing.assert_allclose(model.get_layer("bn1").moving_mean, np.mean(batch_means, axis=0), rtol=1e-4, atol=1e-4)
    np.testing.assert_array_equal(model.get_layer("frozen").moving_mean, np.full(4, 5.0))
    assert model.get_layer("bn1").momentum == 0.99  # restored


def test_recalibrated_on_one_batch_inference_computes_what_training_mode_computes():
    from finetune.training.batch_norm import recalibrate_batch_norm

    model = _batch_norm_net()
    model.get_layer("frozen").trainable = True
    images = np.random.default_rng(1).normal(3.0, 2.0, size=(128, 8)).astype("float32")
    training = keras.ops.convert_to_numpy(model(images, training=True))
    assert np.abs(keras.ops.convert_to_numpy(model(images)) - training).max() > 0.5  # before: far apart
    recalibrate_batch_norm(model, images, batch_size=128, max_images=128)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(images)), training, atol=2e-3)


@pytest.mark.slow  # an end-to-end run: moved out of the fast suite (kept under 10 minutes)
def test_a_phase_that_trains_batch_norm_saves_recalibrated_statistics(tmp_path, tiny_recipe_dict):
    from finetune.data import load_dataset
    from finetune.plan import resolve
    from finetune.training.batch_norm import recalibrate_batch_norm, trainable_batch_norm

    tiny_recipe_dict["phases"] = [{**tiny_recipe_dict["phases"][1], "train_bn": True, "trainable": "all"}]
    recipe = finetune.load_recipe(tiny_recipe_dict)
    lines = []
    finetune.run(recipe, out=tmp_path / "run", log=lines.append)
    assert any("BatchNorm statistics recomputed on 160 training images" in line for line in lines)
    saved = finetune.load_model(tmp_path / "run", compile=False)
    configure(saved, recipe, recipe.phases[0])
    before = [np.array(layer.moving_variance) for layer in trainable_batch_norm(saved)]
    assert len(before) > 10
    # Recomputed again from the saved weights on the same images: nothing moves, so the run saved them.
    recalibrate_batch_norm(saved, load_dataset(resolve(recipe).data, 0).train.images, batch_size=32, seed=0)
    after = [np.array(layer.moving_variance) for layer in trainable_batch_norm(saved)]
    for old, new in zip(before, after, strict=True):
        np.testing.assert_allclose(old, new, rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TensorBoard's summaries are TensorFlow's")
def test_epoch_tensorboard_writes_each_epoch_and_calls_no_summary_per_batch(tmp_path):
    """Keras's own hook calls ``tf.summary.scalar`` for every log of every batch even at update_freq="epoch"."""
    import tensorflow.summary as summary  # the module Keras's callback writes through
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from finetune.training.train import EpochTensorBoard

    calls: list[str] = []

    class CountingSummary:
        def __getattr__(self, name):
            if name != "scalar":
                return getattr(summary, name)
            return lambda tag, *args, **kwargs: calls.append(tag) or summary.scalar(tag, *args, **kwargs)

    board = EpochTensorBoard(log_dir=str(tmp_path), write_graph=False)
    board._summary_module = CountingSummary()  # Keras's callback looks its summary module up here
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    x, y = np.random.default_rng(0).normal(size=(160, 4)).astype("float32"), np.arange(160) % 3
    model.fit(x, y, batch_size=8, epochs=2, verbose=0, callbacks=[board])
    assert calls and all(name.startswith("epoch_") for name in calls)  # 20 batches x 2 epochs: none per batch
    assert len(calls) <= 2 * 4  # loss, accuracy, learning rate (and steps/s) per epoch
    events = EventAccumulator(str(tmp_path / "train"))
    events.Reload()
    assert [event.step for event in events.Tensors("epoch_loss")] == [0, 1]
