"""The CLI config file: values, relative paths, flag precedence, and errors that name file, key and reason (exit 2)."""

from __future__ import annotations

from pathlib import Path

import pytest

from coordinator.cli import config
from coordinator.cli.main import main
from core.errors import ConfigError, ExitCode, UsageError


def _write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cli.toml"
    p.write_text(text)
    return p


def test_full_config_with_relative_paths(tmp_path: Path) -> None:
    p = _write(
        tmp_path,
        '[coordinator]\naddress = "backup.example:7443"\n'
        '[tls]\nca = "pki/ca.pem"\ncert = "/abs/admin.pem"\nkey = "pki/admin.key"\n'
        '[keys]\nprovider = "file"\nfile = "repo.key"\n',
    )
    cfg = config.load(p)
    assert cfg.address == "backup.example:7443"
    assert cfg.ca == tmp_path / "pki/ca.pem"
    assert cfg.cert == Path("/abs/admin.pem")
    assert cfg.key_file == tmp_path / "repo.key"
    assert cfg.key_provider == "file"
    assert cfg.tls().key == tmp_path / "pki/admin.key"


def test_flags_override_the_file(tmp_path: Path) -> None:
    p = _write(tmp_path, '[coordinator]\naddress = "a:1"\n[tls]\nca = "ca.pem"\n')
    cfg = config.resolve(p, address="b:2", ca="/other/ca.pem")
    assert cfg.address == "b:2" and cfg.ca == Path("/other/ca.pem")


def test_default_path_from_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    p = _write(tmp_path, '[coordinator]\naddress = "env:9"\n')
    monkeypatch.setenv("CLAWBACK_CONFIG", str(p))
    assert config.resolve(None).address == "env:9"
    monkeypatch.delenv("CLAWBACK_CONFIG")
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "none"))
    assert config.resolve(None) == config.CliConfig()


@pytest.mark.parametrize(
    ("text", "key", "reason"),
    [
        ("[coordinator\n", "", "not valid TOML"),
        ("[coordinator]\naddress = 7443\n", "coordinator.address", "must be a string"),
        ('[coordinator]\naddress = "nohost"\n', "coordinator.address", "HOST:PORT"),
        ('[coordinator]\naddress = "h:99999"\n', "coordinator.address", "port"),
        ('[coordinator]\nadress = "h:1"\n', "coordinator.adress", "unknown key"),
        ('coordinator = "h:1"\n', "coordinator", "must be a table"),
        ("[tls]\nca = 1\n", "tls.ca", "must be a string"),
        ('[tls]\ncert = ""\n', "tls.cert", "must not be empty"),
        ('[keys]\nprovider = "hsm"\n', "keys.provider", "must be one of file, vault"),
        ("[keys]\nfile = true\n", "keys.file", "not a boolean"),
        ("[extra]\nx = 1\n", "extra", "unknown key"),
    ],
)
def test_bad_config_names_file_key_reason(tmp_path: Path, text: str, key: str, reason: str) -> None:
    p = _write(tmp_path, text)
    with pytest.raises(ConfigError) as exc_info:
        config.load(p)
    err = exc_info.value
    assert err.file == str(p) and err.key == key and reason in err.reason
    assert err.exit_code == ExitCode.USAGE
    assert str(p) in str(err) and reason in str(err)


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "nope.toml"
    assert main(["--config", str(missing), "agents"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clawback: ") and str(missing) in err and "does not exist" in err


def test_cli_reports_bad_config_with_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = _write(tmp_path, "[tls]\nca = 1\n")
    assert main(["agents", "--config", str(p)]) == 2
    err = capsys.readouterr().err
    assert f"clawback: {p}: tls.ca: must be a string" in err


def test_missing_settings_are_usage_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    p = _write(tmp_path, '[coordinator]\naddress = "h:1"\n')
    with pytest.raises(UsageError, match="--ca, --cert, --key"):
        config.load(p).tls()
    with pytest.raises(UsageError, match="--coordinator"):
        config.CliConfig().coordinator()
    assert main(["--config", str(p), "snapshots"]) == 2
    assert "no TLS" in capsys.readouterr().err


def test_bad_coordinator_flag(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--coordinator", "no-port", "agents"]) == 2
    assert "--coordinator must be HOST:PORT" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("addr", "parsed"),
    [("h:1", ("h", 1)), ("[::1]:7443", ("::1", 7443)), ("10.0.0.1:80", ("10.0.0.1", 80))],
)
def test_parse_address(addr: str, parsed: tuple[str, int]) -> None:
    assert config.parse_address(addr) == parsed


@pytest.mark.parametrize("addr", ["", ":1", "h:", "h:x", "::1:80", "h:0"])
def test_parse_address_refuses(addr: str) -> None:
    with pytest.raises(ValueError):
        config.parse_address(addr)


def test_admin_certificate_from_vault(tmp_path: Path) -> None:
    cfg = config.load(_write(tmp_path, '[tls]\nsource = "vault"\nname = "alice"\nttl = "30m"\n'))
    assert (cfg.tls_source, cfg.tls_name, cfg.cert_ttl, cfg.cert) == ("vault", "alice", "30m", None)
    assert config.load(_write(tmp_path, '[tls]\nsource = "vault"\n')).tls_name == "operator"
    for text, key in [
        ('[tls]\nsource = "vault"\nkey = "k.pem"\n', "tls.key"),
        ('[tls]\nsource = "vault"\nttl = "1 hour"\n', "tls.ttl"),
        ('[tls]\nname = "alice"\n', "tls.name"),  # a name only means something with Vault
    ]:
        with pytest.raises(ConfigError) as exc:
            config.load(_write(tmp_path, text))
        assert exc.value.key == key, exc.value
