import os
import re
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import outside_ci_cover

from finetune import backbones
from finetune.backbones.blocks import get_backbone, split_into_blocks
from finetune.backbones.build import build_backbone
from finetune.backbones.input_layer import BackboneInput
from finetune.errors import RecipeError, WeightsError


@pytest.mark.parametrize(
    "mode, reference",
    [
        ("tf", keras.applications.xception.preprocess_input),
        ("caffe", keras.applications.resnet50.preprocess_input),
        ("torch", keras.applications.densenet.preprocess_input),
        ("none", keras.applications.efficientnet.preprocess_input),
    ],
)
def test_preprocessing_matches_keras_applications(mode, reference):
    images = np.random.default_rng(0).integers(0, 256, size=(3, 8, 8, 3)).astype(np.uint8)
    ours = keras.ops.convert_to_numpy(BackboneInput(8, 8, mode)(images))
    expected = reference(images.astype("float32").copy())
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-4)


def test_grayscale_is_resized_then_repeated_to_rgb():
    images = np.random.default_rng(1).integers(0, 256, size=(2, 28, 28, 1)).astype(np.uint8)
    out = keras.ops.convert_to_numpy(BackboneInput(40, 50, "none")(images))
    assert out.shape == (2, 40, 50, 3)
    np.testing.assert_array_equal(out[..., 0], out[..., 2])
    resized = keras.ops.convert_to_numpy(keras.ops.image.resize(images.astype("float32"), (40, 50)))
    np.testing.assert_allclose(out[..., :1], resized, atol=1e-4)


def blocks_of(name, size=None):
    spec = backbones.get(name)
    size = size or max(spec.min_size, 32)
    model = build_backbone(spec, (size, size), None)
    stem, blocks = split_into_blocks(model, spec)
    return model, stem, blocks


@pytest.mark.parametrize(
    "name, count, first, last",
    [
        ("xception", 14, "block1", "block14"),
        ("mobilenet_v2", 17, "expanded_conv", "block_16"),
        ("resnet50", 16, "conv2_block1", "conv5_block3"),
        ("efficientnet_b0", 16, "block1a", "block7a"),
        ("inception_v3", 11, "mixed0", "mixed10"),
        ("vgg16", 5, "block1", "block5"),
    ],
)
def test_block_structure_from_layer_names(name, count, first, last):
    model, stem, blocks = blocks_of(name)
    assert len(blocks) == count
    assert blocks[0].name == first and blocks[-1].name == last
    assigned = [layer for layer in stem] + [layer for block in blocks for layer in block.layers]
    everything = [layer for layer in model.layers if type(layer).__name__ != "InputLayer"]
    assert len(assigned) == len(everything) == len({id(layer) for layer in assigned})


def test_xception_residual_shortcut_belongs_to_the_block_it_bypasses():
    model, _, blocks = blocks_of("xception", 71)
    block13 = {layer.name for layer in blocks[-2].layers}

    def made_by(tensor):
        (layer,) = [layer for layer in model.layers if layer.output is tensor]
        return layer

    pool = model.get_layer("block13_pool")
    # The add after block13_pool joins it with the shortcut conv + BN of block 13.
    (add,) = [
        layer
        for layer in model.layers
        if isinstance(layer.input, list) and any(tensor is pool.output for tensor in layer.input)
    ]
    (shortcut,) = [made_by(tensor) for tensor in add.input if tensor is not pool.output]
    conv = made_by(shortcut.input)
    assert isinstance(shortcut, keras.layers.BatchNormalization) and isinstance(conv, keras.layers.Conv2D)
    assert shortcut.name in block13 and conv.name in block13
    # Every residual sum closes the block whose last layer it adds: block 13 and the blocks above start
    # from one tensor (a cut there caches one array, not the sum's two inputs).
    for number, block in enumerate(blocks[1:-1], start=2):
        closing = model.get_layer(f"block{number}_pool" if number in (2, 3, 4, 13) else f"block{number}_sepconv3_bn")
        (add,) = [
            layer
            for layer in model.layers
            if isinstance(layer, keras.layers.Add) and any(tensor is closing.output for tensor in layer.input)
        ]
        assert add.name in {layer.name for layer in block.layers}, (add.name, block.name)


def test_every_keras_application_is_registered():
    import inspect

    constructors = {
        name
        for name in dir(keras.applications)
        if inspect.isfunction(getattr(keras.applications, name)) and name[0].isupper()
    }
    registered = {backbones.get(name).notes.split(".")[-1] for name in backbones.backbones.names()}
    assert constructors <= registered


def save_canonical_weights(model, folder, file_name):
    """Write ``model``'s weights in the legacy h5 layout Keras publishes its ImageNet files in."""
    folder.mkdir(parents=True, exist_ok=True)
    model.save(folder / file_name)  # a .h5 path saves the legacy format
    return folder / file_name


def test_imagenet_weights_resolve_from_weights_dir_without_network(tmp_path, monkeypatch, no_network):
    spec = backbones.get("xception")
    file_name = spec.imagenet_file((71, 71))
    assert file_name == "xception_weights_tf_dim_ordering_tf_kernels_notop.h5"
    keras.utils.set_random_seed(123)
    reference = build_backbone(spec, (71, 71), None)
    save_canonical_weights(reference, tmp_path / "weights", file_name)
    monkeypatch.setenv("FINETUNE_WEIGHTS_DIR", str(tmp_path / "weights"))

    keras.utils.set_random_seed(999)  # a different random init, so equality means loading happened
    loaded = build_backbone(spec, (71, 71), "imagenet")
    assert no_network == []
    for expected, got in zip(reference.weights, loaded.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(expected), keras.ops.convert_to_numpy(got))


def test_a_finetune_xception_sees_what_keras_xception_sees_after_its_own_preprocess_input(tmp_path, monkeypatch):
    """Grey 28x28 uint8 in, through finetune's model with an ImageNet-layout weights file, against Keras's own
    Xception loading the same file and fed Keras's own ``preprocess_input`` of the same resized RGB images:
    the first convolution's activations and the backbone's output agree."""
    spec = backbones.get("xception")
    file_name = spec.imagenet_file((71, 71))
    keras.utils.set_random_seed(7)
    save_canonical_weights(build_backbone(spec, (71, 71), None), tmp_path / "weights", file_name)
    _compare_with_keras_xception(tmp_path / "weights", monkeypatch)


@pytest.mark.skipif(
    not os.environ.get("FINETUNE_REAL_XCEPTION_WEIGHTS"),
    reason="set FINETUNE_REAL_XCEPTION_WEIGHTS to the folder holding Keras's real Xception ImageNet file",
)
def test_the_same_with_the_real_xception_imagenet_file(monkeypatch):
    """As above, with Keras's own ImageNet file (not downloadable in CI: run where the file is)."""
    _compare_with_keras_xception(Path(os.environ["FINETUNE_REAL_XCEPTION_WEIGHTS"]), monkeypatch)


def _compare_with_keras_xception(weights_dir: Path, monkeypatch) -> None:
    import finetune

    file_name = backbones.get("xception").imagenet_file((71, 71))
    monkeypatch.setenv("FINETUNE_WEIGHTS_DIR", str(weights_dir))
    recipe = finetune.load_recipe(
        "recipes/xception_fmnist.yaml", ["data.image_size=71", "data.train_limit=64", "data.test_limit=64"]
    )
    model = finetune.build_model(recipe, input_shape=(28, 28, 1), num_classes=10)
    ours = get_backbone(model)
    grey = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1)).astype(np.uint8)
    rgb = np.repeat(keras.ops.convert_to_numpy(keras.ops.image.resize(grey.astype("float32"), (71, 71))), 3, axis=-1)
    keras_xception = keras.applications.Xception(
        include_top=False, weights=str(weights_dir / file_name), input_shape=(71, 71, 3)
    )
    expected_input = keras.applications.xception.preprocess_input(rgb.copy())
    # The first convolution, and where the recipe's backbone ends (its cut after block 8: the layer at the same
    # position in Keras's whole Xception, whose residual adds Keras numbers per session).
    end = len(ours.layers) - 1
    assert ours.layers[end - 1].name == keras_xception.layers[end - 1].name  # the same layers up to there
    for ours_layer, keras_layer in ((ours.get_layer("block1_conv1"), keras_xception.get_layer("block1_conv1")),
                                    (ours.layers[end], keras_xception.layers[end])):  # fmt: skip
        keras_side = keras.Model(keras_xception.input, keras_layer.output).predict(expected_input, verbose=0)
        probe = keras.Model(ours.input, ours_layer.output)
        ours_side = keras.Model(model.input, probe(model.get_layer("backbone_input").output))
        np.testing.assert_allclose(ours_side.predict(grey, verbose=0), keras_side, rtol=1e-4, atol=1e-4)


def test_missing_imagenet_weights_offline_is_one_line(tmp_path, monkeypatch, no_network):
    monkeypatch.setenv("FINETUNE_WEIGHTS_DIR", str(tmp_path))
    with pytest.raises(WeightsError) as caught:
        build_backbone(backbones.get("mobilenet_v2"), (32, 32), "imagenet", {"alpha": 0.35})
    message = str(caught.value)
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5" in message
    assert "FINETUNE_WEIGHTS_DIR" in message and "\n" not in message
    assert no_network  # Keras really tried its own download path


@pytest.mark.parametrize(
    "name, size, options",
    [
        ("mobilenet_v2", 96, {"alpha": 0.35}),
        ("mobilenet_v2", 50, {"alpha": 0.5}),
        ("mobilenet", 128, {"alpha": 0.25}),
        ("mobilenet_v3_small", 32, {}),
        ("resnet50", 32, {}),
        ("resnet50_v2", 32, {}),
        ("densenet121", 32, {}),
        ("efficientnet_b0", 32, {}),
        ("efficientnet_v2_b0", 32, {}),
        ("convnext_tiny", 32, {}),
        ("nasnet_mobile", 224, {}),
        ("inception_v3", 75, {}),
    ],
)
def test_canonical_file_names_are_the_ones_keras_asks_for(name, size, options, no_network):
    spec = backbones.get(name)
    with pytest.raises(WeightsError):
        build_backbone(spec, (size, size), "imagenet", options)
    assert no_network == [spec.imagenet_file((size, size), options)]


def test_weights_file_path_is_loaded(tmp_path):
    spec = backbones.get("mobilenet_v2")
    keras.utils.set_random_seed(5)
    reference = build_backbone(spec, (32, 32), None, {"alpha": 0.35})
    path = tmp_path / "mine.weights.h5"
    reference.save_weights(path)
    keras.utils.set_random_seed(6)
    loaded = build_backbone(spec, (32, 32), str(path), {"alpha": 0.35})
    np.testing.assert_array_equal(
        keras.ops.convert_to_numpy(reference.weights[0]), keras.ops.convert_to_numpy(loaded.weights[0])
    )


def test_unloadable_weights_file_is_a_weights_error(tmp_path):
    path = tmp_path / "broken.weights.h5"
    path.write_bytes(b"not an h5 file")
    with pytest.raises(WeightsError, match="cannot load weights"):
        build_backbone(backbones.get("mobilenet_v2"), (32, 32), str(path), {"alpha": 0.35})


def test_a_weights_file_of_another_architecture_names_the_file_and_the_first_layer_that_does_not_fit(tmp_path):
    spec = backbones.get("mobilenet_v2")
    path = tmp_path / "narrow.weights.h5"
    build_backbone(spec, (32, 32), None, {"alpha": 0.35}).save_weights(path)
    with pytest.raises(WeightsError) as caught:
        build_backbone(spec, (32, 32), str(path), {"alpha": 0.5})
    message = str(caught.value)
    assert "\n" not in message and str(path) in message
    assert "does not fit this architecture: layer 'block_1_project' has a weight of shape (1, 1, 48, 16)" in message
    assert "the file (1, 1, 48, 8)" in message


_SIZE_WORDS = {"tiny": 0, "small": 1, "mobile": 1, "s": 1, "base": 2, "m": 2, "large": 3, "l": 3, "xlarge": 4}


def _family_and_size(name: str) -> tuple[str, int]:
    """``resnet152_v2`` -> (``resnet_v2``, 152); ``convnext_tiny`` -> (``convnext_``, 0); ``xception`` -> itself."""
    found = re.fullmatch(r"(.*?)(\d+|tiny|small|base|xlarge|large|mobile|s|m|l)(_v2)?", name)
    if found is None:
        return name, 0
    size = found.group(2)
    return found.group(1) + (found.group(3) or ""), int(size) if size.isdigit() else _SIZE_WORDS[size]


def _smallest_of_each_family(names: list[str]) -> list:
    """Every name; CI runs the smallest member of each family (efficientnet_b0, resnet50, convnext_tiny, ...)."""
    smallest: dict[str, tuple[int, str]] = {}
    for name in names:
        family, size = _family_and_size(name)
        smallest[family] = min(smallest.get(family, (size, name)), (size, name))
    kept = {name for _, name in smallest.values()}
    return [
        name if name in kept else outside_ci_cover(name, reason="a smaller one of its family runs") for name in names
    ]


@pytest.mark.slow
@pytest.mark.parametrize(
    "name", _smallest_of_each_family([name for name in backbones.backbones.names() if backbones.get(name).weights_file])
)
def test_every_backbone_builds_splits_and_names_its_weights(name, no_network):
    spec = backbones.get(name)
    size = 331 if name == "nasnet_large" else 224 if name == "nasnet_mobile" else spec.min_size
    if spec.locate_weights is None:  # keras.applications: offline, Keras's download of this very file fails
        with pytest.raises(WeightsError):
            build_backbone(spec, (size, size), "imagenet")
        assert no_network == [spec.imagenet_file((size, size))]
    keras.backend.clear_session()
    model = build_backbone(spec, (size, size), None)
    stem, blocks = split_into_blocks(model, spec)
    assert len(blocks) >= 5
    assigned = list(stem) + [layer for block in blocks for layer in block.layers]
    assert len(assigned) == len({id(layer) for layer in assigned}) == len(model.layers) - 1


def test_a_backbone_without_imagenet_weights_refuses_them(tiny_recipe_dict):
    import finetune

    tiny_recipe_dict["model"]["backbone"] = {"name": "mlp", "weights": "imagenet"}
    with pytest.raises(finetune.RecipeError, match="mlp has no ImageNet weights"):
        finetune.load_recipe(tiny_recipe_dict)


def test_an_imagenet_width_keras_has_no_file_for_is_a_recipe_error_naming_the_allowed_ones(tiny_recipe_dict):
    import finetune

    tiny_recipe_dict["model"]["backbone"] = {"name": "mobilenet", "weights": "imagenet", "options": {"alpha": 0.3}}
    with pytest.raises(RecipeError) as caught:
        finetune.load_recipe(tiny_recipe_dict)
    message = str(caught.value)
    assert "model.backbone.options.alpha" in message and "0.25, 0.5, 0.75, 1 only, got 0.3" in message
    assert backbones.get("mobilenet").imagenet_file((128, 128), {"alpha": 0.25}) == "mobilenet_2_5_128_tf_no_top.h5"
    with pytest.raises(RecipeError, match=r"alpha 0.35, 0.5, 0.75, 1, 1.3, 1.4 only"):
        backbones.get("mobilenet_v2").imagenet_file((96, 96), {"alpha": 0.25})


def test_a_constructor_that_refuses_its_options_is_reported_as_such(no_network):
    # Keras refuses a depth multiplier for MobileNet's ImageNet weights before any download:
    # that is the recipe's setting, not a missing file.
    spec = backbones.get("mobilenet")
    with pytest.raises(RecipeError) as caught:
        build_backbone(spec, (128, 128), "imagenet", {"depth_multiplier": 2})
    assert "backbone 'mobilenet'" in str(caught.value) and "depth multiplier must be 1" in str(caught.value)
    assert "offline" not in str(caught.value) and no_network == []
    assert build_backbone(spec, (128, 128), None, {"depth_multiplier": 2}).name  # fine without ImageNet weights
    with pytest.raises(RecipeError, match=r"model.backbone.options for 'vgg16'.*unexpected keyword"):
        build_backbone(backbones.get("vgg16"), (32, 32), None, {"depth_multiplier": 2})
    # A download that fails is still a weights error naming the file.
    with pytest.raises(WeightsError, match=r"mobilenet_1_0_128_tf_no_top\.h5"):
        build_backbone(spec, (128, 128), "imagenet")
    assert no_network == ["mobilenet_1_0_128_tf_no_top.h5"]
