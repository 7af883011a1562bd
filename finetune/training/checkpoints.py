"""Checkpoints to resume from: the whole model, the optimizer's and RNGs' state, and where the run stood."""

from __future__ import annotations

import io
import json
import logging
import time
import zipfile
from pathlib import Path
from typing import Any

import keras
import numpy as np

from finetune.errors import RunFolderError, first_line
from finetune.files import write_atomically, write_json_atomically
from finetune.training.context import PhaseRun, RunContext
from finetune.training.history_file import read_history
from finetune.training.state import Checkpoint, CheckpointState

logger = logging.getLogger(__name__)

# Members finetune adds to the Keras file: written in the same atomic step as the weights, so the
# state always describes the weights beside it. Keras ignores them when it loads the file.
STATE_MEMBER = "finetune/state.json"
OPTIMIZER_MEMBER = "finetune/optimizer.npz"
SEEDS_MEMBER = "finetune/seed_generators.npz"
# Optional (a file of an older finetune lacks it): the RNG states as the phase began. Augmented copies of
# cached features are drawn then, so a resume inside a later phase draws them again from the same states.
PHASE_START_SEEDS_MEMBER = "finetune/phase_start_seed_generators.npz"


class EpochCheckpoint(keras.callbacks.Callback):
    """Saves the run's whole model with its optimizer state, atomically, as the phase's epochs finish.

    ``checkpoint.keras`` and ``state.json`` say where the run stood. Writing a
    large backbone takes longer than an epoch of a cached head, so saves are
    at most ``training.checkpoint_seconds`` apart and the phase's last epoch is always
    saved. A finished epoch that was not saved is kept in memory, and
    :meth:`save_interrupted` writes it when Ctrl-C stops the run: a
    checkpoint always holds the state of an epoch's end, never of a step in
    the middle of one. The whole model is saved even when the fit runs on a
    cached top model that shares its layers.
    """

    async_safe = True  # its batch-end hook only records or raises: Keras may run it on a thread

    def __init__(self, run: RunContext, stage: PhaseRun):
        super().__init__()
        assert run.run_dir is not None, "a checkpoint needs the run's folder"
        self.run_clock = run.clock
        self.full_model = run.model
        self.run_dir = Path(run.run_dir)
        self.phase = stage.name
        self.phase_index = stage.index
        self.first_epoch = stage.first_epoch
        self.every_seconds = run.settings.checkpoint_seconds
        self.last_epoch = stage.last_epoch
        self.epochs_done = stage.initial_epoch  # what checkpoint.keras holds already
        self._last_save = time.monotonic()
        self._unsaved: tuple | None = None
        self._saved_through = self.epochs_done  # the previous phase's end is always saved
        self._epoch: int | None = None
        self._steps = 0
        self._run_seconds: float | None = None  # the run clock at the end of the epoch the weights hold
        # Made before the phase is set up, so these are the RNG states the phase begins with.
        self.phase_start_seeds = [keras.ops.convert_to_numpy(v) for v in seed_generator_states(run.model)]
        # At the phase's last epoch, BatchNorm statistics are recomputed after its history row: an epoch
        # interrupted in between is not finished.
        settings = run.settings
        self.recalibrates = settings.recalibrate_bn == "always" or (
            settings.recalibrate_bn == "auto" and stage.phase.train_bn
        )

    @property
    def saved_model(self) -> keras.Model | None:
        return self.full_model or self.model

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch, self._steps = epoch, 0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._steps = batch + 1

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        self.epochs_done = epoch + 1
        self._run_seconds = self.run_clock() if self.run_clock is not None else None
        due = time.monotonic() - self._last_save >= self.every_seconds
        if due or self.epochs_done == self.last_epoch:
            self.save_now()
        elif self.saved_model is not None:
            self._unsaved = (self.epochs_done, _snapshot(self.saved_model), self._run_seconds)

    def save_now(self, interrupted: bool = False) -> None:
        model = self.saved_model
        if model is None:
            return
        try:
            save_checkpoint(
                model,
                self.run_dir / "checkpoint.keras",
                self._state(interrupted),
                phase_start_seeds=self.phase_start_seeds,
            )
            write_json_atomically(self.run_dir / "state.json", self._state(interrupted).to_json())  # for people
        except OSError as error:  # a full disk: the previous checkpoint is intact, and training can go on
            kept = f"the one after epoch {self._saved_through} is kept" if self._saved_through else "none is kept"
            logger.warning(f"checkpoint after epoch {self.epochs_done} not written ({first_line(error)}); {kept}")
            return
        self._last_save = time.monotonic()
        self._saved_through = self.epochs_done
        self._unsaved = None

    def save_interrupted(self) -> None:
        """After Ctrl-C: save the last finished epoch if it was not saved, and mark the state interrupted.

        The live weights are saved only when they are an epoch's end (no step
        of the next epoch done, or every step done and the epoch's
        ``history.csv`` row written); otherwise the snapshot of the last
        finished epoch is. An epoch whose steps are all done but whose row is
        not written (Ctrl-C while it is validated), or whose BatchNorm
        statistics are still to be recomputed at a phase's end, is not
        finished: it runs again after a resume.
        """
        model = self.saved_model
        if model is None:
            return
        boundary = self._live_boundary()
        if boundary is not None and boundary > self._saved_through:
            if boundary > self.epochs_done and self.run_clock is not None:  # its end logged, not yet seen here
                self._run_seconds = self.run_clock()
            self.epochs_done = boundary
            self.save_now(interrupted=True)
        elif self._unsaved is not None and self._unsaved[0] > self._saved_through:
            self.epochs_done, snapshot, self._run_seconds = self._unsaved
            _restore(model, snapshot)  # the live weights are some steps into the next epoch
            self.save_now(interrupted=True)
        elif self._saved_through > self.first_epoch:
            self.epochs_done = self._saved_through
            write_json_atomically(self.run_dir / "state.json", self._state(interrupted=True).to_json())

    def _live_boundary(self) -> int | None:
        """The number of epochs whose end the live weights hold, or None in the middle of an epoch."""
        if self._epoch is None:
            return None
        if self._steps == 0:
            return self._epoch
        steps = (self.params or {}).get("steps")
        ended = self._epoch + 1
        if not steps or self._steps < steps or (ended == self.last_epoch and self.recalibrates):
            return None
        rows = read_history(self.run_dir / "history.csv")
        return ended if rows and int(rows[-1]["epoch"]) == ended else None

    def _state(self, interrupted: bool) -> CheckpointState:
        return CheckpointState(
            phase=self.phase,
            phase_index=self.phase_index,
            phase_epochs_done=self.epochs_done - self.first_epoch,
            epochs_done=self.epochs_done,
            interrupted_during_epoch=self.epochs_done + 1 if interrupted else None,
            # the steps of an unfinished epoch run again after a resume: not counted
            run_seconds=round(self._run_seconds, 2) if self._run_seconds is not None else None,
        )


def _snapshot(model: keras.Model) -> tuple:
    optimizer = getattr(model, "optimizer", None)
    return (
        [keras.ops.convert_to_numpy(v) for v in model.weights],
        [keras.ops.convert_to_numpy(v) for v in (optimizer.variables if optimizer is not None else [])],
        [keras.ops.convert_to_numpy(v) for v in seed_generator_states(model)],
    )


def _restore(model: keras.Model, snapshot: tuple) -> None:
    weights, optimizer_values, seeds = snapshot
    optimizer = getattr(model, "optimizer", None)
    for group, values in (
        (model.weights, weights),
        (optimizer.variables if optimizer is not None else [], optimizer_values),
        (seed_generator_states(model), seeds),
    ):
        for variable, value in zip(group, values, strict=True):
            variable.assign(value)


def seed_generator_states(model: keras.Model) -> list:
    """The random-number state of the model's dropout and augmentation layers, in a fixed order."""
    weights = {id(variable) for variable in model.weights}
    return [v for v in model.variables if id(v) not in weights and v.path.endswith("seed_generator_state")]


def optimizer_key(variable: Any) -> str:
    """An optimizer variable's name without the optimizer's own (``sgd_4/``), which Keras numbers per process."""
    return variable.path.split("/", 1)[-1]


def save_checkpoint(
    model: keras.Model, path: Path, state: CheckpointState, phase_start_seeds: list[np.ndarray] | None = None
) -> None:
    """``model.save`` plus the run's state, the optimizer's variables by name and the RNG states (now and,
    when given, as the phase began), atomically."""
    optimizer = getattr(model, "optimizer", None)
    variables = list(optimizer.variables) if optimizer is not None else []
    names = [optimizer_key(variable) for variable in variables]

    def write(temporary: Path) -> None:
        model.save(temporary)
        with zipfile.ZipFile(temporary, "a") as archive:
            member = {"version": CheckpointState.VERSION, **state.to_json(), "optimizer_variables": names}
            archive.writestr(STATE_MEMBER, json.dumps(member))
            archive.writestr(OPTIMIZER_MEMBER, _npz([keras.ops.convert_to_numpy(v) for v in variables]))
            archive.writestr(SEEDS_MEMBER, _npz([keras.ops.convert_to_numpy(v) for v in seed_generator_states(model)]))
            if phase_start_seeds is not None:
                archive.writestr(PHASE_START_SEEDS_MEMBER, _npz(phase_start_seeds))

    write_atomically(path, write)


def read_checkpoint(path: Path) -> Checkpoint | None:
    """The checkpoint at ``path``, or None when there is none; a damaged file is one line."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with zipfile.ZipFile(path) as archive:
            state = json.loads(archive.read(STATE_MEMBER))
            optimizer = _arrays(archive.read(OPTIMIZER_MEMBER))
            seeds = _arrays(archive.read(SEEDS_MEMBER))
            members = set(archive.namelist())
            phase_start = (
                _arrays(archive.read(PHASE_START_SEEDS_MEMBER)) if PHASE_START_SEEDS_MEMBER in members else None
            )
    except (OSError, KeyError, ValueError, zipfile.BadZipFile) as error:
        raise RunFolderError(f"checkpoint {str(path)!r} cannot be read ({first_line(error)})") from None
    names = state.pop("optimizer_variables", [])
    return Checkpoint(
        path, CheckpointState.from_json(state, path), dict(zip(names, optimizer, strict=True)), seeds, phase_start
    )


def _npz(arrays: list) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, *arrays)
    return buffer.getvalue()


def _arrays(data: bytes) -> list[np.ndarray]:
    with np.load(io.BytesIO(data)) as loaded:
        return [loaded[f"arr_{index}"] for index in range(len(loaded.files))]


def restore_phase_start(checkpoint: Checkpoint, model: keras.Model, phase_begun: bool) -> None:
    """Put back the RNG states that the first phase a resume trains began with in the run that wrote
    ``checkpoint``, before that phase is set up again (its augmented copies drawn, its fit started).

    ``phase_begun``: the checkpoint lies inside that phase, and holds the states of its start (a checkpoint
    of an older finetune has none: the states stay as the model was built). Otherwise the checkpoint holds
    an earlier phase's end, and the uninterrupted run's dropout and augmentation layers went on from its
    states, not from those a freshly built model has.
    """
    _assign_seeds(model, checkpoint.phase_start_seed_generators if phase_begun else checkpoint.seed_generators)


def _assign_seeds(model: keras.Model, values: list[np.ndarray] | None) -> None:
    states = seed_generator_states(model)
    if values is not None and len(states) == len(values):
        for variable, value in zip(states, values, strict=True):
            variable.assign(value)


class RestoreTrainingState(keras.callbacks.Callback):
    """Puts a checkpoint's optimizer variables and RNG states back once ``fit`` has built the optimizer.

    Variables are matched by name, so the order in which a cached fit and a
    whole-model fit build them does not matter; the step counter comes back
    with them, so step-based schedules and 1cycle go on where they were.
    """

    def __init__(self, checkpoint: Checkpoint, full_model: keras.Model):
        super().__init__()
        self.checkpoint = checkpoint
        self.full_model = full_model

    def on_train_begin(self, logs: dict[str, Any] | None = None) -> None:
        optimizer = self.model.optimizer
        if not optimizer.built:  # TensorFlow builds it at the first step; its state must be there before
            optimizer.build(self.model.trainable_variables)
        variables = {optimizer_key(variable): variable for variable in self.model.optimizer.variables}
        saved = self.checkpoint.optimizer
        if set(variables) != set(saved):
            missing = sorted(set(saved) ^ set(variables))[:3]
            raise RunFolderError(
                f"checkpoint {str(self.checkpoint.path)!r} does not match this phase's optimizer "
                f"(differs at {', '.join(missing)})"
            )
        for name, value in saved.items():
            variables[name].assign(value)
        _assign_seeds(self.full_model, self.checkpoint.seed_generators)
