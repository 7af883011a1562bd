"""The orchestrator (pipeline.py), resume (resume.py), their run folder (folder.py), and lr-find (lr_find.py)."""

from finetune.runner.folder import RunFolder, check_run_dir, new_run_dir
from finetune.runner.lr_find import LRFindReport, lr_find
from finetune.runner.pipeline import RunResult, run
from finetune.runner.resume import resume

__all__ = ["LRFindReport", "RunFolder", "RunResult", "check_run_dir", "lr_find", "new_run_dir", "resume", "run"]
