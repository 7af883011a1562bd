"""`model.backbone: {name: run, path: RUN_DIR}`: a trained model without its head as a backbone."""

import hashlib

import keras
import numpy as np
import pytest

import finetune
from finetune.backbones.blocks import get_backbone
from finetune.errors import RecipeError


def fmnist_recipe(name, seed, backbone, phases, train_limit, test_limit):
    """A small 28x28 Fashion-MNIST recipe without validation hold-out or export."""
    return {
        "name": name,
        "seed": seed,
        "precision": "float32",
        "data": {
            "source": "fashion_mnist",
            "image_size": 28,
            "validation_split": 0.0,
            "train_limit": train_limit,
            "test_limit": test_limit,
        },
        "model": {"backbone": backbone},
        "training": {"batch_size": 32, "verbose": 0, "checkpoint_seconds": 0},
        "export": {"saved_model": False},
        "phases": phases,
    }


MLP_RUN = fmnist_recipe(
    "mlp_a",
    0,
    {"name": "mlp", "weights": None, "options": {"dense": [32, 16, 8], "batch_norm": "after"}},
    [{"name": "train", "epochs": 1, "trainable": "all", "optimizer": {"name": "adam"}}],
    600,
    200,
)


def reuse_recipe(run_dir, **changes):
    recipe = fmnist_recipe(
        "mlp_b",
        1,
        {"name": "run", "path": str(run_dir)},
        [
            {"name": "frozen", "epochs": 1, "trainable": "none", "optimizer": {"name": "sgd", "learning_rate": 0.1}},
            {
                "name": "top",
                "epochs": 1,
                "trainable": {"top_blocks": 1},
                "optimizer": {"name": "sgd", "learning_rate": 0.1},
            },
        ],
        200,
        100,
    )
    recipe.update(changes)
    return recipe


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    keras.backend.clear_session()
    return finetune.run(finetune.load_recipe(MLP_RUN), out=tmp_path_factory.mktemp("a") / "run", log=lambda _: None)


def backbone_weights(model):
    return {w.path: keras.ops.convert_to_numpy(w).copy() for w in get_backbone(model).weights}


def test_reused_backbone_starts_from_the_runs_trained_weights(trained_run):
    model = finetune.build_model(finetune.load_recipe(reuse_recipe(trained_run.run_dir)))
    original = get_backbone(trained_run.model)
    clone = get_backbone(model)
    assert clone is not original
    assert [w.path for w in clone.weights] == [w.path for w in original.weights]
    for mine, theirs in zip(clone.weights, original.weights, strict=True):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(mine), keras.ops.convert_to_numpy(theirs))
    assert model.get_layer("backbone_input").preprocessing == "unit"  # the mlp's own input scaling


def test_training_on_a_reused_backbone_follows_block_rules_and_never_changes_the_run(trained_run, tmp_path):
    model_file = trained_run.run_dir / "model.keras"
    before_file = hashlib.sha256(model_file.read_bytes()).hexdigest()
    start = backbone_weights(finetune.build_model(finetune.load_recipe(reuse_recipe(trained_run.run_dir))))

    frozen_only = reuse_recipe(trained_run.run_dir, phases=reuse_recipe(trained_run.run_dir)["phases"][:1])
    frozen = finetune.run(finetune.load_recipe(frozen_only), out=tmp_path / "frozen", log=lambda _: None)
    after_frozen = backbone_weights(frozen.model)
    for path, value in start.items():
        np.testing.assert_array_equal(value, after_frozen[path], err_msg=path)

    keras.backend.clear_session()
    both = finetune.run(
        finetune.load_recipe(reuse_recipe(trained_run.run_dir)), out=tmp_path / "both", log=lambda _: None
    )
    after = backbone_weights(both.model)
    top = [path for path in start if path.startswith("block3_dense")]
    assert top, sorted(start)
    assert any(not np.array_equal(start[path], after[path]) for path in top)  # the top block trained
    # Lower blocks and every BatchNorm stay frozen; BatchNorm found by its type, not by a name Keras gives it.
    backbone = get_backbone(both.model)
    frozen = [
        weight.path
        for layer in backbone.layers
        for weight in layer.weights
        if isinstance(layer, keras.layers.BatchNormalization) or layer.name.startswith(("block1_", "block2_"))
    ]
    batch_norm = [
        weight.path
        for layer in backbone.layers
        if isinstance(layer, keras.layers.BatchNormalization)
        for weight in layer.weights
    ]
    assert len(batch_norm) == 3 * 4 and len(frozen) > len(batch_norm)  # three BN layers (batch_norm: after)
    for path in frozen:
        np.testing.assert_array_equal(start[path], after[path], err_msg=path)
    assert hashlib.sha256(model_file.read_bytes()).hexdigest() == before_file
    assert both.metrics["test"]["examples"] == 100


def test_bad_run_backbones_are_one_line_recipe_errors(trained_run, tmp_path):
    with pytest.raises(RecipeError, match="does not exist"):
        finetune.load_recipe(reuse_recipe(tmp_path / "missing"))
    (tmp_path / "unfinished").mkdir()
    (tmp_path / "unfinished" / "recipe.yaml").write_text("name: x\n")
    with pytest.raises(RecipeError, match=r"no model\.keras"):
        finetune.load_recipe(reuse_recipe(tmp_path / "unfinished"))
    with pytest.raises(RecipeError, match="trained at 28x28"):
        finetune.load_recipe(reuse_recipe(trained_run.run_dir, data={"source": "fashion_mnist", "image_size": 32}))
    with pytest.raises(RecipeError, match="path"):
        finetune.load_recipe(reuse_recipe(trained_run.run_dir, model={"backbone": {"name": "run"}}))
    with pytest.raises(RecipeError, match="only for name: run"):
        finetune.load_recipe(reuse_recipe(trained_run.run_dir, model={"backbone": {"name": "mlp", "path": "x"}}))
    too_many = reuse_recipe(trained_run.run_dir)
    too_many["phases"][1]["trainable"] = {"top_blocks": 4}
    with pytest.raises(RecipeError, match="top_blocks"):
        finetune.run(finetune.load_recipe(too_many), out=tmp_path / "many", log=lambda _: None)


def test_a_reused_standardize_backbone_keeps_its_training_statistics(tmp_path):
    standardized = {
        **MLP_RUN,
        "name": "mlp_std",
        "model": {
            "backbone": {"name": "mlp", "weights": None, "options": {"dense": [16, 8], "input_scaling": "standardize"}}
        },
    }
    earlier = finetune.run(finetune.load_recipe(standardized), out=tmp_path / "a", log=lambda _: None)
    trained = earlier.model.get_layer("backbone_input")
    keras.backend.clear_session()

    # Sandals and shirts alone have other pixel statistics than all ten classes.
    recipe = reuse_recipe(
        earlier.run_dir,
        data={
            "source": "fashion_mnist",
            "image_size": 28,
            "classes": ["Sandal", "Shirt"],
            "validation_split": 0.0,
            "train_limit": 100,
            "test_limit": 50,
        },
    )
    result = finetune.run(finetune.load_recipe(recipe), out=tmp_path / "b", log=lambda _: None)
    reused = result.model.get_layer("backbone_input")
    assert reused.preprocessing == "standardize"
    assert float(keras.ops.convert_to_numpy(reused.mean)) == float(keras.ops.convert_to_numpy(trained.mean))
    assert float(keras.ops.convert_to_numpy(reused.std)) == float(keras.ops.convert_to_numpy(trained.std))
    from finetune import data as data_module

    new_images = data_module.load_dataset(finetune.load_recipe(recipe).data, seed=1).train.images
    assert abs(float(new_images.mean()) - float(keras.ops.convert_to_numpy(trained.mean))) > 1.0  # would have moved


def test_a_reused_run_folder_is_read_once_per_process(trained_run, tmp_path, monkeypatch):
    """Loading, resolving, building and training read the run's recipe once and its model.keras once."""
    from finetune.backbones import reuse

    reuse._earlier_run.cache_clear()
    reuse._trained_backbone.cache_clear()
    reads, loads = [], []
    read_recipe, load_saved_model = reuse.read_recipe, reuse.load_saved_model
    monkeypatch.setattr(reuse, "read_recipe", lambda path: reads.append(path) or read_recipe(path))
    monkeypatch.setattr(
        reuse, "load_saved_model", lambda path, **kw: loads.append(path) or load_saved_model(path, **kw)
    )
    recipe = finetune.load_recipe(reuse_recipe(trained_run.run_dir))
    finetune.build_model(recipe)
    finetune.run(recipe, out=tmp_path / "run", log=lambda _: None)
    assert [path.name for path in reads] == ["recipe.yaml"]
    assert [str(path) for path in loads] == [str(trained_run.run_dir.resolve() / "model.keras")]
