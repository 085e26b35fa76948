"""`clawback agents` (list) and `clawback agents revoke NAME`."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from coordinator.cli.output import agent_dict, ago

if TYPE_CHECKING:
    from coordinator.cli.main import Context


def setup(
    subs: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    agents = subs.add_parser("agents", help="list agents, or revoke one", parents=[common])
    agents.set_defaults(func=run_list)
    asubs = agents.add_subparsers(dest="agents_command", metavar="SUBCOMMAND")
    lst = asubs.add_parser(
        "list", help="list the agents the coordinator knows (default)", parents=[common]
    )
    lst.set_defaults(func=run_list)
    revoke = asubs.add_parser(
        "revoke",
        help="refuse an agent from now on (its certificate stays valid for the CA)",
        parents=[common],
    )
    revoke.add_argument("name", metavar="NAME")
    revoke.set_defaults(func=run_revoke)


def agent_state(connected: bool, revoked: bool) -> str:
    if revoked:
        return "revoked"
    return "connected" if connected else "disconnected"


def run_list(ctx: Context, args: argparse.Namespace) -> int:
    agents = sorted(ctx.client().list_agents(), key=lambda a: a.name)
    now = ctx.clock.now_ns()
    rows = [
        (
            a.name,
            agent_state(a.connected, a.revoked),
            a.hostname or "-",
            a.version or "-",
            ",".join(s.name for s in a.sources) or "-",
            "now" if a.connected else ago(a.last_seen_ns, now),
            a.address or "-",
        )
        for a in agents
    ]
    ctx.out.table(
        ("NAME", "STATE", "HOST", "VERSION", "SOURCES", "LAST SEEN", "ADDRESS"),
        rows,
        [agent_dict(a) for a in agents],
    )
    return 0


def run_revoke(ctx: Context, args: argparse.Namespace) -> int:
    info = ctx.client().revoke_agent(args.name)
    if ctx.out.json_mode:
        ctx.out.json(agent_dict(info))
    else:
        ctx.out.line(
            f"revoked agent {info.name or args.name}: its connections are refused from now on"
        )
    return 0
