"""`clawback keys rotate`: rotate the Vault transit key and rewrap every stored wrapped data key."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from coordinator.cli.cmd_vault import add_vault_flags

if TYPE_CHECKING:
    from coordinator.cli.main import Context


def setup(
    subs: argparse._SubParsersAction[argparse.ArgumentParser], common: argparse.ArgumentParser
) -> None:
    keys = subs.add_parser("keys", help="data key management (Vault transit)", parents=[common])
    keys.set_defaults(func=None, parser=keys)
    ksubs = keys.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")
    p = ksubs.add_parser(
        "rotate",
        help="rotate the transit key and rewrap every stored wrapped key",
        parents=[common],
        description="Rotate the Vault transit key (operator token from $VAULT_TOKEN or "
        "~/.vault-token), rewrap every wrapped data key the coordinator stores under the new "
        "version and store them back. With --raise-min-version, then refuse the old versions "
        "(min_decryption_version). The chunk-id key is never rotated.",
    )
    add_vault_flags(p)
    p.add_argument(
        "--raise-min-version",
        action="store_true",
        help="after rewrapping, set min_decryption_version to the new version",
    )
    p.add_argument(
        "--no-rotate", action="store_true", help="only rewrap (resume an interrupted rotation)"
    )
    p.set_defaults(func=run)


def run(ctx: Context, args: argparse.Namespace) -> int:
    from coordinator.cli.vaultsetup import operator_settings, operator_token, rotate_and_rewrap
    from core.vault import VaultClient

    settings = operator_settings(args.vault_addr, args.vault_ca)
    admin = ctx.client()
    with VaultClient.for_token(settings, operator_token(), ctx.clock) as vault:
        # Hook for the admin API: list_keys() -> every stored WrappedKey,
        # put_keys(keys) -> replace the wrapped form of existing key ids.
        report = rotate_and_rewrap(
            vault,
            settings,
            admin.list_keys,
            admin.put_keys,
            rotate=not args.no_rotate,
            raise_min=args.raise_min_version,
        )
    ctx.out.fields(
        [
            ("transit key", f"{settings.transit_mount}/{settings.transit_key}"),
            ("version", f"{report.old_version} -> {report.new_version}"),
            ("rewrapped keys", report.rewrapped),
            ("min decryption version", report.min_decryption_version),
        ],
        {
            "old_version": report.old_version,
            "new_version": report.new_version,
            "rewrapped": report.rewrapped,
            "min_decryption_version": report.min_decryption_version,
        },
    )
    return 0
