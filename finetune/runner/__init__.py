"""The orchestrator (pipeline.py), resume (resume.py) and the run folder they fill (folder.py)."""

from finetune.runner.folder import RunFolder, check_run_dir, new_run_dir
from finetune.runner.pipeline import RunResult, run
from finetune.runner.resume import resume

__all__ = ["RunFolder", "RunResult", "check_run_dir", "new_run_dir", "resume", "run"]
