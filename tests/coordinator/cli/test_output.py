"""CLI output: aligned tables, human sizes and durations, JSON records, the progress line."""

from __future__ import annotations

import io
import json

import pytest

from coordinator.cli.output import (
    JsonArrayWriter,
    Output,
    RateMeter,
    StatusLine,
    escape_bytes,
    human_duration,
    human_size,
    iso_time,
    job_dict,
    progress_text,
    render_table,
    snapshot_dict,
)
from core.clock import ManualClock
from protos.clawback.v1 import common_pb2


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (0, "0 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (5 * 1024**2 + 300 * 1024, "5.3 MiB"),
        (3 * 1024**3, "3.0 GiB"),
        (2 * 1024**4, "2.0 TiB"),
    ],
)
def test_human_size(n: int, text: str) -> None:
    assert human_size(n) == text


@pytest.mark.parametrize(
    ("s", "text"),
    [
        (0.42, "0.4s"),
        (12.4, "12s"),
        (185, "3m05s"),
        (3720, "1h02m"),
        (2 * 86400 + 3 * 3600, "2d03h"),
        (-1, "0.0s"),
    ],
)
def test_human_duration(s: float, text: str) -> None:
    assert human_duration(s) == text


def test_table_aligns_columns_and_right_aligns_numbers() -> None:
    text = render_table(
        ("ID", "AGENT", "SIZE"), [("a1", "node-1", "1.0 KiB"), ("b2", "n2", "12.5 MiB")], right=(2,)
    )
    assert text.splitlines() == [
        "ID  AGENT       SIZE",
        "a1  node-1   1.0 KiB",
        "b2  n2      12.5 MiB",
    ]


def test_table_without_header_and_empty() -> None:
    assert render_table(("A", "B"), [("x", "yy")], header=False) == "x  yy"
    assert render_table(("ID", "NAME"), []) == "ID  NAME"
    with pytest.raises(ValueError):
        render_table(("A",), [("x", "y")])


def test_output_table_json_mode_prints_records() -> None:
    out = io.StringIO()
    Output(json_mode=True, stdout=out).table(("A",), [("x",)], [{"a": "x"}])
    assert json.loads(out.getvalue()) == [{"a": "x"}]
    out = io.StringIO()
    Output(stdout=out).table(("A",), [("x",)], [{"a": "x"}])
    assert out.getvalue() == "A\nx\n"


def test_quiet_hides_notes_not_results() -> None:
    out, err = io.StringIO(), io.StringIO()
    o = Output(quiet=True, stdout=out, stderr=err)
    o.note("chatter")
    o.line("result")
    assert out.getvalue() == "result\n" and err.getvalue() == ""


def test_json_array_writer_streams_valid_json() -> None:
    for n in (0, 1, 3):
        buf = io.StringIO()
        with JsonArrayWriter(buf) as w:
            for i in range(n):
                w.add({"i": i})
        assert json.loads(buf.getvalue()) == [{"i": i} for i in range(n)]


def test_snapshot_and_job_records_are_json_ready() -> None:
    snap = common_pb2.SnapshotInfo(
        id="ab" * 16,
        agent="node1",
        source="data",
        started_ns=1_700_000_000_123_456_789,
        root=b"\x01" * 32,
        key_ids=[b"\x02" * 16],
        stats=common_pb2.SnapshotStats(files=3, bytes=10, duration_s=1.5),
    )
    d = snapshot_dict(snap)
    assert d["root"] == "01" * 32 and d["key_ids"] == ["02" * 16]
    assert d["started"] == "2023-11-14T22:13:20.123456Z" and d["finished"] is None
    assert d["stats"]["files"] == 3
    job = common_pb2.JobInfo(
        id="j1", kind=common_pb2.JOB_KIND_BACKUP, state=common_pb2.JOB_STATE_PARTIAL
    )
    jd = job_dict(job)
    assert jd["kind"] == "backup" and jd["state"] == "partial"
    json.dumps([d, jd])


def test_iso_time_unset() -> None:
    assert iso_time(0) is None


def test_escape_bytes_is_unambiguous() -> None:
    assert escape_bytes(b"plain.txt") == "plain.txt"
    assert escape_bytes("café".encode()) == "café"
    assert escape_bytes(b"bad\xff\xfe") == "bad\\xff\\xfe"
    assert escape_bytes(b"new\nline\ttab\x01") == "new\\nline\\ttab\\x01"
    assert escape_bytes(b"back\\xff") == "back\\\\xff"


def test_progress_text() -> None:
    p = common_pb2.Progress(
        files_done=120,
        files_total=1000,
        bytes_done=2 * 1024**3,
        bytes_total=4 * 1024**3,
        bytes_uploaded=1024**3,
    )
    text = progress_text(p, rate=100 * 1024**2)
    assert "120/1,000 files" in text
    assert "2.0 GiB/4.0 GiB" in text
    assert "100.0 MiB/s" in text
    assert "dedup 2.0x" in text
    assert "ETA 20s" in text
    assert "?" in progress_text(common_pb2.Progress(files_done=1))


def test_status_line_tty_redraws_in_place() -> None:
    buf, clock = io.StringIO(), ManualClock()
    s = StatusLine(buf, tty=True, clock=clock)
    s.update("one")
    s.update("two")  # within 0.1 s: skipped
    clock.advance(0.2)
    s.update("three")
    s.print("done: job 1")
    s.close()
    v = buf.getvalue()
    assert "\rone\x1b[K" in v and "two" not in v and "\rthree\x1b[K" in v
    assert "done: job 1\n" in v
    assert v.endswith("\r\x1b[K")


def test_status_line_plain_is_periodic_lines() -> None:
    buf, clock = io.StringIO(), ManualClock()
    s = StatusLine(buf, tty=False, clock=clock, interval=10)
    s.update("a")  # off a terminal the first line waits one interval: short jobs print none
    clock.advance(3)
    s.update("b")
    clock.advance(10)
    s.update("c")
    s.update("d", force=True)
    assert buf.getvalue() == "c\nd\n"
    quiet = io.StringIO()
    StatusLine(quiet, tty=True, enabled=False).update("x")
    assert quiet.getvalue() == ""


def test_rate_meter() -> None:
    clock = ManualClock()
    m = RateMeter(clock)
    m.add(0)
    assert m.rate() is None
    clock.advance(2)
    m.add(200)
    assert m.rate() == pytest.approx(100.0)
