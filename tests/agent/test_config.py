"""Agent config validation: a malformed config names the file, the key and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from core.errors import ConfigError

GOOD = """
[agent]
state_dir = "state"
[coordinator]
address = "127.0.0.1:7443"
[tls]
ca = "ca.pem"
cert = "a.pem"
key = "a.key"
[keys]
provider = "file"
file = "/etc/clawback/repo.key"
[[source]]
name = "uploads"
path = "/srv/uploads"
"""


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agent.toml"
    p.write_text(text)
    return p


def test_good_config(tmp_path: Path) -> None:
    c = load_config(_write(tmp_path, GOOD))
    assert c.state_dir == tmp_path / "state" and c.tls.ca == tmp_path / "ca.pem"
    assert (c.workers, c.download_window_mib) == (2, 4)
    c = load_config(_write(tmp_path, GOOD + "[performance]\ndownload_window_mib = 0\n"))
    assert c.download_window_mib == 0  # gRPC's automatic window
    assert c.source("uploads") is not None and c.source("uploads").path == Path("/srv/uploads")  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("mutation", "key", "reason"),
    [
        (('address = "127.0.0.1:7443"', 'address = "nohost"'), "coordinator.address", "HOST:PORT"),
        (('path = "/srv/uploads"', 'path = "srv"'), "source[0].path", "absolute"),
        (('name = "uploads"', 'name = "bad name!"'), "source[0].name", "valid source name"),
        (('provider = "file"', 'provider = "kms"'), "keys.provider", "one of"),
        (
            ('provider = "file"\nfile = "/etc/clawback/repo.key"', 'provider = "vault"'),
            "vault",
            "section is required",
        ),
        (
            ('[[source]]\nname = "uploads"', '[[source]]\nkind = "redis"\nname = "uploads"'),
            "source[0].kind",
            "not supported",
        ),
        (("[agent]\n", "[agent]\nstate_dri = 1\n"), "agent.state_dri", "unknown key"),
        (('cert = "a.pem"\n', ""), "tls.cert", "required"),
        (
            ("[agent]\n", "[performance]\ndownload_window_mib = -1\n[agent]\n"),
            "performance.download_window_mib",
            "at least 0",
        ),
    ],
)
def test_bad_configs(tmp_path: Path, mutation: tuple[str, str], key: str, reason: str) -> None:
    p = _write(tmp_path, GOOD.replace(*mutation))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert e.value.file == str(p) and e.value.key == key and reason in e.value.reason


def test_duplicate_source(tmp_path: Path) -> None:
    p = _write(tmp_path, GOOD + '[[source]]\nname = "uploads"\npath = "/x"\n')
    with pytest.raises(ConfigError, match=r"source\[1\]\.name: source 'uploads' is defined twice"):
        load_config(p)


VAULT_TLS = """
[agent]
name = "node1"
state_dir = "state"
[coordinator]
address = "127.0.0.1:7443"
[tls]
source = "vault"
ttl = "8h"
[keys]
provider = "file"
file = "/etc/clawback/repo.key"
[vault]
address = "http://127.0.0.1:8200"
role_id_file = "role_id"
secret_id_file = "secret_id"
"""


def test_certificates_from_vault(tmp_path: Path) -> None:
    c = load_config(_write(tmp_path, VAULT_TLS))
    assert (c.name, c.certs.source, c.certs.ttl, c.certs.files) == ("node1", "vault", "8h", None)
    assert c.vault is not None and c.vault.role_id_file == tmp_path / "role_id"
    for old, new, key, reason in [
        ('name = "node1"\n', "", "agent.name", "is required"),
        ('name = "node1"', 'name = "no/de"', "agent.name", "valid agent name"),
        ('ttl = "8h"', 'ttl = "soon"', "tls.ttl", "duration"),
        ('ttl = "8h"', 'cert = "a.pem"', "tls.cert", "in memory"),
        ("[vault]", "[vaul]", "vault", "section is required"),
    ]:
        with pytest.raises(ConfigError) as exc:
            load_config(_write(tmp_path, VAULT_TLS.replace(old, new, 1)))
        assert exc.value.key == key and reason in exc.value.reason, exc.value
