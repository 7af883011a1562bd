"""The orchestrator (pipeline.py) and the run session it opens (session.py), the run's end (conclude.py),
resume (resume.py), the run folder (folder.py), and lr-find (lr_find.py)."""

from finetune.runner.conclude import RunResult
from finetune.runner.folder import RunFolder, check_run_dir, new_run_dir
from finetune.runner.lr_find import LRFindReport, lr_find
from finetune.runner.pipeline import run
from finetune.runner.resume import resume
from finetune.runner.session import RunSession, open_run

__all__ = [
    "LRFindReport",
    "RunFolder",
    "RunResult",
    "RunSession",
    "check_run_dir",
    "lr_find",
    "new_run_dir",
    "open_run",
    "resume",
    "run",
]
