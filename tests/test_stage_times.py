"""Where a run's time went: each stage counted once, the stages adding up to the run, shown in three places."""

from __future__ import annotations

import json
import time

import pytest

import finetune
from finetune.progress import StageTimes, seconds_since_process_start
from finetune.report.page import stage_bar
from finetune.runner.summary import stage_line


def test_a_stage_inside_another_is_charged_once():
    times = StageTimes()
    began = time.perf_counter()
    with times.stage("outer"):
        time.sleep(0.05)
        with times.stage("inner"):
            time.sleep(0.1)
        times.add("measured elsewhere", 0.03)  # e.g. seconds a lower stage timed itself
        time.sleep(0.02)
    elapsed = time.perf_counter() - began
    seconds = times.as_dict()
    assert list(seconds) == ["inner", "measured elsewhere", "outer"]
    assert seconds["inner"] == pytest.approx(0.1, abs=0.04)
    # The outer stage keeps only its own sleeps: 0.07 s, less the 0.03 s charged elsewhere.
    assert seconds["outer"] == pytest.approx(0.07 - 0.03, abs=0.04)
    assert sum(seconds.values()) == pytest.approx(elapsed, abs=0.02)


def test_a_stage_entered_twice_adds_up():
    times = StageTimes()
    for _ in range(2):
        with times.stage("epochs"):
            time.sleep(0.03)
    assert times.as_dict()["epochs"] == pytest.approx(0.06, abs=0.03)


def test_process_age_counts_the_imports():
    age = seconds_since_process_start()
    assert age is None or age > 0.5  # this test process imported pytest, Keras and TensorFlow before it


def test_a_run_says_where_its_time_went(tiny_recipe_dict, tmp_path):
    tiny_recipe_dict["export"] = {"formats": ["keras", "saved_model"]}
    began = time.perf_counter()
    result = finetune.run(finetune.load_recipe(tiny_recipe_dict), out=tmp_path / "run", log=None)
    wall = time.perf_counter() - began
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    stages = metrics["seconds_by_stage"]
    expected = [
        "data",
        "model",
        "head: frozen part",  # the head phase trains on cached features; the finetune phase reuses them
        "head: training",
        "finetune: training",
        "evaluation",
        "model.keras",
        "export keras",
        "export saved_model",
        "export (shared work)",
        "pictures and report",
    ]
    assert list(stages) == expected
    assert all(seconds >= 0 for seconds in stages.values())
    # Each second counted once: the stages add up to the run's time, nothing double-counted.
    assert sum(stages.values()) <= wall + 0.1
    assert sum(stages.values()) >= 0.9 * wall - 0.5
    assert stages["export saved_model"] == pytest.approx(metrics["export"]["saved_model"]["seconds"], abs=0.01)
    page = (result.run_dir / "report.html").read_text()
    assert 'id="stage-bar"' in page and "export saved_model" in page


def test_the_closing_line_and_the_bar_show_every_stage_with_its_share():
    stages = {"start-up": 10.0, "data": 5.0, "head: training": 85.0}
    line = stage_line(stages)
    assert line.startswith("where the time went (1:40):")
    assert "start-up 10.0s (10%)" in line and "head: training 1:25 (85%)" in line
    html = stage_bar(stages)
    assert html.count('<div style="width:') == 3
    assert "width:85.000%" in html and "head: training: 85.0 s (85.0%)" in html


@pytest.mark.slow  # an end-to-end run: moved out of the fast suite (kept under 10 minutes)
def test_the_command_line_counts_its_start_up(tiny_recipe_dict, tmp_path):
    import yaml

    from tests.conftest import cli

    tiny_recipe_dict["phases"] = tiny_recipe_dict["phases"][:1]
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_recipe_dict))
    done = cli("run", str(path), "--out", str(tmp_path / "run"))
    assert done.returncode == 0, done.stderr
    stages = json.loads((tmp_path / "run" / "metrics.json").read_text())["seconds_by_stage"]
    assert next(iter(stages)) == "start-up" and stages["start-up"] > 1.0  # the interpreter, click, Keras
    assert "where the time went" in done.stderr
