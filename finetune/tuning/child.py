"""One trial of a study in a process of its own (``finetune tune``'s default), so its memory ends with it.

    python -m finetune.tuning.child STUDY_DIR TRIAL_ID WORKER_INDEX

The study's process has asked Optuna for the trial; this one suggests its values (Optuna's storage keeps
them), runs it as a run folder reporting its epochs to the pruner, records its memory, and prints
``{"state": ..., "value": ...}`` as its last line. It dies with the study's process (kill -9 included),
so a killed study leaves no trial running on its own.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path


def _die_with_parent(parent: int) -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG (Linux)
    except (OSError, AttributeError):
        pass
    if os.getppid() != parent:  # the study's process died before the line above
        os._exit(1)


def main(arguments: list[str]) -> int:
    _die_with_parent(int(os.environ.get("FINETUNE_TUNE_PARENT", os.getppid())))
    import optuna

    from finetune.tuning.space import read_space
    from finetune.tuning.study import _resident_mb, _study, read_settings, run_trial

    out, trial_id, worker = Path(arguments[0]), int(arguments[1]), int(arguments[2])
    import logging

    from finetune.progress import LineFormatter

    handler = logging.StreamHandler(sys.stderr)  # the trial's warnings, as the study's own lines look
    handler.setFormatter(LineFormatter())
    handler.setLevel(logging.WARNING)
    logging.getLogger("finetune").addHandler(handler)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    settings = read_settings(out)
    study = _study(settings, seed_offset=worker)
    trial = optuna.trial.Trial(study, trial_id)
    state, value = run_trial(trial, read_space(out / "space.yaml"), out / "base_recipe.yaml", settings, out)
    trial.set_user_attr("rss_mb", _resident_mb())
    trial.set_user_attr("process", os.getpid())
    print(json.dumps({"state": state.name, "value": value}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
