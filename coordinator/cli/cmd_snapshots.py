"""`clawback snapshots [--agent A] [--source S]`: the committed snapshots, oldest first."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from coordinator.cli.output import (
    format_time,
    human_count,
    human_duration,
    human_size,
    short_id,
    snapshot_dict,
)

if TYPE_CHECKING:
    from coordinator.cli.main import Context


def setup(
    subs: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = subs.add_parser("snapshots", help="list snapshots", parents=[common])
    p.add_argument("--agent", default="", metavar="NAME", help="only this agent's snapshots")
    p.add_argument("--source", default="", metavar="NAME", help="only this source's snapshots")
    p.set_defaults(func=run)


HEADERS = ("ID", "TIME", "AGENT", "SOURCE", "FILES", "SIZE", "NEW", "DURATION", "TAGS")


def run(ctx: Context, args: argparse.Namespace) -> int:
    snaps = sorted(
        ctx.client().list_snapshots(agent=args.agent, source=args.source),
        key=lambda s: (s.started_ns, s.id),
    )
    rows = [
        (
            short_id(s.id),
            format_time(s.started_ns),
            s.agent,
            s.source,
            human_count(s.stats.files),
            human_size(s.stats.bytes),
            human_size(s.stats.bytes_new),
            human_duration(s.stats.duration_s or max(0, s.finished_ns - s.started_ns) / 1e9),
            ",".join(s.tags),
        )
        for s in snaps
    ]
    ctx.out.table(HEADERS, rows, [snapshot_dict(s) for s in snaps], right=(4, 5, 6, 7))
    return 0
