"""The learning-rate finder (Hands-On ML ch. 11, fastai's ``lr_find``): one short fit at exponentially growing rates.

The rate grows from ``start`` to ``end`` over ``steps`` batches; each batch's loss
is recorded and smoothed, and the fit stops once the smoothed loss passes
``stop_factor`` times its minimum (or a loss is not finite). The suggestion is
the rate at the smoothed loss's minimum divided by 10 (the book's rule: the best
rate is about 10 times lower than where the loss turns up). The model's weights
are restored afterwards.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import keras
import numpy as np

from finetune.data.batches import FileBatches
from finetune.data.graph_batches import fit_feed
from finetune.recipe import PhaseConfig
from finetune.training.context import RunContext
from finetune.training.features import FeatureStore
from finetune.training.phases import (
    compile_model,
    configure_phase,
    fit_inputs,
    phase_optimizer,
    training_batches,
)

logger = logging.getLogger(__name__)

SMOOTHING = 0.9
"""The loss's exponential moving average keeps this much of its last value each step (10 steps' memory)."""
STOP_FACTOR = 4.0


@dataclass(frozen=True)
class SweepSettings:
    """How a sweep runs: rates from ``start`` to ``end`` over at most ``steps`` batches, the loss's smoothing,
    the factor over its minimum at which it stops, and the seed of its shuffled batches."""

    start: float = 1e-7
    end: float = 10.0
    steps: int = 200
    smoothing: float = SMOOTHING
    stop_factor: float = STOP_FACTOR
    seed: int = 0

    def check(self) -> None:
        if not 0 < self.start < self.end:
            raise ValueError(f"the sweep needs 0 < start < end, got start={self.start}, end={self.end}")
        if self.steps < 2:
            raise ValueError(f"the sweep needs at least 2 steps, got {self.steps}")


@dataclass(frozen=True)
class LRFinderResult:
    """The rates swept, the smoothed loss at each, and the suggested rate."""

    learning_rates: list[float]
    losses: list[float]
    suggestion: float
    raw_losses: list[float] = field(default_factory=list)
    stopped_early: bool = False

    @property
    def minimum(self) -> float:
        """The rate at the lowest smoothed loss (10 times the suggestion)."""
        return self.learning_rates[int(np.argmin(self.losses))]

    def to_dict(self) -> dict:
        return {
            "suggestion": self.suggestion,
            "rule": "learning rate at the minimum of the smoothed loss / 10",
            "minimum_at": self.minimum,
            "stopped_early": self.stopped_early,
            "learning_rates": self.learning_rates,
            "losses": self.losses,
            "raw_losses": self.raw_losses,
        }


def sweep_rates(start: float, end: float, steps: int) -> np.ndarray:
    """``start * (end / start) ** (i / (steps - 1))`` for ``i`` in ``0 .. steps - 1``."""
    return start * (end / start) ** (np.arange(steps) / max(steps - 1, 1))


def suggest(learning_rates: Sequence[float] | np.ndarray, losses: Sequence[float] | np.ndarray) -> float:
    """The rate at the smoothed loss's minimum, divided by 10."""
    return float(learning_rates[int(np.argmin(losses))]) / 10.0


class LRSweep(keras.callbacks.Callback):
    """Sets the optimizer's rate before each batch and records the batch's loss; stops when the loss explodes.

    Keras reports the epoch's running mean as ``loss``; the batch's own loss is
    recovered from the running means weighted by the batches' sizes.
    """

    def __init__(
        self,
        rates: Sequence[float] | np.ndarray,
        sizes: list[int],
        smoothing: float = SMOOTHING,
        stop_factor: float = STOP_FACTOR,
    ):
        super().__init__()
        self.rates = [float(rate) for rate in rates]
        self.sizes = sizes  # filled by the batches as they are read
        self.smoothing = smoothing
        self.stop_factor = stop_factor
        self.learning_rates: list[float] = []
        self.raw_losses: list[float] = []
        self.losses: list[float] = []
        self.stopped_early = False
        self._average = 0.0
        self._total = 0.0
        self._seen = 0

    def on_train_batch_begin(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self.model.optimizer.learning_rate.assign(self.rates[len(self.learning_rates)])

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        step = len(self.learning_rates)
        running = float((logs or {})["loss"])
        seen = self._seen + self.sizes[step]
        loss = (running * seen - self._total) / self.sizes[step]
        self._total, self._seen = running * seen, seen
        if not math.isfinite(loss):
            self.stopped_early = True
            self.model.stop_training = True
            return
        self._average = self.smoothing * self._average + (1 - self.smoothing) * loss
        smoothed = self._average / (1 - self.smoothing ** (step + 1))  # bias-corrected, as fastai does
        self.learning_rates.append(self.rates[step])
        self.raw_losses.append(loss)
        self.losses.append(smoothed)
        if smoothed > self.stop_factor * min(self.losses):
            self.stopped_early = True
            self.model.stop_training = True


class SweepBatches(keras.utils.PyDataset):
    """``steps`` batches read from ``batches`` pass after pass (its last, smaller batch left out).

    ``batches`` is a :class:`~finetune.data.batches.FileBatches` (or one of its
    kinds); step ``i`` reads batch ``i % per_pass`` of pass ``i // per_pass``,
    each pass in its own shuffled order, whatever order Keras asks for them in
    (it reads batch 0 first to learn the shapes). A dataset smaller than the
    sweep is cycled as often as the sweep needs.
    """

    def __init__(self, batches: Any, steps: int):
        super().__init__()
        self.batches = batches
        self.steps = steps
        whole = batches.rows // batches.batch_size
        self.per_epoch = whole if whole else len(batches)
        self.sizes: list[int] = [self._size(index) for index in range(steps)]
        self._passes: dict[int, Any] = {}

    @property
    def passes(self) -> int:
        """How many passes over the training data the sweep reads."""
        return math.ceil(self.steps / self.per_epoch)

    def _size(self, index: int) -> int:
        position = index % self.per_epoch
        return min(self.batches.batch_size, self.batches.rows - position * self.batches.batch_size)

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, index: int) -> Any:
        epoch = index // self.per_epoch
        if epoch not in self._passes:
            if len(self._passes) > 4:  # Keras reads ahead a little; older passes are not asked for again
                self._passes.pop(min(self._passes))
            self._passes[epoch] = self.batches.at_epoch(self.batches.epoch + epoch)
        return self._passes[epoch][index % self.per_epoch]


def sweep(
    model: keras.Model,
    batches: Any,
    settings: SweepSettings = SweepSettings(),
    *,
    callbacks: list[keras.callbacks.Callback] | None = None,
    restore: keras.Model | None = None,
) -> LRFinderResult:
    """The sweep on a compiled ``model`` whose optimizer has a plain (variable) rate, over ``batches``.

    The weights of ``restore`` (default ``model``; the whole model when
    ``model`` is its top above a cached cut) and the optimizer's state are put
    back afterwards.
    """
    settings.check()
    optimizer = model.optimizer
    if not isinstance(optimizer.learning_rate, keras.Variable):
        raise ValueError("the optimizer's learning rate is a schedule; the sweep needs a plain rate")
    restore = restore if restore is not None else model
    if not optimizer.built:
        optimizer.build(model.trainable_variables)
    weights = restore.get_weights()
    state = [keras.ops.convert_to_numpy(variable) for variable in optimizer.variables]
    rate = keras.ops.convert_to_numpy(optimizer.learning_rate)
    data = SweepBatches(batches, settings.steps)
    rates = sweep_rates(settings.start, settings.end, settings.steps)
    recorder = LRSweep(rates, data.sizes, settings.smoothing, settings.stop_factor)
    try:
        feed, _ = fit_feed(data)  # one epoch: no order to keep in step
        model.fit(feed, epochs=1, shuffle=False, verbose=0, callbacks=[recorder, *(callbacks or [])])
    finally:
        restore.set_weights(weights)
        for variable, value in zip(optimizer.variables, state, strict=True):
            variable.assign(value)
        optimizer.learning_rate.assign(rate)
    if not recorder.losses:
        raise ValueError(f"the loss was not finite at the first rate ({settings.start:g}); start lower")
    return LRFinderResult(
        learning_rates=recorder.learning_rates,
        losses=recorder.losses,
        suggestion=suggest(recorder.learning_rates, recorder.losses),
        raw_losses=recorder.raw_losses,
        stopped_early=recorder.stopped_early,
    )


def find_learning_rate(
    model: keras.Model,
    x: Any,
    y: Any,
    settings: SweepSettings = SweepSettings(),
    *,
    batch_size: int = 32,
    callbacks: list[keras.callbacks.Callback] | None = None,
) -> LRFinderResult:
    """Sweep the learning rate of a compiled ``model`` (its optimizer and loss) on ``x`` (arrays) and ``y``.

    The batches are shuffled, and reshuffled each pass over ``x``; the
    model's weights and its optimizer's state and rate are restored afterwards.
    ``model`` must be compiled with ``steps_per_execution=1`` (the rate changes every step).
    """
    if model.steps_per_execution != 1:
        raise ValueError("compile the model with steps_per_execution=1: the sweep changes the rate every step")
    batches = FileBatches(x, y, min(batch_size, len(y)), shuffle=True, seed=settings.seed)
    return sweep(model, batches, settings, callbacks=callbacks)


def find_phase_learning_rate(run: RunContext, phase: PhaseConfig, settings: SweepSettings) -> LRFinderResult:
    """The sweep for ``phase``: its trainable set, optimizer (schedule ignored), loss and batch size.

    Where the phase would train on cached features, the frozen part runs once
    (:class:`~finetune.training.features.FeatureStore`) and the sweep fits the top.
    """
    model, dataset, training = run.model, run.dataset, run.settings
    configure_phase(model, run.layout, phase)
    optimizer = phase_optimizer(run.layout, phase, settings.start)
    compile_model(model, optimizer, training, soft_labels=bool(training.mix))
    store = FeatureStore([phase], training, run.layout)
    try:
        inputs = fit_inputs(model, phase, dataset, training, store)
        batch_size = min(training.batch_size_for(phase), len(dataset.train))
        if batch_size < training.batch_size_for(phase):
            logger.info(
                f"lr-find: {len(dataset.train)} training images are fewer than one batch of "
                f"{training.batch_size_for(phase)}; the sweep's batches hold all {batch_size}"
            )
        batches = training_batches(inputs, run, batch_size, 0)
        passes = math.ceil(settings.steps / max(1, len(dataset.train) // batch_size))
        if passes > 1:
            logger.info(
                f"lr-find: {settings.steps} steps read the {len(dataset.train)} training images {passes} times over"
            )
        return sweep(inputs.fit_model, batches, settings, restore=model)
    finally:
        store.close()
