"""Trust: a run interrupted or killed at any moment resumes where its last checkpoint stood."""

import csv
import json
import os
import signal
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from conftest import ROOT

import finetune
from finetune.errors import RunFolderError, RunInterrupted, TrainingDiverged


def _recipe(tiny_recipe_dict, **training):
    tiny_recipe_dict["model"]["head"] = {"dense": [16], "dropout": 0.2}
    tiny_recipe_dict["phases"][0]["epochs"] = 2
    tiny_recipe_dict["phases"][1]["epochs"] = 3
    tiny_recipe_dict["training"].update({"checkpoint_seconds": 0, "shuffle": True, **training})
    return tiny_recipe_dict


class InterruptAtStep(keras.callbacks.Callback):
    """Ctrl-C in the middle of epoch ``epoch`` (1-based, counted across phases)."""

    def __init__(self, epoch, step=2):
        super().__init__()
        self.epoch, self.step, self.current = epoch, step, 0

    def on_epoch_begin(self, epoch, logs=None):
        self.current = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        if self.current == self.epoch and batch + 1 == self.step:
            raise KeyboardInterrupt


def _with_callback(monkeypatch, callback):
    """Every phase's fit also runs ``callback``; returns the original ``fit_phase``."""
    from finetune.training import train as training

    original = training.fit_phase

    def fit_with_callback(*args, callbacks=None, **kwargs):
        return original(*args, callbacks=[*(callbacks or []), callback], **kwargs)

    monkeypatch.setattr(training, "fit_phase", fit_with_callback)
    return original


def _interrupt_at(monkeypatch, epoch, step=2):
    return _with_callback(monkeypatch, InterruptAtStep(epoch, step))


def _rows(run_dir):
    with (run_dir / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


def _deterministic():
    import tensorflow as tf

    tf.config.experimental.enable_op_determinism()


@pytest.mark.slow  # an end-to-end run: moved out of the fast suite (kept under 10 minutes)
def test_a_run_interrupted_in_its_second_phase_resumes_to_the_same_weights(tmp_path, tiny_recipe_dict, monkeypatch):
    """Tolerance: rtol 1e-5, atol 1e-6 on every weight, with TensorFlow's op determinism on.

    The second phase runs 1cycle (rate and momentum move every step), so its step must go on where
    it was: the resumed rows' learning rates equal the uninterrupted run's.
    """
    _deterministic()
    raw = _recipe(tiny_recipe_dict)
    raw["phases"][1]["schedule"] = {"name": "one_cycle"}
    raw["training"]["gradient_health_every"] = 3  # its samples must not disturb the RNG or BN statistics
    recipe = finetune.load_recipe(raw)
    alone = finetune.run(recipe, out=tmp_path / "alone", log=lambda line: None)

    original = _interrupt_at(monkeypatch, epoch=4)  # the second of the finetune phase's three epochs
    with pytest.raises(RunInterrupted) as interrupted:
        finetune.run(recipe, out=tmp_path / "killed", log=lambda line: None)
    run_dir = tmp_path / "killed"
    assert interrupted.value.run_dir == run_dir
    assert json.loads((run_dir / "run.json").read_text())["status"] == "interrupted"
    rows_before = (run_dir / "history.csv").read_bytes()
    assert len(_rows(run_dir)) == 3

    from finetune.training import train as training

    monkeypatch.setattr(training, "fit_phase", original)
    lines = []
    resumed = finetune.resume(run_dir, log=lines.append)
    assert any("resuming after epoch 3 (phase finetune)" in line for line in lines)
    assert any("phase head: finished before, not redone" in line for line in lines)
    assert (run_dir / "history.csv").read_bytes().startswith(rows_before)  # earlier rows byte for byte
    ours, theirs = _rows(run_dir), _rows(alone.run_dir)
    assert [row["epoch"] for row in ours] == ["1", "2", "3", "4", "5"]
    for mine, other in zip(ours, theirs, strict=True):
        assert mine["phase"] == other["phase"]
        for key in ("phase_epoch", "learning_rate", "loss", "val_accuracy"):
            assert float(mine[key]) == pytest.approx(float(other[key]), rel=1e-5), (key, mine, other)
    for mine, other in zip(resumed.model.weights, alone.model.weights, strict=True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(mine), keras.ops.convert_to_numpy(other), rtol=1e-5, atol=1e-6, err_msg=mine.path
        )
    assert resumed.test_accuracy == pytest.approx(alone.test_accuracy)
    status = json.loads((run_dir / "run.json").read_text())
    assert status["status"] == "finished" and len(status["resumed"]) == 1


class SlowStart(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        time.sleep(2)


@pytest.mark.slow  # an end-to-end run: moved out of the fast suite (kept under 10 minutes)
def test_a_kill_during_evaluation_redoes_only_evaluation_and_export(tmp_path, tiny_recipe_dict, monkeypatch):
    """And the run's time counts the first process's training (2 s of sleep in it), not only the resumed one."""
    from finetune.runner import conclude as run_end
    from finetune.training import train as training

    recipe = finetune.load_recipe(_recipe(tiny_recipe_dict))
    original = run_end.evaluate
    original_fit = _with_callback(monkeypatch, SlowStart())

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(run_end, "evaluate", killed)
    with pytest.raises(RunInterrupted):
        finetune.run(recipe, out=tmp_path / "run", log=lambda line: None)
    history = (tmp_path / "run" / "history.csv").read_bytes()
    trained_for = json.loads((tmp_path / "run" / "state.json").read_text())["run_seconds"]
    assert trained_for >= 4  # two phases, each slept 2 s
    monkeypatch.setattr(run_end, "evaluate", original)
    monkeypatch.setattr(training, "fit_phase", original_fit)
    lines = []
    began = time.perf_counter()
    result = finetune.resume(tmp_path / "run", log=lines.append)
    assert trained_for <= result.metrics["seconds"] <= trained_for + time.perf_counter() - began
    assert (tmp_path / "run" / "history.csv").read_bytes() == history  # no epoch ran again
    assert not any(line.startswith("[finetune] phase") and "epochs," in line for line in lines)
    assert (tmp_path / "run" / "metrics.json").exists() and result.test_accuracy > 0
    assert not (tmp_path / "run" / "checkpoint.keras").exists()
    assert (tmp_path / "run" / "mistakes.png").is_file() and (tmp_path / "run" / "report.html").is_file()


def test_resuming_a_finished_run_says_so_and_changes_nothing(tmp_path, tiny_recipe_dict):
    tiny_recipe_dict["phases"] = tiny_recipe_dict["phases"][:1]
    finished = finetune.run(finetune.load_recipe(tiny_recipe_dict), out=tmp_path / "run", log=lambda line: None)
    before = {path.name: path.stat().st_mtime_ns for path in finished.run_dir.iterdir()}
    lines = []
    result = finetune.resume(finished.run_dir, log=lines.append)
    assert lines == [f"[finetune] run {finished.run_dir} already finished; nothing to resume"]
    assert result.test_accuracy == finished.test_accuracy
    assert {path.name: path.stat().st_mtime_ns for path in finished.run_dir.iterdir()} == before


def _interrupted_run(tmp_path, tiny_recipe_dict, monkeypatch):
    recipe = finetune.load_recipe(_recipe(tiny_recipe_dict))
    original = _interrupt_at(monkeypatch, epoch=2)
    with pytest.raises(RunInterrupted):
        finetune.run(recipe, out=tmp_path / "run", log=lambda line: None)
    from finetune.training import train as training

    monkeypatch.setattr(training, "fit_phase", original)
    return tmp_path / "run"


def test_resume_refuses_an_edited_recipe_and_a_folder_in_use(tmp_path, tiny_recipe_dict, monkeypatch):
    from finetune.runner.folder import RunFolder

    run_dir = _interrupted_run(tmp_path, tiny_recipe_dict, monkeypatch)
    with RunFolder(run_dir).locked(), pytest.raises(RunFolderError, match="is in use by another process"):
        finetune.resume(run_dir, log=lambda line: None)
    recipe = run_dir / "recipe.yaml"
    original = recipe.read_text()
    recipe.write_text(original.replace("epochs: 3", "epochs: 4"))
    with pytest.raises(RunFolderError, match=r"recipe\.yaml' was edited after the run started"):
        finetune.resume(run_dir, log=lambda line: None)
    recipe.write_text(original)
    with pytest.raises(RunFolderError, match=r"is not a run folder: it has no run\.json"):
        finetune.resume(tmp_path, log=lambda line: None)


def test_two_runs_claiming_one_folder_at_once_get_it_once(tmp_path):
    from finetune.runner.folder import new_run_dir

    (tmp_path / "out").mkdir()
    assert new_run_dir(tmp_path / "out", "x") == tmp_path / "out"
    (tmp_path / "out" / "run.json").unlink(missing_ok=False)  # empty again, as the second run saw it...
    os.close(os.open(tmp_path / "out" / "run.json", os.O_CREAT | os.O_WRONLY))  # ...but claimed meanwhile
    from finetune.runner import folder as folder_module

    checked = []
    real_check = folder_module.check_run_dir
    folder_module.check_run_dir = lambda out: checked.append(out)  # the check passed before the claim
    try:
        with pytest.raises(RunFolderError, match="was just claimed by another run"):
            new_run_dir(tmp_path / "out", "x")
    finally:
        folder_module.check_run_dir = real_check
    assert checked


def test_a_loss_that_explodes_stops_the_run_with_one_line_and_keeps_the_last_good_epoch(tmp_path, tiny_recipe_dict):
    recipe = _recipe(tiny_recipe_dict)
    recipe["phases"][1]["optimizer"] = {"name": "sgd", "learning_rate": 1e30}
    with pytest.raises(
        TrainingDiverged, match=r"loss became (nan|inf) in phase finetune, epoch 3, step \d+; .*clipnorm"
    ):
        finetune.run(finetune.load_recipe(recipe), out=tmp_path / "run", log=lambda line: None)
    status = json.loads((tmp_path / "run" / "run.json").read_text())
    assert status["status"] == "failed" and status["error"].startswith("loss became")
    saved = keras.saving.load_model(tmp_path / "run" / "checkpoint.keras", compile=False)
    assert all(np.isfinite(keras.ops.convert_to_numpy(weight)).all() for weight in saved.weights)
    assert json.loads((tmp_path / "run" / "state.json").read_text())["epochs_done"] == 2


@pytest.mark.slow
def test_sigkill_then_finetune_resume_finishes_the_run(tmp_path, tiny_backbone_weights):
    from conftest import long_recipe_file

    path = long_recipe_file(tmp_path, tiny_backbone_weights, epochs=40)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "finetune"]
    process = subprocess.Popen(
        [*command, "run", str(path), "--out", str(out)], stderr=subprocess.DEVNULL, cwd=ROOT, env=env
    )
    try:
        deadline = time.monotonic() + 300
        while len(_rows(out)) < 3 if (out / "history.csv").exists() else True:
            assert process.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=60)
    finally:
        process.kill()
    epochs_saved = json.loads((out / "state.json").read_text())["epochs_done"]
    assert epochs_saved >= 2 and len(_rows(out)) <= epochs_saved + 1  # at most one epoch lost
    result = subprocess.run(
        [*command, "resume", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"Epoch {epochs_saved + 1}/40" in result.stderr or f"resuming after epoch {epochs_saved}" in result.stderr
    assert [int(row["epoch"]) for row in _rows(out)] == list(range(1, 41))
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    again = subprocess.run(
        [*command, "resume", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120
    )
    assert again.returncode == 0 and "already finished" in again.stderr


JAX_RESUME = """
import copy, json, sys
import keras, numpy as np
sys.path.insert(0, "tests")
from conftest import TINY_RECIPE
import finetune
from finetune.training import train as training

raw = copy.deepcopy(TINY_RECIPE)
raw["model"]["backbone"]["weights"] = sys.argv[1]
raw["model"]["head"] = {"dense": [16], "dropout": 0.2}
raw["phases"][0]["epochs"], raw["phases"][1]["epochs"] = 2, 3
raw["training"].update({"checkpoint_seconds": 0, "shuffle": True})
recipe = finetune.load_recipe(raw)
alone = finetune.run(recipe, out=sys.argv[2] + "/alone", log=lambda line: None)
original = training.fit_phase

class Stop(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1
    def on_train_batch_end(self, batch, logs=None):
        if self.epoch == 4 and batch == 1:
            raise KeyboardInterrupt

training.fit_phase = lambda *a, callbacks=None, **k: original(*a, callbacks=[*(callbacks or []), Stop()], **k)
try:
    finetune.run(recipe, out=sys.argv[2] + "/killed", log=lambda line: None)
except KeyboardInterrupt:
    pass
training.fit_phase = original
resumed = finetune.resume(sys.argv[2] + "/killed", log=lambda line: None)
difference = max(
    float(np.abs(keras.ops.convert_to_numpy(a) - keras.ops.convert_to_numpy(b)).max())
    for a, b in zip(resumed.model.weights, alone.model.weights)
)
print(json.dumps({"backend": keras.backend.backend(), "difference": difference}))
"""


@pytest.mark.slow
def test_resume_on_the_jax_backend_gives_the_same_weights(tmp_path, tiny_backbone_weights):
    result = subprocess.run(
        [sys.executable, "-c", JAX_RESUME, str(tiny_backbone_weights), str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "KERAS_BACKEND": "jax", "PYTHONPATH": str(ROOT)},
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["backend"] == "jax"
    assert report["difference"] <= 1e-5
    rows = (tmp_path / "killed" / "history.csv").read_text().splitlines()
    assert [line.split(",")[:5] for line in rows] == [
        line.split(",")[:5] for line in (tmp_path / "alone" / "history.csv").read_text().splitlines()
    ]


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint_and_says_so(
    tmp_path, tiny_recipe_dict, monkeypatch
):
    import errno

    from finetune.training import checkpoints

    tiny_recipe_dict["phases"] = tiny_recipe_dict["phases"][:1]
    tiny_recipe_dict["phases"][0]["epochs"] = 3
    tiny_recipe_dict["training"]["checkpoint_seconds"] = 0
    real_save = keras.Model.save
    calls = []

    def save(model, path, *args, **kwargs):
        calls.append(str(path))
        if "checkpoint" in str(path) and len(calls) == 2:  # the second epoch's checkpoint: the disk is full
            real_save(model, path, *args, **kwargs)  # half written, then the error
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(model, path, *args, **kwargs)

    monkeypatch.setattr(keras.Model, "save", save)
    seen, lines = {}, []

    def log(line):  # what the checkpoint holds when the warning is given
        lines.append(line)
        if "not written" in line:
            seen["state"] = checkpoints.read_checkpoint(tmp_path / "run" / "checkpoint.keras").state

    result = finetune.run(finetune.load_recipe(tiny_recipe_dict), out=tmp_path / "run", log=log)
    warning = "checkpoint after epoch 2 not written ([Errno 28] No space left on device); the one after epoch 1 is kept"
    assert any(warning in line for line in lines), lines
    assert seen["state"].epochs_done == 1  # the epoch-1 checkpoint survived the failed write whole
    assert not list((tmp_path / "run").glob(".*partial*"))  # no half-written file left behind
    assert result.test_accuracy >= 0 and len(_rows(tmp_path / "run")) == 3


@pytest.mark.slow  # an end-to-end run: moved out of the fast suite (kept under 10 minutes)
def test_a_kill_during_export_leaves_no_half_saved_model_and_resume_writes_it(tmp_path, tiny_recipe_dict, monkeypatch):
    from finetune.export import saved_model

    tiny_recipe_dict["phases"] = tiny_recipe_dict["phases"][:1]
    tiny_recipe_dict["export"] = {"formats": ["keras", "saved_model"]}
    original = saved_model.write_text_atomically

    def killed(*args, **kwargs):  # the SavedModel is written, labels.txt not yet
        raise KeyboardInterrupt

    monkeypatch.setattr(saved_model, "write_text_atomically", killed)
    with pytest.raises(RunInterrupted):
        finetune.run(finetune.load_recipe(tiny_recipe_dict), out=tmp_path / "run", log=lambda line: None)
    assert not (tmp_path / "run" / "saved_model").exists()
    monkeypatch.setattr(saved_model, "write_text_atomically", original)
    finetune.resume(tmp_path / "run", log=lambda line: None)
    assert (tmp_path / "run" / "saved_model" / "labels.txt").read_text().splitlines()[0] == "T-shirt/top"
    assert not [path.name for path in (tmp_path / "run").iterdir() if "partial" in path.name]


# Two dense phases, each two epochs, with dropout: the head's, or the backbone's between BatchNorm layers
# that both phases train (BatchNorm statistics recomputed at each phase's end, through the dropout).
MLP_DROPOUT = {
    "name": "resume_mlp",
    "seed": 0,
    "precision": "float32",
    "data": {
        "source": "fashion_mnist",
        "image_size": 28,
        "validation_split": 0.2,
        "train_limit": 200,
        "test_limit": 64,
    },
    "model": {
        "backbone": {"name": "mlp", "weights": None, "options": {"dense": [16]}},
        "head": {"dense": [8], "dropout": 0.2},
    },
    "training": {
        "batch_size": 32,
        "verbose": 0,
        "tensorboard": False,
        "gradient_health_every": 0,
        "checkpoint_seconds": 0,
        "shuffle": True,
    },
    "phases": [
        {"name": "head", "epochs": 2, "trainable": "none", "optimizer": {"name": "adam", "learning_rate": 1e-2}},
        {"name": "finetune", "epochs": 2, "trainable": "all", "optimizer": {"name": "sgd", "learning_rate": 0.05}},
    ],
    "export": {"formats": ["keras"]},
}


class InterruptAtEpochBegin(keras.callbacks.Callback):
    """Ctrl-C as epoch ``epoch`` (1-based, counted across phases) begins, before its first step."""

    def __init__(self, epoch):
        super().__init__()
        self.epoch = epoch

    def on_epoch_begin(self, epoch, logs=None):
        if epoch + 1 == self.epoch:
            raise KeyboardInterrupt


class InterruptInValidation(InterruptAtStep):
    """Ctrl-C while epoch ``epoch`` (1-based, across phases) is validated: every step done, the epoch not ended."""

    def on_train_batch_end(self, batch, logs=None):
        pass

    def on_test_batch_end(self, batch, logs=None):
        if self.current == self.epoch:
            raise KeyboardInterrupt


def _mlp_dropout(variant: str) -> dict:
    """``head``: dropout in the head; ``batch_norm``: in the backbone too, between BatchNorm layers both phases
    train; ``views``: augmentation with cached augmented copies, drawn again as the second phase begins."""
    import copy

    raw = copy.deepcopy(MLP_DROPOUT)
    if variant == "batch_norm":
        raw["model"]["backbone"]["options"] = {"dense": [16, 16], "batch_norm": "after", "dropout": 0.2}
        for phase in raw["phases"]:
            phase.update(trainable="all", train_bn=True)
    if variant == "views":
        raw["model"]["backbone"]["options"] = {"dense": [16, 16]}
        raw["model"]["augment"] = ["random_translation"]
        raw["training"].update(augmented_views=2, cache="memory")
        raw["phases"][1].update(trainable={"top_blocks": 1}, epochs=3)
    return raw


@pytest.mark.parametrize(
    "variant, interrupt, saved",
    [
        ("head", InterruptAtEpochBegin(3), 2),  # the first phase ended and saved, the second not begun
        ("head", InterruptAtStep(3, step=2), 2),  # during the second phase's first epoch
        ("batch_norm", InterruptAtStep(3, step=2), 2),
        # Every step of the first phase done, its end (BatchNorm recomputed) not reached: its last epoch runs again.
        ("batch_norm", InterruptInValidation(2), 1),
        # Inside the second phase, whose augmented copies were drawn as it began, from the first phase's end.
        ("views", InterruptAtStep(4, step=2), 3),
    ],
    ids=[
        "head-dropout-after-phase-1",
        "head-dropout-in-phase-2-epoch-1",
        "batch-norm-dropout-in-phase-2-epoch-1",
        "batch-norm-dropout-validating-phase-1-end",
        "augmented-views-in-phase-2-epoch-2",
    ],
)
def test_a_run_interrupted_at_or_after_a_phase_boundary_resumes_to_the_same_weights(
    tmp_path, monkeypatch, variant, interrupt, saved
):
    """Issue #27 case 4: with dropout, the dropout layers' random state must go on from the end of the
    first phase, as in the uninterrupted run (not start again from the model's first state); a phase's
    end is saved only once it is complete (its BatchNorm statistics recomputed); augmented copies drawn as
    a later phase began are drawn again from the same random state."""
    _deterministic()
    recipe = finetune.load_recipe(_mlp_dropout(variant))
    alone = finetune.run(recipe, out=tmp_path / "alone", log=lambda line: None)

    original = _with_callback(monkeypatch, interrupt)
    with pytest.raises(RunInterrupted):
        finetune.run(recipe, out=tmp_path / "killed", log=lambda line: None)
    run_dir = tmp_path / "killed"
    assert json.loads((run_dir / "state.json").read_text())["epochs_done"] == saved
    from finetune.training import train as training

    monkeypatch.setattr(training, "fit_phase", original)
    lines = []
    resumed = finetune.resume(run_dir, log=lines.append)
    phase = "head" if saved <= 2 else "finetune"
    assert any(f"resuming after epoch {saved} (phase {phase})" in line for line in lines), lines
    ours, theirs = _rows(run_dir), _rows(alone.run_dir)
    assert (
        [row["epoch"] for row in ours]
        == [row["epoch"] for row in theirs]
        == [str(n) for n in range(1, 5 + (variant == "views"))]
    )
    for mine, other in zip(ours, theirs, strict=True):
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            assert float(mine[key]) == pytest.approx(float(other[key]), rel=1e-5), (key, mine, other)
    for mine, other in zip(resumed.model.weights, alone.model.weights, strict=True):
        np.testing.assert_allclose(
            keras.ops.convert_to_numpy(mine), keras.ops.convert_to_numpy(other), rtol=1e-5, atol=1e-6, err_msg=mine.path
        )
    assert resumed.test_accuracy == alone.test_accuracy


def _stale_running_folder(path):
    """A run folder as a killed process leaves it: run.json says running, and no process holds its lock."""
    import copy
    import hashlib

    raw = copy.deepcopy(MLP_DROPOUT)
    raw["phases"] = raw["phases"][:1]
    path.mkdir()
    (path / "recipe.yaml").write_text(finetune.load_recipe(raw).to_yaml())
    digest = hashlib.sha256((path / "recipe.yaml").read_bytes()).hexdigest()
    run = {"status": "running", "started": "2025-01-01T00:00:00", "phases_done": [], "recipe_sha256": digest}
    (path / "run.json").write_text(json.dumps(run))
    (path / ".lock").touch()  # what the run locked; the lock went with its process
    return path


def test_a_run_whose_process_is_gone_reads_as_interrupted_and_resumes(tmp_path):
    """Issue #27 case 6: run.json says running for ever after a kill; the free lock says the process is gone."""
    from conftest import cli_in_process

    from finetune.runner.folder import RunFolder

    run_dir = _stale_running_folder(tmp_path / "run")
    with RunFolder(run_dir).locked():  # a process holds it: it is running
        (row,) = json.loads(cli_in_process("compare", str(run_dir), "--json").stdout)
        assert row["status"] == "running"
    (row,) = json.loads(cli_in_process("compare", str(run_dir), "--json").stdout)
    assert row["status"] == "interrupted"
    export = cli_in_process("export", str(run_dir))
    assert export.returncode == 2 and f"is interrupted, not finished; finish it first (finetune resume {run_dir})" in (
        export.stderr
    )
    evaluate = cli_in_process("evaluate", str(run_dir))
    assert evaluate.returncode == 2 and "(status 'interrupted')" in evaluate.stderr
    assert json.loads((run_dir / "run.json").read_text())["status"] == "running"  # reading changes nothing
    result = finetune.resume(run_dir, log=lambda line: None)
    assert result.test_accuracy > 0
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"


@pytest.mark.slow
def test_sigterm_stops_a_run_as_ctrl_c_does_and_resume_finishes_it(tmp_path):
    """Issue #27 case 6: SIGTERM (Kubernetes, Slurm, systemd) exits 143 with the resume command, the folder
    marked interrupted and its last finished epoch saved."""
    import copy

    import yaml

    raw = copy.deepcopy(MLP_DROPOUT)
    raw["data"]["train_limit"] = 1000
    raw["phases"] = [{**raw["phases"][0], "epochs": 30}]
    path = tmp_path / "long.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "finetune"]
    process = subprocess.Popen(
        [*command, "run", str(path), "--out", str(out)],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        cwd=ROOT,
        env=env,
    )
    try:
        deadline = time.monotonic() + 300
        while not (out / "state.json").exists():  # an epoch is saved: the run is well inside fit
            assert process.poll() is None and time.monotonic() < deadline, process.stderr.read()[-2000:]
            time.sleep(0.1)
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 143, stderr[-2000:]
    assert stderr.strip().splitlines()[-1] == (
        f"terminated (SIGTERM); the last finished epoch is saved. Continue with: finetune resume {out}"
    )
    assert "Traceback" not in stderr
    status = json.loads((out / "run.json").read_text())
    assert status["status"] == "interrupted" and status["error"] == "SIGTERM"
    epochs_saved = json.loads((out / "state.json").read_text())["epochs_done"]
    assert 1 <= epochs_saved < 30
    result = subprocess.run(
        [*command, "resume", str(out)], capture_output=True, text=True, cwd=ROOT, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming after epoch {epochs_saved}" in result.stderr
    assert [int(row["epoch"]) for row in _rows(out)] == list(range(1, 31))
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
