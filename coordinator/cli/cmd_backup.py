"""`clawback backup --agent A [--source S]... [--tag T]... [--wait]`: start one backup job per source."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from coordinator.cli.cmd_jobs import exit_code_for, job_rows, print_summary, watch_jobs
from coordinator.cli.output import job_dict, render_table

if TYPE_CHECKING:
    from coordinator.cli.main import Context


def setup(
    subs: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = subs.add_parser(
        "backup",
        help="back up an agent's sources now",
        parents=[common],
        description="Start a backup of the agent's sources (all of them unless --source is given): one job "
        "per source. With --wait, follow the jobs to their end; exit 0 if all succeeded, 3 if any was "
        "partial, 1 if any failed.",
    )
    p.add_argument("--agent", required=True, metavar="NAME", help="the agent to back up")
    p.add_argument(
        "--source", action="append", default=[], metavar="NAME", help="a source (repeatable)"
    )
    p.add_argument(
        "--tag", action="append", default=[], metavar="TAG", help="tag the snapshots (repeatable)"
    )
    p.add_argument(
        "--wait", action="store_true", help="follow the jobs with live progress until they end"
    )
    p.set_defaults(func=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    jobs = ctx.client().start_backup(args.agent, args.source, args.tag)
    if not args.wait:
        if ctx.out.json_mode:
            ctx.out.json([job_dict(j) for j in jobs])
        else:
            ctx.out.line(render_table(_HEADERS, [r[:5] for r in job_rows(jobs)]))
            ctx.out.note("follow with: clawback job ID --watch")
        return 0
    for j in jobs:
        ctx.out.note(f"started backup job {j.id} ({j.agent}/{j.source})")
    final = watch_jobs(ctx, jobs)
    print_summary(ctx, final)
    return exit_code_for(final)


_HEADERS = ("JOB", "KIND", "AGENT", "SOURCE", "STATE")
