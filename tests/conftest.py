import contextlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import copy
import subprocess
import sys
from pathlib import Path

import keras
import pytest

import finetune
from finetune.allocator import keep_freed_memory

keep_freed_memory()  # as the command line does: freed tensors' pages reused, not faulted in again

ROOT = Path(__file__).resolve().parents[1]

# CI runs a cover of the costliest cases (every behaviour once, not every variant of it) to stay within
# its 30 minutes; FINETUNE_MATRIX=full runs every case: every matrix cell, backbone and variant.
FULL_MATRIX = os.environ.get("FINETUNE_MATRIX") == "full"


def outside_ci_cover(*values, reason: str):
    """A ``pytest.param`` of ``values`` that CI skips (``reason`` says what covers it); FINETUNE_MATRIX=full runs it."""
    mark = pytest.mark.skipif(not FULL_MATRIX, reason=f"outside CI's cover ({reason}); FINETUNE_MATRIX=full runs it")
    return pytest.param(*values, marks=mark)


# A recipe small enough for CPU tests: MobileNetV2 at width 0.35 on 32x32 inputs.
TINY_RECIPE = {
    "name": "tiny",
    "seed": 0,
    "precision": "float32",
    "data": {
        "source": "fashion_mnist",
        "image_size": 32,
        "validation_split": 0.2,
        "train_limit": 200,
        "test_limit": 100,
    },
    "model": {
        "backbone": {"name": "mobilenet_v2", "weights": None, "options": {"alpha": 0.35}},
        "head": {"dense": [16], "dropout": 0.1},
    },
    # No SavedModel, TensorBoard or gradient sampling unless a test asks: each costs seconds per run.
    "training": {"batch_size": 32, "verbose": 0, "tensorboard": False, "gradient_health_every": 0},
    "export": {"formats": ["keras"]},
    "phases": [
        {"name": "head", "epochs": 1, "trainable": "none", "optimizer": {"name": "adam", "learning_rate": 1e-3}},
        {
            "name": "finetune",
            "epochs": 1,
            "trainable": {"top_blocks": 2},
            "optimizer": {"name": "sgd", "learning_rate": 1e-2, "momentum": 0.9},
        },
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
    from finetune.backbones.calibration import save_calibrated_weights

    # Random weights with calibrated BatchNorm act like a pretrained backbone (healthy features).
    path = tmp_path_factory.mktemp("weights") / "mobilenet_v2_035_32_calibrated.weights.h5"
    save_calibrated_weights("mobilenet_v2", 32, path, images=256, options={"alpha": 0.35}, batch_size=256)
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

    monkeypatch.setattr(file_utils, "get_file", refuse)  # what keras.applications call
    monkeypatch.setattr(keras.utils, "get_file", refuse)  # the public name, as finetune's fetch calls it
    return calls


def layout_of(model, recipe):
    """The backbone layout a run of ``recipe`` computes for ``model``."""
    from finetune.model import layout
    from finetune.plan import resolve

    return layout(model, resolve(recipe).model)


def configure(model, recipe, phase):
    from finetune.training.phases import configure_phase

    return configure_phase(model, layout_of(model, recipe), phase)


def compile_phase(model, recipe, phase, steps=1):
    from finetune.training.phases import compile_for_phase

    return compile_for_phase(model, layout_of(model, recipe), phase, steps, settings=recipe.training)


def fit(model, recipe, phase, dataset, *, initial_epoch=0, phase_epochs_done=0, **kwargs):
    """One phase fitted as a run fits it (``initial_epoch``: the run's epoch it starts at)."""
    from finetune.training.context import PhaseRun, RunContext
    from finetune.training.phases import fit_phase, steps_per_epoch

    run = RunContext(model, layout_of(model, recipe), dataset, (phase,), recipe.training, seed=recipe.seed)
    steps = steps_per_epoch(phase, recipe.training, len(dataset.train))
    first = initial_epoch - phase_epochs_done
    return fit_phase(run, PhaseRun(phase, 0, first_epoch=first, steps=steps, epochs_done=phase_epochs_done), **kwargs)


@contextlib.contextmanager
def logged_lines():
    """The ``finetune`` logger's lines, as a run's ``log=`` gets them, in a list."""
    from finetune.progress import lines_to

    lines: list[str] = []
    with lines_to(lines.append):
        yield lines


def long_recipe_file(folder, weights, epochs: int):
    """The tiny recipe's head phase alone, ``epochs`` long, saved each epoch, as a YAML file for the CLI."""
    import yaml

    recipe = {**TINY_RECIPE, "phases": [{**TINY_RECIPE["phases"][0], "epochs": epochs}]}
    recipe["model"] = {
        **TINY_RECIPE["model"],
        "backbone": {**TINY_RECIPE["model"]["backbone"], "weights": str(weights)},
    }
    recipe["training"] = {**TINY_RECIPE["training"], "checkpoint_seconds": 0, "cache": "off"}
    path = Path(folder) / "long.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def cli(*args) -> subprocess.CompletedProcess:
    """``python -m finetune ARGS`` in a fresh process: the real entry point, its exit code and its stderr."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "finetune", *args], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )


def cli_in_process(*args) -> subprocess.CompletedProcess:
    """``finetune ARGS`` through click's runner, answered as :func:`cli` answers: a fresh process costs
    ~10 s of imports, so only tests of the entry point itself need :func:`cli`."""
    from click.testing import CliRunner

    from finetune.cli import main

    result = CliRunner().invoke(main, list(args))
    return subprocess.CompletedProcess(list(args), result.exit_code, result.stdout, result.stderr)
