"""Feature caching gives the same training as running the whole model."""

import keras
import numpy as np
import pytest
from conftest import compile_phase, configure, fit, layout_of, logged_lines, outside_ci_cover

import finetune
from finetune import data
from finetune.backbones.blocks import get_backbone
from finetune.training import features as caching
from finetune.training.cuts import plan_cut
from finetune.training.phases import steps_per_epoch


def train_phase(recipe_dict, phase_name, cache, shuffle=False, **training):
    recipe_dict = {
        **recipe_dict,
        "training": {**recipe_dict["training"], "cache": cache, "shuffle": shuffle, **training},
    }
    recipe = finetune.load_recipe(recipe_dict)
    dataset = data.load_dataset(recipe.data, recipe.seed)
    keras.utils.set_random_seed(0)
    model = finetune.build_model(recipe)
    phase = recipe.phase(phase_name)
    configure(model, recipe, phase)
    setup = compile_phase(model, recipe, phase, steps_per_epoch(phase, recipe.training, len(dataset.train)))
    history = fit(model, recipe, phase, dataset, callbacks=setup.callbacks)
    return model, history


@pytest.fixture
def tiny_recipe_dict(tiny_recipe_dict):
    """The shared tiny recipe without its SavedModel export: no test here looks at it, and it costs seconds."""
    tiny_recipe_dict["export"] = {"saved_model": False}
    return tiny_recipe_dict


@pytest.fixture
def deterministic(tiny_recipe_dict):
    tiny_recipe_dict["model"]["head"] = {"dense": [16]}  # no dropout
    for phase in tiny_recipe_dict["phases"]:
        phase["epochs"] = 2
        phase["optimizer"] = {"name": "sgd", "learning_rate": 0.05, "momentum": 0.9}
    return tiny_recipe_dict


@pytest.mark.parametrize("phase", ["head", "finetune"])
def test_cached_and_uncached_phases_give_the_same_weights(deterministic, phase):
    cached, cached_history = train_phase(deterministic, phase, "memory")
    plain, plain_history = train_phase(deterministic, phase, "off")
    for ours, theirs in zip(cached.weights, plain.weights, strict=True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(ours),
            keras.ops.convert_to_numpy(theirs),
            rtol=1e-4,
            atol=1e-5,
            err_msg=ours.path,
        )
    np.testing.assert_allclose(cached_history.history["loss"], plain_history.history["loss"], rtol=1e-4)
    # The trained weights went back into the full model: something did train.
    fresh = finetune.build_model(finetune.load_recipe(deterministic))
    assert not np.allclose(
        keras.ops.convert_to_numpy(cached.get_layer("predictions").kernel),
        keras.ops.convert_to_numpy(fresh.get_layer("predictions").kernel),
    )


def cut(model, recipe, phase):
    return plan_cut(model, layout_of(model, recipe), phase)


def test_cut_points(tiny_recipe):
    model = finetune.build_model(tiny_recipe)
    head = cut(model, tiny_recipe, tiny_recipe.phase("head"))
    assert head.where == "after head_pool" and tuple(head.bottom.output.shape) == (None, 1280)
    top = cut(model, tiny_recipe, tiny_recipe.phase("finetune"))
    assert top.where == "at block_14_add"  # MobileNetV2's block_15 starts from block 14's output
    assert {layer.name for layer in top.top.layers} >= {"predictions", "head_pool"}


def test_xception_top_blocks_are_cut_at_the_one_sum_that_closes_block_12(tiny_recipe_dict):
    tiny_recipe_dict["model"]["backbone"] = {"name": "xception", "weights": None}
    tiny_recipe_dict["data"]["image_size"] = 71
    recipe = finetune.load_recipe(tiny_recipe_dict)
    model = finetune.build_model(recipe)
    top2 = cut(model, recipe, recipe.phase("finetune"))
    # Block 12 ends with the sum of its last BatchNorm and the residual from block 11; block 13 reads only
    # that sum (its separable convolutions and its shortcut convolution both start from it), so the cut keeps
    # one tensor, not the sum's two inputs (half the cached bytes). Found by public layer attributes alone.
    backbone = get_backbone(model)

    def made_by(tensor):
        (layer,) = [layer for layer in backbone.layers if layer.output is tensor]
        return layer

    closing_sum = made_by(backbone.get_layer("block13_sepconv1_act").input)
    assert isinstance(closing_sum, keras.layers.Add)
    producers = [made_by(tensor).name for tensor in closing_sum.input]
    assert producers[0] == "block12_sepconv3_bn" and producers[1].startswith("add")
    assert top2.where == f"at {closing_sum.name}"
    assert len(top2.bottom.outputs) == 1 and tuple(top2.bottom.outputs[0].shape) == (None, 5, 5, 728)
    # The cut models compute what the whole model computes.
    images = np.random.default_rng(0).integers(0, 256, (2, *model.input_shape[1:])).astype("float32")
    features = top2.bottom.predict(images, verbose=0)  # a list of one array: the cut is one tensor
    np.testing.assert_allclose(
        top2.top.predict(features, verbose=0),
        model.predict(images, verbose=0),
        rtol=1e-4,
        atol=1e-6,
    )


def test_no_cache_where_it_would_change_the_result(tiny_recipe_dict):
    recipe = finetune.load_recipe(tiny_recipe_dict)
    model = finetune.build_model(recipe)
    everything = recipe.phase("finetune").model_copy(update={"trainable": "all"})
    assert cut(model, recipe, everything) is None
    with_bn = recipe.phase("finetune").model_copy(update={"train_bn": True})
    assert cut(model, recipe, with_bn) is None
    # A from-scratch mlp with dropout below the cut is random in training: no cache.
    tiny_recipe_dict["model"]["backbone"] = {"name": "mlp", "weights": None, "options": {"dense": [8], "dropout": 0.2}}
    tiny_recipe_dict["data"]["image_size"] = 28
    recipe = finetune.load_recipe(tiny_recipe_dict)
    assert cut(finetune.build_model(recipe), recipe, recipe.phase("head")) is None


def test_disk_cache_matches_memory(tiny_recipe, tmp_path):
    model = finetune.build_model(tiny_recipe)
    top2 = cut(model, tiny_recipe, tiny_recipe.phase("finetune"))
    images = data.load_dataset(tiny_recipe.data, 0).train.images[:50]
    (memory,) = caching.extract(top2.bottom, images, 16, caching.CacheTarget("float32", "memory", None, "train"))
    (disk,) = caching.extract(top2.bottom, images, 16, caching.CacheTarget("float32", "disk", tmp_path, "train"))
    assert isinstance(disk, np.memmap) and (tmp_path / "train_0.npy").is_file()
    np.testing.assert_array_equal(memory, np.asarray(disk))
    direct = keras.ops.convert_to_numpy(top2.bottom(images))
    np.testing.assert_allclose(memory, direct, rtol=1e-3, atol=1e-3)  # graph vs eager rounding


def test_auto_storage_goes_to_disk_when_large(monkeypatch):
    monkeypatch.setattr(caching, "_free_disk", lambda folder: 500 * 1024**3)
    assert caching.choose_storage("auto", 10 * 1024**2) == "memory"
    assert caching.choose_storage("auto", 50 * 1024**3) == "disk"
    assert caching.choose_storage("memory", 50 * 1024**3) == "memory"


def test_no_cache_when_the_disk_has_no_room(tiny_recipe_dict, tmp_path, monkeypatch):
    """Features that fit neither memory nor disk: the phase runs the whole model instead of filling the disk."""
    monkeypatch.setattr(caching, "_available_memory", lambda: 0)
    monkeypatch.setattr(caching, "_free_disk", lambda folder: 1024**2)
    assert caching.choose_storage("auto", 50 * 1024**3, tmp_path) == "off"
    lines = []
    result = finetune.run(finetune.load_recipe(tiny_recipe_dict), out=tmp_path / "run", log=lines.append)
    assert sum("no room to cache the frozen part" in line for line in lines) == 2
    assert not any("computed once" in line for line in lines)
    assert len(result.history) == 2


def test_a_run_uses_the_cache_and_removes_it_at_the_end(tiny_recipe, tmp_path):
    lines = []
    result = finetune.run(tiny_recipe, out=tmp_path / "run", log=lines.append)
    # The head phase extracts at the fine-tuning phase's cut; the pooled features come from there.
    assert sum("frozen part computed once" in line for line in lines) == 1
    assert any("frozen part computed once (at block_14_add, kept for the later phases)" in line for line in lines)
    assert any("its features computed once from the kept part (after head_pool)" in line for line in lines)
    assert any("frozen part reused from phase head (at block_14_add)" in line for line in lines)
    assert not (result.run_dir / "cache").exists()
    assert get_backbone(result.model).name.startswith("mobilenetv2")


def test_yaml_off_switches_the_cache_off(tmp_path):
    from conftest import ROOT

    import finetune

    text = (ROOT / "recipes" / "xception_fmnist.yaml").read_text().replace("training:\n", "training:\n  cache: off\n")
    path = tmp_path / "r.yaml"
    path.write_text(text)
    assert finetune.load_recipe(path).training.cache == "off"


def test_model_checkpoint_saves_the_full_model_from_a_cached_phase(tiny_recipe_dict, tmp_path):
    tiny_recipe_dict["phases"][0]["callbacks"] = ["model_checkpoint"]
    tiny_recipe_dict["phases"][1]["epochs"] = 0
    result = finetune.run(finetune.load_recipe(tiny_recipe_dict), out=tmp_path / "run", log=lambda line: None)
    best = keras.saving.load_model(result.run_dir / "best_head.keras", safe_mode=True)
    assert tuple(best.input_shape) == (None, 28, 28, 1)
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1)).astype("uint8")
    assert keras.ops.convert_to_numpy(best(images)).shape == (3, 10)


def run_weights(recipe_dict, cache, tmp_path):
    recipe_dict = {**recipe_dict, "training": {**recipe_dict["training"], "cache": cache, "shuffle": False}}
    lines = []
    result = finetune.run(finetune.load_recipe(recipe_dict), out=tmp_path / f"run_{cache}", log=lines.append)
    return [keras.ops.convert_to_numpy(weight) for weight in result.model.weights], lines


def assert_same_weights(ours, theirs):
    for mine, other in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(mine, other, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize(
    "later",
    [
        outside_ci_cover([("finetune", {"top_blocks": 2})], reason="the two-phase case below shares it twice"),
        [("top1", {"top_blocks": 1}), ("top3", {"top_blocks": 3})],  # the last phase cuts lowest
    ],
)
def test_phases_share_one_pass_of_the_frozen_part(deterministic, tmp_path, later):
    """Head, then top blocks: the bottom runs once, and the weights equal an uncached run's."""
    deterministic["phases"] = deterministic["phases"][:1] + [
        {**deterministic["phases"][1], "name": name, "trainable": trainable} for name, trainable in later
    ]
    cached, lines = run_weights(deterministic, "memory", tmp_path)
    plain, _ = run_weights(deterministic, "off", tmp_path)
    assert sum("frozen part computed once" in line for line in lines) == 1
    assert sum("its features computed once from the kept part" in line for line in lines) == len(later)
    assert_same_weights(cached, plain)


@pytest.mark.slow
def test_a_phase_that_trains_below_the_cut_drops_the_kept_features(deterministic, tmp_path):
    """Head, everything, head again: the third phase must not reuse features from before the second."""
    head = deterministic["phases"][0]
    deterministic["phases"] = [head, {**head, "name": "all", "trainable": "all"}, {**head, "name": "head_again"}]
    cached, lines = run_weights(deterministic, "memory", tmp_path)
    plain, _ = run_weights(deterministic, "off", tmp_path)
    assert sum("frozen part computed once" in line for line in lines) == 2
    assert not any("reused" in line for line in lines)
    assert_same_weights(cached, plain)


def test_a_lower_cut_without_room_falls_back_to_each_phase_its_own(tiny_recipe_dict, tmp_path, monkeypatch):
    """No room for the later phase's (larger) cut: each phase extracts at its own cut, as before sharing."""
    # Cuts inside the backbone give 4-d features; the head's cut gives pooled vectors.
    monkeypatch.setattr(
        caching.FeatureStore,
        "_storage",
        lambda self, producer, images: "off" if len(producer.outputs[0].shape) == 4 else "memory",
    )
    lines = []
    finetune.run(finetune.load_recipe(tiny_recipe_dict), out=tmp_path / "run", log=lines.append)
    assert any("frozen part computed once (after head_pool)," in line for line in lines)
    assert any("no room to cache the frozen part" in line for line in lines)  # the finetune phase's own cut
    assert not any("kept for the later phases" in line or "reused" in line for line in lines)


def on_disk_dataset(dataset, folder):
    """``dataset`` with its images in memory-mapped files, as an image folder's are."""
    from finetune.data import Dataset, Split

    def mapped(split, name):
        np.save(folder / f"{name}.npy", np.asarray(split.images))
        return Split(np.load(folder / f"{name}.npy", mmap_mode="r"), split.labels, split.indices)

    return Dataset(
        mapped(dataset.train, "train"),
        mapped(dataset.validation, "validation"),
        mapped(dataset.test, "test"),
        dataset.class_names,
        dataset.source,
    )


@pytest.mark.parametrize(
    "phase, cache_dtype",
    [
        ("head", "float32"),
        outside_ci_cover("finetune", "float32", reason="each phase and each dtype runs once"),
        outside_ci_cover("head", "float16", reason="each phase and each dtype runs once"),
        ("finetune", "float16"),
    ],
)
def test_disk_cached_training_with_shuffling_matches_uncached(deterministic, tmp_path, phase, cache_dtype):
    """Features stored on disk (and as float16) train like the whole model, in the same shuffled order.

    Tolerances: float32 features give the same weights (rtol 1e-4, atol 1e-5). float16 features carry
    11 bits of mantissa (relative rounding up to 4.9e-4), and training amplifies it: for the head the
    losses moved by at most 3e-4 (relative) and test probabilities by 1e-2; training two blocks of this
    tiny random network on them, losses moved by up to 2% and probabilities by 0.03 on average (up to
    0.38 for single images), measured over seeds 0 and 1 at a learning rate of 0.005.
    """
    recipe_dict = {**deterministic, "training": {**deterministic["training"], "shuffle": True}}
    if cache_dtype == "float16":
        # At the fixture's rate (0.05, momentum 0.9) the loss climbs above chance: training is chaotic
        # and amplifies any rounding. A stable rate measures what float16 storage itself does.
        for step in recipe_dict["phases"]:
            step["optimizer"] = {**step["optimizer"], "learning_rate": 0.005}
    results = {}
    for cache in ("disk", "off"):
        recipe = finetune.load_recipe(
            {**recipe_dict, "training": {**recipe_dict["training"], "cache": cache, "cache_dtype": cache_dtype}}
        )
        folder = tmp_path / cache
        folder.mkdir()
        dataset = on_disk_dataset(data.load_dataset(recipe.data, recipe.seed), folder)
        keras.utils.set_random_seed(0)
        model = finetune.build_model(recipe)
        step = recipe.phase(phase)
        configure(model, recipe, step)
        setup = compile_phase(model, recipe, step, steps_per_epoch(step, recipe.training, len(dataset.train)))
        store = caching.FeatureStore([step], recipe.training, layout_of(model, recipe), folder / "cache")
        with logged_lines() as lines:
            history = fit(model, recipe, step, dataset, callbacks=setup.callbacks, features=store)
        if cache == "disk":
            assert any("in disk" in line for line in lines), lines  # the features really were on disk
            assert {array.dtype for array in np.atleast_1d(store.splits["train"])} == {np.dtype(cache_dtype)}
        store.close()
        results[cache] = (
            [keras.ops.convert_to_numpy(w) for w in model.weights],
            history.history["loss"],
            model.predict(dataset.test.images, verbose=0),
        )
    (cached, cached_loss, cached_probabilities), (plain, plain_loss, plain_probabilities) = (
        results["disk"],
        results["off"],
    )
    assert not np.allclose(plain_loss[0], plain_loss[1])  # it trained
    if cache_dtype == "float32":
        np.testing.assert_allclose(cached_loss, plain_loss, rtol=1e-4)
        for ours, theirs in zip(cached, plain, strict=True):
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    else:
        np.testing.assert_allclose(cached_loss, plain_loss, rtol=5e-2)
        assert np.abs(cached_probabilities - plain_probabilities).mean() < 0.05
