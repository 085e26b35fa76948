"""The coordinator daemon's configuration: a TOML file read into frozen dataclasses."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path

from core.certs import CertSettings, load_cert_settings
from core.config import load
from core.errors import UsageError
from core.tls import TlsFiles
from core.vault import VaultSettings, load_vault_settings

LOG_LEVELS = ("debug", "info", "warning", "error")
DEFAULT_DIRECT_IO = True


@dataclass(frozen=True)
class RepositorySettings:
    backend: str  # "local" in v1
    path: Path
    pack_size_mib: int
    # Pack files are written and read back with O_DIRECT, bypassing the page cache
    # (docs/performance.md §O_DIRECT pack files).
    direct_io: bool = DEFAULT_DIRECT_IO

    @property
    def pack_size(self) -> int:
        return self.pack_size_mib * 1024 * 1024


@dataclass(frozen=True)
class CatalogSettings:
    kind: str  # "sqlite" in v1
    path: Path


@dataclass(frozen=True)
class CoordinatorConfig:
    file: str
    listen: str  # "HOST:PORT"; port 0 picks a free port
    data_dir: Path
    heartbeat_interval_s: int
    log_level: str
    repository: RepositorySettings
    catalog: CatalogSettings
    certs: CertSettings
    vault: VaultSettings | None = None  # with [tls] source = "vault": the coordinator's AppRole

    @property
    def tls(self) -> TlsFiles:
        """The certificate files (source = "files")."""
        if self.certs.files is None:
            raise UsageError(f'{self.file}: [tls] source = "vault" has no certificate files')
        return self.certs.files

    @property
    def host(self) -> str:
        return split_listen(self.listen)[0]

    @property
    def port(self) -> int:
        return split_listen(self.listen)[1]


def split_listen(listen: str) -> tuple[str, int]:
    """Split "HOST:PORT" (IPv6 hosts in brackets); raises ValueError with a reason."""
    host, sep, port_s = listen.rpartition(":")
    if not sep or not host:
        raise ValueError(f"must be HOST:PORT, not {listen!r}")
    if host.startswith("[") and host.endswith("]"):
        inner = host[1:-1]
        try:
            ipaddress.IPv6Address(inner)
        except ValueError:
            raise ValueError(f"{inner!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"an IPv6 host must be in brackets, e.g. [::1]:7443, not {listen!r}")
    if not port_s.isdigit() or not 0 <= int(port_s) <= 65535:
        raise ValueError(f"port must be a number from 0 to 65535, not {port_s!r}")
    return host, int(port_s)


def load_config(path: str | Path) -> CoordinatorConfig:
    """Read and validate a coordinator config; raises ConfigError naming file, key and reason."""
    root = load(path)

    co = root.table("coordinator", required=True)
    listen = co.str("listen", "127.0.0.1:7443")
    try:
        split_listen(listen)
    except ValueError as exc:
        raise co.error("listen", str(exc)) from None
    data_dir = co.path("data_dir")
    heartbeat = co.int("heartbeat_interval_s", 10, min=1, max=3600)
    log_level = co.str("log_level", "info", choices=LOG_LEVELS)
    co.done()

    repo_t = root.table("repository")
    repository = RepositorySettings(
        backend=repo_t.str("backend", "local", choices=("local",)),
        path=repo_t.path("path", None) or data_dir / "repo",
        pack_size_mib=repo_t.int("pack_size_mib", 32, min=1, max=1024),
        direct_io=repo_t.bool("direct_io", DEFAULT_DIRECT_IO),
    )
    repo_t.done()

    cat_t = root.table("catalog")
    catalog = CatalogSettings(
        kind=cat_t.str("kind", "sqlite", choices=("sqlite",)),
        path=cat_t.path("path", None) or data_dir / "catalog.db",
    )
    cat_t.done()

    certs = load_cert_settings(
        root.table("tls", required=True),
        default_name="coordinator",
        default_hosts=["localhost", "127.0.0.1"],
    )
    vault = None
    if certs.source == "vault":
        vault = load_vault_settings(root.table("vault", required=True))

    root.done()
    return CoordinatorConfig(
        file=root.file,
        listen=listen,
        data_dir=data_dir,
        heartbeat_interval_s=heartbeat,
        log_level=log_level,
        repository=repository,
        catalog=catalog,
        certs=certs,
        vault=vault,
    )
