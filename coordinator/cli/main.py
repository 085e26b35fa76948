"""The `clawback` command: global flags, one subcommand per operator task, errors to exit codes.

Each `cmd_*` module declares its flags in `setup(subparsers)` and does its
work in `run(ctx, args) -> int` (kopia's cli/command_*.go). Every
ClawbackError becomes `clawback: <message>` on stderr and its exit code
(docs/cli.md §Exit codes).

Every run imports this module and each command's `setup`, so they import
only what declaring flags needs; what one command alone uses (cryptography
for `certs`, hvac for Vault, the gRPC client) is imported when it runs.
tests/coordinator/cli/test_cli_imports.py keeps it that way.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from coordinator.cli import (
    cmd_agents,
    cmd_backup,
    cmd_certs,
    cmd_check,
    cmd_jobs,
    cmd_keys,
    cmd_ls,
    cmd_repo,
    cmd_restore,
    cmd_snapshots,
    cmd_vault,
)
from coordinator.cli.config import CliConfig, resolve
from coordinator.cli.output import Output
from core.clock import SYSTEM, Clock
from core.errors import ClawbackError, ExitCode, UsageError

if TYPE_CHECKING:
    from coordinator.cli.client import AdminClient
    from core.certs import CertSource
    from core.keys import KeyProvider
    from core.tls import TlsFiles

COMMANDS = (
    cmd_repo,
    cmd_agents,
    cmd_backup,
    cmd_snapshots,
    cmd_ls,
    cmd_restore,
    cmd_check,
    cmd_jobs,
    cmd_certs,
    cmd_vault,
    cmd_keys,
)


class Context:
    """What a command needs, made on first use: settings, the coordinator client, the key provider."""

    def __init__(
        self, args: argparse.Namespace, out: Output | None = None, clock: Clock = SYSTEM
    ) -> None:
        self.args = args
        self.out = out or Output(json_mode=args.json, quiet=args.quiet)
        self.clock = clock
        self._settings: CliConfig | None = None
        self._client: AdminClient | None = None

    @property
    def settings(self) -> CliConfig:
        if self._settings is None:
            a = self.args
            self._settings = resolve(
                a.config,
                address=a.coordinator,
                ca=a.ca,
                cert=a.cert,
                key=a.key,
                key_file=a.key_file,
            )
        return self._settings

    def client(self) -> AdminClient:
        if self._client is None:
            from coordinator.cli.client import AdminClient

            s = self.settings
            address = s.coordinator()
            self._client = AdminClient(address, self.certificate(), timeout=self.args.timeout)
        return self._client

    def certificate(self) -> TlsFiles | CertSource:
        """The admin certificate: the configured files, or with `[tls] source = "vault"` a
        short-lived one for `[tls] name` signed now with the operator's Vault token (the key
        never leaves this process; nothing is written)."""
        s = self.settings
        if s.tls_source != "vault":
            return s.tls()
        from core.certs import VaultCertSource, read_extra_ca

        client = self.vault_client()
        source = VaultCertSource(
            client,
            client.settings,
            "admin",
            s.tls_name,
            s.cert_ttl,
            self.clock,
            extra_ca=read_extra_ca(s.ca),
        )
        source.issue()  # no renewal: a CLI run is shorter than the certificate's life
        return source

    def key_file(self) -> Path:
        path = self.settings.key_file
        if path is None:
            raise UsageError("no key file: pass --key-file FILE or set [keys] file in the config")
        return path

    def key_provider(self) -> KeyProvider:
        """The operator's view of the keys: the key file, or with Vault a grant minted for itself.

        The operator role may mint grants but holds no decrypt right of its own, so even
        `ls` goes through a single-use, short-lived grant: every read of key material is a
        grant in Vault's audit log.
        """
        if self.settings.key_provider != "vault":
            from core.keys import FileKeyProvider

            return FileKeyProvider(self.key_file())
        from core.vault import VaultClient
        from core.vaultkeys import VaultKeyProvider

        operator = self.vault_client()
        token = operator.unwrap_grant(operator.mint_restore_grant(ttl="10m", uses=64))
        settings = operator.settings
        return VaultKeyProvider(VaultClient.for_token(settings, token), settings)

    def key_source(self) -> str:
        """Where keys come from, for messages."""
        if self.settings.key_provider == "vault":
            return "the Vault restore grant"
        return str(self.key_file())

    def vault_client(self) -> Any:
        """The operator's own Vault session: address from $VAULT_ADDR, token from $VAULT_TOKEN or ~/.vault-token."""
        from coordinator.cli.vaultsetup import operator_settings, operator_token
        from core.vault import VaultClient

        return VaultClient.for_token(operator_settings(), operator_token())

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _global_flags(defaults: bool) -> argparse.ArgumentParser:
    """The global flags, accepted before or after the subcommand."""
    d = (lambda v: v) if defaults else (lambda v: argparse.SUPPRESS)
    p = argparse.ArgumentParser(add_help=False)
    g = p.add_argument_group("global options")
    g.add_argument(
        "--config",
        metavar="FILE",
        default=d(None),
        help="CLI config (default $CLAWBACK_CONFIG, else ~/.config/clawback/cli.toml if present)",
    )
    g.add_argument(
        "--coordinator", metavar="HOST:PORT", default=d(None), help="coordinator address"
    )
    g.add_argument(
        "--ca",
        metavar="FILE",
        default=d(None),
        help="CA bundle the coordinator's certificate chains to",
    )
    g.add_argument("--cert", metavar="FILE", default=d(None), help="admin certificate (PEM)")
    g.add_argument(
        "--key", metavar="FILE", default=d(None), help="admin certificate's private key (PEM)"
    )
    g.add_argument(
        "--key-file",
        metavar="FILE",
        default=d(None),
        help="repository key file (file key provider)",
    )
    g.add_argument("--json", action="store_true", default=d(False), help="print results as JSON")
    g.add_argument(
        "-q",
        "--quiet",
        action="store_true",
        default=d(False),
        help="no progress or notes on stderr",
    )
    g.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        default=d(30.0),
        help="deadline of each request (default 30)",
    )
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clawback",
        description="Operate a clawback backup coordinator: repository, agents, backups, restores, checks.",
        parents=[_global_flags(defaults=True)],
        epilog="Exit codes: 0 ok, 1 error, 2 usage/config, 3 partial, 4 unreachable, 5 not found, "
        "6 exists, 7 permission, 8 exhausted, 9 key, 10 no repository, 11 integrity, 130 interrupted.",
    )
    subs = parser.add_subparsers(dest="command", metavar="COMMAND")
    common = _global_flags(defaults=False)
    for module in COMMANDS:
        module.setup(subs, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `clawback` console script; returns the exit code.

    `argv` None means this process's own command line, after which the process exits.
    """
    try:
        return _main(argv)
    finally:
        if argv is None:
            # Shutting down, the interpreter runs full garbage collections over every object
            # still alive, most of them grpc's and protobuf's: ~30 ms of each run. Frozen
            # objects are skipped; reference counting still frees them, and the cyclic garbage
            # among them is left to the process's exit.
            gc.freeze()


def _main(argv: Sequence[str] | None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # argparse: --help (0) or a usage error (2), already printed
        return exc.code if isinstance(exc.code, int) else ExitCode.USAGE
    if getattr(args, "func", None) is None:
        (getattr(args, "parser", None) or parser).print_usage(sys.stderr)
        print("clawback: error: a command is required", file=sys.stderr)
        return ExitCode.USAGE
    ctx = Context(args)
    try:
        return int(args.func(ctx, args))
    except ClawbackError as err:
        ctx.out.stdout.flush()
        print(f"clawback: {err}", file=sys.stderr)
        return int(err.exit_code)
    except KeyboardInterrupt:
        print("clawback: interrupted", file=sys.stderr)
        return ExitCode.INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`clawback ls ... | head`): stop quietly.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return ExitCode.ERROR
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())
