"""A Keras callback that reports each epoch's validation metric to an Optuna trial and stops a poor one.

Written here rather than taken from optuna-integration, whose Keras callbacks moved and broke across
versions: it is ``trial.report`` and ``trial.should_prune`` after every epoch, numbered across phases.
"""

from __future__ import annotations

import math

import keras


class TrialPruned(Exception):
    """Raised out of ``fit`` when the pruner stops the trial; ``epoch`` is the last epoch reported."""

    def __init__(self, epoch: int, value: float):
        super().__init__(f"pruned after epoch {epoch} ({value:.4g})")
        self.epoch = epoch
        self.value = value


class ReportToTrial(keras.callbacks.Callback):
    """``metric`` from each epoch's logs to ``trial`` (step = the run's epoch, 1-based, across phases)."""

    def __init__(self, trial, metric: str):
        super().__init__()
        self.trial = trial
        self.metric = metric
        self.epochs = 0
        self.values: list[float] = []

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.epochs += 1
        value = (logs or {}).get(self.metric)
        if value is None:
            raise KeyError(f"the epoch's logs have no {self.metric}: {', '.join(sorted(logs or {}))}")
        value = float(value)
        self.values.append(value)
        if not math.isfinite(value):
            return  # a diverged epoch: the run's own divergence watch stops it
        self.trial.report(value, self.epochs)
        if self.trial.should_prune():
            raise TrialPruned(self.epochs, value)
