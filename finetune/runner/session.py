"""One run as an object: what it carries from set-up to export, opened the same way by every command.

:func:`open_run` reads the recipe once, starts its distribution, resolves the plan, loads the data,
sizes the phases to it, builds the model, and (for a run or a resume) holds the run folder, all in
one place: ``finetune run``, ``resume`` and ``lr-find`` differ only in what they ask of it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras

from finetune import model as model_stage
from finetune.allocator import keep_freed_memory
from finetune.backbones.spec import BackboneLayout
from finetune.data import Dataset, load_dataset, peek_class_names
from finetune.data.balance import class_weights, imbalance_warning, named_weights
from finetune.errors import RunInterrupted, Terminated
from finetune.plan import RunPlan, resolve_read
from finetune.progress import StageTimes
from finetune.recipe import Recipe, read_recipe
from finetune.recipe.load import Overrides, RecipeSource
from finetune.runner import distribution as distribute
from finetune.runner.folder import RunFolder, check_run_dir
from finetune.training.context import RunContext
from finetune.training.divergence import keep_warning
from finetune.training.interrupts import sigterm_as_interrupt
from finetune.training.phases import check_phases, setup_warnings, sized_phases
from finetune.training.state import Checkpoint
from finetune.training.train import train

logger = logging.getLogger(__name__)


@dataclass
class RunSession:
    """What one run carries: its recipe and plan, distribution, data, model and blocks, folder and clock."""

    recipe: Recipe
    plan: RunPlan
    distribution: distribute.Distribution
    dataset: Dataset
    model: keras.Model
    layout: BackboneLayout
    folder: RunFolder | None = None
    """None for a command that writes no run folder (lr-find)."""
    started: float = field(default_factory=time.perf_counter)
    """The clock's zero: ``time.perf_counter()`` at the start, less the seconds earlier processes kept."""
    facts: dict[str, Any] = field(default_factory=dict)
    """What joins metrics.json (how the run was distributed)."""
    times: StageTimes = field(default_factory=StageTimes)
    observers: list[keras.callbacks.Callback] = field(default_factory=list)
    """Callbacks of the caller's own (a tuner's pruner), given every phase's epochs after finetune's."""
    """Seconds per stage (metrics.json's ``seconds_by_stage``, the closing lines, the report's bar)."""

    @property
    def class_weights(self) -> dict[str, float] | None:
        """``training.class_weight`` per class name, as the training split gives it (None: unweighted)."""
        names = self.dataset.class_names
        weights = class_weights(self.plan.training.class_weight, self.dataset.train.labels, names)
        return None if weights is None else named_weights(weights, names)

    @property
    def seconds(self) -> float:
        """The run's seconds so far, an interrupted run's earlier processes included."""
        return time.perf_counter() - self.started

    def training(self, run_dir: Path | None = None, resume_from: Checkpoint | None = None) -> RunContext:
        """What the training stage gets of this run (``run_dir`` defaults to the run folder)."""
        folder = self.folder
        context = RunContext(
            model=self.model,
            layout=self.layout,
            dataset=self.dataset,
            phases=self.plan.phases,
            settings=self.plan.training,
            seed=self.plan.seed,
            run_dir=run_dir if run_dir is not None else (folder.path if folder is not None else None),
            clock=lambda: self.seconds,
            resume_from=resume_from,
            sampling=self.plan.data.sampling,
            times=self.times,
            observers=tuple(self.observers),
        )
        if folder is not None:
            context.phase_done = folder.phase_done
        return context

    def fit_input_statistics(self) -> None:
        """Statistics the model's input layers learn from the training images (before any phase)."""
        with self.times.stage("model"), distribute.scope(self.distribution):
            model_stage.fit_input_statistics(self.model, self.plan.model, self.dataset.train.images)

    def train(self, resume_from: Checkpoint | None = None) -> None:
        """The phases under the run's distribution (from ``resume_from``'s epoch when given)."""
        with distribute.scope(self.distribution):
            train(self.training(resume_from=resume_from))


@contextlib.contextmanager
def open_run(
    source: Recipe | RecipeSource,
    *,
    overrides: Overrides = None,
    out: str | Path | None = None,
    resume: RunFolder | None = None,
    command: str = "run",
    times: StageTimes | None = None,
) -> Iterator[RunSession]:
    """The session of a new run (``command="run"``), of a resumed one (``resume``: its folder, which the
    caller holds locked), or of a command that trains without a run folder (``lr-find``).

    Everything that can fail on bad input (the recipe, ``out``, the data, the weights, the phases) fails
    before a new folder exists. Inside the block the folder says running, and how the block ended; Ctrl-C
    and SIGTERM leave as :class:`~finetune.errors.RunInterrupted`, naming the folder that ``finetune resume``
    continues. ``times`` (a new clock by default) is charged with each stage's seconds.
    """
    times = times if times is not None else StageTimes()
    keep_freed_memory()
    recipe = source if isinstance(source, Recipe) else read_recipe(source, overrides)
    new_run = resume is None and command == "run"
    if resume is not None:
        distribution = distribute.for_resume(recipe.distribution, resume.status.get("distribution"))
    elif new_run:
        distribution = distribute.start(recipe.distribution)  # a multi-worker engine starts before TensorFlow runs
    else:
        if note := distribute.one_process_note(recipe.distribution, command):
            logger.info(note)
        distribution = distribute.Distribution("none")
    recipe, plan = resolve_read(recipe, source)
    started = time.perf_counter()
    facts = {"distribution": distribution.record(plan)}
    described = distribution.describe(plan)
    plan = distribution.adjust(plan)  # global batch sizes, scaled learning rates
    with distribute.worker_folder(out, distribution) as out:
        if new_run:
            check_run_dir(out)
        with times.stage("data"):
            dataset = load_data(plan)
        class_weights(
            plan.training.class_weight, dataset.train.labels, dataset.class_names
        )  # an unknown name: one line
        unsized, plan = plan, sized_to_data(plan, dataset)
        with times.stage("model"), distribute.scope(distribution):
            model, layout = build(plan, dataset)
        folder = RunFolder.claim(out, recipe) if new_run else resume
        session = RunSession(recipe, plan, distribution, dataset, model, layout, folder, started, facts, times)
        if folder is None:
            for notice in plan.notices[len(unsized.notices) :]:  # what sizing the phases to the data says
                logger.info(f"note: {notice}")
            yield session
            return
        with (
            sigterm_as_interrupt(),
            _held(folder, resume is None),
            interrupts_named(folder),
            folder.recording(resumed=resume is not None),
        ):
            announce(session)
            if resume is None:
                folder.note(**facts)
            if distribution.strategy != "none" or distribution.started_with:
                logger.info(described)
            yield session


@contextlib.contextmanager
def _held(folder: RunFolder, lock: bool) -> Iterator[None]:
    """The folder locked for this process, unless the caller holds it already (a resume)."""
    if not lock:
        yield
        return
    with folder.locked():
        yield


@contextlib.contextmanager
def interrupts_named(folder: RunFolder) -> Iterator[None]:
    """Ctrl-C (and SIGTERM: :class:`Terminated`) leaves as :class:`RunInterrupted`, which names the folder to resume."""
    try:
        yield
    except RunInterrupted:
        raise
    except KeyboardInterrupt as error:
        raise RunInterrupted(folder.path, terminated=isinstance(error, Terminated)) from None


def load_data(plan: RunPlan) -> Dataset:
    """The run's images, seeded (the model's input shape and class count come from them)."""
    peek_class_names(plan.data)  # a missing folder or unknown class fails before anything is read
    keras.utils.set_random_seed(plan.seed)
    return load_dataset(plan.data, plan.seed)


def sized_to_data(plan: RunPlan, dataset: Dataset) -> RunPlan:
    """``plan`` with each phase long enough for its ``min_steps`` on ``dataset``'s training split (said in notices)."""
    phases, notes = sized_phases(plan.phases, plan.training, len(dataset.train))
    return dataclasses.replace(plan, phases=phases, notices=(*plan.notices, *notes))


def build(plan: RunPlan, dataset: Dataset) -> tuple[keras.Model, BackboneLayout]:
    """The model for ``dataset``, and its backbone's blocks (the phases are checked against them)."""
    model = model_stage.assemble(plan.model, dataset.input_shape, dataset.num_classes)
    layout = model_stage.layout(model, plan.model)
    check_phases(layout, plan.phases)
    return model, layout


def announce(session: RunSession) -> None:
    """The run's first lines: its folder, backend and precision, data, notices and setup warnings."""
    plan, dataset = session.plan, session.dataset
    if session.folder is not None:
        logger.info(f"run folder {session.folder.path}")
    logger.info(f"backend {keras.backend.backend()}, precision {model_stage.resolve_precision(plan.model.precision)}")
    validation = len(dataset.validation) if dataset.validation is not None else 0
    logger.info(
        f"data {plan.data.source} from {dataset.source}: {len(dataset.train)} train, {validation} "
        f"validation, {len(dataset.test)} test images of {dataset.input_shape} -> {plan.data.image_hw}, "
        f"{dataset.num_classes} classes"
    )
    for notice in plan.notices:
        logger.info(f"note: {notice}")
    for warning in setup_warnings(session.layout, plan.model.weights, plan.phases):
        logger.warning(warning)
    announce_balance(session)


def announce_balance(session: RunSession) -> None:
    """The class weights a run trains with, or a warning when its training classes are far apart and
    nothing balances them."""
    plan, dataset = session.plan, session.dataset
    weights = session.class_weights
    if weights is not None:
        setting = plan.training.class_weight
        named = ", ".join(f"{name!r} {weight:.4g}" for name, weight in weights.items())
        logger.info(f"class weights ({setting if isinstance(setting, str) else 'as given'}): {named}")
    elif plan.data.sampling == "natural" and (warning := imbalance_warning(dataset.train.labels, dataset.class_names)):
        logger.warning(warning)
        # Kept with the run too: metrics.json and the report carry it, not only the log.
        keep_warning(session.folder.path if session.folder else None, "data", "class_imbalance", warning)
