"""`clawback certs init --dir D ...`: a development CA and the certificates it signs (see certs.py)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coordinator.cli.main import Context

# coordinator.cli.certs.DEFAULT_DAYS (a test checks they agree): importing that module
# here would load cryptography on every run of the CLI, not only `certs init`.
DEFAULT_DAYS = 365


def setup(
    subs: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    certs = subs.add_parser("certs", help="development certificates", parents=[common])
    certs.set_defaults(func=None, parser=certs)
    csubs = certs.add_subparsers(dest="certs_command", metavar="SUBCOMMAND")
    p = csubs.add_parser(
        "init",
        help="create a development CA and certificates",
        parents=[common],
        description="Create ca.pem/ca.key, coordinator.pem/.key, agent-NAME.pem/.key and admin-NAME.pem/.key "
        "in DIR (EC P-256; keys mode 0600). Refuses to replace an existing CA; with --add, signs new "
        "certificates with it. Development only: Vault PKI issues certificates in production.",
    )
    p.add_argument("--dir", required=True, metavar="DIR", help="where to write the files")
    p.add_argument(
        "--agent",
        action="append",
        default=[],
        metavar="NAME",
        help="an agent certificate (repeatable)",
    )
    p.add_argument(
        "--admin",
        action="append",
        default=[],
        metavar="NAME",
        help="an admin certificate (repeatable; default 'admin' when creating a new CA)",
    )
    p.add_argument(
        "--host",
        action="append",
        default=[],
        metavar="HOST",
        help="extra coordinator name or IP (repeatable)",
    )
    p.add_argument(
        "--days",
        type=int,
        default=DEFAULT_DAYS,
        metavar="N",
        help=f"validity (default {DEFAULT_DAYS})",
    )
    p.add_argument("--add", action="store_true", help="sign more certificates with the existing CA")
    p.set_defaults(func=run_init)


def run_init(ctx: Context, args: argparse.Namespace) -> int:
    from coordinator.cli.certs import create_dev_pki

    admins = args.admin or ([] if args.add else ["admin"])
    made = create_dev_pki(
        args.dir, args.agent, admins, args.host, args.days, add=args.add, clock=ctx.clock
    )
    if ctx.out.json_mode:
        coordinator = made["coordinator"]
        ctx.out.json(
            {
                "dir": str(made["dir"]),
                "ca": str(made["ca"]),
                "coordinator": None
                if coordinator is None
                else {"cert": str(coordinator.cert), "key": str(coordinator.key)},
                **{
                    role: {
                        n: {"cert": str(f.cert), "key": str(f.key)} for n, f in made[role].items()
                    }
                    for role in ("agents", "admins")
                },
                "created": [str(p) for p in made["created"]],
            }
        )
        return 0
    ctx.out.line(f"created in {made['dir']}:")
    for p in made["created"]:
        ctx.out.line(f"  {p.name}")
    if not args.add:
        ctx.out.note(
            "development PKI: keep ca.key private; anyone holding it can mint agent and admin certificates"
        )
    return 0
