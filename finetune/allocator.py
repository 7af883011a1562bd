"""Freed memory kept for reuse: glibc's malloc told not to hand large blocks back to the system at once.

By default glibc serves blocks over a threshold with their own ``mmap`` and
gives free memory at the top of the heap back with ``trim``; a training step
frees and allocates the same large tensors again and again, so every step
pays the kernel to map and zero fresh pages. Where page faults are dear (a
virtual machine) that is a third of a CPU run's time. Raising the mmap and
trim thresholds keeps those pages in the process: the peak memory is the
same, the system time falls (``scripts/allocator_bench.sh`` measures it).
``FINETUNE_MALLOC=default`` leaves the allocator as it is.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

M_TRIM_THRESHOLD = -1
M_TOP_PAD = -2
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 32 * 1024**2  # glibc's largest allowed value on 64-bit systems
TRIM_THRESHOLD = 1024**3
TOP_PAD = 256 * 1024**2

_applied: bool | None = None


def keep_freed_memory() -> bool:
    """Tell glibc to keep freed memory for reuse (once per process); False where it is not glibc or turned off."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("FINETUNE_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = all(
        mallopt(option, value) == 1
        for option, value in (
            (M_MMAP_THRESHOLD, MMAP_THRESHOLD),
            (M_TRIM_THRESHOLD, TRIM_THRESHOLD),
            (M_TOP_PAD, TOP_PAD),
        )
    )
    return _applied
