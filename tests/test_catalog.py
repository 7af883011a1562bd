"""The chapter-11 catalog: each technique proved by its effect."""

import json
import math
from importlib import metadata

import keras
import numpy as np
import pytest
from conftest import compile_phase, configure, fit

import finetune
from finetune import backbones
from finetune.backbones.blocks import get_backbone, split_into_blocks
from finetune.catalog import callbacks, optimizers, regularizers, schedules
from finetune.catalog import layers as dense
from finetune.errors import RecipeError
from finetune.evaluation import metrics as evaluation
from finetune.training import phases as training


def to_numpy(value):
    return keras.ops.convert_to_numpy(value)


def one_step(optimizer, inputs=None, kernel=None, bias=False, constraint=None, regularizer=None):
    """One SGD-style step of a single Dense layer; returns (before, after) kernels."""
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(16, 8)).astype("float32") * 50 if inputs is None else inputs
    targets = rng.normal(size=(16, 4)).astype("float32")
    layer = keras.layers.Dense(4, use_bias=bias, kernel_constraint=constraint, kernel_regularizer=regularizer)
    model = keras.Sequential([keras.Input((inputs.shape[1],)), layer])
    if kernel is not None:
        layer.kernel.assign(kernel)
    model.compile(optimizer=optimizer, loss="mse")
    before = to_numpy(layer.kernel).copy()
    model.fit(inputs, targets, batch_size=len(inputs), epochs=1, verbose=0, shuffle=False)
    return before, to_numpy(layer.kernel)


# --- gradient clipping ----------------------------------------------------


def test_clipnorm_bounds_the_update_norm():
    before, after = one_step(optimizers.get({"name": "sgd", "learning_rate": 1.0}))
    assert np.linalg.norm(after - before) > 10  # the unclipped step is large
    before, after = one_step(optimizers.get({"name": "sgd", "learning_rate": 1.0, "clipnorm": 1.0}))
    assert np.linalg.norm(after - before) == pytest.approx(1.0, rel=1e-4)


def test_global_clipnorm_bounds_all_variables_together():
    before, after = one_step(optimizers.get({"name": "sgd", "learning_rate": 1.0, "global_clipnorm": 0.5}))
    assert np.linalg.norm(after - before) <= 0.5 + 1e-5


def test_clipvalue_bounds_each_component():
    before, after = one_step(optimizers.get({"name": "sgd", "learning_rate": 1.0}))
    assert np.abs(after - before).max() > 1.0
    before, after = one_step(optimizers.get({"name": "sgd", "learning_rate": 1.0, "clipvalue": 0.25}))
    step = np.abs(after - before)
    assert step.max() == pytest.approx(0.25, rel=1e-5) and (step <= 0.25 + 1e-6).all()


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "nadam", "adamw"])
def test_every_optimizer_takes_the_clipping_arguments(name):
    for setting in ("clipnorm", "clipvalue", "global_clipnorm"):
        optimizer = optimizers.get({"name": name, "learning_rate": 0.01, setting: 0.5})
        assert getattr(optimizer, setting) == 0.5


def test_momentum_and_nesterov_names():
    assert float(optimizers.get("momentum").momentum) == 0.9 and not optimizers.get("momentum").nesterov
    assert optimizers.get("nesterov").nesterov


# --- schedules ------------------------------------------------------------


def values(schedule, steps):
    return [float(to_numpy(schedule(step))) for step in steps]


def context(lr0=0.1, steps_per_epoch=10, epochs=10):
    return schedules.ScheduleContext(lr0, steps_per_epoch, epochs)


def test_power_schedule_formula():
    built = schedules.build_schedule({"name": "power", "s": 20, "c": 2}, context(0.1))
    steps = [0, 1, 20, 100, 1000]
    np.testing.assert_allclose(values(built.learning_rate, steps), [0.1 / (1 + t / 20) ** 2 for t in steps], rtol=1e-5)


def test_exponential_schedule_formula_in_epochs():
    built = schedules.build_schedule({"name": "exponential", "s": 2, "unit": "epoch"}, context(0.01, 10))
    steps = [0, 5, 20, 40, 55]  # s = 2 epochs = 20 steps
    np.testing.assert_allclose(values(built.learning_rate, steps), [0.01 * 0.1 ** (t / 20) for t in steps], rtol=1e-5)


def test_piecewise_constant_schedule_in_epochs():
    built = schedules.build_schedule(
        {"name": "piecewise_constant", "boundaries": [5, 15], "values": [0.01, 0.005, 0.001], "unit": "epoch"},
        context(0.01, steps_per_epoch=10),
    )
    assert values(built.learning_rate, [0, 49, 51, 149, 151, 1000]) == pytest.approx(
        [0.01, 0.01, 0.005, 0.005, 0.001, 0.001]
    )


def test_piecewise_constant_needs_one_more_value_than_boundaries():
    with pytest.raises(RecipeError, match="one more value"):
        schedules.build_schedule({"name": "piecewise_constant", "boundaries": [5], "values": [0.1]}, context())


def test_one_cycle_peak_and_end():
    built = schedules.build_schedule({"name": "one_cycle"}, context(0.1, steps_per_epoch=10, epochs=10))
    cycle = built.learning_rate
    total = 100
    half = (total - (total // 10 + 1)) // 2  # 44, as the chapter's notebook computes it
    assert cycle.half == half
    lr = values(cycle, [0, half // 2, half, 2 * half, total])
    assert lr[0] == pytest.approx(0.01)  # lr0 / 10
    assert lr[1] == pytest.approx(0.01 + 0.09 / 2, rel=1e-4)
    assert lr[2] == pytest.approx(0.1)  # the peak, halfway
    assert lr[3] == pytest.approx(0.01)  # back down
    assert lr[4] == pytest.approx(0.01 / 1000, rel=1e-3)  # annealed (float32 arithmetic)
    assert max(values(cycle, range(total + 1))) == pytest.approx(0.1)


def test_cosine_schedule_with_warmup():
    built = schedules.build_schedule(
        {"name": "cosine", "warmup": 1, "unit": "epoch", "alpha": 0.1}, context(0.1, steps_per_epoch=10, epochs=5)
    )
    lr = values(built.learning_rate, [0, 5, 10, 30, 50])
    assert lr[0] == pytest.approx(0.0, abs=1e-7) and lr[1] == pytest.approx(0.05, rel=1e-4)
    assert lr[2] == pytest.approx(0.1, rel=1e-4)
    assert lr[3] == pytest.approx(0.01 + 0.09 * 0.5 * (1 + math.cos(math.pi * 20 / 40)), rel=1e-4)
    assert lr[4] == pytest.approx(0.01, rel=1e-4)


def test_cosine_warmup_has_a_floor_in_steps_capped_at_half_the_phase():
    """On 3 steps per epoch a 0.2-epoch warm-up is 1 step; min_warmup_steps: 10 makes it 10 (of 30)."""
    built = schedules.build_schedule(
        {"name": "cosine", "warmup": 0.2, "unit": "epoch", "min_warmup_steps": 10}, context(0.1, 3, 10)
    )
    lr = values(built.learning_rate, [0, 5, 10, 20, 30])
    assert lr[0] == pytest.approx(0.0, abs=1e-7) and lr[1] == pytest.approx(0.05, rel=1e-4)
    assert lr[2] == pytest.approx(0.1, rel=1e-4)
    assert lr[3] == pytest.approx(0.05 * (1 + math.cos(math.pi * 10 / 20)), rel=1e-4)
    assert lr[4] == pytest.approx(0.0, abs=1e-6)
    capped = schedules.build_schedule(
        {"name": "cosine", "warmup": 0.2, "unit": "epoch", "min_warmup_steps": 100}, context(0.1, 3, 10)
    )
    assert values(capped.learning_rate, [15])[0] == pytest.approx(0.1, rel=1e-4)  # the peak at half of 30
    full = schedules.build_schedule(
        {"name": "cosine", "warmup": 0.2, "unit": "epoch", "min_warmup_steps": 10}, context(0.1, 400, 3)
    )
    assert values(full.learning_rate, [80])[0] == pytest.approx(0.1, rel=1e-4)  # 0.2 epoch = 80 steps > the floor


def test_performance_schedule_halves_the_rate_after_patience():
    built = schedules.build_schedule({"name": "performance", "factor": 0.5, "patience": 2}, context(0.1))
    (plateau,) = built.callbacks
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer=optimizers.get({"name": "sgd", "learning_rate": built.learning_rate}), loss="mse")
    plateau.set_model(model)
    plateau.on_train_begin()
    for epoch in range(4):
        plateau.on_epoch_end(epoch, {"val_loss": 1.0})
    assert training.optimizer_learning_rate(model.optimizer) == pytest.approx(0.05)


@pytest.fixture
def mlp_recipe_dict():
    return {
        "name": "mlp",
        "seed": 0,
        "precision": "float32",
        "data": {
            "source": "fashion_mnist",
            "image_size": 28,
            "validation_split": 0.2,
            "train_limit": 320,
            "test_limit": 100,
        },
        "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [32, 16]}}, "head": {}},
        "training": {"batch_size": 32, "verbose": 0},
        "phases": [
            {"name": "train", "epochs": 1, "trainable": "all", "optimizer": {"name": "sgd", "learning_rate": 0.05}}
        ],
    }


@pytest.fixture
def mlp_data(mlp_recipe_dict):
    from finetune import data

    recipe = finetune.load_recipe(mlp_recipe_dict)
    return data.load_dataset(recipe.data, 0)


def compile_and_fit(recipe, dataset, epochs=None):
    model = finetune.build_model(recipe)
    phase = recipe.phases[0]
    if epochs is not None:
        phase = phase.model_copy(update={"epochs": epochs})
    configure(model, recipe, phase)
    setup = compile_phase(model, recipe, phase, training.steps_per_epoch(phase, recipe.training, len(dataset.train)))
    fit(model, recipe, phase, dataset, callbacks=setup.callbacks)
    return model, setup


def test_a_schedule_really_drives_the_optimizer(mlp_recipe_dict, mlp_data):
    mlp_recipe_dict["phases"][0]["schedule"] = {"name": "exponential", "s": 1, "unit": "epoch"}
    recipe = finetune.load_recipe(mlp_recipe_dict)
    _model, setup = compile_and_fit(recipe, mlp_data, epochs=2)
    steps = int(to_numpy(setup.optimizer.iterations))
    assert steps == 16  # 256 training images, batch 32, 2 epochs
    assert training.optimizer_learning_rate(setup.optimizer) == pytest.approx(0.05 * 0.1 ** (steps / 8), rel=1e-5)


def test_one_cycle_moves_momentum_against_the_rate_during_fit(mlp_recipe_dict, mlp_data, tmp_path):
    mlp_recipe_dict["phases"][0].update(
        schedule={"name": "one_cycle"}, optimizer={"name": "sgd", "learning_rate": 0.1, "momentum": 0.9}
    )
    recipe = finetune.load_recipe(mlp_recipe_dict)
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(float(to_numpy(self.model.optimizer.momentum)))

    model = finetune.build_model(recipe)
    phase = recipe.phases[0].model_copy(update={"epochs": 4})
    configure(model, recipe, phase)
    setup = compile_phase(model, recipe, phase, 8)
    fit(model, recipe, phase, mlp_data, callbacks=[*setup.callbacks, Record()])
    cycle = schedules.OneCycle(0.1, total_steps=32, start=0.01, end=1e-5)  # 8 steps x 4 epochs
    assert seen[0] == pytest.approx(0.95) and min(seen) == pytest.approx(0.85, abs=0.01)
    assert seen[cycle.half] == pytest.approx(0.85, abs=1e-6) and seen[-1] == pytest.approx(0.95)
    # The checkpoint of such a model loads again (momentum saved as a number).
    model.save(tmp_path / "m.keras")
    reloaded = keras.saving.load_model(tmp_path / "m.keras")
    assert isinstance(reloaded.optimizer.momentum, float)


def test_performance_and_a_step_schedule_cannot_both_own_the_rate(mlp_recipe_dict):
    mlp_recipe_dict["phases"][0]["schedule"] = {"name": "exponential", "s": 10}
    mlp_recipe_dict["phases"][0]["callbacks"] = [{"name": "reduce_lr_on_plateau", "patience": 3}]
    with pytest.raises(RecipeError, match="both own the learning rate"):
        finetune.load_recipe(mlp_recipe_dict)


def test_book_decay_becomes_the_power_schedule_with_a_notice(mlp_recipe_dict):
    mlp_recipe_dict["phases"][0]["optimizer"] = {"name": "sgd", "learning_rate": 0.2, "momentum": 0.9, "decay": 0.01}
    recipe = finetune.load_recipe(mlp_recipe_dict)
    assert recipe.phases[0].schedule == {"name": "power", "s": 100.0, "c": 1.0}
    assert "decay" not in recipe.phases[0].optimizer.as_identifier()
    assert any("decay=0.01" in notice and "power" in notice for notice in recipe.notices)
    built = schedules.build_schedule(recipe.phases[0].schedule, context(0.2))
    assert values(built.learning_rate, [0, 50, 300]) == pytest.approx([0.2 / (1 + 0.01 * t) for t in [0, 50, 300]])


def test_decay_together_with_a_schedule_is_refused(mlp_recipe_dict):
    mlp_recipe_dict["phases"][0]["optimizer"]["decay"] = 0.01
    mlp_recipe_dict["phases"][0]["schedule"] = "performance"
    with pytest.raises(RecipeError, match="decay and schedule"):
        finetune.load_recipe(mlp_recipe_dict)


# --- regularizers ---------------------------------------------------------


def test_max_norm_keeps_every_incoming_weight_vector_under_the_limit():
    constraint = regularizers.regularizers.lookup("max_norm").build(max_value=1.0)
    kernel = np.full((8, 4), 0.01, dtype="float32")
    _before, after = one_step(
        optimizers.get({"name": "sgd", "learning_rate": 1.0}), kernel=kernel, constraint=constraint
    )
    norms = np.linalg.norm(after, axis=0)  # each unit's incoming weights
    assert norms.max() <= 1.0 + 1e-5 and norms.max() == pytest.approx(1.0, rel=1e-4)
    _, unconstrained = one_step(optimizers.get({"name": "sgd", "learning_rate": 1.0}), kernel=kernel)
    assert np.linalg.norm(unconstrained, axis=0).max() > 1.0


@pytest.mark.parametrize(
    "spec, penalty",
    [
        ({"name": "l2", "l2": 0.01}, lambda w: 0.01 * np.sum(w**2)),
        ({"name": "l1", "l1": 0.003}, lambda w: 0.003 * np.sum(np.abs(w))),
        ({"name": "l1_l2", "l1": 0.003, "l2": 0.01}, lambda w: 0.003 * np.sum(np.abs(w)) + 0.01 * np.sum(w**2)),
    ],
)
def test_weight_penalties_add_exactly_their_formula_to_the_loss(spec, penalty):
    regularizer = regularizers.regularizers.lookup(spec["name"]).build(**{k: v for k, v in spec.items() if k != "name"})
    layer = keras.layers.Dense(3, kernel_regularizer=regularizer, kernel_initializer="he_normal")
    model = keras.Sequential([keras.Input((5,)), layer])
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(10, 5)).astype("float32"), rng.normal(size=(10, 3)).astype("float32")
    data_loss = float(np.mean((to_numpy(model(x)) - y) ** 2))
    total = model.evaluate(x, y, verbose=0)
    assert total - data_loss == pytest.approx(penalty(to_numpy(layer.kernel)), rel=1e-4)


def test_dropout_is_active_only_in_training_and_mc_dropout_also_at_inference():
    x = np.ones((4, 1000), dtype="float32")
    plain = regularizers.regularizers.lookup("dropout").build(rate=0.5)
    mc = regularizers.regularizers.lookup("mc_dropout").build(rate=0.5)
    np.testing.assert_array_equal(to_numpy(plain(x, training=False)), x)
    dropped = to_numpy(plain(x, training=True))
    assert 0.3 < np.mean(dropped == 0) < 0.7 and np.allclose(dropped[dropped != 0], 2.0)
    first, second = to_numpy(mc(x, training=False)), to_numpy(mc(x))
    assert 0.3 < np.mean(first == 0) < 0.7 and not np.array_equal(first, second)


def test_alpha_dropout_keeps_selu_statistics():
    x = np.random.default_rng(0).normal(size=(200, 500)).astype("float32")
    layer = regularizers.regularizers.lookup("alpha_dropout").build(rate=0.2)
    out = to_numpy(layer(x, training=True))
    assert abs(out.mean()) < 0.05 and abs(out.std() - 1.0) < 0.05


def test_one_regularizer_per_slot(mlp_recipe_dict):
    mlp_recipe_dict["model"]["head"] = {"regularizers": ["l1", "l2"]}
    with pytest.raises(RecipeError, match="one kernel_regularizer at a time"):
        finetune.load_recipe(mlp_recipe_dict)


def test_regularizers_are_attached_when_the_layers_are_built(mlp_recipe_dict):
    mlp_recipe_dict["model"]["backbone"]["options"]["regularizers"] = [{"name": "l2", "l2": 0.5}]
    recipe = finetune.load_recipe(mlp_recipe_dict)
    model = finetune.build_model(recipe)
    images = np.zeros((2, 28, 28, 1), dtype="uint8")
    model(images)
    kernels = [layer.kernel for layer in get_backbone(model).layers if isinstance(layer, keras.layers.Dense)]
    expected = sum(0.5 * float(np.sum(to_numpy(kernel) ** 2)) for kernel in kernels)
    assert sum(float(to_numpy(loss)) for loss in model.losses) == pytest.approx(expected, rel=1e-5)


# --- dense stacks: batch norm placement, activations, initializers --------


def test_batch_norm_before_and_after_the_activation(mlp_recipe_dict):
    orders = {}
    for placement in ("before", "after"):
        mlp_recipe_dict["model"]["backbone"]["options"] = {
            "dense": [8],
            "batch_norm": placement,
            "activation": "elu",
            "input_batch_norm": True,
            "dropout": 0.1,
        }
        recipe = finetune.load_recipe(mlp_recipe_dict)
        backbone = get_backbone(finetune.build_model(recipe))
        orders[placement] = [type(layer).__name__ for layer in backbone.layers[1:]]
        dense_layer = backbone.get_layer("block1_dense")
        assert dense_layer.use_bias == (placement == "after")  # BN's beta replaces the bias
        stem, blocks = split_into_blocks(backbone, backbones.get("mlp"))
        assert [layer.name for layer in stem] == ["flatten", "input_bn"]
        assert next(layer.name for layer in blocks[0].layers) == "block1_dropout"
    assert orders["before"] == ["Flatten", "BatchNormalization", "Dropout", "Dense", "BatchNormalization", "Activation"]
    assert orders["after"] == ["Flatten", "BatchNormalization", "Dropout", "Dense", "Activation", "BatchNormalization"]


@pytest.mark.parametrize("slope", [0.2, 0.01])
def test_leaky_relu_slope(slope):
    layer = dense.new_activation({"name": "leaky_relu", "negative_slope": slope}, "act")
    out = to_numpy(layer(np.array([[-10.0, -1.0, 0.0, 3.0]], dtype="float32")))
    np.testing.assert_allclose(out, [[-10 * slope, -slope, 0.0, 3.0]], rtol=1e-6)


@pytest.mark.parametrize("name", ["relu", "elu", "selu", "gelu", "swish"])
def test_named_activations_compute_keras_functions(name):
    x = np.linspace(-3, 3, 13, dtype="float32")[None]
    out = to_numpy(dense.new_activation(name, "act")(x))
    np.testing.assert_allclose(out, to_numpy(keras.activations.get(name)(x)), rtol=1e-6)


@pytest.mark.parametrize(
    "name, variance",
    [
        ("glorot_uniform", lambda fan_in, fan_out: 2 / (fan_in + fan_out)),
        ("glorot_normal", lambda fan_in, fan_out: 2 / (fan_in + fan_out)),
        ("he_normal", lambda fan_in, fan_out: 2 / fan_in),
        ("he_uniform", lambda fan_in, fan_out: 2 / fan_in),
        ("lecun_normal", lambda fan_in, fan_out: 1 / fan_in),
        ("lecun_uniform", lambda fan_in, fan_out: 1 / fan_in),
    ],
)
def test_initializer_variance_matches_its_formula(name, variance):
    fan_in, fan_out = 400, 600
    weights = to_numpy(dense.new_initializer(name)((fan_in, fan_out)))
    # 240,000 samples: the sample variance is within about 0.5 % of the true one.
    assert weights.var() == pytest.approx(variance(fan_in, fan_out), rel=0.02)
    assert abs(weights.mean()) < 0.01 * math.sqrt(variance(fan_in, fan_out))


# --- SELU's conditions ----------------------------------------------------


def selu_recipe(mlp_recipe_dict, **changes):
    options = {
        "dense": [16, 16],
        "activation": "selu",
        "kernel_initializer": "lecun_normal",
        "input_scaling": "standardize",
        **changes,
    }
    mlp_recipe_dict["model"]["backbone"]["options"] = options
    return finetune.load_recipe(mlp_recipe_dict)


def test_a_proper_selu_stack_gets_no_warning(mlp_recipe_dict):
    assert selu_recipe(mlp_recipe_dict).notices == []


@pytest.mark.parametrize(
    "changes, expected",
    [
        ({"kernel_initializer": "he_normal"}, "not lecun_normal"),
        ({"input_scaling": "unit"}, "not standardized"),
        ({"batch_norm": "after"}, "batch norm"),
        ({"dropout": 0.1}, "dropout is used, not alpha_dropout"),
        ({"regularizers": ["l2"]}, "l1/l2 or max_norm"),
    ],
)
def test_selu_conditions_that_break_self_normalization_are_named(mlp_recipe_dict, changes, expected):
    notices = selu_recipe(mlp_recipe_dict, **changes).notices
    assert len(notices) == 1 and expected in notices[0] and "selu will not self-normalize" in notices[0]


def test_selu_head_on_a_conv_backbone_is_not_a_plain_stack(tiny_recipe_dict):
    tiny_recipe_dict["model"]["head"] = {"dense": [16], "activation": "selu", "kernel_initializer": "lecun_normal"}
    notices = finetune.load_recipe(tiny_recipe_dict).notices
    assert any("not a plain dense stack" in notice for notice in notices)


def test_standardize_scales_inputs_to_zero_mean_unit_variance(mlp_recipe_dict, mlp_data):
    recipe = selu_recipe(mlp_recipe_dict)
    model = finetune.build_model(recipe)
    layer = model.get_layer("backbone_input")
    layer.adapt(mlp_data.train.images)
    out = to_numpy(layer(mlp_data.train.images))
    assert abs(out.mean()) < 1e-4 and out.std() == pytest.approx(1.0, rel=1e-4)


# --- discriminative learning rates ----------------------------------------


# Large rates, so that a hundredth of the step still dwarfs float32 rounding of the weights.
@pytest.mark.parametrize("optimizer", [{"name": "sgd", "learning_rate": 10.0}, {"name": "adam", "learning_rate": 1.0}])
def test_backbone_lr_multiplier_scales_only_the_backbone_update(mlp_recipe_dict, mlp_data, optimizer, tmp_path):
    mlp_recipe_dict["phases"][0]["optimizer"] = optimizer
    mlp_recipe_dict["training"]["batch_size"] = 256  # one step per epoch
    steps = {}
    for multiplier in (1.0, 0.01):
        mlp_recipe_dict["phases"][0]["backbone_lr_multiplier"] = multiplier
        recipe = finetune.load_recipe(mlp_recipe_dict)
        keras.utils.set_random_seed(0)
        model = finetune.build_model(recipe)
        backbone_layer = get_backbone(model).get_layer("block1_dense")
        head_layer = model.get_layer("predictions")
        before = [to_numpy(backbone_layer.kernel).copy(), to_numpy(head_layer.kernel).copy()]
        phase = recipe.phases[0]
        configure(model, recipe, phase)
        setup = compile_phase(model, recipe, phase, 1)
        fit(model, recipe, phase, mlp_data)
        steps[multiplier] = [to_numpy(backbone_layer.kernel) - before[0], to_numpy(head_layer.kernel) - before[1]]
        if multiplier != 1.0:
            model.save(tmp_path / "discriminative.keras")
            reloaded = keras.saving.load_model(tmp_path / "discriminative.keras")
            assert set(reloaded.optimizer.lr_multipliers.values()) == {0.01}
            assert int(to_numpy(setup.optimizer.iterations)) == 1
    scale = np.abs(steps[1.0][0]).max()
    np.testing.assert_allclose(steps[0.01][0], 0.01 * steps[1.0][0], rtol=1e-2, atol=1e-4 * scale)
    np.testing.assert_allclose(steps[0.01][1], steps[1.0][1], rtol=1e-3, atol=1e-6)
    assert np.abs(steps[1.0][0]).max() > 0


# --- MC dropout evaluation ------------------------------------------------


def test_mc_samples_need_an_mc_dropout_layer(mlp_recipe_dict):
    mlp_recipe_dict["evaluation"] = {"mc_samples": 10}
    with pytest.raises(RecipeError, match="mc_dropout"):
        finetune.load_recipe(mlp_recipe_dict)


def test_mc_dropout_evaluation_averages_stochastic_passes(mlp_recipe_dict, mlp_data):
    mlp_recipe_dict["model"]["backbone"]["options"]["dropout"] = {"name": "mc_dropout", "rate": 0.3}
    mlp_recipe_dict["evaluation"] = {"mc_samples": 8}
    recipe = finetune.load_recipe(mlp_recipe_dict)
    model, _ = compile_and_fit(recipe, mlp_data)
    first = model.predict(mlp_data.test.images, verbose=0)
    assert not np.allclose(first, model.predict(mlp_data.test.images, verbose=0))  # stochastic at inference
    metrics = evaluation.evaluate(model, mlp_data.test, ["c"] * 10, 64, mc_samples=8)
    mc = metrics["mc_dropout"]
    assert mc["samples"] == 8 and mc["mean_std_of_predicted_class"] > 0
    assert 0 < mc["mean_predictive_entropy"] <= math.log(10)


# --- registries and plugins -----------------------------------------------


def test_plugins_json_lists_every_kind_and_the_required_names():
    from click.testing import CliRunner

    from finetune.cli import main

    result = CliRunner().invoke(main, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    listed = json.loads(result.output)
    assert list(listed) == [
        "optimizers",
        "schedules",
        "regularizers",
        "initializers",
        "activations",
        "backbones",
        "callbacks",
        "datasets",
        "augmentations",
        "mixers",
    ]
    required = {
        "optimizers": {"sgd", "momentum", "nesterov", "adagrad", "rmsprop", "adam", "nadam", "adamw"},
        "schedules": {"power", "exponential", "piecewise_constant", "performance", "one_cycle", "cosine"},
        "regularizers": {"l1", "l2", "l1_l2", "dropout", "alpha_dropout", "mc_dropout", "max_norm"},
        "initializers": {"glorot_uniform", "glorot_normal", "he_normal", "he_uniform", "lecun_normal"},
        "activations": {"relu", "leaky_relu", "elu", "selu", "gelu", "swish"},
        "backbones": {"xception", "mobilenet_v2", "mlp"},
        "callbacks": {"early_stopping", "model_checkpoint", "tensorboard", "csv_logger"},
        "augmentations": {"random_translation", "random_flip", "random_zoom", "random_rotation", "random_erasing"},
        "datasets": {"fashion_mnist"},
        "mixers": {"mixup", "cutmix"},
    }
    for kind, names in required.items():
        assert names <= set(listed[kind]), kind


def test_an_entry_point_plugin_is_found_and_built(monkeypatch, mlp_recipe_dict):
    from finetune import registry as registry_module

    fake = metadata.EntryPoint(name="fake_sgd", value="fake_plugin:build_fake_sgd", group="finetune.optimizers")
    real_entry_points = metadata.entry_points

    def entry_points(**kwargs):
        if kwargs.get("group") == "finetune.optimizers":
            return [fake]
        return real_entry_points(**kwargs)

    monkeypatch.setattr(registry_module.metadata, "entry_points", entry_points)
    registry = optimizers.optimizers
    monkeypatch.setattr(registry, "_entries", dict(registry._entries))
    monkeypatch.setattr(registry, "_entry_points_loaded", False)
    assert "fake_sgd" in registry.names()
    built = optimizers.get({"name": "fake_sgd", "learning_rate": 0.3})
    assert isinstance(built, keras.optimizers.SGD) and float(to_numpy(built.learning_rate)) == pytest.approx(0.3)
    mlp_recipe_dict["phases"][0]["optimizer"] = {"name": "fake_sgd", "learning_rate": 0.3}
    assert finetune.load_recipe(mlp_recipe_dict).phases[0].optimizer.name == "fake_sgd"


def test_unknown_names_list_what_exists():
    with pytest.raises(RecipeError) as caught:
        schedules.build_schedule({"name": "onecycle"}, context())
    assert "did you mean 'one_cycle'" in str(caught.value) and "exponential" in str(caught.value)


def test_callbacks_write_inside_the_run_folder(tmp_path):
    built = callbacks.build_callbacks(
        ["early_stopping", {"name": "model_checkpoint", "monitor": "val_accuracy"}, "csv_logger"], tmp_path, "head"
    )
    assert isinstance(built[0], keras.callbacks.EarlyStopping) and built[0].restore_best_weights
    assert built[1].filepath == str(tmp_path / "best_head.keras")
    assert built[2].filename == str(tmp_path / "keras_log_head.csv")


# --- callbacks that end a phase early ---------------------------------------


def run_phase(mlp_recipe_dict, tmp_path, name, **phase):
    mlp_recipe_dict["export"] = {"saved_model": False}
    mlp_recipe_dict["phases"][0].update(phase)
    result = finetune.run(finetune.load_recipe(mlp_recipe_dict), out=tmp_path / name, log=lambda line: None)
    return result, [row for row in result.history if row["phase"] == "train"]


def test_early_stopping_ends_the_phase_and_restores_the_best_weights(mlp_recipe_dict, tmp_path):
    # In "max" mode a falling training loss never improves: the phase stops after its second epoch.
    stopping = {"name": "early_stopping", "monitor": "loss", "mode": "max", "patience": 0}
    stopped, rows = run_phase(mlp_recipe_dict, tmp_path, "stopped", epochs=10, callbacks=[stopping])
    assert len(rows) == 2 and float(rows[1]["loss"]) < float(rows[0]["loss"])
    assert stopped.metrics["test"]["examples"] == 100  # the run goes on to evaluate the restored model
    keras.backend.clear_session()
    one_epoch, _ = run_phase(mlp_recipe_dict, tmp_path, "one", epochs=1, callbacks=[])
    for restored, first in zip(stopped.model.weights, one_epoch.model.weights, strict=True):
        np.testing.assert_allclose(to_numpy(restored), to_numpy(first), rtol=1e-5, atol=1e-6)


def test_a_loss_that_explodes_stops_the_run_at_the_first_nan_step_with_or_without_terminate_on_nan(
    mlp_recipe_dict, tmp_path
):
    from finetune.errors import TrainingDiverged

    exploding = {"name": "sgd", "learning_rate": 1.0e12}
    for name, listed in (("guarded", ["terminate_on_nan"]), ("unguarded", [])):
        keras.backend.clear_session()
        with pytest.raises(TrainingDiverged, match=r"loss became (nan|inf) in phase train, epoch 1, step \d+"):
            run_phase(mlp_recipe_dict, tmp_path, name, epochs=5, optimizer=exploding, callbacks=listed)
        assert not (tmp_path / name / "history.csv").exists()  # not even one epoch of NaN weights
