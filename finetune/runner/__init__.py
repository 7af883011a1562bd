"""The orchestrator (pipeline.py) and the run folder it fills (folder.py)."""

from finetune.runner.folder import RunFolder, check_run_dir, new_run_dir
from finetune.runner.pipeline import RunResult, run

__all__ = ["RunFolder", "RunResult", "check_run_dir", "new_run_dir", "run"]
