"""The coordinator config: defaults, and errors that name the file, the key and the reason."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.config import load_config
from core.errors import ConfigError

TLS = """
[tls]
ca = "pki/ca.pem"
cert = "pki/coordinator.pem"
key = "pki/coordinator-key.pem"
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "coordinator.toml"
    p.write_text(text)
    return p


def test_minimal_config_has_defaults(tmp_path: Path) -> None:
    p = write(tmp_path, '[coordinator]\ndata_dir = "/var/lib/clawback"\n' + TLS)
    cfg = load_config(p)
    assert cfg.listen == "127.0.0.1:7443"
    assert (cfg.host, cfg.port) == ("127.0.0.1", 7443)
    assert cfg.data_dir == Path("/var/lib/clawback")
    assert cfg.heartbeat_interval_s == 10
    assert cfg.log_level == "info"
    assert cfg.repository.backend == "local"
    assert cfg.repository.path == Path("/var/lib/clawback/repo")
    assert cfg.repository.pack_size == 32 * 1024 * 1024
    assert cfg.catalog.kind == "sqlite"
    assert cfg.catalog.path == Path("/var/lib/clawback/catalog.db")
    # Relative paths are taken from the config file's directory.
    assert cfg.tls.ca == tmp_path / "pki/ca.pem"
    assert cfg.tls.key == tmp_path / "pki/coordinator-key.pem"


def test_full_config(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        """
[coordinator]
listen = "[::1]:0"
data_dir = "data"
heartbeat_interval_s = 2
log_level = "debug"

[repository]
backend = "local"
path = "/srv/repo"
pack_size_mib = 8

[catalog]
kind = "sqlite"
path = "/srv/catalog.db"
"""
        + TLS,
    )
    cfg = load_config(p)
    assert (cfg.host, cfg.port) == ("[::1]", 0)
    assert cfg.data_dir == tmp_path / "data"
    assert cfg.repository.path == Path("/srv/repo")
    assert cfg.repository.pack_size == 8 * 1024 * 1024
    assert cfg.catalog.path == Path("/srv/catalog.db")
    assert cfg.heartbeat_interval_s == 2 and cfg.log_level == "debug"


def expect_error(tmp_path: Path, text: str, key: str, reason: str) -> ConfigError:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(p)
    err = info.value
    assert err.file == str(p)
    assert err.key == key
    assert reason in err.reason
    assert str(p) in str(err) and reason in str(err)
    return err


def test_malformed_toml(tmp_path: Path) -> None:
    expect_error(tmp_path, "[coordinator\ndata_dir = 1\n", "", "not valid TOML")


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.toml")


def test_missing_section(tmp_path: Path) -> None:
    expect_error(tmp_path, TLS, "coordinator", "section is required")


def test_missing_key(tmp_path: Path) -> None:
    expect_error(tmp_path, "[coordinator]\n" + TLS, "coordinator.data_dir", "is required")
    expect_error(
        tmp_path,
        '[coordinator]\ndata_dir = "d"\n[tls]\nca = "a"\ncert = "b"\n',
        "tls.key",
        "is required",
    )


def test_wrong_type(tmp_path: Path) -> None:
    expect_error(
        tmp_path,
        '[coordinator]\ndata_dir = "d"\n[repository]\npack_size_mib = "32"\n' + TLS,
        "repository.pack_size_mib",
        "must be an integer",
    )
    expect_error(
        tmp_path,
        '[coordinator]\ndata_dir = "d"\nheartbeat_interval_s = true\n' + TLS,
        "coordinator.heartbeat_interval_s",
        "not a boolean",
    )


def test_out_of_range_and_choices(tmp_path: Path) -> None:
    expect_error(
        tmp_path,
        '[coordinator]\ndata_dir = "d"\n[repository]\npack_size_mib = 0\n' + TLS,
        "repository.pack_size_mib",
        "must be at least 1, not 0",
    )
    expect_error(
        tmp_path,
        '[coordinator]\ndata_dir = "d"\n[catalog]\nkind = "postgres"\n' + TLS,
        "catalog.kind",
        "must be one of sqlite",
    )
    expect_error(
        tmp_path,
        '[coordinator]\ndata_dir = "d"\nlog_level = "loud"\n' + TLS,
        "coordinator.log_level",
        "must be one of",
    )


@pytest.mark.parametrize(
    ("listen", "reason"),
    [
        ("localhost", "must be HOST:PORT"),
        ("127.0.0.1:http", "port must be a number"),
        ("127.0.0.1:70000", "port must be a number"),
        ("::1:7443", "in brackets"),
    ],
)
def test_bad_listen(tmp_path: Path, listen: str, reason: str) -> None:
    expect_error(
        tmp_path,
        f'[coordinator]\ndata_dir = "d"\nlisten = "{listen}"\n' + TLS,
        "coordinator.listen",
        reason,
    )


def test_unknown_keys(tmp_path: Path) -> None:
    expect_error(
        tmp_path,
        '[coordinator]\ndata_dir = "d"\nlisten_port = 1\n' + TLS,
        "coordinator.listen_port",
        "unknown key",
    )
    expect_error(
        tmp_path,
        '[coordinator]\ndata_dir = "d"\n[repository]\npacksize = 1\n' + TLS,
        "repository.packsize",
        "unknown key",
    )
    expect_error(tmp_path, '[coordinator]\ndata_dir = "d"\n[extra]\n' + TLS, "extra", "unknown key")


def test_certificates_from_vault(tmp_path: Path) -> None:
    vault = (
        '[coordinator]\ndata_dir = "/d"\n[tls]\nsource = "vault"\nttl = "12h"\n'
        '[vault]\naddress = "http://127.0.0.1:8200"\nrole_id_file = "r"\nsecret_id_file = "s"\n'
    )
    cfg = load_config(write(tmp_path, vault))
    assert (cfg.certs.source, cfg.certs.ttl, cfg.certs.name) == ("vault", "12h", "coordinator")
    assert cfg.certs.hosts == ("localhost", "127.0.0.1")
    assert cfg.vault is not None and cfg.vault.secret_id_file == tmp_path / "s"
    cfg = load_config(
        write(tmp_path, vault.replace('ttl = "12h"', 'name = "c1"\nhosts = ["backup.example"]'))
    )
    assert (cfg.certs.name, cfg.certs.hosts, cfg.certs.ttl) == ("c1", ("backup.example",), "24h")
    with pytest.raises(ConfigError, match="vault: section is required"):
        load_config(write(tmp_path, vault.split("[vault]")[0]))
    with pytest.raises(ConfigError, match=r"tls\.key: has no use"):
        load_config(write(tmp_path, vault.replace('ttl = "12h"', 'key = "k.pem"')))


def test_direct_io(tmp_path: Path) -> None:
    from coordinator.config import DEFAULT_DIRECT_IO
    from coordinator.main import open_store

    base = f'[coordinator]\ndata_dir = "{tmp_path / "d"}"\n'
    assert load_config(write(tmp_path, base + TLS)).repository.direct_io is DEFAULT_DIRECT_IO
    for value in (True, False):
        cfg = load_config(
            write(tmp_path, base + f"[repository]\ndirect_io = {str(value).lower()}\n" + TLS)
        )
        assert cfg.repository.direct_io is value
        store = open_store(cfg)
        try:
            assert store.backend.direct_io is value  # O_DIRECT is supported where the tests run
        finally:
            store.catalog.close()
    expect_error(
        tmp_path,
        base + '[repository]\ndirect_io = "yes"\n' + TLS,
        "repository.direct_io",
        "true or false",
    )
