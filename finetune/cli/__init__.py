"""Command line: ``finetune run``, ``resume``, ``validate``, ``lr-find``, ``predict``, ``evaluate``,
``compare``, ``export``, ``schema``, ``plugins`` and ``weights``.

Every command reports a problem the user can fix as one line on stderr with
exit code 2, an unexpected error as one line with exit code 1, and Ctrl-C
with exit code 130; ``--debug`` shows the traceback behind the line.
"""

from finetune.cli import catalog, results, training  # noqa: F401 - each module adds its commands to main
from finetune.cli.base import main, one_line

__all__ = ["main", "one_line"]
