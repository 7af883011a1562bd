"""One run, one session: every command opens its run the same way, logs through `logging`, and hands
finetune's callbacks (and a user's) their run explicitly."""

import copy
import logging
from typing import ClassVar

import pytest
import yaml
from conftest import cli_in_process

import finetune
from finetune.catalog import callbacks as callback_registry
from finetune.catalog.callbacks import RunCallback


@pytest.fixture
def counted(monkeypatch):
    """How often a recipe's YAML is parsed and a data source loaded."""
    from finetune.data import loading
    from finetune.recipe import load

    counts = {"recipe": 0, "data": 0}
    parse, get = load.parse_yaml, loading.get

    def parse_counted(*args, **kwargs):
        counts["recipe"] += 1
        return parse(*args, **kwargs)

    class Counted:
        def __init__(self, source):
            self.source = source

        def __getattr__(self, name):
            return getattr(self.source, name)

        def load(self, config):
            counts["data"] += 1
            return self.source.load(config)

    monkeypatch.setattr(load, "parse_yaml", parse_counted)
    monkeypatch.setattr(loading, "get", lambda name: Counted(get(name)))
    return counts


# A dense backbone: each run here is seconds; a head phase on cached features, then the whole network.
MLP_TWO_PHASES = {
    "name": "session_mlp",
    "seed": 0,
    "precision": "float32",
    "data": {
        "source": "fashion_mnist",
        "image_size": 28,
        "validation_split": 0.2,
        "train_limit": 160,
        "test_limit": 64,
    },
    "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [16]}}, "head": {"dense": []}},
    "training": {"batch_size": 32, "verbose": 0, "tensorboard": False, "gradient_health_every": 0, "cache": "memory"},
    "phases": [
        {"name": "head", "epochs": 1, "trainable": "none", "optimizer": {"name": "adam", "learning_rate": 1e-3}},
        {"name": "finetune", "epochs": 1, "trainable": "all", "optimizer": {"name": "sgd", "learning_rate": 0.05}},
    ],
    "export": {"formats": ["keras"]},
}


@pytest.fixture
def mlp_recipe_dict():
    return copy.deepcopy(MLP_TWO_PHASES)


def _recipe_file(folder, recipe_dict):
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe_dict))
    return path


def test_run_resume_and_lr_find_read_the_recipe_once_and_load_the_data_once(tmp_path, mlp_recipe_dict, counted):
    from finetune.runner import conclude

    recipe = _recipe_file(tmp_path, mlp_recipe_dict)
    result = cli_in_process("run", str(recipe), "--out", str(tmp_path / "run"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert counted == {"recipe": 1, "data": 1}

    counted.update(recipe=0, data=0)
    original = conclude.evaluate

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    conclude.evaluate = killed  # a run killed while it evaluates, then resumed
    try:
        with pytest.raises(KeyboardInterrupt):
            finetune.run(recipe, out=tmp_path / "killed", log=None)
    finally:
        conclude.evaluate = original
    counted.update(recipe=0, data=0)
    result = cli_in_process("resume", str(tmp_path / "killed"), "--quiet")
    assert result.returncode == 0, result.stderr
    assert counted == {"recipe": 1, "data": 1}

    counted.update(recipe=0, data=0)
    result = cli_in_process("lr-find", str(recipe), "--steps", "5", "--out", str(tmp_path / "sweep"))
    assert result.returncode == 0, result.stderr
    assert counted == {"recipe": 1, "data": 1}


class Remember(RunCallback):
    """A user's callback that needs the run: what set_run handed it, kept for the test."""

    seen: ClassVar[list] = []

    def set_run(self, fit):
        super().set_run(fit)
        Remember.seen.append((fit.phase.name, fit.run.model, fit.run.run_dir, fit.fit_model, fit.sample()))


if "remember_for_test" not in callback_registry.callbacks:  # as a plugin registers its callback
    callback_registry.callbacks.register("remember_for_test", lambda run_dir, phase: Remember())


def test_a_custom_callback_gets_its_run_through_set_run(tmp_path, mlp_recipe_dict):
    for phase in mlp_recipe_dict["phases"]:
        phase["callbacks"] = ["remember_for_test"]
    Remember.seen = []
    result = finetune.run(finetune.load_recipe(mlp_recipe_dict), out=tmp_path / "run", log=None)
    assert [name for name, *_ in Remember.seen] == ["head", "finetune"]
    _, model, run_dir, fitted, (x, y) = Remember.seen[0]
    assert run_dir == result.run_dir and model is not fitted  # the head trains on cached features
    assert fitted.input_shape[1:] == x.shape[1:] and len(x) == len(y) == 32  # one batch of what it trains on
    assert all(seen[1] is model for seen in Remember.seen)  # the whole model, the same in every phase


def test_a_library_users_logging_controls_a_run(tmp_path, mlp_recipe_dict):
    """Silenced by the `finetune` logger's level; a handler of theirs gets the warnings as WARNING records."""
    logger = logging.getLogger("finetune")
    mlp_recipe_dict["phases"] = mlp_recipe_dict["phases"][1:]
    mlp_recipe_dict["phases"][0]["optimizer"] = {"name": "adam", "learning_rate": 5.0}  # finite, and far worse: a
    recipe = finetune.load_recipe(mlp_recipe_dict)  # divergence warning

    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    handler = Keep()
    logger.addHandler(handler)
    level = logger.level
    root_records: list[logging.LogRecord] = []
    at_root = Keep()
    at_root.emit = root_records.append  # a root handler, as TensorFlow's absl installs one while exporting
    logging.getLogger().addHandler(at_root)
    try:
        lines: list[str] = []
        finetune.run(recipe, out=tmp_path / "loud", log=lines.append)
        assert not [record for record in root_records if record.name.startswith("finetune")]  # printed once
        warnings = [record.getMessage() for record in records if record.levelno == logging.WARNING]
        assert any("the model got worse while training" in message for message in warnings), warnings
        assert not any(message.startswith(("[finetune]", "warning:")) for message in warnings)  # the handler adds those
        assert any(line.startswith("[finetune] warning: phase finetune ended its first") for line in lines), lines
        assert any(line.startswith("[finetune] run folder ") for line in lines)

        records.clear()
        logger.setLevel(logging.CRITICAL)
        lines.clear()
        finetune.run(recipe, out=tmp_path / "silent", log=lines.append)
        assert lines == [] and records == []
    finally:
        logger.removeHandler(handler)
        logging.getLogger().removeHandler(at_root)
        logger.setLevel(level)
