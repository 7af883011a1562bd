"""A Keras callback that reports each epoch's validation metric to an Optuna trial and stops a poor one.

Written here rather than taken from optuna-integration, whose Keras callbacks moved and broke across
versions: it is ``trial.report`` and ``trial.should_prune`` after every epoch of the run's last phase.
"""

from __future__ import annotations

import math

from finetune.catalog.callbacks import RunCallback


class TrialPruned(Exception):
    """Raised out of ``fit`` when the pruner stops the trial; ``epoch`` is the last epoch reported."""

    def __init__(self, epoch: int, value: float):
        super().__init__(f"pruned after epoch {epoch} ({value:.4g})")
        self.epoch = epoch
        self.value = value


class ReportToTrial(RunCallback):
    """``metric`` from each epoch's logs; those of the run's last phase go to ``trial`` (step = that phase's
    epoch, 1-based), where the pruner may stop it before its last epoch.

    Earlier phases are not judged: a head trained on a frozen backbone ranks trials otherwise than their end
    does (in the quick start's study, the 80 px trials had the lowest head-phase accuracy, and the best final
    one among them). Without a run (a bare fit), every epoch is judged.
    """

    def __init__(self, trial, metric: str):
        super().__init__()
        self.trial = trial
        self.metric = metric
        self.epochs = 0
        self.judging = True
        self.judged = 0
        self.values: list[float] = []

    def set_run(self, fit) -> None:
        super().set_run(fit)
        self.judging = fit.phase.index == len(fit.run.phases) - 1

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self.epochs += 1
        value = (logs or {}).get(self.metric)
        if value is None:
            raise KeyError(f"the epoch's logs have no {self.metric}: {', '.join(sorted(logs or {}))}")
        value = float(value)
        self.values.append(value)
        if not self.judging or not math.isfinite(value):
            return  # a diverged epoch: the run's own divergence watch stops it
        self.judged += 1
        self.trial.report(value, self.judged)
        # The run's last epoch is never pruned: stopping it saves nothing, and would lose the trial's value.
        last = epoch + 1 >= (self.params or {}).get("epochs", epoch + 2)
        if not last and self.trial.should_prune():
            raise TrialPruned(self.epochs, value)
