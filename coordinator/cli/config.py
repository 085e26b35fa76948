"""The CLI's own settings: a small TOML file merged under the command-line flags.

    [coordinator]
    address = "localhost:7443"      # HOST:PORT

    [tls]                           # the operator's admin certificate
    ca = "ca.pem"
    cert = "admin-admin.pem"
    key = "admin-admin.key"
    # or, from Vault PKI at each start, signed with the operator's own Vault token
    # ($VAULT_TOKEN or ~/.vault-token, $VAULT_ADDR), kept in memory only:
    # source = "vault"
    # name = "operator"             # the certificate's CN
    # ttl = "1h"
    # ca = "ca.pem"                 # optional: trusted besides the Vault CA

    [keys]
    provider = "file"               # the development file provider (v1)
    file = "repo.key"

Relative paths are relative to the config file. Errors name the file, the
key and the reason (core.config), and exit 2.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from core import config as core_config
from core.certs import SOURCES, duration_seconds
from core.errors import ConfigError, UsageError
from core.tls import TlsFiles

ENV_CONFIG = "CLAWBACK_CONFIG"
KEY_PROVIDERS = ("file", "vault")


@dataclass(frozen=True)
class CliConfig:
    """Where the coordinator is, how to prove we are an admin, and where the keys are."""

    file: Path | None = None
    address: str | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    key_provider: str = "file"
    key_file: Path | None = None
    tls_source: str = "files"  # or "vault": an admin certificate from Vault PKI per run
    tls_name: str = "operator"
    cert_ttl: str = "1h"

    def tls(self) -> TlsFiles:
        """The admin's TLS files; UsageError naming what is missing."""
        missing = [n for n in ("ca", "cert", "key") if getattr(self, n) is None]
        if missing:
            flags = ", ".join(f"--{n}" for n in missing)
            raise UsageError(
                f"no TLS {'/'.join(missing)} configured: pass {flags} or set [tls] in {self._where()}"
            )
        assert self.ca and self.cert and self.key
        return TlsFiles(self.ca, self.cert, self.key)

    def coordinator(self) -> str:
        if not self.address:
            raise UsageError(
                f"no coordinator address: pass --coordinator HOST:PORT or set [coordinator] address in {self._where()}"
            )
        return self.address

    def _where(self) -> str:
        return str(self.file) if self.file else "the config file (--config)"


def default_path() -> Path | None:
    """$CLAWBACK_CONFIG if set, else ~/.config/clawback/cli.toml when it exists."""
    env = os.environ.get(ENV_CONFIG)
    if env:
        return Path(env)
    base = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    candidate = base / "clawback" / "cli.toml"
    return candidate if candidate.is_file() else None


def parse_address(address: str) -> tuple[str, int]:
    """Split HOST:PORT (IPv6 as [addr]:port); ValueError with the reason if malformed."""
    host, sep, port = address.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be HOST:PORT, not {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address must be written [ADDR]:PORT, not {address!r}")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"must be HOST:PORT with a port 1..65535, not {address!r}")
    return host, int(port)


def load(path: str | Path) -> CliConfig:
    """Read and validate a CLI config file; ConfigError (exit 2) names file, key and reason."""
    root = core_config.load(path)
    coord = root.table("coordinator")
    address = coord.str("address", None)
    if address is not None:
        try:
            parse_address(address)
        except ValueError as exc:
            raise coord.error("address", str(exc)) from None
    coord.done()
    tls = root.table("tls")
    tls_source = tls.str("source", "files", choices=SOURCES)
    tls_name, cert_ttl = CliConfig.tls_name, CliConfig.cert_ttl
    if tls_source == "vault":
        for k in ("cert", "key"):
            if tls.has(k):
                raise tls.error(
                    k, 'has no use with source = "vault": the admin key lives in memory'
                )
        tls_name = tls.str("name", tls_name)
        cert_ttl = tls.str("ttl", cert_ttl)
        try:
            duration_seconds(cert_ttl)
        except ValueError as exc:
            raise tls.error("ttl", str(exc)) from None
    ca, cert, key = (_path(tls, n) for n in ("ca", "cert", "key"))
    tls.done()
    keys = root.table("keys")
    provider = keys.str("provider", "file", choices=KEY_PROVIDERS)
    key_file = _path(keys, "file")
    keys.done()
    root.done()
    return CliConfig(
        file=Path(root.file),
        address=address,
        ca=ca,
        cert=cert,
        key=key,
        key_provider=provider,
        key_file=key_file,
        tls_source=tls_source,
        tls_name=tls_name,
        cert_ttl=cert_ttl,
    )


def _path(table: core_config.Table, key: str) -> Path | None:
    if table.str(key, None) == "":
        raise table.error(key, "must not be empty")
    value: Path | None = table.path(key, None)
    return value


def resolve(
    config_file: str | Path | None,
    *,
    address: str | None = None,
    ca: str | Path | None = None,
    cert: str | Path | None = None,
    key: str | Path | None = None,
    key_file: str | Path | None = None,
) -> CliConfig:
    """The effective settings: the config file (explicit, $CLAWBACK_CONFIG or the default) under the flags."""
    path = Path(config_file) if config_file else default_path()
    base = load(path) if path is not None else CliConfig()
    if address is not None:
        try:
            parse_address(address)
        except ValueError as exc:
            raise UsageError(f"--coordinator {exc}") from None
    return dataclasses.replace(
        base,
        address=address if address is not None else base.address,
        ca=Path(ca) if ca is not None else base.ca,
        cert=Path(cert) if cert is not None else base.cert,
        key=Path(key) if key is not None else base.key,
        key_file=Path(key_file) if key_file is not None else base.key_file,
    )


__all__ = ["CliConfig", "ConfigError", "default_path", "load", "parse_address", "resolve"]
