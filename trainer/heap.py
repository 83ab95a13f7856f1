"""Give the memory a finished run freed back to the operating system, so a long-running web UI
does not grow run after run."""

from __future__ import annotations

import ctypes
import ctypes.util
import sys


def return_freed_memory() -> bool:
    """Hand memory that Python and torch have freed back to the operating system (Linux/glibc).

    glibc raises its mmap threshold after the first large free, so the trainer's later copies of
    a model's weights come from the heap, and freeing them leaves the process's resident memory
    where it was: in a web UI that keeps running, every run would add the size of that copy.
    ``malloc_trim(0)`` returns the free heap pages (measured: a freed 1.8 GB copy of 6.5 MB
    tensors stayed resident until the trim). No library offers this; it is one libc call.
    Returns False where there is no glibc (macOS, Windows, musl), where it does nothing.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim(0)
    return True
