"""Ctrl-C that is never lost: a pressed key stops training at the next step boundary at the latest.

SIGTERM, what Kubernetes, Slurm and systemd send to stop a job, is handled the same way: it raises
:class:`~finetune.errors.Terminated`, a ``KeyboardInterrupt``, so the run saves its last finished
epoch and says how to resume, as on Ctrl-C.

Python raises ``KeyboardInterrupt`` wherever the interpreter happens to be when
SIGINT arrives. If that is a garbage-collector callback (JAX installs one) or a
``__del__``, Python prints "Exception ignored" with a traceback and carries on,
and the run would train to the end as if the key had never been pressed. The
handler here remembers the press and raises, unless the interrupted frame runs
inside such a callback, where the exception could only be swallowed;
:class:`InterruptAtStepEnd` then raises at the next batch boundary.
"""

from __future__ import annotations

import contextlib
import gc
import signal
import threading
from collections.abc import Iterator
from types import FrameType
from typing import Any

import keras

from finetune.errors import Terminated


class _Pressed:
    flag = False
    terminated = False  # the remembered signal was SIGTERM


def _interrupt() -> KeyboardInterrupt:
    return Terminated() if _Pressed.terminated else KeyboardInterrupt()


def _inside_a_swallowing_callback(frame: FrameType | None) -> bool:
    """Whether an exception raised in ``frame`` would end in a garbage-collector callback or ``__del__``."""
    callback_codes = {getattr(callback, "__code__", None) for callback in gc.callbacks}
    while frame is not None:
        if frame.f_code in callback_codes or frame.f_code.co_name == "__del__":
            return True
        frame = frame.f_back
    return False


def _raise_and_remember(signum: int, frame: FrameType | None) -> None:
    _Pressed.flag = True
    _Pressed.terminated = _Pressed.terminated or signum == signal.SIGTERM
    if not _inside_a_swallowing_callback(frame):
        raise _interrupt()


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated


def _sigterm_is_ours() -> bool:
    """Whether SIGTERM does what it does by default (ends the process) or what finetune set; an application's
    own handler (or one set outside Python) is left alone."""
    return signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, _raise_terminated, _raise_and_remember)


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Inside the block, SIGTERM raises :class:`~finetune.errors.Terminated` (a ``KeyboardInterrupt``) instead of
    ending the process on the spot: what a run does on Ctrl-C (``run.json`` marked interrupted, the last finished
    epoch saved) it does when a scheduler stops it. Outside the main thread, or where the application set its own
    SIGTERM handler, nothing changes."""
    if threading.current_thread() is not threading.main_thread() or not _sigterm_is_ours():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def ctrl_c_remembered() -> Iterator[None]:
    """Inside the block, a Ctrl-C (or SIGTERM) that Python swallowed is raised again by :class:`InterruptAtStepEnd`."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers; a library caller keeps its own
        return
    previous = signal.signal(signal.SIGINT, _raise_and_remember)
    sigterm, previous_sigterm = _sigterm_is_ours(), signal.getsignal(signal.SIGTERM)
    if sigterm:
        signal.signal(signal.SIGTERM, _raise_and_remember)
    interrupt_handled()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if sigterm:
            signal.signal(signal.SIGTERM, previous_sigterm)
        interrupt_handled()


def interrupt_handled() -> None:
    """Forget the remembered press once a ``KeyboardInterrupt`` has been caught and acted on."""
    _Pressed.flag = _Pressed.terminated = False


class InterruptAtStepEnd(keras.callbacks.Callback):
    """Raises ``KeyboardInterrupt`` at a batch boundary when a Ctrl-C was pressed but never reached the run."""

    async_safe = True  # its batch-end hook only records or raises: Keras may run it on a thread

    def _check(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if _Pressed.flag:
            raise _interrupt()

    on_train_batch_end = on_test_batch_end = on_predict_batch_end = _check
