"""`clawback restore SNAPSHOT [PATH...] --agent B --target DIR [--overwrite] [--wait]`: start a restore job."""

from __future__ import annotations

import argparse
import os
import posixpath
from typing import TYPE_CHECKING

from coordinator.cli.cmd_jobs import exit_code_for, job_rows, print_summary, watch_jobs
from coordinator.cli.output import job_dict, render_table
from core.errors import UsageError

if TYPE_CHECKING:
    from coordinator.cli.main import Context


def setup(
    subs: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = subs.add_parser(
        "restore",
        help="restore a snapshot (or paths in it) onto an agent",
        parents=[common],
        description="Start a restore of SNAPSHOT (a unique id prefix) onto agent B's node under DIR. PATHs "
        "are paths inside the snapshot (default: everything). The target agent may differ from the one "
        "that made the snapshot.",
    )
    p.add_argument("snapshot", metavar="SNAPSHOT", help="snapshot id or unique prefix")
    p.add_argument(
        "paths", nargs="*", metavar="PATH", help="paths inside the snapshot (default: all)"
    )
    p.add_argument("--agent", required=True, metavar="NAME", help="the agent that writes the files")
    p.add_argument(
        "--target", required=True, metavar="DIR", help="absolute directory on that agent's node"
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing files under DIR")
    p.add_argument(
        "--no-grant",
        action="store_true",
        help="with Vault keys: send no restore grant (the agent restores with its own restore role, "
        "e.g. at a standby site)",
    )
    p.add_argument(
        "--wait", action="store_true", help="follow the job with live progress until it ends"
    )
    p.set_defaults(func=run)


def snapshot_path(path: str) -> bytes:
    """A path inside the snapshot as raw bytes (so non-UTF-8 names can be named), normalised and
    relative to the snapshot root ("/etc/./hosts" -> b"etc/hosts"; the root itself -> b"")."""
    raw = os.fsencode(path)
    if b"\0" in raw:
        raise UsageError(f"path {path!r} contains NUL")
    if b".." in raw.split(b"/"):
        raise UsageError(
            f"path {path!r}: '..' is not allowed; paths name entries inside the snapshot"
        )
    return posixpath.normpath(b"/" + raw).lstrip(b"/")


def run(ctx: Context, args: argparse.Namespace) -> int:
    if not posixpath.isabs(args.target):
        raise UsageError(
            f"--target must be an absolute path on the agent's node, not {args.target!r}"
        )
    paths = [snapshot_path(p) for p in args.paths]
    if b"" in paths:  # the root was named: restore everything
        paths = []
    grant = b""
    if ctx.settings.key_provider == "vault" and not args.no_grant:
        # A single-use, short-lived, response-wrapped grant for this restore only: enough
        # uses for the snapshot's keys and the id key, unwrapped by the agent (design.md §Keys).
        info = ctx.client().get_snapshot(args.snapshot)
        grant = (
            ctx.vault_client().mint_restore_grant(ttl="15m", uses=len(info.key_ids) + 4).encode()
        )
    job = ctx.client().start_restore(
        args.snapshot, args.agent, args.target, paths, args.overwrite, grant
    )
    if not args.wait:
        if ctx.out.json_mode:
            ctx.out.json(job_dict(job))
        else:
            ctx.out.line(
                render_table(("JOB", "KIND", "AGENT", "SOURCE", "STATE"), [job_rows([job])[0][:5]])
            )
            ctx.out.note("follow with: clawback job ID --watch")
        return 0
    ctx.out.note(
        f"started restore job {job.id} of snapshot {job.snapshot_id or args.snapshot} onto {job.agent}"
    )
    final = watch_jobs(ctx, [job])
    print_summary(ctx, final)
    return exit_code_for(final)
