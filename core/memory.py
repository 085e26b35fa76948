"""glibc malloc settings for the long-running daemons (agent and coordinator).

Both move megabytes per message (file reads, sealed envelopes, upload and
download messages). With glibc's defaults every buffer above the dynamic mmap
threshold is a fresh mapping, and the heap's top is given back to the kernel
as soon as twice that threshold is free, so the next buffer faults its pages in
and zeroes them again: a 2 GB backup took ~220k page faults in the agent and
~100-250k in the coordinator. Keeping those buffers in the heap (a fixed mmap
threshold above the message size, a trim threshold above a run's working set)
reuses the same pages; `trim_malloc` returns them when a job ends.

Every setting yields to glibc's own environment variable (`MALLOC_ARENA_MAX`,
`MALLOC_MMAP_THRESHOLD_`, `MALLOC_TRIM_THRESHOLD_`) when that is set. Not glibc
(musl): nothing is changed.
"""

from __future__ import annotations

import ctypes
import os
from typing import Any

MiB = 1024 * 1024

# <malloc.h> mallopt parameters
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8
_ENV = {
    _M_ARENA_MAX: "MALLOC_ARENA_MAX",
    _M_MMAP_THRESHOLD: "MALLOC_MMAP_THRESHOLD_",
    _M_TRIM_THRESHOLD: "MALLOC_TRIM_THRESHOLD_",
}


def _libc(name: str) -> Any:
    """A function of the interpreter's C library, or None."""
    try:
        return getattr(ctypes.CDLL(None), name)
    except (OSError, AttributeError):
        return None


def tune_malloc(
    *,
    arenas: int | None = None,
    mmap_threshold: int | None = None,
    trim_threshold: int | None = None,
) -> dict[str, int]:
    """Set what is given (before any thread starts); returns what was set, by glibc's
    variable name (empty where nothing applies)."""
    mallopt = _libc("mallopt")
    if mallopt is None:
        return {}
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    done: dict[str, int] = {}
    for param, value in (
        (_M_ARENA_MAX, arenas),
        (_M_MMAP_THRESHOLD, mmap_threshold),
        (_M_TRIM_THRESHOLD, trim_threshold),
    ):
        if value is None or value <= 0 or _ENV[param] in os.environ:
            continue
        if mallopt(param, value):
            done[_ENV[param]] = value
    return done


def trim_malloc() -> bool:
    """Give the heap's free pages back to the kernel (glibc malloc_trim). False where there
    is no malloc_trim (not glibc)."""
    trim = _libc("malloc_trim")
    if trim is None:
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return bool(trim(0))
