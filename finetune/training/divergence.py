"""A phase whose first epoch makes the model worse is named, in plain words, while the run goes on.

Two signs, both read at the end of the first epoch that completes at least
``JUDGED_STEPS`` steps of the phase (the first epoch, unless a small data set
makes epochs of a step or two): the mean training loss of those steps is more
than 10% above the loss of the phase's first batch, or it is above chance
(``ln(classes)``, the loss of predicting every class equally, with or without
label smoothing) and did not fall. Either way the updates are destroying more
than they learn: typically a pretrained backbone unfrozen at a head's learning
rate before the head has learnt anything. The warning is logged and kept in
``warnings.json``, which the report shows.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import keras

from finetune.files import write_json_atomically

logger = logging.getLogger(__name__)

WARNINGS_FILE = "warnings.json"
RISE = 1.1
"""A first epoch whose mean loss is this many times its first batch's got worse (below it: batch-to-batch noise)."""
JUDGED_STEPS = 10
"""Steps a judgement reads at least: an epoch of one step has only its first batch to compare with itself."""


def read_warnings(run_dir: Path) -> list[dict]:
    """The warnings a run kept (``[{"phase", "kind", "message"}, ...]``); none when it kept none."""
    path = Path(run_dir) / WARNINGS_FILE
    return json.loads(path.read_text()) if path.exists() else []


def keep_warning(run_dir: Path | None, phase: str, kind: str, message: str) -> None:
    """Add one warning to the run folder's ``warnings.json`` (once per phase and kind)."""
    if run_dir is None:
        return
    kept = read_warnings(run_dir)
    if any(item["phase"] == phase and item["kind"] == kind for item in kept):
        return
    write_json_atomically(Path(run_dir) / WARNINGS_FILE, [*kept, {"phase": phase, "kind": kind, "message": message}])


def divergence_message(
    phase: str,
    classes: int,
    first_batch: float,
    epoch_loss: float,
    *,
    judged: tuple[int, int] = (1, 0),
    head_only: bool = False,
) -> str | None:
    """The warning for a phase whose first ``judged`` (epochs, steps) end at a mean loss of ``epoch_loss``
    after a first batch at ``first_batch``, if any."""
    epochs, steps = judged
    chance = math.log(classes)
    if epoch_loss > RISE * first_batch:
        reason = f"higher than where it started ({first_batch:.3f})"
    elif epoch_loss > chance and epoch_loss >= first_batch:
        # A new head on large features can start far above chance and still be learning: only
        # a loss above chance that did not fall is worse than guessing.
        reason = f"above chance (ln {classes} = {chance:.2f}) and no lower than where it started"
    else:
        return None
    span = "its first epoch" if epochs == 1 else f"its first {steps} steps ({epochs} epochs)"
    lower_the_rate = "the learning rate (finetune lr-find suggests one)"
    advice = (
        f"Lower {lower_the_rate}"
        if head_only  # the head already trains alone: only its rate is left to change
        else f"Train the head alone first (a phase with trainable: none), or lower {lower_the_rate}"
    )
    return (
        f"phase {phase} ended {span} with a training loss of {epoch_loss:.3f}, {reason}: the model got "
        f"worse while training. {advice}"
    )


class DivergenceWatch(keras.callbacks.Callback):
    """Warns once when a phase's first epoch (at least ``JUDGED_STEPS`` steps) ends above chance or
    clearly above its first batch's loss."""

    async_safe = True  # its batch-end hook only records or raises: Keras may run it on a thread

    def __init__(
        self,
        phase: str,
        classes: int,
        first_epoch: int,
        run_dir: Path | None = None,
        *,
        head_only: bool = False,
    ):
        super().__init__()
        self.phase = phase
        self.classes = classes
        self.first_epoch = first_epoch
        self.run_dir = run_dir
        self.head_only = head_only
        self.first_batch: float | None = None
        self.message: str | None = None
        self._judged = False  # also set when the fit resumes inside the phase: its first batch is gone
        self._started = False
        self._epochs = self._steps = self._epoch_steps = 0
        self._loss_sum = 0.0  # the judged epochs' losses, each epoch's mean times its steps

    def on_epoch_begin(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        if not self._started:
            self._started = True
            self._judged = epoch != self.first_epoch
        self._epoch_steps = 0

    def on_train_batch_end(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        self._epoch_steps += 1
        logs = logs or {}
        if self.first_batch is None and not self._judged and "loss" in logs:
            self.first_batch = float(logs["loss"])  # the mean of one batch: the first batch's loss

    def on_epoch_end(self, epoch: int, logs: dict[str, Any] | None = None) -> None:
        logs = logs or {}
        if self._judged or self.first_batch is None or "loss" not in logs:
            return
        self._epochs += 1
        self._steps += self._epoch_steps
        self._loss_sum += float(logs["loss"]) * self._epoch_steps
        last_epoch_of_fit = epoch + 1 >= (self.params or {}).get("epochs", 0)
        if self._steps < JUDGED_STEPS and not last_epoch_of_fit:
            return
        self._judged = True
        mean = self._loss_sum / max(self._steps, 1)
        self.message = divergence_message(
            self.phase,
            self.classes,
            self.first_batch,
            mean,
            judged=(self._epochs, self._steps),
            head_only=self.head_only,
        )
        if self.message is not None:
            logger.warning(self.message)
            keep_warning(self.run_dir, self.phase, "diverging", self.message)
