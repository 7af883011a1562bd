"""``finetune tune``: an Optuna study over a recipe, each trial a normal run folder, stored so that it
survives a kill and so that several processes (or machines) can work on one study.

DIR holds ``tune.json`` (the settings, for ``--resume``), ``base_recipe.yaml`` and ``space.yaml``
(copies), ``study.db`` (SQLite, unless ``--storage`` names another Optuna storage), ``trials/NNNN/``
(one run folder per trial) and, at the end, ``best_recipe.yaml`` and ``tune_report.html``.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import re
import shutil
import time
import warnings
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune.errors import FinetuneError, RecipeError, RunFolderError, first_line
from finetune.files import write_json_atomically, write_text_atomically
from finetune.tuning.pruning import ReportToTrial, TrialPruned
from finetune.tuning.report import write_tune_report
from finetune.tuning.space import Dimension, check_against, override, read_space

logger = logging.getLogger("finetune")

SETTINGS_FILE = "tune.json"
PRUNERS = ("median", "halving", "none")


class TuneInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM) stopped the study; ``resume_command`` continues it."""

    def __init__(self, out: Path, terminated: bool = False):
        super().__init__(str(out))
        self.resume_command = f"finetune tune --resume {out}"
        self.terminated = terminated


@dataclass
class TuneSettings:
    """What ``finetune tune`` was started with; kept in ``DIR/tune.json``."""

    out: str
    trials: int | None = None
    budget_seconds: float | None = None
    metric: str = "val_accuracy"
    pruner: str = "median"
    seed: int = 0
    storage: str | None = None
    study_name: str = "finetune"
    fidelity: list[str] = field(default_factory=list)
    in_process: bool = False
    """Trials in the study's own process; by default each runs in a process of its own, whose memory ends
    with it (one process kept about 100 MB of each EfficientNet-Lite0 trial)."""

    @property
    def direction(self) -> str:
        return "minimize" if self.metric.endswith("loss") else "maximize"

    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{Path(self.out).resolve() / 'study.db'}"


@dataclass(frozen=True)
class TuneResult:
    """The study's best: its value, its trial's run folder, and the best recipe file."""

    best_value: float | None
    best_trial: int | None
    best_run_dir: Path | None
    best_recipe: Path | None
    trials: dict[str, int]


def parse_budget(text: str | None) -> float | None:
    """``30m``, ``2h``, ``90s`` or a bare number of minutes, in seconds."""
    if text is None:
        return None
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smh]?)\s*", str(text))
    if not found or float(found.group(1)) <= 0:
        raise RecipeError(f"--budget {text!r}: give a time such as 30m, 2h or 90s")
    return float(found.group(1)) * {"s": 1, "m": 60, "h": 3600, "": 60}[found.group(2)]


def start(base: str | Path, space: str | Path, settings: TuneSettings, workers: int = 1) -> TuneResult:
    """A new study in ``settings.out`` (which must not hold one), then :func:`work` on it."""
    out = Path(settings.out)
    if (out / SETTINGS_FILE).exists():
        raise RunFolderError(f"{out} already holds a study: continue it with finetune tune --resume {out}")
    if settings.trials is None and settings.budget_seconds is None:
        raise RecipeError("give --trials N or --budget TIME (or both)")
    if settings.pruner not in PRUNERS:
        raise RecipeError(f"--pruner {settings.pruner!r}: one of {', '.join(PRUNERS)}")
    dimensions = read_space(space)
    _log_the_metric(base, settings)
    check_against(dimensions, base, settings.fidelity)
    _needs_validation(base, settings)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(base, out / "base_recipe.yaml")
    shutil.copyfile(space, out / "space.yaml")
    write_json_atomically(out / SETTINGS_FILE, asdict(settings))
    return work(out, workers=workers)


def _needs_validation(base: str | Path, settings: TuneSettings) -> None:
    """A recipe without a validation split has nothing to tune on (the test split stays for the end)."""
    from finetune.plan import load_recipe

    data = load_recipe(base, settings.fidelity).data
    if not data.validation_split:
        raise RecipeError(
            "tuning needs a validation split to score trials on (the test split is kept for the end): "
            "set data.validation_split, e.g. --fidelity data.validation_split=0.1"
        )


def _log_the_metric(base: str | Path, settings: TuneSettings) -> None:
    """--metric must be an epoch log; ``val_macro_f1`` has every trial log macro_f1 (training is unchanged by it,
    so it rides with the fidelity settings and stays out of best_recipe.yaml)."""
    from finetune.plan import load_recipe

    extra = list(load_recipe(base, settings.fidelity).training.epoch_metrics)
    if settings.metric in ("macro_f1", "val_macro_f1") and "macro_f1" not in extra:
        extra.append("macro_f1")
        settings.fidelity = [*settings.fidelity, f"training.epoch_metrics=[{', '.join(extra)}]"]
    logged = [f"{prefix}{name}" for prefix in ("val_", "") for name in ("accuracy", "loss", *extra)]
    if settings.metric not in logged:
        raise RecipeError(f"--metric {settings.metric!r}: not an epoch log of this recipe; one of {', '.join(logged)}")


def read_settings(out: str | Path) -> TuneSettings:
    path = Path(out) / SETTINGS_FILE
    if not path.is_file():
        raise RunFolderError(f"{out} holds no study ({SETTINGS_FILE} is missing)")
    return TuneSettings(**json.loads(path.read_text()))


def work(out: str | Path, *, workers: int = 1, joined: bool = False, log_trial: bool = True) -> TuneResult:
    """Trials on the study in ``out`` until its trial count or budget is spent; ``workers - 1`` more
    processes join it (each ``finetune tune --resume DIR --join``). ``joined``: this process is such a
    worker, and leaves the interrupted trials of others alone."""
    import optuna

    out = Path(out)
    settings = read_settings(out)
    base, dimensions = out / "base_recipe.yaml", read_space(out / "space.yaml")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = _study(settings, seed_offset=_worker_index(joined))
    if not joined:
        _fail_interrupted(study, out)
    helpers = [_spawn_worker(out, index) for index in range(1, workers)]
    try:
        with _terminated_as_interrupt(out):
            _trial_loop(study, settings, base, dimensions, out, _worker_index(joined))
    finally:
        for helper in helpers:
            helper.wait()
    return _conclude(study, settings, base, out)


def _trial_loop(
    study, settings: TuneSettings, base: Path, dimensions: list[Dimension], out: Path, worker: int = 0
) -> None:
    import optuna

    while True:
        done, spent = _progress(study)
        running = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)))
        if settings.trials is not None and done + running >= settings.trials:  # other workers' trials count
            return
        if settings.budget_seconds is not None and spent >= settings.budget_seconds:
            return
        trial = study.ask()
        began = time.time()
        try:
            if settings.in_process:
                state, value = run_trial(trial, dimensions, base, settings, out)
            else:
                state, value = _trial_in_a_process(trial, out, worker)
        except KeyboardInterrupt:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise TuneInterrupted(out) from None
        trial.set_user_attr("seconds", round(time.time() - began, 1))
        if settings.in_process:  # a trial's own process records its memory itself
            trial.set_user_attr("rss_mb", _resident_mb())
        study.tell(trial, value if state == optuna.trial.TrialState.COMPLETE else None, state=state)
        done, spent = _progress(study)
        best = _best(study)
        left = (
            "" if settings.budget_seconds is None else f", {max(settings.budget_seconds - spent, 0) / 60:.1f} min left"
        )
        of = f" of {settings.trials}" if settings.trials is not None else ""
        shown = f"{value:.4f}" if value is not None else "-"
        best_text = f"best {best.value:.4f} (trial {best.number})" if best is not None else "no best yet"
        logger.info(f"trial {trial.number} ({done}{of} done): {state.name.lower()} {shown}; {best_text}{left}")


def run_trial(trial, dimensions: list[Dimension], base: Path, settings: TuneSettings, out: Path) -> tuple[Any, Any]:
    """One trial as a normal run folder ``out/trials/NNNN``: (Optuna state, the final epoch's metric)."""
    import keras
    import optuna

    from finetune.data import peek_class_names
    from finetune.plan import load_recipe, preflight
    from finetune.runner.folder import RunFolder
    from finetune.runner.pipeline import run

    values: dict[str, Any] = {}
    for dimension in dimensions:  # in the space's order: a conditional key after the keys it depends on
        if dimension.applies(values):
            values[dimension.key] = dimension.suggest(trial)
    run_dir = out / "trials" / f"{trial.number:04d}"
    trial.set_user_attr("run_dir", str(run_dir))
    try:
        # The checks `finetune validate` makes; a sampled recipe that fails them is a failed trial.
        recipe = load_recipe(base, [*settings.fidelity, *(override(key, value) for key, value in values.items())])
        peek_class_names(recipe.data)
        preflight(recipe)
    except FinetuneError as error:
        trial.set_user_attr("error", first_line(error))
        logger.warning(f"trial {trial.number}: {first_line(error)}")
        return optuna.trial.TrialState.FAIL, None
    reporter = ReportToTrial(trial, settings.metric)
    keras.backend.clear_session()  # memory grows across in-process trials otherwise
    gc.collect()
    try:
        with _trial_lines_quiet():
            result = run(recipe, out=run_dir, log=None, callbacks=[reporter])
    except TrialPruned as pruned:
        RunFolder.existing(run_dir).note(status="pruned", error=None, pruned_after_epoch=pruned.epoch)
        return optuna.trial.TrialState.PRUNED, None
    except FinetuneError as error:
        trial.set_user_attr("error", first_line(error))
        logger.warning(f"trial {trial.number}: {first_line(error)}")
        return optuna.trial.TrialState.FAIL, None
    if not reporter.values:
        trial.set_user_attr("error", "no epoch reported the metric")
        return optuna.trial.TrialState.FAIL, None
    trial.set_user_attr("test_accuracy", result.test_accuracy)
    return optuna.trial.TrialState.COMPLETE, reporter.values[-1]


def _trial_in_a_process(trial, out: Path, worker: int) -> tuple[Any, Any]:
    """``trial`` run by ``python -m finetune.tuning.child`` (it suggests the values, reports its epochs to the
    pruner through the storage, and answers its state and value on its last line of output)."""
    import os
    import subprocess
    import sys

    import optuna

    command = [sys.executable, "-m", "finetune.tuning.child", str(out), str(trial._trial_id), str(worker)]
    env = {**os.environ, "FINETUNE_TUNE_PARENT": str(os.getpid())}
    finished = subprocess.run(command, stdout=subprocess.PIPE, text=True, env=env)
    lines = finished.stdout.strip().splitlines()
    if finished.returncode != 0 or not lines:
        trial.set_user_attr("error", f"the trial's process exited with {finished.returncode}")
        logger.warning(f"trial {trial.number}: its process exited with {finished.returncode}")
        return optuna.trial.TrialState.FAIL, None
    answer = json.loads(lines[-1])
    return optuna.trial.TrialState[answer["state"]], answer["value"]


def _resident_mb() -> float | None:
    """This process's resident memory now (Linux), to show whether trials leave memory behind."""
    try:
        status = Path("/proc/self/status").read_text()
    except OSError:
        return None
    found = re.search(r"VmRSS:\s+(\d+) kB", status)
    return round(int(found.group(1)) / 1024, 1) if found else None


def _study(settings: TuneSettings, seed_offset: int = 0):
    import optuna

    pruner: optuna.pruners.BasePruner = {
        "median": lambda: optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=0),
        "halving": lambda: optuna.pruners.SuccessiveHalvingPruner(),
        "none": lambda: optuna.pruners.NopPruner(),
    }[settings.pruner]()
    try:
        study = optuna.create_study(
            storage=settings.storage_url(),
            study_name=settings.study_name,
            direction=settings.direction,
            pruner=pruner,
            load_if_exists=True,
        )
    except Exception as error:  # noqa: BLE001 - a storage URL's many ways to fail
        raise RecipeError(f"cannot open the study's storage {settings.storage_url()}: {first_line(error)}") from None
    # Seeded by (seed, worker, trials so far): a resumed or joining process must not draw again the values
    # the first one drew (a resumed study re-ran its first five trials before this).
    entropy = [settings.seed, seed_offset, len(study.get_trials(deepcopy=False))]
    study.sampler = optuna.samplers.TPESampler(seed=int(np.random.SeedSequence(entropy).generate_state(1)[0]))
    return study


def _progress(study) -> tuple[int, float]:
    """Trials finished (complete, pruned or failed), and the seconds they took, earlier processes' too."""
    import optuna

    finished = [
        trial
        for trial in study.get_trials(deepcopy=False)
        if trial.state
        in (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
    ]
    spent = sum(float(trial.user_attrs.get("seconds", _duration(trial))) for trial in finished)
    return len(finished), spent


def _duration(trial) -> float:
    if trial.datetime_start is None or trial.datetime_complete is None:
        return 0.0
    return (trial.datetime_complete - trial.datetime_start).total_seconds()


def _best(study):
    import optuna

    complete = [trial for trial in study.get_trials(deepcopy=False) if trial.state == optuna.trial.TrialState.COMPLETE]
    return study.best_trial if complete else None


def _fail_interrupted(study, out: Path, grace_seconds: float = 10.0) -> None:
    """Trials a killed process left ``RUNNING``, whose run folder no process holds, marked failed.

    A trial's process dies with the study's, but not in the same instant: a resume started right after a
    kill -9 found the dying trial still holding its folder and left the trial running for good. A held
    folder is watched for up to ``grace_seconds``; one a live process keeps holding (a worker that joined
    the study) is left alone.
    """
    import optuna

    from finetune.runner.folder import RunFolder

    held: dict[int, RunFolder] = {}
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        run_dir = Path(trial.user_attrs.get("run_dir", out / "trials" / f"{trial.number:04d}"))
        folder = RunFolder(run_dir)
        if run_dir.is_dir() and (run_dir / "run.json").is_file() and folder.in_use():
            held[trial.number] = folder
        else:
            _mark_interrupted(study, trial.number)
    deadline = time.monotonic() + grace_seconds
    while held and time.monotonic() < deadline:
        time.sleep(0.1)
        for number, folder in list(held.items()):
            if not folder.in_use():
                del held[number]
                _mark_interrupted(study, number)


def _mark_interrupted(study, number: int) -> None:
    import optuna

    study.tell(number, state=optuna.trial.TrialState.FAIL)
    logger.info(f"trial {number} was interrupted: marked failed")


def _conclude(study, settings: TuneSettings, base: Path, out: Path) -> TuneResult:
    """``best_recipe.yaml`` (the base recipe with the best values, without the fidelity settings)."""
    import optuna

    from finetune.plan import load_recipe

    counts = {state.name.lower(): 0 for state in optuna.trial.TrialState}
    for trial in study.get_trials(deepcopy=False):
        counts[trial.state.name.lower()] += 1
    with warnings.catch_warnings():  # Optuna marks its matplotlib plots experimental, on every call
        warnings.simplefilter("ignore")
        write_tune_report(study, out, settings.metric)
    best = _best(study)
    if best is None:
        return TuneResult(None, None, None, None, counts)
    dimensions = {dimension.key: dimension for dimension in read_space(out / "space.yaml")}
    sets = [override(key, _decoded(dimensions[key], value)) for key, value in best.params.items()]
    recipe = load_recipe(base, sets)
    target = write_text_atomically(out / "best_recipe.yaml", recipe.to_yaml())
    return TuneResult(best.value, best.number, Path(best.user_attrs["run_dir"]), target, counts)


def _decoded(dimension: Dimension, value: Any) -> Any:
    if dimension.choices is not None and value not in dimension.choices:
        return json.loads(value)
    return value


@contextlib.contextmanager
def _trial_lines_quiet() -> Iterator[None]:
    """A trial's own run lines (epochs, exports) kept off the study's output: warnings still show."""
    previous = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(previous)


@contextlib.contextmanager
def _terminated_as_interrupt(out: Path) -> Iterator[None]:
    from finetune.training.interrupts import sigterm_as_interrupt

    try:
        with sigterm_as_interrupt():
            yield
    except TuneInterrupted:
        raise
    except KeyboardInterrupt as error:
        raise TuneInterrupted(out, terminated=getattr(error, "terminated", False)) from None


_WORKER_ENV = "FINETUNE_TUNE_WORKER"


def _worker_index(joined: bool) -> int:
    import os

    return int(os.environ.get(_WORKER_ENV, "0")) if joined else 0


def _spawn_worker(out: Path, index: int):
    """Worker ``index`` (1, 2, ...): ``finetune tune --resume DIR --join``, its sampler seeded apart."""
    import os
    import subprocess
    import sys

    env = {**os.environ, _WORKER_ENV: str(index)}
    return subprocess.Popen(
        [sys.executable, "-m", "finetune", "tune", "--resume", str(out), "--join", "--quiet"], env=env
    )


def summary_rows(out: Path) -> list[dict]:
    """``finetune compare``'s row of each finished trial, best value first."""
    import optuna

    from finetune.runner.compare import compare_row

    settings = read_settings(out)
    study = _study(settings)
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
    complete.sort(key=lambda t: t.value, reverse=settings.direction == "maximize")
    rows = []
    for trial in complete:
        row = compare_row(trial.user_attrs["run_dir"])
        rows.append({"trial": trial.number, settings.metric: round(trial.value, 4), **row})
    return rows
