"""Errors that reach the user as one line, never as a traceback."""

from __future__ import annotations


class FinetuneError(Exception):
    """A problem the user can fix: bad recipe, missing data or weights.

    The command line prints ``str(error)`` on one line and exits with code 2.
    """


class RecipeError(FinetuneError):
    """The recipe (or a ``--set`` override) is invalid."""


class DataError(FinetuneError):
    """The dataset cannot be found or read."""


class WeightsError(FinetuneError):
    """Backbone weights cannot be found or loaded."""


class ModelError(FinetuneError):
    """A saved model (run folder, ``model.keras``, SavedModel) cannot be found or loaded."""


class RunFolderError(FinetuneError):
    """The run folder cannot be used (it would overwrite an earlier run, or another process holds it)."""


class TrainingDiverged(FinetuneError):
    """The loss became NaN or infinite; the checkpoint keeps the last good epoch."""


class ExportError(FinetuneError):
    """An export cannot be written (a converter package is missing) or disagrees with the Keras model."""


class DistributionError(FinetuneError):
    """The recipe's ``distribution`` cannot run here (no ``TF_CONFIG``, a backend without that strategy)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (Kubernetes, Slurm, systemd stopping the job) stopped the work; handled as Ctrl-C is."""

    def __init__(self, message: str = "SIGTERM"):
        super().__init__(message)


class RunInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGTERM: ``terminated``) stopped a run; ``run_dir`` holds what ``finetune resume`` needs."""

    def __init__(self, run_dir, terminated: bool = False):
        super().__init__(str(run_dir))
        self.run_dir = run_dir
        self.terminated = terminated


def first_line(error: BaseException) -> str:
    """An error's message cut to its first line, or its type's name when it has none.

    Third-party errors (Keras, Pillow, TensorFlow) often carry pages of
    context; the user sees one line and ``--debug`` shows the rest.
    """
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def describe(error: BaseException) -> str:
    """``TypeName: first line`` (just ``TypeName`` when the error has no message)."""
    name = type(error).__name__
    text = str(error).strip()
    return f"{name}: {text.splitlines()[0]}" if text else name
