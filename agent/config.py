"""The agent's TOML config: where the coordinator is, where its certificate comes from, its key provider and its sources."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from core import config as cfgio
from core.certs import CertSettings, load_cert_settings
from core.errors import UsageError
from core.tls import TlsFiles
from core.vault import VaultSettings, load_vault_settings

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
SOURCE_KINDS = ("volume",)  # "redis", "command" come with their capabilities
DRIVERS = ("none",)  # point-in-time drivers come with the consistent cut


@dataclass(frozen=True)
class SourceConfig:
    name: str
    kind: str
    path: Path
    driver: str = "none"


@dataclass(frozen=True)
class AgentConfig:
    file: str
    state_dir: Path
    coordinator: str
    certs: CertSettings
    key_provider: str
    key_file: Path | None
    sources: tuple[SourceConfig, ...]
    vault: VaultSettings | None = None
    workers: int = 2
    download_window_mib: int = 4  # per stream received ahead of the agent; 0: gRPC's own
    log_level: str = "info"
    name: str = ""  # [agent] name: the CN of its Vault certificate

    @property
    def tls(self) -> TlsFiles:
        """The certificate files (source = "files")."""
        if self.certs.files is None:
            raise UsageError(f'{self.file}: [tls] source = "vault" has no certificate files')
        return self.certs.files

    def source(self, name: str) -> SourceConfig | None:
        return next((s for s in self.sources if s.name == name), None)


def load_config(path: str | Path) -> AgentConfig:
    """Parse and validate an agent config; every error names the file, the key and the reason."""
    root = cfgio.load(path)
    agent = root.table("agent")
    agent_name = agent.str("name", "")
    if agent_name and not _NAME.match(agent_name):
        raise agent.error(
            "name", f"{agent_name!r} is not a valid agent name (letters, digits, _ . -)"
        )
    state_dir = agent.path("state_dir", "/var/lib/clawback-agent")
    log_level = agent.str("log_level", "info", choices=("debug", "info", "warning", "error"))
    agent.done()

    coord = root.table("coordinator", required=True)
    address = coord.str("address")
    if ":" not in address:
        raise coord.error("address", f"must be HOST:PORT, not {address!r}")
    coord.done()

    certs = load_cert_settings(root.table("tls", required=True))
    if certs.source == "vault" and not agent_name:
        raise agent.error(
            "name", 'is required with [tls] source = "vault": the certificate\'s name'
        )

    keys = root.table("keys", required=True)
    provider = keys.str("provider", "vault", choices=("vault", "file"))
    key_file = keys.path("file") if provider == "file" else None
    keys.done()
    needs_vault = provider == "vault" or certs.source == "vault"
    vault = load_vault_settings(root.table("vault", required=True)) if needs_vault else None

    perf = root.table("performance")
    workers = perf.int("workers", 2, min=1, max=64)
    download_window_mib = perf.int("download_window_mib", 4, min=0, max=1024)
    perf.done()

    sources: list[SourceConfig] = []
    seen: set[str] = set()
    for t in root.tables("source"):
        name = t.str("name")
        if not _NAME.match(name):
            raise t.error("name", f"{name!r} is not a valid source name (letters, digits, _ . -)")
        if name in seen:
            raise t.error("name", f"source {name!r} is defined twice")
        seen.add(name)
        kind = t.str("kind", "volume")
        if kind not in SOURCE_KINDS:
            raise t.error(
                "kind",
                f"source kind {kind!r} is not supported by this agent (supported: {', '.join(SOURCE_KINDS)})",
            )
        p = t.str("path")
        if not p.startswith("/"):
            raise t.error("path", f"must be an absolute path, not {p!r}")
        driver = t.str("driver", "none", choices=DRIVERS)
        t.done()
        sources.append(SourceConfig(name, kind, Path(p), driver))
    root.done()
    return AgentConfig(
        file=str(path),
        state_dir=state_dir,
        coordinator=address,
        certs=certs,
        key_provider=provider,
        key_file=key_file,
        sources=tuple(sources),
        vault=vault,
        workers=workers,
        download_window_mib=download_window_mib,
        log_level=log_level,
        name=agent_name,
    )
