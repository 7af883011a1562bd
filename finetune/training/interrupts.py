"""Ctrl-C that is never lost: a pressed key stops training at the next step boundary at the latest.

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


class _Pressed:
    flag = False


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
    if not _inside_a_swallowing_callback(frame):
        raise KeyboardInterrupt


@contextlib.contextmanager
def ctrl_c_remembered() -> Iterator[None]:
    """Inside the block, a Ctrl-C that Python swallowed is raised again by :class:`InterruptAtStepEnd`."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers; a library caller keeps its own
        return
    previous = signal.signal(signal.SIGINT, _raise_and_remember)
    _Pressed.flag = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _Pressed.flag = False


def interrupt_handled() -> None:
    """Forget the remembered press once a ``KeyboardInterrupt`` has been caught and acted on."""
    _Pressed.flag = False


class InterruptAtStepEnd(keras.callbacks.Callback):
    """Raises ``KeyboardInterrupt`` at a batch boundary when a Ctrl-C was pressed but never reached the run."""

    def _check(self, batch: int, logs: dict[str, Any] | None = None) -> None:
        if _Pressed.flag:
            raise KeyboardInterrupt

    on_train_batch_end = on_test_batch_end = on_predict_batch_end = _check
