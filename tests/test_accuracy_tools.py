"""What buys accuracy: augmentation, mixup/CutMix, a cut backbone, label smoothing, AdamW, EMA, TTA, gradual unfreezing.

Each test checks an effect (what the model computes, what the optimizer
does to a weight), not that a setting was stored.
"""

import copy

import keras
import numpy as np
import pytest
from conftest import TINY_RECIPE, logged_lines

import finetune
from finetune.errors import RecipeError
from finetune.model import assemble, layout
from finetune.plan import resolve
from finetune.recipe import read_recipe


def _plan(raw):
    return resolve(read_recipe(raw)).model


def _raw(**model):
    raw = copy.deepcopy(TINY_RECIPE)
    raw["model"].update(model)
    return raw


def _mobilenet(weights=None, **settings):
    """The tiny recipe's backbone section, with its weights file and extra settings (cut_at, ...)."""
    return {
        "name": "mobilenet_v2",
        "weights": None if weights is None else str(weights),
        "options": {"alpha": 0.35},
        **settings,
    }


def _images(count=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, size=(count, 28, 28, 1)).astype(np.uint8)


# --- augmentation ---------------------------------------------------------------------------------------------


def test_augmentation_acts_in_training_only_and_on_the_stored_pixels():
    plan = _plan(_raw(augment=["random_translation", {"name": "random_flip"}]))
    model = assemble(plan, (28, 28, 1), 10)
    names = [layer.name for layer in model.layers]
    assert names[1:4] == ["augment_0_random_translation", "augment_1_random_flip", "backbone_input"]
    # Applied before the resize: the layers see 28x28 images, not the backbone's 32x32.
    assert tuple(model.get_layer("augment_0_random_translation").output.shape[1:]) == (28, 28, 1)
    images = _images()
    pixels = keras.Model(model.input, model.get_layer("backbone_input").output)
    training_a = keras.ops.convert_to_numpy(pixels(images, training=True))
    training_b = keras.ops.convert_to_numpy(pixels(images, training=True))
    inference = keras.ops.convert_to_numpy(pixels(images, training=False))
    assert np.abs(training_a - training_b).mean() > 0.05  # a new draw every call
    # In inference the augmentation layers pass the pixels through: the same input as a model without them.
    plain = assemble(_plan(_raw()), (28, 28, 1), 10)
    plain_pixels = keras.Model(plain.input, plain.get_layer("backbone_input").output)
    np.testing.assert_array_equal(inference, keras.ops.convert_to_numpy(plain_pixels(images, training=False)))
    np.testing.assert_array_equal(inference, keras.ops.convert_to_numpy(pixels(images, training=False)))


def test_saved_and_exported_models_never_augment(tmp_path):
    import tensorflow as tf

    from finetune.export.formats import export_all

    # A dense backbone: what is checked is the augmentation layers in front of any backbone, and
    # MobileNetV2's SavedModel and TFLite exports cost a minute more.
    dense = {"name": "mlp", "weights": None, "options": {"dense": [32]}}
    model = assemble(
        _plan(_raw(augment=["random_translation", "random_zoom", "random_erasing"], backbone=dense)), (28, 28, 1), 10
    )
    images = _images(8)
    expected = keras.ops.convert_to_numpy(model(images, training=False))
    model.save(tmp_path / "model.keras")
    loaded = finetune.load_model(tmp_path / "model.keras", compile=False)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, atol=1e-5)
    # Every export goes through export_all, which serves the model without its random layers (a bare
    # Keras export of this dense model augments what it serves: its two calls answer differently).
    names = [str(index) for index in range(10)]
    export_all(model, tmp_path / "fresh", ["saved_model"], "none", names, images)
    served = tf.saved_model.load(str(tmp_path / "fresh" / "saved_model"))
    np.testing.assert_allclose(served.serve(tf.constant(images)).numpy(), expected, atol=1e-4)
    # A model loaded back (as after a run) is traced with its random layers in training mode unless
    # the export takes them out: its SavedModel translated every image (found on the quick start).
    model.compile("sgd", "sparse_categorical_crossentropy")
    model.fit(images, np.arange(8) % 10, epochs=1, verbose=0)  # the random layers ran in training
    model.save(tmp_path / "trained.keras")
    loaded = finetune.load_model(tmp_path / "trained.keras", compile=False)
    expected = keras.ops.convert_to_numpy(loaded(images, training=False))
    export_all(loaded, tmp_path / "again", ["saved_model", "tflite"], "none", names, images)
    for _ in range(2):
        served = tf.saved_model.load(str(tmp_path / "again" / "saved_model"))
        np.testing.assert_allclose(served.serve(tf.constant(images)).numpy(), expected, atol=1e-4)


def test_evaluate_never_augments():
    from finetune.data import Split
    from finetune.evaluation.metrics import evaluate

    model = assemble(_plan(_raw(augment=["random_translation", "random_rotation"])), (28, 28, 1), 10)
    split = Split(_images(32), np.arange(32) % 10)
    first = evaluate(model, split, [str(index) for index in range(10)])
    second = evaluate(model, split, [str(index) for index in range(10)])
    assert first["loss"] == second["loss"]


def test_unknown_augmentation_is_one_line():
    with pytest.raises(RecipeError, match=r"model\.augment: unknown augmentation 'random_flop'.*random_flip"):
        _plan(_raw(augment=["random_flop"]))
    with pytest.raises(RecipeError, match=r"model\.augment: augmentation 'random_translation'"):
        _plan(_raw(augment=[{"name": "random_translation", "colour": 3}]))


def test_augmented_phase_is_not_cached_and_says_so(tiny_recipe_dict):
    tiny_recipe_dict["model"]["augment"] = ["random_translation"]
    _, plan, dataset, model, store = _store(tiny_recipe_dict)
    with logged_lines() as notes:
        assert store.features(model, plan.phases[0], dataset, 32) is None
    assert any("model.augment" in note and "not cached" in note for note in notes)


# --- a backbone cut at a block ---------------------------------------------------------------------------------


def test_cut_at_builds_the_backbone_up_to_that_block_with_its_weights(tiny_backbone_weights):
    full_plan = _plan(_raw(backbone=_mobilenet(tiny_backbone_weights)))
    full = assemble(full_plan, (28, 28, 1), 10)
    cut_raw = _raw(backbone=_mobilenet(tiny_backbone_weights, cut_at="block_10"))
    cut = assemble(_plan(cut_raw), (28, 28, 1), 10)
    cut_layout = layout(cut, _plan(cut_raw))
    assert cut_layout.blocks[-1].name == "block_10"
    full_backbone, cut_backbone = layout(full, full_plan).backbone, cut_layout.backbone
    # The cut backbone computes exactly what the full one computes at block_10's output.
    probe = keras.Model(full_backbone.input, full_backbone.get_layer("block_10_project_BN").output)
    x = np.random.default_rng(1).normal(size=(4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(cut_backbone(x, training=False)),
        keras.ops.convert_to_numpy(probe(x, training=False)),
        atol=1e-5,
    )
    assert cut_backbone.count_params() < full_backbone.count_params() / 2


def test_top_blocks_removed_matches_cut_at():
    names = [block.name for block in layout(assemble(_plan(_raw()), (28, 28, 1), 10), _plan(_raw())).blocks]
    raw = _raw(backbone=_mobilenet(top_blocks_removed=3))
    model = assemble(_plan(raw), (28, 28, 1), 10)
    assert [block.name for block in layout(model, _plan(raw)).blocks] == names[:-3]


def test_cut_errors_name_the_blocks():
    raw = _raw(backbone=_mobilenet(cut_at="block_99"))
    with pytest.raises(RecipeError, match=r"cut_at: no block 'block_99'; the blocks are expanded_conv, block_1, "):
        assemble(_plan(raw), (28, 28, 1), 10)
    raw["model"]["backbone"]["cut_at"] = None
    raw["model"]["backbone"]["top_blocks_removed"] = 40
    with pytest.raises(RecipeError, match=r"top_blocks_removed: the backbone has 17 blocks .* at most 16 can go"):
        assemble(_plan(raw), (28, 28, 1), 10)
    raw["model"]["backbone"]["cut_at"] = "block_3"
    with pytest.raises(RecipeError, match="cut_at or top_blocks_removed, not both"):
        read_recipe(raw)


def test_a_cut_model_trains_saves_and_loads(tmp_path, tiny_backbone_weights):
    raw = _raw(backbone=_mobilenet(tiny_backbone_weights, cut_at="block_6"))
    raw["phases"][1]["trainable"] = {"top_blocks": 1}
    raw["export"] = {"saved_model": False}
    result = finetune.run(read_recipe(raw), out=tmp_path / "run", log=lambda line: None)
    loaded = finetune.load_model(result.run_dir / "model.keras")
    images = _images(4)
    np.testing.assert_allclose(loaded.predict(images, verbose=0), result.model.predict(images, verbose=0), atol=1e-5)


# --- the loss, the optimizer, the evaluation --------------------------------------------------------------------


def test_label_smoothing_is_the_formula():
    from finetune.catalog.losses import training_loss

    rng = np.random.default_rng(0)
    probabilities = rng.dirichlet(np.ones(5), size=8).astype("float32")
    labels = rng.integers(0, 5, size=8)
    targets = np.full((8, 5), 0.1 / 5) + 0.9 * np.eye(5)[labels]
    expected = float(np.mean(-np.sum(targets * np.log(probabilities), axis=1)))
    loss = training_loss(0.1)
    assert float(loss(labels, probabilities)) == pytest.approx(expected, rel=1e-5)
    plain = keras.losses.get(training_loss(0.0))
    assert float(np.mean(plain(labels, probabilities))) == pytest.approx(
        float(np.mean(-np.log(probabilities[np.arange(8), labels]))), rel=1e-5
    )


def test_recipe_label_smoothing_reaches_the_compiled_model(tiny_recipe_dict):
    from conftest import compile_phase

    tiny_recipe_dict["training"]["loss"] = {"label_smoothing": 0.2}
    recipe = read_recipe(tiny_recipe_dict)
    model = assemble(resolve(recipe).model, (28, 28, 1), 10)
    compile_phase(model, recipe, recipe.phases[0])
    images, labels = _images(8), np.arange(8)
    probabilities = keras.ops.convert_to_numpy(model(images, training=False)).astype("float64")
    targets = np.full((8, 10), 0.02) + 0.8 * np.eye(10)[labels]
    expected = np.mean(-np.sum(targets * np.log(probabilities), axis=1))
    assert float(model.loss(labels, probabilities)) == pytest.approx(expected, rel=1e-4)


def test_adamw_weight_decay_from_a_recipe_shrinks_weights():
    from finetune.catalog import optimizers

    optimizer = optimizers.get({"name": "adamw", "weight_decay": 0.1}, learning_rate=0.01)
    weight = keras.Variable(np.full((3,), 2.0, dtype="float32"))
    optimizer.apply_gradients([(keras.ops.zeros((3,)), weight)])
    # A zero gradient moves Adam nowhere: what is left is the decoupled decay w -= lr * wd * w.
    np.testing.assert_allclose(keras.ops.convert_to_numpy(weight), 2.0 * (1 - 0.01 * 0.1), rtol=1e-6)


def test_weight_ema_leaves_the_moving_average_in_the_model():
    from finetune.catalog import optimizers

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(1, use_bias=False)(inputs))
    model.compile(optimizers.get({"name": "sgd", "use_ema": True, "ema_momentum": 0.5}, learning_rate=0.1), "mse")
    seen = []

    class Record(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            seen.append(keras.ops.convert_to_numpy(self.model.weights[0]).copy())

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(32, 4)).astype("float32"), rng.normal(size=(32, 1)).astype("float32")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[Record()])
    # Keras updates the average after each step (the first step starts it), then swaps it in at the end.
    average = seen[0]
    for weights in seen[1:]:
        average = 0.5 * average + 0.5 * weights
    final = keras.ops.convert_to_numpy(model.weights[0])
    assert not np.allclose(final, seen[-1])
    np.testing.assert_allclose(final, average, rtol=1e-5)


def test_flip_tta_averages_the_image_and_its_mirror(tiny_backbone_weights):
    from finetune.data import Split
    from finetune.evaluation.metrics import evaluate

    model = assemble(_plan(_raw(backbone=_mobilenet(tiny_backbone_weights))), (28, 28, 1), 10)
    images, labels = _images(24), np.arange(24) % 10
    names = [str(index) for index in range(10)]
    plain = model.predict(images, verbose=0).astype("float64")
    mirrored = model.predict(images[:, :, ::-1], verbose=0).astype("float64")
    assert np.abs(plain - mirrored).max() > 1e-3  # the model is not flip-invariant, so TTA changes something
    averaged = (plain + mirrored) / 2
    metrics = evaluate(model, Split(images, labels), names, tta=["flip"])
    expected_loss = float(np.mean(-np.log(np.clip(averaged[np.arange(24), labels], 1e-7, 1 - 1e-7))))
    assert metrics["loss"] == pytest.approx(expected_loss, rel=1e-5)
    assert metrics["accuracy"] == pytest.approx(float(np.mean(averaged.argmax(axis=1) == labels)))


# --- gradual unfreezing -----------------------------------------------------------------------------------------


def test_gradual_unfreezing_expands_into_phases_that_unfreeze_more(tiny_recipe_dict):
    from conftest import configure

    tiny_recipe_dict["phases"][1]["trainable"] = {"top_blocks": [1, 3]}
    recipe = read_recipe(tiny_recipe_dict)
    assert [phase.name for phase in recipe.phases] == ["head", "finetune_top1", "finetune_top3"]
    assert recipe.phases[2].optimizer == recipe.phases[1].optimizer
    model = assemble(resolve(recipe).model, (28, 28, 1), 10)
    counts = [len(configure(model, recipe, phase).trainable_blocks) for phase in recipe.phases]
    assert counts == [0, 1, 3]
    tiny_recipe_dict["phases"][1]["trainable"] = {"top_blocks": []}
    with pytest.raises(RecipeError, match="empty list"):
        read_recipe(tiny_recipe_dict)


# --- augmentation meets feature caching ---------------------------------------------------------------------------


def _store(tiny_recipe_dict):
    """The recipe, its plan, dataset and model, and a FeatureStore."""
    from finetune.data import load_dataset
    from finetune.training.features import FeatureStore

    recipe = read_recipe(tiny_recipe_dict)
    plan = resolve(recipe)
    dataset = load_dataset(plan.data, plan.seed)
    model = assemble(plan.model, dataset.input_shape, dataset.num_classes)
    store = FeatureStore(plan.phases, plan.training, layout(model, plan.model))
    return recipe, plan, dataset, model, store


def _augmented_store(tiny_recipe_dict, views):
    tiny_recipe_dict["model"]["augment"] = [{"name": "random_translation", "factor": 0.2}]
    tiny_recipe_dict["training"]["augmented_views"] = views
    return _store(tiny_recipe_dict)[1:]


def test_augmented_views_cache_k_different_copies_and_plain_validation(tiny_recipe_dict):
    plan, dataset, model, store = _augmented_store(tiny_recipe_dict, 3)
    with logged_lines() as notes:
        features = store.features(model, plan.phases[0], dataset, 32)
    assert features is not None and len(features.views) == 3
    cut = store.plan(model, plan.phases[0])
    plain = cut.bottom.predict(dataset.train.images, verbose=0)
    for view in features.views:
        assert view.shape == plain.shape and not np.allclose(view, plain, atol=1e-3)
    assert not np.allclose(features.views[0], features.views[1], atol=1e-3)
    # Validation is never augmented.
    np.testing.assert_allclose(features.validation, cut.bottom.predict(dataset.validation.images, verbose=0), atol=1e-5)
    assert any("3 augmented views" in note for note in notes)


def test_an_augmented_copy_is_the_same_whenever_it_is_drawn(tiny_recipe_dict):
    from finetune.training.checkpoints import seed_generator_states
    from finetune.training.features import augmented_copy

    _, dataset, model, _ = _augmented_store(tiny_recipe_dict, 2)
    images = dataset.train.images
    states = [np.array(state) for state in seed_generator_states(model)]
    first = augmented_copy(model, images, 32, view=0)
    other = augmented_copy(model, images, 32, view=1)
    again = augmented_copy(model, images, 32, view=0)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other) and not np.array_equal(first, images)
    for before, after in zip(states, seed_generator_states(model), strict=True):
        np.testing.assert_array_equal(before, np.array(after))  # the model's random state goes on as before


def test_augmented_views_are_drawn_and_computed_once_for_a_head_and_a_top_block_phase(tiny_recipe_dict, monkeypatch):
    from finetune.training import features as features_module

    plan, dataset, model, store = _augmented_store(tiny_recipe_dict, 2)
    real_copy, drawn = features_module.augmented_copy, []

    def counted(*args, **kwargs):
        drawn.append(kwargs["view"])
        return real_copy(*args, **kwargs)

    monkeypatch.setattr(features_module, "augmented_copy", counted)
    from finetune.training.phases import configure_phase

    with logged_lines() as notes:
        configure_phase(model, store.layout, plan.phases[0])
        head = store.features(model, plan.phases[0], dataset, 32)
        configure_phase(model, store.layout, plan.phases[1])  # the top blocks train: below them stays frozen
        top = store.features(model, plan.phases[1], dataset, 32)
    assert drawn == [0, 1], "each copy is drawn once, for both phases"
    assert sum("2 augmented views" in note for note in notes) == 1
    assert any("frozen part reused" in note for note in notes)
    for features, phase in ((head, plan.phases[0]), (top, plan.phases[1])):
        bottom = store.plan(model, phase).bottom
        assert features is not None and len(features.views) == 2
        for view, computed in enumerate(features.views):
            expected = bottom.predict(real_copy(model, dataset.train.images, 32, view=view), verbose=0)
            np.testing.assert_allclose(computed, expected, rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(features.validation, bottom.predict(dataset.validation.images, verbose=0), atol=1e-4)


def test_view_batches_read_the_next_view_each_epoch():
    from finetune.data.batches import ViewBatches

    views = [np.full((6, 2), float(index)) for index in range(3)]
    batches = ViewBatches(views, np.arange(6), batch_size=4, shuffle=True, seed=0)
    seen = []
    for _ in range(4):
        seen.append({float(value) for index in range(len(batches)) for value in batches[index][0].ravel()})
        batches.on_epoch_end()
    assert seen == [{0.0}, {1.0}, {2.0}, {0.0}]


def test_augmented_views_that_do_not_fit_are_refused_in_one_line(tiny_recipe_dict, monkeypatch):
    from finetune.training import features as features_module

    plan, dataset, model, store = _augmented_store(tiny_recipe_dict, 2)
    monkeypatch.setattr(features_module, "choose_storage", lambda *args, **kwargs: "off")
    with pytest.raises(RecipeError, match=r"training\.augmented_views: 2 augmented copies .* fit neither"):
        store.features(model, plan.phases[0], dataset, 32)


def test_a_phase_trains_on_augmented_views(tiny_recipe_dict):
    from conftest import compile_phase, fit

    tiny_recipe_dict["model"]["augment"] = ["random_translation"]
    tiny_recipe_dict["training"]["augmented_views"] = 2
    recipe = read_recipe(tiny_recipe_dict)
    plan = resolve(recipe)
    from finetune.data import load_dataset

    dataset = load_dataset(plan.data, plan.seed)
    model = assemble(plan.model, dataset.input_shape, dataset.num_classes)
    phase = recipe.phases[0].model_copy(update={"epochs": 3})
    compile_phase(model, recipe, phase, steps=5)
    before = [np.array(w) for w in model.get_layer("predictions").get_weights()]
    history = fit(model, recipe, phase, dataset)
    assert len(history.history["loss"]) == 3
    assert not np.allclose(before[0], model.get_layer("predictions").get_weights()[0])


# --- batch-level mixing: mixup and CutMix -----------------------------------------------------------------------


def _class_coloured_batch(count=32, classes=4, seed=0):
    """Images of one grey level per class (40 * label + 20), so a pixel says which image it came from."""
    labels = np.random.default_rng(seed).integers(0, classes, count)
    images = np.broadcast_to((40 * labels + 20).astype(np.uint8)[:, None, None, None], (count, 28, 28, 1)).copy()
    return images, np.eye(classes, dtype=np.float32)[labels], labels


def test_mixup_mixes_pixels_and_targets_with_the_same_weights():
    from finetune.catalog.mixing import mixers

    images, targets, _ = _class_coloured_batch()
    mixed, mixed_targets = mixers.get({"name": "mixup", "alpha": 0.4})(images, targets, np.random.default_rng(3))
    np.testing.assert_allclose(mixed_targets.sum(axis=1), 1.0, atol=1e-6)
    assert ((mixed_targets > 0.01) & (mixed_targets < 0.99)).any()  # a real mix, not a copy
    expected = mixed_targets @ (40 * np.arange(4) + 20)  # each pixel: the targets' weights of the two grey levels
    assert np.abs(mixed[:, 0, 0, 0] - expected).max() <= 0.5  # rounded to the stored uint8
    assert mixed.dtype == np.uint8 and np.ptp(mixed.reshape(len(mixed), -1), axis=1).max() == 0


def test_cutmix_targets_weigh_each_image_by_its_share_of_the_pixels():
    from finetune.catalog.mixing import mixers

    images, targets, labels = _class_coloured_batch()
    mixer = mixers.get("cutmix")
    for seed in range(5):
        mixed, mixed_targets = mixer(images, targets, np.random.default_rng(seed))
        for row in range(len(images)):
            shares = np.zeros(4)
            for label in range(4):
                shares[label] = np.mean(mixed[row] == 40 * label + 20)
            np.testing.assert_allclose(shares, mixed_targets[row], atol=1e-6)
    np.testing.assert_array_equal(images[:, 0, 0, 0], 40 * labels + 20)  # the input batch is left alone


def test_mixed_batches_repeat_per_seed_and_change_every_epoch():
    from finetune.catalog.mixing import BatchMixer
    from finetune.data.batches import MixedBatches

    images, _, labels = _class_coloured_batch(64)

    def batches():
        return MixedBatches(images, labels, 4, 16, BatchMixer(["mixup", "cutmix"]), shuffle=True, seed=7)

    first, again = batches(), batches()
    x, y = first[0]
    assert y.shape == (16, 4) and np.allclose(y.sum(axis=1), 1.0)
    np.testing.assert_array_equal(x, again[0][0])
    first.on_epoch_end()
    assert not np.array_equal(x, first[0][0])


@pytest.mark.slow  # an end-to-end run: moved out of the fast suite (kept under 10 minutes)
def test_a_phase_trains_on_mixed_batches_and_validates_on_plain_labels(tiny_recipe_dict):
    from conftest import compile_phase, fit

    tiny_recipe_dict["training"]["mix"] = ["mixup", {"name": "cutmix", "probability": 0.5}]
    recipe, _, dataset, model, store = _store(tiny_recipe_dict)
    phase = recipe.phases[0].model_copy(update={"epochs": 2})
    compile_phase(model, recipe, phase, steps=5)
    with logged_lines() as notes:
        history = fit(model, recipe, phase, dataset, features=store)
    assert any("training.mix" in note and "not cached" in note for note in notes)
    # Validation accuracy is the model's own on the unmixed validation images and their labels.
    predicted = model.predict(dataset.validation.images, verbose=0).argmax(axis=1)
    expected = float(np.mean(predicted == dataset.validation.labels))
    assert history.history["val_accuracy"][-1] == pytest.approx(expected, abs=1e-6)


def test_unknown_mixer_is_one_line():
    raw = copy.deepcopy(TINY_RECIPE)
    raw["training"]["mix"] = ["mixop"]
    with pytest.raises(RecipeError, match=r"training\.mix: unknown mixer 'mixop' \(did you mean 'mixup'\?\)"):
        resolve(read_recipe(raw))
    raw["training"]["mix"] = [{"name": "mixup", "alpha": -1}]
    with pytest.raises(RecipeError, match=r"training\.mix: mixer 'mixup': alpha must be > 0"):
        resolve(read_recipe(raw))


def test_a_model_compiled_with_label_smoothing_loads_in_a_fresh_process_from_its_run_folder(tmp_path, tiny_recipe_dict):
    import os
    import subprocess
    import sys

    from conftest import ROOT, compile_phase

    tiny_recipe_dict["training"]["loss"] = {"label_smoothing": 0.1}
    recipe = read_recipe(tiny_recipe_dict)
    model = assemble(resolve(recipe).model, (28, 28, 1), 10)
    compile_phase(model, recipe, recipe.phases[0])
    model.save(tmp_path / "model.keras")
    code = "import sys, finetune\nprint(finetune.load_model(sys.argv[1]).loss.label_smoothing)\n"
    result = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],  # the run folder, not the file
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "0.1"
