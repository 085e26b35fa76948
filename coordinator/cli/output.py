"""What the CLI prints: aligned tables, human sizes and durations, --json records, and live progress on stderr.

Results go to stdout (a table, or JSON with --json); progress and notes go
to stderr so that `clawback snapshots --json | jq` stays clean. Progress is
one redrawn line when stderr is a terminal and plain periodic lines when it
is not (logs, CI).
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TextIO

from core.clock import SYSTEM, Clock
from protos.clawback.v1 import admin_pb2, common_pb2

_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


# -- scalars -------------------------------------------------------------------


def human_size(n: float) -> str:
    """Bytes in binary units: 512 B, 1.5 KiB, 12.3 MiB."""
    value = float(n)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def human_count(n: int) -> str:
    return f"{n:,}"


def human_duration(seconds: float) -> str:
    """A short duration: 0.4s, 12s, 3m05s, 1h02m, 2d03h."""
    if seconds < 0:
        seconds = 0
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = round(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600:02d}h"


def format_time(ns: int) -> str:
    """Local wall time for tables ("-" when unset)."""
    if not ns:
        return "-"
    return dt.datetime.fromtimestamp(ns / 1e9).strftime("%Y-%m-%d %H:%M:%S")


def iso_time(ns: int) -> str | None:
    """UTC ISO 8601 for JSON (None when unset)."""
    if not ns:
        return None
    t = dt.datetime.fromtimestamp(ns // 1_000_000_000, tz=dt.UTC)
    return t.replace(microsecond=ns % 1_000_000_000 // 1000).isoformat().replace("+00:00", "Z")


def ago(ns: int, now_ns: int) -> str:
    if not ns:
        return "never"
    return human_duration(max(0, now_ns - ns) / 1e9) + " ago"


def escape_bytes(raw: bytes) -> str:
    """Raw bytes (a file name) as printable text: bytes that are not UTF-8 become \\xNN,
    control characters are escaped and a backslash is doubled, so the output is unambiguous."""
    out = []
    for ch in raw.decode("utf-8", errors="surrogateescape"):
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ch == "\t":
            out.append("\\t")
        elif code < 0x20 or code == 0x7F or 0x80 <= code < 0xA0:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def short_id(snapshot_or_job_id: str) -> str:
    return snapshot_or_job_id[:8]


def enum_label(enum_type: Any, value: int, prefix: str) -> str:
    """JOB_STATE_SUCCEEDED -> "succeeded"."""
    try:
        name: str = enum_type.Name(value)
    except ValueError:
        return str(value)
    return name.removeprefix(prefix).lower()


def job_state(value: int) -> str:
    return enum_label(common_pb2.JobState, value, "JOB_STATE_")


def job_kind(value: int) -> str:
    return enum_label(common_pb2.JobKind, value, "JOB_KIND_")


# -- tables --------------------------------------------------------------------


def render_table(
    headers: Sequence[str],
    rows: Iterable[Sequence[object]],
    right: Iterable[int] = (),
    *,
    header: bool = True,
) -> str:
    """Columns aligned on the widest cell, two spaces apart; columns in `right` are right-aligned.
    With `header=False` the headers only set the column count."""
    cells = [
        [str(c) for c in headers],
        *([("" if c is None else str(c)) for c in row] for row in rows),
    ]
    ncol = len(headers)
    for row in cells:
        if len(row) != ncol:
            raise ValueError(f"row has {len(row)} cells, the table {ncol} columns")
    widths = [max(len(row[i]) for row in cells) for i in range(ncol)]
    right_set = set(right)
    if not header:
        cells = cells[1:]
        widths = [max((len(row[i]) for row in cells), default=0) for i in range(ncol)]
    lines = []
    for row in cells:
        parts = [
            row[i].rjust(widths[i]) if i in right_set else row[i].ljust(widths[i])
            for i in range(ncol)
        ]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


# -- records for --json ----------------------------------------------------------


def progress_dict(p: common_pb2.Progress) -> dict[str, Any]:
    return {
        "files_done": p.files_done,
        "files_total": p.files_total,
        "bytes_done": p.bytes_done,
        "bytes_total": p.bytes_total,
        "bytes_uploaded": p.bytes_uploaded,
        "blobs_new": p.blobs_new,
        "blobs_dedup": p.blobs_dedup,
        "files_unchanged": p.files_unchanged,
        "errors": p.errors,
        "current": p.current,
    }


def job_dict(j: common_pb2.JobInfo) -> dict[str, Any]:
    return {
        "id": j.id,
        "kind": job_kind(j.kind),
        "agent": j.agent,
        "source": j.source,
        "state": job_state(j.state),
        "progress": progress_dict(j.progress),
        "error": j.error,
        "snapshot_id": j.snapshot_id,
        "created": iso_time(j.created_ns),
        "updated": iso_time(j.updated_ns),
        "created_ns": j.created_ns,
        "updated_ns": j.updated_ns,
        "warnings": list(j.warnings),
    }


def snapshot_dict(s: common_pb2.SnapshotInfo) -> dict[str, Any]:
    st = s.stats
    return {
        "id": s.id,
        "agent": s.agent,
        "source": s.source,
        "hostname": s.hostname,
        "started": iso_time(s.started_ns),
        "finished": iso_time(s.finished_ns),
        "started_ns": s.started_ns,
        "finished_ns": s.finished_ns,
        "parent": s.parent,
        "root": s.root.hex(),
        "tags": list(s.tags),
        "crash_consistent": s.crash_consistent,
        "key_ids": [k.hex() for k in s.key_ids],
        "stats": {
            "files": st.files,
            "dirs": st.dirs,
            "bytes": st.bytes,
            "blobs_new": st.blobs_new,
            "bytes_new": st.bytes_new,
            "files_unchanged": st.files_unchanged,
            "errors": st.errors,
            "duration_s": st.duration_s,
        },
    }


def agent_dict(a: admin_pb2.AgentInfo) -> dict[str, Any]:
    return {
        "name": a.name,
        "connected": a.connected,
        "revoked": a.revoked,
        "hostname": a.hostname,
        "version": a.version,
        "address": a.address,
        "capabilities": list(a.capabilities),
        "sources": [
            {
                "name": s.name,
                "kind": enum_label(common_pb2.SourceKind, s.kind, "SOURCE_KIND_"),
                "path": s.path,
                "driver": s.driver,
            }
            for s in a.sources
        ],
        "first_seen": iso_time(a.first_seen_ns),
        "last_seen": iso_time(a.last_seen_ns),
    }


def repo_dict(r: common_pb2.RepoConfig) -> dict[str, Any]:
    return {
        "version": r.version,
        "repo_id": r.repo_id,
        "chunker": r.chunker,
        "chunk_min": r.chunk_min,
        "chunk_avg": r.chunk_avg,
        "chunk_max": r.chunk_max,
        "id_algorithm": r.id_algorithm,
        "compression": r.compression,
        "cipher": r.cipher,
        "key_check": r.key_check.hex(),
        "max_blob_size": r.max_blob_size,
        "max_message_size": r.max_message_size,
        "paged_chunker": r.paged_chunker,
        "paged_files": list(r.paged_files),
        "paged_chunk_max": r.paged_chunk_max,
        "paged_formats": list(r.paged_formats),
    }


# -- the output sink ---------------------------------------------------------------


class Output:
    """Where a command's results go: tables or JSON on stdout, notes on stderr (unless quiet)."""

    def __init__(
        self,
        *,
        json_mode: bool = False,
        quiet: bool = False,
        stdout: TextIO | None = None,
        stderr: TextIO | None = None,
    ) -> None:
        self.json_mode = json_mode
        self.quiet = quiet
        self.stdout = stdout if stdout is not None else sys.stdout
        self.stderr = stderr if stderr is not None else sys.stderr

    def line(self, text: str = "") -> None:
        """A line of the result (stdout)."""
        self.stdout.write(text + "\n")
        self.stdout.flush()

    def note(self, text: str) -> None:
        """Something for the operator, not the result (stderr; hidden by -q)."""
        if not self.quiet:
            self.stderr.write(text + "\n")
            self.stderr.flush()

    def json(self, obj: Any) -> None:
        self.stdout.write(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")
        self.stdout.flush()

    def table(
        self,
        headers: Sequence[str],
        rows: Iterable[Sequence[object]],
        records: Any,
        right: Iterable[int] = (),
    ) -> None:
        """A listing: `records` as JSON with --json, else the aligned table."""
        if self.json_mode:
            self.json(records)
        else:
            self.line(render_table(headers, rows, right))

    def fields(self, pairs: Sequence[tuple[str, object]], record: Any) -> None:
        """One object: `key: value` lines, or `record` as JSON."""
        if self.json_mode:
            self.json(record)
            return
        width = max((len(k) for k, _ in pairs), default=0)
        for key, value in pairs:
            self.line(f"{key + ':':<{width + 1}} {value}")

    def status(self, clock: Clock = SYSTEM) -> StatusLine:
        return StatusLine(self.stderr, enabled=not self.quiet, clock=clock)


class JsonArrayWriter:
    """Streams a JSON array one element at a time (for listings too long to hold)."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self.count = 0

    def __enter__(self) -> JsonArrayWriter:
        self.stream.write("[")
        return self

    def add(self, obj: Any) -> None:
        self.stream.write(
            ("," if self.count else "") + "\n  " + json.dumps(obj, ensure_ascii=False)
        )
        self.count += 1

    def __exit__(self, *exc: object) -> None:
        self.stream.write("\n]\n" if self.count else "]\n")
        self.stream.flush()


# -- progress ----------------------------------------------------------------------


class StatusLine:
    """A live status line on a terminal (redrawn at most 10 times a second), or plain
    lines every `interval` seconds when the stream is not a terminal."""

    def __init__(
        self,
        stream: TextIO,
        *,
        tty: bool | None = None,
        enabled: bool = True,
        interval: float = 10.0,
        clock: Clock = SYSTEM,
    ) -> None:
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.enabled = enabled
        self.interval = interval
        self.clock = clock
        # Off a terminal, the first plain line comes after one interval: short jobs print none.
        self._last = float("-inf") if self.tty else clock.monotonic()
        self._shown = ""  # what is on the terminal line now

    def update(self, text: str, force: bool = False) -> None:
        if not self.enabled:
            return
        now = self.clock.monotonic()
        wait = 0.1 if self.tty else self.interval
        if not force and now - self._last < wait:
            return
        self._last = now
        if self.tty:
            width = shutil.get_terminal_size((100, 24)).columns
            text = text if len(text) < width else text[: width - 2] + "…"
            self.stream.write("\r" + text + "\x1b[K")
            self._shown = text
        else:
            self.stream.write(text + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.tty and self._shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._shown = ""

    def print(self, text: str, stream: TextIO | None = None) -> None:
        """A permanent line (to `stream`, default stderr) printed above the live line."""
        shown = self._shown
        self.clear()
        target = stream if stream is not None else self.stream
        target.write(text + "\n")
        target.flush()
        if shown and self.enabled:
            self.stream.write(shown + "\x1b[K")
            self._shown = shown
            self.stream.flush()

    def close(self) -> None:
        self.clear()


class RateMeter:
    """Bytes per second over a sliding window of recent samples."""

    def __init__(self, clock: Clock = SYSTEM, window: float = 10.0) -> None:
        self.clock = clock
        self.window = window
        self._samples: collections.deque[tuple[float, int]] = collections.deque()

    def add(self, value: int) -> None:
        now = self.clock.monotonic()
        self._samples.append((now, value))
        while len(self._samples) > 2 and now - self._samples[1][0] >= self.window:
            self._samples.popleft()

    def rate(self) -> float | None:
        if len(self._samples) < 2:
            return None
        (t0, v0), (t1, v1) = self._samples[0], self._samples[-1]
        if t1 - t0 <= 0:
            return None
        return max(0.0, (v1 - v0) / (t1 - t0))


def sum_progress(progresses: Iterable[common_pb2.Progress]) -> common_pb2.Progress:
    total = common_pb2.Progress()
    for p in progresses:
        for field in (
            "files_done",
            "files_total",
            "bytes_done",
            "bytes_total",
            "bytes_uploaded",
            "blobs_new",
            "blobs_dedup",
            "files_unchanged",
            "errors",
        ):
            setattr(total, field, getattr(total, field) + getattr(p, field))
        if p.current:
            total.current = p.current
    return total


def progress_text(p: common_pb2.Progress, rate: float | None = None) -> str:
    """files done/total, bytes done/total, rate, data reduction (dedup + compression), ETA."""
    files = (
        f"{human_count(p.files_done)}/{human_count(p.files_total) if p.files_total else '?'} files"
    )
    size = f"{human_size(p.bytes_done)}/{human_size(p.bytes_total) if p.bytes_total else '?'}"
    parts = [files, size]
    if rate is not None:
        parts.append(f"{human_size(rate)}/s")
    if p.bytes_uploaded and p.bytes_done:
        parts.append(f"dedup {p.bytes_done / p.bytes_uploaded:.1f}x")
    elif p.blobs_dedup and not p.blobs_new:
        parts.append("dedup all")
    if rate and p.bytes_total > p.bytes_done:
        parts.append(f"ETA {human_duration((p.bytes_total - p.bytes_done) / rate)}")
    if p.errors:
        parts.append(f"{human_count(p.errors)} errors")
    return "  ".join(parts)


def jobs_progress_text(jobs: Mapping[str, common_pb2.JobInfo], rate: float | None) -> str:
    running = [j for j in jobs.values() if j.state not in TERMINAL_STATES]
    text = progress_text(sum_progress(j.progress for j in jobs.values()), rate)
    if len(jobs) > 1:
        text = f"{len(jobs) - len(running)}/{len(jobs)} jobs done  " + text
    current = next((j.progress.current for j in running if j.progress.current), "")
    return f"{text}  {current}" if current else text


TERMINAL_STATES = frozenset(
    {
        common_pb2.JOB_STATE_SUCCEEDED,
        common_pb2.JOB_STATE_PARTIAL,
        common_pb2.JOB_STATE_FAILED,
        common_pb2.JOB_STATE_CANCELLED,
    }
)
