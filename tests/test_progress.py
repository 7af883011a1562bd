"""What a run shows while it works: a live line on a terminal only, lines that stay everywhere."""

import io

import keras
import numpy as np

from finetune.progress import Progress, duration, lines_to
from finetune.recipe import PhaseConfig
from finetune.runner.summary import summary_lines
from finetune.training.context import PhaseRun
from finetune.training.progress import PhaseProgress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_a_terminal_gets_a_live_line_and_a_file_does_not():
    terminal, log_file = Terminal(), io.StringIO()
    for stream in (terminal, log_file):
        progress = Progress(stream)
        progress.live("step 1/10")
        progress("[finetune] epoch 1 done")
    assert terminal.getvalue() == "\r\x1b[Kstep 1/10\r\x1b[K[finetune] epoch 1 done\n"
    assert log_file.getvalue() == "[finetune] epoch 1 done\n"


def test_the_live_line_is_cut_at_the_terminal_width(monkeypatch):
    monkeypatch.setenv("COLUMNS", "20")
    terminal = Terminal()
    Progress(terminal).live("x" * 50)
    assert terminal.getvalue() == "\r\x1b[K" + "x" * 19


def test_the_live_line_is_redrawn_at_most_every_interval():
    terminal = Terminal()
    progress = Progress(terminal, every_seconds=3600)
    progress.live("first")
    assert not progress.due()
    progress.live("second")
    progress.live("forced", force=True)
    assert "first" in terminal.getvalue() and "second" not in terminal.getvalue() and "forced" in terminal.getvalue()


def test_quiet_shows_nothing_and_a_callable_gets_only_the_lines():
    terminal = Terminal()
    quiet = Progress(terminal, "quiet")
    quiet.live("step", force=True)
    quiet("a line")
    assert terminal.getvalue() == ""
    lines: list[str] = []
    forwarded = Progress.of(lines.append)
    forwarded.live("step", force=True)
    forwarded("a line")
    assert lines == ["a line"] and not forwarded.shows_live
    assert Progress.of(forwarded) is forwarded


def test_phase_progress_shows_steps_eta_and_the_epoch_values_keras_reports(monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")  # the live line is cut at the terminal's width
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = (x[:, 0] > 0).astype("int64")
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(2, activation="softmax")])
    model.compile(keras.optimizers.SGD(0.1), "sparse_categorical_crossentropy", metrics=["accuracy"])
    terminal = Terminal()
    head = PhaseConfig(name="head", epochs=2)
    with lines_to(Progress(terminal, every_seconds=0)):
        shown = PhaseProgress(PhaseRun(head, 0, first_epoch=3, steps=4), images_per_epoch=64)
        history = model.fit(x, y, batch_size=16, epochs=5, initial_epoch=3, verbose=0, callbacks=[shown])
    output = terminal.getvalue()
    live = [part for part in output.split("\r\x1b[K") if part.startswith("head epoch")]
    assert [part.split()[2:5] for part in live[:4]] == [["4/5", "step", f"{step}/4"] for step in (1, 2, 3, 4)]
    assert all("ETA " in part and "img/s" in part and "lr 1.00e-01" in part for part in live)
    assert live[-1].split()[2:5] == ["5/5", "step", "4/4"] and live[-1].endswith("ETA 0:00")
    lines = [line for line in output.replace("\r\x1b[K", "\n").splitlines() if line.startswith("[finetune]")]
    assert len(lines) == 2
    for line, epoch, loss in zip(lines, (4, 5), history.history["loss"], strict=True):
        assert line.startswith(f"[finetune] head epoch {epoch}/5: loss {loss:.4f}, acc ")


def test_the_phase_table_sums_time_and_keeps_the_best_validation_accuracy():
    history = [
        {"phase": "head", "epoch": "1", "seconds": "2.5", "val_accuracy": "0.80"},
        {"phase": "head", "epoch": "2", "seconds": "1.5", "val_accuracy": "0.85"},
        {"phase": "finetune", "epoch": "3", "seconds": "10", "val_accuracy": "0.83"},
        {"phase": "finetune", "epoch": "4", "seconds": "10", "val_accuracy": ""},
    ]
    lines = summary_lines(history, {"test": {"accuracy": 0.9, "loss": 0.3, "examples": 100}, "seconds": 75}, "runs/x")
    assert [line.split() for line in lines[1:3]] == [
        ["head", "2", "0:04", "0.8500"],
        ["finetune", "2", "0:20", "0.8300"],
    ]
    assert lines[3] == "test accuracy 0.9000, loss 0.3000 on 100 images; 1:15 in all; results in runs/x"


def test_durations_read_as_clock_times():
    assert [duration(s) for s in (0, 42.4, 725, 3723)] == ["0:00", "0:42", "12:05", "1:02:03"]
