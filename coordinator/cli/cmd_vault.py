"""`clawback vault setup` (Vault set up as code for clawback) and `clawback vault grant` (a restore grant)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

# The Vault helpers are imported by the commands that use them: every other command
# starts faster without them (the CLI's start-up is part of every command's time).

if TYPE_CHECKING:
    from coordinator.cli.main import Context


def add_vault_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--vault-addr", metavar="URL", default=None, help="Vault address (default $VAULT_ADDR)"
    )
    p.add_argument(
        "--vault-ca", metavar="FILE", default=None, help="CA bundle of Vault's TLS certificate"
    )


def setup(
    subs: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    vault = subs.add_parser("vault", help="set up Vault for clawback", parents=[common])
    vault.set_defaults(func=None, parser=vault)
    vsubs = vault.add_subparsers(dest="vault_command", metavar="SUBCOMMAND")
    p = vsubs.add_parser(
        "setup",
        help="enable and configure what clawback needs in Vault (idempotent)",
        parents=[common],
        description="Enable transit, KV v2, PKI and AppRole; create the transit key, the chunk-id key "
        "(only if absent: never overwritten), a PKI root CA and roles, the policies of "
        "deploy/vault/policies, the restore-grant token role and the AppRoles (one per agent, "
        "coordinator, restore). With --out, writes each role's role_id and a response-wrapped "
        "secret_id (0600) to DIR/<role>/. Uses the operator's token from $VAULT_TOKEN or "
        "~/.vault-token (never from the command line).",
    )
    add_vault_flags(p)
    p.add_argument(
        "--agent", action="append", default=[], metavar="NAME", help="an agent (repeatable)"
    )
    p.add_argument("--out", metavar="DIR", default=None, help="where to write role credentials")
    p.add_argument("--cert-ttl", default="24h", metavar="TTL", help="certificate TTL (default 24h)")
    p.add_argument(
        "--token-ttl", default="1h", metavar="TTL", help="AppRole token TTL (default 1h)"
    )
    p.add_argument(
        "--token-max-ttl", default="24h", metavar="TTL", help="AppRole token max TTL (default 24h)"
    )
    p.add_argument(
        "--wrap-ttl",
        default="24h",
        metavar="TTL",
        help="lifetime of the response-wrapped secret_id files (default 24h)",
    )
    p.add_argument(
        "--policies",
        metavar="DIR",
        help="policy files (HCL; default: deploy/vault/policies of this source tree)",
    )
    p.set_defaults(func=run_setup)

    g = vsubs.add_parser(
        "grant",
        help="mint a restore grant for a target agent",
        parents=[common],
        description="Mint a restore grant: a short-lived token that may decrypt data keys NUSES "
        "times, response-wrapped (single use). Pass the printed wrapping token to the target "
        "agent; if anyone unwraps it first, the agent refuses it.",
    )
    add_vault_flags(g)
    g.add_argument("--ttl", default="15m", help="lifetime of the grant (default 15m)")
    g.add_argument("--uses", type=int, default=64, help="decrypt calls allowed (default 64)")
    g.add_argument("--wrap-ttl", default="5m", help="time to deliver it (default 5m)")
    g.set_defaults(func=run_grant)


def run_setup(ctx: Context, args: argparse.Namespace) -> int:
    from coordinator.cli.vaultsetup import (
        POLICY_DIR,
        operator_settings,
        operator_token,
        setup_vault,
    )
    from core.vault import VaultClient

    settings = operator_settings(args.vault_addr, args.vault_ca)
    with VaultClient.for_token(settings, operator_token(), ctx.clock) as client:
        result = setup_vault(
            client,
            settings,
            args.agent,
            Path(args.out) if args.out else None,
            cert_ttl=args.cert_ttl,
            token_ttl=args.token_ttl,
            token_max_ttl=args.token_max_ttl,
            secret_id_wrap_ttl=args.wrap_ttl,
            policy_dir=Path(args.policies) if args.policies else POLICY_DIR,
        )
    ctx.out.table(
        ["KIND", "NAME", "STATUS"],
        [(i.kind, i.name, i.status) for i in result.items],
        result.to_json(),
    )
    if not ctx.out.json_mode:
        created = sum(i.status in ("created", "updated") for i in result.items if i.kind != "file")
        ctx.out.note(
            f"Vault at {settings.address}: {created} item(s) created or updated, "
            f"{sum(i.status == 'present' for i in result.items if i.kind != 'file')} already present"
        )
        if result.files:
            ctx.out.note(
                "each secret_id file is response-wrapped: it works once, and a second unwrap is "
                "refused (deliver each to its node, mode 0600)"
            )
    return 0


def run_grant(ctx: Context, args: argparse.Namespace) -> int:
    from coordinator.cli.vaultsetup import operator_settings, operator_token
    from core.vault import VaultClient

    settings = operator_settings(args.vault_addr, args.vault_ca)
    with VaultClient.for_token(settings, operator_token(), ctx.clock) as client:
        wrapping = client.mint_restore_grant(ttl=args.ttl, uses=args.uses, wrap_ttl=args.wrap_ttl)
    ctx.out.fields(
        [
            ("grant", wrapping),
            ("ttl", args.ttl),
            ("uses", args.uses),
            ("deliver within", args.wrap_ttl),
        ],
        {"grant": wrapping, "ttl": args.ttl, "uses": args.uses, "wrap_ttl": args.wrap_ttl},
    )
    return 0
