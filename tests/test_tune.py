"""`finetune tune`: an Optuna study whose trials are run folders; pruning, kill and resume, several workers,
bad spaces in one line, seeded sampling."""

from __future__ import annotations

import csv
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

import finetune
from tests.conftest import ROOT, cli_in_process

optuna = pytest.importorskip("optuna")

BASE = {
    "name": "tiny_mlp",
    "seed": 0,
    "precision": "float32",
    "data": {
        "source": "fashion_mnist",
        "image_size": 28,
        "validation_split": 0.2,
        "train_limit": 300,
        "test_limit": 100,
    },
    "model": {"backbone": {"name": "mlp", "weights": None, "options": {"dense": [16]}}, "head": {}},
    "training": {"batch_size": 32, "verbose": 0, "tensorboard": False, "gradient_health_every": 0},
    "export": {"formats": ["keras"]},
    "phases": [
        {"name": "train", "epochs": 2, "trainable": "all", "optimizer": {"name": "adam", "learning_rate": 1e-3}}
    ],
}
SPACE = {
    "phases.train.optimizer.learning_rate": {"low": 1e-4, "high": 1e-1, "log": True},
    "model.head.dropout": {"low": 0.0, "high": 0.5},
    "training.batch_size": [16, 32],
}


@pytest.fixture
def files(tmp_path):
    base, space = tmp_path / "base.yaml", tmp_path / "space.yaml"
    base.write_text(yaml.safe_dump(BASE))
    space.write_text(yaml.safe_dump(SPACE))
    return base, space


def trials_of(out: Path):
    return optuna.load_study(study_name="finetune", storage=f"sqlite:///{out.resolve() / 'study.db'}").get_trials()


@pytest.mark.slow  # an end-to-end run: moved out of the fast suite (kept under 10 minutes)
def test_a_study_runs_its_trials_as_run_folders_and_writes_a_best_recipe_that_validates(files, tmp_path):
    base, space = files
    result = finetune.tune(base, space, out=tmp_path / "study", trials=3, pruner="none", in_process=True)
    trials = trials_of(tmp_path / "study")
    assert len(trials) == 3 and all(trial.state.name == "COMPLETE" for trial in trials)
    folders = sorted((tmp_path / "study" / "trials").iterdir())
    assert [folder.name for folder in folders] == ["0000", "0001", "0002"]
    for folder, trial in zip(folders, trials, strict=True):
        assert json.loads((folder / "run.json").read_text())["status"] == "finished"
        rows = list(csv.DictReader((folder / "history.csv").open()))
        assert trial.value == pytest.approx(float(rows[-1]["val_accuracy"]), abs=1e-6)  # the last epoch's
    best = max(trials, key=lambda trial: trial.value)
    assert result.best_trial == best.number and result.best_value == best.value
    recipe = finetune.load_recipe(result.best_recipe)  # it validates
    assert recipe.phases[0].optimizer.learning_rate == pytest.approx(
        best.params["phases.train.optimizer.learning_rate"]
    )
    assert recipe.training.batch_size == best.params["training.batch_size"]
    assert cli_in_process("validate", str(result.best_recipe)).returncode == 0
    report = (tmp_path / "study" / "tune_report.html").read_text()
    assert report.count('<img src="data:image/png;base64,') >= 2 and "0002" in report  # plots, and every trial


def test_a_trial_reporting_the_worst_value_is_pruned():
    from finetune.tuning.pruning import ReportToTrial, TrialPruned

    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.MedianPruner(n_startup_trials=1))
    good = study.ask()
    for step in (1, 2, 3):
        good.report(0.9, step)
    study.tell(good, 0.9)
    reporter = ReportToTrial(study.ask(), "val_accuracy")
    with pytest.raises(TrialPruned) as pruned:
        reporter.on_epoch_end(0, {"val_accuracy": 0.1})
    assert pruned.value.epoch == 1
    keeper = ReportToTrial(study.ask(), "val_accuracy")
    keeper.on_epoch_end(0, {"val_accuracy": 0.95})  # better than the median: goes on
    assert keeper.values == [0.95]
    finishing = ReportToTrial(study.ask(), "val_accuracy")
    finishing.set_params({"epochs": 1})
    finishing.on_epoch_end(0, {"val_accuracy": 0.1})  # as bad, but the run's last epoch: kept, with its value
    assert finishing.values == [0.1]


@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"phases.train.optimizer.nonsense": [1, 2]}, "search space phases.train.optimizer.nonsense"),
        ({"model.head.dropout": {"low": 0.5, "high": 0.1}}, "low 0.5 must be below high 0.1"),
        ({"training.batch_size": {"low": "a", "high": 64}}, "low must be a number"),
        ({"training.batch_size": {"low": 16, "high": 64.0}}, "both be integers or both be decimals"),
        ({"training.batch_size": []}, "an empty list of choices"),
        ({"phases.train.optimizer.learning_rate": {"low": 0, "high": 1, "log": True}}, "needs low > 0"),
        ({"model.head.dropout": {"low": 0.0, "high": 0.5, "spread": 2}}, "a range takes low and high"),
        (
            {"model.head.dropout": {"low": 0.0, "high": 0.5, "when": {"training.batch_size": 16}}},
            "when names 'training.batch_size', which is not an earlier key of the space",
        ),
        (
            {
                "training.batch_size": [16, 32],
                "model.head.dropout": {"low": 0.0, "high": 0.5, "when": {"training.batch_size": 64}},
            },
            "when training.batch_size: 64 is not a value training.batch_size can take",
        ),
        ({"training.batch_size": {"choices": [16, 32], "when": 3}}, "when takes {KEY: value}"),
    ],
)
def test_a_bad_space_is_one_line_and_exit_2_before_any_trial(files, tmp_path, space, message):
    base, path = files
    path.write_text(yaml.safe_dump(space, sort_keys=False))  # the space's order: a condition names an earlier key
    result = cli_in_process("tune", str(base), "--space", str(path), "--trials", "2", "--out", str(tmp_path / "s"))
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "s" / "trials").exists()


def test_a_recipe_without_a_validation_split_is_refused_for_tuning(files, tmp_path):
    base, space = files
    base.write_text(yaml.safe_dump({**BASE, "data": {**BASE["data"], "validation_split": 0.0}}))
    result = cli_in_process("tune", str(base), "--space", str(space), "--trials", "2", "--out", str(tmp_path / "s"))
    assert result.returncode == 2 and "tuning needs a validation split" in result.stderr


@pytest.mark.slow  # an end-to-end run: moved out of the fast suite (kept under 10 minutes)
def test_the_seed_makes_the_sampled_values_repeat(files, tmp_path):
    base, space = files
    for name in ("a", "b"):
        finetune.tune(base, space, out=tmp_path / name, trials=1, pruner="none", seed=7, in_process=True)
    first, second = trials_of(tmp_path / "a"), trials_of(tmp_path / "b")
    assert [trial.params for trial in first] == [trial.params for trial in second]
    finetune.tune(base, space, out=tmp_path / "c", trials=1, pruner="none", seed=8, in_process=True)
    assert trials_of(tmp_path / "c")[0].params != first[0].params  # another seed, other values


def test_a_resumed_study_draws_values_of_its_own_not_the_first_process_values_again(files, tmp_path):
    from finetune.tuning.study import SETTINGS_FILE, work

    base, space = files
    out = tmp_path / "study"
    finetune.tune(base, space, out=out, trials=1, pruner="none", seed=0, in_process=True)
    settings = json.loads((out / SETTINGS_FILE).read_text())
    (out / SETTINGS_FILE).write_text(json.dumps({**settings, "trials": 2}))  # as if the first process had stopped
    work(out, log_trial=False)
    drawn = [tuple(sorted(trial.params.items())) for trial in trials_of(out)]
    assert len(drawn) == 2 and drawn[1] != drawn[0], drawn  # a fresh sampler at the same seed redrew trial 0's


def test_only_the_last_phase_is_reported_to_the_pruner(files, tmp_path):
    base, space = files
    recipe = yaml.safe_load(base.read_text())
    head = {"name": "head", "epochs": 1, "trainable": "none", "optimizer": {"name": "adam", "learning_rate": 1e-3}}
    recipe["phases"] = [head, {**recipe["phases"][0], "epochs": 2}]
    base.write_text(yaml.safe_dump(recipe))
    finetune.tune(base, space, out=tmp_path / "s", trials=1, pruner="median", in_process=True)
    (trial,) = trials_of(tmp_path / "s")
    rows = list(csv.DictReader((tmp_path / "s" / "trials" / "0000" / "history.csv").open()))
    assert [row["phase"] for row in rows] == ["head", "train", "train"]
    assert trial.intermediate_values == {1: float(rows[1]["val_accuracy"]), 2: float(rows[2]["val_accuracy"])}


@pytest.mark.slow  # an end-to-end run: moved out of the fast suite (kept under 10 minutes)
def test_a_conditional_key_is_sampled_only_in_trials_where_its_condition_holds(files, tmp_path):
    base, space = files
    space.write_text(
        yaml.safe_dump(
            {
                "training.batch_size": [16, 32],
                "model.head.dropout": {"low": 0.3, "high": 0.4, "when": {"training.batch_size": 16}},
                "phases.train.optimizer.learning_rate": {
                    "choices": [0.01, 0.02],
                    "when": {"training.batch_size": [32]},
                },
            },
            sort_keys=False,
        )
    )
    finetune.tune(base, space, out=tmp_path / "s", trials=4, pruner="none", seed=1, in_process=True)
    base_recipe = finetune.load_recipe(base)
    seen = set()
    for trial in trials_of(tmp_path / "s"):
        recipe = finetune.load_recipe(tmp_path / "s" / "trials" / f"{trial.number:04d}" / "recipe.yaml")
        small = trial.params["training.batch_size"] == 16
        seen.add(small)
        assert ("model.head.dropout" in trial.params) == small
        assert ("phases.train.optimizer.learning_rate" in trial.params) != small
        if small:  # sampled in its range; the other key keeps the base recipe's value
            assert 0.3 <= recipe.model.head.dropout <= 0.4
            assert recipe.phases[0].optimizer.learning_rate == base_recipe.phases[0].optimizer.learning_rate
        else:
            assert recipe.model.head.dropout == base_recipe.model.head.dropout
            assert recipe.phases[0].optimizer.learning_rate in (0.01, 0.02)
    assert seen == {True, False}  # both branches ran: the checks above mean something


@pytest.mark.slow  # an end-to-end run: moved out of the fast suite (kept under 10 minutes)
def test_by_default_each_trial_runs_in_a_process_of_its_own_and_reports_through_the_storage(files, tmp_path):
    base, space = files
    result = finetune.tune(base, space, out=tmp_path / "s", trials=2, pruner="none")
    trials = trials_of(tmp_path / "s")
    assert [trial.state.name for trial in trials] == ["COMPLETE", "COMPLETE"]
    processes = {trial.user_attrs["process"] for trial in trials}
    assert len(processes) == 2 and os.getpid() not in processes  # what a trial's process kept ended with it
    for trial in trials:
        rows = list(csv.DictReader((tmp_path / "s" / "trials" / f"{trial.number:04d}" / "history.csv").open()))
        assert trial.value == pytest.approx(float(rows[-1]["val_accuracy"]), abs=1e-6)
        assert trial.intermediate_values[len(rows)] == pytest.approx(trial.value)  # reported from that process
        assert trial.user_attrs["rss_mb"] > 100
    assert (
        finetune.load_recipe(result.best_recipe).training.batch_size
        == trials[result.best_trial].params["training.batch_size"]
    )


def _tune_process(*arguments: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "finetune", "tune", *arguments], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.slow
def test_a_study_killed_mid_trial_resumes_to_its_trial_count_with_none_lost_or_run_twice(files, tmp_path):
    base, space = files
    long = yaml.safe_load(base.read_text())
    long["phases"][0]["epochs"] = 6
    base.write_text(yaml.safe_dump(long))
    out = tmp_path / "study"
    process = _tune_process(str(base), "--space", str(space), "--trials", "4", "--pruner", "none", "--out", str(out))
    deadline = time.monotonic() + 300
    # Killed once the second trial has a run folder of its own: mid-trial.
    while not (out / "trials" / "0001" / "run.json").is_file() and time.monotonic() < deadline:
        time.sleep(0.2)
    process.send_signal(signal.SIGKILL)
    process.wait()
    before = {trial.number: trial.state.name for trial in trials_of(out)}
    assert before[0] == "COMPLETE" and before[1] == "RUNNING"
    result = cli_in_process("tune", "--resume", str(out))
    assert result.returncode == 0, result.stderr
    after = trials_of(out)
    assert [trial.number for trial in after] == [0, 1, 2, 3]  # none twice, none lost
    assert after[0].state.name == "COMPLETE" and after[0].value == pytest.approx(trials_of(out)[0].value)
    assert after[1].state.name == "FAIL"  # the interrupted one
    assert [trial.state.name for trial in after[2:]] == ["COMPLETE", "COMPLETE"]


@pytest.mark.slow
def test_two_workers_on_one_sqlite_study_finish_distinct_trials(files, tmp_path):
    base, space = files
    long = yaml.safe_load(base.read_text())
    long["phases"][0]["epochs"] = 6  # trials long enough that the second process joins before the last starts
    base.write_text(yaml.safe_dump(long))
    out = tmp_path / "study"
    result = subprocess.run(
        [sys.executable, "-m", "finetune", "tune", str(base), "--space", str(space), "--trials", "4",
         "--workers", "2", "--pruner", "none", "--out", str(out)],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    trials = trials_of(out)
    numbers = [trial.number for trial in trials]
    assert len(numbers) == len(set(numbers)) and 4 <= len(numbers) <= 5  # two workers may both start the last
    assert all(trial.state.name == "COMPLETE" for trial in trials)
    folders = [path.name for path in (out / "trials").iterdir()]
    assert sorted(folders) == [f"{number:04d}" for number in sorted(numbers)]
    # Both processes worked: their trials overlapped in time.
    spans = sorted((trial.datetime_start, trial.datetime_complete) for trial in trials)
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))


def test_tuning_on_validation_macro_f1_logs_it_in_every_trial_and_a_metric_no_epoch_logs_is_one_line(files, tmp_path):
    base, space = files
    result = finetune.tune(
        base, space, out=tmp_path / "f1", trials=2, pruner="none", metric="val_macro_f1", in_process=True
    )
    for trial in trials_of(tmp_path / "f1"):
        rows = list(csv.DictReader((tmp_path / "f1" / "trials" / f"{trial.number:04d}" / "history.csv").open()))
        assert trial.value == pytest.approx(float(rows[-1]["val_macro_f1"]), abs=1e-6)
    assert finetune.load_recipe(result.best_recipe).training.epoch_metrics == []  # training is unchanged by it
    refused = cli_in_process(
        "tune", str(base), "--space", str(space), "--trials", "2", "--metric", "val_f1", "--out", str(tmp_path / "s")
    )
    assert refused.returncode == 2 and "--metric 'val_f1': not an epoch log" in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1


_HOLD_FOLDER = """
import fcntl, sys, time
handle = open(sys.argv[1], "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def _held_for(run_dir: Path, seconds: float) -> subprocess.Popen:
    """A process that holds ``run_dir`` as a run does (its lock) for ``seconds``, then exits."""
    run_dir.mkdir(parents=True)
    (run_dir / "run.json").write_text('{"status": "running"}')
    (run_dir / "recipe.yaml").write_text("{}")
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLD_FOLDER, str(run_dir / ".lock"), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_resume_waits_for_a_dying_trial_to_let_go_of_its_folder_and_leaves_a_live_one_running(tmp_path):
    """A trial's process dies with its study's, a moment later: a resume right after a kill -9 must still
    mark it failed (it found the folder held and left the trial running for good), but not a trial whose
    folder a live process keeps holding (a worker that joined the study)."""
    import optuna

    from finetune.tuning.study import _fail_interrupted

    study = optuna.create_study()
    dying, live = study.ask(), study.ask()
    study.ask()  # a third, whose process died before it made a folder
    holders = []
    for trial, seconds in ((dying, 1.0), (live, 30.0)):
        run_dir = tmp_path / "trials" / f"{trial.number:04d}"
        trial.set_user_attr("run_dir", str(run_dir))
        holders.append(_held_for(run_dir, seconds))
    try:
        _fail_interrupted(study, tmp_path, grace_seconds=3.0)
        states = [trial.state.name for trial in study.get_trials()]
        assert states == ["FAIL", "RUNNING", "FAIL"], states
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()
