import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import copy
from pathlib import Path

import keras
import pytest

import finetune

ROOT = Path(__file__).resolve().parents[1]

# A recipe small enough for CPU tests: MobileNetV2 at width 0.35 on 32x32 inputs.
TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    "precision": "float32",
    "data": {"source": "fashion_mnist", "image_size": 32, "validation_split": 0.2,
             "train_limit": 200, "test_limit": 100},
    "model": {
        "backbone": {"name": "mobilenet_v2", "weights": None, "options": {"alpha": 0.35}},
        "head": {"dense": [16], "dropout": 0.1},
    },
    "training": {"batch_size": 32, "verbose": 0},
    "phases": [
        {"name": "head", "epochs": 1, "trainable": "none", "optimizer": {"name": "adam", "learning_rate": 1e-3}},
        {"name": "finetune", "epochs": 1, "trainable": {"top_blocks": 2},
         "optimizer": {"name": "sgd", "learning_rate": 1e-2, "momentum": 0.9}},
    ],
}


@pytest.fixture(autouse=True)
def fresh_keras():
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")


@pytest.fixture(autouse=True)
def isolated_weight_folders(tmp_path, monkeypatch):
    """Weight lookups see an empty Keras cache, never the developer's ~/.keras/models."""
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.delenv("FINETUNE_WEIGHTS_DIR", raising=False)


@pytest.fixture(scope="session")
def tiny_backbone_weights(tmp_path_factory):
    """MobileNetV2 (alpha 0.35, 32x32) weights with calibrated BatchNorm statistics."""
    from finetune import backbones, data
    from finetune.layers import BackboneInput
    from finetune.recipe import DataConfig

    keras.utils.set_random_seed(0)
    spec = backbones.get("mobilenet_v2")
    backbone = backbones.build_backbone(spec, (32, 32), None, {"alpha": 0.35})
    dataset = data.load_dataset(DataConfig(train_limit=256, validation_split=0.0), seed=0)
    images = BackboneInput(32, 32, spec.preprocessing)(dataset.train.images)
    # Random weights with calibrated BatchNorm act like a pretrained backbone (healthy features).
    backbones.calibrate_batch_norm(backbone, images)
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_035_32_calibrated.weights.h5"
    backbone.save_weights(path)
    keras.backend.clear_session()
    return path


@pytest.fixture
def tiny_recipe_dict(tiny_backbone_weights):
    recipe = copy.deepcopy(TINY_RECIPE)
    recipe["model"]["backbone"]["weights"] = str(tiny_backbone_weights)
    return recipe


@pytest.fixture
def tiny_recipe(tiny_recipe_dict):
    return finetune.load_recipe(tiny_recipe_dict)


@pytest.fixture
def no_network(monkeypatch):
    """Make every Keras download fail loudly, as on an offline machine."""
    from keras.src.utils import file_utils

    calls = []

    def refuse(fname=None, origin=None, *args, **kwargs):
        calls.append(fname)
        raise Exception(f"URL fetch failure on {origin}: no network in tests")

    monkeypatch.setattr(file_utils, "get_file", refuse)
    return calls
