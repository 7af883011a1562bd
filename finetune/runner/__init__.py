"""The orchestrator (pipeline.py) and the run session it opens (session.py), the run's end (conclude.py),
resume (resume.py), the run folder (folder.py), and lr-find (lr_find.py)."""

from __future__ import annotations

import importlib
from typing import Any

# Where each name lives; a module is imported on first use, so `finetune compare` (which reads run
# folders) loads neither Keras nor TensorFlow. `resume` and `lr_find` are named by their modules
# (finetune.runner.resume.resume): a lazily imported submodule would shadow a function of its name.
_LAZY = {
    "RunFolder": "finetune.runner.folder",
    "RunResult": "finetune.runner.conclude",
    "RunSession": "finetune.runner.session",
    "check_run_dir": "finetune.runner.folder",
    "new_run_dir": "finetune.runner.folder",
    "open_run": "finetune.runner.session",
    "run": "finetune.runner.pipeline",
}

__all__ = sorted(_LAZY)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'finetune.runner' has no attribute {name!r}")
