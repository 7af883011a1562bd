"""Errors that reach the user as one line, never as a traceback."""


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


class RunFolderError(FinetuneError):
    """The run folder cannot be used (it would overwrite an earlier run)."""
