"""Throttled progress reports for a running job: one snapshot of the counters every half second at most."""

from __future__ import annotations

from collections.abc import Callable

from core.clock import Clock
from protos.clawback.v1 import common_pb2

PROGRESS_INTERVAL = 0.5  # seconds between reports (design.md §Control stream)


class ProgressReporter:
    """Holds a job's live counters (`p`) and hands copies to `on_progress`, throttled."""

    def __init__(
        self,
        on_progress: Callable[[common_pb2.Progress], None] | None,
        clock: Clock,
        interval: float = PROGRESS_INTERVAL,
    ) -> None:
        self.p = common_pb2.Progress()
        self._on_progress = on_progress
        self._clock = clock
        self._interval = interval
        # The interval runs from the start: the first reports a job sends are its forced ones
        # (a backup's walk summary), then one per interval.
        self._last = clock.monotonic()

    def report(self, force: bool = False) -> None:
        if self._on_progress is None:
            return
        now = self._clock.monotonic()
        if force or now - self._last >= self._interval:
            self._last = now
            snap = common_pb2.Progress()
            snap.CopyFrom(self.p)
            self._on_progress(snap)
