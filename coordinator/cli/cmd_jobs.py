"""`clawback jobs` and `clawback job ID [--watch]`; also the job watcher `backup --wait` and `restore --wait` use."""

from __future__ import annotations

import argparse
import queue
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

from coordinator.cli.output import (
    TERMINAL_STATES,
    RateMeter,
    format_time,
    human_count,
    human_duration,
    human_size,
    job_dict,
    job_kind,
    job_state,
    jobs_progress_text,
    render_table,
    short_id,
    sum_progress,
)
from core import errors
from core.errors import ExitCode
from protos.clawback.v1 import common_pb2

if TYPE_CHECKING:
    from coordinator.cli.client import AdminClient, Stream
    from coordinator.cli.main import Context

WATCH_RETRIES = 5


def setup(
    subs: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    jobs = subs.add_parser("jobs", help="list recent jobs", parents=[common])
    jobs.add_argument("--agent", default="", metavar="NAME", help="only this agent's jobs")
    jobs.add_argument(
        "--limit", type=int, default=50, metavar="N", help="at most N jobs (default 50; 0 = all)"
    )
    jobs.set_defaults(func=run_list)

    job = subs.add_parser(
        "job", help="show one job, follow it to its end, or cancel it", parents=[common]
    )
    job.add_argument("job_id", metavar="ID")
    job.add_argument(
        "--watch", action="store_true", help="follow the job with live progress until it ends"
    )
    job.add_argument(
        "--cancel",
        action="store_true",
        help="ask its agent to stop the job (a backup commits no snapshot; a restore removes "
        "the files it had not finished); with --watch, follow it until it has stopped",
    )
    job.set_defaults(func=run_show)


def exit_code_for(jobs: Sequence[common_pb2.JobInfo]) -> int:
    """0 when every job succeeded; 1 if any failed or was cancelled; else 3 if any was partial."""
    states = {j.state for j in jobs}
    if (
        states & {common_pb2.JOB_STATE_FAILED, common_pb2.JOB_STATE_CANCELLED}
        or not states <= TERMINAL_STATES
    ):
        return ExitCode.ERROR
    if common_pb2.JOB_STATE_PARTIAL in states:
        return ExitCode.PARTIAL
    return ExitCode.OK


def _duration(j: common_pb2.JobInfo) -> str:
    if not j.created_ns or not j.updated_ns:
        return "-"
    return human_duration((j.updated_ns - j.created_ns) / 1e9)


def job_rows(jobs: Sequence[common_pb2.JobInfo]) -> list[tuple[object, ...]]:
    return [
        (
            short_id(j.id),
            job_kind(j.kind),
            j.agent,
            j.source or "-",
            job_state(j.state),
            format_time(j.created_ns),
            _duration(j),
            human_count(j.progress.files_done),
            human_size(j.progress.bytes_done),
            short_id(j.snapshot_id) if j.snapshot_id else "-",
            j.error or "",
        )
        for j in jobs
    ]


JOB_HEADERS = (
    "ID",
    "KIND",
    "AGENT",
    "SOURCE",
    "STATE",
    "CREATED",
    "DURATION",
    "FILES",
    "SIZE",
    "SNAPSHOT",
    "ERROR",
)
JOB_RIGHT = (7, 8)


def run_list(ctx: Context, args: argparse.Namespace) -> int:
    if args.limit < 0:
        raise errors.UsageError("--limit must be 0 or more")
    jobs = ctx.client().list_jobs(agent=args.agent, limit=args.limit)
    ctx.out.table(JOB_HEADERS, job_rows(jobs), [job_dict(j) for j in jobs], right=JOB_RIGHT)
    return 0


def run_show(ctx: Context, args: argparse.Namespace) -> int:
    client = ctx.client()
    if args.cancel:
        return _cancel(ctx, args)
    if args.watch:
        final = watch_jobs(ctx, [client.get_job(args.job_id)])
        print_summary(ctx, final)
        return exit_code_for(final)
    print_job(ctx, client.get_job(args.job_id))
    return 0


def _cancel(ctx: Context, args: argparse.Namespace) -> int:
    """Exit 0 once the cancel is sent (with --watch: once the job has ended cancelled, or
    succeeded before the cancel reached it), or when the job had ended already."""
    client = ctx.client()
    job = client.cancel_job(args.job_id)
    if job.state in TERMINAL_STATES:
        if ctx.out.json_mode:
            ctx.out.json(job_dict(job))
        else:
            ctx.out.line(f"job {short_id(job.id)} had ended already: {job_state(job.state)}")
        return 0
    if not args.watch:
        if ctx.out.json_mode:
            ctx.out.json(job_dict(job))
        else:
            ctx.out.line(
                f"cancelling job {short_id(job.id)} ({job_kind(job.kind)} on {job.agent}); "
                f"follow with: clawback job {short_id(job.id)} --watch"
            )
        return 0
    ctx.out.note(f"cancelling job {short_id(job.id)} ({job_kind(job.kind)} on {job.agent})")
    final = watch_jobs(ctx, [job])
    print_summary(ctx, final)
    if final[0].state in (common_pb2.JOB_STATE_CANCELLED, common_pb2.JOB_STATE_SUCCEEDED):
        return 0
    return exit_code_for(final)


def print_job(ctx: Context, j: common_pb2.JobInfo) -> None:
    p = j.progress
    pairs: list[tuple[str, object]] = [
        ("job", j.id),
        ("kind", job_kind(j.kind)),
        ("agent", j.agent),
        ("source", j.source or "-"),
        ("state", job_state(j.state)),
        ("created", format_time(j.created_ns)),
        ("updated", format_time(j.updated_ns)),
        ("duration", _duration(j)),
        (
            "files",
            f"{human_count(p.files_done)} of {human_count(p.files_total) if p.files_total else '?'}"
            f" ({human_count(p.files_unchanged)} unchanged)",
        ),
        (
            "bytes",
            f"{human_size(p.bytes_done)} of {human_size(p.bytes_total) if p.bytes_total else '?'}",
        ),
        (
            "uploaded",
            f"{human_size(p.bytes_uploaded)} in {human_count(p.blobs_new)} new blobs "
            f"({human_count(p.blobs_dedup)} deduplicated)",
        ),
        ("errors", human_count(p.errors)),
        ("snapshot", j.snapshot_id or "-"),
    ]
    if j.error:
        pairs.append(("error", j.error))
    pairs.extend(("warning", w) for w in j.warnings)
    ctx.out.fields(pairs, job_dict(j))


def print_summary(ctx: Context, jobs: Sequence[common_pb2.JobInfo]) -> None:
    """The final table of watched jobs (or their JSON), then each job's error and warnings."""
    if ctx.out.json_mode:
        ctx.out.json([job_dict(j) for j in jobs])
        return
    rows = [
        (
            short_id(j.id),
            j.agent,
            j.source or "-",
            job_state(j.state),
            human_count(j.progress.files_done),
            human_size(j.progress.bytes_done),
            human_size(j.progress.bytes_uploaded),
            _duration(j),
            short_id(j.snapshot_id) if j.snapshot_id else "-",
        )
        for j in jobs
    ]
    ctx.out.line(
        render_table(
            (
                "JOB",
                "AGENT",
                "SOURCE",
                "STATE",
                "FILES",
                "SIZE",
                "UPLOADED",
                "DURATION",
                "SNAPSHOT",
            ),
            rows,
            right=(4, 5, 6),
        )
    )
    for j in jobs:
        if j.error:
            ctx.out.line(f"job {short_id(j.id)} ({j.agent}/{j.source}): {j.error}")
        for w in j.warnings:
            ctx.out.line(f"job {short_id(j.id)} ({j.agent}/{j.source}) warning: {w}")


def _watch_one(
    client: AdminClient,
    job_id: str,
    events: queue.Queue[tuple[str, common_pb2.JobInfo | BaseException | None]],
    streams: list[Stream[common_pb2.JobInfo]],
    stop: threading.Event,
) -> None:
    """Follow one job, re-attaching if the stream is cut, until it reaches a terminal state."""
    failures = 0
    while not stop.is_set():
        stream = client.watch_job(job_id)
        streams.append(stream)
        last: common_pb2.JobInfo | None = None
        try:
            for info in stream:
                last = info
                failures = 0
                events.put((job_id, info))
        except errors.TransportError as exc:
            failures += 1
            if failures > WATCH_RETRIES or stop.is_set():
                events.put((job_id, exc))
                return
            time.sleep(min(0.5 * 2**failures, 8.0))
            continue
        except BaseException as exc:  # delivered to the main thread, which raises it
            events.put((job_id, exc))
            return
        if last is not None and last.state in TERMINAL_STATES:
            events.put((job_id, None))
            return
        failures += 1  # the stream ended before the job did: attach again
        if failures > WATCH_RETRIES:
            events.put(
                (job_id, errors.TransportError(f"job {job_id}: the watch stream ended early"))
            )
            return
        time.sleep(0.5)


def watch_jobs(ctx: Context, jobs: Sequence[common_pb2.JobInfo]) -> list[common_pb2.JobInfo]:
    """Follow jobs until all end, with a live progress line on stderr; returns their final states."""
    client = ctx.client()
    latest = {j.id: j for j in jobs}
    pending = {j.id for j in jobs if j.state not in TERMINAL_STATES}
    events: queue.Queue[tuple[str, common_pb2.JobInfo | BaseException | None]] = queue.Queue()
    streams: list[Stream[common_pb2.JobInfo]] = []
    stop = threading.Event()
    threads = [
        threading.Thread(
            target=_watch_one,
            args=(client, jid, events, streams, stop),
            name=f"watch-{jid}",
            daemon=True,
        )
        for jid in sorted(pending)
    ]
    status = ctx.out.status(ctx.clock)
    meter = RateMeter(ctx.clock)
    for t in threads:
        t.start()
    try:
        while pending:
            try:
                job_id, event = events.get(timeout=0.5)
            except queue.Empty:
                pass
            else:
                if isinstance(event, BaseException):
                    raise event
                if event is None:
                    pending.discard(job_id)
                else:
                    before = latest.get(job_id)
                    latest[job_id] = event
                    changed = before is None or before.state != event.state
                    if changed and event.state in TERMINAL_STATES:
                        status.print(_ended_line(event))
                    if changed:
                        status.update(jobs_progress_text(latest, meter.rate()), force=True)
            meter.add(sum_progress(j.progress for j in latest.values()).bytes_done)
            status.update(jobs_progress_text(latest, meter.rate()))
    except KeyboardInterrupt:
        status.close()
        ctx.out.note(
            "clawback: stopped watching; the jobs keep running: "
            + ", ".join(f"clawback job {jid} --watch" for jid in sorted(pending))
            + " (--cancel to stop them)"
        )
        raise
    finally:
        stop.set()
        for s in streams:
            s.cancel()
        status.close()
    return [latest[j.id] for j in jobs]


def _ended_line(j: common_pb2.JobInfo) -> str:
    what = f"{job_kind(j.kind)} {short_id(j.id)} {j.agent}/{j.source or '-'}: {job_state(j.state)}"
    if j.snapshot_id:
        what += f", snapshot {short_id(j.snapshot_id)}"
    if j.error:
        what += f": {j.error}"
    return what
