"""Where a run stood at its checkpoint, as typed data: what resume reads and ``state.json`` shows."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from finetune.errors import RunFolderError, first_line


@dataclass(frozen=True)
class CheckpointState:
    """Where a run stood at its checkpoint: ``state.json``, and the same inside ``checkpoint.keras``."""

    VERSION: ClassVar[int] = 1
    """Of the copy inside ``checkpoint.keras``; a newer one than this code knows is refused in one line."""

    phase: str
    phase_index: int
    phase_epochs_done: int
    epochs_done: int
    interrupted_during_epoch: int | None = None
    """The epoch Ctrl-C stopped (it runs again after a resume)."""
    run_seconds: float | None = None
    """The run's clock at the end of the epoch the weights hold, earlier processes' included."""

    def to_json(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "phase": self.phase,
            "phase_index": self.phase_index,
            "phase_epochs_done": self.phase_epochs_done,
            "epochs_done": self.epochs_done,
        }
        if self.interrupted_during_epoch is not None:
            state["interrupted_during_epoch"] = self.interrupted_during_epoch
        if self.run_seconds is not None:
            state["run_seconds"] = self.run_seconds
        return state

    @classmethod
    def from_json(cls, data: dict[str, Any], where: Path) -> CheckpointState:
        version = int(data.get("version", 1))
        if version > cls.VERSION:
            raise RunFolderError(
                f"checkpoint {str(where)!r} was written by a newer finetune (state version {version}); "
                "resume it with that version"
            )
        try:
            return cls(
                phase=str(data["phase"]),
                phase_index=int(data["phase_index"]),
                phase_epochs_done=int(data["phase_epochs_done"]),
                epochs_done=int(data["epochs_done"]),
                interrupted_during_epoch=data.get("interrupted_during_epoch"),
                run_seconds=data.get("run_seconds"),
            )
        except (KeyError, TypeError, ValueError) as error:
            raise RunFolderError(f"checkpoint {str(where)!r} has no usable state ({first_line(error)})") from None


@dataclass
class Checkpoint:
    """What ``checkpoint.keras`` says about where its run stood, with the optimizer's and RNGs' state."""

    path: Path
    state: CheckpointState
    optimizer: dict[str, np.ndarray] = field(default_factory=dict)
    seed_generators: list[np.ndarray] = field(default_factory=list)
    phase_start_seed_generators: list[np.ndarray] | None = None
    """The RNG states as the checkpoint's phase began (None: a checkpoint written before finetune kept them)."""
