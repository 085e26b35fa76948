"""The GIL's switch interval, shortened while a stage that makes many short system calls runs.

CPython hands the GIL to a waiting thread only every switch interval (5 ms by default). A
thread that makes one short system call after another (a restore's writer: a create or a
pwrite per blob) releases the GIL for each call and then waits up to a whole interval to get
it back from a thread busy in Python. Such a stage asks for a shorter interval while it runs
(docs/performance.md). The interval is the process's: overlapping jobs share it, the
shortest asked for applies, and the process's own comes back when the last of them ends, in
whatever order they end.
"""

from __future__ import annotations

import contextlib
import sys
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_asked: list[float] = []  # the intervals asked for by the stages running now
_saved = 0.0  # the process's own interval, from before the first of them


@contextlib.contextmanager
def switch_interval(seconds: float) -> Iterator[None]:
    """At most `seconds` between GIL hand-overs while the block runs (see the module)."""
    global _saved
    if seconds <= 0:
        raise ValueError(f"switch interval {seconds!r}: must be positive")
    with _lock:
        if not _asked:
            _saved = sys.getswitchinterval()
        _asked.append(seconds)
        sys.setswitchinterval(min(_saved, *_asked))
    try:
        yield
    finally:
        with _lock:
            _asked.remove(seconds)
            sys.setswitchinterval(min(_saved, *_asked) if _asked else _saved)
