"""`clawback check [--read-data | --read-data-subset N%]`: verify the repository on the coordinator (no key needed)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from coordinator.cli.output import human_count
from core.errors import ExitCode
from protos.clawback.v1 import admin_pb2

if TYPE_CHECKING:
    from coordinator.cli.main import Context


def percent(text: str) -> int:
    """argparse type for N% (1..100)."""
    value = text.strip().removesuffix("%")
    if not value.isdigit() or not 1 <= int(value) <= 100:
        raise argparse.ArgumentTypeError(f"must be a percentage 1%..100%, not {text!r}")
    return int(value)


def setup(
    subs: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    p = subs.add_parser(
        "check",
        help="verify the repository's packs, index and snapshots",
        parents=[common],
        description="Check every pack's header and trailer, the index against the packs, and every snapshot "
        "record. --read-data also reads every pack and checksums each blob. Exit 11 if anything is wrong.",
    )
    g = p.add_mutually_exclusive_group()
    g.add_argument("--read-data", action="store_true", help="read and checksum every pack")
    g.add_argument(
        "--read-data-subset", type=percent, metavar="N%", help="read a random N%% of the packs"
    )
    p.set_defaults(func=run)


def event_dict(e: admin_pb2.CheckEvent) -> dict[str, Any]:
    return {"message": e.message, "pack": e.pack or None, "blob": e.blob.hex() or None}


def describe(e: admin_pb2.CheckEvent) -> str:
    where = []
    if e.pack:
        where.append(f"pack {e.pack}")
    if e.blob:
        where.append(f"blob {e.blob.hex()}")
    return (", ".join(where) + ": " if where else "") + e.message


def run(ctx: Context, args: argparse.Namespace) -> int:
    subset = args.read_data_subset or 0
    stream = ctx.client().check(read_data=args.read_data or subset == 100, read_data_percent=subset)
    status = ctx.out.status(ctx.clock)
    found: list[admin_pb2.CheckEvent] = []
    summary: admin_pb2.CheckEvent | None = None
    try:
        for event in stream:
            if event.kind == admin_pb2.CheckEvent.KIND_ERROR:
                found.append(event)
                if not ctx.out.json_mode:
                    status.print(f"error: {describe(event)}", ctx.out.stdout)
            elif event.kind == admin_pb2.CheckEvent.KIND_SUMMARY:
                summary = event
            elif event.kind == admin_pb2.CheckEvent.KIND_PROGRESS:
                total = human_count(event.packs_total) if event.packs_total else "?"
                text = f"{human_count(event.packs_done)}/{total} packs  {human_count(len(found))} errors"
                status.update(f"{text}  {event.message}" if event.message else text)
    finally:
        status.close()
    errors = max(len(found), summary.errors if summary else 0)
    if ctx.out.json_mode:
        ctx.out.json(
            {
                "ok": errors == 0,
                "errors": [event_dict(e) for e in found],
                "error_count": errors,
                "packs_checked": summary.packs_done if summary else None,
                "summary": summary.message if summary else None,
            }
        )
    else:
        if summary is not None and summary.message:
            ctx.out.line(summary.message)
        if errors or summary is None or not summary.message:
            ctx.out.line(
                "no errors found"
                if errors == 0
                else f"{human_count(errors)} error{'s' if errors != 1 else ''} found"
            )
    return ExitCode.INTEGRITY if errors else ExitCode.OK
