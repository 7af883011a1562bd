"""The command line's shared part: the ``finetune`` group, one-line errors, quiet start-up, progress.

Every command reports a problem the user can fix as one line on stderr with
exit code 2, an unexpected error as one line with exit code 1, Ctrl-C with
exit code 130, and SIGTERM stopping a run (Kubernetes, Slurm, systemd) as
Ctrl-C with exit code 143 (128 + 15, what a shell reports for a process
SIGTERM ended); ``--debug`` shows the traceback behind the line. A command
given ``--json`` writes that line as one JSON object, ``{"error": "..."}``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shlex
import sys
import traceback
import unicodedata
from collections.abc import Iterator

import click

from finetune import __version__
from finetune.errors import FinetuneError, Terminated, describe

SET_HELP = (
    "Override a recipe value: a dotted path, phases addressed by name "
    "(phases.head.epochs=1); VALUE is read as YAML (null, 3, 1e-4, [96, 96]). Repeatable."
)


@contextlib.contextmanager
def native_stderr_silenced():
    """Hide what C++ libraries print on stderr (TensorFlow's start-up logging).

    TensorFlow 2.21 logs its CUDA probing before ``TF_CPP_MIN_LOG_LEVEL`` is
    read. What was printed is shown after all if the block fails.
    """
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        except BaseException:
            os.dup2(saved, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def load_backend_quietly() -> None:
    """Import Keras and let TensorFlow probe for GPUs with its chatter hidden."""
    with native_stderr_silenced():
        import keras

        if keras.backend.backend() == "tensorflow":
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")
            tf.get_logger().setLevel("ERROR")  # retracing notices from short predict calls are not the user's concern


QUIET = click.option("--quiet", "-q", is_flag=True, help="No progress and no log lines; errors only.")


@contextlib.contextmanager
def lines_on_stderr(quiet: bool = False) -> Iterator[None]:
    """For the command, the ``finetune`` logger's lines go to stderr as ``[finetune] ...`` (a live line too, on a
    terminal); ``--quiet`` raises the logger's level so that only errors, which the command prints, remain."""
    import logging

    # Imported here: a command pays for what it uses; `finetune --help` loads no more than click.
    from finetune.progress import LOGGER_NAME, Progress, ProgressHandler

    logger = logging.getLogger(LOGGER_NAME)
    handler = ProgressHandler(Progress(sys.stderr, "auto"))
    level, propagate = logger.level, logger.propagate
    logger.addHandler(handler)
    # The command owns its output: a library that configures the root logger (a bare logging.info() does)
    # must not print each line a second time.
    logger.propagate = False
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate
        handler.progress.end_live()


def reported(command):
    """Give ``command`` a ``--debug`` flag and turn what it raises into one line and an exit code."""

    @click.option("--debug", is_flag=True, help="Show the full traceback behind an error.")
    @functools.wraps(command)
    def wrapper(*args, debug: bool = False, **kwargs):
        as_json = bool(kwargs.get("as_json"))  # a command's --json: its error is JSON too
        try:
            return command(*args, **kwargs)
        except FinetuneError as error:
            _fail(error, f"error: {error}", 2, debug, as_json)
        except KeyboardInterrupt as error:
            where = getattr(error, "run_dir", None)
            terminated = isinstance(error, Terminated) or getattr(error, "terminated", False)
            line = "terminated (SIGTERM)" if terminated else "interrupted"
            if where is not None:
                line += f"; the last finished epoch is saved. Continue with: finetune resume {shlex.quote(str(where))}"
            elif (resume_command := getattr(error, "resume_command", None)) is not None:
                line += f". Continue with: {resume_command}"
            _fail(error, line, 143 if terminated else 130, debug, as_json)
        except (click.exceptions.Exit, click.ClickException, SystemExit):
            raise
        except BrokenPipeError:  # `finetune plugins | head`: the reader has gone; say nothing more
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(1)
        except Exception as error:  # noqa: BLE001 - a bug, not the user's input: still one line, and a way to see more
            line = f"error: unexpected {describe(error)} (run again with --debug for the traceback)"
            _fail(error, line, 1, debug, as_json)

    return wrapper


def _fail(error: BaseException, line: str, code: int, debug: bool, as_json: bool = False) -> None:
    if debug:
        traceback.print_exception(error, file=sys.stderr)
    # With --json the program reading the output gets the line as one JSON object, still on stderr
    # (stdout holds only results) and with the same exit code.
    click.echo(json.dumps({"error": line.removeprefix("error: ")}) if as_json else one_line(line), err=True)
    sys.exit(code)


def one_line(text: str) -> str:
    """``text`` with control characters (newlines from a recipe key, say) written as escapes."""
    return "".join(
        character
        if character == " " or unicodedata.category(character)[0] not in "CZ"
        else character.encode("unicode_escape").decode("ascii")
        for character in text
    )


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="finetune")
def main():
    """Fine-tune keras.applications backbones from a YAML recipe.

    \b
    finetune validate recipes/xception_fmnist.yaml
    finetune run recipes/xception_fmnist.yaml --set data.train_limit=2000
    """
    # Quiet TensorFlow's C++ start-up chatter; nothing has imported TensorFlow yet.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # Imported here: a command pays for what it uses; `finetune --help` loads no more than click.
    from finetune.allocator import keep_freed_memory

    keep_freed_memory()
