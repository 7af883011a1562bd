"""What one run's training carries, handed down explicitly: the run, and the phase being fitted, which
finetune's callbacks (and a user's) receive through :class:`~finetune.catalog.callbacks.RunCallback`."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import keras
import numpy as np

from finetune.backbones.spec import BackboneLayout
from finetune.catalog.callbacks import RunCallback
from finetune.data.balance import class_weights
from finetune.progress import StageTimes
from finetune.recipe import PhaseConfig, TrainingConfig
from finetune.training.state import Checkpoint


def _nothing(name: str) -> None:
    """The default ``phase_done``: nothing to record."""


@dataclass
class RunContext:
    """One run's training: the model and its blocks, the data, the phases and settings, where files go.

    ``clock`` gives the run's seconds so far (earlier processes' included: a checkpoint keeps it);
    ``resume_from`` is a checkpoint whose weights the model already holds; ``phase_done`` is told
    each finished phase's name (the run folder records it); ``sampling`` is ``data.sampling``
    (``balanced``: each epoch draws every class equally often); ``times`` is charged with each
    phase's frozen-part and training seconds; ``observers`` are the caller's own callbacks, told of every
    phase's epochs after finetune's.
    """

    model: keras.Model
    layout: BackboneLayout
    dataset: Any
    phases: tuple[PhaseConfig, ...]
    settings: TrainingConfig
    seed: int = 0
    run_dir: Path | None = None
    clock: Callable[[], float] | None = None
    resume_from: Checkpoint | None = None
    phase_done: Callable[[str], None] = field(default=_nothing)
    sampling: str = "natural"
    times: StageTimes = field(default_factory=StageTimes)
    observers: tuple[keras.callbacks.Callback, ...] = ()  # a caller's callbacks, every phase (a tuner's pruner)

    def class_weights(self) -> np.ndarray | None:
        """``training.class_weight`` as one weight per class of the training split; None for ``none``."""
        return class_weights(self.settings.class_weight, self.dataset.train.labels, self.dataset.class_names)


@dataclass(frozen=True)
class PhaseRun:
    """One phase as the run fits it: epochs are numbered across phases, as in ``history.csv``."""

    phase: PhaseConfig
    index: int
    first_epoch: int
    """The run's epochs finished before this phase."""
    steps: int
    """Optimizer steps per epoch."""
    epochs_done: int = 0
    """This phase's epochs already in the checkpoint it resumes from."""

    @property
    def name(self) -> str:
        return self.phase.name

    @property
    def last_epoch(self) -> int:
        return self.first_epoch + self.phase.epochs

    @property
    def initial_epoch(self) -> int:
        """The run's epoch the fit starts at."""
        return self.first_epoch + self.epochs_done


@dataclass(frozen=True)
class PhaseFit:
    """What a fit of one phase trains: the compiled model (the whole one, or the top above a cached cut),
    and one batch of what it trains on, drawn when asked."""

    run: RunContext
    phase: PhaseRun
    fit_model: keras.Model
    sample: Callable[[], tuple]


__all__ = ["PhaseFit", "PhaseRun", "RunCallback", "RunContext"]
